"""`plan`: `zoo plan` on every shipped pretraining and fine-tuning config, for the Cloud TPU
slice its docstring names (the line `Slice: NAME`), each in a fresh process as a user runs it.

The fine-tuning configs plan Llama 3 8B: the bench writes that model's HF config.json (no
weights: `zoo plan` reads none) and passes it as init_from. The peer row is MaxText's published
Llama 3.1 8B recipe shape (three 8192-token sequences per v6e chip, 32 GB of HBM), compiled with
zoo's step: zoo fits it when the ratio of needed to available HBM is at most 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

from bench.harness import TOOLS

HELP = ("zoo plan on every shipped config for the slice its docstring names: GiB per chip, "
        "fits, estimated step time")

ROOT = os.path.dirname(TOOLS)
GiB = 2**30
# The model the fine-tuning configs are planned with.
FINE_TUNED = "llama3_8b"
# MaxText's Llama 3.1 8B v6e recipe: per-device batch 3 at 8192 tokens.
PEER = dict(name="llama3_8b (MaxText's v6e shape)", config="configs/llama3_8b.py",
            topology="v6e-256", overrides=["--config.data.batch_size=768"])


def add_args(p: argparse.ArgumentParser):
  p.add_argument("--configs", default="",
                 help="comma-separated config names (default: every file in configs/)")
  p.add_argument("--no-peer", action="store_true", help="skip MaxText's recipe shape")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per compile")


def slice_of(path: str) -> str:
  """The slice a config file's docstring names."""
  with open(path, encoding="utf-8") as f:
    m = re.search(r"^Slice: (\S+?)\.?\s", f.read(), re.MULTILINE)
  if not m:
    sys.exit(f"bench: {path} names no slice (a docstring line 'Slice: NAME')")
  return m.group(1)


def fine_tuned_checkpoint(workdir: str) -> str:
  """A directory holding only the HF config.json of the model the fine-tuning configs plan."""
  from zoo.convert.hf import config_to_hf  # noqa: PLC0415
  from zoo.models.presets import get_preset  # noqa: PLC0415
  path = os.path.join(workdir, FINE_TUNED)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(get_preset(FINE_TUNED), dtype="bfloat16"), f)
  return path


def zoo_plan(config: str, topology: str, overrides: list[str], timeout: int) -> dict:
  cmd = [sys.executable, "-m", "zoo.cli", "plan", "--config", config, "--topology", topology,
         "--json", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode not in (0, 1):
    sys.exit(f"bench: zoo plan {config} failed (exit status {proc.returncode}):\n"
             f"{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["wall_seconds"] = time.perf_counter() - start
  return result


def row(name: str, r: dict) -> dict:
  parts = r["per_chip_bytes"]
  return {"config": name, "topology": r["topology"], "chips": r["chips"],
          "per_chip_gib": round(parts["total"] / GiB, 2),
          "hbm_gib": round(r["hbm_bytes"] / GiB, 2) if r["hbm_bytes"] else None,
          "need_over_hbm": round(parts["total"] / r["hbm_bytes"], 3) if r["hbm_bytes"] else None,
          "fits": r["fits"], "sequences_per_chip": r["batch_per_chip"],
          "parameters_gib": round(parts["parameters"] / GiB, 2),
          "optimizer_gib": round(parts["optimizer"] / GiB, 2),
          "temporaries_gib": round(parts["temporaries"] / GiB, 2),
          "compile_seconds": round(r["compile_seconds"], 1),
          "step_seconds": (None if r["estimated_step_seconds"] is None
                           else round(r["estimated_step_seconds"], 4)),
          "bound_by": (None if r["step_seconds"] is None
                       else max(r["step_seconds"], key=r["step_seconds"].get)),
          "estimated_mfu": None if r["estimated_mfu"] is None else round(r["estimated_mfu"], 3)}


def run(args, workdir: str) -> dict:
  names = [n.strip() for n in args.configs.split(",") if n.strip()] or sorted(
      os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "configs",
                                                                               "*.py")))
  checkpoint = None
  rows = []
  print(f"{'config':34s}{'slice':15s}{'GiB/chip':>10s}{'HBM':>8s}{'need/HBM':>10s}"
        f"{'fits':>6s}{'compile s':>11s}{'step s':>9s}{'bound by':>13s}{'MFU':>7s}")
  jobs = []
  for name in names:
    path = os.path.join(ROOT, "configs", f"{name}.py")
    config = f"configs/{name}.py"
    with open(path, encoding="utf-8") as f:
      if "init_from" in f.read():
        checkpoint = checkpoint or fine_tuned_checkpoint(workdir)
        config += f":init_from={checkpoint}"
    jobs.append((name, config, slice_of(path), []))
  if not args.no_peer:
    jobs.append((PEER["name"], PEER["config"], PEER["topology"], PEER["overrides"]))
  for name, config, topology, overrides in jobs:
    r = row(name, zoo_plan(config, topology, overrides, args.timeout))
    rows.append(r)
    mfu = "-" if r["estimated_mfu"] is None else f"{r['estimated_mfu']:.1%}"
    step = "-" if r["step_seconds"] is None else f"{r['step_seconds']:.3g}"
    print(f"{name:34s}{topology:15s}{r['per_chip_gib']:10.2f}{r['hbm_gib']:8.2f}"
          f"{r['need_over_hbm']:10.3f}{'yes' if r['fits'] else 'NO':>6s}"
          f"{r['compile_seconds']:11.1f}{step:>9s}{r['bound_by'] or '-':>13s}{mfu:>7s}",
          flush=True)
  fit = sum(1 for r in rows if r["fits"] and r["config"] in names)
  print(f"{fit} of {len(names)} shipped configs fit the slice their docstring names "
        f"(fine-tuning configs planned with {FINE_TUNED}); memory from the TPU compiler; step "
        "time and MFU an estimate from the chips' public figures (zoo.plan.estimate_step)")
  return {"rows": rows, "fits": fit, "configs": len(names), "fine_tuned_model": FINE_TUNED}
