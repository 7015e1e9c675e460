"""Converters between zoo checkpoints and other formats (HF transformers; more to come)."""

from zoo.convert.checkpoint import FORMATS, Checkpoint, convert, detect_format, save_params

__all__ = ["FORMATS", "Checkpoint", "convert", "detect_format", "save_params"]
