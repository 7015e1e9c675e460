"""Timeouts and retries for Cloud Storage, set rather than left to the clients' defaults.

A run reaches a bucket through two clients: gcsfs (fsspec's and so etils epath's gs://, for
every file zoo, orbax and grain open, list or delete) and tensorstore (orbax's array store,
for checkpoint arrays; orbax has no other). Left as they come, gcsfs puts no timeout on a
request at all, so one stalled connection held an orbax save, and the run, for ever; and
tensorstore retries a failing request 32 times over a quarter of an hour. Here both give up on a
request that makes no progress for TIMEOUT_SECONDS, and try a request ATTEMPTS times in all,
backing off 1, 2, 4, 8 s between tries: a bucket that stops answering fails the save within
about ATTEMPTS x TIMEOUT_SECONDS, which zoo.train.checkpoint turns into a one-line error.
`ZOO_GCS_TIMEOUT_SECONDS` and `ZOO_GCS_ATTEMPTS` override the two.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import gcsfs
import requests
from gcsfs.retry import HttpError, is_retriable

TIMEOUT_SECONDS = float(os.environ.get("ZOO_GCS_TIMEOUT_SECONDS", 60))
ATTEMPTS = max(int(os.environ.get("ZOO_GCS_ATTEMPTS", 4)), 1)
MAX_BACKOFF_SECONDS = 8


def set_tensorstore_timeouts() -> None:
  """tensorstore's libcurl transport: no connection within the timeout, or under one byte a
  second for that long, fails the request (read when tensorstore starts its transport)."""
  stall = str(max(int(TIMEOUT_SECONDS), 1))
  os.environ.setdefault("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", stall)
  os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", stall)
  os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")


def set_tensorstore_retries() -> None:
  """Every tensorstore context orbax makes starts from these dicts of its own: the retry policy
  goes into them."""
  from orbax.checkpoint._src.serialization import tensorstore_utils
  retries = {"gcs_request_retries": {"max_retries": ATTEMPTS - 1, "initial_delay": "1s",
                                     "max_delay": f"{MAX_BACKOFF_SECONDS}s"}}
  tensorstore_utils._BASE_TS_CONTEXT.update(retries)  # noqa: SLF001
  tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT.update(retries)  # noqa: SLF001


class GCSFileSystem(gcsfs.GCSFileSystem):
  """gcsfs with a timeout on every request and zoo's retries (gcsfs's own wrapper has its
  count fixed at six tries and backs off up to 32 s)."""

  retries = ATTEMPTS

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("requests_timeout", aiohttp.ClientTimeout(
        total=None, connect=TIMEOUT_SECONDS, sock_connect=TIMEOUT_SECONDS,
        sock_read=TIMEOUT_SECONDS))
    super().__init__(*args, **kwargs)

  async def _request(self, *args, **kwargs):
    request = gcsfs.GCSFileSystem._request.__wrapped__  # one try
    for attempt in range(ATTEMPTS):
      try:
        return await request(self, *args, **kwargs)
      except (FileNotFoundError, FileExistsError, ValueError):
        raise  # answers (404, 412) and refusals (400), not failures
      except Exception as e:  # noqa: BLE001 (aiohttp, auth and HTTP errors)
        if attempt == ATTEMPTS - 1 or not retriable(e):
          raise
        await asyncio.sleep(min(2 ** attempt, MAX_BACKOFF_SECONDS))


def retriable(e: Exception) -> bool:
  """A failure worth another try: no answer in time, a refused or dropped connection, a server
  error (5xx, 429, 408); not a refusal (403, 400) or an answer (404)."""
  if isinstance(e, HttpError):
    return is_retriable(e)
  return isinstance(e, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError,
                        requests.exceptions.RequestException))
