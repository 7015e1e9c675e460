"""The training loop: everything with side effects around the pure train step.

`train(config, workdir)` prepares and builds the run (zoo.train.setup), resumes from the newest
intact checkpoint in the workdir or starts fresh, then runs data -> step -> metrics, with eval
every N steps, async checkpoints every K, a checkpoint on SIGTERM or SIGINT (preemption), and a
clean stop on a non-finite loss. It ends with the model (or the adapters) exported, a loss plot
and a sample of the model's text.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from zoo import paths, sharding
from zoo.convert.checkpoint import save_params
from zoo.errors import ZooError
from zoo.infer.generate import Generator, Sampling
from zoo.lora import save_adapter, save_peft
from zoo.models import stack
from zoo.train.checkpoint import Checkpointer
from zoo.train.heartbeat import Heartbeat
from zoo.train.metrics import MetricsWriter, flops_per_token, measure_peak_flops, mfu
from zoo.train.preference import PAIR_METRICS
from zoo.train.preference import evaluate as evaluate_pairs
from zoo.train.setup import Trainer, build, prepare
from zoo.train.step import State


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the training described by `config` in `workdir`; returns a summary."""
  workdir = paths.resolve(workdir)  # absolute (orbax wants that), or gs://
  paths.check_reachable(workdir)
  paths.makedirs(workdir)
  use_compilation_cache(config.train.compilation_cache_dir
                        or paths.join(workdir, "compilation_cache"))
  trainer = build(prepare(config, workdir))
  tcfg = config.train
  data = trainer.run.data("train")
  checkpoints = Checkpointer(paths.join(workdir, "checkpoints"), every=tcfg.checkpoint_every,
                             keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoints)
  metrics = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  start, state = resume_or_start(trainer, checkpoints, data, metrics)
  meta = {"model_config": trainer.run.model_config.to_dict(), "zoo_config": config.to_json()}
  throughput = Throughput(trainer)
  token_bytes = trainer.token_bytes()
  heartbeat = Heartbeat.from_env()  # first beat after the first step (which compiles)
  summary = {"start_step": start, "losses": {}}
  last_saved = checkpoints.latest_step()

  def stop_words():
    checkpoints.wait()
    return last_checkpoint_words(last_saved, workdir)

  with sharding.use(trainer.run.mesh, trainer.run.rules), StopFlag() as stop, \
       Progress(tcfg.steps, start) as progress:
    pending = PendingSteps(metrics, throughput, progress, summary["losses"], stop_words)
    for step in range(start + 1, tcfg.steps + 1):
      # Dispatched without waiting: the device runs it while the host logs the step before
      # and loads the next batch.
      state, out = trainer.train_step(state, trainer.global_batch(next(data)),
                                      *trainer.frozen)
      pending.add(step, out)
      evaluating = bool(tcfg.eval_every) and (step % tcfg.eval_every == 0 or step == tcfg.steps)
      if not (evaluating or checkpoints.due(step) or stop.signal or step == tcfg.steps):
        logged = pending.log(keep=1)  # the step before this one
        if logged is not None:
          heartbeat.beat(logged)
        continue
      # This step's state is kept (evaluated or saved): its loss must be known first.
      extra = evaluate(trainer, state["params"], token_bytes) if evaluating else None
      heartbeat.beat(pending.log(keep=0, extra=extra))
      for key, value in (extra or {}).items():  # eval_loss and eval_bpb; DPO's eval_*
        summary[key] = value
        summary.setdefault(f"first_{key}", value)
      if checkpoints.save(step, state, data, meta, force=stop.signal is not None):
        last_saved = step
        metrics.sync()
      if stop.signal is not None:
        checkpoints.wait()
        progress.close()
        print(f"zoo: {stop.signal} received; saved a checkpoint at step {step} in "
              f"{workdir}/checkpoints", file=sys.stderr)
        return dict(summary, stopped_by=stop.signal, step=step)
    if tcfg.steps > start and last_saved != tcfg.steps:
      checkpoints.save(tcfg.steps, state, data, meta, force=True)
  checkpoints.close()
  summary.update(finish(trainer, state, workdir, metrics), step=max(start, tcfg.steps))
  metrics.close()
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


def use_compilation_cache(directory: str):
  """JAX's persistent compilation cache in `directory`, so that a restarted or resumed job
  loads its compiled steps instead of compiling them again (set before anything compiles)."""
  jax.config.update("jax_compilation_cache_dir", directory)
  # Every program, however quick to compile: on a TPU pod even the small ones add up.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class PendingSteps:
  """Steps dispatched to the device whose metrics the host has not read yet. Reading a step's
  metrics waits for that step only, so the loop reads each one a step late, with the next
  already queued, except where it keeps the state (eval, checkpoint, the end)."""

  def __init__(self, metrics: MetricsWriter, throughput: Throughput, progress: Progress,
               losses: dict, stop_words):
    self.metrics, self.throughput, self.progress, self.losses = metrics, throughput, progress, \
        losses
    self.stop_words = stop_words  # () -> the words naming the last good checkpoint
    self.steps: list[tuple[int, dict]] = []

  def add(self, step: int, out: dict):
    self.steps.append((step, out))

  def log(self, keep: int, extra: dict | None = None) -> int:
    """Reads and logs every pending step but the newest `keep`; `extra` joins the newest
    logged step's record. Returns the last step logged. A non-finite loss or gradient (the
    step's `finite`, computed on the device) stops the run."""
    step = None
    while len(self.steps) > keep:
      step, out = self.steps.pop(0)
      values = fetch_metrics(out)
      if not values["finite"]:
        raise ZooError(f"loss became {values['loss']} (gradient norm {values['grad_norm']}) "
                       f"at step {step}; stopping ({self.stop_words()})")
      self.losses[step] = values["loss"]
      record = {"loss": values["loss"], **self.throughput.update(step, values)}
      # a preference run's pair metrics (dpo_loss, rewards, ...), every step as the loss
      record.update({k: v for k, v in values.items() if k in PAIR_METRICS})
      if len(self.steps) == keep and extra:
        record.update(extra)
      self.metrics.write(step, record)
      self.progress.update(values["loss"])
    return step


def fetch_metrics(out: dict) -> dict:
  """A step's metrics (device scalars) as Python numbers: the loop's one read per step, which
  waits for that step to finish."""
  return {k: bool(v) if k == "finite" else float(v) for k, v in jax.device_get(out).items()}


def last_checkpoint_words(step: int | None, workdir: str) -> str:
  if step is None:
    return "no checkpoint was written"
  return f"the last good checkpoint is step {step} in {workdir}/checkpoints"


def evaluate(trainer: Trainer, params, token_bytes: jax.Array) -> dict:
  """eval_loss (mean nats per token) and eval_bpb (bits per byte of the text) over
  train.eval_batches held-out batches; the split repeats if it is smaller, so that every
  process runs the same number of steps. A preference run's: zoo.train.preference.evaluate."""
  if trainer.dpo is not None:
    return evaluate_pairs(trainer, params)
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

  def update(self, step: int, values: dict) -> dict:
    """The step's metrics (read: Python numbers) to log beyond the loss: none between log
    points. The rate counts from when the steps were logged, which trails the device by one
    step: over a log interval, the same."""
    self.tokens += values["tokens"]
    if step % self.every and step != self.last:
      return {}
    rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
    self.start, self.tokens = time.perf_counter(), 0.0
    return {"lr": values["lr"], "grad_norm": values["grad_norm"],
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


def finish(trainer: Trainer, state: State, workdir: str, metrics: MetricsWriter) -> dict:
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
    out["model"] = export_model(trainer, params, paths.join(workdir, "model"))
  else:
    out.update(export_adapter(trainer, params, workdir))
  out["plot"] = paths.join(workdir, "loss.png")
  out["metrics"] = paths.join(workdir, "metrics.jsonl")
  metrics.plot("loss.png")
  if text is not None:
    out["sample"] = text
  out.update(checkpoints=paths.join(workdir, "checkpoints"),
             tensorboard=paths.join(workdir, "tensorboard"))
  return out


def export_checkpoint(workdir: str, out: str, step: int | None = None) -> dict:
  """`zoo export`: the model (or a LoRA run's adapters) of a training checkpoint in WORKDIR
  (the latest, or `step`) written to `out` layer by layer as at the end of a run, whichever
  layout (unrolled or scanned) trained it. The run's config comes from the checkpoint."""
  workdir = paths.resolve(workdir)
  paths.check_reachable(workdir)
  directory = paths.join(workdir, "checkpoints")
  steps = (ocp.CheckpointManager(directory, item_names=("state", "data", "meta")).all_steps()
           if paths.exists(directory) else [])
  if not steps:
    raise ZooError(f"no training checkpoint in {directory}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ZooError(f"no checkpoint at step {step} in {directory} (there are: "
                   f"{', '.join(map(str, sorted(steps)))})")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  config = ml_collections.ConfigDict(json.loads(meta["zoo_config"]))
  trainer = build(prepare(config, workdir), load_base=False)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(trainer.abstract_state))).state
  manager.close()
  params = host_tree(state["params"])
  if jax.process_index() != 0:
    return {}
  if trainer.lora is None:
    return {"model": export_model(trainer, params, out)}
  paths.makedirs(out)  # each of the two adapter directories is staged in it
  return export_adapter(trainer, params, out)


def export_model(trainer: Trainer, params: dict, path: str) -> str:
  """The trained model as a zoo checkpoint (with its tokenizer), for zoo.load and zoo convert."""
  flat = {".".join(str(k.key) for k in key_path): np.asarray(leaf)
          for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  flat = stack.unstack(flat)  # scanned layers are saved one by one, as every format has them
  side = {}
  source = getattr(trainer.run.tokenizer, "path", None)
  if source and os.path.isfile(source):
    # Under the names load_tokenizer (and transformers) look for in a checkpoint directory.
    hf_json = source.endswith(".json")
    side["tokenizer.json" if hf_json else "tokenizer.model"] = source
    extra = os.path.join(os.path.dirname(source), "tokenizer_config.json")
    if hf_json and os.path.isfile(extra):
      side["tokenizer_config.json"] = extra
  save_params(trainer.run.model_config, flat, path, force=True, side_files=side)
  return path


def export_adapter(trainer: Trainer, adapters: dict, workdir: str) -> dict:
  """The trained adapters as a zoo adapter directory and as HF peft's files."""
  # The files hold only the adapters: the base can stay where it is, as shapes.
  base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.lora.base)
  model = nnx.merge(trainer.graphdef, adapters, base)
  spec, base_model = trainer.lora_spec, paths.resolve(trainer.run.config.init_from)
  out = {"adapter": paths.join(workdir, "adapter"),
         "peft_adapter": paths.join(workdir, "adapter_peft")}
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
