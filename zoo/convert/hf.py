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

import numpy as np

from zoo.errors import ZooError
from zoo.models.config import FAMILIES, LAYER_TYPES, ROPE_TYPES, LlamaConfig, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "llama4": "Llama4ForCausalLM"}
# HF's model_type of each family where the two names differ (Llama 4's text-only model).
MODEL_TYPES = {"llama4": "llama4_text"}
# Llama 4's official checkpoints: the multimodal model, whose language model zoo takes.
LLAMA4_MULTIMODAL = "Llama4ForConditionalGeneration"
LLAMA4_TEXT_PREFIX = "language_model."
LLAMA4_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")

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
  "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                num_key_value_heads=32, sliding_window=4096, head_dim=128),
  "qwen3_moe": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                    num_key_value_heads=4, sliding_window=4096),
  "llama4": dict(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                 num_key_value_heads=8, head_dim=128),
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


def text_config(cfg: dict) -> tuple[dict, str]:
  """The language model's config.json dict and its tensors' name prefix: a multimodal Llama 4
  checkpoint holds its language model under `text_config` and `language_model.`."""
  if cfg.get("model_type") != "llama4":
    return cfg, ""
  archs = cfg.get("architectures") or [LLAMA4_MULTIMODAL]
  if archs[0] != LLAMA4_MULTIMODAL:
    raise ZooError(f"unsupported architecture {archs[0]!r} (zoo reads {LLAMA4_MULTIMODAL}'s "
                   f"language model and {ARCHITECTURES['llama4']})")
  text = cfg.get("text_config")
  if not isinstance(text, dict):
    raise ZooError("config.json of a Llama 4 model has no text_config")
  text = {"model_type": "llama4_text", **text, "architectures": [ARCHITECTURES["llama4"]]}
  if "tie_word_embeddings" in cfg and "tie_word_embeddings" not in text:
    text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
  return text, LLAMA4_TEXT_PREFIX


def config_from_hf(cfg: dict) -> LlamaConfig:
  """A LlamaConfig from an HF config.json dict, refusing what zoo cannot compute exactly."""
  cfg, _ = text_config(cfg)
  family = {v: k for k, v in MODEL_TYPES.items()}.get(cfg.get("model_type"),
                                                      cfg.get("model_type"))
  if family not in FAMILIES:
    raise ZooError(f"unsupported architecture: model_type {cfg.get('model_type')!r} (zoo reads "
                   f"{', '.join(MODEL_TYPES.get(f, f) for f in FAMILIES)}, and llama4)")
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
    head_dim=cfg.get("head_dim") or defaults.get("head_dim") or cfg["hidden_size"] // heads,
    max_position_embeddings=max_len,
    rms_norm_eps=cfg.get("rms_norm_eps") or defaults["rms_norm_eps"],
    rope_theta=theta, rope_scaling=scaling,
    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    initializer_range=cfg.get("initializer_range", 0.02),
    bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
  )
  if family in ("llama", "qwen3", "qwen3_moe", "llama4"):
    bias = bool(cfg.get("attention_bias", False))
    fields.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))
  elif family == "qwen2":
    fields.update(qkv_bias=True)
  if family in ("qwen3", "qwen3_moe"):
    fields.update(qk_norm="rms")
  if family in ("qwen3_moe", "llama4"):
    if cfg.get("router_jitter_noise", 0.0):
      raise _unsupported("router_jitter_noise", cfg["router_jitter_noise"])
  if family == "qwen3_moe":
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 128))
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
      raise ZooError(f"config.json field decoder_sparse_step must be a positive integer, got "
                     f"{step!r}")
    dense = set(cfg.get("mlp_only_layers") or [])
    moe = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    fields.update(num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok", 8),
                  moe_intermediate_size=cfg.get("moe_intermediate_size", 768),
                  norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                  moe_layers=None if len(moe) == layers else moe)
    if experts == 0:
      fields.update(moe_layers=None)
  if family == "llama4":
    fields.update(_llama4_fields(cfg, layers))
  if family in ("mistral", "mixtral"):
    fields.update(sliding_window=cfg.get("sliding_window", defaults["sliding_window"]))
  if family == "mixtral":
    if cfg.get("router_jitter_noise", 0.0):
      raise _unsupported("router_jitter_noise", cfg["router_jitter_noise"])
    fields.update(num_experts=cfg.get("num_local_experts", 8),
                  num_experts_per_tok=cfg.get("num_experts_per_tok", 2))
  if family == "qwen3_moe" and cfg.get("use_sliding_window", False):
    fields.update(sliding_window=cfg.get("sliding_window", defaults["sliding_window"]))
  if family in ("qwen2", "qwen3"):
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


def _llama4_fields(cfg: dict, layers: int) -> dict:
  """The LlamaConfig fields of a Llama 4 text config.json, defaults as transformers has them."""
  experts = cfg.get("num_local_experts", 16)
  moe = cfg.get("moe_layers")
  if moe is None:
    step = cfg.get("interleave_moe_layer_step", 1)
    if not isinstance(step, int) or step < 1:
      raise ZooError(f"config.json field interleave_moe_layer_step must be a positive integer, "
                     f"got {step!r}")
    moe = list(range(step - 1, layers, step))
  rope = cfg.get("no_rope_layers") or [int((i + 1) % cfg.get("no_rope_layer_interval", 4) != 0)
                                       for i in range(layers)]
  if len(rope) != layers:
    raise ZooError(f"config.json field no_rope_layers has {len(rope)} entries for {layers} "
                   "layers")
  chunk = cfg.get("attention_chunk_size", 8192)
  types = cfg.get("layer_types") or [
    "chunked_attention" if use and chunk is not None else "full_attention" for use in rope]
  for kind in types:
    if kind not in ("full_attention", "chunked_attention"):
      raise _unsupported("layer_types", kind)
  if "chunked_attention" in types and chunk is None:
    raise ZooError("config.json field layer_types asks for chunked attention without an "
                   "attention_chunk_size")
  if "intermediate_size_mlp" not in cfg and len(moe) < layers:
    raise ZooError("config.json lacks intermediate_size_mlp (the dense layers' width)")
  chunked = "chunked_attention" in types
  return dict(
    intermediate_size=cfg.get("intermediate_size_mlp", cfg["intermediate_size"]),
    moe_intermediate_size=cfg["intermediate_size"],
    num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok", 1),
    moe_layers=None if len(moe) == layers or not experts else tuple(moe),
    router="sigmoid", shared_expert=True, rope_interleaved=True,
    qk_norm="l2" if cfg.get("use_qk_norm", True) else None,
    no_rope_layers=tuple(i for i, use in enumerate(rope) if not use),
    layer_types=tuple(types) if chunked else None,
    attention_chunk_size=chunk if chunked else None,
    attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
    floor_scale=float(cfg.get("floor_scale", 8192)), attn_scale=float(cfg.get("attn_scale", 0.1)),
  )


def _check_expressible(c: LlamaConfig):
  """Refuses a config whose family's HF model cannot compute it."""
  family = c.family
  problems = []
  new = dict(qk_norm=None, router="softmax", shared_expert=False, rope_interleaved=False,
             no_rope_layers=(), attn_temperature_tuning=False, attention_chunk_size=None,
             moe_intermediate_size=None, moe_layers=None, norm_topk_prob=True)
  if family == "qwen3":
    new.update(qk_norm="rms")
  elif family == "qwen3_moe":
    new.update(qk_norm="rms", moe_intermediate_size=c.moe_intermediate_size,
               moe_layers=c.moe_layers, norm_topk_prob=c.norm_topk_prob)
    if not c.num_experts:
      problems.append("num_experts=0")
  elif family == "llama4":
    new.update(qk_norm=c.qk_norm if c.qk_norm != "rms" else "l2", router="sigmoid",
               shared_expert=True, rope_interleaved=True, no_rope_layers=c.no_rope_layers,
               attn_temperature_tuning=c.attn_temperature_tuning,
               attention_chunk_size=c.attention_chunk_size,
               moe_intermediate_size=c.moe_intermediate_size, moe_layers=c.moe_layers)
    if not c.num_experts:
      problems.append("num_experts=0")
  for name, want in new.items():
    if getattr(c, name) != want:
      problems.append(f"{name}={getattr(c, name)!r}")
  if family != "llama4" and c.layer_types and "chunked_attention" in c.layer_types:
    problems.append("chunked attention")
  if problems:
    raise ZooError(f"{family} cannot express {problems[0]}")


def config_to_hf(c: LlamaConfig, dtype: str = "float32") -> dict:
  """config.json for transformers, in the 4.x layout that 5.x also reads."""
  family = c.family
  _check_expressible(c)
  sliding_layers = [c.layer_window(i) is not None for i in range(c.num_layers)]
  if (family in ("llama", "mistral", "mixtral", "qwen3_moe", "llama4") and any(sliding_layers)
      and not all(sliding_layers)):
    raise ZooError(f"{family} cannot express a sliding window on some layers only")
  if family in ("llama", "llama4") and any(sliding_layers):
    raise ZooError(f"{family} has no sliding window; export it as family mistral")
  if (family in ("mixtral", "qwen3_moe", "llama4")) != bool(c.num_experts):
    raise ZooError(f"family {family} does not match num_experts={c.num_experts}")
  biases = (c.qkv_bias, c.o_bias, c.mlp_bias)
  attention_bias = {(False,) * 3, (True, True, False)}
  allowed = {"llama": {(False,) * 3, (True, True, False), (False, False, True), (True,) * 3},
             "qwen2": {(True, False, False)}, "qwen3": attention_bias,
             "qwen3_moe": attention_bias, "llama4": attention_bias}.get(family, {(False,) * 3})
  if biases not in allowed:
    raise ZooError(f"{family} cannot express biases qkv={c.qkv_bias} o={c.o_bias} "
                   f"mlp={c.mlp_bias}")
  out = {
    "architectures": [ARCHITECTURES[family]], "model_type": MODEL_TYPES.get(family, family),
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
  if family in ("qwen3", "qwen3_moe", "llama4"):
    out.update(attention_bias=c.qkv_bias)
  if family in ("mistral", "mixtral"):
    out["sliding_window"] = c.sliding_window
  if family == "qwen3_moe":
    moe = set(range(c.num_layers) if c.moe_layers is None else c.moe_layers)
    out.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
               num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
               moe_intermediate_size=c.expert_size, norm_topk_prob=c.norm_topk_prob,
               decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(c.num_layers) if i not in moe],
               router_aux_loss_coef=0.001, output_router_logits=False)
  if family == "llama4":
    moe = list(range(c.num_layers)) if c.moe_layers is None else list(c.moe_layers)
    out.update(intermediate_size=c.expert_size, intermediate_size_mlp=c.intermediate_size,
               num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
               moe_layers=moe, interleave_moe_layer_step=1,
               no_rope_layers=[int(c.layer_rope(i)) for i in range(c.num_layers)],
               attention_chunk_size=c.attention_chunk_size,
               layer_types=["chunked_attention" if c.layer_chunk(i) else "full_attention"
                            for i in range(c.num_layers)],
               use_qk_norm=c.qk_norm == "l2",
               attn_temperature_tuning=c.attn_temperature_tuning,
               floor_scale=(int(c.floor_scale) if float(c.floor_scale).is_integer()
                            else c.floor_scale), attn_scale=c.attn_scale,
               router_aux_loss_coef=0.001, router_jitter_noise=0.0,
               output_router_logits=False)
  if family == "mixtral":
    out.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
               router_aux_loss_coef=0.02, output_router_logits=False)
  if family in ("qwen2", "qwen3"):
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
  transpose: bool  # kernels: HF [out, in] is zoo's [in, out] (the last two axes)
  hf_shape: tuple[int, ...]
  expert: int | None = None  # the slice of the stacked zoo tensor this HF tensor fills
  # HF stacks the experts too (Llama 4): both tensors have the expert axis first, and are
  # converted expert by expert
  stacked: bool = False
  # (index, count): the zoo tensor is part `index` of `count` equal parts of the HF tensor's
  # last axis (Llama 4's fused gate_up_proj holds w1 then w3)
  part: tuple[int, int] | None = None

  @property
  def per_expert(self) -> bool:
    """Whether the zoo tensor is converted one expert slice at a time."""
    return self.expert is not None or self.stacked


# (HF name, zoo name, transposed, HF shape in symbolic dims, when present). Per-layer names
# are relative to `model.layers.{i}.` and `layers.{i}.`; `{e}` is an expert index. Dims: v
# vocab, d hidden, f dense width, m expert width, q/k query/kv widths, h head_dim, e experts.
_GLOBAL = [
  ("model.embed_tokens.weight", "embed_tokens.embedding", False, "vd", None),
  ("model.norm.weight", "norm.scale", False, "d", None),
  ("lm_head.weight", "lm_head.kernel", True, "vd", "untied"),
]
_ATTENTION = [
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
  ("self_attn.q_norm.weight", "self_attn.q_norm.scale", False, "h", "qk_norm"),
  ("self_attn.k_norm.weight", "self_attn.k_norm.scale", False, "h", "qk_norm"),
]


def _dense(hf: str) -> list:
  """The dense SwiGLU MLP of a layer, under HF's module name `hf`."""
  return [
    (f"{hf}.gate_proj.weight", "mlp.gate_proj.kernel", True, "fd", "dense"),
    (f"{hf}.up_proj.weight", "mlp.up_proj.kernel", True, "fd", "dense"),
    (f"{hf}.down_proj.weight", "mlp.down_proj.kernel", True, "df", "dense"),
    (f"{hf}.gate_proj.bias", "mlp.gate_proj.bias", False, "f", "mlp_bias"),
    (f"{hf}.up_proj.bias", "mlp.up_proj.bias", False, "f", "mlp_bias"),
    (f"{hf}.down_proj.bias", "mlp.down_proj.bias", False, "d", "mlp_bias"),
  ]


_MOE = "block_sparse_moe."
_MIXTRAL = _dense("mlp") + [
  ("block_sparse_moe.gate.weight", _MOE + "gate.kernel", True, "ed", "moe"),
  ("block_sparse_moe.experts.{e}.w1.weight", _MOE + "experts.w1", True, "md", "moe"),
  ("block_sparse_moe.experts.{e}.w2.weight", _MOE + "experts.w2", True, "dm", "moe"),
  ("block_sparse_moe.experts.{e}.w3.weight", _MOE + "experts.w3", True, "md", "moe"),
]
_QWEN3_MOE = _dense("mlp") + [
  ("mlp.gate.weight", _MOE + "gate.kernel", True, "ed", "moe"),
  ("mlp.experts.{e}.gate_proj.weight", _MOE + "experts.w1", True, "md", "moe"),
  ("mlp.experts.{e}.down_proj.weight", _MOE + "experts.w2", True, "dm", "moe"),
  ("mlp.experts.{e}.up_proj.weight", _MOE + "experts.w3", True, "md", "moe"),
]
# Llama 4 stacks its experts as [E, in, out] already, gate and up fused on the last axis.
_LLAMA4 = _dense("feed_forward") + [
  ("feed_forward.router.weight", _MOE + "gate.kernel", True, "ed", "moe"),
  ("feed_forward.experts.gate_up_proj", _MOE + "experts.w1", False, "edM", "moe", (0, 2)),
  ("feed_forward.experts.gate_up_proj", _MOE + "experts.w3", False, "edM", "moe", (1, 2)),
  ("feed_forward.experts.down_proj", _MOE + "experts.w2", False, "emd", "moe"),
  ("feed_forward.shared_expert.gate_proj.weight", _MOE + "shared_expert.gate_proj.kernel", True,
   "md", "moe"),
  ("feed_forward.shared_expert.up_proj.weight", _MOE + "shared_expert.up_proj.kernel", True,
   "md", "moe"),
  ("feed_forward.shared_expert.down_proj.weight", _MOE + "shared_expert.down_proj.kernel", True,
   "dm", "moe"),
]
_FFN = {"mixtral": _MIXTRAL, "qwen3_moe": _QWEN3_MOE, "llama4": _LLAMA4}


def _present(c: LlamaConfig, when: str | None, layer: int | None) -> bool:
  moe = layer is not None and c.is_moe_layer(layer)
  return {None: True, "untied": not c.tie_word_embeddings, "qkv_bias": c.qkv_bias,
          "o_bias": c.o_bias, "qk_norm": c.qk_norm == "rms", "dense": not moe, "moe": moe,
          "mlp_bias": c.mlp_bias and not moe}[when]


def weight_map(c: LlamaConfig, prefix: str = "") -> list[Entry]:
  """Every tensor of the model, in HF order; `prefix` goes before every HF name (a multimodal
  Llama 4 checkpoint's `language_model.`)."""
  dims = {"v": c.vocab_size, "d": c.hidden_size, "f": c.intermediate_size, "m": c.expert_size,
          "M": 2 * c.expert_size, "q": c.num_heads * c.head_dim,
          "k": c.num_kv_heads * c.head_dim, "h": c.head_dim, "e": c.num_experts}
  ffn = _FFN.get(c.family, _dense("mlp") + _MIXTRAL[6:])

  def entries(rows, hf_prefix, zoo_prefix, layer=None):
    for hf, zoo, transpose, shape, when, *part in rows:
      if not _present(c, when, layer):
        continue
      shape = tuple(dims[s] for s in shape)
      experts = range(c.num_experts) if "{e}" in hf else [None]
      for e in experts:
        yield Entry(prefix + hf_prefix + hf.replace("{e}", str(e)), zoo_prefix + zoo,
                    transpose, shape, e, stacked=len(shape) == 3 and e is None,
                    part=part[0] if part else None)

  out = list(entries(_GLOBAL[:1], "", ""))
  for i in range(c.num_layers):
    out += entries(_ATTENTION + ffn, f"model.layers.{i}.", f"layers.{i}.", i)
  out += entries(_GLOBAL[1:], "", "")
  return out


def to_zoo(e: Entry, array: np.ndarray) -> np.ndarray:
  """The zoo array of entry `e` from its HF array (or from one expert's slice of it)."""
  if e.part is not None:
    index, count = e.part
    size = array.shape[-1] // count
    array = array[..., index * size:(index + 1) * size]
  return np.swapaxes(array, -1, -2) if e.transpose else array


def zoo_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """zoo name -> shape, derived from the weight map (stacked experts included)."""
  out = {}
  for e in weight_map(c):
    shape = list(e.hf_shape)
    if e.part is not None:
      shape[-1] //= e.part[1]
    if e.transpose:
      shape[-2:] = shape[-2:][::-1]
    out[e.zoo] = tuple(shape) if e.expert is None else (c.num_experts, *shape)
  return out


def ignorable_hf_tensor(name: str, c: LlamaConfig, prefix: str = "") -> bool:
  """Tensors some HF checkpoints carry that hold nothing the model needs."""
  return name.endswith("rotary_emb.inv_freq") or (c.tie_word_embeddings
                                                   and name == prefix + "lm_head.weight")


def left_out(name: str, prefix: str) -> bool:
  """Whether tensor `name` belongs to a part of the checkpoint zoo does not take (a multimodal
  Llama 4's vision tower and projector)."""
  return prefix == LLAMA4_TEXT_PREFIX and name.startswith(LLAMA4_VISION_PREFIXES)


def tolerance_for(dtype_name: str) -> float:
  return {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}.get(dtype_name, math.inf)
