"""Rotary position embeddings in the rotate-half layout of HF, with the scaling variants that
transformers implements for this family: linear, dynamic NTK, llama3 and YaRN.

The frequency formulas follow the papers and transformers' `modeling_rope_utils` numerically
(float32 throughout), since logits must match the reference to float32 rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.config import LlamaConfig


def base_inv_freq(base, dim: int) -> np.ndarray:
  """The unscaled rotary frequencies [dim // 2], float32: base ** -(2i / dim)."""
  exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
  return (1.0 / (np.float32(base) ** exponents)).astype(np.float32)


def llama3_inv_freq(inv_freq: np.ndarray, s) -> np.ndarray:
  """`inv_freq` under llama3 rope scaling `s` (a RopeScaling), float32."""
  # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
  old_len = s.original_max_position_embeddings
  low_wavelen = old_len / s.low_freq_factor
  high_wavelen = old_len / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq).astype(np.float32)
  smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(base, dim: int, s) -> tuple[np.ndarray, float]:
  factor = s.factor
  original = s.original_max_position_embeddings

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if s.attention_factor is not None:
    attention_factor = s.attention_factor
  elif s.mscale and s.mscale_all_dim:
    attention_factor = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
  else:
    attention_factor = mscale(factor)
  beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

  def correction_dim(rotations):
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.truncate is None or s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = (1 - ramp).astype(np.float32)
  pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
  return inv_freq.astype(np.float32), float(attention_factor)


def rope_frequencies(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, float]:
  """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scale for `positions`.

  Dynamic NTK depends on the longest position in the batch (as in transformers), so it is
  computed from `positions` inside the trace; every other type is a constant.
  """
  dim, base, s = config.head_dim, config.rope_theta, config.rope_scaling
  kind = s.rope_type if s is not None else "default"
  if kind == "default":
    return jnp.asarray(base_inv_freq(base, dim)), 1.0
  if kind == "linear":
    return jnp.asarray(base_inv_freq(base, dim) / np.float32(s.factor)), 1.0
  if kind == "llama3":
    return jnp.asarray(llama3_inv_freq(base_inv_freq(base, dim), s)), 1.0
  if kind == "yarn":
    inv_freq, attention_factor = _yarn(base, dim, s)
    return jnp.asarray(inv_freq), attention_factor
  if kind == "dynamic":
    max_len = config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_len).astype(jnp.float32)
    grown = base * ((s.factor * seq_len / max_len) - (s.factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (grown ** exponents), 1.0
  raise ValueError(f"unknown rope type {kind!r}")


def rope_cos_sin(config: LlamaConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [B, T, head_dim] for integer `positions` [B, T]."""
  inv_freq, scale = rope_frequencies(config, positions)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim // 2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = False
               ) -> jax.Array:
  """Rotates x [B, T, heads, head_dim] by the tables [B, T, head_dim]: feature i with feature
  i + head_dim / 2 (rotate-half layout, HF's), or feature 2i with 2i + 1 (`interleaved`, the
  complex-number rotation of Meta's code that HF keeps for Llama 4)."""
  # Both halves of the tables are equal, so the rotation is done half by half.
  half = x.shape[-1] // 2
  c, s = cos[:, :, None, :half], sin[:, :, None, :half]
  if interleaved:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
