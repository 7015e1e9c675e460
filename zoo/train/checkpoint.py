"""Training checkpoints with orbax (the train state, the data iterator and run metadata
together), and reading a model checkpoint's weights into a train state's tree.

Saves are asynchronous (training goes on while the arrays are written) and atomic (orbax writes
into a temporary directory and renames it), so a run killed at any moment leaves only complete
checkpoints. Restore goes onto whatever shardings the caller asks for, so a checkpoint written on
one mesh resumes on another. A checkpoint that fails to restore (damaged files) is reported and
the previous one is used.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from zoo import paths, sharding
from zoo.convert.checkpoint import Checkpoint
from zoo.errors import ZooError
from zoo.layers.quant import is_quantized, stack_quantized
from zoo.models import stack

# Phrases of orbax's errors for a restore target that does not fit the saved tree.
_MISMATCH = ("tree structures do not match", "Requested shape", "shape mismatch")


class Checkpointer:

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.every = every
    self.directory = paths.resolve(directory)  # local, or gs:// (orbax writes there directly)
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(every, 1), max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save (the step is on the interval)."""
    return bool(self.every) and self.manager.should_save(step)

  def save(self, step: int, state: Any, data_iter, meta: dict, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it started a save."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

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
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
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
