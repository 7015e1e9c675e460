"""The command line: `python tools/bench.py MODE [flags]` (or `python -m bench MODE` with tools/
on the path). Prints the mode's lines, then its results as one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import bench
from bench import convert, decode, lora, plan, train
from bench import lm_eval as harness_mode
from bench import dpo as dpo_mode

MODES = {"convert": convert, "train": train, "decode": decode, "lora": lora, "plan": plan}
MODES["harness"] = harness_mode
MODES["dpo"] = dpo_mode


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bench.py", description=bench.__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="mode", metavar="MODE", required=True)
  for name, mode in MODES.items():
    m = sub.add_parser(name, help=mode.HELP)
    mode.add_args(m)
    m.add_argument("--workdir", help="make the scratch directory in here (default: /tmp)")
    m.add_argument("--keep", action="store_true", help="keep the scratch directory")
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.workdir:
    os.makedirs(args.workdir, exist_ok=True)
  # A fresh directory even under --workdir, so that cleaning up never deletes the user's files.
  workdir = tempfile.mkdtemp(prefix=f"zoo-bench-{args.mode}-", dir=args.workdir)
  try:
    result = MODES[args.mode].run(args, workdir)
  finally:
    if args.keep:
      print(f"kept {workdir}")
    else:
      shutil.rmtree(workdir, ignore_errors=True)
  print(json.dumps(result), flush=True)
  return 0
