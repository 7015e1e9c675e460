"""The TFDS text-file builder: every document read back exactly, stable splits, reuse, errors."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import sysconfig
import types

import pytest

from zoo.data import sources
from zoo.errors import ZooError


def cfg(**kw):
  base = dict(source="files", files="", text_key="text", eval_fraction=0.3, tfds_name="")
  return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture
def corpus(tmp_path):
  """Text, code and JSONL files, with the documents a reader must find (independent of zoo)."""
  root = tmp_path / "corpus"
  (root / "sub").mkdir(parents=True)
  (root / "a.txt").write_text("first document\nwith two lines\n", encoding="utf-8")
  (root / "b.txt").write_text("naïve café 😀 東京\n", encoding="utf-8")
  (root / "empty.txt").write_text("  \n", encoding="utf-8")  # no document
  (root / "sub" / "c.py").write_text("def f():\n    return 1\n", encoding="utf-8")
  lines = [json.dumps({"text": f"json document {i} " + "x" * i, "other": i}) for i in range(60)]
  lines.insert(5, "")  # blank lines are skipped
  (root / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  expected = {}
  for name in ("a.txt", "b.txt", "sub/c.py"):
    expected[name] = (root / name).read_text(encoding="utf-8")
  with open(root / "d.jsonl", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        expected[f"d.jsonl:{lineno}"] = json.loads(line)["text"]
  return root, expected


def read_all(source) -> dict[str, str]:
  out = {}
  for i in range(len(source)):
    record = source[i]
    out[record["id"].decode()] = record["text"].decode("utf-8")
  return out


def test_reads_back_every_document(corpus, tmp_path):
  root, expected = corpus
  c = cfg(files=f"{root}/*.txt,{root}/**/*.py,{root}/*.jsonl")
  train = read_all(sources.text_source(c, "train", str(tmp_path / "data")))
  val = read_all(sources.text_source(c, "validation", str(tmp_path / "data")))
  assert not set(train) & set(val)
  assert {**train, **val} == expected  # every document, byte for byte, and nothing else
  assert 5 <= len(val) <= 35  # ~30% of 63 documents

  # Another build from scratch splits the same way (split by id hash, not by order or chance).
  again = cfg(files=f"{root}/**/*.py,{root}/*.jsonl,{root}/*.txt")
  assert read_all(sources.text_source(again, "validation", str(tmp_path / "other"))) == val


def test_second_call_reuses_the_dataset(corpus, tmp_path, monkeypatch):
  root, _ = corpus
  c = cfg(files=f"{root}/*.txt")
  data_dir = str(tmp_path / "data")
  first = read_all(sources.text_source(c, "train", data_dir))

  def no_rebuild(self, *args, **kwargs):
    raise AssertionError("rebuilt")
  monkeypatch.setattr(sources.ZooText, "_split_generators", no_rebuild)
  assert read_all(sources.text_source(c, "train", data_dir)) == first
  # A changed file makes a different dataset, which would need a build.
  (root / "a.txt").write_text("changed, and longer than before\n", encoding="utf-8")
  with pytest.raises(AssertionError, match="rebuilt"):
    sources.text_source(c, "train", data_dir)


def test_jsonl_text_key(corpus, tmp_path):
  root, _ = corpus
  (root / "e.jsonl").write_text(
    "\n".join(json.dumps({"body": f"body {i}", "text": 0}) for i in range(8)), encoding="utf-8")
  c = cfg(files=f"{root}/e.jsonl", text_key="body", eval_fraction=0.0)
  got = read_all(sources.text_source(c, "train", str(tmp_path / "data")))
  assert got == {f"e.jsonl:{i + 1}": f"body {i}" for i in range(8)}
  with pytest.raises(ZooError, match=r"d.jsonl:1: no 'body' field"):
    sources.text_source(cfg(files=f"{root}/d.jsonl", text_key="body"), "train",
                        str(tmp_path / "data"))
  with pytest.raises(ZooError, match=r"e.jsonl:1: field 'text' is not a string"):
    sources.text_source(cfg(files=f"{root}/e.jsonl"), "train", str(tmp_path / "data"))


def test_python_stdlib_files():
  files = sources.python_stdlib_files()
  stdlib = sysconfig.get_paths()["stdlib"]
  assert len(files) > 300 and files == sorted(files)
  assert os.path.join(stdlib, "os.py") in files
  assert os.path.join(stdlib, "json", "decoder.py") in files
  for f in files:
    parts = os.path.relpath(f, stdlib).split(os.sep)
    assert f.endswith(".py") and os.path.isfile(f)
    assert not {"site-packages", "test", "tests"} & set(parts)
    assert os.path.getsize(f) <= sources.STDLIB_MAX_BYTES


def test_python_stdlib_source(tmp_path):
  c = cfg(source="python_stdlib", eval_fraction=0.05)
  train = sources.text_source(c, "train", str(tmp_path))
  val = sources.text_source(c, "validation", str(tmp_path))
  nonempty = [f for f in sources.python_stdlib_files() if pathlib.Path(f).read_bytes().strip()]
  assert len(train) + len(val) == len(nonempty)
  record = val[0]
  path = os.path.join(sysconfig.get_paths()["stdlib"], record["id"].decode())
  with open(path, "rb") as f:
    assert record["text"] == f.read()
  assert "tensorflow" not in sys.modules


def test_tfds_source_by_name(corpus, tmp_path):
  root, expected = corpus
  data_dir = str(tmp_path / "data")
  files = cfg(files=f"{root}/*.txt", eval_fraction=0.0)
  sources.text_source(files, "train", data_dir)
  name = f"zoo_text/{sources.source_id(files, data_dir)}:1.0.0"
  by_name = sources.text_source(cfg(source="tfds", tfds_name=name), "train", data_dir)
  assert read_all(by_name) == {"a.txt": expected["a.txt"], "b.txt": expected["b.txt"]}
  # text_key picks another feature, renamed to "text"
  ids = sources.text_source(cfg(source="tfds", tfds_name=name, text_key="id"), "train", data_dir)
  assert sorted(ids[i]["text"] for i in range(len(ids))) == [b"a.txt", b"b.txt"]
  with pytest.raises(ZooError, match="has no feature 'body'"):
    sources.text_source(cfg(source="tfds", tfds_name=name, text_key="body"), "train", data_dir)
  with pytest.raises(ZooError, match="not found"):
    sources.text_source(cfg(source="tfds", tfds_name="no_such_dataset"), "train", data_dir)


def test_errors(corpus, tmp_path):
  root, _ = corpus
  data_dir = str(tmp_path / "data")
  (root / "latin1.txt").write_bytes("café".encode("latin-1"))
  (root / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
  cases = [
    (cfg(files=f"{root}/*.nothing"), "train", "no files match"),
    (cfg(files=""), "train", "data.files is empty"),
    (cfg(source="s3"), "train", "unknown data source 's3'"),
    (cfg(files=f"{root}/empty.txt"), "train", "no documents"),
    (cfg(files=f"{root}/a.txt", eval_fraction=0.0), "validation", "split 'validation'.*empty"),
    (cfg(files=f"{root}/a.txt"), "test", "unknown split 'test'"),
    (cfg(files=f"{root}/a.txt", eval_fraction=1.5), "train", "eval_fraction"),
    (cfg(files=f"{root}/latin1.txt"), "train", "not UTF-8 text"),
    (cfg(files=f"{root}/bad.jsonl"), "train", r"bad.jsonl:2: not a JSON line"),
    (cfg(source="tfds"), "train", "tfds_name is empty"),
  ]
  for c, split, message in cases:
    with pytest.raises(ZooError, match=message):
      sources.text_source(c, split, data_dir)
