"""grain pipelines: documents, shuffled per epoch and sharded by process, tokenized and packed.

  source -> [process_index::process_count] -> shuffle(seed) per epoch -> repeat -> tokenize
    -> cut into pieces of <= seq_len -> first-fit packing into rows -> batch

Each document becomes [bos] + encode(text) + [eos]; a row holds inputs tokens[:-1] and targets
tokens[1:] of whole documents, so a target never belongs to the next document. A document longer
than seq_len is cut into pieces of seq_len (input, target) pairs; each piece is its own segment
with positions restarting at 0, so positions stay below seq_len and attention never crosses a cut.
The returned iterator is a grain `DatasetIterator`: `get_state()` is JSON and `set_state` resumes
bit-exactly, and grain's orbax `CheckpointHandler` saves and restores it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import grain
import numpy as np

from zoo.data.instruct import InstructFormatter
from zoo.data.preference import preference_pipeline
from zoo.data.sources import (check_batch_args, field, finish_batches, local_batch_size,
                              process_share, rows_split, source_id, text_source)
from zoo.data.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece
from zoo.errors import ZooError

# Packing keeps this many rows open at once (at least one batch): more rows fill better.
MIN_PACKING_ROWS = 64
# Text fed to SentencePiece when `tokenizer_for` trains one: a few MB trains in seconds.
TOKENIZER_SAMPLE_CHARS = 4_000_000


class _Tokenize(grain.transforms.Map):
  """record -> {"ids": int32 [n] = [bos] + encode(text) + [eos], "mask": float32 [n]}; the
  mask (1: trained on) comes from `formatter` for instruction data, else it is all ones."""

  def __init__(self, tokenizer: Tokenizer, bos: int | None, eos: int | None, formatter=None):
    self._tokenizer, self._bos, self._eos = tokenizer, bos, eos
    self._formatter = formatter

  def map(self, record):
    text = record["text"]
    if self._formatter is not None:
      ids, mask = self._formatter(text)
      return {"ids": ids, "mask": mask}
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    ids = self._tokenizer.encode(text)
    if self._bos is not None:
      ids = [self._bos, *ids]
    if self._eos is not None:
      ids = [*ids, self._eos]
    return {"ids": np.asarray(ids, dtype=np.int32), "mask": np.ones(len(ids), np.float32)}


class _Pieces(grain.experimental.FlatMapTransform):
  """int32 [n] -> pieces of (tokens, targets, weights), each [<= seq_len]."""

  max_fan_out = 1 << 20  # only read by MapDataset flat maps; ours runs on an IterDataset

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, doc):
    ids = doc["ids"]
    # a 1-token document has no target and no piece; a target's weight is its token's mask
    inputs, targets, weights = ids[:-1], ids[1:], doc["mask"][1:]
    pieces = []
    for start in range(0, len(inputs), self._seq_len):
      end = start + self._seq_len
      pieces.append({"tokens": inputs[start:end], "targets": targets[start:end],
                     "weights": weights[start:end]})
    return pieces


def _row(packed):
  # The packer gives every packed feature its own segment ids and positions; the tokens' do.
  return {"tokens": packed["tokens"], "targets": packed["targets"],
          "positions": packed["tokens_positions"], "segment_ids": packed["tokens_segment_ids"],
          "weights": packed["weights"]}


def make_batches(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True, repeat: bool = True, process_index: int = 0,
                 process_count: int = 1, add_bos: bool = True, add_eos: bool = True,
                 pack: bool = True, num_workers: int = 0, formatter=None,
                 shard: str = "documents") -> grain.DatasetIterator:
  """An iterator of batches (see `zoo.data`) of `batch_size` rows for this process.

  Process i reads documents i, i + process_count, ... of `source` (records with a "text"
  field); each epoch visits them in a new order drawn from `seed`. `pack=False` puts one
  document piece per row. `repeat=False` ends after one pass, its last batch padded with empty
  rows (weights 0). `formatter` (instruction data: `zoo.data.instruct.InstructFormatter`) turns a
  record's text into ids and a loss mask, and adds BOS/EOS itself. `num_workers > 0` runs the pipeline in that many worker processes, which
  changes the order of batches and the shape of the state: resume with the same num_workers.
  `shard="rows"`: every process reads every document and keeps rows [i * batch_size,
  (i + 1) * batch_size) of each global batch of process_count * batch_size rows.
  """
  rows_of, batch_size, process_index, process_count = rows_split(
      shard, batch_size, process_index, process_count)
  check_batch_args(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                   process_count=process_count, seed=seed, num_workers=num_workers)
  bos = _special(tokenizer, "bos_id", "add_bos") if add_bos else None
  eos = _special(tokenizer, "eos_id", "add_eos") if add_eos else None

  ds = process_share(source, process_index, process_count, shuffle=shuffle, seed=seed,
                     repeat=repeat, what="documents")
  ds = ds.map(_Tokenize(tokenizer, bos, eos, formatter))
  it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), _Pieces(int(seq_len)))
  lengths = {"tokens": int(seq_len), "targets": int(seq_len), "weights": int(seq_len)}
  it = grain.experimental.FirstFitPackIterDataset(
    it, length_struct=lengths, num_packing_bins=max(int(batch_size), MIN_PACKING_ROWS),
    shuffle_bins=False,  # documents arrive shuffled already
    max_sequences_per_bin=None if pack else 1)  # padding is all zeros, as batch_and_pad's
  it = it.map(_row)
  it = it.batch(int(batch_size),
                batch_fn=functools.partial(grain.experimental.batch_and_pad,
                                           batch_size=int(batch_size)))
  return finish_batches(it, rows_of, num_workers)


def _special(tokenizer: Tokenizer, attr: str, flag: str) -> int:
  value = getattr(tokenizer, attr)
  if value is None:
    raise ZooError(f"the tokenizer has no {attr[:3].upper()} token: set data.{flag} = False")
  return int(value)


def data_pipeline(data_cfg: Any, tokenizer: Tokenizer, split: str, *, data_dir: str,
                  process_index: int = 0, process_count: int = 1, repeat: bool = True,
                  template_dir: str | None = None) -> grain.DatasetIterator:
  """Batches of `split` for this process; `data_cfg.batch_size` is the global batch size.
  With `data_cfg.format` "instruct", examples are formatted with the chat template found in
  `template_dir` (if it has one) and only the responses are trained on; "preference" gives
  batches of preference pairs (zoo.data.preference)."""
  if field(data_cfg, "format", "text") == "preference":  # pairs for DPO: [batch, 2, seq_len]
    return preference_pipeline(data_cfg, tokenizer, split, data_dir=data_dir,
                               process_index=process_index, process_count=process_count,
                               repeat=repeat, template_dir=template_dir)
  source = text_source(data_cfg, split, data_dir)
  formatter = None
  if field(data_cfg, "format", "text") == "instruct":
    formatter = InstructFormatter(tokenizer, template_dir,
                                  add_bos=field(data_cfg, "add_bos", True),
                                  add_eos=field(data_cfg, "add_eos", True))
  return make_batches(
    source, tokenizer, seq_len=field(data_cfg, "seq_len"),
    batch_size=local_batch_size(data_cfg, process_count),
    seed=field(data_cfg, "seed", 0), shuffle=field(data_cfg, "shuffle", True), repeat=repeat,
    process_index=process_index, process_count=process_count,
    add_bos=field(data_cfg, "add_bos", True), add_eos=field(data_cfg, "add_eos", True),
    pack=field(data_cfg, "pack", True), num_workers=field(data_cfg, "num_workers", 0),
    formatter=formatter, shard=field(data_cfg, "shard", "documents"))


def tokenizer_for(data_cfg: Any, data_dir: str) -> Tokenizer:
  """`data_cfg.tokenizer` loaded, or when empty a SentencePiece model of `data_cfg.vocab_size`
  trained on (the first few MB of) the train split and cached in `data_dir` for later runs."""
  path = field(data_cfg, "tokenizer", "")
  if path:
    return load_tokenizer(path)
  vocab_size = field(data_cfg, "vocab_size")
  if not isinstance(vocab_size, int) or vocab_size < 1:
    raise ZooError("data.tokenizer is empty and data.vocab_size is not a positive integer: "
                   "give a tokenizer path or a vocabulary size to train one")
  data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
  key = json.dumps([source_id(data_cfg, data_dir), vocab_size, TOKENIZER_SAMPLE_CHARS, "bpe-1"])
  model_path = os.path.join(
    data_dir, f"tokenizer-{hashlib.sha256(key.encode()).hexdigest()[:16]}.model")
  if os.path.isfile(model_path):
    return load_tokenizer(model_path)
  source = text_source(data_cfg, "train", data_dir)

  def sample():
    # The array_record files hold documents in a hashed order, so their head is a fair sample.
    left = TOKENIZER_SAMPLE_CHARS
    for i in range(len(source)):
      text = source[i]["text"]
      text = text.decode("utf-8") if isinstance(text, bytes) else text
      yield text[:left]
      left -= len(text)
      if left <= 0:
        return

  return train_sentencepiece(sample(), vocab_size, model_path)
