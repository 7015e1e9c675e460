"""`zoo train` with LoRA / QLoRA (configs/lora.py): adapter-only checkpoints that resume bit for
bit, a frozen base, and adapter files that HF peft loads with the logits zoo computes."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import zoo
from tests.helpers import flags, losses, wait_for_step, zoo_train
from tests.references import hf_logits
from zoo.cli import REPO_ROOT, main
from zoo.convert.checkpoint import Checkpoint, convert

pytestmark = pytest.mark.slow  # `zoo train` runs: the base checkpoint and the LoRA runs

# the references this module checks against; without them it is skipped
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):  # noqa: F811
  """A tiny pretrained model (with its tokenizer) to fine-tune."""
  workdir = tmp_path_factory.mktemp("base")
  assert main(["train", "--config", "configs/default.py", "--workdir", str(workdir),
               *flags(corpus, **{"train.steps": 2, "optimizer.warmup_steps": 0})]) == 0
  return str(workdir / "model")


def lora_flags(corpus, base, **overrides):  # noqa: F811
  values = {"data.source": "files", "data.files": corpus["files"],
            "data.data_dir": corpus["data_dir"], "data.seq_len": 32, "data.batch_size": 8,
            "train.steps": 8, "train.log_every": 1, "train.eval_every": 0,
            "train.checkpoint_every": 2, "train.keep_checkpoints": 10, "train.sample_tokens": 0,
            "optimizer.lr": 2e-2, "optimizer.warmup_steps": 1}
  values.update(overrides)
  return [f"--config.{k}={v}" for k, v in values.items()]


def run_config(workdir, config, args, wait=True):
  return zoo_train(workdir, *args, wait=wait, config=config)


def lora_train(workdir, corpus, base, arg="", wait=True, **overrides):  # noqa: F811
  # with LoRA dropout, so that the resume test also covers its masks
  config = f"configs/lora.py:shrink,init_from={base},rank=4,dropout=0.1{arg}"
  return run_config(workdir, config, lora_flags(corpus, base, **overrides), wait=wait)


@pytest.fixture(scope="module")
def lora_reference(corpus, base, tmp_path_factory):  # noqa: F811
  workdir = tmp_path_factory.mktemp("lora")
  code, out, err = lora_train(workdir, corpus, base)
  assert code == 0, err
  return workdir, losses(workdir)


def test_lora_run_saves_only_adapters_and_peft_loads_them(lora_reference, corpus, base,  # noqa: F811
                                                          tmp_path):
  workdir, reference = lora_reference
  # the adapters learn: zoo eval's held-out-free perplexity of the training files drops
  nll = {}
  for name, extra in (("base", []), ("adapted", ["--adapter", str(workdir / "adapter")])):
    result = subprocess.run([sys.executable, "-m", "zoo.cli", "eval", "--checkpoint", base,
                             "--data", corpus["files"], "--seq-len", "32", "--json", *extra],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    nll[name] = json.loads(result.stdout.strip().splitlines()[-1])["nll"]
  assert nll["adapted"] < nll["base"] - 0.02  # an untrained adapter (B = 0) changes nothing
  # the checkpoints hold the adapters and their optimizer state, never a base weight
  with open(workdir / "checkpoints" / "8" / "state" / "_METADATA") as f:
    keys = list(json.load(f)["tree_metadata"])
  params = [k for k in keys if k.startswith("('params'")]
  assert params and all(k.endswith(("'lora_a')", "'lora_b')")) for k in params)
  assert not any("'kernel'" in k or "'embedding'" in k for k in keys)
  # the base checkpoint is untouched, and the adapter changes the model
  x = np.random.default_rng(0).integers(0, 500, (2, 24))
  plain = zoo.load(base).logits(x)
  ours = zoo.load(base, adapter=str(workdir / "adapter")).logits(x)
  assert np.abs(ours - plain).max() > 1e-3
  np.testing.assert_allclose(zoo.load(base, adapter=str(workdir / "adapter_peft")).logits(x),
                             ours, atol=1e-5, rtol=1e-5)
  # HF peft on the transformers export of the base gives the same logits
  hf_dir = str(tmp_path / "base_hf")
  convert(base, hf_dir, "hf")
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  adapted = peft.PeftModel.from_pretrained(hf, str(workdir / "adapter_peft")).eval()
  np.testing.assert_allclose(hf_logits(adapted, x), ours, atol=1e-4, rtol=1e-5)
  config = json.loads((workdir / "adapter_peft" / "adapter_config.json").read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.1
  assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def scanned_lora_reference(corpus, base, tmp_path_factory):  # noqa: F811
  workdir = tmp_path_factory.mktemp("lora_scanned")
  code, out, err = lora_train(workdir, corpus, base, scan_layers=True)
  assert code == 0, err
  return workdir, losses(workdir)


def test_a_scanned_lora_run_follows_the_unrolled_one(lora_reference, scanned_lora_reference):
  """Stacked adapters start as the unrolled ones and drop the same inputs: the runs differ by
  float rounding, and the adapter files (per layer) hold the same weights."""
  (ref_dir, reference), (scan_dir, got) = lora_reference, scanned_lora_reference
  assert sorted(got) == sorted(reference)
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [reference[s] for s in sorted(got)], atol=2e-5, rtol=1e-5)
  for name in ("adapter/adapter.safetensors", "adapter_peft/adapter_model.safetensors"):
    ours, theirs = (load_file(str(d / name)) for d in (scan_dir, ref_dir))
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
      np.testing.assert_allclose(ours[key], value, atol=1e-5, rtol=1e-5, err_msg=key)


def test_zoo_export_of_a_scanned_lora_checkpoint(scanned_lora_reference, tmp_path):
  """`zoo export` of a (scanned) LoRA run's last checkpoint: the adapters it exported."""
  scan_dir, _ = scanned_lora_reference
  assert main(["export", "--workdir", str(scan_dir), str(tmp_path / "out")]) == 0
  for name in ("adapter/adapter.safetensors", "adapter_peft/adapter_model.safetensors"):
    ours, theirs = load_file(str(tmp_path / "out" / name)), load_file(str(scan_dir / name))
    assert set(ours) == set(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_lora_sigkill_then_resume_is_bit_exact(layout, corpus, base, request,  # noqa: F811
                                               tmp_path):
  _, reference = request.getfixturevalue(
      "lora_reference" if layout == "unrolled" else "scanned_lora_reference")
  extra = {"scan_layers": True} if layout == "scanned" else {}
  proc = lora_train(tmp_path, corpus, base, wait=False, **extra)
  wait_for_step(proc, tmp_path, 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, out, err = lora_train(tmp_path, corpus, base, **extra)
  assert code == 0, err
  assert "resuming from the checkpoint" in out
  assert losses(tmp_path) == reference  # every step, bit for bit


def test_qlora_run_trains_on_a_quantized_base(lora_reference, corpus, base, tmp_path):  # noqa: F811
  _, reference = lora_reference
  code, out, err = lora_train(tmp_path / "unrolled", corpus, base, arg=",quantize=nf4")
  assert code == 0, err
  got = losses(tmp_path / "unrolled")
  # NF4 rounds the base weights: the losses follow the full-precision LoRA run closely
  for step, loss in reference.items():
    assert abs(got[step] - loss) / loss < 0.05
  assert os.path.isfile(tmp_path / "unrolled" / "adapter" / "adapter.safetensors")
  # scanned, each layer's weights are quantized on their own as unrolled: the same run
  code, out, err = lora_train(tmp_path / "scanned", corpus, base, arg=",quantize=nf4",
                              scan_layers=True)
  assert code == 0, err
  scanned = losses(tmp_path / "scanned")
  np.testing.assert_allclose([scanned[s] for s in sorted(got)], [got[s] for s in sorted(got)],
                             atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arg,words", [
    (",quantize=nf5", "lora.quantize"),
    (",targets=q_projj", "unknown LoRA target"),
])
def test_bad_lora_config_is_one_line(arg, words, corpus, base, tmp_path):  # noqa: F811
  code, out, err = lora_train(tmp_path, corpus, base, arg=arg)
  assert code == 2 and words in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1


def test_lora_needs_a_checkpoint(corpus, tmp_path):  # noqa: F811
  code, out, err = run_config(tmp_path, "configs/lora.py:shrink",
                              lora_flags(corpus, "", **{"data.vocab_size": 512}))
  assert code == 2 and "init_from" in err and len(err.strip().splitlines()) == 1
