"""`zoo convert --verify`: run transformers and zoo on the same random tokens, compare logits."""

from __future__ import annotations

import gguf
import numpy as np

from zoo.convert.checkpoint import load_model
from zoo.convert.gguf import TOLERANCES
from zoo.errors import ZooError


def transformers_logits(hf_dir: str, tokens: np.ndarray, weights_dtype: str = "float32"
                        ) -> np.ndarray:
  """float32 logits of the HF checkpoint at `hf_dir`, computed by transformers in float32 from
  weights rounded to `weights_dtype`."""
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError:
    raise ZooError("--verify needs torch and transformers: pip install 'zoo[test]'") from None
  model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, weights_dtype))
  model.float().eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def compare(hf_dir: str, zoo_path: str, *, weights_dtype: str | None = None, batch: int = 3,
            length: int = 64, seed: int = 0, tolerance: float = 1e-4) -> tuple[float, float]:
  """Max |logit difference| between transformers on `hf_dir` and zoo on `zoo_path`, and the
  allowed difference: `tolerance` times the logits' scale (at least 1).

  Both compute in float32; with `weights_dtype` (a conversion that cast the weights) both first
  round their weights to it, so that the comparison measures the conversion, not the cast.
  """
  weights_dtype = weights_dtype or "float32"
  model = load_model(zoo_path, dtype="float32", param_dtype=weights_dtype)
  length = min(length, model.config.max_position_embeddings)
  tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, length))
  ours = model.logits(tokens)
  ref = transformers_logits(hf_dir, tokens, weights_dtype)
  if ref.shape != ours.shape:
    raise ZooError(f"logit shapes differ: transformers {ref.shape}, zoo {ours.shape}")
  return float(np.max(np.abs(ours - ref))), tolerance * max(1.0, float(np.max(np.abs(ref))))


def llamacpp_logits(gguf_path: str, tokens: list[int], n_threads: int | None = None
                    ) -> np.ndarray:
  """float32 logits [len(tokens), vocab] of the GGUF file, computed by llama.cpp (through
  llama-cpp-python) with a float32 KV cache."""
  try:
    import llama_cpp
  except ImportError:
    raise ZooError("verifying a GGUF file needs llama-cpp-python: pip install "
                   "llama-cpp-python") from None
  f32 = 0  # GGML_TYPE_F32: the cache must not round what zoo keeps in float32
  llm = llama_cpp.Llama(gguf_path, n_ctx=max(len(tokens), 8), n_batch=max(len(tokens), 8),
                        logits_all=True, type_k=f32, type_v=f32, n_threads=n_threads,
                        verbose=False)
  try:
    llm.eval(list(map(int, tokens)))
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)
  finally:
    llm.close()


def compare_gguf(src: str, gguf_path: str, *, length: int = 64, seed: int = 0,
                 tolerance: float | None = None) -> tuple[float, float]:
  """Max |logit difference| between zoo (float32) on the checkpoint `src` and llama.cpp on its
  GGUF export, over one random sequence within the file's context, and the allowed difference:
  `tolerance` (by default the file type's, gguf.TOLERANCES) times the logits' scale."""
  reader = gguf.GGUFReader(gguf_path)
  arch = reader.fields["general.architecture"].contents()
  context = int(reader.fields[f"{arch}.context_length"].contents())
  if tolerance is None:
    tolerance = TOLERANCES[gguf.LlamaFileType(reader.fields["general.file_type"].contents()).name]
  model = load_model(src, dtype="float32")
  length = min(length, context)
  ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, length))
  ours = model.logits(ids)[0]
  ref = llamacpp_logits(gguf_path, ids[0].tolist())
  return float(np.max(np.abs(ours - ref))), tolerance * max(1.0, float(np.max(np.abs(ours))))
