"""A two-core one-row matrix product for decoding on the CPU (gemv.cc), built on first use.

A decode step multiplies one row per sequence by every weight matrix, so at batch 1 its time
is the time to stream the weights. XLA:CPU runs each one-row product on a single core; gemv.cc
splits the weight's rows over the cores of XLA's intra-op thread pool. The library is compiled
with the machine's C++ compiler (`$CXX`, else `c++`) against jaxlib's FFI headers, once per
source, jaxlib and CPU, into `$ZOO_CACHE_DIR` (default `~/.cache/zoo`; the temporary directory
where that cannot be written). Without a compiler, or with `ZOO_CPU_GEMV=0`, the products stay
XLA's own (`available()` is False) and results are the same up to float32 summation order.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from zoo.io import staged_file

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.cc")
TARGET = "zoo_row_matmul"


def cache_dir() -> Path:
  return Path(os.environ.get("ZOO_CACHE_DIR") or Path.home() / ".cache" / "zoo")


def _cpu_id() -> str:
  """What -march=native depends on: the CPU's model and feature flags where Linux says."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.machine() + platform.processor()
  keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
  return platform.machine() + "\n".join(sorted(set(keep)))


def build(compiler: str | None = None) -> Path:
  """The compiled library's path, compiling it if this source, jaxlib and CPU have none yet.
  Raises OSError or subprocess.CalledProcessError when it cannot be built."""
  compiler = compiler or os.environ.get("CXX") or "c++"
  exe = shutil.which(compiler)
  if exe is None:
    raise OSError(f"no C++ compiler {compiler!r} on PATH")
  key = hashlib.sha256(b"\0".join([
    SOURCE.read_bytes(), jaxlib.__version__.encode(), exe.encode(), _cpu_id().encode()]))
  name = f"zoo_gemv_{key.hexdigest()[:16]}.so"
  try:
    return _build_into(cache_dir() / name, exe)
  except OSError:  # a read-only cache directory (home): the temporary directory instead
    user = os.getuid() if hasattr(os, "getuid") else 0
    return _build_into(Path(tempfile.gettempdir()) / f"zoo-{user}" / name, exe)


def _build_into(out: Path, exe: str) -> Path:
  """`out`, compiled unless it exists; whole or not at all, also with several processes
  building at once."""
  if not out.exists():
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(str(out), force=True) as tmp:
      _compile(exe, tmp)
  return out


def _compile(exe: str, dst: str) -> None:
  base = [exe, "-O3", "-std=c++17", "-shared", "-fPIC", "-w",
          f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", dst]
  try:
    subprocess.run(base[:1] + ["-march=native"] + base[1:], check=True,
                   capture_output=True, text=True)
  except subprocess.CalledProcessError:  # a compiler without -march=native (some arm64)
    subprocess.run(base, check=True, capture_output=True, text=True)


@functools.cache
def available() -> bool:
  """Whether one-row products can use the kernel: CPU backend, built and registered."""
  if os.environ.get("ZOO_CPU_GEMV", "1") == "0" or jax.default_backend() != "cpu":
    return False
  try:
    lib = ctypes.CDLL(str(build()))
  except (OSError, subprocess.CalledProcessError) as e:
    lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or [type(e).__name__]
    errors = [ln for ln in lines if "error" in ln]
    log.warning("zoo: CPU one-row product kernel not built (%s); using XLA's",
                (errors or lines)[0].strip())
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.ZooRowMatmul), platform="cpu")
  return True


def row_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [1, K] @ w [K, N] in float32 by the kernel (RuntimeError where it is not `available()`)."""
  if x.ndim != 2 or x.shape[0] != 1 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"row_matmul needs x [1, K] and w [K, N], got {x.shape} and {w.shape}")
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    raise ValueError(f"row_matmul is float32 only, got {x.dtype} and {w.dtype}")
  if not available():
    raise RuntimeError("the CPU one-row product kernel is not available in this process")
  out = jax.ShapeDtypeStruct((1, w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out)(x, w)
