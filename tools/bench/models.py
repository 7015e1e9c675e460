"""The LLaMAs the modes build, through zoo; zoo is imported inside the functions, since the
parent process stays free of it (see the package docstring)."""

from __future__ import annotations


def tiny_llama(**overrides):
  """zoo's `tiny_llama` preset with `overrides`: the base of every benchmark model."""
  from zoo.models.presets import get_preset
  return get_preset("tiny_llama", **overrides)


def write_checkpoint(dst: str, overrides: dict, to: str = "zoo"):
  """A randomly initialised `tiny_llama(**overrides)` written to `dst` in format `to`."""
  from zoo.convert.random_init import init_checkpoint
  init_checkpoint("tiny_llama", dst, to=to, overrides=overrides)
