"""Instruction and chat examples as token ids with a loss mask.

A JSONL record is either {"prompt": str, "completion": str} or {"messages": [{"role",
"content"}, ...]}. With a chat template (the tokenizer's, as transformers renders it), a
prompt/completion pair is the conversation [user: prompt, assistant: completion]; every
assistant turn is trained on and everything else (system, user, the template's headers) is
masked out of the loss. Without a template a pair is prompt + completion + EOS, the completion
and EOS trained on; chat messages need a template.

The rendered text is encoded once, whole, so the ids are the ones the tokenizer gives for the
full conversation; the mask comes from encoding each turn's prefix, which must tokenize to a
prefix of the whole (true at the turn boundaries of the usual templates). Where it does not,
the text is encoded turn by turn instead.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from zoo.data.chat import chat_template_dir, render_chat
from zoo import paths
from zoo.errors import ZooError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(value, where: str, key: str) -> list[dict]:
  """The chat messages `value` (record field `key`) as [{"role", "content"}], or a ZooError
  naming `where`."""
  if not isinstance(value, list):
    raise ZooError(f"{where}: {key!r} is not a message list")
  for m in value:
    if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"),
                                                                          str)):
      raise ZooError(f"{where}: each message of {key!r} needs a role ({', '.join(ROLES)}) and "
                     "a string content")
  return [{"role": m["role"], "content": m["content"]} for m in value]


def check_record(record, where: str) -> dict:
  """The parts of a JSONL record that make an example; a ZooError naming `where` if bad."""
  if not isinstance(record, dict):
    raise ZooError(f"{where}: not a JSON object")
  if "messages" in record:
    messages = check_messages(record["messages"], where, "messages")
    if not messages:
      raise ZooError(f"{where}: 'messages' is not a non-empty list")
    if not any(m["role"] == "assistant" for m in messages):
      raise ZooError(f"{where}: no assistant message to train on")
    return {"messages": messages}
  if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
    return {"prompt": record["prompt"], "completion": record["completion"]}
  raise ZooError(f"{where}: an instruction record needs 'prompt' and 'completion' strings, or "
                 "'messages'")


def _special_strings(tokenizer) -> dict[str, int]:
  """Special-token texts that a template may write, with their ids."""
  out = dict(getattr(tokenizer, "special_tokens", None) or {})
  sp = getattr(tokenizer, "_sp", None)
  if sp is not None:
    for i in (tokenizer.bos_id, tokenizer.eos_id):
      if i is not None:
        out[sp.id_to_piece(i)] = i
  return out


def encode_special(tokenizer, text: str) -> list[int]:
  """`tokenizer.encode(text)`, with special tokens written as text (`<s>`, `<|eot_id|>`) taken
  as their ids (HF tokenizer.json files do this themselves)."""
  specials = _special_strings(tokenizer)
  if not specials:
    return tokenizer.encode(text)
  pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
  ids = []
  for i, part in enumerate(re.split(pattern, text)):
    if i % 2:
      ids.append(specials[part])
    elif part:
      ids.extend(tokenizer.encode(part))
  return ids


class InstructFormatter:
  """record JSON text -> (int32 ids [n], float32 mask [n]), mask 1 on the trained tokens."""

  def __init__(self, tokenizer, template_dir: str | None, *, add_bos: bool = True,
               add_eos: bool = True):
    self._tok = tokenizer
    self._template = chat_template_dir(template_dir)
    self._bos = tokenizer.bos_id if add_bos else None
    self._eos = tokenizer.eos_id if add_eos else None

  def _render(self, messages, generation_prompt: bool) -> str:
    return render_chat(self._template, messages, add_generation_prompt=generation_prompt)

  def segments(self, record: dict) -> list[tuple[str, bool]]:
    """The example as (text, trained) runs whose concatenation is the whole text."""
    if self._template is None:
      if "messages" in record:
        raise ZooError("chat 'messages' need a chat template, and the tokenizer has none")
      return [(record["prompt"], False), (record["completion"], True)]
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                          {"role": "assistant", "content": record["completion"]}]
    out, done = [], ""
    for k, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      prompt = self._render(messages[:k], True)
      full = self._render(messages[:k + 1], False)
      if not (prompt.startswith(done) and full.startswith(prompt)):
        raise ZooError("the chat template does not render turn by turn (a conversation's "
                       "prefix is not a prefix of its text); cannot mask the prompts")
      out += [(prompt[len(done):], False), (full[len(prompt):], True)]
      done = full
    rest = self._render(messages, False)[len(done):]
    return out + ([(rest, False)] if rest else [])

  def __call__(self, text) -> tuple[np.ndarray, np.ndarray]:
    record = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    segments = [(t, trained) for t, trained in self.segments(record) if t]
    whole = "".join(t for t, _ in segments)
    ids = encode_special(self._tok, whole)
    cuts, n = [], 0
    for t, _ in segments[:-1]:
      n += len(t)
      prefix = encode_special(self._tok, whole[:n])
      if ids[:len(prefix)] != prefix or (cuts and len(prefix) < cuts[-1]):
        cuts = None  # this boundary falls inside a token: encode turn by turn
        break
      cuts.append(len(prefix))
    if cuts is not None:
      bounds = [0, *cuts, len(ids)]
      mask = np.zeros(len(ids), np.float32)
      for (lo, hi), (_, trained) in zip(zip(bounds[:-1], bounds[1:]), segments):
        mask[lo:hi] = float(trained)
    else:
      pieces = [encode_special(self._tok, t) for t, _ in segments]
      ids = [i for piece in pieces for i in piece]
      mask = np.concatenate([np.full(len(p), float(tr), np.float32)
                             for p, (_, tr) in zip(pieces, segments)])
    if self._bos is not None and ids[:1] != [self._bos]:
      ids, mask = [self._bos, *ids], np.concatenate([[0.0], mask]).astype(np.float32)
    if self._eos is not None and self._template is None:
      ids, mask = [*ids, self._eos], np.concatenate([mask, [1.0]]).astype(np.float32)
    return np.asarray(ids, np.int32), mask


def template_dir_for(data_cfg, init_from: str) -> str | None:
  """Where the chat template comes from: data.chat_template, else the tokenizer's or the
  checkpoint's directory."""
  for candidate in (getattr(data_cfg, "chat_template", ""), getattr(data_cfg, "tokenizer", ""),
                    init_from):
    if candidate:
      path = os.path.expanduser(paths.localize(candidate))
      return path if os.path.isdir(path) else os.path.dirname(path)
  return None
