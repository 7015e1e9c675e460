"""Block quantization (int8, NF4) against a brute-force numpy reference and the NF4 paper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zoo.errors import ZooError
from zoo.layers import quant
from zoo.layers.quant import (QTensor, bf16_bytes, dequantize, dequantize_tree, is_quantized,
                              nbytes, quantize, quantize_tree)

# NormalFloat4 as published with QLoRA (Dettmers et al. 2023; bitsandbytes' NF4 table).
PUBLISHED_NF4 = np.array([
  -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
  0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
])


def reference_quantize(w: np.ndarray, kind: str, block_size: int):
  """(per-element codes [blocks, block_size], scales [blocks], dequantized) in plain numpy.

  Row-major flattening into consecutive blocks; int8 symmetric absmax; NF4 by argmin over the
  distance to each of the 16 published values (ties go to the first, i.e. the lower value).
  """
  blocks = np.asarray(w, np.float32).reshape(-1, block_size)
  absmax = np.abs(blocks).max(axis=1)
  if kind == "int8":
    scales = (absmax / np.float32(127)).astype(np.float32)
    safe = np.where(scales == 0, np.float32(1), scales)[:, None]
    codes = np.clip(np.round(blocks / safe), -127, 127).astype(np.int8)
    values = codes.astype(np.float32) * scales[:, None]
  else:
    book = PUBLISHED_NF4.astype(np.float32)
    normalized = blocks / np.where(absmax == 0, np.float32(1), absmax)[:, None]
    codes = np.argmin(np.abs(normalized[..., None] - book), axis=-1).astype(np.uint8)
    scales = absmax
    values = book[codes] * absmax[:, None]
  return codes, scales, values.reshape(np.shape(w))


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
  """[blocks, n] bytes -> [blocks, 2n] codes, the high nibble first."""
  packed = np.asarray(packed)
  out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
  out[:, 0::2] = packed // 16
  out[:, 1::2] = packed % 16
  return out


def normal(shape, seed=0, std=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def test_nf4_codebook_is_the_published_one():
  book = np.asarray(quant.NF4_CODEBOOK, np.float64)
  assert book.shape == (16,)
  np.testing.assert_allclose(book, PUBLISHED_NF4, rtol=0, atol=1e-7)
  assert np.all(np.diff(book) > 0)
  assert book[0] == -1.0 and book[-1] == 1.0 and book[7] == 0.0
  assert (book < 0).sum() == 7 and (book > 0).sum() == 8
  # Asymmetric by construction (8 positive, 7 negative values), yet both halves look alike:
  # the same range, the smallest steps next to 0 and the largest at the ends.
  assert abs(book[6] + book[8]) < 0.02
  for half in (-book[7::-1], book[7:]):
    steps = np.diff(half)
    assert np.all(steps > 0) and steps.argmin() == 0 and steps.argmax() == len(steps) - 1


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("shape,block_size", [((64, 192), 64), ((6, 96), 64), ((3, 4, 32), 16),
                                              ((1024,), 128)])
def test_matches_numpy_reference(kind, shape, block_size):
  w = normal(shape, seed=sum(shape), std=0.05)
  codes, scales, values = reference_quantize(w, kind, block_size)
  q = quantize(w, kind, block_size)
  assert (q.kind, q.shape, q.block_size, q.dtype) == (kind, shape, block_size, "float32")
  blocks = w.size // block_size
  np.testing.assert_array_equal(np.asarray(q.scales), scales[:, None])
  if kind == "int8":
    assert q.codes.dtype == jnp.int8 and q.codes.shape == (blocks, block_size)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
  else:
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (blocks, block_size // 2)
    np.testing.assert_array_equal(unpack_nibbles(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.codes), codes[:, 0::2] * 16 + codes[:, 1::2])
  out = dequantize(q)
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), values, rtol=1e-6, atol=0)


def test_int8_error_is_at_most_half_a_step():
  w = normal((128, 256), seed=1)
  q = quantize(w, "int8")
  err = np.abs(np.asarray(dequantize(q)) - w).reshape(-1, 64)
  step = np.abs(w).reshape(-1, 64).max(axis=1, keepdims=True) / 127
  assert np.all(err <= step / 2 * (1 + 1e-5))
  # Each block's largest magnitude is hit exactly (code +-127).
  assert np.all(np.abs(np.asarray(q.codes)).max(axis=1) == 127)


def test_nf4_error_on_normal_weights():
  w = normal((256, 512), seed=2, std=0.02)
  out = np.asarray(dequantize(quantize(w, "nf4")))
  rel_rms = np.sqrt(np.mean((out - w) ** 2)) / np.sqrt(np.mean(w ** 2))
  assert 0.03 < rel_rms < 0.1
  # No element is further from its value than half the widest codebook gap times its absmax.
  absmax = np.abs(w).reshape(-1, 64).max(axis=1, keepdims=True)
  half_gap = np.diff(PUBLISHED_NF4).max() / 2
  assert np.all(np.abs(out - w).reshape(-1, 64) <= half_gap * absmax * (1 + 1e-5))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_zero_blocks_and_dtypes(kind):
  w = np.concatenate([np.zeros((2, 64), np.float32), normal((2, 64), seed=3)])
  w16 = jnp.asarray(w, jnp.bfloat16)
  q = quantize(w16, kind)
  assert q.dtype == "bfloat16"
  out = dequantize(q, None)
  assert out.dtype == jnp.bfloat16
  assert np.all(np.asarray(out[:2], np.float32) == 0)
  _, _, ref = reference_quantize(np.asarray(w16, np.float32), kind, 64)
  np.testing.assert_allclose(np.asarray(dequantize(q, jnp.float32)), ref, rtol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_jit_tree_map_and_device_put(kind):
  w = normal((64, 128), seed=4)
  x = normal((5, 64), seed=5)
  q = quantize(w, kind)
  _, _, ref = reference_quantize(w, kind, 64)

  traces = []

  @jax.jit
  def forward(x, q):
    traces.append(1)
    return x @ dequantize(q, jnp.float32)

  np.testing.assert_allclose(np.asarray(forward(x, q)), x @ ref, rtol=1e-4, atol=1e-4)
  forward(x, quantize(normal((64, 128), seed=6), kind))
  assert len(traces) == 1  # the metadata is static, the arrays are traced arguments

  leaves = jax.tree.leaves(q)
  assert len(leaves) == 2 and leaves[0] is q.codes and leaves[1] is q.scales
  copy = jax.tree.map(lambda a: a + 0, q)
  assert isinstance(copy, QTensor) and copy.kind == kind and copy.shape == (64, 128)
  np.testing.assert_allclose(np.asarray(dequantize(copy)), ref, rtol=1e-6, atol=0)
  shapes = jax.tree.map(lambda a: a.shape, q)
  assert shapes.scales == (128, 1)

  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("x",))
  placed = jax.device_put(q, NamedSharding(mesh, P("x")))
  assert isinstance(placed, QTensor)
  for leaf in jax.tree.leaves(placed):
    assert leaf.sharding.spec == P("x")
  np.testing.assert_allclose(np.asarray(dequantize(placed)), ref, rtol=1e-6, atol=0)


def test_bytes_against_bf16():
  w = normal((256, 512), seed=7)
  for kind, code_bytes, bound in [("nf4", 0.5, 0.30), ("int8", 1.0, 0.55)]:
    q = quantize(w, kind)
    assert bf16_bytes(q) == w.size * 2
    assert nbytes(q) == int(w.size * code_bytes + w.size // 64 * 4)
    assert nbytes(q) == q.codes.nbytes + q.scales.nbytes
    assert nbytes(q) / bf16_bytes(q) <= bound
  assert nbytes(quantize(w, "nf4")) / bf16_bytes(q) == pytest.approx(0.28125)
  assert nbytes(quantize(w, "int8")) / bf16_bytes(q) == pytest.approx(0.53125)


@pytest.mark.parametrize("args", [
  (np.ones((3, 5), np.float32), "nf4", 64),
  (np.ones((0, 64), np.float32), "int8", 64),
  (np.ones((4, 64), np.float32), "int4", 64),
  (np.ones((4, 63), np.float32), "nf4", 63),
  (np.ones((4, 64), np.float32), "int8", 0),
  (np.ones((4, 64), np.int32), "int8", 64),
  (np.full((4, 64), np.nan, np.float32), "nf4", 64),
  ([1.0] * 64, "int8", 64),
])
def test_bad_input_raises(args):
  with pytest.raises(ZooError):
    quantize(*args)


def test_dequantize_rejects_plain_arrays():
  with pytest.raises(ZooError):
    dequantize(np.ones((4, 64), np.float32))


def tree():
  return {
    "embed": {"embedding": normal((32, 64), seed=8)},
    "layers": {
      0: {"attn": {"q": {"kernel": normal((64, 128), seed=9)}},
          "norm": {"scale": np.ones(64, np.float32)},
          "experts": {"kernel": normal((2, 64, 64), seed=10)}},
      1: {"attn": {"q": {"kernel": normal((64, 128), seed=11)}},
          "norm": {"scale": np.ones(64, np.float32)}},
    },
    "lm_head": {"kernel": normal((64, 32), seed=12)},
    "step": 3,
  }


def test_quantize_tree_default_predicate():
  params = tree()
  q = quantize_tree(params, "nf4")
  assert is_quantized(q["layers"][0]["attn"]["q"]["kernel"])
  assert is_quantized(q["layers"][1]["attn"]["q"]["kernel"])
  assert is_quantized(q["lm_head"]["kernel"])
  assert not is_quantized(params["lm_head"]["kernel"])
  # Norms, 1-D and 3-D arrays, embeddings and non-arrays are left alone, the very same objects.
  assert q["layers"][0]["norm"]["scale"] is params["layers"][0]["norm"]["scale"]
  assert q["layers"][0]["experts"]["kernel"] is params["layers"][0]["experts"]["kernel"]
  assert q["embed"]["embedding"] is params["embed"]["embedding"]
  assert q["step"] == 3
  # Requantizing is a no-op on QTensors.
  again = quantize_tree(q, "nf4")
  assert again["lm_head"]["kernel"] is q["lm_head"]["kernel"]

  out = jax.jit(dequantize_tree)(q)
  for path in [("layers", 0, "attn", "q", "kernel"), ("lm_head", "kernel")]:
    w = params
    got = out
    for key in path:
      w, got = w[key], got[key]
    np.testing.assert_allclose(np.asarray(got), reference_quantize(w, "nf4", 64)[2], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["embed"]["embedding"]),
                                params["embed"]["embedding"])


def test_quantize_tree_custom_predicate_and_errors():
  seen = []

  def pick(path, array):
    seen.append(path)
    return path.startswith("layers.0.")

  q = quantize_tree(tree(), "int8", predicate=pick)
  assert "layers.0.attn.q.kernel" in seen and "embed.embedding" in seen
  assert is_quantized(q["layers"][0]["attn"]["q"]["kernel"])
  assert is_quantized(q["layers"][0]["experts"]["kernel"])
  assert not is_quantized(q["layers"][1]["attn"]["q"]["kernel"])
  assert sum(is_quantized(x) for x in jax.tree.leaves(q, is_leaf=is_quantized)) == 3

  with pytest.raises(ZooError, match="lm_head.kernel"):
    quantize_tree({"lm_head": {"kernel": np.ones((3, 5), np.float32)}}, "nf4")


def test_nf4_matches_bitsandbytes():
  torch = pytest.importorskip("torch")
  bnb = pytest.importorskip("bitsandbytes.functional")
  w = normal((64, 256), seed=13, std=0.02)
  try:
    packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    theirs = bnb.dequantize_4bit(packed, state).float().numpy()
  except Exception as e:  # noqa: BLE001 - builds without CPU kernels raise assorted errors
    pytest.skip(f"bitsandbytes has no CPU NF4 here: {e}")
  ours = np.asarray(dequantize(quantize(w, "nf4", 64)))
  np.testing.assert_allclose(ours, theirs.reshape(w.shape), rtol=1e-5, atol=1e-7)
