"""`zoo convert` from the command line: success paths, --verify, and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.helpers import edit_json
from tests.references import hf_model
from zoo.cli import main, verify
from zoo.convert import convert


def run_zoo(*args):
  """Runs the installed command line in a fresh process, as a user would."""
  return subprocess.run([sys.executable, "-m", "zoo.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=600)


def leftovers(directory) -> list[str]:
  return [n for n in os.listdir(directory) if ".partial-" in n or ".old-" in n]


@pytest.mark.slow
def test_convert_with_verify_then_force(save_hf, tmp_path):
  src = save_hf(hf_model("mixtral", num_local_experts=4))
  result = run_zoo("convert", src, tmp_path / "zoo", "--to", "zoo", "--verify")
  assert result.returncode == 0, result.stderr
  assert "verify: max |logit difference|" in result.stdout and ": ok" in result.stdout
  result = run_zoo("convert", tmp_path / "zoo", tmp_path / "hf16", "--to", "hf", "--dtype",
                   "float16", "--verify")
  assert result.returncode == 0, result.stderr
  assert load_file(str(tmp_path / "hf16" / "model.safetensors"))[
      "model.embed_tokens.weight"].dtype == np.float16
  # an existing destination is refused, then replaced with --force
  assert run_zoo("convert", src, tmp_path / "zoo", "--to", "zoo").returncode == 2
  assert run_zoo("convert", src, tmp_path / "zoo", "--to", "zoo", "--force").returncode == 0
  assert leftovers(tmp_path) == []


def test_verify_fails_on_mismatched_weights(save_hf, tmp_path, capsys):
  """--verify can fail: a zoo checkpoint of other weights is caught."""
  a = save_hf(hf_model("llama", seed=1), "a")
  b = save_hf(hf_model("llama", seed=2), "b")
  convert(b, str(tmp_path / "zoo_b"), "zoo")
  assert verify(a, str(tmp_path / "zoo_b"), 1e-4) == 1
  assert "FAILED" in capsys.readouterr().out


def edit_config(path, **changes):
  edit_json(os.path.join(path, "config.json"), **changes)


def edit_tensors(path, fn):
  tensors = load_file(os.path.join(path, "model.safetensors"))
  fn(tensors)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def truncate(path):
  name = os.path.join(path, "model.safetensors")
  with open(name, "r+b") as f:
    f.truncate(os.path.getsize(name) - 1000)


BAD_INPUTS = {
  # name: (how to damage the HF directory, words the message must contain)
  "no_weights": (lambda p: os.remove(os.path.join(p, "model.safetensors")), "no weights found"),
  "no_config": (lambda p: os.remove(os.path.join(p, "config.json")), "neither"),
  "index_names_missing_shard": (
      lambda p: json.dump({"weight_map": {"x": "model-00001-of-00002.safetensors"}},
                          open(os.path.join(p, "model.safetensors.index.json"), "w")),
      "which is missing"),
  "wrong_shape": (lambda p: edit_tensors(p, lambda t: t.update(
      {"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 64), np.float32)})),
      "has shape (8, 64)"),
  "missing_tensor": (lambda p: edit_tensors(p, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                     "missing tensor model.layers.1.mlp.up_proj.weight"),
  "unexpected_tensor": (lambda p: edit_tensors(p, lambda t: t.update(
      {"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})), "q_norm"),
  "truncated_file": (truncate, "truncated"),
  "unknown_architecture": (lambda p: edit_config(p, model_type="gpt2"), "model_type 'gpt2'"),
  "unknown_rope_type": (lambda p: edit_config(p, rope_parameters={"rope_type": "longrope",
                                                                 "rope_theta": 1e4}),
                        "rope_parameters.rope_type='longrope'"),
  "unsupported_activation": (lambda p: edit_config(p, hidden_act="gelu"), "hidden_act='gelu'"),
  "partial_rotary": (lambda p: edit_config(p, partial_rotary_factor=0.5),
                     "partial_rotary_factor=0.5"),
  "quantized": (lambda p: edit_config(p, quantization_config={"quant_method": "gptq"}),
                "quantization_config"),
  "unknown_rope_field": (lambda p: edit_config(p, rope_parameters={
      "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "beta_fast": 3}),
      "rope_parameters.beta_fast"),
  "bad_json": (lambda p: open(os.path.join(p, "config.json"), "w").write("{nope"),
               "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, save_hf, tmp_path):
  src = save_hf(hf_model("llama"))
  damage, words = BAD_INPUTS[case]
  damage(src)
  result = run_zoo("convert", src, tmp_path / "out", "--to", "zoo")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("zoo: "), result.stderr
  assert words in lines[0]
  assert not os.path.exists(tmp_path / "out") and leftovers(tmp_path) == []


def test_bad_flags_and_paths(tmp_path, capsys):
  assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "zoo"]) == 2
  assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "ggml"]) == 2
  assert main(["convert", str(tmp_path), str(tmp_path / "no" / "out"), "--to", "zoo"]) == 2
  assert main(["init", "no_such_preset", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 4 and all(line.startswith("zoo") for line in err)
  assert "does not exist" in err[0] and "invalid choice: 'ggml'" in err[1]


@pytest.mark.slow
def test_demo_runs(tmp_path):
  result = run_zoo("demo", "--workdir", tmp_path)
  assert result.returncode == 0, result.stderr
  assert ": ok" in result.stdout
