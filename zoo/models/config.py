"""The architecture config of the LLaMA family.

Kept free of JAX so that converters and command-line checks can read and validate configs in a
process that never pays for importing JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from zoo.errors import ZooError

FAMILIES = ("llama", "mistral", "mixtral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")


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
  """One decoder architecture for LLaMA 1/2/3.x, CodeLlama, TinyLlama, Mistral, Mixtral and Qwen2.

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
  num_experts: int = 0  # 0: dense MLP; > 0: Mixtral sparse MoE
  num_experts_per_tok: int = 2
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if isinstance(self.layer_types, list):
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
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
    need(self.num_experts >= 0, "num_experts must be >= 0")
    if self.num_experts:
      need(0 < self.num_experts_per_tok <= self.num_experts,
           f"num_experts_per_tok must be in 1..{self.num_experts}")

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of one layer, or None for full causal attention."""
    if self.sliding_window is None:
      return None
    if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
      return None
    return self.sliding_window

  def replace(self, **changes) -> "LlamaConfig":
    """A copy with `changes`; a head_dim that was derived is derived again from the new sizes."""
    derived = self.head_dim == self.hidden_size // self.num_heads
    if derived and "head_dim" not in changes and {"hidden_size", "num_heads"} & set(changes):
      changes["head_dim"] = None
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    if self.layer_types is not None:
      out["layer_types"] = list(self.layer_types)
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
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    if self.num_experts:
      mlp = self.num_experts * 3 * d * f + d * self.num_experts
    layer = attn + mlp + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d


def llama3_scaling(factor: float, original: int = 8192) -> RopeScaling:
  return RopeScaling("llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=original)

