#!/usr/bin/env python3
"""A stand-in for `gcloud compute tpus` in tests of `zoo launch`: one TPU VM with one worker,
which is this machine with FAKE_TPU_HOME as its home directory.

`tpu-vm ssh --command=C` runs C with bash (or, with FAKE_TPU_UNREACHABLE set, fails as ssh
does when the workers cannot be reached) (except `pip install`, which a test must not run);
`tpu-vm scp` copies into FAKE_TPU_HOME; `create`, `delete` and `describe` keep the VM's state
in FAKE_TPU_HOME/state (a test writes PREEMPTED there to preempt it). Every call is appended
to FAKE_TPU_HOME/calls.log.
"""

import json
import os
import shutil
import subprocess
import sys

home = os.environ["FAKE_TPU_HOME"]
args = sys.argv[1:]
with open(os.path.join(home, "calls.log"), "a") as f:
  f.write(" ".join(args) + "\n")
state_path = os.path.join(home, "state")


def option(name):
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


if args[:3] == ["compute", "tpus", "tpu-vm"]:
  verb = args[3]
  if verb == "create":
    with open(state_path, "w") as f:
      f.write("READY")
  elif verb == "delete":
    with open(state_path, "w") as f:
      f.write("DELETED")
  elif verb == "describe":
    if option("format") == "value(state)":
      print(open(state_path).read() if os.path.exists(state_path) else "NOT_FOUND")
    else:
      print(json.dumps({"networkEndpoints": [{"ipAddress": "127.0.0.1"}]}))
  elif verb == "scp":
    src = args[args.index("--recurse") + 1]
    dst = os.path.join(home, "zoo")
    os.makedirs(dst, exist_ok=True)
    target = os.path.join(dst, os.path.basename(src))
    if os.path.isdir(src):
      shutil.copytree(src, target, dirs_exist_ok=True,
                      ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(src, target)
  elif verb == "ssh":
    if os.environ.get("FAKE_TPU_UNREACHABLE"):
      sys.exit("ssh: connect to host 10.0.0.2 port 22: Connection timed out")
    command = option("command")
    if command is None or "pip install" in command:
      sys.exit(0)
    sys.exit(subprocess.run(["bash", "-c", command], env=dict(os.environ, HOME=home)).returncode)
  sys.exit(0)
sys.exit(f"fake gcloud: unsupported call {args}")
