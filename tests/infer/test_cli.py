"""`zoo generate` and `zoo eval` from the command line, against transformers."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.references import WORDS, hf_greedy, hf_model, with_tokenizer

# the references this module checks against; without them it is skipped
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def run_zoo(*args):
  return subprocess.run([sys.executable, "-m", "zoo.cli", *map(str, args)],
                        capture_output=True, text=True, timeout=600)


@pytest.fixture
def checkpoint(save_hf):
  model = hf_model("llama")
  path = save_hf(model)
  return model, path, with_tokenizer(path)


@pytest.mark.slow
def test_generate_prompt_ids_json_equals_transformers(checkpoint):
  model, path, _ = checkpoint
  prompt = [1, 17, 40, 9, 33, 100]
  result = run_zoo("generate", "--checkpoint", path, "--prompt-ids", ",".join(map(str, prompt)),
                   "--max-new-tokens", 36, "--ignore-eos", "--json")
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["ids"] == hf_greedy(model, prompt, 36)
  assert isinstance(out["text"], str) and out["text"]


@pytest.mark.slow
def test_generate_text_and_chat_use_the_checkpoints_tokenizer(checkpoint):
  model, path, fast = checkpoint
  text = "w5 w17 w3 w99 w42"
  # plain text: BOS + the words as transformers' tokenizer encodes them
  expected_prompt = [fast.bos_token_id] + fast(text, add_special_tokens=False)["input_ids"]
  result = run_zoo("generate", "--checkpoint", path, "--prompt", text, "--max-new-tokens", 32,
                   "--json", "--ignore-eos")
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["ids"] == hf_greedy(model, expected_prompt, 32)
  assert out["text"] == fast.decode(out["ids"])
  # --chat: the template as transformers renders it
  chat = fast.apply_chat_template([{"role": "user", "content": text}],
                                  add_generation_prompt=True, tokenize=True)
  chat = chat["input_ids"] if hasattr(chat, "keys") else chat
  result = run_zoo("generate", "--checkpoint", path, "--prompt", text, "--chat",
                   "--max-new-tokens", 32, "--json", "--ignore-eos")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1])["ids"] == hf_greedy(model, chat, 32)
  # streaming to the terminal prints the same text
  result = run_zoo("generate", "--checkpoint", path, "--prompt", text, "--max-new-tokens", 32,
                   "--ignore-eos")
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == out["text"].strip()


@pytest.mark.slow
def test_generate_stops_at_eos_like_transformers(checkpoint):
  model, path, fast = checkpoint
  # make EOS the model's favourite next token after w7, so that generation stops early
  with torch.no_grad():
    model.lm_head.weight[fast.eos_token_id] = model.lm_head.weight[fast.eos_token_id] * 0
    model.model.norm.weight.copy_(torch.ones_like(model.model.norm.weight))
  prompt = [1, 15, 16]
  ids = torch.tensor([prompt])
  ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30,
                       do_sample=False, eos_token_id=fast.eos_token_id, pad_token_id=3)
  ref = ref[0, len(prompt):].tolist()
  if fast.eos_token_id in ref:
    ref = ref[:ref.index(fast.eos_token_id) + 1]
  model.save_pretrained(path)
  result = run_zoo("generate", "--checkpoint", path, "--prompt-ids", "1,15,16",
                   "--max-new-tokens", 30, "--json", "--stop-id", fast.eos_token_id)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1])["ids"] == ref


@pytest.mark.slow
def test_eval_perplexity_equals_transformers_loss(checkpoint, tmp_path):
  model, path, fast = checkpoint
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(WORDS, n)) for n in (40, 7, 25)]
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  nll_sum, count = 0.0, 0
  for doc in docs:
    ids = torch.tensor([[fast.bos_token_id] + fast(doc, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
      loss = model(input_ids=ids, labels=ids).loss.item()
    nll_sum += loss * (ids.shape[1] - 1)
    count += ids.shape[1] - 1
  result = run_zoo("eval", "--checkpoint", path, "--data", data, "--json", "--batch-size", 2)
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["tokens"] == count and out["documents"] == 3
  assert math.isclose(out["nll"], nll_sum / count, rel_tol=1e-5, abs_tol=1e-4)
  assert math.isclose(out["perplexity"], math.exp(out["nll"]), rel_tol=1e-9)
  # shorter rows cut documents into pieces; every token is still predicted once
  result = run_zoo("eval", "--checkpoint", path, "--data", data, "--seq-len", 8)
  assert result.returncode == 0, result.stderr
  assert "perplexity" in result.stdout and f"over {count} tokens" in result.stdout


@pytest.mark.parametrize("args,message", [
  (["--prompt-ids", ",".join(["5"] * 256)], "maximum length"),
  (["--prompt-ids", ""], "empty"),
  (["--prompt-ids", "1,2,500"], "outside the vocabulary"),
  (["--prompt-ids", "1,x"], "comma-separated integers"),
  (["--prompt", "w1 w2", "--top-p", "0"], "top_p"),
  (["--prompt", "w1"], "no tokenizer"),
])
def test_generate_bad_input_is_one_line(args, message, save_hf):
  path = save_hf(hf_model("llama"))  # no tokenizer saved
  result = run_zoo("generate", "--checkpoint", path, *args)
  assert result.returncode == 2
  assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_eval_bad_input_is_one_line(checkpoint, tmp_path):
  _, path, _ = checkpoint
  for args, message in ((["--data", tmp_path / "missing.txt"], "no files match"),
                        (["--data", "no_such_dataset"], "TFDS dataset 'no_such_dataset'"),
                        (["--data", tmp_path / "a.txt", "--seq-len", 100000], "maximum length")):
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    result = run_zoo("eval", "--checkpoint", path, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
      result.stderr
