"""Logical axis names of the parameters.

Every parameter is created with a tuple of logical names (`nnx.Param(..., out_sharding=names)`),
one per dimension. A rules table maps these names to mesh axes (data, fsdp, tensor), so one table
decides how a model of any size is laid out on any mesh.
"""

from __future__ import annotations

from flax import nnx

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "mlp", "experts", "norm")


def logical_axes(model: nnx.Module) -> dict[str, tuple[str | None, ...]]:
  """Dotted parameter path -> its logical axis names."""
  _, state = nnx.split(model, nnx.Param)
  return {".".join(map(str, path)): tuple(var.get_metadata()["out_sharding"])
          for path, var in nnx.to_flat_state(state)}
