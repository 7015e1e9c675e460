"""Shared fixtures, and the environment every test (and every process a test starts) runs in.

Plain helpers are in helpers.py; the torch and transformers references in references.py, so
that a test module needing neither runs where they are not installed.
"""

from __future__ import annotations

import os

# Before jax is imported. The tests' meshes are 8 host CPU devices: on a machine with an
# accelerator, jax would otherwise pick that, with its own device count.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import glob  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from zoo.cli import REPO_ROOT  # noqa: E402


@pytest.fixture
def save_hf(tmp_path):
  """save_hf(model, name="hf", **save_kwargs) -> directory with the saved model."""
  def save(model, name="hf", **kwargs):
    path = tmp_path / name
    model.save_pretrained(path, **kwargs)
    return str(path)
  return save


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small corpus (zoo's own source) and a shared data dir, so datasets build once."""
  root = tmp_path_factory.mktemp("corpus")
  for path in glob.glob(os.path.join(REPO_ROOT, "zoo", "**", "*.py"), recursive=True):
    shutil.copy(path, root / (os.path.relpath(path, REPO_ROOT).replace(os.sep, "_")))
  return {"files": str(root / "*.py"), "data_dir": str(tmp_path_factory.mktemp("data"))}
