"""Held-out scoring (zoo.infer.evaluate): every document scored on its own, whole, once; bits
per byte over the documents' UTF-8 bytes, the same packed or one piece per row."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx

from zoo.infer.evaluate import Coverage, document_batches, packable, perplexity
from zoo.models.llama import Llama
from zoo.models.loss import BATCH_DTYPES
from zoo.models.presets import get_preset

SEQ, BATCH = 8, 3


class CharTokenizer:
  """ids = code point % 250 + 3: 0 pad, 1 BOS, 2 EOS (never emitted here)."""
  vocab_size = 256
  bos_id, eos_id, pad_id = 1, 2, 0

  def encode(self, text):
    return [ord(c) % 250 + 3 for c in text]


TOK = CharTokenizer()
# Empty, one character, exactly a row, longer than a row, several rows, multi-byte UTF-8.
TEXTS = ["", "a", "abcdefg", "abcdefghij", "0123456789" * 3, "é😀x", "hello world"]
SOURCE = [{"text": t} for t in TEXTS]


def pieces_by_document(batches, texts):
  """Each (row, segment) of the batches as (tokens, targets, positions), in order."""
  found = []
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((BATCH, SEQ), np.dtype(d)) for k, d in BATCH_DTYPES.items()}
    for r in range(BATCH):
      seg, w = batch["segment_ids"][r], batch["weights"][r]
      assert np.array_equal(w > 0, seg > 0)  # padding: segment 0, weight 0
      for s in sorted(set(seg[seg > 0])):
        m = seg == s
        found.append((batch["tokens"][r][m], batch["targets"][r][m], batch["positions"][r][m]))
  return found


@pytest.mark.parametrize("pack", [True, False])
def test_every_document_is_predicted_once_after_bos_without_eos(pack):
  coverage = Coverage()
  batches = list(document_batches(SOURCE, TOK, seq_len=SEQ, batch_size=BATCH, pack=pack,
                                  coverage=coverage))
  pieces = pieces_by_document(batches, TEXTS)
  expected = []
  for text in TEXTS:
    ids = [TOK.bos_id, *TOK.encode(text)]
    for s in range(0, len(ids) - 1, SEQ):
      expected.append((ids[:-1][s:s + SEQ], ids[1:][s:s + SEQ]))
  assert [(list(t), list(g)) for t, g, _ in pieces] == expected
  assert all(list(p) == list(range(len(p))) for _, _, p in pieces)  # positions from 0
  assert (coverage.documents, coverage.tokens) == (len(TEXTS), sum(len(t) for t in TEXTS))
  assert coverage.bytes == sum(len(t.encode("utf-8")) for t in TEXTS)
  rows = sum(int((b["weights"].sum(1) > 0).sum()) for b in batches)
  assert rows == len(expected) if not pack else rows < len(expected)


def test_a_row_budget_takes_whole_documents_in_order():
  # 4 rows: "" (no prediction), "a" and "abcdefg" share row 0, "abcdefghij" takes rows 1
  # and 2 (8 + 2 predictions), and the 30 predictions of the next document would need 4 more
  # rows: it and everything after it are left out.
  coverage = Coverage()
  batches = list(document_batches(SOURCE, TOK, seq_len=SEQ, batch_size=BATCH, max_rows=4,
                                  coverage=coverage))
  assert coverage.documents == 4 and coverage.bytes == len("a" + "abcdefg" + "abcdefghij")
  targets = [list(t) for _, t, _ in pieces_by_document(batches, TEXTS)]
  assert targets == [TOK.encode("a"), TOK.encode("abcdefg"), TOK.encode("abcdefgh"),
                     TOK.encode("ij")]
  # the first document is scored whole whatever the budget
  coverage = Coverage()
  list(document_batches(SOURCE[4:], TOK, seq_len=SEQ, batch_size=BATCH, max_rows=1,
                        coverage=coverage))
  assert (coverage.documents, coverage.tokens) == (1, 30)


def test_chunked_attention_keeps_documents_in_rows_of_their_own():
  llama4 = get_preset("tiny_llama4")
  assert packable(get_preset("tiny_llama"), 4096)
  assert packable(llama4, llama4.attention_chunk_size)
  assert not packable(llama4, 2 * llama4.attention_chunk_size)


def test_bits_per_byte_is_each_documents_nats_over_its_bytes():
  # A random tiny model: the summed NLL of each document alone, from its logits.
  config = get_preset("tiny_llama", vocab_size=256)
  model = Llama(config, rngs=nnx.Rngs(0))
  nats = 0.0
  for text in TEXTS:
    ids = np.array([TOK.bos_id, *TOK.encode(text)])
    if len(ids) < 2:
      continue
    logp = np.asarray(model.logits(ids[None, :-1]), np.float64)[0]
    logp -= logp.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nats -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
  num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
  out = perplexity(model, TOK, SOURCE, seq_len=64, batch_size=2)
  assert (out["documents"], out["bytes"], out["tokens"]) == (len(TEXTS), num_bytes,
                                                             sum(map(len, TEXTS)))
  assert math.isclose(out["bits_per_byte"], nats / math.log(2) / num_bytes, rel_tol=1e-5)
