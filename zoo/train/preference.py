"""Preference tuning: the DPO family's losses, and the train and eval steps that compute them.

A batch holds pairs, [B, 2, T] arrays (zoo.data.preference): row 0 of a pair is the prompt with
the chosen completion, row 1 with the rejected one, weighted 1 on the completion's targets. Both
rows go through the model as one batch of 2B rows, so one forward pass serves the pair. A
sequence's log-probability is the sum of its completion tokens' log-probabilities (`logps`).

With pi the policy's and r the reference's log-probabilities of the chosen (c) and rejected (w)
completions, n their token counts, beta, label smoothing e and SimPO's margin gamma:

  sigmoid (DPO)   d = (pi_c - r_c) - (pi_w - r_w);  -(1 - e) log s(beta d) - e log s(-beta d)
  ipo             d = (pi_c - r_c) / n_c - (pi_w - r_w) / n_w;  (d - 1 / (2 beta))^2
  hinge           d as sigmoid;  max(0, 1 - beta d)
  simpo           d = pi_c / n_c - pi_w / n_w;  -(1 - e) log s(beta d - gamma) - e log s(...)

as TRL computes them (DPOTrainer: sigmoid, hinge, ipo normalised by the completions' lengths;
CPOTrainer's simpo; label smoothing as TRL's conservative DPO had it). The rewards are
beta (pi - r) (SimPO: beta pi / n), and the loss is the pairs' mean plus sft_weight times the
chosen completions' mean token NLL over the batch (RPO; TRL's "sft" loss term).

The reference is never differentiated: a second frozen tree for a full fine-tune, the LoRA base
with the adapters off (the plain model's graph over the base tree), or a LoRA run's own
reference tree; SimPO has none.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zoo.errors import ZooError
from zoo.lora import set_dropout_rng
from zoo.models.loss import chunk_sums, token_losses

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
# What every step reports besides the optimizer's lr and grad_norm (per logged step).
PAIR_METRICS = ("dpo_loss", "rewards_chosen", "rewards_rejected", "reward_margin",
                "reward_accuracy", "logps_chosen", "logps_rejected")


@dataclasses.dataclass(frozen=True)
class DpoSpec:
  loss: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  sft_weight: float = 0.0
  gamma: float = 0.5
  reference: str = ""  # a checkpoint; "": init_from's (or the LoRA base with adapters off)

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ZooError(f"unknown dpo.loss {self.loss!r}; use {', '.join(LOSSES)}")
    if not (self.beta > 0 and math.isfinite(self.beta)):
      raise ZooError(f"dpo.beta must be positive, got {self.beta!r}")
    if not 0 <= self.label_smoothing < 0.5:
      raise ZooError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
    if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
      raise ZooError(f"dpo.label_smoothing applies to the sigmoid and simpo losses, not "
                     f"{self.loss}")
    if not (self.sft_weight >= 0 and math.isfinite(self.sft_weight)):
      raise ZooError(f"dpo.sft_weight must be >= 0, got {self.sft_weight!r}")
    if not math.isfinite(self.gamma):
      raise ZooError(f"dpo.gamma must be a number, got {self.gamma!r}")

  @property
  def uses_reference(self) -> bool:
    return self.loss != "simpo"


def dpo_spec(config) -> DpoSpec | None:
  """The run's DpoSpec, or None when it does not tune on preferences (data.format)."""
  if config.data.format != "preference":
    return None
  d = config.dpo
  return DpoSpec(loss=str(d.loss), beta=float(d.beta), label_smoothing=float(d.label_smoothing),
                 sft_weight=float(d.sft_weight), gamma=float(d.gamma),
                 reference=str(d.reference or ""))


def pair_losses(spec: DpoSpec, logps: jax.Array, ref_logps: jax.Array | None,
                counts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, chosen reward, rejected reward), each [B], of pairs whose policy log-probabilities
  are `logps` [B, 2] (chosen, rejected), the reference's `ref_logps` [B, 2] (None for SimPO),
  and completion token counts `counts` [B, 2]."""
  logps = logps.astype(jnp.float32)
  n = jnp.maximum(counts.astype(jnp.float32), 1.0)
  beta, eps = spec.beta, spec.label_smoothing
  if spec.loss == "simpo":
    avg = logps / n
    rewards = beta * avg
    z = beta * (avg[:, 0] - avg[:, 1]) - spec.gamma
    loss = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    rewards = jax.lax.stop_gradient(rewards)
    return loss, rewards[:, 0], rewards[:, 1]
  ratios = logps - ref_logps.astype(jnp.float32)  # [B, 2]
  rewards = jax.lax.stop_gradient(beta * ratios)
  if spec.loss == "ipo":
    avg = ratios / n
    loss = jnp.square(avg[:, 0] - avg[:, 1] - 1 / (2 * beta))
  else:
    z = beta * (ratios[:, 0] - ratios[:, 1])
    if spec.loss == "hinge":
      loss = jax.nn.relu(1 - z)
    else:
      loss = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  return loss, rewards[:, 0], rewards[:, 1]


def _rows(batch: dict) -> dict:
  """[B, 2, T] pair arrays -> [2B, T] rows (pair i's chosen at 2i, rejected at 2i + 1)."""
  return {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}


def _row_logps(model, rows: dict, loss_chunk: int) -> jax.Array:
  """Each row's sum of weighted target log-probabilities [N], float32; the logits made
  `loss_chunk` tokens at a time (recomputed in the backward pass) when 0 < chunk < T."""
  hidden = model.hidden_states(rows["tokens"], rows["positions"], rows["segment_ids"])

  def sums(h, targets, weights):
    nll, _ = token_losses(model.head(h), targets)
    return -jnp.sum(nll * weights.astype(jnp.float32), axis=-1)

  return chunk_sums(sums, hidden, (rows["targets"], rows["weights"]), loss_chunk)


def sequence_logps(graphdef: nnx.GraphDef, trees: tuple, batch: dict, *,
                   dropout_rng: jax.Array | None = None, loss_chunk: int = 0) -> jax.Array:
  """log-probabilities [B, 2] of each pair's chosen and rejected completion under the model
  `graphdef` with `trees` (params, or LoRA adapters and base), in one forward pass."""
  model = nnx.merge(graphdef, *trees)
  if dropout_rng is not None:
    set_dropout_rng(model, dropout_rng)
  b = batch["tokens"].shape[0]
  return _row_logps(model, _rows(batch), loss_chunk).reshape(b, 2)


@dataclasses.dataclass(frozen=True)
class PairModels:
  """How a step reaches the policy and the reference.

  The step's frozen inputs are `frozen` = (LoRA base,)? + (reference tree,)?: `lora` says the
  first is there, `own_reference` the second. The policy is `graphdef` over (params, *base);
  the reference is `ref_graphdef` over its own tree, or over the LoRA base (adapters off)."""
  graphdef: nnx.GraphDef
  ref_graphdef: nnx.GraphDef | None  # None: no reference (SimPO)
  lora: bool
  own_reference: bool

  def policy_trees(self, params, frozen: tuple) -> tuple:
    return (params, frozen[0]) if self.lora else (params,)

  def reference_tree(self, frozen: tuple):
    if self.ref_graphdef is None:
      return None
    return frozen[-1] if self.own_reference else frozen[0]


def _pair_counts(batch: dict) -> tuple[jax.Array, jax.Array]:
  """The completions' token counts [B, 2], and which pairs are real [B] (padding pairs, in a
  last eval batch, have none)."""
  counts = jnp.sum(batch["weights"].astype(jnp.float32), axis=-1)
  return counts, (counts[:, 0] > 0) & (counts[:, 1] > 0)


def _sums(spec: DpoSpec, logps, ref_logps, batch) -> dict:
  """The batch's sums that the loss and the metrics are made of."""
  counts, real = _pair_counts(batch)
  w = real.astype(jnp.float32)
  loss, chosen, rejected = pair_losses(spec, logps, ref_logps, counts)
  loss = jnp.where(real, loss, 0.0)
  stop = jax.lax.stop_gradient
  return {"dpo": jnp.sum(loss), "pairs": jnp.sum(w),
          "chosen_nll": -jnp.sum(logps[:, 0] * w), "chosen_tokens": jnp.sum(counts[:, 0] * w),
          "rewards_chosen": jnp.sum(chosen * w), "rewards_rejected": jnp.sum(rejected * w),
          "correct": jnp.sum((chosen > rejected) * w),
          "logps_chosen": jnp.sum(stop(logps[:, 0]) * w),
          "logps_rejected": jnp.sum(stop(logps[:, 1]) * w),
          "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))}


def _objective(spec: DpoSpec, sums: dict, pairs, chosen_tokens) -> jax.Array:
  total = sums["dpo"] / jnp.maximum(pairs, 1.0)
  if spec.sft_weight:
    total = total + spec.sft_weight * sums["chosen_nll"] / jnp.maximum(chosen_tokens, 1.0)
  return total


def _metrics(spec: DpoSpec, sums: dict) -> dict:
  """Means over the pairs (and the loss) from summed parts."""
  pairs = jnp.maximum(sums["pairs"], 1.0)
  out = {"dpo_loss": sums["dpo"] / pairs,
         "loss": _objective(spec, sums, sums["pairs"], sums["chosen_tokens"]),
         "rewards_chosen": sums["rewards_chosen"] / pairs,
         "rewards_rejected": sums["rewards_rejected"] / pairs,
         "reward_accuracy": sums["correct"] / pairs,
         "logps_chosen": sums["logps_chosen"] / pairs,
         "logps_rejected": sums["logps_rejected"] / pairs}
  out["reward_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
  return out


def reference_logps(models: PairModels, frozen: tuple, batch: dict, loss_chunk: int = 0):
  """The reference's log-probabilities [B, 2] of the batch (None without a reference)."""
  tree = models.reference_tree(frozen)
  if tree is None:
    return None
  return jax.lax.stop_gradient(
      sequence_logps(models.ref_graphdef, (tree,), batch, loss_chunk=loss_chunk))


def pair_objective(spec: DpoSpec, models: PairModels, params, batch: dict, frozen: tuple, *,
                   key: jax.Array | None = None, loss_chunk: int = 0,
                   pairs: jax.Array | None = None, chosen_tokens: jax.Array | None = None):
  """(objective, sums) of `batch` under `params`: the loss whose gradient the train step takes.
  `pairs` and `chosen_tokens` are the whole batch's counts (for microbatches); by default the
  batch's own."""
  ref = reference_logps(models, frozen, batch, loss_chunk)
  logps = sequence_logps(models.graphdef, models.policy_trees(params, frozen), batch,
                         dropout_rng=key, loss_chunk=loss_chunk)
  sums = _sums(spec, logps, ref, batch)
  pairs = sums["pairs"] if pairs is None else pairs
  chosen_tokens = sums["chosen_tokens"] if chosen_tokens is None else chosen_tokens
  return _objective(spec, sums, pairs, chosen_tokens), sums


def make_dpo_train_step(spec: DpoSpec, models: PairModels, tx: optax.GradientTransformation,
                        schedule: optax.Schedule, *, grad_accum: int = 1, dropout: bool = False,
                        loss_chunk: int = 0):
  """train_step(state, batch, *frozen) -> (state, metrics), as zoo.train.step's but for pairs.

  grad_accum > 1 splits the pairs into that many microbatches (every grad_accum-th pair); each
  microbatch's loss is divided by the whole batch's pair and chosen-token counts, so the
  summed gradients are the whole batch's. Metrics are of the batch before the update."""

  def objective(params, micro, frozen, key, pairs, chosen_tokens):
    return pair_objective(spec, models, params, micro, frozen, key=key, loss_chunk=loss_chunk,
                          pairs=pairs, chosen_tokens=chosen_tokens)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: dict, batch: dict, *frozen) -> tuple[dict, dict]:
    params = state["params"]
    key = None
    if dropout:
      key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    counts, real = _pair_counts(batch)
    pairs = jnp.sum(real.astype(jnp.float32))
    chosen_tokens = jnp.sum(jnp.where(real, counts[:, 0], 0.0))
    if grad_accum == 1:
      (_, sums), grads = grad_fn(params, batch, frozen, key, pairs, chosen_tokens)
    else:
      def split(x):  # [B, ...] -> [accum, B / accum, ...]
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

      def body(carry, xs):
        grads, sums = carry
        micro, i = xs
        micro_key = None if key is None else jax.random.fold_in(key, i)
        (_, s), g = grad_fn(params, micro, frozen, micro_key, pairs, chosen_tokens)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      zero_sums = jax.eval_shape(lambda: _sums(spec, jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                                               jax.tree.map(lambda x: x[:1], batch)))
      zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)
      (grads, sums), _ = jax.lax.scan(
          body, (zeros, zero_sums), (jax.tree.map(split, batch), jnp.arange(grad_accum)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state)
    metrics = _metrics(spec, sums)
    grad_norm = optax.tree.norm(grads)
    metrics.update(grad_norm=grad_norm, lr=schedule(state["step"]), tokens=sums["tokens"],
                   finite=jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm))
    return new_state, metrics

  return train_step


def make_dpo_eval_step(spec: DpoSpec, models: PairModels, *, loss_chunk: int = 0):
  """eval_step(params, batch, token_bytes, *frozen) -> the batch's sums (see `eval_metrics`);
  token_bytes is unused (the LM eval step's signature)."""
  def eval_step(params, batch: dict, token_bytes: Any, *frozen) -> dict:
    del token_bytes
    _, sums = pair_objective(spec, models, params, batch, frozen, loss_chunk=loss_chunk)
    return sums
  return eval_step


def eval_metrics(spec: DpoSpec, sums: dict) -> dict:
  """The held-out metrics (eval_*) of summed eval batches."""
  return {f"eval_{k}": float(v) for k, v in _metrics(spec, sums).items() if k != "loss"}


def evaluate(trainer, params) -> dict:
  """eval_dpo_loss, eval_reward_accuracy, eval_reward_margin, ... over train.eval_batches
  batches of held-out pairs (the split repeats if it is smaller)."""
  batches = trainer.run.data("validation")
  token_bytes = trainer.token_bytes()
  total = None
  for _ in range(trainer.run.config.train.eval_batches):
    out = jax.device_get(trainer.eval_step(params, trainer.global_batch(next(batches)),
                                           token_bytes, *trainer.frozen))
    total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)
  return eval_metrics(trainer.dpo, total)
