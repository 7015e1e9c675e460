"""Plain helpers shared by test modules (fixtures live in conftest.py; helpers that need torch
or transformers, in references.py)."""

import json
import os
import subprocess
import sys
import time

import ml_dtypes  # noqa: F401  (lets safetensors' numpy reader return bfloat16)
import numpy as np
from safetensors.numpy import load_file

from zoo.cli import REPO_ROOT
from zoo.train.config import load_config


def tokens(batch=2, length=40, vocab=128, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


# `zoo train` in a subprocess, with a tiny model on the `corpus` fixture (conftest.py).

def flags(corpus, **overrides) -> list[str]:
  """Small, fast settings for the default config, plus any overrides."""
  values = {"data.source": "files", "data.files": corpus["files"],
            "data.data_dir": corpus["data_dir"], "data.vocab_size": 512, "data.seq_len": 32,
            "data.batch_size": 8, "model.hidden_size": 32, "model.intermediate_size": 64,
            "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
            "model.head_dim": 8, "train.steps": 12, "train.log_every": 1,
            "train.eval_every": 0, "train.checkpoint_every": 2, "train.keep_checkpoints": 10,
            "train.sample_tokens": 0, "train.peak_flops": 1e12, "optimizer.warmup_steps": 2}
  values.update(overrides)
  return [f"--config.{k}={v}" for k, v in values.items()]


def small_config(corpus, **overrides):
  """The config `flags(corpus, **overrides)` gives `zoo train`, loaded, for in-process runs."""
  defaults = load_config("configs/default.py")
  values = {}
  for arg in flags(corpus, **overrides):
    name, value = arg[len("--config."):].split("=", 1)
    section, field = name.split(".")
    values[name] = type(defaults[section][field])(value)
  return load_config("configs/default.py", values)


def zoo_train(workdir, *args, wait=True, config="configs/default.py"):
  cmd = [sys.executable, "-m", "zoo.cli", "train", "--config", config,
         "--workdir", str(workdir), *args]
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  if wait:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err
  return proc


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows if "loss" in r]
  assert len(steps) == len(set(steps)), "a resumed run must not log a step twice"
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for_step(proc, workdir, step, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()}")
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(line).get("step", 0) >= step for line in f if line.strip()):
          return
    time.sleep(0.05)
  raise AssertionError(f"step {step} not reached")


# Checkpoint files.

def edit_json(path, **changes):
  """Sets fields of the JSON object in `path` (None removes one)."""
  with open(path) as f:
    data = json.load(f)
  for key, value in changes.items():
    if value is None:
      data.pop(key, None)
    else:
      data[key] = value
  with open(path, "w") as f:
    json.dump(data, f)


def hf_tensors(directory) -> dict[str, np.ndarray]:
  """All tensors of an HF directory, read with the safetensors library."""
  out = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, name)))
  return out


def assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name
