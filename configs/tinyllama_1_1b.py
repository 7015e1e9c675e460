"""Pretraining TinyLlama 1.1B (tinyllama_1_1b preset) with FSDP over all devices.

    zoo train --config configs/tinyllama_1_1b.py --workdir runs/tinyllama_1_1b --config.data.source=files \\
        --config.data.files='corpus/*.jsonl' --config.data.tokenizer=path/to/tokenizer.model
    zoo train --config configs/tinyllama_1_1b.py:shrink --workdir /tmp/tinyllama_1_1b-cpu   # one CPU step

A real run points data at a corpus (files or a prepared TFDS dataset) and the tokenizer of the
model family.

Slice: v5litepod-256. Check that it fits before renting one:

    zoo plan --config configs/tinyllama_1_1b.py --topology v5litepod-256
"""

from zoo.train.config import pretraining_config


def get_config(arg=None):
  return pretraining_config("tinyllama_1_1b", seq_len=2048, batch_size=1024, lr=0.0004,
                            arg=arg, name="tinyllama_1_1b.py")
