"""`zoo launch`: the local backend (N processes through the same job and watchdog code as a TPU
VM), its watchdog and restarts, and the gcloud commands of the TPU backend (--dry-run)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import flags, losses
from zoo.cli import REPO_ROOT
from zoo.launch import Shell, Status, watch

STEPS = 40


def launch(*args, wait=True, env=None):
  cmd = [sys.executable, "-m", "zoo.cli", "launch", *map(str, args)]
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, XLA_FLAGS="", **(env or {})))
  if wait:
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err
  return proc


def local_run(workdir, corpus, *launcher_args, wait=True):
  return launch("run", "--backend", "local", "--processes", 2, "--cpu-devices", 2,
                "--poll", 0.2, *launcher_args, "configs/default.py", "--workdir", workdir,
                *flags(corpus, **{"train.steps": STEPS, "train.checkpoint_every": 5,
                                  "train.keep_checkpoints": 20}), wait=wait)


def heartbeat(workdir, i):
  try:
    with open(os.path.join(workdir, "heartbeat", f"process_{i}.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def wait_for(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    beats = [heartbeat(workdir, i) for i in range(2)]
    if all(b and b["step"] >= step for b in beats):
      return beats
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  raise AssertionError(f"no step {step} within {timeout} s")


def alive(pid) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("launch")
  code, out, err = local_run(workdir, corpus)
  assert code == 0, err
  return workdir, losses(workdir)


@pytest.mark.slow
def test_local_launch_trains_and_checkpoints(reference):
  workdir, ref = reference
  assert sorted(ref) == list(range(1, STEPS + 1))
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert steps[-1] == STEPS
  for i in range(2):  # each process logged, and beat until the last step
    assert os.path.getsize(workdir / "logs" / f"worker_{i}.log") > 0
    assert heartbeat(workdir, i)["step"] == STEPS


@pytest.mark.slow
def test_a_dead_worker_stops_the_job(corpus, tmp_path):
  proc = local_run(tmp_path, corpus, "--grace", 3, wait=False)
  beats = wait_for(tmp_path, 3, proc)
  os.kill(beats[1]["pid"], signal.SIGKILL)
  start = time.time()
  out, err = proc.communicate(timeout=120)
  assert proc.returncode != 0 and time.time() - start < 60
  assert "process 1 exited" in err and "giving up" in err
  assert not alive(beats[0]["pid"])  # the survivor was stopped, not left waiting


@pytest.mark.slow
def test_a_stalled_worker_stops_the_job(corpus, tmp_path):
  proc = local_run(tmp_path, corpus, "--heartbeat-timeout", 5, "--grace", 2, wait=False)
  beats = wait_for(tmp_path, 3, proc)
  os.kill(beats[1]["pid"], signal.SIGSTOP)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 124, err
  assert "made no progress" in err
  assert not alive(beats[0]["pid"]) and not alive(beats[1]["pid"])


@pytest.mark.slow
def test_restart_resumes_to_the_same_losses(reference, corpus, tmp_path):
  _, ref = reference
  proc = local_run(tmp_path, corpus, "--restart", 1, wait=False)
  beats = wait_for(tmp_path, 12, proc)
  os.kill(beats[0]["pid"], signal.SIGKILL)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  assert "restarting from the latest checkpoint" in err
  assert "resuming from the checkpoint" in open(tmp_path / "logs" / "worker_0.log").read()
  assert losses(tmp_path) == ref  # every step, bit for bit


def test_tpu_commands_dry_run(tmp_path):
  code, out, err = launch("create", "--name", "zoo-test", "--zone", "us-central2-b",
                          "--tpu-type", "v5litepod-16", "--spot", "--dry-run")
  assert code == 0, err
  assert out.strip() == ("gcloud compute tpus tpu-vm create zoo-test "
                         "--accelerator-type=v5litepod-16 --version=tpu-ubuntu2204-base "
                         "--zone=us-central2-b --spot")
  code, out, err = launch("create", "--name", "q", "--zone", "z", "--tpu-type", "v4-32",
                          "--queued", "--dry-run")
  assert "queued-resources create q --node-id=q --accelerator-type=v4-32" in out
  code, out, err = launch("run", "--name", "zoo-test", "--zone", "us-central2-b", "--dry-run",
                          "configs/default.py", "--workdir", "gs://bucket/run",
                          "--config.train.steps=100")
  assert code == 0, err
  lines = out.strip().splitlines()
  assert any("tpu-vm scp --recurse" in line and line.endswith("--zone=us-central2-b")
             for line in lines)
  start = [line for line in lines if "nohup zoo train" in line]
  assert len(start) == 1 and "--worker=all" in start[0]
  assert "--config configs/default.py --workdir gs://bucket/run --config.train.steps=100" \
      in start[0]
  assert any("describe zoo-test" in line for line in lines)
  for action in ("setup", "logs", "status", "stop", "delete", "ssh"):
    code, out, err = launch(action, "--name", "n", "--zone", "z", "--dry-run")
    assert code == 0 and out.startswith("gcloud compute tpus"), (action, err)


@pytest.mark.parametrize("args,words", [
  (["create", "--name", "n", "--zone", "z", "--tpu-type", "v9-8"], "unknown TPU type 'v9-8'"),
  (["run", "--backend", "local", "configs/nope.py", "--workdir", "/tmp/x"],
   "config file configs/nope.py does not exist"),
  (["run", "--backend", "local", "configs/default.py"], "needs --workdir"),
  (["status", "--name", "n"], "needs --name and --zone"),
  (["status", "--name", "n", "--zone", "z"], "gcloud is not installed"),
])
def test_bad_launch_input_is_one_line(args, words, tmp_path):
  # no gcloud on PATH: its absence is one of the errors
  code, out, err = launch(*args, env={"PATH": str(tmp_path)})
  assert code == 2
  assert words in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture
def fake_gcloud(tmp_path):
  """`gcloud` on PATH is tests/fake_gcloud.py: a one-worker TPU VM that is this machine."""
  bin_dir, home = tmp_path / "bin", tmp_path / "tpu-home"
  bin_dir.mkdir()
  home.mkdir()
  script = bin_dir / "gcloud"
  script.write_text(f"#!/bin/sh\nexec {sys.executable} {REPO_ROOT}/tests/fake_gcloud.py "
                    '"$@"\n')
  script.chmod(0o755)
  return home, {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_TPU_HOME": str(home)}


@pytest.mark.slow
def test_tpu_run_recreates_a_preempted_spot_vm_and_resumes(corpus, fake_gcloud, tmp_path):
  home, env = fake_gcloud
  code, out, err = launch("create", "--name", "t", "--zone", "z", "--tpu-type", "v4-8",
                          "--spot", env=env)
  assert code == 0, err
  workdir = tmp_path / "run"
  proc = launch("run", "--name", "t", "--zone", "z", "--poll", 0.3, "--restart", 1,
                "--recreate-type", "v4-8", "configs/default.py", "--workdir", workdir,
                *flags(corpus, **{"train.steps": STEPS, "train.checkpoint_every": 5}),
                wait=False, env=env)
  beat_path = home / "zoo-heartbeat" / "process_0.json"
  deadline = time.time() + 300
  while time.time() < deadline:
    beat = json.loads(beat_path.read_text()) if beat_path.exists() else None
    if beat and beat["step"] >= 6:
      break
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  # the spot VM goes away, and its worker with it
  (home / "state").write_text("PREEMPTED")
  os.kill(beat["pid"], signal.SIGKILL)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  assert "creating it again" in err
  calls = (home / "calls.log").read_text().splitlines()
  assert sum(c.startswith("compute tpus tpu-vm create t ") for c in calls) == 2
  assert any(c.startswith("compute tpus tpu-vm delete t ") for c in calls)
  log = (home / "zoo-train.log").read_text()
  assert "resuming from the checkpoint" in log
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))


def test_unreachable_workers_are_one_line(fake_gcloud):
  home, env = fake_gcloud
  code, out, err = launch("setup", "--name", "t", "--zone", "z",
                          env=dict(env, FAKE_TPU_UNREACHABLE="1"))
  assert code == 2 and "Traceback" not in err
  # gcloud's own message, then zoo's one line naming the command that failed
  lines = err.strip().splitlines()
  assert lines[-1].startswith("zoo: error: `gcloud compute tpus tpu-vm ssh t")
  assert "failed with exit status 1" in lines[-1]


class ScriptedJob:
  """A backend for the watchdog that answers each look with the next Status of a script."""

  def __init__(self, *looks):
    self.shell, self.looks, self.calls = Shell(), iter(looks), []
    self.done_message, self.logs = "all done", "the logs"

  def start(self, attempt):
    self.calls.append(f"start {attempt}")

  def check(self):
    return next(self.looks)

  def stop(self, grace):
    self.calls.append(f"stop {grace:g}")

  def recover(self):
    self.calls.append("recover")


def scripted_watch(job, **kwargs):
  return watch(job, **{**dict(heartbeat_timeout=60, startup_timeout=600, grace=2, poll=0),
                       **kwargs})


def test_watchdog_restarts_after_a_failure_then_gives_up_on_a_stall(capsys):
  fresh = {"step": 3, "time": time.time() + 3600, "pid": 1, "done": False}
  stale = {"step": 5, "time": time.time() - 61, "pid": 1, "done": False}
  job = ScriptedJob(Status(working={0: None, 1: fresh}),  # process 0 is still starting
                    Status(failure=("process 1 exited with status 3", 3)),
                    Status(working={0: fresh, 1: stale}))
  assert scripted_watch(job, restart=1) == 124
  assert job.calls == ["start 0", "stop 2", "recover", "start 1", "stop 2"]
  err = capsys.readouterr().err.splitlines()
  assert err[0] == "zoo launch: process 1 exited with status 3; stopping the job"
  assert err[1] == "zoo launch: restarting from the latest checkpoint (restart 1 of 1)"
  assert err[2].startswith("zoo launch: process 1 made no progress for 6")
  assert err[3] == "zoo launch: giving up after 2 attempt(s); logs in the logs"


def test_watchdog_startup_timeout_and_finish(capsys):
  job = ScriptedJob(Status(working={0: None}), Status(finished=True))
  assert scripted_watch(job, restart=0) == 0
  assert capsys.readouterr().out == "zoo launch: all done\n"
  # before its first beat a process gets the startup timeout, then it is stalled
  job = ScriptedJob(Status(working={0: None}))
  assert scripted_watch(job, restart=0, startup_timeout=0, poll=0.01) == 124
  assert "process 0 made no progress" in capsys.readouterr().err
  # a failure without an exit status (a TPU job that ended) gives up with 1
  job = ScriptedJob(Status(failure=("the job ended before finishing", None)))
  assert scripted_watch(job, restart=0) == 1
