"""Converters between zoo checkpoints and other formats (HF transformers, Meta consolidated)."""

from zoo.convert.checkpoint import FORMATS, Checkpoint, convert, detect_format, save_params

__all__ = ["FORMATS", "Checkpoint", "convert", "detect_format", "save_params"]
