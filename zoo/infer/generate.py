"""Autoregressive generation with a preallocated KV cache.

A prompt batch is right-padded to a length bucket and run once (prefill); then each decode step
feeds each row's last token at that row's own position. A token's position is also its cache
slot, so rows of different lengths never need shifting, padding slots are simply overwritten,
and the attention mask is just "slot <= position" (and within the sliding window).

`generate` runs the decode steps on the device in chunks: one dispatch runs up to
MAX_CHUNK steps in a loop (fewer once every row has stopped), so the host neither dispatches
nor waits per token; chunks grow while they stay short (CHUNK_SECONDS), so the first tokens
still stream at once. Each program is compiled once per (batch, cache length) bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import sharding
from zoo.errors import ZooError
from zoo.layers.attention import CACHE_AXES, write_cache
from zoo.layers.linear import row_kernel


def generation_config_eos(directory: str) -> list[int]:
  """The eos ids of a checkpoint directory's generation_config.json (none when it has no such
  file, or one that cannot be read)."""
  path = os.path.join(directory, "generation_config.json")
  if not os.path.isfile(path):
    return []
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f).get("eos_token_id")
  except (OSError, ValueError, AttributeError):
    return []
  return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]

# Prompt lengths are padded up to a power of two of at least this, cache lengths to a multiple
# of CACHE_BUCKET, so that a handful of compiled programs serve every request.
MIN_PROMPT_BUCKET = 16
CACHE_BUCKET = 128
# Decode steps per dispatch: at most MAX_CHUNK, and no more than fit in CHUNK_SECONDS at the
# rate measured so far, so that streamed tokens keep coming at least that often.
MAX_CHUNK = 32
CHUNK_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: temperature 0 is greedy (argmax); otherwise the logits are
  divided by the temperature, cut to the top_k most likely (0: no cut), then to the smallest set
  whose probability reaches top_p (1.0: no cut), and sampled (transformers' order)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ZooError(f"temperature must be >= 0, got {self.temperature}")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ZooError(f"top_k must be a non-negative integer, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ZooError(f"top_p must be in (0, 1], got {self.top_p}")


def allowed_tokens(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """Boolean [B, V]: the tokens that top-k and top-p leave in play for float32 logits [B, V]."""
  logits = logits / sampling.temperature if sampling.temperature > 0 else logits
  keep = jnp.ones(logits.shape, bool)
  if sampling.top_k and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    keep &= logits >= kth
  if sampling.top_p < 1.0:
    masked = jnp.where(keep, logits, -jnp.inf)
    ordered = jnp.sort(masked, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
    # The smallest prefix reaching top_p: every token whose predecessors hold less than top_p.
    count = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
    keep &= logits >= threshold
  return keep


def greedy(logits: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first maximum; the first NaN where there is one) as
  int32, computed as a max and then the least index holding it: two plain reductions, where
  XLA:CPU runs argmax's (value, index) reduction 3-4x slower (at a 32000-token vocabulary
  about 120 us a row, 2-3% of a small model's decode step)."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  hit = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens [B] (int32) from float32 logits [B, V]."""
  if sampling.temperature == 0:
    return greedy(logits)
  scaled = logits / sampling.temperature
  scaled = jnp.where(allowed_tokens(logits, sampling), scaled, -jnp.inf)
  return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _bucket_prompt(length: int) -> int:
  return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _prefill(graphdef, params, tokens, lengths):
  """Logits [B, V] after each row's last real token, and the prompt's keys and values."""
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x, new = model.decode(tokens, positions, None)
  last = x[jnp.arange(b), lengths - 1]  # [B, D]
  return model.head(last).astype(jnp.float32), new


def _step(graphdef, params, tokens, positions, cache, *, kernel=False):
  """Logits [B, V] after tokens [B] at `positions` [B], and their keys and values; with
  `kernel`, one-row weight products (batch 1) go to zoo.kernels.gemv on the CPU."""
  model = nnx.merge(graphdef, params)
  with row_kernel() if kernel else contextlib.nullcontext():
    x, new = model.decode(tokens[:, None], positions[:, None], cache)
    return model.head(x[:, 0]).astype(jnp.float32), new


def _write(cache, new, start):
  return [write_cache(c, n, start) for c, n in zip(cache, new, strict=True)]


def _prefill_and_sample(graphdef, sampling, params, tokens, lengths, key):
  logits, new = _prefill(graphdef, params, tokens, lengths)
  return sample(logits, jax.random.fold_in(key, 0), sampling), new


def _step_and_sample(graphdef, sampling, params, tokens, positions, index, cache, key, *,
                     kernel=False):
  logits, new = _step(graphdef, params, tokens, positions, cache, kernel=kernel)
  next_tokens = sample(logits, jax.random.fold_in(key, index), sampling)
  return next_tokens, positions + 1, index + 1, new


def _still_live(live, remaining, tokens, stop):
  """Rows that go on after emitting `tokens` [B]: live, with tokens remaining, and no stop."""
  return live & (remaining > 0) & ~jnp.any(tokens[:, None] == stop[None], axis=-1)


def _decode_chunk(graphdef, sampling, params, key, stop, steps, state, *, kernel=False):
  """Up to `steps` decode steps on the device from `state` = (last tokens [B], positions [B],
  index, cache, live [B], remaining [B]): (tokens [B, MAX_CHUNK] whose first `done` columns are
  new, done, the state to continue from).

  A row is live while it has tokens `remaining` and has not emitted one of `stop` (padded with
  -1); the loop ends early once no row is live. The cache is carried through the loop and
  updated in place (see `_chunk_options`).
  """
  tokens, positions, index, cache, live, remaining = state
  # The incoming tokens were emitted already: a stop among them ends their row (a repeat check
  # for all but the first chunk, which starts from the prefill's tokens).
  live = _still_live(live, remaining, tokens, stop)

  def more(carry):
    i, _, state = carry
    return (i < steps) & jnp.any(state[4])

  def one(carry):
    i, out, (tokens, positions, index, cache, live, remaining) = carry
    new_tokens, new_positions, index, new = _step_and_sample(
      graphdef, sampling, params, tokens, positions, index, cache, key, kernel=kernel)
    cache = _write(cache, new, positions)
    out = jax.lax.dynamic_update_slice(out, new_tokens[:, None], (0, i))
    remaining = remaining - live.astype(remaining.dtype)
    live = _still_live(live, remaining, new_tokens, stop)
    return i + 1, out, (new_tokens, new_positions, index, cache, live, remaining)

  out = jnp.zeros((tokens.shape[0], MAX_CHUNK), jnp.int32)
  state = (tokens, positions, index, cache, live, remaining)
  done, out, state = jax.lax.while_loop(more, one, (jnp.zeros((), jnp.int32), out, state))
  return out, done, state


def _chunk_options():
  """Compiler options for the decode loop. XLA:CPU's default copy insertion copies every cache
  array on each iteration of a loop that both reads and updates it; with region analysis it
  proves the reads come first and updates in place (2 copies of 16 arrays a step, gone)."""
  if jax.default_backend() == "cpu":
    return {"xla_cpu_copy_insertion_use_region_analysis": True}
  return None


class Generator:
  """Generation for one model: `generate(prompts, ...)`, and `prefill`/`step` for the logits.

  With a mesh, the parameters and the cache are placed by the rules table (the same table as
  training: the cache is [batch, kv_heads, length, head_dim]) and activations are constrained
  at block boundaries.
  """

  def __init__(self, model, *, mesh=None, rules=None):
    self.config = model.config
    self.dtype = model.dtype
    self.graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    self.mesh, self.rules = mesh, tuple(rules or sharding.DEFAULT_RULES)
    if mesh is not None:
      params = jax.device_put(params, sharding.param_shardings(model, mesh, self.rules))
    self.params = params
    # Batch-1 steps stream each weight once through one-row products, which XLA:CPU runs on
    # one core; unsharded, they go to zoo.kernels.gemv, which uses all of them.
    self.kernel = mesh is None
    # `prefill` and `step` take two programs each: one reads the cache, and `_write` (which only
    # writes it) stores the new keys and values in place. (`generate`'s loop does both in one.)
    # The graph is bound here rather than passed as a static argument, which would be hashed
    # on every call (milliseconds for a large graph).
    self._prefill_logits = jax.jit(functools.partial(_prefill, self.graphdef))
    self._step_logits = jax.jit(functools.partial(_step, self.graphdef, kernel=self.kernel))
    self._write = jax.jit(_write, donate_argnums=0)
    self._samplers: dict[Sampling, tuple] = {}

  def _sampler(self, sampling: Sampling):
    """(prefill, decode chunk) programs that also pick the tokens, a pair per sampling rule."""
    if sampling not in self._samplers:
      self._samplers[sampling] = (
        jax.jit(functools.partial(_prefill_and_sample, self.graphdef, sampling)),
        jax.jit(functools.partial(_decode_chunk, self.graphdef, sampling, kernel=self.kernel),
                donate_argnums=4, compiler_options=_chunk_options()))  # the state, cache and all
    return self._samplers[sampling]

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.use(self.mesh, self.rules)

  def init_cache(self, batch: int, slots: int) -> list[dict]:
    """An empty cache of `slots` positions: per layer {"k", "v": [batch, K, slots, H]}."""
    c = self.config
    shape = (batch, c.num_kv_heads, slots, c.head_dim)
    if self.mesh is None:
      zeros = functools.partial(jnp.zeros, shape, self.dtype)
    else:
      spec = sharding.logical_to_spec(CACHE_AXES, self.rules, self.mesh, shape)
      out = jax.sharding.NamedSharding(self.mesh, spec)
      zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=out)
    return [{"k": zeros(), "v": zeros()} for _ in range(c.num_layers)]

  def _place(self, x):
    x = jnp.asarray(x)
    if self.mesh is None:
      return x
    spec = sharding.logical_to_spec(("batch", "length")[:x.ndim], self.rules, self.mesh,
                                    x.shape)
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

  def prefill(self, tokens, lengths, cache):
    """(logits [B, V] after each row's last prompt token, cache with the prompts written);
    tokens [B, T] right-padded, lengths [B] the real lengths, cache fresh (it is donated)."""
    with self._context():
      tokens = self._place(np.asarray(tokens, np.int32))
      logits, new = self._prefill_logits(self.params, tokens,
                                         self._place(np.asarray(lengths, np.int32)))
      return logits, self._write(cache, new, self._place(np.zeros(len(tokens), np.int32)))

  def step(self, tokens, positions, cache):
    """(logits [B, V] after tokens [B] at `positions` [B], cache with them written)."""
    with self._context():
      positions = self._place(np.asarray(positions, np.int32))
      logits, new = self._step_logits(self.params,
                                      self._place(np.asarray(tokens, np.int32)), positions,
                                      cache)
      return logits, self._write(cache, new, positions)

  def check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompts as lists of ints, or a ZooError naming what is wrong with them."""
    c = self.config
    if not len(prompts):
      raise ZooError("no prompts given")
    out = []
    for i, prompt in enumerate(prompts):
      ids = [int(t) for t in prompt]
      if not ids:
        raise ZooError(f"prompt {i} is empty")
      bad = [t for t in ids if not 0 <= t < c.vocab_size]
      if bad:
        raise ZooError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                       f"(0..{c.vocab_size - 1})")
      if len(ids) >= c.max_position_embeddings:
        raise ZooError(f"prompt {i} has {len(ids)} tokens; the model's maximum length is "
                       f"{c.max_position_embeddings}, leaving no room to generate")
      out.append(ids)
    return out

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
               sampling: Sampling = Sampling(), seed: int = 0,
               stop_ids: Sequence[int] = (), pad_id: int = 0,
               on_tokens: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None
               ) -> list[list[int]]:
    """New token ids for each prompt (a list of token ids): up to `max_new_tokens`, ending at
    (and including) the first of `stop_ids`, and never past the model's maximum length.

    on_tokens(tokens [B], active [B]) is called with each step's tokens as they come. It may
    return a boolean [B] (or None): the rows it marks end after this token, as at a stop id
    (stop strings checked on the text as it streams).
    """
    prompts = self.check_prompts(prompts)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ZooError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    c = self.config
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    dynamic = c.rope_scaling is not None and c.rope_scaling.rope_type == "dynamic"
    limit = lengths + max_new_tokens
    if not dynamic:
      limit = np.minimum(limit, c.max_position_embeddings)
    budget = limit - lengths  # new tokens each row may produce
    prompt_len = _bucket_prompt(int(lengths.max()))
    slots = max(prompt_len, _round_up(int(limit.max()), CACHE_BUCKET))
    tokens = np.full((b, prompt_len), pad_id, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    stop = np.asarray(sorted(set(int(s) for s in stop_ids)), np.int64)
    # padded to a power of two (at least 8) with -1, which no token equals: few compiles
    stop_padded = np.full(max(8, 1 << (len(stop) - 1).bit_length()), -1, np.int32)
    stop_padded[:len(stop)] = stop

    cache = self.init_cache(b, slots)
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in range(b)]
    active = np.ones(b, bool)
    counts = np.zeros(b, np.int64)  # len(out[i])
    retired = [False]  # whether on_tokens ended rows the device still runs

    def take(tokens: np.ndarray) -> None:
      """Hands one step's tokens [B] to the rows still generating, and retires rows."""
      nonlocal active
      for i in np.flatnonzero(active):
        out[i].append(int(tokens[i]))
      counts[active] += 1
      ended = None if on_tokens is None else on_tokens(tokens, active.copy())
      active = active & ~np.isin(tokens, stop) & (counts < budget)
      if ended is not None and np.any(np.asarray(ended, bool) & active):
        active = active & ~np.asarray(ended, bool)
        retired[0] = True

    with self._context():
      prefill, chunk = self._sampler(sampling)
      current, new = prefill(self.params, self._place(tokens), self._place(lengths), key)
      cache = self._write(cache, new, self._place(np.zeros(b, np.int32)))
      # The device's view of which rows go on (live, tokens remaining) matches `active` and
      # `budget` after every token, so that a chunk stops where the host would.
      state = (current, self._place(lengths), jnp.ones((), jnp.int32), cache,
               self._place(np.ones(b, bool)), self._place((budget - 1).astype(np.int32)))
      stop_dev = jnp.asarray(stop_padded)
      steps_left = int(budget.max()) - 1  # decode steps the longest row may still need
      size, started = 2, time.perf_counter()
      pending = [(current[:, None], 1, 1)]  # the prefill's tokens come first
      while active.any() and (steps_left > 0 or pending):
        # Queue the next chunk before reading the last one, so the device never waits on the
        # host; a chunk queued after every row has stopped ends at once (no live rows).
        if steps_left > 0 and len(pending) < 2:
          n = min(size, steps_left, MAX_CHUNK)
          if retired[0]:  # rows on_tokens ended stop on the device too
            state = (*state[:4], state[4] & self._place(active), state[5])
            retired[0] = False
          tokens_out, done, state = chunk(self.params, key, stop_dev, jnp.int32(n), state)
          pending.append((tokens_out, done, n))
          steps_left -= n
          continue
        tokens_out, done, n = pending.pop(0)
        tokens_out, done = np.asarray(tokens_out), int(done)
        for j in range(done):
          if not active.any():
            break
          take(tokens_out[:, j])
        # Grow the chunks while they stay short at the rate seen so far.
        now = time.perf_counter()
        per_step = (now - started) / max(n, 1)
        started = now
        size = int(max(1, min(MAX_CHUNK, 2 * size, CHUNK_SECONDS // max(per_step, 1e-9))))
    return out

