"""config.json files holding both the transformers 4.x and 5.x form of a field are read as
transformers 5.x reads them: each case makes the two forms disagree, so reading the wrong one
changes the logits."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import zoo  # noqa: E402
from tests.helpers import tokens  # noqa: E402
from tests.references import hf_logits, hf_model  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# case: (family, fields written into config.json over the saved model's own)
CASES = {
  # a non-empty rope_scaling replaces rope_parameters, theta and all
  "rope_scaling_over_rope_parameters": ("llama", dict(
      rope_scaling={"rope_type": "linear", "factor": 4.0},
      rope_parameters={**LLAMA3, "rope_theta": 500000.0}, rope_theta=20000.0)),
  # a null rope_scaling leaves rope_parameters in force
  "null_rope_scaling": ("llama", dict(
      rope_scaling=None, rope_parameters={**LLAMA3, "rope_theta": 500000.0},
      rope_theta=20000.0)),
  # the theta inside rope_parameters wins over the top-level rope_theta
  "theta_inside_over_top_level": ("llama", dict(
      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rope_theta=10000.0)),
  # without one inside, the top-level rope_theta is the theta
  "top_level_theta": ("llama", dict(
      rope_parameters={"rope_type": "linear", "factor": 2.0}, rope_theta=300.0)),
  # rope_type wins over the older type
  "rope_type_over_type": ("llama", dict(
      rope_scaling={"type": "dynamic", "rope_type": "linear", "factor": 4.0})),
  # partial_rotary_factor inside the rope dict wins over the top-level one (read the other way,
  # zoo would refuse the file: it has no partial rotary embeddings)
  "partial_rotary_inside": ("llama", dict(
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                       "partial_rotary_factor": 1.0}, partial_rotary_factor=0.5)),
  # Qwen2: explicit layer_types win over use_sliding_window + max_window_layers
  "qwen2_layer_types": ("qwen2", dict(
      use_sliding_window=True, sliding_window=6, max_window_layers=1,
      layer_types=["sliding_attention", "full_attention"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_layouts_read_as_transformers_5(case, save_hf):
  family, fields = CASES[case]
  directory = save_hf(hf_model(family, max_position_embeddings=256))
  path = f"{directory}/config.json"
  with open(path) as f:
    config = json.load(f)
  config.update(fields)
  with open(path, "w") as f:
    json.dump(config, f)
  x = tokens(length=48)
  reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  expected = hf_logits(reference.eval(), x)
  # the two layouts really disagree: the model as saved (before the edit) computes otherwise
  assert case == "partial_rotary_inside" or not np.allclose(expected, hf_logits(hf_model(family, max_position_embeddings=256), x),
                         atol=1e-3)
  np.testing.assert_allclose(zoo.load(directory).logits(x), expected, atol=1e-4, rtol=1e-5)
