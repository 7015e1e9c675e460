"""GGUF export, checked on llama.cpp itself (llama-cpp-python): logits, greedy generation,
tokenization, and what the file declares.

The llama.cpp tests skip only when llama-cpp-python is not installed; the test extra installs it
(built from source), so CI runs them.
"""

import glob
import importlib.util
import io
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import sentencepiece as spm

import zoo
from zoo.cli import main
from zoo.convert import convert
from zoo.convert.gguf import tiktoken_merges
from zoo.convert.random_init import init_checkpoint
from zoo.data.tokenizers import load_tokenizer, parse_tiktoken_ranks, train_sentencepiece
from zoo.infer.generate import Generator, Sampling

# Meta's llama3 tokenizer file (in the llama_models package): without it the module is skipped
llama_models = pytest.importorskip("llama_models")
LLAMA3_TOKENIZER = os.path.join(os.path.dirname(llama_models.__file__), "llama3",
                                "tokenizer.model")
TEXTS = ["Hello world", "def main():\n    return 42\n", "  two  spaces,\tand a tab\r\n",
         "emoji 🦙🔥 and ünïcödé 中文", "numbers 1234567 and 3.14159", "it's we'll THEY'RE",
         ".:.:.:.: ::::  \n\n\n", "<|begin_of_text|> is plain text here", ""]
LLAMA3_ROPE = ('{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, '
               '"high_freq_factor": 4.0, "original_max_position_embeddings": 64}')


def corpus():
  return [open(p).read() for p in sorted(glob.glob(os.path.join(os.path.dirname(json.__file__),
                                                                "*.py")))]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """SentencePiece models: zoo's own (no dummy prefix, identity normalization) and one trained
  as LLaMA 1/2's was (dummy prefix); and Meta's real LLaMA 3 tiktoken file."""
  d = tmp_path_factory.mktemp("tokenizers")
  train_sentencepiece(corpus(), 512, str(d / "zoo.model"))
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter("".join(corpus()).splitlines()), model_writer=model, vocab_size=480,
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1,
    eos_id=2, minloglevel=2)
  (d / "llama2.model").write_bytes(model.getvalue())
  return {"zoo": str(d / "zoo.model"), "llama2": str(d / "llama2.model"),
          "llama3": LLAMA3_TOKENIZER}


# name: (preset, overrides, tokenizer, sequence length)
VARIANTS = {
  "llama_gqa": ("tiny_llama", {}, "zoo", 96),
  "llama2_mha": ("tiny_llama", {"num_kv_heads": 4}, "llama2", 96),
  # tied, rope theta 5e5, llama3 scaling whose original length (64) the sequence passes
  "llama3_scaled_rope": ("tiny_llama3", {"vocab_size": 128256, "rope_scaling": LLAMA3_ROPE},
                         "llama3", 160),
  "llama_linear_rope": ("tiny_llama", {"rope_scaling": '{"rope_type": "linear", "factor": 4.0}'},
                        "zoo", 96),
  # window longer than the sequence: llama.cpp has no sliding window (see the capping test)
  "mistral": ("tiny_mistral", {"sliding_window": 128}, "zoo", 96),
  "mistral_nemo_head_dim": ("tiny_mistral", {"sliding_window": None, "head_dim": 32}, "zoo", 96),
  "mixtral": ("tiny_mixtral", {}, "zoo", 96),
  "qwen2": ("tiny_qwen2", {}, "zoo", 96),
  "qwen3": ("tiny_qwen3", {}, "zoo", 96),
  "qwen3_moe": ("tiny_qwen3_moe", {}, "zoo", 96),
  # llama.cpp's chunk (8192) and temperature floor (8192), MoE every second layer, NoPE on the
  # fourth; 4 experts, so q/k norms on
  "llama4": ("tiny_llama4", {"attention_chunk_size": 8192, "floor_scale": 8192.0}, "zoo", 96),
}


def parse(overrides):
  return {k: json.loads(v) if isinstance(v, str) and v.startswith("{") else v
          for k, v in overrides.items()}


def make(variant, tokenizers, directory, to="hf"):
  preset, overrides, tokenizer, length = VARIANTS[variant]
  init_checkpoint(preset, str(directory), to=to, std=0.1, seed=1, overrides=parse(overrides))
  shutil.copy(tokenizers[tokenizer], os.path.join(directory, "tokenizer.model"))
  return str(directory), length


def llama(path, n_ctx=256, **kwargs):
  llama_cpp = pytest.importorskip("llama_cpp")
  return llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, type_k=0, type_v=0, n_threads=2,
                         verbose=False, **kwargs)


def hf_tensor(directory, name):
  from safetensors.numpy import load_file
  return load_file(os.path.join(directory, "model.safetensors"))[name]


def pieces(llm, ids) -> str:
  """The text of each token as llama.cpp's vocabulary holds it, joined (llama-cpp-python's own
  detokenize cuts pieces at 32 bytes, and llama.cpp's full detokenizer cleans spaces before
  punctuation for BPE vocabularies, as transformers' clean_up_tokenization_spaces does)."""
  import ctypes
  import llama_cpp
  buf = ctypes.create_string_buffer(1024)
  out = b""
  for i in ids:
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, i, buf, len(buf), 0, False)
    assert n >= 0
    out += buf.raw[:n]
  return out.decode()


def fields(path):
  reader = gguf.GGUFReader(path)
  return reader, {name: f.contents() for name, f in reader.fields.items()}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_llamacpp_logits_and_greedy_ids_match_zoo(variant, tokenizers, tmp_path):
  src, length = make(variant, tokenizers, tmp_path / "hf")
  out = str(tmp_path / "model.gguf")
  convert(src, out, "gguf", dtype="f32")
  model = zoo.load(src)
  ids = np.random.default_rng(0).integers(3, model.config.vocab_size, length).tolist()
  ours = model.logits(np.array([ids]))[0]

  llm = llama(out, logits_all=True)
  llm.eval(ids)
  theirs = np.array(llm.scores[:length])
  scale = np.abs(ours).max()
  assert scale > 1  # random weights at std 0.1 give logits of a few units
  assert np.abs(theirs - ours).max() <= 1e-3 * scale, np.abs(theirs - ours).max()

  prompt = ids[:8]
  ours = Generator(model).generate([prompt], max_new_tokens=32, sampling=Sampling())[0]
  llm.reset()
  theirs = []
  for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
    theirs.append(token)
    if len(theirs) == 32:
      break
  assert theirs == ours


@pytest.mark.slow
def test_llama3_rope_factors_matter(tokenizers, tmp_path):
  """The file without rope_freqs (llama3 scaling dropped) moves llama.cpp's logits far past
  the tolerance: the scaling test above could fail."""
  src, length = make("llama3_scaled_rope", tokenizers, tmp_path / "hf")
  plain = str(tmp_path / "plain")
  init_checkpoint("tiny_llama3", plain, to="hf", std=0.1, seed=1,
                  overrides={"vocab_size": 128256})
  shutil.copy(LLAMA3_TOKENIZER, os.path.join(plain, "tokenizer.model"))
  convert(plain, str(tmp_path / "plain.gguf"), "gguf")
  ids = np.random.default_rng(0).integers(3, 128000, length).tolist()
  ours = zoo.load(src).logits(np.array([ids]))[0]
  llm = llama(str(tmp_path / "plain.gguf"), logits_all=True)
  llm.eval(ids)
  assert np.abs(np.array(llm.scores[:length]) - ours).max() > 1e-2 * np.abs(ours).max()


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["zoo", "llama2", "llama3"])
def test_llamacpp_tokenizes_as_zoo(tokenizer, tokenizers, tmp_path):
  src = str(tmp_path / "m")
  vocab = 128256 if tokenizer == "llama3" else 512
  init_checkpoint("tiny_llama", src, to="hf", std=0.1, overrides={"vocab_size": vocab})
  shutil.copy(tokenizers[tokenizer], os.path.join(src, "tokenizer.model"))
  convert(src, str(tmp_path / "m.gguf"), "gguf")
  ours = load_tokenizer(tokenizers[tokenizer])
  llm = llama(str(tmp_path / "m.gguf"), vocab_only=True)
  for text in TEXTS + corpus()[:3]:
    ids = ours.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text[:80]
    # a dummy-prefix model's first piece begins with the prefix space, which decode drops
    prefix = " " if tokenizer == "llama2" and text else ""
    assert pieces(llm, ids) == prefix + ours.decode(ids)
  assert (llm.token_bos(), llm.token_eos()) == (ours.bos_id, ours.eos_id)
  # llama.cpp adds BOS itself, as zoo's data pipeline and generate do
  assert llm.tokenize(b"Hello")[0] == ours.bos_id


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers (its converter of Meta's tokenizer)")
def test_hf_tokenizer_json(tmp_path):
  """A byte-level BPE tokenizer.json (LLaMA 3's, as transformers converts Meta's file) carries
  over with its merges; llama.cpp tokenizes as the tokenizers library does."""
  from transformers.convert_slow_tokenizer import TikTokenConverter
  from zoo.data.tokenizers import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS
  src = str(tmp_path / "m")
  init_checkpoint("tiny_llama", src, to="hf", std=0.1, overrides={"vocab_size": 128256})
  converter = TikTokenConverter(vocab_file=LLAMA3_TOKENIZER, pattern=LLAMA3_PATTERN,
                                extra_special_tokens=LLAMA3_SPECIAL_TOKENS)
  converter.converted().save(os.path.join(src, "tokenizer.json"))
  with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, f)
  convert(src, str(tmp_path / "m.gguf"), "gguf")
  ours = load_tokenizer(os.path.join(src, "tokenizer.json"))
  llm = llama(str(tmp_path / "m.gguf"), vocab_only=True)
  for text in TEXTS:  # special-token text is matched, as the tokenizers library does
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text), text


def test_tiktoken_merges_reproduce_tiktoken():
  """BPE with the derived merges (pairs ranked by list position), whole words looked up first,
  gives tiktoken's ids: the merge list means what the ranks meant."""
  import regex
  import tiktoken
  from zoo.data.tokenizers import LLAMA3_PATTERN
  with open(LLAMA3_TOKENIZER, "rb") as f:
    ranks = parse_tiktoken_ranks(f.read())
  merges = {pair: i for i, pair in enumerate(tiktoken_merges(ranks))}
  assert len(merges) > len(ranks) - 256  # every multi-byte token is reachable or whole

  def bpe(word: bytes) -> list[int]:
    if word in ranks:
      return [ranks[word]]
    parts = [word[i:i + 1] for i in range(len(word))]
    while True:
      pairs = [(merges[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in merges]
      if not pairs:
        return [ranks[p] for p in parts]
      _, i = min(pairs)
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
  enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                          special_tokens={})
  text = "".join(corpus()[:2]) + " ".join(TEXTS)
  ours = [t for w in regex.findall(LLAMA3_PATTERN, text) for t in bpe(w.encode())]
  assert ours == enc.encode_ordinary(text)


def test_file_metadata_and_layout(tokenizers, tmp_path):
  src, _ = make("llama3_scaled_rope", tokenizers, tmp_path / "hf")
  out = str(tmp_path / "m.gguf")
  convert(src, out, "gguf", dtype="f16")
  reader, kv = fields(out)
  c = zoo.load(src).config
  assert kv["general.architecture"] == "llama"
  assert kv["llama.context_length"] == c.max_position_embeddings
  assert (kv["llama.embedding_length"], kv["llama.block_count"], kv["llama.feed_forward_length"],
          kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]) == (
            c.hidden_size, c.num_layers, c.intermediate_size, c.num_heads, c.num_kv_heads)
  assert kv["llama.rope.freq_base"] == c.rope_theta
  assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
  assert kv["tokenizer.ggml.eot_token_id"] == 128009
  assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
  tensors = {t.name: t for t in reader.tensors}
  assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
  # llama.cpp divides base frequencies by rope_freqs: 1 for short wavelengths, 8 for long ones
  factors = np.asarray(tensors["rope_freqs.weight"].data)
  assert factors[0] == 1 and factors[-1] == 8 and np.all(np.diff(factors) >= 0)
  assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
  assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
  # q rows are in Meta's interleaved rotary layout: within each head, rows (0, half, 1,
  # half + 1, ...) of the rotate-half layout
  hf_q = hf_tensor(src, "model.layers.0.self_attn.q_proj.weight")
  stored = np.asarray(tensors["blk.0.attn_q.weight"].data, dtype=np.float32)
  half = c.head_dim // 2
  rows = [h * c.head_dim + j + k * half for h in range(c.num_heads) for j in range(half)
          for k in (0, 1)]
  np.testing.assert_array_equal(stored, hf_q[rows].astype(np.float16).astype(np.float32))


def test_q8_0_blocks_within_their_bound(tokenizers, tmp_path):
  src, _ = make("llama_gqa", tokenizers, tmp_path / "hf")
  out = str(tmp_path / "q.gguf")
  convert(src, out, "gguf", dtype="q8_0")
  reader, kv = fields(out)
  tensors = {t.name: t for t in reader.tensors}
  kernel = hf_tensor(src, "model.layers.1.mlp.down_proj.weight")  # [hidden, mlp]
  t = tensors["blk.1.ffn_down.weight"]
  assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
  back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(kernel.shape)
  # each block of 32 is codes in [-127, 127] times amax / 127, that scale stored as float16
  scale = np.abs(kernel).reshape(kernel.shape[0], -1, 32).max(-1, keepdims=True) / 127
  bound = np.broadcast_to(scale * (0.5 + 127 * 2.0**-11), (*scale.shape[:2], 32))
  assert np.all(np.abs(back - kernel) <= bound.reshape(kernel.shape) + 1e-8)
  assert np.abs(back - kernel).max() > 0  # it really is quantized
  assert tensors["blk.1.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
  num_params = zoo.convert.Checkpoint(src).config.num_params()
  assert os.path.getsize(out) < 0.4 * num_params * 4
  # and llama.cpp runs it close to zoo (8-bit weights and activations)
  assert main(["convert", src, str(tmp_path / "v.gguf"), "--to", "gguf", "--dtype", "q8_0",
               "--verify"]) == 0


def test_sliding_window_caps_the_context(tokenizers, tmp_path, capsys):
  src = str(tmp_path / "mistral")
  init_checkpoint("tiny_mistral", src, to="hf", std=0.1)
  shutil.copy(tokenizers["zoo"], os.path.join(src, "tokenizer.model"))
  assert main(["convert", src, str(tmp_path / "m.gguf"), "--to", "gguf"]) == 0
  assert "context length set to the sliding window 16" in capsys.readouterr().out
  assert fields(str(tmp_path / "m.gguf"))[1]["llama.context_length"] == 16


@pytest.mark.slow
def test_verify_from_a_zoo_checkpoint(tokenizers, tmp_path, capsys):
  src, _ = make("qwen2", tokenizers, tmp_path / "zoo", to="zoo")
  assert main(["convert", src, str(tmp_path / "m.gguf"), "--to", "gguf", "--verify"]) == 0
  out = capsys.readouterr().out
  assert "zoo vs llama.cpp" in out and ": ok" in out
  assert fields(str(tmp_path / "m.gguf"))[1]["general.architecture"] == "qwen2"


def leftovers(directory):
  return sorted(n for n in os.listdir(directory) if ".partial-" in n)


@pytest.mark.parametrize("case,words", [
  ("dynamic_rope", "rope scaling 'dynamic'"),
  ("yarn_rope", "rope scaling 'yarn'"),
  ("no_tokenizer", "has no tokenizer"),
  ("tokenizer_too_big", "has 512 tokens but the model's vocabulary is 256"),
  ("q8_0_to_hf", "unknown dtype 'q8_0'"),
  ("float64", "invalid choice"),
  ("shards", "--shards applies to --to meta only"),
  ("exists", "already exists"),
])
def test_bad_gguf_export(case, words, tokenizers, tmp_path, capsys):
  src = str(tmp_path / "m")
  overrides = {"dynamic_rope": {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
               "yarn_rope": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
               "tokenizer_too_big": {"vocab_size": 256}}.get(case, {})
  init_checkpoint("tiny_llama", src, to="hf", overrides=overrides)
  if case != "no_tokenizer":
    shutil.copy(tokenizers["zoo"], os.path.join(src, "tokenizer.model"))
  out = tmp_path / "out.gguf"
  args = ["convert", src, str(out), "--to", "gguf"]
  if case == "q8_0_to_hf":
    args = ["convert", src, str(tmp_path / "hf2"), "--to", "hf", "--dtype", "q8_0"]
  if case == "float64":
    args += ["--dtype", "float64"]
  if case == "shards":
    args += ["--shards", "2"]
  if case == "exists":
    out.write_bytes(b"keep me")
  try:
    code = main(args)
  except SystemExit as e:  # argparse's own checks (a --dtype it does not know)
    code = e.code
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert words in err and len(err.splitlines()) == 1, err
  assert leftovers(tmp_path) == []
  assert not out.exists() or out.read_bytes() == b"keep me"


@pytest.mark.parametrize("preset,overrides,words", [
  ("tiny_qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob False"),
  ("tiny_qwen3_moe", {"moe_layers": [1]}, "dense layers among the MoE ones"),
  ("tiny_qwen3", {"qkv_bias": True, "o_bias": True}, "attention or MLP biases"),
  ("tiny_llama4", {}, "attention_chunk_size 16"),
  ("tiny_llama4", {"attention_chunk_size": None, "layer_types": None, "no_rope_layers": []},
   "Llama 4 without chunked attention"),
  ("tiny_llama4", {"attention_chunk_size": 8192, "floor_scale": 4.0}, "floor_scale 8192"),
  ("tiny_llama4", {"attention_chunk_size": 8192, "floor_scale": 8192.0, "qk_norm": None},
   "qk_norm None with 4 experts"),
  ("tiny_llama4", {"attention_chunk_size": 8192, "floor_scale": 8192.0, "moe_layers": [0, 3]},
   "MoE layers that are not every s-th layer"),
])
def test_gguf_refuses_what_llamacpp_computes_differently(preset, overrides, words, tokenizers,
                                                         tmp_path, capsys):
  src = str(tmp_path / "m")
  init_checkpoint(preset, src, to="zoo", overrides=overrides)
  shutil.copy(tokenizers["zoo"], os.path.join(src, "tokenizer.model"))
  out = tmp_path / "out.gguf"
  assert main(["convert", src, str(out), "--to", "gguf"]) == 2
  err = capsys.readouterr().err.strip()
  assert words in err and len(err.splitlines()) == 1, err
  assert not out.exists() and leftovers(tmp_path) == []
