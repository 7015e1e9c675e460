"""Preference pairs for DPO: records, tokenization, truncation and batches.

A JSONL record is one of three layouts:

  {"prompt": str, "chosen": str, "rejected": str}             plain text
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                                                              HF's conversational layout
  {"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}
                                                              pre-tokenized, used as given

In the conversational layout `prompt` may be left out (or be a string, as in UltraFeedback):
the prompt is then the messages `chosen` and `rejected` share at their start, as TRL's
`extract_prompt` takes it. The messages are rendered with the checkpoint's chat template as
transformers' `apply_chat_template` renders them: the prompt with the generation prompt, the
prompt plus each completion without. Text and rendered conversations are tokenized as TRL's
DPOTrainer does it: the prompt alone and the prompt with each completion, the completion being
what follows the tokens they share; BOS goes before the prompt (data.add_bos) and, for plain
text, EOS after each completion (data.add_eos). Pre-tokenized records get neither and need no
tokenizer.

A pair's sequences are prompt + chosen and prompt + rejected, each at most seq_len + 1 ids (a
row of seq_len inputs and their next tokens). A pair that does not fit is cut as TRL's
DPOTrainer cut it (truncation_mode keep_end with max_prompt_length): the prompt to its last
`max_prompt_len` tokens, then, if still too long, both completions from the right to what is
left. `scan_pairs` counts how many prompts and completions were cut.

A batch holds `batch_size` pairs as [batch, 2, seq_len] arrays (index 0 the chosen sequence, 1
the rejected), with the keys of zoo.data's batches; the weights are 1 on the completion's
targets only, and padding is all zeros. The iterator is a grain `DatasetIterator` that resumes
bit-exactly from its state, as zoo.data.pipeline's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from zoo.data.chat import chat_template_dir, render_chat
from zoo.data.instruct import check_messages, encode_special
from zoo.data.sources import (ZooText, check_batch_args, field, finish_batches, json_lines,
                              local_batch_size, match_files, prepared_split, process_share,
                              rows_split, text_files)
from zoo.errors import ZooError

LAYOUTS = ("text", "messages", "ids")
IDS_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
LAYOUT_WORDS = ("a preference record needs 'prompt', 'chosen' and 'rejected' (strings, or "
                "chosen and rejected message lists), or 'prompt_ids', 'chosen_ids' and "
                "'rejected_ids'")


# --- records ----------------------------------------------------------------------------------

def extract_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
  """(prompt, chosen, rejected): the messages both start with, and what follows, as TRL's
  `extract_prompt` splits them (identical lists keep their last message as the completions)."""
  idx = 0
  for idx in range(min(len(chosen), len(rejected))):
    if chosen[idx] != rejected[idx]:
      break
  return chosen[:idx], chosen[idx:], rejected[idx:]


def check_pair(record, where: str) -> dict:
  """A preference record in one of the three layouts, normalized ({"prompt", "chosen",
  "rejected"} with strings or message lists, or the three id lists); a ZooError naming
  `where` if it is bad."""
  if not isinstance(record, dict):
    raise ZooError(f"{where}: not a JSON object")
  if any(k in record for k in IDS_KEYS):
    out = {}
    for key in IDS_KEYS:
      if key not in record:
        raise ZooError(f"{where}: no {key!r}; {LAYOUT_WORDS}")
      ids = record[key]
      if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                            and i >= 0 for i in ids)):
        raise ZooError(f"{where}: {key!r} is not a list of token ids (non-negative integers)")
      if not ids:
        raise ZooError(f"{where}: {key!r} is empty" + (
            "; the first completion token needs a token before it (a BOS)"
            if key == "prompt_ids" else ": an empty completion has nothing to compare"))
      out[key] = ids
    return out
  for key in ("chosen", "rejected"):
    if key not in record:
      raise ZooError(f"{where}: no {key!r}; {LAYOUT_WORDS}")
  chosen, rejected = record["chosen"], record["rejected"]
  if isinstance(chosen, str) and isinstance(rejected, str):
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
      raise ZooError(f"{where}: no 'prompt' string; {LAYOUT_WORDS}")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
      if not text:
        raise ZooError(f"{where}: {key!r} is empty: an empty completion has nothing to compare")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
  if isinstance(chosen, list) and isinstance(rejected, list):
    chosen = check_messages(chosen, where, "chosen")
    rejected = check_messages(rejected, where, "rejected")
    prompt = record.get("prompt")
    if isinstance(prompt, list):
      prompt = check_messages(prompt, where, "prompt")
    else:  # no prompt, or a string beside full conversations: the shared start is the prompt
      prompt, chosen, rejected = extract_prompt(chosen, rejected)
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
      if not any(m["content"] for m in messages):
        raise ZooError(f"{where}: {key!r} is empty: an empty completion has nothing to compare")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
  raise ZooError(f"{where}: 'chosen' and 'rejected' must both be strings or both message "
                 f"lists; {LAYOUT_WORDS}")


def layout_of(pair: dict) -> str:
  if "prompt_ids" in pair:
    return "ids"
  return "text" if isinstance(pair["chosen"], str) else "messages"


# --- tokens -----------------------------------------------------------------------------------

def _common_prefix(a: list, b: list) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


class PairEncoder:
  """A checked pair (`check_pair`) -> (prompt ids, chosen ids, rejected ids), untruncated."""

  def __init__(self, tokenizer, template_dir: str | None, *, add_bos: bool = True,
               add_eos: bool = True):
    self._tok = tokenizer
    self._template = chat_template_dir(template_dir) if tokenizer is not None else None
    self._bos = tokenizer.bos_id if (add_bos and tokenizer is not None) else None
    self._eos = tokenizer.eos_id if (add_eos and tokenizer is not None) else None

  def __call__(self, pair: dict) -> tuple[list[int], list[int], list[int]]:
    if "prompt_ids" in pair:
      return list(pair["prompt_ids"]), list(pair["chosen_ids"]), list(pair["rejected_ids"])
    if self._tok is None:
      raise ZooError("text pairs need a tokenizer, and there is none (init_from has none and "
                     "data.tokenizer is empty); give one, or pre-tokenized records")
    if isinstance(pair["chosen"], str):
      prompt = pair["prompt"]
      texts = (prompt, prompt + pair["chosen"], prompt + pair["rejected"])
      eos = [] if self._eos is None else [self._eos]
    else:
      if self._template is None:
        raise ZooError("chat messages need a chat template, and the tokenizer has none "
                       "(data.chat_template names a directory with one)")
      messages = pair["prompt"]
      texts = (render_chat(self._template, messages, add_generation_prompt=bool(messages)),
               render_chat(self._template, messages + pair["chosen"], False),
               render_chat(self._template, messages + pair["rejected"], False))
      eos = []  # the template ends each turn itself
    ids = [encode_special(self._tok, t) for t in texts]
    if self._bos is not None:
      ids = [i if i[:1] == [self._bos] else [self._bos, *i] for i in ids]
    p, pc, pr = ids
    # The completion starts where the prompt's ids and the prompt + completion's part (TRL):
    # where tokens merge across the boundary, the prompt's last token is left out.
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:] + eos, pr[n:] + eos


def prompt_budget(seq_len: int, max_prompt_len: int) -> int:
  """The prompt tokens a pair keeps when it does not fit: max_prompt_len, or by default half of
  seq_len; a ZooError when it leaves the completions no room."""
  budget = max_prompt_len or seq_len // 2
  if not isinstance(budget, int) or budget < 1 or budget > seq_len:
    raise ZooError(f"data.max_prompt_len {max_prompt_len} leaves no room for the completions in "
                   f"a row of data.seq_len {seq_len} tokens (it must be in 1..{seq_len})")
  return budget


def truncate_pair(prompt: list, chosen: list, rejected: list, seq_len: int, max_prompt: int
                  ) -> tuple[list, list, list, tuple[bool, bool, bool]]:
  """The pair cut to fit rows of seq_len (sequences of seq_len + 1 ids), as TRL cut it: if the
  prompt and the longer completion do not fit, the prompt keeps its last max_prompt tokens;
  if they still do not fit, both completions keep their first tokens up to the room left.
  Returns the pieces and (prompt cut, chosen cut, rejected cut)."""
  room = seq_len + 1
  longer = max(len(chosen), len(rejected))
  p, c, r = prompt, chosen, rejected
  if len(p) + longer > room:
    p = p[-max_prompt:]
  if len(p) + longer > room:
    c, r = c[:room - len(p)], r[:room - len(p)]
  return p, c, r, (len(p) < len(prompt), len(c) < len(chosen), len(r) < len(rejected))


def pair_rows(prompt: list, chosen: list, rejected: list, seq_len: int) -> dict:
  """The pair's two sequences as rows: {key: [2, seq_len]} (0: chosen, 1: rejected), inputs
  ids[:-1], targets ids[1:], weight 1 on the completion's targets, zeros after the sequence."""
  out = {"tokens": np.zeros((2, seq_len), np.int32), "targets": np.zeros((2, seq_len), np.int32),
         "positions": np.zeros((2, seq_len), np.int32),
         "segment_ids": np.zeros((2, seq_len), np.int32),
         "weights": np.zeros((2, seq_len), np.float32)}
  for row, completion in enumerate((chosen, rejected)):
    ids = np.asarray([*prompt, *completion], np.int32)
    n = len(ids) - 1
    if n > seq_len or not prompt or not completion:
      raise ZooError(f"a pair's sequence of {len(ids)} ids does not fit a row of {seq_len} "
                     "tokens (or has no prompt or completion token)")
    out["tokens"][row, :n] = ids[:-1]
    out["targets"][row, :n] = ids[1:]
    out["positions"][row, :n] = np.arange(n)
    out["segment_ids"][row, :n] = 1
    out["weights"][row, len(prompt) - 1:n] = 1.0
  return out


# --- the source -------------------------------------------------------------------------------

class ZooPreferences(ZooText, skip_registration=True):
  """JSONL preference records (one pair a line), checked as they are built and kept in the
  files' order (with data.shuffle False the batches follow it); split by id hash as ZooText."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Preference pairs from JSONL files, in file order."}
  code_path = pathlib.Path(__file__)
  IN_FILE_ORDER = True

  def _read(self, path: str, doc_id: str):
    if not path.endswith(".jsonl"):
      raise ZooError(f"data.format 'preference' reads JSONL files, not {path}")
    for lineno, record in json_lines(path):
      yield f"{doc_id}:{lineno}", json.dumps(check_pair(record, f"{path}:{lineno}"))


def preference_files(files: list[str], data_dir: str, *, eval_fraction: float = 0.05
                     ) -> ZooPreferences:
  """The (maybe not yet prepared) dataset of `files`, named by a hash of what it reads."""
  return text_files(files, data_dir, eval_fraction=eval_fraction, label="pairs",
                    fmt="preference", builder=ZooPreferences)


def preference_source(data_cfg: Any, split: str, data_dir: str):
  """A random-access source of {"text": a checked pair's JSON, "id": file:line} records of
  `split` ("train" or "validation"), built from data_cfg.files on first use."""
  if field(data_cfg, "source", "files") != "files":
    raise ZooError("data.format 'preference' reads JSONL files: set data.source to 'files' "
                   "and data.files to their globs")
  builder = preference_files(match_files(field(data_cfg, "files", "")),
                             os.path.abspath(os.path.expanduser(str(data_dir))),
                             eval_fraction=field(data_cfg, "eval_fraction", 0.05))
  return prepared_split(builder, split, "the preference pairs")


# --- checking every pair ----------------------------------------------------------------------

@dataclasses.dataclass
class PairStats:
  """What `scan_pairs` found in one split."""
  pairs: int = 0
  prompts_cut: int = 0
  completions_cut: int = 0  # chosen and rejected counted apart
  layouts: tuple[str, ...] = ()

  def words(self, split: str) -> str:
    return (f"{split}: {self.pairs} pairs; {self.prompts_cut} prompts cut from the left and "
            f"{self.completions_cut} completions cut from the right to fit")


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def scan_pairs(source, encoder: PairEncoder, *, seq_len: int, max_prompt: int,
               vocab_size: int | None = None) -> PairStats:
  """Tokenizes every pair of `source` as the pipeline will, with one-line errors naming the
  record (an empty completion, an id outside the vocabulary, text without a tokenizer), and
  counts the pairs cut to fit."""
  stats = PairStats()
  layouts = set()
  for i in range(len(source)):
    record = source[i]
    where = _text(record.get("id", str(i))) if isinstance(record, dict) else str(i)
    pair = json.loads(_text(record["text"]))
    layouts.add(layout_of(pair))
    try:
      p, c, r = encoder(pair)
    except ZooError as e:
      raise ZooError(f"{where}: {e}") from None
    for key, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
      if not ids:
        why = ("the first completion token needs a token before it: set data.add_bos or give "
               "a prompt") if key == "prompt" else "an empty completion has nothing to compare"
        raise ZooError(f"{where}: the {key} has no tokens; {why}")
      if vocab_size is not None and max(ids) >= vocab_size:
        raise ZooError(f"{where}: the {key} has token id {max(ids)}, outside the model's "
                       f"vocabulary of {vocab_size}")
    *_, cut = truncate_pair(p, c, r, seq_len, max_prompt)
    stats.pairs += 1
    stats.prompts_cut += cut[0]
    stats.completions_cut += cut[1] + cut[2]
  stats.layouts = tuple(sorted(layouts))
  return stats


# --- batches ----------------------------------------------------------------------------------

class _PairRows(grain.transforms.Map):
  """A source record -> the pair's rows ({key: [2, seq_len]})."""

  def __init__(self, encoder: PairEncoder, seq_len: int, max_prompt: int):
    self._encoder, self._seq_len, self._max_prompt = encoder, seq_len, max_prompt

  def map(self, record):
    p, c, r = self._encoder(json.loads(_text(record["text"])))
    p, c, r, _ = truncate_pair(p, c, r, self._seq_len, self._max_prompt)
    return pair_rows(p, c, r, self._seq_len)


def make_pair_batches(source, encoder: PairEncoder, *, seq_len: int, batch_size: int,
                      seed: int, max_prompt: int, shuffle: bool = True, repeat: bool = True,
                      process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                      shard: str = "documents") -> grain.DatasetIterator:
  """An iterator of batches of `batch_size` pairs ([batch_size, 2, seq_len] arrays) for this
  process: pairs i, i + process_count, ... of `source`, in a new order each epoch drawn from
  `seed` (in the source's order with shuffle False). `repeat=False` ends after one pass, its
  last batch padded with empty pairs (weights 0). `shard="rows"`: every process reads every
  pair and keeps its block of each global batch (see zoo.data.pipeline.make_batches)."""
  rows_of, batch_size, process_index, process_count = rows_split(
      shard, batch_size, process_index, process_count)
  check_batch_args(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                   process_count=process_count, seed=seed, num_workers=num_workers)
  ds = process_share(source, process_index, process_count, shuffle=shuffle, seed=seed,
                     repeat=repeat, what="preference pairs")
  ds = ds.map(_PairRows(encoder, int(seq_len), int(max_prompt)))
  it = ds.to_iter_dataset().batch(
    int(batch_size), batch_fn=functools.partial(grain.experimental.batch_and_pad,
                                                batch_size=int(batch_size)))
  return finish_batches(it, rows_of, num_workers)


def encoder_for(data_cfg: Any, tokenizer, template_dir: str | None) -> PairEncoder:
  return PairEncoder(tokenizer, template_dir, add_bos=field(data_cfg, "add_bos", True),
                     add_eos=field(data_cfg, "add_eos", True))


def preference_pipeline(data_cfg: Any, tokenizer, split: str, *, data_dir: str,
                        process_index: int = 0, process_count: int = 1, repeat: bool = True,
                        template_dir: str | None = None) -> grain.DatasetIterator:
  """Batches of `split`'s pairs for this process; data_cfg.batch_size (pairs) is global."""
  seq_len = field(data_cfg, "seq_len")
  batch_size = local_batch_size(data_cfg, process_count)
  max_prompt = prompt_budget(seq_len, field(data_cfg, "max_prompt_len", 0))
  return make_pair_batches(
    preference_source(data_cfg, split, data_dir), encoder_for(data_cfg, tokenizer, template_dir),
    seq_len=seq_len, batch_size=batch_size, seed=field(data_cfg, "seed", 0),
    max_prompt=max_prompt, shuffle=field(data_cfg, "shuffle", True), repeat=repeat,
    process_index=process_index, process_count=process_count,
    num_workers=field(data_cfg, "num_workers", 0), shard=field(data_cfg, "shard", "documents"))


def check_preference_data(data_cfg: Any, tokenizer, splits, *, data_dir: str,
                          template_dir: str | None, vocab_size: int | None,
                          verbose: bool = True) -> dict[str, PairStats]:
  """Every pair of `splits` tokenized and checked (`scan_pairs`) before anything compiles;
  a note with the truncation counts on stderr (verbose)."""
  seq_len = field(data_cfg, "seq_len")
  max_prompt = prompt_budget(seq_len, field(data_cfg, "max_prompt_len", 0))
  encoder = encoder_for(data_cfg, tokenizer, template_dir)
  out = {}
  for split in splits:
    out[split] = scan_pairs(preference_source(data_cfg, split, data_dir), encoder,
                            seq_len=seq_len, max_prompt=max_prompt, vocab_size=vocab_size)
  if verbose:
    print("zoo: preference pairs (rows of " + f"{seq_len} tokens, prompts kept to their last "
          f"{max_prompt} when a pair does not fit): "
          + "; ".join(stats.words(split) for split, stats in out.items()), file=sys.stderr)
  return out
