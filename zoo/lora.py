"""LoRA: low-rank adapters as a parameter tree of their own, and their files.

`add_lora(model, spec)` gives the chosen Linear layers (and optionally the token embedding) two
`nnx.LoRAParam`s, A [in, r] and B [r, out], and the layer adds (x @ A) @ B * scale to its
output, scale = alpha / r (alpha / sqrt(r) with rsLoRA). B starts at zero (A for the
embedding, as peft does), so the adapted model starts equal to its base. Split with
`nnx.split(model, nnx.LoRAParam, nnx.Param)`, the adapters form one tree and the frozen base
another: a train step differentiates the first only and takes the second as a plain input.
The adapters carry logical axis names from the weights they adapt (A: (in, None), B:
(None, out)), so the rules table shards them alongside.

Files: a zoo adapter directory is `zoo_adapter.json` (the spec) + `adapter.safetensors` (dotted
paths such as `layers.0.self_attn.q_proj.lora_a`); `save_peft` writes and `load_adapter` also
reads HF peft's `adapter_config.json` + `adapter_model.safetensors` (through zoo.convert.peft).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save

from zoo import paths, sharding
from zoo.convert.peft import PEFT_CONFIG, read_peft_config, read_peft_weights, write_peft
from zoo.convert.tensors import load_safetensors
from zoo.errors import ZooError
from zoo.io import read_json, write_directory
from zoo.layers.linear import Embed, Linear
from zoo.layers.quant import is_quantized
from zoo.models.config import LlamaConfig
from zoo.models import stack
from zoo.models.llama import abstract_model, from_params

ADAPTER_META = "zoo_adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT_VERSION = 1
# Module names a target list may use; "all-linear" means every projection but the output head.
# The projections of an MoE layer's shared expert (Llama 4) are left out of those names and of
# "all-linear", as the routed experts and the router are: "shared_expert" targets them.
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OTHER_TARGETS = ("embed_tokens", "lm_head", "shared_expert")
SHARED_EXPERT = ".shared_expert."


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which layers get adapters and how big: targets are module names (`q_proj`, ...,
  `embed_tokens`, `lm_head`, or "all-linear") or one regex over module paths written
  `re:PATTERN` (e.g. `re:layers\\.[0-3]\\.self_attn\\.(q|v)_proj`)."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  dropout: float = 0.0
  rslora: bool = False

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ZooError(f"LoRA rank must be a positive integer, got {self.rank!r}")
    if not self.alpha > 0:
      raise ZooError(f"LoRA alpha must be positive, got {self.alpha!r}")
    if not 0 <= self.dropout < 1:
      raise ZooError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    if not targets:
      raise ZooError("LoRA targets are empty")
    for t in targets:
      if t.startswith("re:"):
        try:
          re.compile(t[3:])
        except re.error as e:
          raise ZooError(f"bad LoRA target regex {t[3:]!r}: {e}") from None
      elif t not in LINEAR_TARGETS + OTHER_TARGETS + ("all-linear",):
        raise ZooError(f"unknown LoRA target {t!r}; use module names "
                       f"({', '.join(LINEAR_TARGETS + OTHER_TARGETS)}), 'all-linear' or "
                       "'re:REGEX'")
    object.__setattr__(self, "targets", targets)

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def matches(self, path: str) -> bool:
    name = path.rsplit(".", 1)[-1]
    shared = SHARED_EXPERT in f".{path}."
    for t in self.targets:
      if t.startswith("re:"):
        if re.fullmatch(t[3:], path):
          return True
      elif t == "shared_expert":
        if shared:
          return True
      elif not shared and (t == name or (t == "all-linear" and name in LINEAR_TARGETS)):
        return True
    return False

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {"targets": list(self.targets)}


def _modules(model) -> list[tuple[str, nnx.Module]]:
  return [(".".join(map(str, path)), m) for path, m in nnx.iter_modules(model)
          if isinstance(m, Linear | Embed) and path]


def _layer_paths(path: str, module, period: int) -> list[str] | None:
  """The per-layer paths a stacked module (scanned layers, `stack.{j}....`) stands for, one per
  slot; None for a module of one layer."""
  if not stack.is_stacked(path):
    return None
  value = (module.kernel if isinstance(module, Linear) else module.embedding).get_value()
  # a quantized base (QLoRA) keeps the shape of one layer; its codes carry the slots
  slots = (value.codes if is_quantized(value) else value).shape[0]
  return stack.layer_names(path, period, slots)


def _key(seed: int, path: str) -> jax.Array:
  """The key of one layer's adapter, from the seed and its per-layer path: the same adapter
  starts the same whether its layer is stacked (scanned) or not."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))


def _init_adapter(module, spec: LoraSpec, key: jax.Array):
  dtype = jnp.float32
  if isinstance(module, Linear):
    din, dout = module.kernel.shape[-2:]
    bound = 1.0 / math.sqrt(din)
    a = jax.random.uniform(key, (din, spec.rank), dtype, -bound, bound)
    return a, jnp.zeros((spec.rank, dout), dtype)
  din, dout = module.embedding.shape[-2:]
  return jnp.zeros((din, spec.rank), dtype), jax.random.normal(key, (spec.rank, dout), dtype)


def add_lora(model, spec: LoraSpec, *, seed: int = 0) -> list[str]:
  """Gives every targeted layer of `model` a fresh adapter (in place); returns their paths.

  A is drawn like peft's default (uniform in +-1/sqrt(in), Kaiming's bound with a = sqrt(5)),
  B is zero; for the embedding A is zero and B normal. Routed experts (Mixtral, Qwen3-MoE,
  Llama 4) and q/k norms cannot be targets; a shared expert can ("shared_expert").
  A stacked module (scanned layers) gets stacked adapters, each slot's drawn as its layer's
  would be unstacked; a target that picks some of a stack's layers only is an error.
  """
  paths, period = [], _model_period(model)
  for path, module in _modules(model):
    layers = _layer_paths(path, module, period)
    picked = [spec.matches(p) for p in layers or [path]]
    if not any(picked):
      continue
    if not all(picked):
      raise ZooError(f"the LoRA targets {list(spec.targets)} pick some of the scanned layers "
                     f"of {path} only; adapt all of them, or set scan_layers False")
    if layers is None:
      a, b = _init_adapter(module, spec, _key(seed, path))
    else:
      pairs = [_init_adapter(module, spec, _key(seed, p)) for p in layers]
      a, b = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
    names_in, names_out = module.names if isinstance(module, Linear) else ("vocab", "embed")
    lead = () if layers is None else (stack.LAYER_AXIS,)
    module.lora_a = nnx.data(nnx.LoRAParam(a, out_sharding=(*lead, names_in, None),
                                           eager_sharding=False))
    module.lora_b = nnx.data(nnx.LoRAParam(b, out_sharding=(*lead, None, names_out),
                                           eager_sharding=False))
    module.lora_scale = float(spec.scale)
    if isinstance(module, Linear):  # peft has no dropout on embedding adapters either
      module.lora_dropout = float(spec.dropout)
    paths.append(path)
  if not paths:
    raise ZooError(f"no layer matches the LoRA targets {list(spec.targets)}")
  return paths


def set_dropout_rng(model, key: jax.Array):
  """Gives each adapted Linear with dropout its own key (`dropout_key`) for one forward pass:
  a train step calls it on the model it merges, with a key from its state and step, so
  dropout masks are new every step and the same after a resume. A stacked Linear (scanned
  layers) gets its layers' keys stacked, so both layouts drop the same inputs."""
  period = _model_period(model)
  for path, m in _modules(model):
    if isinstance(m, Linear) and m.lora_a is not None and m.lora_dropout > 0:
      layers = _layer_paths(path, m, period)
      k = (dropout_key(key, path) if layers is None
           else jnp.stack([dropout_key(key, p) for p in layers]))
      m.lora_rng = nnx.data(k)


def dropout_key(key: jax.Array, path: str) -> jax.Array:
  """The dropout key of the adapter at per-layer module path `path`, from a step's `key`."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()))


def adapted_paths(model) -> list[str]:
  """The adapted modules' paths, per layer (a stacked module's expanded)."""
  out, period = [], _model_period(model)
  for path, m in _modules(model):
    if m.lora_a is not None:
      out += _layer_paths(path, m, period) or [path]
  return out


def lora_state(model) -> dict[str, np.ndarray]:
  """The adapters as {dotted path: array} (`layers.0.self_attn.q_proj.lora_a`, ...), per layer
  (a scanned model's stacked adapters sliced out)."""
  return stack.unstack({".".join(map(str, p)): np.asarray(v.get_value())
                        for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))},
                       _model_period(model))


def _delta(module) -> jax.Array:
  return (module.lora_a[...].astype(jnp.float32) @ module.lora_b[...].astype(jnp.float32)
          ) * module.lora_scale


def merge(model):
  """Folds every adapter into its base weight, in place (W += A @ B * scale), and sets its
  scale to 0 so the adapter stops adding; `unmerge` undoes it."""
  for _, m in _modules(model):
    if m.lora_a is None or m.lora_scale == 0:
      continue
    var = m.kernel if isinstance(m, Linear) else m.embedding
    var.set_value((var[...].astype(jnp.float32) + _delta(m)).astype(var.get_value().dtype))
    m.merged_scale, m.lora_scale = m.lora_scale, 0.0
  return model


def unmerge(model):
  """Takes merged adapters back out of the base weights (up to float rounding), in place."""
  for _, m in _modules(model):
    scale = getattr(m, "merged_scale", None)
    if m.lora_a is None or not scale:
      continue
    m.lora_scale, m.merged_scale = scale, None
    var = m.kernel if isinstance(m, Linear) else m.embedding
    var.set_value((var[...].astype(jnp.float32) - _delta(m)).astype(var.get_value().dtype))
  return model


def merged_params(model) -> dict[str, np.ndarray]:
  """The base parameters with every adapter folded in ({dotted path: array}, adapters
  dropped): a plain model for `zoo.save`, `zoo convert --to hf` or any runtime."""
  deltas = {}
  for path, m in _modules(model):
    if m.lora_a is not None and m.lora_scale:
      deltas[path + (".kernel" if isinstance(m, Linear) else ".embedding")] = np.asarray(
          _delta(m))
  out = {}
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))):
    name = ".".join(map(str, p))
    value = np.asarray(v.get_value())
    if name in deltas:
      value = (value.astype(np.float32) + deltas[name]).astype(value.dtype)
    out[name] = value
  return stack.unstack(out, _model_period(model))


def _model_period(model) -> int:
  return len(model.stack) if getattr(model, "scan_layers", False) else 1


def merged_model(model):
  """A new plain model (no adapters) whose weights have the adapters folded in."""
  return from_params(model.config, merged_params(model), dtype=model.dtype)


# --- files ----------------------------------------------------------------------------------

def save_adapter(model, directory: str, spec: LoraSpec, *, base_model: str | None = None,
                 force: bool = False):
  """A zoo adapter directory: the spec and the adapter tree (megabytes, not the base)."""
  weights = lora_state(model)
  if not weights:
    raise ZooError("the model has no LoRA adapters to save")
  meta = {"format": "zoo-lora", "version": ADAPTER_FORMAT_VERSION, "spec": spec.to_dict(),
          "modules": adapted_paths(model), "base_model": base_model,
          "family": model.config.family}
  write_directory(directory, {ADAPTER_META: meta, ADAPTER_WEIGHTS: save(weights)}, force)


def is_adapter(directory: str) -> bool:
  directory = paths.localize(directory)
  return any(os.path.isfile(os.path.join(directory, n)) for n in (ADAPTER_META, PEFT_CONFIG))


def _spec_from(fields: dict, where: str) -> LoraSpec:
  try:
    return LoraSpec(**fields)
  except TypeError as e:
    raise ZooError(f"bad adapter config {where}: {e}") from None


def _read_zoo_adapter(directory: str) -> tuple[LoraSpec, dict[str, np.ndarray], dict]:
  """(spec, arrays, the whole zoo_adapter.json) of a zoo adapter directory."""
  meta_path = os.path.join(directory, ADAPTER_META)
  meta = read_json(meta_path)
  if meta.get("format") != "zoo-lora":
    raise ZooError(f"{meta_path} is not a zoo LoRA adapter")
  names = {f.name for f in dataclasses.fields(LoraSpec)}
  spec = _spec_from({k: v for k, v in (meta.get("spec") or {}).items() if k in names},
                    meta_path)
  weights = load_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), "adapter weights")
  return spec, weights, meta


def read_adapter(directory: str, model) -> tuple[LoraSpec, dict[str, np.ndarray]]:
  """The spec and the adapter arrays ({zoo dotted path: array [in, r] / [r, out]}) of a zoo or
  peft adapter directory, checked against `model` (a base model without adapters)."""
  directory = os.path.expanduser(paths.localize(directory))
  if not os.path.isdir(directory):
    raise ZooError(f"adapter directory not found: {directory}")
  if os.path.isfile(os.path.join(directory, ADAPTER_META)):
    spec, weights, _ = _read_zoo_adapter(directory)
  elif os.path.isfile(os.path.join(directory, PEFT_CONFIG)):
    spec = _spec_from(read_peft_config(directory), os.path.join(directory, PEFT_CONFIG))
    weights = read_peft_weights(directory, model.config.family)
  else:
    raise ZooError(f"{directory} has neither {ADAPTER_META} nor {PEFT_CONFIG}")
  _check_adapter(weights, spec, model, directory)
  return spec, weights


def _check_adapter(weights, spec: LoraSpec, model, where: str):
  modules = dict(_modules(model))
  for name, value in weights.items():
    path, _, leaf = name.rpartition(".")
    if leaf in ("kernel", "embedding") and path in modules:
      want = tuple(getattr(modules[path], leaf).shape)
      if tuple(value.shape) != want:
        raise ZooError(f"adapter {where}: {name} has shape {tuple(value.shape)}, expected {want}")
      continue
    if leaf not in ("lora_a", "lora_b") or path not in modules:
      raise ZooError(f"adapter {where} has a weight for {name}, which the model does not have")
    m = modules[path]
    din, dout = (m.kernel.shape if isinstance(m, Linear) else m.embedding.shape)
    want = (din, spec.rank) if leaf == "lora_a" else (spec.rank, dout)
    if tuple(value.shape) != want:
      raise ZooError(f"adapter {where}: {name} has shape {tuple(value.shape)}, expected {want} "
                     f"(rank {spec.rank})")
  for name in (n for n in weights if n.endswith((".lora_a", ".lora_b"))):
    twin = name[:-1] + ("b" if name.endswith("a") else "a")
    if twin not in weights:
      raise ZooError(f"adapter {where} has {name} without {twin}")


def attach(model, spec: LoraSpec, weights: dict[str, np.ndarray]):
  """Gives `model` the adapters in `weights` (from `read_adapter`), in place."""
  modules = dict(_modules(model))
  for name, value in weights.items():
    path, _, leaf = name.rpartition(".")
    if leaf in ("kernel", "embedding"):  # a base weight the adapter replaces
      var = getattr(modules[path], leaf)
      var.set_value(jnp.asarray(value, var.get_value().dtype))
  for path in sorted({n.rpartition(".")[0] for n in weights if n.endswith(".lora_a")}):
    m = modules[path]
    names = m.names if isinstance(m, Linear) else ("vocab", "embed")
    m.lora_a = nnx.data(nnx.LoRAParam(jnp.asarray(weights[path + ".lora_a"], jnp.float32),
                                      out_sharding=(names[0], None), eager_sharding=False))
    m.lora_b = nnx.data(nnx.LoRAParam(jnp.asarray(weights[path + ".lora_b"], jnp.float32),
                                      out_sharding=(None, names[1]), eager_sharding=False))
    m.lora_scale = float(spec.scale)
  return model


def load_adapter(model, directory: str):
  """Reads a zoo or peft adapter directory into `model` (in place); returns its spec."""
  spec, weights = read_adapter(directory, model)
  attach(model, spec, weights)
  return spec


# --- HF peft (the files: zoo.convert.peft) ---------------------------------------------------

def save_peft(model, directory: str, spec: LoraSpec, *, base_model: str | None = None,
              force: bool = False):
  """The model's adapters in HF peft's format, for `peft.PeftModel.from_pretrained` on the HF
  export of the base model (and vLLM, which reads the same files)."""
  scale = {m.lora_scale for _, m in _modules(model) if m.lora_a is not None}
  if scale and scale != {spec.scale}:
    raise ZooError("the model's adapters are merged or do not follow the spec; unmerge first")
  write_peft(lora_state(model), directory, spec, base_model=base_model, force=force,
             family=model.config.family)


def adapter_to_peft(src: str, dst: str, *, force: bool = False):
  """`zoo convert ADAPTER DST --to peft`: a zoo adapter directory in peft's format."""
  src = paths.localize(src)
  if not os.path.isfile(os.path.join(os.path.expanduser(src), ADAPTER_META)):
    raise ZooError(f"{src} is not a zoo LoRA adapter (no {ADAPTER_META})")
  spec, weights, meta = _read_zoo_adapter(os.path.expanduser(src))
  for name, value in weights.items():
    leaf = name.rpartition(".")[2]
    if leaf not in ("lora_a", "lora_b") or value.ndim != 2 or \
        value.shape[1 if leaf == "lora_a" else 0] != spec.rank:
      raise ZooError(f"adapter {src}: bad weight {name} {tuple(value.shape)} for rank "
                     f"{spec.rank}")
  write_peft(weights, dst, spec, base_model=meta.get("base_model"), force=force,
             family=meta.get("family", "llama"))
  return spec, weights


__all__ = ["LoraSpec", "add_lora", "adapted_paths", "lora_state", "merge", "unmerge",
           "merged_params", "merged_model", "save_adapter", "read_adapter", "load_adapter", "attach",
           "save_peft", "adapter_to_peft", "is_adapter", "LoraTrees", "split_for_training"]


@dataclasses.dataclass
class LoraTrees:
  """A LoRA model split for training. `graphdef` merges the two trees back into the model;
  `adapters` are the adapters' initial values (the trained tree); `base` is the frozen base,
  here shape-only (jax.ShapeDtypeStruct leaves) until it is read from a checkpoint. Each tree
  comes with its shardings by the rules table."""
  graphdef: nnx.GraphDef
  adapters: dict
  adapter_shardings: dict
  base: dict
  base_shardings: dict


def split_for_training(config: LlamaConfig, spec: LoraSpec, mesh: jax.sharding.Mesh, rules, *,
                       seed: int = 0, **model_kwargs) -> LoraTrees:
  """Adds adapters to an abstract (shape-only) model of `config` and splits it, so the base is
  never built at random: the caller reads it from a checkpoint into `base`'s shapes."""
  model = abstract_model(config, **model_kwargs)
  add_lora(model, spec, seed=seed)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  return LoraTrees(graphdef, nnx.to_pure_dict(adapters),
                   sharding.variable_shardings(adapters, mesh, rules), nnx.to_pure_dict(base),
                   sharding.variable_shardings(base, mesh, rules))
