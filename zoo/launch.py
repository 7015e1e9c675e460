"""`zoo launch`: one `zoo train` job on every worker of a Cloud TPU VM, or on N local processes,
kept alive by a watchdog.

    zoo launch create --name NAME --zone ZONE --tpu-type v5litepod-16 [--spot | --queued]
    zoo launch setup  --name NAME --zone ZONE
    zoo launch run    --name NAME --zone ZONE [--restart N] CONFIG [--workdir gs://...] [...]
    zoo launch run    --backend local --processes 2 [--restart N] CONFIG --workdir DIR [...]
    zoo launch logs | status | stop | delete | ssh  --name NAME --zone ZONE
    (every command takes --dry-run: print the commands instead of running them)

The TPU backend is a thin layer over `gcloud compute tpus` (create, describe, delete) and
`gcloud compute tpus tpu-vm ssh/scp --worker=...`: `run` copies the repository and the config to
every worker and starts the same `zoo train` on each (JAX finds the other workers itself). The
local backend starts N processes on this machine through the same job description, with the
coordinator, process count and index in ZOO_* variables (zoo.distributed).

The watchdog: every process writes a heartbeat after each step (ZOO_HEARTBEAT_DIR, see
zoo.train.heartbeat). A worker that exits with an error, or whose heartbeat is older than
--heartbeat-timeout, gets the whole job stopped (SIGTERM, then SIGKILL after --grace seconds:
the survivors are usually blocked in a collective with the dead one); with --restart N the job
is started again, N times at most, and resumes from its latest checkpoint. A preempted spot TPU
is deleted, created again, set up, and the job restarted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Protocol

from zoo import paths
from zoo.errors import ZooError
from zoo.train import heartbeat

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cloud TPU accelerator types: generation and chip (or core) count.
_TPU_TYPE = re.compile(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)")
REMOTE_DIR = "~/zoo"


def check_tpu_type(tpu_type: str) -> str:
  m = _TPU_TYPE.fullmatch(tpu_type or "")
  if not m or int(m.group(2)) < 1:
    raise ZooError(f"unknown TPU type {tpu_type!r} (e.g. v4-8, v5litepod-16, v5p-32, v6e-8)")
  return tpu_type


def train_command(config: str, train_args: Sequence[str]) -> list[str]:
  return ["zoo", "train", "--config", config, *train_args]


def check_config(config: str):
  path = config.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ZooError(f"config file {path} does not exist")


# ---------------------------------------------------------------------------------------------
# Running commands (or printing them).

class Shell:
  """Runs commands, or with dry_run prints them (one line each, shell-quoted)."""

  def __init__(self, dry_run: bool = False):
    self.dry_run = dry_run

  def run(self, cmd: list[str], *, check: bool = True, capture: bool = False
          ) -> subprocess.CompletedProcess | None:
    if self.dry_run:
      print(shlex.join(cmd))
      return None
    if shutil.which(cmd[0]) is None:
      raise ZooError(f"{cmd[0]} is not installed (or not on PATH); zoo launch needs it for the "
                     "TPU backend: https://cloud.google.com/sdk/docs/install")
    result = subprocess.run(cmd, capture_output=capture, text=True)
    if check and result.returncode != 0:
      detail = (result.stderr or "").strip().splitlines()[-1:] if capture else []
      raise ZooError(f"`{shlex.join(cmd[:6])} ...` failed with exit status {result.returncode}"
                     + (f": {detail[0]}" if detail else ""))
    return result


# ---------------------------------------------------------------------------------------------
# Cloud TPU VMs through gcloud.

class TPU:
  def __init__(self, name: str, zone: str, project: str | None, shell: Shell):
    if not name or not zone:
      raise ZooError("the TPU backend needs --name and --zone")
    self.name, self.zone, self.project, self.shell = name, zone, project, shell

  def _gcloud(self, *args: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *args, f"--zone={self.zone}"]
    return cmd + ([f"--project={self.project}"] if self.project else [])

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return self._gcloud("tpu-vm", "ssh", self.name, f"--worker={worker}",
                        f"--command={command}")

  def create(self, tpu_type: str, version: str, spot: bool = False, preemptible: bool = False,
             queued: bool = False):
    check_tpu_type(tpu_type)
    if queued:
      cmd = self._gcloud("queued-resources", "create", self.name, f"--node-id={self.name}",
                         f"--accelerator-type={tpu_type}", f"--runtime-version={version}")
    else:
      cmd = self._gcloud("tpu-vm", "create", self.name, f"--accelerator-type={tpu_type}",
                         f"--version={version}")
    if spot:
      cmd.append("--spot")
    elif preemptible:
      cmd.append("--preemptible" if not queued else "--best-effort")
    self.shell.run(cmd)

  def setup(self):
    """Copies this repository to every worker and installs it with its dependencies (JAX for
    TPU included)."""
    self.sync()
    self.shell.run(self.ssh(f"cd {REMOTE_DIR} && pip install -q -e . 'jax[tpu]'"))

  def sync(self, extra: Sequence[str] = ()):
    self.shell.run(self._gcloud("tpu-vm", "ssh", self.name, "--worker=all",
                                f"--command=mkdir -p {REMOTE_DIR}"))
    for path in [REPO_ROOT + "/zoo", REPO_ROOT + "/configs", REPO_ROOT + "/pyproject.toml",
                 REPO_ROOT + "/README.md", *extra]:
      self.shell.run(self._gcloud("tpu-vm", "scp", "--recurse", path,
                                  f"{self.name}:{REMOTE_DIR}/", "--worker=all"))

  def start(self, config: str, train_args: Sequence[str], heartbeat_dir: str):
    """Starts the job on every worker in the background; each worker keeps its process id in
    ~/zoo-train.pid (for `stop` and the watchdog) and its output in ~/zoo-train.log."""
    command = shlex.join(train_command(config, train_args))
    self.shell.run(self.ssh(
        f"cd {REMOTE_DIR} && rm -rf {heartbeat_dir} && (ZOO_HEARTBEAT_DIR={heartbeat_dir} "
        f"nohup {command} > ~/zoo-train.log 2>&1 & echo $! > ~/zoo-train.pid)"))

  def stop(self, grace: float = 10.0):
    """SIGTERM to the job on every worker, SIGKILL after `grace` seconds."""
    pid = "$(cat ~/zoo-train.pid 2>/dev/null)"
    self.shell.run(self.ssh(f"kill -TERM {pid} 2>/dev/null; sleep {grace:g}; "
                            f"kill -KILL {pid} 2>/dev/null; true"), check=False)

  def state(self) -> str:
    result = self.shell.run(self._gcloud("tpu-vm", "describe", self.name,
                                         "--format=value(state)"), capture=True)
    return "DRY-RUN" if result is None else result.stdout.strip()

  def workers(self) -> int:
    result = self.shell.run(self._gcloud("tpu-vm", "describe", self.name,
                                         "--format=json(networkEndpoints)"), capture=True)
    if result is None:
      return 1
    return max(1, len(json.loads(result.stdout or "{}").get("networkEndpoints", [])))

  def logs(self, lines: int):
    for w in range(self.workers()):
      result = self.shell.run(self.ssh(f"tail -n {lines} ~/zoo-train.log", worker=str(w)),
                              capture=True, check=False)
      if result is not None:
        for line in result.stdout.splitlines():
          print(f"[worker {w}] {line}")

  def delete(self):
    self.shell.run(self._gcloud("tpu-vm", "delete", self.name, "--quiet"))


# ---------------------------------------------------------------------------------------------
# Local processes.

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The watchdog, over a backend: N local processes, or the workers of a TPU VM.

@dataclasses.dataclass
class Status:
  """One look at a running job."""
  finished: bool = False  # every process has finished well
  failure: tuple[str, int | None] | None = None  # (what went wrong, the exit status if known)
  # the latest beat (None: none yet) of each process still at work, by process index
  working: dict[int, dict | None] = dataclasses.field(default_factory=dict)


class Backend(Protocol):
  """Where the watchdog runs a job."""
  shell: Shell
  done_message: str  # printed when the job has finished
  logs: str  # where the workers' output is, for the message when the watchdog gives up

  def start(self, attempt: int):
    """Starts every process of the job (with a fresh heartbeat directory)."""

  def check(self) -> Status:
    """The state of the processes (or the VM) and their beats."""

  def stop(self, grace: float):
    """SIGTERM to every process, SIGKILL after `grace` seconds."""

  def recover(self):
    """Makes the job startable again after a failure (a preempted VM is created again)."""


class LocalJob:
  """N `zoo train` processes on this machine, joined through a localhost coordinator."""

  def __init__(self, processes: int, config: str, train_args: Sequence[str], workdir: str,
               cpu_devices: int | None, shell: Shell):
    if processes < 1:
      raise ZooError(f"--processes must be at least 1, got {processes}")
    self.n, self.config, self.train_args = processes, config, list(train_args)
    self.workdir, self.cpu_devices, self.shell = workdir, cpu_devices, shell
    self.procs: list[subprocess.Popen] = []
    # The watchdog's files stay on this machine (beside a gs:// workdir, in a local cache).
    local = paths.local_side(workdir)
    self.heartbeat_dir = os.path.join(local, "heartbeat")
    self.log_dir = self.logs = os.path.join(local, "logs")
    self.done_message = f"all {processes} processes finished"

  def commands(self, port: int) -> list[tuple[list[str], dict]]:
    out = []
    for i in range(self.n):
      cmd = [sys.executable, "-m", "zoo.cli", "train", "--config", self.config,
             "--workdir", self.workdir, *self.train_args]
      if self.cpu_devices:
        cmd += ["--cpu_devices", str(self.cpu_devices)]
      env = {heartbeat.ENV: self.heartbeat_dir}
      if self.n > 1:
        env.update(ZOO_COORDINATOR=f"localhost:{port}", ZOO_NUM_PROCESSES=str(self.n),
                   ZOO_PROCESS_ID=str(i))
      out.append((cmd, env))
    return out

  def start(self, attempt: int):
    port = free_port()
    if self.shell.dry_run:
      for cmd, env in self.commands(port):
        print(shlex.join([f"{k}={v}" for k, v in env.items()] + cmd))
      return
    os.makedirs(self.log_dir, exist_ok=True)
    shutil.rmtree(self.heartbeat_dir, ignore_errors=True)
    self.procs = []
    for i, (cmd, env) in enumerate(self.commands(port)):
      with open(os.path.join(self.log_dir, f"worker_{i}.log"), "a") as log:
        log.write(f"--- attempt {attempt} ---\n")
        log.flush()
        self.procs.append(subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=log,
                                           stderr=subprocess.STDOUT, cwd=REPO_ROOT))

  def check(self) -> Status:
    codes = [p.poll() for p in self.procs]
    if all(c == 0 for c in codes):
      return Status(finished=True)
    for i, code in enumerate(codes):
      if code not in (None, 0):
        return Status(failure=(f"process {i} exited with status {code}", code))
    beats = heartbeat.read_dir(self.heartbeat_dir, self.n)
    return Status(working={i: beats[i] for i, c in enumerate(codes) if c is None})

  def stop(self, grace: float):
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    for p in self.procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()

  def recover(self):
    pass


class TPUJob:
  """One `zoo train` on every worker of a TPU VM (one process a worker), watched over ssh."""

  def __init__(self, tpu: TPU, config: str, train_args: Sequence[str], heartbeat_dir: str,
               recreate: dict | None):
    self.tpu, self.shell = tpu, tpu.shell
    self.config, self.train_args, self.heartbeat_dir = config, list(train_args), heartbeat_dir
    self.recreate = recreate  # TPU.create's arguments to create a preempted VM again
    self.processes = 1
    self.preempted = None  # the VM's state when it was found preempted
    self.done_message = "the job has finished; see `zoo launch logs`"
    self.logs = "~/zoo-train.log on every worker (`zoo launch logs`)"

  def start(self, attempt: int):
    self.processes = self.tpu.workers()
    self.tpu.start(self.config, self.train_args, self.heartbeat_dir)

  def check(self) -> Status:
    state = self.tpu.state()
    if state in ("PREEMPTED", "TERMINATED") and self.recreate:
      self.preempted = state
      return Status(failure=(f"the TPU VM is {state}", None))
    look = (f"cat {self.heartbeat_dir}/process_*.json 2>/dev/null; "
            "kill -0 $(cat ~/zoo-train.pid) 2>/dev/null && echo RUNNING")
    result = self.shell.run(self.tpu.ssh(look), capture=True, check=False)
    text = result.stdout if result else ""
    beats = heartbeat.parse(text, self.processes)
    if all(b and b.get("done") for b in beats):
      return Status(finished=True)
    if "RUNNING" not in text:  # on no worker
      return Status(failure=("the job ended before finishing", None))
    return Status(working={i: b for i, b in enumerate(beats) if not (b and b.get("done"))})

  def stop(self, grace: float):
    if not self.preempted:  # a preempted VM took its processes with it
      self.tpu.stop(grace)

  def recover(self):
    if self.preempted:
      print(f"zoo launch: the TPU VM is {self.preempted}; creating it again", file=sys.stderr)
      self.tpu.delete()
      self.tpu.create(**self.recreate)
      self.tpu.setup()
      self.preempted = None


def watch(job: Backend, *, restart: int, heartbeat_timeout: float, grace: float,
          poll: float = 1.0, startup_timeout: float = 1800.0) -> int:
  """Runs `job` until every process ends well (0), or it fails more than `restart` times
  (the exit status of the failure: the worker's, 124 for a stalled one, else 1)."""
  attempt = 0
  while True:
    job.start(attempt)
    if job.shell.dry_run:
      job.check()  # prints the commands one look at the job runs
      return 0
    started = time.time()
    failure = None
    while failure is None:
      time.sleep(poll)
      status = job.check()
      if status.finished:
        print(f"zoo launch: {job.done_message}")
        return 0
      failure = status.failure
      now = time.time()
      for i, beat in status.working.items():
        late = heartbeat.stalled_for(beat, started=started, now=now,
                                     heartbeat_timeout=heartbeat_timeout,
                                     startup_timeout=startup_timeout)
        if late is not None and failure is None:
          failure = (f"process {i} made no progress for {late:.0f} s", 124)
    what, code = failure
    print(f"zoo launch: {what}; stopping the job", file=sys.stderr)
    job.stop(grace)
    if attempt >= restart:
      print(f"zoo launch: giving up after {attempt + 1} attempt(s); logs in {job.logs}",
            file=sys.stderr)
      return code or 1
    attempt += 1
    job.recover()
    print(f"zoo launch: restarting from the latest checkpoint (restart {attempt} of "
          f"{restart})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The command line.

def add_parser(sub):
  p = sub.add_parser("launch", help="run zoo train on a Cloud TPU VM or N local processes")
  actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
  for action in ("create", "setup", "run", "logs", "status", "stop", "delete", "ssh"):
    a = actions.add_parser(action)
    a.add_argument("--backend", choices=["tpu", "local"], default="tpu")
    a.add_argument("--name", help="TPU VM name")
    a.add_argument("--zone", help="TPU zone, e.g. us-central2-b")
    a.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    a.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    if action == "create":
      a.add_argument("--tpu-type", required=True, help="e.g. v4-8, v5litepod-16")
      a.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software version")
      a.add_argument("--spot", action="store_true")
      a.add_argument("--preemptible", action="store_true")
      a.add_argument("--queued", action="store_true", help="through a queued resource")
    if action == "run":
      a.add_argument("--processes", type=int, default=2, help="local backend: processes")
      a.add_argument("--cpu-devices", type=int, help="local backend: devices per process")
      a.add_argument("--restart", type=int, default=0, help="restarts after a failure")
      a.add_argument("--heartbeat-timeout", type=float, default=600.0,
                     help="seconds without a step before a worker counts as stalled")
      a.add_argument("--startup-timeout", type=float, default=1800.0,
                     help="seconds a worker may take to its first step (compiling, data)")
      a.add_argument("--grace", type=float, default=10.0,
                     help="seconds between SIGTERM and SIGKILL when stopping")
      a.add_argument("--poll", type=float, default=1.0, help="watchdog period in seconds")
      a.add_argument("--recreate-type", help="TPU type to create again after a preemption")
      a.add_argument("config", help="configs/NAME.py[:ARGS]")
      a.add_argument("train_args", nargs="...", help="--workdir DIR, --config.FIELD=VALUE ...")
    if action == "logs":
      a.add_argument("--lines", type=int, default=100)
    if action == "ssh":
      a.add_argument("--worker", default="0")
    a.set_defaults(func=main)


def split_workdir(train_args: Sequence[str]) -> tuple[str, list[str]]:
  """(the --workdir value, the other train arguments); a ZooError when there is none."""
  workdir, rest, args = None, [], list(train_args)
  while args:
    arg = args.pop(0)
    if arg == "--workdir" and args:
      workdir = args.pop(0)
    elif arg.startswith("--workdir="):
      workdir = arg.split("=", 1)[1]
    else:
      rest.append(arg)
  if workdir is None:
    raise ZooError("zoo launch run needs --workdir DIR among the train arguments (a gs:// path "
                   "or a path every worker can write, for the TPU backend)")
  return workdir, rest


def main(args) -> int:
  shell = Shell(args.dry_run)
  if args.backend == "local":
    if args.action != "run":
      raise ZooError(f"the local backend has only `run` (not {args.action})")
    check_config(args.config)
    workdir, train_args = split_workdir(args.train_args)  # the job passes it on, absolute
    job = LocalJob(args.processes, args.config, train_args, paths.resolve(workdir),
                   args.cpu_devices, shell)
    return watch(job, restart=args.restart, heartbeat_timeout=args.heartbeat_timeout,
                 grace=args.grace, poll=args.poll, startup_timeout=args.startup_timeout)
  tpu = TPU(args.name, args.zone, args.project, shell)
  if args.action == "create":
    tpu.create(args.tpu_type, args.version, args.spot, args.preemptible, args.queued)
  elif args.action == "setup":
    tpu.setup()
  elif args.action == "run":
    check_config(args.config)
    split_workdir(args.train_args)  # it must be there; the workers get it as given
    config_file = os.path.abspath(args.config.split(":", 1)[0])
    if config_file.startswith(REPO_ROOT + os.sep):  # synced with the repository
      tpu.sync()
      remote = os.path.relpath(config_file, REPO_ROOT)
    else:
      tpu.sync([config_file])
      remote = os.path.basename(config_file)
    # relative to ~/zoo, where the workers run it
    config = remote + (":" + args.config.split(":", 1)[1] if ":" in args.config else "")
    recreate = None
    if args.recreate_type:
      recreate = dict(tpu_type=check_tpu_type(args.recreate_type),
                      version="tpu-ubuntu2204-base", spot=True)
    job = TPUJob(tpu, config, args.train_args, "~/zoo-heartbeat", recreate)
    return watch(job, restart=args.restart, heartbeat_timeout=args.heartbeat_timeout,
                 grace=args.grace, poll=args.poll, startup_timeout=args.startup_timeout)
  elif args.action == "logs":
    tpu.logs(args.lines)
  elif args.action == "status":
    print(tpu.state())
  elif args.action == "stop":
    tpu.stop()
  elif args.action == "delete":
    tpu.delete()
  elif args.action == "ssh":
    cmd = tpu._gcloud("tpu-vm", "ssh", tpu.name, f"--worker={args.worker}")
    if shell.dry_run:
      print(shlex.join(cmd))
    else:
      if shutil.which("gcloud") is None:
        raise ZooError("gcloud is not installed (or not on PATH)")
      os.execvp(cmd[0], cmd)
  return 0
