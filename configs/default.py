"""The default run: a small LLaMA trained on the Python standard library's own source files.

    zoo train
    zoo train --config configs/default.py --workdir runs/default --config.train.steps=1000

The first run builds the dataset (TFDS, array_record) from the running interpreter's stdlib and
trains an 8000-piece SentencePiece tokenizer, both cached under WORKDIR/data. The settings were
tuned for held-out bits per byte in about 1.5 minutes on 2 CPU cores (tools/bpb.py measures it): a
large vocabulary puts more bytes in each token for little extra compute at this model size, and
many small batches at a moderate lr learn more from the same tokens than fewer large ones.

Slice: v5litepod-1. It is sized for a laptop CPU; on Cloud TPU the smallest slice runs it.
Check that it fits before renting one:

    zoo plan --config configs/default.py --topology v5litepod-1
"""

from zoo.train.config import base_config, check_args, parse_arg, shrink


def get_config(arg=None):
  args = parse_arg(arg)
  check_args(args, {"shrink"}, "default.py")
  c = base_config()
  c.model.update(dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                      num_kv_heads=4, head_dim=64, max_position_embeddings=512))
  c.data.update(dict(source="python_stdlib", vocab_size=8000, seq_len=128, batch_size=8))
  c.optimizer.update(dict(lr=1e-3, warmup_steps=40, min_lr_ratio=0.1, weight_decay=0.1))
  c.train.update(dict(steps=400, log_every=10, eval_every=100, eval_batches=40,
                      checkpoint_every=200, sample_prompt="def ", sample_tokens=48))
  return shrink(c) if args.get("shrink") else c
