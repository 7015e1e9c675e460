"""zoo: LLaMA-family models in JAX/Flax, with converters and a trainer.

    import zoo
    model = zoo.load("path/to/checkpoint")   # a zoo or HF transformers directory
    logits = model.logits(tokens)            # float32 numpy [batch, length, vocab]
"""

from __future__ import annotations

import numpy as np

from zoo.convert.checkpoint import load_model, save_params
from zoo.errors import ZooError
from zoo.lora import adapted_paths, load_adapter
from zoo.models.llama import params_of

__version__ = "0.1.0"


def load(path: str, dtype=None, param_dtype=None, adapter: str | None = None, **model_kwargs):
  """The model stored at `path` (a zoo checkpoint or an HF model directory; format detected).

  dtype is the compute dtype ("float32", "bfloat16"...; default float32); param_dtype the
  parameters' dtype in memory (default: dtype). adapter: a LoRA adapter directory (zoo's own or
  HF peft's) to apply on top. Returns a `zoo.models.llama.Llama` with `.config` and
  `.logits(tokens)`.
  """
  model = load_model(path, dtype=dtype or "float32", param_dtype=param_dtype, **model_kwargs)
  if adapter is not None:
    load_adapter(model, adapter)
  return model


def save(model, path: str, *, dtype: str | None = None, force: bool = False):
  """Writes `model` as a zoo checkpoint at `path` (parameters in their dtype, or `dtype`)."""
  if adapted_paths(model):
    raise ZooError("the model has LoRA adapters: save them with zoo.lora.save_adapter, or save "
                   "zoo.lora.merged_model(model)")
  params = {name: np.asarray(value) for name, value in params_of(model).items()}
  save_params(model.config, params, path, force=force, dtype=dtype)


__all__ = ["load", "save", "__version__"]
