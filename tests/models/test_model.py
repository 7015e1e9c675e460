"""The model tree: presets, logical axis names, and the weight map covering it exactly."""

import math

import numpy as np
import pytest
from flax import nnx

from zoo.convert import hf
from zoo.errors import ZooError
from zoo.models.config import LlamaConfig
from zoo.models.llama import Llama, abstract_model, param_shapes
from zoo.models.presets import PRESETS, get_preset
from zoo.sharding import LOGICAL_AXES, logical_axes


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_tree_matches_weight_map_and_param_count(name):
  config = PRESETS[name]
  shapes = param_shapes(config)  # from the module tree, shape-only
  assert shapes == hf.zoo_shapes(config)
  assert sum(math.prod(s) for s in shapes.values()) == config.num_params()
  assert LlamaConfig.from_dict(config.to_dict()) == config
  assert hf.config_from_hf(hf.config_to_hf(config)) == config.replace(initializer_range=0.02)


@pytest.mark.parametrize("name,billions", [("llama2_7b", 6.74), ("llama3_1_8b", 8.03),
                                           ("llama3_2_1b", 1.24), ("mixtral_8x7b", 46.7),
                                           ("qwen2_5_7b", 7.62), ("tinyllama_1_1b", 1.10),
                                           ("llama2_70b", 68.98), ("mistral_7b", 7.24)])
def test_presets_have_the_published_sizes(name, billions):
  assert PRESETS[name].num_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_every_parameter_has_logical_axis_names():
  for preset in ("tiny_llama", "tiny_mixtral", "tiny_qwen2"):
    axes = logical_axes(abstract_model(get_preset(preset)))
    for name, names in axes.items():
      shape = param_shapes(get_preset(preset))[name]
      assert len(names) == len(shape), name
      assert set(names) <= set(LOGICAL_AXES) | {None}, name
    assert axes["embed_tokens.embedding"] == ("vocab", "embed")
    assert axes["layers.0.self_attn.k_proj.kernel"] == ("embed", "kv_heads")


def test_bad_configs_are_refused():
  with pytest.raises(ZooError, match="multiple of num_kv_heads"):
    get_preset("tiny_llama", num_kv_heads=3)
  with pytest.raises(ZooError, match="unknown model preset"):
    get_preset("llama9_1t")
  with pytest.raises(ZooError, match="unknown field 'hiden_size'"):
    LlamaConfig.from_dict({**get_preset("tiny_llama").to_dict(), "hiden_size": 3})


def test_logits_reject_bad_tokens():
  model = Llama(get_preset("tiny_llama"), rngs=nnx.Rngs(0))
  with pytest.raises(ZooError, match="token ids"):
    model.logits(np.array([[1, 512]]))
  with pytest.raises(ZooError, match="exceeds the model's maximum"):
    model.logits(np.zeros((1, 257), np.int32))
  with pytest.raises(ZooError, match="integer array"):
    model.logits(np.zeros((3,)))
