"""Instruction and chat examples: ids equal transformers' chat template, the loss mask covers
exactly the responses, and packing carries the mask as weights."""

import json

import pytest

from zoo.data.instruct import InstructFormatter, check_record
from zoo.data.pipeline import make_batches
from zoo.data.tokenizers import load_tokenizer
from zoo.errors import ZooError

CHAT = {"messages": [{"role": "system", "content": "w1 w2"},
                     {"role": "user", "content": "w3 w4 w5"},
                     {"role": "assistant", "content": "w6 w7"},
                     {"role": "user", "content": "w8"},
                     {"role": "assistant", "content": "w9 w10 w11"}]}


def test_chat_ids_match_transformers_and_mask_is_the_responses(tok_dir):
  directory, fast = tok_dir
  ids, mask = InstructFormatter(load_tokenizer(directory), directory)(json.dumps(CHAT))
  want = fast.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=False)
  assert ids.tolist() == list(want)
  trained = fast.convert_ids_to_tokens(ids[mask == 1].tolist())
  assert trained == ["w6", "w7", "w9", "w10", "w11"]


def test_prompt_completion_with_and_without_a_template(tok_dir, tmp_path):
  directory, fast = tok_dir
  record = json.dumps({"prompt": "w1 w2", "completion": " w3 w4"})
  tok = load_tokenizer(directory)
  ids, mask = InstructFormatter(tok, directory)(record)
  want = fast.apply_chat_template([{"role": "user", "content": "w1 w2"},
                                   {"role": "assistant", "content": " w3 w4"}],
                                  tokenize=True, return_dict=False)
  assert ids.tolist() == list(want)
  assert fast.convert_ids_to_tokens(ids[mask == 1].tolist()) == ["w3", "w4"]
  ids, mask = InstructFormatter(tok, None)(record)  # no template: prompt + completion + EOS
  assert ids.tolist() == [tok.bos_id, *fast.encode("w1 w2 w3 w4", add_special_tokens=False),
                          tok.eos_id]
  assert mask.tolist() == [0, 0, 0, 1, 1, 1]
  with pytest.raises(ZooError, match="chat template"):
    InstructFormatter(tok, None)(json.dumps(CHAT))


def test_packed_batches_weight_only_the_responses(tok_dir):
  directory, fast = tok_dir
  tok = load_tokenizer(directory)
  docs = [{"text": json.dumps({"prompt": f"w{i} w{i + 1}", "completion": f" w{i + 2}"})}
          for i in range(20)]
  batch = next(make_batches(docs, tok, seq_len=16, batch_size=2, seed=0,
                            formatter=InstructFormatter(tok, None)))
  # every trained target is a completion word or EOS; prompts are never targets with weight
  trained = batch["targets"][batch["weights"] > 0]
  prompt_ids = {fast.convert_tokens_to_ids(f"w{i}") for i in range(20)}
  assert trained.size > 0
  assert set(trained.tolist()) <= {tok.eos_id} | {fast.convert_tokens_to_ids(f"w{i + 2}")
                                                  for i in range(20)}
  assert (batch["segment_ids"].max(axis=1) > 1).all()  # several examples per row: packed
  n_docs = int(sum(len(set(r[r > 0].tolist())) for r in batch["segment_ids"]))
  assert int((batch["targets"] == tok.eos_id)[batch["weights"] > 0].sum()) == n_docs
  del prompt_ids


@pytest.mark.parametrize("record,words", [
    ({"prompt": "x"}, "needs 'prompt' and 'completion'"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role"),
])
def test_bad_records(record, words):
  with pytest.raises(ZooError, match=words):
    check_record(record, "f.jsonl:1")
