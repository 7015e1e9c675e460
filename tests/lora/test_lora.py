"""LoRA: the adapter tree, its train step, merging, and peft files both ways."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zoo
from tests.helpers import tokens
from tests.references import hf_logits, hf_model
from zoo import lora, sharding
from zoo.errors import ZooError
from zoo.train.optim import make_optimizer
from zoo.train.step import init_state, make_train_step

# the references this module checks against; without them it is skipped
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ALL = ("all-linear", "lm_head", "embed_tokens")


def randomize_adapters(model, std=0.1, seed=0):
  rng = np.random.default_rng(seed)
  for _, m in lora._modules(model):
    if m.lora_a is not None:
      m.lora_a.set_value(jnp.asarray(rng.standard_normal(m.lora_a.shape) * std, jnp.float32))
      m.lora_b.set_value(jnp.asarray(rng.standard_normal(m.lora_b.shape) * std, jnp.float32))


def lm_batch(rows, length, vocab=128):
  """A train-step batch of random tokens: `rows` unpacked sequences of `length`."""
  x = np.random.default_rng(0).integers(0, vocab, (rows, length + 1)).astype(np.int32)
  return {"tokens": x[:, :-1], "targets": x[:, 1:],
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
          "segment_ids": np.ones((rows, length), np.int32),
          "weights": np.ones((rows, length), np.float32)}


def peft_logits(base_hf_dir, adapter_dir, x):
  import transformers
  base = transformers.AutoModelForCausalLM.from_pretrained(base_hf_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  with torch.no_grad():
    return model(torch.as_tensor(x)).logits.numpy()


def test_adapted_model_starts_equal_to_base(save_hf):
  ref = hf_model("llama")
  model = zoo.load(save_hf(ref))
  x = tokens()
  before = model.logits(x)
  paths = lora.add_lora(model, lora.LoraSpec(rank=4, alpha=8, targets=ALL))
  assert len(paths) == 2 * 7 + 2  # 7 projections per layer, the head and the embedding
  np.testing.assert_array_equal(model.logits(x), before)
  np.testing.assert_allclose(before, hf_logits(ref, x), atol=1e-4, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True])
def test_zoo_adapter_to_peft_gives_peft_logits(rslora, save_hf, tmp_path):
  hf_dir = save_hf(hf_model("llama"))
  model = zoo.load(hf_dir)
  spec = lora.LoraSpec(rank=4, alpha=8, targets=ALL, rslora=rslora)
  lora.add_lora(model, spec)
  randomize_adapters(model)
  x = tokens()
  ours = model.logits(x)
  assert np.abs(ours - zoo.load(hf_dir).logits(x)).max() > 0.1  # the adapters matter
  lora.save_adapter(model, str(tmp_path / "adapter"), spec)
  # the command line converts zoo's adapter to peft's files
  result = subprocess.run([sys.executable, "-m", "zoo.cli", "convert", str(tmp_path / "adapter"),
                           str(tmp_path / "peft"), "--to", "peft"], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] == rslora
  np.testing.assert_allclose(peft_logits(hf_dir, str(tmp_path / "peft"), x), ours, atol=1e-4,
                             rtol=1e-5)
  # both adapter formats load back into zoo
  for adapter in ("adapter", "peft"):
    np.testing.assert_allclose(zoo.load(hf_dir, adapter=str(tmp_path / adapter)).logits(x),
                               ours, atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_into_zoo(save_hf, tmp_path):
  """An adapter made and saved by peft itself (random A and B) gives peft's logits in zoo."""
  hf_dir = save_hf(hf_model("qwen2"))
  base = hf_model("qwen2")
  config = peft.LoraConfig(r=6, lora_alpha=12, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
  model = peft.get_peft_model(base, config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn_like(p) * 0.1)
  model.save_pretrained(tmp_path / "peft")
  x = tokens()
  with torch.no_grad():
    theirs = model.eval()(torch.as_tensor(x)).logits.numpy()
  ours = zoo.load(hf_dir, adapter=str(tmp_path / "peft")).logits(x)
  assert np.abs(theirs - hf_logits(hf_model("qwen2"), x)).max() > 0.1
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-5)


def test_merge_unmerge_and_export_merged_to_transformers(save_hf, tmp_path):
  import transformers
  model = zoo.load(save_hf(hf_model("mistral", sliding_window=8)))
  lora.add_lora(model, lora.LoraSpec(rank=4, alpha=4, targets=("re:layers\\.1\\..*_proj",
                                                                 "lm_head")))
  assert sorted(lora.adapted_paths(model)) == sorted([f"layers.1.{m}" for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"])
  randomize_adapters(model)
  x = tokens()
  adapted = model.logits(x)
  kernel = np.asarray(model.lm_head.kernel[...])
  lora.merge(model)
  np.testing.assert_allclose(model.logits(x), adapted, atol=1e-4, rtol=1e-5)
  assert np.abs(np.asarray(model.lm_head.kernel[...]) - kernel).max() > 1e-3
  lora.unmerge(model)
  np.testing.assert_allclose(np.asarray(model.lm_head.kernel[...]), kernel, atol=1e-6)
  np.testing.assert_allclose(model.logits(x), adapted, atol=1e-5, rtol=1e-5)
  with pytest.raises(ZooError, match="LoRA adapters"):
    zoo.save(model, str(tmp_path / "refused"))
  zoo.save(lora.merged_model(model), str(tmp_path / "merged"))
  zoo.convert.convert(str(tmp_path / "merged"), str(tmp_path / "merged_hf"), "hf")
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", dtype=torch.float32)
  np.testing.assert_allclose(hf_logits(hf.eval(), x), adapted, atol=1e-4, rtol=1e-5)


def test_lora_step_trains_only_the_adapters(save_hf):
  model = zoo.load(save_hf(hf_model("llama")))
  lora.add_lora(model, lora.LoraSpec(rank=4, alpha=8, targets=("all-linear",)))
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  adapters, base = nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
  assert not any("lora" in ".".join(map(str, p)) for p, _ in
                 jax.tree_util.tree_flatten_with_path(base)[0])
  tx, schedule = make_optimizer(dict(name="adamw", lr=1e-2, schedule="constant",
                                     warmup_steps=0), 100)
  state = init_state(adapters, tx, seed=0)
  # optimizer state exists only for the adapters: AdamW's two moments of each
  n_adapter = len(jax.tree.leaves(adapters))
  assert sum(x.ndim == 2 for x in jax.tree.leaves(state["opt_state"])) == 2 * n_adapter
  batch = lm_batch(4, 32)
  step = jax.jit(make_train_step(graphdef, tx, schedule), donate_argnums=0)
  base_before = jax.tree.map(np.array, base)
  adapters_before = jax.tree.map(np.array, adapters)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch, base)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05
  for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
    np.testing.assert_array_equal(before, np.asarray(after))  # bit-identical
  changed = [np.abs(np.asarray(a) - b).max() > 0 for a, b in
             zip(jax.tree.leaves(state["params"]), jax.tree.leaves(adapters_before))]
  assert all(changed)
  with pytest.raises(ValueError, match="base"):
    make_train_step(graphdef, tx, schedule)(state, batch)


def test_lora_dropout_matches_peft_with_the_same_masks(save_hf, tmp_path):
  """With a dropout key, each adapted layer drops its adapter's input (never the base path) and
  scales the rest by 1 / keep, as peft's lora_dropout does: peft, given zoo's masks in place of
  its torch dropout, computes the same logits. Without a key the adapters are deterministic."""
  hf_dir = save_hf(hf_model("llama"))
  model = zoo.load(hf_dir)
  spec = lora.LoraSpec(rank=4, alpha=8, targets=("all-linear",), dropout=0.3)
  lora.add_lora(model, spec)
  randomize_adapters(model, std=0.3)
  lora.save_peft(model, str(tmp_path / "peft"), spec)
  x = tokens()
  plain = model.logits(x)
  np.testing.assert_allclose(peft_logits(hf_dir, str(tmp_path / "peft"), x), plain, atol=1e-4,
                             rtol=1e-5)
  key = jax.random.key(7)
  lora.set_dropout_rng(model, key)
  dropped = model.logits(x)
  assert np.abs(dropped - plain).max() > 1e-2

  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()

  class Mask(torch.nn.Module):
    def __init__(self, mask):
      super().__init__()
      self.mask = torch.as_tensor(np.asarray(mask, np.float32))

    def forward(self, h):
      return h * self.mask / 0.7

  layers = peft_model.base_model.model.model.layers
  for path, m in lora._modules(model):
    if m.lora_a is None:
      continue
    _, layer, block, name = path.split(".")
    mask = jax.random.bernoulli(lora.dropout_key(key, path), 0.7, (*x.shape, m.kernel.shape[0]))
    getattr(getattr(layers[int(layer)], block), name).lora_dropout["default"] = Mask(mask)
  with torch.no_grad():
    theirs = peft_model(torch.as_tensor(x)).logits.numpy()
  # float rounding only (a mask that differed would move logits by > 1e-2, as above)
  np.testing.assert_allclose(theirs, dropped, atol=3e-4, rtol=1e-4)


def test_lora_dropout_in_the_train_step(save_hf):
  """Masks come from the state's rng and step: the same state and batch give the same update,
  the next step draws new masks, and dropout 0 is the plain step."""
  model = zoo.load(save_hf(hf_model("llama")))
  lora.add_lora(model, lora.LoraSpec(rank=4, alpha=8, targets=("all-linear",), dropout=0.5))
  randomize_adapters(model)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  adapters, base = nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
  tx, schedule = make_optimizer(dict(name="adamw", lr=1e-2, schedule="constant",
                                     warmup_steps=0), 100)
  batch = lm_batch(4, 32)

  def state(step=0):
    return dict(init_state(adapters, tx, seed=0), step=jnp.asarray(step, jnp.int32))

  losses = {}
  for dropout, accum in ((False, 1), (True, 1), (True, 2)):
    step = jax.jit(make_train_step(graphdef, tx, schedule, dropout=dropout,
                                   grad_accum=accum))
    losses[dropout, accum] = [float(step(state(s), batch, base)[1]["loss"]) for s in (0, 0, 1)]
  plain, drop, drop_accum = losses[False, 1], losses[True, 1], losses[True, 2]
  assert plain[0] == plain[1] == plain[2]  # no dropout: the step number changes nothing
  assert drop[0] == drop[1] and drop[0] != drop[2]  # same step, same masks; next step, new
  assert drop[0] != plain[0] and drop_accum[0] != drop[0]  # microbatches draw their own


def test_adapters_shard_like_their_weights(save_hf):
  model = zoo.load(save_hf(hf_model("llama")))
  lora.add_lora(model, lora.LoraSpec(rank=4, alpha=8, targets=("q_proj", "down_proj")))
  axes = sharding.logical_axes(model)
  assert axes["layers.0.self_attn.q_proj.kernel"] == ("embed", "heads")
  assert axes["layers.0.self_attn.q_proj.lora_a"] == ("embed", None)
  assert axes["layers.0.self_attn.q_proj.lora_b"] == (None, "heads")
  assert axes["layers.0.mlp.down_proj.lora_a"] == ("mlp", None)
  mesh = sharding.make_mesh((1, 2, 2), devices=jax.devices()[:4])
  shardings = sharding.param_shardings(model, mesh, sharding.DEFAULT_RULES)
  q = shardings["layers"][0]["self_attn"]["q_proj"]
  assert q["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q["lora_a"].spec == jax.sharding.PartitionSpec("fsdp", None)
  assert q["lora_b"].spec == jax.sharding.PartitionSpec(None, "tensor")


@pytest.mark.slow
def test_bad_specs_and_adapter_files(save_hf, tmp_path):
  from safetensors.numpy import load_file, save_file
  hf_dir = save_hf(hf_model("llama"))
  for kwargs, message in ((dict(rank=0), "rank"), (dict(targets=("qproj",)), "unknown LoRA"),
                          (dict(targets=("re:(",)), "regex"), (dict(dropout=1.5), "dropout")):
    with pytest.raises(ZooError, match=message):
      lora.LoraSpec(**kwargs)
  model = zoo.load(hf_dir)
  with pytest.raises(ZooError, match="no layer matches"):
    lora.add_lora(model, lora.LoraSpec(targets=("re:nothing",)))
  spec = lora.LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"))
  lora.add_lora(model, spec)
  good = tmp_path / "good"
  lora.save_peft(model, str(good), spec)
  weights = load_file(str(good / "adapter_model.safetensors"))

  def variant(name, config_change=None, weight_change=None):
    d = tmp_path / name
    d.mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    config.update(config_change or {})
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file((weight_change or (lambda w: w))(dict(weights)), str(d / "adapter_model.safetensors"))
    return str(d)

  key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  cases = {
    "wrong_rank": (variant("wrong_rank", {"r": 8}), "expected"),
    "bad_shape": (variant("bad_shape", weight_change=lambda w: w | {
        key: np.zeros((4, 7), np.float32)}), "shape"),
    "unknown_module": (variant("unknown_module", weight_change=lambda w: w | {
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight":
        np.zeros((4, 64), np.float32)}), "does not have"),
    "missing_half": (variant("missing_half", weight_change=lambda w: {
        k: v for k, v in w.items() if k != key}), "without"),
    "dora": (variant("dora", {"use_dora": True}), "use_dora"),
  }
  for name, (path, message) in cases.items():
    with pytest.raises(ZooError, match=message):
      zoo.load(hf_dir, adapter=path)
    result = subprocess.run([sys.executable, "-m", "zoo.cli", "generate", "--checkpoint", hf_dir,
                             "--prompt-ids", "1,2", "--adapter", path], capture_output=True,
                            text=True)
    assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
  with pytest.raises(ZooError, match="not found"):
    zoo.load(hf_dir, adapter=str(tmp_path / "missing"))
  assert os.path.isdir(good)


def test_qlora_step_tracks_the_bf16_base(save_hf):
  """The frozen base held as NF4 (or int8) codes, dequantized inside the step: the LoRA losses
  stay within 3% (int8: 0.5%) of the same run on a bf16 base, and fall as fast."""
  from zoo.layers.quant import bf16_bytes, is_quantized, nbytes, quantize_tree
  hf_dir = save_hf(hf_model("llama"))
  batch = lm_batch(4, 64)
  losses, ratio = {}, {}
  for kind in ("bf16", "nf4", "int8"):
    model = zoo.load(hf_dir)
    lora.add_lora(model, lora.LoraSpec(rank=8, alpha=16, targets=("all-linear",)))
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    adapters, base = nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
    if kind == "bf16":
      base = jax.tree.map(lambda a: a.astype(jnp.bfloat16), base)
    else:
      base = quantize_tree(base, kind)
      q = [leaf for leaf in jax.tree.leaves(base, is_leaf=is_quantized) if is_quantized(leaf)]
      assert len(q) == 2 * 7 + 1  # every projection kernel and the head
      ratio[kind] = sum(map(nbytes, q)) / sum(map(bf16_bytes, q))
    tx, schedule = make_optimizer(dict(name="adamw", lr=1e-2, schedule="constant",
                                       warmup_steps=0), 100)
    state = init_state(adapters, tx, seed=0)
    step = jax.jit(make_train_step(graphdef, tx, schedule))
    losses[kind] = []
    for _ in range(10):
      state, metrics = step(state, batch, base)
      losses[kind].append(float(metrics["loss"]))
  ref = np.array(losses["bf16"])
  assert ref[-1] < ref[0] - 1.0
  assert np.max(np.abs(np.array(losses["nf4"]) - ref) / ref) < 0.03
  assert np.max(np.abs(np.array(losses["int8"]) - ref) / ref) < 0.005
  assert ratio["nf4"] <= 0.30 and ratio["int8"] <= 0.55


def lora_step_temp_bytes(quantize, remat):
  """XLA's temporary buffer size for a LoRA step on an 8-layer model (compile only), the frozen
  base held in float32 or quantized."""
  from zoo.layers.quant import quantize_tree
  from zoo.models.llama import Llama
  from zoo.models.presets import get_preset
  config = get_preset("tiny_llama", vocab_size=128, hidden_size=256, num_heads=4,
                      num_kv_heads=4, intermediate_size=1024, num_layers=8)
  model = Llama(config, remat=remat, rngs=nnx.Rngs(0))
  lora.add_lora(model, lora.LoraSpec(rank=8, alpha=16, targets=("all-linear",)))
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  adapters, base = nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
  if quantize != "none":
    base = quantize_tree(base, quantize)
  tx = optax.adamw(1e-3)
  state = init_state(adapters, tx, seed=0)
  step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(1e-3)))
  layer_kernels = 4 * (4 * 256 * 256 + 3 * 256 * 1024)  # one layer's weights in float32
  compiled = step.lower(state, lm_batch(4, 64), base).compile()
  return compiled.memory_analysis().temp_size_in_bytes, layer_kernels


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_qlora_step_dequantizes_one_layer_at_a_time(remat):
  """A QLoRA step holds the dequantized weights of about one layer at a time, not every
  layer's from the forward pass to the backward pass: its temporaries exceed the same LoRA
  step's on a float32 base by less than two layers' weights (8 layers here)."""
  lora_temp, layer = lora_step_temp_bytes("none", remat)
  for kind in ("nf4", "int8"):
    qlora_temp, _ = lora_step_temp_bytes(kind, remat)
    assert qlora_temp - lora_temp < 2 * layer, (kind, qlora_temp, lora_temp, layer)


def test_quantized_base_is_sharded_by_the_rules(save_hf):
  """On an (fsdp 4, tensor 2) mesh the NF4 base keeps the rules' row sharding (codes and scales
  split by blocks, each device holding whole rows), and a QLoRA step on the mesh gives the
  single-device loss."""
  from zoo.layers.quant import is_quantized, quantize_tree
  model = zoo.load(save_hf(hf_model("llama")))
  lora.add_lora(model, lora.LoraSpec(rank=4, alpha=8, targets=("all-linear",)))
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  mesh = sharding.make_mesh((1, 4, 2))
  base_shardings = sharding.variable_shardings(base, mesh, sharding.DEFAULT_RULES)
  adapters, base = nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
  base = quantize_tree(base, "nf4")
  base_shardings = jax.tree.map(
      lambda leaf, s: sharding.quantized_sharding(leaf, s) if is_quantized(leaf) else s,
      base, base_shardings, is_leaf=is_quantized)
  placed = jax.device_put(base, base_shardings)
  q = placed["layers"][0]["self_attn"]["q_proj"]["kernel"]  # [embed 64, heads 64], fsdp rows
  assert q.codes.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert q.codes.addressable_shards[0].data.shape[0] == q.codes.shape[0] // 4
  head = placed["lm_head"]["kernel"]  # [embed 64, vocab 128]
  assert head.scales.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)

  tx, schedule = make_optimizer(dict(name="adamw", lr=1e-2, schedule="constant",
                                     warmup_steps=0), 100)
  batch = lm_batch(8, 32)
  losses = []
  for base_tree in (base, placed):
    state = init_state(adapters, tx, seed=0)
    step = jax.jit(make_train_step(graphdef, tx, schedule))
    run = []
    for _ in range(3):
      state, metrics = step(state, batch, base_tree)
      run.append(float(metrics["loss"]))
    losses.append(run)
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


LLAMA4_TINY = dict(num_hidden_layers=4, intermediate_size=48, intermediate_size_mlp=96,
                   num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=16,
                   floor_scale=4)
QWEN3_MOE_TINY = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      num_hidden_layers=3, mlp_only_layers=[1])
NEW_FAMILIES = {
  "qwen3": ("qwen3", dict(head_dim=32), ("all-linear",)),
  "qwen3_moe": ("qwen3_moe", QWEN3_MOE_TINY, ("q_proj", "k_proj", "v_proj", "o_proj")),
  "llama4": ("llama4", LLAMA4_TINY, ("all-linear",)),
  "llama4_shared_expert": ("llama4", LLAMA4_TINY, ("q_proj", "gate_proj", "shared_expert")),
}


@pytest.mark.parametrize("variant", sorted(NEW_FAMILIES))
def test_new_families_adapters_load_in_peft(variant, save_hf, tmp_path):
  """Adapters on Qwen3, Qwen3-MoE and Llama 4 (never on the routed experts, the router or the
  q/k norms; on a shared expert only when it is asked for) give peft's logits on the HF model,
  and come back into zoo from peft's files."""
  family, overrides, targets = NEW_FAMILIES[variant]
  hf_dir = save_hf(hf_model(family, **overrides))
  model = zoo.load(hf_dir)
  spec = lora.LoraSpec(rank=4, alpha=8, targets=targets)
  paths = lora.add_lora(model, spec)
  assert not any("norm" in p or p.endswith(".gate") or ".experts" in p for p in paths)
  assert any("shared_expert" in p for p in paths) == ("shared_expert" in targets)
  if family == "llama4":  # its dense MLPs are adapted
    assert any(".mlp.gate_proj" in p for p in paths), paths
  randomize_adapters(model)
  x = tokens()
  ours = model.logits(x)
  assert np.abs(ours - zoo.load(hf_dir).logits(x)).max() > 0.1
  lora.save_peft(model, str(tmp_path / "peft"), spec)
  np.testing.assert_allclose(peft_logits(hf_dir, str(tmp_path / "peft"), x), ours, atol=1e-4,
                             rtol=1e-5)
  np.testing.assert_allclose(zoo.load(hf_dir, adapter=str(tmp_path / "peft")).logits(x), ours,
                             atol=1e-5, rtol=1e-5)


def test_qwen3_moe_dense_mlp_adapters_are_refused_by_the_peft_export(save_hf, tmp_path):
  """peft (on transformers 5) reads a Qwen3-MoE `mlp.down_proj` target as the experts' fused
  weights, so such an adapter would load into the wrong modules: the export says so instead."""
  model = zoo.load(save_hf(hf_model("qwen3_moe", **QWEN3_MOE_TINY)))
  spec = lora.LoraSpec(rank=4, alpha=8, targets=("all-linear",))
  assert "layers.1.mlp.down_proj" in lora.add_lora(model, spec)
  with pytest.raises(ZooError, match="peft cannot hold the adapter layers.1.mlp"):
    lora.save_peft(model, str(tmp_path / "peft"), spec)
  assert not (tmp_path / "peft").exists()
  lora.save_adapter(model, str(tmp_path / "zoo"), spec)  # zoo's own format holds it
