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
zoo.train.loop.Heartbeat). A worker that exits with an error, or whose heartbeat is older than
--heartbeat-timeout, gets the whole job stopped (SIGTERM, then SIGKILL after --grace seconds:
the survivors are usually blocked in a collective with the dead one); with --restart N the job
is started again, N times at most, and resumes from its latest checkpoint. A preempted spot TPU
is deleted, created again, set up, and the job restarted.
"""

from __future__ import annotations

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

from zoo.errors import ZooError

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


class LocalJob:
  """N `zoo train` processes on this machine, joined through a localhost coordinator."""

  def __init__(self, processes: int, config: str, train_args: Sequence[str], workdir: str,
               cpu_devices: int | None, shell: Shell):
    if processes < 1:
      raise ZooError(f"--processes must be at least 1, got {processes}")
    self.n, self.config, self.train_args = processes, config, list(train_args)
    self.workdir, self.cpu_devices, self.shell = workdir, cpu_devices, shell
    self.procs: list[subprocess.Popen] = []
    self.heartbeat_dir = os.path.join(workdir, "heartbeat")
    self.log_dir = os.path.join(workdir, "logs")

  def commands(self, port: int) -> list[tuple[list[str], dict]]:
    out = []
    for i in range(self.n):
      cmd = [sys.executable, "-m", "zoo.cli", "train", "--config", self.config,
             "--workdir", self.workdir, *self.train_args]
      if self.cpu_devices:
        cmd += ["--cpu_devices", str(self.cpu_devices)]
      env = {"ZOO_HEARTBEAT_DIR": self.heartbeat_dir}
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

  def poll(self) -> list[int | None]:
    return [p.poll() for p in self.procs]

  def heartbeats(self) -> list[dict | None]:
    out = []
    for i in range(self.n):
      try:
        with open(os.path.join(self.heartbeat_dir, f"process_{i}.json")) as f:
          out.append(json.load(f))
      except (OSError, ValueError):
        out.append(None)
    return out

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


def watch(job: LocalJob, *, restart: int, heartbeat_timeout: float, grace: float,
          poll: float = 1.0, startup_timeout: float = 1800.0) -> int:
  """Runs `job` until every process ends well (0), or it fails more than `restart` times
  (the exit status of the failure: the worker's, or 124 for a stalled one)."""
  attempt = 0
  while True:
    job.start(attempt)
    if job.shell.dry_run:
      return 0
    started = time.time()
    failure = None
    while failure is None:
      time.sleep(poll)
      codes = job.poll()
      if all(c == 0 for c in codes):
        print(f"zoo launch: all {job.n} processes finished")
        return 0
      bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if bad:
        i, code = bad[0]
        failure = (f"process {i} exited with status {code}", code)
        break
      now = time.time()
      for i, beat in enumerate(job.heartbeats()):
        # before its first step a process compiles and reads data: it gets startup_timeout
        last, limit = (beat["time"], heartbeat_timeout) if beat else (started, startup_timeout)
        if codes[i] is None and now - last > limit:
          failure = (f"process {i} made no progress for {now - last:.0f} s", 124)
          break
    what, code = failure
    print(f"zoo launch: {what}; stopping the job", file=sys.stderr)
    job.stop(grace)
    if attempt >= restart:
      print(f"zoo launch: giving up after {attempt + 1} attempt(s); logs in {job.log_dir}",
            file=sys.stderr)
      return code or 1
    attempt += 1
    print(f"zoo launch: restarting from the latest checkpoint (restart {attempt} of "
          f"{restart})", file=sys.stderr)


def watch_tpu(tpu: TPU, config: str, train_args: Sequence[str], heartbeat_dir: str, *,
              restart: int, heartbeat_timeout: float, poll: float, recreate: dict | None,
              startup_timeout: float = 1800.0, grace: float = 10.0) -> int:
  """The watchdog for a TPU VM job: the VM's state (a preempted spot VM is created again from
  `recreate`) and every worker's heartbeat, read over ssh."""
  attempt = 0
  tpu.start(config, train_args, heartbeat_dir)
  if tpu.shell.dry_run:
    tpu.state()
    tpu.shell.run(tpu.ssh(f"cat {heartbeat_dir}/process_*.json"), check=False)
    return 0
  started = time.time()
  while True:
    time.sleep(poll)
    state = tpu.state()
    if state in ("PREEMPTED", "TERMINATED") and recreate:
      print(f"zoo launch: the TPU VM is {state}; creating it again", file=sys.stderr)
      tpu.delete()
      tpu.create(**recreate)
      tpu.setup()
      failure = "preempted"
    else:
      result = tpu.shell.run(tpu.ssh(f"cat {heartbeat_dir}/process_*.json 2>/dev/null; "
                                     "kill -0 $(cat ~/zoo-train.pid) 2>/dev/null && "
                                     "echo RUNNING"), capture=True, check=False)
      text = result.stdout if result else ""
      beats = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", text)]
      running = "RUNNING" in text
      if beats and all(b.get("done") for b in beats):
        print("zoo launch: the job has finished; see `zoo launch logs`")
        return 0
      last = min((b["time"] for b in beats), default=started)
      limit = heartbeat_timeout if beats else startup_timeout
      failure = None
      if not running:
        failure = "the job ended before finishing"
      elif time.time() - last > limit:
        failure = "no progress"
    if failure is None:
      continue
    tpu.stop(grace)
    if attempt >= restart:
      print(f"zoo launch: {failure}; giving up", file=sys.stderr)
      return 1
    attempt += 1
    tpu.start(config, train_args, heartbeat_dir)
    started = time.time()


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
    job = LocalJob(args.processes, args.config, train_args, os.path.abspath(workdir),
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
    heartbeat = "~/zoo-heartbeat"
    return watch_tpu(tpu, config, args.train_args, heartbeat, restart=args.restart,
                     heartbeat_timeout=args.heartbeat_timeout, poll=args.poll,
                     recreate=recreate, startup_timeout=args.startup_timeout,
                     grace=args.grace)
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
