"""`zoo train` end to end: every config, exact resume after SIGKILL, preemption, damaged
checkpoints, a new mesh on resume, NaN stops, and one-line errors for bad input."""

import dataclasses
import glob
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

import zoo
from tests.helpers import flags, losses, small_config, wait_for_step, zoo_train
from zoo.cli import REPO_ROOT, main
from zoo.convert.checkpoint import Checkpoint
from zoo.train import loop
from zoo.train.setup import Trainer, prepare

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """An uninterrupted 12-step run."""
  workdir = tmp_path_factory.mktemp("reference")
  code, out, err = zoo_train(workdir, *flags(corpus))
  assert code == 0, err
  return workdir, losses(workdir)


# The decoder layers unrolled (the default config) or stacked and scanned (zoo.models.stack).
LAYOUTS = {"unrolled": {}, "scanned": {"scan_layers": True}}


@pytest.fixture(scope="module")
def scanned_reference(corpus, tmp_path_factory):
  """The same run with scanned layers."""
  workdir = tmp_path_factory.mktemp("scanned")
  code, out, err = zoo_train(workdir, *flags(corpus, **LAYOUTS["scanned"]))
  assert code == 0, err
  return workdir, losses(workdir)


@pytest.mark.slow
def test_a_scanned_run_follows_the_unrolled_one(reference, scanned_reference):
  """The same seed draws the same weights in both layouts, so the runs differ by float
  rounding only; the scanned run exports its model layer by layer like the unrolled one."""
  (ref_dir, ref), (scan_dir, got) = reference, scanned_reference
  assert sorted(got) == sorted(ref)
  np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)],
                             atol=2e-5, rtol=1e-5)
  ours, theirs = (Checkpoint(os.path.join(d, "model")) for d in (scan_dir, ref_dir))
  assert set(ours.source.infos) == set(theirs.source.infos)
  for name in theirs.source.infos:
    np.testing.assert_allclose(ours.read(name), theirs.read(name), atol=1e-5, rtol=1e-5,
                               err_msg=name)


@pytest.mark.slow
def test_zoo_export_writes_a_checkpoint_layer_by_layer(reference, scanned_reference, corpus,
                                                       tmp_path, capsys):
  """`zoo export` of a training checkpoint of either layout: at the last step, what the run
  exported itself; at an earlier step, the two layouts' models agree."""
  (ref_dir, _), (scan_dir, _) = reference, scanned_reference
  assert main(["export", "--workdir", str(scan_dir), str(tmp_path / "last")]) == 0
  own, last = Checkpoint(os.path.join(scan_dir, "model")), Checkpoint(str(tmp_path / "last"))
  assert set(last.source.infos) == set(own.source.infos)
  for name in own.source.infos:
    np.testing.assert_array_equal(last.read(name), own.read(name))
  assert os.path.isfile(tmp_path / "last" / "tokenizer.model")
  for name, workdir in (("scanned", scan_dir), ("unrolled", ref_dir)):
    assert main(["export", "--workdir", str(workdir), "--step", "6", str(tmp_path / name)]) == 0
  ours, theirs = Checkpoint(str(tmp_path / "scanned")), Checkpoint(str(tmp_path / "unrolled"))
  for name in theirs.source.infos:
    np.testing.assert_allclose(ours.read(name), theirs.read(name), atol=1e-5, rtol=1e-5)
  assert np.abs(ours.read("norm.scale") - own.read("norm.scale")).max() > 0  # step 6, not 12
  capsys.readouterr()
  for argv, words in (([str(tmp_path / "x"), "--workdir", str(tmp_path)], "no training checkpoint"),
                      ([str(tmp_path / "x"), "--workdir", str(scan_dir), "--step", "7"],
                       "no checkpoint at step 7"),
                      ([str(tmp_path / "last"), "--workdir", str(scan_dir)], "exists")):
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
  # resuming a scanned run's checkpoint unrolled is refused in one line naming the field
  shutil.copytree(os.path.join(scan_dir, "checkpoints"), tmp_path / "resume" / "checkpoints")
  code, _, err = zoo_train(tmp_path / "resume", *flags(corpus))
  assert code == 2 and "(scan_layers)" in err.strip().splitlines()[-1], err


@pytest.mark.slow
def test_uninterrupted_run_trains_and_writes_its_outputs(reference):
  workdir, ref = reference
  assert sorted(ref) == list(range(1, 13))
  assert ref[12] < ref[1]
  for name in ("loss.png", "metrics.jsonl"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert glob.glob(os.path.join(workdir, "tensorboard", "*"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "loss" in json.loads(line)]
  first, row = rows[0], rows[1]  # steps 1 and 2 (step 1's checkpoint time: its own record)
  assert {"step", "loss", "lr", "grad_norm", "first_step_seconds", "compile_seconds"} <= set(first)
  assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(row)
  # the exported model loads with zoo.load and carries the run's tokenizer
  assert Checkpoint(os.path.join(workdir, "model")).config.num_layers == 2
  assert any(n.endswith(".model") for n in os.listdir(os.path.join(workdir, "model")))


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kill_at", [3, 6, 9])
def test_sigkill_then_resume_is_bit_exact(kill_at, layout, corpus, request, tmp_path):
  _, ref = request.getfixturevalue("reference" if layout == "unrolled" else "scanned_reference")
  proc = zoo_train(tmp_path, *flags(corpus, **LAYOUTS[layout]), wait=False)
  wait_for_step(proc, tmp_path, kill_at)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, out, err = zoo_train(tmp_path, *flags(corpus, **LAYOUTS[layout]))
  assert code == 0, err
  assert "resuming from the checkpoint at step" in err + out
  assert losses(tmp_path) == ref  # every step's loss, bit for bit


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step(corpus, tmp_path):
  proc = zoo_train(tmp_path, *flags(corpus, **{"train.steps": 400,
                                               "train.checkpoint_every": 1000}), wait=False)
  wait_for_step(proc, tmp_path, 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert "SIGTERM received; saved a checkpoint at step" in err
  saved = int(err.split("checkpoint at step ")[1].split()[0])
  assert saved >= 3 and os.path.isdir(tmp_path / "checkpoints" / str(saved))
  assert max(losses(tmp_path)) == saved


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(corpus, reference, tmp_path):
  _, ref = reference
  code, _, err = zoo_train(tmp_path, *flags(corpus, **{"train.steps": 6,
                                                       "train.schedule_steps": 12}))
  assert code == 0, err
  latest = tmp_path / "checkpoints" / "6"
  damaged = 0
  for path in glob.glob(str(latest / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 64:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
      damaged += 1
  assert damaged
  code, out, err = zoo_train(tmp_path, *flags(corpus))
  assert code == 0, err
  assert "checkpoint at step 6 is damaged" in err
  assert "resuming from the checkpoint at step 4" in err + out
  assert losses(tmp_path) == ref


@pytest.mark.slow
def test_resume_on_a_different_mesh(corpus, reference, tmp_path):
  _, ref = reference
  code, _, err = zoo_train(tmp_path, *flags(corpus, **{"train.steps": 6,
                                                       "train.schedule_steps": 12}))
  assert code == 0, err
  code, out, err = zoo_train(tmp_path, *flags(corpus, **{"mesh.data": 2, "mesh.fsdp": 2,
                                                         "mesh.tensor": 2}))
  assert code == 0, err
  assert "resuming from the checkpoint at step 6" in err + out
  got = losses(tmp_path)
  np.testing.assert_allclose([got[s] for s in range(1, 13)], [ref[s] for s in range(1, 13)],
                             atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_with_the_last_good_checkpoint_intact(corpus, tmp_path):
  code, out, err = zoo_train(tmp_path, *flags(corpus, **{"optimizer.lr": 1e30,
                                                         "optimizer.grad_clip": 0.0,
                                                         "optimizer.warmup_steps": 0}))
  assert code == 2
  errors = [line for line in err.splitlines() if line.startswith("zoo: error")]
  assert len(errors) == 1 and errors[0].startswith("zoo: error: loss became")
  assert "stopping" in errors[0]
  good = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert good, "the test needs a checkpoint before the loss blows up"
  # What was saved before the blow-up restores (same optimizer structure).
  code, out, err = zoo_train(tmp_path, *flags(corpus, **{
      "train.steps": max(good), "optimizer.lr": 1e-3, "optimizer.grad_clip": 0.0,
      "optimizer.warmup_steps": 0}))
  assert code == 0, err
  assert f"resuming from the checkpoint at step {max(good)}" in err + out
  # A run with another optimizer structure is refused, and the checkpoints stay.
  code, out, err = zoo_train(tmp_path, *flags(corpus, **{"train.steps": 20}))
  assert code == 2 and "different model or optimizer config" in err
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_runs_a_step_shrunk(config, corpus, tmp_path):
  args, files = "shrink", corpus["files"]
  if config in ("finetune.py", "lora.py", "dpo.py"):
    # fine-tuning needs a checkpoint with a tokenizer: make one from a tiny trained run
    base = tmp_path / "base"
    assert main(["train", "--config", "configs/default.py", "--workdir", str(base),
                 *flags(corpus, **{"train.steps": 1, "train.checkpoint_every": 1,
                                   "optimizer.warmup_steps": 0})]) == 0
    args = f"shrink,init_from={base / 'model'}"
  if config == "dpo.py":  # preference tuning reads JSONL pairs
    files = str(tmp_path / "pairs.jsonl")
    with open(files, "w") as f:
      for i in range(16):
        f.write(json.dumps({"prompt": f"def f{i}(", "chosen": "x):", "rejected": "y)"}) + "\n")
  argv = ["train", "--config", f"configs/{config}:{args}", "--workdir", str(tmp_path / "run"),
          f"--config.data.source=files", f"--config.data.files={files}",
          f"--config.data.data_dir={corpus['data_dir']}", "--config.train.steps=1",
          "--config.train.sample_tokens=2"]
  assert main(argv) == 0
  assert losses(tmp_path / "run")[1] > 0


BAD = {
  "unknown_field": (["--config.train.stepz=3"], "stepz"),
  "mesh_does_not_divide": (["--config.mesh.data=3"], "needs 3 devices, but there are 8"),
  "batch_not_divisible": (["--config.data.batch_size=12"], "not divisible"),
  "sequence_too_long": (["--config.model.max_position_embeddings=16"], "longer than the model"),
  "vocab_too_small": (["--config.model.vocab_size=128"], "larger than the model's embeddings"),
  "no_data": (["--config.data.files=/nonexistent/*.txt"], "/nonexistent"),
  "bad_config_arg": (["--config", "configs/default.py:bogus"], "bogus"),
  "missing_config_file": (["--config", "configs/nope.py"], "nope.py"),
  "splash_on_cpu": (["--config.attention_impl=splash"], "splash is a TPU kernel"),
  "offload_on_cpu": (["--config.remat=offload_qkvo"], "needs TPU or GPU devices"),
  "unknown_remat": (["--config.remat=everything"], "unknown remat policy 'everything'"),
  "loss_chunk": (["--config.train.loss_chunk=24"], "train.loss_chunk 24 must be 0"),
  "router_aux_on_a_dense_model": (["--config.train.router_aux_loss_coef=0.01"],
                                  "applies to MoE models with softmax routing"),
}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  """The corpus with its datasets and tokenizer built, as a first run builds them, so that a
  test's stderr holds only what the run it starts prints (not TFDS's progress bars)."""
  prepare(small_config(corpus), str(tmp_path_factory.mktemp("prepared")))
  return corpus


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_before_compiling(case, prepared, tmp_path, capsys):
  corpus = prepared
  extra, words = BAD[case]
  argv = ["train", "--workdir", str(tmp_path), *flags(corpus), *extra]
  if extra[0] == "--config":
    argv = ["train", *extra, "--workdir", str(tmp_path)]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("zoo: ") and words in err[0], err
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_the_loop_dispatches_the_next_step_before_reading_a_loss(corpus, tmp_path,
                                                                  monkeypatch):
  # A data pipeline that sleeps on the host, and a log of what the loop does in order: each
  # train step dispatched, each step's metrics read. Outside the steps whose state is kept
  # (checkpoints, eval, the end), step N's metrics are read only once step N + 1 is queued.
  events = []
  real_build, real_batch = loop.build, Trainer.global_batch

  def slow_batch(self, batch):
    time.sleep(0.05)
    return real_batch(self, batch)

  def build(run):
    trainer = real_build(run)
    step_fn = trainer.train_step

    def train_step(*args):
      events.append(("dispatch", len([e for e in events if e[0] == "dispatch"]) + 1))
      return step_fn(*args)

    return dataclasses.replace(trainer, train_step=train_step)

  real_fetch = loop.fetch_metrics

  def fetch(out):
    events.append(("read", None))
    return real_fetch(out)

  monkeypatch.setattr(Trainer, "global_batch", slow_batch)
  monkeypatch.setattr(loop, "build", build)
  monkeypatch.setattr(loop, "fetch_metrics", fetch)
  loop.train(small_config(corpus, **{"train.steps": 8, "train.checkpoint_every": 4}),
             str(tmp_path))
  order = []
  dispatched = read = 0
  for kind, _ in events:
    if kind == "dispatch":
      dispatched += 1
    else:
      read += 1
      order.append((read, dispatched))
  # Step N's metrics read with N + 1 dispatched, except at the checkpoints: 1 (orbax saves a
  # run's first step), 4 and 8 (the end).
  assert order == [(1, 1), (2, 3), (3, 4), (4, 4), (5, 6), (6, 7), (7, 8), (8, 8)]
  blocking = [n for n, d in order if d == n]
  assert blocking == [1, 4, 8]


@pytest.mark.slow
def test_a_resumed_run_compiles_nothing_again(corpus, tmp_path):
  # JAX's persistent compilation cache in the workdir: the second process (the same schedule,
  # so the same programs) finds every program it needs there, so it writes no new entry.
  code, _, err = zoo_train(tmp_path, *flags(corpus, **{"train.steps": 4,
                                                       "train.schedule_steps": 8}))
  assert code == 0, err
  cache = tmp_path / "compilation_cache"
  first = sorted(os.listdir(cache))
  assert len(first) > 0
  code, out, err = zoo_train(tmp_path, *flags(corpus, **{"train.steps": 8,
                                                         "train.schedule_steps": 8}))
  assert code == 0, err
  assert "resuming from the checkpoint at step 4" in err + out
  assert sorted(os.listdir(cache)) == first


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny_qwen3", "tiny_qwen3_moe", "tiny_llama4"])
def test_new_families_train_and_qlora_fine_tune(preset, corpus, tmp_path):
  """`zoo train` pretrains each new family (shrunk), then QLoRA fine-tunes the result (NF4
  base, adapters on every linear layer the targets allow) and exports its adapters."""
  code, out, err = zoo_train(tmp_path / "base", *flags(
      corpus, **{"model.preset": preset, "model.num_layers": 4, "model.num_kv_heads": 2,
                 "train.steps": 3, "train.checkpoint_every": 3}))
  assert code == 0, err
  assert losses(tmp_path / "base")[3] > 0
  targets = "q_proj+k_proj+v_proj+o_proj" if preset == "tiny_qwen3_moe" else "all-linear"
  code, out, err = zoo_train(
      tmp_path / "qlora", "--config.data.source=files", f"--config.data.files={corpus['files']}",
      f"--config.data.data_dir={corpus['data_dir']}", "--config.data.seq_len=32",
      "--config.data.batch_size=8", "--config.train.steps=2", "--config.train.sample_tokens=0",
      "--config.optimizer.warmup_steps=0",
      config=f"configs/lora.py:init_from={tmp_path / 'base' / 'model'},quantize=nf4,rank=4,"
             f"targets={targets}")
  assert code == 0, err
  assert (tmp_path / "qlora" / "adapter_peft" / "adapter_config.json").exists()
  model = zoo.load(str(tmp_path / "base" / "model"), adapter=str(tmp_path / "qlora" / "adapter"))
  assert np.isfinite(model.logits(np.arange(16)[None])).all()


def held_out_bits(model, tokenizer, texts, seq_len):
  """Bits per byte of `texts`, each document scored on its own, written out here: [BOS] +
  its ids, cut into rows of seq_len predictions from position 0, every prediction's negative
  log-likelihood from the model's logits; over the texts' UTF-8 bytes."""
  nats = 0.0
  for text in texts:
    ids = np.array([tokenizer.bos_id, *tokenizer.encode(text)])
    rows = [ids[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    batch = np.zeros((len(rows), seq_len), np.int64)
    for i, row in enumerate(rows):
      batch[i, :len(row) - 1] = row[:-1]
    logits = model.logits(batch).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for i, row in enumerate(rows):
      nats -= logp[i, np.arange(len(row) - 1), row[1:]].sum()
  return nats / np.log(2) / sum(len(t.encode("utf-8")) for t in texts)


@pytest.mark.slow
@pytest.mark.parametrize("eval_batches", [1000, 1])
def test_the_runs_bits_per_byte_is_zoo_evals_and_tools_bpbs(eval_batches, corpus, tmp_path,
                                                              capsys):
  """One definition of held-out bits per byte: the run's eval_bpb (its summary's figure),
  `zoo eval`'s and tools/bpb.py's are one number, the held-out documents' bits, each document
  scored on its own, over their UTF-8 bytes; an eval whose batches cannot hold the whole split
  scores its first documents whole, and says so."""
  import subprocess
  import sys

  from zoo.data.sources import text_source
  from zoo.data.tokenizers import load_tokenizer
  overrides = {"train.steps": 2, "train.eval_every": 2, "train.eval_batches": eval_batches,
               "data.eval_fraction": 0.1}
  code, out, err = zoo_train(tmp_path, *flags(corpus, **overrides))
  assert code == 0, err
  with open(tmp_path / "metrics.jsonl") as f:
    record = [json.loads(line) for line in f if "eval_bpb" in line][-1]
  config = small_config(corpus, **overrides)
  source = text_source(config.data, "validation", corpus["data_dir"])
  texts = [source[i]["text"] for i in range(len(source))]
  texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
  assert len(texts) >= 2
  scored = len(texts) if eval_batches > 1 else 1  # one batch: the first document, whole
  model_dir = str(tmp_path / "model")
  expected = held_out_bits(zoo.load(model_dir), load_tokenizer(model_dir), texts[:scored],
                           config.data.seq_len)
  np.testing.assert_allclose(record["eval_bpb"], expected, rtol=2e-5)
  assert (record["eval_documents"], record["eval_split_documents"]) == (scored, len(texts))
  assert record["eval_bytes"] == sum(len(t.encode("utf-8")) for t in texts[:scored])
  summary = [line for line in out.splitlines() if "bits per byte" in line][0]
  assert f"-> {record['eval_bpb']:.4f}" in summary
  if scored < len(texts):
    assert f"over 1 of the {len(texts)} held-out documents" in summary
    return
  assert f"over all {len(texts)} held-out documents" in summary
  # tools/bpb.py, as a user runs it, and `zoo eval` on the same documents
  proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "bpb.py"),
                         str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr
  tool = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (tool["documents"], tool["bytes"]) == (len(texts), record["eval_bytes"])
  np.testing.assert_allclose(tool["bpb"], record["eval_bpb"], rtol=2e-5)
  held_out = tmp_path / "held_out.jsonl"
  held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  capsys.readouterr()
  assert main(["eval", "--checkpoint", model_dir, "--data", str(held_out), "--seq-len",
               str(config.data.seq_len), "--json"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (result["documents"], result["bytes"]) == (len(texts), record["eval_bytes"])
  np.testing.assert_allclose(result["bits_per_byte"], record["eval_bpb"], rtol=2e-5)
