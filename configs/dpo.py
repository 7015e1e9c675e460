"""Preference tuning (DPO and its cousins) of a checkpoint on JSONL preference pairs, the whole
model or LoRA / QLoRA adapters.

    zoo train --config configs/dpo.py:init_from=runs/sft,files=pairs.jsonl --workdir runs/dpo
    zoo train --config configs/dpo.py:init_from=runs/sft,files=pairs.jsonl,rank=16,quantize=nf4 \\
        --workdir runs/qlora-dpo

Records are {"prompt", "chosen", "rejected"} strings, HF's conversational layout (message
lists, rendered with the checkpoint's chat template), or pre-tokenized {"prompt_ids",
"chosen_ids", "rejected_ids"} (zoo.data.preference). Batches count pairs.

Arguments: init_from (the policy's starting checkpoint, zoo or HF), files (JSONL globs),
reference (the frozen reference checkpoint; default init_from, or with LoRA the base with the
adapters off), loss (sigmoid = DPO, ipo, hinge, simpo), beta (default 0.1; 2.0 for simpo),
label_smoothing (conservative DPO), sft_weight (RPO's NLL of the chosen answers), gamma (SimPO's
target margin, default 1.0), max_prompt_len (prompt tokens kept when a pair does not fit;
default half of the sequence), rank (> 0: LoRA adapters only, as configs/lora.py), alpha
(default 2 x rank), targets, dropout, quantize (none, int8, nf4: QLoRA), remat (default full),
shrink. The run ends with the model (full) or the adapter in zoo's and peft's formats (LoRA).

Slice: v5p-8 for a 7B-8B checkpoint in full (two copies of the weights: the policy and the
frozen reference), v5e-8 with LoRA. Check that it fits before renting one:

    zoo plan --config configs/dpo.py:init_from=CKPT --topology v5p-8
"""

from zoo.errors import ZooError
from zoo.train.config import base_config, check_args, parse_arg, shrink


def get_config(arg=None):
  args = parse_arg(arg)
  check_args(args, {"init_from", "files", "reference", "loss", "beta", "label_smoothing",
                    "sft_weight", "gamma", "max_prompt_len", "rank", "alpha", "targets",
                    "dropout", "quantize", "remat", "shrink"}, "dpo.py")
  c = base_config()
  c.init_from = args.get("init_from", "")
  c.data.update(dict(source="files", files=args.get("files", ""), format="preference",
                     seq_len=1024, batch_size=16,
                     max_prompt_len=int(args.get("max_prompt_len", 0))))
  loss = args.get("loss", "sigmoid")
  c.dpo.update(dict(loss=loss, beta=float(args.get("beta", 2.0 if loss == "simpo" else 0.1)),
                    label_smoothing=float(args.get("label_smoothing", 0.0)),
                    sft_weight=float(args.get("sft_weight", 0.0)),
                    reference=args.get("reference", "")))
  if loss == "simpo" or "gamma" in args:
    c.dpo.gamma = float(args.get("gamma", 1.0))
  rank = int(args.get("rank", 0))
  if rank:
    c.lora.update(dict(rank=rank, alpha=float(args.get("alpha", 2 * rank)),
                       targets=args.get("targets", "all-linear").replace("+", ","),
                       dropout=float(args.get("dropout", 0.0)),
                       quantize=args.get("quantize", "none")))
  else:
    for name in ("alpha", "targets", "dropout", "quantize"):
      if name in args:
        raise ZooError(f"dpo.py: {name} is a LoRA argument; give rank > 0 with it")
  c.remat = args.get("remat", "full")
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  # DPO's usual recipe: a small learning rate (LoRA's adapters take a larger one), short warmup.
  c.optimizer.update(dict(lr=5e-6 if rank else 5e-7, weight_decay=0.0, warmup_steps=50,
                          schedule="cosine"))
  c.train.update(dict(steps=1000, log_every=10, eval_every=200, eval_batches=8,
                      checkpoint_every=200))
  return shrink(c) if args.get("shrink") else c
