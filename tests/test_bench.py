"""tools/bench: the harness's worker processes and protocol, and every mode's command line. No
benchmark runs here; the workers below are trivial functions of this module."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench import cli, harness  # noqa: E402

UNIT_S = 0.02  # what one unit of the sleeper's work takes at least


def sleeper(spec: dict):
  """A `serve` worker: n units of work are n sleeps; run(n) answers n."""
  def run(n: int) -> float:
    for _ in range(n):
      time.sleep(UNIT_S)
    return float(n)

  return run, {"pid": os.getpid(), "name": spec["name"]}


def allocate(spec: dict) -> int:
  """A `call` worker that writes `mb` MB of memory (bytes * n touches every page)."""
  block = b"\x01" * (spec["mb"] * harness.MB)
  return len(block)


def fail(spec: dict):
  raise RuntimeError("this worker fails")


def child_env() -> dict:
  """The children import this module as tests.test_bench: the repository root on their path."""
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


def test_serve_workers_answer_requests_in_turn():
  with tempfile.TemporaryDirectory() as tmp:
    workers = {name: harness.Worker(sleeper, {"name": name, "warmup": 0}, child_env(),
                                    os.path.join(tmp, f"{name}.log"))
               for name in ("a", "b")}
    try:
      assert {w.info["name"] for w in workers.values()} == {"a", "b"}
      pids = {w.info["pid"] for w in workers.values()}
      assert len(pids) == 2 and os.getpid() not in pids  # one process each
      assert all(w.info["first_loss"] == 1.0 for w in workers.values())
      answer = workers["a"].time(4)
      assert answer["loss"] == 4.0 and answer["seconds"] >= 4 * UNIT_S
      rates, shares, dropped = harness.interleave(workers, 3, 2, 5, quiet=2.0)
    finally:
      for w in workers.values():
        w.close()
  assert dropped == 0 and len(shares) == 2
  for name in ("a", "b"):
    assert len(rates[name]) == 2
    # 3 units of at least UNIT_S each for 3 * 5 tokens
    assert all(0 < r <= 5 / UNIT_S for r in rates[name])


def test_call_reports_each_process_own_peak_rss():
  # A child starts from this process's resident size (fork copies it; Linux keeps the mark
  # across exec), so the sizes are set against this process's own peak.
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
  big, run = harness.call(allocate, {"mb": base + 200}, "allocating", child_env())
  assert big == (base + 200) * harness.MB
  assert run.peak_rss_mb >= base + 200
  # a later, smaller child's peak is its own, not the maximum over the children so far
  small, run = harness.call(allocate, {"mb": 1}, "allocating", child_env())
  assert small == harness.MB
  assert run.peak_rss_mb < base + 100


def test_failing_worker():
  with pytest.raises(SystemExit, match="failing"):
    harness.call(fail, {}, "failing", child_env())
  assert harness.probe(fail, {}, child_env()) is None
  assert harness.probe(allocate, {"mb": 1}, child_env()) == harness.MB


def test_median():
  for xs in ([3.0], [5.0, 1.0], [4.0, 1.0, 9.0], [2.0, 8.0, 1.0, 7.0]):
    assert harness.median(xs) == statistics.median(xs)


@pytest.mark.parametrize("argv,expected", [
  (["convert"], dict(size_mb=1000, shards=4, workdir=None, keep=False)),
  (["convert", "--size-mb", "50", "--shards", "2", "--workdir", "/tmp/w", "--keep"],
   dict(size_mb=50, shards=2, workdir="/tmp/w", keep=True)),
  (["train"], dict(steps=5, rounds=7, warmup=3, vocab="2000,32000", batch=8, seq_len=128,
                   dtype="float32", devices=1, ynn_off=False, xla_flags="", no_peer=False)),
  (["train", "--steps", "1", "--rounds", "2", "--warmup", "0", "--vocab", "500", "--batch", "2",
    "--seq-len", "32", "--dtype", "bfloat16", "--devices", "2", "--ynn-off",
    "--xla-flags=--xla_cpu_use_thunk_runtime=false", "--no-peer"],
   dict(steps=1, rounds=2, warmup=0, vocab="500", batch=2, seq_len=32, dtype="bfloat16",
        devices=2, ynn_off=True, xla_flags="--xla_cpu_use_thunk_runtime=false", no_peer=True)),
  (["decode"], dict(batches="1,8", new_tokens=64, prompt_len=16, rounds=5, no_peer=False,
                    no_llamacpp=False)),
  (["decode", "--batches", "1", "--new-tokens", "4", "--prompt-len", "8", "--rounds", "1",
    "--no-peer", "--no-llamacpp"],
   dict(batches="1", new_tokens=4, prompt_len=8, rounds=1, no_peer=True, no_llamacpp=True)),
  (["lora"], dict(steps=3, rank=16, batch=2, seq_len=128, model="medium", remat="full")),
  (["lora", "--steps", "1", "--rank", "4", "--batch", "1", "--seq-len", "16", "--model",
    "small", "--remat", "none"],
   dict(steps=1, rank=4, batch=1, seq_len=16, model="small", remat="none")),
  (["plan"], dict(configs="", no_peer=False, timeout=1800)),
  (["plan", "--configs", "default,lora", "--no-peer", "--timeout", "60"],
   dict(configs="default,lora", no_peer=True, timeout=60)),
])
def test_parser_accepts_the_documented_flags(argv, expected):
  args = cli.build_parser().parse_args(argv)
  assert args.mode == argv[0]
  assert {k: getattr(args, k) for k in expected} == expected


def test_parser_refuses_unknown_model():
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(["lora", "--model", "huge"])


def test_entry_script_imports_the_package():
  """tools/bench.py next to tools/bench/: `import bench` in the script finds the package."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--help"],
                       capture_output=True, text=True, check=True).stdout
  for mode in ("convert", "train", "decode", "lora", "plan"):
    assert mode in out
