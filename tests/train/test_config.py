"""Training configs set only fields that something reads, and an override that would be ignored
is an error naming the field."""

import dataclasses
import os

import ml_collections
import pytest
from flax import nnx

from zoo.cli import main
from zoo.errors import ZooError
from zoo.models.config import LlamaConfig
from zoo.train.config import base_config, check_config, load_config
from zoo.train.optim import default_config, make_optimizer
from zoo.train.setup import build, prepare

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO_ROOT, "configs")) if f.endswith(".py"))
TUNING = ("finetune.py", "lora.py")
# Each config with the arguments it documents, alone and shrunk.
ARGS = {
  "finetune.py": ["init_from=/ckpt", "init_from=/ckpt,files=a.jsonl,shrink"],
  "lora.py": ["init_from=/ckpt", "init_from=/ckpt,shrink",
              "init_from=/ckpt,files=a.jsonl,rank=8,alpha=4,targets=q_proj+v_proj,dropout=0.1,"
              "quantize=nf4,remat=none,shrink"],
}


def load(name: str, arg: str | None):
  return load_config(f"configs/{name}" + (f":{arg}" if arg else ""))


def leaves(c, prefix=""):
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def variants():
  for name in CONFIGS:
    for arg in ARGS.get(name, [None, "shrink"]):
      yield name, arg


@pytest.mark.parametrize("name,arg", list(variants()))
def test_shipped_configs_set_only_fields_that_are_read(name, arg):
  config = load(name, arg)
  known = set(leaves(base_config()))
  model_fields = {"preset"} | {f.name for f in dataclasses.fields(LlamaConfig)}
  for field in leaves(config):
    section, _, rest = field.partition(".")
    if section == "model":
      assert rest in model_fields, f"{name}:{arg} sets {field}, which is no model field"
    else:
      assert field in known, f"{name}:{arg} sets {field}, which base_config() does not have"
  if config.init_from:  # the checkpoint's model: nothing under model.* may differ
    assert config.model.to_dict() == base_config().model.to_dict(), (name, arg)
  check_config(config)


def tiny_checkpoint(path):
  assert main(["init", "tiny_llama", str(path), "--set", "num_layers=2", "--set",
               "vocab_size=128", "--set", "hidden_size=64", "--set", "intermediate_size=96",
               "--set", "num_heads=4", "--set", "num_kv_heads=2"]) == 0
  return str(path)


@pytest.mark.parametrize("arg,remat", [("", "full"), (",remat=none", "none"),
                                       (",remat=dots", "dots")])
def test_lora_config_remat_reaches_the_model(arg, remat, tmp_path):
  """configs/lora.py's remat (default full) is the policy of the model that `zoo train` steps."""
  ckpt = tiny_checkpoint(tmp_path / "base")
  config = load("lora.py", f"init_from={ckpt},shrink{arg}")
  trainer = build(prepare(config, str(tmp_path / "run"), with_data=False))
  model = nnx.merge(trainer.graphdef, trainer.lora.adapters, trainer.lora.base)
  assert model.remat == remat


IGNORED = {
  "model_field_with_init_from": ("finetune.py", "init_from={ckpt}",
                                 ["--config.model.vocab_size=256"], "model.vocab_size"),
  "model_preset_with_init_from": ("lora.py", "init_from={ckpt}",
                                  ["--config.model.preset=llama3_8b"], "model.preset"),
  "lora_field_without_rank": ("default.py", "", ["--config.lora.quantize=nf4"], "lora.quantize"),
  "files_without_files_source": ("default.py", "", ["--config.data.files=a.txt"], "data.files"),
  "tfds_name_without_tfds": ("default.py", "", ["--config.data.tfds_name=x"], "data.tfds_name"),
  "vocab_size_with_a_given_tokenizer": ("finetune.py", "init_from={ckpt}",
                                        ["--config.data.vocab_size=4000"], "data.vocab_size"),
  "optimizer_field_misspelt": ("default.py", "", ["--config.optimizer.lr=-1"], "optimizer.lr"),
}


@pytest.mark.parametrize("case", sorted(IGNORED))
def test_an_ignored_override_is_a_one_line_error(case, tmp_path, capsys):
  name, arg, flags, field = IGNORED[case]
  ckpt = tiny_checkpoint(tmp_path / "base")
  config = f"configs/{name}" + (":" + arg.format(ckpt=ckpt) if arg else "")
  assert main(["train", "--config", config, "--workdir", str(tmp_path / "run"), *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and field in err[0], err
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_config_file_that_adds_a_field_is_an_error():
  config = base_config()
  config.model.remat = "full"  # remat is a top-level field, not a model field
  with pytest.raises(ZooError, match="model.remat"):
    check_config(config)
  config = base_config()
  config.train.stepz = 3
  with pytest.raises(ZooError, match="train.stepz"):
    check_config(config)


def test_one_table_of_optimizer_defaults():
  assert base_config().optimizer.to_dict() == default_config().to_dict()
  with pytest.raises(ZooError, match="optimizer.learning_rate"):
    make_optimizer({"learning_rate": 1e-3}, 10)


@pytest.mark.parametrize("types,scanned", [
    (("full_attention", "sliding_attention") * 2, True),  # a repeating pair: scanned
    (("full_attention",) + ("sliding_attention",) * 3, False),  # no repeat: unrolled, a note
])
def test_scan_layers_reaches_the_model_or_falls_back_with_a_note(types, scanned, tmp_path,
                                                                 capsys):
  config = load_config("configs/default.py", {
      "scan_layers": True, "model.num_layers": 4, "model.sliding_window": 8,
      "model.layer_types": types, "model.vocab_size": 128})
  run = prepare(config, str(tmp_path), with_data=False)
  assert run.scan_layers == scanned
  trainer = build(run)
  model = nnx.merge(trainer.graphdef, trainer.abstract_state["params"])
  assert hasattr(model, "stack") == scanned
  err = capsys.readouterr().err
  assert ("run unrolled" in err) == (not scanned)
