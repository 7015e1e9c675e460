"""Preference pairs (zoo.data.preference): the three record layouts, ids as transformers'
tokenizer and chat template give them (and as TRL's DPOTrainer cuts prompt and completion),
truncation as TRL did it, rows weighted on the completions only, batches in file order that
resume exactly, and one-line errors for bad records."""

import json

import numpy as np
import pytest

from zoo.data.preference import (PairEncoder, check_pair, make_pair_batches, pair_rows,
                                 preference_pipeline, prompt_budget, scan_pairs, truncate_pair)
from zoo.data.tokenizers import load_tokenizer
from zoo.errors import ZooError

PROMPT = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}]
CHOSEN = [{"role": "assistant", "content": "w4 w5"}]
REJECTED = [{"role": "assistant", "content": "w6"}]


def test_text_pairs_tokenize_as_transformers(tok_dir):
  directory, fast = tok_dir
  tok = load_tokenizer(directory)
  pair = check_pair({"prompt": "w1 w2", "chosen": " w3 w4", "rejected": " w5"}, "x")
  p, c, r = PairEncoder(tok, None)(pair)
  assert p == [tok.bos_id, *fast.encode("w1 w2", add_special_tokens=False)]
  assert c == [*fast.encode(" w3 w4", add_special_tokens=False), tok.eos_id]
  assert r == [*fast.encode(" w5", add_special_tokens=False), tok.eos_id]
  p, c, r = PairEncoder(tok, None, add_bos=False, add_eos=False)(pair)
  assert p == fast.encode("w1 w2", add_special_tokens=False)
  assert r == [fast.convert_tokens_to_ids("w5")]


@pytest.mark.parametrize("layout", ["explicit", "implicit", "implicit_with_text_prompt"])
def test_chat_pairs_render_as_apply_chat_template(layout, tok_dir):
  directory, fast = tok_dir
  record = {"explicit": {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
            "implicit": {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
            "implicit_with_text_prompt": {"prompt": "w2 w3", "chosen": PROMPT + CHOSEN,
                                          "rejected": PROMPT + REJECTED}}[layout]
  p, c, r = PairEncoder(load_tokenizer(directory), directory)(check_pair(record, "x"))
  prompt = fast.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
  full_c = fast.apply_chat_template(PROMPT + CHOSEN, tokenize=True, return_dict=False)
  full_r = fast.apply_chat_template(PROMPT + REJECTED, tokenize=True, return_dict=False)
  assert p == list(prompt)
  assert p + c == list(full_c) and p + r == list(full_r)
  assert fast.convert_ids_to_tokens(c) == ["w4", "w5"]


def test_chat_pairs_equal_trls_tokenization(tok_dir, tmp_path):
  """TRL's DPOTrainer prepares the same prompt, chosen and rejected ids."""
  trl = pytest.importorskip("trl")
  datasets = pytest.importorskip("datasets")
  import transformers
  directory, fast = tok_dir
  record = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
  config = transformers.LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2)
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                       bf16=False, max_length=None)
  trainer = trl.DPOTrainer(model=transformers.LlamaForCausalLM(config),
                           ref_model=transformers.LlamaForCausalLM(config), args=args,
                           train_dataset=datasets.Dataset.from_list([record]),
                           processing_class=fast)
  theirs = trainer.train_dataset[0]
  ours = PairEncoder(load_tokenizer(directory), directory)(check_pair(record, "x"))
  assert ours == (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])


def test_pretokenized_pairs_are_used_as_given(tok_dir):
  pair = check_pair({"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}, "x")
  assert PairEncoder(None, None)(pair) == ([7, 8], [9], [10, 11])
  directory, _ = tok_dir  # a tokenizer with BOS and EOS adds neither
  assert PairEncoder(load_tokenizer(directory), directory)(pair) == ([7, 8], [9], [10, 11])


def test_truncation_cuts_the_prompt_from_the_left_then_the_completions_from_the_right():
  p, c, r = list(range(100, 110)), [1, 2, 3], [4, 5]
  # fits: 10 + 3 ids <= 12 + 1
  assert truncate_pair(p, c, r, 12, 4) == (p, c, r, (False, False, False))
  # does not fit: the prompt keeps its last 4 tokens, the completions fit after it
  assert truncate_pair(p, c, r, 8, 4) == (p[-4:], c, r, (True, False, False))
  # still too long: the completions keep their first tokens
  p2, c2, r2, cut = truncate_pair(p, list(range(10)), r, 8, 4)
  assert p2 == p[-4:] and c2 == list(range(5)) and r2 == r and cut == (True, True, False)
  # a short prompt is kept whole and leaves its room to the completions
  p3, c3, _, cut = truncate_pair([1], list(range(20)), [2], 8, 4)
  assert p3 == [1] and c3 == list(range(8)) and cut == (False, True, False)
  assert prompt_budget(16, 0) == 8
  with pytest.raises(ZooError, match="no room"):
    prompt_budget(16, 17)


def test_rows_weight_only_the_completion_targets():
  rows = pair_rows([1, 2, 3], [4, 5], [6], 8)
  assert rows["tokens"].tolist() == [[1, 2, 3, 4, 0, 0, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0]]
  assert rows["targets"].tolist() == [[2, 3, 4, 5, 0, 0, 0, 0], [2, 3, 6, 0, 0, 0, 0, 0]]
  assert rows["weights"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]]
  assert rows["positions"].tolist() == [[0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]]
  assert rows["segment_ids"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]


def pairs_file(path, n=20):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"prompt_ids": [1, 10 + i], "chosen_ids": [20 + i, 5],
                          "rejected_ids": [20 + i, 6]}) + "\n")
  return str(path)


class Data:
  source, files, eval_fraction, seq_len, batch_size, seed = "files", "", 0.0, 8, 4, 0
  shuffle, format, max_prompt_len, num_workers, shard = False, "preference", 0, 0, "documents"


def test_unshuffled_batches_follow_the_file_and_resume_exactly(tmp_path):
  cfg = Data()
  cfg.files = pairs_file(tmp_path / "pairs.jsonl")
  it = preference_pipeline(cfg, None, "train", data_dir=str(tmp_path / "data"))
  first = next(it)
  assert first["tokens"].shape == (4, 2, 8)
  assert first["tokens"][:, 0, 1].tolist() == [10, 11, 12, 13]  # the file's first pairs
  assert first["targets"][:, 0, 2].tolist() == [5] * 4
  assert first["targets"][:, 1, 2].tolist() == [6] * 4
  cfg.shuffle = True
  it = preference_pipeline(cfg, None, "train", data_dir=str(tmp_path / "data"))
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]  # across an epoch boundary (20 pairs, 4 a batch)
  again = preference_pipeline(cfg, None, "train", data_dir=str(tmp_path / "data"))
  again.set_state(json.loads(json.dumps(state)))
  for w in want:
    got = next(again)
    assert all(np.array_equal(got[k], w[k]) for k in w)


def test_scan_counts_the_pairs_cut_to_fit():
  source = [{"text": json.dumps({"prompt_ids": list(range(1, 12)), "chosen_ids": [5] * 9,
                                 "rejected_ids": [6]}), "id": "a:1"},
            {"text": json.dumps({"prompt_ids": [1], "chosen_ids": [5], "rejected_ids": [6]}),
             "id": "a:2"}]
  stats = scan_pairs(source, PairEncoder(None, None), seq_len=8, max_prompt=4)
  assert (stats.pairs, stats.prompts_cut, stats.completions_cut) == (2, 1, 1)
  with pytest.raises(ZooError, match="a:1: the prompt has token id 11, outside"):
    scan_pairs(source, PairEncoder(None, None), seq_len=8, max_prompt=4, vocab_size=8)


@pytest.mark.parametrize("record,words", [
    ({"prompt": "a", "chosen": "b"}, "no 'rejected'"),
    ({"prompt": "a", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]}, "'chosen_ids' is empty"),
    ({"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]}, "'prompt_ids' is empty"),
    ({"prompt_ids": [1], "chosen_ids": [2]}, "no 'rejected_ids'"),
    ({"prompt_ids": [1], "chosen_ids": ["x"], "rejected_ids": [2]}, "not a list of token ids"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]},
     "must both be strings or both message lists"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]},
     "'chosen' is empty"),
    ({"chosen": "b", "rejected": "c"}, "no 'prompt' string"),
])
def test_bad_records_are_named(record, words):
  with pytest.raises(ZooError, match=words) as e:
    check_pair(record, "pairs.jsonl:3")
  assert str(e.value).startswith("pairs.jsonl:3: ") and "\n" not in str(e.value)


def test_text_pairs_without_a_tokenizer_are_an_error():
  with pytest.raises(ZooError, match="need a tokenizer"):
    PairEncoder(None, None)(check_pair({"prompt": "a", "chosen": "b", "rejected": "c"}, "x"))


def test_padding_pairs_of_a_last_batch_are_empty():
  source = [{"text": json.dumps({"prompt_ids": [1], "chosen_ids": [5], "rejected_ids": [6]})}] * 3
  it = make_pair_batches(source, PairEncoder(None, None), seq_len=4, batch_size=2, seed=0,
                         max_prompt=2, shuffle=False, repeat=False)
  batches = list(it)
  assert len(batches) == 2 and batches[1]["weights"][1].sum() == 0
