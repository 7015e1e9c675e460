"""Training checkpoints with orbax (the train state, the data iterator and run metadata
together), and reading a model checkpoint's weights into a train state's tree.

Saves are asynchronous (training goes on while the arrays are written) and atomic (orbax writes
into a temporary directory and renames it), so a run killed at any moment leaves only complete
checkpoints. Restore goes onto whatever shardings the caller asks for, so a checkpoint written on
one mesh resumes on another. A checkpoint that fails to restore (damaged files) is reported and
the previous one is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from zoo import gcs, paths, sharding
from zoo.convert.checkpoint import Checkpoint
from zoo.errors import StorageError, ZooError
from zoo.layers.quant import is_quantized, stack_quantized
from zoo.models import stack

# before orbax makes a tensorstore context, or tensorstore starts its HTTP transport
gcs.set_tensorstore_timeouts()
gcs.set_tensorstore_retries()

# Phrases of orbax's errors for a restore target that does not fit the saved tree.
_MISMATCH = ("tree structures do not match", "Requested shape", "shape mismatch")


class _OneLineBackgroundErrors(logging.Filter):
  """An error that orbax (absl logging) or gcsfs logs from a background thread of a save, as
  one line: the exception reaches the loop, which reports it as a one-line error; the
  tracebacks of its echoes in the writers' threads would bury that line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and record.threadName != "MainThread":
      error = record.exc_info[1]
      record.msg = f"{record.getMessage()} ({paths.reason(error)})" if error else \
          record.getMessage()
      record.args, record.exc_info, record.exc_text = None, None, None
    return True


_ONE_LINE = _OneLineBackgroundErrors()


class Checkpointer:

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.every = every
    self.directory = paths.resolve(directory)  # local, or gs:// (orbax writes there directly)
    # The step's directories are made before the save returns, not in orbax's background
    # threads: there, a failure to make one (a bucket that stopped answering) left the other
    # threads waiting for its signal until orbax's 300 s coordination timeout.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every, 1), max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True,
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))
    self._in_flight: set[int] = set()  # saves started and not yet known to be complete
    for name in ("absl", "gcsfs"):
      logging.getLogger(name).addFilter(_ONE_LINE)  # once: a filter is added only once

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save: the step is on the interval, or it is the first
    step of a run that has no checkpoint yet (orbax's rule: a run whose checkpoint storage does
    not work fails at its first step, not after `every` steps)."""
    return bool(self.every) and self.manager.should_save(step)

  def save(self, step: int, state: Any, data_iter, meta: dict, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it started a save."""
    if not (force or self.due(step)):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter),
                              meta=ocp.args.JsonSave(meta))
    self.wait()  # the save before (orbax would wait for it too): its failure is its own
    with self._storage_errors(f"saving the checkpoint at step {step}"):
      started = self.manager.save(step, args=args, force=True)
    if started:
      self._in_flight.add(step)
    return started

  @contextlib.contextmanager
  def _storage_errors(self, doing: str):
    """A failure of the storage under a save (a bucket that stops answering, a full disk: the
    clients' timeouts and retries are spent, see zoo.gcs) as a one-line StorageError naming
    where, and the newest checkpoint that is complete."""
    try:
      yield
    except ZooError:
      raise
    except Exception as e:  # noqa: BLE001 (orbax, tensorstore, gcsfs and OS errors)
      where = (paths.bucket_of(self.directory) if paths.is_remote(self.directory)
               else self.directory)
      raise StorageError(f"{doing} in {where} failed ({paths.reason(e)}); "
                         f"{self.complete_words()}") from None

  def complete_words(self) -> str:
    """Words naming the newest checkpoint known to be complete (no save in flight)."""
    done = self._committed_steps()
    if not done:
      return "no checkpoint is known to be complete"
    return f"the newest checkpoint known to be complete is step {max(done)} in {self.directory}"

  def _committed_steps(self) -> list[int]:
    try:
      steps = self.manager.all_steps()  # orbax's own record of them, no listing
    except Exception:  # noqa: BLE001
      steps = []
    return [s for s in steps if s not in self._in_flight]

  def restore_latest(self, abstract_state: Any, data_iter, shared_data: bool = False
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, meta) from the newest checkpoint that restores, or None if there is none.

    `abstract_state` holds jax.ShapeDtypeStructs with the target shardings; `data_iter` has its
    position set in place. The state restores onto any mesh and process count. The data
    position is per process; `shared_data` says every process's is the same (data.shard =
    rows), so a checkpoint written by another number of processes carries it over too.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                meta=ocp.args.JsonRestore())
      try:
        restored = self.manager.restore(step, args=args)
        self._restore_data(step, data_iter, shared_data)
      except ZooError:
        raise
      except Exception as e:  # orbax and tensorstore raise many types for damaged files
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if any(words in reason for words in _MISMATCH):
          # The files are fine; the run's config is not the one that wrote them.
          raise ZooError(f"the checkpoint at step {step} in {self.directory} was written by a "
                         f"different model or optimizer config, or the other layer layout "
                         f"(scan_layers) ({reason})") from None
        print(f"zoo: checkpoint at step {step} is damaged and was skipped ({reason})",
              file=sys.stderr)
        self._set_aside(step)
        continue
      return step, restored.state, dict(restored.meta)
    return None

  def _restore_data(self, step: int, data_iter, shared: bool):
    directory = paths.path(paths.join(self.directory, str(step), "data"))
    index, count = jax.process_index(), jax.process_count()
    own = directory / f"process_{index}-of-{count}.json"
    saved = sorted(directory.glob("process_*-of-*.json")) if directory.exists() else []
    if not saved:
      raise ValueError(f"no data iterator state in {directory}")
    path = own if own.exists() else None
    if path is None and shared:
      path = saved[0]
    if path is None:  # the model and optimizer restore; the data starts over
      written_by = saved[0].name.rsplit("-of-", 1)[1].split(".")[0]
      if index == 0:
        print(f"zoo: warning: the checkpoint at step {step} was written by {written_by} "
              f"processes; with data.shard=documents its data position does not carry over to "
              f"{count}, so the data starts from its beginning (data.shard=rows carries it "
              "over)", file=sys.stderr)
      return
    data_iter.set_state(json.loads(path.read_text()))

  def _set_aside(self, step: int):
    """Moves a damaged checkpoint out of the way (kept for inspection), so its step can be
    saved again."""
    if jax.process_index() == 0:
      aside = paths.join(self.directory + ".damaged", f"{step}-{int(time.time())}")
      paths.move_tree(paths.join(self.directory, str(step)), aside)
    self.manager.reload()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def wait(self):
    if not self._in_flight:
      return
    steps = ", ".join(map(str, sorted(self._in_flight)))
    with self._storage_errors(f"finishing the checkpoint at step {steps}"):
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    self._in_flight.clear()

  def close(self):
    self.wait()
    self.manager.close()


def load_tree(path: str, abstract: dict, shardings: dict,
              convert: Callable[[str, np.ndarray], Any] | None = None) -> dict:
  """A model checkpoint's parameters (zoo or HF, see zoo.convert.Checkpoint) in the structure
  of `abstract` (a pure dict of ShapeDtypeStructs), read one tensor at a time, cast to each
  leaf's dtype, passed through `convert(name, array)` if given (QLoRA quantizes there), and
  placed by `shardings` (a quantized leaf by sharding.quantized_sharding). The process never
  holds more than the placed tree and one tensor in flight, plus, for a stacked leaf (scanned
  layers), this process's shards of it, filled one layer at a time."""
  ckpt = Checkpoint(path)
  names = [".".join(str(k.key) for k in key_path)
           for key_path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  period = stack.period_of(names)

  def one(key_path, leaf, leaf_sharding):
    name = ".".join(str(k.key) for k in key_path)
    if stack.is_stacked(name):
      return _load_stacked(ckpt, stack.layer_names(name, period, leaf.shape[0]), leaf,
                           leaf_sharding, convert)
    value = np.asarray(ckpt.read(name)).astype(leaf.dtype)
    if convert is not None:
      value = convert(name, value)
    if is_quantized(value):
      leaf_sharding = sharding.quantized_sharding(value, leaf_sharding)
    return jax.device_put(value, leaf_sharding)

  return jax.tree_util.tree_map_with_path(one, abstract, shardings)


def _load_stacked(ckpt: Checkpoint, layer_names: list[str], leaf, leaf_sharding, convert):
  """A stacked parameter from its layers' tensors (`layer_names`, one per slot)."""
  def layer(g):
    value = np.asarray(ckpt.read(layer_names[g])).astype(leaf.dtype)
    return value if convert is None else convert(layer_names[g], value)

  first = layer(0)
  if is_quantized(first):  # QLoRA: each layer quantized on its own, the codes stacked
    value = stack_quantized([first] + [layer(g) for g in range(1, len(layer_names))])
    return jax.device_put(value, sharding.quantized_sharding(value, leaf_sharding))
  # Each distinct shard this process holds, filled slot by slot as the layers are read.
  indices = leaf_sharding.addressable_devices_indices_map(leaf.shape)
  buffers = {}
  for index in indices.values():
    key = _index_key(index, leaf.shape)
    if key not in buffers:
      buffers[key] = np.empty([stop - start for start, stop in key], leaf.dtype)
  for g in range(len(layer_names)):
    value, first = (first, None) if g == 0 else (layer(g), None)
    for key, buffer in buffers.items():
      (start, stop), rest = key[0], key[1:]
      if start <= g < stop:
        buffer[g - start] = value[tuple(slice(a, b) for a, b in rest)]
  arrays = [jax.device_put(buffers[_index_key(index, leaf.shape)], device)
            for device, index in indices.items()]
  return jax.make_array_from_single_device_arrays(leaf.shape, leaf_sharding, arrays)


def _index_key(index: tuple, shape: tuple) -> tuple:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))
