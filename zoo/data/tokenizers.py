"""Tokenizers behind one small interface: SentencePiece, LLaMA 3 tiktoken BPE, HF tokenizer.json.

`encode` never adds BOS/EOS and never turns special-token text found in a document into control
ids (except HF tokenizer.json files, which do as transformers does); the data pipeline adds BOS/EOS.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
import tiktoken
import tokenizers

from zoo import paths
from zoo.errors import ZooError
from zoo.io import staged_file


@runtime_checkable
class Tokenizer(Protocol):
  """What training and generation need from a tokenizer."""
  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS/EOS."""
    ...

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; special tokens keep their text where the format has one."""
    ...


SP_SPACE = "\u2581"  # how SentencePiece spells a space inside a piece


def byte_level_alphabet() -> list[str]:
  """The character byte-level BPE writes for each byte 0..255: printable Latin-1 characters
  stand for themselves, the other bytes for the code points from 256 up, in order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  out, extra = [], 0
  for b in range(256):
    if b in printable:
      out.append(chr(b))
    else:
      out.append(chr(256 + extra))
      extra += 1
  return out


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
  """[vocab_size] int32: how many bytes of UTF-8 text each token stands for (0 for control
  and special tokens), the denominator of bits per byte. A token that is part of a character
  counts its own bytes."""
  if hasattr(tokenizer, "token_bytes"):
    return tokenizer.token_bytes()
  return np.array([len(tokenizer.decode([i]).encode("utf-8"))
                   for i in range(tokenizer.vocab_size)], np.int32)


class SentencePieceTokenizer:
  """A SentencePiece model file (LLaMA 1/2, Mistral, TinyLlama, CodeLlama, or our own)."""

  def __init__(self, model_proto: bytes, path: str | None = None):
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except RuntimeError as e:
      raise ZooError(f"not a SentencePiece model: {path}: {_first_line(e)}") from None
    self.vocab_size = self._sp.get_piece_size()
    # SentencePiece reports an undefined special id as -1.
    self.bos_id, self.eos_id, self.pad_id = (
      i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()))

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    sp = self._sp
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.is_byte(i):
        out[i] = 1
      elif not (sp.is_control(i) or sp.is_unknown(i)):
        out[i] = len(sp.id_to_piece(i).replace(SP_SPACE, " ").encode("utf-8"))
    return out

  def __repr__(self):
    return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


# Meta's llama3 tokenizer: the split regex and the 256 special tokens placed after the BPE ranks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
LLAMA3_SPECIAL_TOKENS = (
  ["<|begin_of_text|>", "<|end_of_text|>"]
  + [f"<|reserved_special_token_{i}|>" for i in range(4)]
  + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
  + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_SPECIAL - 5)])
assert len(LLAMA3_SPECIAL_TOKENS) == LLAMA3_NUM_SPECIAL

# tiktoken's BPE is quadratic in the length of one pre-tokenized piece; Meta's tokenizer cuts text
# into 400k-character chunks and cuts runs of (non-)whitespace longer than 25k, and so do we.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_MAX_RUN_CHARS + 1, _MAX_RUN_CHARS + 1))


def _cut_long_runs(text: str) -> Iterator[str]:
  start = 0
  for run in _LONG_RUN.finditer(text):
    for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
      yield text[start:cut]
      start = cut
  yield text[start:]


class TiktokenTokenizer:
  """A tiktoken BPE rank file in the LLaMA 3 `tokenizer.model` format, with LLaMA 3's specials."""

  def __init__(self, ranks: dict[bytes, int], path: str | None = None):
    self.path = path
    num_base = len(ranks)
    specials = {tok: num_base + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
    try:
      self._enc = tiktoken.Encoding(name=os.path.basename(path or "tiktoken"),
                                    pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                    special_tokens=specials)
    except ValueError as e:
      raise ZooError(f"bad tiktoken BPE file: {path}: {_first_line(e)}") from None
    self.vocab_size = self._enc.n_vocab
    self.special_tokens = specials
    self.bos_id = specials["<|begin_of_text|>"]
    self.eos_id = specials["<|end_of_text|>"]
    self.pad_id = None

  def encode(self, text: str) -> list[int]:
    ids = []
    for i in range(0, len(text), _MAX_ENCODE_CHARS):
      for piece in _cut_long_runs(text[i:i + _MAX_ENCODE_CHARS]):
        ids.extend(self._enc.encode_ordinary(piece))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._enc.decode([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    specials = set(self.special_tokens.values())
    return np.array([0 if i in specials else len(self._enc.decode_single_token_bytes(i))
                     for i in range(self.vocab_size)], np.int32)

  def __repr__(self):
    return f"TiktokenTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def parse_tiktoken_ranks(data: bytes, path: str | None = None) -> dict[bytes, int]:
  """Parses `base64-token rank` lines.

  Written out rather than `tiktoken.load.load_tiktoken_bpe`, which caches files by path name in a
  temporary directory and would hand back stale ranks for a file rewritten at the same path.
  """
  ranks = {}
  try:
    for line in data.splitlines():
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
  except (ValueError, binascii.Error):
    raise ZooError(f"unknown tokenizer format (neither SentencePiece nor tiktoken BPE): {path}"
                   ) from None
  if not ranks:
    raise ZooError(f"empty tokenizer file: {path}")
  # The special tokens go right after the ranks, so the ranks must be exactly 0..n-1.
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ZooError(f"tiktoken BPE ranks are not 0..{len(ranks) - 1} without gaps: {path}")
  return ranks


class HFTokenizer:
  """An HF `tokenizer.json`, read with the `tokenizers` library."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
      raise ZooError(f"bad tokenizer.json: {path}: {_first_line(e)}") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    config = _read_json(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    self.bos_id, self.eos_id, self.pad_id = (
      self._special_id(config.get(name)) for name in ("bos_token", "eos_token", "pad_token"))

  def _special_id(self, token) -> int | None:
    if isinstance(token, dict):  # an AddedToken written out as {"content": ..., ...}
      token = token.get("content")
    return self._tok.token_to_id(token) if isinstance(token, str) else None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    # Byte-level BPE (LLaMA 3, Qwen2) spells each byte as one printable character; other
    # models spell a space as SP_SPACE and unknown bytes as <0xNN> pieces.
    chars = {c: b for b, c in enumerate(byte_level_alphabet())}
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      token = self._tok.id_to_token(i)
      if token is None or i in specials:
        continue
      if all(c in chars for c in token):
        out[i] = len(token)
      elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        out[i] = 1
      else:
        out[i] = len(token.replace(SP_SPACE, " ").encode("utf-8"))
    return out

  def __repr__(self):
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
  """A tokenizer from a file, or from a checkpoint directory's tokenizer.json or tokenizer.model.

  A `.json` file is an HF tokenizer; any other file is SentencePiece if sentencepiece accepts
  it, else a tiktoken BPE rank file.
  """
  path = os.path.expanduser(paths.localize(str(path)))  # a gs:// one is downloaded first
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise ZooError(f"no tokenizer.json or tokenizer.model in {path}")
  if not os.path.isfile(path):
    raise ZooError(f"tokenizer file not found: {path}")
  if path.endswith(".json"):
    return HFTokenizer(path)
  with open(path, "rb") as f:
    data = f.read()
  try:
    return SentencePieceTokenizer(data, path)
  except ZooError:
    return TiktokenTokenizer(parse_tiktoken_ranks(data, path), path)


# Lines of code run to a few hundred characters; training sentences are runs of whole lines cut at
# this many characters, and SentencePiece's byte limit allows 4 bytes for each.
_SENTENCE_CHARS = 1024


def _sentences(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
      while len(line) > _SENTENCE_CHARS:
        yield line[:_SENTENCE_CHARS]
        line = line[_SENTENCE_CHARS:]
      if size + len(line) > _SENTENCE_CHARS:
        yield "".join(buf)
        buf, size = [], 0
      buf.append(line)
      size += len(line)
    if buf:
      yield "".join(buf)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_path: str) -> Tokenizer:
  """Trains a byte-fallback BPE SentencePiece model on `texts` and writes it to `model_path`.

  Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>. Text is kept verbatim (no normalization, no
  whitespace folding, no dummy prefix) so that decode(encode(x)) == x holds for code. On a small
  corpus the vocabulary may come out smaller than `vocab_size`.
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_sentences(texts), model_writer=model, vocab_size=int(vocab_size),
      model_type="bpe", byte_fallback=True, character_coverage=0.9995,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
      unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      # A sample of at most 50k sentences (~50 MB) keeps training to seconds.
      input_sentence_size=50_000, shuffle_input_sentence=True,
      max_sentence_length=4 * _SENTENCE_CHARS, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ZooError(f"SentencePiece training failed: {_last_line(e)}") from None
  model_path = os.path.abspath(os.path.expanduser(model_path))
  os.makedirs(os.path.dirname(model_path), exist_ok=True)
  with staged_file(model_path, force=True) as tmp:  # readers never see a half-written model
    with open(tmp, "wb") as f:
      f.write(model.getvalue())
  return SentencePieceTokenizer(model.getvalue(), model_path)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ZooError(f"bad JSON in {path}: {e}") from None
  return data if isinstance(data, dict) else {}


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _last_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[-1]
