"""Tokenizers against the libraries and files they stand for: sentencepiece, transformers,
tiktoken, tokenizers."""

from __future__ import annotations

import base64
import json
import os
import sysconfig

import pytest
import sentencepiece as spm
import tiktoken

from zoo.data.tokenizers import (HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                                 Tokenizer, load_tokenizer, token_bytes, train_sentencepiece)
from zoo.errors import ZooError

STDLIB = sysconfig.get_paths()["stdlib"]
UNICODE = ("naïve café, Grüße, 東京タワー, привет, emoji 😀🎉👩‍💻 "
           "and tabs\tand  double spaces\n")
SAMPLES = [
  "Hello world",
  "def f(x):\n    return x ** 2  # square\n\n\n",
  UNICODE,
  "  leading spaces and trailing   ",
  "digits 1234567890 and <|begin_of_text|> and <s> as plain text",
  "",
]


def corpus() -> list[str]:
  texts = []
  for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py"):
    with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
      texts.append(f.read())
  return texts + [UNICODE * 20]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
  train_sentencepiece(iter(corpus()), 700, str(path))
  return str(path)


def test_trained_sentencepiece_matches_raw_processor(sp_path):
  tok = load_tokenizer(sp_path)
  raw = spm.SentencePieceProcessor(model_file=sp_path)
  assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
  assert tok.vocab_size == raw.get_piece_size() == 700
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  assert [raw.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
  for text in SAMPLES + corpus():
    ids = tok.encode(text)
    assert ids == raw.encode(text)
    assert tok.decode(ids) == text  # verbatim: no normalization, no dummy prefix
  # byte fallback: characters never seen in training still encode, as UTF-8 bytes
  assert "<0xF0>" in [raw.id_to_piece(i) for i in tok.encode("🦙")]
  assert not [n for n in os.listdir(os.path.dirname(sp_path)) if n.endswith(".tmp")]


def test_sentencepiece_matches_transformers(sp_path, tmp_path):
  transformers = pytest.importorskip("transformers")
  # Our own model, and one with LLaMA's settings (dummy prefix), through transformers' converter.
  llama_dir = tmp_path / "llama"
  llama_dir.mkdir()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus()), model_prefix=str(llama_dir / "tokenizer"), vocab_size=600,
    model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    max_sentence_length=100_000, minloglevel=2)
  for directory, cls in [(os.path.dirname(sp_path), transformers.AutoTokenizer),
                         (str(llama_dir), transformers.LlamaTokenizer)]:
    ours = load_tokenizer(directory)
    hf = cls.from_pretrained(directory)
    assert ours.bos_id == hf.bos_token_id == 1 and ours.eos_id == hf.eos_token_id == 2
    for text in SAMPLES[:3] + corpus()[:2]:
      assert ours.encode(text) == hf.encode(text, add_special_tokens=False), (directory, text)


def test_train_sentencepiece_errors(tmp_path):
  with pytest.raises(ZooError, match="SentencePiece training failed"):
    train_sentencepiece(corpus(), 100, str(tmp_path / "small.model"))  # < 256 bytes + chars
  assert not os.listdir(tmp_path)


def llama3_reference_specials() -> list[str]:
  # Written out from Meta's llama3 tokenizer.py, independently of zoo's table.
  named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
           7: "<|end_header_id|>", 9: "<|eot_id|>"}
  out, reserved = [], 0
  for i in range(256):
    if i in named:
      out.append(named[i])
    else:
      out.append(f"<|reserved_special_token_{reserved}|>")
      reserved += 1
  return out


LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory):
  from tiktoken import _educational
  ranks = _educational.bpe_train("".join(corpus())[:6000], 330, LLAMA3_PAT, visualise=None)
  path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
  with open(path, "wb") as f:
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
      f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
  return str(path)


def reference_encoding(path, monkeypatch):
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file, never a cached copy
  from tiktoken.load import load_tiktoken_bpe
  ranks = load_tiktoken_bpe(path)
  specials = {t: len(ranks) + i for i, t in enumerate(llama3_reference_specials())}
  return tiktoken.Encoding("ref", pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                           special_tokens=specials), ranks


def test_tiktoken_matches_tiktoken(tiktoken_path, monkeypatch):
  ref, ranks = reference_encoding(tiktoken_path, monkeypatch)
  n = len(ranks)
  tok = load_tokenizer(tiktoken_path)  # sentencepiece rejects it, so it is read as tiktoken
  assert isinstance(tok, TiktokenTokenizer)
  assert n == 330 and tok.vocab_size == ref.n_vocab == 330 + 256
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (330, 331, None)
  for name, offset in [("<|begin_of_text|>", 0), ("<|end_of_text|>", 1),
                       ("<|reserved_special_token_3|>", 5), ("<|start_header_id|>", 6),
                       ("<|end_header_id|>", 7), ("<|reserved_special_token_4|>", 8),
                       ("<|eot_id|>", 9), ("<|reserved_special_token_5|>", 10),
                       ("<|reserved_special_token_250|>", 255)]:
    assert tok.special_tokens[name] == n + offset
    assert ref.encode(name, allowed_special="all") == [n + offset]
  for text in SAMPLES + corpus():
    ids = tok.encode(text)
    assert ids == ref.encode(text, disallowed_special=())  # special-token text stays text
    assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == \
    "<|begin_of_text|>hi<|end_of_text|>"


def test_tiktoken_cuts_long_runs_like_meta(tiktoken_path, monkeypatch):
  ref, ranks = reference_encoding(tiktoken_path, monkeypatch)

  def meta_pieces(s, limit=25_000):  # Meta's character loop, kept naive as a reference
    start, run, space = 0, 0, s[0].isspace()
    for i, c in enumerate(s):
      if space ^ c.isspace():
        run, space = 1, c.isspace()
      else:
        run += 1
        if run > limit:
          yield s[start:i]
          start, run = i, 1
    yield s[start:]

  # A run of one merged pair after an odd letter: the 25000-character cut splits a pair.
  pair = next(t for t in sorted(ranks, key=ranks.get)
              if len(t) == 2 and t.isalpha()).decode()
  text = "x = 1\nz" + pair * 30_000 + " " * 26_000 + "tail"
  expected = [i for piece in meta_pieces(text) for i in ref.encode_ordinary(piece)]
  tok = load_tokenizer(tiktoken_path)
  assert tok.encode(text) == expected
  assert expected != ref.encode_ordinary(text)  # the cut does change ids: the test can fail
  assert tok.decode(expected) == text


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus(), trainer)
  directory = tmp_path_factory.mktemp("hf")
  tok.save(str(directory / "tokenizer.json"))
  return directory


def test_hf_tokenizer_json_matches_transformers(hf_dir):
  transformers = pytest.importorskip("transformers")
  path = str(hf_dir / "tokenizer.json")
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  tok = load_tokenizer(path)
  assert isinstance(tok, HFTokenizer)
  assert tok.vocab_size == len(ref) == 500
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, None)  # no tokenizer_config.json
  for text in SAMPLES + corpus():
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_hf_special_ids_from_tokenizer_config(hf_dir, sp_path):
  (hf_dir / "tokenizer_config.json").write_text(json.dumps(
    {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": None}))
  os.link(sp_path, hf_dir / "tokenizer.model")  # tokenizer.json wins over tokenizer.model
  try:
    tok = load_tokenizer(str(hf_dir))
  finally:
    os.unlink(hf_dir / "tokenizer_config.json")
    os.unlink(hf_dir / "tokenizer.model")
  assert isinstance(tok, HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)


def test_bad_tokenizer_files(tmp_path, tiktoken_path):
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(os.urandom(2000))
  gappy = tmp_path / "gappy.model"
  gappy.write_bytes(b"".join(base64.b64encode(bytes([i])) + b" %d\n" % (2 * i)
                             for i in range(256)))
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text("{not json")
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  cases = [(garbage, "unknown tokenizer format"), (gappy, "without gaps"),
           (bad_json, "bad tokenizer.json"), (empty_dir, "no tokenizer.json or tokenizer.model"),
           (tmp_path / "missing.model", "not found")]
  for path, message in cases:
    with pytest.raises(ZooError, match=message):
      load_tokenizer(str(path))


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "hf"])
def test_token_bytes_add_up_to_the_text(kind, sp_path, tiktoken_path, hf_dir):
  """The bytes per token (the denominator of bits per byte) add up, over any text's tokens, to
  the UTF-8 bytes of the text the tokenizer's own decoder gives back (SentencePiece: plus the
  space it puts before the text when the model adds a dummy prefix)."""
  tok = {"sentencepiece": lambda: SentencePieceTokenizer(open(sp_path, "rb").read(), sp_path),
         "tiktoken": lambda: load_tokenizer(tiktoken_path),
         "hf": lambda: load_tokenizer(str(hf_dir / "tokenizer.json"))}[kind]()
  table = token_bytes(tok)
  assert table.shape == (tok.vocab_size,)
  for special in (tok.bos_id, tok.eos_id):
    if special is not None:
      assert table[special] == 0
  for text in [*SAMPLES, *corpus()]:
    if kind == "hf" and "<s>" in text:
      continue  # tokenizer.json turns "<s>" into the special id, a control token of 0 bytes
    ids = tok.encode(text)
    decoded = tok.decode(ids).encode("utf-8")
    if kind != "sentencepiece":
      assert decoded == text.encode("utf-8")
    prefix = 0
    if kind == "sentencepiece" and ids:
      first = spm.SentencePieceProcessor(model_file=sp_path).id_to_piece(ids[0])
      prefix = int(first.startswith("\u2581") and not text.startswith(" "))
    assert int(table[ids].sum()) == len(decoded) + prefix, text[:40]
