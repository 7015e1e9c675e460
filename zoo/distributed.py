"""Several processes, one job: JAX's multi-controller runtime (`jax.distributed`) for `zoo train`.

Every process runs the same program on its own devices; `jax.distributed.initialize` connects
them through a coordinator (process 0's address), after which `jax.devices()` lists every
device of the job and the mesh spans them all. A job is multi-process when it is told so:

- flags (`zoo train --coordinator HOST:PORT --num_processes N --process_id I`) or the
  environment (ZOO_COORDINATOR, ZOO_NUM_PROCESSES, ZOO_PROCESS_ID), which `zoo launch` sets;
- or a cluster JAX recognises by itself: Cloud TPU VMs with several workers, SLURM jobs of
  several tasks.

On CPUs (tests, the local launcher) the processes exchange arrays over gloo, and
`--cpu_devices N` gives each process N devices.
"""

from __future__ import annotations

import os

import jax

from zoo.errors import ZooError


def _int(value, what: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ZooError(f"{what} must be an integer, got {value!r}") from None


def cluster_detected() -> bool:
  """Whether the environment is a multi-process job JAX finds by itself (SLURM with several
  tasks, a Cloud TPU VM with several workers)."""
  if os.environ.get("SLURM_JOB_ID") and (_int(os.environ.get("SLURM_NTASKS"), "SLURM_NTASKS")
                                         or 1) > 1:
    return True
  workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([w for w in workers.split(",") if w]) > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None) -> bool:
  """Joins the job's processes (see the module docstring); returns whether it is
  multi-process. Must run before anything touches a JAX device."""
  coordinator = coordinator or os.environ.get("ZOO_COORDINATOR") or None
  num_processes = num_processes or _int(os.environ.get("ZOO_NUM_PROCESSES"), "ZOO_NUM_PROCESSES")
  if process_id is None:
    process_id = _int(os.environ.get("ZOO_PROCESS_ID"), "ZOO_PROCESS_ID")
  if cpu_devices is not None:
    if cpu_devices < 1:
      raise ZooError(f"--cpu_devices must be positive, got {cpu_devices}")
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if not explicit and not cluster_detected():
    return False
  if explicit:
    if coordinator is None or num_processes is None or process_id is None:
      raise ZooError("a multi-process job needs all of --coordinator, --num_processes and "
                     "--process_id (or ZOO_COORDINATOR, ZOO_NUM_PROCESSES, ZOO_PROCESS_ID)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ZooError(f"--process_id {process_id} is not in 0..{num_processes - 1}")
    if num_processes == 1:
      return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if explicit:
      jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                 process_id=process_id)
    else:
      jax.distributed.initialize()
  except Exception as e:  # connection errors come as several types, with long messages
    where = f" at {coordinator}" if coordinator else ""
    raise ZooError(f"cannot join the distributed job{where}: "
                   f"{str(e).strip().splitlines()[0][:200]}") from None
  return True
