"""Metrics log, TensorBoard events, loss plot, FLOPs per token (against XLA) and MFU."""

from __future__ import annotations

import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from zoo.errors import ZooError
from zoo.models.config import LlamaConfig
from zoo.models.llama import Llama, param_shapes
from zoo.models.presets import get_preset
from zoo.train.metrics import (MetricsWriter, flops_per_token, measure_peak_flops, mfu,
                               plot_losses, read_metrics)


def read_events(logdir: str) -> list:
  """Every Event in the TFRecord files under `logdir`, decoded with tensorboardX's protobuf."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      pos += 12  # length, then its crc
      event = event_pb2.Event()
      event.ParseFromString(data[pos:pos + length])
      events.append(event)
      pos += length + 4  # data, then its crc
    assert pos == len(data), f"trailing bytes in {path}"
  return events


def scalars(logdir: str) -> dict[str, dict[int, float]]:
  out: dict[str, dict[int, float]] = {}
  for event in read_events(logdir):
    for value in event.summary.value:
      out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def test_jsonl_and_tensorboard_hold_what_was_written(tmp_path):
  workdir = str(tmp_path / "run")
  writer = MetricsWriter(workdir)
  written = {1: {"loss": 5.25, "lr": 1e-4}, 2: {"loss": np.float32(4.5), "lr": jnp.float32(2e-4)},
             4: {"loss": 3.75, "eval_loss": 4.0, "mfu": 0.125}}
  for step, m in written.items():
    writer.write(step, m)
    # Each line is on disk as soon as it is written, before close().
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      assert json.loads(f.readlines()[-1])["step"] == step
  writer.close()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert lines == [{"step": s, **{k: pytest.approx(float(v)) for k, v in m.items()}}
                   for s, m in written.items()]
  got = scalars(os.path.join(workdir, "tensorboard"))
  assert set(got) == {"loss", "lr", "eval_loss", "mfu"}
  assert got["loss"] == {1: 5.25, 2: 4.5, 4: 3.75}
  assert got["lr"] == {1: pytest.approx(1e-4), 2: pytest.approx(2e-4)}
  assert got["eval_loss"] == {4: 4.0}


def test_truncate_after_for_a_resumed_run(tmp_path):
  workdir = str(tmp_path)
  with MetricsWriter(workdir) as writer:
    for step in range(1, 7):
      writer.write(step, {"loss": 10.0 - step})
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "lo')  # killed mid-line
  # The resumed run restarts from the checkpoint at step 4 and logs steps 5.. again.
  with MetricsWriter(workdir) as writer:
    writer.truncate_after(4)
    assert [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3, 4]
    for step in range(5, 8):
      writer.write(step, {"loss": 100.0 + step})
  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == list(range(1, 8))
  assert [r["loss"] for r in records] == [9.0, 8.0, 7.0, 6.0, 105.0, 106.0, 107.0]
  # The new event file tells TensorBoard to hide the old points after step 4.
  events = read_events(os.path.join(workdir, "tensorboard"))
  purges = [e for e in events if e.HasField("session_log")]
  assert len(purges) == 1 and purges[0].step == 5
  assert purges[0].session_log.status == purges[0].session_log.START


def test_appending_after_a_half_written_line_keeps_lines_separate(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  with MetricsWriter(str(tmp_path)) as writer:
    writer.write(3, {"loss": 1.5})
  assert read_metrics(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 1.5}]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = MetricsWriter(str(workdir), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.truncate_after(0)
  writer.close()
  assert not workdir.exists()


def test_plot_losses_writes_a_png(tmp_path):
  log = tmp_path / "metrics.jsonl"
  with MetricsWriter(str(tmp_path)) as writer:
    for step in range(1, 51):
      record = {"loss": 5 * math.exp(-step / 20), "lr": 1e-3}
      if step % 10 == 0:
        record["eval_loss"] = 5.2 * math.exp(-step / 20)
      writer.write(step, record)
  png = tmp_path / "loss.png"
  plot_losses(str(log), str(png))
  data = png.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(data) > 10_000
  image = matplotlib.image.imread(str(png))
  assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
  assert image.std() > 0.05  # lines, not a blank canvas
  assert set(os.listdir(tmp_path)) == {"metrics.jsonl", "tensorboard", "loss.png"}  # no temp file
  with pytest.raises(ZooError, match="no metrics log"):
    plot_losses(str(tmp_path / "missing.jsonl"), str(png))


def _activation_elements(c: LlamaConfig, t: int) -> int:
  """Activation elements per token that non-matmul ops touch: scores, MLP hidden, residual
  stream, q/k/v, router logits."""
  e = max(c.num_experts, 1)
  return (c.num_layers * (c.num_heads * t + e * c.intermediate_size + 2 * c.hidden_size
                          + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_experts)
          + c.hidden_size)


BASE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
            num_kv_heads=2)


@pytest.mark.parametrize("name,config,moe_impl", [
  ("dense", LlamaConfig(**BASE), "ragged"),
  ("tied+bias", LlamaConfig(**BASE, tie_word_embeddings=True, qkv_bias=True), "ragged"),
  # The dense MoE runs every expert: XLA sees k = E.
  ("moe", LlamaConfig(**{**BASE, "intermediate_size": 256}, family="mixtral", num_experts=4,
                      num_experts_per_tok=4), "dense"),
], ids=["dense", "tied+bias", "moe"])
def test_flops_per_token_matches_xla(name, config, moe_impl):
  """3 x XLA's forward FLOPs per token = flops_per_token(causal=False) + 3 * eps.

  XLA counts 2*m*n*k for every dot, which is exactly what flops_per_token counts (the
  attention computes all T x T scores and masks them, so causal=False), plus 1 FLOP or so per
  element of each elementwise op (norms, RoPE, SiLU, softmax, residuals, biases). That excess
  eps lies between 1 and 8 FLOPs per activation element (_activation_elements; about 5 in
  practice); a missing matmul or halved attention is off by far more than 8 per element.
  """
  t, b = 128, 1
  model = Llama(config, rngs=nnx.Rngs(0), moe_impl=moe_impl)
  graphdef, state = nnx.split(model)

  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  cost = jax.jit(forward).lower(state, jnp.zeros((b, t), jnp.int32)).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  xla = cost["flops"] / (b * t)
  ours = flops_per_token(config, t, causal=False)
  eps = xla - ours / 3
  elements = _activation_elements(config, t)
  assert elements <= eps <= 8 * elements, (name, xla, ours / 3, eps / elements)
  # What each of the missing pieces would cost, so the bound above is tight enough to see them.
  d, q = config.hidden_size, config.num_heads * config.head_dim
  assert 8 * elements < 2 * d * config.vocab_size  # the lm head
  assert 8 * elements < 2 * t * q * config.num_layers  # half the attention
  assert 8 * elements < 2 * d * config.intermediate_size  # one MLP matmul


def test_causal_halves_attention_only():
  c = LlamaConfig(**BASE)
  t = 256
  diff = flops_per_token(c, t, causal=False) - flops_per_token(c, t)
  # MaxText: 4 * T * heads * head_dim per layer, x3 for training, halved when causal.
  assert diff == 3 * 4 * t * c.num_heads * c.head_dim * c.num_layers / 2


def test_moe_counts_the_router_and_active_experts_by_hand():
  c = get_preset("tiny_mixtral")  # d 64, f 96, 2 layers, 4 heads, 2 kv heads, E 4, k 2, V 512
  t = 128
  attn_proj = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o = 12288
  ffn = 64 * 4 + 2 * 3 * 64 * 96  # router + 2 active SwiGLU experts = 37120
  weights = 2 * (attn_proj + ffn) + 64 * 512  # + lm head = 131584
  attention = 2 * 4 * 128 * 64 / 2  # layers x 4 x keys x q, causal = 32768
  assert 6 * weights + 3 * attention == 887808
  assert flops_per_token(c, t) == 887808
  # The same from the model's own parameter tree: every kernel is one matmul per token, the
  # stacked experts count k/E of their weights.
  active = 0
  for name, shape in param_shapes(c).items():
    if name.endswith(".kernel") and "embed" not in name:
      active += math.prod(shape)
    elif ".experts." in name:
      active += math.prod(shape) * c.num_experts_per_tok // c.num_experts
  assert flops_per_token(c, t) == 6 * active + 3 * attention
  assert flops_per_token(c.replace(num_experts_per_tok=4), t) == 887808 + 6 * 2 * 2 * 3 * 64 * 96


def test_tied_embeddings_and_sliding_window_by_hand():
  tied = get_preset("tiny_qwen2")  # tied: the embedding is the output projection
  untied = tied.replace(tie_word_embeddings=False)
  assert flops_per_token(tied, 64) == flops_per_token(untied, 64)
  mistral = get_preset("tiny_mistral")  # window 16 on both layers
  full = mistral.replace(sliding_window=None)
  q = mistral.num_heads * mistral.head_dim
  assert (flops_per_token(full, 128) - flops_per_token(mistral, 128)
          == 3 * 4 * (128 - 16) * q * mistral.num_layers / 2)
  assert flops_per_token(mistral, 8) == flops_per_token(full, 8)  # window longer than the text
  with pytest.raises(ZooError, match="seq_len"):
    flops_per_token(mistral, 0)


def test_measure_peak_flops():
  result = measure_peak_flops(n=384, repeats=2)
  assert set(result) == {"peak_flops", "jax", "numpy", "torch"}
  rates = [result[k] for k in ("jax", "numpy", "torch")]
  assert all(r is not None and 1e6 < r < 1e16 for r in rates)
  assert result["peak_flops"] == max(rates)


def test_mfu():
  assert mfu(1000.0, 6e6, 1.2e10) == pytest.approx(0.5)
  with pytest.raises(ZooError, match="peak_flops"):
    mfu(1000.0, 6e6, 0.0)


@pytest.mark.slow
def test_throughput_at_eval_and_checkpoint_steps(corpus, tmp_path):
  """tokens_per_sec and MFU are the steps' own: the eval and the checkpoint save at the steps
  that keep the state, and compilation, are timed and logged on their own (eval_seconds,
  checkpoint_seconds, compile_seconds), not spread over the steps around them. Before, with
  each step's metrics read a step late, the step before an eval logged a rate 50-100 times too
  low and the eval step one 50-100 times too high (MFU 2.0 on a CPU). The peak is measured
  (train.peak_flops 0), so MFU is against this machine's own matmul rate."""
  import statistics

  from tests.helpers import flags, zoo_train
  # a model big enough that a step is tens of milliseconds, not scheduling noise
  code, _, err = zoo_train(tmp_path, *flags(corpus, **{
      "model.hidden_size": 128, "model.intermediate_size": 256, "model.head_dim": 32,
      "data.seq_len": 128, "train.steps": 30, "train.eval_every": 10,
      "train.checkpoint_every": 10, "train.eval_batches": 2, "train.peak_flops": 0,
      "train.async_checkpoints": False, "train.log_every": 5}))
  assert code == 0, err
  records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  rates = {r["step"]: r["tokens_per_sec"] for r in records if "tokens_per_sec" in r}
  # Each rate is over the 5 steps since the last log point (on a CPU the host's work shares
  # the cores with the step's, so one step's time alone moves by half either way); the first
  # step, compilation and start-up, is not a rate.
  assert sorted(rates) == [5, 10, 15, 20, 25, 30]
  median = statistics.median(rates.values())
  outliers = {step: round(rate / median, 2) for step, rate in rates.items()
              if not median / 2 <= rate <= median * 2}
  assert not outliers, (median, outliers)
  assert all(0 < r["mfu"] <= 1 for r in records if "mfu" in r)
  timed = {key: sorted(r["step"] for r in records if key in r)
           for key in ("eval_seconds", "checkpoint_seconds")}
  # the first step is saved too (zoo.train.checkpoint.Checkpointer.due)
  assert timed == {"eval_seconds": [10, 20, 30], "checkpoint_seconds": [1, 10, 20, 30]}
  first = [r for r in records if r["step"] == 1][0]
  assert 0 < first["compile_seconds"] < first["first_step_seconds"]
