"""`decode`: greedy decoding tokens/s of zoo's Generator, transformers' generate and (at batch 1)
llama.cpp on the same 58M-parameter LLaMA, and the bound set by the bytes a step reads over the
machine's read bandwidth."""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import models
from bench.harness import QUIET, Worker, call, cpu_model, interleave_and_close, median, probe

# Per batch size: (what, the least ratio, the key of the ratio in that batch's results). Batch 1
# must reach llama.cpp's rate; 1.7x transformers is that rate expressed against transformers,
# the check that remains where llama.cpp is not installed.
TARGETS = {"1": [("zoo/llama.cpp", 1.0, "ratio_vs_llamacpp"),
                 ("zoo/transformers", 1.7, "ratio")],
           "8": [("zoo/transformers", 2.0, "ratio")]}

HELP = "greedy generation tokens/s vs transformers generate and the bandwidth bound"

# The model: a small LLaMA of 58M parameters, float32.
DECODE_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8,
                    num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=2048)


def decode_config():
  return models.tiny_llama(**DECODE_MODEL)


def decode_prompts(batch: int, length: int) -> list[list[int]]:
  import numpy as np
  rng = np.random.default_rng(0)
  return rng.integers(3, DECODE_MODEL["vocab_size"], (batch, length)).tolist()


def write_model(spec: dict) -> dict:
  """Worker: the decode model as a random HF checkpoint in `dst`; its parameter count and the
  bytes of the weights a decode step reads (all but the input embedding table)."""
  models.write_checkpoint(spec["dst"], DECODE_MODEL, to="hf")
  c = decode_config()
  read = c.num_params() - c.vocab_size * c.hidden_size * (not c.tie_word_embeddings)
  return {"params": c.num_params(), "step_bytes": 4 * read}


def read_bandwidth(spec: dict) -> dict:
  """Worker: bytes/s of numpy's and torch's sum over 1 GiB, the best of `repeats`."""
  import numpy as np
  import torch
  a = np.ones(2**28, np.float32)
  t = torch.from_numpy(a)
  best = {}
  for name, fn in (("numpy", a.sum), ("torch", t.sum)):
    fn()
    times = []
    for _ in range(spec["repeats"]):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    best[name] = a.nbytes / min(times)
  return best


def llamacpp_version(spec: dict) -> str:
  """Worker: llama-cpp-python's version; fails where it is not installed."""
  import llama_cpp
  return llama_cpp.__version__


def export_gguf(spec: dict):
  """Worker: zoo's float32 GGUF export of the HF checkpoint `checkpoint` to `dst`, with a
  SentencePiece tokenizer (GGUF files carry one; padded with unused ids to the model's 32000)."""
  import glob
  import json

  from zoo.convert import convert
  from zoo.data.tokenizers import train_sentencepiece
  texts = [open(p).read() for p in sorted(glob.glob(os.path.dirname(json.__file__) + "/*.py"))]
  train_sentencepiece(texts, 1000, os.path.join(spec["checkpoint"], "tokenizer.model"))
  convert(spec["checkpoint"], spec["dst"], "gguf", dtype="f32")


def zoo_decoder(spec: dict):
  """Worker: zoo's Generator, greedy, on the checkpoint: (run(n) -> last token, info)."""
  import jax

  import zoo
  from zoo.infer.generate import Generator
  from zoo.kernels import gemv
  start = time.perf_counter()
  generator = Generator(zoo.load(spec["checkpoint"]))
  prompts = decode_prompts(spec["batch"], spec["prompt_len"])
  generator.generate(prompts, max_new_tokens=spec["new_tokens"])  # compiles the bucket
  info = {"compile_s": time.perf_counter() - start, "jax": jax.__version__,
          "cpu_kernel": gemv.available()}

  def run(n: int) -> float:
    for _ in range(n):
      out = generator.generate(prompts, max_new_tokens=spec["new_tokens"])
    assert all(len(o) == spec["new_tokens"] for o in out)
    return float(out[0][-1])

  return run, info


def torch_decoder(spec: dict):
  """Worker: transformers' generate (greedy, its default dynamic KV cache) on the same
  checkpoint."""
  import torch
  import transformers
  torch.set_num_threads(spec["threads"])
  model = transformers.LlamaForCausalLM.from_pretrained(spec["checkpoint"],
                                                        dtype=torch.float32).eval()
  ids = torch.tensor(decode_prompts(spec["batch"], spec["prompt_len"]))
  mask = torch.ones_like(ids)

  def run(n: int) -> float:
    with torch.no_grad():
      for _ in range(n):
        out = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None,
                             pad_token_id=0, max_new_tokens=spec["new_tokens"],
                             min_new_tokens=spec["new_tokens"])
    assert out.shape[1] == spec["prompt_len"] + spec["new_tokens"]
    return float(out[0, -1])

  info = {"threads": torch.get_num_threads(), "torch": torch.__version__,
          "transformers": transformers.__version__}
  return run, info


def llamacpp_decoder(spec: dict):
  """Worker: llama.cpp (llama-cpp-python) on zoo's float32 GGUF export, greedy, one sequence:
  the prompt evaluated in one batch, then one token at a time, as zoo's Generator does."""
  import llama_cpp
  n_ctx = spec["prompt_len"] + spec["new_tokens"] + 8
  llm = llama_cpp.Llama(spec["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=spec["threads"],
                        type_k=0, type_v=0, verbose=False)
  prompt = decode_prompts(1, spec["prompt_len"])[0]

  def run(n: int) -> float:
    for _ in range(n):
      out = []
      for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == spec["new_tokens"]:
          break
    return float(out[-1])

  return run, {"threads": spec["threads"], "llama_cpp_python": llama_cpp.__version__}


def add_args(p: argparse.ArgumentParser):
  p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
  p.add_argument("--new-tokens", type=int, default=64, help="tokens per generate (default 64)")
  p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
  p.add_argument("--rounds", type=int, default=5,
                 help="interleaved timings of each side, medians reported (default 5)")
  p.add_argument("--no-peer", action="store_true", help="time zoo alone")
  p.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")


def run(args, workdir: str) -> dict:
  """Greedy decoding tokens/s of zoo's Generator and of transformers' generate on the same
  58M-parameter LLaMA, and the bound set by the bytes a step reads over the read bandwidth."""
  try:
    batches = [int(b) for b in args.batches.split(",")]
  except ValueError:
    sys.exit(f"bench: --batches takes comma-separated integers, got {args.batches!r}")
  if min(batches + [args.new_tokens, args.prompt_len, args.rounds]) < 1:
    sys.exit("bench: --batches, --new-tokens, --prompt-len and --rounds must be positive")
  checkpoint = os.path.join(workdir, "hf")
  model, _ = call(write_model, {"dst": checkpoint}, "writing the model")
  bw, _ = call(read_bandwidth, {"repeats": 5}, "measuring read bandwidth")
  bandwidth = max(bw.values())
  print(f"model: {model['params'] / 1e6:.1f}M parameters, float32; a decode step reads "
        f"{model['step_bytes'] / 1e6:.0f} MB of weights; read bandwidth "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  gguf_path = None
  if not args.no_llamacpp:
    if probe(llamacpp_version, {}) is not None:
      gguf_path = os.path.join(workdir, "model-f32.gguf")
      call(export_gguf, {"checkpoint": checkpoint, "dst": gguf_path},
           "exporting GGUF for llama.cpp")
    else:
      print("llama.cpp: llama-cpp-python is not installed; timing without it")
  per_batch = {}
  for batch in batches:
    spec = {"checkpoint": checkpoint, "batch": batch, "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len, "warmup": 1, "threads": os.cpu_count() or 1,
            "gguf": gguf_path}
    log = os.path.join(workdir, f"{{}}-{batch}.log")
    workers = {"zoo": Worker(zoo_decoder, spec, env, log.format("zoo"))}
    if not args.no_peer:
      workers["transformers"] = Worker(torch_decoder, spec, env, log.format("transformers"))
    if gguf_path and batch == 1:  # llama-cpp-python's API generates one sequence at a time
      workers["llama.cpp"] = Worker(llamacpp_decoder, spec, env, log.format("llamacpp"))
    rates, shares, dropped = interleave_and_close(workers, 1, args.rounds, batch * args.new_tokens)
    bound = bandwidth / model["step_bytes"] * batch
    row = {"zoo_tokens_per_sec": round(median(rates["zoo"]), 1),
           "zoo_cpu_kernel": workers["zoo"].info.get("cpu_kernel"),
           "zoo_rounds": [round(r, 1) for r in rates["zoo"]],
           "bound_tokens_per_sec": round(bound, 1),
           "zoo_fraction_of_bound": round(median(rates["zoo"]) / bound, 3),
           "background_cpu": round(median(shares), 3), "rounds_dropped": dropped}
    line = (f"batch {batch}: zoo {row['zoo_tokens_per_sec']:6.1f} tokens/s "
            f"({row['zoo_fraction_of_bound']:.0%} of the bound {bound:.0f})")
    # (worker, JSON key prefix, ratio key, label)
    for name, key, ratio_key, label in (
        ("transformers", "peer", "ratio", "transformers generate"),
        ("llama.cpp", "llamacpp", "ratio_vs_llamacpp", "llama.cpp on zoo's f32 GGUF")):
      if name in rates:
        ratios = [z / p for z, p in zip(rates["zoo"], rates[name])]
        row.update({f"{key}_tokens_per_sec": round(median(rates[name]), 1),
                    f"{key}_rounds": [round(r, 1) for r in rates[name]],
                    ratio_key: round(median(ratios), 3)})
        line += (f", {label} {row[key + '_tokens_per_sec']:6.1f} tokens/s: "
                 f"zoo/{name} {row[ratio_key]:.2f}x")
    print(line)
    if batch == 1 and not row["zoo_cpu_kernel"]:
      print("  note: zoo's one-row CPU kernel (zoo.kernels.gemv) was not built (no C++ compiler, "
            "or ZOO_CPU_GEMV=0): batch 1 ran XLA's single-core products")
    if row["background_cpu"] > QUIET:
      print(f"  WARNING: other processes used {row['background_cpu']:.0%} of the CPUs")
    per_batch[str(batch)] = row
  # Both fractions of the bound are printed, since llama.cpp's own fraction moves with the
  # machine.
  if "1" in per_batch and per_batch["1"].get("llamacpp_tokens_per_sec"):
    row = per_batch["1"]
    row["llamacpp_fraction_of_bound"] = round(
      row["llamacpp_tokens_per_sec"] / row["bound_tokens_per_sec"], 3)
    print(f"batch 1 fraction of the bound: zoo {row['zoo_fraction_of_bound']:.2f}, "
          f"llama.cpp {row['llamacpp_fraction_of_bound']:.2f}")
  verdicts = []
  for b, goals in TARGETS.items():
    for what, goal, key in goals:
      if b in per_batch and per_batch[b].get(key) is not None:
        ok = per_batch[b][key] >= goal
        per_batch[b]["within_target"] = per_batch[b].get("within_target", True) and ok
        verdicts.append(f"batch {b} {what} {per_batch[b][key]:.2f} (target >= {goal}): "
                        f"{'PASS' if ok else 'FAIL'}")
  for v in verdicts:
    print(v)
  first = per_batch[str(batches[0])]
  return {"mode": "decode", "batch": batches[0],
          "zoo_tokens_per_sec": first["zoo_tokens_per_sec"],
          "peer_tokens_per_sec": first.get("peer_tokens_per_sec"), "ratio": first.get("ratio"),
          "llamacpp_tokens_per_sec": first.get("llamacpp_tokens_per_sec"),
          "bound_tokens_per_sec": first["bound_tokens_per_sec"], "per_batch": per_batch,
          "read_bandwidth": bandwidth, "bandwidth_detail": bw, "step_bytes": model["step_bytes"],
          "params": model["params"], "cpu": cpu_model(), "new_tokens": args.new_tokens,
          "prompt_len": args.prompt_len, "rounds": args.rounds,
          "peer": None if args.no_peer else "transformers generate"}
