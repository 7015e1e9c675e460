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
from zoo.errors import StorageError, ZooError
from zoo.infer.evaluate import Coverage, empty_batch, held_out_batches
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
       Progress(tcfg.steps, start) as progress, throughput:
    pending = PendingSteps(metrics, throughput, progress, summary["losses"], stop_words)
    for step in range(start + 1, tcfg.steps + 1):
      batch = trainer.global_batch(next(data))
      throughput.dispatching(step)
      # Dispatched without waiting: the device runs it while the host logs the step before
      # and loads the next batch.
      state, out = trainer.train_step(state, batch, *trainer.frozen)
      pending.add(step, out)
      evaluating = bool(tcfg.eval_every) and (step % tcfg.eval_every == 0 or step == tcfg.steps)
      if not (evaluating or checkpoints.due(step) or stop.signal or step == tcfg.steps):
        logged = pending.log(keep=1)  # the step before this one
        if logged is not None:
          heartbeat.beat(logged)
        continue
      # This step's state is kept (evaluated or saved): its loss must be known first, and its
      # time is taken before the eval and the save, which the throughput leaves out.
      pending.read(keep=0)
      extra = None
      if evaluating:
        with throughput.excluded() as took:
          extra = evaluate(trainer, state["params"], token_bytes)
        extra["eval_seconds"] = took.seconds
      heartbeat.beat(pending.write(extra))
      for key, value in (extra or {}).items():  # eval_loss and eval_bpb; DPO's eval_*
        if key != "eval_seconds":
          summary[key] = value
          summary.setdefault(f"first_{key}", value)
      with throughput.excluded() as took:
        saved = checkpoints.save(step, state, data, meta, force=stop.signal is not None)
      if saved:
        last_saved = step
        # A record of its own, after the step's: the step's loss is in the log before its
        # checkpoint can exist, so a resumed run never lacks a step.
        metrics.write(step, {"checkpoint_seconds": took.seconds})
        try:
          metrics.sync()
        except ZooError as e:
          raise StorageError(f"{e}; {checkpoints.complete_words()}") from None
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
  already queued, except where it keeps the state (eval, checkpoint, the end). A step is read
  (which waits for it and times it) and then written to the log, with what the loop adds."""

  def __init__(self, metrics: MetricsWriter, throughput: Throughput, progress: Progress,
               losses: dict, stop_words):
    self.metrics, self.throughput, self.progress, self.losses = metrics, throughput, progress, \
        losses
    self.stop_words = stop_words  # () -> the words naming the last good checkpoint
    self.steps: list[tuple[int, dict]] = []
    self.ready: list[tuple[int, dict]] = []  # read, not yet logged: (step, record)

  def add(self, step: int, out: dict):
    self.steps.append((step, out))

  def read(self, keep: int):
    """Reads every pending step but the newest `keep`, each when the device has finished it.
    A non-finite loss or gradient (the step's `finite`, computed on the device) stops the
    run."""
    while len(self.steps) > keep:
      step, out = self.steps.pop(0)
      values = fetch_metrics(out)
      if not values["finite"]:
        raise ZooError(f"loss became {values['loss']} (gradient norm {values['grad_norm']}) "
                       f"at step {step}; stopping ({self.stop_words()})")
      record = {"loss": values["loss"], **self.throughput.finished(step, values)}
      # a preference run's pair metrics (dpo_loss, rewards, ...), every step as the loss
      record.update({k: v for k, v in values.items() if k in PAIR_METRICS})
      self.ready.append((step, record))

  def write(self, extra: dict | None = None) -> int | None:
    """Logs the steps read; `extra` joins the newest one's record. Returns the last step
    logged."""
    step = None
    while self.ready:
      step, record = self.ready.pop(0)
      if not self.ready and extra:
        record.update(extra)
      self.losses[step] = record["loss"]
      self.metrics.write(step, record)
      self.progress.update(record["loss"])
    return step

  def log(self, keep: int) -> int | None:
    self.read(keep)
    return self.write()


def fetch_metrics(out: dict) -> dict:
  """A step's metrics (device scalars) as Python numbers: the loop's one read per step, which
  waits for that step to finish."""
  return {k: bool(v) if k == "finite" else float(v) for k, v in jax.device_get(out).items()}


def last_checkpoint_words(step: int | None, workdir: str) -> str:
  if step is None:
    return "no checkpoint was written"
  return f"the last good checkpoint is step {step} in {workdir}/checkpoints"


def evaluate(trainer: Trainer, params, token_bytes: jax.Array) -> dict:
  """Held-out eval, scored as `zoo eval` and tools/bpb.py score text
  (zoo.infer.evaluate.perplexity): the validation split's documents in order, each on its own
  (BOS first, no EOS, pieces of data.seq_len predictions packed into rows), as many whole
  documents as fit in train.eval_batches batches: the whole split when it fits, and then
  eval_bpb is `zoo eval`'s figure for the run's model on that split. eval_loss: mean nats per
  predicted token; eval_bpb: the summed nats / ln 2 / the scored documents' UTF-8 bytes;
  eval_documents and eval_bytes: what was scored, of eval_split_documents. Process i scores
  documents i, i + n, ...; the processes step together until every one has run out.
  Instruction data (data.format instruct) is scored as it trains, responses only, through the
  data pipeline (eval_bpb: over the bytes of the response tokens). A preference run's:
  zoo.train.preference.evaluate."""
  if trainer.dpo is not None:
    return evaluate_pairs(trainer, params)
  run, tcfg = trainer.run, trainer.run.config.train
  data_cfg = run.config.data
  nll = weight = 0.0
  if data_cfg.get("format", "text") != "text":
    batches, num_bytes = run.data("validation"), 0.0
    for _ in range(tcfg.eval_batches):  # the split repeats if it is smaller
      out = trainer.eval_step(params, trainer.global_batch(next(batches)), token_bytes,
                              *trainer.base)
      nll += float(out["nll_sum"])
      weight += float(out["weight"])
      num_bytes += float(out["bytes"])
    return {"eval_loss": nll / max(weight, 1.0),
            "eval_bpb": nll / math.log(2) / max(num_bytes, 1.0)}
  count, coverage = jax.process_count(), Coverage()
  batches, split_documents = held_out_batches(
      data_cfg, run.tokenizer, run.model_config, run.data_dir, max_batches=tcfg.eval_batches,
      process_index=jax.process_index(), process_count=count, coverage=coverage)
  while True:
    batch = next(batches, None)
    if count > 1:  # step together: one that has run out scores an empty batch
      if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
        break
      if batch is None:
        batch = empty_batch(data_cfg.batch_size // count, data_cfg.seq_len)
    elif batch is None:
      break
    out = trainer.eval_step(params, trainer.global_batch(batch), token_bytes, *trainer.base)
    nll += float(out["nll_sum"])
    weight += float(out["weight"])
  totals = np.array([coverage.documents, coverage.bytes], np.int64)
  if count > 1:
    totals = multihost_utils.process_allgather(totals).sum(axis=0)
  documents, num_bytes = (int(t) for t in totals)
  return {"eval_loss": nll / max(weight, 1.0),
          "eval_bpb": nll / math.log(2) / max(num_bytes, 1),
          "eval_documents": documents, "eval_bytes": num_bytes,
          "eval_split_documents": split_documents}


class Throughput:
  """tokens/s and MFU over the steps since the last log point (train.log_every), timed on the
  steps alone.

  The loop reads each step's metrics when the device has finished it, so the time between two
  reads is the later step's own time, however far the host runs ahead. Left out of it, and
  logged on their own: the first step after the start or a resume (`first_step_seconds`, from
  its dispatch to its end: compilation and the runtime's start-up, with `compile_seconds`, the
  part of it JAX spent compiling), later compilation (`compile_seconds` at the next log point:
  the first eval's), and the eval and the checkpoint save at the steps that keep the state
  (`eval_seconds`, `checkpoint_seconds`). The rate counts from the end of the first step.
  """

  def __init__(self, trainer: Trainer):
    config = trainer.run.config
    self.every, self.last = config.train.log_every, config.train.steps
    self.peak = (config.train.peak_flops
                 or measure_peak_flops()["peak_flops"] * jax.process_count())
    self.per_token = flops_per_token(trainer.run.model_config, config.data.seq_len)
    self.mark = None  # when the interval being timed began (a step finished, or the first sent)
    self.first = True  # the first step since the start (or resume) is not finished yet
    self.tokens = 0.0
    self.excluded_seconds = 0.0  # eval, checkpoint and compile time within the interval
    self.compile_seconds = 0.0  # compilation since the last log point
    self._listening = False

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    self._listening = True
    return self

  def __exit__(self, *exc):
    if self._listening:
      jax.monitoring.unregister_event_duration_listener(self._on_event)
      self._listening = False

  def _on_event(self, event: str, seconds: float, **kwargs):
    if event in COMPILE_EVENTS:
      self.excluded_seconds += seconds
      self.compile_seconds += seconds

  def dispatching(self, step: int):
    """Called just before a step is dispatched: the first one starts the clock."""
    if self.mark is None:
      self.mark, self.excluded_seconds, self.compile_seconds = time.perf_counter(), 0.0, 0.0

  def excluded(self) -> _Timer:
    """A block whose time is left out of the throughput (an eval, a checkpoint save)."""
    return _Timer(self)

  def finished(self, step: int, values: dict) -> dict:
    """The step's metrics (read: Python numbers) to log beyond the loss, now that the device
    has finished it: none between log points."""
    now = time.perf_counter()
    logging = not (step % self.every and step != self.last)
    out = {"lr": values["lr"], "grad_norm": values["grad_norm"]} if logging else {}
    if self.first:
      # compilation and the runtime's start-up (allocations, thread pools): not a rate
      self.first = False
      out.update(first_step_seconds=now - self.mark, compile_seconds=self.compile_seconds)
      self.mark, self.excluded_seconds, self.compile_seconds = now, 0.0, 0.0
      return out
    self.tokens += values["tokens"]
    if not logging:
      return out
    seconds = max(now - self.mark - self.excluded_seconds, 1e-9)
    rate = self.tokens / seconds
    out.update(tokens_per_sec=rate, mfu=mfu(rate, self.per_token, self.peak))
    if self.compile_seconds:
      out["compile_seconds"] = self.compile_seconds
    self.mark, self.tokens, self.excluded_seconds, self.compile_seconds = now, 0.0, 0.0, 0.0
    return out


# JAX's monitoring events for the parts of compiling a program: tracing, lowering and XLA's
# compile (which includes a persistent cache lookup that replaces it).
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


class _Timer:
  def __init__(self, throughput: Throughput):
    self.throughput, self.seconds = throughput, 0.0

  def __enter__(self):
    self._start, self._compile = time.perf_counter(), self.throughput.compile_seconds
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self._start
    # compilation inside the block is counted once, as compile time
    inside = self.throughput.compile_seconds - self._compile
    self.throughput.excluded_seconds += self.seconds - inside


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
