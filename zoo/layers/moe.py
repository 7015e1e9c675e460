"""Sparse mixtures of SwiGLU experts with top-k routing: Mixtral, Qwen3-MoE and Llama 4.

Routing (`config.router`):
- "softmax" (Mixtral, Qwen3-MoE): softmax over all experts in float32, keep the top k, and
  renormalise them to sum to one when `norm_topk_prob`; the weights scale the experts' outputs.
- "sigmoid" (Llama 4): the top k of the router's logits, whose sigmoids scale the experts'
  inputs; an always-on shared expert is added (`shared_expert`).

Two equivalent ways to run the experts:
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
from zoo.layers.mlp import MLP
from zoo.models.config import LlamaConfig

MOE_IMPLEMENTATIONS = ("ragged", "dense")


class Experts(nnx.Module):
  """Stacked expert weights: w1 (gate) and w3 (up) [E, D, F], w2 (down) [E, F, D]."""

  def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
    e, d, f = config.num_experts, config.hidden_size, config.expert_size
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
    self.router = config.router
    self.norm_topk_prob = config.norm_topk_prob
    self.dtype = dtype
    self.implementation = implementation
    self.gate = Linear(config.hidden_size, config.num_experts, ("embed", None),
                       std=config.initializer_range, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    self.experts = Experts(config, param_dtype=param_dtype, rngs=rngs)
    if config.shared_expert:
      self.shared_expert = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               intermediate_size=config.expert_size)

  def route(self, x):
    """Top-k expert ids [..., k], their weights [..., k] and the routing probabilities
    [..., E] (softmax routers; None for sigmoid ones) for tokens x [..., D]."""
    logits = self.gate(x)
    if self.router == "sigmoid":
      top, experts = jax.lax.top_k(logits, self.top_k)
      return experts, jax.nn.sigmoid(top.astype(jnp.float32)).astype(self.dtype), None
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, self.top_k)
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return experts, weights.astype(self.dtype), probs

  def __call__(self, x, router_mask=None):
    """The block's output for x [B, T, D]; with `router_mask` [B, T] (1 for real tokens), also
    its routing statistics for the load-balancing loss (`router_stats`)."""
    b, t, d = x.shape
    tokens = x.reshape(b * t, d).astype(self.dtype)
    experts, weights, probs = self.route(tokens)  # [N, k]
    scale_inputs = self.router == "sigmoid"
    w1, w2, w3 = (w[...].astype(self.dtype) for w in
                  (self.experts.w1, self.experts.w2, self.experts.w3))
    if self.implementation == "dense":
      combine = jnp.sum(jax.nn.one_hot(experts, self.num_experts, dtype=self.dtype)
                        * weights[..., None], axis=1)  # [N, E]
      if scale_inputs:
        inputs = tokens[:, None, :] * combine[..., None]  # [N, E, D]
        h = (jax.nn.silu(jnp.einsum("ned,edf->nef", inputs, w1))
             * jnp.einsum("ned,edf->nef", inputs, w3))
        out = jnp.sum(jnp.einsum("nef,efd->ned", h, w2), axis=1)
      else:
        h = (jax.nn.silu(jnp.einsum("nd,edf->nef", tokens, w1))
             * jnp.einsum("nd,edf->nef", tokens, w3))
        y = jnp.einsum("nef,efd->ned", h, w2)  # [N, E, D]
        out = jnp.einsum("ned,ne->nd", y, combine)
    else:
      flat = experts.reshape(-1)  # [N * k]
      order = jnp.argsort(flat, stable=True)
      rows = tokens[order // self.top_k]  # token of each (token, slot) pair, grouped by expert
      if scale_inputs:
        rows = rows * weights.reshape(-1)[order][:, None]
      sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
      h = (jax.nn.silu(jax.lax.ragged_dot(rows, w1, sizes))
           * jax.lax.ragged_dot(rows, w3, sizes))
      y_sorted = jax.lax.ragged_dot(h, w2, sizes)  # [N * k, D]
      y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(b * t, self.top_k, d)
      out = jnp.sum(y if scale_inputs else y * weights[..., None], axis=1)
    if hasattr(self, "shared_expert"):
      out = out + self.shared_expert(tokens)
    out = out.reshape(b, t, d)
    if router_mask is None:
      return out
    return out, router_stats(experts, probs, router_mask.reshape(-1), self.num_experts)


def router_stats(experts, probs, mask, num_experts: int) -> jax.Array:
  """float32 [2E + 1]: the (masked) count of top-k picks of each expert, the sum of each
  expert's routing probability, and the number of tokens, over one layer's tokens. Summed
  over the layers they give `load_balancing_loss`."""
  mask = mask.astype(jnp.float32)
  counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
                   * mask[:, None, None], axis=(0, 1))
  return jnp.concatenate([counts, jnp.sum(probs * mask[:, None], axis=0), jnp.sum(mask)[None]])


def load_balancing_loss(stats: jax.Array, num_experts: int) -> jax.Array:
  """The auxiliary loss of Switch Transformers as transformers computes it for Mixtral and
  Qwen3-MoE (`router_aux_loss_coef`): E * sum_e f_e P_e, with f_e the share of top-k picks and
  P_e the mean routing probability of expert e over every MoE layer's tokens."""
  e = num_experts
  rows = jnp.maximum(stats[2 * e], 1.0)
  return e * jnp.sum((stats[:e] / rows) * (stats[e:2 * e] / rows))
