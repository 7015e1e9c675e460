"""Paths that are local or on Cloud Storage (`gs://bucket/...`), through etils `epath` (which
orbax uses too; its gs:// backend is gcsfs).

Object storage has no rename and no append, so what zoo writes to a bucket is written locally
first: a directory output is uploaded with its description file (the one that makes a reader
take the directory for a checkpoint or an adapter) last, and the metrics and TensorBoard files
live in a local `Mirror` that is uploaded at each checkpoint and at the end. Checkpoint arrays
go to the bucket directly (orbax and tensorstore), with orbax's own commit marker.

Credentials are the usual Google ones: a TPU VM's service account, or application default
credentials (`gcloud auth application-default login`). With `STORAGE_EMULATOR_HOST` set (a
local GCS emulator, as the tests use), every client zoo uses is pointed at it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from etils import epath

from zoo.errors import ZooError

REMOTE = "gs://"
# The files whose presence makes a directory a checkpoint or an adapter (zoo, HF, Meta, peft):
# uploaded after everything else.
DESCRIPTIONS = ("zoo.json", "config.json", "params.json", "zoo_adapter.json",
                "adapter_config.json")


def configure_storage() -> None:
  """Points gs:// at zoo.gcs's gcsfs (fsspec's and so etils epath's gs://, for every path zoo,
  orbax and grain open, list or delete; imported only when a gs:// path is used), whose
  timeouts and retries are set there; zoo.train.checkpoint sets tensorstore's. With
  `STORAGE_EMULATOR_HOST` set (a local emulator, as the tests use), both are pointed at it."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    # gcsfs's experimental gRPC probe would wait a minute on an emulator before using HTTP
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  import fsspec
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, "zoo.gcs.GCSFileSystem", clobber=True)


def is_remote(path) -> bool:
  return str(path).startswith(REMOTE)


def resolve(path) -> str:
  """A local path made absolute (~ expanded), or a gs:// URL as it is (no trailing slash); a
  URL of another scheme, or a misspelt gs://, is a ZooError."""
  text = str(path)
  if is_remote(text):
    if len(text) == len(REMOTE) or text[len(REMOTE)] == "/":
      raise ZooError(f"{text} names no bucket (gs://BUCKET/PATH)")
    return text.rstrip("/")
  scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/", text)
  if scheme:
    raise ZooError(f"{text}: paths are local or gs://BUCKET/PATH, not {scheme.group(1)}:/")
  return os.path.abspath(os.path.expanduser(text))


def join(base: str, *parts: str) -> str:
  if is_remote(base):
    return "/".join([base.rstrip("/"), *parts])
  return os.path.join(base, *parts)


def local_side(p: str) -> str:
  """A local directory for what a job keeps beside its workdir on this machine (heartbeats,
  logs): the workdir itself, or for gs://BUCKET/PATH ~/.cache/zoo/jobs/BUCKET/PATH."""
  if not is_remote(p):
    return p
  return os.path.join(os.path.expanduser("~"), ".cache", "zoo", "jobs",
                      *p[len(REMOTE):].split("/"))


CACHE = os.path.join("~", ".cache", "zoo", "remote")
_MANIFEST = ".zoo-manifest.json"


def localize(p: str) -> str:
  """A local copy of what a gs:// path names (a checkpoint or adapter directory, a tokenizer
  file), downloaded once into ~/.cache/zoo/remote/BUCKET/PATH and again when the bucket's
  listing (names, sizes, times) changes; the converters and loaders then read it as local files.
  A local path is returned as it is."""
  if not is_remote(p):
    return p
  p = resolve(p)
  check_reachable(p)
  source = epath.Path(p)
  if not source.exists():
    raise ZooError(f"{p} does not exist")
  local = local_copy(p)
  if not source.is_dir():
    files = {source.name: source}
  else:
    files = {"/".join(f.relative_to(source).parts): f for f in _files(source)}
  # names, sizes and modification times: an object rewritten since is fetched again
  listing = {name: [(st := f.stat()).length, st.mtime] for name, f in files.items()}
  found = local if source.is_dir() else os.path.join(local, source.name)
  try:
    with open(os.path.join(local, _MANIFEST)) as f:
      if json.load(f) == listing:
        return found
  except (OSError, ValueError):
    pass
  os.makedirs(os.path.dirname(local), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".zoo-download-", dir=os.path.dirname(local))
  try:
    for name, f in files.items():
      target = os.path.join(staging, *name.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with f.open("rb") as a, open(target, "wb") as b:
        shutil.copyfileobj(a, b, 16 << 20)
    with open(os.path.join(staging, _MANIFEST), "w") as f:
      json.dump(listing, f)
    shutil.rmtree(local, ignore_errors=True)
    os.rename(staging, local)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return found


def local_copy(p: str) -> str:
  """Where `localize` and `pull_tree` keep this machine's copy of gs://BUCKET/PATH."""
  return os.path.join(os.path.expanduser(CACHE), *p[len(REMOTE):].split("/"))


def pull_tree(remote: str, local: str) -> None:
  """Downloads the files under the gs:// prefix `remote` (which may hold nothing yet) that
  `local` lacks or holds at another size; each through a temporary name."""
  source = epath.Path(remote)
  if not source.exists():
    return
  for f in _files(source):
    target = os.path.join(local, *f.relative_to(source).parts)
    if os.path.isfile(target) and os.path.getsize(target) == f.stat().length:
      continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.partial-{os.getpid()}"
    with f.open("rb") as a, open(partial, "wb") as b:
      shutil.copyfileobj(a, b, 16 << 20)
    os.replace(partial, target)


def push_tree(local: str, remote: str) -> None:
  """Uploads the files under `local` that the gs:// prefix `remote` lacks or holds at another
  size; a TFDS dataset's dataset_info.json (what marks it prepared) after its data."""
  target = epath.Path(remote)
  there = ({"/".join(f.relative_to(target).parts): f.stat().length for f in _files(target)}
           if target.exists() else {})
  files = []
  for root, _, names in os.walk(local):
    files += [os.path.join(root, n) for n in names if not n.startswith(".")]
  files.sort(key=lambda f: (os.path.basename(f) in ("dataset_info.json", *DESCRIPTIONS), f))
  for f in files:
    name = os.path.relpath(f, local).replace(os.sep, "/")
    if there.get(name) != os.path.getsize(f):
      with open(f, "rb") as a, epath.Path(join(remote, name)).open("wb") as b:
        shutil.copyfileobj(a, b, 16 << 20)


def bucket_of(p: str) -> str:
  """gs://BUCKET of a gs:// path."""
  return REMOTE + p[len(REMOTE):].split("/")[0]


def reason(e: BaseException) -> str:
  """An exception as a few words on one line: its type, and its message if it has one."""
  message = " ".join(str(e).split())[:300]
  name = type(e).__name__
  if not message and isinstance(e, TimeoutError):  # fsspec's and asyncio's say nothing
    message = "no answer in time"
  return f"{name}: {message}" if message and message != name else name


def path(p) -> epath.Path:
  return epath.Path(p)


def check_reachable(p: str) -> None:
  """For a gs:// path, a one-line ZooError unless its bucket can be reached (credentials,
  network, the bucket's name); local paths pass."""
  if not is_remote(p):
    return
  bucket = bucket_of(p)
  try:
    found = epath.Path(bucket).exists()
  except Exception as e:  # noqa: BLE001 (auth, network and HTTP errors have many types)
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise ZooError(f"cannot reach {bucket}: {reason}") from None
  if not found:
    raise ZooError(f"bucket {bucket} does not exist (or these credentials cannot see it)")


def makedirs(p: str) -> None:
  """A local directory and its parents (a bucket needs none)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def exists(p: str) -> bool:
  return epath.Path(p).exists() if is_remote(p) else os.path.lexists(p)


def remove_tree(p: str) -> None:
  if is_remote(p):
    if epath.Path(p).exists():
      epath.Path(p).rmtree()
  else:
    shutil.rmtree(p, ignore_errors=True)


def upload_tree(local: str, remote: str) -> None:
  """Copies the local directory `local` to `remote` (a gs:// prefix), the description files
  (DESCRIPTIONS) after every other file, so a reader never takes a partial upload for a
  checkpoint."""
  files = []
  for root, _, names in os.walk(local):
    files += [os.path.join(root, n) for n in names]
  files.sort(key=lambda f: (os.path.basename(f) in DESCRIPTIONS, f))
  for f in files:
    target = epath.Path(join(remote, *os.path.relpath(f, local).split(os.sep)))
    with open(f, "rb") as src, target.open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)


def move_tree(src: str, dst: str) -> None:
  """Moves a directory (on a bucket: copies it, then deletes the original)."""
  if not is_remote(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    return
  source = epath.Path(src)
  for f in _files(source):
    target = epath.Path(join(dst, *f.relative_to(source).parts))
    with f.open("rb") as a, target.open("wb") as b:
      shutil.copyfileobj(a, b, 16 << 20)
  source.rmtree()


def _files(directory: epath.Path):
  """Every file under `directory`, listed level by level (epath's gs:// glob has no `**`)."""
  for child in directory.iterdir():
    if child.is_dir():
      yield from _files(child)
    else:
      yield child


class Mirror:
  """A local directory standing in for a remote one (for files that are appended to or
  rewritten: metrics, TensorBoard events, plots): `pull` fetches a file that is already
  there, `sync` uploads what changed. For a local directory it is that directory itself."""

  def __init__(self, directory: str):
    self.remote = directory if is_remote(directory) else None
    self.local = tempfile.mkdtemp(prefix="zoo-mirror-") if self.remote else directory
    self._sent: dict[str, tuple[int, int]] = {}

  def pull(self, name: str) -> None:
    if self.remote is None:
      return
    source = epath.Path(join(self.remote, name))
    if source.exists():
      target = os.path.join(self.local, name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with source.open("rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
      self._sent[name] = self._stamp(target)

  def sync(self) -> None:
    if self.remote is None:
      return
    try:
      self._upload()
    except Exception as e:  # noqa: BLE001 (gcsfs: its timeouts and retries spent, zoo.gcs)
      raise ZooError(f"uploading to {self.remote} failed ({reason(e)})") from None

  def _upload(self) -> None:
    for root, _, names in os.walk(self.local):
      for n in names:
        f = os.path.join(root, n)
        name = os.path.relpath(f, self.local).replace(os.sep, "/")
        stamp = self._stamp(f)
        if self._sent.get(name) != stamp:
          with open(f, "rb") as src, epath.Path(join(self.remote, name)).open("wb") as dst:
            shutil.copyfileobj(src, dst)
          self._sent[name] = stamp

  def close(self) -> None:
    self.sync()
    if self.remote is not None:
      shutil.rmtree(self.local, ignore_errors=True)

  @staticmethod
  def _stamp(f: str) -> tuple[int, int]:
    st = os.stat(f)
    return st.st_size, st.st_mtime_ns
