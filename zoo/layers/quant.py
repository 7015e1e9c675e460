"""Block-quantized frozen weights for QLoRA: int8 and NF4 codes, dequantized on the fly.

A `QTensor` is a JAX pytree: its arrays (`codes`, `scales`) are leaves, so it passes through
`jax.jit` arguments, `jax.tree.map` and `jax.device_put`; its metadata (kind, shape, block size,
original dtype) is static. `dequantize` is pure `jnp` and is meant to run inside the jitted step,
next to the matmul that consumes the weight.

Blocking: the weight is flattened in row-major (C) order and cut into consecutive runs of
`block_size` elements, the same convention as bitsandbytes. A block therefore lies along the
last axis and may continue onto the next row when the last axis is not a multiple of
`block_size`; only the total number of elements has to be a multiple of it. Storage is laid out
per block, so sharding the leading (block) axis of both leaves splits the weight by rows:

- `codes`: int8 [blocks, block_size] for "int8"; uint8 [blocks, block_size // 2] for "nf4", two
  4-bit codes per byte, the earlier element in the high nibble (as bitsandbytes packs them).
- `scales`: float32 [blocks, 1]; absmax / 127 for "int8", the block absmax for "nf4".

int8 is symmetric absmax: code = round(w / scale) in [-127, 127]. NF4 (Dettmers et al., 2023,
"QLoRA") normalizes a block by its absmax and stores the index of the nearest of the 16
NormalFloat values; a value exactly halfway between two of them takes the lower one. An all-zero
block gets scale 0 and dequantizes to zeros.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo.errors import ZooError

KINDS = ("int8", "nf4")

# The NormalFloat4 codebook as published with QLoRA (bitsandbytes' `NF4` table), ascending.
NF4_CODEBOOK = np.array([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
  0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

# Decision boundaries between neighbouring NF4 values; code = number of boundaries below x.
_NF4_MIDPOINTS = ((NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class QTensor:
  """A block-quantized array: `codes` and `scales` are pytree leaves, the rest is static."""

  codes: Any
  scales: Any
  kind: str
  shape: tuple[int, ...]
  block_size: int
  dtype: str

  @property
  def size(self) -> int:
    """Number of elements of the original array."""
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)


jax.tree_util.register_dataclass(QTensor, data_fields=["codes", "scales"],
                                 meta_fields=["kind", "shape", "block_size", "dtype"])


def is_quantized(x) -> bool:
  """Whether `x` is a `QTensor`."""
  return isinstance(x, QTensor)


def _check(w, kind: str, block_size: int) -> None:
  if kind not in KINDS:
    raise ZooError(f"unknown quantization kind {kind!r}; expected one of {', '.join(KINDS)}")
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
      or block_size < 1:
    raise ZooError(f"quantization block_size must be a positive integer, got {block_size!r}")
  if kind == "nf4" and block_size % 2:
    raise ZooError(f"nf4 packs two codes per byte, so block_size must be even, got {block_size}")
  if not hasattr(w, "shape") or not hasattr(w, "dtype"):
    raise ZooError(f"can only quantize arrays, got {type(w).__name__}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ZooError(f"can only quantize floating-point arrays, got dtype {w.dtype}")
  size = math.prod(w.shape)
  if size == 0 or size % block_size:
    raise ZooError(f"cannot quantize shape {tuple(w.shape)} in blocks of {block_size}: "
                   f"{size} elements is not a positive multiple of {block_size}")


def _divide(x: jax.Array, y) -> jax.Array:
  """x / y rounded as IEEE division.

  XLA rewrites a division by a broadcast (or constant) divisor into a multiplication by the
  rounded reciprocal, which can be one ulp off and move a code across a rounding boundary; the
  optimization barrier hides the broadcast from that rewrite.
  """
  return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(y, x.dtype), x.shape))


@jax.jit(static_argnames=("kind", "block_size"))
def _encode(w: jax.Array, kind: str, block_size: int) -> tuple[jax.Array, jax.Array]:
  blocks = w.astype(jnp.float32).reshape(-1, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
  if kind == "int8":
    scales = _divide(absmax, 127.0)
    safe = jnp.where(scales == 0, 1.0, scales)
    codes = jnp.clip(jnp.round(_divide(blocks, safe)), -127, 127).astype(jnp.int8)
    return codes, scales
  normalized = _divide(blocks, jnp.where(absmax == 0, 1.0, absmax))
  index = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normalized, side="left")
  pairs = index.astype(jnp.uint8).reshape(blocks.shape[0], block_size // 2, 2)
  codes = (pairs[..., 0] << 4) | pairs[..., 1]
  return codes, absmax


def quantize(w, kind: str, block_size: int = 64) -> QTensor:
  """Quantize a float array (numpy or JAX, any rank) to `kind` ("int8" or "nf4").

  The element count must be a multiple of `block_size` (blocking: see the module docstring).
  A `jax.ShapeDtypeStruct` gives the QTensor's shapes only (for compiling ahead of the data).
  """
  _check(w, kind, block_size)
  block_size = int(block_size)
  if isinstance(w, jax.ShapeDtypeStruct):
    codes, scales = jax.eval_shape(lambda x: _encode(x, kind=kind, block_size=block_size), w)
  else:
    w = jnp.asarray(w)
    if not bool(jnp.all(jnp.isfinite(w))):
      raise ZooError(f"cannot quantize an array of shape {tuple(w.shape)} with inf or nan "
                     "values")
    codes, scales = _encode(w, kind=kind, block_size=block_size)
  return QTensor(codes=codes, scales=scales, kind=kind, shape=tuple(int(d) for d in w.shape),
                 block_size=block_size, dtype=jnp.dtype(w.dtype).name)


def dequantize(q: QTensor, dtype=jnp.float32) -> jax.Array:
  """The array `q` stands for, of its original shape, in `dtype` (None: the original dtype).

  Pure `jnp`, so it can run inside `jax.jit` with `q` as an argument.
  """
  if not is_quantized(q):
    raise ZooError(f"dequantize expects a QTensor, got {type(q).__name__}")
  dtype = jnp.dtype(q.dtype if dtype is None else dtype)
  if q.kind == "int8":
    values = q.codes.astype(jnp.float32)
  elif q.kind == "nf4":
    codes = q.codes.astype(jnp.uint8)
    index = jnp.stack([codes >> 4, codes & 0x0F], axis=-1).reshape(codes.shape[0], -1)
    # mode "clip": a 4-bit code is always in range, and the default ("fill") would add a
    # weight-sized select after the gather
    values = jnp.take(jnp.asarray(NF4_CODEBOOK), index.astype(jnp.int32), axis=0, mode="clip")
  else:
    raise ZooError(f"unknown quantization kind {q.kind!r}; expected one of {', '.join(KINDS)}")
  return (values * q.scales.astype(jnp.float32)).reshape(q.shape).astype(dtype)


def nbytes(q: QTensor) -> int:
  """Bytes actually stored for `q`: the codes plus the scales."""
  return sum(int(math.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in (q.codes, q.scales))


def bf16_bytes(q: QTensor) -> int:
  """Bytes the same array takes in bfloat16, the baseline to report `nbytes` against."""
  return q.size * 2


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def default_predicate(path: str, array) -> bool:
  """Quantize 2-D arrays whose dotted path ends with `kernel` (the linear layers' weights)."""
  return len(array.shape) == 2 and path.split(".")[-1] == "kernel"


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, jax.Array, jax.ShapeDtypeStruct))


def quantize_leaf(name: str, leaf, kind: str, block_size: int = 64,
                  predicate: Callable[[str, Any], bool] | None = None, *,
                  stacked: bool = False):
  """`leaf` (the parameter at dotted path `name`) as a `QTensor` if `predicate(name, leaf)`
  (by default `default_predicate`) picks it; anything else, or a QTensor, as it is.

  stacked: `leaf` holds one weight per slot of its leading axis (scanned layers,
  zoo.models.stack); each is quantized on its own (`stack_quantized`)."""
  predicate = default_predicate if predicate is None else predicate
  if is_quantized(leaf) or not _is_array(leaf):
    return leaf
  one = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype) if stacked else leaf
  if not predicate(name, one):
    return leaf
  try:
    if not stacked:
      return quantize(leaf, kind, block_size)
    if isinstance(leaf, jax.ShapeDtypeStruct):
      q = quantize(one, kind, block_size)
      lead = lambda a: jax.ShapeDtypeStruct((leaf.shape[0], *a.shape), a.dtype)  # noqa: E731
      return dataclasses.replace(q, codes=lead(q.codes), scales=lead(q.scales))
    return stack_quantized([quantize(leaf[g], kind, block_size) for g in range(leaf.shape[0])])
  except ZooError as e:
    raise ZooError(f"{name}: {e}") from None


def stack_quantized(parts: list[QTensor]) -> QTensor:
  """QTensors of one shape as one whose codes and scales gain a leading axis (numpy on the
  host): `shape` stays the shape of one part, which is what a scan over the leading axis
  hands each step."""
  first = parts[0]
  return dataclasses.replace(first, codes=np.stack([np.asarray(p.codes) for p in parts]),
                             scales=np.stack([np.asarray(p.scales) for p in parts]))


def quantize_tree(params, kind: str, block_size: int = 64,
                  predicate: Callable[[str, Any], bool] | None = None):
  """`params` (nested dicts of arrays, keys str or int) with the selected leaves as `QTensor`s.

  `predicate(path, array)` picks the leaves, `path` being the dotted keys ("layers.0.mlp.up.
  kernel"); by default `default_predicate`. Other leaves, and existing QTensors, are kept as is.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: quantize_leaf(_path_name(path), leaf, kind, block_size, predicate),
      params, is_leaf=is_quantized)


def dequantize_tree(params, dtype=jnp.float32):
  """`params` with every `QTensor` replaced by its dequantized array (dtype None: original)."""
  return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, params,
                      is_leaf=is_quantized)
