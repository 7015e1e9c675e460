"""Text sources: local text/JSONL files (or the Python standard library) built into a TFDS dataset
in array_record format, or any prepared TFDS dataset, read by random access without TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from zoo.data.instruct import check_record
from zoo.errors import ZooError

SPLITS = ("train", "validation")
SOURCES = ("python_stdlib", "files", "tfds")
# Standard-library files bigger than this are data tables (pydoc_data/topics.py), not code.
STDLIB_MAX_BYTES = 512 * 1024
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def field(cfg: Any, name: str, default: Any = None) -> Any:
  """`cfg.name`, or `default` when the config has no such field."""
  return getattr(cfg, name, default)


def _unit_hash(doc_id: str) -> float:
  return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(doc_id: str, eval_fraction: float) -> str:
  """"validation" for a stable `eval_fraction` of document ids, "train" for the rest."""
  return "validation" if _unit_hash(doc_id) < eval_fraction else "train"


def rows_split(shard: str, batch_size: int, process_index: int, process_count: int):
  """How processes share a pipeline, data.shard "documents" (each reads its share of the
  records: `process_share`) or "rows" (each runs the global pipeline and keeps its block of
  rows): (rows_of, batch_size, process_index, process_count) to build with, rows_of being
  (start, end) of the rows this process keeps, or None."""
  if shard not in ("documents", "rows"):
    raise ZooError(f"data.shard must be documents or rows, got {shard!r}")
  if shard == "documents":
    return None, batch_size, process_index, process_count
  return ((process_index * batch_size, (process_index + 1) * batch_size),
          batch_size * process_count, 0, 1)


def process_share(source, process_index: int, process_count: int, *, shuffle: bool, seed: int,
                  repeat: bool, what: str):
  """This process's share of a random-access `source` as a grain MapDataset: every
  process_count-th record from process_index, shuffled (reseeded every epoch by the repeat)
  and repeated as asked. `what` names the records in the errors."""
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ZooError(f"the data source has no {what}")
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ZooError(f"process {process_index} of {process_count} gets no {what}: the data "
                   f"source has fewer {what} than processes")
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  if repeat:
    ds = ds.repeat()
  return ds


def check_batch_args(*, seq_len: int, batch_size: int, process_index: int,
                     process_count: int, seed: int, num_workers: int) -> None:
  """ZooErrors for a pipeline's arguments out of range."""
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                      ("process_count", process_count)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ZooError(f"{name} must be a positive integer, got {value!r}")
  if not 0 <= process_index < process_count:
    raise ZooError(f"process_index {process_index} is not in 0..{process_count - 1}")
  if not 0 <= seed < 2**32:
    raise ZooError(f"seed must be in [0, 2**32), got {seed}")
  if num_workers < 0:
    raise ZooError(f"num_workers must be >= 0, got {num_workers}")


def local_batch_size(data_cfg: Any, process_count: int) -> int:
  """This process's share of data_cfg.batch_size (global), or a ZooError."""
  batch_size = field(data_cfg, "batch_size")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ZooError(f"data.batch_size must be a positive integer, got {batch_size!r}")
  if batch_size % process_count:
    raise ZooError(f"data.batch_size {batch_size} is not divisible by the "
                   f"{process_count} processes")
  return batch_size // process_count


class _Rows(grain.transforms.Map):
  """Rows [start, stop) of a batch (data.shard = rows)."""

  def __init__(self, start: int, stop: int):
    self.start, self.stop = start, stop

  def map(self, batch):
    return {k: v[self.start:self.stop] for k, v in batch.items()}


def finish_batches(it: grain.IterDataset, rows_of, num_workers: int) -> grain.DatasetIterator:
  """The iterator of batches `it`: cut to this process's rows (`rows_split`'s rows_of), run in
  `num_workers` worker processes when > 0."""
  if rows_of is not None:
    it = it.map(_Rows(*rows_of))
  if num_workers:
    # grain 0.2.18's worker processes read an absl flag, which raises in a program that never
    # parsed flags (google/grain#1355, fixed upstream); the flags' defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers)))
  return iter(it)


def json_lines(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of each non-blank line of a JSONL file."""
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except ValueError:
        raise ZooError(f"{path}:{lineno}: not a JSON line") from None


def read_documents(path: str, doc_id: str, text_key: str = "text", fmt: str = "text"
                   ) -> Iterator[tuple[str, str]]:
  """(id, text) of each document in one file: a whole file, or one JSONL line (id `file:line`).

  Documents that are empty or only whitespace are skipped. fmt "instruct": each JSONL line is
  an instruction or chat record (`zoo.data.instruct`), kept as its JSON text.
  """
  if fmt == "instruct":
    if not path.endswith(".jsonl"):
      raise ZooError(f"data.format 'instruct' reads JSONL files, not {path}")
    for lineno, record in json_lines(path):
      yield f"{doc_id}:{lineno}", json.dumps(check_record(record, f"{path}:{lineno}"))
    return
  if fmt != "text":
    raise ZooError(f"unknown data.format {fmt!r}: expected text or instruct")
  if path.endswith(".jsonl"):
    for lineno, record in json_lines(path):
      if not isinstance(record, dict) or text_key not in record:
        raise ZooError(f"{path}:{lineno}: no {text_key!r} field (set the data text_key)")
      text = record[text_key]
      if not isinstance(text, str):
        raise ZooError(f"{path}:{lineno}: field {text_key!r} is not a string")
      if text.strip():
        yield f"{doc_id}:{lineno}", text
  else:
    with open(path, "rb") as f:
      data = f.read()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      raise ZooError(f"not UTF-8 text: {path}") from None
    if text.strip():
      yield doc_id, text


@dataclasses.dataclass(kw_only=True, repr=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """Which files make the dataset; the config name is a hash of all of it (see `text_files`)."""
  files: tuple[str, ...] = ()
  text_key: str = "text"
  eval_fraction: float = 0.05
  format: str = "text"

  def __repr__(self):  # TFDS logs the config; the file list can be thousands of paths long
    return f"TextFilesConfig({self.name!r}, {len(self.files)} files)"


class ZooText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local text files (one document each) and JSONL files (one document per line).

  Features: `text` and `id` (the path relative to the files' common directory, `:line` for
  JSONL). A document goes to "validation" when a hash of its id falls under `eval_fraction`, so
  the split is stable under reordering, additions and moving the whole tree. A split with no
  documents is left out of the dataset (TFDS cannot write an empty split).
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Text and JSONL files, split by id hash."}
  BUILDER_CONFIGS = []
  # TFDS finds a builder's code (to look for a checksums file beside it) through
  # importlib_resources, which is only an optional extra of etils; nothing here is downloaded,
  # so name the file directly.
  code_path = pathlib.Path(__file__)
  # True: the dataset keeps the files' order (TFDS does not shuffle it as it writes).
  IN_FILE_ORDER = False

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self, description=self.builder_config.description,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                           "id": tfds.features.Text()}),
      disable_shuffling=self.IN_FILE_ORDER)

  def _documents(self) -> Iterator[tuple[str, str]]:
    cfg = self.builder_config
    base = os.path.commonpath([os.path.dirname(f) for f in cfg.files])
    for path in cfg.files:
      yield from self._read(path, os.path.relpath(path, base))

  def _read(self, path: str, doc_id: str) -> Iterator[tuple[str, str]]:
    """(id, text) of each document of one file, `doc_id` naming the file."""
    cfg = self.builder_config
    return read_documents(path, doc_id, cfg.text_key, cfg.format)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    fraction = self.builder_config.eval_fraction
    # One pass to learn which splits have documents; bad files fail here with a ZooError.
    ids = [doc_id for doc_id, _ in self._documents()]
    if not ids:
      raise ZooError(f"no documents: all {len(self.builder_config.files)} files are empty")
    counts = collections.Counter(split_of(doc_id, fraction) for doc_id in ids)
    # A small corpus may have no id under the threshold: hold out the lowest hash instead, so
    # that a held-out split exists whenever one is asked for and there is more than one document.
    self._held_out = None
    if fraction > 0 and not counts["validation"] and len(ids) > 1:
      self._held_out = min(ids, key=_unit_hash)
      counts.update(train=-1, validation=1)
    return {split: self._generate_examples(split) for split in SPLITS if counts[split]}

  def _split(self, doc_id: str) -> str:
    if doc_id == self._held_out:
      return "validation"
    return split_of(doc_id, self.builder_config.eval_fraction)

  def _generate_examples(self, split: str):
    for doc_id, text in self._documents():
      if self._split(doc_id) == split:
        yield doc_id, {"id": doc_id, "text": text}


def text_files(files: Sequence[str], data_dir: str, *, text_key: str = "text",
               eval_fraction: float = 0.05, label: str = "files", fmt: str = "text",
               builder: type[ZooText] = ZooText) -> ZooText:
  """The (maybe not yet prepared) `builder` for `files`, named by a hash of what it reads.

  The hash covers each file's path, size and modification time, the text key and the fraction,
  so a changed file set builds a new dataset beside the old one instead of reusing it.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ZooError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
  files = sorted({os.path.abspath(f) for f in files})
  if not files:
    raise ZooError("no input files")
  stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
  key = json.dumps([str(builder.VERSION), text_key, float(eval_fraction), stats]
                   + ([fmt] if fmt != "text" else []))
  digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
  config = TextFilesConfig(
    name=f"{label}_{digest}", files=tuple(files), text_key=text_key, format=fmt,
    eval_fraction=float(eval_fraction),
    description=f"{len(files)} files under {os.path.commonpath(files)}")
  return builder(config=config, data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD)


def python_stdlib_files() -> list[str]:
  """The .py files of this interpreter's standard library, without tests, sorted.

  A corpus of ~10 MB of real code that every machine has, for runs with no downloads.
  """
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
    for name in filenames:
      path = os.path.join(dirpath, name)
      if (name.endswith(".py") and not name.startswith("test_") and os.path.isfile(path)
          and os.path.getsize(path) <= STDLIB_MAX_BYTES):
        out.append(path)
  return sorted(out)


def match_files(patterns: str) -> list[str]:
  """The files matched by comma-separated globs (`**` recurses), sorted."""
  found = set()
  for pattern in (p.strip() for p in (patterns or "").split(",")):
    if not pattern:
      continue
    matches = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
               if os.path.isfile(m)]
    if not matches:
      raise ZooError(f"no files match {pattern!r}")
    found.update(os.path.abspath(m) for m in matches)
  if not found:
    raise ZooError("data.files is empty: give comma-separated globs")
  return sorted(found)


class _RenamedText:
  """A random-access source whose records are {"text": record[key]}."""

  def __init__(self, source, key: str):
    self._source, self._key = source, key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    return {"text": self._source[index][self._key]}

  def __getitems__(self, indices):
    return [{"text": r[self._key]} for r in self._source.__getitems__(indices)]

  def __repr__(self):
    return f"_RenamedText({self._source!r}, {self._key!r})"


def tfds_source(name: str, split: str, data_dir: str, text_key: str):
  """The split of the prepared TFDS dataset `name` in `data_dir` as a random-access source of
  records with a "text" field (read from the feature `text_key`)."""
  if not name:
    raise ZooError("data.source is 'tfds' but data.tfds_name is empty")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises assorted types for a missing dataset, version or split
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ZooError(f"TFDS dataset {name!r} split {split!r} not found in {data_dir}: {line}"
                   ) from None
  if len(source) == 0:
    raise ZooError(f"TFDS dataset {name!r} split {split!r} is empty")
  first = source[0]
  if text_key not in first:
    raise ZooError(f"TFDS dataset {name!r} has no feature {text_key!r} "
                   f"(features: {', '.join(sorted(first))})")
  return source if text_key == "text" else _RenamedText(source, text_key)


def _files_builder(data_cfg: Any, data_dir: str) -> ZooText:
  source = field(data_cfg, "source", "python_stdlib")
  if source == "python_stdlib":
    files = python_stdlib_files()
    if not files:
      raise ZooError(f"no standard-library .py files under {sysconfig.get_paths()['stdlib']}")
  elif source == "files":
    files = match_files(field(data_cfg, "files", ""))
  else:
    raise ZooError(f"unknown data source {source!r}: expected one of {', '.join(SOURCES)}")
  return text_files(files, data_dir, text_key=field(data_cfg, "text_key", "text") or "text",
                    eval_fraction=field(data_cfg, "eval_fraction", 0.05), label=source,
                    fmt=field(data_cfg, "format", "text") or "text")


def source_id(data_cfg: Any, data_dir: str) -> str:
  """A name that changes whenever the documents of `data_cfg` may change (for cache keys)."""
  if field(data_cfg, "source", "python_stdlib") == "tfds":
    return f"tfds:{field(data_cfg, 'tfds_name', '')}:{field(data_cfg, 'text_key', 'text')}"
  return _files_builder(data_cfg, data_dir).builder_config.name


def text_source(data_cfg: Any, split: str, data_dir: str):
  """A random-access source (len, [i]) of records with a "text" field (bytes or str).

  `data_cfg.source` is "python_stdlib", "files" (`data_cfg.files`: comma-separated globs) or
  "tfds" (`data_cfg.tfds_name`: a prepared dataset in `data_dir`, e.g. "my_data:1.0.0"). Local
  files are built into an array_record dataset under `data_dir` on first use.
  """
  data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
  if field(data_cfg, "source", "python_stdlib") == "tfds":
    return tfds_source(field(data_cfg, "tfds_name", ""), split, data_dir,
                        field(data_cfg, "text_key", "text") or "text")
  if split not in SPLITS:
    raise ZooError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
  return prepared_split(_files_builder(data_cfg, data_dir), split, "data source")


def prepared_split(builder: ZooText, split: str, what: str):
  """The random-access source of `split` of the files' dataset, built on first use; a
  ZooError when the split has no documents (`what` names the dataset)."""
  if not builder.is_prepared():
    builder.download_and_prepare()
  if split not in builder.info.splits:
    cfg = builder.builder_config
    raise ZooError(f"split {split!r} of {what} {cfg.name!r} is empty "
                   f"(eval_fraction={cfg.eval_fraction}, {len(cfg.files)} files)")
  return builder.as_data_source(split=split)
