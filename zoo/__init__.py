"""zoo: LLaMA-family models in JAX/Flax, with converters and a trainer.

    import zoo
    model = zoo.load("path/to/checkpoint")   # a zoo or HF transformers directory
    logits = model.logits(tokens)            # float32 numpy [batch, length, vocab]
"""

from __future__ import annotations

import glob
import importlib.util
import os


def _quiet_tpu_runtime():
  """libtpu (in zoo[tpu] and zoo[test], for `zoo plan`) makes JAX start the TPU runtime even on
  a host without a TPU, and the runtime, failing to learn the host's TPU from the cloud's
  metadata server, prints screens of warnings. Tell it instead (a host without a TPU); the
  runtime then finds no chip quietly and JAX goes on as before. A TPU host is left alone."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # The runtime's lock on the (absent) chips would stop a second `zoo plan` running at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_quiet_tpu_runtime()  # before anything starts JAX's backends

import numpy as np  # noqa: E402

from zoo import paths  # noqa: E402

paths.configure_storage()  # before a Cloud Storage client starts

from zoo.convert.checkpoint import load_model, save_params  # noqa: E402
from zoo.errors import ZooError  # noqa: E402
from zoo.lora import adapted_paths, load_adapter  # noqa: E402
from zoo.models.llama import params_of  # noqa: E402

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
