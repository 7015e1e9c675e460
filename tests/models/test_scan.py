"""Scanned layers (zoo.models.stack): the stacked layout computes what the unrolled one does
(forward, gradients under every remat, decoding, adapters), loads per-layer checkpoints into
sharded stacks one layer at a time, and gives its parameters back per layer.

The unrolled model is the reference here: test_parity checks it (and the scanned one) against
transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from tests.helpers import tokens
from tests.references import hf_logits, hf_model
from zoo import lora, sharding
from zoo.convert.checkpoint import Checkpoint
from zoo.errors import ZooError
from zoo.infer.generate import Generator
from zoo.layers.quant import dequantize, quantize, quantize_leaf
from zoo.models import stack
from zoo.models.config import LlamaConfig
from zoo.models.llama import Llama, abstract_model, params_of
from zoo.train import checkpoint as train_checkpoint
from zoo.train.optim import decay_mask

# Four layers of two alternating kinds: a scan step runs the pair (period 2).
ALTERNATING = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
    num_kv_heads=2, sliding_window=5, layer_types=("full_attention", "sliding_attention") * 2,
    initializer_range=0.2, family="qwen2", qkv_bias=True)
UNIFORM = ALTERNATING.replace(layer_types=None, sliding_window=None, family="llama",
                              qkv_bias=False)


def flat(tree) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def test_scan_period_finds_the_repeating_group():
  assert stack.scan_period(UNIFORM) == 1
  assert stack.scan_period(ALTERNATING) == 2
  first_full = ("full_attention",) + ("sliding_attention",) * 3  # Qwen2's max_window_layers
  assert stack.scan_period(ALTERNATING.replace(layer_types=first_full)) is None
  assert stack.scan_period(UNIFORM.replace(num_layers=1)) == 1


@pytest.mark.parametrize("config", [UNIFORM, ALTERNATING], ids=["uniform", "alternating"])
@pytest.mark.parametrize("remat,impl", [("none", "checkpoint"), ("full", "custom_vjp"),
                                        ("full", "checkpoint"), ("save_qkvo", "checkpoint")])
def test_scanned_model_starts_from_the_same_weights_and_has_the_same_gradients(config, remat,
                                                                               impl):
  unrolled = Llama(config, remat=remat, remat_impl=impl, rngs=nnx.Rngs(3))
  scanned = Llama(config, remat=remat, remat_impl=impl, scan_layers=True, rngs=nnx.Rngs(3))
  ours = stack.unstack(params_of_np(scanned))
  ref = params_of_np(unrolled)
  assert set(ours) == set(ref) and all(np.array_equal(ours[k], ref[k]) for k in ref)
  # a stacked leaf carries the layer axis first, named for the rules table
  axes = sharding.logical_axes(scanned)
  assert axes["stack.0.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
  assert scanned.stack[0].self_attn.q_proj.kernel.shape[0] == 4 // stack.scan_period(config)

  x = jnp.asarray(tokens(batch=2, length=12, vocab=96))
  segments = jnp.asarray(np.repeat([[1] * 7 + [2] * 5], 2, axis=0), jnp.int32)
  positions = jnp.asarray(np.repeat([list(range(7)) + list(range(5))], 2, axis=0), jnp.int32)

  def loss(model):
    logits = model(x, positions, segments).astype(jnp.float32)
    return jnp.mean(jax.nn.log_softmax(logits) ** 2)

  ref_loss, ref_grads = nnx.value_and_grad(loss)(unrolled)
  our_loss, our_grads = nnx.value_and_grad(loss)(scanned)
  assert abs(float(ref_loss)) > 1.0
  np.testing.assert_allclose(float(our_loss), float(ref_loss), rtol=1e-6)
  ref_grads, our_grads = flat(ref_grads), stack.unstack(flat(our_grads))
  for name, g in ref_grads.items():
    np.testing.assert_allclose(our_grads[name], g, atol=1e-5 * max(1, np.abs(g).max()),
                               err_msg=name)


def params_of_np(model) -> dict:
  return {k: np.asarray(v) for k, v in params_of(model).items()}


def test_scanned_model_decodes_like_the_unrolled_one():
  unrolled = Llama(ALTERNATING, rngs=nnx.Rngs(1))
  scanned = Llama(ALTERNATING, scan_layers=True, rngs=nnx.Rngs(1))
  prompts = [[5, 6, 7, 8, 9], [11, 12]]
  ref = Generator(unrolled).generate(prompts, max_new_tokens=10)
  assert Generator(scanned).generate(prompts, max_new_tokens=10) == ref
  assert len(set(ref[0])) > 2  # not a degenerate repetition


def test_a_checkpoint_streams_into_sharded_stacks_one_layer_at_a_time(save_hf, monkeypatch):
  ref_model = hf_model("llama", num_hidden_layers=4)
  path = save_hf(ref_model)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = (("layers", "fsdp"), *sharding.DEFAULT_RULES[:-1])  # the layer axis split 2 ways
  model = abstract_model(zoo.load(path).config, scan_layers=True)
  graphdef, abstract = nnx.split(model, nnx.Param)
  shardings = sharding.param_shardings(model, mesh, rules)
  reads = []
  original = Checkpoint.read
  monkeypatch.setattr(Checkpoint, "read", lambda self, name: reads.append(name)
                      or original(self, name))
  params = train_checkpoint.load_tree(path, abstract.to_pure_dict(), shardings)
  # every layer's tensor read once, though 8 devices hold pieces of each stacked leaf
  assert len(reads) == len(set(reads)) == len(Checkpoint(path).source.infos)
  q = params["stack"][0]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec[0] == "fsdp" and q.shape[0] == 4
  assert q.addressable_shards[0].data.shape[0] == 2
  ref = {k: np.asarray(v) for k, v in params_of(zoo.load(path)).items()}
  got = stack.unstack({".".join(str(k.key) for k in kp): np.asarray(v)
                       for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]})
  assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
  x = tokens(length=24)
  with sharding.use(mesh, rules):
    logits = nnx.merge(graphdef, params).logits(x)
  np.testing.assert_allclose(logits, hf_logits(ref_model, x), atol=1e-4, rtol=1e-5)


def test_a_stacked_weight_is_quantized_layer_by_layer():
  w = np.random.default_rng(0).standard_normal((3, 32, 16)).astype(np.float32)
  q = quantize_leaf("stack.0.mlp.up_proj.kernel", w, "nf4", 64, stacked=True)
  assert q.shape == (32, 16) and q.codes.shape[0] == 3
  for g in range(3):
    one = quantize(w[g], "nf4", 64)
    np.testing.assert_array_equal(q.codes[g], np.asarray(one.codes))
    np.testing.assert_array_equal(dequantize(jax.tree.map(lambda a, g=g: a[g], q)),
                                  dequantize(one))
  # the shapes alone, for compiling ahead, agree with the real thing
  abstract = quantize_leaf("stack.0.mlp.up_proj.kernel", jax.ShapeDtypeStruct(w.shape, w.dtype),
                           "nf4", 64, stacked=True)
  assert abstract.codes.shape == q.codes.shape and abstract.scales.shape == q.scales.shape
  # norms stay unquantized; their stacked leaf is 2-D like a kernel but one layer's is 1-D
  scale = np.ones((3, 32), np.float32)
  assert quantize_leaf("stack.0.input_layernorm.scale", scale, "nf4", 64, stacked=True) is scale
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  weight = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp", None))
  parts = sharding.quantized_sharding(q, weight)
  assert parts.codes.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


def test_weight_decay_counts_the_dimensions_of_one_layer():
  params = {"stack": {0: {"input_layernorm": {"scale": jnp.ones((4, 8))},
                          "mlp": {"up_proj": {"kernel": jnp.ones((4, 8, 8))}}}},
            "norm": {"scale": jnp.ones(8)}}
  mask = decay_mask(params)
  assert mask["stack"][0]["input_layernorm"]["scale"] is False
  assert mask["stack"][0]["mlp"]["up_proj"]["kernel"] is True
  assert mask["norm"]["scale"] is False


def test_adapters_on_scanned_layers_are_the_unrolled_ones_stacked(save_hf, tmp_path):
  path = save_hf(hf_model("llama", num_hidden_layers=4))
  spec = lora.LoraSpec(rank=4, alpha=8, targets=("all-linear", "embed_tokens"), dropout=0.2)
  unrolled, scanned = zoo.load(path), zoo.load(path, scan_layers=True)
  assert lora.add_lora(scanned, spec, seed=5)[1].startswith("stack.0.")
  lora.add_lora(unrolled, spec, seed=5)
  assert sorted(lora.adapted_paths(scanned)) == sorted(lora.adapted_paths(unrolled))
  ours, ref = lora.lora_state(scanned), lora.lora_state(unrolled)
  assert set(ours) == set(ref) and all(np.array_equal(ours[k], ref[k]) for k in ref)
  # trained adapters (B != 0), the same masks from one dropout key, the same logits
  rng = np.random.default_rng(0)
  for name, value in ref.items():
    ref[name] = rng.standard_normal(value.shape).astype(np.float32) * 0.1
  for model in (unrolled, scanned):
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
      name = ".".join(map(str, p))
      values = {n: ref[n] for n, _ in stack.unstack_items({name: var.get_value()})}
      var.set_value(jnp.asarray(stack.stack(values, 1)[name] if stack.is_stacked(name)
                                else values[name]))
    lora.set_dropout_rng(model, jax.random.key(9))
  x = tokens(length=16)
  np.testing.assert_allclose(scanned.logits(x), unrolled.logits(x), atol=1e-5, rtol=1e-5)
  # the files hold layers one by one, as peft and zoo's unrolled models read them
  lora.save_peft(scanned, str(tmp_path / "peft"), spec)
  back = zoo.load(path, adapter=str(tmp_path / "peft"))
  for model in (unrolled, scanned):
    for m in (m for _, m in lora._modules(model)):
      m.lora_rng = None
  np.testing.assert_allclose(back.logits(x), unrolled.logits(x), atol=1e-5, rtol=1e-5)
  merged = lora.merged_params(scanned)
  assert not any(stack.is_stacked(n) for n in merged)
  np.testing.assert_allclose(zoo.models.llama.from_params(scanned.config, merged).logits(x),
                             unrolled.logits(x), atol=1e-4, rtol=1e-5)


def test_adapters_on_some_of_the_scanned_layers_are_refused():
  model = Llama(UNIFORM, scan_layers=True, rngs=nnx.Rngs(0))
  with pytest.raises(ZooError, match="some of the scanned layers"):
    lora.add_lora(model, lora.LoraSpec(targets=(r"re:layers\.[01]\.self_attn\.q_proj",)))
  paths = lora.add_lora(model, lora.LoraSpec(targets=(r"re:layers\.\d\.self_attn\.q_proj",)))
  assert paths == ["stack.0.self_attn.q_proj"]


def test_layers_without_a_repeating_group_cannot_be_scanned():
  config = ALTERNATING.replace(layer_types=("full_attention",) + ("sliding_attention",) * 3)
  with pytest.raises(ZooError, match="do not repeat"):
    Llama(config, scan_layers=True, rngs=nnx.Rngs(0))
