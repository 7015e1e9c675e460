"""Perplexity and bits per byte of a model on text (local files or a prepared TFDS dataset),
each document scored on its own: `zoo eval`, tools/bpb.py and a training run's eval."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import lzma
import math
import os
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from zoo.data.sources import field, match_files, read_documents, text_source, tfds_source
from zoo.errors import ZooError
from zoo.models.loss import BATCH_DTYPES, loss_sums


TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".py", ".md", ".text")


def documents(data: str, *, split: str = "validation", data_dir: str | None = None,
              text_key: str = "text"):
  """A random-access source of {"text": ...} records: the documents of local files (globs,
  comma-separated: whole .txt/.py files, one per JSON line of .jsonl) or of a prepared TFDS
  dataset `data` (e.g. "my_text:1.0.0", split `split`, in `data_dir`)."""
  patterns = [p.strip() for p in data.split(",") if p.strip()]
  if not patterns:
    raise ZooError("--data is empty")
  local = all(os.path.exists(os.path.expanduser(p)) or any(c in p for c in "*?[")
              or p.startswith(("/", ".", "~")) or os.path.splitext(p)[1] in TEXT_SUFFIXES
              for p in patterns)
  if local:
    records = []
    for path in match_files(data):
      records.extend({"text": text} for _, text in read_documents(path, path, text_key))
    if not records:
      raise ZooError(f"no text in {data}")
    return records
  data_dir = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))
  return tfds_source(data, split, os.path.abspath(data_dir), text_key)


@dataclasses.dataclass
class Coverage:
  """What `document_batches` has put into batches so far: whole documents, their UTF-8 bytes,
  and the tokens predicted in them."""
  documents: int = 0
  bytes: int = 0
  tokens: int = 0


def _text(record) -> str:
  text = record["text"]
  return text.decode("utf-8") if isinstance(text, bytes) else text


def packable(model_config, seq_len: int) -> bool:
  """Whether documents may share a row without changing what the model predicts: always, but
  for chunked attention (Llama 4) with chunks shorter than the row, since its chunks count
  from the row's start, not the document's."""
  chunk = getattr(model_config, "attention_chunk_size", None)
  types = getattr(model_config, "layer_types", None) or ()
  return not (chunk and "chunked_attention" in types and chunk < seq_len)


def document_batches(source, tokenizer, *, seq_len: int, batch_size: int, add_bos: bool = True,
                     pack: bool = True, indices: Iterable[int] | None = None,
                     max_rows: int | None = None, coverage: Coverage | None = None
                     ) -> Iterator[dict]:
  """Batches (numpy, zoo.models.loss.BATCH_DTYPES, [batch_size, seq_len]) that score whole
  documents of `source` (records with a "text" field), in order (`indices`: which records;
  default all): each document is [BOS] + encode(text) (BOS when add_bos and the tokenizer has
  one; no EOS: the text's end is not part of the text), cut into pieces of at most seq_len
  predictions, each piece its own segment with positions from 0, so that no prediction sees
  another document or another piece. `pack`: pieces share rows (each row filled in turn),
  else one piece per row. The last batch is padded with empty rows (weights 0).

  `max_rows`: stop before the first document whose pieces would not fit in that many rows
  (the first document is always scored). `coverage` counts what went into the batches: the
  documents, their UTF-8 bytes (the denominator of bits per byte) and the predicted tokens."""
  if seq_len < 1 or batch_size < 1:
    raise ZooError("seq_len and batch_size must be positive")
  bos = tokenizer.bos_id if add_bos else None
  coverage = Coverage() if coverage is None else coverage
  fields = {k: np.zeros((batch_size, seq_len), np.dtype(v)) for k, v in BATCH_DTYPES.items()}
  batch = {k: v.copy() for k, v in fields.items()}
  rows = fill = 0  # rows started (the last one being filled) and its tokens
  segments = 0  # segments in the row being filled
  for i in (range(len(source)) if indices is None else indices):
    text = _text(source[i])
    ids = tokenizer.encode(text)
    if bos is not None:
      ids = [bos, *ids]
    ids = np.asarray(ids, np.int32)
    pieces = [(ids[:-1][s:s + seq_len], ids[1:][s:s + seq_len])
              for s in range(0, len(ids) - 1, seq_len)]
    # Where the document's pieces go: (row, column) of each, rows counted from the start.
    places, r, f = [], rows, fill
    for inputs, _ in pieces:
      if r == 0 or not pack or f + len(inputs) > seq_len:
        r, f = r + 1, 0
      places.append((r - 1, f))
      f += len(inputs)
    if max_rows is not None and coverage.documents and r > max_rows:
      break
    for (row, column), (inputs, targets) in zip(places, pieces):
      if row // batch_size > (rows - 1) // batch_size and rows:  # the batch before is full
        yield batch
        batch = {k: v.copy() for k, v in fields.items()}
      if row != rows - 1:
        rows, segments = row + 1, 0
      segments += 1
      b, span = row % batch_size, slice(column, column + len(inputs))
      batch["tokens"][b, span] = inputs
      batch["targets"][b, span] = targets
      batch["positions"][b, span] = np.arange(len(inputs))
      batch["segment_ids"][b, span] = segments
      batch["weights"][b, span] = 1.0
      fill = column + len(inputs)
    coverage.documents += 1
    coverage.bytes += len(text.encode("utf-8"))
    coverage.tokens += sum(len(t) for _, t in pieces)
  if rows:
    yield batch


def held_out_batches(data_cfg, tokenizer, model_config, data_dir: str, *, max_batches: int,
                     process_index: int = 0, process_count: int = 1,
                     coverage: Coverage | None = None) -> tuple[Iterator[dict], int]:
  """What a training run's eval scores (zoo.train.loop.evaluate): this process's documents of
  the run's validation split (i, i + n, ... for process i of n), laid out by `document_batches`
  as `zoo eval` lays them out (BOS as data.add_bos says), in batches of this process's
  data.batch_size / n rows of data.seq_len, as many whole documents as max_batches batches
  hold. Returns (the batches, how many documents the split has)."""
  source = text_source(data_cfg, "validation", data_dir)
  rows, seq_len = data_cfg.batch_size // process_count, data_cfg.seq_len
  batches = document_batches(
      source, tokenizer, seq_len=seq_len, batch_size=rows,
      add_bos=field(data_cfg, "add_bos", True), pack=packable(model_config, seq_len),
      indices=range(process_index, len(source), process_count), max_rows=max_batches * rows,
      coverage=coverage)
  return batches, len(source)


def empty_batch(rows: int, seq_len: int) -> dict:
  """A batch with nothing to score (weights 0), for a process whose documents have run out."""
  return {k: np.zeros((rows, seq_len), np.dtype(v)) for k, v in BATCH_DTYPES.items()}


def _eval_step(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  _, nll, weight = loss_sums(model(batch["tokens"], batch["positions"], batch["segment_ids"]),
                             batch)
  return nll, weight


def compressed_bits_per_byte(source) -> dict:
  """What general-purpose compressors make of the same documents, each compressed on its own:
  {"gzip": gzip -9, "xz": xz -9e} in bits per byte of UTF-8 text, the baselines a language
  model's bits per byte is read against."""
  texts = [_text(source[i]).encode("utf-8") for i in range(len(source))]
  total = max(sum(map(len, texts)), 1)
  return {
      "gzip": 8 * sum(len(gzip.compress(t, compresslevel=9, mtime=0)) for t in texts) / total,
      "xz": 8 * sum(len(lzma.compress(t, preset=9 | lzma.PRESET_EXTREME)) for t in texts) / total,
  }


def perplexity(model, tokenizer, source, *, seq_len: int, batch_size: int = 8,
               add_bos: bool = True, progress: bool = False) -> dict:
  """Mean per-token negative log-likelihood over every document of `source`, each scored on
  its own as `document_batches` lays it out (BOS first when the tokenizer has one and
  add_bos, no EOS, pieces of `seq_len` predictions), its exp (perplexity), and the same total
  in bits per byte of the documents' UTF-8 text (summed nats / ln 2 / their bytes), which does
  not depend on the tokenizer. `zoo eval`, tools/bpb.py and the training loop's eval
  (zoo.train.loop.evaluate) all compute it this way. Returns {"nll", "perplexity",
  "bits_per_byte", "tokens", "bytes", "documents"}."""
  coverage = Coverage()
  batches = document_batches(source, tokenizer, seq_len=seq_len, batch_size=batch_size,
                             add_bos=add_bos, pack=packable(model.config, seq_len),
                             coverage=coverage)
  graphdef, state = nnx.split(model)
  step = jax.jit(functools.partial(_eval_step, graphdef))
  params = nnx.to_pure_dict(state)
  nll_sum, count = 0.0, 0.0
  bar = None
  if progress:
    bar = tqdm(unit=" tokens", desc="eval", dynamic_ncols=True)
  for batch in batches:
    nll, weight = step(params, {k: jnp.asarray(v) for k, v in batch.items()})
    nll_sum += float(nll)
    count += float(weight)
    if bar is not None:
      bar.update(int(weight))
      bar.set_postfix(nll=f"{nll_sum / max(count, 1):.4f}")
  if bar is not None:
    bar.close()
  if count == 0:
    raise ZooError("the data has no token to predict (every document is one token long)")
  mean = nll_sum / count
  return {"nll": mean, "perplexity": math.exp(min(mean, 700.0)),
          "bits_per_byte": nll_sum / math.log(2) / max(coverage.bytes, 1), "tokens": int(count),
          "bytes": coverage.bytes, "documents": coverage.documents}


__all__ = ["Coverage", "compressed_bits_per_byte", "document_batches", "documents", "empty_batch",
           "held_out_batches", "packable", "perplexity"]
