"""`dpo`: zoo's DPO step (full and LoRA) against TRL's DPOTrainer step in torch eager on the same
LLaMA shape, each in its own process, interleaved: tokens/s and their ratio; and each kind's
peak RSS, with LoRA-DPO's over full DPO's against LoRA SFT's over full SFT on the same model."""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import models
from bench.harness import QUIET, Worker, call, interleave_and_close, median, probe
from bench.train import TRAIN_MODEL, TRAIN_OPTIMIZER

# zoo's tokens/s over the peer's (full and LoRA); LoRA-DPO's peak over full DPO's at most
# LoRA SFT's over full SFT's (the factor LoRA saves, kept with a reference model beside).
TARGETS = dict(ratio=1.0)

HELP = "zoo's DPO step (full, LoRA) vs TRL's DPOTrainer step in torch eager: tokens/s, peak RSS"
KINDS = ("full", "lora")


def model_overrides(spec: dict) -> dict:
  return dict(TRAIN_MODEL, vocab_size=spec["vocab"], max_position_embeddings=spec["seq_len"])


def write_base(spec: dict) -> int:
  """Worker: the random float32 policy (and reference) checkpoint; its parameter count."""
  from zoo.convert import Checkpoint
  models.write_checkpoint(spec["dst"], model_overrides(spec))
  models.write_checkpoint(spec["dst"] + "_hf", model_overrides(spec), to="hf")
  return Checkpoint(spec["dst"]).config.num_params()


def pairs(spec: dict) -> list[tuple[list, list, list]]:
  """Fixed random pairs: a prompt of half the row, completions filling the rest."""
  import numpy as np
  rng = np.random.default_rng(0)
  t, half = spec["seq_len"], spec["seq_len"] // 2
  out = []
  for _ in range(spec["batch"]):
    p = rng.integers(0, spec["vocab"], half).tolist()
    c = rng.integers(0, spec["vocab"], t + 1 - half).tolist()
    r = rng.integers(0, spec["vocab"], t + 1 - half).tolist()
    out.append((p, c, r))
  return out


def zoo_config(kind: str, spec: dict, sft: bool = False):
  """The shipped configs/dpo.py (or for SFT configs/lora.py / finetune.py) on the checkpoint,
  with the bench's batch, sequence, remat and the plain AdamW of the train benchmark."""
  from zoo.train.config import load_config
  ckpt, rank = spec["checkpoint"], spec["rank"]
  lora = f",rank={rank},alpha={2 * rank}" if kind == "lora" else ""
  if sft:
    name = (f"configs/lora.py:init_from={ckpt}{lora}" if kind == "lora"
            else f"configs/finetune.py:init_from={ckpt}")
  else:
    name = f"configs/dpo.py:init_from={ckpt}{lora}"
  overrides = {"remat": spec["remat"], "data.batch_size": spec["batch"],
               "data.seq_len": spec["seq_len"], "mesh.data": 1, "mesh.fsdp": 1}
  overrides.update({f"optimizer.{k}": v for k, v in TRAIN_OPTIMIZER.items()})
  if kind == "lora":
    overrides["optimizer.decay_norms_and_biases"] = False
  return load_config(name, overrides)


def zoo_stepper(spec: dict):
  """Worker: zoo's DPO (or SFT, spec["sft"]) step of spec["kind"] as `zoo train` sets it up
  from the shipped config, on one fixed batch: (run(n) -> loss, info)."""
  import tempfile

  import jax
  import numpy as np

  from zoo import sharding
  from zoo.data.preference import pair_rows
  from zoo.train.setup import build, prepare
  sft = spec.get("sft", False)
  trainer = build(prepare(zoo_config(spec["kind"], spec, sft), tempfile.mkdtemp(),
                          with_data=False))
  rows = [pair_rows(p, c, r, spec["seq_len"]) for p, c, r in pairs(spec)]
  batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
  if sft:  # the same rows as plain sequences, trained on their completions
    batch = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
  batch = trainer.global_batch(batch)
  holder = {"state": trainer.initial_state()}
  start = time.perf_counter()
  with sharding.use(trainer.run.mesh, trainer.run.rules):
    step = trainer.train_step.lower(holder["state"], batch, *trainer.frozen).compile()
  compile_s = time.perf_counter() - start

  def run(n: int) -> float:
    state = holder["state"]
    for _ in range(n):
      state, metrics = step(state, batch, *trainer.frozen)
    holder["state"] = state
    return float(metrics["loss"])  # waits for the last step, so for all of them

  return run, {"compile_s": compile_s, "backend": jax.default_backend(),
               "jax": jax.__version__}


def peer_stepper(spec: dict):
  """Worker: TRL's DPOTrainer step (its collator, loss and backward; torch.optim.AdamW) on the
  transformers model of the same checkpoint in float32 eager; with LoRA, peft adapters on every
  linear layer and the reference the base with adapters off, as TRL does it. Without TRL, a
  transformers eager DPO step (sigmoid loss) written here."""
  import tempfile

  import torch
  import transformers
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  hf_dir = spec["checkpoint"] + "_hf"
  policy = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  lora = spec["kind"] == "lora"
  if lora:
    import peft
    policy = peft.get_peft_model(policy, peft.LoraConfig(
        r=spec["rank"], lora_alpha=2 * spec["rank"], target_modules="all-linear",
        lora_dropout=0.0, task_type="CAUSAL_LM"))
  reference = None if lora else transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32).eval()
  o = TRAIN_OPTIMIZER
  params = [p for p in policy.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"],
                          weight_decay=o["weight_decay"])
  examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs(spec)]
  try:
    import datasets
    import trl
  except ImportError:
    trl = None
  if trl is not None:
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, report_to=[], use_cpu=True,
                         bf16=False, max_length=None, disable_dropout=True,
                         per_device_train_batch_size=spec["batch"],
                         gradient_checkpointing=spec["remat"] != "none")
    dpo = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(
                             [{"prompt": "a", "chosen": " b", "rejected": " c"}]))
    inputs = dpo.data_collator(examples)
    policy.train()

    def loss_fn():
      return dpo.compute_loss(policy, inputs)
    peer = f"TRL {trl.__version__} DPOTrainer"
  else:
    ids = [torch.tensor([p + c for p, c, _ in pairs(spec)]),
           torch.tensor([p + r for p, _, r in pairs(spec)])]
    start = spec["seq_len"] // 2 - 1
    policy.train()

    def logps(model, x):
      lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
      return lp.gather(2, x[:, 1:, None])[:, start:, 0].sum(-1)

    def loss_fn():
      x = torch.cat(ids)
      with torch.no_grad():
        if lora:
          with policy.disable_adapter():
            ref = logps(policy, x)
        else:
          ref = logps(reference, x)
      pol = logps(policy, x)
      d = (pol - ref).view(2, -1)
      return -torch.nn.functional.logsigmoid(0.1 * (d[0] - d[1])).mean()
    peer = "transformers eager DPO step (TRL not installed)"

  def run(n: int) -> float:
    for _ in range(n):
      loss = loss_fn()
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return run, {"peer": peer, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__}


def _word_tokenizer():
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  tok = Tokenizer(tok_models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "a": 4,
                                        "b": 5, "c": 6}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return tok


def peak(spec: dict) -> dict:
  """Worker: a few steps of one stepper in a fresh process (its peak RSS is the answer's)."""
  fn = peer_stepper if spec.get("peer") else zoo_stepper
  run, _ = fn(spec)
  return {"loss": run(spec["steps"])}


def has_trl(spec: dict) -> str:
  import trl
  return trl.__version__


def add_args(p: argparse.ArgumentParser):
  p.add_argument("--steps", type=int, default=2, help="DPO steps per timing (default 2)")
  p.add_argument("--rounds", type=int, default=3,
                 help="timings of each side, interleaved, medians reported (default 3)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
  p.add_argument("--batch", type=int, default=4, help="pairs per batch (default 4: 8 rows)")
  p.add_argument("--seq-len", type=int, default=128, help="row length (default 128)")
  p.add_argument("--rank", type=int, default=16, help="LoRA rank (all-linear; default 16)")
  p.add_argument("--remat", default="none", help="remat of every step (default none)")
  p.add_argument("--no-peer", action="store_true", help="time zoo alone")


def run(args, workdir: str) -> dict:
  if min(args.steps, args.rounds, args.batch, args.seq_len, args.rank, args.vocab) < 1:
    sys.exit("bench: --steps, --rounds, --batch, --seq-len, --rank and --vocab must be positive")
  checkpoint = os.path.join(workdir, "base")
  spec = {"checkpoint": checkpoint, "vocab": args.vocab, "batch": args.batch,
          "seq_len": args.seq_len, "rank": args.rank, "remat": args.remat,
          "warmup": args.warmup, "steps": args.steps, "threads": os.cpu_count() or 1}
  params, _ = call(write_base, dict(spec, dst=checkpoint), "writing the checkpoint")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  trl_version = None if args.no_peer else probe(has_trl, {})
  peer = (f"TRL {trl_version} DPOTrainer" if trl_version
          else "transformers eager DPO step (TRL not installed)")
  print(f"model: train benchmark shape, vocab {args.vocab}, {params / 1e6:.1f}M parameters, "
        f"float32; {args.batch} pairs x 2 x {args.seq_len} tokens; LoRA rank {args.rank} "
        f"all-linear; peer: {'none' if args.no_peer else peer}")
  tokens = 2 * args.batch * args.seq_len
  result = {"mode": "dpo", "params": params, "vocab": args.vocab, "batch": args.batch,
            "seq_len": args.seq_len, "rank": args.rank, "remat": args.remat,
            "peer": None if args.no_peer else peer}
  quiet = True
  for kind in KINDS:
    s = dict(spec, kind=kind)
    log = os.path.join(workdir, f"{{}}-{kind}.log")
    workers = {"zoo": Worker(zoo_stepper, s, env, log.format("zoo"))}
    if not args.no_peer:
      workers["peer"] = Worker(peer_stepper, s, None, log.format("peer"))
    rates, shares, dropped = interleave_and_close(workers, args.steps, args.rounds, tokens)
    quiet = quiet and median(shares) <= QUIET
    zoo_rate = median(rates["zoo"])
    result[f"{kind}_zoo_tokens_per_sec"] = round(zoo_rate, 1)
    result[f"{kind}_zoo_compile_s"] = round(workers["zoo"].info["compile_s"], 2)
    result[f"{kind}_zoo_first_loss"] = round(workers["zoo"].info["first_loss"], 4)
    line = f"{kind:4s} DPO: zoo {zoo_rate:8.0f} tokens/s"
    if not args.no_peer:
      peer_rate = median(rates["peer"])
      ratio = median([z / t for z, t in zip(rates["zoo"], rates["peer"])])
      result.update({f"{kind}_peer_tokens_per_sec": round(peer_rate, 1),
                     f"{kind}_ratio": round(ratio, 3),
                     f"{kind}_peer_first_loss": round(workers["peer"].info["first_loss"], 4)})
      line += f", peer {peer_rate:8.0f} tokens/s: zoo/peer {ratio:.2f}x"
    print(line + (f" ({dropped} busy rounds repeated)" if dropped else ""))
  # Peak RSS, each kind in a fresh process: zoo's DPO and SFT steps, and the peer's DPO step.
  peaks = {}
  for kind in KINDS:
    for side, extra in (("zoo_dpo", {}), ("zoo_sft", {"sft": True}), ("peer_dpo", {"peer": True})):
      if side == "peer_dpo" and args.no_peer:
        continue
      _, measured = call(peak, dict(spec, kind=kind, **extra), f"{side} {kind} peak",
                         None if side == "peer_dpo" else env)
      peaks[f"{kind}_{side}"] = round(measured.peak_rss_mb, 1)
  dpo_ratio = peaks["lora_zoo_dpo"] / peaks["full_zoo_dpo"]
  sft_ratio = peaks["lora_zoo_sft"] / peaks["full_zoo_sft"]
  print("peak RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
  print(f"LoRA/full peak: DPO {dpo_ratio:.3f}, SFT {sft_ratio:.3f} (target: DPO's <= SFT's)")
  result.update({f"{k}_peak_mb": v for k, v in peaks.items()})
  result.update(zoo_tokens_per_sec=result["full_zoo_tokens_per_sec"],
                lora_full_peak_ratio_dpo=round(dpo_ratio, 4),
                lora_full_peak_ratio_sft=round(sft_ratio, 4),
                zoo_peak_mb=peaks["full_zoo_dpo"], quiet=quiet)
  ok = dpo_ratio <= sft_ratio
  if not args.no_peer:
    result.update(peer_tokens_per_sec=result["full_peer_tokens_per_sec"],
                  ratio=result["full_ratio"], peer_peak_mb=peaks["full_peer_dpo"],
                  ratio_target=TARGETS["ratio"])
    ok = ok and all(result[f"{k}_ratio"] >= TARGETS["ratio"] for k in KINDS)
  result["within_target"] = ok
  verdict = ("PASS" if ok else "FAIL") if quiet else "NOISY (busy machine)"
  print(f"{verdict}: " + ", ".join(f"{k} zoo/peer {result.get(f'{k}_ratio')}" for k in KINDS)
        + f" (target >= {TARGETS['ratio']}); LoRA/full peak DPO {dpo_ratio:.3f} vs SFT "
        f"{sft_ratio:.3f}")
  return result
