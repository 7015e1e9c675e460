"""Architecture presets: every public size of the supported families, plus tiny debug models.

Each entry names the public checkpoint whose config.json it mirrors. Look one up with
`get_preset(name)`; `PRESETS` maps names to `LlamaConfig`s.
"""

from __future__ import annotations

from zoo.errors import ZooError
from zoo.models.config import LlamaConfig, RopeScaling, llama3_scaling


def _llama1(d, f, layers, heads, *, eps=1e-6):
  return LlamaConfig(vocab_size=32000, hidden_size=d, intermediate_size=f, num_layers=layers,
                     num_heads=heads, num_kv_heads=heads, max_position_embeddings=2048,
                     rms_norm_eps=eps, bos_token_id=1, eos_token_id=2)


def _llama2(d, f, layers, heads, kv):
  return LlamaConfig(vocab_size=32000, hidden_size=d, intermediate_size=f, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, max_position_embeddings=4096,
                     rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def _llama3(d, f, layers, heads, *, max_len=8192, scaling=None, tied=False, head_dim=None,
            eos=128001):
  return LlamaConfig(vocab_size=128256, hidden_size=d, intermediate_size=f, num_layers=layers,
                     num_heads=heads, num_kv_heads=8, head_dim=head_dim,
                     max_position_embeddings=max_len, rms_norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling=scaling, tie_word_embeddings=tied,
                     bos_token_id=128000, eos_token_id=eos)


def _codellama(d, f, layers, heads, kv, vocab=32016):
  return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, max_position_embeddings=16384,
                     rms_norm_eps=1e-5, rope_theta=1e6, bos_token_id=1, eos_token_id=2)


def _mistral(vocab=32000, theta=1e6, window=None, d=4096, layers=32, max_len=32768,
             head_dim=None):
  return LlamaConfig(family="mistral", vocab_size=vocab, hidden_size=d, intermediate_size=14336,
                     num_layers=layers, num_heads=32, num_kv_heads=8, head_dim=head_dim,
                     max_position_embeddings=max_len, rms_norm_eps=1e-5, rope_theta=theta,
                     sliding_window=window, bos_token_id=1, eos_token_id=2)


def _mixtral(d, f, layers, heads, vocab, max_len):
  return LlamaConfig(family="mixtral", vocab_size=vocab, hidden_size=d, intermediate_size=f,
                     num_layers=layers, num_heads=heads, num_kv_heads=8, num_experts=8,
                     num_experts_per_tok=2, max_position_embeddings=max_len, rms_norm_eps=1e-5,
                     rope_theta=1e6, bos_token_id=1, eos_token_id=2)


def _qwen2(d, f, layers, heads, kv, *, tied, vocab=151936, max_len=32768, eps=1e-6):
  return LlamaConfig(family="qwen2", vocab_size=vocab, hidden_size=d, intermediate_size=f,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     max_position_embeddings=max_len, rms_norm_eps=eps, rope_theta=1e6,
                     tie_word_embeddings=tied, qkv_bias=True, bos_token_id=151643,
                     eos_token_id=151643)


PRESETS: dict[str, LlamaConfig] = {
  # LLaMA 1 (huggyllama/llama-7b ... llama-65b)
  "llama1_7b": _llama1(4096, 11008, 32, 32),
  "llama1_13b": _llama1(5120, 13824, 40, 40),
  "llama1_33b": _llama1(6656, 17920, 60, 52),
  "llama1_65b": _llama1(8192, 22016, 80, 64, eps=1e-5),
  # LLaMA 2 (meta-llama/Llama-2-7b-hf ... Llama-2-70b-hf)
  "llama2_7b": _llama2(4096, 11008, 32, 32, 32),
  "llama2_13b": _llama2(5120, 13824, 40, 40, 40),
  "llama2_70b": _llama2(8192, 28672, 80, 64, 8),
  # LLaMA 3 (meta-llama/Meta-Llama-3-8B, Meta-Llama-3-70B)
  "llama3_8b": _llama3(4096, 14336, 32, 32),
  "llama3_70b": _llama3(8192, 28672, 80, 64),
  # LLaMA 3.1 (meta-llama/Llama-3.1-8B, -70B, -405B)
  "llama3_1_8b": _llama3(4096, 14336, 32, 32, max_len=131072, scaling=llama3_scaling(8.0)),
  "llama3_1_70b": _llama3(8192, 28672, 80, 64, max_len=131072, scaling=llama3_scaling(8.0)),
  "llama3_1_405b": _llama3(16384, 53248, 126, 128, max_len=131072,
                           scaling=llama3_scaling(8.0)),
  # LLaMA 3.2 (meta-llama/Llama-3.2-1B, -3B): tied embeddings
  "llama3_2_1b": _llama3(2048, 8192, 16, 32, max_len=131072, scaling=llama3_scaling(32.0),
                         tied=True, head_dim=64),
  "llama3_2_3b": _llama3(3072, 8192, 28, 24, max_len=131072, scaling=llama3_scaling(32.0),
                         tied=True, head_dim=128),
  # LLaMA 3.3 (meta-llama/Llama-3.3-70B-Instruct): an instruct checkpoint, three eos ids
  "llama3_3_70b": _llama3(8192, 28672, 80, 64, max_len=131072, scaling=llama3_scaling(8.0),
                          eos=(128001, 128008, 128009)),
  # CodeLlama (codellama/CodeLlama-7b-hf ... CodeLlama-70b-hf)
  "codellama_7b": _codellama(4096, 11008, 32, 32, 32),
  "codellama_13b": _codellama(5120, 13824, 40, 40, 40),
  "codellama_34b": _codellama(8192, 22016, 48, 64, 8, vocab=32000),
  "codellama_70b": _codellama(8192, 28672, 80, 64, 8),
  # TinyLlama (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T)
  "tinyllama_1_1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                num_layers=22, num_heads=32, num_kv_heads=4,
                                max_position_embeddings=2048, rms_norm_eps=1e-5,
                                bos_token_id=1, eos_token_id=2),
  # Mistral (mistralai/Mistral-7B-v0.1 with its 4096 sliding window; v0.3; Mistral-Nemo-Base-2407)
  "mistral_7b": _mistral(theta=10000.0, window=4096),
  "mistral_7b_v0_3": _mistral(vocab=32768),
  "mistral_nemo_12b": _mistral(vocab=131072, d=5120, layers=40, max_len=1024000, head_dim=128),
  # Mixtral (mistralai/Mixtral-8x7B-v0.1, Mixtral-8x22B-v0.1)
  "mixtral_8x7b": _mixtral(4096, 14336, 32, 32, 32000, 32768),
  "mixtral_8x22b": _mixtral(6144, 16384, 56, 48, 32000, 65536),
  # Qwen2 (Qwen/Qwen2-0.5B ... Qwen2-72B)
  "qwen2_0_5b": _qwen2(896, 4864, 24, 14, 2, tied=True, max_len=131072),
  "qwen2_1_5b": _qwen2(1536, 8960, 28, 12, 2, tied=True, max_len=131072),
  "qwen2_7b": _qwen2(3584, 18944, 28, 28, 4, tied=False, vocab=152064, max_len=131072),
  "qwen2_72b": _qwen2(8192, 29568, 80, 64, 8, tied=False, vocab=152064, max_len=131072,
                      eps=1e-5),
  # Qwen2.5 (Qwen/Qwen2.5-0.5B ... Qwen2.5-72B)
  "qwen2_5_0_5b": _qwen2(896, 4864, 24, 14, 2, tied=True),
  "qwen2_5_1_5b": _qwen2(1536, 8960, 28, 12, 2, tied=True, max_len=131072),
  "qwen2_5_3b": _qwen2(2048, 11008, 36, 16, 2, tied=True),
  "qwen2_5_7b": _qwen2(3584, 18944, 28, 28, 4, tied=False, vocab=152064, max_len=131072),
  "qwen2_5_14b": _qwen2(5120, 13824, 48, 40, 8, tied=False, vocab=152064, max_len=131072,
                        eps=1e-5),
  "qwen2_5_32b": _qwen2(5120, 27648, 64, 40, 8, tied=False, vocab=152064, max_len=131072,
                        eps=1e-5),
  "qwen2_5_72b": _qwen2(8192, 29568, 80, 64, 8, tied=False, vocab=152064, max_len=131072,
                        eps=1e-5),
  # Tiny debug models: every code path of the family at a size a CPU test runs in seconds.
  "tiny_llama": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                            num_heads=4, num_kv_heads=2, max_position_embeddings=256),
  "tiny_llama3": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                             num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=500000.0,
                             max_position_embeddings=1024, tie_word_embeddings=True,
                             rope_scaling=llama3_scaling(8.0, original=128)),
  "tiny_mistral": LlamaConfig(family="mistral", vocab_size=512, hidden_size=64,
                              intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=256, sliding_window=16),
  "tiny_mixtral": LlamaConfig(family="mixtral", vocab_size=512, hidden_size=64,
                              intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                              rope_theta=1e6),
  "tiny_qwen2": LlamaConfig(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160,
                            num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True,
                            max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e6,
                            tie_word_embeddings=True),
}


def get_preset(name: str, **overrides) -> LlamaConfig:
  """The preset `name`, with any fields replaced by `overrides`."""
  if name not in PRESETS:
    raise ZooError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


__all__ = ["PRESETS", "get_preset", "RopeScaling"]
