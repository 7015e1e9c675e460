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


def _qwen3(d, f, layers, heads, *, tied, kv=8):
  return LlamaConfig(family="qwen3", vocab_size=151936, hidden_size=d, intermediate_size=f,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
                     tie_word_embeddings=tied, qk_norm="rms", bos_token_id=151643,
                     eos_token_id=151643)


def _qwen3_moe(d, moe_f, layers, heads):
  return LlamaConfig(family="qwen3_moe", vocab_size=151936, hidden_size=d,
                     intermediate_size=3 * d, num_layers=layers, num_heads=heads, num_kv_heads=4,
                     head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1e6, qk_norm="rms", num_experts=128, num_experts_per_tok=8,
                     moe_intermediate_size=moe_f, norm_topk_prob=True, bos_token_id=151643,
                     eos_token_id=151645)


def _llama4(*, experts, moe_step, max_len, qk_norm, scaling=None):
  layers = 48
  return LlamaConfig(family="llama4", vocab_size=202048, hidden_size=5120,
                     intermediate_size=16384, moe_intermediate_size=8192, num_layers=layers,
                     num_heads=40, num_kv_heads=8, head_dim=128, max_position_embeddings=max_len,
                     rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=scaling,
                     rope_interleaved=True, qk_norm="l2" if qk_norm else None,
                     num_experts=experts, num_experts_per_tok=1, router="sigmoid",
                     shared_expert=True,
                     moe_layers=(None if moe_step == 1 else
                                 tuple(range(moe_step - 1, layers, moe_step))),
                     no_rope_layers=tuple(range(3, layers, 4)),
                     layer_types=tuple("full_attention" if i % 4 == 3 else "chunked_attention"
                                       for i in range(layers)),
                     attention_chunk_size=8192, attn_temperature_tuning=True,
                     floor_scale=8192.0, attn_scale=0.1, bos_token_id=200000,
                     eos_token_id=(200001, 200007, 200008))


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
  # Qwen3 (Qwen/Qwen3-0.6B-Base ... Qwen3-14B-Base, Qwen/Qwen3-32B): q/k RMSNorm, head_dim 128
  "qwen3_0_6b": _qwen3(1024, 3072, 28, 16, tied=True),
  "qwen3_1_7b": _qwen3(2048, 6144, 28, 16, tied=True),
  "qwen3_4b": _qwen3(2560, 9728, 36, 32, tied=True),
  "qwen3_8b": _qwen3(4096, 12288, 36, 32, tied=False),
  "qwen3_14b": _qwen3(5120, 17408, 40, 40, tied=False),
  "qwen3_32b": _qwen3(5120, 25600, 64, 64, tied=False),
  # Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B): 128 experts, top 8
  "qwen3_30b_a3b": _qwen3_moe(2048, 768, 48, 32),
  "qwen3_235b_a22b": _qwen3_moe(4096, 1536, 94, 64),
  # Llama 4 (meta-llama/Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E: their text_config)
  "llama4_scout_17b_16e": _llama4(experts=16, moe_step=1, max_len=10485760, qk_norm=True,
                                  scaling=llama3_scaling(16.0)),
  "llama4_maverick_17b_128e": _llama4(experts=128, moe_step=2, max_len=1048576, qk_norm=False),
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
  "tiny_qwen3": LlamaConfig(family="qwen3", vocab_size=512, hidden_size=64, intermediate_size=160,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qk_norm="rms",
                            max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e6,
                            tie_word_embeddings=True),
  "tiny_qwen3_moe": LlamaConfig(family="qwen3_moe", vocab_size=512, hidden_size=64,
                                intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                                head_dim=32, qk_norm="rms", num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=48, norm_topk_prob=True,
                                max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e6),
  "tiny_llama4": LlamaConfig(family="llama4", vocab_size=512, hidden_size=64,
                             intermediate_size=160, moe_intermediate_size=64, num_layers=4,
                             num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                             rope_theta=500000.0, rope_interleaved=True, qk_norm="l2",
                             num_experts=4, num_experts_per_tok=1, router="sigmoid",
                             shared_expert=True, moe_layers=(1, 3), no_rope_layers=(3,),
                             layer_types=("chunked_attention",) * 3 + ("full_attention",),
                             attention_chunk_size=16, attn_temperature_tuning=True,
                             floor_scale=4.0, attn_scale=0.1),
}


def get_preset(name: str, **overrides) -> LlamaConfig:
  """The preset `name`, with any fields replaced by `overrides`."""
  if name not in PRESETS:
    raise ZooError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


__all__ = ["PRESETS", "get_preset", "RopeScaling"]
