"""Pretraining LLaMA 3.1 70B (llama3_1_70b preset) with FSDP over all devices.

    zoo train --config configs/llama3_1_70b.py --workdir runs/llama3_1_70b \\
        --config.data.source=files --config.data.files='corpus/*.jsonl' \\
        --config.data.tokenizer=path/to/tokenizer.model
    zoo train --config configs/llama3_1_70b.py:shrink --workdir /tmp/llama3_1_70b-cpu   # one CPU step

A real run points data at a corpus (files or a prepared TFDS dataset) and the tokenizer of the
model family. 1024 sequences of 8192 tokens a step (8.4M tokens, about Meta's early-stage
batch), four on each of the slice's 256 chips.

Slice: v5p-512. Check that it fits before renting one:

    zoo plan --config configs/llama3_1_70b.py --topology v5p-512
"""

from zoo.train.config import pretraining_config


def get_config(arg=None):
  return pretraining_config("llama3_1_70b", seq_len=8192, batch_size=1024, lr=0.00015,
                            arg=arg, name="llama3_1_70b.py")
