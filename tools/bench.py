"""Benchmarks for zoo: `python tools/bench.py MODE [flags]`, MODE one of convert, train, decode,
lora (`--help` lists each one's flags). The code is the `bench` package next to this file
(tools/bench/), which this script's directory on sys.path makes importable."""

import sys

from bench.cli import main

if __name__ == "__main__":
  sys.exit(main())
