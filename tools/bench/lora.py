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


def zoo_step(kind: str, spec: dict):
  """zoo's jitted train step of `kind` (lora, qlora or full) on the checkpoint, loaded as `zoo
  train` loads it (tensor by tensor, nothing drawn at random): (run(n) -> loss, info)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from zoo import lora, sharding
  from zoo.convert.checkpoint import Checkpoint
  from zoo.layers.quant import bf16_bytes, is_quantized, nbytes
  from zoo.models.llama import abstract_model
  from zoo.train.loop import load_tree, lora_split
  from zoo.train.optim import make_optimizer
  from zoo.train.step import make_train_step
  config = Checkpoint(spec["checkpoint"]).config
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx, schedule = make_optimizer(dict(name="adamw", lr=1e-4, schedule="constant",
                                     warmup_steps=0), 100)
  ratio = None
  if kind == "full":
    graphdef, abstract = nnx.split(abstract_model(config, remat=spec["remat"]), nnx.Param)
    shardings = sharding.variable_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    params, _ = load_tree(spec["checkpoint"], nnx.to_pure_dict(abstract), shardings)
    base = None
  else:
    graphdef, params, _, base, _ = lora_split(
        config, lora.LoraSpec(rank=spec["rank"], alpha=2 * spec["rank"],
                              targets=("all-linear",)),
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
  holder = {"state": state}

  def run(n: int) -> float:
    state = holder["state"]
    for _ in range(n):
      state, metrics = step(state, batch, *args)
    holder["state"] = state
    return float(metrics["loss"])  # waits for the last step, so for all of them

  return run, {"base_bytes_ratio": ratio}


def time_steps(spec: dict) -> dict:
  """Worker: `steps` timed steps of `kind` after the compile: tokens/s and the last loss."""
  run, info = zoo_step(spec["kind"], spec)
  run(2)  # the second call compiles again: the state comes back placed on the mesh
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
