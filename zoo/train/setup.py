"""From a training config to what the loop runs: checked, resolved, placed and compiled.

`prepare(config, workdir)` checks the whole config and resolves it (mesh, rules table, model
config, tokenizer, datasets) before anything is compiled, raising ZooError naming the first
problem. `build(run)` makes the `Trainer`: the optimizer, the state's shardings, the LoRA trees
when the run trains adapters, and the jitted train and eval steps. The loop, the benchmarks and
tests all go through these two, so they run what `zoo train` runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from zoo import paths, sharding
from zoo.convert.checkpoint import Checkpoint, checkpoint_config
from zoo.data.instruct import template_dir_for
from zoo.data.preference import check_preference_data
from zoo.data.pipeline import data_pipeline, tokenizer_for
from zoo.data.tokenizers import Tokenizer, load_tokenizer, token_bytes
from zoo.errors import ZooError
from zoo.layers.quant import KINDS as QUANT_KINDS
from zoo.layers.quant import is_quantized, quantize_leaf
from zoo.lora import LoraSpec, LoraTrees, split_for_training
from zoo.models.config import LlamaConfig
from zoo.layers.attention import resolve_attention_impl
from zoo.models.llama import Llama, abstract_model, as_dtype, check_remat
from zoo.models.loss import BATCH_DTYPES
from zoo.models.presets import get_preset
from zoo.models.stack import is_stacked, scan_period
from zoo.train.checkpoint import load_tree
from zoo.train.config import check_config
from zoo.train.optim import make_optimizer
from zoo.train.preference import (DpoSpec, PairModels, dpo_spec, make_dpo_eval_step,
                                  make_dpo_train_step)
from zoo.train.step import State, init_state, make_eval_step, make_train_step, state_shardings


# Where datasets and tokenizers are built when the workdir is on Cloud Storage: each host's
# own disk (every process reads the files it builds; process 0 builds first).
LOCAL_DATA_DIR = os.path.join("~", ".cache", "zoo", "data")


@dataclasses.dataclass
class Run:
  """A training config resolved: everything known before anything is compiled."""
  config: ml_collections.ConfigDict
  workdir: str
  model_config: LlamaConfig
  tokenizer: Tokenizer | None  # None: a run built without data (benchmarks)
  mesh: jax.sharding.Mesh
  rules: tuple
  data_dir: str
  attention_impl: str  # resolved for the devices' platform
  scan_layers: bool  # resolved for the model's layers (zoo.models.stack.scan_period)
  # Preference tuning (data.format preference): the losses' settings, and what checking every
  # pair found per split (zoo.data.preference.PairStats; None for a run built without data).
  dpo: DpoSpec | None = None
  pair_stats: dict | None = None

  @property
  def platform(self) -> str:
    """The platform of the run's devices ("cpu", "gpu", "tpu"; for zoo plan, the target's)."""
    return self.mesh.devices.flat[0].platform

  @property
  def template_dir(self) -> str | None:
    return template_dir_for(self.config.data, self.config.init_from)

  def data(self, split: str):
    """This process's iterator over `split` ("train" or "validation") batches."""
    return data_pipeline(self.config.data, self.tokenizer, split, data_dir=self.data_dir,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         template_dir=self.template_dir)


def schedule_steps(config) -> int:
  """The length of the learning-rate schedule; a run may stop before it ends and resume."""
  return config.train.schedule_steps or config.train.steps


def lora_spec(config) -> LoraSpec | None:
  """The run's LoraSpec, or None when it trains the whole model (lora.rank 0)."""
  cfg = config.lora
  if not cfg.rank:
    return None
  if not config.init_from:
    raise ZooError("lora.rank > 0 fine-tunes a checkpoint: set init_from")
  if cfg.quantize not in ("none", *QUANT_KINDS):
    raise ZooError(f"unknown lora.quantize {cfg.quantize!r}; use none, {', '.join(QUANT_KINDS)}")
  targets = tuple(t.strip() for t in str(cfg.targets).split(",") if t.strip())
  return LoraSpec(rank=cfg.rank, alpha=float(cfg.alpha), targets=targets,
                  dropout=float(cfg.dropout), rslora=bool(cfg.rslora))


def model_kwargs(run: Run) -> dict:
  """How the model computes (not what it is): the Llama constructor's keyword arguments, with
  the attention implementation for the platform of the run's devices."""
  config = run.config
  return dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
              remat_impl="custom_vjp" if run.platform == "cpu" else "checkpoint",
              moe_impl=config.moe_impl, attention_impl=run.attention_impl,
              scan_layers=run.scan_layers)


def process_zero_first(fn):
  """fn() on process 0, then on the others once it is done: what process 0 builds into a
  shared directory (datasets, a trained tokenizer) the others then only read."""
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    try:
      return fn()
    finally:  # on an error too, so that the others do not wait forever (they meet it as well)
      multihost_utils.sync_global_devices("zoo: process 0 prepared the data")
  multihost_utils.sync_global_devices("zoo: process 0 prepared the data")
  return fn()


def _check_train_fields(config):
  if config.train.steps <= 0:
    raise ZooError("train.steps must be positive")
  if config.train.grad_accum < 1:
    raise ZooError("train.grad_accum must be >= 1")
  if config.train.schedule_steps < 0:
    raise ZooError("train.schedule_steps must be >= 0")
  chunk, length = config.train.loss_chunk, config.data.seq_len
  if chunk < 0 or (0 < chunk < length and length % chunk):
    raise ZooError(f"train.loss_chunk {chunk} must be 0 (the whole row), divide data.seq_len "
                   f"({length}) or cover it")
  make_optimizer(config.optimizer, schedule_steps(config))  # checks the optimizer fields
  lora_spec(config)  # checks the LoRA fields
  spec = dpo_spec(config)  # checks the DPO fields
  if spec is not None:
    if not config.init_from:
      raise ZooError("data.format preference (DPO) tunes a checkpoint: set init_from")
    if config.data.source != "files":
      raise ZooError("data.format preference reads JSONL files: set data.source files and "
                     "data.files")
    if config.train.router_aux_loss_coef:
      raise ZooError("train.router_aux_loss_coef is not applied by the DPO step; leave it 0")
    if config.train.z_loss:
      raise ZooError("train.z_loss is not applied by the DPO step; leave it 0")


def _mesh_and_rules(config, devices=None) -> tuple[jax.sharding.Mesh, tuple]:
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in config.sharding_rules)
  sharding.logical_to_spec(sharding.LOGICAL_AXES, rules)  # checks the table
  batch = config.data.batch_size
  sharding.local_batch_size(batch, mesh, rules)
  ways = sharding.batch_ways(mesh, rules)
  if (batch // ways) % config.train.grad_accum:
    raise ZooError(f"batch size {batch} does not split into {config.train.grad_accum} "
                   f"microbatches on each of {ways} batch shards")
  return mesh, rules


def _tokenizer_size(config, tokenizer: Tokenizer | None) -> int:
  """The vocabulary a run's tokenizer has: a run without data reads a given tokenizer file,
  or takes the size a trained one would have (data.vocab_size), training none."""
  if tokenizer is not None:
    return tokenizer.vocab_size
  if config.data.tokenizer:
    return load_tokenizer(config.data.tokenizer).vocab_size
  return config.data.vocab_size


def _model_config(config, tokenizer: Tokenizer | None, with_data: bool) -> LlamaConfig:
  if config.init_from:  # a run without data reads no weights: the config file is enough
    if with_data:
      return Checkpoint(config.init_from).config  # checks its tensors too
    return checkpoint_config(config.init_from)
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in config.model.items() if k != "preset"}
  if overrides.get("vocab_size") == 0:  # the tokenizer's size, padded to a multiple of 64
    overrides["vocab_size"] = -(-_tokenizer_size(config, tokenizer) // 64) * 64
  try:
    return get_preset(config.model.preset, **overrides)
  except TypeError as e:
    raise ZooError(f"bad model override: {e}") from None


def prepare(config, workdir: str, *, with_data: bool = True, devices=None) -> Run:
  """Checks the config, mesh, tokenizer and data; raises ZooError naming the first problem.

  with_data=False builds no dataset and trains no tokenizer (a model vocabulary of 0 then
  takes the size the tokenizer would have). `devices` (default: all of JAX's) are those the
  mesh is laid over; `zoo plan` passes a TPU topology's compile-only devices."""
  check_config(config)
  _check_train_fields(config)
  mesh, rules = _mesh_and_rules(config, devices)
  # How the model computes on these devices, checked before any data is built.
  platform = mesh.devices.flat[0].platform
  attention = resolve_attention_impl(config.attention_impl, platform, as_dtype(config.dtype))
  check_remat(config.remat)
  if config.remat.startswith("offload") and platform == "cpu":
    raise ZooError(f"remat {config.remat} offloads activations to host memory, which needs "
                   "TPU or GPU devices; on the CPU use full, save_qkvo, dots or none")
  for source in (config.init_from, config.data.tokenizer):
    if paths.is_remote(source):  # each host's copy, downloaded once (process 0 first)
      process_zero_first(lambda source=source: paths.localize(source))
  data_dir = config.data.data_dir or (LOCAL_DATA_DIR if paths.is_remote(workdir)
                                      else os.path.join(workdir, "data"))
  # A gs:// data_dir is built and read in this machine's copy of it (array_record files are
  # read locally): process 0 builds what is missing and uploads it, the others download it.
  remote_data = data_dir if paths.is_remote(data_dir) else None
  if remote_data:
    paths.check_reachable(paths.resolve(remote_data))
    data_dir = paths.local_copy(paths.resolve(remote_data))
  data_dir = os.path.expanduser(data_dir)
  tokenizer = None
  preference = config.data.format == "preference"
  if with_data:
    os.makedirs(data_dir, exist_ok=True)

    def build_data():  # the datasets and the tokenizer, built once and cached in data_dir
      if preference and not config.data.tokenizer:
        try:  # pre-tokenized pairs need none; text pairs say so when they meet its absence
          tokenizer = load_tokenizer(config.init_from)
        except ZooError:
          tokenizer = None
      elif config.data.tokenizer or config.init_from:
        tokenizer = load_tokenizer(config.data.tokenizer or config.init_from)
      else:
        tokenizer = tokenizer_for(config.data, data_dir)
      template_dir = template_dir_for(config.data, config.init_from)
      for split in ("train", "validation") if config.train.eval_every else ("train",):
        data_pipeline(config.data, tokenizer, split, data_dir=data_dir,  # raises if empty
                      template_dir=template_dir)
      return tokenizer

    def build_and_share():
      if remote_data:
        paths.pull_tree(remote_data, data_dir)
      tokenizer = build_data()
      if remote_data and jax.process_index() == 0:
        paths.push_tree(data_dir, remote_data)
      return tokenizer

    tokenizer = process_zero_first(build_and_share)
  model_config = _model_config(config, tokenizer, with_data)
  if tokenizer is not None and tokenizer.vocab_size > model_config.vocab_size:
    raise ZooError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the "
                   f"model's embeddings ({model_config.vocab_size})")
  if config.data.seq_len > model_config.max_position_embeddings:
    raise ZooError(f"data.seq_len {config.data.seq_len} is longer than the model allows "
                   f"({model_config.max_position_embeddings})")
  aux = config.train.router_aux_loss_coef
  if aux < 0 or (aux and not (model_config.num_experts and model_config.router == "softmax")):
    raise ZooError(f"train.router_aux_loss_coef {aux} must be >= 0 and applies to MoE models "
                   "with softmax routing (Mixtral, Qwen3-MoE) only")
  spec, pair_stats = dpo_spec(config), None
  if spec is not None:
    _check_reference(spec, model_config)
    if spec.reference and not spec.uses_reference and jax.process_index() == 0:
      print(f"zoo: note: dpo.loss simpo uses no reference model; dpo.reference "
            f"{spec.reference} is not read", file=sys.stderr)
    if with_data:
      splits = ("train", "validation") if config.train.eval_every else ("train",)
      pair_stats = check_preference_data(
          config.data, tokenizer, splits, data_dir=data_dir,
          template_dir=template_dir_for(config.data, config.init_from),
          vocab_size=model_config.vocab_size, verbose=jax.process_index() == 0)
  scan = bool(config.scan_layers)
  if scan and scan_period(model_config) is None:
    scan = False
    if jax.process_index() == 0:
      print("zoo: note: scan_layers is on, but the model's layers differ (per-layer attention "
            "windows) without a repeating group; they run unrolled", file=sys.stderr)
  return Run(config, workdir, model_config, tokenizer, mesh, rules, data_dir, attention, scan,
             spec, pair_stats)


def _check_reference(spec: DpoSpec, model_config: LlamaConfig):
  """A separate DPO reference must be the policy's architecture, vocabulary included."""
  if not (spec.reference and spec.uses_reference):
    return
  if paths.is_remote(spec.reference):
    process_zero_first(lambda: paths.localize(spec.reference))
  ref = checkpoint_config(spec.reference).to_dict()
  ours = model_config.to_dict()
  if ref.get("vocab_size") != ours.get("vocab_size"):
    raise ZooError(f"the reference {spec.reference} has a vocabulary of {ref.get('vocab_size')} "
                   f"tokens, the policy (init_from) {ours.get('vocab_size')}: a reference must "
                   "score the same tokens")
  for name in sorted(set(ref) | set(ours)):
    if ref.get(name) != ours.get(name):
      raise ZooError(f"the reference {spec.reference} is another architecture than the policy "
                     f"(init_from): {name} {ref.get(name)!r} vs {ours.get(name)!r}")


@dataclasses.dataclass
class Trainer:
  """A run made ready to step: the model graph, the optimizer, where every array lives, and
  the two jitted steps.

  train_step(state, batch, *frozen) -> (state, metrics) donates the state;
  eval_step(params, batch, token_bytes, *frozen) -> {"nll_sum", "weight", "bytes"}.
  `base` is () for a full run and (the frozen base tree,) for LoRA, whose state's params are the
  adapters; `lora` holds the LoRA trees (with the base read from init_from). `frozen` is the
  base and, for preference tuning with a reference tree of its own, that tree
  (`reference`: never differentiated or checkpointed); `dpo` is then the losses' settings, the
  batches are pairs ([B, 2, T]) and the eval step returns zoo.train.preference's sums.
  """
  run: Run
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: State
  abstract_state: State  # ShapeDtypeStructs carrying the shardings, for restoring
  batch_sharding: jax.sharding.NamedSharding
  lora: LoraTrees | None
  train_step: Callable
  eval_step: Callable
  dpo: DpoSpec | None = None
  reference: dict | None = None

  @property
  def base(self) -> tuple:
    return () if self.lora is None else (self.lora.base,)

  @property
  def frozen(self) -> tuple:
    """The steps' inputs after the batch: the LoRA base, then a DPO reference tree."""
    return self.base + (() if self.reference is None else (self.reference,))

  @property
  def lora_spec(self) -> LoraSpec | None:
    return lora_spec(self.run.config)

  def initial_state(self) -> State:
    """Step 0: fresh parameters drawn from the seed, a checkpoint's parameters (init_from) read
    tensor by tensor with nothing drawn at random, or a LoRA run's initial adapters."""
    config = self.run.config
    seed = config.train.seed
    place = functools.partial(jax.jit, out_shardings=self.shardings)
    if self.lora is not None:
      return place(lambda p: init_state(p, self.tx, seed))(self.lora.adapters)
    if not config.init_from:
      def fresh(key):
        model = Llama(self.run.model_config, rngs=nnx.Rngs(params=key),
                      **model_kwargs(self.run))
        return init_state(nnx.split(model, nnx.Param)[1].to_pure_dict(), self.tx, seed)
      return place(fresh)(jax.random.key(seed))
    params = load_tree(config.init_from, self.abstract_state["params"],
                       self.shardings["params"])
    return place(lambda p: init_state(p, self.tx, seed))(params)

  def abstract_batch(self) -> dict:
    """The global batch as ShapeDtypeStructs laid out by the rules (for compiling ahead)."""
    shape = (self.run.config.data.batch_size, self.run.config.data.seq_len)
    if self.dpo is not None:  # pairs: chosen and rejected rows
      shape = (shape[0], 2, shape[1])
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for k, dtype in BATCH_DTYPES.items()}

  def global_batch(self, batch: dict) -> dict:
    """This process's rows of a batch (numpy) as global arrays laid out by the rules."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def token_bytes(self) -> jax.Array:
    """Each token's length in bytes (for bits per byte), padded to the model's vocabulary."""
    table = np.zeros(self.run.model_config.vocab_size, np.int32)
    if self.run.tokenizer is not None:
      sizes = token_bytes(self.run.tokenizer)
      table[:len(sizes)] = sizes
    return jax.device_put(table, sharding.replicated(self.run.mesh))


def _placed_shapes(abstract: dict, shardings: dict, convert=None) -> dict:
  """What `load_tree(path, abstract, shardings, convert)` would return, as ShapeDtypeStructs
  carrying their shardings, with nothing read."""
  def one(key_path, leaf, leaf_sharding):
    name = ".".join(str(k.key) for k in key_path)
    value = leaf if convert is None else convert(name, leaf)
    if is_quantized(value):
      parts = sharding.quantized_sharding(value, leaf_sharding)
      return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          value, parts)
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=leaf_sharding)

  return jax.tree_util.tree_map_with_path(one, abstract, shardings)


def _quantizer(config) -> Callable | None:
  """QLoRA's convert(name, array) for load_tree: the base quantized as it arrives."""
  if config.lora.quantize == "none":
    return None

  def quantize(name, array):
    return quantize_leaf(name, array, config.lora.quantize, config.lora.block_size,
                         stacked=is_stacked(name))
  return quantize


def _lora_trees(run: Run, load_base: bool) -> LoraTrees:
  """The LoRA split with its base read from init_from, quantized as it arrives for QLoRA
  (load_base=False: the base's shapes and shardings only)."""
  config = run.config
  trees = split_for_training(run.model_config, lora_spec(config), run.mesh, run.rules,
                             seed=config.train.seed, **model_kwargs(run))
  quantize = _quantizer(config)
  if load_base:
    base = load_tree(config.init_from, trees.base, trees.base_shardings, quantize)
  else:
    base = _placed_shapes(trees.base, trees.base_shardings, quantize)
  return dataclasses.replace(trees, base=base,
                             base_shardings=jax.tree.map(lambda x: x.sharding, base))


def build(run: Run, *, load_base: bool = True) -> Trainer:
  """The Trainer of a prepared run (compiles lazily). A LoRA run's base is read from
  init_from; with load_base=False it stays abstract (ShapeDtypeStructs), for compiling only."""
  config = run.config
  tx, schedule = make_optimizer(config.optimizer, schedule_steps(config))
  rep = sharding.replicated(run.mesh)
  spec = lora_spec(config)
  if spec is None:
    lora = None
    model = abstract_model(run.model_config, **model_kwargs(run))
    graphdef, abstract_params = nnx.split(model, nnx.Param)
    abstract_params = abstract_params.to_pure_dict()
    param_shardings = sharding.param_shardings(model, run.mesh, run.rules)
    base_shardings = ()
  else:
    lora = _lora_trees(run, load_base)
    graphdef, abstract_params = lora.graphdef, lora.adapters
    param_shardings = lora.adapter_shardings
    base_shardings = (lora.base_shardings,)
  shardings = state_shardings(tx, abstract_params, param_shardings, rep)
  abstract = jax.eval_shape(lambda p: init_state(p, tx, config.train.seed), abstract_params)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
  dropout = spec is not None and spec.dropout > 0
  if run.dpo is not None:
    return _build_dpo(run, tx, schedule, graphdef, lora, shardings, abstract, base_shardings,
                      dropout, load_base)
  train_step = jax.jit(
      make_train_step(graphdef, tx, schedule, z_loss=config.train.z_loss,
                      grad_accum=config.train.grad_accum, dropout=dropout,
                      loss_chunk=config.train.loss_chunk,
                      router_aux=config.train.router_aux_loss_coef),
      in_shardings=(shardings, batch_sharding, *base_shardings),
      out_shardings=(shardings, rep), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef, loss_chunk=config.train.loss_chunk),
                      in_shardings=(shardings["params"], batch_sharding, rep, *base_shardings))
  return Trainer(run, graphdef, tx, schedule, shardings, abstract, batch_sharding, lora,
                 train_step, eval_step)



def _build_dpo(run: Run, tx, schedule, graphdef, lora: LoraTrees | None, shardings: State,
               abstract: State, base_shardings: tuple, dropout: bool, load_base: bool
               ) -> Trainer:
  """The Trainer of a preference run: batches of pairs, and the reference as a frozen tree of
  its own (full fine-tuning, or LoRA with dpo.reference), as the LoRA base under the plain
  model's graph (adapters off), or none (SimPO)."""
  config, spec = run.config, run.dpo
  rep = sharding.replicated(run.mesh)
  plain = abstract_model(run.model_config, **model_kwargs(run))
  plain_graphdef, plain_params = nnx.split(plain, nnx.Param)
  plain_params = plain_params.to_pure_dict()
  own = spec.uses_reference and (lora is None or bool(spec.reference))
  reference, frozen_shardings = None, base_shardings
  if own:
    convert = None if lora is None else _quantizer(config)
    ref_shardings = sharding.param_shardings(plain, run.mesh, run.rules)
    source = spec.reference or config.init_from
    if load_base:
      reference = load_tree(source, plain_params, ref_shardings, convert)
    else:
      reference = _placed_shapes(plain_params, ref_shardings, convert)
    frozen_shardings = base_shardings + (jax.tree.map(lambda x: x.sharding, reference),)
  models = PairModels(graphdef, plain_graphdef if spec.uses_reference else None,
                      lora=lora is not None, own_reference=own)
  batch_spec = sharding.batch_sharding(run.mesh, run.rules).spec
  pair_sharding = jax.sharding.NamedSharding(
      run.mesh, jax.sharding.PartitionSpec(batch_spec[0], None, *batch_spec[1:]))
  chunk = config.train.loss_chunk
  train_step = jax.jit(
      make_dpo_train_step(spec, models, tx, schedule, grad_accum=config.train.grad_accum,
                          dropout=dropout, loss_chunk=chunk),
      in_shardings=(shardings, pair_sharding, *frozen_shardings),
      out_shardings=(shardings, rep), donate_argnums=0)
  eval_step = jax.jit(make_dpo_eval_step(spec, models, loss_chunk=chunk),
                      in_shardings=(shardings["params"], pair_sharding, rep, *frozen_shardings))
  return Trainer(run, graphdef, tx, schedule, shardings, abstract, pair_sharding, lora,
                 train_step, eval_step, dpo=spec, reference=reference)
