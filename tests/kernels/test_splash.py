"""The TPU's fused attention (zoo.kernels.splash: jax's Pallas splash kernel), run on the CPU in
Pallas's interpreter, against XLA's attention (zoo.layers.attention's reference path): values
and gradients, for every mask and head layout zoo's models use, alone, sharded over a mesh, and
inside whole models against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from tests.helpers import tokens
from zoo import sharding
from zoo.errors import ZooError
from zoo.kernels.splash import splash_attention
from zoo.layers.attention import dot_product_attention, resolve_attention_impl


def inputs(b, t, n, kv, h, packed, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32)
  seg = None
  if packed:  # documents of random lengths, then padding (segment 0) at the end of each row
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
      cuts = np.sort(rng.choice(np.arange(1, t - 8), size=3, replace=False))
      seg[r, :cuts[-1]] = np.searchsorted(cuts, np.arange(cuts[-1]), side="right") + 1
    seg = jnp.asarray(seg)
  return q, k, v, seg


CASES = {
  # name: (batch, length, heads, kv heads, head dim, window, packed); a window ("chunk", n) is
  # Llama 4's chunked attention instead
  "causal_gqa": (2, 128, 4, 2, 32, None, False),
  "mha": (1, 128, 4, 4, 16, None, False),
  "mqa": (2, 128, 4, 1, 16, None, False),
  "window": (2, 128, 4, 2, 16, 24, False),
  "packed": (2, 128, 4, 2, 16, None, True),
  "packed_window": (2, 128, 4, 2, 16, 20, True),
  "padded_length": (2, 200, 6, 2, 16, None, False),  # 200 -> 256, the block's multiple
  "padded_packed_window": (1, 77, 2, 1, 8, 16, True),
  "chunked": (2, 128, 4, 2, 16, ("chunk", 48), False),
  "padded_packed_chunked": (1, 77, 2, 1, 8, ("chunk", 32), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_equal_xla(case):
  b, t, n, kv, h, window, packed = CASES[case]
  q, k, v, seg = inputs(b, t, n, kv, h, packed)
  mask = {"chunk": window[1]} if isinstance(window, tuple) else {"window": window}

  def loss(attend):
    def f(q, k, v):
      out = attend(q, k, v, segment_ids=seg, **mask)
      return jnp.sum(jnp.sin(out)), out
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

  (_, ref), ref_grads = loss(dot_product_attention)(q, k, v)
  (_, got), grads = loss(lambda *a, **kw: splash_attention(*a, interpret=True, **kw))(q, k, v)
  assert got.shape == ref.shape == (b, t, n, h)
  # float32 rounding, which differs with the CPU's SIMD width and FMA: relative for the
  # gradients of order 10 (k and v's, summed over heads and queries), absolute near zero. A
  # wrong mask moves these by 1e-2 or more.
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    assert float(jnp.abs(r).max()) > 0.1  # gradients of a real size reach every input
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_sharded_over_a_mesh_equals_one_device():
  # 8 CPU devices: batch over data x fsdp, heads and kv heads over tensor (shard_map).
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q, k, v, seg = inputs(4, 128, 4, 2, 16, packed=True, seed=1)
  alone = splash_attention(q, k, v, segment_ids=seg, window=40, interpret=True)

  @jax.jit
  def run(q, k, v, seg):
    with sharding.use(mesh, sharding.DEFAULT_RULES):
      return splash_attention(q, k, v, segment_ids=seg, window=40, interpret=True)

  out = run(q, k, v, seg)
  np.testing.assert_allclose(out, alone, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(out, dot_product_attention(q, k, v, segment_ids=seg, window=40),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama_gqa", "llama_mqa", "llama2_mha",
                                     "mistral_sliding_window", "qwen2_sliding_some_layers",
                                     "mistral_no_window_head_dim", "llama4_interleave1",
                                     "qwen3_tied_head_dim"])
def test_whole_models_with_the_kernel_match_transformers(variant, save_hf):
  from tests.models.test_parity import VARIANTS  # noqa: PLC0415
  from tests.references import hf_logits, hf_model  # noqa: PLC0415
  family, overrides, length = VARIANTS[variant]
  ref_model = hf_model(family, **overrides)
  x = tokens(length=length)
  ours = zoo.load(save_hf(ref_model), attention_impl="splash_interpret").logits(x)
  np.testing.assert_allclose(ours, hf_logits(ref_model, x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name, platform, dtype, expected", [
    ("auto", "tpu", "float32", "splash"), ("auto", "tpu", "bfloat16", "splash"),
    ("auto", "gpu", "bfloat16", "cudnn"), ("auto", "gpu", "float32", "xla"),
    ("auto", "cpu", "bfloat16", "xla"), ("xla", "tpu", "float32", "xla"),
    ("splash", "tpu", "bfloat16", "splash"), ("cudnn", "gpu", "float16", "cudnn"),
])
def test_auto_picks_by_platform(name, platform, dtype, expected):
  assert resolve_attention_impl(name, platform, jnp.dtype(dtype)) == expected


@pytest.mark.parametrize("name, platform, dtype, message", [
    ("splash", "cpu", "float32", "splash is a TPU kernel, but this run's devices are cpu"),
    ("cudnn", "cpu", "bfloat16", "cudnn needs NVIDIA GPUs"),
    ("cudnn", "gpu", "float32", "bfloat16 or float16"),
    ("flash", "tpu", "float32", "unknown attention_impl 'flash'"),
])
def test_impossible_choices_are_one_line_errors(name, platform, dtype, message):
  with pytest.raises(ZooError) as e:
    resolve_attention_impl(name, platform, jnp.dtype(dtype))
  assert message in str(e.value) and "\n" not in str(e.value)
