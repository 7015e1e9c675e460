"""HF <-> zoo conversion: exact round trips, transformers reading our export, input variants."""

import json
import os

import ml_dtypes  # noqa: F401  (lets safetensors' numpy reader return bfloat16)
import numpy as np
import pytest

import zoo
from tests.helpers import assert_same_tensors, hf_tensors, tokens
from tests.references import hf_logits, hf_model
from zoo.cli import main
from zoo.convert import Checkpoint, convert
from zoo.convert.hf import config_from_hf
from zoo.models.llama import params_of

# the references this module checks against; without them it is skipped
torch = pytest.importorskip("torch")
AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM

ROUND_TRIP = {
  "llama": ("llama", dict()),
  "llama3_tied": ("llama", dict(tie_word_embeddings=True, rope_parameters={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
  "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
  "mistral": ("mistral", dict(sliding_window=8)),
  "mixtral": ("mixtral", dict(num_local_experts=4)),
  "qwen3": ("qwen3", dict(head_dim=32, use_sliding_window=True, sliding_window=8,
                          max_window_layers=1)),
  "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                  num_hidden_layers=3, mlp_only_layers=[1],
                                  norm_topk_prob=True)),
  "llama4": ("llama4", dict(num_hidden_layers=4, intermediate_size=48, intermediate_size_mlp=96,
                            num_local_experts=4, interleave_moe_layer_step=2,
                            attention_chunk_size=16, floor_scale=4)),
}


@pytest.mark.parametrize("variant", sorted(ROUND_TRIP))
def test_hf_zoo_hf_is_bit_identical_and_loads_in_transformers(variant, save_hf, tmp_path):
  family, overrides = ROUND_TRIP[variant]
  ref_model = hf_model(family, **overrides)
  src = save_hf(ref_model)
  convert(src, str(tmp_path / "zoo"), "zoo")
  convert(str(tmp_path / "zoo"), str(tmp_path / "back"), "hf")
  assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "back"))
  # transformers loads the export and computes the same logits as the original model.
  x = tokens(length=40)
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
  assert type(reloaded) is type(ref_model)
  np.testing.assert_array_equal(hf_logits(reloaded.eval(), x), hf_logits(ref_model, x))
  # and zoo reads both sides of the conversion to the same logits as transformers.
  np.testing.assert_allclose(zoo.load(str(tmp_path / "zoo")).logits(x), hf_logits(ref_model, x),
                             atol=1e-4, rtol=1e-5)
  with open(tmp_path / "back" / "config.json") as f:
    assert config_from_hf(json.load(f)) == Checkpoint(src).config


@pytest.mark.parametrize("preset", ["tiny_llama3", "tiny_mixtral", "tiny_qwen2", "tiny_mistral",
                                    "tiny_qwen3", "tiny_qwen3_moe", "tiny_llama4"])
def test_zoo_hf_zoo_is_bit_identical(preset, tmp_path):
  main(["init", preset, str(tmp_path / "zoo"), "--std", "0.1", "--dtype", "bfloat16"])
  convert(str(tmp_path / "zoo"), str(tmp_path / "hf"), "hf")
  convert(str(tmp_path / "hf"), str(tmp_path / "back"), "zoo")
  first, second = Checkpoint(str(tmp_path / "zoo")), Checkpoint(str(tmp_path / "back"))
  assert first.config == second.config
  assert_same_tensors(first.params(), second.params())
  # the in-memory trees of the loaded models agree as well
  a = params_of(zoo.load(str(tmp_path / "zoo"), dtype="bfloat16"))
  b = params_of(zoo.load(str(tmp_path / "back"), dtype="bfloat16"))
  assert_same_tensors({k: np.asarray(v) for k, v in a.items()},
                      {k: np.asarray(v) for k, v in b.items()})


def test_sharded_input_and_sharded_output(save_hf, tmp_path):
  ref_model = hf_model("mixtral", num_local_experts=4)
  src = save_hf(ref_model, max_shard_size="40KB")
  assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
  assert len([n for n in os.listdir(src) if n.endswith(".safetensors")]) > 3
  convert(src, str(tmp_path / "zoo"), "zoo", max_shard_bytes=50_000)
  assert os.path.exists(tmp_path / "zoo" / "model.safetensors.index.json")
  x = tokens(length=24)
  np.testing.assert_allclose(zoo.load(str(tmp_path / "zoo")).logits(x), hf_logits(ref_model, x),
                             atol=1e-4, rtol=1e-5)
  convert(str(tmp_path / "zoo"), str(tmp_path / "back"), "hf", max_shard_bytes=30_000)
  assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "back"))
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
  np.testing.assert_array_equal(hf_logits(reloaded, x), hf_logits(ref_model, x))


def test_bfloat16_input(save_hf, tmp_path):
  ref_model = hf_model("llama").to(torch.bfloat16)
  src = save_hf(ref_model)
  convert(src, str(tmp_path / "zoo"), "zoo")
  params = Checkpoint(str(tmp_path / "zoo")).params()
  assert params["layers.1.self_attn.q_proj.kernel"].dtype.name == "bfloat16"
  want = ref_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["layers.1.self_attn.q_proj.kernel"].astype(np.float32),
                                want)
  # The reference reloads the bf16 weights in float32 (a model cast with .to() would keep its
  # rotary frequencies rounded to bf16).
  reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
  x = tokens(length=32)
  np.testing.assert_allclose(zoo.load(str(tmp_path / "zoo")).logits(x), hf_logits(reference, x),
                             atol=1e-4, rtol=1e-5)
  # --dtype float32 on the way back widens exactly
  convert(str(tmp_path / "zoo"), str(tmp_path / "f32"), "hf", dtype="float32")
  assert hf_tensors(tmp_path / "f32")["model.layers.1.self_attn.q_proj.weight"].dtype == np.float32


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_input(sharded, save_hf, tmp_path):
  ref_model = hf_model("qwen2")
  src = save_hf(ref_model)
  for name in os.listdir(src):
    if name.endswith(".safetensors"):
      os.remove(os.path.join(src, name))
  state = ref_model.state_dict()
  if sharded:
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
      torch.save({k: state[k] for k in keys}, os.path.join(src, file))
    with open(os.path.join(src, "pytorch_model.bin.index.json"), "w") as f:
      json.dump({"weight_map": {k: file for file, keys in halves.items() for k in keys}}, f)
  else:
    torch.save(state, os.path.join(src, "pytorch_model.bin"))
  convert(src, str(tmp_path / "zoo"), "zoo")
  x = tokens(length=32)
  np.testing.assert_allclose(zoo.load(str(tmp_path / "zoo")).logits(x), hf_logits(ref_model, x),
                             atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(zoo.load(src).logits(x), hf_logits(ref_model, x), atol=1e-4,
                             rtol=1e-5)


def test_transformers_4x_config_layout_reads_the_same(save_hf):
  """A config.json written by transformers 4.x (rope_theta + rope_scaling with "type")."""
  src = save_hf(hf_model("llama", rope_parameters={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64, "rope_theta": 500000.0}))
  with open(os.path.join(src, "config.json")) as f:
    v5 = json.load(f)
  v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
  v4["rope_theta"] = 500000.0
  v4["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  assert config_from_hf(v4) == config_from_hf(v5)
  assert config_from_hf(v5).rope_scaling.factor == 8.0


def test_side_files_travel_with_the_weights(save_hf, tmp_path):
  src = save_hf(hf_model("llama"))
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    with open(os.path.join(src, name), "w") as f:
      f.write('{"made_by": "test"}')
  convert(src, str(tmp_path / "zoo"), "zoo")
  convert(str(tmp_path / "zoo"), str(tmp_path / "back"), "hf")
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    with open(tmp_path / "back" / name) as f:
      assert f.read() == '{"made_by": "test"}'


def _llama4_multimodal(tmp_path, text_model):
  """A Llama 4 checkpoint in the official layout (Llama4ForConditionalGeneration): the
  language model of `text_model` beside a (tiny) vision tower and projector."""
  from safetensors.torch import save_file
  config = text_model.config.to_dict()
  tensors = {"language_model." + k: v.contiguous() for k, v in text_model.state_dict().items()}
  g = torch.Generator().manual_seed(1)
  tensors["vision_model.patch_embedding.linear.weight"] = torch.randn(16, 48, generator=g)
  tensors["multi_modal_projector.linear_1.weight"] = torch.randn(64, 16, generator=g)
  path = tmp_path / "llama4_mm"
  path.mkdir()
  save_file(tensors, str(path / "model.safetensors"))
  with open(path / "config.json", "w") as f:
    json.dump({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
               "text_config": config, "vision_config": {"hidden_size": 16}}, f)
  return path


def test_llama4_multimodal_checkpoint_converts_its_language_model(save_hf, tmp_path, capsys):
  ref_model = hf_model("llama4", **ROUND_TRIP["llama4"][1])
  src = _llama4_multimodal(tmp_path, ref_model)
  assert main(["convert", str(src), str(tmp_path / "zoo"), "--to", "zoo"]) == 0
  out = capsys.readouterr().out
  assert "left out 2 tensors of the vision tower" in out
  x = tokens(length=40)
  np.testing.assert_allclose(zoo.load(str(tmp_path / "zoo")).logits(x), hf_logits(ref_model, x),
                             atol=1e-4, rtol=1e-5)
  # out again as a text-only model that transformers loads as Llama4ForCausalLM
  convert(str(tmp_path / "zoo"), str(tmp_path / "text"), "hf")
  assert_same_tensors(hf_tensors(save_hf(ref_model)), hf_tensors(tmp_path / "text"))


@pytest.mark.parametrize("case", ["moe_count", "moe_missing", "meta_qwen3", "unknown_arch"])
def test_moe_layouts_the_config_contradicts_are_refused(case, save_hf, tmp_path, capsys):
  ref_model = hf_model("qwen3_moe", **ROUND_TRIP["qwen3_moe"][1])
  src = save_hf(ref_model)
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  to, expected, expected_too = "zoo", None, ""
  if case == "moe_count":  # the file holds 4 experts per layer, the config says 6
    config["num_experts"] = 6
    expected = "model.layers.0.mlp.gate.weight in"
    expected_too = "has shape (4, 64), but config implies (6, 64)"
  elif case == "moe_missing":  # the config says layer 1 is sparse, the file has a dense MLP
    config["mlp_only_layers"] = []
    expected = "model.layers.1.mlp.down_proj.weight, which a qwen3_moe model"
  elif case == "meta_qwen3":
    to, expected = "meta", "Meta's checkpoint format cannot express the qwen3_moe architecture"
  else:
    config["architectures"] = ["Qwen3MoeForSequenceClassification"]
    expected = "unsupported architecture 'Qwen3MoeForSequenceClassification'"
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  capsys.readouterr()
  assert main(["convert", src, str(tmp_path / "out"), "--to", to]) != 0
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and expected in err and expected_too in err, err
  assert not (tmp_path / "out").exists()
