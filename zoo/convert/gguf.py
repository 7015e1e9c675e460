"""zoo -> GGUF, the one-file format of llama.cpp (and of what runs on it: llama-cpp-python,
ollama, LM Studio).

A GGUF file holds key/value metadata (the architecture's hyperparameters under `ARCH.*` keys,
the tokenizer under `tokenizer.ggml.*`) and the tensors under llama.cpp's names, written here
with the `gguf` package, one tensor in memory at a time.

Layouts. Tensors are stored as PyTorch/HF store them ([out, in]; the GGUF header lists the dims
reversed, which the package does). llama.cpp's `llama` architecture rotates q/k in Meta's
interleaved layout (its rope type NORM), so the q/k rows, and their biases, are reordered by
`meta.permute_rotary`, the function the Meta converter uses; its `qwen2` architecture rotates
halves as zoo does (rope type NEOX), so they are not, and neither are those of `qwen3` and
`qwen3moe`. Mixtral is the `llama` architecture with experts stacked [experts, out, in]. The
`llama4` architecture rotates interleaved pairs as Llama 4's checkpoints already store them.

Where llama.cpp hard-codes what a config may vary (Llama 4's chunk of 8192 on three layers of
four and NoPE on the fourth, its temperature constants, q/k norms on every model but the
128-expert one; Qwen3-MoE's renormalised top-k on every layer), a config that differs is
refused with a one-line error naming the field.

What llama.cpp cannot run as zoo does is refused before anything is written: dynamic-NTK and
YaRN rope scaling. A sliding window it does not apply either (its llama and qwen2 graphs attend
to the whole context), so the file's context length is capped at the window, the length up to
which both compute the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import gguf
import numpy as np
from gguf.vocab import bytes_to_unicode
from sentencepiece import sentencepiece_model_pb2

from zoo.convert import hf, meta
from zoo.data.chat import load_chat_template
from zoo.data.tokenizers import (LLAMA3_SPECIAL_TOKENS, SentencePieceTokenizer, load_tokenizer,
                                 parse_tiktoken_ranks)
from zoo.errors import ZooError
from zoo.layers.rope import base_inv_freq, llama3_inv_freq
from zoo.models.config import LlamaConfig

# --dtype names for GGUF; 1-D tensors and the MoE router stay float32 whatever is asked, as
# llama.cpp's own converter keeps them.
DTYPES = {"f32": "F32", "float32": "F32", "f16": "F16", "float16": "F16", "bf16": "BF16",
          "bfloat16": "BF16", "q8_0": "Q8_0"}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16",
               "Q8_0": "MOSTLY_Q8_0"}

# zoo name (after `layers.{i}.`) -> llama.cpp name (after `blk.{i}.`), and how the zoo array
# becomes the stored one: "T" transpose a kernel, "E" swap the last two axes of stacked experts.
_LAYER = {
  "input_layernorm.scale": ("attn_norm.weight", ""),
  "post_attention_layernorm.scale": ("ffn_norm.weight", ""),
  "self_attn.q_proj.kernel": ("attn_q.weight", "T"),
  "self_attn.k_proj.kernel": ("attn_k.weight", "T"),
  "self_attn.v_proj.kernel": ("attn_v.weight", "T"),
  "self_attn.o_proj.kernel": ("attn_output.weight", "T"),
  "self_attn.q_proj.bias": ("attn_q.bias", ""),
  "self_attn.k_proj.bias": ("attn_k.bias", ""),
  "self_attn.v_proj.bias": ("attn_v.bias", ""),
  "self_attn.o_proj.bias": ("attn_output.bias", ""),
  "mlp.gate_proj.kernel": ("ffn_gate.weight", "T"),
  "mlp.up_proj.kernel": ("ffn_up.weight", "T"),
  "mlp.down_proj.kernel": ("ffn_down.weight", "T"),
  "mlp.gate_proj.bias": ("ffn_gate.bias", ""),
  "mlp.up_proj.bias": ("ffn_up.bias", ""),
  "mlp.down_proj.bias": ("ffn_down.bias", ""),
  "block_sparse_moe.gate.kernel": ("ffn_gate_inp.weight", "T"),
  "block_sparse_moe.experts.w1": ("ffn_gate_exps.weight", "E"),
  "block_sparse_moe.experts.w3": ("ffn_up_exps.weight", "E"),
  "block_sparse_moe.experts.w2": ("ffn_down_exps.weight", "E"),
  "block_sparse_moe.shared_expert.gate_proj.kernel": ("ffn_gate_shexp.weight", "T"),
  "block_sparse_moe.shared_expert.up_proj.kernel": ("ffn_up_shexp.weight", "T"),
  "block_sparse_moe.shared_expert.down_proj.kernel": ("ffn_down_shexp.weight", "T"),
  "self_attn.q_norm.scale": ("attn_q_norm.weight", ""),
  "self_attn.k_norm.scale": ("attn_k_norm.weight", ""),
}
# zoo family -> llama.cpp architecture, for the families with an architecture of their own
_ARCHS = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe", "llama4": "llama4"}
# llama.cpp's constants for Llama 4 (llama4.cpp): its chunk, the period of its layer pattern
# (chunked with rotary on three layers of four, full attention without rotary on the fourth),
# its temperature tuning, and the expert count of the one model without q/k norms.
LLAMA4_CHUNK, LLAMA4_PERIOD, LLAMA4_FLOOR, LLAMA4_ATTN_SCALE = 8192, 4, 8192.0, 0.1
LLAMA4_NO_QK_NORM_EXPERTS = 128
_GLOBAL = {
  "embed_tokens.embedding": ("token_embd.weight", ""),
  "norm.scale": ("output_norm.weight", ""),
  "lm_head.kernel": ("output.weight", "T"),
}
_KEEP_F32 = ("ffn_gate_inp.weight",)
# What `zoo convert --verify` allows between llama.cpp on the file and zoo in float32, times the
# logits' scale, by file type: rounding the weights, and for Q8_0 also llama.cpp's 8-bit
# activations, move the logits by this much on random models (measured: f32 3e-6, f16 1.2e-3,
# bf16 1e-2, q8_0 3e-2 of the scale).
TOLERANCES = {"ALL_F32": 1e-3, "MOSTLY_F16": 1e-2, "MOSTLY_BF16": 5e-2, "MOSTLY_Q8_0": 0.1}


@dataclasses.dataclass(frozen=True)
class Tensor:
  zoo: str
  name: str
  shape: tuple[int, ...]  # stored (numpy) shape
  layout: str  # "", "T" or "E"
  rotary_heads: int  # > 0: q/k rows (or bias) to permute into the interleaved layout


def architecture(c: LlamaConfig) -> str:
  """llama.cpp's architecture for `c`: qwen3, qwen3moe and llama4 for those families; qwen2 for
  Qwen2 checkpoints its qwen2 graph can run (no o/MLP bias, heads * head_dim == hidden), else
  llama, whose graph has every other option."""
  if c.family in _ARCHS:
    return _ARCHS[c.family]
  if (c.family == "qwen2" and not (c.o_bias or c.mlp_bias)
      and c.num_heads * c.head_dim == c.hidden_size):
    return "qwen2"
  return "llama"


def tensor_plan(c: LlamaConfig, shapes: dict[str, tuple[int, ...]]) -> list[Tensor]:
  """Every stored tensor of the model with zoo parameter shapes `shapes`, in zoo's order."""
  # llama.cpp's llama and llama4 graphs rotate interleaved pairs (rope type NORM)
  interleaved = architecture(c) in ("llama", "llama4") and not c.rope_interleaved
  out = []
  for zoo_name, shape in shapes.items():
    if zoo_name in _GLOBAL:
      name, layout = _GLOBAL[zoo_name]
    else:
      m = re.fullmatch(r"layers\.(\d+)\.(.+)", zoo_name)
      if m is None or m.group(2) not in _LAYER:
        raise ZooError(f"GGUF export has no llama.cpp name for tensor {zoo_name}")
      name, layout = _LAYER[m.group(2)]
      name = f"blk.{m.group(1)}.{name}"
    stored = {"": shape, "T": shape[::-1], "E": shape[:-2] + shape[:-3:-1]}[layout]
    heads = 0
    if interleaved and re.search(r"attn_[qk]\.", name):
      heads = c.num_heads if ".attn_q." in name else c.num_kv_heads
    out.append(Tensor(zoo_name, name, tuple(stored), layout, heads))
  return out


def to_stored(t: Tensor, array: np.ndarray) -> np.ndarray:
  if t.layout == "T":
    array = array.T
  elif t.layout == "E":
    array = array.swapaxes(-1, -2)
  if t.rotary_heads:
    array = meta.permute_rotary(array, t.rotary_heads, inverse=True)
  return np.ascontiguousarray(array)


def rope_factors(c: LlamaConfig) -> np.ndarray:
  """llama3 rope scaling as llama.cpp applies it: a per-frequency divisor of the base
  frequencies (its `rope_freqs.weight`), taken from zoo's own scaled frequencies."""
  base = base_inv_freq(c.rope_theta, c.head_dim)
  return (base.astype(np.float64) / llama3_inv_freq(base, c.rope_scaling)).astype(np.float32)


def context_length(c: LlamaConfig) -> int:
  windows = [c.layer_window(i) for i in range(c.num_layers)]
  windows = [w for w in windows if w is not None]
  return min([c.max_position_embeddings, *windows])


def moe_step(c: LlamaConfig) -> int | None:
  """The s for which the MoE layers are exactly those with (i + 1) % s == 0, or None."""
  moe = {i for i in range(c.num_layers) if c.is_moe_layer(i)}
  for s in range(1, c.num_layers + 1):
    if moe == {i for i in range(c.num_layers) if (i + 1) % s == 0}:
      return s
  return None


def _unlike_llamacpp(c: LlamaConfig) -> str | None:
  """What llama.cpp's graph for `c`'s architecture computes differently, or None."""
  arch = architecture(c)
  if arch in ("qwen3", "qwen3moe", "llama4") and (c.qkv_bias or c.o_bias or c.mlp_bias):
    return f"attention or MLP biases (llama.cpp's {arch} has none)"
  if arch == "qwen3moe":
    if c.moe_layers is not None:
      return "dense layers among the MoE ones (moe_layers; llama.cpp's qwen3moe has MoE on all)"
    if not c.norm_topk_prob:
      return "norm_topk_prob False (llama.cpp's qwen3moe renormalises the top-k weights)"
  if arch == "llama4":
    chunked = {i for i in range(c.num_layers) if c.layer_chunk(i)}
    nope = set(c.no_rope_layers)
    pattern = {i for i in range(c.num_layers) if (i + 1) % LLAMA4_PERIOD}
    if chunked and (c.attention_chunk_size != LLAMA4_CHUNK or chunked != pattern
                    or nope != set(range(c.num_layers)) - pattern):
      return (f"attention_chunk_size {c.attention_chunk_size} with these layer_types and "
              f"no_rope_layers (llama.cpp's llama4 chunks by {LLAMA4_CHUNK} on three layers of "
              "four and drops rotary on the fourth)")
    if not chunked:
      return ("Llama 4 without chunked attention (llama.cpp's llama4 runs only its chunked "
              "pattern: without it, it stops on its temperature-scale check)")
    if nope and (not c.attn_temperature_tuning or c.floor_scale != LLAMA4_FLOOR
                 or c.attn_scale != LLAMA4_ATTN_SCALE):
      return (f"attention temperature tuning other than on, floor_scale {LLAMA4_FLOOR:g}, "
              f"attn_scale {LLAMA4_ATTN_SCALE} (llama.cpp's llama4 constants)")
    if (c.qk_norm == "l2") != (c.num_experts != LLAMA4_NO_QK_NORM_EXPERTS):
      return (f"qk_norm {c.qk_norm} with {c.num_experts} experts (llama.cpp's llama4 applies "
              f"q/k norms unless a model has {LLAMA4_NO_QK_NORM_EXPERTS} experts)")
    if moe_step(c) is None:
      return "MoE layers that are not every s-th layer (llama.cpp's interleave_moe_layer_step)"
  return None


def check_exportable(c: LlamaConfig):
  """Raises a ZooError naming the first feature llama.cpp cannot compute as zoo does."""
  s = c.rope_scaling
  if s is not None and s.rope_type not in ("linear", "llama3"):
    raise ZooError(f"GGUF export does not support rope scaling {s.rope_type!r}: llama.cpp "
                   "does not compute it as transformers does (linear and llama3 are supported)")
  different = _unlike_llamacpp(c)
  if different:
    raise ZooError(f"GGUF export does not support {different}")


# ---------------------------------------------------------------------------------------------
# The tokenizer.

@dataclasses.dataclass
class Vocab:
  model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
  pre: str  # tokenizer.ggml.pre: the pre-tokenizer llama.cpp applies
  tokens: list[str]
  types: list[int]
  scores: list[float] | None = None
  merges: list[str] | None = None
  bos: int | None = None
  eos: int | None = None
  unk: int | None = None
  pad: int | None = None
  eot: int | None = None
  add_bos: bool = True
  add_space_prefix: bool | None = None
  remove_extra_whitespaces: bool | None = None

  def pad_to(self, size: int, source: str):
    """Fills ids up to the model's vocabulary with unused tokens, as llama.cpp's converter
    does for padded embedding tables."""
    if len(self.tokens) > size:
      raise ZooError(f"the tokenizer ({source}) has {len(self.tokens)} tokens but the model's "
                     f"vocabulary is {size}")
    for i in range(len(self.tokens), size):
      self.tokens.append(f"[PAD{i}]")
      self.types.append(gguf.TokenType.UNUSED)
      if self.scores is not None:
        self.scores.append(-1000.0)


def _sentencepiece_vocab(path: str) -> Vocab:
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  # SentencePiece's piece types are numbered as GGUF's token types (NORMAL 1 ... BYTE 6).
  ids = {p.piece: i for i, p in enumerate(proto.pieces)}
  spec = proto.trainer_spec

  def special(i):
    return i if 0 <= i < len(proto.pieces) else None
  return Vocab(
    model="llama", pre="default", tokens=[p.piece for p in proto.pieces],
    types=[int(p.type) for p in proto.pieces], scores=[float(p.score) for p in proto.pieces],
    bos=special(spec.bos_id), eos=special(spec.eos_id), unk=special(spec.unk_id),
    pad=special(spec.pad_id), eot=ids.get("<|eot_id|>"),
    add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
    remove_extra_whitespaces=bool(proto.normalizer_spec.remove_extra_whitespaces))


def _byte_level(token: bytes, table: dict[int, str]) -> str:
  return "".join(table[b] for b in token)


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """Merges equivalent to tiktoken's ranks. tiktoken joins, at each step, the adjacent pair whose
  join has the lowest rank, so every way to cut a token into two tokens is a merge, ordered by
  the rank of the token it makes (a merge list ranks pairs, not results). Tokens that no merge
  order reaches are still produced whole, as tiktoken does, by llama.cpp's `ignore_merges` for
  the llama-bpe pre-tokenizer."""
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    cuts = [(token[:i], token[i:]) for i in range(1, len(token))]
    cuts = [(a, b) for a, b in cuts if a in ranks and b in ranks]
    merges += sorted(cuts, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
  return merges


def _tiktoken_vocab(path: str, tokenizer) -> Vocab:
  with open(path, "rb") as f:
    ranks = parse_tiktoken_ranks(f.read(), path)
  table = bytes_to_unicode()
  by_rank = sorted(ranks, key=ranks.get)
  tokens = [_byte_level(t, table) for t in by_rank] + list(LLAMA3_SPECIAL_TOKENS)
  types = ([gguf.TokenType.NORMAL] * len(by_rank)
           + [gguf.TokenType.CONTROL] * len(LLAMA3_SPECIAL_TOKENS))
  merges = [f"{_byte_level(a, table)} {_byte_level(b, table)}" for a, b in tiktoken_merges(ranks)]
  return Vocab(model="gpt2", pre="llama-bpe", tokens=tokens, types=types, merges=merges,
               bos=tokenizer.bos_id, eos=tokenizer.eos_id,
               eot=tokenizer.special_tokens["<|eot_id|>"])


# The pre-tokenizer regexes llama.cpp knows by name, as HF tokenizer.json files spell them.
_PRE_TOKENIZERS = {
  "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
  "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _split_patterns(node) -> list[str]:
  if not isinstance(node, dict):
    return []
  if node.get("type") == "Sequence":
    return [p for child in node.get("pretokenizers", []) for p in _split_patterns(child)]
  if node.get("type") == "Split":
    pattern = node.get("pattern", {})
    return [pattern.get("Regex") or re.escape(pattern.get("String", ""))]
  return []


def _hf_vocab(path: str, tokenizer) -> Vocab:
  """A byte-level BPE tokenizer.json (LLaMA 3, Qwen2)."""
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  model = spec.get("model") or {}
  pre = spec.get("pre_tokenizer") or {}
  byte_level = "ByteLevel" in json.dumps(pre) and model.get("type") == "BPE"
  patterns = _split_patterns(pre)
  name = next((n for n, p in _PRE_TOKENIZERS.items() if patterns == [p]), None)
  if not byte_level or name is None:
    raise ZooError(f"GGUF export supports byte-level BPE tokenizer.json files with the LLaMA 3 "
                   f"or Qwen2 pre-tokenizer, not {path}; put the SentencePiece tokenizer.model "
                   "beside it")
  vocab = dict(model.get("vocab", {}))
  added = {t["content"]: t for t in spec.get("added_tokens", [])}
  for t in added.values():
    vocab[t["content"]] = t["id"]
  size = max(vocab.values()) + 1
  tokens = [f"[PAD{i}]" for i in range(size)]
  types = [gguf.TokenType.UNUSED] * size
  for text, i in vocab.items():
    tokens[i] = text
    if text in added:
      types[i] = gguf.TokenType.CONTROL if added[text].get("special") else \
        gguf.TokenType.USER_DEFINED
    else:
      types[i] = gguf.TokenType.NORMAL
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  return Vocab(model="gpt2", pre=name, tokens=tokens, types=types, merges=merges,
               bos=tokenizer.bos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id,
               eot=vocab.get("<|eot_id|>", vocab.get("<|im_end|>")),
               add_bos=tokenizer.bos_id is not None and name == "llama-bpe")


def vocab_of(ckpt) -> Vocab:
  """The GGUF vocabulary of the checkpoint's tokenizer: tokenizer.model (SentencePiece or
  tiktoken BPE) first, else a byte-level BPE tokenizer.json."""
  files = {os.path.basename(p): p for p in ckpt.side_files}
  path = files.get("tokenizer.model") or files.get("tokenizer.json")
  if path is None:
    raise ZooError(f"{ckpt.path} has no tokenizer (tokenizer.model or tokenizer.json), which a "
                   "GGUF file must carry for llama.cpp to tokenize")
  tokenizer = load_tokenizer(path)
  if path.endswith(".json"):
    vocab = _hf_vocab(path, tokenizer)
  elif isinstance(tokenizer, SentencePieceTokenizer):
    vocab = _sentencepiece_vocab(path)
  else:
    vocab = _tiktoken_vocab(path, tokenizer)
  eos = ckpt.config.eos_token_id
  if isinstance(eos, tuple):
    eos = eos[0]
  if eos is not None:
    vocab.eos = eos
  if ckpt.config.bos_token_id is not None:
    vocab.bos = ckpt.config.bos_token_id
  vocab.pad_to(ckpt.config.vocab_size, os.path.basename(path))
  return vocab


def _chat_template(directory: str) -> str | None:
  try:
    return load_chat_template(directory)[0]
  except ZooError:
    return None


# ---------------------------------------------------------------------------------------------
# Writing.

def _qtype(t: Tensor, requested: str):
  q = gguf.GGMLQuantizationType
  if len(t.shape) == 1 or t.name.endswith(_KEEP_F32):
    return q.F32
  if requested == "Q8_0" and t.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
    return q.F16  # rows that Q8_0's 32-value blocks do not divide, as llama.cpp does
  return q[requested]


def file_type(dtype: str | None, ckpt=None) -> str:
  """The GGML type an export writes its matrices in: `dtype` (a --dtype name), or with None
  the checkpoint's own (when `ckpt` is given)."""
  if dtype is None:
    return default_dtype(ckpt) if ckpt is not None else "F32"
  if dtype not in DTYPES:
    raise ZooError(f"--dtype {dtype} is not a GGUF type; use one of f32, f16, bf16, q8_0")
  return DTYPES[dtype]


def default_dtype(ckpt) -> str:
  dtype = np.dtype(ckpt.zoo_dtypes()["embed_tokens.embedding"]).name
  return {"float16": "F16", "bfloat16": "BF16"}.get(dtype, "F32")


def write_gguf(ckpt, path: str, dtype: str | None = None) -> list[str]:
  """Writes the opened checkpoint `ckpt` as the GGUF file `path` (which must not exist);
  returns notes for the user (a capped context)."""
  c = ckpt.config
  requested = file_type(dtype, ckpt)
  check_exportable(c)
  vocab = vocab_of(ckpt)
  arch = architecture(c)
  plan = tensor_plan(c, hf.zoo_shapes(c))
  notes = []

  w = gguf.GGUFWriter(None, arch)
  w.add_name(os.path.basename(os.path.normpath(ckpt.path)))
  ctx = context_length(c)
  if ctx < c.max_position_embeddings:
    notes.append(f"context length set to the sliding window {ctx} (llama.cpp attends to the "
                 f"whole context; the model's own is {c.max_position_embeddings})")
  w.add_context_length(ctx)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_heads)
  w.add_head_count_kv(c.num_kv_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_dimension_count(c.head_dim)
  w.add_rope_freq_base(c.rope_theta)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  if c.num_experts:
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
  if arch in ("qwen3moe", "llama4"):
    w.add_expert_feed_forward_length(c.expert_size)
  if arch == "llama4":
    w.add_interleave_moe_layer_step(moe_step(c))
  if c.rope_scaling is not None and c.rope_scaling.rope_type == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(c.rope_scaling.factor)
  w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[requested]))
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)

  w.add_tokenizer_model(vocab.model)
  w.add_tokenizer_pre(vocab.pre)
  w.add_token_list(vocab.tokens)
  w.add_token_types(vocab.types)
  if vocab.scores is not None:
    w.add_token_scores(vocab.scores)
  if vocab.merges is not None:
    w.add_token_merges(vocab.merges)
  for value, add in ((vocab.bos, w.add_bos_token_id), (vocab.eos, w.add_eos_token_id),
                     (vocab.unk, w.add_unk_token_id), (vocab.pad, w.add_pad_token_id),
                     (vocab.eot, w.add_eot_token_id)):
    if value is not None:
      add(value)
  w.add_add_bos_token(vocab.add_bos)
  w.add_add_eos_token(False)
  if vocab.add_space_prefix is not None:
    w.add_add_space_prefix(vocab.add_space_prefix)
  if vocab.remove_extra_whitespaces is not None:
    w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
  template = _chat_template(ckpt.path)
  if template:
    w.add_chat_template(template)

  extra = []
  if c.rope_scaling is not None and c.rope_scaling.rope_type == "llama3":
    extra.append(("rope_freqs.weight", rope_factors(c)))
  for name, array in extra:
    w.add_tensor_info(name, array.shape, np.dtype(np.float32), array.nbytes,
                      raw_dtype=gguf.GGMLQuantizationType.F32)
  qtypes = {}
  for t in plan:
    qtypes[t.name] = _qtype(t, requested)
    byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qtypes[t.name])
    w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                      raw_dtype=qtypes[t.name])

  w.write_header_to_file(path)
  w.write_kv_data_to_file()
  w.write_ti_data_to_file()
  for _, array in extra:
    w.write_tensor_data(array)
  for t in plan:
    array = to_stored(t, ckpt.read(t.zoo)).astype(np.float32, copy=False)
    w.write_tensor_data(gguf.quants.quantize(array, qtypes[t.name]))
  w.close()
  return notes
