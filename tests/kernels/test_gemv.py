"""The CPU one-row product kernel against numpy (float64), and its fallback to XLA's product."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.kernels import gemv


def test_the_kernel_builds_here():
  # CI and every development machine have a C++ compiler (llama-cpp-python needs one too).
  assert gemv.available()


@pytest.mark.parametrize("k,n", [(1, 1), (7, 5), (8, 16), (13, 33), (64, 2047), (512, 2049),
                                 (1376, 512), (512, 32000), (1000, 3)])
def test_row_product_matches_numpy(k, n):
  rng = np.random.default_rng(k * 100003 + n)
  x = rng.standard_normal((1, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  got = np.asarray(jax.jit(gemv.row_matmul)(x, w))
  want = x.astype(np.float64) @ w.astype(np.float64)
  # float32 rounding of a k-term sum, relative to the terms' magnitudes
  scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)
  assert got.shape == (1, n) and got.dtype == np.float32
  assert np.all(np.abs(got - want) <= 4 * np.finfo(np.float32).eps * scale + 1e-30)


def test_concurrent_products_in_one_program():
  """Independent products that XLA may run at the same time on the pool's threads."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 300)).astype(np.float32)
  ws = [rng.standard_normal((300, 700 + 50 * i)).astype(np.float32) for i in range(6)]
  got = jax.jit(lambda x, ws: [gemv.row_matmul(x, w) for w in ws])(x, ws)
  for g, w in zip(got, ws):
    np.testing.assert_allclose(np.asarray(g), x @ w, rtol=1e-4, atol=1e-4)


def test_row_matmul_refuses_other_shapes_and_dtypes():
  with pytest.raises(ValueError, match=r"x \[1, K\]"):
    gemv.row_matmul(jnp.ones((2, 4)), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="float32"):
    gemv.row_matmul(jnp.ones((1, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.bfloat16))


def test_missing_compiler_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(OSError, match="no-such-compiler-here"):
    gemv.build()
  gemv.available.cache_clear()
  try:
    with caplog.at_level(logging.WARNING, logger="zoo.kernels.gemv"):
      assert not gemv.available()
    assert "no-such-compiler-here" in caplog.text
  finally:
    gemv.available.cache_clear()
  assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_failing_compile_leaves_no_library(tmp_path, monkeypatch):
  fake = tmp_path / "fakecxx"
  fake.write_text("#!/bin/sh\nfor a; do out=$a; done\necho partial > \"$out\"\n"
                  "echo 'error: broken' >&2\nexit 1\n")
  fake.chmod(0o755)
  monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
  with pytest.raises(subprocess.CalledProcessError):
    gemv.build(str(fake))
  assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
def test_built_library_is_reused(tmp_path, monkeypatch):
  monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
  first = gemv.build()
  stamp = first.stat().st_mtime_ns
  assert gemv.build() == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


@pytest.mark.slow
def test_unwritable_cache_dir_builds_under_the_temporary_directory(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  monkeypatch.setenv("ZOO_CACHE_DIR", str(blocker / "cache"))
  monkeypatch.setattr(gemv.tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  built = gemv.build()
  assert built.parent.parent == tmp_path / "tmp" and built.exists()


def test_zoo_cpu_gemv_0_turns_it_off():
  code = "from zoo.kernels import gemv; print(gemv.available())"
  env = dict(os.environ, ZOO_CPU_GEMV="0", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
