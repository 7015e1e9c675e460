"""`lora`: a LoRA step, a QLoRA step (NF4 base) and a full fine-tuning step of the same float32
LLaMA, each in its own process: peak RSS and tokens/s, and the NF4 base's bytes against bf16."""

from __future__ import annotations

import argparse
import os
import time

from bench import models
from bench.harness import call

# The LoRA step's peak RSS over the full step's, and the NF4 base's bytes over bf16's: at most.
TARGETS = dict(lora_full_peak_ratio=0.40, qlora_base_bytes_ratio=0.30)

HELP = "LoRA / QLoRA step vs full fine-tuning: peak RSS and tokens/s"

# 91M and 335M float32 LLaMAs; at the small size the JAX runtime and XLA's compile memory
# (a few hundred MB, the same for every kind of step) weigh on every peak.
LORA_MODELS = {
  "small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=6,
                num_heads=12, num_kv_heads=12, head_dim=64, max_position_embeddings=2048),
  "medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=20,
                 num_heads=16, num_kv_heads=16, head_dim=64, max_position_embeddings=2048),
}
KINDS = ("lora", "qlora", "full")


def write_base(spec: dict) -> int:
  """Worker: the random float32 base checkpoint of `model` in `dst`; its parameter count."""
  from zoo.convert import Checkpoint
  models.write_checkpoint(spec["dst"], LORA_MODELS[spec["model"]])
  return Checkpoint(spec["dst"]).config.num_params()


def zoo_config(kind: str, spec: dict):
  """The shipped config `zoo train` runs for `kind` on the checkpoint: configs/lora.py (rank r,
  alpha 2r, every linear layer; QLoRA with an NF4 base) or configs/finetune.py, each with the
  bench's remat policy, batch and sequence length."""
  from zoo.train.config import load_config
  ckpt, rank = spec["checkpoint"], spec["rank"]
  if kind == "full":
    name = f"configs/finetune.py:init_from={ckpt}"
  else:
    name = (f"configs/lora.py:init_from={ckpt},rank={rank},alpha={2 * rank},"
            f"quantize={'nf4' if kind == 'qlora' else 'none'}")
  return load_config(name, {"remat": spec["remat"], "data.batch_size": spec["batch"],
                            "data.seq_len": spec["seq_len"]})


def zoo_step(kind: str, spec: dict):
  """zoo's train step of `kind` (lora, qlora or full) on the checkpoint, set up by zoo's train
  loop from the shipped config (the base read tensor by tensor, nothing drawn at random):
  (run(n) -> loss, info)."""
  import tempfile

  import jax
  import numpy as np

  from zoo import sharding
  from zoo.layers.quant import bf16_bytes, is_quantized, nbytes
  from zoo.train.setup import build, prepare
  trainer = build(prepare(zoo_config(kind, spec), tempfile.mkdtemp(), with_data=False))
  ratio = None
  if kind == "qlora":
    q = [x for x in jax.tree.leaves(trainer.base, is_leaf=is_quantized) if is_quantized(x)]
    ratio = sum(map(nbytes, q)) / sum(map(bf16_bytes, q))
  b, t = spec["batch"], spec["seq_len"]
  vocab = trainer.run.model_config.vocab_size
  x = np.random.default_rng(0).integers(0, vocab, (b, t + 1)).astype(np.int32)
  batch = trainer.global_batch({
      "tokens": x[:, :-1], "targets": x[:, 1:],
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
      "segment_ids": np.ones((b, t), np.int32), "weights": np.ones((b, t), np.float32)})
  holder = {"state": trainer.initial_state()}

  def run(n: int) -> float:
    state = holder["state"]
    with sharding.use(trainer.run.mesh, trainer.run.rules):
      for _ in range(n):
        state, metrics = trainer.train_step(state, batch, *trainer.base)
    holder["state"] = state
    return float(metrics["loss"])  # waits for the last step, so for all of them

  return run, {"base_bytes_ratio": ratio}


def time_steps(spec: dict) -> dict:
  """Worker: `steps` timed steps of `kind` after the compile: tokens/s and the last loss."""
  run, info = zoo_step(spec["kind"], spec)
  run(2)  # compiles (and warms up)
  start = time.perf_counter()
  loss = run(spec["steps"])
  seconds = time.perf_counter() - start
  return {"tokens_per_sec": spec["steps"] * spec["batch"] * spec["seq_len"] / seconds,
          "loss": loss, **info}


def add_args(p: argparse.ArgumentParser):
  p.add_argument("--steps", type=int, default=3, help="timed steps after the compile")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--model", choices=sorted(LORA_MODELS), default="medium",
                 help="small: 91M parameters, medium: 322M (default)")
  p.add_argument("--remat", default="full", help="remat policy of all three steps (none, "
                 "full, dots, dots_no_batch; default full, as configs/lora.py and peft's QLoRA "
                 "recipe fine-tune)")


def run(args, workdir: str) -> dict:
  checkpoint = os.path.join(workdir, "base")
  params, _ = call(write_base, {"dst": checkpoint, "model": args.model},
                   "writing the base checkpoint")
  print(f"model: {args.model}, {params / 1e6:.0f}M parameters, float32; batch {args.batch} x "
        f"{args.seq_len} tokens; LoRA rank {args.rank} on every linear layer")
  spec = {"checkpoint": checkpoint, "rank": args.rank, "batch": args.batch,
          "seq_len": args.seq_len, "steps": args.steps, "remat": args.remat}
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  runs = {}
  for kind in KINDS:
    answer, measured = call(time_steps, dict(spec, kind=kind), kind, env)
    runs[kind] = dict(answer, peak_mb=measured.peak_rss_mb)
    print(f"{kind:6s} peak RSS {measured.peak_rss_mb:7.0f} MB  "
          f"{runs[kind]['tokens_per_sec']:8.1f} tokens/s  loss {runs[kind]['loss']:.4f}")
  ratio = runs["lora"]["peak_mb"] / runs["full"]["peak_mb"]
  print(f"LoRA peak / full peak = {ratio:.2f} (target <= "
        f"{TARGETS['lora_full_peak_ratio']:.2f}); QLoRA NF4 base / bf16 = "
        f"{runs['qlora']['base_bytes_ratio']:.3f} (target <= "
        f"{TARGETS['qlora_base_bytes_ratio']:.2f})")
  return {"lora_peak_mb": runs["lora"]["peak_mb"], "qlora_peak_mb": runs["qlora"]["peak_mb"],
          "full_peak_mb": runs["full"]["peak_mb"], "lora_full_peak_ratio": ratio,
          "lora_tokens_per_sec": runs["lora"]["tokens_per_sec"],
          "qlora_tokens_per_sec": runs["qlora"]["tokens_per_sec"],
          "full_tokens_per_sec": runs["full"]["tokens_per_sec"],
          "qlora_base_bytes_ratio": runs["qlora"]["base_bytes_ratio"], "model": args.model,
          "params": params, "remat": args.remat, "batch": args.batch, "seq_len": args.seq_len}
