"""Training metrics: a JSON-lines log plus TensorBoard scalars, a loss plot, FLOPs and MFU.

`MetricsWriter` appends one JSON object per logged step to `workdir/metrics.jsonl` and writes
the same scalars as TensorBoard event files under `workdir/tensorboard/`. Each line is flushed
as it is written, so a killed run keeps its log; a resumed run calls `truncate_after(step)`
first, so the steps it repeats are not logged twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

from zoo import paths
from zoo.errors import ZooError
from zoo.models.config import LlamaConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file, skipping a line that a killed run left half-written."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        records.append(record)
  return records


class MetricsWriter:
  """Appends {"step": step, **metrics} to workdir/metrics.jsonl and to TensorBoard.

  With enabled=False (processes other than the primary one) every method does nothing and no
  file is created. Files are opened on the first write, so that `truncate_after` can run first.
  A gs:// workdir's files are written in a local `zoo.paths.Mirror` and uploaded by `sync`
  (the loop calls it at each checkpoint) and `close`.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.mirror = paths.Mirror(workdir) if enabled else None
    local = self.mirror.local if enabled else workdir
    if enabled:
      self.mirror.pull(METRICS_FILE)
    self.path = os.path.join(local, METRICS_FILE)
    self.tensorboard_dir = os.path.join(local, TENSORBOARD_DIR)
    self._file = None
    self._tb = None
    self._purge_step = None

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Logs scalar `metrics` (floats, numpy or JAX scalars) for `step`."""
    if not self.enabled:
      return
    if "step" in metrics:
      raise ValueError("a metric cannot be named 'step'")
    step = int(step)
    values = {name: float(value) for name, value in metrics.items()}
    if self._file is None:
      self._file = self._open_log()
    self._file.write(json.dumps({"step": step, **values}) + "\n")
    self._file.flush()
    tb = self._tensorboard()
    for name, value in values.items():
      tb.add_scalar(name, value, step)
    tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops logged records with a step > `step`, in the log and (for TensorBoard) on display.

    The log is rewritten through a temporary file; TensorBoard events cannot be removed from
    earlier files, so the next event file starts with a purge marker that makes TensorBoard
    hide their points after `step`.
    """
    if not self.enabled:
      return
    self._close_log()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._purge_step = int(step) + 1
    if not os.path.exists(self.path):
      return
    kept = [r for r in read_metrics(self.path) if r["step"] <= step]
    tmp = f"{self.path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)

  def plot(self, name: str) -> None:
    """The loss plot (`plot_losses`) of the log so far, as `name` in the workdir."""
    if self.enabled:
      plot_losses(self.path, os.path.join(self.mirror.local, name))

  def sync(self) -> None:
    """Uploads what changed to a gs:// workdir (a local one has it already)."""
    if not self.enabled:
      return
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    self.mirror.sync()

  def close(self) -> None:
    if not self.enabled:
      return
    self._close_log()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self.mirror.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _open_log(self):
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    partial = False
    if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        partial = f.read(1) != b"\n"
    f = open(self.path, "a", encoding="utf-8")
    if partial:  # a run killed mid-line left half a record; start ours on a line of its own
      f.write("\n")
    return f

  def _close_log(self):
    if self._file is not None:
      self._file.close()
      self._file = None

  def _tensorboard(self):
    if self._tb is None:
      self._tb = SummaryWriter(self.tensorboard_dir, purge_step=self._purge_step)
    return self._tb


def smooth(values: list[float], weight: float) -> list[float]:
  """An exponential moving average with bias correction (as TensorBoard smooths): the first
  points are not pulled towards zero."""
  out, avg = [], 0.0
  for i, v in enumerate(values):
    avg = weight * avg + (1 - weight) * v
    out.append(avg / (1 - weight ** (i + 1)))
  return out


def plot_losses(metrics_jsonl_path: str, png_path: str) -> None:
  """A PNG of the train loss at every step (faint) and smoothed, with the eval loss points,
  against step, from a metrics log.

  Drawn with matplotlib's Agg canvas (no display needed) into a temporary file, then renamed
  into place, so a reader never sees half a PNG.
  """
  if not os.path.exists(metrics_jsonl_path):
    raise ZooError(f"no metrics log at {metrics_jsonl_path}")
  series: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}}
  for record in read_metrics(metrics_jsonl_path):
    if "eval_loss" not in record and "eval_dpo_loss" in record:  # a preference run's eval
      record = dict(record, eval_loss=record["eval_dpo_loss"])
    for key, points in series.items():
      if isinstance(record.get(key), (int, float)):
        points[record["step"]] = float(record[key])  # a repeated step: the last one wins

  fig = Figure(figsize=(8, 5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  train = series["loss"]
  if train:
    steps = sorted(train)
    values = [train[s] for s in steps]
    # about a fiftieth of the run per time constant: the trend without hiding a spike
    weight = 1 - 1 / max(1.0, len(steps) / 50)
    ax.plot(steps, values, "-", color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth(values, weight), "-", color="tab:blue", label="train loss")
  if series["eval_loss"]:
    steps = sorted(series["eval_loss"])
    ax.plot(steps, [series["eval_loss"][s] for s in steps], "o-", color="tab:orange",
            label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per token)")
  ax.grid(alpha=0.3)
  if any(series.values()):
    ax.legend()
  tmp = f"{png_path}.tmp{os.getpid()}"
  fig.savefig(tmp, format="png")
  os.replace(tmp, png_path)


def flops_per_token(config: LlamaConfig, seq_len: int, *, causal: bool = True) -> float:
  """Training FLOPs per token (forward + backward), by MaxText's convention.

  With d = hidden_size, f = intermediate_size, q = num_heads * head_dim, kv = num_kv_heads *
  head_dim, V = vocab_size, L = num_layers, T = seq_len:

    weights = L * (d*q + 2*d*kv + q*d + ffn) + d*V     (multiply-adds per token)
      ffn = 3*d*f for a dense MLP; d*E + k*3*d*f for a MoE of E experts, k active per token
      (the router plus the active experts only). d*V is the lm head (or the tied embedding used
      as one); the embedding lookup is a gather and costs nothing.
    attention = sum over layers of 4 * keys * q, keys = T, or min(window, T) on sliding layers
      (q.k scores and the weighted sum of values, 2 FLOPs per multiply-add), halved when causal.

    flops_per_token = 6 * weights + 3 * attention

  6 = 2 FLOPs per multiply-add x 3 for forward and backward (the backward pass does two matmuls
  per forward matmul). Biases, norms, RoPE, activations and softmax are not counted.
  causal=False counts every score, as a dense implementation computes them.
  """
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
    raise ZooError(f"seq_len must be a positive integer, got {seq_len!r}")
  c = config
  d, f = c.hidden_size, c.intermediate_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  if c.num_experts:
    ffn = d * c.num_experts + c.num_experts_per_tok * 3 * d * f
  else:
    ffn = 3 * d * f
  weights = c.num_layers * (d * q + 2 * d * kv + q * d + ffn) + d * c.vocab_size
  keys = sum(min(c.layer_window(i) or seq_len, seq_len) for i in range(c.num_layers))
  attention = 4 * keys * q / (2 if causal else 1)
  return float(6 * weights + 3 * attention)


def measure_peak_flops(n: int = 2048, repeats: int = 3) -> dict[str, float | None]:
  """This machine's measured float32 matmul rate, FLOP/s: the best of JAX, numpy and torch.

  Each times an n x n x n matmul (2 n^3 FLOPs) `repeats` times after a warm-up and keeps its
  fastest; JAX runs jitted on the default device at default precision and is waited for.
  Returns {"peak_flops": best, "jax": ..., "numpy": ..., "torch": ... or None without torch}.
  """
  flops = 2.0 * n ** 3
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)

  def rate(fn):
    fn()  # warm-up: compilation, thread pools, page faults
    best = math.inf
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - start)
    return flops / max(best, 1e-12)

  ja, jb = jax.device_put(a), jax.device_put(b)
  dot = jax.jit(jnp.dot)
  results: dict[str, float | None] = {
    "jax": rate(lambda: dot(ja, jb).block_until_ready()),
    "numpy": rate(lambda: a @ b),
    "torch": None,
  }
  try:
    import torch
  except ImportError:
    pass
  else:
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    results["torch"] = rate(lambda: torch.matmul(ta, tb))
  results["peak_flops"] = max(v for v in results.values() if v is not None)
  return results


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
  """Model FLOPs utilisation: the fraction of `peak_flops` that the model's FLOPs use."""
  if not peak_flops > 0:
    raise ZooError(f"peak_flops must be positive, got {peak_flops!r}")
  return tokens_per_sec * flops_per_token / peak_flops
