"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from zoo.layers.linear import Linear
from zoo.models.config import LlamaConfig


class MLP(nnx.Module):

  def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
               intermediate_size: int | None = None):
    c = config
    f = intermediate_size or c.intermediate_size
    kw = dict(use_bias=c.mlp_bias, std=c.initializer_range, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(c.hidden_size, f, ("embed", "mlp"), **kw)
    self.up_proj = Linear(c.hidden_size, f, ("embed", "mlp"), **kw)
    self.down_proj = Linear(f, c.hidden_size, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
