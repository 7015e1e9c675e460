"""Attention masking and MoE dispatch against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.layers.attention import dot_product_attention
from zoo.models.llama import Llama
from zoo.models.presets import get_preset


def naive_attention(q, k, v, allowed):
  """softmax(q k^T / sqrt(h)) v over the allowed pairs, in numpy float64, GQA by repetition."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(allowed[:, None], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("packed", [False, True])
def test_masks_match_reference(window, packed):
  b, t, n, kv, h = 2, 24, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k = jax.random.normal(keys[1], (b, t, kv, h))
  v = jax.random.normal(keys[2], (b, t, kv, h))
  seg = np.array([[1] * 10 + [2] * 9 + [3] * 5, [1] * 24]) if packed else None
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = np.broadcast_to((j <= i) & ((i - j < window) if window else True), (b, t, t))
  if packed:
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  out = dot_product_attention(q, k, v, segment_ids=None if seg is None else jnp.asarray(seg),
                              window=window)
  np.testing.assert_allclose(out, naive_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_mistral", "tiny_mixtral"])
def test_packed_rows_equal_separate_documents(preset):
  """Two documents packed into one row with segment ids and restarting positions give the same
  logits as each document alone: attention never crosses the boundary."""
  config = get_preset(preset).replace(initializer_range=0.1)
  model = Llama(config, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, config.vocab_size, n) for n in (21, 11)]
  row = np.concatenate(docs)[None]
  positions = np.concatenate([np.arange(len(d)) for d in docs])[None]
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
  packed = model(jnp.asarray(row), jnp.asarray(positions), jnp.asarray(segments))
  alone = [model(jnp.asarray(d[None]))[0] for d in docs]
  np.testing.assert_allclose(packed[0], np.concatenate(alone), atol=1e-5, rtol=1e-5)
  # Without segment ids the second document would see the first: the test can fail.
  unpacked = model(jnp.asarray(row), jnp.asarray(positions))
  assert np.abs(unpacked[0, 21:] - alone[1]).max() > 1e-2


def test_moe_implementations_agree():
  config = get_preset("tiny_mixtral").replace(initializer_range=0.1)
  x = jax.random.normal(jax.random.key(3), (2, 9, config.hidden_size))
  ragged = Llama(config, moe_impl="ragged", rngs=nnx.Rngs(0)).layers[0].block_sparse_moe
  dense = Llama(config, moe_impl="dense", rngs=nnx.Rngs(0)).layers[0].block_sparse_moe
  np.testing.assert_allclose(ragged(x), dense(x), atol=1e-5, rtol=1e-5)
  # The reference: each token through its top-k experts, one at a time.
  experts, weights, _ = ragged.route(x.reshape(-1, config.hidden_size))
  w1, w2, w3 = (np.asarray(w[...]) for w in (ragged.experts.w1, ragged.experts.w2,
                                             ragged.experts.w3))
  tokens = np.asarray(x).reshape(-1, config.hidden_size)
  want = np.zeros_like(tokens)
  for n, token in enumerate(tokens):
    for e, w in zip(np.asarray(experts[n]), np.asarray(weights[n])):
      gate = token @ w1[e]
      want[n] += w * ((gate / (1 + np.exp(-gate)) * (token @ w3[e])) @ w2[e])
  np.testing.assert_allclose(np.asarray(ragged(x)).reshape(-1, config.hidden_size), want,
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny_qwen3_moe", "tiny_llama4"])
def test_moe_implementations_agree_for_the_new_routers(preset):
  """Qwen3-MoE's (softmax, renormalised or not) and Llama 4's routing (sigmoid scores scaling
  the experts' inputs, a shared expert) give the same output run ragged or dense."""
  for norm in (True, False):
    config = get_preset(preset).replace(initializer_range=0.1, norm_topk_prob=norm,
                                        num_experts_per_tok=2)
    x = jax.random.normal(jax.random.key(3), (2, 9, config.hidden_size))
    layer = next(i for i in range(config.num_layers) if config.is_moe_layer(i))
    ragged = Llama(config, moe_impl="ragged", rngs=nnx.Rngs(0)).layers[layer].block_sparse_moe
    dense = Llama(config, moe_impl="dense", rngs=nnx.Rngs(0)).layers[layer].block_sparse_moe
    assert float(jnp.abs(ragged(x)).max()) > 0.1
    np.testing.assert_allclose(ragged(x), dense(x), atol=1e-5, rtol=1e-5)
