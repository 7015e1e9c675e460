"""Grouped-query self-attention with causal, sliding-window and packed-segment masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers.linear import Linear
from zoo.layers.rope import apply_rope
from zoo.models.config import LlamaConfig


def attention_mask(length: int, segment_ids: jax.Array | None, window: int | None):
  """Boolean mask [B or 1, 1, T, T]: causal, within `window`, and within one segment."""
  i = jnp.arange(length)[:, None]
  j = jnp.arange(length)[None, :]
  mask = j <= i
  if window is not None:
    mask &= i - j < window
  mask = mask[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def dot_product_attention(q, k, v, *, segment_ids=None, window=None, implementation=None):
  """Causal attention. q: [B, T, N, H], k and v: [B, T, K, H] with N a multiple of K.

  Plain causal and sliding-window attention go to `jax.nn.dot_product_attention` without a
  mask, so the fused kernels (cuDNN) can serve them; packed segments need an explicit mask.
  """
  if segment_ids is None:
    window_size = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window_size,
                                        implementation=implementation)
  mask = attention_mask(q.shape[1], segment_ids, window)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class Attention(nnx.Module):

  def __init__(self, config: LlamaConfig, layer: int, *, dtype, param_dtype,
               implementation=None, rngs: nnx.Rngs):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.window = c.layer_window(layer)
    self.implementation = implementation
    kw = dict(std=c.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    self.q_proj = Linear(c.hidden_size, q, ("embed", "heads"), use_bias=c.qkv_bias, **kw)
    self.k_proj = Linear(c.hidden_size, kv, ("embed", "kv_heads"), use_bias=c.qkv_bias, **kw)
    self.v_proj = Linear(c.hidden_size, kv, ("embed", "kv_heads"), use_bias=c.qkv_bias, **kw)
    self.o_proj = Linear(q, c.hidden_size, ("heads", "embed"), use_bias=c.o_bias, **kw)

  def __call__(self, x, cos, sin, segment_ids=None):
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = dot_product_attention(q, k, v, segment_ids=segment_ids, window=self.window,
                                implementation=self.implementation)  # [B, T, N, H]
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
