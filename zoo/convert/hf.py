"""HF transformers checkpoints <-> zoo: the config mapping and one weight map for both directions.

The weight map is a table: HF name, zoo name, whether the matrix is transposed (HF stores
[out, in], zoo [in, out]) and, for Mixtral's experts, which slice of the stacked zoo tensor an
HF tensor is. Config reading is strict: a field that changes what transformers computes and that
zoo does not implement is an error naming the field. Both the transformers 4.x layout
(`rope_theta`, `rope_scaling`) and the 5.x one (`rope_parameters`) are accepted, and a file that
holds both is read as transformers 5.x reads it; we write the 4.x layout, which transformers
5.x, vLLM and llama.cpp's converter all read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from zoo.errors import ZooError
from zoo.models.config import FAMILIES, LAYER_TYPES, ROPE_TYPES, LlamaConfig, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# What transformers assumes when config.json leaves a field out (its config classes' defaults).
_DEFAULTS = {
  "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                num_key_value_heads=None),
  "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=131072,
                  num_key_value_heads=8, sliding_window=4096),
  "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072,
                  num_key_value_heads=8, sliding_window=None),
  "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                num_key_value_heads=32, sliding_window=4096),
}

# The fields each rope type reads; anything else in the rope dict is an error.
_ROPE_FIELDS = {
  "default": (),
  "linear": ("factor",),
  "dynamic": ("factor", "original_max_position_embeddings"),
  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
  "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
           "mscale_all_dim", "attention_factor", "truncate"),
}


def _unsupported(field: str, value: Any, why: str = "") -> ZooError:
  return ZooError(f"config.json field {field}={value!r} is not supported by zoo"
                  + (f" ({why})" if why else ""))


def _rope_from_hf(cfg: dict, family: str, max_len: int) -> tuple[float, RopeScaling | None]:
  # As transformers 5.x reads a config.json that holds both layouts: a non-empty `rope_scaling`
  # replaces `rope_parameters` whole (its rope_theta included); a theta inside the dict wins
  # over the top-level `rope_theta`, and `rope_type` over the older `type`.
  if cfg.get("rope_scaling"):
    field, rope = "rope_scaling", dict(cfg["rope_scaling"])
  else:
    field, rope = "rope_parameters", dict(cfg.get("rope_parameters") or {})
  for key, value in rope.items():
    if isinstance(value, dict):
      raise _unsupported(f"{field}.{key}", "...", "per-layer-type rope parameters")
  theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or _DEFAULTS[family]["rope_theta"]
  kind = rope.pop("rope_type", None)
  legacy_kind = rope.pop("type", None)
  kind = kind or legacy_kind or "default"
  partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise _unsupported("partial_rotary_factor", partial)
  if kind not in ROPE_TYPES:
    raise _unsupported(f"{field}.rope_type", kind, f"supported: {', '.join(ROPE_TYPES)}")
  for key in rope:
    if key not in _ROPE_FIELDS[kind]:
      raise _unsupported(f"{field}.{key}", rope[key], f"not a parameter of rope type {kind}")
  if kind == "default":
    return float(theta), None
  params = {k: v for k, v in rope.items() if v is not None}
  if kind in ("linear", "dynamic"):
    params.pop("original_max_position_embeddings", None)  # transformers does not read it here
  if kind in ("llama3", "yarn"):
    params.setdefault("original_max_position_embeddings", max_len)
  if kind == "yarn" and "factor" not in params:
    params["factor"] = max_len / params["original_max_position_embeddings"]
  if "factor" not in params:
    raise ZooError(f"config.json field {field} of type {kind} needs a factor")
  if kind == "llama3":
    for key in ("low_freq_factor", "high_freq_factor"):
      if key not in params:
        raise ZooError(f"config.json field {field} of type llama3 needs {key}")
  return float(theta), RopeScaling(rope_type=kind, **params)


def config_from_hf(cfg: dict) -> LlamaConfig:
  """A LlamaConfig from an HF config.json dict, refusing what zoo cannot compute exactly."""
  family = cfg.get("model_type")
  if family not in FAMILIES:
    raise ZooError(f"unsupported architecture: model_type {family!r} (zoo reads "
                   f"{', '.join(FAMILIES)})")
  archs = cfg.get("architectures") or [ARCHITECTURES[family]]
  if archs[0] != ARCHITECTURES[family]:
    raise ZooError(f"unsupported architecture {archs[0]!r} (zoo reads {ARCHITECTURES[family]})")
  if cfg.get("quantization_config"):
    raise _unsupported("quantization_config", cfg["quantization_config"].get("quant_method"),
                       "quantized checkpoints")
  act = cfg.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise _unsupported("hidden_act", act, "only silu")
  if cfg.get("attention_dropout", 0.0):
    raise _unsupported("attention_dropout", cfg["attention_dropout"], "no dropout in zoo")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if not isinstance(cfg.get(key), int):
      raise ZooError(f"config.json lacks an integer {key}")
  defaults = _DEFAULTS[family]
  heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
  max_len = cfg.get("max_position_embeddings") or defaults["max_position_embeddings"]
  theta, scaling = _rope_from_hf(cfg, family, max_len)
  fields = dict(
    family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
    intermediate_size=cfg["intermediate_size"], num_layers=layers, num_heads=heads,
    num_kv_heads=cfg.get("num_key_value_heads") or defaults["num_key_value_heads"] or heads,
    head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
    max_position_embeddings=max_len,
    rms_norm_eps=cfg.get("rms_norm_eps") or defaults["rms_norm_eps"],
    rope_theta=theta, rope_scaling=scaling,
    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    initializer_range=cfg.get("initializer_range", 0.02),
    bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
  )
  if family == "llama":
    bias = bool(cfg.get("attention_bias", False))
    fields.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))
  elif family == "qwen2":
    fields.update(qkv_bias=True)
  if family in ("mistral", "mixtral"):
    fields.update(sliding_window=cfg.get("sliding_window", defaults["sliding_window"]))
  if family == "mixtral":
    if cfg.get("router_jitter_noise", 0.0):
      raise _unsupported("router_jitter_noise", cfg["router_jitter_noise"])
    fields.update(num_experts=cfg.get("num_local_experts", 8),
                  num_experts_per_tok=cfg.get("num_experts_per_tok", 2))
  if family == "qwen2":
    window = cfg.get("sliding_window", defaults["sliding_window"])
    if not cfg.get("use_sliding_window", False):
      window = None
    types = cfg.get("layer_types")
    if types is None:
      first = cfg.get("max_window_layers", 28)
      types = ["sliding_attention" if window is not None and i >= first else "full_attention"
               for i in range(layers)]
    for kind in types:
      if kind not in LAYER_TYPES:
        raise _unsupported("layer_types", kind)
    if "sliding_attention" in types and window is None:
      raise ZooError("config.json field layer_types asks for sliding attention without a "
                     "sliding_window")
    fields.update(sliding_window=window if "sliding_attention" in types else None,
                  layer_types=tuple(types) if "sliding_attention" in types else None)
  return LlamaConfig(**fields)


def config_to_hf(c: LlamaConfig, dtype: str = "float32") -> dict:
  """config.json for transformers, in the 4.x layout that 5.x also reads."""
  family = c.family
  sliding_layers = [c.layer_window(i) is not None for i in range(c.num_layers)]
  if family in ("llama", "mistral", "mixtral") and any(sliding_layers) and not all(sliding_layers):
    raise ZooError(f"{family} cannot express a sliding window on some layers only")
  if family == "llama" and any(sliding_layers):
    raise ZooError("llama has no sliding window; export it as family mistral")
  if (family == "mixtral") != bool(c.num_experts):
    raise ZooError(f"family {family} does not match num_experts={c.num_experts}")
  biases = (c.qkv_bias, c.o_bias, c.mlp_bias)
  allowed = {"llama": {(False,) * 3, (True, True, False), (False, False, True), (True,) * 3},
             "qwen2": {(True, False, False)}}.get(family, {(False,) * 3})
  if biases not in allowed:
    raise ZooError(f"{family} cannot express biases qkv={c.qkv_bias} o={c.o_bias} "
                   f"mlp={c.mlp_bias}")
  out = {
    "architectures": [ARCHITECTURES[family]], "model_type": family,
    "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
    "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim, "hidden_act": "silu",
    "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
    "rope_theta": c.rope_theta, "rope_scaling": None,
    "tie_word_embeddings": c.tie_word_embeddings, "initializer_range": c.initializer_range,
    "attention_dropout": 0.0, "bos_token_id": c.bos_token_id,
    "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple)
    else c.eos_token_id,
    "use_cache": True, "torch_dtype": dtype,
  }
  if c.rope_scaling is not None:
    out["rope_scaling"] = {k: v for k, v in dataclasses.asdict(c.rope_scaling).items()
                           if v is not None}
  if family == "llama":
    out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
  if family in ("mistral", "mixtral"):
    out["sliding_window"] = c.sliding_window
  if family == "mixtral":
    out.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
               router_aux_loss_coef=0.02, output_router_logits=False)
  if family == "qwen2":
    out.update(use_sliding_window=any(sliding_layers),
               sliding_window=c.sliding_window if any(sliding_layers) else None,
               max_window_layers=next((i for i, s in enumerate(sliding_layers) if s),
                                      c.num_layers),
               layer_types=["sliding_attention" if s else "full_attention"
                            for s in sliding_layers])
  return out


# ---------------------------------------------------------------------------------------------
# The weight map.

@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str
  zoo: str
  transpose: bool
  hf_shape: tuple[int, ...]
  expert: int | None = None  # the slice of the stacked zoo tensor this HF tensor fills


# (HF name, zoo name, transposed, HF shape in symbolic dims, when present). Per-layer names
# are relative to `model.layers.{i}.` and `layers.{i}.`; `{e}` is an expert index.
_GLOBAL = [
  ("model.embed_tokens.weight", "embed_tokens.embedding", False, "vd", None),
  ("model.norm.weight", "norm.scale", False, "d", None),
  ("lm_head.weight", "lm_head.kernel", True, "vd", "untied"),
]
_LAYER = [
  ("input_layernorm.weight", "input_layernorm.scale", False, "d", None),
  ("post_attention_layernorm.weight", "post_attention_layernorm.scale", False, "d", None),
  ("self_attn.q_proj.weight", "self_attn.q_proj.kernel", True, "qd", None),
  ("self_attn.k_proj.weight", "self_attn.k_proj.kernel", True, "kd", None),
  ("self_attn.v_proj.weight", "self_attn.v_proj.kernel", True, "kd", None),
  ("self_attn.o_proj.weight", "self_attn.o_proj.kernel", True, "dq", None),
  ("self_attn.q_proj.bias", "self_attn.q_proj.bias", False, "q", "qkv_bias"),
  ("self_attn.k_proj.bias", "self_attn.k_proj.bias", False, "k", "qkv_bias"),
  ("self_attn.v_proj.bias", "self_attn.v_proj.bias", False, "k", "qkv_bias"),
  ("self_attn.o_proj.bias", "self_attn.o_proj.bias", False, "d", "o_bias"),
  ("mlp.gate_proj.weight", "mlp.gate_proj.kernel", True, "fd", "dense"),
  ("mlp.up_proj.weight", "mlp.up_proj.kernel", True, "fd", "dense"),
  ("mlp.down_proj.weight", "mlp.down_proj.kernel", True, "df", "dense"),
  ("mlp.gate_proj.bias", "mlp.gate_proj.bias", False, "f", "mlp_bias"),
  ("mlp.up_proj.bias", "mlp.up_proj.bias", False, "f", "mlp_bias"),
  ("mlp.down_proj.bias", "mlp.down_proj.bias", False, "d", "mlp_bias"),
  ("block_sparse_moe.gate.weight", "block_sparse_moe.gate.kernel", True, "ed", "moe"),
  ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.w1", True, "fd", "moe"),
  ("block_sparse_moe.experts.{e}.w2.weight", "block_sparse_moe.experts.w2", True, "df", "moe"),
  ("block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.w3", True, "fd", "moe"),
]


def _present(c: LlamaConfig, when: str | None) -> bool:
  return {None: True, "untied": not c.tie_word_embeddings, "qkv_bias": c.qkv_bias,
          "o_bias": c.o_bias, "dense": not c.num_experts, "moe": bool(c.num_experts),
          "mlp_bias": c.mlp_bias and not c.num_experts}[when]


def weight_map(c: LlamaConfig) -> list[Entry]:
  """Every tensor of the model, in HF order."""
  dims = {"v": c.vocab_size, "d": c.hidden_size, "f": c.intermediate_size,
          "q": c.num_heads * c.head_dim, "k": c.num_kv_heads * c.head_dim, "e": c.num_experts}

  def entries(rows, hf_prefix, zoo_prefix):
    for hf, zoo, transpose, shape, when in rows:
      if not _present(c, when):
        continue
      shape = tuple(dims[s] for s in shape)
      experts = range(c.num_experts) if "{e}" in hf else [None]
      for e in experts:
        yield Entry(hf_prefix + hf.replace("{e}", str(e)), zoo_prefix + zoo, transpose, shape, e)

  out = list(entries(_GLOBAL[:1], "", ""))
  for i in range(c.num_layers):
    out += entries(_LAYER, f"model.layers.{i}.", f"layers.{i}.")
  out += entries(_GLOBAL[1:], "", "")
  return out


def zoo_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """zoo name -> shape, derived from the weight map (stacked experts included)."""
  out = {}
  for e in weight_map(c):
    shape = e.hf_shape[::-1] if e.transpose else e.hf_shape
    out[e.zoo] = shape if e.expert is None else (c.num_experts, *shape)
  return out


def ignorable_hf_tensor(name: str, c: LlamaConfig) -> bool:
  """Tensors some HF checkpoints carry that hold nothing the model needs."""
  return name.endswith("rotary_emb.inv_freq") or (c.tie_word_embeddings
                                                   and name == "lm_head.weight")


def tolerance_for(dtype_name: str) -> float:
  return {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}.get(dtype_name, math.inf)
