"""Meta's consolidated checkpoints <-> zoo: `params.json` plus `consolidated.NN.pth` shards.

A Meta directory holds `params.json` (the `ModelArgs` of Meta's reference code), one state dict
per model-parallel rank, `consolidated.00.pth ... consolidated.NN.pth`, and usually
`tokenizer.model`. Each rank holds what fairscale's layers in the reference hold:
ColumnParallelLinear (wq, wk, wv, w1, w3, output) a block of output rows, RowParallelLinear
(wo, w2) a block of input columns, norms replicated. The embedding is split by vocabulary rows
in LLaMA 3's reference (VocabParallelEmbedding) and by columns in LLaMA 1/2's and CodeLlama's
(ParallelEmbedding): reading tells them apart by shape; writing uses the LLaMA 1/2 layout (and
leaves out rope_theta when it is 10000, which LLaMA 2's ModelArgs does not accept) only when the
tokenizer.model carried along is SentencePiece, i.e. when only that reference can run it.

Meta's q/k rows are in the interleaved rotary layout (pairs of adjacent rows are the real and
imaginary parts of one complex rotation); zoo and HF use rotate-half. `permute_rotary` converts.

Memory: the shards are opened with torch.load(mmap=True), so a tensor's pieces are paged in only
when it is merged, one tensor at a time. Writing fills one memory-mapped scratch file per shard,
one tensor at a time, then torch.save writes each shard from those file-backed pages.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import ml_dtypes
import numpy as np

from zoo.convert.tensors import TensorInfo, torch_to_numpy
from zoo.data.tokenizers import load_tokenizer
from zoo.errors import ZooError
from zoo.io import load_torch, read_json, write_json
from zoo.models.config import LlamaConfig, llama3_scaling

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
# Files of a Meta directory that describe that directory only and must not travel on.
OWN_FILES = {PARAMS, "checklist.chk"}
# LLaMA 1/2 shards carry the reference's rotary inverse frequencies; nothing reads them.
IGNORED = {"rope.freqs"}
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")

# What use_scaled_rope means: the constants hard-coded in llama_models' apply_scaling.
META_ROPE_SCALING = llama3_scaling(8.0, original=8192)

# params.json fields zoo reads; any other field is refused (they select vision, MoE, quantized
# or LoRA variants, which compute something else).
_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
           "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope"}


def shard_files(directory: str) -> list[str]:
  """consolidated.00.pth ... in rank order; [] if there are none; raises on a gap."""
  ranks = {}
  for name in os.listdir(directory):
    m = _SHARD.fullmatch(name)
    if m:
      ranks[int(m.group(1))] = os.path.join(directory, name)
  for rank in range(len(ranks)):
    if rank not in ranks:
      raise ZooError(f"{directory} has {len(ranks)} consolidated.*.pth shards but "
                     f"consolidated.{rank:02d}.pth is missing")
  return [ranks[r] for r in range(len(ranks))]


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
  """The FFN width Meta's FeedForward derives from dim, exactly as its reference computes it."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, hidden: int) -> tuple[int, float | None]:
  """(multiple_of, ffn_dim_multiplier) that reproduce `hidden`, preferring round values."""
  base = int(2 * (4 * dim) / 3)
  sizes = [2**k for k in range(12, -1, -1)]
  candidates = [(m, None) for m in sizes]
  for digits in range(1, 5):
    candidates += [(m, round(hidden / base, digits)) for m in sizes]
  # multiple_of 1 with the multiplier that lands on `hidden` exactly, for any width
  candidates += [(1, (hidden + 0.5) / base), (1, hidden / base)]
  for multiple_of, multiplier in candidates:
    if (multiplier is None or multiplier > 0) and ffn_hidden(dim, multiple_of,
                                                             multiplier) == hidden:
      return multiple_of, multiplier
  raise ZooError(f"no multiple_of/ffn_dim_multiplier reproduce intermediate_size {hidden} for "
                 f"dim {dim} in Meta's format")


def permute_rotary(w: np.ndarray, n_heads: int, inverse: bool = False) -> np.ndarray:
  """Rows of a q/k projection (axis 0: n_heads * head_dim) from Meta's interleaved rotary
  layout (x0, y0, x1, y1, ... per head) to rotate-half (x0, x1, ..., y0, y1, ...); with
  inverse=True, back. The rows are only reordered, so both directions are exact."""
  half = w.shape[0] // n_heads // 2
  if n_heads * 2 * half != w.shape[0]:
    raise ZooError(f"{w.shape[0]} rows are not {n_heads} heads of an even size")
  groups = (n_heads, 2, half) if inverse else (n_heads, half, 2)
  return w.reshape(*groups, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# The weight map.

@dataclasses.dataclass(frozen=True)
class Entry:
  meta: str
  zoo: str
  shape: tuple[int, ...]  # the whole tensor, Meta layout ([out, in] for matrices)
  split: int | None  # the axis model-parallel shards cut; None: every shard holds a copy
  transpose: bool
  rotary_heads: int = 0  # q/k: heads to permute between the rotary layouts


def weight_map(c: LlamaConfig, embed_split: int = 0) -> list[Entry]:
  """Every tensor, in the reference's module order."""
  d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  out = [Entry("tok_embeddings.weight", "embed_tokens.embedding", (v, d), embed_split, False)]
  for i in range(c.num_layers):
    m, z = f"layers.{i}.", f"layers.{i}."
    out += [
      Entry(m + "attention.wq.weight", z + "self_attn.q_proj.kernel", (q, d), 0, True,
            c.num_heads),
      Entry(m + "attention.wk.weight", z + "self_attn.k_proj.kernel", (kv, d), 0, True,
            c.num_kv_heads),
      Entry(m + "attention.wv.weight", z + "self_attn.v_proj.kernel", (kv, d), 0, True),
      Entry(m + "attention.wo.weight", z + "self_attn.o_proj.kernel", (d, q), 1, True),
      Entry(m + "feed_forward.w1.weight", z + "mlp.gate_proj.kernel", (f, d), 0, True),
      Entry(m + "feed_forward.w2.weight", z + "mlp.down_proj.kernel", (d, f), 1, True),
      Entry(m + "feed_forward.w3.weight", z + "mlp.up_proj.kernel", (f, d), 0, True),
      Entry(m + "attention_norm.weight", z + "input_layernorm.scale", (d,), None, False),
      Entry(m + "ffn_norm.weight", z + "post_attention_layernorm.scale", (d,), None, False),
    ]
  out += [Entry("norm.weight", "norm.scale", (d,), None, False),
          Entry("output.weight", "lm_head.kernel", (v, d), 0, True)]
  return out


def to_zoo(e: Entry, array: np.ndarray) -> np.ndarray:
  if e.rotary_heads:
    array = permute_rotary(array, e.rotary_heads)
  return array.T if e.transpose else array


def from_zoo(e: Entry, array: np.ndarray) -> np.ndarray:
  if e.transpose:
    array = array.T
  return permute_rotary(array, e.rotary_heads, inverse=True) if e.rotary_heads else array


# ---------------------------------------------------------------------------------------------
# params.json <-> LlamaConfig.

def _context_length(theta: float, scaled: bool) -> int:
  # params.json does not record the trained context; take the family's: LLaMA 3.1+ 128k,
  # LLaMA 3 8k, CodeLlama 16k, LLaMA 2 4k.
  if scaled:
    return 131072
  return {500000.0: 8192, 1000000.0: 16384}.get(float(theta), 4096)


def _special_ids(tokenizer: str | None) -> tuple[int | None, int | None]:
  if tokenizer is None or not os.path.isfile(tokenizer):
    return None, None
  try:
    tok = load_tokenizer(tokenizer)
  except ZooError:  # an unreadable tokenizer does not stop a weight conversion
    return None, None
  return tok.bos_id, tok.eos_id


def config_from_params(params: dict, vocab_size: int | None = None,
                       tokenizer: str | None = None) -> LlamaConfig:
  """A LlamaConfig from params.json; `vocab_size` (from the tensors) fills `vocab_size: -1`."""
  for key, value in params.items():
    if key not in _FIELDS:
      raise ZooError(f"{PARAMS} field {key}={value!r} is not supported by zoo")
  for key in ("dim", "n_layers", "n_heads"):
    if not isinstance(params.get(key), int) or params[key] <= 0:
      raise ZooError(f"{PARAMS} lacks a positive integer {key}")
  dim, heads = params["dim"], params["n_heads"]
  if dim % heads:
    raise ZooError(f"{PARAMS}: dim {dim} is not a multiple of n_heads {heads}")
  kv = params.get("n_kv_heads") or heads
  if params.get("vocab_size", -1) not in (None, -1):
    vocab_size = params["vocab_size"]
  if not isinstance(vocab_size, int) or vocab_size <= 0:
    raise ZooError(f"{PARAMS} has no vocab_size and the checkpoint has no tok_embeddings.weight")
  multiple_of = params.get("multiple_of", 256)
  multiplier = params.get("ffn_dim_multiplier")
  if not isinstance(multiple_of, int) or multiple_of <= 0:
    raise ZooError(f"{PARAMS} field multiple_of={multiple_of!r} is not a positive integer")
  if multiplier is not None and not (isinstance(multiplier, (int, float)) and multiplier > 0):
    raise ZooError(f"{PARAMS} field ffn_dim_multiplier={multiplier!r} is not a positive number")
  for key in ("norm_eps", "rope_theta"):
    value = params.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or value <= 0):
      raise ZooError(f"{PARAMS} field {key}={value!r} is not a positive number")
  theta = float(params.get("rope_theta", 10000.0))  # LLaMA 1/2 files leave it out
  scaled = params.get("use_scaled_rope", False)
  if not isinstance(scaled, bool):
    raise ZooError(f"{PARAMS} field use_scaled_rope={scaled!r} is not true or false")
  bos, eos = _special_ids(tokenizer)
  return LlamaConfig(
    family="llama", vocab_size=vocab_size, hidden_size=dim,
    intermediate_size=ffn_hidden(dim, multiple_of, multiplier), num_layers=params["n_layers"],
    num_heads=heads, num_kv_heads=kv, head_dim=dim // heads,
    max_position_embeddings=_context_length(theta, scaled),
    rms_norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=theta,
    rope_scaling=META_ROPE_SCALING if scaled else None, bos_token_id=bos, eos_token_id=eos)


def _inexpressible(c: LlamaConfig) -> str | None:
  """The first feature of `c` that Meta's format cannot express, or None."""
  if c.family not in ("llama", "mistral", "mixtral", "qwen2"):
    return f"the {c.family} architecture (its layout holds LLaMA 1-3 only)"
  if c.num_experts:
    return "mixture of experts (num_experts)"
  if c.qkv_bias or c.o_bias or c.mlp_bias:
    return "biases (qkv_bias/o_bias/mlp_bias)"
  if any(c.layer_window(i) is not None for i in range(c.num_layers)):
    return "sliding-window attention"
  if c.tie_word_embeddings:
    return "tied embeddings (it stores a separate output.weight)"
  if c.rope_scaling is not None and c.rope_scaling != META_ROPE_SCALING:
    return (f"rope scaling {c.rope_scaling.rope_type} with these parameters (only use_scaled_rope:"
            " llama3, factor 8, low/high_freq_factor 1/4, original length 8192)")
  if c.head_dim * c.num_heads != c.hidden_size:
    return f"head_dim {c.head_dim} != hidden_size / num_heads"
  return None


def params_from_config(c: LlamaConfig, llama2: bool = False) -> dict:
  """params.json for `c`; llama2: the fields LLaMA 1/2's reference accepts."""
  feature = _inexpressible(c)
  if feature:
    raise ZooError(f"Meta's checkpoint format cannot express {feature}")
  multiple_of, multiplier = ffn_params(c.hidden_size, c.intermediate_size)
  out = {"dim": c.hidden_size, "n_layers": c.num_layers, "n_heads": c.num_heads,
         "n_kv_heads": c.num_kv_heads, "vocab_size": c.vocab_size, "multiple_of": multiple_of}
  if multiplier is not None:
    out["ffn_dim_multiplier"] = multiplier
  out["norm_eps"] = c.rms_norm_eps
  if not (llama2 and c.rope_theta == 10000.0):
    out["rope_theta"] = c.rope_theta
  if c.rope_scaling is not None:
    out["use_scaled_rope"] = True
  return out


def is_sentencepiece(path: str) -> bool:
  """Whether a tokenizer.model is SentencePiece (binary) rather than tiktoken BPE (text lines
  `base64 rank`)."""
  with open(path, "rb") as f:
    first = f.read(256).split(b"\n", 1)[0]
  return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first) is None


def read_params(directory: str) -> dict:
  return read_json(os.path.join(directory, PARAMS))


# ---------------------------------------------------------------------------------------------
# Reading.

class MetaSource:
  """The tensors of a Meta directory, shards merged, read one tensor at a time.

  `infos` maps Meta names to the merged tensors' dtype and shape; `config` is the model's.
  """

  def __init__(self, directory: str):
    self.directory = directory
    params = read_params(directory)
    self.files = shard_files(directory)
    if not self.files:
      raise ZooError(f"{directory} has {PARAMS} but no consolidated.*.pth weights")
    self.states = [load_torch(path) for path in self.files]
    n = len(self.files)
    names = list(self.states[0])
    for path, state in zip(self.files[1:], self.states[1:]):
      for name in set(names) ^ set(state):
        has, lacks = (path, self.files[0]) if name in state else (self.files[0], path)
        raise ZooError(f"inconsistent shards: {os.path.basename(has)} has tensor {name} and "
                       f"{os.path.basename(lacks)} does not")
    self.shard_shapes = {}
    dtypes = {}
    for name in names:
      first = self.states[0][name]
      if not hasattr(first, "shape"):
        raise ZooError(f"{self.files[0]}: entry {name} is not a tensor")
      for path, state in zip(self.files[1:], self.states[1:]):
        t = state[name]
        if (not hasattr(t, "shape") or tuple(t.shape) != tuple(first.shape)
            or t.dtype != first.dtype):
          raise ZooError(f"inconsistent shards: tensor {name} is {tuple(first.shape)} "
                         f"{first.dtype} in {os.path.basename(self.files[0])} but "
                         f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', None)} in "
                         f"{os.path.basename(path)}")
      self.shard_shapes[name] = tuple(first.shape)
      dtypes[name] = torch_to_numpy(first.reshape(-1)[:0]).dtype
    self.embed_split, vocab = 0, None
    embed = self.shard_shapes.get("tok_embeddings.weight")
    if embed is not None and len(embed) == 2 and isinstance(params.get("dim"), int):
      self.embed_split, vocab = self._embedding_layout(embed, params["dim"], n)
    tokenizer = os.path.join(directory, TOKENIZER)
    self.config = config_from_params(params, vocab, tokenizer if os.path.isfile(tokenizer)
                                     else None)
    c = self.config
    for what, count in (("n_heads", c.num_heads), ("n_kv_heads", c.num_kv_heads)):
      if count % n:  # e.g. MP 16 over 8 kv heads: each shard would hold a replicated kv head
        raise ZooError(f"{n} shards cannot split {what}={count}"
                       + (" (shards that replicate kv heads are not supported)"
                          if what == "n_kv_heads" else ""))
    self.entries = {e.meta: e for e in weight_map(c, self.embed_split)}
    where = self.files[0] if n == 1 else os.path.join(directory, f"consolidated.*.pth ({n} shards)")
    self.infos = {}
    for name in names:
      shape = self.shard_shapes[name]
      split = self._split(name)
      if split is not None and split < len(shape):
        shape = shape[:split] + (shape[split] * n,) + shape[split + 1:]
      self.infos[name] = TensorInfo(where, dtypes[name], shape, -1)

  @staticmethod
  def _embedding_layout(shape, dim: int, n: int) -> tuple[int, int]:
    """(split axis, vocab size) of tok_embeddings from one shard's shape."""
    rows, cols = shape
    if n == 1 or cols == dim:
      return 0, rows * n
    if cols * n == dim:
      return 1, rows
    raise ZooError(f"tok_embeddings.weight shards of shape {tuple(shape)} fit neither a "
                   f"vocabulary nor a dim split of dim={dim} over {n} shards ({PARAMS} or the "
                   "shard count is wrong)")

  def _split(self, name: str) -> int | None:
    e = self.entries.get(name)
    return None if e is None or len(self.files) == 1 else e.split

  def _missing_factor(self) -> int | None:
    """k if every split tensor is 1/k of what params.json implies along its split axis (shards
    are missing), else None."""
    factors = set()
    for e in self.entries.values():
      if e.split is None or e.meta not in self.infos:
        continue
      shape = self.infos[e.meta].shape
      if len(shape) != len(e.shape):
        return None
      differ = [i for i, (a, b) in enumerate(zip(shape, e.shape)) if a != b]
      # the embedding's split axis is a guess when there is one shard
      allowed = {0, 1} if e.meta == "tok_embeddings.weight" else {e.split}
      if len(differ) != 1 or differ[0] not in allowed or e.shape[differ[0]] % shape[differ[0]]:
        return None
      factors.add(e.shape[differ[0]] // shape[differ[0]])
    return factors.pop() if len(factors) == 1 else None

  def mismatch(self, name: str, expected: tuple[int, ...]) -> str:
    """The error for a merged tensor whose shape is not what params.json implies."""
    n, shape = len(self.files), self.infos[name].shape
    message = (f"tensor {name} has shape {shape}" + (f" (merged from {n} shards)" if n > 1 else "")
               + f", but {PARAMS} implies {expected}")
    factor = self._missing_factor()
    if factor:
      message += f": it looks like a checkpoint of {factor * n} shards, of which {n} were found"
    return message

  def __iter__(self):
    return iter(self.infos)

  def read(self, name: str, index: int | None = None) -> np.ndarray:
    """The whole tensor `name`, merged from every shard."""
    if index is not None:
      raise ZooError("Meta checkpoints have no stacked tensors")
    split = self._split(name)
    pieces = [torch_to_numpy(state[name]) for state in self.states]
    if split is not None:
      return np.concatenate(pieces, axis=split)
    for path, piece in zip(self.files[1:], pieces[1:]):
      if not np.array_equal(piece, pieces[0]):
        raise ZooError(f"inconsistent shards: replicated tensor {name} differs between "
                       f"{os.path.basename(self.files[0])} and {os.path.basename(path)}")
    return pieces[0]


# ---------------------------------------------------------------------------------------------
# Writing.

def _as_torch(array: np.ndarray):
  import torch
  if array.dtype == np.dtype(ml_dtypes.bfloat16):  # numpy has no bfloat16 torch knows
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


class ShardWriter:
  """consolidated.NN.pth files from a plan of (Entry, dtype), filled one tensor at a time."""

  def __init__(self, directory: str, shards: int, plan: list[tuple[Entry, np.dtype]]):
    self.directory, self.shards = directory, shards
    self.slots, size = {}, 0  # meta name -> (entry, dtype, shard shape, byte offset)
    for e, dtype in plan:
      shape = list(e.shape)
      if e.split is not None:
        shape[e.split] //= shards
      dtype = np.dtype(dtype)
      self.slots[e.meta] = (e, dtype, tuple(shape), size)
      size += -(-math.prod(shape) * dtype.itemsize // 64) * 64  # 64-byte aligned pieces
    self.todo = set(self.slots)
    self.scratch = [os.path.join(directory, f".consolidated.{r:02d}.scratch")
                    for r in range(shards)]
    self.maps = []
    for path in self.scratch:
      with open(path, "wb") as f:
        f.truncate(max(size, 1))
      self.maps.append(np.memmap(path, dtype=np.uint8, mode="r+", shape=(max(size, 1),)))

  def _view(self, rank: int, name: str) -> np.ndarray:
    _, dtype, shape, offset = self.slots[name]
    nbytes = math.prod(shape) * dtype.itemsize
    return self.maps[rank][offset:offset + nbytes].view(dtype).reshape(shape)

  def write(self, name: str, array: np.ndarray):
    """Writes tensor `name` (Meta layout, whole), cut into the shards."""
    e, dtype, _, _ = self.slots[name]
    if tuple(array.shape) != e.shape:
      raise ZooError(f"tensor {name} has shape {tuple(array.shape)}, expected {e.shape}")
    pieces = ([array] * self.shards if e.split is None
              else np.split(array, self.shards, axis=e.split))
    for rank, piece in enumerate(pieces):
      self._view(rank, name)[...] = piece.astype(dtype, copy=False)
    self.todo.discard(name)

  def close(self):
    """Checks that every tensor was written, then writes the .pth files."""
    import torch
    if self.todo:
      raise ZooError(f"tensor {sorted(self.todo)[0]} is missing from the input")
    for rank in range(self.shards):
      state = {name: _as_torch(self._view(rank, name)) for name in self.slots}
      torch.save(state, os.path.join(self.directory, f"consolidated.{rank:02d}.pth"))
      del state
      self.maps[rank] = None  # unmapped once unreferenced; the unlinked file goes with it
      os.remove(self.scratch[rank])


def write_meta(ckpt, out_dir: str, shards: int | None, cast: np.dtype | None) -> list[str]:
  """Writes the opened checkpoint `ckpt` into `out_dir` as a Meta directory; returns the side
  files to copy (only tokenizer-like files: HF/zoo json metadata does not belong here)."""
  try:
    import torch  # noqa: F401
  except ImportError:
    raise ZooError("writing Meta checkpoints needs PyTorch: pip install 'zoo[torch]'") from None
  c = ckpt.config
  shards = 1 if shards is None else shards
  if shards < 1:
    raise ZooError(f"--shards must be at least 1, got {shards}")
  side = [p for p in ckpt.side_files if not p.endswith(".json")]
  tokenizer = next((p for p in side if os.path.basename(p) == TOKENIZER), None)
  llama2 = tokenizer is not None and is_sentencepiece(tokenizer)
  params = params_from_config(c, llama2=llama2)
  embed_split = 1 if llama2 else 0
  for what, size in (("n_heads", c.num_heads), ("n_kv_heads", c.num_kv_heads),
                     ("intermediate_size", c.intermediate_size),
                     ("vocab_size" if embed_split == 0 else "hidden_size",
                      c.vocab_size if embed_split == 0 else c.hidden_size)):
    if size % shards:
      raise ZooError(f"--shards {shards} does not divide {what}={size}")
  entries = weight_map(c, embed_split)
  dtypes = ckpt.zoo_dtypes()
  writer = ShardWriter(out_dir, shards, [(e, cast or dtypes[e.zoo]) for e in entries])
  by_zoo = {e.zoo: e for e in entries}
  for name, _, array in ckpt.stream(split_experts=False):
    e = by_zoo[name]
    writer.write(e.meta, from_zoo(e, array))
  writer.close()
  write_json(os.path.join(out_dir, PARAMS), params)
  return side
