"""The pure train step: the loss it optimises, accumulation, and sharding across meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from zoo import sharding
from zoo.errors import ZooError
from zoo.models.llama import Llama, abstract_model
from zoo.models.presets import get_preset
from zoo.models.loss import loss_sums
from zoo.train.step import (batch_loss_sums, forward, init_state, make_train_step,
                             state_shardings)

CONFIG = get_preset("tiny_llama", vocab_size=256, hidden_size=64, num_heads=8, num_kv_heads=8,
                    intermediate_size=128, initializer_range=0.1)


def random_batch(seed, batch=8, length=32, packed=True):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (batch, length)).astype(np.int32)
  if packed:  # two documents a row, the second ending in padding
    segment_ids = np.where(np.arange(length) < 12, 1, 2) * (np.arange(length) < 28)
    positions = np.where(np.arange(length) < 12, np.arange(length), np.arange(length) - 12)
  else:
    segment_ids, positions = np.ones(length), np.arange(length)
  weights = (segment_ids > 0) * rng.uniform(0.5, 1.0, (batch, length))
  return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
          "positions": np.broadcast_to(positions, (batch, length)).astype(np.int32),
          "segment_ids": np.broadcast_to(segment_ids, (batch, length)).astype(np.int32),
          "weights": weights.astype(np.float32)}


def init_params(seed=0, config=CONFIG):
  return nnx.split(Llama(config, rngs=nnx.Rngs(seed)), nnx.Param)[1].to_pure_dict()


def test_loss_is_weighted_cross_entropy_plus_z_loss():
  graphdef = nnx.split(abstract_model(CONFIG))[0]
  params, batch = init_params(), random_batch(0)
  objective, nll, weight = loss_sums(forward(graphdef, params, batch), batch, z_loss=1e-3)
  logits = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"],
                                       batch["segment_ids"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"]
  np.testing.assert_allclose(nll, np.sum(ce * w), rtol=1e-6)
  np.testing.assert_allclose(weight, w.sum(), rtol=1e-6)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  np.testing.assert_allclose(objective - nll, 1e-3 * np.sum(log_z ** 2 * w), rtol=1e-5)


@pytest.mark.parametrize("chunk", [8, 16])
def test_chunked_loss_equals_the_whole_logits(chunk):
  # The reference: optax's cross-entropy and the z-loss on the whole [B, T, V] logits, with
  # their gradients; the chunked loss never holds more than [B, chunk, V] of them.
  graphdef = nnx.split(abstract_model(CONFIG))[0]
  params, batch = init_params(), random_batch(1)

  def whole(p):
    logits = nnx.merge(graphdef, p)(batch["tokens"], batch["positions"], batch["segment_ids"])
    w = batch["weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * w) + 1e-3 * jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * w)

  def chunked(p):
    return batch_loss_sums(graphdef, p, batch, z_loss=1e-3, loss_chunk=chunk)[0]

  ref, ref_grads = jax.jit(jax.value_and_grad(whole))(params)
  got, grads = jax.jit(jax.value_and_grad(chunked))(params)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    r = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=str(path))  # f32 sums


def test_a_loss_chunk_must_divide_the_row():
  graphdef = nnx.split(abstract_model(CONFIG))[0]
  with pytest.raises(ZooError, match="must divide the sequence length"):
    batch_loss_sums(graphdef, init_params(), random_batch(0), loss_chunk=12)


@pytest.mark.parametrize("remat, impl", [("full", "checkpoint"), ("save_qkvo", "checkpoint"),
                                         ("full", "custom_vjp")])
def test_remat_policies_leave_the_gradients_alone(remat, impl):
  # Remat changes what the backward pass keeps, never what it computes.
  params, batch = init_params(), random_batch(2)

  def grads(**kwargs):
    graphdef = nnx.split(abstract_model(CONFIG, **kwargs))[0]
    return jax.jit(jax.grad(lambda p: batch_loss_sums(graphdef, p, batch)[0]))(params)

  ref = grads(remat="none")
  for g, r in zip(jax.tree.leaves(grads(remat=remat, remat_impl=impl)), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
  graphdef = nnx.split(abstract_model(CONFIG))[0]
  # Plain SGD with lr 1, so the updated parameters show the accumulated gradient itself.
  tx = optax.sgd(1.0)
  schedule = optax.constant_schedule(1.0)
  params = init_params()
  state = init_state(params, tx, seed=0)
  batch = random_batch(1)
  one, m1 = jax.jit(make_train_step(graphdef, tx, schedule))(state, batch)
  four, m4 = jax.jit(make_train_step(graphdef, tx, schedule, grad_accum=4))(state, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(four["params"])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  assert int(one["step"]) == 1


def run_steps(mesh_shape, steps=5, remat="none", config=CONFIG, rules=sharding.DEFAULT_RULES):
  """Losses of `steps` AdamW steps on a mesh, jitted with explicit shardings like the loop."""
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  model = abstract_model(config, remat=remat)
  graphdef = nnx.split(model)[0]
  tx = optax.adamw(3e-3, weight_decay=0.1)
  params_sh = sharding.param_shardings(model, mesh, rules)
  rep = sharding.replicated(mesh)
  params = jax.device_put(init_params(config=config), params_sh)
  shardings = state_shardings(tx, params, params_sh, rep)
  state = jax.jit(lambda p: init_state(p, tx, seed=0), out_shardings=shardings)(params)
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(3e-3)),
                 in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep),
                 donate_argnums=0)
  losses = []
  with sharding.use(mesh, rules):
    for i in range(steps):
      batch = jax.device_put(random_batch(10 + i), batch_sh)
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return np.array(losses), state


@pytest.fixture(scope="module")
def single_device_losses():
  return run_steps((1, 1, 1))[0]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_losses_agree_across_meshes(mesh_shape, single_device_losses):
  assert len(jax.devices()) == 8, "tests run with 8 host CPU devices (see tests/conftest.py)"
  losses, state = run_steps(mesh_shape)
  assert losses[-1] < losses[0]  # it trains
  np.testing.assert_allclose(losses, single_device_losses, atol=1e-5, rtol=1e-5)
  # The parameters really are laid out as the rules table says.
  kernel = state["params"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  embedding = state["params"]["embed_tokens"]["embedding"]
  mu = state["opt_state"][0].mu["layers"][0]["self_attn"]["q_proj"]["kernel"]
  data, fsdp, tensor = mesh_shape
  assert kernel.sharding.spec == P("fsdp", "tensor") == mu.sharding.spec
  assert kernel.addressable_shards[0].data.shape == (64 // fsdp, 64 // tensor)
  assert mu.addressable_shards[0].data.shape == (64 // fsdp, 64 // tensor)
  assert embedding.sharding.spec == P("tensor", "fsdp")
  assert embedding.addressable_shards[0].data.shape == (256 // tensor, 64 // fsdp)


# Experts split over `data`, their dims over fsdp and tensor as every other weight's.
EXPERT_RULES = tuple(("experts", "data") if name == "experts" else (name, rule)
                     for name, rule in sharding.DEFAULT_RULES)


@pytest.mark.parametrize("preset", ["tiny_qwen3_moe", "tiny_llama4"])
def test_moe_steps_with_experts_sharded_equal_one_device(preset):
  config = get_preset(preset, vocab_size=256, initializer_range=0.1)
  one, _ = run_steps((1, 1, 1), config=config)
  losses, state = run_steps((2, 2, 2), config=config, rules=EXPERT_RULES)
  np.testing.assert_allclose(losses, one, atol=1e-5, rtol=1e-5)
  moe = next(layer for layer in state["params"]["layers"].values()
             if "block_sparse_moe" in layer)["block_sparse_moe"]
  w1 = moe["experts"]["w1"]
  assert w1.sharding.spec == P("data", "fsdp", "tensor")
  assert w1.addressable_shards[0].data.shape == (config.num_experts // 2, 64 // 2,
                                                 config.expert_size // 2)


def test_full_remat_on_a_mesh(single_device_losses):
  """The recomputing layer (remat "full") under the rules table's shardings trains like the
  plain single-device step."""
  losses, _ = run_steps((2, 2, 2), remat="full")
  np.testing.assert_allclose(losses, single_device_losses, atol=1e-5, rtol=1e-5)


def layer_grads(remat, batch):
  graphdef = nnx.split(abstract_model(CONFIG, remat=remat))[0]
  grad = jax.jit(jax.grad(lambda p: loss_sums(forward(graphdef, p, batch), batch, z_loss=1e-3)[0]))
  return grad(init_params())


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_gives_the_gradients_of_no_remat(remat):
  batch = random_batch(3)
  want = layer_grads("none", batch)
  got = layer_grads(remat, batch)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def step_temp_bytes(config, remat, batch):
  """XLA's temporary buffer size for a full fine-tuning step's gradient (compile only)."""
  graphdef, params = nnx.split(abstract_model(config, remat=remat), nnx.Param)
  params = nnx.to_pure_dict(params)
  grad = jax.jit(jax.grad(lambda p, b: loss_sums(forward(graphdef, p, b), b)[0]))
  return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_full_remat_keeps_only_layer_inputs():
  """With remat "full" a step holds one layer's intermediates at a time, on XLA:CPU too (which
  drops the optimization barriers `jax.checkpoint` relies on): on 8 layers the step's
  temporaries shrink to under 40% of those without remat."""
  config = get_preset("tiny_llama", vocab_size=256, hidden_size=128, num_heads=4, num_kv_heads=4,
                      intermediate_size=512, num_layers=8)
  batch = random_batch(0, batch=8, length=128)
  batch["tokens"] = batch["tokens"] % config.vocab_size
  batch["targets"] = batch["targets"] % config.vocab_size
  none = step_temp_bytes(config, "none", batch)
  full = step_temp_bytes(config, "full", batch)
  assert full < 0.4 * none, (full, none)


def test_logical_to_spec_rules():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("batch", "length"), rules) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # a dimension the mesh axis does not divide is replicated instead
  assert sharding.logical_to_spec(("embed", "heads"), rules, mesh, (64, 3)) == P("fsdp", None)


@pytest.mark.parametrize("shape,words", [((3, 1, 1), "needs 3 devices"),
                                         ((-1, 3, 1), "does not divide 8"),
                                         ((-1, -1, 1), "at most one -1")])
def test_bad_meshes_are_refused(shape, words):
  with pytest.raises(ZooError, match=words):
    sharding.make_mesh(shape)


def test_batch_must_divide_the_batch_axes():
  mesh = sharding.make_mesh((4, 2, 1))
  with pytest.raises(ZooError, match="not divisible by the 8 ways"):
    sharding.local_batch_size(12, mesh, sharding.DEFAULT_RULES)
