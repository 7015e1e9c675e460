"""Files written whole or not at all, JSON files, and PyTorch weight files loaded safely.

An output is first written under a temporary name beside its destination and renamed into
place when complete, so a reader (or a second process writing the same file) never sees half of
it and an interrupted write leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from zoo import paths
from zoo.errors import ZooError


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def staged_file(dst: str, force: bool):
  """A temporary file name beside `dst`, renamed to `dst` only if the block succeeds (for a
  gs:// `dst`, a local temporary file uploaded as one object)."""
  if paths.is_remote(dst):
    with _staged_remote(dst, force, directory=False) as tmp:
      yield tmp
    return
  dst = os.path.abspath(dst)
  if os.path.lexists(dst) and not force:
    raise ZooError(f"{dst} already exists (pass --force to replace it)")
  if os.path.isdir(dst):
    raise ZooError(f"{dst} is a directory; the output is one file")
  parent = os.path.dirname(dst)
  if not os.path.isdir(parent):
    raise ZooError(f"cannot write {dst}: directory {parent} does not exist")
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
  os.close(fd)
  os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets, not model files
  try:
    yield tmp
  except BaseException:
    os.unlink(tmp)
    raise
  os.replace(tmp, dst)


@contextlib.contextmanager
def _staged_remote(dst: str, force: bool, directory: bool):
  dst = paths.resolve(dst)
  if paths.exists(dst) and not force:
    raise ZooError(f"{dst} already exists (pass --force to replace it)")
  paths.check_reachable(dst)
  local = tempfile.mkdtemp(prefix="zoo-upload-")
  try:
    tmp = local if directory else os.path.join(local, dst.rsplit("/", 1)[-1])
    yield tmp
    paths.remove_tree(dst)  # object storage has no rename: the old output goes first
    if directory:
      paths.upload_tree(local, dst)
    else:
      with open(tmp, "rb") as src, paths.path(dst).open("wb") as out:
        shutil.copyfileobj(src, out, 16 << 20)
  finally:
    shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def staged_output(dst: str, force: bool):
  """A temporary directory beside `dst`, renamed to `dst` only if the block succeeds (for a
  gs:// `dst`, a local temporary directory uploaded with its description file last, see
  `zoo.paths.upload_tree`)."""
  if paths.is_remote(dst):
    with _staged_remote(dst, force, directory=True) as tmp:
      yield tmp
    return
  dst = os.path.abspath(dst)
  if os.path.lexists(dst) and not force:
    raise ZooError(f"{dst} already exists (pass --force to replace it)")
  parent = os.path.dirname(dst)
  if not os.path.isdir(parent):
    raise ZooError(f"cannot write {dst}: directory {parent} does not exist")
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
  os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the output from other users
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.lexists(dst):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
    os.rename(dst, os.path.join(old, "replaced"))
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, dst)


def write_directory(directory: str, files: dict[str, bytes | dict], force: bool):
  """Writes `files` ({name: bytes, or a dict written as JSON}) as the directory `directory`,
  through `staged_output`."""
  with staged_output(directory, force) as tmp:
    for name, content in files.items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(content if isinstance(content, bytes) else
                (json.dumps(content, indent=2) + "\n").encode())


def read_json(path: str) -> dict:
  """A JSON object from `path`; a ZooError naming the file if it is missing, bad or not an
  object."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ZooError(f"cannot read {path}: {e}") from None
  if not isinstance(data, dict):
    raise ZooError(f"{path} does not hold a JSON object")
  return data


def write_json(path: str, data):
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")


def load_torch(path: str) -> dict:
  """The dict of tensors in a PyTorch weights file, unpickled with `weights_only=True` (no code
  from the file runs) and memory-mapped."""
  try:
    import torch  # optional: only .bin/.pth inputs need it
  except ImportError:
    raise ZooError(f"reading {os.path.basename(path)} needs PyTorch: pip install 'zoo[torch]'"
                   ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # torch raises many types for damaged or unsafe files
    raise ZooError(f"{path} is not a loadable PyTorch weights file ({str(e).splitlines()[0]})"
                   ) from None
  if not isinstance(state, dict):
    raise ZooError(f"{path} does not hold a dict of tensors")
  return state


__all__ = ["staged_file", "staged_output", "write_directory", "read_json", "write_json",
           "load_torch"]
