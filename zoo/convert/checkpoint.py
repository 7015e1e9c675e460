"""Checkpoint directories on disk: format detection, validation, streaming conversion, loading.

Formats:
- "hf": an HF transformers directory (config.json + safetensors or .bin weights);
- "zoo": zoo's own (zoo.json + safetensors holding the model's parameter tree under its own
  dotted paths, kernels [in, out], Mixtral experts stacked);
- "meta": Meta's consolidated format (params.json + consolidated.NN.pth model-parallel shards,
  see zoo/convert/meta.py).

A conversion holds one tensor at a time (plus, for .bin input, the one .bin file being read) and
writes into a temporary directory that is renamed into place only when complete. Everything that
can be checked from the file headers (missing, unexpected and misshapen tensors) is checked before
anything is written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import numpy as np

from zoo import paths
from zoo.convert import gguf, hf, meta
from zoo.convert.tensors import (WEIGHT_SUFFIXES, ShardedWriter, TensorSource, numpy_dtype,
                                 weight_files)
from zoo.errors import ZooError
from zoo.io import read_json, staged_file, staged_output, write_json
from zoo.models.config import LlamaConfig
from zoo.models.llama import Llama, from_params

ZOO_META = "zoo.json"
ZOO_FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
FORMATS = ("zoo", "hf", "meta")
OUTPUT_FORMATS = (*FORMATS, "gguf")  # GGUF is written, not read


def detect_format(path: str) -> str:
  path = paths.localize(path)  # a gs:// checkpoint is read from a local copy
  if not os.path.exists(path):
    raise ZooError(f"{path} does not exist")
  if not os.path.isdir(path):
    raise ZooError(f"{path} is not a checkpoint directory")
  if os.path.exists(os.path.join(path, ZOO_META)):
    return "zoo"
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  if os.path.exists(os.path.join(path, meta.PARAMS)):
    return "meta"
  shards = meta.shard_files(path)
  if shards:
    raise ZooError(f"{path} has {os.path.basename(shards[0])} but no {meta.PARAMS}")
  raise ZooError(f"{path} is not a checkpoint: it has neither {ZOO_META}, config.json nor "
                 f"{meta.PARAMS}")


def _side_files(directory: str, skip: set[str]) -> list[str]:
  """Top-level files that travel with the weights: tokenizer, generation config, license..."""
  out = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if (os.path.isfile(path) and not name.startswith(".") and name not in skip
        and not name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".index.json")):
      out.append(path)
  return out


def checkpoint_config(path: str) -> LlamaConfig:
  """The model config of the checkpoint at `path`, read from its description alone (HF's
  config.json, zoo's description or Meta's params.json): its tensors need not be there, so a
  run can be planned from an HF config.json before the weights are downloaded."""
  path = paths.localize(path)
  fmt = detect_format(path)
  if fmt == "hf":
    return hf.config_from_hf(read_json(os.path.join(path, "config.json")))
  if fmt == "meta":
    return meta.MetaSource(path).config
  described = read_json(os.path.join(path, ZOO_META))
  if described.get("format") != "zoo" or "config" not in described:
    raise ZooError(f"{os.path.join(path, ZOO_META)} is not a zoo checkpoint description")
  return LlamaConfig.from_dict(described["config"])


class Checkpoint:
  """An opened, validated checkpoint: its config and its tensors, read on demand."""

  def __init__(self, path: str):
    path = paths.localize(path)  # a gs:// checkpoint is read from a local copy
    self.path = path
    self.format = detect_format(path)
    self.hf_prefix = ""  # before every HF tensor name (a multimodal Llama 4's language model)
    self.notes: list[str] = []  # what a conversion tells the user beyond the output's path
    if self.format == "hf":
      hf_config = read_json(os.path.join(path, "config.json"))
      self.config = hf.config_from_hf(hf_config)
      _, self.hf_prefix = hf.text_config(hf_config)
      self.source = TensorSource(weight_files(path, "model"))
      self.side_files = _side_files(path, {"config.json"})
    elif self.format == "meta":
      self.source = meta.MetaSource(path)
      self.config = self.source.config
      self.side_files = _side_files(path, meta.OWN_FILES)
    else:
      described = read_json(os.path.join(path, ZOO_META))
      if described.get("format") != "zoo" or "config" not in described:
        raise ZooError(f"{os.path.join(path, ZOO_META)} is not a zoo checkpoint description")
      self.config = LlamaConfig.from_dict(described["config"])
      self.source = TensorSource(weight_files(path, "model"))
      self.side_files = _side_files(path, {ZOO_META})
    self._validate()

  def entries(self) -> list[hf.Entry]:
    """The HF weight map of this checkpoint's model, under its tensors' names."""
    return hf.weight_map(self.config, self.hf_prefix)

  def _validate(self):
    infos = self.source.infos
    if self.format == "hf":
      expected = {e.hf: e.hf_shape for e in self.entries()}
      left_out = sorted(n for n in infos if hf.left_out(n, self.hf_prefix))
      if left_out:
        self.notes.append(f"took the language model only: left out {len(left_out)} tensors of "
                          "the vision tower and projector (vision_model.*, "
                          "multi_modal_projector.*)")
      ignorable = lambda n: (hf.ignorable_hf_tensor(n, self.config, self.hf_prefix)  # noqa: E731
                             or hf.left_out(n, self.hf_prefix))
    elif self.format == "meta":
      expected = {e.meta: e.shape for e in self.source.entries.values()}
      ignorable = lambda n: n in meta.IGNORED  # noqa: E731
    else:
      expected = hf.zoo_shapes(self.config)
      ignorable = lambda n: False  # noqa: E731
    for name, info in infos.items():
      if name not in expected:
        if ignorable(name):
          continue
        raise ZooError(f"{info.file} has tensor {name}, which a {self.config.family} model "
                       "with this config does not have")
      if info.shape != expected[name]:
        if self.format == "meta":
          raise ZooError(self.source.mismatch(name, expected[name]))
        raise ZooError(f"tensor {name} in {info.file} has shape {info.shape}, but config "
                       f"implies {expected[name]}")
    for name in expected:
      if name not in infos:
        raise ZooError(f"checkpoint {self.path} is missing tensor {name}")

  def zoo_dtypes(self) -> dict[str, np.dtype]:
    """zoo name -> the dtype it is stored in here."""
    infos = self.source.infos
    if self.format == "zoo":
      return {name: info.dtype for name, info in infos.items()}
    if self.format == "meta":
      return {e.zoo: infos[e.meta].dtype for e in self.source.entries.values()}
    return {e.zoo: infos[e.hf].dtype for e in self.entries()}

  def stream(self, split_experts: bool) -> Iterator[tuple[str, int | None, np.ndarray]]:
    """(zoo name, expert slice or None, array) in file order, one tensor in memory at a time
    (one expert's slice of it for stacked experts)."""
    if self.format == "hf":
      entries: dict[str, list[hf.Entry]] = {}
      for e in self.entries():
        entries.setdefault(e.hf, []).append(e)
      for name in self.source:
        for_name = entries.get(name, [])
        if for_name and for_name[0].stacked:
          for i in range(self.config.num_experts):
            array = self.source.read(name, i)
            for e in for_name:
              yield e.zoo, i, hf.to_zoo(e, array)
          continue
        for e in for_name:
          yield e.zoo, e.expert, hf.to_zoo(e, self.source.read(name))
      return
    if self.format == "meta":
      for name in self.source:
        if name in self.source.entries:
          e = self.source.entries[name]
          yield e.zoo, None, meta.to_zoo(e, self.source.read(name))
      return
    stacked = {e.zoo for e in hf.weight_map(self.config) if e.per_expert}
    for name in self.source:
      if split_experts and name in stacked:
        for i in range(self.config.num_experts):
          yield name, i, self.source.read(name, i)
      else:
        yield name, None, self.source.read(name)

  def read(self, zoo_name: str) -> np.ndarray:
    """One whole tensor under its zoo name and layout (Mixtral experts stacked), read on demand
    in any order."""
    if self.format == "zoo":
      return self.source.read(zoo_name)
    if not hasattr(self, "_by_zoo"):  # zoo name -> its entries, built once per checkpoint
      entries = (self.source.entries.values() if self.format == "meta"
                 else self.entries())
      self._by_zoo: dict[str, list] = {}
      for e in entries:
        self._by_zoo.setdefault(e.zoo, []).append(e)
    pieces = self._by_zoo[zoo_name]
    if self.format == "meta":
      return meta.to_zoo(pieces[0], self.source.read(pieces[0].meta))
    arrays = [hf.to_zoo(e, self.source.read(e.hf)) for e in pieces]
    return arrays[0] if pieces[0].expert is None else np.stack(arrays)

  def params(self) -> dict[str, np.ndarray]:
    """The whole parameter tree in memory (zoo names), for loading a model."""
    out = {}
    shapes = hf.zoo_shapes(self.config)
    dtypes = self.zoo_dtypes()
    for name, expert, array in self.stream(split_experts=False):
      if expert is None:
        out[name] = array
      else:
        if name not in out:
          out[name] = np.empty(shapes[name], dtype=dtypes[name])
        out[name][expert] = array
    return out


def e_stacked(by_zoo: dict, name: str) -> bool:
  """Whether zoo tensor `name` maps to an HF tensor that stacks the experts too."""
  e = by_zoo.get((name, None))
  return e is not None and e.stacked


def _dtype_name(dtype: np.dtype) -> str:
  return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
    np.dtype(dtype).name, "float32")


def write_zoo_meta(directory: str, config: LlamaConfig):
  write_json(os.path.join(directory, ZOO_META),
             {"format": "zoo", "format_version": ZOO_FORMAT_VERSION, "config": config.to_dict()})


def write_checkpoint(ckpt: Checkpoint, out_dir: str, to: str, dtype: str | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, shards: int | None = None):
  """Writes `ckpt` into the existing empty directory `out_dir` in format `to` (`shards`: the
  model-parallel count of a Meta output)."""
  config = ckpt.config
  cast = numpy_dtype(dtype) if dtype else None
  dtypes = ckpt.zoo_dtypes()
  side_files = ckpt.side_files
  if shards is not None and to != "meta":
    raise ZooError("--shards applies to --to meta only")
  if to == "meta":
    side_files = meta.write_meta(ckpt, out_dir, shards, cast)
  elif to == "zoo":
    plan = [(name, cast or dtypes[name], shape) for name, shape in hf.zoo_shapes(config).items()]
    writer = ShardedWriter(out_dir, plan, max_shard_bytes)
    for name, expert, array in ckpt.stream(split_experts=False):
      writer.write(name, array, expert)
    write_zoo_meta(out_dir, config)
  elif to == "hf":
    entries = hf.weight_map(config)
    hf_config = hf.config_to_hf(config, _dtype_name(cast or dtypes[entries[0].zoo]))
    plan = list({e.hf: (e.hf, cast or dtypes[e.zoo], e.hf_shape) for e in entries}.values())
    writer = ShardedWriter(out_dir, plan, max_shard_bytes)
    by_zoo = {(e.zoo, None if e.stacked else e.expert): e for e in entries}
    parts: dict[tuple[str, int], dict[int, np.ndarray]] = {}  # fused tensors being assembled
    for name, expert, array in ckpt.stream(split_experts=True):
      e = by_zoo[(name, None if e_stacked(by_zoo, name) else expert)]
      array = np.swapaxes(array, -1, -2) if e.transpose else array
      index = expert if e.stacked else None
      if e.part is None:
        writer.write(e.hf, array, index)
        continue
      got = parts.setdefault((e.hf, index), {})
      got[e.part[0]] = array
      if len(got) == e.part[1]:  # every part of this slice is here: write it whole
        writer.write(e.hf, np.concatenate([got[i] for i in range(e.part[1])], axis=-1), index)
        del parts[(e.hf, index)]
    write_json(os.path.join(out_dir, "config.json"), hf_config)
  else:
    raise ZooError(f"unknown output format {to!r}; use one of {', '.join(FORMATS)}")
  if to != "meta":
    writer.close()
  for path in side_files:
    shutil.copy2(path, os.path.join(out_dir, os.path.basename(path)))


def convert(src: str, dst: str, to: str, dtype: str | None = None, force: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, shards: int | None = None
            ) -> Checkpoint:
  """Converts the checkpoint at `src` (format detected) to format `to` at `dst` (`shards`: the
  model-parallel count of a Meta output, default 1)."""
  if to not in OUTPUT_FORMATS:
    raise ZooError(f"unknown output format {to!r}; use one of {', '.join(OUTPUT_FORMATS)}")
  if to == "gguf":
    if shards is not None:
      raise ZooError("--shards applies to --to meta only")
    gguf.file_type(dtype)  # a bad --dtype fails before the checkpoint is opened
  elif dtype is not None:
    numpy_dtype(dtype)
  ckpt = Checkpoint(src)
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ZooError("source and destination are the same path")
  if to == "gguf":
    with staged_file(dst, force) as tmp:
      ckpt.notes = gguf.write_gguf(ckpt, tmp, dtype)
    return ckpt
  with staged_output(dst, force) as tmp:
    write_checkpoint(ckpt, tmp, to, dtype, max_shard_bytes, shards)
  return ckpt


def save_params(config: LlamaConfig, params: dict[str, np.ndarray], dst: str, *,
                force: bool = False, dtype: str | None = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                side_files: dict[str, str] | None = None):
  """Writes an in-memory parameter tree (zoo names) as a zoo checkpoint, with `side_files`
  ({name in the checkpoint: a local file}, a tokenizer) beside the weights."""
  shapes = hf.zoo_shapes(config)
  if set(shapes) != set(params):
    raise ZooError(f"parameters do not match the config: {sorted(set(shapes) ^ set(params))[:3]}")
  cast = numpy_dtype(dtype) if dtype else None
  with staged_output(dst, force) as tmp:
    plan = [(n, cast or np.asarray(params[n]).dtype, shapes[n]) for n in shapes]
    writer = ShardedWriter(tmp, plan, max_shard_bytes)
    for name in shapes:
      writer.write(name, np.asarray(params[name]))
    writer.close()
    for name, source in (side_files or {}).items():
      shutil.copy2(source, os.path.join(tmp, name))
    write_zoo_meta(tmp, config)


def load_model(path: str, dtype="float32", param_dtype=None, **model_kwargs) -> Llama:
  """The model stored at `path` (format detected), computing in `dtype`, its parameters held
  in `param_dtype` (default: dtype)."""
  ckpt = Checkpoint(path)
  return from_params(ckpt.config, ckpt.params(), dtype=dtype, param_dtype=param_dtype or dtype,
                     **model_kwargs)
