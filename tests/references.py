"""The independent references: tiny random transformers models, their logits and greedy
generation, and a tokenizer transformers reads. Importing this module skips the importing test
module where torch or transformers is missing."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_CLASSES = {
  "llama": ("LlamaConfig", "LlamaForCausalLM"),
  "mistral": ("MistralConfig", "MistralForCausalLM"),
  "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
  "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
  "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
  "llama4": ("Llama4TextConfig", "Llama4ForCausalLM"),
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


def hf_greedy(model, prompt, n):
  ids = torch.tensor([prompt])
  out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
WORDS = [f"w{i}" for i in range(120)]


def with_tokenizer(directory: str) -> transformers.PreTrainedTokenizerFast:
  """Writes a word-level tokenizer (ids 0..127: <unk> <s> </s> <pad>, role tags, w0..w119)
  and a chat template beside the weights; returns transformers' view of it."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  specials = ["<unk>", "<s>", "</s>", "<pad>", "<user>", "<assistant>", "<system>", "<x>"]
  vocab = {t: i for i, t in enumerate(specials + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  tok.add_special_tokens(specials)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    pad_token="<pad>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(directory)
  return fast
