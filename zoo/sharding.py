"""The device mesh, the one logical-axis rules table, and `constrain` for activations.

Every parameter is created with a tuple of logical names (`nnx.Param(..., out_sharding=names)`),
one per dimension. A rules table (it lives in the training config) maps each logical name to mesh
axes (`data`, `fsdp`, `tensor`), so one table decides how a model of any size is laid out on any
mesh: parameters, optimizer state, the batch, and activations at block boundaries.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from zoo.errors import ZooError

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "length", "vocab", "embed", "heads", "kv_heads", "mlp", "experts",
                "norm", "layers")

# Data parallel over `data`, ZeRO-3 style parameter sharding over `fsdp` (which also splits the
# batch), and Megatron-style tensor parallelism over `tensor`.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("experts", None),
  ("norm", None),
  ("layers", None),  # the leading axis of scanned (stacked) layers' parameters
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def make_mesh(shape: dict | Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 for "all remaining devices"."""
  if isinstance(shape, dict) or hasattr(shape, "get"):
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ZooError(f"mesh sizes {sizes} must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ZooError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n} devices")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ZooError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                   f"but there are {n}")
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)
  # Several TPU slices joined over the data-center network (DCN): only the data axis crosses
  # it (one gradient all-reduce per step); fsdp and tensor stay on each slice's fast links.
  if sizes[0] % slices:
    raise ZooError(f"mesh.data is {sizes[0]}, but the data axis spans the {slices} slices: "
                   f"set it to a multiple of {slices}")
  grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // slices, *sizes[1:]),
                                              (slices, 1, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _rules_dict(rules: Rules) -> dict:
  out = {}
  for name, axes in rules:
    if name not in LOGICAL_AXES:
      raise ZooError(f"sharding rule for unknown logical axis {name!r}")
    if isinstance(axes, str):
      axes = (axes,)
    for axis in axes or ():
      if axis not in MESH_AXES:
        raise ZooError(f"sharding rule {name!r} names unknown mesh axis {axis!r}")
    out[name] = tuple(axes) if axes else None
  return out


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """The PartitionSpec for a value whose dimensions carry logical `names`.

  A mesh axis is used at most once per value (the first dimension that asks for it wins), and
  with `mesh` and `shape` given, mesh axes that do not divide a dimension are dropped for it,
  so a small model still runs on a large mesh (that dimension is then replicated).
  """
  table = _rules_dict(rules)
  used, spec = set(), []
  for i, name in enumerate(names):
    axes = [a for a in (table.get(name) or ()) if a not in used] if name else []
    if mesh is not None and shape is not None:
      kept = []
      for axis in axes:
        if shape[i] % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
          kept.append(axis)
      axes = kept
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def logical_axes(model: nnx.Module) -> dict[str, tuple[str | None, ...]]:
  """Dotted parameter path -> its logical axis names."""
  _, state = nnx.split(model, nnx.Param)
  return {".".join(map(str, path)): tuple(var.get_metadata()["out_sharding"])
          for path, var in nnx.to_flat_state(state)}


def param_shardings(abstract_model: nnx.Module, mesh: Mesh, rules: Rules) -> dict:
  """NamedShardings for the model's parameters, as a pure dict shaped like its state."""
  return variable_shardings(nnx.split(abstract_model, nnx.Param)[1], mesh, rules)


def variable_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
  """NamedShardings for an nnx.State of variables (by their logical names), as a pure dict."""

  def one(var):
    spec = logical_to_spec(var.get_metadata()["out_sharding"], rules, mesh, var.shape)
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()


def quantized_sharding(q, weight_sharding: NamedSharding):
  """Shardings for the leaves of a block-quantized weight (zoo.layers.quant.QTensor) whose
  float weight the rules place at `weight_sharding`.

  Blocks run along the weight's rows in row-major order, so splitting the block axis of codes
  and scales into k equal parts splits the weight into k groups of whole rows: the weight's
  first-axis sharding carries over whenever each device's rows fill whole blocks. Otherwise
  (or when the rules shard another axis only) the weight stays whole on each device.
  """
  mesh, spec = weight_sharding.mesh, weight_sharding.spec
  # A stacked weight (scanned layers) has one more leading axis than its QTensor's shape
  # (the shape of one slot); it keeps the weight's sharding of that axis.
  lead = tuple(spec[:q.codes.ndim - 2])
  lead += (None,) * (q.codes.ndim - 2 - len(lead))
  spec = tuple(spec[len(lead):])
  first = spec[0] if len(spec) else None
  rows, row_size = q.shape[0], math.prod(q.shape[1:])
  if first is not None:
    parts = math.prod(mesh.shape[a] for a in ((first,) if isinstance(first, str) else first))
    if rows % parts == 0 and (rows // parts * row_size) % q.block_size == 0:
      block_spec = NamedSharding(mesh, PartitionSpec(*lead, first, None))
      return type(q)(block_spec, block_spec, q.kind, q.shape, q.block_size, q.dtype)
  whole = NamedSharding(mesh, PartitionSpec(*lead))
  return type(q)(whole, whole, q.kind, q.shape, q.block_size, q.dtype)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Batch arrays [B, T, ...]: the batch dimension split as the rules say for `batch`."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


_ACTIVE: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def use(mesh: Mesh, rules: Rules):
  """Within this block, `constrain` shards activations on `mesh` by `rules` (when tracing)."""
  _ACTIVE.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.pop()


def active() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the innermost `use` block, or None outside one."""
  return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains activation `x` to the sharding its logical `names` map to; a no-op outside
  `use(mesh, rules)`, so models run unchanged on one device."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  spec = logical_to_spec(names, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the rules split the batch dimension over."""
  spec = logical_to_spec(("batch",), rules)[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def batch_ways(mesh: Mesh, rules: Rules) -> int:
  """How many ways the rules split the batch dimension on `mesh`."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def local_batch_size(global_batch: int, mesh: Mesh, rules: Rules) -> int:
  """Checks the global batch splits evenly over the batch axes of the mesh."""
  ways = batch_ways(mesh, rules)
  if global_batch % ways:
    raise ZooError(f"batch size {global_batch} is not divisible by the {ways} ways the mesh "
                   f"splits the batch ({' x '.join(batch_axes(rules))})")
  return global_batch // jax.process_count()
