"""Shared fixtures: tiny random HF transformers models saved to disk, as the reference."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_CLASSES = {
  "llama": ("LlamaConfig", "LlamaForCausalLM"),
  "mistral": ("MistralConfig", "MistralForCausalLM"),
  "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def randomize(model, std: float = 0.1, seed: int = 0):
  """Every parameter ~ N(0, std), norms ~ 1 + N(0, std): at HF's 0.02 init a wrong q/k layout or
  a swapped norm could hide under the tolerance."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
  return model


def hf_model(family: str = "llama", seed: int = 0, **overrides):
  """A tiny random transformers model of `family` in float32, eval mode."""
  config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
  config = config_cls(**{**TINY, **overrides})
  torch.manual_seed(seed)
  return randomize(model_cls(config), seed=seed).eval()


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def tokens(batch=2, length=40, vocab=128, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


@pytest.fixture
def save_hf(tmp_path):
  """save_hf(model, name="hf", **save_kwargs) -> directory with the saved model."""
  def save(model, name="hf", **kwargs):
    path = tmp_path / name
    model.save_pretrained(path, **kwargs)
    return str(path)
  return save
