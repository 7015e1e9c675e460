"""KV-cache generation against transformers' generate, and sampling against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from tests.references import hf_greedy, hf_model
from zoo import sharding
from zoo.errors import ZooError
from zoo.infer.generate import Generator, Sampling, greedy, sample

VARIANTS = {
  "llama_gqa": ("llama", dict()),
  "llama_mqa": ("llama", dict(num_key_value_heads=1)),
  "llama3_rope_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters={
      "rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 2.0,
      "high_freq_factor": 8.0, "original_max_position_embeddings": 32})),
  "qwen2_bias": ("qwen2", dict()),
  "mistral_window_8": ("mistral", dict(sliding_window=8)),
  "mixtral_window_8": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2,
                                       sliding_window=8)),
  "qwen3_head_dim": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
  "qwen3_moe_top2": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=48, norm_topk_prob=True)),
  # generation runs past the attention chunk of 16; floor_scale 4 moves the NoPE temperature
  "llama4_chunk_16": ("llama4", dict(num_hidden_layers=4, intermediate_size=48,
                                     intermediate_size_mlp=96, num_local_experts=4,
                                     interleave_moe_layer_step=2, attention_chunk_size=16,
                                     floor_scale=4)),
}
NEW_TOKENS = 40
PROMPT_LENGTHS = (5, 17, 9)


def prompts(vocab=128, seed=1):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_batch_matches_transformers_one_by_one(variant, save_hf):
  """A batch of prompts of different lengths, generated together past the sliding window,
  equals transformers' greedy generate run on each prompt alone."""
  family, overrides = VARIANTS[variant]
  ref = hf_model(family, **overrides)
  generator = Generator(zoo.load(save_hf(ref)))
  batch = prompts()
  ours = generator.generate(batch, max_new_tokens=NEW_TOKENS)
  for prompt, got in zip(batch, ours):
    assert got == hf_greedy(ref, prompt, NEW_TOKENS)
  assert generator.generate(batch[1:2], max_new_tokens=NEW_TOKENS) == ours[1:2]


@pytest.mark.parametrize("rows", [[0, 1], [1]], ids=["batch2", "batch1"])
@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_window_8", "mixtral_window_8",
                                     "llama4_chunk_16"])
def test_cached_logits_equal_full_forward_every_step(variant, rows, save_hf):
  """(Batch 1 steps run their weight products on zoo.kernels.gemv, batch 2 on XLA's dot.)"""
  family, overrides = VARIANTS[variant]
  model = zoo.load(save_hf(hf_model(family, **overrides)))
  generator = Generator(model)
  seq = np.random.default_rng(2).integers(0, 128, (2, 30))[rows]
  lengths = np.array([6, 11])[rows]
  full = model.logits(seq)  # [B, 30, V]: the reference, no cache
  tokens = np.where(np.arange(16)[None] < lengths[:, None], seq[:, :16], 0)
  logits, cache = generator.prefill(tokens, lengths, generator.init_cache(len(rows), 128))
  np.testing.assert_allclose(logits, full[np.arange(len(rows)), lengths - 1], atol=1e-4, rtol=1e-5)
  positions = lengths.copy()
  for _ in range(30 - lengths.max()):  # more steps than the window of 8
    logits, cache = generator.step(seq[np.arange(len(rows)), positions], positions, cache)
    np.testing.assert_allclose(logits, full[np.arange(len(rows)), positions], atol=1e-4, rtol=1e-5)
    positions += 1


@pytest.mark.parametrize("batch,mesh,expected", [(1, False, 7 * 2 + 1), (2, False, 0),
                                                 (1, True, 0)])
def test_batch_one_steps_use_the_cpu_kernel(batch, mesh, expected, save_hf):
  """Each of a batch-1 step's weight products (7 a layer and the output head) goes to the
  kernel; wider batches and sharded steps keep XLA's products."""
  model = zoo.load(save_hf(hf_model("llama")))  # 2 layers, untied head
  if mesh:
    generator = Generator(model, mesh=sharding.make_mesh((2, 1, 2), devices=jax.devices()[:4]),
                          rules=sharding.DEFAULT_RULES)
  else:
    generator = Generator(model)
  cache = generator.init_cache(batch, 128)
  ids = np.zeros(batch, np.int32)
  with generator._context():
    hlo = generator._step_logits.lower(generator.params, generator._place(ids),
                                       generator._place(ids), cache).compile().as_text()
  assert hlo.count('custom_call_target="zoo_row_matmul"') == expected


def numpy_allowed(logits, temperature, top_k, top_p):
  """The tokens top-k then top-p leave, computed independently with numpy (float64)."""
  z = logits.astype(np.float64) / temperature
  keep = np.ones(z.shape, bool)
  if top_k:
    kth = np.sort(z, axis=-1)[:, -top_k][:, None]
    keep &= z >= kth
  if top_p < 1:
    for row in range(z.shape[0]):
      order = np.argsort(-np.where(keep[row], z[row], -np.inf), kind="stable")
      p = np.exp(z[row, order] - z[row, order[0]]) * keep[row, order]
      p /= p.sum()
      n = int(np.searchsorted(np.cumsum(p), top_p - 1e-12)) + 1
      allowed = np.zeros(z.shape[1], bool)
      allowed[order[:n]] = True
      keep[row] &= allowed
  return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [
  (1.0, 5, 1.0), (0.7, 0, 0.6), (1.3, 20, 0.8), (1.0, 1, 1.0)])
def test_sampling_stays_inside_top_k_top_p(temperature, top_k, top_p):
  rng = np.random.default_rng(3)
  logits = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
  allowed = numpy_allowed(logits, temperature, top_k, top_p)
  sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  draw = jax.jit(lambda key: sample(jnp.asarray(logits), key, sampling))
  seen = np.stack([np.asarray(draw(jax.random.key(i))) for i in range(300)])  # [300, 4]
  for row in range(4):
    assert allowed[row, seen[:, row]].all()
    # and it really samples: more than one token wherever more than one is allowed
    assert len(set(seen[:, row])) > 1 or allowed[row].sum() == 1
  if top_k == 1:  # top-1 is greedy
    assert (seen == logits.argmax(-1)).all()


def test_greedy_picks_numpy_argmax_with_ties_and_nan():
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((6, 32000)).astype(np.float32)
  logits[1, [5, 17, 31999]] = 9.0  # a tie: the first index wins
  logits[2, :] = -np.inf
  logits[3, [0, 200]] = np.inf
  logits[4, 77] = np.nan  # NaN counts as the maximum, as in numpy
  logits[5, [12, 40]] = np.nan
  got = np.asarray(jax.jit(greedy)(jnp.asarray(logits)))
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
  assert got.dtype == np.int32
  assert list(got[1:]) == [5, 0, 0, 77, 12]


def test_sampled_generation_is_reproducible_by_seed(save_hf):
  generator = Generator(zoo.load(save_hf(hf_model("llama"))))
  sampling = Sampling(temperature=1.0, top_k=50, top_p=0.9)
  batch = prompts()
  a = generator.generate(batch, max_new_tokens=24, sampling=sampling, seed=7)
  b = generator.generate(batch, max_new_tokens=24, sampling=sampling, seed=7)
  c = generator.generate(batch, max_new_tokens=24, sampling=sampling, seed=8)
  assert a == b and a != c
  greedy = generator.generate(batch, max_new_tokens=24)
  assert a != greedy


def test_stop_tokens_and_max_length(save_hf):
  ref = hf_model("llama", max_position_embeddings=24)
  generator = Generator(zoo.load(save_hf(ref)))
  batch = prompts()
  free = generator.generate(batch, max_new_tokens=40)
  # never past the model's maximum length
  assert [len(p) + len(o) for p, o in zip(batch, free)] == [24, 24, 24]
  stop = free[0][3]
  stopped = generator.generate(batch, max_new_tokens=40, stop_ids=[stop])
  assert stopped[0] == free[0][:free[0].index(stop) + 1]
  for full, cut in zip(free, stopped):
    assert cut == (full[:full.index(stop) + 1] if stop in full else full)


@pytest.mark.parametrize("chunk", [1, 3, 32])
def test_chunked_decoding_streams_every_token_and_stops_mid_chunk(chunk, save_hf, monkeypatch):
  """Tokens come from on-device loops of up to `chunk` steps: the callback still sees every
  step's tokens in order with the rows still going, and a stop token or the token budget inside
  a chunk ends the row there (transformers' greedy ids are the reference)."""
  from zoo.infer import generate as generate_module
  monkeypatch.setattr(generate_module, "MAX_CHUNK", chunk)
  ref = hf_model("llama")
  generator = Generator(zoo.load(save_hf(ref)))
  batch = prompts()
  expected = [hf_greedy(ref, p, 30) for p in batch]
  stop = expected[1][12]
  budgets = [30, 30, 7]
  want = []
  for full, budget in zip(expected, budgets):
    row = full[:budget]
    want.append(row[:row.index(stop) + 1] if stop in row else row)
  seen = []
  got = generator.generate(batch, max_new_tokens=30, stop_ids=[stop],
                           on_tokens=lambda t, a: seen.append((t.copy(), a.copy())))
  got_short = generator.generate(batch[2:], max_new_tokens=budgets[2], stop_ids=[stop])
  assert got[:2] == want[:2] and got_short == want[2:]
  streamed = [[int(t[i]) for t, a in seen if a[i]] for i in range(len(batch))]
  assert streamed == got
  assert len(seen) == max(len(g) for g in got)  # no calls after every row stopped


def test_decode_loop_updates_the_cache_in_place(save_hf):
  """The chunk program carries the KV cache through its loop without copying it."""
  generator = Generator(zoo.load(save_hf(hf_model("llama"))))
  _, chunk = generator._sampler(Sampling())
  cache = generator.init_cache(1, 128)
  ids = jnp.zeros(1, jnp.int32)
  state = (ids, ids, jnp.ones((), jnp.int32), cache, jnp.ones(1, bool), ids)
  hlo = chunk.lower(generator.params, jax.random.key(0), jnp.full(8, -1, jnp.int32),
                    jnp.int32(4), state).compile().as_text()
  shape = "f32[1,2,128,16]"  # [batch, kv_heads, slots, head_dim]
  copies = [line for line in hlo.splitlines() if shape in line and " copy(" in line]
  assert hlo.count(shape) > 0 and copies == []


def test_bad_prompts_are_refused(save_hf):
  generator = Generator(zoo.load(save_hf(hf_model("llama", max_position_embeddings=24))))
  for bad, message in (([[]], "empty"), ([[1, 2, 128]], "outside the vocabulary"),
                       ([[-1]], "outside the vocabulary"), ([list(range(24))], "maximum length"),
                       ([], "no prompts")):
    with pytest.raises(ZooError, match=message):
      generator.generate(bad, max_new_tokens=4)
  with pytest.raises(ZooError, match="top_p"):
    Sampling(temperature=1.0, top_p=0.0)


def test_sharded_generation_equals_single_device(save_hf):
  """Parameters and cache laid out by the training rules table on a (data 2, tensor 2) mesh
  of host devices: the same greedy tokens as one device."""
  assert jax.device_count() >= 4
  model = zoo.load(save_hf(hf_model("llama")))
  batch = prompts() + [[3, 4, 5]]
  expected = Generator(model).generate(batch, max_new_tokens=20)
  mesh = sharding.make_mesh((2, 1, 2), devices=jax.devices()[:4])
  generator = Generator(model, mesh=mesh, rules=sharding.DEFAULT_RULES)
  q = generator.params["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec[1] == "tensor"
  cache = generator.init_cache(4, 128)
  assert cache[0]["k"].sharding.spec[1] == "tensor"  # [batch, kv_heads, slots, head_dim]
  assert "data" in cache[0]["k"].sharding.spec[0]
  assert generator.generate(batch, max_new_tokens=20) == expected


@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_window_8", "llama4_chunk_16"])
def test_several_new_tokens_after_a_cache_equal_the_full_forward(variant, save_hf):
  """Tokens decoded several at a time after a filled cache (as a scored continuation is) see
  the cache and each other as the full forward pass does."""
  from zoo.layers.attention import write_cache
  family, overrides = VARIANTS[variant]
  model = zoo.load(save_hf(hf_model(family, **overrides)))
  seq = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 30)), jnp.int32)
  full = model.logits(np.asarray(seq))
  positions = jnp.broadcast_to(jnp.arange(30, dtype=jnp.int32), (2, 30))
  _, first = model.decode(seq[:, :20], positions[:, :20], None)
  cache = [write_cache({n: jnp.zeros((2, kv[n].shape[1], 32, kv[n].shape[3])) for n in kv}, kv,
                       jnp.zeros(2, jnp.int32)) for kv in first]
  hidden, _ = model.decode(seq[:, 20:], positions[:, 20:], cache)
  np.testing.assert_allclose(np.asarray(model.head(hidden)), full[:, 20:], atol=1e-4, rtol=1e-5)
