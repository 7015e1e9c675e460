"""The architecture config of the LLaMA family.

Kept free of JAX so that converters and command-line checks can read and validate configs in a
process that never pays for importing JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from zoo.errors import ZooError

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "llama4")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
QK_NORMS = (None, "rms", "l2")
ROUTERS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, named and parameterised as in transformers' `rope_parameters`."""
  rope_type: str = "default"
  factor: float = 1.0
  # llama3
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  # llama3, yarn
  original_max_position_embeddings: int | None = None
  # yarn
  beta_fast: float | None = None
  beta_slow: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool | None = None


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """One decoder architecture for LLaMA 1/2/3.x/4, CodeLlama, TinyLlama, Mistral, Mixtral and
  Qwen2/3 (dense and MoE).

  `family` is the HF `model_type` the weights came from or are exported to; the computation is
  fully determined by the other fields.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  family: str = "llama"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  # Sliding-window attention: a token sees itself and the `sliding_window - 1` tokens before it.
  sliding_window: int | None = None
  # Per-layer attention kind; None means sliding on every layer when `sliding_window` is set.
  layer_types: tuple[str, ...] | None = None
  # Chunked attention (Llama 4): on "chunked_attention" layers a token sees the tokens before it
  # in its own chunk of `attention_chunk_size` positions.
  attention_chunk_size: int | None = None
  # Normalisation of q and k per head: "rms" (Qwen3: learned RMSNorm before rotary), "l2"
  # (Llama 4: RMSNorm without weights after rotary, on rotary layers only).
  qk_norm: str | None = None
  # Layers that apply no rotary embedding (Llama 4's NoPE layers), and on them the attention
  # temperature tuning of Llama 4: q scaled by 1 + attn_scale * log1p(floor((p + 1) / floor_scale)).
  no_rope_layers: tuple[int, ...] = ()
  attn_temperature_tuning: bool = False
  floor_scale: float = 8192.0
  attn_scale: float = 0.1
  # Rotary pairs adjacent features (2i, 2i + 1), as Llama 4's complex rotation does, instead of
  # the rotate-half layout (i, i + head_dim / 2).
  rope_interleaved: bool = False
  num_experts: int = 0  # 0: dense MLP; > 0: sparse MoE (Mixtral, Qwen3-MoE, Llama 4)
  num_experts_per_tok: int = 2
  # The MoE layers (None: every layer); the others have a dense MLP of `intermediate_size`.
  moe_layers: tuple[int, ...] | None = None
  # The experts' width (None: intermediate_size, as in Mixtral).
  moe_intermediate_size: int | None = None
  # "softmax": softmax over all experts, top k kept, renormalised when norm_topk_prob (Mixtral,
  # Qwen3-MoE); "sigmoid": top k of the logits, their sigmoids scaling the experts' input
  # (Llama 4).
  router: str = "softmax"
  norm_topk_prob: bool = True
  shared_expert: bool = False  # an always-on expert of moe width beside the routed ones
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    for name in ("layer_types", "no_rope_layers", "moe_layers"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    self.validate()

  def validate(self):
    def need(ok, msg):
      if not ok:
        raise ZooError(f"invalid model config: {msg}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
    need(self.family in FAMILIES, f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
    need(self.num_heads % self.num_kv_heads == 0,
         f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    need(self.rms_norm_eps > 0, "rms_norm_eps must be positive")
    need(self.rope_theta > 0, "rope_theta must be positive")
    if self.rope_scaling is not None:
      need(self.rope_scaling.rope_type in ROPE_TYPES,
           f"rope_scaling.rope_type {self.rope_scaling.rope_type!r} is not one of {ROPE_TYPES}")
    need(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive")
    if self.layer_types is not None:
      need(len(self.layer_types) == self.num_layers,
           f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
      for kind in self.layer_types:
        need(kind in LAYER_TYPES, f"layer_types entry {kind!r} is not one of {LAYER_TYPES}")
      need(self.sliding_window is not None or "sliding_attention" not in self.layer_types,
           "layer_types asks for sliding attention but sliding_window is not set")
      need(self.attention_chunk_size is not None or "chunked_attention" not in self.layer_types,
           "layer_types asks for chunked attention but attention_chunk_size is not set")
    need(self.attention_chunk_size is None or self.attention_chunk_size > 0,
         "attention_chunk_size must be positive")
    need(self.qk_norm in QK_NORMS, f"qk_norm {self.qk_norm!r} is not one of {QK_NORMS}")
    for i in self.no_rope_layers:
      need(isinstance(i, int) and 0 <= i < self.num_layers,
           f"no_rope_layers entry {i!r} is not a layer index")
    need(self.floor_scale > 0, "floor_scale must be positive")
    need(self.num_experts >= 0, "num_experts must be >= 0")
    need(self.router in ROUTERS, f"router {self.router!r} is not one of {ROUTERS}")
    need(self.moe_intermediate_size is None or self.moe_intermediate_size > 0,
         "moe_intermediate_size must be positive")
    if self.num_experts:
      need(0 < self.num_experts_per_tok <= self.num_experts,
           f"num_experts_per_tok must be in 1..{self.num_experts}")
    if self.moe_layers is not None:
      need(self.num_experts > 0, "moe_layers is set but num_experts is 0")
      for i in self.moe_layers:
        need(isinstance(i, int) and 0 <= i < self.num_layers,
             f"moe_layers entry {i!r} is not a layer index")

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of one layer, or None for full causal attention."""
    if self.sliding_window is None:
      return None
    if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
      return None
    return self.sliding_window

  def layer_chunk(self, layer: int) -> int | None:
    """The attention chunk of one layer, or None when it is not a chunked-attention layer."""
    if self.layer_types is None or self.layer_types[layer] != "chunked_attention":
      return None
    return self.attention_chunk_size

  def layer_rope(self, layer: int) -> bool:
    return layer not in self.no_rope_layers

  def is_moe_layer(self, layer: int) -> bool:
    return bool(self.num_experts) and (self.moe_layers is None or layer in self.moe_layers)

  @property
  def expert_size(self) -> int:
    return self.moe_intermediate_size or self.intermediate_size

  def replace(self, **changes) -> "LlamaConfig":
    """A copy with `changes`; a head_dim that was derived is derived again from the new sizes."""
    derived = self.head_dim == self.hidden_size // self.num_heads
    if derived and "head_dim" not in changes and {"hidden_size", "num_heads"} & set(changes):
      changes["head_dim"] = None
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for name in ("layer_types", "no_rope_layers", "moe_layers"):
      if getattr(self, name) is not None:
        out[name] = list(getattr(self, name))
    if isinstance(self.eos_token_id, tuple):
      out["eos_token_id"] = list(self.eos_token_id)
    return out

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "LlamaConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ZooError(f"invalid model config: unknown field {unknown[0]!r}")
    try:
      return cls(**data)
    except TypeError as e:
      raise ZooError(f"invalid model config: {e}") from None

  def num_params(self) -> int:
    """The number of parameters, counting tied embeddings once."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attn = d * q + 2 * d * kv + q * d
    attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
    attn += 2 * self.head_dim * (self.qk_norm == "rms")
    dense = 3 * d * f + (2 * f + d) * self.mlp_bias
    e = self.expert_size
    moe = (self.num_experts + self.shared_expert) * 3 * d * e + d * self.num_experts
    layers = sum(attn + 2 * d + (moe if self.is_moe_layer(i) else dense)
                 for i in range(self.num_layers))
    return v * d * (1 if self.tie_word_embeddings else 2) + layers + d

  def active_params(self) -> int:
    """The parameters one token runs through (the routed experts counted k of E times)."""
    if not self.num_experts:
      return self.num_params()
    idle = 3 * self.hidden_size * self.expert_size * (self.num_experts - self.num_experts_per_tok)
    moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_layers))
    return self.num_params() - moe_layers * idle


def llama3_scaling(factor: float, original: int = 8192) -> RopeScaling:
  return RopeScaling("llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=original)

