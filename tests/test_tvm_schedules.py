"""The TVM kernels (tvm_schedules) against the kernels' numerics reference, compiled here on the spot, and a
small real MetaSchedule tuning run whose database the build compiles."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sherry_export.formats import PackedWeight, pack, reference_matmul
from sherry_export.quant import absmean_ternarize, sherry_ternarize
from tvm_schedules.layout import Shape, activations, repack

tvm = pytest.importorskip("tvm")
from tvm_schedules.intrinsics import decode_name, dot_name  # noqa: E402
from tvm_schedules.kernels import (  # noqa: E402
    BLOCK_M,
    BLOCK_ORDERS,
    BLOCK_ROWS,
    ORDERS,
    Knobs,
    block_knob_space,
    knob_space,
    scheduled_module,
    tile_choices,
)
from tvm_schedules.tune import TARGETS, host_isa  # noqa: E402

ISAS = ["avx2", "avx512"] if host_isa() == "avx512" else ["avx2"]


def packed_weight(fmt: str, k: int, n: int, gs: int, seed: int = 0) -> PackedWeight:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    ternary = sherry_ternarize(weight, gs) if fmt == "sherry" else absmean_ternarize(weight, gs)
    return pack(fmt, ternary, gs)


def run(
    fmt: str, k: int, n: int, gs: int, m: int | None, knobs: Knobs, isa: str = "avx2", rows: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The kernel for ``m`` rows (None: the dynamic-M function; in blocks of ``knobs.rows``), run on ``rows``
    rows."""
    shape = Shape(fmt, k, n, gs)
    return run_module(shape, scheduled_module(shape, m, knobs, isa=isa), rows, isa)


def run_module(shape: Shape, module: tvm.IRModule, m: int, isa: str) -> tuple[np.ndarray, np.ndarray]:
    """The module's ``main`` on ``m`` random rows (one with an outlier) and the int8 reference."""
    fmt, k, n, gs = shape.format, shape.k, shape.n, shape.group_size
    packed = packed_weight(fmt, k, n, gs)
    lib = tvm.compile(module, target=tvm.target.Target(TARGETS[isa]))
    x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    x[0, :3] *= 40  # an outlier: other groups of the row keep their own scale
    ws, scales = activations(shape, x)
    planes, alpha = repack(packed)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (ws, scales, *planes, alpha)), y)
    return y.numpy(), reference_matmul(x, packed, activations="int8")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["sherry", "tl2", "i2s"])
@pytest.mark.parametrize(
    ("k", "n", "gs", "m"), [(256, 64, 128, 1), (320, 96, 128, 1), (320, 32, 64, None), (512, 48, 512, None)]
)
def test_kernel_matches_reference_bit_exactly(fmt: str, k: int, n: int, gs: int, m: int | None, isa: str) -> None:
    """Exact int dots, then y = Σ_g (α·s)·dot in group order with every product rounded on its own (no
    FMA): the int8 reference's float32 arithmetic, bit for bit. M = 1 and the dynamic-M function
    (Relax's, 3 rows), in both loop orders."""
    order = "quad" if m == 1 else "tile"
    knobs = Knobs(tiles=tile_choices(Shape(fmt, k, n, gs))[-1], unroll=1 if fmt == "tl2" else 2, order=order)
    y, ref = run(fmt, k, n, gs, m, knobs, isa, rows=m or 3)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["sherry", "tl2", "i2s"])
@pytest.mark.parametrize(("order", "rows"), [("block", 4), ("tile", 8), ("block", 12)])
def test_block_function_matches_reference_bit_exactly(fmt: str, order: str, rows: int, isa: str) -> None:
    """The block function (BLOCK_M rows in blocks of ``rows`` that share each decode; what the op calls
    for M >= 16) and its single block (M = ``rows``), in both of its loop orders, with a short last
    group: the int8 reference bit for bit."""
    knobs = Knobs(tiles=2, unroll=1 if fmt == "tl2" else 2, order=order, rows=rows)
    for m in (BLOCK_M, rows):
        y, ref = run(fmt, 320, 96, 128, m, knobs, isa, rows=m)
        np.testing.assert_array_equal(y, ref)


def intrinsic_function(isa: str, fmt: str | None = None, planes: int = 4) -> tvm.IRModule:
    """A small function whose one block is what an intrinsic describes, over several vectors, tensorized
    with it (the way the kernels' schedule applies it): ``fmt``'s decode, or (None) the dot."""
    from tvm.script import tirx as T

    from tvm_schedules.intrinsics import LOOKUP_LANES, VECTOR_LANES, lane_value

    if fmt is not None:
        lanes, planes = LOOKUP_LANES[isa], Shape(fmt, 4, 16, 4).lanes_per_code

        @T.prim_func(s_tir=True)
        def decode(C: T.Buffer((2, lanes), "uint8"), Out: T.Buffer((2, planes, lanes), "uint8")) -> None:
            for v, p, i in T.grid(2, planes, lanes):
                with T.sblock("decode"):
                    vv, vp, vi = T.axis.remap("SSS", [v, p, i])
                    Out[vv, vp, vi] = lane_value(fmt, vp, C[vv, vi])

        sch = tvm.s_tir.Schedule(decode)
        sch.tensorize(sch.get_loops(sch.get_sblock("decode"))[1], decode_name(fmt, isa))
        return sch.mod
    vw = VECTOR_LANES[isa]

    @T.prim_func(s_tir=True)
    def dot(
        D: T.Buffer((3, planes, 4 * vw), "uint8"), X: T.Buffer((3, 4 * planes), "int8"), C: T.Buffer((3, vw), "int32")
    ) -> None:
        for v, p, r, j in T.grid(3, planes, vw, 4):
            with T.sblock("dot"):
                vv, vp, vr, vj = T.axis.remap("SRSR", [v, p, r, j])
                with T.init():
                    C[vv, vr] = 0
                C[vv, vr] = C[vv, vr] + T.Cast("int32", D[vv, vp, vr * 4 + vj]) * T.Cast("int32", X[vv, vp * 4 + vj])

    sch = tvm.s_tir.Schedule(dot)
    block = sch.get_sblock("dot")
    _, p, _, _ = sch.get_loops(block)
    sch.decompose_reduction(block, p)
    sch.tensorize(p, dot_name(isa, planes))
    return sch.mod


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["sherry", "tl2"])
def test_decode_intrinsic_is_the_format_decode_table(fmt: str, isa: str) -> None:
    """Out[p, i] = weight + 1 at lane p of code C[i], for every 5-bit code, against the format's numpy
    decode table (vpermb; vpshufb + blend on avx2)."""
    from sherry_export.formats import SHERRY_DECODE, TL2_DECODE
    from tvm_schedules.intrinsics import LOOKUP_LANES

    lanes = LOOKUP_LANES[isa]
    lib = tvm.compile(intrinsic_function(isa, fmt), target=tvm.target.Target(TARGETS[isa]))
    codes = np.arange(2 * lanes, dtype=np.uint8).reshape(2, lanes) % 32  # every code, at every position
    np.random.default_rng(5).shuffle(codes.reshape(-1))
    table = (SHERRY_DECODE if fmt == "sherry" else TL2_DECODE).astype(np.int64) + 1  # [32, lanes per code]
    out = tvm.runtime.tensor(np.zeros((2, table.shape[1], lanes), np.uint8))
    lib["main"](tvm.runtime.tensor(codes), out)
    np.testing.assert_array_equal(out.numpy(), table[codes].transpose(0, 2, 1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("planes", [3, 4])
def test_dot_intrinsic_is_the_exact_integer_dot(isa: str, planes: int) -> None:
    """C[r] += Σ_{p, j} D[p, 4r + j] · X[4p + j] exactly for weights + 1 (0..2) and int8 activations, the
    extremes included (AVX2 adds the planes in int16 first)."""
    from tvm_schedules.intrinsics import VECTOR_LANES

    vw = VECTOR_LANES[isa]
    lib = tvm.compile(intrinsic_function(isa, planes=planes), target=tvm.target.Target(TARGETS[isa]))
    rng = np.random.default_rng(6)
    d = rng.integers(0, 3, (3, planes, 4 * vw), dtype=np.uint8)
    x = rng.integers(-127, 128, (3, 4 * planes), dtype=np.int8)
    d[0], x[0] = 2, -127  # the largest magnitudes: |Σ| = 4 · 2 · 127 per plane
    d[1], x[1] = 2, 127
    c = tvm.runtime.tensor(np.full((3, vw), 7, np.int32))
    lib["main"](tvm.runtime.tensor(d), tvm.runtime.tensor(x), c)
    expected = np.einsum("vprj,vpj->vr", d.reshape(3, planes, vw, 4).astype(np.int64), x.reshape(3, planes, 4))
    np.testing.assert_array_equal(c.numpy(), expected)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["sherry", "tl2", "i2s"])
def test_schedule_tensorizes_and_allocates_nothing(fmt: str, isa: str) -> None:
    """The schedule applies the dot intrinsic (and for sherry and tl2 the decode) as trace instructions,
    the code has their instructions, and even the largest step (8 tiles, 4 quads unrolled; the block
    function's rows, the dynamic-M function) keeps its intermediates on the stack: no workspace call."""
    from tvm_schedules.kernels import prim_func, schedule, workload

    shape = Shape(fmt, 256, 128, 128)
    knobs = Knobs(tiles=8, unroll=4 if fmt != "tl2" else 1, order="tile")
    sch = tvm.s_tir.Schedule(workload(shape, 1, isa))
    schedule(sch, knobs.order, knobs)
    used = {str(inst.attrs[0]) for inst in sch.trace.insts if inst.kind.name == "Tensorize"}
    assert used == {dot_name(isa, shape.lanes_per_code)} | ({decode_name(fmt, isa)} if fmt != "i2s" else set())
    mnemonics = {"avx512": ["vpdpbusd", "vpermb"], "avx2": ["vpmaddubsw", "vpmaddwd", "vpshufb"]}[isa]
    for m, point in ((1, knobs), (BLOCK_M, replace(knobs, order="block", rows=max(BLOCK_ROWS))), (None, knobs)):
        lib = tvm.compile(
            tvm.IRModule({"main": prim_func(shape, m, point, isa)}), target=tvm.target.Target(TARGETS[isa])
        )
        assert "TVMBackendAllocWorkspace" not in lib.mod.inspect_source("ll")
        asm = lib.mod.inspect_source("asm")
        for mnemonic in mnemonics if fmt != "i2s" else mnemonics[:1]:
            assert mnemonic in asm, mnemonic


def test_nan_row_and_zero_row() -> None:
    packed = packed_weight("sherry", 256, 32, 128)
    shape = Shape("sherry", 256, 32, 128)
    lib = tvm.compile(scheduled_module(shape, None, Knobs(1, 2), isa="avx2"), target=tvm.target.Target(TARGETS["avx2"]))
    x = np.random.default_rng(2).standard_normal((3, 256), dtype=np.float32)
    x[1, 5] = np.nan
    x[2] = 0
    ws, scales = activations(shape, x)
    planes, alpha = repack(packed)
    y = tvm.runtime.tensor(np.zeros((3, 32), np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (ws, scales, *planes, alpha)), y)
    out = y.numpy()
    assert np.isnan(out[1]).all() and (out[2] == 0).all() and np.isfinite(out[0]).all()


def test_repack_bit_width() -> None:
    """A code byte per code: 2 bits per weight for sherry and i2s, 2.67 for tl2 (group 128: 11 quads)."""
    for fmt, bits in (("sherry", 2.0), ("tl2", 2.75), ("i2s", 2.0)):
        packed = packed_weight(fmt, 2048, 128, 128)
        planes, _ = repack(packed)
        assert sum(p.nbytes for p in planes) * 8 / (2048 * 128) == bits  # exactly: no plane missing, none extra


def test_unsupported_n() -> None:
    assert "multiple of 16" in Shape("i2s", 64, 40, 64).supported()
    with pytest.raises(ValueError, match="multiple of 16"):
        repack(packed_weight("i2s", 64, 40, 64))


def test_model_shapes_of_the_shipped_model() -> None:
    from tvm_schedules.tune import model_shapes

    shapes = model_shapes(Path(__file__).resolve().parent.parent / "models" / "sherry-qat-5m")
    assert shapes == [(256, 256, 128), (256, 768, 128), (768, 256, 128)]


def test_knob_space_is_what_the_tuner_samples() -> None:
    """Tiles per step: divisors of the tiles up to 8; unroll: divisors of the quads per group up to 4."""
    space = knob_space(Shape("sherry", 320, 320, 128))  # 20 tiles, 8 quads per group
    every = {Knobs(tiles, unroll, order) for tiles in (1, 2, 4, 5) for unroll in (1, 2, 4) for order in ORDERS}
    assert set(space) == every and len(space) == len(every)  # each combination once
    assert {kn.unroll for kn in knob_space(Shape("tl2", 2048, 512, 128))} == {1}  # 11 quads per group
    with pytest.raises(ValueError, match="do not divide"):
        scheduled_module(Shape("i2s", 256, 64, 128), 1, Knobs(tiles=3, unroll=1))


def test_block_knob_space_is_what_the_block_tuner_samples() -> None:
    """The block function's space: the M = 1 function's tiles and unroll, its own loop orders and rows of
    A per block, each of which cuts BLOCK_M into whole blocks."""
    shape = Shape("sherry", 2048, 8192, 128)
    space = block_knob_space(shape)
    assert len(space) == len(set(space)) == 4 * 3 * len(BLOCK_ORDERS) * len(BLOCK_ROWS)
    assert {kn.rows for kn in space} == set(BLOCK_ROWS) and all(BLOCK_M % r == 0 for r in BLOCK_ROWS)
    with pytest.raises(ValueError, match="do not divide"):
        scheduled_module(shape, BLOCK_M, Knobs(tiles=2, unroll=2, order="block", rows=5))


def test_m1_workload_keeps_the_committed_records() -> None:
    """The M = 1 workload's structural hash is what the committed records key: the build finds them."""
    from tvm_schedules.tune import best_record, database

    for isa in ("avx512", "avx2"):
        db = database(Path(__file__).resolve().parent.parent / "tvm_schedules" / "databases" / isa)
        assert best_record(db, Shape("sherry", 2048, 2048, 128), isa) is not None
        assert best_record(db, Shape("sherry", 2048, 2048, 128), isa, block=True) is not None


def test_each_search_configures_meta_schedule_logging_afresh(tmp_path: Path) -> None:
    """MetaSchedule lists its logger's handlers by name when a search sets up its logs, so an unnamed one
    (pytest's log capture adds two) made every search after the first in one process fail there; the reset
    before each search drops them and the earlier search's handlers."""
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    from tvm_schedules.tune import reset_meta_schedule_logger

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    logger.addHandler(logging.NullHandler())
    with pytest.raises(AttributeError):
        get_loggers_from_work_dir(str(tmp_path / "before"), ["task"])
    reset_meta_schedule_logger()
    get_loggers_from_work_dir(str(tmp_path / "after"), ["task"])
    assert [h.get_name() for h in logger.handlers] == [f"{logger.name}.console", f"{logger.name}.file"]
    reset_meta_schedule_logger()
    assert logger.handlers == [] and logger.level == logging.WARNING


TUNED = Shape("tl2", 320, 64, 128)


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MetaSchedule run: 4 trials of one small tl2 kernel for avx2, its M = 1 function and its block
    function, into a fresh database, with MetaSchedule's logs kept in ``logs/``."""
    from tvm_schedules.tune import tune

    out = tmp_path_factory.mktemp("db")
    [entry] = tune([(TUNED.k, TUNED.n, TUNED.group_size)], "avx2", 4, out, ("tl2",), log_dir=out / "logs")
    assert entry.trials == 4 and entry.tvm_us > 0 and entry.tune_seconds > 0
    assert Knobs(entry.tiles, entry.unroll, entry.order) in knob_space(TUNED)
    assert entry.block_trials == 4 and entry.block_tvm_us and entry.block_rows in BLOCK_ROWS
    assert Knobs(entry.block_tiles, entry.block_unroll, entry.block_order, entry.block_rows) in block_knob_space(TUNED)
    return out


@pytest.mark.slow
def test_the_xgb_cost_model_trains_on_the_measured_candidates(tuned_db: Path) -> None:
    """The search's cost model is MetaSchedule's XGBoost model, and it trains on the measured round (its
    boosting rounds are logged); the random model logs nothing of the kind."""
    logs = "".join(p.read_text() for p in (tuned_db / "logs" / "avx2" / TUNED.key / "logs").glob("*.log"))
    assert "XGB iter   0: tr-p-rmse" in logs
    assert "XGB stopped. Best iteration" in logs


@pytest.mark.slow
def test_tuning_writes_a_metaschedule_database(tuned_db: Path) -> None:
    from tvm_schedules.tune import best_record, database

    files = sorted(p.name for p in (tuned_db / "avx2").iterdir())
    assert files == ["database_tuning_record.json", "database_workload.json", "tuned.json"]
    assert len((tuned_db / "avx2" / "database_tuning_record.json").read_text().splitlines()) == 8
    assert len((tuned_db / "avx2" / "database_workload.json").read_text().splitlines()) == 2  # M = 1 and block
    db = database(tuned_db / "avx2")
    best, block = best_record(db, TUNED, "avx2"), best_record(db, TUNED, "avx2", block=True)
    [entry] = json.loads((tuned_db / "avx2" / "tuned.json").read_text())
    assert entry["tvm_us"] == round(float(np.mean([float(t) for t in best.run_secs])) * 1e6, 2)
    assert entry["block_tvm_us"] == round(float(np.mean([float(t) for t in block.run_secs])) * 1e6, 2)


@pytest.mark.parametrize("bucket", ["m1", "mx", "mb"])
def test_the_database_schedule_matches_reference(tuned_db: Path, bucket: str) -> None:
    """The build's functions: each workload's best trace replayed (M = 1; the block function, BLOCK_M
    rows), and the block function's decisions on one block."""
    from tvm_schedules.build import tuned_functions
    from tvm_schedules.tune import database

    funcs, tuned = tuned_functions(database(tuned_db / "avx2"), TUNED, "avx2", "avx2")
    [entry] = json.loads((tuned_db / "avx2" / "tuned.json").read_text())
    assert (tuned.chunk_rows, tuned.block_rows) == (BLOCK_M, entry["block_rows"])
    assert (tuned.lane_block, tuned.block_lane_block) == (16 * entry["tiles"], 16 * entry["block_tiles"])
    [func] = [f for name, f in funcs.items() if name.endswith(bucket)]
    m = {"m1": 1, "mx": BLOCK_M, "mb": tuned.block_rows}[bucket]
    y, ref = run_module(TUNED, tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), m, "avx2")
    np.testing.assert_array_equal(y, ref)


def test_build_writes_objects_that_need_no_tvm_runtime(tuned_db: Path, tmp_path: Path) -> None:
    """The tuned database → an object exporting the three functions, needing only the error hook; the
    database is read, not changed."""
    from tvm_schedules.build import build

    before = {p.name: p.read_bytes() for p in (tuned_db / "avx2").iterdir()}
    [obj] = build(tuned_db, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tuned_db / "avx2").iterdir()} == before
    symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout.split("\n")
    undefined = {line.split()[-1] for line in symbols if line.strip().startswith("U ")}
    assert undefined == {"TVMFFIErrorSetRaisedFromCStrParts"}
    table = (tmp_path / "out" / "tvm_table.cc").read_text()
    for bucket in ("m1", "mx", "mb"):
        name = f"__tvm_ffi_sherry_tvm_avx2_tl2_k320_n64_g128_{bucket}"
        assert any(line.endswith(" T " + name) for line in symbols)
        assert name in table
    [entry] = json.loads((tuned_db / "avx2" / "tuned.json").read_text())
    # tl2, K, N, group_size, avx2, rows per task (M = 1, block), rows of A per call (mx, mb)
    steps = f"{16 * entry['tiles']}, {16 * entry['block_tiles']}, {BLOCK_M}, {entry['block_rows']}"
    assert f"{{1, 320, 64, 128, 1, {steps}," in table
    # not timed as nodes (sherry tune --verify): auto never takes it
    assert '_mb, 0.0, 0.0, 0.0, 128, 16, "", "", "avx2", 0}' in table
    assert (tmp_path / "out" / "include" / "tvm" / "ffi" / "c_api.h").is_file()


def test_build_without_a_record_says_to_tune(tuned_db: Path, tmp_path: Path) -> None:
    from tvm_schedules.build import build

    db = tmp_path / "db" / "avx2"
    db.mkdir(parents=True)
    [entry] = json.loads((tuned_db / "avx2" / "tuned.json").read_text())
    (db / "tuned.json").write_text(json.dumps([entry | {"n": 32}]))
    with pytest.raises(SystemExit, match=r"no record for tl2_k320_n32_g128's M = 1 .*sherry tune --target avx2"):
        build(tmp_path / "db", tmp_path / "out")


def test_table_carries_the_verified_speedups_and_their_cpu() -> None:
    """Auto mode's inputs in the C++ table: hand-written over TVM node time, M = 1 hot and cold and at
    the batch (0 when not verified), the batch and its regime's fewest rows, and the CPU model that
    measured them; the op decides on the CPU it runs on."""
    from tvm_schedules.build import TunedKernel, table_source

    entry = {"format": "tl2", "k": 320, "n": 64, "group_size": 128, "target": "avx2", "isa": "avx2"}
    names, tuned = {0: ("a_m1", "a_mx", "a_mb")}, {0: TunedKernel(32, 64, 24, 8)}
    assert (
        "{1, 320, 64, 128, 1, 32, 64, 24, 8, __tvm_ffi_a_m1, __tvm_ffi_a_mx, __tvm_ffi_a_mb, 0.0, 0.0, 0.0, 128, 16, "
        '"", "", "avx2", 0}' in table_source([entry], names, tuned)
    )  # not verified
    entry |= {"tvm_node_us": 4.0, "hand_node_us": 5.0, "tvm_cold_us": 8.0, "hand_cold_us": 6.0}
    entry |= {"tvm_batch_us": 400.0, "hand_batch_us": 500.0, "batch": 128, "batch_min_rows": 16}
    entry |= {"cpu": "AuthenticAMD family 25 model 17", "cpu_name": 'AMD "EPYC" 9654'}
    assert (
        '__tvm_ffi_a_mb, 1.25, 0.75, 1.25, 128, 16, "AuthenticAMD family 25 model 17", "AMD \\"EPYC\\" 9654", '
        '"avx2", 0}' in table_source([entry], names, tuned)
    )


def test_cpu_model_reads_what_the_op_library_compares() -> None:
    from tvm_schedules.tune import cpu_model

    ident, name = cpu_model()
    assert re.fullmatch(r"\S+ family \d+ model \d+", ident), ident
    assert name


def test_compare_times_only_the_functions_whose_knobs_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sherry tune --compare-with``: each kernel of one database against the same kernel of another, the M = 1
    and block functions; equal knobs are the same code (not timed), different knobs are timed alternately and
    give positive times and ratios; a kernel only one side has is left out; no common kernel is an error that
    says what to tune."""
    from sherry_export.cli import main
    from tvm_schedules.tune import compare

    def entry(n: int, tiles: int, block_tiles: int) -> dict:
        return {"format": "sherry", "k": 256, "n": n, "group_size": 128, "isa": "avx2", "tiles": tiles,
                "unroll": 1, "order": "quad", "block_tiles": block_tiles, "block_unroll": 1, "block_order": "tile",
                "block_rows": 4}  # fmt: skip

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for root, entries in ((ours, [entry(64, 2, 1), entry(32, 1, 1)]), (theirs, [entry(64, 4, 1), entry(48, 1, 1)])):
        (root / "avx2").mkdir(parents=True)
        (root / "avx2" / "tuned.json").write_text(json.dumps(entries))
    rows = compare("avx2", ours, theirs, rounds=2)
    assert [(r["kernel"], r["function"]) for r in rows] == [
        ("sherry_k256_n64_g128", "m1"),
        ("sherry_k256_n64_g128", "block"),
    ]
    m1, block = rows
    assert m1["ours"] == "plane 2x1 quad" and m1["theirs"] == "plane 4x1 quad"
    assert all(t > 0 for t in (*m1["ours_us"], *m1["theirs_us"])) and 0 < m1["ratio"][0] <= m1["ratio"][1]
    assert block["ours"] == block["theirs"] and "ratio" not in block
    assert main(["tune", "--target", "avx2", "-o", str(ours), "--compare-with", str(theirs)]) == 0
    assert "theirs / ours from" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="tune the same shapes and formats"):
        compare("avx2", ours, tmp_path / "empty")
