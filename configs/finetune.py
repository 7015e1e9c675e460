"""Full fine-tuning of a converted checkpoint on local text or JSONL files.

    zoo convert path/to/hf-model runs/base --to zoo
    zoo train --config configs/finetune.py:init_from=runs/base,files=data/*.jsonl \
        --workdir runs/finetune

The model's config and tokenizer come from the checkpoint. `shrink` keeps the checkpoint but
trains two short steps.

Slice: v5p-8. For a 7B-8B checkpoint. Check that it fits before renting one:

    zoo plan --config configs/finetune.py:init_from=CKPT --topology v5p-8
"""

from zoo.train.config import base_config, check_args, parse_arg, shrink


def get_config(arg=None):
  args = parse_arg(arg)
  check_args(args, {"init_from", "files", "shrink"}, "finetune.py")
  c = base_config()
  c.init_from = args.get("init_from", "")
  c.data.update(dict(source="files" if args.get("files") else "python_stdlib",
                     files=args.get("files", ""), seq_len=512, batch_size=16))
  # The weights split over every device (FSDP), as a 7B-8B model needs on any slice.
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.optimizer.update(dict(lr=2e-5, weight_decay=0.0, warmup_steps=100, schedule="cosine"))
  c.train.update(dict(steps=2000, log_every=10, eval_every=200, checkpoint_every=200))
  return shrink(c) if args.get("shrink") else c
