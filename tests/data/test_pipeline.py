"""The grain pipeline against a naive reference: packing, shifting, sharding, epochs, resume."""

from __future__ import annotations

import json
import os
import sysconfig
import types

import numpy as np
import pytest

from zoo.data import pipeline
from zoo.data.pipeline import data_pipeline, make_batches, tokenizer_for
from zoo.errors import ZooError
from zoo.models.loss import BATCH_DTYPES

SEQ, BATCH = 16, 4
KEYS = ("tokens", "targets", "positions", "segment_ids", "weights")


class CharTokenizer:
  """ids = code point + 3, so a reference needs no tokenizer library; 0 pad, 1 BOS, 2 EOS."""
  vocab_size = 0x110000 + 3
  bos_id, eos_id, pad_id = 1, 2, 0

  def encode(self, text):
    return [ord(c) + 3 for c in text]

  def decode(self, ids):
    return "".join(chr(i - 3) for i in ids if i >= 3)


TOK = CharTokenizer()


def documents(n=40, seed=0, max_len=40):
  rng = np.random.default_rng(seed)
  letters = list("abcdefghij é😀")
  return [{"text": f"{i}:" + "".join(rng.choice(letters, rng.integers(0, max_len)))}
          for i in range(n)]


def reference_pieces(docs, seq_len=SEQ, bos=True, eos=True):
  """(inputs, targets) of every piece, written the obvious way."""
  out = []
  for doc in docs:
    ids = ([1] if bos else []) + [ord(c) + 3 for c in doc["text"]] + ([2] if eos else [])
    inputs, targets = ids[:-1], ids[1:]
    for start in range(0, len(inputs), seq_len):
      out.append((tuple(inputs[start:start + seq_len]), tuple(targets[start:start + seq_len])))
  return out


def batch_pieces(batch):
  """The pieces in a batch, checking the per-piece invariants on the way."""
  pieces = []
  # The shapes and dtypes `zoo plan` compiles the train step for (zoo.models.loss.BATCH_DTYPES).
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
    k: ((BATCH, SEQ), np.dtype(dtype).name) for k, dtype in BATCH_DTYPES.items()}
  for r in range(BATCH):
    seg = batch["segment_ids"][r]
    ids = [s for s in seg if s]
    # segments 1, 2, ... each contiguous, padding (0) only at the end
    assert ids == sorted(ids) and set(ids) == set(range(1, len(set(ids)) + 1))
    assert not np.any(seg[len(ids):])
    pad = seg == 0
    assert np.all(batch["weights"][r][pad] == 0) and np.all(batch["tokens"][r][pad] == 0)
    for s in sorted(set(ids)):
      m = seg == s
      n = int(m.sum())
      np.testing.assert_array_equal(batch["positions"][r][m], np.arange(n))
      np.testing.assert_array_equal(batch["weights"][r][m], np.ones(n, np.float32))
      tokens, targets = batch["tokens"][r][m], batch["targets"][r][m]
      np.testing.assert_array_equal(tokens[1:], targets[:-1])  # shift within the piece only
      pieces.append((tuple(tokens.tolist()), tuple(targets.tolist())))
  return pieces


def test_packing_matches_reference():
  docs = documents()
  batches = list(make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=3, repeat=False))
  got = [p for b in batches for p in batch_pieces(b)]
  want = reference_pieces(docs)
  assert sorted(got) == sorted(want)
  # Rows hold several pieces: close to the fewest rows the tokens could fit in.
  rows = sum(int(np.any(b["segment_ids"], axis=1).sum()) for b in batches)
  fewest = -(-sum(len(t) for t, _ in want) // SEQ)
  assert fewest <= rows <= 1.1 * fewest < len(want)
  assert any(len(set(row) - {0}) >= 3 for b in batches for row in b["segment_ids"])


def test_unpacked_rows_in_order_and_no_bos_eos():
  docs = documents(n=12)
  for bos, eos in [(True, True), (False, True), (True, False)]:
    batches = make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=0, shuffle=False,
                           repeat=False, pack=False, add_bos=bos, add_eos=eos)
    got = [p for b in batches for p in batch_pieces(b)]
    assert got == reference_pieces(docs, bos=bos, eos=eos)


def first_texts(batch):
  """Decoded inputs of every row of an unpacked batch of short documents."""
  return [TOK.decode(row) for row, s in zip(batch["tokens"], batch["segment_ids"]) if s[0]]


def test_epochs_are_reshuffled():
  docs = documents(n=24, max_len=8)  # each fits in one row
  texts = sorted(d["text"] for d in docs)
  it = make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=7, pack=False)
  rows = [t for _ in range(3 * 24 // BATCH) for t in first_texts(next(it))]
  epochs = [rows[i * 24:(i + 1) * 24] for i in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == texts  # every document once per epoch
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != [d["text"] for d in docs]
  other = make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=8, pack=False)
  assert [t for _ in range(24 // BATCH) for t in first_texts(next(other))] != epochs[0]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("skip", [0, 3, 17])  # 17 batches run past the first epoch
def test_resume_from_state_is_exact(skip):
  docs = documents()
  make = lambda: make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=1)  # noqa: E731
  it = make()
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(6)]
  fresh = make()
  next(fresh)  # a fresh iterator that has moved on is rewound too
  fresh.set_state(state)
  assert_same_batches([next(fresh) for _ in range(6)], expected)


def test_resume_through_grain_orbax_handler(tmp_path):
  grain = pytest.importorskip("grain")
  pytest.importorskip("orbax.checkpoint")
  from etils import epath
  docs = documents()
  it = make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=2)
  for _ in range(5):
    next(it)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  expected = [next(it) for _ in range(4)]
  fresh = make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=2)
  fresh = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(fresh))
  assert_same_batches([next(fresh) for _ in range(4)], expected)


def test_processes_read_disjoint_documents():
  docs = documents(n=23, max_len=8)
  seen = []
  for index in range(2):
    it = make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=5, pack=False,
                      repeat=False, process_index=index, process_count=2)
    seen.append([t for b in it for t in first_texts(b)])
  assert len(seen[0]) == 12 and len(seen[1]) == 11
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(d["text"] for d in docs)


def test_repeat_false_is_one_padded_pass():
  docs = documents(n=9)
  batches = list(make_batches(docs, TOK, seq_len=SEQ, batch_size=BATCH, seed=0, repeat=False))
  want = reference_pieces(docs)
  assert sum(float(b["weights"].sum()) for b in batches) == sum(len(t) for _, t in want)
  assert not np.any(batches[-1]["segment_ids"][-1])  # the last batch ends in empty rows


def test_errors():
  docs = documents(n=4)
  no_bos = CharTokenizer()
  no_bos.bos_id = None
  cases = [
    (dict(source=[]), "no documents"),
    (dict(process_index=5, process_count=8), "gets no documents"),
    (dict(process_index=2, process_count=2), "process_index 2"),
    (dict(seq_len=0), "seq_len must be a positive integer"),
    (dict(batch_size=2.5), "batch_size must be a positive integer"),
    (dict(seed=-1), "seed"),
    (dict(tokenizer=no_bos), "no BOS token"),
  ]
  for overrides, message in cases:
    kw = {**dict(source=docs, tokenizer=TOK, seq_len=SEQ, batch_size=BATCH, seed=0), **overrides}
    with pytest.raises(ZooError, match=message):
      make_batches(kw.pop("source"), kw.pop("tokenizer"), **kw)


def test_data_pipeline_with_trained_tokenizer(tmp_path, monkeypatch):
  stdlib = sysconfig.get_paths()["stdlib"]
  cfg = types.SimpleNamespace(
    source="files", files=os.path.join(stdlib, "json", "*.py"), text_key="text",
    eval_fraction=0.2, tokenizer="", vocab_size=400, seq_len=32, batch_size=4, seed=0,
    shuffle=True, pack=True, add_bos=True, add_eos=True, num_workers=0)
  data_dir = str(tmp_path)
  tok = tokenizer_for(cfg, data_dir)
  assert tok.vocab_size == 400 and (tok.bos_id, tok.eos_id) == (1, 2)
  assert [f for f in os.listdir(data_dir) if f.startswith("tokenizer-")] == \
    [os.path.basename(tok.path)]

  def no_training(*args, **kwargs):
    raise AssertionError("trained again")
  monkeypatch.setattr(pipeline, "train_sentencepiece", no_training)
  assert tokenizer_for(cfg, data_dir).path == tok.path

  texts = []
  for name in os.listdir(os.path.join(stdlib, "json")):
    if name.endswith(".py"):
      with open(os.path.join(stdlib, "json", name), encoding="utf-8") as f:
        texts.append(f.read())
  it = data_pipeline(cfg, tok, "train", data_dir=data_dir, process_index=1, process_count=2)
  for _ in range(3):
    batch = next(it)
    assert batch["tokens"].shape == (2, 32)  # the per-process share of the global batch
    assert batch["tokens"].max() < tok.vocab_size
    pad = batch["segment_ids"] == 0
    assert not batch["tokens"][pad].any() and not batch["weights"][pad].any()
    starts = (batch["positions"] == 0) & (batch["tokens"] == tok.bos_id)
    for r, c in zip(*np.nonzero(starts)):  # a document's first piece decodes to its beginning
      seg = batch["segment_ids"][r] == batch["segment_ids"][r, c]
      head = tok.decode(batch["tokens"][r][seg][1:])
      assert any(t.startswith(head) for t in texts), head
  with pytest.raises(ZooError, match="not divisible"):
    data_pipeline(cfg, tok, "train", data_dir=data_dir, process_count=3)
  cfg.tokenizer = str(tmp_path / "missing.model")
  with pytest.raises(ZooError, match="not found"):
    tokenizer_for(cfg, data_dir)


def test_worker_processes_match_in_process():
  docs = documents()
  kw = dict(seq_len=SEQ, batch_size=BATCH, seed=4)
  expected = [next(it) for it in [make_batches(docs, TOK, **kw)] for _ in range(8)]
  it = make_batches(docs, TOK, num_workers=1, **kw)
  got = [next(it) for _ in range(5)]
  state = it.get_state()
  got += [next(it) for _ in range(3)]
  assert_same_batches(got, expected)
  it.set_state(state)
  assert_same_batches([next(it) for _ in range(3)], expected[5:])
  it.close()
