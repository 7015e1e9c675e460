"""Benchmarks for zoo, one mode each.

    python tools/bench.py convert [--size-mb 1000] [--shards 4] [--workdir DIR] [--keep]

Human-readable lines first; the last line of a successful run is one JSON object with the
results, so that scripts can read it with `tail -n 1`. MB means MiB (2**20 bytes) throughout.

New modes (train, lora...) go into MODES: a function that adds the mode's options to its
sub-parser and a function that runs it and returns the result dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

MB = 2**20

# The parent stays free of numpy and zoo: Linux carries a process's peak RSS over into the
# ru_maxrss of every child it starts later (fork and exec inherit the high-water mark), so a
# parent that once held a shard would inflate every measurement after it.


@dataclasses.dataclass
class Run:
  seconds: float
  peak_rss_mb: float
  output: str


def measure(cmd: list[str], what: str) -> Run:
  """Runs `cmd` in a fresh process: its wall time and its own peak RSS."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  output = proc.stdout.read()
  proc.stdout.close()
  # wait4, not getrusage(RUSAGE_CHILDREN): the latter is a maximum over all children so far.
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    sys.exit(f"bench: {what} failed (exit status {proc.returncode}):\n{output[-4000:]}")
  return Run(seconds, usage.ru_maxrss / 1024, output)  # ru_maxrss is in KiB on Linux


def python_cmd(code: str, *args: str) -> list[str]:
  return [sys.executable, "-c", code, *args]


# ---------------------------------------------------------------------------------------------
# convert

def llama_config(size_mb: float, shards: int):
  """A LLaMA config of about `size_mb` in bfloat16, with layers small enough to balance shards."""
  from zoo.models.presets import get_preset
  target = size_mb * MB
  num_layers = max(8, 2 * shards)
  # Per layer ~21.5 d^2 bytes (head_dim 64, GQA 4:1, f = 2.75 d); embeddings 64 d^2 with
  # vocab = 16 d. The preset's head_dim is fixed, so it is overridden too.
  d = max(256, int((target / (64 + 21.5 * num_layers)) ** 0.5) // 256 * 256)
  f = d * 11 // 4
  heads = d // 64
  layer_bytes = 2 * (2 * d * d + 2 * d * (d // 4) + 3 * d * f + 2 * d)
  num_layers = max(1, min(num_layers, int((target - 2 * 2 * 16 * d * d) // layer_bytes)))
  # The vocabulary takes up what the layers leave, to land close to the asked size.
  rest = target - num_layers * layer_bytes - 2 * d
  vocab = max(256, int(rest / (4 * d)) // 64 * 64)
  return get_preset("tiny_llama", hidden_size=d, intermediate_size=f, num_layers=num_layers,
                    num_heads=heads, num_kv_heads=heads // 4, head_dim=64, vocab_size=vocab,
                    max_position_embeddings=2048)


def write_random_hf(dst: str, size_mb: float, shards: int) -> dict:
  """Writes a random bfloat16 HF LLaMA checkpoint into `dst` in `shards` safetensors files.

  Runs in a child process (see the note on RSS at the top); holds one shard at a time.
  """
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file

  from zoo.convert import hf
  config = llama_config(size_mb, shards)
  entries = hf.weight_map(config)
  sizes = [2 * int(np.prod(e.hf_shape)) for e in entries]
  total = sum(sizes)
  # Whole tensors in HF order; a tensor goes to the shard its middle byte falls in.
  groups, pos = [[] for _ in range(shards)], 0
  for e, nbytes in zip(entries, sizes):
    groups[min(shards - 1, int((pos + nbytes / 2) * shards // total))].append(e)
    pos += nbytes
  if not all(groups):
    sys.exit(f"bench: {shards} shards are too many for a {size_mb} MB model")
  os.makedirs(dst, exist_ok=True)
  rng = np.random.default_rng(0)
  chunk = np.empty(4 * MB, np.float32)  # bounds the float32 scratch, not the tensor size
  files, weight_map = [], {}
  for i, group in enumerate(groups):
    name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    tensors = {}
    for e in group:
      flat = np.empty(int(np.prod(e.hf_shape)), ml_dtypes.bfloat16)
      for start in range(0, flat.size, chunk.size):
        part = chunk[:min(chunk.size, flat.size - start)]
        rng.standard_normal(out=part, dtype=np.float32)
        part *= config.initializer_range
        flat[start:start + part.size] = part.astype(ml_dtypes.bfloat16)
      tensors[e.hf] = flat.reshape(e.hf_shape)
      weight_map[e.hf] = name
    save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})
    del tensors
    files.append(name)
  with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(hf.config_to_hf(config, "bfloat16"), f, indent=2)
  return {"files": files, "tensors": len(entries), "params": config.num_params(),
          "layers": config.num_layers, "hidden": config.hidden_size,
          "intermediate": config.intermediate_size, "vocab": config.vocab_size,
          "largest_tensor_mb": max(sizes) / MB}


def copy_shards(src: str, files: list[str], dst: str) -> float:
  """Seconds to copy the shards: the I/O ceiling for anything that rewrites them."""
  os.makedirs(dst)
  start = time.perf_counter()
  for name in files:
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
  return time.perf_counter() - start


_GENERATE = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench; "
             "print(json.dumps(bench.write_random_hf(sys.argv[2], float(sys.argv[3]), "
             "int(sys.argv[4]))))")
# The usual non-streaming rewrite: each shard whole in memory, then saved. safetensors.numpy
# finds numpy's bfloat16 by name, which exists only once ml_dtypes has registered it.
_SAFETENSORS = ("import sys, ml_dtypes; from safetensors.numpy import load_file, save_file\n"
                "for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):\n"
                "  tensors = load_file(src); save_file(tensors, dst); del tensors")
_IMPORTS = "import zoo.cli, zoo.convert.checkpoint"  # what `zoo convert` imports


def check_output(hf_dir: str, zoo_dir: str) -> bool:
  """Spot check of the converted weights: a transposed matrix and a norm, bit for bit.

  Imports numpy into this process, so it runs after the last measurement.
  """
  import ml_dtypes  # noqa: F401  (registers the bfloat16 that safetensors.numpy asks for)
  import numpy as np
  from safetensors import safe_open

  def tensor(directory, name):
    for file in sorted(os.listdir(directory)):
      if file.endswith(".safetensors"):
        with safe_open(os.path.join(directory, file), framework="np") as f:
          if name in f.keys():
            return f.get_tensor(name)
    return None

  pairs = [("model.layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.kernel", True),
           ("model.norm.weight", "norm.scale", False)]
  for hf_name, zoo_name, transpose in pairs:
    a, b = tensor(hf_dir, hf_name), tensor(zoo_dir, zoo_name)
    if a is None or b is None or not np.array_equal(a.T if transpose else a, b):
      return False
  return True


def add_convert_args(p: argparse.ArgumentParser):
  p.add_argument("--size-mb", type=float, default=1000, help="checkpoint size (default 1000)")
  p.add_argument("--shards", type=int, default=4, help="safetensors shards (default 4)")


def bench_convert(args, workdir: str) -> dict:
  """`zoo convert HF -> zoo` on a random checkpoint: throughput and peak RSS, with peers."""
  if args.shards < 1 or args.size_mb <= 0:
    sys.exit("bench: --shards and --size-mb must be positive")
  src = os.path.join(workdir, "hf")
  here = os.path.dirname(os.path.abspath(__file__))
  gen = measure(python_cmd(_GENERATE, here, src, str(args.size_mb), str(args.shards)),
                "generating the checkpoint")
  info = json.loads(gen.output.strip().splitlines()[-1])
  files = info["files"]
  shard_mb = [os.path.getsize(os.path.join(src, f)) / MB for f in files]
  total_mb, largest_mb = sum(shard_mb), max(shard_mb)
  print(f"checkpoint: {info['params'] / 1e6:.0f}M parameters (layers={info['layers']} "
        f"hidden={info['hidden']} ffn={info['intermediate']} vocab={info['vocab']}), "
        f"{total_mb:.0f} MB bf16 in {len(files)} shards of "
        f"{', '.join(f'{s:.0f}' for s in shard_mb)} MB, largest tensor "
        f"{info['largest_tensor_mb']:.0f} MB; written in {gen.seconds:.1f} s")

  # Every timed run below starts with no dirty pages queued and reads the shards from the page
  # cache (they were just written), so the runs compare like with like.
  os.sync()
  copy_dir = os.path.join(workdir, "copy")
  copy_s = copy_shards(src, files, copy_dir)
  shutil.rmtree(copy_dir)

  os.sync()
  st_dir = os.path.join(workdir, "safetensors")
  os.makedirs(st_dir)
  pairs = [p for f in files for p in (os.path.join(src, f), os.path.join(st_dir, f))]
  st = measure(python_cmd(_SAFETENSORS, *pairs), "safetensors load_file+save_file")
  shutil.rmtree(st_dir)

  base = measure(python_cmd(_IMPORTS), "importing the converter")

  os.sync()
  dst = os.path.join(workdir, "zoo")
  zoo = measure([sys.executable, "-m", "zoo.cli", "convert", src, dst, "--to", "zoo"],
                "zoo convert")
  converted = check_output(src, dst)

  target_mb = largest_mb * 1.25 + 300
  within = zoo.peak_rss_mb <= target_mb
  rate, copy_rate, st_rate = (total_mb / s for s in (zoo.seconds, copy_s, st.seconds))
  print(f"copy (shutil.copyfile):        {copy_s:6.2f} s  {copy_rate:7.0f} MB/s")
  print(f"safetensors load+save/shard:   {st.seconds:6.2f} s  {st_rate:7.0f} MB/s  "
        f"peak RSS {st.peak_rss_mb:6.0f} MB")
  print(f"zoo convert --to zoo:          {zoo.seconds:6.2f} s  {rate:7.0f} MB/s  "
        f"peak RSS {zoo.peak_rss_mb:6.0f} MB")
  print(f"importing the converter alone: {base.seconds:6.2f} s  {'':12s}  "
        f"peak RSS {base.peak_rss_mb:6.0f} MB")
  print(f"zoo vs copy: {rate / copy_rate:.2f}x the throughput; zoo vs safetensors: "
        f"{zoo.peak_rss_mb / st.peak_rss_mb:.2f}x the peak RSS, "
        f"{rate / st_rate:.2f}x the throughput")
  print(f"{'PASS' if within else 'FAIL'}: peak RSS {zoo.peak_rss_mb:.0f} MB "
        f"{'<=' if within else '>'} target {target_mb:.0f} MB (largest shard {largest_mb:.0f} "
        f"MB + 25% + 300 MB); {zoo.peak_rss_mb - base.peak_rss_mb:.0f} MB above the imports")
  if not converted:
    print("WARNING: the converted weights do not match the source")
  return {
    "mode": "convert", "seconds": round(zoo.seconds, 3), "mb_per_sec": round(rate, 1),
    "peak_rss_mb": round(zoo.peak_rss_mb, 1), "largest_shard_mb": round(largest_mb, 1),
    "total_mb": round(total_mb, 1), "shards": len(files), "rss_target_mb": round(target_mb, 1),
    "rss_within_target": within, "copy_mb_per_sec": round(copy_rate, 1),
    "safetensors_mb_per_sec": round(st_rate, 1),
    "safetensors_peak_rss_mb": round(st.peak_rss_mb, 1),
    "import_baseline_rss_mb": round(base.peak_rss_mb, 1),
    "import_baseline_seconds": round(base.seconds, 3),
    "mb_per_sec_vs_copy": round(rate / copy_rate, 3),
    "peak_rss_vs_safetensors": round(zoo.peak_rss_mb / st.peak_rss_mb, 3),
    "largest_tensor_mb": round(info["largest_tensor_mb"], 1), "params": info["params"],
    "converted_ok": converted,
  }


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mode:
  help: str
  add_args: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, str], dict]


MODES: dict[str, Mode] = {
  "convert": Mode("HF safetensors -> zoo conversion: MB/s and peak RSS", add_convert_args,
                  bench_convert),
}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="mode", metavar="MODE", required=True)
  for name, mode in MODES.items():
    m = sub.add_parser(name, help=mode.help)
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


if __name__ == "__main__":
  sys.exit(main())
