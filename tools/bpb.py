"""Bits per byte of a finished `zoo train` run on its held-out documents, against gzip and xz.

    python tools/bpb.py WORKDIR [WORKDIR ...] [--batch-size 8]

For each WORKDIR it reads the run's config from its newest checkpoint, opens the held-out
"validation" split of the dataset the run built (data.data_dir, default WORKDIR/data), and scores
every document with the exported model (WORKDIR/model) and its tokenizer the way `zoo eval` does
(zoo.infer.evaluate.perplexity): each document on its own, BOS first (as the run's data.add_bos
says), no EOS, pieces of the run's data.seq_len predictions. The model's bits per byte is the
summed negative log-likelihood / ln 2 / the documents' total UTF-8 bytes: the run's own eval_bpb
(the end-of-run summary's figure) is the same number when its eval covers the whole split
(train.eval_batches big enough; the summary says what it covered). gzip -9 and xz -9e compress
the same documents one at a time (headers included, as the command-line tools would file by
file); their bits per byte is the total compressed bits / the same total bytes.

Human-readable lines first; the last line is one JSON object per WORKDIR (a list when several).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import ml_collections

import zoo
from zoo.data.sources import text_source
from zoo.data.tokenizers import load_tokenizer
from zoo.errors import ZooError
from zoo.infer.evaluate import compressed_bits_per_byte, perplexity


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run trained with, from the metadata of its newest checkpoint."""
  metas = glob.glob(os.path.join(workdir, "checkpoints", "*", "meta", "metadata"))
  if not metas:
    raise ZooError(f"no checkpoint metadata under {workdir}/checkpoints")
  newest = max(metas, key=lambda p: int(p.split(os.sep)[-3]))
  with open(newest, encoding="utf-8") as f:
    meta = json.load(f)
  return ml_collections.ConfigDict(json.loads(meta["zoo_config"]))


def held_out_texts(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  data_dir = config.data.data_dir or os.path.join(workdir, "data")
  source = text_source(config.data, "validation", data_dir)
  texts = []
  for i in range(len(source)):
    text = source[i]["text"]
    texts.append(text.decode("utf-8") if isinstance(text, bytes) else text)
  return texts


def last_eval_loss(workdir: str):
  loss = None
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        if "eval_loss" in record:
          loss = record["eval_loss"]
  return loss


def measure(workdir: str, batch_size: int) -> dict:
  config = run_config(workdir)
  texts = held_out_texts(config, workdir)
  model_dir = os.path.join(workdir, "model")
  tokenizer = load_tokenizer(model_dir)
  # Bits per byte only measures compression if the tokenizer loses nothing.
  lossy = sum(tokenizer.decode(tokenizer.encode(t)) != t for t in texts)
  model = zoo.load(model_dir)
  documents = [{"text": t} for t in texts]
  scored = perplexity(model, tokenizer, documents, seq_len=config.data.seq_len,
                      batch_size=batch_size, add_bos=config.data.get("add_bos", True))
  # Each document compressed on its own, as `gzip -9 FILE` and `xz -9e FILE` would.
  baseline = compressed_bits_per_byte(documents)
  return {"workdir": workdir, "documents": len(texts), "bytes": scored["bytes"],
          "tokens": scored["tokens"], "bytes_per_token": scored["bytes"] / scored["tokens"],
          "nll": scored["nll"], "eval_loss": last_eval_loss(workdir),
          "bpb": scored["bits_per_byte"], "lossy_documents": lossy,
          "gzip9_bpb": baseline["gzip"], "xz9e_bpb": baseline["xz"]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--batch-size", type=int, default=8)
  args = parser.parse_args(argv)
  results = []
  for workdir in args.workdirs:
    r = measure(os.path.abspath(workdir), args.batch_size)
    print(f"{workdir}: {r['documents']} documents, {r['bytes']} bytes, {r['tokens']} tokens "
          f"({r['bytes_per_token']:.3f} bytes/token); nll {r['nll']:.4f} nats/token "
          f"(last eval_loss {r['eval_loss']}); model {r['bpb']:.4f} bpb, "
          f"gzip -9 {r['gzip9_bpb']:.4f}, xz -9e {r['xz9e_bpb']:.4f}"
          + (f"; {r['lossy_documents']} documents do not round-trip the tokenizer"
             if r["lossy_documents"] else ""))
    results.append(r)
  print(json.dumps(results[0] if len(results) == 1 else results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
