"""Linear and embedding layers whose parameters carry logical axis names.

Names follow HF (`kernel` is the transposed HF `weight`: [in, out]). The logical names are
resolved to mesh axes by the rules table in `zoo.sharding`; creating a parameter never shards it
by itself (eager sharding off), so models build the same way with or without a mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.kernels import gemv
from zoo.layers.quant import QTensor, dequantize, is_quantized

Names = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init, shape, dtype, names: Names) -> nnx.Param:
  """A parameter of `shape` from `init(key, shape, dtype)`, annotated with logical `names`."""
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, shape, dtype), out_sharding=names, eager_sharding=False)


def base_kernel(var: nnx.Variable, dtype) -> jax.Array:
  """A frozen weight's value in `dtype`: dequantized on the fly when it is held quantized
  (QLoRA, zoo.layers.quant)."""
  value = var.get_value()
  if isinstance(value, QTensor):
    return dequantize(value, dtype)
  return value.astype(dtype)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out], with the leading axes folded into one.

  The same product as `jnp.dot`; as a plain 2-D dot, XLA's CPU backend picks its fast GEMM
  (with batch axes it does not) and the gradient's dots need no transposes.
  """
  lead = x.shape[:-1]
  return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[-1])


def after(x: jax.Array) -> jax.Array:
  """A float32 scalar zero that XLA cannot compute before `x` exists, nor prove equal to the
  zero of another call. Adding it to an input orders work and keeps recomputations apart:
  XLA:CPU drops `optimization_barrier`, and without a data dependence it would compute every
  layer's dequantized weight at the start of the step, or merge a backward pass's
  recomputation with the forward one it repeats. (`NaN > inf` is false, so it stays zero.)"""
  return (jnp.ravel(x)[0] > jnp.inf).astype(jnp.float32)


def _tied(q: QTensor, x: jax.Array) -> QTensor:
  return dataclasses.replace(q, codes=q.codes + after(x).astype(q.codes.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def quantized_matmul(x: jax.Array, q: QTensor, dtype) -> jax.Array:
  """x [..., in] @ dequantize(q) [in, out] in `dtype`, for a frozen quantized weight.

  The weight is dequantized when x is ready and dropped after its product; the backward pass
  (which needs only x's gradient: the weight is frozen) dequantizes it again when the incoming
  gradient is ready, instead of keeping every layer's dequantized weight from forward to
  backward."""
  return matmul(x, dequantize(_tied(q, x), dtype))


def _quantized_matmul_fwd(x, q, dtype):
  return quantized_matmul(x, q, dtype), q


def _quantized_matmul_bwd(dtype, q, g):
  w = dequantize(_tied(q, g), dtype)
  dx = matmul(g, w.T)
  zero = jax.tree.map(lambda a: (np.zeros(a.shape, jax.dtypes.float0)
                                 if not jnp.issubdtype(a.dtype, jnp.inexact)
                                 else jnp.zeros_like(a)), q)
  return dx, zero


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


_tracing = threading.local()


@contextlib.contextmanager
def row_kernel():
  """Within this block, functions being traced send each float32 Linear product of a single
  row to the CPU kernel of zoo.kernels.gemv (where it is available): for decode steps, which
  only run forward and unsharded. Products of more rows, other dtypes, quantized kernels,
  adapters and the tied output embedding stay XLA's."""
  before = getattr(_tracing, "row_kernel", False)
  _tracing.row_kernel = True
  try:
    yield
  finally:
    _tracing.row_kernel = before


def linear_product(x: jax.Array, var: nnx.Variable, dtype) -> jax.Array:
  """x @ a kernel variable's value in `dtype`, dequantizing a frozen quantized kernel."""
  value = var.get_value()
  if is_quantized(value):
    return quantized_matmul(x, value, dtype)
  if (getattr(_tracing, "row_kernel", False) and math.prod(x.shape[:-1]) == 1
      and x.dtype == value.dtype == dtype == jnp.float32 and gemv.available()):
    return gemv.row_matmul(x.reshape(1, -1), value).reshape(*x.shape[:-1], value.shape[-1])
  return matmul(x, value.astype(dtype))


class Linear(nnx.Module):
  """y = x @ kernel (+ bias), computed in `dtype`."""

  def __init__(self, din: int, dout: int, names: Names, *, use_bias: bool = False,
               std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.normal(std), (din, dout), param_dtype, names)
    self.bias = (param(rngs, nnx.initializers.zeros, (dout,), param_dtype, names[-1:])
                 if use_bias else None)
    self.names = tuple(names)
    # A low-rank adapter (zoo.lora.add_lora): y += (dropout(x) @ lora_a) @ lora_b * lora_scale.
    # Dropout (peft's lora_dropout, on the adapter's input only) runs when a train step has
    # given the layer a key (zoo.lora.set_dropout_rng); otherwise the adapter is deterministic.
    self.lora_a = self.lora_b = None
    self.lora_scale = 0.0
    self.lora_dropout = 0.0
    self.lora_rng = None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = linear_product(x, self.kernel, self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      if self.lora_rng is not None and self.lora_dropout > 0:
        keep = 1.0 - self.lora_dropout
        x = jnp.where(jax.random.bernoulli(self.lora_rng, keep, x.shape), x / keep,
                      0).astype(self.dtype)
      low = matmul(x, self.lora_a[...].astype(self.dtype))
      y = y + matmul(low, self.lora_b[...].astype(self.dtype)) * self.lora_scale
    return y


class Embed(nnx.Module):
  """Token embedding [vocab, embed]; `attend` reuses it as a tied output projection."""

  def __init__(self, vocab: int, dim: int, *, std: float = 0.02, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, nnx.initializers.normal(std), (vocab, dim), param_dtype,
                           ("vocab", "embed"))
    # A low-rank adapter of the lookup (zoo.lora.add_lora): lora_a [vocab, r], lora_b [r, dim].
    self.lora_a = self.lora_b = None
    self.lora_scale = 0.0

  def __call__(self, tokens: jax.Array) -> jax.Array:
    out = jnp.take(base_kernel(self.embedding, self.dtype), tokens, axis=0)
    if self.lora_a is not None:
      low = jnp.take(self.lora_a[...].astype(self.dtype), tokens, axis=0)
      out = out + matmul(low, self.lora_b[...].astype(self.dtype)) * self.lora_scale
    return out

  def attend(self, x: jax.Array) -> jax.Array:
    # x: [B, T, D] -> [B, T, V]; the tied output projection does not see the lookup's adapter.
    return matmul(x.astype(self.dtype), base_kernel(self.embedding, self.dtype).T)
