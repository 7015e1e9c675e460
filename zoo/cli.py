"""The `zoo` command line.

    zoo train [--config configs/NAME.py[:ARGS]] [--workdir DIR] [--config.FIELD=VALUE ...]
    zoo plan [--config configs/NAME.py[:ARGS]] [--config.FIELD=VALUE ...] [--topology v5p-128]
             [--slices N] [--json]
    zoo convert SRC DST --to {zoo,hf,meta,gguf,peft} [--shards N] [--dtype bfloat16] [--verify]
    zoo init PRESET DST [--to zoo|hf|meta] [--seed 0]
    zoo generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3) [--chat] [--json] ...
    zoo eval --checkpoint DIR --data FILES_OR_TFDS_NAME [--seq-len N] [--batch-size N]
    zoo eval --checkpoint DIR --tasks hellaswag,arc_easy [--num-fewshot K] [--limit N] ...
    zoo presets
    zoo demo [--workdir DIR]

A user mistake is reported as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

import numpy as np
from absl import flags
from ml_collections import config_flags

import zoo
from zoo import distributed, harness, launch, paths
from zoo.convert.checkpoint import convert, detect_format
from zoo.convert.random_init import init_checkpoint
from zoo.convert.verify import compare, compare_gguf
from zoo.data.chat import render_chat
from zoo.data.tokenizers import load_tokenizer
from zoo.errors import StorageError, ZooError
from zoo.infer.evaluate import compressed_bits_per_byte, documents, perplexity
from zoo.infer.generate import Generator, Sampling, generation_config_eos
from zoo.lora import adapter_to_peft
from zoo.models.presets import PRESETS
from zoo.plan import format_plan, plan
from zoo.train.config import REPO_ROOT, config_path
from zoo.train.loop import export_checkpoint, train


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise ZooError(f"{self.prog}: {message}")


def _size(text: str) -> int:
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
  if not m:
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 5GB)")
  unit = (m.group(2) or "B").upper().replace("I", "")
  return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit])


def cmd_convert(args) -> int:
  if args.to == "peft":
    spec, weights = adapter_to_peft(args.src, args.dst, force=args.force)
    print(f"wrote peft adapter {args.dst} (rank {spec.rank}, {len(weights) // 2} modules)")
    return 0
  if args.verify and args.to != "gguf":
    if "hf" not in (detect_format(args.src), args.to):
      raise ZooError("--verify compares with transformers, so one side must be an hf "
                     "checkpoint")
  ckpt = convert(args.src, args.dst, args.to, dtype=args.dtype, force=args.force,
                 max_shard_bytes=args.max_shard_size, shards=getattr(args, "shards", None))
  print(f"wrote {args.to} checkpoint {args.dst} ({ckpt.config.family}, "
        f"{ckpt.config.num_params() / 1e6:.1f}M parameters)")
  for note in ckpt.notes:
    print(f"note: {note}")
  if args.verify and args.to == "gguf":
    return verify_gguf(paths.localize(args.src), paths.localize(args.dst), args.tolerance)
  if args.verify:  # zoo loads the other side, whichever format it is
    hf_side, other = (args.src, args.dst) if ckpt.format == "hf" else (args.dst, args.src)
    hf_side, other = paths.localize(hf_side), paths.localize(other)
    return verify(hf_side, other, 1e-4 if args.tolerance is None else args.tolerance,
                  args.dtype)
  return 0


def verify_gguf(src: str, gguf_path: str, tolerance: float | None) -> int:
  diff, allowed = compare_gguf(src, gguf_path, tolerance=tolerance)
  ok = diff <= allowed
  print(f"verify: max |logit difference| zoo vs llama.cpp = {diff:.3g} "
        f"(allowed {allowed:.3g}): {'ok' if ok else 'FAILED'}")
  return 0 if ok else 1


def verify(hf_dir: str, zoo_path: str, tolerance: float, weights_dtype: str | None = None
           ) -> int:
  diff, allowed = compare(hf_dir, zoo_path, tolerance=tolerance, weights_dtype=weights_dtype)
  ok = diff <= allowed
  print(f"verify: max |logit difference| zoo vs transformers = {diff:.3g} "
        f"(allowed {allowed:.3g}): {'ok' if ok else 'FAILED'}")
  return 0 if ok else 1


def _parse_overrides(pairs: list[str]) -> dict:
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise ZooError(f"--set expects FIELD=VALUE, got {pair!r}")
    try:
      out[key] = json.loads(value)
    except ValueError:
      out[key] = value
  return out


def cmd_init(args) -> int:
  init_checkpoint(args.preset, args.dst, to=args.to, seed=args.seed, dtype=args.dtype,
                  force=args.force, std=args.std, overrides=_parse_overrides(args.set))
  print(f"wrote randomly initialised {args.preset} ({args.to}) to {args.dst}")
  return 0


def cmd_presets(args) -> int:
  for name, c in PRESETS.items():
    print(f"{name:18s} {c.family:8s} {c.num_params() / 1e9:8.3f}B  layers={c.num_layers} "
          f"hidden={c.hidden_size} heads={c.num_heads}/{c.num_kv_heads} vocab={c.vocab_size}")
  return 0


def cmd_demo(args) -> int:
  """A small end-to-end run: random model -> HF -> zoo, then a forward pass on both sides."""
  workdir = args.workdir or tempfile.mkdtemp(prefix="zoo-demo-")
  os.makedirs(workdir, exist_ok=True)
  hf_dir, zoo_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "zoo")
  init_checkpoint(args.preset, hf_dir, to="hf", std=0.1, force=True)
  print(f"1. random {args.preset} model written as an HF checkpoint: {hf_dir}")
  cmd_convert(argparse.Namespace(src=hf_dir, dst=zoo_dir, to="zoo", dtype=None, force=True,
                                 max_shard_size=2**30, verify=False, tolerance=1e-4))
  model = zoo.load(zoo_dir)
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 32))
  logits = model.logits(tokens)
  print(f"2. zoo forward pass: logits {logits.shape}, mean {logits.mean():.4f}, "
        f"std {logits.std():.4f}")
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    print("3. (install zoo[test] to compare with transformers)")
    return 0
  print("3. ", end="")
  return verify(hf_dir, zoo_dir, 1e-4)


def _load_for_inference(args):
  # gs:// checkpoints and tokenizers are read from this machine's copy
  args.checkpoint = paths.localize(args.checkpoint)
  if args.tokenizer:
    args.tokenizer = paths.localize(args.tokenizer)
  model = zoo.load(args.checkpoint, dtype=args.dtype, adapter=getattr(args, "adapter", None))
  tokenizer = None
  source = args.tokenizer or args.checkpoint
  if args.tokenizer or any(os.path.isfile(os.path.join(source, name))
                           for name in ("tokenizer.json", "tokenizer.model")):
    tokenizer = load_tokenizer(source)
  return model, tokenizer


def _stop_ids(args, model, tokenizer) -> list[int]:
  """EOS ids from the tokenizer and the checkpoint's generation_config.json, plus --stop."""
  ids = set(args.stop_id or [])
  if args.ignore_eos:
    return sorted(ids)
  if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
    ids.add(int(tokenizer.eos_id))
  ids.update(generation_config_eos(args.checkpoint))
  return sorted(ids)


def cmd_generate(args) -> int:
  if (args.prompt is None) == (args.prompt_ids is None):
    raise ZooError("generate: give exactly one of --prompt TEXT and --prompt-ids 1,2,3")
  sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  model, tokenizer = _load_for_inference(args)
  if args.prompt_ids is not None:
    try:
      ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
      raise ZooError(f"generate: --prompt-ids must be comma-separated integers, got "
                     f"{args.prompt_ids!r}") from None
    if args.chat:
      raise ZooError("generate: --chat needs a text --prompt")
  else:
    if tokenizer is None:
      raise ZooError(f"generate: {args.checkpoint} has no tokenizer (tokenizer.json or "
                     "tokenizer.model): give --tokenizer FILE or --prompt-ids")
    if args.chat:
      template_dir = args.tokenizer if args.tokenizer and os.path.isdir(args.tokenizer) \
        else args.checkpoint
      # The template writes the BOS token itself, as text.
      ids = tokenizer.encode(render_chat(template_dir, [{"role": "user", "content": args.prompt}]))
    else:
      ids = tokenizer.encode(args.prompt)
      if not args.no_bos and getattr(tokenizer, "bos_id", None) is not None:
        ids = [int(tokenizer.bos_id)] + ids
  stop = _stop_ids(args, model, tokenizer)
  generator = Generator(model)
  stream = tokenizer is not None and not args.json
  shown = {"ids": [], "text": ""}

  def on_tokens(tokens, active):
    if not stream or not active[0]:
      return
    token = int(tokens[0])
    if token in stop:
      return
    shown["ids"].append(token)
    text = tokenizer.decode(shown["ids"])
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      sys.stdout.write(text[len(shown["text"]):])
      sys.stdout.flush()
      shown["text"] = text

  out = generator.generate([ids], max_new_tokens=args.max_new_tokens, sampling=sampling,
                           seed=args.seed, stop_ids=stop, on_tokens=on_tokens)[0]
  body = [t for t in out if t not in stop]
  text = tokenizer.decode(body) if tokenizer is not None else None
  if args.json:
    print(json.dumps({"ids": out, "text": text}))
  elif stream:
    sys.stdout.write(text[len(shown["text"]):] + "\n")
  else:
    print(",".join(str(t) for t in out))
  return 0


def cmd_export(args) -> int:
  if os.path.exists(args.out) and not args.force:
    raise ZooError(f"{args.out} exists; pass --force to replace it")
  out = export_checkpoint(args.workdir, args.out, args.step)
  for key, path in out.items():
    print(f"{key:13s}{path}")
  return 0


# `zoo eval` flags of one mode only: (flag, attribute, its default).
_PERPLEXITY_FLAGS = (("--seq-len", "seq_len", None), ("--split", "split", "validation"),
                     ("--data-dir", "data_dir", None), ("--text-key", "text_key", "text"),
                     ("--no-bos", "no_bos", False))
_TASK_FLAGS = (("--num-fewshot", "num_fewshot", None), ("--limit", "limit", None),
               ("--include-path", "include_path", None), ("--output", "output", None),
               ("--apply-chat-template", "apply_chat_template", False),
               ("--bootstrap-iters", "bootstrap_iters", 100000),
               ("--max-gen-toks", "max_gen_toks", 256), ("--mesh", "mesh", None),
               ("--seed", "seed", 0))


def cmd_eval(args) -> int:
  if (args.data is None) == (args.tasks is None):
    raise ZooError("eval: give exactly one of --data FILES (perplexity) and --tasks NAMES "
                   "(lm-evaluation-harness tasks)")
  mode, other = (_TASK_FLAGS, _PERPLEXITY_FLAGS) if args.tasks else (_PERPLEXITY_FLAGS,
                                                                     _TASK_FLAGS)
  for flag, attr, default in other:
    if getattr(args, attr) != default:
      raise ZooError(f"eval: {flag} applies to --{'data' if args.tasks else 'tasks'}, not "
                     f"--{'tasks' if args.tasks else 'data'}")
  if args.tasks:
    return _eval_tasks(args)
  model, tokenizer = _load_for_inference(args)
  if tokenizer is None:
    raise ZooError(f"eval: {args.checkpoint} has no tokenizer (tokenizer.json or "
                   "tokenizer.model): give --tokenizer FILE")
  source = documents(args.data, split=args.split, data_dir=args.data_dir,
                     text_key=args.text_key)
  seq_len = args.seq_len or min(model.config.max_position_embeddings, 2048)
  if seq_len > model.config.max_position_embeddings:
    raise ZooError(f"eval: --seq-len {seq_len} exceeds the model's maximum length "
                   f"{model.config.max_position_embeddings}")
  result = perplexity(model, tokenizer, source, seq_len=seq_len, batch_size=args.batch_size,
                      add_bos=not args.no_bos, progress=not args.json)
  result["compressed_bits_per_byte"] = compressed_bits_per_byte(source)
  if args.json:
    print(json.dumps(result))
  else:
    baseline = result["compressed_bits_per_byte"]
    print(f"perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.6f} nats over "
          f"{result['tokens']} tokens, {result['documents']} documents)")
    print(f"bits per byte {result['bits_per_byte']:.4f} over {result['bytes']} bytes (the "
          f"same documents: gzip -9 {baseline['gzip']:.4f}, xz -9e {baseline['xz']:.4f})")
  return 0


def _eval_tasks(args) -> int:
  """`zoo eval --tasks`: lm-evaluation-harness's tasks on the checkpoint (zoo.harness)."""
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if args.num_fewshot is not None and args.num_fewshot < 0:
    raise ZooError(f"eval: --num-fewshot must be >= 0, got {args.num_fewshot}")
  limit = args.limit
  if limit is not None:
    try:  # the harness's --limit: a count of documents, or a fraction of them below 1
      limit = float(limit) if "." in limit else int(limit)
    except ValueError:
      raise ZooError(f"eval: --limit must be a number, got {limit!r}") from None
  include_path = paths.localize(args.include_path) if args.include_path else None
  harness.check_tasks(tasks, include_path)  # before the model loads
  lm = harness.ZooLM(args.checkpoint, adapter=args.adapter, tokenizer=args.tokenizer,
                     batch_size=args.batch_size, dtype=args.dtype, mesh=args.mesh,
                     max_gen_toks=args.max_gen_toks, seed=args.seed, progress=not args.json)
  results = harness.run_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=limit,
                              include_path=include_path,
                              apply_chat_template=args.apply_chat_template,
                              bootstrap_iters=args.bootstrap_iters,
                              log_samples=args.output is not None, seed=args.seed)
  written = harness.write_results(results, args.output) if args.output else []
  if args.json:
    print(json.dumps(harness.summary(results)))
  else:
    print(harness.results_table(results))
    for path in written:
      print(f"wrote {path}")
  return 0




def _config_flags(command: str, argv: list[str], define_more) -> flags.FlagValues | None:
  """Parses `zoo COMMAND`'s --config FILE[:ARGS] (default configs/default.py) with locked
  --config.FIELD=VALUE overrides, and the flags `define_more(flag_values)` adds; with --help,
  prints the flags and returns None."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[i] = "--config=" + config_path(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = config_path(argv[i + 1])
  if not any(a == "--config" or a.startswith("--config=") for a in argv):
    argv.insert(0, "--config=" + config_path("configs/default.py"))
  fv = flags.FlagValues()
  # sys_argv: the override flags are discovered from this list, not from the process's argv.
  config_flags.DEFINE_config_file("config", None, "training config file", flag_values=fv,
                                  lock_config=True, sys_argv=[f"zoo {command}", *argv])
  define_more(fv)
  if "--help" in argv or "-h" in argv:
    print(f"usage: zoo {command} [--config configs/NAME.py[:ARGS]] [--config.FIELD=VALUE ...] "
          "[flags]\n")
    print(fv.get_help())
    return None
  try:
    fv([f"zoo {command}", *argv])
  except (flags.Error, ZooError) as e:
    raise ZooError(f"{command}: {str(e).splitlines()[0]}") from None
  except AttributeError as e:  # an override of a field the config does not have
    if not (e.args and isinstance(e.args[0], KeyError)):
      raise ZooError(f"{command}: cannot load the config: {str(e).splitlines()[0]}") from None
    field = str(e.args[0].args[0]).strip("'")
    raise ZooError(f"{command}: the config has no field {field!r} to override (a model field "
                   "that the config leaves to its preset is overridden in a config file)"
                   ) from None
  except Exception as e:  # errors raised inside a config file's get_config
    raise ZooError(f"{command}: cannot load the config: {str(e).splitlines()[0]}") from None
  return fv


def _config_name(fv: flags.FlagValues) -> str:
  return os.path.splitext(os.path.basename(fv["config"].config_filename.split(":")[0]))[0]


def _eval_coverage(summary: dict) -> str:
  """What the last eval scored, for the summary line (zoo.train.loop.evaluate): the whole
  held-out split, or the documents train.eval_batches had room for."""
  if "eval_documents" not in summary:
    return ""
  scored, total = int(summary["eval_documents"]), int(summary["eval_split_documents"])
  what = (f"all {total} held-out documents" if scored == total else
          f"{scored} of the {total} held-out documents (those train.eval_batches has room for)")
  return f", over {what}, {int(summary['eval_bytes'])} bytes"


def train_main(argv: list[str]) -> int:
  """`zoo train`: ml_collections config files with --config.FIELD=VALUE overrides (locked)."""
  def define(fv):
    flags.DEFINE_string("workdir", None, "run directory (default runs/CONFIG_NAME)",
                        flag_values=fv)
    flags.DEFINE_string("coordinator", None, "multi-process: process 0's HOST:PORT",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-process: how many processes",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index",
                         flag_values=fv)
    flags.DEFINE_integer("cpu_devices", None, "JAX devices on a CPU host (default 1)",
                         flag_values=fv)

  fv = _config_flags("train", argv, define)
  if fv is None:
    return 0
  config = fv.config
  workdir = fv.workdir or os.path.join("runs", _config_name(fv))
  distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id, fv.cpu_devices)
  summary = train(config, workdir)
  if "stopped_by" in summary:
    return 0
  print(f"trained {summary['step']} steps in {workdir}")
  if "first_eval_loss" in summary:
    print(f"eval loss: {summary['first_eval_loss']:.3f} (first eval) -> "
          f"{summary['eval_loss']:.3f} (last); bits per byte: {summary['first_eval_bpb']:.4f} "
          f"-> {summary['eval_bpb']:.4f}{_eval_coverage(summary)}")
  if "sample" in summary:
    print("sample:\n    " + summary["sample"].replace("\n", "\n    "))
  for key in ("checkpoints", "model", "adapter", "peft_adapter", "tensorboard", "plot",
              "metrics"):
    if key in summary:
      print(f"{key:13s}{summary[key]}")
  return 0


def plan_main(argv: list[str]) -> int:
  """`zoo plan`: compile the train step for a TPU slice (or this host) and say if it fits."""
  def define(fv):
    flags.DEFINE_string("topology", None, "Cloud TPU slice (v5p-128, v5e-16, v6e-256, v4-32) "
                        "or the compiler's form (v5p:4x4x4); default: this host's devices",
                        flag_values=fv)
    flags.DEFINE_integer("slices", 1, "TPU slices joined over DCN (the data axis spans them)",
                         flag_values=fv)
    flags.DEFINE_bool("json", False, "print one JSON object", flag_values=fv)

  fv = _config_flags("plan", argv, define)
  if fv is None:
    return 0
  result = plan(fv.config, topology=fv.topology, slices=fv.slices,
                config_name=_config_name(fv))
  print(json.dumps(result.to_json()) if fv.json else format_plan(result))
  return 1 if result.fits is False else 0


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="zoo", description="LLaMA-family models in JAX/Flax.")
  p.add_argument("--version", action="version", version=f"zoo {zoo.__version__}")
  sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)
  sub.add_parser("train", help="train or fine-tune (zoo train --help for its flags)")
  sub.add_parser("plan", help="compile the train step for a TPU slice and say whether it fits "
                              "(zoo plan --help for its flags)")

  c = sub.add_parser("convert", help="convert a checkpoint between formats")
  c.add_argument("src", help="source checkpoint directory (format detected)")
  c.add_argument("dst", help="destination (must not exist unless --force)")
  c.add_argument("--to", required=True, choices=["zoo", "hf", "meta", "gguf", "peft"],
                 help="output format (meta: params.json + consolidated.NN.pth; gguf: one file "
                      "for llama.cpp; peft: a zoo LoRA adapter directory to HF peft's files)")
  c.add_argument("--shards", type=int, help="--to meta: model-parallel shards (default 1)")
  c.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "f32", "f16", "bf16",
                                      "q8_0"],
                 help="cast the weights (default: keep); --to gguf takes f32, f16, bf16, q8_0")
  c.add_argument("--force", action="store_true", help="replace an existing destination")
  c.add_argument("--max-shard-size", type=_size, default=5 * 2**30, help="default 5GB")
  c.add_argument("--verify", action="store_true",
                 help="compare logits with transformers (needs torch and transformers)")
  c.add_argument("--tolerance", type=float,
                 help="--verify fails above this times the logits' scale (default 1e-4; GGUF "
                      "against llama.cpp: 1e-3 f32, 1e-2 f16, 5e-2 bf16, 0.1 q8_0)")
  c.set_defaults(func=cmd_convert)

  i = sub.add_parser("init", help="write a randomly initialised model of a preset")
  i.add_argument("preset")
  i.add_argument("dst")
  i.add_argument("--to", choices=["zoo", "hf", "meta"], default="zoo")
  i.add_argument("--seed", type=int, default=0)
  i.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
  i.add_argument("--std", type=float, help="init std for all weights, norms included")
  i.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field of the preset")
  i.add_argument("--force", action="store_true")
  i.set_defaults(func=cmd_init)

  g = sub.add_parser("generate", help="generate text from a checkpoint")
  g.add_argument("--checkpoint", required=True, help="a zoo or HF checkpoint directory")
  g.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer)")
  g.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
  g.add_argument("--chat", action="store_true",
                 help="wrap the prompt in the tokenizer's chat template (as the user's turn)")
  g.add_argument("--json", action="store_true", help='print {"ids": [...], "text": ...}')
  g.add_argument("--max-new-tokens", type=int, default=128)
  g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
  g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: all)")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: all)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--stop-id", type=int, action="append", help="also stop at this token id")
  g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
  g.add_argument("--no-bos", action="store_true", help="do not start a text prompt with BOS")
  g.add_argument("--tokenizer", help="tokenizer file or directory (default: the checkpoint's)")
  g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  g.add_argument("--adapter", help="a LoRA adapter directory (zoo's or HF peft's) to apply")
  g.set_defaults(func=cmd_generate)

  e = sub.add_parser("eval", help="perplexity of a checkpoint on text (--data), or "
                     "lm-evaluation-harness tasks (--tasks)")
  e.add_argument("--checkpoint", required=True, help="a zoo or HF checkpoint directory")
  e.add_argument("--data",
                 help="text files (comma-separated globs; .jsonl: one document per line) or "
                      "a prepared TFDS dataset name")
  e.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (hellaswag,"
                 "arc_easy,...; needs zoo[eval])")
  e.add_argument("--num-fewshot", type=int, help="--tasks: few-shot examples per prompt "
                 "(default: each task's own)")
  e.add_argument("--limit", help="--tasks: at most this many documents per task (below 1: "
                 "that fraction of them)")
  e.add_argument("--include-path", help="--tasks: a directory of task YAML files of your own")
  e.add_argument("--output", help="--tasks: write results.json and each task's logged "
                 "requests (samples_TASK.jsonl) in this directory")
  e.add_argument("--apply-chat-template", action="store_true",
                 help="--tasks: wrap prompts in the tokenizer's chat template")
  e.add_argument("--bootstrap-iters", type=int, default=100000,
                 help="--tasks: bootstrap resamples for the standard errors (0: none)")
  e.add_argument("--max-gen-toks", type=int, default=256,
                 help="--tasks: generation budget of tasks that set none (default 256)")
  e.add_argument("--mesh", help="--tasks: shard the model over the devices, e.g. fsdp=-1 or "
                 "fsdp=4,tensor=2 (default: one device)")
  e.add_argument("--seed", type=int, default=0, help="--tasks: seed of few-shot sampling and "
                 "of sampled generation")
  e.add_argument("--split", default="validation", help="TFDS split (default validation)")
  e.add_argument("--data-dir", help="TFDS data directory (default ~/tensorflow_datasets)")
  e.add_argument("--text-key", default="text", help="JSONL/TFDS text field (default text)")
  e.add_argument("--seq-len", type=int, help="predictions per row (default: model max, <= 2048)")
  e.add_argument("--batch-size", type=int, default=8)
  e.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
  e.add_argument("--tokenizer", help="tokenizer file or directory (default: the checkpoint's)")
  e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  e.add_argument("--json", action="store_true", help="print the result as JSON")
  e.add_argument("--adapter", help="a LoRA adapter directory (zoo's or HF peft's) to apply")
  e.set_defaults(func=cmd_eval)

  x = sub.add_parser("export", help="a training checkpoint's model (or adapters) as a zoo "
                     "checkpoint, layer by layer")
  x.add_argument("--workdir", required=True, help="the run's directory (zoo train --workdir)")
  x.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
  x.add_argument("out", help="the output directory (a LoRA run's: adapter/ and adapter_peft/ "
                 "in it)")
  x.add_argument("--force", action="store_true", help="replace an existing output")
  x.set_defaults(func=cmd_export)

  launch.add_parser(sub)

  sub.add_parser("presets", help="list the model presets").set_defaults(func=cmd_presets)

  d = sub.add_parser("demo", help="random model -> HF -> zoo -> forward pass, checked")
  d.add_argument("--workdir")
  d.add_argument("--preset", default="tiny_llama3")
  d.set_defaults(func=cmd_demo)
  return p


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    if argv[:1] == ["train"]:
      return train_main(argv[1:])
    if argv[:1] == ["plan"]:
      return plan_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)
  except ZooError as e:
    message = str(e)
    print(message if message.startswith("zoo") else f"zoo: error: {message}", file=sys.stderr)
    if isinstance(e, StorageError):
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(2)  # not joining the background writes still waiting on the storage
    return 2
  except KeyboardInterrupt:
    print("zoo: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
