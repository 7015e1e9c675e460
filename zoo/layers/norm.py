"""RMSNorm, with the float32 statistics and cast order of the reference implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers.linear import param


def rms_normalize(x: jax.Array, eps: float, dtype=None) -> jax.Array:
  """x / rms(x) over the last axis, computed in float32 and returned in `dtype` (default x's;
  without a weight, it is the norm Llama 4 applies to q and k)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return x32.astype(dtype or x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    # HF casts back to the activation dtype before scaling; so do we, for bf16 parity.
    return self.scale[...].astype(self.dtype) * rms_normalize(x, self.eps, self.dtype)
