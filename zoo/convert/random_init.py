"""Randomly initialised checkpoints of a preset (`zoo init`, tests and benchmarks): a model
built with its own initialisers, written in any format the converters write."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from flax import nnx

from zoo.convert.checkpoint import convert, save_params
from zoo.errors import ZooError
from zoo.models.llama import Llama, params_of
from zoo.models.presets import get_preset


def init_checkpoint(preset: str, dst: str, *, to: str = "zoo", seed: int = 0,
                    dtype: str | None = None, force: bool = False, std: float | None = None,
                    overrides: dict | None = None):
  """Writes a randomly initialised model of `preset` (its fields replaced by `overrides`) to
  `dst` in format `to`. `std`: every weight drawn with this std, norms as 1 + N(0, std)."""
  try:
    config = get_preset(preset, **(overrides or {}))
  except TypeError as e:
    raise ZooError(f"bad --set: {e}") from None
  if std is not None:
    config = config.replace(initializer_range=std)
  params = {k: np.asarray(v) for k, v in params_of(Llama(config, rngs=nnx.Rngs(seed))).items()}
  if std is not None:  # norms too, so that a mis-mapped norm cannot hide behind ones
    rng = np.random.default_rng(seed)
    for name in params:
      if name.endswith(".scale"):
        params[name] = (1 + std * rng.standard_normal(params[name].shape)).astype(np.float32)
  if to == "zoo":
    save_params(config, params, dst, force=force, dtype=dtype)
    return
  with tempfile.TemporaryDirectory() as tmp:
    save_params(config, params, os.path.join(tmp, "zoo"), dtype=dtype)
    convert(os.path.join(tmp, "zoo"), dst, to, force=force)


__all__ = ["init_checkpoint"]
