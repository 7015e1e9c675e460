"""Perplexity of a model on text: local files or a prepared TFDS dataset."""

from __future__ import annotations

import functools
import gzip
import lzma
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from zoo.data.pipeline import make_batches
from zoo.data.sources import match_files, read_documents, tfds_source
from zoo.errors import ZooError
from zoo.models.loss import loss_sums


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


def _eval_step(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  _, nll, weight = loss_sums(model(batch["tokens"], batch["positions"], batch["segment_ids"]),
                             batch)
  return nll, weight


def compressed_bits_per_byte(source) -> dict:
  """What general-purpose compressors make of the same documents, each compressed on its own:
  {"gzip": gzip -9, "xz": xz -9e} in bits per byte of UTF-8 text, the baselines a language
  model's bits per byte is read against."""
  texts = [source[i]["text"].encode("utf-8") for i in range(len(source))]
  total = max(sum(map(len, texts)), 1)
  return {
      "gzip": 8 * sum(len(gzip.compress(t, compresslevel=9, mtime=0)) for t in texts) / total,
      "xz": 8 * sum(len(lzma.compress(t, preset=9 | lzma.PRESET_EXTREME)) for t in texts) / total,
  }


def perplexity(model, tokenizer, source, *, seq_len: int, batch_size: int = 8,
               add_bos: bool = True, progress: bool = False) -> dict:
  """Mean per-token negative log-likelihood over every document of `source` (each starting
  with BOS when the tokenizer has one and add_bos), cut into rows of `seq_len` predictions,
  its exp (perplexity), and the same total in bits per byte of the documents' UTF-8 text,
  which does not depend on the tokenizer. Returns {"nll", "perplexity", "bits_per_byte",
  "tokens", "bytes", "documents"}."""
  if seq_len < 1 or batch_size < 1:
    raise ZooError("seq_len and batch_size must be positive")
  add_bos = add_bos and tokenizer.bos_id is not None
  batches = make_batches(source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0,
                         shuffle=False, repeat=False, add_bos=add_bos, add_eos=False,
                         pack=False)
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
  num_bytes = sum(len(source[i]["text"].encode("utf-8")) for i in range(len(source)))
  return {"nll": mean, "perplexity": math.exp(min(mean, 700.0)),
          "bits_per_byte": nll_sum / math.log(2) / max(num_bytes, 1), "tokens": int(count),
          "bytes": num_bytes, "documents": len(source)}


__all__ = ["compressed_bits_per_byte", "documents", "perplexity"]
