"""Fused causal attention on TPU: jax's Pallas splash-attention kernel in zoo's layouts.

The kernel never materialises the [heads, T, T] score matrix: it walks blocks of queries and
keys, skips the blocks the mask rules out (above the diagonal, outside a sliding window) and
keeps a running softmax, forward and backward. Grouped-query attention runs the kernel's
multi-query form once per kv head, on that head's group of query heads, so keys and values are
never repeated in memory. Packed rows pass their segment ids to the kernel. A length that is not
a multiple of the block size is padded with a segment of its own, which no real token sees.

On a mesh (inside `zoo.sharding.use`) the kernel runs under `shard_map`, each device on its rows
of the batch and its query and kv heads, as the rules shard them; the sequence is whole on each
device. Elsewhere than on a TPU, `interpret=True` runs the same kernel in Pallas's interpreter
(slowly): that is how the tests check it on a CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from zoo import sharding

# The kernel's tiles: queries and keys in blocks of up to this many tokens; the sequence is
# padded to a multiple of the block (whole 128-token lanes below it).
MAX_BLOCK = 512
LANE = 128
PAD_SEGMENT = -1  # the padding's segment id: no real token's


def block_size(length: int) -> int:
  """The block for a sequence of `length` tokens: MAX_BLOCK, or the whole (lane-padded)
  sequence when it is shorter."""
  return min(MAX_BLOCK, -(-length // LANE) * LANE)


@functools.lru_cache(maxsize=64)
def _kernel(length: int, group: int, window: int | None, block: int, interpret: bool,
            chunk: int | None = None):
  """The multi-query kernel for `group` query heads over one kv head, sequence `length`."""
  if chunk is not None:  # causal within chunks of `chunk` positions (Llama 4)
    mask = masks.ChunkedCausalMask((length, length), chunk_size=chunk)
  elif window is None:
    mask = masks.CausalMask((length, length))
  else:  # causal within the window: key j is seen from query i when 0 <= i - j < window
    mask = masks.LocalMask((length, length), (window - 1, 0), 0)
  sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  # Its block tables are constants: made outside any trace, so the cached kernel holds arrays
  # and not the tracers of the step that first asked for it.
  with jax.ensure_compile_time_eval():
    return kernel.make_splash_mqa(masks.MultiHeadMask([mask] * group), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, segment_ids, *, window: int | None, interpret: bool,
           chunk: int | None = None):
  """Attention on one device's arrays: q [B, T, N, H], k and v [B, T, K, H]."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  group = n // kv
  block = block_size(t)
  padded = -(-t // block) * block
  pad = padded - t
  if segment_ids is None and pad:
    segment_ids = jnp.zeros((b, t), jnp.int32)
  rows = ((0, 0), (0, pad), (0, 0), (0, 0))
  # The kernel does not scale the scores: scale the queries (as 1 / sqrt(H), in f32).
  q = jnp.pad(q * jnp.asarray(1.0 / np.sqrt(h), q.dtype), rows)
  k, v = jnp.pad(k, rows), jnp.pad(v, rows)
  qh = q.reshape(b, padded, kv, group, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  attend = _kernel(padded, group, window, block, interpret, chunk)
  if segment_ids is None:
    out = jax.vmap(jax.vmap(attend))(qh, kh, vh)  # over rows, then kv heads: [B, K, G, T, H]
  else:
    def per_head(qg, kg, vg, seg):
      return attend(qg, kg, vg, segment_ids=kernel.SegmentIds(q=seg, kv=seg))
    segments = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)),
                       constant_values=PAD_SEGMENT)
    out = jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(qh, kh, vh, segments)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, n, h)[:, :t]


def splash_attention(q, k, v, *, segment_ids=None, window: int | None = None,
                     chunk: int | None = None, interpret: bool = False):
  """Causal attention of q [B, T, N, H] over k, v [B, T, K, H] (N a multiple of K), within
  `window` tokens, within chunks of `chunk` positions and within segments (`segment_ids`
  [B, T]) when given. Returns [B, T, N, H]."""
  local = functools.partial(_local, window=window, interpret=interpret, chunk=chunk)
  active = sharding.active()
  if active is None:
    return local(q, k, v, segment_ids)
  mesh, rules = active
  q_spec = sharding.logical_to_spec(("batch", None, "heads", None), rules, mesh, q.shape)
  kv_spec = sharding.logical_to_spec(("batch", None, "kv_heads", None), rules, mesh, k.shape)
  if q_spec[2] != kv_spec[2] or q_spec[0] != kv_spec[0]:
    # The query heads of one kv head must sit on its device: split only what both split.
    q_spec = kv_spec = PartitionSpec(kv_spec[0] if q_spec[0] == kv_spec[0] else None)
  rows = PartitionSpec(q_spec[0] if len(q_spec) else None)
  if segment_ids is None:
    run = lambda q, k, v: local(q, k, v, None)  # noqa: E731
    args, specs = (q, k, v), (q_spec, kv_spec, kv_spec)
  else:
    run, args, specs = local, (q, k, v, segment_ids), (q_spec, kv_spec, kv_spec, rows)
  return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
