"""Grouped-query self-attention with causal, sliding-window, chunked and packed-segment masking,
per-head q/k norms (Qwen3, Llama 4) and Llama 4's NoPE layers with temperature tuning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from zoo.errors import ZooError
from zoo.kernels.splash import splash_attention
from zoo.layers.linear import Linear
from zoo.layers.norm import RMSNorm, rms_normalize
from zoo.layers.rope import apply_rope
from zoo.models.config import LlamaConfig
from zoo.sharding import constrain


def attention_mask(length: int, segment_ids: jax.Array | None, window: int | None,
                   chunk: int | None = None):
  """Boolean mask [B or 1, 1, T, T]: causal, within `window`, within one `chunk` of positions
  (Llama 4's chunked attention, chunks counted from the row's start), and within one segment."""
  i = jnp.arange(length)[:, None]
  j = jnp.arange(length)[None, :]
  mask = j <= i
  if window is not None:
    mask &= i - j < window
  if chunk is not None:
    mask &= i // chunk == j // chunk
  mask = mask[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


# Logical axes of a KV cache array [batch, kv_heads, slots, head_dim].
CACHE_AXES = ("batch", "kv_heads", "length", None)


# attention_impl: auto picks by the platform the run's devices are on.
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")
# What a layer takes: "splash_interpret" is the TPU kernel in Pallas's interpreter (the tests'
# way to run it on a CPU); None is "xla".
LAYER_IMPLS = ("xla", "splash", "splash_interpret", "cudnn", None)


def resolve_attention_impl(name: str, platform: str, dtype) -> str:
  """The attention implementation for config value `name` on devices of `platform` ("tpu",
  "gpu", "cpu") computing in `dtype`: auto is splash (the Pallas kernel) on TPU, cuDNN's fused
  attention on GPU in 16-bit compute (the dtypes it takes), XLA's otherwise."""
  if name not in ATTENTION_IMPLS:
    raise ZooError(f"unknown attention_impl {name!r}; use one of {', '.join(ATTENTION_IMPLS)}")
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if name == "auto":
    return {"tpu": "splash", "gpu": "cudnn" if half else "xla"}.get(platform, "xla")
  if name == "splash" and platform != "tpu":
    raise ZooError(f"attention_impl splash is a TPU kernel, but this run's devices are "
                   f"{platform}: use auto or xla")
  if name == "cudnn" and (platform != "gpu" or not half):
    raise ZooError(f"attention_impl cudnn needs NVIDIA GPUs and bfloat16 or float16 compute "
                   f"(this run: {platform}, {jnp.dtype(dtype).name}): use auto or xla")
  return name


def dot_product_attention(q, k, v, *, segment_ids=None, window=None, chunk=None,
                          implementation=None):
  """Causal attention. q: [B, T, N, H], k and v: [B, T, K, H] with N a multiple of K.

  implementation: "xla" (or None), "cudnn", or "splash" (zoo.kernels.splash; "splash_interpret"
  runs it in Pallas's interpreter). Plain causal and sliding-window attention go to
  `jax.nn.dot_product_attention` without a mask, so cuDNN's fused kernel can serve them; packed
  segments need an explicit mask there.
  """
  if implementation in ("splash", "splash_interpret"):
    return splash_attention(q, k, v, segment_ids=segment_ids, window=window, chunk=chunk,
                            interpret=implementation == "splash_interpret")
  if implementation not in LAYER_IMPLS:
    raise ZooError(f"unknown attention implementation {implementation!r}")
  if segment_ids is None and chunk is None:
    window_size = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window_size,
                                        implementation=implementation)
  mask = attention_mask(q.shape[1], segment_ids, window, chunk)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def cached_attention(q, k, v, cache: dict | None, positions, window: int | None,
                     chunk: int | None = None):
  """Attention of new tokens over a KV cache and themselves.

  q [B, T, N, H], and k, v [B, T, K, H], are the new tokens at `positions` [B, T] (consecutive in
  each row, from start[b] = positions[b, 0]); the cache {"k", "v": [B, K, S, H]} holds the keys
  and values of the earlier tokens, a token's slot being its position, so that slot s is visible
  from position p when s < start (and p - s < window). cache None means no earlier tokens.
  The cache is only read here (see `write_cache`), head-major, so both products read it in
  place. Returns [B, T, N, H].
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  # [B, T, K, G, H] -> [B, K, G * T, H]: each kv head's query rows, in (g, t) order.
  qh = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
  kn, vn = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  p = positions[:, :, None]  # [B, T, 1]
  key_pos = positions[:, None, :]  # [B, 1, T]
  masks = [key_pos <= p]  # causal among the new tokens
  scores = [jnp.einsum("bkqh,bkth->bkqt", qh, kn)]
  values = [vn]
  if cache is not None:
    slots = jnp.arange(cache["k"].shape[2])[None, None, :]
    masks.insert(0, jnp.broadcast_to(slots < positions[:, :1, None],
                                     (b, t, cache["k"].shape[2])))
    scores.insert(0, jnp.einsum("bkqh,bksh->bkqs", qh, cache["k"].astype(q.dtype)))
    values.insert(0, cache["v"].astype(q.dtype))
  keys = ([slots] if cache is not None else []) + [key_pos]
  if window is not None:
    masks = [m & (p - kp < window) for m, kp in zip(masks, keys)]
  if chunk is not None:
    masks = [m & (p // chunk == kp // chunk) for m, kp in zip(masks, keys)]
  mask = jnp.tile(jnp.concatenate(masks, axis=-1), (1, g, 1))[:, None]  # [B, 1, G * T, X]
  logits = jnp.concatenate(scores, axis=-1).astype(jnp.float32) / jnp.sqrt(jnp.float32(h))
  weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1).astype(q.dtype)
  out, start = 0, 0
  for val in values:
    size = val.shape[2]
    out = out + jnp.einsum("bkqs,bksh->bkqh", weights[..., start:start + size], val)
    start += size
  return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def write_cache(cache: dict, new: dict, start: jax.Array) -> dict:
  """The cache {"k", "v": [B, K, S, H]} with `new` ({"k", "v": [B, K, T, H]}) written at slots
  start[b] .. start[b] + T - 1 of each row.

  Kept apart from the attention that reads the cache: a jitted function that only writes a
  donated cache updates it in place, where one that also reads it gets it copied.
  """
  def one(c, n, s):  # one row: c [K, S, H], n [K, T, H]
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (0, s, 0))
  return {name: jax.vmap(one)(cache[name], new[name], start) for name in ("k", "v")}


class Attention(nnx.Module):

  def __init__(self, config: LlamaConfig, layer: int, *, dtype, param_dtype,
               implementation=None, rngs: nnx.Rngs):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.window = c.layer_window(layer)
    self.chunk = c.layer_chunk(layer)
    self.use_rope = c.layer_rope(layer)
    self.rope_interleaved = c.rope_interleaved
    self.l2_norm_eps = c.rms_norm_eps if c.qk_norm == "l2" and self.use_rope else None
    # Llama 4 scales the queries of its NoPE layers by a factor that grows with the position.
    self.temperature = ((float(c.floor_scale), float(c.attn_scale))
                        if c.attn_temperature_tuning and not self.use_rope else None)
    self.implementation = implementation
    kw = dict(std=c.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    self.q_proj = Linear(c.hidden_size, q, ("embed", "heads"), use_bias=c.qkv_bias, **kw)
    self.k_proj = Linear(c.hidden_size, kv, ("embed", "kv_heads"), use_bias=c.qkv_bias, **kw)
    self.v_proj = Linear(c.hidden_size, kv, ("embed", "kv_heads"), use_bias=c.qkv_bias, **kw)
    self.o_proj = Linear(q, c.hidden_size, ("heads", "embed"), use_bias=c.o_bias, **kw)
    if c.qk_norm == "rms":
      norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **norm)
      self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **norm)

  def query_scale(self, positions: jax.Array) -> jax.Array | None:
    """Llama 4's temperature [B, T, 1, 1] for queries at `positions` on a NoPE layer, or None."""
    if self.temperature is None:
      return None
    floor_scale, attn_scale = self.temperature
    p = positions.astype(jnp.float32)
    scale = jnp.log1p(jnp.floor((p + 1.0) / floor_scale)) * attn_scale + 1.0
    return scale[:, :, None, None]

  def _qk(self, q, k, cos, sin, positions):
    if hasattr(self, "q_norm"):
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      q = apply_rope(q, cos, sin, interleaved=self.rope_interleaved)
      k = apply_rope(k, cos, sin, interleaved=self.rope_interleaved)
    if self.l2_norm_eps is not None:
      q, k = rms_normalize(q, self.l2_norm_eps), rms_normalize(k, self.l2_norm_eps)
    scale = self.query_scale(positions)
    if scale is not None:
      q = (q * scale).astype(q.dtype)
    return q, k

  def __call__(self, x, cos, sin, segment_ids=None, cache=None, positions=None,
               token_positions=None):
    """Self-attention over x [B, T, D].

    With `positions` [B, T] given, x holds new tokens at those positions (consecutive in each
    row) after the earlier ones in `cache` ({"k", "v": [B, K, S, H]}, None for none), and the
    result is (output, the new tokens' {"k", "v": [B, K, T, H]}) for `write_cache`.
    token_positions [B, T]: the tokens' positions without a cache, for the NoPE layers'
    temperature (default 0..T-1).
    """
    b, t, _ = x.shape
    # The names let a remat policy keep these activations (zoo.models.llama.SAVEABLE).
    q = checkpoint_name(self.q_proj(x), "q_proj").reshape(b, t, self.num_heads, self.head_dim)
    k = checkpoint_name(self.k_proj(x), "k_proj").reshape(b, t, self.num_kv_heads,
                                                          self.head_dim)
    v = checkpoint_name(self.v_proj(x), "v_proj").reshape(b, t, self.num_kv_heads,
                                                          self.head_dim)
    if positions is None:
      if token_positions is None and self.temperature is not None:
        token_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      q, k = self._qk(q, k, cos, sin, token_positions)
      out = dot_product_attention(q, k, v, segment_ids=segment_ids, window=self.window,
                                  chunk=self.chunk,
                                  implementation=self.implementation)  # [B, T, N, H]
      return checkpoint_name(self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)),
                             "o_proj")
    q, k = self._qk(q, k, cos, sin, positions)
    out = cached_attention(q, k, v, cache, positions, self.window, self.chunk)
    new = {"k": constrain(k.transpose(0, 2, 1, 3), CACHE_AXES),
           "v": constrain(v.transpose(0, 2, 1, 3), CACHE_AXES)}
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new
