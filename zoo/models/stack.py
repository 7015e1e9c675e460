"""Scanned layers: the decoder layers stacked on a leading axis, as a training layout.

A model built with `scan_layers=True` holds its decoder layers as `stack.{j}` modules whose
parameters carry a leading layer axis (logical name "layers"): `stack.{j}` holds layers
j, j + p, j + 2p, ..., where p is the period of the model's layer kinds (1 when every layer is
alike, 2 when two kinds alternate). One `jax.lax.scan` then runs the p-layer group over the
slots, so the compiled program holds p layers whatever the depth.

Files never hold this layout: zoo, HF, Meta, GGUF and peft files name layers one by one
(`layers.{i}.mlp.up_proj.kernel`). This module maps names between the two layouts; loading
(`zoo.train.checkpoint.load_tree`) fills each slot from its layer's tensor and exports slice
the slots out again (`unstack`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from zoo.models.config import LlamaConfig

STACK = "stack"
LAYER_AXIS = "layers"  # the logical name of the leading axis of a stacked parameter
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_STACKED = re.compile(rf"{STACK}\.(\d+)\.(.+)")


def layer_kinds(config: LlamaConfig) -> list[tuple]:
  """What sets each decoder layer apart from another of the same sizes (its attention window or
  chunk, rotary or not, MoE or dense): layers of one kind share a module structure and can run
  in one scan."""
  return [(config.layer_window(i), config.layer_chunk(i), config.layer_rope(i),
           config.is_moe_layer(i)) for i in range(config.num_layers)]


def scan_period(config: LlamaConfig) -> int | None:
  """The smallest p such that layer i and layer i + p are of one kind for every i, p dividing
  the depth: the group of layers one scan step runs. None when the kinds do not repeat (the
  only period is the whole depth), where scanning gains nothing and the layers stay unrolled."""
  kinds, n = layer_kinds(config), config.num_layers
  for p in range(1, n + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p if p < n or n == 1 else None
  return None


def is_stacked(name: str) -> bool:
  return name.startswith(STACK + ".")


def stacked_name(name: str, period: int) -> tuple[str, int] | None:
  """(stacked name, slot) of the per-layer name `layers.{i}.REST`, or None for a name outside
  the decoder layers."""
  m = _LAYER.fullmatch(name)
  if m is None:
    return None
  i = int(m.group(1))
  return f"{STACK}.{i % period}.{m.group(2)}", i // period


def layer_names(name: str, period: int, slots: int) -> list[str]:
  """The per-layer names of each slot of the stacked parameter `stack.{j}.REST`."""
  m = _STACKED.fullmatch(name)
  if m is None:
    raise ValueError(f"{name} is not a stacked parameter name")
  j, rest = int(m.group(1)), m.group(2)
  return [f"layers.{g * period + j}.{rest}" for g in range(slots)]


def period_of(names) -> int:
  """The period of a stacked tree, from its names: the number of `stack.{j}` groups."""
  groups = {int(m.group(1)) for m in map(_STACKED.fullmatch, names) if m}
  return len(groups) or 1


def unstack_items(flat: dict, period: int | None = None) -> Iterator[tuple[str, object]]:
  """(per-layer name, array) for every entry of a {dotted name: array} tree, stacked or not:
  a stacked entry gives one entry per slot, sliced on the host one at a time."""
  period = period or period_of(flat)
  for name, value in flat.items():
    if not is_stacked(name):
      yield name, value
      continue
    for g, layer_name in enumerate(layer_names(name, period, value.shape[0])):
      yield layer_name, value[g]


def unstack(flat: dict, period: int | None = None) -> dict:
  """A {dotted name: array} tree in per-layer names (the file layout), in layer order."""
  out = dict(unstack_items(flat, period))
  return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def stack(flat: dict, period: int) -> dict:
  """A per-layer {dotted name: array} tree in the stacked layout (numpy arrays)."""
  groups: dict[str, dict[int, object]] = {}
  out = {}
  for name, value in flat.items():
    hit = stacked_name(name, period)
    if hit is None:
      out[name] = value
    else:
      groups.setdefault(hit[0], {})[hit[1]] = value
  for name, slots in groups.items():
    out[name] = np.stack([np.asarray(slots[g]) for g in range(len(slots))])
  return out


def _order(name: str):
  m = _LAYER.fullmatch(name)
  return (0, int(m.group(1)), m.group(2)) if m else (1, 0, name)
