"""The training config: every field with its default, shared by the files in configs/.

A config file's `get_config(arg)` starts from `base_config()` and changes what its experiment
needs; `parse_arg` reads the `:ARGS` part of `--config configs/NAME.py:ARGS`, and `shrink`
makes any config small enough to run a step on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from zoo.errors import ZooError
from zoo.models.config import LlamaConfig
from zoo.sharding import DEFAULT_RULES
from zoo.train.optim import default_config as optimizer_defaults

# Where configs/ is found when a relative config path is not found from the working directory.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What `model.*` may hold: a preset name and LlamaConfig fields to override in it.
MODEL_FIELDS = ("preset", *(f.name for f in dataclasses.fields(LlamaConfig)))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # The model: a preset and any LlamaConfig fields to override (vocab_size 0: the tokenizer's).
  c.model = ml_collections.ConfigDict({"preset": "tiny_llama", "vocab_size": 0})
  c.init_from = ""  # a zoo or HF checkpoint to fine-tune from (its config and tokenizer)
  c.dtype = "float32"  # compute dtype
  c.param_dtype = "float32"  # master parameters
  c.remat = "none"  # none | full | dots | dots_no_batch | save_qkvo | offload_qkvo
  c.moe_impl = "ragged"
  # auto | xla | splash | cudnn; auto: splash (the Pallas fused kernel) on TPU, cuDNN's fused
  # attention on GPU in 16-bit compute, XLA's elsewhere (zoo.layers.attention)
  c.attention_impl = "auto"
  # Decoder layers stacked and run by one scan (zoo.models.stack): one layer group compiled
  # whatever the depth. Layers that differ without a repeating group run unrolled, with a note.
  c.scan_layers = False

  c.data = ml_collections.ConfigDict(dict(
      source="python_stdlib",  # python_stdlib | files | tfds
      files="",  # comma-separated globs of .txt/.jsonl files, for source=files
      tfds_name="",  # a prepared TFDS dataset, for source=tfds
      text_key="text",
      format="text",  # text | instruct (JSONL prompt/completion or chat messages, see zoo.data.instruct)
      # | preference (JSONL prompt/chosen/rejected pairs, zoo.data.preference): trains with DPO
      chat_template="",  # a directory with the chat template; default the tokenizer's / init_from
      eval_fraction=0.02,
      data_dir="",  # where datasets and tokenizers are built; default WORKDIR/data
      tokenizer="",  # a tokenizer file or checkpoint dir; empty: train SentencePiece
      vocab_size=2000,  # for a trained SentencePiece tokenizer
      seq_len=128,
      batch_size=8,  # global, over all processes
      seed=0,
      shuffle=True,
      pack=True,
      add_bos=True,
      add_eos=True,
      num_workers=0,
      # How processes share the data: "documents" (process i reads documents i, i + n, ...) or
      # "rows" (every process runs the whole pipeline and keeps its rows of each global batch:
      # the batches, and the data position in checkpoints, do not depend on the process count).
      shard="documents",
      # format preference: the most prompt tokens kept when a pair does not fit seq_len (cut
      # from the left; the completions are then cut from the right); 0: half of seq_len
      max_prompt_len=0,
  ))
  c.optimizer = optimizer_defaults()
  c.train = ml_collections.ConfigDict(dict(
      steps=100,
      schedule_steps=0,  # length of the lr schedule; 0: train.steps
      seed=0,
      grad_accum=1,
      z_loss=0.0,
      # The loss makes the logits this many tokens of each row at a time and again in the
      # backward pass, so the whole [batch, length, vocab] never exists; 0: all at once.
      loss_chunk=0,
      # MoE models with softmax routing (Mixtral, Qwen3-MoE): this multiple of the
      # load-balancing loss (transformers' router_aux_loss_coef) joins the objective; 0: off
      router_aux_loss_coef=0.0,
      log_every=10,
      eval_every=50,
      eval_batches=8,
      checkpoint_every=50,
      keep_checkpoints=2,
      async_checkpoints=True,
      peak_flops=0.0,  # the hardware's total FLOP/s for MFU; 0: measure a matmul here
      # JAX's persistent compilation cache ("": WORKDIR/compilation_cache), which a restarted
      # or resumed job reads instead of compiling again
      compilation_cache_dir="",
      # The end-of-run sample: sample_tokens new tokens after sample_prompt, drawn at
      # sample_temperature (0: greedy) and sample_top_p with sample_seed.
      sample_prompt="def ",
      sample_tokens=48,
      sample_temperature=0.8,
      sample_top_p=0.95,
      sample_seed=0,
  ))
  # LoRA (rank > 0): train low-rank adapters on the frozen init_from checkpoint; the base may be
  # held quantized (QLoRA: int8 or nf4, block-wise scales) and is dequantized inside the step.
  c.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, targets="q_proj,v_proj", dropout=0.0, rslora=False,
      quantize="none", block_size=64))
  # Preference tuning (data.format preference, zoo.train.preference): loss sigmoid (DPO), ipo,
  # hinge or simpo (reference-free, length-normalised, target margin gamma); label_smoothing
  # (conservative DPO, sigmoid and simpo); sft_weight: that multiple of the chosen completions'
  # mean token NLL joins the loss (RPO); reference: the frozen reference checkpoint ("": the
  # init_from checkpoint, or with LoRA the base with the adapters off).
  c.dpo = ml_collections.ConfigDict(dict(
      loss="sigmoid", beta=0.1, label_smoothing=0.0, sft_weight=0.0, gamma=0.5, reference=""))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = tuple(DEFAULT_RULES)
  return c


def pretraining_config(preset: str, *, seq_len: int, batch_size: int, lr: float,
                       arg: str | None, name: str) -> ml_collections.ConfigDict:
  """Pretraining a preset from scratch with FSDP over all devices, bf16 compute on f32 master
  weights and remat; the schedule has the published recipes' shape at a smaller token budget."""
  args = parse_arg(arg)
  check_args(args, {"shrink"}, name)
  c = base_config()
  c.model = ml_collections.ConfigDict({"preset": preset})
  c.dtype = "bfloat16"
  # On TPU, splash attention (attention_impl auto), each layer's input alone kept for the
  # backward pass, and the logits made 1024 tokens at a time: what fits 8 sequences of 8192
  # tokens of an 8B model on a v5p chip (zoo plan; README).
  c.remat = "full"
  c.train.loss_chunk = 1024
  c.scan_layers = True
  c.data.update(dict(seq_len=seq_len, batch_size=batch_size, vocab_size=32000))
  c.optimizer.update(dict(lr=lr, b2=0.95, weight_decay=0.1, warmup_steps=2000,
                          min_lr_ratio=0.1, grad_clip=1.0))
  c.train.update(dict(steps=100_000, log_every=50, eval_every=2000, eval_batches=50,
                      checkpoint_every=1000, keep_checkpoints=3))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return shrink(c) if args.get("shrink") else c


def parse_arg(arg: str | None) -> dict:
  """'shrink,model=llama3_8b,rank=16' -> {'shrink': True, 'model': 'llama3_8b', 'rank': '16'}."""
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    out[key.strip()] = value.strip() if sep else True
  return out


def check_args(args: dict, allowed: set[str], config_name: str):
  unknown = sorted(set(args) - allowed)
  if unknown:
    raise ZooError(f"{config_name} does not take argument {unknown[0]!r} "
                   f"(it takes: {', '.join(sorted(allowed))})")


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment at a size that runs a step in seconds on a CPU. A fine-tuning config
  (init_from set) keeps its checkpoint's model and tokenizer: only the run gets shorter."""
  tuned = bool(c.init_from)
  if not tuned:
    c.model = ml_collections.ConfigDict({
        "preset": c.model.preset, "vocab_size": 0, "hidden_size": 64, "intermediate_size": 128,
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16})
  if not (tuned or c.data.tokenizer):
    c.data.vocab_size = 512
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.train.steps = 2
  c.train.log_every = 1
  c.train.eval_every = 2
  c.train.eval_batches = 1
  c.train.checkpoint_every = 2
  c.train.sample_tokens = 4
  c.train.peak_flops = 1e12
  c.optimizer.warmup_steps = 1
  return c


def _flatten(c, prefix="") -> dict:
  out = {}
  for key, value in c.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _differs(value, default) -> bool:
  def plain(x):
    return tuple(map(plain, x)) if isinstance(x, (list, tuple)) else x
  return plain(value) != plain(default)


def check_config(config: ml_collections.ConfigDict):
  """Raises ZooError naming the first field that nothing would read: a field base_config()
  does not have, a `model.*` that is not a LlamaConfig field, and a set field that the rest of
  the config makes moot (model.* with init_from, lora.* with lora.rank 0, data fields of
  another source or of a tokenizer that is not trained)."""
  defaults = _flatten(base_config())
  values = _flatten(config)
  for name in values:
    section, _, field = name.partition(".")
    if section == "model":
      if field not in MODEL_FIELDS:
        hint = (f" ({field} is a top-level field: --config.{field})"
                if f"{field}" in defaults else "")
        raise ZooError(f"model.{field} is not a model field{hint}; model.* takes preset and "
                       f"the fields of LlamaConfig")
    elif name not in defaults:
      raise ZooError(f"unknown config field {name}")

  def set_(name):
    return name in values and _differs(values[name], defaults.get(name))

  if config.init_from:
    for name in values:
      if name.startswith("model.") and set_(name):
        raise ZooError(f"{name} is set, but init_from takes the model from the checkpoint "
                       f"(only dtype, param_dtype, remat, moe_impl, attention_impl and scan_layers apply)")
  if not config.lora.rank:
    for name in values:
      if name.startswith("lora.") and name != "lora.rank" and set_(name):
        raise ZooError(f"{name} is set, but lora.rank is 0 (no LoRA)")
  source = config.data.source
  for name, needs in (("data.files", "files"), ("data.tfds_name", "tfds")):
    if set_(name) and source != needs:
      raise ZooError(f"{name} is set, but data.source is {source!r}, not {needs!r}")
  if set_("data.vocab_size") and (config.data.tokenizer or config.init_from):
    where = "data.tokenizer" if config.data.tokenizer else "init_from"
    raise ZooError(f"data.vocab_size is set, but the tokenizer comes from {where}")
  if set_("data.chat_template") and config.data.format not in ("instruct", "preference"):
    raise ZooError("data.chat_template is set, but data.format is not 'instruct' or "
                   "'preference'")
  if config.data.format != "preference":
    for name in values:
      if (name.startswith("dpo.") or name == "data.max_prompt_len") and set_(name):
        raise ZooError(f"{name} is set, but data.format is not 'preference' (no DPO)")
  elif set_("dpo.gamma") and config.dpo.loss != "simpo":
    raise ZooError(f"dpo.gamma is set, but dpo.loss is {config.dpo.loss!r}: the target margin "
                   "is SimPO's (dpo.loss simpo)")


def config_path(value: str) -> str:
  """configs/NAME.py[:ARGS] with the file found in the working directory or else beside the
  zoo package."""
  path, sep, arg = value.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
    path = os.path.join(REPO_ROOT, path)
  if not os.path.isfile(path):
    raise ZooError(f"config file {path} does not exist")
  return path + sep + arg


def load_config(value: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config of configs/NAME.py[:ARGS], as `zoo train --config` loads it (locked), with
  {"section.field": value} overrides; a field that does not exist is an error, except that
  `model.*` takes any LlamaConfig field."""
  path, _, arg = config_path(value).partition(":")
  spec = importlib.util.spec_from_file_location("zoo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.lock()
  for name, value in (overrides or {}).items():
    *sections, field = name.split(".")
    try:
      target = config
      for section in sections:
        target = target[section]
      if sections == ["model"] and field in MODEL_FIELDS and field not in target:
        with target.unlocked():  # a config file may leave a model field to its preset
          target[field] = value
      else:
        target[field] = value
    except (AttributeError, KeyError, TypeError) as e:
      raise ZooError(f"cannot set config field {name}: {str(e).splitlines()[0]}") from None
  return config
