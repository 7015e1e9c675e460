"""The pure train step and eval step.

The train state is a plain pytree, {"step", "params", "opt_state", "rng"}, with params a pure
dict shaped like the model's NNX state. `train_step(state, batch) -> (state, metrics)` has no
side effects; the loop jits it with explicit shardings and donates the state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = dict[str, jax.Array]
State = dict[str, Any]


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood and log-partition, both float32 [B, T]."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit, log_z


def forward(graphdef: nnx.GraphDef, params: dict, batch: Batch, frozen: dict | None = None,
            dropout_rng: jax.Array | None = None) -> jax.Array:
  """Logits of the model `graphdef` with `params` (and, for LoRA, the frozen base tree; with
  `dropout_rng`, LoRA dropout on)."""
  model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
  if dropout_rng is not None:
    from zoo.lora import set_dropout_rng
    set_dropout_rng(model, dropout_rng)
  return model(batch["tokens"], batch["positions"], batch["segment_ids"])


def batch_sums(graphdef, params, batch: Batch, z_loss: float, frozen: dict | None = None,
               dropout_rng: jax.Array | None = None):
  """(objective sum, (nll sum, weight sum)) over a batch; per-token weights mask the loss."""
  nll, log_z = token_losses(forward(graphdef, params, batch, frozen, dropout_rng),
                            batch["targets"])
  w = batch["weights"].astype(jnp.float32)
  nll_sum = jnp.sum(nll * w)
  objective = nll_sum + z_loss * jnp.sum(jnp.square(log_z) * w)
  return objective, (nll_sum, jnp.sum(w))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, z_loss: float = 0.0, grad_accum: int = 1,
                    frozen: bool = False, dropout: bool = False):
  """The train step for a model graph and optimizer.

  With grad_accum > 1 the batch is split into that many microbatches (every grad_accum-th row,
  so each device keeps its own rows) whose gradient sums are added before one update; the
  result equals one step on the whole batch up to float summation order.

  frozen=True (LoRA): `graphdef` comes from `nnx.split(model, nnx.LoRAParam, nnx.Param)`, the
  state's params are the adapter tree, and the step is `train_step(state, batch, base)` with the
  frozen base tree an input that is read, never differentiated, updated or returned.

  dropout=True (LoRA dropout): each step draws its masks from a key folded from the state's
  rng and step (and the microbatch), so a resumed run draws the same masks.
  """

  def accumulate(params, batch, base=None, key=None):
    grad_fn = jax.value_and_grad(
        lambda p, b, k: batch_sums(graphdef, p, b, z_loss, base, k), has_aux=True)
    if grad_accum == 1:
      (_, (nll, weight)), grads = grad_fn(params, batch, key)
      return grads, nll, weight

    def split(x):  # [B, ...] -> [accum, B / accum, ...]
      x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
      return jnp.moveaxis(x, 1, 0)

    def body(carry, xs):
      grads, nll, weight = carry
      micro, i = xs
      (_, (n, w)), g = grad_fn(params, micro, None if key is None else jax.random.fold_in(key, i))
      return (jax.tree.map(jnp.add, grads, g), nll + n, weight + w), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, nll, weight), _ = jax.lax.scan(
        body, (zeros, 0.0, 0.0), (jax.tree.map(split, batch), jnp.arange(grad_accum)))
    return grads, nll, weight

  def train_step(state: State, batch: Batch, base: dict | None = None
                 ) -> tuple[State, dict]:
    if frozen and base is None:
      raise ValueError("this train step needs the frozen base tree")
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
    metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"]), "tokens": weight}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef):
  def eval_step(params: dict, batch: Batch, base: dict | None = None) -> dict:
    _, (nll, weight) = batch_sums(graphdef, params, batch, 0.0, base)
    return {"nll_sum": nll, "weight": weight}
  return eval_step
