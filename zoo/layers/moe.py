"""Mixtral's sparse mixture of SwiGLU experts with top-k routing.

Routing follows the reference: softmax over all experts in float32, keep the top k, renormalise
them to sum to one. Two equivalent ways to run the experts:
- "ragged": tokens sorted by expert and multiplied with `jax.lax.ragged_dot` (grouped matmul),
  which does only the top-k work per token;
- "dense": every expert on every token, weighted by the (mostly zero) routing weights; simplest,
  and fine for tiny models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers.linear import Linear, param
from zoo.models.config import LlamaConfig

MOE_IMPLEMENTATIONS = ("ragged", "dense")


class Experts(nnx.Module):
  """Stacked expert weights: w1 (gate) and w3 (up) [E, D, F], w2 (down) [E, F, D]."""

  def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
    e, d, f = config.num_experts, config.hidden_size, config.intermediate_size
    init = nnx.initializers.normal(config.initializer_range)
    self.w1 = param(rngs, init, (e, d, f), param_dtype, ("experts", "embed", "mlp"))
    self.w2 = param(rngs, init, (e, f, d), param_dtype, ("experts", "mlp", "embed"))
    self.w3 = param(rngs, init, (e, d, f), param_dtype, ("experts", "embed", "mlp"))


class SparseMoE(nnx.Module):

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, implementation="ragged",
               rngs: nnx.Rngs):
    if implementation not in MOE_IMPLEMENTATIONS:
      raise ValueError(f"moe implementation must be one of {MOE_IMPLEMENTATIONS}")
    self.top_k = config.num_experts_per_tok
    self.num_experts = config.num_experts
    self.dtype = dtype
    self.implementation = implementation
    self.gate = Linear(config.hidden_size, config.num_experts, ("embed", None),
                       std=config.initializer_range, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    self.experts = Experts(config, param_dtype=param_dtype, rngs=rngs)

  def route(self, x):
    """Top-k expert ids [..., k] and their renormalised weights [..., k] for tokens x [..., D]."""
    probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, self.top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return experts, weights.astype(self.dtype)

  def __call__(self, x):
    b, t, d = x.shape
    tokens = x.reshape(b * t, d).astype(self.dtype)
    experts, weights = self.route(tokens)  # [N, k]
    w1, w2, w3 = (w[...].astype(self.dtype) for w in
                  (self.experts.w1, self.experts.w2, self.experts.w3))
    if self.implementation == "dense":
      h = jax.nn.silu(jnp.einsum("nd,edf->nef", tokens, w1)) * jnp.einsum("nd,edf->nef", tokens, w3)
      y = jnp.einsum("nef,efd->ned", h, w2)  # [N, E, D]
      combine = jnp.sum(jax.nn.one_hot(experts, self.num_experts, dtype=self.dtype)
                        * weights[..., None], axis=1)  # [N, E]
      out = jnp.einsum("ned,ne->nd", y, combine)
    else:
      flat = experts.reshape(-1)  # [N * k]
      order = jnp.argsort(flat, stable=True)
      rows = tokens[order // self.top_k]  # token of each (token, slot) pair, grouped by expert
      sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
      h = (jax.nn.silu(jax.lax.ragged_dot(rows, w1, sizes))
           * jax.lax.ragged_dot(rows, w3, sizes))
      y_sorted = jax.lax.ragged_dot(h, w2, sizes)  # [N * k, D]
      y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(b * t, self.top_k, d)
      out = jnp.sum(y * weights[..., None], axis=1)
    return out.reshape(b, t, d)
