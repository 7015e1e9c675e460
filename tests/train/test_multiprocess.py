"""`zoo train` as several JAX processes on this machine (CPU devices, gloo collectives): the same
losses as one process with as many devices, checkpoints that move between process counts, and
one-line errors for a job described by halves."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import flags, losses
from zoo.cli import REPO_ROOT
from zoo.launch import free_port

pytestmark = pytest.mark.slow  # every test spawns `zoo train` processes

STEPS = 6


def run(workdir, corpus, processes, steps=STEPS, **overrides):  # noqa: F811
  """`zoo train` on `processes` processes of 8 / processes CPU devices each; (returncodes,
  outputs, errors) in process order."""
  values = {"data.shard": "rows", "train.steps": steps, "train.schedule_steps": STEPS,
            "train.checkpoint_every": 3, "train.keep_checkpoints": 10}
  values.update(overrides)
  cmd = [sys.executable, "-m", "zoo.cli", "train", "--config", "configs/default.py",
         "--workdir", str(workdir), "--cpu_devices", str(8 // processes),
         *flags(corpus, **values)]
  env = dict(os.environ, XLA_FLAGS="", OMP_NUM_THREADS="1")
  if processes > 1:
    port = free_port()
    procs = [subprocess.Popen(cmd + ["--coordinator", f"localhost:{port}", "--num_processes",
                                     str(processes), "--process_id", str(i)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
  else:
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
  results = [p.communicate(timeout=600) for p in procs]
  return [p.returncode for p in procs], [r[0] for r in results], [r[1] for r in results]


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):  # noqa: F811
  workdir = tmp_path_factory.mktemp("one")
  codes, _, errors = run(workdir, corpus, 1)
  assert codes == [0], errors[0]
  return losses(workdir)


def close(a: dict, b: dict, tol=1e-5) -> bool:
  return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])) for k in a)


def test_two_processes_give_the_losses_of_one(one_process, corpus, tmp_path):  # noqa: F811
  codes, outs, errors = run(tmp_path, corpus, 2, **{"train.sample_tokens": 4})
  assert codes == [0, 0], errors
  assert "sample:" in outs[0] and "sample:" not in outs[1]  # drawn together, printed once
  got = losses(tmp_path)  # one line per step: only process 0 writes metrics
  assert len(got) == STEPS and close(got, one_process), (got, one_process)
  # every process wrote its part of each checkpoint; the data position is saved per process
  data = sorted(n for n in os.listdir(tmp_path / "checkpoints" / str(STEPS) / "data")
                if n.endswith(".json"))
  assert data == ["process_0-of-2.json", "process_1-of-2.json"]
  # the exported model gathers every shard
  config = json.loads((tmp_path / "model" / "zoo.json").read_text())["config"]
  assert config["num_layers"] == 2


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_checkpoint_moves_between_process_counts(first, then, one_process, corpus,  # noqa: F811
                                                 tmp_path):
  codes, _, errors = run(tmp_path, corpus, first, steps=3)
  assert set(codes) == {0}, errors
  codes, outs, errors = run(tmp_path, corpus, then)
  assert set(codes) == {0}, errors
  assert "resuming from the checkpoint at step 3" in outs[0]
  assert close(losses(tmp_path), one_process), (losses(tmp_path), one_process)


def test_document_sharded_data_restarts_on_another_process_count(corpus, tmp_path):  # noqa: F811
  codes, _, errors = run(tmp_path, corpus, 2, steps=3, **{"data.shard": "documents"})
  assert codes == [0, 0], errors
  codes, outs, errors = run(tmp_path, corpus, 1, **{"data.shard": "documents"})
  assert codes == [0], errors
  assert "resuming from the checkpoint at step 3" in outs[0]
  assert "written by 2 processes" in errors[0] and "the data starts from its beginning" \
      in errors[0]
  assert sorted(losses(tmp_path)) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("args,words", [
  (["--coordinator", "localhost:1"], "needs all of --coordinator, --num_processes"),
  (["--coordinator", "localhost:1", "--num_processes", "2", "--process_id", "2"],
   "--process_id 2 is not in 0..1"),
  (["--cpu_devices", "0"], "--cpu_devices must be positive"),
])
def test_bad_job_flags_are_one_line(args, words, corpus, tmp_path):  # noqa: F811
  cmd = [sys.executable, "-m", "zoo.cli", "train", "--workdir", str(tmp_path), *args,
         *flags(corpus)]
  result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLA_FLAGS=""))
  assert result.returncode == 2
  assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
