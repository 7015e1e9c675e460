"""`train`: zoo's jitted train step against transformers + torch eager on the same shapes, on the
CPU: tokens/s, their ratio and MFU against the machine's measured matmul peak."""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import models
from bench.harness import QUIET, Worker, call, cpu_model, interleave_and_close, median

# zoo's tokens/s over transformers' at every vocabulary size.
TARGETS = dict(ratio=1.0)

HELP = "zoo's train step vs transformers eager on CPU: tokens/s and MFU"

# The model: a tiny LLaMA whose matmuls are still big enough for a CPU to run them well.
TRAIN_MODEL = dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                   num_kv_heads=4, head_dim=64)
# Plain AdamW, as torch.optim.AdamW does it: constant lr, decay on every parameter, no clipping.
TRAIN_OPTIMIZER = dict(name="adamw", lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                       schedule="constant", warmup_steps=0, grad_clip=0.0,
                       decay_norms_and_biases=True)
# XLA:CPU compile options to try on zoo's step with --ynn-off: every dot through Eigen instead
# of YNNPACK, which jaxlib 0.10 uses by default (and `zoo train` with it). Set per compilation
# (jit's compiler_options), so that an option a jaxlib does not know is an error to catch, not
# an abort as in XLA_FLAGS.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def train_config(vocab: int, seq_len: int):
  return models.tiny_llama(vocab_size=vocab, max_position_embeddings=seq_len, **TRAIN_MODEL)


def train_batch(vocab: int, batch: int, seq_len: int) -> dict:
  """One fixed batch of random tokens (numpy), the same in every worker: unpacked rows."""
  import numpy as np
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions.copy(),
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "weights": np.ones((batch, seq_len), np.float32)}


def zoo_config(spec: dict):
  """What `zoo train` runs: the shipped configs/default.py, with the bench's model shape and
  vocabulary (the peer builds the same), batch, dtype, data-parallel mesh, and the plain AdamW
  above."""
  from zoo.train.config import load_config
  overrides = {f"model.{k}": v for k, v in TRAIN_MODEL.items()}
  overrides.update({"model.vocab_size": spec["vocab"],
                    "model.max_position_embeddings": spec["seq_len"],
                    "data.seq_len": spec["seq_len"], "data.batch_size": spec["batch"],
                    "dtype": spec["dtype"], "remat": spec["remat"],
                    "mesh.data": spec["devices"], "mesh.fsdp": 1, "mesh.tensor": 1})
  overrides.update({f"optimizer.{k}": v for k, v in TRAIN_OPTIMIZER.items()})
  return load_config("configs/default.py", overrides)


def zoo_stepper(spec: dict):
  """Worker: zoo's train step as zoo's train loop sets it up from the shipped config (state,
  shardings, jit), on one fixed batch: (run(n) -> loss, info)."""
  import tempfile

  import jax

  from zoo import sharding
  from zoo.train.setup import build, prepare
  trainer = build(prepare(zoo_config(spec), tempfile.mkdtemp(), with_data=False))
  config = trainer.run.model_config
  assert config == train_config(spec["vocab"], spec["seq_len"]), "the peer's model differs"
  state = trainer.initial_state()
  batch = trainer.global_batch(train_batch(spec["vocab"], spec["batch"], spec["seq_len"]))
  start = time.perf_counter()
  with sharding.use(trainer.run.mesh, trainer.run.rules):
    lowered = trainer.train_step.lower(state, batch)
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

  info = {"compile_s": compile_s, "backend": jax.default_backend(),
          "devices": spec["devices"], "params": config.num_params(), "jax": jax.__version__,
          "options_refused": refused}
  return run, info


def torch_stepper(spec: dict):
  """Worker: transformers' LlamaForCausalLM in PyTorch eager with torch.optim.AdamW, float32."""
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


def peak_flops(spec: dict) -> dict:
  """Worker: the machine's float32 matmul peak, by each library zoo's metrics try."""
  from zoo.train.metrics import measure_peak_flops
  return measure_peak_flops(repeats=spec["repeats"])


def count_flops(spec: dict) -> list:
  """Worker: the training FLOPs per token of the model at each of `vocabs`."""
  from zoo.train.metrics import flops_per_token
  return [flops_per_token(train_config(v, spec["seq_len"]), spec["seq_len"])
          for v in spec["vocabs"]]


def add_args(p: argparse.ArgumentParser):
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


def run(args, workdir: str) -> dict:
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
  xla_flags = args.xla_flags
  if args.devices > 1:
    xla_flags += f" --xla_force_host_platform_device_count={args.devices}"
  # zoo's process sees only these XLA flags (not the caller's, which may fake 8 devices), and
  # only the CPU: transformers runs there.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.strip())
  options = CPU_COMPILER_OPTIONS if args.ynn_off else {}
  tokens = args.batch * args.seq_len

  def measure_peak() -> dict:
    return call(peak_flops, {"repeats": 5}, "measuring the matmul peak", env)[0]

  # The peak is the best of several measurements (at the start and after each vocabulary): on a
  # shared machine one measurement can land in a busy moment, which would inflate the MFU.
  peaks = [measure_peak()]
  print(f"zoo: jit compiler options {options}, XLA_FLAGS={env['XLA_FLAGS']!r}, "
        f"{args.devices} device(s), {args.dtype}; transformers: float32, "
        f"{os.cpu_count()} torch threads; on {cpu_model()}")
  fpt, _ = call(count_flops, {"seq_len": args.seq_len, "vocabs": vocabs}, "counting FLOPs")
  per_vocab = {}
  for vocab, flops in zip(vocabs, fpt):
    spec = {"vocab": vocab, "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup,
            "dtype": args.dtype, "remat": "none", "devices": args.devices,
            "compiler_options": options, "threads": os.cpu_count() or 1}
    log = os.path.join(workdir, f"{{}}-{vocab}.log")
    workers = {"zoo": Worker(zoo_stepper, spec, env, log.format("zoo"))}
    if not args.no_peer:
      workers["transformers"] = Worker(torch_stepper, spec, None, log.format("transformers"))
    rates, shares, dropped = interleave_and_close(workers, args.steps, args.rounds, tokens)
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
    if background > QUIET:
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
            "ratio": first.get("ratio"),
            # the same figure as peer_tokens_per_sec, by name: an independent transformers run
            # on the same shapes should be compared with it, not with the README's
            "transformers_tokens_per_sec": first.get("peer_tokens_per_sec"),
            "background_cpu": first["background_cpu"], "cpu": cpu_model(), "mfu": first["mfu"],
            "peak_flops": peak["peak_flops"], "peak_by": by,
            "peak_detail": {k: v for k, v in peak.items() if k != "peak_flops"},
            "per_vocab": per_vocab, "batch": args.batch, "seq_len": args.seq_len,
            "dtype": args.dtype, "devices": args.devices, "steps": args.steps,
            "rounds": args.rounds, "compiler_options": options, "xla_flags": env["XLA_FLAGS"],
            "peer": None if args.no_peer else "transformers eager"}
  result["quiet"] = all(r["background_cpu"] <= QUIET for r in per_vocab.values())
  if not args.no_peer:
    goal = TARGETS["ratio"]
    ok = all(r["ratio"] >= goal for r in per_vocab.values())
    result["ratio_target"] = goal
    result["within_target"] = ok
    verdict = ("PASS" if ok else "FAIL") if result["quiet"] else "NOISY (busy machine)"
    print(f"{verdict}: zoo/transformers "
          + ", ".join(f"{r['ratio']:.2f}x at vocab {v}" for v, r in per_vocab.items())
          + f" (target >= {goal})")
  return result
