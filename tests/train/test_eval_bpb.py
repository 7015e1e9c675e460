"""The loop's held-out bits per byte: its nats over the UTF-8 bytes of the documents it scored."""

import json
import math

import numpy as np
import pytest

from tests.helpers import flags, small_config
from zoo.cli import main
from zoo.data.sources import text_source
from zoo.data.tokenizers import load_tokenizer
from zoo.train.config import base_config


@pytest.mark.slow
def test_eval_bpb_is_nats_over_the_scored_documents_bytes(corpus, tmp_path, capsys):
  overrides = {"train.steps": 3, "train.eval_every": 3, "train.eval_batches": 2}
  args = flags(corpus, **overrides)
  assert main(["train", "--workdir", str(tmp_path), *args]) == 0
  out = capsys.readouterr().out
  with open(tmp_path / "metrics.jsonl") as f:
    record = [json.loads(line) for line in f][-1]
  assert "bits per byte" in out and f"{record['eval_bpb']:.4f}" in out
  # The first documents of the held-out split, whole: every token after BOS predicted (no
  # EOS), over the documents' own UTF-8 bytes.
  config = small_config(corpus, **overrides)
  source = text_source(config.data, "validation", corpus["data_dir"])
  tokenizer = load_tokenizer(str(tmp_path / "model"))
  texts = [source[i]["text"] for i in range(int(record["eval_documents"]))]
  texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
  predicted = sum(len(tokenizer.encode(t)) for t in texts)
  num_bytes = sum(len(t.encode("utf-8")) for t in texts)
  assert record["eval_bytes"] == num_bytes > 500
  expected = record["eval_loss"] * predicted / math.log(2) / num_bytes
  np.testing.assert_allclose(record["eval_bpb"], expected, rtol=1e-5)
  # Bits per byte sit below bits per token by the text's bytes per token.
  assert record["eval_bpb"] < record["eval_loss"] / math.log(2)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_end_of_run_sample_is_the_generators(corpus, tmp_path, capsys, temperature):
  """The sample printed at the end is what zoo.infer.Generator draws from the exported model
  with the config's prompt, temperature, top-p and seed."""
  import zoo
  from zoo.infer.generate import Generator, Sampling
  args = flags(corpus, **{"train.steps": 2, "train.sample_tokens": 12,
                          "train.sample_temperature": temperature, "train.sample_seed": 3})
  assert main(["train", "--workdir", str(tmp_path), *args]) == 0
  out = capsys.readouterr().out
  printed = out.split("sample:\n", 1)[1].split("\ncheckpoints", 1)[0]
  model = zoo.load(str(tmp_path / "model"))
  tokenizer = load_tokenizer(str(tmp_path / "model"))
  prompt = tokenizer.encode(base_config().train.sample_prompt)
  new = Generator(model).generate([[tokenizer.bos_id, *prompt]], max_new_tokens=12,
                                  sampling=Sampling(temperature=temperature, top_p=0.95),
                                  seed=3, stop_ids=[tokenizer.eos_id])[0]
  new = [t for t in new if t != tokenizer.eos_id]
  text = tokenizer.decode(prompt + new)
  assert printed == "    " + text.replace("\n", "\n    ")
