"""`zoo plan`: compile the train step `zoo train` would run, for any Cloud TPU slice, and say
whether it fits before anyone rents one.

The TPU compiler (the `libtpu` wheel) compiles ahead of time for a named topology with no TPU
attached. `plan(config, topology)` resolves the config exactly as `zoo train` does
(`zoo.train.setup.prepare` and `build`, with the topology's compile-only devices and nothing
read: no data, no weights, no tokenizer training), lowers the jitted train step on the abstract
state and batch, compiles it, and reads the compiler's memory and cost analyses. Memory comes
from the compiler; the step time is an estimate from the chip's public figures (`estimate_step`:
compute, HBM traffic and collectives, whichever takes longest), not a measurement.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import math
import os
import re
import tempfile
import time

import jax

from zoo import sharding
from zoo.errors import ZooError
from zoo.train.metrics import flops_per_token
from zoo.train.setup import Trainer, build, prepare

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's public figures (per chip; bf16 peak without sparsity)."""
  name: str
  device_kinds: tuple[str, ...]  # what jax's device_kind says
  hbm_bytes: int
  peak_flops: float  # bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  # bytes/s one chip sends to the others over the chip-to-chip links, in one direction (all
  # its links together): half the bidirectional figure the pages give
  ici_bandwidth: float
  source: str


# Figures from each chip's Cloud TPU (or NVIDIA) system architecture page. Interconnect, per
# chip and direction: v5e 400 GB/s, v5p 1200 GB/s and v6e 800 GB/s bidirectional ("Inter-chip
# interconnect (ICI) bandwidth per chip"), halved; v4, whose page gives no per-chip figure, its
# all-reduce bandwidth per Pod over the Pod's chips (1.1 PB/s / 4096; the same quotient gives
# the halved figure for v5e and v6e: 51.2 and 102.4 TB/s over 256 chips); H100 and H200
# (SXM), NVLink's 900 GB/s bidirectional, halved.
CHIPS = {
  "v4": Chip("v4", ("TPU v4",), 32 * GiB, 275e12, 1200e9, 1.1e15 / 4096,
             "https://cloud.google.com/tpu/docs/v4"),
  "v5e": Chip("v5e", ("TPU v5 lite", "TPU v5e"), 16 * GiB, 197e12, 819e9, 200e9,
              "https://cloud.google.com/tpu/docs/v5e"),
  "v5p": Chip("v5p", ("TPU v5", "TPU v5p"), 95 * 10**9, 459e12, 2765e9, 600e9,
              "https://cloud.google.com/tpu/docs/v5p"),
  "v6e": Chip("v6e", ("TPU v6 lite", "TPU v6e"), 32 * GiB, 918e12, 1638e9, 400e9,
              "https://cloud.google.com/tpu/docs/v6e"),
  "h100": Chip("h100", ("NVIDIA H100 80GB HBM3",), 80 * 10**9, 989e12, 3.35e12, 450e9,
               "https://www.nvidia.com/en-us/data-center/h100/ (SXM)"),
  "h200": Chip("h200", ("NVIDIA H200",), 141 * 10**9, 989e12, 4.8e12, 450e9,
               "https://www.nvidia.com/en-us/data-center/h200/ (SXM)"),
}

# Cloud TPU names count TensorCores for v4 and v5p (two per chip) and chips for v5e and v6e.
_GENERATIONS = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5e", 1), "v5litepod": ("v5e", 1),
                "v6e": ("v6e", 1)}
_TWO_D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
          256: (16, 16)}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as the user wrote it
  compiler_name: str  # the compiler's form, e.g. "v5p:4x4x4"
  chip: Chip
  chips: int  # per slice


def parse_topology(name: str) -> Topology:
  """'v5p-128', 'v5litepod-16', 'v5e-16', 'v6e-256', 'v4-32' or the compiler's 'v5p:4x4x4'."""
  text = name.strip().lower()
  m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", text)
  if m:
    gen, shape = m.group(1), tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != (2 if gen in ("v5e", "v6e") else 3) or 0 in shape:
      raise ZooError(f"topology {name!r}: {gen} takes a {'2' if gen in ('v5e', 'v6e') else '3'}"
                     "-dimensional chip grid, e.g. "
                     f"{'v5e:4x4' if gen in ('v5e', 'v6e') else 'v5p:4x4x4'}")
    return Topology(name, text, CHIPS[gen], math.prod(shape))
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
  if not m:
    raise ZooError(f"unknown topology {name!r}: use a Cloud TPU name (v4-32, v5e-16, "
                   "v5litepod-16, v5p-128, v6e-256) or the compiler's form (v5p:4x4x4)")
  gen, per_chip = _GENERATIONS[m.group(1)]
  count = int(m.group(2))
  if count % per_chip:
    raise ZooError(f"topology {name!r}: {m.group(1)} names count TensorCores, two per chip; "
                   "use an even number")
  chips = count // per_chip
  if gen in ("v5e", "v6e"):
    shape = _TWO_D.get(chips)
  elif chips >= 4 and chips & (chips - 1) == 0:  # 2x2x1, then double the smallest side
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
      smallest = min(shape)
      i = max(j for j in range(3) if shape[j] == smallest)
      shape[i] *= 2
  else:
    shape = None
  if shape is None:
    raise ZooError(f"topology {name!r}: no standard {gen} slice has {chips} chips; give the "
                   f"chip grid in the compiler's form ({gen}:AxB{'xC' if gen in ('v4', 'v5p') else ''})")
  return Topology(name, f"{gen}:{'x'.join(map(str, shape))}", CHIPS[gen], chips)


def _require_libtpu():
  try:
    importlib.import_module("libtpu")
  except ImportError:
    raise ZooError("zoo plan --topology needs the TPU compiler, which is not installed: "
                   "pip install -e '.[tpu]' (or: pip install libtpu)") from None


def topology_devices(topology: Topology, slices: int = 1) -> list:
  """The compile-only devices of `slices` copies of the topology, checked against its chips."""
  if slices < 1:
    raise ZooError(f"--slices must be at least 1, got {slices}")
  _require_libtpu()
  from jax.experimental import topologies  # noqa: PLC0415 (loads the TPU plugin on demand)
  gen = topology.compiler_name.split(":")[0]
  options = {"chip_config_name": "megacore"} if gen == "v4" else {}  # one device per v4 chip
  if slices > 1:
    options["num_slices"] = slices
  try:
    devices = topologies.get_topology_desc(topology_name=topology.compiler_name,
                                           platform="tpu", **options).devices
  except Exception as e:  # noqa: BLE001 (the plugin's errors have no common type)
    raise ZooError(f"the TPU compiler rejects topology {topology.compiler_name!r}: "
                   f"{str(e).splitlines()[0]}") from None
  if len(devices) != topology.chips * slices:
    raise ZooError(f"topology {topology.name!r} means {topology.chips * slices} chips, but the "
                   f"TPU compiler made {len(devices)} devices for {topology.compiler_name!r}")
  return list(devices)


def _usable_hbm(devices: list) -> int | None:
  """HBM the compiler lets one program use per chip: it says so when a program does not fit,
  so compile a trivial one that cannot fit and read the figure from its refusal."""
  if devices[0].platform != "tpu":
    stats = getattr(devices[0], "memory_stats", lambda: None)()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
  kind = devices[0].device_kind
  if kind not in _USABLE_HBM:  # one probe per kind of chip and process
    mesh = jax.sharding.Mesh(devices[:1], ("x",))
    huge = jax.ShapeDtypeStruct((2**38,), jax.numpy.float32,
                                sharding=sharding.replicated(mesh))
    _USABLE_HBM[kind] = None
    try:
      jax.jit(lambda x: x + 1).lower(huge).compile()
    except Exception as e:  # noqa: BLE001
      found = _oom_figures(str(e))
      _USABLE_HBM[kind] = found[1] if found else None
  return _USABLE_HBM[kind]


_USABLE_HBM: dict[str, int | None] = {}


def _bytes(text: str) -> int:
  unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[text[-1] if text[-1] in "KMGT"
                                                                  else ""]
  return int(float(text.rstrip("KMGT")) * unit)


def _oom_figures(message: str) -> tuple[int, int] | None:
  """(required, available) bytes per chip from the TPU compiler's out-of-memory error."""
  m = re.search(r"required for HLO temporaries \(([\d.]+[KMGT]?)\) exceeds available HBM "
                r"\(([\d.]+[KMGT]?)\)", message)
  return (_bytes(m.group(1)), _bytes(m.group(2))) if m else None


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings (they split
  every value evenly, so every device holds the same)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|"
                    r"f64|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32,
         "u32": 32, "s64": 64, "u64": 64, "f8e4m3fn": 8, "f8e5m2": 8, "bf16": 16, "f16": 16,
         "f32": 32, "f64": 64, "c64": 64, "c128": 128}


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_END = re.compile(r'^\}(,\s*execution_thread="[^"]*")?\s*$')
_NAME = re.compile(r"%([^\s,(){}]+)")
_CALLS = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([^\s,{}()]+)"
                    r"|branch_computations=\{([^}]*)\}")


def hlo_computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """The computations of an HLO module's text, {name: its instruction lines}, and the entry's
  name (None for text without computations)."""
  comps, entry, _ = _parse_hlo(hlo_text)
  return comps, entry


def _parse_hlo(hlo_text: str):
  """hlo_computations, and each computation's first and last lines."""
  comps, ends, entry, current = {}, {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(2)
        comps[current], ends[current] = [], (line, "}")
        entry = current if m.group(1) else entry
    elif _END.match(line):  # (an instruction's text may run over several lines)
      ends[current] = (ends[current][0], line)
      current = None
    else:
      comps[current].append(line)
  return comps, entry, ends


def trip_count(while_line: str, comps: dict[str, list[str]]) -> int | None:
  """How many times a while loop runs: the compiler's known_trip_count where it gives one, else
  the bound its condition compares the counter with (`i < N`, the form of JAX's scans and
  fori_loops, from 0); None when neither says."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%?([^\s,]+)", while_line)
  lines = comps.get(cond.group(1), []) if cond else []
  constants = {}
  for line in lines:
    m = re.match(r"\s*%?(\S+) = [su](?:32|64)\[\]\S* constant\((-?\d+)\)", line)
    if m:
      constants[m.group(1)] = int(m.group(2))
  for line in lines:
    m = re.search(r"ROOT .* compare\(([^)]*)\).*direction=(LT|GT)", line)
    if m:
      names = _NAME.findall(m.group(1))
      if len(names) == 2:
        bound = names[1] if m.group(2) == "LT" else names[0]
        return constants.get(bound)
  return None


def _whiles(lines: list[str]):
  """(body, condition, the while's line) of each while loop among `lines`."""
  for line in lines:
    if re.search(r"\swhile\(", line):
      body = re.search(r"body=%?([^\s,]+)", line)
      cond = re.search(r"condition=%?([^\s,]+)", line)
      if body and cond:
        yield body.group(1), cond.group(1), line


def run_counts(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs in one run of the entry: a while loop's body as
  many times as the loop runs (trip_count; once when unknown), what a loop's body calls as
  many times as the body runs."""
  edges = {}
  for name, lines in comps.items():
    out = edges[name] = []
    for body, cond, line in _whiles(lines):
      trips = trip_count(line, comps) or 1
      out += [(body, trips), (cond, trips + 1)]
    for line in lines:
      for one, several in _CALLS.findall(line):
        out += [(callee, 1) for callee in ([one] if one else _NAME.findall(several))]
  order, seen = [], set()

  def visit(name):  # depth-first; the callers end up after their callees
    seen.add(name)
    for callee, _ in edges.get(name, ()):
      if callee not in seen:
        visit(callee)
    order.append(name)

  visit(entry)
  counts = dict.fromkeys(order, 0)
  counts[entry] = 1
  for name in reversed(order):
    for callee, times in edges.get(name, ()):
      counts[callee] += counts[name] * times
  return counts


def _group_size(line: str, default: int | None) -> int | None:
  m = re.search(r"replica_groups=\[\d+,(\d+)\]<=", line)  # [groups, size]<=[devices]
  if m:
    return int(m.group(1))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", line)
  return len(m.group(1).split(",")) if m else default


def _ring_traffic(kind: str, size: int, group: int | None) -> float:
  """Bytes one chip sends for a collective whose result is `size` bytes per chip, over a ring
  of `group` chips (None: many)."""
  share = 1.0 if group is None else (group - 1) / group
  if kind == "reduce-scatter":  # its result is the chip's shard of the reduced value
    return size * (share * group if group is not None else 1.0)
  return size * {"all-gather": share, "all-reduce": 2 * share, "all-to-all": share,
                 "collective-permute": 1.0}[kind]


def collectives(hlo_text: str, chips: int | None = None) -> dict[str, dict[str, float]]:
  """{kind: {"count", "bytes", "traffic"}} of the collectives one step of a compiled
  (partitioned) HLO module runs, per chip: each op as many times as it runs (a loop body's
  times the loop's trip count); "bytes" of its result (for an asynchronous op, of the value its
  done op yields); "traffic" the bytes the chip sends for it in a ring over its replica group
  (all-gather and all-to-all (k-1)/k of the result, all-reduce 2(k-1)/k, reduce-scatter k-1
  times the shard, collective-permute all of it; `chips` for a group the text does not give)."""
  out = {kind: {"count": 0, "bytes": 0, "traffic": 0.0} for kind in COLLECTIVES}
  op = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  comps, entry = hlo_computations(hlo_text)
  if entry is None:  # a fragment: its lines once
    runs = [(hlo_text.splitlines(), 1)]
  else:
    counts = run_counts(comps, entry)
    runs = [(comps[name], times) for name, times in counts.items() if times and name in comps]
  for lines, times in runs:
    for line in lines:
      m = op.search(line)
      if not m:
        continue
      shapes = _SHAPE.findall(m.group(1))
      if m.group(3) and len(shapes) > 1:  # async start: (operands..., results...) -> results
        shapes = shapes[len(shapes) // 2:]
      size = sum(math.prod(int(d) for d in dims.split(",") if d) * _BITS[dtype] // 8
                 for dtype, dims in shapes)
      found = out[m.group(2)]
      found["count"] += times
      found["bytes"] += size * times
      found["traffic"] += _ring_traffic(m.group(2), size, _group_size(line, chips)) * times
  return out


def _module_cost(text: str) -> dict:
  """XLA's cost analysis (the target-independent HloCostAnalysis) of an HLO module's text."""
  from jax._src.lib import _jax, hlo  # noqa: PLC0415 (jaxlib's own, not public API)
  module = hlo.hlo_module_from_text(text)
  return _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)


def loop_costs(hlo_text: str) -> tuple[float, float, list[int | None]]:
  """(FLOPs, bytes accessed, trip counts): what the loops of a compiled step add to the
  compiler's cost analysis of it, which counts a while loop's body once (scanned layers, the
  chunked loss, gradient accumulation), and each loop's trip count (None: not found; that loop
  then counts once). A loop body's cost is XLA's (target-independent) cost analysis of a module
  of that body and what it calls, with the loops inside it counted the same way; a loop adds
  its trip count less one times that."""
  comps, entry, ends = _parse_hlo(hlo_text)
  if entry is None:
    return 0.0, 0.0, []
  costs, trips = {}, []

  def once(body):  # the analysis of the body as a module of its own (loops inside: once)
    if body not in costs:
      keep = set(_reachable(comps, body))
      text = "\n".join(["HloModule loop_body"] + [
          "\n".join([("ENTRY " if name == body else "") + ends[name][0].removeprefix("ENTRY "),
                     *comps[name], ends[name][1]]) for name in comps if name in keep])
      costs[body] = None
      for attempt in (text, "\n".join(map(_neutral_async, text.splitlines()))):
        try:
          cost = _module_cost(attempt)
        except Exception:  # noqa: BLE001, S112 (an op the generic parser does not know)
          continue
        costs[body] = (cost.get("flops", 0.0), cost.get("bytes accessed", 0.0))
        break
    return costs[body]

  def added(computation):  # what the loops in it (and in what it calls) add to counting once
    flops = moved = 0.0
    for body, _, line in (w for c in _called(comps, computation) for w in _whiles(comps[c])):
      times, cost = trip_count(line, comps), once(body)
      if cost is None:
        times = None
      trips.append(times)
      if times is None:
        continue
      inner = added(body)
      flops += (times - 1) * cost[0] + times * inner[0]
      moved += (times - 1) * cost[1] + times * inner[1]
    return flops, moved

  flops, moved = added(entry)
  return flops, moved, trips


_ASYNC = re.compile(r" async-(?:start|update|done)\(")


def _neutral_async(line: str) -> str:
  """An async-start/update/done instruction as a custom call on the same operands: TPU
  programs hand work to the SparseCore with async ops the generic HLO parser refuses."""
  m = _ASYNC.search(line)
  if not m:
    return line
  depth, i = 1, m.end()
  while depth and i < len(line):
    depth += {"(": 1, ")": -1}.get(line[i], 0)
    i += 1
  return (line[:m.start()] + " custom-call(" + line[m.end():i - 1]
          + '), custom_call_target="zoo_plan_async"')


def _reachable(comps: dict[str, list[str]], computation: str) -> list[str]:
  """`computation` and every computation it refers to, directly or not."""
  out, todo = set(), [computation]
  while todo:
    name = todo.pop()
    if name in out or name not in comps:
      continue
    out.add(name)
    for line in comps[name]:
      todo += [n for n in _NAME.findall(line) if n in comps]
  return list(out)


def _called(comps: dict[str, list[str]], computation: str) -> list[str]:
  """`computation` and what it calls (not through a loop), which run once per run of it."""
  out, todo = [], [computation]
  while todo:
    name = todo.pop()
    if name in out or name not in comps:
      continue
    out.append(name)
    for line in comps[name]:
      for one, several in _CALLS.findall(line):
        todo += [one] if one else _NAME.findall(several)
  return out


@dataclasses.dataclass
class Plan:
  config_name: str
  topology: str  # the compiler's form, or "local"
  chip: str
  chips: int
  slices: int
  mesh: dict
  fits: bool | None
  hbm_bytes: int | None  # what the compiler lets a program use per chip
  per_chip_bytes: dict
  flops_per_chip: float | None  # the compiler's, loops at their trip counts
  # what attention kernels (splash, cuDNN) compute, which the compiler does not count: the
  # model's causal attention FLOPs as zoo's MFU counts them; 0 without such kernels
  kernel_flops_per_chip: float
  model_flops_per_chip: float
  hbm_bytes_per_chip: float | None  # bytes accessed, the compiler's, loops at their trip counts
  loop_trips: list  # the trip count of each loop in the step (None: unknown, counted once)
  # The step-time estimate (estimate_step): {"compute", "hbm", "collectives"} seconds and the
  # largest of them, with the MFU that step time implies; None without a known chip.
  step_seconds: dict | None
  estimated_step_seconds: float | None
  estimated_mfu: float | None
  collectives: dict
  compile_seconds: float
  batch_per_chip: float
  lora: bool
  largest_allocations: list  # the compiler's largest buffers: bytes, values, shapes
  verdict: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _local_chip(devices) -> Chip | None:
  kind = devices[0].device_kind
  return next((c for c in CHIPS.values() if kind in c.device_kinds), None)


def _abstract_args(trainer: Trainer) -> tuple:
  # the LoRA base and a DPO reference tree, as shapes (build's load_base=False)
  return (trainer.abstract_state, trainer.abstract_batch(), *trainer.frozen)


def _sequences_per_chip(run) -> float:
  """Sequences of the global batch on each chip: the batch over the mesh axes that split it."""
  return run.config.data.batch_size / sharding.batch_ways(run.mesh, run.rules)


def _compile(trainer: Trainer, args: tuple):
  """(the compiled step or None, the compiled program's HLO text, its largest allocations,
  None or (required, available) bytes per chip when the TPU compiler refuses the step for lack
  of memory, seconds taken).

  The compiler writes the optimized program's text itself (jaxlib cannot always read back what
  libtpu compiled, so `Compiled.as_text()` is no way to get it)."""
  start = time.perf_counter()
  with sharding.use(trainer.run.mesh, trainer.run.rules), \
       tempfile.TemporaryDirectory(prefix="zoo-plan-") as dump:
    lowered = trainer.train_step.lower(*args)
    options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True,
               "xla_dump_hlo_module_re": "train_step", "xla_dump_hlo_pass_re": ""}
    try:
      compiled, refused = lowered.compile(compiler_options=options), None
    except Exception as e:  # noqa: BLE001 (the compiler's errors have no narrower type)
      refused = _oom_figures(str(e))
      if refused is None:
        raise
      compiled = None
    seconds = time.perf_counter() - start
    hlo = _read_dump(dump, "after_optimizations.txt")
    report = _read_dump(dump, "after_optimizations-memory-usage-report.txt")
  return compiled, hlo, largest_allocations(report), refused, seconds


def _read_dump(directory: str, suffix: str) -> str:
  """The text of the train step's dump file ending in `suffix` ("" if the compiler wrote none)."""
  found = glob.glob(os.path.join(directory, f"*train_step*.{suffix}"))
  if not found:
    return ""
  with open(found[0], encoding="utf-8") as f:
    return f.read()


_ALLOCATION = re.compile(r"^\s*[\d.]+[KMGT]?i?B\(\s*\d+%\);\s*([\d.]+[KMGT]?i?B);\s*\d+;\s*(\d+);\s*(.*)$")


def largest_allocations(report: str, count: int = 5) -> list[dict]:
  """The `count` largest buffers of the compiler's memory-usage report (written whether the
  step fits or not): {"bytes", "values" (how many values share the buffer over the program),
  "shapes" (theirs, as the compiler lists them)}."""
  out = []
  for line in report.splitlines():
    m = _ALLOCATION.match(line)
    if m:
      out.append({"bytes": _bytes(m.group(1).replace("iB", "").rstrip("B")),
                  "values": int(m.group(2)), "shapes": m.group(3).strip()})
    elif out and not line.strip():
      break  # the first table (the default memory space) ends with a blank line
    if len(out) == count:
      break
  return out


def plan(config, *, topology: str | None = None, slices: int = 1, config_name: str = "config"
         ) -> Plan:
  """Compiles `config`'s train step for `topology` (None: this host's devices) and reports."""
  if topology is None:
    if slices != 1:
      raise ZooError("--slices needs --topology")
    devices, topo_name = jax.devices(), "local"
    chip = _local_chip(devices)
  else:
    topo = parse_topology(topology)
    devices, topo_name, chip = topology_devices(topo, slices), topo.compiler_name, topo.chip
  run = prepare(config, workdir="", with_data=False, devices=devices)
  trainer = build(run, load_base=False)
  state, batch, *base = args = _abstract_args(trainer)
  parts = {"parameters": _shard_bytes(state["params"]) + _shard_bytes(base),
           "optimizer": _shard_bytes({k: v for k, v in state.items() if k != "params"}),
           "batch": _shard_bytes(batch)}
  arguments = sum(parts.values())
  hbm = _usable_hbm(devices)
  tokens_per_chip = config.data.batch_size * config.data.seq_len / len(devices)
  model_flops = flops_per_token(run.model_config, config.data.seq_len) * tokens_per_chip
  kernel_flops = 0.0
  if run.attention_impl in ("splash", "cudnn"):  # counting every score less the causal count
    kernel_flops = tokens_per_chip * (
        flops_per_token(run.model_config, config.data.seq_len, causal=False)
        - flops_per_token(run.model_config, config.data.seq_len))
  compiled, hlo, allocations, refused, seconds = _compile(trainer, args)
  flops = moved = terms = step_time = mfu = None
  trips = []
  found_collectives = collectives(hlo, len(devices))  # written even when the step does not fit
  if compiled is None:
    required, hbm = refused
    parts["temporaries"] = max(required - arguments, 0)
    parts["total"] = required
  else:
    memory = compiled.memory_analysis()
    parts["temporaries"] = int(memory.temp_size_in_bytes)
    parts["outputs"] = int(memory.output_size_in_bytes - memory.alias_size_in_bytes)
    parts["code"] = int(memory.generated_code_size_in_bytes)
    # TPU's peak is this sum; the CPU's leaves the temporaries out.
    parts["total"] = max(int(memory.peak_memory_in_bytes),
                         arguments + parts["temporaries"] + parts["outputs"])
    parts["arguments_compiled"] = int(memory.argument_size_in_bytes)
    cost = compiled.cost_analysis() or {}
    # The compiler's analysis counts a loop's body once: add the loops' other trips.
    more_flops, more_bytes, trips = loop_costs(hlo) if hlo else (0.0, 0.0, [])
    flops = cost.get("flops", 0.0) + more_flops or None
    moved = cost.get("bytes accessed", 0.0) + more_bytes or None
    if chip is not None and flops:
      terms, step_time, mfu = estimate_step(chip, flops + kernel_flops, model_flops,
                                            moved or 0.0, found_collectives)
  fits = None if hbm is None else compiled is not None and parts["total"] <= hbm
  result = Plan(config_name, topo_name, chip.name if chip else devices[0].device_kind,
                len(devices), slices, dict(run.mesh.shape), fits, hbm, parts, flops,
                kernel_flops, model_flops, moved, trips, terms, step_time, mfu,
                found_collectives, seconds, _sequences_per_chip(run), trainer.lora is not None,
                allocations, "")
  result.verdict = verdict(result, config)
  return result


def estimate_step(chip: Chip, flops: float, model_flops: float, hbm_bytes: float,
                  found_collectives: dict) -> tuple[dict, float, float]:
  """A step-time estimate from the chip's public figures: ({"compute", "hbm", "collectives"}
  seconds, their largest, the MFU it implies). compute: `flops` (the compiler's, with what
  the attention kernels compute), or the model's where they are more, over the chip's peak
  bf16 FLOP/s; hbm: the bytes the compiler says the step reads and writes over the HBM
  bandwidth; collectives: the bytes each chip sends for the step's collectives (ring traffic,
  `collectives`) over its interconnect bandwidth. The step takes the largest, as if the other
  two were hidden under it (XLA overlaps collectives with compute, and a fused kernel's memory
  traffic with its arithmetic): an estimate, not a measurement, and optimistic where they do
  not overlap."""
  traffic = sum(c["traffic"] for c in found_collectives.values())
  terms = {"compute": max(flops, model_flops) / chip.peak_flops,
           "hbm": hbm_bytes / chip.hbm_bandwidth,
           "collectives": traffic / chip.ici_bandwidth}
  step = max(terms.values())
  return terms, step, model_flops / (chip.peak_flops * step)


def verdict(p: Plan, config) -> str:
  """One line: whether it fits and, when it does not, what to change."""
  parts = p.per_chip_bytes
  if p.fits is None:
    return (f"needs {_gib(parts['total']).strip()} per device; this backend does not say how "
            "much memory it has")
  if p.fits:
    return (f"fits: {_gib(parts['total']).strip()} of {_gib(p.hbm_bytes).strip()} per chip "
            f"({_gib(p.hbm_bytes - parts['total']).strip()} headroom)")
  state = ("parameters", "optimizer")
  if parts["parameters"] + parts["optimizer"] > p.hbm_bytes:  # the state alone is too big
    largest = max(state, key=parts.get)
  else:
    largest = max((*state, "batch", "temporaries"), key=parts.get)
  fixes = {
    "temporaries": (f"fewer sequences per chip (data.batch_size: now {p.batch_per_chip:g} per "
                    f"chip), gradient accumulation (train.grad_accum: now "
                    f"{config.train.grad_accum}), a remat policy that keeps less (remat: now "
                    f"{config.remat}), or more chips"),
    "parameters": ("more chips on the fsdp axis (mesh.fsdp), tensor parallelism (mesh.tensor), "
                   "or LoRA / QLoRA (lora.rank, lora.quantize)"),
    "optimizer": ("more chips on the fsdp axis (mesh.fsdp), a smaller optimizer state "
                  "(optimizer.name=adafactor), or LoRA (lora.rank)"),
    "batch": "fewer sequences per chip (data.batch_size) or shorter ones (data.seq_len)",
  }
  return (f"does not fit: needs {_gib(parts['total']).strip()} per chip of "
          f"{_gib(p.hbm_bytes).strip()}; the largest part is {largest} "
          f"({_gib(parts[largest]).strip()}); to fit: {fixes[largest]}")


def _gib(n) -> str:
  if n is None:
    return "-"
  return f"{n / GiB:8.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:8.2f} MiB"


def _flops(n) -> str:
  if n is None:
    return "-"
  return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3g} GFLOP"


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def _trips(trips: list) -> str:
  if not trips:
    return ""
  shown = ", ".join("?" if t is None else str(t) for t in trips)
  return f": {shown}" + ("; ? counted once" if None in trips else "")


def format_plan(p: Plan) -> str:
  """The plan as a table for a terminal."""
  lines = [f"plan for {p.config_name} on {p.topology} ({p.chips} {p.chip} chips"
           f"{f', {p.slices} slices' if p.slices > 1 else ''}; mesh "
           f"{' x '.join(f'{k} {v}' for k, v in p.mesh.items())}"
           f"{'; LoRA' if p.lora else ''})",
           f"  {p.batch_per_chip:g} sequences per chip"]
  lines.append("memory per chip (the state and batch: their arrays' bytes by their shardings; "
               "temporaries, total and HBM: from the compiler):")
  for key in ("parameters", "optimizer", "batch", "temporaries", "outputs", "code", "total"):
    if key in p.per_chip_bytes:
      lines.append(f"  {key:12s}{_gib(p.per_chip_bytes[key])}")
  lines.append(f"  {'HBM':12s}{_gib(p.hbm_bytes)}")
  lines.append("compute per chip and step:")
  lines.append(f"  {'compiled':14s}{_flops(p.flops_per_chip)} (XLA's cost analysis, loops at their "
               f"trip counts{_trips(p.loop_trips)})")
  if p.kernel_flops_per_chip:
    lines.append(f"  {'attention':14s}{_flops(p.kernel_flops_per_chip)} (in attention kernels, "
                 "which the compiler does not count: zoo's causal count)")
  lines.append(f"  {'model':14s}{_flops(p.model_flops_per_chip)} (as zoo's MFU counts)")
  lines.append(f"  {'HBM traffic':14s}{_gib(p.hbm_bytes_per_chip).strip()} (bytes accessed, XLA's "
               "cost analysis, loops at their trip counts)")
  if p.estimated_step_seconds is not None:
    chip = next((c for c in CHIPS.values() if c.name == p.chip), None)
    t = p.step_seconds
    lines.append("step time estimate (the largest of the three, as if the others overlapped "
                 "with it; from the chip's public figures, not a measurement):")
    lines.append(f"  {'compute':14s}{_ms(t['compute'])} (FLOPs at "
                 f"{chip.peak_flops / 1e12:g} TFLOP/s)")
    lines.append(f"  {'HBM':14s}{_ms(t['hbm'])} (traffic at {chip.hbm_bandwidth / 1e9:g} GB/s)")
    lines.append(f"  {'collectives':14s}{_ms(t['collectives'])} (bytes sent at "
                 f"{chip.ici_bandwidth / 1e9:.4g} GB/s)")
    lines.append(f"  {'step':14s}{_ms(p.estimated_step_seconds)}: MFU {p.estimated_mfu:.1%}")
  lines.append("collectives per step (count, result bytes per chip, bytes each chip sends; "
               "the TPU compiler may gather as an all-reduce of zero-padded shards):")
  for kind, c in p.collectives.items():
    if c["count"]:
      lines.append(f"  {kind:19s}{c['count']:5d}  {_gib(c['bytes'])}  {_gib(c['traffic'])}")
  if p.largest_allocations:
    lines.append("largest buffers (from the compiler's memory report: size, values sharing "
                 "it over the program, their shapes):")
    for a in p.largest_allocations:
      shapes = a["shapes"] if len(a["shapes"]) <= 70 else a["shapes"][:67] + "..."
      lines.append(f"  {_gib(a['bytes'])}  {a['values']:4d}  {shapes}")
  lines.append(f"compiled in {p.compile_seconds:.1f} s")
  lines.append(p.verdict)
  return "\n".join(lines)
