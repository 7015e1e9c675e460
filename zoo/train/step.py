"""The train state, the pure train step and the eval step.

The train state is a plain pytree, {"step", "params", "opt_state", "rng"}, with params a pure
dict shaped like the model's NNX state (for LoRA: the adapter tree). `init_state` makes one;
`train_step(state, batch[, base]) -> (state, metrics)` has no side effects; the loop jits it
with explicit shardings and donates the state.

LoRA: `graphdef` comes from `nnx.split(model, nnx.LoRAParam, nnx.Param)`, the state's params
are the adapters, and the frozen `base` tree is an extra input of every step: read, never
differentiated, updated or returned.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zoo.layers.moe import load_balancing_loss
from zoo.lora import set_dropout_rng
from zoo.models.loss import Batch, byte_sum, chunked_loss_sums

State = dict[str, Any]


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> State:
  """Step 0 of training `params` with `tx`: a fresh optimizer state and the run's RNG (the
  key that LoRA dropout folds each step into)."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.key_data(jax.random.key(seed + 1))}


def state_shardings(tx: optax.GradientTransformation, params: dict, param_shardings: dict,
                    replicated: jax.sharding.Sharding) -> State:
  """The shardings of `init_state(params, tx, ...)`: optimizer statistics follow their
  parameter; factored ones (Adafactor's, not the parameter's shape) and scalars replicate.
  `params` may be abstract (ShapeDtypeStructs)."""
  abstract_opt = jax.eval_shape(tx.init, params)

  def like_param(leaf, param_sharding, param):
    return param_sharding if getattr(leaf, "shape", None) == param.shape else replicated

  opt = optax.tree_map_params(tx, like_param, abstract_opt, param_shardings, params,
                              transform_non_params=lambda _: replicated)
  return {"step": replicated, "params": param_shardings, "opt_state": opt, "rng": replicated}


def _model(graphdef: nnx.GraphDef, params: dict, base: dict | None, dropout_rng):
  trees = (params,) if base is None else (params, base)
  try:
    model = nnx.merge(graphdef, *trees)
  except ValueError as e:
    raise ValueError(f"the parameters do not fill the model graph ({str(e).splitlines()[0]}); "
                     "a LoRA step takes the frozen base tree as its third argument") from None
  if dropout_rng is not None:
    set_dropout_rng(model, dropout_rng)
  return model


def forward(graphdef: nnx.GraphDef, params: dict, batch: Batch, base: dict | None = None,
            dropout_rng: jax.Array | None = None) -> jax.Array:
  """Logits [B, T, V] of the model `graphdef` with `params` (and the LoRA base; with
  `dropout_rng`, LoRA dropout on)."""
  model = _model(graphdef, params, base, dropout_rng)
  return model(batch["tokens"], batch["positions"], batch["segment_ids"])


def batch_loss_sums(graphdef: nnx.GraphDef, params: dict, batch: Batch, base: dict | None = None,
                    dropout_rng: jax.Array | None = None, *, z_loss: float = 0.0,
                    loss_chunk: int = 0, router_aux: float = 0.0
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`loss_sums(forward(...), batch, z_loss)`, the logits made `loss_chunk` tokens of each row
  at a time (0: all at once; zoo.models.loss.chunked_loss_sums). router_aux > 0 adds that
  multiple of an MoE model's load-balancing loss to the objective's mean."""
  model = _model(graphdef, params, base, dropout_rng)
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  if not router_aux:
    return chunked_loss_sums(model.head, model.hidden_states(*args), batch, z_loss, loss_chunk)
  hidden, stats = model.hidden_states(*args, router_stats=True)
  total, nll, weight = chunked_loss_sums(model.head, hidden, batch, z_loss, loss_chunk)
  aux = load_balancing_loss(stats, model.config.num_experts)
  return total + router_aux * aux * weight, nll, weight


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, z_loss: float = 0.0, grad_accum: int = 1,
                    dropout: bool = False, loss_chunk: int = 0, router_aux: float = 0.0):
  """The train step for a model graph and optimizer.

  With grad_accum > 1 the batch is split into that many microbatches (every grad_accum-th row,
  so each device keeps its own rows) whose gradient sums are added before one update; the
  result equals one step on the whole batch up to float summation order.

  dropout=True (LoRA dropout): each step draws its masks from a key folded from the state's
  rng and step (and the microbatch), so a resumed run draws the same masks.

  loss_chunk > 0 makes the logits that many tokens of each row at a time (batch_loss_sums);
  router_aux > 0 adds the MoE load-balancing loss with that coefficient.
  """

  def objective(params, batch, base, key):
    total, nll, weight = batch_loss_sums(graphdef, params, batch, base, key, z_loss=z_loss,
                                         loss_chunk=loss_chunk, router_aux=router_aux)
    return total, (nll, weight)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def accumulate(params, batch, base, key):
    if grad_accum == 1:
      (_, (nll, weight)), grads = grad_fn(params, batch, base, key)
      return grads, nll, weight

    def split(x):  # [B, ...] -> [accum, B / accum, ...]
      x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
      return jnp.moveaxis(x, 1, 0)

    def body(carry, xs):
      grads, nll, weight = carry
      micro, i = xs
      micro_key = None if key is None else jax.random.fold_in(key, i)
      (_, (n, w)), g = grad_fn(params, micro, base, micro_key)
      return (jax.tree.map(jnp.add, grads, g), nll + n, weight + w), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, nll, weight), _ = jax.lax.scan(
        body, (zeros, 0.0, 0.0), (jax.tree.map(split, batch), jnp.arange(grad_accum)))
    return grads, nll, weight

  def train_step(state: State, batch: Batch, base: dict | None = None
                 ) -> tuple[State, dict]:
    params = state["params"]
    key = None
    if dropout:
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, nll, weight = accumulate(params, batch, base, key)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state)
    loss, grad_norm = nll / denom, optax.tree.norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "tokens": weight, "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, *, loss_chunk: int = 0):
  """eval_step(params, batch, token_bytes, base=None) -> {"nll_sum", "weight", "bytes"}:
  sums over the batch, with the UTF-8 bytes its targets stand for (for bits per byte)."""
  def eval_step(params: dict, batch: Batch, token_bytes: jax.Array, base: dict | None = None
                ) -> dict:
    _, nll, weight = batch_loss_sums(graphdef, params, batch, base, loss_chunk=loss_chunk)
    return {"nll_sum": nll, "weight": weight, "bytes": byte_sum(batch, token_bytes)}
  return eval_step
