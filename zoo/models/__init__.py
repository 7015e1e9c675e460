"""LLaMA-family models: the config, the presets and the Flax NNX decoder."""

from zoo.models.config import LlamaConfig, RopeScaling
from zoo.models.presets import PRESETS, get_preset

__all__ = ["LlamaConfig", "RopeScaling", "PRESETS", "get_preset"]
