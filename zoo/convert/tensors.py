"""Tensor files in and out, one tensor at a time.

Reading: safetensors (header parsed here, each tensor read with one `np.fromfile`, so nothing but
the tensor asked for is in memory) and PyTorch `.bin` files (`torch.load(weights_only=True)`,
one file at a time, by `zoo.io.load_torch`). The `safetensors` library has no incremental
writer, so `ShardedWriter` lays out the files from a plan (names, dtypes, shapes known up front),
then fills each tensor, or one slice of a stacked tensor, in place. Its output is read back by `safetensors` and
transformers in the tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from zoo.errors import ZooError
from zoo.io import load_torch

ST_DTYPES = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


def numpy_dtype(name: str) -> np.dtype:
  if name not in NUMPY_DTYPES:
    raise ZooError(f"unknown dtype {name!r}; use one of {', '.join(NUMPY_DTYPES)}")
  return NUMPY_DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset in the file; -1 for .bin files

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > size - 8 or n > 100_000_000:
        raise ValueError("header length past the end of the file")
      header = json.loads(f.read(n))
  except (OSError, ValueError, struct.error) as e:
    raise ZooError(f"{path} is not a readable safetensors file ({e})") from None
  start = 8 + n
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = ST_DTYPES[meta["dtype"]]
      begin, end = meta["data_offsets"]
      shape = tuple(int(d) for d in meta["shape"])
    except (KeyError, TypeError, ValueError):
      raise ZooError(f"{path}: tensor {name} has an unsupported or malformed entry "
                     f"{meta}") from None
    info = TensorInfo(path, dtype, shape, start + begin)
    if end - begin != info.nbytes or start + end > size:
      raise ZooError(f"{path} is truncated or damaged: tensor {name} does not fit in the file")
    out[name] = info
  return out


def load_safetensors(path: str, what: str = "weights") -> dict[str, np.ndarray]:
  """Every tensor of a (small) safetensors file, in memory; ZooErrors name the file as `what`."""
  if not os.path.isfile(path):
    raise ZooError(f"{what} not found: {path}")
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ZooError(f"bad {what} {path}: {str(e).splitlines()[0]}") from None


def torch_to_numpy(t) -> np.ndarray:
  """A PyTorch tensor as a numpy array of the same dtype (bfloat16 as ml_dtypes')."""
  import torch  # optional: only .bin/.pth inputs need it
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


class TensorSource:
  """Tensors from a list of files, read lazily; iteration goes file by file."""

  def __init__(self, files: list[str]):
    self.files = files
    self.infos: dict[str, TensorInfo] = {}
    self._bin_path, self._bin_state = None, None
    for path in files:
      if path.endswith(".safetensors"):
        infos = read_safetensors_header(path)
      else:
        infos = {name: TensorInfo(path, torch_to_numpy(t.reshape(-1)[:0]).dtype,
                                  tuple(t.shape), -1)
                 for name, t in load_torch(path).items()}
      for name, info in infos.items():
        if name in self.infos:
          raise ZooError(f"tensor {name} appears in both {self.infos[name].file} and {path}")
        self.infos[name] = info

  def __iter__(self) -> Iterator[str]:
    order = {f: i for i, f in enumerate(self.files)}
    return iter(sorted(self.infos, key=lambda n: (order[self.infos[n].file],
                                                  self.infos[n].offset)))

  def read(self, name: str, index: int | None = None) -> np.ndarray:
    """The tensor `name`, or only `tensor[index]` along its first axis."""
    info = self.infos[name]
    if info.offset < 0:
      if self._bin_path != info.file:
        self._bin_path, self._bin_state = None, None  # drop the previous file first
        self._bin_state, self._bin_path = load_torch(info.file), info.file
      t = self._bin_state[name]
      return torch_to_numpy(t if index is None else t[index])
    shape, offset = info.shape, info.offset
    if index is not None:
      shape = shape[1:]
      offset += index * info.nbytes // shape_len(info.shape)
    count = int(np.prod(shape, dtype=np.int64))
    with open(info.file, "rb") as f:
      array = np.fromfile(f, dtype=info.dtype, count=count, offset=offset)
    if array.size != count:
      raise ZooError(f"{info.file} is truncated: tensor {name} is incomplete")
    return array.reshape(shape)


def shape_len(shape) -> int:
  return shape[0] if shape else 1


class ShardedWriter:
  """Writes safetensors shards from a plan of (name, dtype, shape), one tensor at a time.

  Files are `{prefix}.safetensors`, or `{prefix}-0000k-of-0000n.safetensors` plus
  `{prefix}.safetensors.index.json` when the tensors need more than one shard.
  """

  def __init__(self, directory: str, plan: list[tuple[str, np.dtype, tuple[int, ...]]],
               max_shard_bytes: int, prefix: str = "model", metadata: dict | None = None):
    self.directory = directory
    groups, size = [[]], 0
    for name, dtype, shape in plan:
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      if groups[-1] and size + nbytes > max_shard_bytes:
        groups.append([])
        size = 0
      groups[-1].append((name, np.dtype(dtype), tuple(shape), nbytes))
      size += nbytes
    n = len(groups)
    self.files = ([f"{prefix}.safetensors"] if n == 1 else
                  [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    self.slots = {}  # name -> [file, offset, dtype, shape, slices still to write]
    self.weight_map = {}
    self.total_size = 0
    meta = {"format": "pt", **(metadata or {})}
    for file, group in zip(self.files, groups):
      header, pos = {"__metadata__": meta}, 0
      for name, dtype, shape, nbytes in group:
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
      raw = json.dumps(header, separators=(",", ":")).encode()
      raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
      path = os.path.join(directory, file)
      with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + pos)
      for name, dtype, shape, nbytes in group:
        begin = header[name]["data_offsets"][0] + 8 + len(raw)
        self.slots[name] = [path, begin, dtype, shape, set(range(shape_len(shape)))]
        self.weight_map[name] = file
        self.total_size += nbytes

  def write(self, name: str, array: np.ndarray, index: int | None = None):
    """Writes tensor `name`, or its slice `[index]` along the first axis."""
    path, begin, dtype, shape, todo = self.slots[name]
    want = shape if index is None else shape[1:]
    if tuple(array.shape) != tuple(want):
      raise ZooError(f"tensor {name} has shape {tuple(array.shape)}, expected {tuple(want)}")
    data = np.ascontiguousarray(array, dtype=dtype)
    if index is None:
      todo.clear()
    else:
      begin += index * data.nbytes
      todo.discard(index)
    with open(path, "r+b") as f:
      f.seek(begin)
      if data.nbytes:
        data.tofile(f)

  def close(self):
    """Checks that every tensor was written in full and writes the index."""
    for name, slot in self.slots.items():
      if slot[4]:
        raise ZooError(f"tensor {name} is missing from the input")
    if len(self.files) > 1:
      prefix = self.files[0].split("-00001-of-")[0]
      index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
      with open(os.path.join(self.directory, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def weight_files(directory: str, stem: str) -> list[str]:
  """The weight files of an HF-style directory: `{stem}.safetensors` (or its index), else
  PyTorch `.bin` files. Raises if there are none or the index names a missing shard."""
  for suffix, bin_stem in ((".safetensors", stem), (".bin", "pytorch_model")):
    index = os.path.join(directory, f"{bin_stem}{suffix}.index.json")
    single = os.path.join(directory, f"{bin_stem}{suffix}")
    if os.path.exists(index):
      try:
        with open(index) as f:
          names = sorted(set(json.load(f)["weight_map"].values()))
      except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ZooError(f"{index} is not a valid weight index ({e})") from None
      files = [os.path.join(directory, n) for n in names]
      for path in files:
        if not os.path.exists(path):
          raise ZooError(f"{index} names {os.path.basename(path)}, which is missing")
      return files
    if os.path.exists(single):
      return [single]
  raise ZooError(f"no weights found in {directory} (expected {stem}.safetensors, an index, "
                 "or pytorch_model.bin)")
