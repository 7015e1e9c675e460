"""Child processes for the benchmarks: one per measurement, each timed and its peak RSS read.

A worker is a plain function in one of the bench modules, run in a fresh interpreter as
`python -m bench.worker HOW MODULE:FUNCTION SPEC_JSON` (see worker.py), with this package's
directory on PYTHONPATH. Two kinds:

- `call`: `fn(spec) -> JSON value`, run once; `call()` returns the value and the process's
  wall time and peak RSS.
- `serve`: `fn(spec) -> (run, info)`, where `run(n)` does n units of work and returns a number
  (a loss, a token) that proves it finished. The worker warms up, then times `run(n)` for each
  `n` the parent writes on its stdin; `Worker` is the parent's handle on it and `interleave`
  takes turns between several of them.

Workers answer with JSON lines on stdout marked by TAG, so that whatever else a library prints
there is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

MB = 2**20
TAG = "@bench "
# A round in which other processes used more than this share of the CPUs is timed again.
QUIET = 0.15
TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Run:
  seconds: float
  peak_rss_mb: float
  output: str


def measure(cmd: list[str], what: str, env: dict | None = None) -> Run:
  """Runs `cmd` in a fresh process: its wall time and its own peak RSS."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
  output = proc.stdout.read()
  proc.stdout.close()
  # wait4, not getrusage(RUSAGE_CHILDREN): the latter is a maximum over all children so far.
  _, status, usage = os.wait4(proc.pid, 0)
  seconds = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    sys.exit(f"bench: {what} failed (exit status {proc.returncode}):\n{output[-4000:]}")
  return Run(seconds, usage.ru_maxrss / 1024, output)  # ru_maxrss is in KiB on Linux


def worker_env(env: dict | None = None) -> dict:
  """`env` (default: this process's environment) with the bench package importable."""
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (TOOLS, env.get("PYTHONPATH")) if p)
  return env


def worker_cmd(how: str, fn: Callable, spec: dict) -> list[str]:
  return [sys.executable, "-m", "bench.worker", how, f"{fn.__module__}:{fn.__qualname__}",
          json.dumps(spec)]


def reply(value):
  """The worker side: one answer to the parent."""
  print(TAG + json.dumps(value), flush=True)


def answers(output: str) -> list:
  return [json.loads(line[len(TAG):]) for line in output.splitlines() if line.startswith(TAG)]


def call(fn: Callable, spec: dict, what: str, env: dict | None = None) -> tuple[object, Run]:
  """Runs `fn(spec)` in a fresh process: its answer, and the process's time and peak RSS."""
  run = measure(worker_cmd("call", fn, spec), what, worker_env(env))
  found = answers(run.output)
  if not found:
    sys.exit(f"bench: {what} gave no answer:\n{run.output[-4000:]}")
  return found[-1], run


def probe(fn: Callable, spec: dict, env: dict | None = None):
  """`fn(spec)` in a fresh process, or None where it fails (a missing optional library)."""
  proc = subprocess.run(worker_cmd("call", fn, spec), capture_output=True, text=True,
                        env=worker_env(env))
  found = answers(proc.stdout) if proc.returncode == 0 else []
  return found[-1] if found else None


def serve(stepper: Callable, spec: dict):
  """The worker side of `Worker`: builds the stepper, warms it up, then times `n` units of work
  per line of stdin. Between requests the worker blocks on stdin, so only one worker runs at a
  time and none sees another's threads."""
  run, info = stepper(spec)
  info["first_loss"] = run(1)
  if spec["warmup"]:
    run(spec["warmup"])
  reply({"ready": True, **info})
  for line in sys.stdin:
    n = int(line)
    start, cpu = time.perf_counter(), time.process_time()
    loss = run(n)
    reply({"seconds": time.perf_counter() - start, "loss": loss,
           "cpu_seconds": time.process_time() - cpu})


class Worker:
  """A `serve` worker in a child process, asked for timings one request at a time."""

  def __init__(self, stepper: Callable, spec: dict, env: dict | None, log: str):
    self.kind = stepper.__name__
    self.log = log
    # stderr goes to a file: a pipe nobody reads would stall a chatty worker once it fills.
    with open(log, "w") as err:
      self.proc = subprocess.Popen(worker_cmd("serve", stepper, spec), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=err, text=True,
                                   env=worker_env(env))
    self.info = self._answer()

  def _answer(self) -> dict:
    while True:  # skipping whatever else a library prints on stdout
      line = self.proc.stdout.readline()
      if not line:
        self.proc.wait()
        with open(self.log) as f:
          err = f.read()
        sys.exit(f"bench: the {self.kind} worker failed (exit status {self.proc.returncode}):"
                 f"\n{err[-4000:]}")
      if line.startswith(TAG):
        return json.loads(line[len(TAG):])

  def time(self, steps: int) -> dict:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return self._answer()

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()
    self.proc.stdout.close()


def median(xs):
  xs = sorted(xs)
  n = len(xs)
  return (xs[n // 2] + xs[(n - 1) // 2]) / 2


def cpu_model() -> str:
  """The CPU's model name and core count, as Linux says (for the benchmarks' result lines: the
  absolute figures, and so the ratios, depend on the machine)."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
  except OSError:
    names = []
  return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count() or 1} cores"


def cpu_busy_seconds() -> float | None:
  """CPU-seconds the whole machine has spent busy since boot (Linux /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def interleave_and_close(workers: dict[str, Worker], *args, **kwargs) -> tuple[dict, list, int]:
  """`interleave(workers, *args, **kwargs)`, and then every worker closed, also on failure."""
  try:
    return interleave(workers, *args, **kwargs)
  finally:
    for w in workers.values():
      w.close()


def interleave(workers: dict[str, Worker], steps: int, rounds: int, tokens: int,
               quiet: float = QUIET, max_rounds: int | None = None) -> tuple[dict, list, int]:
  """tokens/s of each worker, timed in rounds: each round times every worker once in turn (the
  order rotating), so that a load change on a shared machine hits all of them alike.

  On a shared machine other processes come and go, and torch's OpenMP threads in particular slow
  down many times over when they do; a round during which other processes used more than
  `quiet` of the CPUs is repeated, up to `max_rounds` (default 3 * rounds) in all, until
  `rounds` quiet rounds are in. Returns ({name: [tokens/s per round]}, [background CPU share
  per round], how many rounds were thrown away); where no quiet round could be had, all rounds
  are kept.
  """
  names = list(workers)
  every, shares = {name: [] for name in names}, []
  max_rounds = max_rounds or 3 * rounds
  ncpu = os.cpu_count() or 1
  r = 0
  while r < max_rounds and len(shares) - sum(s > quiet for s in shares) < rounds:
    share = 0.0
    for name in names[r % len(names):] + names[:r % len(names)]:
      busy = cpu_busy_seconds()
      answer = workers[name].time(steps)
      every[name].append(steps * tokens / answer["seconds"])
      if busy is not None:
        others = cpu_busy_seconds() - busy - answer["cpu_seconds"]
        share = max(share, others / (answer["seconds"] * ncpu))
    shares.append(max(0.0, share))
    r += 1
  keep = [i for i, s in enumerate(shares) if s <= quiet] or list(range(len(shares)))
  kept = {name: [every[name][i] for i in keep] for name in names}
  return kept, [shares[i] for i in keep], len(shares) - len(keep)
