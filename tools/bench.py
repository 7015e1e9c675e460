"""Benchmarks for zoo, one mode each.

    python tools/bench.py convert [--size-mb 1000] [--shards 4] [--workdir DIR] [--keep]
    python tools/bench.py train [--steps 5] [--rounds 7] [--vocab 2000,32000] [--devices 1]
    python tools/bench.py decode [--batches 1,8] [--new-tokens 64] [--rounds 5]
    python tools/bench.py lora [--steps 3] [--rank 16] [--model small|medium]

`train` times zoo's jitted train step (AdamW, float32) on a tiny LLaMA against transformers'
LlamaForCausalLM in torch eager with torch.optim.AdamW, each in its own process, alternating,
and reports tokens/s, the ratio and MFU against the machine's measured matmul peak.

`decode` times greedy generation (batch 1 and 8) of zoo's KV-cache Generator against
transformers' generate on the same 58M-parameter float32 LLaMA, and the bound a step's weight
reads set: the bytes of every weight but the input embedding table over the machine's read
bandwidth (the best of numpy's and torch's sum over 1 GiB). At batch 1 it also times llama.cpp
(llama-cpp-python, when installed) on zoo's float32 GGUF export of the same weights.

`lora` runs a LoRA step (all-linear adapters, frozen f32 base), a QLoRA step (NF4 base) and a
full fine-tuning step (AdamW on every weight) of the same 91M-parameter float32 LLaMA, each in
its own process, and reports each one's peak RSS and tokens/s, and the NF4 base's bytes against
bf16.

Human-readable lines first; the last line of a successful run is one JSON object with the
results, so that scripts can read it with `tail -n 1`. MB means MiB (2**20 bytes) throughout.

New modes (train, lora...) go into MODES: a function that adds the mode's options to its
sub-parser and a function that runs it and returns the result dict.
"""

from __future__ import annotations

import argparse
import contextlib
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


def measure(cmd: list[str], what: str, env: dict | None = None) -> Run:
  """Runs `cmd` in a fresh process: its wall time and its own peak RSS."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
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
# train

# The model: a tiny LLaMA whose matmuls are still big enough for a CPU to run them well.
TRAIN_MODEL = dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                   num_kv_heads=4, head_dim=64)
# Plain AdamW, as torch.optim.AdamW does it: constant lr, decay on every parameter, no clipping.
TRAIN_OPTIMIZER = dict(name="adamw", lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                       schedule="constant", warmup_steps=0, grad_clip=0.0,
                       decay_norms_and_biases=True)
# XLA:CPU compile options to try on zoo's step with --ynn-off: every dot through Eigen instead
# of YNNPACK, which jaxlib 0.10 uses by default. Once measured at +7% tokens/s; on 2026-12-03
# the defaults (what `zoo train` compiles with, and what the bench times by default) were 5%
# faster. Set per compilation (jit's compiler_options), so that an option a jaxlib does not
# know is an error to catch, not an abort as in XLA_FLAGS.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

_TAG = "@bench "  # marks the worker's answers on its stdout
_WORKER = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench; "
           "bench.train_worker(sys.argv[2], json.loads(sys.argv[3]))")


def train_config(vocab: int, seq_len: int):
  from zoo.models.presets import get_preset
  return get_preset("tiny_llama", vocab_size=vocab, max_position_embeddings=seq_len,
                    **TRAIN_MODEL)


def train_batch(vocab: int, batch: int, seq_len: int) -> dict:
  """One fixed batch of random tokens (numpy), the same in every worker: unpacked rows."""
  import numpy as np
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions.copy(),
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "weights": np.ones((batch, seq_len), np.float32)}


def zoo_stepper(spec: dict):
  """zoo's jitted train step on one fixed batch: (run(n) -> loss, info)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from zoo.models.llama import Llama
  from zoo.train.optim import make_optimizer
  from zoo.train.step import make_train_step
  config = train_config(spec["vocab"], spec["seq_len"])
  model = Llama(config, dtype=spec["dtype"], remat=spec["remat"], rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = params.to_pure_dict()
  tx, schedule = make_optimizer(TRAIN_OPTIMIZER, 10**9)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jnp.zeros(2, jnp.uint32)}
  batch = train_batch(spec["vocab"], spec["batch"], spec["seq_len"])
  train_step = make_train_step(graphdef, tx, schedule)
  devices = spec["devices"]
  if devices == 1:
    batch = jax.device_put(batch)
    jitted = jax.jit(train_step, donate_argnums=0)
  else:  # data parallel over host devices, laid out as zoo's train loop lays it out
    from zoo import sharding
    mesh = sharding.make_mesh((devices, 1, 1), devices=jax.devices()[:devices])
    rules = sharding.DEFAULT_RULES
    rep = sharding.replicated(mesh)
    params_sh = sharding.param_shardings(model, mesh, rules)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                                   params_sh, transform_non_params=lambda _: rep)
    shardings = {"step": rep, "params": params_sh, "opt_state": opt_sh, "rng": rep}
    state = jax.device_put(state, shardings)
    batch_sh = sharding.batch_sharding(mesh, rules)
    batch = jax.device_put(batch, batch_sh)
    jitted = jax.jit(train_step, in_shardings=(shardings, batch_sh),
                     out_shardings=(shardings, rep), donate_argnums=0)
  start = time.perf_counter()
  with sharding.use(mesh, rules) if devices > 1 else contextlib.nullcontext():
    lowered = jitted.lower(state, batch)
  options, refused = spec["compiler_options"], None
  try:
    step = lowered.compile(compiler_options=options or None)
  except jax.errors.JaxRuntimeError as e:  # an option this jaxlib does not know
    if not options:
      raise
    step, refused = lowered.compile(), str(e).splitlines()[0]
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run(n: int) -> float:
    state = holder["state"]
    for _ in range(n):
      state, metrics = step(state, batch)
    holder["state"] = state
    return float(metrics["loss"])  # waits for the last step, so for all of them

  info = {"compile_s": compile_s, "backend": jax.default_backend(), "devices": devices,
          "params": config.num_params(), "jax": jax.__version__, "options_refused": refused}
  return run, info


def torch_stepper(spec: dict):
  """transformers' LlamaForCausalLM in PyTorch eager with torch.optim.AdamW, float32."""
  import torch
  import transformers

  from zoo.convert import hf
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  config = train_config(spec["vocab"], spec["seq_len"])
  hf_config = transformers.LlamaConfig.from_dict(hf.config_to_hf(config, "float32"))
  model = transformers.LlamaForCausalLM(hf_config).float().train()
  o = TRAIN_OPTIMIZER
  opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["b1"], o["b2"]),
                          eps=o["eps"], weight_decay=o["weight_decay"])
  batch = {k: torch.from_numpy(v)
           for k, v in train_batch(spec["vocab"], spec["batch"], spec["seq_len"]).items()}
  tokens, targets, vocab = batch["tokens"].long(), batch["targets"].long(), spec["vocab"]

  def run(n: int) -> float:
    for _ in range(n):
      logits = model(input_ids=tokens).logits
      loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), targets.view(-1))
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  info = {"threads": torch.get_num_threads(), "attention": hf_config._attn_implementation,
          "torch": torch.__version__, "transformers": transformers.__version__}
  return run, info


def train_worker(kind: str, spec: dict):
  """A worker process: builds its step, warms it up, then times `n` steps per line of stdin.

  Each answer is one JSON line on stdout. Between requests the worker blocks on stdin, so only
  one side runs at a time and neither sees the other's threads.
  """
  steppers = {"zoo": zoo_stepper, "torch": torch_stepper, "zoo-decode": zoo_decoder,
              "torch-decode": torch_decoder, "llamacpp-decode": llamacpp_decoder}
  run, info = steppers[kind](spec)
  info["first_loss"] = run(1)
  run(spec["warmup"])
  print(_TAG + json.dumps({"ready": True, **info}), flush=True)
  for line in sys.stdin:
    n = int(line)
    start, cpu = time.perf_counter(), time.process_time()
    loss = run(n)
    print(_TAG + json.dumps({"seconds": time.perf_counter() - start, "loss": loss,
                      "cpu_seconds": time.process_time() - cpu}), flush=True)


class Worker:
  """A train_worker child, asked for timings one request at a time."""

  def __init__(self, kind: str, spec: dict, env: dict | None, log: str):
    here = os.path.dirname(os.path.abspath(__file__))
    self.kind = kind
    self.log = log
    # stderr goes to a file: a pipe nobody reads would stall a chatty worker once it fills.
    with open(log, "w") as err:
      self.proc = subprocess.Popen(python_cmd(_WORKER, here, kind, json.dumps(spec)),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                   text=True, env=env)
    self.info = self._answer()

  def _answer(self) -> dict:
    while True:  # skipping whatever else a library prints on stdout
      line = self.proc.stdout.readline()
      if not line:
        self.proc.wait()
        with open(self.log) as f:
          err = f.read()
        sys.exit(f"bench: the {self.kind} worker failed (exit status {self.proc.returncode}):"
                 f"\n{err[-4000:]}")
      if line.startswith(_TAG):
        return json.loads(line[len(_TAG):])

  def time(self, steps: int) -> dict:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return self._answer()

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    self.proc.stdout.close()


def median(xs):
  xs = sorted(xs)
  n = len(xs)
  return (xs[n // 2] + xs[(n - 1) // 2]) / 2


def cpu_busy_seconds() -> float | None:
  """CPU-seconds the whole machine has spent busy since boot (Linux /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def interleave(workers: dict[str, Worker], steps: int, rounds: int, tokens: int,
               quiet: float = 0.15, max_rounds: int | None = None) -> tuple[dict, list, int]:
  """tokens/s of each worker, timed in rounds: each round times every worker once in turn (the
  order rotating), so that a load change on a shared machine hits all of them alike.

  On a shared machine other processes come and go, and torch's OpenMP threads in particular slow
  down many times over when they do; a round during which other processes used more than
  `quiet` of the CPUs is repeated, up to `max_rounds` (default 3 * rounds) in all, until
  `rounds` quiet rounds are in. Returns ({name: [tokens/s per round]}, [background CPU share
  per round], how many rounds were thrown away); where no quiet round could be had, all rounds
  are kept.
  """
  names = list(workers)
  every, shares = {name: [] for name in names}, []
  max_rounds = max_rounds or 3 * rounds
  ncpu = os.cpu_count() or 1
  r = 0
  while r < max_rounds and len(shares) - sum(s > quiet for s in shares) < rounds:
    share = 0.0
    for name in names[r % len(names):] + names[:r % len(names)]:
      busy = cpu_busy_seconds()
      answer = workers[name].time(steps)
      every[name].append(steps * tokens / answer["seconds"])
      if busy is not None:
        others = cpu_busy_seconds() - busy - answer["cpu_seconds"]
        share = max(share, others / (answer["seconds"] * ncpu))
    shares.append(max(0.0, share))
    r += 1
  keep = [i for i, s in enumerate(shares) if s <= quiet] or list(range(len(shares)))
  kept = {name: [every[name][i] for i in keep] for name in names}
  return kept, [shares[i] for i in keep], len(shares) - len(keep)


_PEAK = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
         "from zoo.train.metrics import measure_peak_flops; "
         "print(json.dumps(measure_peak_flops(repeats=int(sys.argv[2]))))")


def add_train_args(p: argparse.ArgumentParser):
  p.add_argument("--steps", type=int, default=5, help="train steps per timing (default 5)")
  p.add_argument("--rounds", type=int, default=7,
                 help="timings of each side, interleaved, medians reported; a round in which "
                      "other processes used over 15%% of the CPUs is repeated (default 7)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling (default 3)")
  p.add_argument("--vocab", default="2000,32000", help="vocabulary sizes (default 2000,32000)")
  p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
  p.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="zoo's compute dtype (default float32; transformers stays float32)")
  p.add_argument("--devices", type=int, default=1,
                 help="run zoo data-parallel over this many host CPU devices (default 1)")
  p.add_argument("--ynn-off", action="store_true",
                 help="compile zoo with {CPU_COMPILER_OPTIONS} instead of XLA:CPU's defaults "
                      "(which `zoo train` uses)".replace("{CPU_COMPILER_OPTIONS}",
                                                         str(CPU_COMPILER_OPTIONS)))
  p.add_argument("--xla-flags", default="", help="XLA_FLAGS for zoo's process (default none)")
  p.add_argument("--no-peer", action="store_true", help="time zoo alone")


def bench_train(args, workdir: str) -> dict:
  """zoo's jitted train step against transformers + torch eager on the same shapes: tokens/s,
  their ratio and MFU, on the CPU."""
  try:
    vocabs = [int(v) for v in args.vocab.split(",")]
  except ValueError:
    sys.exit(f"bench: --vocab takes comma-separated integers, got {args.vocab!r}")
  if (min(vocabs + [args.steps, args.rounds, args.batch, args.seq_len, args.devices]) < 1
      or args.warmup < 0):
    sys.exit("bench: --vocab, --steps, --rounds, --batch, --seq-len and --devices must be "
             "positive")
  if args.batch % args.devices:
    sys.exit(f"bench: --batch {args.batch} does not split over {args.devices} devices")
  here = os.path.dirname(os.path.abspath(__file__))
  xla_flags = args.xla_flags
  if args.devices > 1:
    xla_flags += f" --xla_force_host_platform_device_count={args.devices}"
  # zoo's process sees only these XLA flags (not the caller's, which may fake 8 devices), and
  # only the CPU: transformers runs there.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.strip())
  options = CPU_COMPILER_OPTIONS if args.ynn_off else {}
  tokens = args.batch * args.seq_len

  def measure_peak() -> dict:
    out = measure(python_cmd(_PEAK, here, "5"), "measuring the matmul peak", env).output
    return json.loads(out.strip().splitlines()[-1])

  # The peak is the best of several measurements (at the start and after each vocabulary): on a
  # shared machine one measurement can land in a busy moment, which would inflate the MFU.
  peaks = [measure_peak()]
  print(f"zoo: jit compiler options {options}, XLA_FLAGS={env['XLA_FLAGS']!r}, "
        f"{args.devices} device(s), {args.dtype}; transformers: float32, "
        f"{os.cpu_count()} torch threads")
  from_zoo = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench; "
              "from zoo.train.metrics import flops_per_token; "
              "print(json.dumps([flops_per_token(bench.train_config(v, int(sys.argv[2])), "
              "int(sys.argv[2])) for v in json.loads(sys.argv[3])]))")
  fpt = json.loads(measure(python_cmd(from_zoo, here, str(args.seq_len), json.dumps(vocabs)),
                           "counting FLOPs").output.strip().splitlines()[-1])
  per_vocab = {}
  for vocab, flops in zip(vocabs, fpt):
    spec = {"vocab": vocab, "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup,
            "dtype": args.dtype, "remat": "none", "devices": args.devices,
            "compiler_options": options, "threads": os.cpu_count() or 1}
    log = os.path.join(workdir, f"{{}}-{vocab}.log")
    workers = {"zoo": Worker("zoo", spec, env, log.format("zoo"))}
    if not args.no_peer:
      workers["transformers"] = Worker("torch", spec, None, log.format("transformers"))
    try:
      rates, shares, dropped = interleave(workers, args.steps, args.rounds, tokens)
    finally:
      for w in workers.values():
        w.close()
    background = median(shares)
    zoo_info = workers["zoo"].info
    if zoo_info["options_refused"]:
      print(f"  note: compiled with XLA's defaults; jax {zoo_info['jax']} refused the bench's "
            f"options: {zoo_info['options_refused']}")
    zoo_rate = median(rates["zoo"])
    row = {"zoo_tokens_per_sec": round(zoo_rate, 1),
           "zoo_rounds": [round(r, 1) for r in rates["zoo"]],
           "flops_per_token": flops, "zoo_compile_s": round(zoo_info["compile_s"], 2),
           "zoo_first_loss": round(zoo_info["first_loss"], 4),
           "background_cpu": round(background, 3), "rounds_dropped": dropped,
           "options_refused": zoo_info["options_refused"]}
    line = (f"vocab {vocab:6d}: zoo {zoo_rate:7.0f} tokens/s (compiled in "
            f"{zoo_info['compile_s']:.1f} s)")
    if not args.no_peer:
      peer_rate = median(rates["transformers"])
      ratios = [z / t for z, t in zip(rates["zoo"], rates["transformers"])]
      row.update({"peer_tokens_per_sec": round(peer_rate, 1),
                  "peer_rounds": [round(r, 1) for r in rates["transformers"]],
                  "ratio": round(median(ratios), 3),
                  "peer_first_loss": round(workers["transformers"].info["first_loss"], 4)})
      line += (f", transformers eager {peer_rate:7.0f} tokens/s: zoo/transformers "
               f"{row['ratio']:.2f}x (median of {len(ratios)} paired rounds)")
    print(line)
    if dropped:
      print(f"  {dropped} rounds repeated: other processes were using the CPUs")
    if background > 0.15:
      print(f"  WARNING: other processes used {background:.0%} of the CPUs in the kept rounds; "
            f"these numbers are noise, run again on a quiet machine")
    per_vocab[str(vocab)] = row
    peaks.append(measure_peak())
  peak = {k: max((p[k] for p in peaks if p.get(k)), default=None) for k in peaks[0]}
  by = max((k for k in peak if k != "peak_flops" and peak[k]), key=lambda k: peak[k])
  print(f"matmul peak (float32 2048^3, best of {5 * len(peaks)}): "
        f"{peak['peak_flops'] / 1e9:.1f} GFLOP/s by {by}; "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peak.items() if k != "peak_flops" and v))
  for vocab, row in per_vocab.items():
    row["mfu"] = round(row["zoo_tokens_per_sec"] * row["flops_per_token"] / peak["peak_flops"], 4)
    if "peer_tokens_per_sec" in row:
      row["peer_mfu"] = round(row["peer_tokens_per_sec"] * row["flops_per_token"]
                              / peak["peak_flops"], 4)
    print(f"vocab {vocab:>6s}: MFU zoo {row['mfu']:.1%}"
          + (f", transformers {row['peer_mfu']:.1%}" if "peer_mfu" in row else "")
          + f" ({row['flops_per_token'] / 1e6:.1f} MFLOP/token, MaxText convention)")
  first = per_vocab[str(vocabs[0])]
  result = {"mode": "train", "vocab": vocabs[0],
            "zoo_tokens_per_sec": first["zoo_tokens_per_sec"],
            "peer_tokens_per_sec": first.get("peer_tokens_per_sec"),
            "ratio": first.get("ratio"), "mfu": first["mfu"],
            "peak_flops": peak["peak_flops"], "peak_by": by,
            "peak_detail": {k: v for k, v in peak.items() if k != "peak_flops"},
            "per_vocab": per_vocab, "batch": args.batch, "seq_len": args.seq_len,
            "dtype": args.dtype, "devices": args.devices, "steps": args.steps,
            "rounds": args.rounds, "compiler_options": options, "xla_flags": env["XLA_FLAGS"],
            "peer": None if args.no_peer else "transformers eager"}
  result["quiet"] = all(r["background_cpu"] <= 0.15 for r in per_vocab.values())
  if not args.no_peer:
    ok = all(r["ratio"] >= 1.0 for r in per_vocab.values())
    result["ratio_target"] = 1.0
    result["within_target"] = ok
    verdict = ("PASS" if ok else "FAIL") if result["quiet"] else "NOISY (busy machine)"
    print(f"{verdict}: zoo/transformers "
          + ", ".join(f"{r['ratio']:.2f}x at vocab {v}" for v, r in per_vocab.items())
          + " (target >= 1.0)")
  return result


# ---------------------------------------------------------------------------------------------
# decode

# The model: a small LLaMA of 58M parameters, float32.
DECODE_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8,
                    num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=2048)


def decode_config():
  from zoo.models.presets import get_preset
  return get_preset("tiny_llama", **DECODE_MODEL)


def decode_prompts(batch: int, length: int) -> list[list[int]]:
  import numpy as np
  rng = np.random.default_rng(0)
  return rng.integers(3, DECODE_MODEL["vocab_size"], (batch, length)).tolist()


def zoo_decoder(spec: dict):
  """zoo's Generator, greedy, on the checkpoint: (run(n) -> tokens of the last call, info)."""
  import jax

  import zoo
  from zoo.infer.generate import Generator
  start = time.perf_counter()
  generator = Generator(zoo.load(spec["checkpoint"]))
  prompts = decode_prompts(spec["batch"], spec["prompt_len"])
  generator.generate(prompts, max_new_tokens=spec["new_tokens"])  # compiles the bucket
  from zoo.kernels import gemv
  info = {"compile_s": time.perf_counter() - start, "jax": jax.__version__,
          "cpu_kernel": gemv.available()}

  def run(n: int) -> float:
    for _ in range(n):
      out = generator.generate(prompts, max_new_tokens=spec["new_tokens"])
    assert all(len(o) == spec["new_tokens"] for o in out)
    return float(out[0][-1])

  return run, info


def torch_decoder(spec: dict):
  """transformers' generate (greedy, its default dynamic KV cache) on the same checkpoint."""
  import torch
  import transformers
  torch.set_num_threads(spec["threads"])
  model = transformers.LlamaForCausalLM.from_pretrained(spec["checkpoint"],
                                                        dtype=torch.float32).eval()
  ids = torch.tensor(decode_prompts(spec["batch"], spec["prompt_len"]))
  mask = torch.ones_like(ids)

  def run(n: int) -> float:
    with torch.no_grad():
      for _ in range(n):
        out = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None,
                             pad_token_id=0, max_new_tokens=spec["new_tokens"],
                             min_new_tokens=spec["new_tokens"])
    assert out.shape[1] == spec["prompt_len"] + spec["new_tokens"]
    return float(out[0, -1])

  info = {"threads": torch.get_num_threads(), "torch": torch.__version__,
          "transformers": transformers.__version__}
  return run, info


def llamacpp_decoder(spec: dict):
  """llama.cpp (llama-cpp-python) on zoo's float32 GGUF export, greedy, one sequence: the
  prompt evaluated in one batch, then one token at a time, as zoo's Generator does."""
  import llama_cpp
  n_ctx = spec["prompt_len"] + spec["new_tokens"] + 8
  llm = llama_cpp.Llama(spec["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=spec["threads"],
                        type_k=0, type_v=0, verbose=False)
  prompt = decode_prompts(1, spec["prompt_len"])[0]

  def run(n: int) -> float:
    for _ in range(n):
      out = []
      for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == spec["new_tokens"]:
          break
    return float(out[-1])

  return run, {"threads": spec["threads"], "llama_cpp_python": llama_cpp.__version__}


_BANDWIDTH = """
import json, time, numpy as np, torch
a = np.ones(2**28, np.float32)  # 1 GiB
t = torch.from_numpy(a)
best = {}
for name, fn in (("numpy", a.sum), ("torch", t.sum)):
  fn()
  times = []
  for _ in range(int(__import__("sys").argv[1])):
    start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
  best[name] = a.nbytes / min(times)
print(json.dumps(best))
"""


def add_decode_args(p: argparse.ArgumentParser):
  p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
  p.add_argument("--new-tokens", type=int, default=64, help="tokens per generate (default 64)")
  p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
  p.add_argument("--rounds", type=int, default=5,
                 help="interleaved timings of each side, medians reported (default 5)")
  p.add_argument("--no-peer", action="store_true", help="time zoo alone")
  p.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")


# A SentencePiece tokenizer (GGUF files carry one; padded with unused ids to the model's 32000)
# and zoo's float32 GGUF export of the decode checkpoint.
_TO_GGUF = """
import glob, json, os, sys
from zoo.convert import convert
from zoo.data.tokenizers import train_sentencepiece
texts = [open(p).read() for p in sorted(glob.glob(os.path.dirname(json.__file__) + "/*.py"))]
train_sentencepiece(texts, 1000, os.path.join(sys.argv[1], "tokenizer.model"))
convert(sys.argv[1], sys.argv[2], "gguf", dtype="f32")
"""


def bench_decode(args, workdir: str) -> dict:
  """Greedy decoding tokens/s of zoo's Generator and of transformers' generate on the same
  58M-parameter LLaMA, and the bound set by the bytes a step reads over the read bandwidth."""
  try:
    batches = [int(b) for b in args.batches.split(",")]
  except ValueError:
    sys.exit(f"bench: --batches takes comma-separated integers, got {args.batches!r}")
  if min(batches + [args.new_tokens, args.prompt_len, args.rounds]) < 1:
    sys.exit("bench: --batches, --new-tokens, --prompt-len and --rounds must be positive")
  here = os.path.dirname(os.path.abspath(__file__))
  checkpoint = os.path.join(workdir, "hf")
  make = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench; "
          "from zoo.convert.random_init import init_checkpoint; from zoo.models.presets import get_preset; "
          "init_checkpoint('tiny_llama', sys.argv[2], to='hf', overrides=bench.DECODE_MODEL); "
          "c = bench.decode_config(); "
          "read = c.num_params() - c.vocab_size * c.hidden_size * (not c.tie_word_embeddings); "
          "print(json.dumps({'params': c.num_params(), 'step_bytes': 4 * read}))")
  model = json.loads(measure(python_cmd(make, here, checkpoint), "writing the model"
                             ).output.strip().splitlines()[-1])
  bw = json.loads(measure(python_cmd(_BANDWIDTH, "5"), "measuring read bandwidth"
                          ).output.strip().splitlines()[-1])
  bandwidth = max(bw.values())
  print(f"model: {model['params'] / 1e6:.1f}M parameters, float32; a decode step reads "
        f"{model['step_bytes'] / 1e6:.0f} MB of weights; read bandwidth "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  gguf_path = None
  if not args.no_llamacpp:
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode == 0:
      gguf_path = os.path.join(workdir, "model-f32.gguf")
      measure(python_cmd(_TO_GGUF, checkpoint, gguf_path), "exporting GGUF for llama.cpp")
    else:
      print("llama.cpp: llama-cpp-python is not installed; timing without it")
  per_batch = {}
  for batch in batches:
    spec = {"checkpoint": checkpoint, "batch": batch, "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len, "warmup": 1, "threads": os.cpu_count() or 1,
            "gguf": gguf_path}
    log = os.path.join(workdir, f"{{}}-{batch}.log")
    workers = {"zoo": Worker("zoo-decode", spec, env, log.format("zoo"))}
    if not args.no_peer:
      workers["transformers"] = Worker("torch-decode", spec, env, log.format("transformers"))
    if gguf_path and batch == 1:  # llama-cpp-python's API generates one sequence at a time
      workers["llama.cpp"] = Worker("llamacpp-decode", spec, env, log.format("llamacpp"))
    try:
      rates, shares, dropped = interleave(workers, 1, args.rounds, batch * args.new_tokens)
    finally:
      for w in workers.values():
        w.close()
    bound = bandwidth / model["step_bytes"] * batch
    row = {"zoo_tokens_per_sec": round(median(rates["zoo"]), 1),
           "zoo_cpu_kernel": workers["zoo"].info.get("cpu_kernel"),
           "zoo_rounds": [round(r, 1) for r in rates["zoo"]],
           "bound_tokens_per_sec": round(bound, 1),
           "zoo_fraction_of_bound": round(median(rates["zoo"]) / bound, 3),
           "background_cpu": round(median(shares), 3), "rounds_dropped": dropped}
    line = (f"batch {batch}: zoo {row['zoo_tokens_per_sec']:6.1f} tokens/s "
            f"({row['zoo_fraction_of_bound']:.0%} of the bound {bound:.0f})")
    # (worker, JSON key prefix, ratio key, label)
    for name, key, ratio_key, label in (
        ("transformers", "peer", "ratio", "transformers generate"),
        ("llama.cpp", "llamacpp", "ratio_vs_llamacpp", "llama.cpp on zoo's f32 GGUF")):
      if name in rates:
        ratios = [z / p for z, p in zip(rates["zoo"], rates[name])]
        row.update({f"{key}_tokens_per_sec": round(median(rates[name]), 1),
                    f"{key}_rounds": [round(r, 1) for r in rates[name]],
                    ratio_key: round(median(ratios), 3)})
        line += (f", {label} {row[key + '_tokens_per_sec']:6.1f} tokens/s: "
                 f"zoo/{name} {row[ratio_key]:.2f}x")
    print(line)
    if row["background_cpu"] > 0.15:
      print(f"  WARNING: other processes used {row['background_cpu']:.0%} of the CPUs")
    per_batch[str(batch)] = row
  # The issue's batch-1 target is llama.cpp's rate; its "about 90% of the bound, 1.7x
  # transformers" restate that rate as measured when the issue was written. Both fractions of
  # the bound are printed, since llama.cpp's own fraction moves with the machine.
  targets = {"1": [("zoo/llama.cpp", 1.0, "ratio_vs_llamacpp"),
                   ("zoo/transformers", 1.7, "ratio")],
             "8": [("zoo/transformers", 2.0, "ratio")]}
  if "1" in per_batch and per_batch["1"].get("llamacpp_tokens_per_sec"):
    row = per_batch["1"]
    row["llamacpp_fraction_of_bound"] = round(
      row["llamacpp_tokens_per_sec"] / row["bound_tokens_per_sec"], 3)
    print(f"batch 1 fraction of the bound: zoo {row['zoo_fraction_of_bound']:.2f}, "
          f"llama.cpp {row['llamacpp_fraction_of_bound']:.2f}")
  verdicts = []
  for b, goals in targets.items():
    for what, goal, key in goals:
      if b in per_batch and per_batch[b].get(key) is not None:
        ok = per_batch[b][key] >= goal
        per_batch[b]["within_target"] = per_batch[b].get("within_target", True) and ok
        verdicts.append(f"batch {b} {what} {per_batch[b][key]:.2f} (target >= {goal}): "
                        f"{'PASS' if ok else 'FAIL'}")
  for v in verdicts:
    print(v)
  first = per_batch[str(batches[0])]
  return {"mode": "decode", "batch": batches[0],
          "zoo_tokens_per_sec": first["zoo_tokens_per_sec"],
          "peer_tokens_per_sec": first.get("peer_tokens_per_sec"), "ratio": first.get("ratio"),
          "llamacpp_tokens_per_sec": first.get("llamacpp_tokens_per_sec"),
          "bound_tokens_per_sec": first["bound_tokens_per_sec"], "per_batch": per_batch,
          "read_bandwidth": bandwidth, "bandwidth_detail": bw, "step_bytes": model["step_bytes"],
          "params": model["params"], "new_tokens": args.new_tokens,
          "prompt_len": args.prompt_len, "rounds": args.rounds,
          "peer": None if args.no_peer else "transformers generate"}


# ---------------------------------------------------------------------------------------------
# lora

_LORA_WORKER = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from zoo import lora, sharding
from zoo.convert.checkpoint import Checkpoint
from zoo.layers.quant import bf16_bytes, is_quantized, nbytes
from zoo.models.llama import abstract_model
from zoo.train.loop import load_tree, lora_split
from zoo.train.optim import make_optimizer
from zoo.train.step import make_train_step
kind, spec = sys.argv[1], json.loads(sys.argv[2])
config = Checkpoint(spec["checkpoint"]).config
mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
tx, schedule = make_optimizer(dict(name="adamw", lr=1e-4, schedule="constant", warmup_steps=0),
                              100)
ratio = None
# the loading paths of `zoo train`: tensor by tensor from the checkpoint, nothing drawn at random
if kind == "full":
  graphdef, abstract = nnx.split(abstract_model(config, remat=spec["remat"]), nnx.Param)
  shardings = sharding.variable_shardings(abstract, mesh, sharding.DEFAULT_RULES)
  params, _ = load_tree(spec["checkpoint"], nnx.to_pure_dict(abstract), shardings)
  base = None
else:
  graphdef, params, _, base, _ = lora_split(
      config, lora.LoraSpec(rank=spec["rank"], alpha=2 * spec["rank"], targets=("all-linear",)),
      spec["checkpoint"], mesh, sharding.DEFAULT_RULES,
      quantize="nf4" if kind == "qlora" else "none", remat=spec["remat"])
  if kind == "qlora":
    q = [x for x in jax.tree.leaves(base, is_leaf=is_quantized) if is_quantized(x)]
    ratio = sum(map(nbytes, q)) / sum(map(bf16_bytes, q))
state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
         "rng": jnp.zeros(2, jnp.uint32)}
b, t = spec["batch"], spec["seq_len"]
x = np.random.default_rng(0).integers(0, config.vocab_size, (b, t + 1)).astype(np.int32)
batch = {"tokens": x[:, :-1], "targets": x[:, 1:],
         "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
         "segment_ids": np.ones((b, t), np.int32), "weights": np.ones((b, t), np.float32)}
step = jax.jit(make_train_step(graphdef, tx, schedule, frozen=base is not None),
               donate_argnums=0)
args = () if base is None else (base,)
for _ in range(2):  # the second call compiles again: the state comes back placed on the mesh
  state, m = step(state, batch, *args)
jax.block_until_ready(m)
start = time.perf_counter()
for _ in range(spec["steps"]):
  state, m = step(state, batch, *args)
jax.block_until_ready(m)
seconds = time.perf_counter() - start
print(json.dumps({"tokens_per_sec": spec["steps"] * b * t / seconds, "loss": float(m["loss"]),
                  "base_bytes_ratio": ratio}))
"""


def add_lora_args(p: argparse.ArgumentParser):
  p.add_argument("--steps", type=int, default=3, help="timed steps after the compile")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--model", choices=sorted(LORA_MODELS), default="medium",
                 help="small: 91M parameters, medium: 322M (default)")
  p.add_argument("--remat", default="full", help="remat policy of all three steps (none, "
                 "full, dots, dots_no_batch; default full, as configs/lora.py and peft's QLoRA "
                 "recipe fine-tune)")


# 91M and 335M float32 LLaMAs; at the small size the JAX runtime and XLA's compile memory
# (a few hundred MB, the same for every kind of step) weigh on every peak.
LORA_MODELS = {
  "small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=6,
                num_heads=12, num_kv_heads=12, head_dim=64, max_position_embeddings=2048),
  "medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=20,
                 num_heads=16, num_kv_heads=16, head_dim=64, max_position_embeddings=2048),
}


def bench_lora(args, workdir: str) -> dict:
  checkpoint = os.path.join(workdir, "base")
  make = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench; "
          "from zoo.convert.random_init import init_checkpoint; "
          "init_checkpoint('tiny_llama', sys.argv[2], overrides=bench.LORA_MODELS[sys.argv[3]]); "
          "from zoo.convert import Checkpoint; "
          "print(Checkpoint(sys.argv[2]).config.num_params())")
  run = measure(python_cmd(make, os.path.dirname(os.path.abspath(__file__)), checkpoint,
                           args.model), "writing the base checkpoint")
  params = int(run.output.strip().splitlines()[-1])
  print(f"model: {args.model}, {params / 1e6:.0f}M parameters, float32; batch {args.batch} x "
        f"{args.seq_len} tokens; LoRA rank {args.rank} on every linear layer")
  spec = {"checkpoint": checkpoint, "rank": args.rank, "batch": args.batch,
          "seq_len": args.seq_len, "steps": args.steps, "remat": args.remat}
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  runs = {}
  for kind in ("lora", "qlora", "full"):
    run = measure(python_cmd(_LORA_WORKER, kind, json.dumps(spec)), kind, env=env)
    lines = [line for line in run.output.splitlines() if line.startswith("{")]
    if not lines:
      raise SystemExit(f"bench lora: the {kind} worker failed:\n{run.output[-2000:]}")
    runs[kind] = dict(json.loads(lines[-1]), peak_mb=run.peak_rss_mb)
    print(f"{kind:6s} peak RSS {run.peak_rss_mb:7.0f} MB  {runs[kind]['tokens_per_sec']:8.1f} "
          f"tokens/s  loss {runs[kind]['loss']:.4f}")
  ratio = runs["lora"]["peak_mb"] / runs["full"]["peak_mb"]
  print(f"LoRA peak / full peak = {ratio:.2f} (target <= 0.40); QLoRA NF4 base / bf16 = "
        f"{runs['qlora']['base_bytes_ratio']:.3f} (target <= 0.30)")
  return {"lora_peak_mb": runs["lora"]["peak_mb"], "qlora_peak_mb": runs["qlora"]["peak_mb"],
          "full_peak_mb": runs["full"]["peak_mb"], "lora_full_peak_ratio": ratio,
          "lora_tokens_per_sec": runs["lora"]["tokens_per_sec"],
          "qlora_tokens_per_sec": runs["qlora"]["tokens_per_sec"],
          "full_tokens_per_sec": runs["full"]["tokens_per_sec"],
          "qlora_base_bytes_ratio": runs["qlora"]["base_bytes_ratio"], "model": args.model,
          "params": params, "remat": args.remat, "batch": args.batch, "seq_len": args.seq_len}


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mode:
  help: str
  add_args: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, str], dict]


MODES: dict[str, Mode] = {
  "convert": Mode("HF safetensors -> zoo conversion: MB/s and peak RSS", add_convert_args,
                  bench_convert),
  "train": Mode("zoo's train step vs transformers eager on CPU: tokens/s and MFU",
                add_train_args, bench_train),
  "decode": Mode("greedy generation tokens/s vs transformers generate and the bandwidth bound",
                 add_decode_args, bench_decode),
  "lora": Mode("LoRA / QLoRA step vs full fine-tuning: peak RSS and tokens/s", add_lora_args,
               bench_lora),
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
