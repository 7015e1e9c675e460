"""LoRA / QLoRA fine-tuning of a converted checkpoint: only the adapters train and are saved.

    zoo convert path/to/hf-model runs/base --to zoo
    zoo train --config configs/lora.py:init_from=runs/base,files=data/*.jsonl,rank=16 \
        --workdir runs/lora
    zoo train --config configs/lora.py:init_from=runs/base,quantize=nf4 --workdir runs/qlora

Arguments: init_from (the base checkpoint, zoo or HF), files (text or JSONL globs; default the
standard-library corpus), rank, alpha (default 2 x rank), targets (module names joined by '+',
e.g. q_proj+k_proj+v_proj+o_proj, or all-linear), dropout (on the adapters' input while
training, as peft's lora_dropout; default 0), quantize (none, int8, nf4), remat (default full:
each layer's activations are recomputed in the backward pass, as peft's QLoRA recipe turns on
gradient checkpointing; none keeps them, faster and larger), shrink. The run
ends with the adapter in WORKDIR/adapter (zoo's) and WORKDIR/adapter_peft (HF peft's), for
`zoo.load(base, adapter=DIR)`, `zoo generate --adapter DIR` and `peft.PeftModel`.

Slice: v5e-8. For a 7B-8B checkpoint. Check that it fits before renting one:

    zoo plan --config configs/lora.py:init_from=CKPT --topology v5e-8
"""

from zoo.train.config import base_config, check_args, parse_arg, shrink


def get_config(arg=None):
  args = parse_arg(arg)
  check_args(args, {"init_from", "files", "rank", "alpha", "targets", "dropout", "quantize",
                    "remat", "shrink"}, "lora.py")
  c = base_config()
  c.init_from = args.get("init_from", "")
  c.data.update(dict(source="files" if args.get("files") else "python_stdlib",
                     files=args.get("files", ""), seq_len=512, batch_size=16))
  rank = int(args.get("rank", 16))
  c.lora.update(dict(rank=rank, alpha=float(args.get("alpha", 2 * rank)),
                     targets=args.get("targets", "all-linear").replace("+", ","),
                     dropout=float(args.get("dropout", 0.0)),
                     quantize=args.get("quantize", "none")))
  c.remat = args.get("remat", "full")
  # The weights split over every device (FSDP), as a 7B-8B model needs on any slice.
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.optimizer.update(dict(lr=2e-4, weight_decay=0.0, warmup_steps=50, schedule="cosine"))
  c.train.update(dict(steps=1000, log_every=10, eval_every=200, checkpoint_every=200))
  return shrink(c) if args.get("shrink") else c
