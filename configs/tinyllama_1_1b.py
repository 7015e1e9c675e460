"""Pretraining TinyLlama 1.1B (tinyllama_1_1b preset) with FSDP over all devices.

    zoo train --config configs/tinyllama_1_1b.py --workdir runs/tinyllama_1_1b --config.data.source=files \
        --config.data.files='corpus/*.jsonl' --config.data.tokenizer=path/to/tokenizer.model
    zoo train --config configs/tinyllama_1_1b.py:shrink --workdir /tmp/tinyllama_1_1b-cpu   # one CPU step

A real run points data at a corpus (files or a prepared TFDS dataset) and the tokenizer of the
model family; the schedule follows the published recipe's shape at a smaller token budget.
"""

import ml_collections

from zoo.train.config import base_config, check_args, parse_arg, shrink


def get_config(arg=None):
  args = parse_arg(arg)
  check_args(args, {"shrink"}, "tinyllama_1_1b.py")
  c = base_config()
  c.model = ml_collections.ConfigDict({"preset": "tinyllama_1_1b"})
  c.dtype = "bfloat16"
  c.remat = "dots_no_batch"
  c.data.update(dict(seq_len=2048, batch_size=1024, vocab_size=32000))
  c.optimizer.update(dict(lr=0.0004, b2=0.95, weight_decay=0.1, warmup_steps=2000,
                          min_lr_ratio=0.1, grad_clip=1.0))
  c.train.update(dict(steps=100_000, log_every=50, eval_every=2000, eval_batches=50,
                      checkpoint_every=1000, keep_checkpoints=3))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return shrink(c) if args.get("shrink") else c
