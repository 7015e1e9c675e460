"""The training loop: everything with side effects around the pure train step.

It validates the whole config before compiling anything, builds the mesh and places the state by
the rules table, resumes from the newest intact checkpoint in the workdir, and then runs: data ->
step -> metrics, with eval every N steps, async checkpoints every K, a checkpoint on SIGTERM or
SIGINT (preemption), and a clean stop on a non-finite loss. At the end it writes a zoo
checkpoint of the model, a loss plot, and prints a sample.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from zoo import sharding
from zoo.convert.checkpoint import Checkpoint, save_params
from zoo.data.instruct import template_dir_for
from zoo.data.pipeline import data_pipeline
from zoo.data.tokenizers import load_tokenizer
from zoo.errors import ZooError
from zoo.models.config import LlamaConfig
from zoo.models.llama import Llama, abstract_model
from zoo.models.presets import get_preset
from zoo.train.checkpoint import Checkpointer
from zoo.train.metrics import MetricsWriter, flops_per_token, measure_peak_flops, mfu, plot_losses
from zoo.train.optim import make_optimizer, make_schedule
from zoo.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class Run:
  """Everything resolved from the config before anything is compiled."""
  config: Any
  workdir: str
  model_config: LlamaConfig
  tokenizer: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  data_dir: str


def schedule_steps(config) -> int:
  """The length of the learning-rate schedule; a run may stop before it ends and resume."""
  return config.train.schedule_steps or config.train.steps


def _model_overrides(config) -> dict:
  out = {}
  for key, value in config.model.items():
    if key == "preset":
      continue
    out[key] = tuple(value) if isinstance(value, list) else value
  return out


def _tokenizer(config, data_dir: str):
  from zoo.data.pipeline import tokenizer_for
  if config.data.tokenizer:
    return load_tokenizer(config.data.tokenizer)
  if config.init_from:
    return load_tokenizer(config.init_from)
  return tokenizer_for(config.data, data_dir)


def _first_process_first(fn):
  """fn() on process 0, then on the others once it is done: what process 0 builds into a
  shared directory (datasets, a trained tokenizer) the others then only read."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  if jax.process_index() == 0:
    try:
      return fn()
    finally:  # on an error too, so that the others do not wait forever (they meet it as well)
      multihost_utils.sync_global_devices("zoo: process 0 prepared the data")
  multihost_utils.sync_global_devices("zoo: process 0 prepared the data")
  return fn()


def prepare(config, workdir: str) -> Run:
  """Checks the config, data, tokenizer and mesh; raises ZooError naming the first problem."""
  if config.train.steps <= 0:
    raise ZooError("train.steps must be positive")
  if config.train.grad_accum < 1:
    raise ZooError("train.grad_accum must be >= 1")
  if config.train.schedule_steps < 0:
    raise ZooError("train.schedule_steps must be >= 0")
  make_optimizer(config.optimizer, schedule_steps(config))  # validates the optimizer fields
  lora_spec(config)  # validates the LoRA fields
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in config.sharding_rules)
  sharding.logical_to_spec(sharding.LOGICAL_AXES, rules)  # validates the table
  batch = config.data.batch_size
  sharding.local_batch_size(batch, mesh, rules)
  ways = math.prod(mesh.shape[a] for a in sharding.logical_to_spec(("batch",), rules)[0] or ()
                   ) if sharding.logical_to_spec(("batch",), rules)[0] else 1
  if (batch // ways) % config.train.grad_accum:
    raise ZooError(f"batch size {batch} does not split into {config.train.grad_accum} "
                   f"microbatches on each of {ways} batch shards")
  data_dir = config.data.data_dir or os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)

  def build_data():  # the datasets and the tokenizer, built once and cached in data_dir
    tokenizer = _tokenizer(config, data_dir)
    for split in ("train", "validation") if config.train.eval_every else ("train",):
      data_pipeline(config.data, tokenizer, split, data_dir=data_dir,  # raises if it is empty
                    template_dir=template_dir_for(config.data, config.init_from))
    return tokenizer

  tokenizer = _first_process_first(build_data)
  if config.init_from:
    model_config = Checkpoint(config.init_from).config
  else:
    overrides = _model_overrides(config)
    if overrides.get("vocab_size") == 0:
      overrides["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
    try:
      model_config = get_preset(config.model.preset, **overrides)
    except TypeError as e:
      raise ZooError(f"bad model override: {e}") from None
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ZooError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the "
                   f"model's embeddings ({model_config.vocab_size})")
  if config.data.seq_len > model_config.max_position_embeddings:
    raise ZooError(f"data.seq_len {config.data.seq_len} is longer than the model allows "
                   f"({model_config.max_position_embeddings})")
  return Run(config, workdir, model_config, tokenizer, mesh, rules, data_dir)


def lora_spec(config):
  """The run's LoraSpec, or None when it trains the whole model (lora.rank 0)."""
  from zoo.layers.quant import KINDS
  from zoo.lora import LoraSpec
  cfg = config.lora
  if not cfg.rank:
    return None
  if not config.init_from:
    raise ZooError("lora.rank > 0 fine-tunes a checkpoint: set init_from")
  if cfg.quantize not in ("none", *KINDS):
    raise ZooError(f"unknown lora.quantize {cfg.quantize!r}; use none, {', '.join(KINDS)}")
  targets = tuple(t.strip() for t in str(cfg.targets).split(",") if t.strip())
  return LoraSpec(rank=cfg.rank, alpha=float(cfg.alpha), targets=targets,
                  dropout=float(cfg.dropout), rslora=bool(cfg.rslora))


@dataclasses.dataclass
class _Lora:
  """A LoRA run's frozen side: the base tree (placed on the mesh, maybe quantized), the graph
  that merges it with the adapters, and the adapters' initial values."""
  spec: Any
  graphdef: Any
  base: Any
  base_shardings: Any
  adapters: dict
  adapter_shardings: dict


def load_tree(path: str, abstract: dict, shardings: dict, convert=None) -> tuple[dict, dict]:
  """The checkpoint's parameters in the structure of `abstract` (a pure dict of
  ShapeDtypeStructs from an abstract model), read one tensor at a time, cast to each leaf's
  dtype, passed through `convert(name, array)` if given (QLoRA quantizes there), and placed
  by `shardings` (a quantized leaf by sharding.quantized_sharding). At no point does the
  process hold more than the placed tree and one tensor in flight. Returns (tree, shardings).
  """
  from zoo.layers.quant import is_quantized
  ckpt = Checkpoint(path)

  def one(p, leaf, s):
    name = _dotted(p)
    value = np.asarray(ckpt.read(name)).astype(leaf.dtype)
    if convert is not None:
      value = convert(name, value)
    if is_quantized(value):
      s = sharding.quantized_sharding(value, s)
    return jax.device_put(value, s)

  tree = jax.tree_util.tree_map_with_path(one, abstract, shardings)
  return tree, jax.tree.map(lambda x: x.sharding, tree)


def lora_split(model_config: LlamaConfig, spec, init_from: str, mesh, rules, *,
               quantize: str = "none", block_size: int = 64, seed: int = 0, **model_kwargs):
  """A LoRA run's trees: (graphdef, adapters, adapter shardings, frozen base, base shardings).
  The adapters are added to an abstract (shape-only) model, so the base is never built at
  random; it is then read from `init_from` tensor by tensor, quantized as it arrives when
  `quantize` is int8 or nf4, and placed by the rules."""
  from zoo import lora
  from zoo.layers.quant import quantize_leaf
  model = abstract_model(model_config, **model_kwargs)
  lora.add_lora(model, spec, seed=seed)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  adapter_shardings = sharding.variable_shardings(adapters, mesh, rules)
  base_shardings = sharding.variable_shardings(base, mesh, rules)
  convert = None
  if quantize != "none":
    def convert(name, array):
      return quantize_leaf(name, array, quantize, block_size)
  base, base_shardings = load_tree(init_from, nnx.to_pure_dict(base), base_shardings, convert)
  return graphdef, nnx.to_pure_dict(adapters), adapter_shardings, base, base_shardings


def _lora_setup(run: Run) -> _Lora:
  config = run.config
  spec = lora_spec(config)
  graphdef, adapters, adapter_shardings, base, base_shardings = lora_split(
      run.model_config, spec, config.init_from, run.mesh, run.rules,
      quantize=config.lora.quantize, block_size=config.lora.block_size,
      seed=config.train.seed, **_model_kwargs(config))
  return _Lora(spec, graphdef, base, base_shardings, adapters, adapter_shardings)


def _model_kwargs(config) -> dict:
  return dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
              moe_impl=config.moe_impl)


def _state_shardings(run: Run, abstract_state, params=None) -> dict:
  if params is None:
    params = sharding.param_shardings(
        abstract_model(run.model_config, **_model_kwargs(run.config)), run.mesh, run.rules)
  rep = sharding.replicated(run.mesh)
  abstract_params = abstract_state["params"]
  tx, _ = make_optimizer(run.config.optimizer, schedule_steps(run.config))

  def like_param(leaf, param_sharding, param):
    # Factored optimizer statistics (Adafactor) do not have the parameter's shape.
    return param_sharding if getattr(leaf, "shape", None) == param.shape else rep

  opt = optax.tree_map_params(tx, like_param, abstract_state["opt_state"], params,
                              abstract_params, transform_non_params=lambda _: rep)
  return {"step": rep, "params": params, "opt_state": opt, "rng": rep}


def _dotted(path) -> str:
  return ".".join(str(k.key) for k in path)


def _init_fn(run: Run, tx):
  config = run.config

  def init(key):
    model = Llama(run.model_config, rngs=nnx.Rngs(params=key), **_model_kwargs(config))
    params = nnx.split(model, nnx.Param)[1].to_pure_dict()
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(config.train.seed + 1))}
  return init


def _initial_state(run: Run, tx, shardings):
  init = _init_fn(run, tx)
  if not run.config.init_from:
    return jax.jit(init, out_shardings=shardings)(jax.random.key(run.config.train.seed))
  # Fine-tuning: the parameters come from the checkpoint tensor by tensor (nothing is drawn at
  # random), then the optimizer state is initialised from them.
  abstract = jax.eval_shape(init, jax.random.key(run.config.train.seed))
  params, _ = load_tree(run.config.init_from, abstract["params"], shardings["params"])
  return {"step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]), "params": params,
          "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
          "rng": jax.device_put(jax.random.key_data(jax.random.key(run.config.train.seed + 1)),
                                shardings["rng"])}


def _to_global(batch: dict, batch_sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}


class Heartbeat:
  """With ZOO_HEARTBEAT_DIR set (by `zoo launch`), each process rewrites
  DIR/process_I.json with its step and the time after every step, for the launcher's watchdog."""

  def __init__(self, path: str | None):
    self.path = path

  @classmethod
  def from_env(cls) -> "Heartbeat":
    directory = os.environ.get("ZOO_HEARTBEAT_DIR")
    if not directory:
      return cls(None)
    os.makedirs(directory, exist_ok=True)
    return cls(os.path.join(directory, f"process_{jax.process_index()}.json"))

  def beat(self, step: int, done: bool = False):
    """`done`: the run has finished and written its outputs."""
    if self.path is None:
      return
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump({"step": int(step), "time": time.time(), "pid": os.getpid(), "done": done}, f)
    os.replace(tmp, self.path)


class _StopFlag:
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


def _greedy_sample(graphdef, params, tokenizer, prompt: str, new_tokens: int,
                   max_len: int, base=None) -> str:
  """Greedy continuation of `prompt`, one fixed-size buffer so it compiles once."""
  ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
  length = min(len(ids) + new_tokens, max_len)
  buf = np.zeros((1, length), np.int32)
  buf[0, :len(ids)] = ids

  @jax.jit
  def next_token(params, buf, pos, base):
    model = nnx.merge(graphdef, params) if base is None else nnx.merge(graphdef, params, base)
    return jnp.argmax(model(buf)[0, pos - 1])

  for pos in range(len(ids), length):
    token = int(next_token(params, jnp.asarray(buf), pos, base))
    if token == tokenizer.eos_id:
      break
    buf[0, pos] = token
    ids.append(token)
  start = 1 if tokenizer.bos_id is not None else 0
  return tokenizer.decode(ids[start:])


def _export_model(run: Run, params, path: str):
  """The trained model as a zoo checkpoint (with its tokenizer), for zoo.load and zoo convert."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() != 0:
    return
  flat = {_dotted(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  save_params(run.model_config, flat, path, force=True)
  source = getattr(run.tokenizer, "path", None)
  if source and os.path.isfile(source):
    # Under the names load_tokenizer (and transformers) look for in a checkpoint directory.
    hf_json = source.endswith(".json")
    shutil.copy2(source, os.path.join(path, "tokenizer.json" if hf_json else "tokenizer.model"))
    extra = os.path.join(os.path.dirname(source), "tokenizer_config.json")
    if hf_json and os.path.isfile(extra):
      shutil.copy2(extra, os.path.join(path, "tokenizer_config.json"))


def _export_adapter(run: Run, frozen: _Lora, adapters, workdir: str) -> dict:
  """The trained adapters as a zoo adapter directory and as HF peft's files."""
  from zoo import lora
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    adapters = multihost_utils.process_allgather(adapters, tiled=True)
  if jax.process_index() != 0:
    return {}
  model = nnx.merge(frozen.graphdef, jax.device_get(adapters), jax.device_get(frozen.base))
  out = {"adapter": os.path.join(workdir, "adapter"),
         "peft_adapter": os.path.join(workdir, "adapter_peft")}
  base_model = os.path.abspath(run.config.init_from)
  lora.save_adapter(model, out["adapter"], frozen.spec, base_model=base_model, force=True)
  lora.save_peft(model, out["peft_adapter"], frozen.spec, base_model=base_model, force=True)
  return out


def train(config, workdir: str) -> dict:
  """Runs (or resumes) the training described by `config` in `workdir`; returns a summary."""
  workdir = os.path.abspath(workdir)  # orbax wants absolute paths
  os.makedirs(workdir, exist_ok=True)
  run = prepare(config, workdir)
  primary = jax.process_index() == 0
  tcfg = config.train
  tx, schedule = make_optimizer(config.optimizer, schedule_steps(config))
  frozen = _lora_setup(run) if config.lora.rank else None
  if frozen is None:
    graphdef = nnx.split(abstract_model(run.model_config, **_model_kwargs(config)))[0]
    abstract = jax.eval_shape(_init_fn(run, tx), jax.random.key(0))
    shardings = _state_shardings(run, abstract)
  else:
    # Only the adapters are trained and checkpointed; the base is an input to every step.
    graphdef = frozen.graphdef
    lora_init = lambda: {  # noqa: E731
        "step": jnp.zeros((), jnp.int32), "params": frozen.adapters,
        "opt_state": tx.init(frozen.adapters),
        "rng": jax.random.key_data(jax.random.key(config.train.seed + 1))}
    abstract = jax.eval_shape(lora_init)
    shardings = _state_shardings(run, abstract, frozen.adapter_shardings)
  abstract_with_shardings = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
  train_iter = data_pipeline(config.data, run.tokenizer, "train", data_dir=run.data_dir,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             template_dir=template_dir_for(config.data, config.init_from))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every=tcfg.checkpoint_every,
                              keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoints)
  metrics = MetricsWriter(workdir, enabled=primary)
  restored = checkpointer.restore_latest(abstract_with_shardings, train_iter,
                                         shared_data=config.data.shard == "rows")
  if restored is not None:
    start, state, _ = restored
    metrics.truncate_after(start)
    print(f"zoo: resuming from the checkpoint at step {start}")
  elif frozen is None:
    start, state = 0, _initial_state(run, tx, shardings)
  else:
    start, state = 0, jax.jit(lora_init, out_shardings=shardings)()
  meta = {"model_config": run.model_config.to_dict(), "zoo_config": config.to_json()}

  base = None if frozen is None else frozen.base
  extra = () if frozen is None else (frozen.base_shardings,)
  train_step = jax.jit(make_train_step(graphdef, tx, schedule, z_loss=tcfg.z_loss,
                                       grad_accum=tcfg.grad_accum, frozen=frozen is not None,
                                       dropout=frozen is not None and frozen.spec.dropout > 0),
                       in_shardings=(shardings, batch_sharding, *extra),
                       out_shardings=(shardings, sharding.replicated(run.mesh)),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef),
                      in_shardings=(shardings["params"], batch_sharding, *extra))
  frozen_args = () if base is None else (base,)
  peak = tcfg.peak_flops or measure_peak_flops()["peak_flops"] * jax.process_count()
  per_token = flops_per_token(run.model_config, config.data.seq_len)

  def evaluate(params) -> float:
    # A fixed number of batches (the held-out split repeats if it is smaller), so that every
    # process runs the same number of steps.
    it = data_pipeline(config.data, run.tokenizer, "validation", data_dir=run.data_dir,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       template_dir=template_dir_for(config.data, config.init_from))
    nll = weight = 0.0
    for _ in range(tcfg.eval_batches):
      out = eval_step(params, _to_global(next(it), batch_sharding), *frozen_args)
      nll, weight = nll + float(out["nll_sum"]), weight + float(out["weight"])
    return nll / max(weight, 1.0)

  summary = {"start_step": start, "losses": {}}
  last_good = checkpointer.latest_step()
  with sharding.use(run.mesh, run.rules), _StopFlag() as stop:
    bar = tqdm(total=tcfg.steps, initial=start, disable=not primary, desc="train",
               dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0.0
    step, saved = start, True
    heartbeat = Heartbeat.from_env()  # first beat after the first step (which compiles)
    while step < tcfg.steps:
      batch = _to_global(next(train_iter), batch_sharding)
      state, out = train_step(state, batch, *frozen_args)
      step += 1
      loss = float(out["loss"])
      heartbeat.beat(step)
      if not math.isfinite(loss):
        bar.close()
        checkpointer.wait()
        where = (f"the last good checkpoint is step {last_good} in {workdir}/checkpoints"
                 if last_good is not None else "no checkpoint was written")
        raise ZooError(f"loss became {loss} at step {step}; stopping ({where})")
      summary["losses"][step] = loss
      window_tokens += float(out["tokens"])
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}")
      record = {}
      if step % tcfg.log_every == 0 or step == tcfg.steps:
        elapsed = time.perf_counter() - window_start
        tokens_per_sec = window_tokens / max(elapsed, 1e-9)
        record.update(loss=loss, lr=float(out["lr"]), grad_norm=float(out["grad_norm"]),
                      tokens_per_sec=tokens_per_sec, mfu=mfu(tokens_per_sec, per_token, peak))
        window_start, window_tokens = time.perf_counter(), 0.0
      if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
        record["eval_loss"] = evaluate(state["params"])
        summary["eval_loss"] = record["eval_loss"]
        summary.setdefault("first_eval_loss", record["eval_loss"])
      if record:
        metrics.write(step, record)
      if checkpointer.save(step, state, train_iter, meta, force=stop.signal is not None):
        last_good = step
      saved = last_good == step
      if stop.signal is not None:
        checkpointer.wait()
        bar.close()
        print(f"zoo: {stop.signal} received; saved a checkpoint at step {step} in "
              f"{workdir}/checkpoints", file=sys.stderr)
        summary["stopped_by"] = stop.signal
        summary["step"] = step
        return summary
    bar.close()
    if step > start and not saved:
      checkpointer.save(step, state, train_iter, meta, force=True)
    checkpointer.close()
    summary["step"] = step
    if frozen is None:
      model_dir = os.path.join(workdir, "model")
      _export_model(run, state["params"], model_dir)
      summary["model"] = model_dir
    else:
      summary.update(_export_adapter(run, frozen, state["params"], workdir))
    metrics.close()
    if primary:
      plot = os.path.join(workdir, "loss.png")
      plot_losses(os.path.join(workdir, "metrics.jsonl"), plot)
      if tcfg.sample_tokens:
        summary["sample"] = _greedy_sample(graphdef, state["params"], run.tokenizer,
                                           tcfg.sample_prompt, tcfg.sample_tokens,
                                           config.data.seq_len, base)
      summary.update(checkpoints=os.path.join(workdir, "checkpoints"),
                     tensorboard=os.path.join(workdir, "tensorboard"), plot=plot,
                     metrics=os.path.join(workdir, "metrics.jsonl"))
  heartbeat.beat(step, done=True)
  return summary
