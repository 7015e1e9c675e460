"""Heartbeats: how `zoo launch`'s watchdog tells a working process from a stalled one.

With ZOO_HEARTBEAT_DIR set (the launcher sets it), every training process rewrites
DIR/process_I.json after each step with {"process": I, "step", "time", "pid", "done"}. The
launcher reads them from the directory (local processes) or from what `cat DIR/process_*.json`
prints over ssh (the workers of a TPU VM), and judges each process by one rule, `stalled_for`.

This module is read by the launcher, which never starts JAX: jax is imported only where a
training process writes its first beat.
"""

from __future__ import annotations

import json
import os
import time

ENV = "ZOO_HEARTBEAT_DIR"


def beat_path(directory: str, process: int) -> str:
  return os.path.join(directory, f"process_{process}.json")


class Heartbeat:
  """A training process's beats; a no-op without ZOO_HEARTBEAT_DIR."""

  def __init__(self, path: str | None, process: int = 0):
    self.path, self.process = path, process

  @classmethod
  def from_env(cls) -> Heartbeat:
    directory = os.environ.get(ENV)
    if not directory:
      return cls(None)
    import jax  # here and not at the top: the launcher imports this module
    os.makedirs(directory, exist_ok=True)
    return cls(beat_path(directory, jax.process_index()), jax.process_index())

  def beat(self, step: int, done: bool = False):
    """`done`: the run has finished and written its outputs."""
    if self.path is None:
      return
    # a reader sees the previous beat or this one, never half of one
    tmp = f"{self.path}.tmp"  # not process_*.json, so no reader's glob matches it
    with open(tmp, "w") as f:
      json.dump({"process": self.process, "step": int(step), "time": time.time(),
                 "pid": os.getpid(), "done": done}, f)
    os.replace(tmp, self.path)


def read_dir(directory: str, processes: int) -> list[dict | None]:
  """Each process's latest beat in `directory` (None where it has none yet)."""
  out = []
  for i in range(processes):
    try:
      with open(beat_path(directory, i)) as f:
        out.append(json.load(f))
    except (OSError, ValueError):
      out.append(None)
  return out


def parse(text: str, processes: int) -> list[dict | None]:
  """Each process's beat in `text`, what `cat DIR/process_*.json` printed on one or more
  workers: the JSON objects run together, in any order, among other output of the command.
  A beat goes to the place its "process" names (None where a process has none yet); one
  without a "process" (from a writer older than that field) takes the first free place."""
  decoder, found, at = json.JSONDecoder(), [], text.find("{")
  while at >= 0:
    try:
      beat, end = decoder.raw_decode(text, at)
    except ValueError:  # a brace in other output
      beat, end = None, at + 1
    if isinstance(beat, dict) and "time" in beat:
      found.append(beat)
    at = text.find("{", end)
  out: list[dict | None] = [None] * processes
  for beat in found:
    i = beat.get("process")
    if i is None:
      i = out.index(None) if None in out else processes
    if 0 <= i < processes:
      out[i] = beat
  return out


def stalled_for(beat: dict | None, *, started: float, now: float, heartbeat_timeout: float,
                startup_timeout: float) -> float | None:
  """How long a process has gone without a step, when that is longer than it may (else None).
  Before its first beat it compiles and reads data: it gets `startup_timeout` from `started`
  (when the job was started); after that, `heartbeat_timeout` from its latest beat."""
  last, limit = (beat["time"], heartbeat_timeout) if beat else (started, startup_timeout)
  return now - last if now - last > limit else None
