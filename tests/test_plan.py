"""`zoo plan`: the train step compiled by the real TPU compiler (libtpu) for small slices, with
no TPU attached; its memory parts checked against what the shardings and the model's shape
imply, computed here by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="zoo plan's TPU compiles need libtpu (zoo[tpu])")

import numpy as np  # noqa: E402

import zoo  # noqa: E402
from zoo.cli import REPO_ROOT, main  # noqa: E402
from zoo.convert.random_init import init_checkpoint  # noqa: E402
from zoo.errors import ZooError  # noqa: E402
from zoo.layers.quant import is_quantized, nbytes, quantize_leaf  # noqa: E402
from zoo.models.llama import params_of  # noqa: E402
from zoo.models.presets import get_preset  # noqa: E402
from zoo.plan import CHIPS, collectives, loop_costs, parse_topology, plan  # noqa: E402
from zoo.train.config import load_config  # noqa: E402

SMALL = "configs/default.py:shrink"  # hidden 64, 2 layers, vocab 512, 8 x 64 tokens
# Every field of a batch is 4 bytes a token (tokens, targets, positions, segment ids, weights).
BATCH_BYTES_PER_TOKEN = 5 * 4


def small_model():
  return get_preset("llama3_8b", vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("name, compiler_name, chips", [
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v4-128", "v4:4x4x4", 64),
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-128", "v5p:4x4x4", 64), ("v5p-1024", "v5p:8x8x8", 512),
    ("v5litepod-16", "v5e:4x4", 16), ("v5e-16", "v5e:4x4", 16), ("v5e-8", "v5e:2x4", 8),
    ("v6e-256", "v6e:16x16", 256), ("v6e-1", "v6e:1x1", 1), ("v5p:4x4x8", "v5p:4x4x8", 128),
])
def test_cloud_names_map_to_the_published_slice_shapes(name, compiler_name, chips):
  # The shapes Cloud TPU's v4, v5e, v5p and v6e pages list for these accelerator types.
  topo = parse_topology(name)
  assert (topo.compiler_name, topo.chips) == (compiler_name, chips)


@pytest.mark.parametrize("name", ["v5p-7", "v5e-12", "v7-8", "tpu-8", "v5p:4x4", "v5e:2x2x2",
                                  "v4-24"])
def test_bad_topology_names_are_one_line_errors(name):
  with pytest.raises(ZooError) as e:
    parse_topology(name)
  assert "\n" not in str(e.value) and name in str(e.value)


def test_fsdp_memory_parts_are_what_the_shardings_imply():
  # FSDP over 4 chips: every weight matrix has an embed dimension (split 4 ways); the norm
  # vectors are replicated. AdamW keeps two statistics shaped like the parameters.
  model = small_model()
  n, norms = model.num_params(), (2 * model.num_layers + 1) * model.hidden_size
  params = (n - norms) * 4 // 4 + norms * 4
  p = plan(load_config(SMALL, {"mesh.data": 1, "mesh.fsdp": -1}), topology="v5e:2x2")
  parts = p.per_chip_bytes
  assert (p.chips, p.mesh, p.chip) == (4, {"data": 1, "fsdp": 4, "tensor": 1}, "v5e")
  assert parts["parameters"] == params
  assert 0 <= parts["optimizer"] - 2 * params <= 64  # plus a few scalars (counts, step, rng)
  assert parts["batch"] == 8 * 64 * BATCH_BYTES_PER_TOKEN // 4
  # The compiler's arguments hold the same arrays, padded to the TPU's tiles.
  assert parts["arguments_compiled"] >= parts["parameters"] + parts["optimizer"] + parts["batch"]
  assert p.fits is True and p.hbm_bytes == int(15.75 * 2**30)
  assert parts["total"] <= p.hbm_bytes and p.flops_per_chip > 0 and p.compile_seconds > 0
  # FSDP gathers the weights and scatters the gradients.
  assert p.collectives["all-gather"]["count"] > 0
  assert p.collectives["reduce-scatter"]["count"] + p.collectives["all-reduce"]["count"] > 0
  assert 0 < p.estimated_mfu < 1
  assert all(a["bytes"] <= parts["total"] for a in p.largest_allocations)


def test_data_parallel_batch_halves_when_the_data_axis_doubles_and_slices_add_chips():
  model = small_model()
  four = plan(load_config(SMALL), topology="v5p:2x2x1")
  eight = plan(load_config(SMALL), topology="v5e:2x4")
  two_slices = plan(load_config(SMALL), topology="v5p:2x2x1", slices=2)
  assert four.mesh["data"] == 4 and eight.mesh["data"] == 8
  assert four.per_chip_bytes["batch"] == 2 * eight.per_chip_bytes["batch"] \
      == 8 * 64 * BATCH_BYTES_PER_TOKEN // 4
  # Data parallel: every chip holds every parameter; gradients are all-reduced, nothing gathered.
  assert four.per_chip_bytes["parameters"] == model.num_params() * 4
  assert four.collectives["all-reduce"]["count"] > 0
  assert four.collectives["all-gather"]["count"] == 0
  assert (two_slices.chips, two_slices.slices, two_slices.mesh["data"]) == (8, 2, 8)
  assert two_slices.per_chip_bytes["batch"] == eight.per_chip_bytes["batch"]


def test_gradient_accumulation_keeps_the_steps_flops():
  # The same batch in two microbatches: the same matmuls, though XLA's cost analysis counts the
  # microbatch loop's body once.
  one = plan(load_config(SMALL), topology="v5e:2x2")
  two = plan(load_config(SMALL, {"train.grad_accum": 2}), topology="v5e:2x2")
  assert two.flops_per_chip == pytest.approx(one.flops_per_chip, rel=0.1)
  assert two.model_flops_per_chip == one.model_flops_per_chip


def test_the_loss_chunk_and_remat_shrink_the_temporaries():
  # Per chip, 8 rows of 512 tokens over a 32000-token vocabulary: float32 logits of 500 MiB,
  # which the chunked loss never holds whole; remat full keeps each layer's input only.
  shape = {"model.vocab_size": 32000, "data.seq_len": 512, "model.max_position_embeddings": 512,
           "data.batch_size": 32, "dtype": "bfloat16"}

  def temporaries(**more):
    p = plan(load_config("configs/default.py", {**shape, **more}), topology="v5e:2x2")
    return p.per_chip_bytes["temporaries"]

  whole = temporaries()
  assert whole - temporaries(**{"train.loss_chunk": 128}) > 0.9 * 8 * 512 * 32000 * 4
  assert temporaries(remat="full") < whole


def test_local_devices_give_the_compilers_exact_arguments():
  # The 8 host CPU devices of the tests: no tile padding, so our parts add up to the
  # compiler's own argument size exactly.
  p = plan(load_config(SMALL, {"mesh.data": 2, "mesh.fsdp": -1}))
  parts = p.per_chip_bytes
  assert (p.topology, p.chips, p.mesh) == ("local", 8, {"data": 2, "fsdp": 4, "tensor": 1})
  assert parts["parameters"] + parts["optimizer"] + parts["batch"] == parts["arguments_compiled"]
  assert p.fits is None and p.hbm_bytes is None and p.estimated_mfu is None


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("plan") / "base")
  init_checkpoint("tiny_llama3", path, to="zoo")
  return path


def test_lora_and_qlora_plans_train_only_the_adapters(base_checkpoint):
  from zoo.convert.checkpoint import Checkpoint  # noqa: PLC0415
  c = Checkpoint(base_checkpoint).config
  rank = 8
  # q_proj and v_proj adapters: A [hidden, rank] and B [rank, out] on every layer, float32.
  adapters = c.num_layers * rank * (2 * c.hidden_size + c.num_heads * c.head_dim
                                    + c.num_kv_heads * c.head_dim) * 4
  config = f"configs/lora.py:init_from={base_checkpoint},rank={rank},targets=q_proj+v_proj"
  data_parallel = {"mesh.data": -1, "mesh.fsdp": 1}  # every chip holds every weight
  lora = plan(load_config(config, data_parallel), topology="v5e:2x2")
  qlora = plan(load_config(config + ",quantize=nf4", data_parallel), topology="v5e:2x2")
  assert lora.lora and qlora.lora and lora.fits and qlora.fits
  for p in (lora, qlora):
    assert 0 <= p.per_chip_bytes["optimizer"] - 2 * adapters <= 64
  # Data parallel: the frozen base and the adapters are whole on every chip.
  assert lora.per_chip_bytes["parameters"] == c.num_params() * 4 + adapters
  # QLoRA's base as the quantizer stores the checkpoint's real weights (nf4 codes and scales
  # of the linear kernels, the rest in float32), read from the files.
  weights = zoo.load(base_checkpoint)
  stored = 0
  for name, value in params_of(weights).items():
    leaf = quantize_leaf(name, np.asarray(value), "nf4")
    stored += nbytes(leaf) if is_quantized(leaf) else value.size * 4
  assert qlora.per_chip_bytes["parameters"] == stored + adapters
  assert stored < c.num_params() * 4 / 2


def run_cli(capsys, *args):
  code = main(["plan", *args])
  out, err = capsys.readouterr()
  return code, out, err


def test_a_config_that_does_not_fit_exits_1_naming_the_temporaries(capsys):
  code, out, _ = run_cli(capsys, "--config", "configs/default.py", "--topology", "v5e-4",
                         "--config.data.batch_size=4096", "--config.data.seq_len=512", "--json")
  result = json.loads(out)
  assert code == 1 and result["fits"] is False
  assert result["per_chip_bytes"]["total"] > result["hbm_bytes"]
  assert "largest part is temporaries" in result["verdict"]
  assert "data.batch_size: now 1024 per chip" in result["verdict"]
  # What a refused step still shows: the compiler's largest buffers and the collectives.
  sizes = [a["bytes"] for a in result["largest_allocations"]]
  assert len(sizes) == 5 and sizes == sorted(sizes, reverse=True)
  assert 0 < sizes[0] <= result["per_chip_bytes"]["total"] * 1.01
  assert result["collectives"]["all-reduce"]["count"] > 0  # data parallel: gradients


def test_parameters_that_do_not_fit_are_named(capsys):
  # One wide layer whose float32 weights alone (17 GiB, on every chip with data parallelism)
  # exceed a v5e chip; adafactor without momentum keeps almost no optimizer state.
  code, out, _ = run_cli(capsys, "--config", "configs/default.py", "--topology", "v5e-4",
                         "--config.model.num_layers=1", "--config.model.hidden_size=8192",
                         "--config.model.intermediate_size=180224",
                         "--config.optimizer.name=adafactor", "--config.optimizer.b1=0",
                         "--config.data.batch_size=4")
  assert code == 1
  assert "does not fit" in out and "the largest part is parameters" in out
  assert "total and HBM: from the compiler" in out and "not a measurement" not in out


def test_the_table_says_where_its_figures_come_from(capsys):
  code, out, _ = run_cli(capsys, "--config", SMALL, "--topology", "v6e-4")
  assert code == 0
  assert "on v6e:2x2 (4 v6e chips" in out and "from the compiler" in out
  assert "step time estimate" in out and "not a measurement" in out and out.strip().endswith(
      "headroom)")


@pytest.mark.parametrize("args, message", [
    (["--topology", "v5p-7"], "two per chip"),
    (["--topology", "v5p-24"], "no standard v5p slice has 12 chips"),
    (["--topology", "v9-8"], "unknown topology 'v9-8'"),
    (["--topology", "v5e-4", "--config.mesh.data=3"], "needs 3 devices, but there are 4"),
    (["--topology", "v5e-4", "--slices", "2", "--config.mesh.data=1",
      "--config.mesh.fsdp=-1"], "the data axis spans the 2 slices"),
    (["--slices", "2"], "--slices needs --topology"),
    (["--topology", "v5e-4", "--config.data.batch_size=6"], "batch size 6 is not divisible"),
])
def test_bad_plans_are_one_line_errors(capsys, args, message):
  code, out, err = run_cli(capsys, "--config", SMALL, *args)
  assert code == 2 and out == ""
  assert message in err and err.count("\n") == 1


def test_missing_libtpu_names_the_install_command(tmp_path):
  # A libtpu package that cannot be imported, ahead of the real one on the path.
  fake = tmp_path / "libtpu"
  fake.mkdir()
  (fake / "__init__.py").write_text("raise ImportError('libtpu is not installed')\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  proc = subprocess.run([sys.executable, "-m", "zoo.cli", "plan", "--config", SMALL,
                         "--topology", "v5e-4"], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2 and proc.stdout == ""
  assert "pip install -e '.[tpu]'" in proc.stderr and proc.stderr.count("\n") == 1


def test_collectives_are_counted_from_the_hlo_text():
  hlo = """
  %all-gather.1 = bf16[8,128]{1,0} all-gather(bf16[2,128]{1,0} %p0), dimensions={0}
  %ag-start = (f32[4,16]{1,0}, f32[16,16]{1,0}) all-gather-start(f32[4,16]{1,0} %p1)
  %ag-done = f32[16,16]{1,0} all-gather-done(%ag-start)
  %rs = f32[4]{0} reduce-scatter(f32[16]{0} %p2), dimensions={0}
  %ar = (f32[10]{0}, s32[]) all-reduce(f32[10]{0} %a, s32[] %b), to_apply=%sum
  %fusion = f32[3]{0} fusion(f32[3]{0} %all-reduce.7), kind=kLoop
  """
  found = collectives(hlo, chips=4)
  # A ring of 4 chips: each sends 3/4 of a gathered result, 3 shards of a scattered one, and
  # twice 3/4 of an all-reduced one.
  assert found["all-gather"] == {"count": 2, "bytes": 8 * 128 * 2 + 16 * 16 * 4,
                                 "traffic": 0.75 * (8 * 128 * 2 + 16 * 16 * 4)}
  assert found["reduce-scatter"] == {"count": 1, "bytes": 16, "traffic": 3 * 16}
  assert found["all-reduce"] == {"count": 1, "bytes": 44, "traffic": 1.5 * 44}
  assert found["all-to-all"]["count"] == found["collective-permute"]["count"] == 0


# A step whose loop runs its body 3 times (JAX's scan: a counter from 0 while i < 3), the body
# gathering over groups of 2 chips and calling a computation that all-reduces.
LOOP_HLO = """HloModule step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%inner (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%x), replica_groups=[1,4]<=[4], to_apply=%add
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %v = f32[4]{0} get-tuple-element(%p), index=1
  %ag = f32[8]{0} all-gather(%v), replica_groups={{0,1},{2,3}}, dimensions={0}
  %half = f32[4]{0} slice(%ag), slice={[0:4]}
  %r = f32[4]{0} call(%half), to_apply=%inner
  ROOT %t = (s32[], f32[4]{0}) tuple(%next, %r)
}

%cond (q: (s32[], f32[4])) -> pred[] {
  %q = (s32[], f32[4]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

ENTRY %main (arg: f32[4]) -> f32[4] {
  %arg = f32[4]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %arg)
  %loop = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4]{0} get-tuple-element(%loop), index=1
}
"""


def test_a_loops_collectives_and_costs_count_once_per_trip():
  found = collectives(LOOP_HLO, chips=4)
  assert found["all-gather"] == {"count": 3, "bytes": 3 * 32, "traffic": 3 * 32 / 2}
  assert found["all-reduce"] == {"count": 3, "bytes": 3 * 16, "traffic": 3 * 16 * 1.5}
  # The compiler's cost analysis counts the body once; the two other trips are added.
  extra_flops, extra_bytes, trips = loop_costs(LOOP_HLO)
  assert trips == [3] and extra_flops > 0 and extra_bytes > 0


def test_the_step_time_estimate_follows_the_work():
  # The estimate (the largest of compute, HBM traffic and collectives at the chip's rates) is a
  # time, below the MFU that would take every FLOP at peak; the same model scanned or unrolled
  # does the same work, and twice the batch takes about twice as long.
  def estimate(**overrides):
    p = plan(load_config(SMALL, overrides), topology="v5e:2x2")
    assert p.estimated_step_seconds == max(p.step_seconds.values()) > 0
    assert math.isfinite(p.estimated_step_seconds) and 0 < p.estimated_mfu < 1
    assert p.estimated_mfu == pytest.approx(
        p.model_flops_per_chip / (CHIPS["v5e"].peak_flops * p.estimated_step_seconds))
    return p

  scanned = estimate(**{"model.num_layers": 4, "scan_layers": True})
  unrolled = estimate(**{"model.num_layers": 4, "scan_layers": False})
  assert scanned.flops_per_chip == pytest.approx(unrolled.flops_per_chip, rel=0.05)
  assert scanned.hbm_bytes_per_chip == pytest.approx(unrolled.hbm_bytes_per_chip, rel=0.2)
  assert scanned.loop_trips == [4, 4] and unrolled.loop_trips == []
  assert scanned.collectives["all-reduce"]["bytes"] == unrolled.collectives["all-reduce"]["bytes"]
  assert scanned.estimated_step_seconds == pytest.approx(unrolled.estimated_step_seconds,
                                                         rel=0.2)
  one, two = estimate(**{"data.batch_size": 32}), estimate(**{"data.batch_size": 64})
  assert 1.6 < two.estimated_step_seconds / one.estimated_step_seconds < 2.1
  assert two.flops_per_chip == pytest.approx(2 * one.flops_per_chip, rel=0.05)


@pytest.mark.parametrize("command, flag", [("plan", "--topology"), ("train", "--workdir")])
def test_help_lists_the_flags(capsys, command, flag):
  assert main([command, "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: zoo {command}") and flag in out and "--config" in out
