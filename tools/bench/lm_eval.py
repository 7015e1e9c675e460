"""`harness`: lm-evaluation-harness requests per second of zoo's backend (zoo.harness.ZooLM)
against the harness's own `hf` backend, on the decode benchmark's 58M-parameter LLaMA, over
three local tasks: multiple choice, rolling log-likelihood (perplexity) and generation until a
stop string."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import textwrap

from bench import decode
from bench.harness import QUIET, Worker, call, interleave, median

# (what, the least ratio, the key of the ratio in the results)
TARGETS = [("zoo/hf requests per second, all three tasks", 2.0, "ratio")]

HELP = "lm-evaluation-harness requests/s: zoo's backend vs the harness's hf backend"

TASKS = ["bench_mc", "bench_ppl", "bench_gen"]
TOKENIZER_VOCAB = 4000  # a byte-level BPE trained on the standard library's source


def _corpus() -> list[str]:
  """Text to draw the tasks from: the standard library's json and email packages' sources."""
  import email
  out = []
  for package in (json, email):
    root = os.path.dirname(package.__file__)
    for name in sorted(os.listdir(root)):
      if name.endswith(".py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
          out.append(f.read())
  return out


def prepare(spec: dict) -> dict:
  """Worker: the 58M model as an HF checkpoint with a trained BPE tokenizer (`hf`), zoo's
  conversion of it (`zoo`)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  from zoo.convert.checkpoint import convert
  decode.write_model({"dst": spec["hf"]})
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
    vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 1)])
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    pad_token="<pad>").save_pretrained(spec["hf"])
  convert(spec["hf"], spec["zoo"], "zoo")
  return {"tokenizer_vocab": tok.get_vocab_size()}


def write_tasks(directory: str, docs: dict) -> str:
  """The three tasks' YAML files and JSON-lines data in `directory`; its tasks/ folder."""
  rng = random.Random(0)
  lines = [line.strip() for text in _corpus() for line in text.splitlines()
           if 20 <= len(line.strip()) <= 80]
  texts = _corpus()
  data = os.path.join(directory, "data")
  tasks = os.path.join(directory, "tasks")
  os.makedirs(data)
  os.makedirs(tasks)

  def write(name, rows):
    path = os.path.join(data, name)
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    return path

  mc = write("mc.jsonl", [{"question": rng.choice(lines),
                           "choices": [rng.choice(lines) for _ in range(4)],
                           "answer": rng.randrange(4)} for _ in range(docs["mc"])])
  # documents of 500 to 6000 characters (about 150 to 1800 tokens)
  ppl = []
  for _ in range(docs["ppl"]):
    text = rng.choice(texts)
    n = rng.randrange(500, 6000)
    start = rng.randrange(max(1, len(text) - n))
    ppl.append({"text": text[start:start + n]})
  ppl = write("ppl.jsonl", ppl)
  gen = write("gen.jsonl", [{"prompt": "\n".join(rng.choice(lines)
                                                 for _ in range(rng.randrange(1, 12))),
                             "answer": rng.choice(lines)} for _ in range(docs["gen"])])
  common = "dataset_path: json\ntest_split: test\n"
  specs = {
    "bench_mc": (mc, """\
      output_type: multiple_choice
      doc_to_text: "Question: {{question}}\\nAnswer:"
      doc_to_choice: "{{choices}}"
      doc_to_target: "{{answer}}"
      metric_list:
        - metric: acc
      """),
    "bench_ppl": (ppl, """\
      output_type: loglikelihood_rolling
      doc_to_text: ""
      doc_to_target: "{{text}}"
      metric_list:
        - metric: word_perplexity
      """),
    "bench_gen": (gen, """\
      output_type: generate_until
      doc_to_text: "{{prompt}}"
      doc_to_target: "{{answer}}"
      generation_kwargs:
        until: ["\\n\\n"]
        max_gen_toks: 32
        do_sample: false
      metric_list:
        - metric: exact_match
      """),
  }
  for name, (path, body) in specs.items():
    with open(os.path.join(tasks, f"{name}.yaml"), "w", encoding="utf-8") as f:
      f.write(f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {path}\n"
              + textwrap.dedent(body))
  return tasks


def evaluator(spec: dict):
  """Worker (serve): one backend on the three tasks; run(n) evaluates them n times and appends
  one JSON line per time to spec["log"]: per task the requests, the seconds spent inside the
  model's calls and in the whole simple_evaluate, and (the first time) the answers."""
  import time

  import lm_eval
  from lm_eval.tasks import TaskManager
  if spec["backend"] == "zoo":
    import jax

    from zoo.harness import ZooLM
    lm = ZooLM(spec["zoo"], batch_size=spec["batch"], progress=False)
    info = {"jax": jax.__version__}
  else:
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    torch.set_num_threads(spec["threads"])
    lm = HFLM(pretrained=spec["hf"], device="cpu", batch_size=spec["batch"],
              dtype="float32")
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}
  info["lm_eval"] = lm_eval.__version__
  inside = {"seconds": 0.0}
  for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
    method = getattr(lm, name)

    def timed(requests, *args, _method=method, **kwargs):
      start = time.perf_counter()
      try:
        return _method(requests, *args, disable_tqdm=True, **kwargs)
      finally:
        inside["seconds"] += time.perf_counter() - start

    setattr(lm, name, timed)
  manager = TaskManager(include_path=spec["tasks"])
  first = [True]

  def run(n: int) -> float:
    total = 0
    for _ in range(n):
      per_task = {}
      for task in TASKS:
        inside["seconds"] = 0.0
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                          bootstrap_iters=0, log_samples=True,
                                          verbosity="ERROR")
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        per_task[task] = {"requests": sum(len(s["resps"]) for s in samples),
                          "model_s": inside["seconds"], "wall_s": time.perf_counter() - start}
        if first[0]:
          per_task[task]["answers"] = [s["resps"] for s in samples]
        total += per_task[task]["requests"]
      first[0] = False
      with open(spec["log"], "a", encoding="utf-8") as f:
        f.write(json.dumps(per_task) + "\n")
    return float(total)

  return run, info


def add_args(p: argparse.ArgumentParser):
  p.add_argument("--batch-size", type=int, default=8, help="both backends' (default 8)")
  p.add_argument("--docs", default="40,8,16",
                 help="documents of the multiple-choice, perplexity and generation tasks "
                      "(default 40,8,16)")
  p.add_argument("--rounds", type=int, default=3,
                 help="interleaved timed runs of the three tasks on each backend, medians "
                      "reported (default 3), after one untimed warm-up run")


def _rate(per_task: dict, tasks=TASKS, key="model_s") -> float:
  return sum(per_task[t]["requests"] for t in tasks) / sum(per_task[t][key] for t in tasks)


def _agreement(a: dict, b: dict) -> dict:
  """How far zoo's answers are from hf's: the largest log-likelihood difference and the
  generations that differ."""
  worst, differ = 0.0, 0
  for task in TASKS:
    for x, y in zip(a[task]["answers"], b[task]["answers"]):
      for u, v in zip(x, y):
        u, v = u[0], v[0]
        if isinstance(v, str):
          differ += u != v
        else:
          u, v = (u[0], v[0]) if isinstance(v, list) else (u, v)
          worst = max(worst, abs(u - v))
  return {"max_loglikelihood_diff": worst, "generations_differing": differ}


def run(args, workdir: str) -> dict:
  try:
    docs = dict(zip(("mc", "ppl", "gen"), (int(d) for d in args.docs.split(","))))
  except ValueError:
    sys.exit(f"bench: --docs takes three comma-separated integers, got {args.docs!r}")
  if len(docs) != 3 or min([*docs.values(), args.batch_size, args.rounds]) < 1:
    sys.exit("bench: --docs (three counts), --batch-size and --rounds must be positive")
  spec = {"hf": os.path.join(workdir, "hf"), "zoo": os.path.join(workdir, "zoo")}
  info, _ = call(prepare, spec, "writing the model")
  spec.update(tasks=write_tasks(workdir, docs), batch=args.batch_size, warmup=0,
              threads=os.cpu_count() or 1)
  print(f"model: the decode benchmark's 58M-parameter LLaMA (float32), a byte-level BPE of "
        f"{info['tokenizer_vocab']} tokens; tasks: {docs['mc']} multiple-choice documents "
        f"(4 choices), {docs['ppl']} perplexity documents, {docs['gen']} generations (32 "
        f"tokens at most); batch size {args.batch_size}")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
  logs = {b: os.path.join(workdir, f"{b}.jsonl") for b in ("zoo", "hf")}
  workers = {}
  try:
    # each worker's first run (zoo compiling its programs) is untimed
    for backend in ("zoo", "hf"):
      workers[backend] = Worker(evaluator, {**spec, "backend": backend, "log": logs[backend]},
                                env, os.path.join(workdir, f"{backend}.log"))
    requests = int(workers["zoo"].info["first_loss"])
    rates, shares, dropped = interleave(workers, 1, args.rounds, requests,
                                        max_rounds=2 * args.rounds)
  finally:
    for w in workers.values():
      w.close()
  runs = {}
  for backend, path in logs.items():
    with open(path, encoding="utf-8") as f:
      runs[backend] = [json.loads(line) for line in f]
  result = {"mode": "harness", "batch_size": args.batch_size, "docs": docs,
            "rounds": args.rounds, "rounds_dropped": dropped,
            "background_cpu": round(median(shares), 3)}
  for backend, lines in runs.items():
    timed = lines[1:]
    result[backend] = {
      "requests_per_sec": round(median([_rate(t) for t in timed]), 2),
      "cold_requests_per_sec": round(_rate(lines[0]), 2),
      "wall_requests_per_sec": round(median(rates[backend]), 2),
      "per_task_requests_per_sec": {t: round(median([_rate(x, [t]) for x in timed]), 2)
                                    for t in TASKS},
      "requests": {t: lines[0][t]["requests"] for t in TASKS},
      "versions": workers[backend].info}
  z, h = result["zoo"], result["hf"]
  result["ratio"] = round(z["requests_per_sec"] / h["requests_per_sec"], 3)
  result["cold_ratio"] = round(z["cold_requests_per_sec"] / h["cold_requests_per_sec"], 3)
  result["per_task_ratio"] = {t: round(z["per_task_requests_per_sec"][t]
                                       / h["per_task_requests_per_sec"][t], 3) for t in TASKS}
  result["agreement"] = _agreement(runs["zoo"][0], runs["hf"][0])
  for t in TASKS:
    print(f"{t:10s} {z['requests'][t]:4d} requests: zoo {z['per_task_requests_per_sec'][t]:8.2f}"
          f"/s, hf {h['per_task_requests_per_sec'][t]:8.2f}/s: {result['per_task_ratio'][t]:.2f}x")
  print(f"all tasks: zoo {z['requests_per_sec']:.2f} requests/s, hf "
        f"{h['requests_per_sec']:.2f}: {result['ratio']:.2f}x (first run, zoo compiling: "
        f"{result['cold_ratio']:.2f}x; whole simple_evaluate: zoo "
        f"{z['wall_requests_per_sec']:.2f}/s, hf {h['wall_requests_per_sec']:.2f}/s)")
  if result["background_cpu"] > QUIET:
    print(f"  WARNING: other processes used {result['background_cpu']:.0%} of the CPUs")
  a = result["agreement"]
  print(f"agreement: largest log-likelihood difference {a['max_loglikelihood_diff']:.2e}, "
        f"{a['generations_differing']} generations differ")
  for what, goal, key in TARGETS:
    ok = result[key] >= goal
    result["within_target"] = ok
    print(f"{what} {result[key]:.2f} (target >= {goal}): {'PASS' if ok else 'FAIL'}")
  return result
