"""Per-process heartbeats for the launcher's watchdog (placeholder until the launch branch lands)."""

from __future__ import annotations

import json
import os
import time

import jax


class Heartbeat:
  """With ZOO_HEARTBEAT_DIR set (by `zoo launch`), each process rewrites
  DIR/process_I.json with its step and the time after every step, for the launcher's watchdog."""

  def __init__(self, path: str | None):
    self.path = path

  @classmethod
  def from_env(cls) -> "Heartbeat":
    directory = os.environ.get("ZOO_HEARTBEAT_DIR")
    if not directory:
      return cls(None)
    os.makedirs(directory, exist_ok=True)
    return cls(os.path.join(directory, f"process_{jax.process_index()}.json"))

  def beat(self, step: int, done: bool = False):
    """`done`: the run has finished and written its outputs."""
    if self.path is None:
      return
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump({"step": int(step), "time": time.time(), "pid": os.getpid(), "done": done}, f)
    os.replace(tmp, self.path)
