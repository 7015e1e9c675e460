"""zoo models in EleutherAI's lm-evaluation-harness (`lm-eval`, installed by `zoo[eval]`).

    import lm_eval
    from zoo.harness import ZooLM
    lm = ZooLM("path/to/checkpoint", batch_size=8)          # adapter=, mesh={"fsdp": -1}, ...
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", "arc_easy"])

`zoo eval --checkpoint DIR --tasks hellaswag,arc_easy` runs the same from the command line.

ZooLM answers the harness's three kinds of request as its `hf` backend does (the same
tokenization, BOS handling, left truncation and rolling windows), so the numbers agree with
`lm_eval --model hf` on the same weights; how it computes them is zoo's own:
- log-likelihoods: requests sorted by length and batched into power-of-two (batch, length)
  buckets, one compiled program per bucket, one forward pass per batch that returns only each
  scored token's log-probability and whether it was the greedy choice (the head runs on the
  scored positions only, never making the [B, T, vocab] log-softmax), the next batch queued
  while the last one's results are read; requests that share their context (a question's
  choices) run it once, into a KV cache that they continue, batched by continuation length;
  the other requests are packed first fit, several to a row, each in a segment of its own at
  its own positions, so that short requests do not pad to a bucket one a row;
- generation: zoo's KV-cache Generator, a batch of prompts at a time, with the stop strings
  checked on the text as tokens stream, so that a row ends at its stop string;
- on a mesh (`mesh=`), parameters, batches and caches are laid out by zoo's rules table.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from tqdm import tqdm

import zoo
from zoo import paths, sharding
from zoo.data.chat import load_chat_template, render_chat
from zoo.data.tokenizers import HFTokenizer, load_tokenizer
from zoo.errors import ZooError
from zoo.infer.generate import (MIN_PROMPT_BUCKET, Generator, Sampling, generation_config_eos,
                                greedy)
from zoo.io import staged_file

try:  # the `eval` extra: without it zoo works, and ZooLM says how to install it
  import lm_eval
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                    postprocess_generated_text)
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
except ImportError:
  lm_eval = None
  TemplateLM = object

INSTALL = "the harness (lm-eval) is not installed: pip install 'zoo[eval]'"
# Generation keyword arguments a task may pass (after the harness's own normalization).
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
# The log-softmax of at most this many logits is live at once in a scoring pass.
SCORE_LOGITS = 2**26
# Tokens per log-likelihood batch on a CPU (max_batch_tokens): on the bench's 58M model a row
# of 2048 tokens takes 0.94 s alone, 1.1 s a row two at a time and 2.4 s a row eight at a time.
CPU_BATCH_TOKENS = 2048
# Log-likelihood rows hold several short requests, packed, up to this many tokens.
PACK_LENGTH = 256
# The KV caches of the prefixes whose continuations are batched together: at most this many
# bytes (or one batch of prefixes, where that is more).
PREFIX_CACHE_BYTES = 2**28


def require_harness() -> None:
  if lm_eval is None:
    raise ZooError(INSTALL)


class TokenizerView:
  """A zoo tokenizer as the harness's `hf` backend sees it through transformers: encode adds
  the special tokens the tokenizer's template adds (an HF tokenizer.json's post-processor; BOS
  for SentencePiece and tiktoken files, as transformers' LLaMA tokenizers add it), decode can
  leave special tokens out."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eos_id
    self._raw = None
    if isinstance(tokenizer, HFTokenizer):
      self._raw = tokenizers.Tokenizer.from_file(tokenizer.path)
      plain = self._raw.encode("a", add_special_tokens=False).ids
      full = self._raw.encode("a").ids
      self.prefix, self.suffix = [], []
      for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
          self.prefix, self.suffix = full[:i], full[i + len(plain):]
          break
      self.special = {i for i, t in self._raw.get_added_tokens_decoder().items() if t.special}
    else:
      self.prefix = [] if self.bos_id is None else [self.bos_id]
      self.suffix = []
      self.special = set(getattr(tokenizer, "special_tokens", {}).values())
    self.special |= {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
                     if i is not None}

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = self.tokenizer.encode(text)
    if add_special_tokens:
      ids = self.prefix + ids + self.suffix
    return ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    if self._raw is not None:
      return self._raw.decode(ids, skip_special_tokens=skip_special_tokens)
    if skip_special_tokens:
      ids = [i for i in ids if i not in self.special]
    return self.tokenizer.decode(ids)


def _bucket(n: int, cap: int) -> int:
  """Powers of two from MIN_PROMPT_BUCKET up, but never past `cap` (the longest input)."""
  return min(max(MIN_PROMPT_BUCKET, 1 << (n - 1).bit_length()), max(cap, n))


def _batch_bucket(n: int, batch_size: int) -> int:
  return min(batch_size, 1 << (n - 1).bit_length())


def _logprobs(model, x, targets, chunk):
  """Log-probabilities [S] of targets [S] under the head's logits of hidden states x [S, D],
  and whether each target is the greedy choice [S]; the logits are made `chunk` positions at
  a time, so that no more than [chunk, vocab] of them exist at once."""
  logps, hits = [], []
  for start in range(0, targets.shape[0], chunk):
    logits = model.head(x[start:start + chunk]).astype(jnp.float32)  # [c, V]
    target = targets[start:start + chunk]
    picked = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    logps.append(picked - jax.nn.logsumexp(logits, axis=-1))
    hits.append(greedy(logits) == target)
  return jnp.concatenate(logps), jnp.concatenate(hits)


def _picked(model, x, picks, targets, chunk):
  """_logprobs of targets [S] at the positions `picks` [S] of hidden states x [B, T, D]
  (flat indices b * T + t): the head runs on the scored positions only."""
  return _logprobs(model, x.reshape(-1, x.shape[-1])[picks], targets, chunk)


def _score(graphdef, chunk, params, tokens, picks, targets):
  """_picked log-probabilities after tokens [B, T], one causal sequence a row."""
  model = nnx.merge(graphdef, params)
  return _picked(model, model.hidden_states(tokens), picks, targets, chunk)


def _score_packed(graphdef, chunk, params, tokens, positions, segments, picks, targets):
  """_picked log-probabilities after tokens [B, T] that hold several sequences a row: each
  token at its position within its sequence, attending within its segment id only."""
  model = nnx.merge(graphdef, params)
  return _picked(model, model.hidden_states(tokens, positions, segments), picks, targets,
                 chunk)


def _prefix_cache(graphdef, params, tokens):
  """The KV cache of prefixes tokens [G, T] (right-padded) at positions 0..T-1: per layer
  {"k", "v": [G, K, T, H]}, a token's slot being its position."""
  model = nnx.merge(graphdef, params)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model.decode(tokens, positions, None)[1]


def _score_after(graphdef, chunk, params, cache, index, tokens, positions, picks, targets):
  """_picked log-probabilities after tokens [B, T] at `positions` [B, T] that continue
  prefix index[b] of `cache` (row b's positions start at its prefix's length), all T tokens
  of a row in one pass over its prefix's cache (the slots from its first position on, the
  padding of shorter prefixes, are not attended to)."""
  model = nnx.merge(graphdef, params)
  rows = [{name: jnp.take(layer[name], index, axis=0) for name in ("k", "v")}
          for layer in cache]  # [B, K, prefix, H]
  x, _ = model.decode(tokens, positions, rows)
  return _picked(model, x, picks, targets, chunk)


def _pack(lengths: list[int], order: list[int], capacity: int, bins: int, pack: bool):
  """One batch of at most `bins` rows of `capacity` tokens from the sequences `order`
  (indices into `lengths`, longest first, none longer than `capacity`): first fit, so that
  short sequences fill the room that long ones leave (one a row unless `pack`). Returns (the
  rows, as lists of indices; the indices left for later batches, longest first)."""
  rows: list[list[int]] = []
  free: list[int] = []
  left: list[int] = []
  at = 0
  while at < len(order):
    n = lengths[order[at]]
    fit = next((r for r in range(len(rows)) if free[r] >= n), None) if pack else None
    if fit is not None:
      rows[fit].append(order[at])
      free[fit] -= n
    elif len(rows) < bins:
      rows.append([order[at]])
      free.append(capacity - n)
    else:  # every row is open: skip to the first sequence that fits the most room left
      room = max(free) if pack else 0
      skip = bisect.bisect_left(order, -room, lo=at, key=lambda i: -lengths[i])
      left.extend(order[at:skip])
      at = skip
      continue
    at += 1
  return rows, left


def _int(value, name: str, minimum: int) -> int:
  """`value` (an int, or its text as the harness's argument strings give it) as an int of at
  least `minimum`, or a ZooError naming `name`."""
  try:
    out = int(str(value).strip()) if not isinstance(value, bool) else None
  except ValueError:
    out = None
  if out is None or out < minimum:
    raise ZooError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return out


def _mesh(mesh):
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  if isinstance(mesh, str):  # "fsdp=4,tensor=2" (or with ':' between axes, for arg strings)
    try:
      mesh = {k.strip(): int(v) for k, v in (part.split("=") for part in
                                              mesh.replace(":", ",").split(",") if part)}
    except ValueError:
      raise ZooError(f"mesh must look like fsdp=4,tensor=2, got {mesh!r}") from None
  if isinstance(mesh, dict):
    unknown = sorted(set(mesh) - set(sharding.MESH_AXES))
    if unknown:
      raise ZooError(f"mesh: unknown axis {unknown[0]!r} (axes: "
                     f"{', '.join(sharding.MESH_AXES)})")
  return sharding.make_mesh(mesh)


class ZooLM(TemplateLM):
  """A zoo checkpoint (with an optional LoRA adapter) as an lm-evaluation-harness model.

  checkpoint: a zoo or HF checkpoint directory (gs:// too); adapter: a LoRA adapter directory
  (zoo's or HF peft's); tokenizer: a tokenizer file or directory (default: the checkpoint's).
  batch_size: rows per log-likelihood pass (one row may pack several short requests) and
  prompts per generation batch. max_length: the longest input
  (default: the model's maximum length); longer requests are cut from the left, as the `hf`
  backend cuts them. max_gen_toks: the generation budget of tasks that set none (256).
  add_bos_token: None follows the tokenizer, True/False force the special tokens on or off.
  max_batch_tokens: at most this many tokens (rows x length bucket) in one log-likelihood
  batch, so that long requests go in smaller batches (default: 2048 on a CPU, where a batch
  of long rows runs slower per row than one at a time; elsewhere no limit but batch_size).
  mesh: a jax Mesh, or axis sizes ({"fsdp": -1}, "fsdp=4,tensor=2") to shard the model over
  the devices by zoo's rules table. seed: the sampling seed.
  """

  def __init__(self, checkpoint: str, *, adapter: str | None = None,
               tokenizer: str | None = None, batch_size: int | str = 8,
               max_batch_size: int | None = None, max_length: int | None = None,
               max_gen_toks: int = 256, dtype: str = "float32",
               add_bos_token: bool | None = None, prefix_token_id: int | None = None,
               max_batch_tokens: int | None = None, mesh=None, rules=None, seed: int = 0,
               device: str | None = None, progress: bool = True):
    require_harness()
    super().__init__()
    del max_batch_size  # the harness passes it for batch_size="auto", which ZooLM refuses
    if device is not None:
      raise ZooError(f"ZooLM runs on JAX's devices (choose them with JAX_PLATFORMS), not "
                     f"device={device!r}")
    if str(batch_size).startswith("auto"):
      raise ZooError("ZooLM takes an integer batch_size, not 'auto'")
    self._batch_size = _int(batch_size, "batch_size", 1)
    self._max_gen_toks = _int(max_gen_toks, "max_gen_toks", 1)
    self.seed = _int(seed, "seed", 0)
    self.progress = progress
    self.checkpoint = checkpoint
    local = paths.localize(checkpoint)
    tokenizer = paths.localize(tokenizer) if tokenizer else None
    source = tokenizer or local
    if not tokenizer and not any(os.path.isfile(os.path.join(local, name))
                                 for name in ("tokenizer.json", "tokenizer.model")):
      raise ZooError(f"{checkpoint} has no tokenizer (tokenizer.json or tokenizer.model): "
                     "give a tokenizer")
    self.tokens = TokenizerView(load_tokenizer(source))
    self.template_dir = source if os.path.isdir(source) else local
    model = zoo.load(local, dtype=dtype, adapter=paths.localize(adapter) if adapter else None)
    self.config = model.config
    self.dtype = dtype
    self.generator = Generator(model, mesh=_mesh(mesh), rules=rules)
    del model
    limit = self.config.max_position_embeddings
    self._max_length = limit if max_length is None else _int(max_length, "max_length", 2)
    if self._max_length > limit:
      raise ZooError(f"max_length {self._max_length} exceeds the model's maximum length {limit}")
    if self.tokens.eos_id is None and self.tokens.bos_id is None:
      raise ZooError(f"the tokenizer of {checkpoint} has neither BOS nor EOS, which the harness "
                     "needs (the empty context and end of text)")
    if max_batch_tokens is None:
      max_batch_tokens = (CPU_BATCH_TOKENS if jax.default_backend() == "cpu"
                          else self._batch_size * self._max_length)
    self.max_batch_tokens = _int(max_batch_tokens, "max_batch_tokens", 1)
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
    self._scorers: dict[str, object] = {}
    # Packed rows restart the positions, not the row: Llama 4's chunks are counted in the row.
    self.pack = all(self.config.layer_chunk(i) is None for i in range(self.config.num_layers))
    self.slot_bytes = (2 * self.config.num_layers * self.config.num_kv_heads * self.config.head_dim
                       * jnp.dtype(self.generator.dtype).itemsize)
    self.stop_ids = self._stop_ids(local)

  # What the harness reads.

  @property
  def eot_token_id(self) -> int:
    eos = self.tokens.eos_id
    return self.tokens.bos_id if eos is None else eos

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    return self.tokens.bos_id if self.tokens.bos_id is not None else self.tokens.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.checkpoint.replace("/", "__")  # as the hf backend names its tokenizer

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if chat_template is False or chat_template is None:
      return None
    return load_chat_template(self.template_dir)[0]

  def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True
                          ) -> str:
    """The prompt of `chat_history` as transformers renders it: with the assistant's header
    after it, or (add_generation_prompt False) ending inside the last message, which the
    model then continues."""
    if add_generation_prompt:
      return render_chat(self.template_dir, chat_history, add_generation_prompt=True)
    # transformers' continue_final_message: a tag after the last message marks where to cut.
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    messages = [dict(m) for m in chat_history]
    messages[-1]["content"] = messages[-1]["content"] + tag
    text = render_chat(self.template_dir, messages, add_generation_prompt=False)
    at = text.rfind(tag.strip())
    if at < 0:
      raise ZooError("the chat template drops the final message, so it cannot be continued")
    return text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()

  def get_model_info(self) -> dict:
    return {"model_num_parameters": self.config.num_params(), "model_dtype": self.dtype,
            "model_revision": "", "model_sha": ""}

  # Tokens.

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    if add_special_tokens is None:
      # A string that already starts with BOS's text (a chat template's) gets no second BOS.
      bos_text = self.tokens.decode([self.prefix_token_id], skip_special_tokens=False)
      if bos_text and string.startswith(bos_text):
        add_special_tokens = False
      else:
        add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
    ids = self.tokens.encode(string, add_special_tokens=add_special_tokens)
    if add_special_tokens and self.add_bos_token and self.tokens.bos_id is not None \
        and ids[:1] != [self.tokens.bos_id]:
      ids = [self.tokens.bos_id] + ids
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokens.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _stop_ids(self, local: str) -> list[int]:
    """EOS ids: the tokenizer's, the model config's and generation_config.json's."""
    ids = {self.tokens.eos_id} if self.tokens.eos_id is not None else set()
    eos = self.config.eos_token_id
    ids.update(eos if isinstance(eos, tuple) else [eos] if eos is not None else [])
    ids.update(generation_config_eos(local))
    return sorted(i for i in ids if 0 <= i < self.config.vocab_size)

  # Log-likelihoods.

  def _program(self, kind: str):
    """The jitted program of `kind`: "prefix" (the KV cache of prefixes), "after" (rows after
    a prefix), "whole" (a sequence a row) or "packed" (several sequences a row); each
    compiles once per shape bucket."""
    if kind not in self._scorers:
      graphdef = self.generator.graphdef
      if kind == "prefix":
        fn = functools.partial(_prefix_cache, graphdef)
      else:
        chunk = max(1, SCORE_LOGITS // self.config.vocab_size)
        fn = functools.partial({"whole": _score, "packed": _score_packed,
                                "after": _score_after}[kind], graphdef, chunk)
      self._scorers[kind] = jax.jit(fn)
    return self._scorers[kind]

  def _place(self, x: np.ndarray):
    mesh = self.generator.mesh
    if mesh is None:
      return jnp.asarray(x)
    spec = sharding.logical_to_spec(("batch", "length"), self.generator.rules, mesh, x.shape)
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

  def _batch_limit(self, length: int) -> int:
    """Rows of `length` tokens per batch: as many as the token budget allows, up to
    batch_size, a power of two, at least one."""
    most = max(1, min(self.batch_size, self.max_batch_tokens // length))
    return 1 << (most.bit_length() - 1)

  def _score_rows(self, rows: list[tuple[list[int], list[int]]], bar=None) -> list[tuple]:
    """(sum of log-probabilities, all greedy) of each row's last `len(target)` tokens, where a
    row is (input tokens, the continuation tokens that the input's last ones predict).

    Rows that share the tokens before their scored ones (a multiple-choice question's
    choices) run those once, as a prefix whose KV cache each of them continues, batched by
    continuation length (`_after_prefixes`); the others run whole, packed several to a row
    (`_packed`). Batches go longest first, so that they pad little, and the head runs on the
    scored positions only. A batch's results are read once the next one is queued.
    """
    out: list[tuple | None] = [None] * len(rows)
    prefixes: dict[tuple, list[int]] = {}
    for i, (inp, cont) in enumerate(rows):
      start = len(inp) - len(cont)  # the first scored position
      if start > 0:
        prefixes.setdefault(tuple(inp[:start]), []).append(i)
    shared = {k: v for k, v in prefixes.items() if len(v) > 1}
    in_shared = {i for v in shared.values() for i in v}
    whole = [i for i in range(len(rows)) if i not in in_shared]
    pending: list[tuple] = []

    def collect():
      spans, result = pending.pop(0)
      logp, hit = (np.asarray(a) for a in result)
      for i, a, b in spans:
        out[i] = (float(np.sum(logp[a:b], dtype=np.float64)), bool(np.all(hit[a:b])))
      if bar is not None:
        bar.update(len(spans))

    params = self.generator.params
    context = (sharding.use(self.generator.mesh, self.generator.rules)
               if self.generator.mesh is not None else contextlib.nullcontext())
    with context:
      for kind, spans, picks, targets, arrays in itertools.chain(
          self._after_prefixes(rows, shared, params), self._packed(rows, whole)):
        size = max(MIN_PROMPT_BUCKET, 1 << (len(picks) - 1).bit_length())
        flat = np.zeros((2, size), np.int32)
        flat[0, :len(picks)], flat[1, :len(targets)] = picks, targets
        pending.append((spans, self._program(kind)(params, *arrays, jnp.asarray(flat[0]),
                                                   jnp.asarray(flat[1]))))
        if len(pending) > 1:
          collect()
      while pending:
        collect()
    return out

  def _after_prefixes(self, rows, shared: dict[tuple, list[int]], params):
    """The "after" batches of the rows that continue the prefixes `shared` ({prefix: the
    rows}): (kind, spans (row, first, end) of the scored positions, picks (flat positions),
    targets, the program's arrays). The prefixes' caches are made here, a run of prefixes of
    one length bucket at a time, as many as PREFIX_CACHE_BYTES hold."""
    order = sorted(shared, key=lambda k: -len(k))
    at = 0
    while at < len(order):
      tp = _bucket(len(order[at]), self.max_length)
      most = self._batch_limit(tp)
      count = most << max(0, (PREFIX_CACHE_BYTES // (tp * self.slot_bytes * most))
                          .bit_length() - 1)
      group = []
      while (at < len(order) and len(group) < count
             and _bucket(len(order[at]), self.max_length) == tp):
        group.append(order[at])
        at += 1
      cache = self._prefix_caches(group, tp, most, _batch_bucket(len(group), count), params)
      members = sorted(((i, g) for g, prefix in enumerate(group) for i in shared[prefix]),
                       key=lambda m: -len(rows[m[0]][1]))
      first = 0
      while first < len(members):
        ts = _bucket(len(rows[members[first][0]][1]), self.max_length)
        limit = self._batch_limit(ts)
        batch = members[first:first + limit]
        first += len(batch)
        b = _batch_bucket(len(batch), limit)
        index = np.zeros(b, np.int32)
        tokens = np.zeros((b, ts), np.int32)
        positions = np.zeros((b, ts), np.int32)
        spans, picks, targets = [], [], []
        for j, (i, g) in enumerate(batch):
          inp, cont = rows[i]
          p = len(inp) - len(cont)
          index[j] = g
          tokens[j, :len(cont)] = inp[p:]  # the last prefix token, then all but the last
          positions[j] = p + np.arange(ts)
          spans.append((i, len(picks), len(picks) + len(cont)))
          picks.extend(range(j * ts, j * ts + len(cont)))
          targets.extend(cont)
        yield "after", spans, picks, targets, (cache, jnp.asarray(index), self._place(tokens),
                                               self._place(positions))

  def _prefix_caches(self, group: list[tuple], tp: int, most: int, rows: int, params):
    """The KV cache [rows, K, tp, H] per layer of the prefixes `group` (then zeros up to
    `rows`, a power of two), computed `most` prefixes at a time."""
    caches = []
    for first in range(0, rows, most):
      part = group[first:first + most]
      if not part:  # rows that only round the cache up to a power of two
        caches.append(jax.tree.map(jnp.zeros_like, caches[0]))
        continue
      tokens = np.zeros((min(most, rows), tp), np.int32)
      for g, prefix in enumerate(part):
        tokens[g, :len(prefix)] = prefix
      caches.append(self._program("prefix")(params, self._place(tokens)))
    return caches[0] if len(caches) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a),
                                                           *caches)

  def _packed(self, rows, whole: list[int]):
    """The batches of the rows `whole`, as `_after_prefixes` gives them: each row's input
    whole, several to a batch row, first fit, longest first (one a batch row, "whole", where
    the model cannot pack)."""
    lengths = [len(inp) for inp, _ in rows]
    order = sorted(whole, key=lambda i: -lengths[i])
    total = sum(lengths[i] for i in order)
    while order:
      t = _bucket(lengths[order[0]], self.max_length)
      if self.pack:  # rows long enough to hold several short sequences
        t = max(t, min(PACK_LENGTH, _bucket(total, self.max_length)))
      most = self._batch_limit(t)
      packed, order = _pack(lengths, order, t, most, self.pack)
      b = _batch_bucket(len(packed), most)
      tokens = np.zeros((b, t), np.int32)
      positions = np.zeros((b, t), np.int32)
      segments = np.zeros((b, t), np.int32)
      spans, picks, targets = [], [], []
      for r, sequences in enumerate(packed):
        at = 0
        for k, i in enumerate(sequences):
          inp, cont = rows[i]
          n = len(inp)
          tokens[r, at:at + n] = inp
          positions[r, at:at + n] = np.arange(n)
          segments[r, at:at + n] = k + 1
          # position q predicts token q + 1: the last len(cont) predict the continuation
          spans.append((i, len(picks), len(picks) + len(cont)))
          picks.extend(range(r * t + at + n - len(cont), r * t + at + n))
          targets.extend(cont)
          at += n
          total -= n
      if self.pack:
        yield "packed", spans, picks, targets, (self._place(tokens), self._place(positions),
                                                self._place(segments))
      else:
        yield "whole", spans, picks, targets, (self._place(tokens),)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(log-likelihood, is greedy) of each (request, context tokens, continuation tokens)."""
    rows, keep = [], []
    for index, (_, context, continuation) in enumerate(requests):
      if not continuation:
        raise ZooError("a request has an empty continuation: nothing to score")
      if len(continuation) > self.max_length:
        raise ZooError(f"a continuation of {len(continuation)} tokens exceeds the maximum "
                       f"length {self.max_length}")
      # As the hf backend: the last max_length + 1 tokens, the last of which is only predicted.
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole[:-1], list(continuation)))
      keep.append(index)
    bar = tqdm(total=len(rows), desc="zoo loglikelihood", dynamic_ncols=True,
               disable=disable_tqdm or not self.progress)
    scores = self._score_rows(rows, bar)
    bar.close()
    for (request, _, _), answer in zip(requests, scores):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return scores

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each string's total log-likelihood over disjoint windows of at most max_length tokens
    (each window after the first sees the tokens before it as context), as the hf backend
    cuts them."""
    windows, owners = [], []
    for index, request in enumerate(requests):
      (string,) = request.args
      for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for owner, (logp, _) in zip(owners, scores):
      totals[owner] += logp
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  # Generation.

  def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, Sampling]:
    if not isinstance(gen_kwargs, dict):
      raise ZooError(f"generation arguments must be a dict, got {gen_kwargs!r}")
    kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos or None)
    max_gen = _int(kwargs.pop("max_gen_toks"), "max_gen_toks", 1)
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
      raise ZooError(f"generation argument {unknown[0]!r} is not supported by ZooLM "
                     f"(it takes {', '.join(GEN_KWARGS)})")
    sampling = Sampling()
    temperature = float(kwargs.get("temperature", 1.0) if kwargs.get("do_sample") else 0.0)
    if kwargs.get("do_sample") and temperature > 0:
      sampling = Sampling(temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                          top_p=float(kwargs.get("top_p") or 1.0))
    if self.max_length - max_gen <= 0:
      raise ZooError(f"max_gen_toks {max_gen} leaves no room for a prompt within the maximum "
                     f"length {self.max_length}")
    return until, max_gen, sampling

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each request's continuation: up to max_gen_toks tokens, ending at EOS or at the first
    stop string (which is cut off), greedy unless the task samples."""
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
      groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []
                        ).append(index)
    bar = tqdm(total=len(requests), desc="zoo generate_until", dynamic_ncols=True,
               disable=disable_tqdm or not self.progress)
    for g, members in enumerate(groups.values()):
      until, max_gen, sampling = self._generation_settings(requests[members[0]].args[1])
      prompts = {}
      for index in members:
        ids = self.tok_encode(requests[index].args[0],
                              left_truncate_len=self.max_length - max_gen)
        prompts[index] = ids or [self.prefix_token_id]
      order = sorted(members, key=lambda i: -len(prompts[i]))
      for b, start in enumerate(range(0, len(order), self.batch_size)):
        batch = order[start:start + self.batch_size]
        texts = self._generate([prompts[i] for i in batch], until, max_gen, sampling,
                               seed=self.seed + 1000 * g + b)
        for index, text in zip(batch, texts):
          results[index] = text
          self.cache_hook.add_partial("generate_until", requests[index].args, text)
        bar.update(len(batch))
    bar.close()
    return results

  def _generate(self, prompts: list[list[int]], until: list[str], max_gen: int,
                sampling: Sampling, seed: int) -> list[str]:
    n = len(prompts)
    # a power-of-two batch (copies of the last prompt fill it), so few programs compile
    padded = prompts + [prompts[-1]] * (_batch_bucket(n, self.batch_size) - n)
    generated: list[list[int]] = [[] for _ in padded]
    stops = [s for s in until if s]

    def on_tokens(tokens, active):
      """Ends the rows whose text (special tokens included, as the harness checks it) holds
      a stop string."""
      ended = np.zeros(len(tokens), bool)
      for i in np.flatnonzero(active):
        generated[i].append(int(tokens[i]))
        text = self.tokens.decode(generated[i], skip_special_tokens=False)
        ended[i] = any(s in text for s in stops)
      return ended

    out = self.generator.generate(padded, max_new_tokens=max_gen, sampling=sampling, seed=seed,
                                  stop_ids=self.stop_ids, on_tokens=on_tokens)
    return [postprocess_generated_text(self.tokens.decode(ids), stop=until,
                                       think_end_token=None) for ids in out[:n]]


if lm_eval is not None:
  register_model("zoo")(ZooLM)


# Running tasks (zoo eval --tasks).

def check_tasks(tasks: list[str], include_path: str | None = None):
  """A TaskManager that knows every task in `tasks` (the harness's own and those under
  `include_path`), or a ZooError naming the unknown ones."""
  require_harness()
  if include_path is not None and not os.path.isdir(include_path):
    raise ZooError(f"--include-path {include_path} is not a directory")
  if not tasks:
    raise ZooError("no tasks given")
  from lm_eval.tasks import TaskManager  # here: it takes most of a second to import
  manager = TaskManager(include_path=include_path)
  known = set(manager.all_tasks)
  unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
  if unknown:
    raise ZooError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                   "(lm-eval's tasks, or YAML files under --include-path)")
  return manager


def run_tasks(lm: ZooLM, tasks: list[str], *, num_fewshot: int | None = None,
              limit: float | None = None, include_path: str | None = None,
              apply_chat_template: bool = False, bootstrap_iters: int = 100000,
              log_samples: bool = False, seed: int = 0) -> dict:
  """lm_eval.simple_evaluate of `lm` on `tasks`: the harness's results dict."""
  if num_fewshot is not None and num_fewshot < 0:
    raise ZooError(f"--num-fewshot must be >= 0, got {num_fewshot}")
  if limit is not None and not limit > 0:
    raise ZooError(f"--limit must be positive, got {limit}")
  manager = check_tasks(tasks, include_path)
  return lm_eval.simple_evaluate(
    model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
    bootstrap_iters=bootstrap_iters, log_samples=log_samples,
    apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
    torch_random_seed=seed, fewshot_random_seed=seed)


def results_table(results: dict) -> str:
  """The harness's results table (and its groups table, where there are groups)."""
  table = make_table(results)
  if results.get("groups"):
    table += "\n" + make_table(results, "groups")
  return table


def summary(results: dict) -> dict:
  """The parts of a results dict worth printing as one JSON line."""
  keys = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better")
  return json.loads(json.dumps({k: results[k] for k in keys if k in results}, default=_jsonable))


def write_results(results: dict, directory: str) -> list[str]:
  """results.json (everything but the samples) and samples_TASK.jsonl (one logged request per
  line) in `directory`, each written under a temporary name and then renamed."""
  if not paths.is_remote(directory):
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
  written = []
  path = directory.rstrip("/") + "/results.json"
  with staged_file(path, force=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in results.items() if k != "samples"}, f, indent=2,
              default=_jsonable)
  written.append(path)
  for task, samples in (results.get("samples") or {}).items():
    path = directory.rstrip("/") + f"/samples_{task}.jsonl"
    with staged_file(path, force=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
      for sample in samples:
        f.write(json.dumps(sample, default=_jsonable) + "\n")
    written.append(path)
  return written


def _jsonable(value):
  """What json cannot write itself: numpy numbers as numbers, anything else as its text."""
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  return str(value)


__all__ = ["ZooLM", "TokenizerView", "check_tasks", "results_table", "run_tasks", "summary",
           "write_results"]
