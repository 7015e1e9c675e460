"""Pretraining LLaMA 3 8B (llama3_8b preset) with FSDP over all devices.

    zoo train --config configs/llama3_8b.py --workdir runs/llama3_8b --config.data.source=files \\
        --config.data.files='corpus/*.jsonl' --config.data.tokenizer=path/to/tokenizer.model
    zoo train --config configs/llama3_8b.py:shrink --workdir /tmp/llama3_8b-cpu   # one CPU step

A real run points data at a corpus (files or a prepared TFDS dataset) and the tokenizer of the
model family.

Slice: v5p-128. Check that it fits before renting one:

    zoo plan --config configs/llama3_8b.py --topology v5p-128
"""

from zoo.train.config import pretraining_config


def get_config(arg=None):
  return pretraining_config("llama3_8b", seq_len=8192, batch_size=512, lr=0.0003,
                            arg=arg, name="llama3_8b.py")
