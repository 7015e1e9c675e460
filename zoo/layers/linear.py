"""Linear and embedding layers whose parameters carry logical axis names.

Names follow HF (`kernel` is the transposed HF `weight`: [in, out]). The logical names are
resolved to mesh axes by the rules table in `zoo.sharding`; creating a parameter never shards it
by itself (eager sharding off), so models build the same way with or without a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Names = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init, shape, dtype, names: Names) -> nnx.Param:
  """A parameter of `shape` from `init(key, shape, dtype)`, annotated with logical `names`."""
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, shape, dtype), out_sharding=names, eager_sharding=False)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out], with the leading axes folded into one.

  The same product as `jnp.dot`; as a plain 2-D dot, XLA's CPU backend picks its fast GEMM
  (with batch axes it does not) and the gradient's dots need no transposes.
  """
  lead = x.shape[:-1]
  return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[-1])


class Linear(nnx.Module):
  """y = x @ kernel (+ bias), computed in `dtype`."""

  def __init__(self, din: int, dout: int, names: Names, *, use_bias: bool = False,
               std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.normal(std), (din, dout), param_dtype, names)
    self.bias = (param(rngs, nnx.initializers.zeros, (dout,), param_dtype, names[-1:])
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding [vocab, embed]; `attend` reuses it as a tied output projection."""

  def __init__(self, vocab: int, dim: int, *, std: float = 0.02, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, nnx.initializers.normal(std), (vocab, dim), param_dtype,
                           ("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    # x: [B, T, D] -> [B, T, V]
    return matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
