"""HF peft's LoRA adapter files: `adapter_config.json` + `adapter_model.safetensors`, the
format `peft.PeftModel.from_pretrained` and vLLM read.

Both directions work on plain arrays under zoo's names ({module path.lora_a: A [in, r],
path.lora_b: B [r, out]}) and on a spec's fields (rank, alpha, targets, dropout, rslora), so
that this module needs nothing of `zoo.lora`, which builds its adapters from them.
"""

from __future__ import annotations

import os
import re

import numpy as np
from safetensors.numpy import save

from zoo.convert.tensors import load_safetensors
from zoo.errors import ZooError
from zoo.io import read_json, write_directory

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# Spec field -> the adapter_config.json key that holds it.
SPEC_KEYS = {"rank": "r", "alpha": "lora_alpha", "targets": "target_modules",
             "dropout": "lora_dropout", "rslora": "use_rslora"}

MOE_FAMILIES = ("mixtral", "qwen3_moe", "llama4")
_PEFT_NAME = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A\.weight|"
                        r"lora_B\.weight|lora_embedding_A|lora_embedding_B)")
_PEFT_BASE = re.compile(r"base_model\.model\.(?P<module>.+)\.base_layer\.weight")


def _hf_module(path: str, family: str = "llama") -> str:
  """zoo module path -> the module's name inside transformers' model of `family` (Llama 4 calls
  its MLP and MoE blocks `feed_forward` and its router `router`; Qwen3-MoE its MoE block
  `mlp`)."""
  if path == "lm_head":
    return path
  if family == "llama4":
    path = re.sub(r"\.block_sparse_moe\.gate$", ".feed_forward.router", path)
    path = re.sub(r"\.(mlp|block_sparse_moe)\.", ".feed_forward.", path)
  elif family == "qwen3_moe":
    path = path.replace(".block_sparse_moe.", ".mlp.")
  return "model." + path


def _zoo_module(module: str, family: str = "llama") -> str:
  """The inverse of `_hf_module`."""
  path = module[len("model."):] if module.startswith("model.") else module
  if family == "llama4":
    path = re.sub(r"\.feed_forward\.router$", ".block_sparse_moe.gate", path)
    path = path.replace(".feed_forward.shared_expert.", ".block_sparse_moe.shared_expert.")
    path = path.replace(".feed_forward.", ".mlp.")
  elif family == "qwen3_moe":
    path = re.sub(r"\.mlp\.gate$", ".block_sparse_moe.gate", path)
  return path


def write_peft(weights: dict[str, np.ndarray], directory: str, spec, *,
               base_model: str | None = None, force: bool = False, family: str = "llama"):
  """Adapter arrays ({zoo path.lora_a: [in, r], path.lora_b: [r, out]}) as a peft directory:
  `adapter_config.json` and `adapter_model.safetensors` under the module names of transformers'
  model of `family`.
  `spec` is anything with rank, alpha, dropout and rslora (a `zoo.lora.LoraSpec`)."""
  if not weights:
    raise ZooError("no LoRA adapters to export")
  if family == "qwen3_moe":
    dense = sorted(n for n in weights if re.search(r"\.mlp\.(gate|up|down)_proj\.", n))
    if dense:
      raise ZooError(f"peft cannot hold the adapter {dense[0].rpartition('.')[0]}: on "
                     "transformers 5 it takes a Qwen3-MoE MLP projection's name for the "
                     "experts' fused weights; adapt the attention projections only")
  tensors, names, modules = {}, set(), set()
  for name, value in sorted(weights.items()):
    path, _, leaf = name.rpartition(".")
    module = _hf_module(path, family)
    prefix = "base_model.model." + module
    embedding = path.rsplit(".", 1)[-1] == "embed_tokens"
    kind = {("lora_a", False): ".lora_A.weight", ("lora_b", False): ".lora_B.weight",
            ("lora_a", True): ".lora_embedding_A", ("lora_b", True): ".lora_embedding_B"}
    # peft stores A [r, in] and B [out, r] (the embedding's A [r, vocab], B [dim, r]).
    tensors[prefix + kind[leaf, embedding]] = np.ascontiguousarray(
        np.asarray(value, np.float32).T)
    names.add(module.rsplit(".", 1)[-1])
    modules.add(module)
  targets = sorted(names)
  if family in MOE_FAMILIES:
    # peft reads a projection's name in an MoE model as the experts' fused parameters of that
    # name too (transformers 5 stacks them): name the adapted modules exactly instead
    targets = "|".join(re.escape(m) for m in sorted(modules))
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base_model}
  write_directory(directory, {PEFT_CONFIG: config, PEFT_WEIGHTS: save(tensors)}, force)


def read_peft_config(directory: str) -> dict:
  """The spec fields of a peft adapter directory ({rank, alpha, targets, dropout, rslora},
  those its config sets; a target string is a regex, given as `re:PATTERN`)."""
  path = os.path.join(directory, PEFT_CONFIG)
  config = read_json(path)
  if config.get("peft_type", "LORA") != "LORA":
    raise ZooError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
  for key, ok in (("fan_in_fan_out", False), ("bias", "none"), ("use_dora", False)):
    if config.get(key, ok) not in (ok, None):
      raise ZooError(f"{path}: {key}={config[key]!r} is not supported")
  if config.get("rank_pattern") or config.get("alpha_pattern"):
    raise ZooError(f"{path}: per-module rank_pattern/alpha_pattern is not supported")
  targets = config.get("target_modules") or ()
  if isinstance(targets, str):
    targets = ("re:" + targets,)
  config = dict(config, target_modules=tuple(targets))
  return {ours: config[theirs] for ours, theirs in SPEC_KEYS.items() if theirs in config}


def read_peft_weights(directory: str, family: str = "llama") -> dict[str, np.ndarray]:
  """The arrays of a peft adapter directory (for transformers' model of `family`) under zoo's
  names (A [in, r], B [r, out]). A base
  weight that peft saved whole (a targeted embedding or head) comes as `path.embedding`
  [vocab, dim] or `path.kernel` [in, out]."""
  weights_path = os.path.join(directory, PEFT_WEIGHTS)
  if not os.path.isfile(weights_path) and os.path.isfile(
      os.path.join(directory, "adapter_model.bin")):
    raise ZooError(f"{directory} holds adapter_model.bin; save the adapter as safetensors")
  out = {}
  for name, value in load_safetensors(weights_path, "adapter weights").items():
    full = _PEFT_BASE.fullmatch(name)
    if full:  # peft saves a targeted embedding or head whole too (save_embedding_layers)
      module = _zoo_module(full["module"], family)
      leaf = "embedding" if module.endswith("embed_tokens") else "kernel"
      value = np.asarray(value, np.float32)
      out[f"{module}.{leaf}"] = np.ascontiguousarray(value if leaf == "embedding" else value.T)
      continue
    m = _PEFT_NAME.fullmatch(name)
    if not m:
      raise ZooError(f"{weights_path}: unexpected tensor {name}")
    module = _zoo_module(re.sub(r"\.default$", "", m["module"]), family)
    leaf = "lora_a" if m["kind"] in ("lora_A.weight", "lora_embedding_A") else "lora_b"
    out[f"{module}.{leaf}"] = np.ascontiguousarray(np.asarray(value, np.float32).T)
  return out


__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "write_peft", "read_peft_config",
           "read_peft_weights"]
