"""The default run: a small LLaMA trained on the Python standard library's own source files.

    zoo train
    zoo train --config configs/default.py --workdir runs/default --config.train.steps=1000

The first run builds the dataset (TFDS, array_record) from the running interpreter's stdlib and
trains a 2000-piece SentencePiece tokenizer, both cached under WORKDIR/data.
"""

from zoo.train.config import base_config, check_args, parse_arg, shrink


def get_config(arg=None):
  args = parse_arg(arg)
  check_args(args, {"shrink"}, "default.py")
  c = base_config()
  c.model.update(dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                      num_kv_heads=4, head_dim=64, max_position_embeddings=512))
  c.data.update(dict(source="python_stdlib", vocab_size=2000, seq_len=128, batch_size=16))
  c.optimizer.update(dict(lr=2e-3, warmup_steps=25, min_lr_ratio=0.1, weight_decay=0.1))
  c.train.update(dict(steps=250, log_every=10, eval_every=50, eval_batches=8,
                      checkpoint_every=125, sample_prompt="def ", sample_tokens=48))
  return shrink(c) if args.get("shrink") else c
