"""The training loop: everything with side effects around the pure train step.

`train(config, workdir)` prepares and builds the run (zoo.train.setup), resumes from the newest
intact checkpoint in the workdir or starts fresh, then runs data -> step -> metrics, with eval
every N steps, async checkpoints every K, a checkpoint on SIGTERM or SIGINT (preemption), and a
clean stop on a non-finite loss. It ends with the model (or the adapters) exported, a loss plot
and a sample of the model's text.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from zoo import sharding
from zoo.convert.checkpoint import save_params
from zoo.errors import ZooError
from zoo.infer.generate import Generator, Sampling
from zoo.lora import save_adapter, save_peft
from zoo.train.checkpoint import Checkpointer
from zoo.train.heartbeat import Heartbeat
from zoo.train.metrics import MetricsWriter, flops_per_token, measure_peak_flops, mfu, plot_losses
from zoo.train.setup import Trainer, build, prepare
from zoo.train.step import State


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the training described by `config` in `workdir`; returns a summary."""
  workdir = os.path.abspath(workdir)  # orbax wants absolute paths
  os.makedirs(workdir, exist_ok=True)
  trainer = build(prepare(config, workdir))
  tcfg = config.train
  data = trainer.run.data("train")
  checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), every=tcfg.checkpoint_every,
                             keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoints)
  metrics = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  start, state = resume_or_start(trainer, checkpoints, data, metrics)
  meta = {"model_config": trainer.run.model_config.to_dict(), "zoo_config": config.to_json()}
  throughput = Throughput(trainer)
  token_bytes = trainer.token_bytes()
  heartbeat = Heartbeat.from_env()  # first beat after the first step (which compiles)
  summary = {"start_step": start, "losses": {}}
  last_saved = checkpoints.latest_step()
  with sharding.use(trainer.run.mesh, trainer.run.rules), StopFlag() as stop, \
       Progress(tcfg.steps, start) as progress:
    for step in range(start + 1, tcfg.steps + 1):
      state, out = trainer.train_step(state, trainer.global_batch(next(data)), *trainer.base)
      loss = float(out["loss"])
      heartbeat.beat(step)
      if not math.isfinite(loss):
        checkpoints.wait()
        raise ZooError(f"loss became {loss} at step {step}; stopping "
                       f"({last_checkpoint_words(last_saved, workdir)})")
      summary["losses"][step] = loss
      record = {"loss": loss, **throughput.update(step, out)}
      if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
        record.update(evaluate(trainer, state["params"], token_bytes))
        summary.update(eval_loss=record["eval_loss"], eval_bpb=record["eval_bpb"])
        summary.setdefault("first_eval_loss", record["eval_loss"])
        summary.setdefault("first_eval_bpb", record["eval_bpb"])
      metrics.write(step, record)
      progress.update(loss)
      if checkpoints.save(step, state, data, meta, force=stop.signal is not None):
        last_saved = step
      if stop.signal is not None:
        checkpoints.wait()
        progress.close()
        print(f"zoo: {stop.signal} received; saved a checkpoint at step {step} in "
              f"{workdir}/checkpoints", file=sys.stderr)
        return dict(summary, stopped_by=stop.signal, step=step)
    if tcfg.steps > start and last_saved != tcfg.steps:
      checkpoints.save(tcfg.steps, state, data, meta, force=True)
  checkpoints.close()
  metrics.close()
  summary.update(finish(trainer, state, workdir), step=max(start, tcfg.steps))
  heartbeat.beat(summary["step"], done=True)
  return summary


def resume_or_start(trainer: Trainer, checkpoints: Checkpointer, data,
                    metrics: MetricsWriter) -> tuple[int, State]:
  """(step, state) from the newest intact checkpoint (the data position restored in `data`,
  the metrics log cut back to it), or (0, the initial state)."""
  restored = checkpoints.restore_latest(trainer.abstract_state, data,
                                        shared_data=trainer.run.config.data.shard == "rows")
  if restored is None:
    return 0, trainer.initial_state()
  step, state, _ = restored
  metrics.truncate_after(step)
  print(f"zoo: resuming from the checkpoint at step {step}")
  return step, state


def last_checkpoint_words(step: int | None, workdir: str) -> str:
  if step is None:
    return "no checkpoint was written"
  return f"the last good checkpoint is step {step} in {workdir}/checkpoints"


def evaluate(trainer: Trainer, params, token_bytes: jax.Array) -> dict:
  """eval_loss (mean nats per token) and eval_bpb (bits per byte of the text) over
  train.eval_batches held-out batches; the split repeats if it is smaller, so that every
  process runs the same number of steps."""
  batches = trainer.run.data("validation")
  nll = weight = num_bytes = 0.0
  for _ in range(trainer.run.config.train.eval_batches):
    out = trainer.eval_step(params, trainer.global_batch(next(batches)), token_bytes,
                            *trainer.base)
    nll += float(out["nll_sum"])
    weight += float(out["weight"])
    num_bytes += float(out["bytes"])
  return {"eval_loss": nll / max(weight, 1.0), "eval_bpb": nll / math.log(2) / max(num_bytes, 1.0)}


class Throughput:
  """tokens/s and MFU over the steps since the last log point (train.log_every)."""

  def __init__(self, trainer: Trainer):
    config = trainer.run.config
    self.every, self.last = config.train.log_every, config.train.steps
    self.peak = (config.train.peak_flops
                 or measure_peak_flops()["peak_flops"] * jax.process_count())
    self.per_token = flops_per_token(trainer.run.model_config, config.data.seq_len)
    self.start, self.tokens = time.perf_counter(), 0.0

  def update(self, step: int, out: dict) -> dict:
    """The step's metrics to log beyond the loss: none between log points."""
    self.tokens += float(out["tokens"])
    if step % self.every and step != self.last:
      return {}
    rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
    self.start, self.tokens = time.perf_counter(), 0.0
    return {"lr": float(out["lr"]), "grad_norm": float(out["grad_norm"]),
            "tokens_per_sec": rate, "mfu": mfu(rate, self.per_token, self.peak)}


class Progress:
  """The progress bar (process 0 only), with the latest loss."""

  def __init__(self, total: int, start: int):
    self.bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0,
                    desc="train", dynamic_ncols=True)

  def update(self, loss: float):
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{loss:.4f}")

  def close(self):
    self.bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves a checkpoint at the current step and exits."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def host_tree(tree):
  """A tree of global arrays as numpy on every process (gathered across processes)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def finish(trainer: Trainer, state: State, workdir: str) -> dict:
  """The end of a run: the model (or adapters) exported, the loss plot and a sample, written by
  process 0 (every process takes part in the gathers and in sampling); the paths go into the
  summary."""
  params = host_tree(state["params"])
  text = None
  if trainer.run.config.train.sample_tokens and trainer.run.tokenizer is not None:
    text = sample_text(trainer, params if jax.process_count() == 1 else state["params"])
  if jax.process_index() != 0:
    return {}
  out = {}
  if trainer.lora is None:
    out["model"] = export_model(trainer, params, os.path.join(workdir, "model"))
  else:
    out.update(export_adapter(trainer, params, workdir))
  out["plot"] = os.path.join(workdir, "loss.png")
  out["metrics"] = os.path.join(workdir, "metrics.jsonl")
  plot_losses(out["metrics"], out["plot"])
  if text is not None:
    out["sample"] = text
  out.update(checkpoints=os.path.join(workdir, "checkpoints"),
             tensorboard=os.path.join(workdir, "tensorboard"))
  return out


def export_model(trainer: Trainer, params: dict, path: str) -> str:
  """The trained model as a zoo checkpoint (with its tokenizer), for zoo.load and zoo convert."""
  flat = {".".join(str(k.key) for k in key_path): np.asarray(leaf)
          for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  save_params(trainer.run.model_config, flat, path, force=True)
  source = getattr(trainer.run.tokenizer, "path", None)
  if source and os.path.isfile(source):
    # Under the names load_tokenizer (and transformers) look for in a checkpoint directory.
    hf_json = source.endswith(".json")
    shutil.copy2(source, os.path.join(path, "tokenizer.json" if hf_json else "tokenizer.model"))
    extra = os.path.join(os.path.dirname(source), "tokenizer_config.json")
    if hf_json and os.path.isfile(extra):
      shutil.copy2(extra, os.path.join(path, "tokenizer_config.json"))
  return path


def export_adapter(trainer: Trainer, adapters: dict, workdir: str) -> dict:
  """The trained adapters as a zoo adapter directory and as HF peft's files."""
  # The files hold only the adapters: the base can stay where it is, as shapes.
  base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.lora.base)
  model = nnx.merge(trainer.graphdef, adapters, base)
  spec, base_model = trainer.lora_spec, os.path.abspath(trainer.run.config.init_from)
  out = {"adapter": os.path.join(workdir, "adapter"),
         "peft_adapter": os.path.join(workdir, "adapter_peft")}
  save_adapter(model, out["adapter"], spec, base_model=base_model, force=True)
  save_peft(model, out["peft_adapter"], spec, base_model=base_model, force=True)
  return out


def sample_text(trainer: Trainer, params: dict) -> str:
  """train.sample_tokens of the model's text after train.sample_prompt, sampled with the
  config's temperature, top-p and seed by zoo.infer.Generator (the prompt included). One
  process samples on its own device from host `params`; several sample together on the mesh
  from the global arrays."""
  tcfg, tokenizer = trainer.run.config.train, trainer.run.tokenizer
  trees = (params, *trainer.base)
  mesh = None
  if jax.process_count() == 1:
    trees = jax.device_put(trees, jax.devices()[0])
  else:
    mesh = trainer.run.mesh
  model = nnx.merge(trainer.graphdef, *trees)
  prompt = tokenizer.encode(tcfg.sample_prompt)
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  stop = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  room = trainer.run.model_config.max_position_embeddings - len(bos) - len(prompt)
  if room < 1:
    return tcfg.sample_prompt
  new = Generator(model, mesh=mesh, rules=trainer.run.rules).generate(
      [bos + prompt], max_new_tokens=min(tcfg.sample_tokens, room),
      sampling=Sampling(temperature=float(tcfg.sample_temperature),
                        top_p=float(tcfg.sample_top_p)),
      seed=tcfg.sample_seed, stop_ids=stop)[0]
  if new and new[-1] in stop:
    new = new[:-1]
  return tokenizer.decode(prompt + new)
