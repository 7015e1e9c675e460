"""Optimizers and schedules against closed forms, torch.optim.AdamW and the published Lion."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from zoo.errors import ZooError
from zoo.models.llama import abstract_model
from zoo.models.presets import get_preset
from zoo.train.optim import decay_mask, default_config, make_optimizer, make_schedule, param_name

try:
  import torch  # the reference for one test, which is skipped without it
except ImportError:
  torch = None


def config(**changes):
  c = default_config()
  c.update(changes)
  return c


def expected_lr(step, *, lr, warmup, total, kind, ratio):
  if step < warmup:
    return lr * step / warmup
  if kind == "constant":
    return lr
  frac = min(step - warmup, total - warmup) / (total - warmup)
  if kind == "linear":
    return lr * (1 - (1 - ratio) * frac)
  return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_closed_form(kind, warmup):
  lr, total, ratio = 2e-3, 110, 0.1
  schedule = make_schedule(config(lr=lr, warmup_steps=warmup, schedule=kind, min_lr_ratio=ratio),
                           total)
  steps = [0, 1, 5, 9, 10, 11, 37, 60, 100, 109, 110, 500]
  got = [float(schedule(s)) for s in steps]
  want = [expected_lr(s, lr=lr, warmup=warmup, total=total, kind=kind, ratio=ratio)
          for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  # Landmarks, written out: warmup starts at 0 and peaks at lr; the decay ends at lr * ratio.
  assert got[0] == pytest.approx(0.0 if warmup else lr)
  if warmup:
    assert got[steps.index(warmup)] == pytest.approx(lr)
  assert got[-1] == pytest.approx(lr if kind == "constant" else lr * ratio)


def test_schedule_jits_on_a_traced_step():
  schedule = make_schedule(config(lr=1e-3, warmup_steps=4, schedule="cosine"), 20)
  got = jax.jit(schedule)(jnp.int32(2))
  assert float(got) == pytest.approx(5e-4)


def _tiny_params(preset):
  # Shapes only: the tree of the real model without paying for its initialisation.
  return nnx.split(abstract_model(get_preset(preset)), nnx.Param)[1].to_pure_dict()


def test_decay_mask_on_a_real_model_tree():
  params = _tiny_params("tiny_qwen2")  # has q/k/v biases
  flat = {param_name(p): v for p, v in
          jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
  assert flat["layers.0.self_attn.q_proj.kernel"] is True
  assert flat["layers.1.mlp.down_proj.kernel"] is True
  assert flat["embed_tokens.embedding"] is True
  assert flat["layers.0.self_attn.q_proj.bias"] is False
  assert flat["layers.1.input_layernorm.scale"] is False
  assert flat["norm.scale"] is False
  no_decay = sorted(n for n, d in flat.items() if not d)
  # 2 layers x (2 norms + q/k/v bias) + the final norm.
  assert len(no_decay) == 11
  assert all(n.endswith((".scale", ".bias")) for n in no_decay)
  assert jax.tree.structure(decay_mask(params)) == jax.tree.structure(params)
  assert all(jax.tree.leaves(decay_mask(params, decay_norms_and_biases=True)))


def test_decay_mask_on_nnx_state_and_moe_tree():
  state = nnx.split(abstract_model(get_preset("tiny_mixtral")), nnx.Param)[1]
  flat = {param_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(decay_mask(state))[0]}
  assert flat["layers.0.block_sparse_moe.experts.w1"] is True
  assert flat["layers.0.block_sparse_moe.gate.kernel"] is True
  assert flat["layers.0.post_attention_layernorm.scale"] is False
  # An unnamed 1-D parameter is treated like a bias.
  assert decay_mask({"gain": jnp.ones(3), "w": jnp.ones((3, 3))}) == {"gain": False, "w": True}


def _problem(seed=0, steps=6):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": rng.normal(size=(5, 4)).astype(np.float32),
                      "bias": rng.normal(size=(4,)).astype(np.float32)},
            "norm": {"scale": (1 + 0.1 * rng.normal(size=(4,))).astype(np.float32)}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(steps)]
  return params, grads


def _run_optax(tx, params, grads):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads:
    params, state = step(params, state, jax.tree.map(jnp.asarray, g))
  return jax.tree.map(np.asarray, params)


@pytest.mark.skipif(torch is None, reason="needs torch (the reference)")
@pytest.mark.parametrize("kind,warmup", [("constant", 0), ("cosine", 3)])
def test_adamw_matches_torch(kind, warmup):
  c = config(name="adamw", lr=1e-2, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.3,
             schedule=kind, warmup_steps=warmup, min_lr_ratio=0.2, grad_clip=0.0)
  total = 8
  params, grads = _problem()
  tx, schedule = make_optimizer(c, total)
  got = _run_optax(tx, params, grads)

  t = {k: {n: torch.tensor(v, requires_grad=True) for n, v in sub.items()}
       for k, sub in params.items()}
  groups = [{"params": [t["dense"]["kernel"]], "weight_decay": c.weight_decay},
            {"params": [t["dense"]["bias"], t["norm"]["scale"]], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=c.lr, betas=(c.b1, c.b2), eps=c.eps)
  # torch steps with lr * lambda(n) on its n-th step, as optax uses schedule(count).
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: float(schedule(n)) / c.lr)
  for g in grads:
    for k, sub in t.items():
      for n, p in sub.items():
        p.grad = torch.tensor(g[k][n])
    opt.step()
    sched.step()
  for k, sub in t.items():
    for n, p in sub.items():
      np.testing.assert_allclose(got[k][n], p.detach().numpy(), atol=1e-6, rtol=1e-5,
                                 err_msg=f"{k}.{n}")
  # Decay made a difference that the tolerance sees.
  no_decay = _run_optax(make_optimizer(config(**{**c.to_dict(), "weight_decay": 0.0}), total)[0],
                        params, grads)
  assert np.abs(no_decay["dense"]["kernel"] - got["dense"]["kernel"]).max() > 1e-4
  np.testing.assert_array_equal(no_decay["dense"]["bias"], got["dense"]["bias"])


def lion_reference(params, grads, mask, *, lr, b1, b2, wd):
  """Lion as published (Chen et al. 2023, Algorithm 2), in numpy."""
  params = {k: dict(v) for k, v in params.items()}
  m = {k: {n: np.zeros_like(p) for n, p in sub.items()} for k, sub in params.items()}
  for step, g in enumerate(grads):
    for k, sub in params.items():
      for n, theta in sub.items():
        c = b1 * m[k][n] + (1 - b1) * g[k][n]
        decay = wd if mask[k][n] else 0.0
        sub[n] = theta - lr(step) * (np.sign(c) + decay * theta)
        m[k][n] = b2 * m[k][n] + (1 - b2) * g[k][n]
  return params


def test_lion_matches_published_update():
  c = config(name="lion", lr=3e-3, b1=0.9, b2=0.99, weight_decay=0.5, schedule="linear",
             warmup_steps=2, min_lr_ratio=0.0, grad_clip=0.0)
  params, grads = _problem(seed=1)
  tx, schedule = make_optimizer(c, 10)
  got = _run_optax(tx, params, grads)
  want = lion_reference(params, grads, decay_mask(params), lr=lambda s: float(schedule(s)),
                        b1=c.b1, b2=c.b2, wd=c.weight_decay)
  for k, sub in want.items():
    for n, p in sub.items():
      np.testing.assert_allclose(got[k][n], p, atol=1e-6, rtol=1e-5, err_msg=f"{k}.{n}")


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_weight_decay_is_lr_scaled_and_masked(name):
  # With zero gradients every optimizer's own step is zero, leaving only the decay:
  # each step multiplies a decayed parameter by 1 - lr(t) * weight_decay.
  c = config(name=name, lr=0.05, weight_decay=0.4, schedule="cosine", warmup_steps=2,
             min_lr_ratio=0.0, grad_clip=1.0)
  params, _ = _problem()
  steps = 5
  zeros = [jax.tree.map(np.zeros_like, params)] * steps
  tx, schedule = make_optimizer(c, 10)
  got = _run_optax(tx, params, zeros)
  factor = np.prod([1 - float(schedule(s)) * c.weight_decay for s in range(steps)])
  assert factor < 0.95
  np.testing.assert_allclose(got["dense"]["kernel"], params["dense"]["kernel"] * factor,
                             rtol=1e-5)
  np.testing.assert_array_equal(got["dense"]["bias"], params["dense"]["bias"])
  np.testing.assert_array_equal(got["norm"]["scale"], params["norm"]["scale"])
  c.decay_norms_and_biases = True
  got = _run_optax(make_optimizer(c, 10)[0], params, zeros)
  np.testing.assert_allclose(got["norm"]["scale"], params["norm"]["scale"] * factor, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_optimizers_reduce_a_quadratic(name):
  rng = np.random.default_rng(0)
  target = rng.normal(size=(8, 8)).astype(np.float32)
  params = {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
  c = config(name=name, lr=0.05, b1=0.9, b2=0.99, weight_decay=0.0, schedule="constant",
             warmup_steps=0, grad_clip=0.0)
  tx, _ = make_optimizer(c, 100)
  state = tx.init(params)
  loss = lambda p: jnp.sum((p["kernel"] - target) ** 2)
  start = float(loss(params))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(60):
    params, state = step(params, state)
  assert float(loss(params)) < 0.2 * start


@pytest.mark.parametrize("scale", [5.0, 0.5])
def test_grad_clip_clips_to_the_global_norm(scale):
  params, grads = _problem(steps=1)
  g = grads[0]
  norm = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in jax.tree.leaves(g)))
  g = jax.tree.map(lambda x: x * (scale / norm), g)  # global norm = scale
  b1 = 0.9
  for clip, want_norm in [(1.0, min(scale, 1.0)), (0.0, scale)]:
    tx, _ = make_optimizer(config(name="adamw", b1=b1, grad_clip=clip, warmup_steps=0), 10)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    _, state = tx.update(jax.tree.map(jnp.asarray, g), state, jax.tree.map(jnp.asarray, params))
    # After one step Adam's first moment is (1 - b1) * the gradient it was given.
    seen = jax.tree.map(lambda m: np.asarray(m) / (1 - b1), optax.tree.get(state, "mu"))
    assert float(optax.tree.norm(seen)) == pytest.approx(want_norm, rel=1e-5)
    for a, b in zip(jax.tree.leaves(seen), jax.tree.leaves(g)):
      np.testing.assert_allclose(a, b * (want_norm / scale), rtol=1e-5, atol=1e-7)


def test_plain_dict_and_defaults():
  tx, schedule = make_optimizer({"name": "lion", "lr": 1e-4, "warmup_steps": 0}, 10)
  assert float(schedule(0)) == pytest.approx(1e-4)
  assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize("field,value", [
  ("name", "sgd"), ("schedule", "step"), ("lr", -1e-3), ("lr", 0.0), ("lr", float("nan")),
  ("b1", 1.0), ("b2", -0.1), ("eps", -1e-8), ("weight_decay", -0.1), ("grad_clip", -1.0),
  ("min_lr_ratio", 1.5), ("warmup_steps", -1), ("warmup_steps", 101), ("warmup_steps", 2.5),
  ("decay_norms_and_biases", "yes"),
])
def test_bad_values_name_the_field(field, value):
  c = config(warmup_steps=10).to_dict()
  c[field] = value
  with pytest.raises(ZooError, match=rf"optimizer\.{field}\b") as e:
    make_optimizer(c, 100)
  assert "\n" not in str(e.value)
  with pytest.raises(ZooError, match=rf"optimizer\.{field}\b"):
    make_schedule(c, 100)


def test_bad_total_steps():
  with pytest.raises(ZooError, match="train.steps"):
    make_optimizer(config(warmup_steps=0), 0)
