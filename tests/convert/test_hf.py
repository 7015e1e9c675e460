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
                             atol=1e-4, rtol=0)
  with open(tmp_path / "back" / "config.json") as f:
    assert config_from_hf(json.load(f)) == Checkpoint(src).config


@pytest.mark.parametrize("preset", ["tiny_llama3", "tiny_mixtral", "tiny_qwen2", "tiny_mistral"])
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
                             atol=1e-4, rtol=0)
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
                             atol=1e-4, rtol=0)
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
                             atol=1e-4, rtol=0)
  assert np.abs(zoo.load(src).logits(x) - hf_logits(ref_model, x)).max() <= 1e-4


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
