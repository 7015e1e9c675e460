"""zoo.harness.ZooLM and `zoo eval --tasks` against lm-evaluation-harness's own `hf` backend.

Offline: the tasks are YAML files over JSON-lines data written here, read through the
harness's --include-path. The model is a tiny random transformers LLaMA with a byte-level BPE
tokenizer trained here; the hf backend runs it as it is, ZooLM runs zoo's conversion of it,
and every request's answer is compared.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.references import HF_CLASSES, randomize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
peft = pytest.importorskip("peft")

from lm_eval.models.huggingface import HFLM  # noqa: E402

from zoo.convert.checkpoint import convert  # noqa: E402
from zoo.errors import ZooError  # noqa: E402
from zoo.harness import ZooLM, run_tasks  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = ("the a cat dog sat on mat red blue green big small ran jumped over under house tree "
         "bird fish and or but not is was").split()
MAX_LENGTH = 64  # the model's context: few-shot prompts and long documents overflow it
TASKS = ["zoo_mc", "zoo_ll", "zoo_ppl", "zoo_gen", "zoo_gen_sampled"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def sentence(rng, n: int) -> str:
  return " ".join(rng.choice(WORDS, n)).capitalize() + "."


def write_tokenizer(directory: str):
  """A byte-level BPE (320 ids: <unk> <s> </s> <pad>, the bytes, merges) whose template adds
  BOS, as LLaMA's does; saved by transformers, read by zoo."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  rng = np.random.default_rng(1)
  texts = [" ".join(sentence(rng, int(rng.integers(3, 9))) for _ in range(5)) + "\n"
           for _ in range(200)]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
    vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>",
                                              pad_token="<pad>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(directory)
  return fast


def greedy_targets(model, fast, rng, n: int) -> list[dict]:
  """{"context", "target"} pairs half of whose targets are the model's greedy continuation
  (1-3 tokens that re-encode as themselves after the context), half random words."""
  out = []
  while len(out) < n:
    context = sentence(rng, int(rng.integers(3, 10)))
    ids = fast(context)["input_ids"]
    if len(out) % 2:
      out.append({"context": context, "target": " " + str(rng.choice(WORDS))})
      continue
    with torch.no_grad():
      new = model.generate(torch.tensor([ids]), max_new_tokens=int(rng.integers(1, 4)),
                           do_sample=False, pad_token_id=3)[0, len(ids):].tolist()
    target = fast.decode(new)
    if fast(context + target)["input_ids"] == ids + new and not target.startswith(" "):
      out.append({"context": context, "target": target})
  return out


def write_tasks(directory, model, fast):
  """Five tasks: multiple choice (acc, acc_norm; two few-shot examples by default), plain
  log-likelihood (whose targets are half the model's greedy continuations), rolling
  log-likelihood (perplexities), greedy generation cut at stop strings, and sampled generation
  with top_k=1 (which is greedy whatever the seed), each over its own JSON-lines data."""
  rng = np.random.default_rng(2)
  data = directory / "data"
  data.mkdir(parents=True)

  def write(name, rows):
    (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(data / name)

  def mc_row():
    choices = [" ".join(rng.choice(WORDS, int(rng.integers(1, 4)))) for _ in range(4)]
    return {"question": sentence(rng, int(rng.integers(4, 12))), "choices": choices,
            "answer": int(rng.integers(0, 4))}

  mc_train = write("mc_train.jsonl", [mc_row() for _ in range(4)])
  mc_test = write("mc_test.jsonl", [mc_row() for _ in range(10)])
  # lengths from a few tokens to several windows of MAX_LENGTH
  ppl = write("ppl.jsonl", [{"text": " ".join(sentence(rng, int(rng.integers(3, 9)))
                                              for _ in range(k))} for k in (1, 3, 8, 20, 2)])
  gen = write("gen.jsonl", [{"prompt": sentence(rng, int(rng.integers(2, 30))),
                             "answer": str(rng.choice(WORDS))} for _ in range(9)])
  ll = write("ll.jsonl", greedy_targets(model, fast, rng, 8))
  tasks = directory / "tasks"
  tasks.mkdir()
  (tasks / "zoo_ll.yaml").write_text(textwrap.dedent(f"""\
    task: zoo_ll
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {ll}
    output_type: loglikelihood
    test_split: test
    doc_to_text: "{{{{context}}}}"
    doc_to_target: "{{{{target}}}}"
    metric_list:
      - metric: perplexity
      - metric: acc
    """))
  (tasks / "zoo_mc.yaml").write_text(textwrap.dedent(f"""\
    task: zoo_mc
    dataset_path: json
    dataset_kwargs:
      data_files:
        train: {mc_train}
        test: {mc_test}
    output_type: multiple_choice
    training_split: train
    test_split: test
    num_fewshot: 2
    doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
    doc_to_choice: "{{{{choices}}}}"
    doc_to_target: "{{{{answer}}}}"
    metric_list:
      - metric: acc
      - metric: acc_norm
    """))
  (tasks / "zoo_ppl.yaml").write_text(textwrap.dedent(f"""\
    task: zoo_ppl
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {ppl}
    output_type: loglikelihood_rolling
    test_split: test
    doc_to_text: ""
    doc_to_target: "{{{{text}}}}"
    metric_list:
      - metric: word_perplexity
      - metric: byte_perplexity
      - metric: bits_per_byte
    """))
  for name, kwargs in (("zoo_gen", {"until": ["e", "\n"], "max_gen_toks": 12,
                                    "do_sample": False}),
                       ("zoo_gen_sampled", {"until": ["."], "max_gen_toks": 20,
                                            "do_sample": True, "temperature": 0.7,
                                            "top_k": 1})):
    (tasks / f"{name}.yaml").write_text(textwrap.dedent(f"""\
      task: {name}
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {gen}
      output_type: generate_until
      test_split: test
      doc_to_text: "{{{{prompt}}}}"
      doc_to_target: "{{{{answer}}}}"
      generation_kwargs: {json.dumps(kwargs)}
      metric_list:
        - metric: exact_match
      """))
  return str(tasks)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """{"hf", "zoo", "adapter", "tasks"}: the HF checkpoint with its tokenizer, zoo's
  conversion of it, a peft LoRA adapter with non-zero B, and the task directory."""
  root = tmp_path_factory.mktemp("harness")
  config = transformers.LlamaConfig(
    vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
    bos_token_id=1, eos_token_id=2, pad_token_id=3)
  torch.manual_seed(0)
  model = randomize(transformers.LlamaForCausalLM(config), std=0.1).eval()
  hf_dir, zoo_dir, adapter_dir = (str(root / n) for n in ("hf", "zoo", "adapter"))
  model.save_pretrained(hf_dir)
  fast = write_tokenizer(hf_dir)
  convert(hf_dir, zoo_dir, "zoo")
  tasks = write_tasks(root, model, fast)
  lora = peft.get_peft_model(model, peft.LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in lora.named_parameters():
      if "lora_" in name:  # peft starts B at zero, which would make the adapter a no-op
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
  lora.save_pretrained(adapter_dir)
  return {"hf": hf_dir, "zoo": zoo_dir, "adapter": adapter_dir,
          "tasks": tasks}


def evaluate(lm, setup, tasks=TASKS, **kwargs) -> dict:
  return run_tasks(lm, tasks, include_path=setup["tasks"], bootstrap_iters=0,
                   log_samples=True, **kwargs)


def hf_results(setup, adapter=False, **kwargs) -> dict:
  lm = HFLM(pretrained=setup["hf"], device="cpu", batch_size=8, dtype="float32",
            peft=setup["adapter"] if adapter else None)
  return evaluate(lm, setup, **kwargs)


def answers(results: dict, task: str) -> list:
  """Each request's raw answer, in doc and request order."""
  samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
  return [[r[0] for r in s["resps"]] for s in samples]


def assert_same(ours: dict, ref: dict, tasks=TASKS):
  for task in tasks:
    a, b = answers(ours, task), answers(ref, task)
    assert len(a) == len(b) and [len(x) for x in a] == [len(x) for x in b], task
    for doc, (x, y) in enumerate(zip(a, b)):
      for r, (u, v) in enumerate(zip(x, y)):
        where = f"{task} doc {doc} request {r}"
        if isinstance(v, str):
          assert u == v, where
        elif isinstance(v, (list, tuple)):  # (log-likelihood, is greedy)
          assert math.isclose(u[0], v[0], rel_tol=1e-5, abs_tol=1e-4), (where, u, v)
          assert u[1] == v[1], (where, u, v)
        else:  # a rolling log-likelihood
          assert math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-4), (where, u, v)
    metrics, expected = ours["results"][task], ref["results"][task]
    assert sorted(metrics) == sorted(expected), task
    for key, value in expected.items():
      if isinstance(value, float) and key.split(",")[0].endswith("stderr"):
        continue
      if isinstance(value, float):
        assert math.isclose(metrics[key], value, rel_tol=1e-5, abs_tol=1e-7), (task, key)
      else:
        assert metrics[key] == value, (task, key)


@pytest.fixture(scope="module")
def reference(setup):
  return hf_results(setup)


@pytest.mark.slow
def test_zoolm_equals_the_hf_backend_request_by_request(setup, reference):
  lm = ZooLM(setup["zoo"], batch_size=8, progress=False)
  results = evaluate(lm, setup)
  assert_same(results, reference)
  # the choices of a question continued one KV cache of it; other requests ran packed
  assert set(lm._scorers) == {"prefix", "after", "packed"}
  # what the comparison covered: truncated requests, several windows, cut generations
  mc = reference["samples"]["zoo_mc"]
  longest = max(len(lm.tok_encode(s["arguments"][0][0] + s["arguments"][0][1])) for s in mc)
  assert longest > MAX_LENGTH + 1  # the few-shot prompts overflow the context
  docs = [json.loads(line) for line in open(os.path.join(setup["tasks"], "..", "data",
                                                         "ppl.jsonl"))]
  assert max(len(lm.tok_encode(d["text"])) for d in docs) > 2 * MAX_LENGTH
  flags = [a[0][1] for a in answers(reference, "zoo_ll")]
  assert 0 < sum(flags) < len(flags)  # greedy and not greedy continuations
  generated = [a[0] for a in answers(reference, "zoo_gen")]
  assert len(set(generated)) > 3  # the prompts lead to different texts
  # some generations end at a stop string, before the 12-token budget
  assert any(len(lm.tok_encode(g, add_special_tokens=False)) < 10 for g in generated)


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides,packed", [
  # sliding windows of 16 inside rows that pack several requests
  ("mistral", dict(sliding_window=16), True),
  # chunks of 16 positions: counted in the row, so requests run one a row, unpacked
  ("llama4", dict(num_hidden_layers=4, intermediate_size=48, intermediate_size_mlp=96,
                  num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=16,
                  floor_scale=4, attn_scale=0.1, head_dim=16), False),
])
def test_windowed_and_chunked_attention_equal_the_hf_backend(setup, tmp_path, family,
                                                              overrides, packed):
  hf_dir, zoo_dir = str(tmp_path / "hf"), str(tmp_path / "zoo")
  config = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
  config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
  torch.manual_seed(0)
  model = randomize(model_cls(config_cls(**{**config, **overrides})), std=0.1).eval()
  model.save_pretrained(hf_dir)
  transformers.AutoTokenizer.from_pretrained(setup["hf"]).save_pretrained(hf_dir)
  convert(hf_dir, zoo_dir, "zoo")
  tasks = ["zoo_mc", "zoo_ll", "zoo_ppl"]
  case = dict(setup, hf=hf_dir)
  reference = hf_results(case, tasks=tasks)
  lm = ZooLM(zoo_dir, batch_size=8, progress=False)
  assert_same(evaluate(lm, setup, tasks=tasks), reference, tasks=tasks)
  assert set(lm._scorers) == {"prefix", "after", "packed" if packed else "whole"}


@pytest.mark.slow
def test_batch_size_one_equals_batch_size_eight(setup, reference):
  results = evaluate(ZooLM(setup["zoo"], batch_size=1, progress=False), setup,
                     tasks=["zoo_mc", "zoo_gen"])
  assert_same(results, reference, tasks=["zoo_mc", "zoo_gen"])


@pytest.mark.slow
def test_sharded_on_a_mesh_equals_the_hf_backend(setup, reference):
  # 8 host devices (conftest.py): weights split over fsdp and tensor, batches over fsdp
  lm = ZooLM(setup["zoo"], batch_size=8, mesh="fsdp=4,tensor=2", progress=False)
  assert dict(lm.generator.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  tasks = ["zoo_ll", "zoo_ppl", "zoo_gen"]
  assert_same(evaluate(lm, setup, tasks=tasks), reference, tasks=tasks)


@pytest.mark.slow
def test_chat_template_as_the_hf_backend_applies_it(setup):
  kwargs = dict(tasks=["zoo_mc", "zoo_gen"], apply_chat_template=True)
  ours = evaluate(ZooLM(setup["zoo"], batch_size=8, progress=False), setup, **kwargs)
  ref = hf_results(setup, **kwargs)
  prompts = [s["arguments"][0][0] for s in ref["samples"]["zoo_gen"]]
  assert all(p.startswith("<s><user> ") and p.endswith("<assistant>") for p in prompts)
  assert [s["arguments"] for s in ours["samples"]["zoo_mc"]] == \
    [s["arguments"] for s in ref["samples"]["zoo_mc"]]
  assert_same(ours, ref, tasks=["zoo_mc", "zoo_gen"])


def run_zoo(*args):
  return subprocess.run([sys.executable, "-m", "zoo.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, HF_DATASETS_OFFLINE="1"))


@pytest.mark.slow
def test_zoo_eval_tasks_with_a_lora_adapter_equals_hf_with_peft(setup, tmp_path):
  ref = hf_results(setup, adapter=True)
  plain = hf_results(setup, tasks=["zoo_ppl"])
  out = tmp_path / "out"
  result = run_zoo("eval", "--checkpoint", setup["zoo"], "--adapter", setup["adapter"],
                   "--tasks", ",".join(TASKS), "--include-path", setup["tasks"],
                   "--batch-size", 4, "--bootstrap-iters", 0, "--output", out, "--json")
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  ours = {"results": summary["results"],
          "samples": {task: [json.loads(line) for line in open(out / f"samples_{task}.jsonl")]
                      for task in TASKS}}
  assert_same(ours, ref)
  assert json.loads((out / "results.json").read_text())["results"] == summary["results"]
  # the adapter changed the numbers
  assert abs(answers(ref, "zoo_ppl")[0][0] - answers(plain, "zoo_ppl")[0][0]) > 1e-2
  # the table, without --json
  result = run_zoo("eval", "--checkpoint", setup["zoo"], "--tasks", "zoo_mc",
                   "--include-path", setup["tasks"], "--limit", 3, "--num-fewshot", 0,
                   "--bootstrap-iters", 0)
  assert result.returncode == 0, result.stderr
  assert "zoo_mc" in result.stdout and "acc_norm" in result.stdout and "|" in result.stdout


def test_tokens_and_chat_template_as_the_hf_backend(setup):
  ours = ZooLM(setup["zoo"], batch_size=2, progress=False)
  ref = HFLM(pretrained=setup["hf"], device="cpu", batch_size=2, dtype="float32")
  texts = ["The cat sat.", "", " a  big\ndog\n\n", "<s>Red fish.", "é ü \u2603 tree"]
  for text in texts:
    for special in (None, True, False):
      assert ours.tok_encode(text, special) == ref.tok_encode(text, special), (text, special)
    assert ours.tok_encode(text, left_truncate_len=3) == \
      ref.tok_encode(text, left_truncate_len=3)
    ids = ref.tok_encode(text) + [2, 3]
    assert ours.tok_decode(ids) == ref.tok_decode(ids)
    assert ours.tok_decode(ids, False) == ref.tok_decode(ids, False)
  assert (ours.prefix_token_id, ours.eot_token_id) == (ref.prefix_token_id, ref.eot_token_id)
  assert ours.max_length == ref.max_length == MAX_LENGTH
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Red?"},
          {"role": "assistant", "content": "Blue and"}]
  for history, prompt in ((chat[:2], True), (chat, False)):
    assert ours.apply_chat_template(history, prompt) == \
      ref.apply_chat_template(history, prompt), prompt
  assert ours.chat_template(True) == CHAT_TEMPLATE and ours.chat_template(False) is None
  assert ours.tokenizer_name.endswith("__zoo")


def test_generation_arguments_zoo_cannot_honour_are_errors(setup):
  lm = ZooLM(setup["zoo"], batch_size=2, progress=False)
  with pytest.raises(ZooError, match="repetition_penalty"):
    lm._generation_settings({"until": ["."], "repetition_penalty": 1.2})
  with pytest.raises(ZooError, match="no room"):
    lm._generation_settings({"until": ["."], "max_gen_toks": MAX_LENGTH})
  until, budget, sampling = lm._generation_settings({"until": "x", "max_new_tokens": 5,
                                                    "do_sample": True, "temperature": 0.5,
                                                    "top_p": 0.9})
  assert until == ["x", "</s>"] and budget == 5
  assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.5, 0, 0.9)
  with pytest.raises(ZooError, match="device"):
    ZooLM(setup["zoo"], device="cuda")
  with pytest.raises(ZooError, match="batch_size"):
    ZooLM(setup["zoo"], batch_size="auto")


@pytest.mark.parametrize("args,message", [
  (["--tasks", "no_such_task_anywhere"], "unknown task no_such_task_anywhere"),
  (["--tasks", "zoo_mc", "--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
  (["--tasks", "zoo_mc", "--seq-len", "8"], "--seq-len"),
  (["--data", "x.txt", "--num-fewshot", "2"], "--num-fewshot"),
  ([], "one of --data FILES (perplexity) and --tasks"),
])
def test_zoo_eval_tasks_bad_input_is_one_line(setup, args, message):
  result = run_zoo("eval", "--checkpoint", setup["zoo"], "--include-path", setup["tasks"],
                   *args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_zoo_eval_tasks_without_a_tokenizer_is_one_line(setup, tmp_path):
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in os.listdir(setup["zoo"]):
    if not name.startswith(("tokenizer", "chat_template", "special_tokens")):
      os.symlink(os.path.join(setup["zoo"], name), bare / name)
  result = run_zoo("eval", "--checkpoint", bare, "--tasks", "zoo_mc", "--include-path",
                   setup["tasks"])
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "has no tokenizer" in lines[0], result.stderr
