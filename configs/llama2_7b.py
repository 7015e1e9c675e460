"""Pretraining LLaMA 2 7B (llama2_7b preset) with FSDP over all devices.

    zoo train --config configs/llama2_7b.py --workdir runs/llama2_7b --config.data.source=files \\
        --config.data.files='corpus/*.jsonl' --config.data.tokenizer=path/to/tokenizer.model
    zoo train --config configs/llama2_7b.py:shrink --workdir /tmp/llama2_7b-cpu   # one CPU step

A real run points data at a corpus (files or a prepared TFDS dataset) and the tokenizer of the
model family.

Slice: v5p-256. Check that it fits before renting one:

    zoo plan --config configs/llama2_7b.py --topology v5p-256
"""

from zoo.train.config import pretraining_config


def get_config(arg=None):
  return pretraining_config("llama2_7b", seq_len=4096, batch_size=1024, lr=0.0003,
                            arg=arg, name="llama2_7b.py")
