"""zoo.load(hf_dir).logits(x) against transformers' logits for every supported variant."""

import numpy as np
import pytest

import zoo
from tests.helpers import tokens
from tests.references import hf_logits, hf_model
from zoo.convert.checkpoint import Checkpoint, checkpoint_config as load_config
from zoo.models.llama import from_params, param_shapes
from zoo.errors import ZooError
from zoo.models.stack import scan_period

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
               "high_freq_factor": 8.0, "original_max_position_embeddings": 32}

QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
LLAMA4 = dict(num_hidden_layers=4, intermediate_size=48, intermediate_size_mlp=96,
              num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=16,
              floor_scale=4, attn_scale=0.1, head_dim=16)

VARIANTS = {
  # name: (family, config overrides, sequence length)
  "llama2_mha": ("llama", dict(num_key_value_heads=4), 40),
  "llama_gqa": ("llama", dict(), 40),
  "llama_mqa": ("llama", dict(num_key_value_heads=1), 40),
  "llama_head_dim_32": ("llama", dict(head_dim=32), 40),
  "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True), 24),
  "llama3_rope_scaling": ("llama", dict(rope_theta=500000.0, rope_parameters={
      "rope_theta": 500000.0, **LLAMA3_ROPE}), 96),
  "llama3_2_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters={
      "rope_theta": 500000.0, **LLAMA3_ROPE, "factor": 32.0}), 48),
  "codellama_theta": ("llama", dict(rope_parameters={"rope_type": "default",
                                                     "rope_theta": 1e6}), 40),
  "linear_rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                 "rope_theta": 10000.0}), 40),
  "dynamic_rope_within": ("llama", dict(max_position_embeddings=64, rope_parameters={
      "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), 40),
  "dynamic_rope_beyond": ("llama", dict(max_position_embeddings=32, rope_parameters={
      "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), 80),
  "yarn_rope": ("qwen2", dict(rope_parameters={
      "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
      "rope_theta": 1e6}), 96),
  "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True), 40),
  "qwen2_sliding_some_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=8,
                                              max_window_layers=1), 40),
  # two layer kinds alternating: a scanned model runs the pair as one scan step
  "qwen2_alternating_windows": ("qwen2", dict(
      use_sliding_window=True, sliding_window=8, num_hidden_layers=4,
      layer_types=["full_attention", "sliding_attention"] * 2), 40),
  "mistral_sliding_window": ("mistral", dict(sliding_window=8), 40),
  "mistral_no_window_head_dim": ("mistral", dict(sliding_window=None, head_dim=24), 40),
  "mixtral_top2": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), 40),
  "mixtral_top1_window": ("mixtral", dict(num_local_experts=3, num_experts_per_tok=1,
                                          sliding_window=8), 40),
  # Qwen3: q/k RMSNorm, explicit head_dim
  "qwen3_tied_head_dim": ("qwen3", dict(tie_word_embeddings=True, head_dim=32), 40),
  "qwen3_untied_bias": ("qwen3", dict(attention_bias=True, head_dim=8), 40),
  "qwen3_alternating_windows": ("qwen3", dict(
      use_sliding_window=True, sliding_window=8, num_hidden_layers=4,
      layer_types=["full_attention", "sliding_attention"] * 2), 40),
  # Qwen3-MoE: routing with and without renormalised top-k, top-1, sparse steps
  "qwen3_moe_topk_norm": ("qwen3_moe", dict(**QWEN3_MOE, norm_topk_prob=True), 40),
  "qwen3_moe_topk_raw": ("qwen3_moe", dict(**QWEN3_MOE, norm_topk_prob=False), 40),
  "qwen3_moe_top1_raw": ("qwen3_moe", dict(QWEN3_MOE, num_experts_per_tok=1,
                                           norm_topk_prob=False), 40),
  "qwen3_moe_sparse_step": ("qwen3_moe", dict(QWEN3_MOE, num_hidden_layers=4,
                                              decoder_sparse_step=2), 40),
  "qwen3_moe_mlp_only_layers": ("qwen3_moe", dict(QWEN3_MOE, num_hidden_layers=4,
                                                  decoder_sparse_step=2,
                                                  mlp_only_layers=[3]), 40),
  # Llama 4: chunks shorter than the sequence, NoPE layers with temperature tuning that moves
  # values at these lengths (floor_scale 4), MoE on every layer or every second one
  "llama4_interleave1": ("llama4", dict(**LLAMA4), 40),
  "llama4_interleave2_top2_no_qk_norm": ("llama4", dict(
      LLAMA4, interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False), 40),
  "llama4_scaled_rope_8_layers": ("llama4", dict(
      LLAMA4, num_hidden_layers=8, interleave_moe_layer_step=2, rope_parameters={
          "rope_theta": 500000.0, **LLAMA3_ROPE}), 48),
}


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, layout, save_hf):
  family, overrides, length = VARIANTS[variant]
  ref_model = hf_model(family, **overrides)
  x = tokens(length=length)
  ref = hf_logits(ref_model, x)
  if layout == "scanned" and scan_period(load_config(save_hf(ref_model))) is None:
    # layers that differ without a repeating group cannot be scanned (zoo train runs them
    # unrolled, with a note)
    with pytest.raises(ZooError, match="do not repeat"):
      zoo.load(save_hf(ref_model), scan_layers=True)
    return
  model = zoo.load(save_hf(ref_model), scan_layers=layout == "scanned")
  assert hasattr(model, "stack") == (layout == "scanned")
  ours = model.logits(x)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert np.abs(ref).max() > 1.0  # logits of a real size, so the bound below means something
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_mixtral_routing_matches_transformers(impl, save_hf):
  """Both expert implementations route exactly like transformers, including which experts win."""
  ref_model = hf_model("mixtral", num_local_experts=8, num_experts_per_tok=2)
  x = tokens(length=32)
  ours = zoo.load(save_hf(ref_model), moe_impl=impl).logits(x)
  np.testing.assert_allclose(ours, hf_logits(ref_model, x), atol=1e-4, rtol=1e-5)


def test_bfloat16_compute_tracks_float32(save_hf):
  """f32 params with bf16 compute, and bf16 everywhere, stay near the f32 logits."""
  path = save_hf(hf_model("llama"))
  x = tokens(length=32)
  exact = zoo.load(path).logits(x)
  for param_dtype in ("float32", "bfloat16"):
    model = zoo.load(path, dtype="bfloat16", param_dtype=param_dtype)
    leaf = model.layers[0].self_attn.q_proj.kernel
    assert leaf[...].dtype.name == param_dtype
    approx = model.logits(x)
    err = np.abs(approx - exact).max() / np.abs(exact).max()
    assert 0 < err < 0.05, err


# Each new mechanism switched off in zoo (same weights) moves the logits far past the tolerance
# of the parity test above: none of them passes by accident.
MUTATIONS = [
  ("qwen3_tied_head_dim", dict(qk_norm=None)),
  ("llama4_interleave1", dict(qk_norm=None)),
  ("llama4_interleave1", dict(attn_temperature_tuning=False)),
  ("llama4_interleave1", dict(layer_types=None, attention_chunk_size=None)),
  ("llama4_interleave1", dict(rope_interleaved=False)),
  ("llama4_interleave1", dict(no_rope_layers=())),
  ("llama4_interleave1", dict(shared_expert=False)),
  ("llama4_interleave2_top2_no_qk_norm", dict(router="softmax")),
  ("qwen3_moe_topk_norm", dict(norm_topk_prob=False)),
  ("qwen3_moe_topk_raw", dict(norm_topk_prob=True)),
]


@pytest.mark.parametrize("variant,change", MUTATIONS)
def test_each_new_mechanism_changes_the_logits(variant, change, save_hf):
  family, overrides, length = VARIANTS[variant]
  ref_model = hf_model(family, **overrides)
  x = tokens(length=length)
  ckpt = Checkpoint(save_hf(ref_model))
  config = ckpt.config.replace(**change)
  shapes = param_shapes(config)
  params = {k: v for k, v in ckpt.params().items() if k in shapes}
  ours = from_params(config, params).logits(x)
  assert np.abs(ours - hf_logits(ref_model, x)).max() > 1e-2


@pytest.mark.parametrize("family,overrides", [
  ("qwen3_moe", dict(QWEN3_MOE, num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False)),
  ("qwen3_moe", dict(QWEN3_MOE, norm_topk_prob=True)),
  ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
])
def test_router_aux_loss_matches_transformers(family, overrides, save_hf):
  """The load-balancing loss joins the objective as transformers adds it (router_aux_loss_coef
  with output_router_logits), and its gradient is the same through every remat."""
  import jax
  import torch
  from zoo.train.step import batch_loss_sums
  from flax import nnx
  coef = 0.5
  ref = hf_model(family, **overrides, output_router_logits=True, router_aux_loss_coef=coef)
  x = tokens(length=24)
  with torch.no_grad():
    out = ref(torch.as_tensor(x), labels=torch.as_tensor(x))
  assert float(out.aux_loss) > 1.0  # E * sum f P: 1 when perfectly balanced
  b, t = x.shape
  batch = {"tokens": x, "targets": np.concatenate([x[:, 1:], x[:, :1]], axis=1),
           "positions": np.broadcast_to(np.arange(t), (b, t)),
           "segment_ids": np.ones((b, t), np.int32),
           "weights": np.concatenate([np.ones((b, t - 1)), np.zeros((b, 1))], axis=1)}
  batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  path = save_hf(ref)
  grads = []
  for remat in ("none", "full", "dots"):
    graphdef, params = nnx.split(zoo.load(path, remat=remat))
    params = params.to_pure_dict()

    def objective(p):
      total, _, weight = batch_loss_sums(graphdef, p, batch, router_aux=coef)
      return total / weight

    value, grad = jax.value_and_grad(objective)(params)
    np.testing.assert_allclose(value, float(out.loss), rtol=1e-5)
    grads.append(jax.tree.leaves(grad))
  for other in grads[1:]:
    for a, c in zip(grads[0], other):
      np.testing.assert_allclose(a, c, atol=1e-5)
