"""The child side of the harness: `python -m bench.worker call|serve MODULE:FUNCTION SPEC_JSON`.

Imports the worker function by name and runs it with the spec: `call` replies with its result,
`serve` answers timing requests (see harness.py).
"""

from __future__ import annotations

import importlib
import json
import sys

from bench import harness


def main(argv: list[str]):
  how, target, spec = argv
  module, name = target.split(":")
  fn = getattr(importlib.import_module(module), name)
  if how == "call":
    harness.reply(fn(json.loads(spec)))
  elif how == "serve":
    harness.serve(fn, json.loads(spec))
  else:
    sys.exit(f"bench.worker: unknown kind {how!r} (call or serve)")


if __name__ == "__main__":
  main(sys.argv[1:])
