"""Meta's consolidated format <-> zoo/HF, checked against Meta's reference implementation.

The reference (llama_models.llama3.model on fairscale's model-parallel layers) runs in one
process per model-parallel rank (tests/convert/meta_reference.py); random Meta checkpoints are
made by it, cut into shards by fairscale's own layers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zoo
from tests.helpers import assert_same_tensors, edit_json, hf_tensors, tokens
from tests.references import hf_logits, hf_model
from zoo.cli import main
from zoo.convert import Checkpoint
from zoo.convert.meta import ffn_hidden, ffn_params, permute_rotary
from zoo.data.tokenizers import load_tokenizer, train_sentencepiece
from zoo.models.llama import from_params
from zoo.models.presets import get_preset

# the references this module checks against; without them it is skipped
torch = pytest.importorskip("torch")
AutoModelForCausalLM = pytest.importorskip("transformers").AutoModelForCausalLM
llama_models = pytest.importorskip("llama_models")
MetaTokenizer = pytest.importorskip("llama_models.llama3.tokenizer").Tokenizer
pytest.importorskip("fairscale")  # under the reference model (meta_reference.py)

ROOT = str(Path(__file__).resolve().parents[2])
TOL, RTOL = 1e-4, 1e-5  # float32 logits of two implementations: absolute, and relative
# Meta's use_scaled_rope as zoo's --set value (llama_models' apply_scaling constants).
META_ROPE = ('rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, '
             '"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}')
BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
            norm_eps=1e-5)
VARIANTS = {
  # rope_theta is given to the reference, then dropped (with vocab_size) from the file as
  # LLaMA 1/2's params.json leaves them out: zoo must read 10000 and the vocab from the tensors.
  "llama2": (dict(BASE, rope_theta=10000.0), True),
  "llama3_ffn_multiplier": (dict(BASE, rope_theta=500000.0, ffn_dim_multiplier=1.3,
                                 multiple_of=16), False),
  "llama3_1_scaled_rope": (dict(BASE, rope_theta=500000.0, use_scaled_rope=True,
                                ffn_dim_multiplier=0.9), False),
}
SEQ = 96  # long enough that use_scaled_rope changes the logits well past the tolerance


def reference(mode, directory, world, tmp_path, *extra):
  """Runs meta_reference.py on `world` ranks; for mode forward, the logits of tokens.npy."""
  init = tmp_path / f"rendezvous-{os.urandom(4).hex()}"
  out = tmp_path / "ref_logits.npy"
  env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
  args = [sys.executable, "-m", "tests.convert.meta_reference", mode, str(directory),
          "--world", str(world), "--init", str(init), "--max-seq-len", str(SEQ), *extra]
  if mode == "forward":
    args += ["--tokens", str(tmp_path / "tokens.npy"), "--out", str(out)]
  procs = [subprocess.Popen([*args, "--rank", str(r)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for r in range(world)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text
  return np.load(out) if mode == "forward" else None


def reference_logits(directory, world, tmp_path, x, *extra):
  np.save(tmp_path / "tokens.npy", x)
  return reference("forward", directory, world, tmp_path, *extra)


def make_meta(directory, params, world, tmp_path, *extra):
  """A random Meta checkpoint made by the reference at model-parallel size `world`."""
  os.makedirs(directory)
  with open(os.path.join(directory, "params.json"), "w") as f:
    json.dump(params, f)
  reference("make", directory, world, tmp_path, *extra)
  return str(directory)


def edit_params(directory, **changes):
  edit_json(os.path.join(directory, "params.json"), **changes)


def cli(*args):
  assert main([str(a) for a in args]) == 0


def pth_shapes(directory) -> list[dict]:
  out = []
  for name in sorted(os.listdir(directory)):
    if name.endswith(".pth"):
      state = torch.load(os.path.join(directory, name), weights_only=True, mmap=True)
      out.append({k: tuple(v.shape) for k, v in state.items()})
  return out


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ---------------------------------------------------------------------------------------------
# Meta -> zoo / hf, against the reference.

@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_meta_checkpoint_matches_reference(variant, world, tmp_path):
  params, llama2 = VARIANTS[variant]
  extra = ("--parallel-embedding", "--rope-freqs") if llama2 else ()
  src = make_meta(tmp_path / "meta", params, world, tmp_path, *extra)
  shapes = pth_shapes(src)
  assert len(shapes) == world
  # the layout the reference's layers hold: columns split rows, rows split columns
  d, v = params["dim"], params["vocab_size"]
  embed = (v, d // world) if llama2 else (v // world, d)
  assert shapes[-1]["tok_embeddings.weight"] == embed
  assert shapes[-1]["layers.1.attention.wk.weight"] == (2 * 16 // world, d)
  assert shapes[-1]["layers.1.attention.wo.weight"] == (d, 64 // world)
  assert shapes[-1]["output.weight"] == (v // world, d)
  x = tokens(batch=2, length=SEQ, vocab=v, seed=1)
  ref = reference_logits(src, world, tmp_path, x, *extra)
  if llama2:
    edit_params(src, rope_theta=None, vocab_size=-1)
  shutil.copy(Path(llama_models.llama3.__file__).parent / "tokenizer.model", src)

  cli("convert", src, tmp_path / "zoo", "--to", "zoo")
  ckpt = Checkpoint(str(tmp_path / "zoo"))
  assert ckpt.config.intermediate_size == ffn_hidden(d, params["multiple_of"],
                                                     params.get("ffn_dim_multiplier"))
  assert ckpt.config.rope_theta == params["rope_theta"]
  assert os.path.isfile(tmp_path / "zoo" / "tokenizer.model")
  assert (ckpt.config.bos_token_id, ckpt.config.eos_token_id) == (128000, 128001)
  ours = zoo.load(str(tmp_path / "zoo")).logits(x)
  diff = max_diff(ours, ref)
  print(f"{variant} MP={world}: max |zoo - reference| = {diff:.3g}")
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=RTOL)
  if params.get("use_scaled_rope"):  # the scaling matters here: without it, far off
    unscaled = ckpt.config.replace(rope_scaling=None)
    wrong = from_params(unscaled, Checkpoint(str(tmp_path / "zoo")).params()).logits(x)
    print(f"{variant} MP={world}: without the scaling, max |zoo - reference| = "
          f"{max_diff(wrong, ref):.3g}")
    assert max_diff(wrong, ref) > 100 * TOL

  # meta -> hf loads in transformers, with the reference's logits
  cli("convert", src, tmp_path / "hf", "--to", "hf")
  model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
  theirs = hf_logits(model, x)
  diff = max_diff(theirs, ref)
  print(f"{variant} MP={world}: max |transformers - reference| = {diff:.3g}")
  np.testing.assert_allclose(theirs, ref, atol=TOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# zoo / hf -> Meta: exact round trips, and the reference runs our export.

@pytest.mark.parametrize("shards,dtype", [(1, "float32"), (2, "bfloat16")])
def test_zoo_meta_zoo_is_bit_identical(shards, dtype, tmp_path):
  cli("init", "tiny_llama", tmp_path / "zoo", "--std", "0.1", "--dtype", dtype)
  cli("convert", tmp_path / "zoo", tmp_path / "meta", "--to", "meta", "--shards", shards)
  assert sorted(os.listdir(tmp_path / "meta")) == [
    f"consolidated.{r:02d}.pth" for r in range(shards)] + ["params.json"]
  cli("convert", tmp_path / "meta", tmp_path / "back", "--to", "zoo")
  first, second = Checkpoint(str(tmp_path / "zoo")), Checkpoint(str(tmp_path / "back"))
  a, b = first.params(), second.params()
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  c1, c2 = first.config, second.config
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling"):
    assert getattr(c1, field) == getattr(c2, field), field


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 2])
def test_reference_runs_our_export(shards, tmp_path):
  cli("init", "tiny_llama3", tmp_path / "zoo", "--std", "0.1", "--set",
      "tie_word_embeddings=false", "--set", META_ROPE, "--set", "vocab_size=256")
  cli("convert", tmp_path / "zoo", tmp_path / "meta", "--to", "meta", "--shards", shards)
  with open(tmp_path / "meta" / "params.json") as f:
    params = json.load(f)
  assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0
  assert ffn_hidden(64, params["multiple_of"], params.get("ffn_dim_multiplier")) == 160
  shapes = pth_shapes(tmp_path / "meta")
  assert shapes[0]["tok_embeddings.weight"] == (256 // shards, 64)
  assert shapes[0]["layers.0.feed_forward.w2.weight"] == (64, 160 // shards)
  x = tokens(batch=2, length=SEQ, vocab=256, seed=2)
  ref = reference_logits(tmp_path / "meta", shards, tmp_path, x)
  ours = zoo.load(str(tmp_path / "zoo")).logits(x)
  diff = max_diff(ours, ref)
  print(f"tiny_llama3 -> meta MP={shards}: max |zoo - reference| = {diff:.3g}")
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=RTOL)


def test_hf_meta_hf_round_trip(save_hf, tmp_path):
  ref_model = hf_model("llama", vocab_size=256)
  src = save_hf(ref_model)
  cli("convert", src, tmp_path / "meta", "--to", "meta", "--shards", 2)
  cli("convert", tmp_path / "meta", tmp_path / "back", "--to", "hf")
  assert_same_tensors(hf_tensors(src), hf_tensors(tmp_path / "back"))
  x = tokens(length=40, vocab=256)
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
  np.testing.assert_array_equal(hf_logits(reloaded.eval(), x), hf_logits(ref_model, x))
  # and the reference runs the intermediate Meta checkpoint to transformers' logits
  ref = reference_logits(tmp_path / "meta", 2, tmp_path, x)
  theirs = hf_logits(ref_model, x)
  diff = max_diff(ref, theirs)
  print(f"hf -> meta MP=2: max |reference - transformers| = {diff:.3g}")
  np.testing.assert_allclose(ref, theirs, atol=TOL, rtol=RTOL)


def test_sentencepiece_export_uses_llama2_layout(tmp_path):
  """With a SentencePiece tokenizer the export is for LLaMA 1/2's reference: embedding split
  along dim (ParallelEmbedding) and no rope_theta field (its ModelArgs has none)."""
  cli("init", "tiny_llama", tmp_path / "zoo", "--std", "0.1")
  texts = [f"line {i}: the quick brown fox {i * 7} jumps over {i % 13} lazy dogs\n"
           for i in range(300)]
  train_sentencepiece(texts, 300, str(tmp_path / "zoo" / "tokenizer.model"))
  cli("convert", tmp_path / "zoo", tmp_path / "meta", "--to", "meta", "--shards", 2)
  with open(tmp_path / "meta" / "params.json") as f:
    assert "rope_theta" not in json.load(f)
  assert pth_shapes(tmp_path / "meta")[1]["tok_embeddings.weight"] == (512, 32)
  assert os.path.isfile(tmp_path / "meta" / "tokenizer.model")
  # LLaMA 2's reference hard-codes theta 10000; llama_models needs it spelled out.
  run_dir = tmp_path / "for_reference"
  shutil.copytree(tmp_path / "meta", run_dir)
  edit_params(run_dir, rope_theta=10000.0)
  x = tokens(length=40, vocab=512, seed=3)
  ref = reference_logits(run_dir, 2, tmp_path, x, "--parallel-embedding")
  ours = zoo.load(str(tmp_path / "zoo")).logits(x)
  diff = max_diff(ours, ref)
  print(f"tiny_llama -> meta (LLaMA 2 layout) MP=2: max |zoo - reference| = {diff:.3g}")
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=RTOL)
  assert Checkpoint(str(tmp_path / "meta")).config.rope_theta == 10000.0


# ---------------------------------------------------------------------------------------------
# The pieces.

def test_permute_rotary_is_a_row_permutation_and_inverts():
  w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
  p = permute_rotary(w, 4)
  assert np.array_equal(permute_rotary(p, 4, inverse=True), w)
  # head 1: Meta's rows (x0, y0, x1, y1, ...) become (x0, x1, ..., y0, y1, ...)
  assert [int(r) for r in p[16:32, 0] // 3] == [16 + 2 * i for i in range(8)] + \
    [17 + 2 * i for i in range(8)]


# Meta's published params.json values and the widths of the matching HF configs (zoo presets).
META_FFN = [("llama2_7b", 256, None), ("llama2_13b", 256, None), ("llama2_70b", 4096, 1.3),
            ("llama3_8b", 1024, 1.3), ("llama3_70b", 4096, 1.3), ("llama3_1_405b", 4096, 1.2),
            ("llama3_2_1b", 256, 1.5), ("llama3_2_3b", 256, 1.0), ("codellama_7b", 256, None)]


@pytest.mark.parametrize("preset,multiple_of,multiplier", META_FFN)
def test_ffn_width_formula(preset, multiple_of, multiplier):
  c = get_preset(preset)
  assert ffn_hidden(c.hidden_size, multiple_of, multiplier) == c.intermediate_size
  found = ffn_params(c.hidden_size, c.intermediate_size)
  assert ffn_hidden(c.hidden_size, *found) == c.intermediate_size


@pytest.mark.parametrize("dim,hidden", [(64, 160), (64, 96), (64, 1), (96, 7), (4096, 14336),
                                        (128, 1000)])
def test_ffn_params_reproduce_any_width(dim, hidden):
  assert ffn_hidden(dim, *ffn_params(dim, hidden)) == hidden


def test_llama3_tokenizer_matches_llama_models():
  path = Path(llama_models.llama3.__file__).parent / "tokenizer.model"
  ref = MetaTokenizer(path)
  ours = load_tokenizer(str(path))
  assert ours.vocab_size == ref.n_words == 128256
  assert (ours.bos_id, ours.eos_id) == (ref.bos_id, ref.eos_id)
  texts = [
    "Hello, world! The quick brown fox.", "emoji 🌍🚀 👨‍👩‍👧‍👦 ❤️ 🏳️‍🌈", "日本語のテキスト",
    "中文文本和标点，。！", "한국어 텍스트", "mixed 漢字 and ASCII 123", "    indented\n\t\tcode()",
    "a" + " " * 30000 + "b", "x" * 26000, "\n" * 50 + "end", "12345678901234567890 3.14159 -1e10",
    "0.000001 1,000,000 ٣٤٥", "don't I'LL we've THEY'RE", "<|begin_of_text|>hi<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>", "\r\n \r\n  ", "",
  ]
  for text in texts:
    ids = ours.encode(text)
    assert ids == ref.encode(text, bos=False, eos=False), text[:40]
    assert ours.decode(ids) == ref.decode(ids) == text
  # the special tokens both tables name, by id and by text
  for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"):
    assert ours.special_tokens[name] == ref.special_tokens[name]
    assert ours.decode([ref.special_tokens[name]]) == name


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written.

@pytest.fixture(scope="module")
def meta_mp2(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("meta_mp2")
  return make_meta(tmp / "meta", VARIANTS["llama3_ffn_multiplier"][0], 2, tmp)


def truncate(path, keep=0.5):
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep))


def drop_tensor(path, name):
  state = dict(torch.load(path, weights_only=True))
  state.pop(name)
  torch.save(state, path)


def reshape_tensor(path, name):
  state = dict(torch.load(path, weights_only=True))
  state[name] = state[name][:-2]
  torch.save(state, path)


def perturb_norm(path):
  state = dict(torch.load(path, weights_only=True))
  state["norm.weight"] = state["norm.weight"] + 1
  torch.save(state, path)


BAD_META = {
  "truncated_pth": (lambda p: truncate(os.path.join(p, "consolidated.01.pth")),
                    "consolidated.01.pth is not a loadable PyTorch weights file"),
  "missing_shard": (lambda p: os.remove(os.path.join(p, "consolidated.01.pth")),
                    "looks like a checkpoint of 2 shards, of which 1 were found"),
  "shard_gap": (lambda p: os.rename(os.path.join(p, "consolidated.01.pth"),
                                    os.path.join(p, "consolidated.02.pth")),
                "consolidated.01.pth is missing"),
  "no_params": (lambda p: os.remove(os.path.join(p, "params.json")), "no params.json"),
  "bad_params_json": (lambda p: open(os.path.join(p, "params.json"), "w").write("{"),
                      "cannot read"),
  "wrong_dim": (lambda p: edit_params(p, dim=128), "params.json implies"),
  "wrong_n_heads": (lambda p: edit_params(p, n_heads=8),
                    "layers.0.attention.wk.weight has shape (32, 64) (merged from 2 shards), "
                    "but params.json implies (16, 64)"),
  "wrong_ffn": (lambda p: edit_params(p, ffn_dim_multiplier=None),
                "feed_forward.w1.weight has shape (224, 64) (merged from 2 shards), but "
                "params.json implies (176, 64)"),
  "wrong_vocab": (lambda p: edit_params(p, vocab_size=512), "tok_embeddings.weight"),
  "unknown_field": (lambda p: edit_params(p, moe_args={"num_experts": 4}),
                    "params.json field moe_args"),
  "shard_lacks_tensor": (lambda p: drop_tensor(os.path.join(p, "consolidated.01.pth"),
                                               "layers.1.ffn_norm.weight"),
                         "inconsistent shards: consolidated.00.pth has tensor "
                         "layers.1.ffn_norm.weight"),
  "shards_disagree_on_shape": (lambda p: reshape_tensor(os.path.join(p, "consolidated.00.pth"),
                                                        "layers.0.attention.wq.weight"),
                               "inconsistent shards: tensor layers.0.attention.wq.weight"),
  "replicas_differ": (lambda p: perturb_norm(os.path.join(p, "consolidated.01.pth")),
                      "replicated tensor norm.weight differs"),
}


def assert_one_line_error(capsys, code, words, out_dir):
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("zoo: "), err
  assert words in err[0], err[0]
  parent = os.path.dirname(out_dir)
  assert not os.path.exists(out_dir)
  assert [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n] == []


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_META))
def test_bad_meta_input(case, meta_mp2, tmp_path, capsys):
  src = str(tmp_path / "meta")
  shutil.copytree(meta_mp2, src)
  damage, words = BAD_META[case]
  damage(src)
  out = str(tmp_path / "out")
  assert_one_line_error(capsys, main(["convert", src, out, "--to", "zoo"]), words, out)


@pytest.mark.parametrize("preset,overrides,words", [
  ("tiny_qwen2", [], "biases"),
  ("tiny_mistral", [], "sliding-window attention"),
  ("tiny_mixtral", [], "mixture of experts"),
  ("tiny_llama3", [], "tied embeddings"),
  ("tiny_llama3", ["tie_word_embeddings=false"], "rope scaling llama3"),
  ("tiny_llama", ["head_dim=32"], "head_dim 32"),
])
def test_unsupported_export_feature(preset, overrides, words, tmp_path, capsys):
  sets = [a for o in overrides for a in ("--set", o)]
  cli("init", preset, tmp_path / "zoo", *sets)
  capsys.readouterr()
  out = str(tmp_path / "meta")
  code = main(["convert", str(tmp_path / "zoo"), out, "--to", "meta"])
  assert_one_line_error(capsys, code, words, out)


@pytest.mark.parametrize("args,words", [
  (["--to", "meta", "--shards", "3"], "--shards 3 does not divide"),
  (["--to", "meta", "--shards", "0"], "--shards must be at least 1"),
  (["--to", "zoo", "--shards", "2"], "--shards applies to --to meta only"),
  (["--to", "meta", "--verify"], "one side must be an hf checkpoint"),
])
def test_bad_export_flags(args, words, tmp_path, capsys):
  cli("init", "tiny_llama", tmp_path / "zoo")
  capsys.readouterr()
  out = str(tmp_path / "out")
  assert_one_line_error(capsys, main(["convert", str(tmp_path / "zoo"), out, *args]), words, out)


@pytest.mark.slow
def test_cli_process_reports_one_line(meta_mp2, tmp_path):
  """The installed command, in its own process: exit status 2 and one line on stderr."""
  src = str(tmp_path / "meta")
  shutil.copytree(meta_mp2, src)
  truncate(os.path.join(src, "consolidated.00.pth"), keep=0.9)
  result = subprocess.run([sys.executable, "-m", "zoo.cli", "convert", src, str(tmp_path / "o"),
                           "--to", "hf"], capture_output=True, text=True, timeout=600)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "consolidated.00.pth" in lines[0], result.stderr
  assert not os.path.exists(tmp_path / "o")
