"""Pretraining Mistral 7B (mistral_7b preset) with FSDP over all devices.

    zoo train --config configs/mistral_7b.py --workdir runs/mistral_7b --config.data.source=files \\
        --config.data.files='corpus/*.jsonl' --config.data.tokenizer=path/to/tokenizer.model
    zoo train --config configs/mistral_7b.py:shrink --workdir /tmp/mistral_7b-cpu   # one CPU step

A real run points data at a corpus (files or a prepared TFDS dataset) and the tokenizer of the
model family.

Slice: v5p-128. Check that it fits before renting one:

    zoo plan --config configs/mistral_7b.py --topology v5p-128
"""

from zoo.train.config import pretraining_config


def get_config(arg=None):
  return pretraining_config("mistral_7b", seq_len=8192, batch_size=512, lr=0.0003,
                            arg=arg, name="mistral_7b.py")
