"""Optimizers and learning-rate schedules from the `optimizer` config section.

The section (an ml_collections ConfigDict or any mapping) has the fields of `default_config()`:
name ("adamw" | "adafactor" | "lion"), lr (the peak), b1, b2, eps, weight_decay,
schedule ("cosine" | "linear" | "constant"), warmup_steps, min_lr_ratio, grad_clip (max global
norm, 0 = off) and decay_norms_and_biases. Missing fields take the defaults.

`make_optimizer(opt, total_steps)` returns the pair `(tx, schedule)`: the trainer needs the
schedule to log the learning rate, and `schedule(n)` is the rate of the update that follows n
earlier updates (optax's own count), so the step logs `schedule(state_step_before_update)`.
`make_schedule(opt, total_steps)` gives the same schedule alone.

Weight decay is decoupled and scaled by the scheduled learning rate in all three optimizers,
as torch.optim.AdamW does: each update subtracts lr(t) * weight_decay * param.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import optax

from zoo.errors import ZooError

OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "constant")


def default_config() -> ml_collections.ConfigDict:
  """The optimizer section with every field at its default: the one table of them (the
  training config's `optimizer` section starts from it)."""
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, schedule="cosine",
      warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0, decay_norms_and_biases=False))


def _fields(opt, total_steps) -> dict[str, Any]:
  """The section's values over the defaults, checked; a bad value names its field."""
  values = default_config().to_dict()
  for key in opt.keys():
    if key not in values:
      raise ZooError(f"unknown optimizer field optimizer.{key} (fields: {', '.join(values)})")
    values[key] = opt[key]
  v = values

  def need(ok, field, msg):
    if not ok:
      raise ZooError(f"optimizer.{field} {msg}")

  def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

  def integer(x):
    return isinstance(x, int) and not isinstance(x, bool)

  need(v["name"] in OPTIMIZERS, "name", f"{v['name']!r} is not one of {', '.join(OPTIMIZERS)}")
  need(v["schedule"] in SCHEDULES, "schedule",
       f"{v['schedule']!r} is not one of {', '.join(SCHEDULES)}")
  need(number(v["lr"]) and v["lr"] > 0, "lr", f"must be a positive number, got {v['lr']!r}")
  for field in ("b1", "b2"):
    need(number(v[field]) and 0 <= v[field] < 1, field, f"must be in [0, 1), got {v[field]!r}")
  for field in ("eps", "weight_decay", "grad_clip"):
    need(number(v[field]) and v[field] >= 0, field, f"must be >= 0, got {v[field]!r}")
  need(number(v["min_lr_ratio"]) and 0 <= v["min_lr_ratio"] <= 1, "min_lr_ratio",
       f"must be in [0, 1], got {v['min_lr_ratio']!r}")
  need(isinstance(v["decay_norms_and_biases"], bool), "decay_norms_and_biases",
       f"must be true or false, got {v['decay_norms_and_biases']!r}")
  if not (integer(total_steps) and total_steps > 0):
    raise ZooError(f"train.steps must be a positive integer, got {total_steps!r}")
  need(integer(v["warmup_steps"]) and v["warmup_steps"] >= 0, "warmup_steps",
       f"must be a non-negative integer, got {v['warmup_steps']!r}")
  need(v["warmup_steps"] <= total_steps, "warmup_steps",
       f"({v['warmup_steps']}) is longer than training ({total_steps} steps)")
  return v


def make_schedule(opt, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to opt.lr over warmup_steps, then the named decay until total_steps.

  cosine and linear end at lr * min_lr_ratio (reached at step total_steps); constant stays at lr.
  """
  v = _fields(opt, total_steps)
  lr, warmup = v["lr"], v["warmup_steps"]
  # A warmup as long as training never reaches the decay; keep its length valid for optax.
  decay_steps = max(total_steps - warmup, 1)
  if v["schedule"] == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=v["min_lr_ratio"])
  elif v["schedule"] == "linear":
    decay = optax.linear_schedule(lr, lr * v["min_lr_ratio"], decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_name(path) -> str:
  """zoo's dotted name ("layers.0.mlp.up_proj.kernel") of a jax key path into a parameter tree.

  Works for pure dicts and for nnx.State, whose leaves sit under a trailing `.value`.
  """
  names = [_key_name(k) for k in path]
  if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return ".".join(names)


def decay_mask(params, decay_norms_and_biases: bool = False):
  """A tree of bools like `params`: True where weight decay applies.

  Norm scales (".scale"), biases (".bias") and every other parameter with fewer than two
  dimensions are excluded unless `decay_norms_and_biases`; matrices and embeddings are decayed.
  A stacked parameter (scanned layers, `stack.{j}....`) counts the dimensions of one layer's.
  """
  def decays(path, leaf) -> bool:
    if decay_norms_and_biases:
      return True
    name = param_name(path)
    if name.endswith(".scale") or name.endswith(".bias") or name in ("scale", "bias"):
      return False
    return len(getattr(leaf, "shape", ())) - name.startswith("stack.") >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule): global-norm clipping (if grad_clip > 0), then the named optimizer.

  adamw and lion take b1, b2 (and adamw eps) as named. adafactor keeps optax's own second-moment
  decay and eps, whose meaning differs from Adam's b2 and eps; b1 > 0 turns on its momentum, and
  its steps are relative to each parameter's RMS (optax's multiply_by_parameter_scale).
  """
  v = _fields(opt, total_steps)
  schedule = make_schedule(opt, total_steps)
  wd = v["weight_decay"]

  def mask(params):
    return decay_mask(params, v["decay_norms_and_biases"])

  if v["name"] == "adamw":
    tx = optax.adamw(schedule, b1=v["b1"], b2=v["b2"], eps=v["eps"], weight_decay=wd, mask=mask)
  elif v["name"] == "lion":
    tx = optax.lion(schedule, b1=v["b1"], b2=v["b2"], weight_decay=wd, mask=mask)
  else:
    # optax adds adafactor's decay after the learning-rate scaling, so scale it here to keep
    # weight_decay meaning lr(t) * weight_decay * param as in the other optimizers.
    tx = optax.adafactor(schedule, momentum=v["b1"] or None,
                         weight_decay_rate=(lambda count: wd * schedule(count)) if wd else None,
                         weight_decay_mask=mask)
  if v["grad_clip"] > 0:
    tx = optax.chain(optax.clip_by_global_norm(v["grad_clip"]), tx)
  return tx, schedule
