"""`convert`: `zoo convert HF -> zoo` on a random checkpoint: throughput and peak RSS, next to a
plain file copy and the safetensors library's load+save of the same shards."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from bench import models
from bench.harness import MB, call, measure

# Peak RSS of `zoo convert` may reach the largest shard, plus this share of it, plus this much.
TARGETS = dict(rss_over_shard=0.25, rss_extra_mb=300)

HELP = "HF safetensors -> zoo conversion: MB/s and peak RSS"


def llama_config(size_mb: float, shards: int):
  """A LLaMA config of about `size_mb` in bfloat16, with layers small enough to balance shards."""
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
  return models.tiny_llama(hidden_size=d, intermediate_size=f, num_layers=num_layers,
                           num_heads=heads, num_kv_heads=heads // 4, head_dim=64,
                           vocab_size=vocab, max_position_embeddings=2048)


def write_random_hf(spec: dict) -> dict:
  """Worker: a random bfloat16 HF LLaMA checkpoint of about `size_mb` written into `dst` in
  `shards` safetensors files, holding one shard at a time."""
  import ml_dtypes
  import numpy as np
  from safetensors.numpy import save_file

  from zoo.convert import hf
  dst, size_mb, shards = spec["dst"], spec["size_mb"], spec["shards"]
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


def safetensors_rewrite(spec: dict):
  """Worker, the peer: the usual non-streaming rewrite, each shard whole in memory, then saved,
  for every (src, dst) in `pairs`."""
  # safetensors.numpy finds numpy's bfloat16 by name, which exists once ml_dtypes registers it.
  import ml_dtypes  # noqa: F401
  from safetensors.numpy import load_file, save_file
  for src, dst in spec["pairs"]:
    tensors = load_file(src)
    save_file(tensors, dst)
    del tensors


def import_converter(spec: dict):
  """Worker, the baseline: only the imports `zoo convert` makes."""
  import zoo.cli  # noqa: F401
  import zoo.convert.checkpoint  # noqa: F401


def copy_shards(src: str, files: list[str], dst: str) -> float:
  """Seconds to copy the shards: the I/O ceiling for anything that rewrites them."""
  os.makedirs(dst)
  start = time.perf_counter()
  for name in files:
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
  return time.perf_counter() - start


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


def add_args(p: argparse.ArgumentParser):
  p.add_argument("--size-mb", type=float, default=1000, help="checkpoint size (default 1000)")
  p.add_argument("--shards", type=int, default=4, help="safetensors shards (default 4)")


def run(args, workdir: str) -> dict:
  """`zoo convert HF -> zoo` on a random checkpoint: throughput and peak RSS, with peers."""
  if args.shards < 1 or args.size_mb <= 0:
    sys.exit("bench: --shards and --size-mb must be positive")
  src = os.path.join(workdir, "hf")
  info, gen = call(write_random_hf, {"dst": src, "size_mb": args.size_mb, "shards": args.shards},
                   "generating the checkpoint")
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
  pairs = [(os.path.join(src, f), os.path.join(st_dir, f)) for f in files]
  _, st = call(safetensors_rewrite, {"pairs": pairs}, "safetensors load_file+save_file")
  shutil.rmtree(st_dir)

  _, base = call(import_converter, {}, "importing the converter")

  os.sync()
  dst = os.path.join(workdir, "zoo")
  zoo = measure([sys.executable, "-m", "zoo.cli", "convert", src, dst, "--to", "zoo"],
                "zoo convert")
  converted = check_output(src, dst)

  over, extra = TARGETS["rss_over_shard"], TARGETS["rss_extra_mb"]
  target_mb = largest_mb * (1 + over) + extra
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
        f"MB + {over:.0%} + {extra} MB); {zoo.peak_rss_mb - base.peak_rss_mb:.0f} MB above the "
        f"imports")
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
