"""The lookup-table formulation of the sherry M = 1 TVM kernel (tvm_schedules/lut.py), compiled here on the spot
for AVX-512 (skipped without AVX-512 VBMI/VNNI) and for AVX2, against the kernels' int8 numerics reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sherry_export.formats import SHERRY_DECODE, PackedWeight, pack, quantize_activations, reference_matmul
from sherry_export.quant import sherry_ternarize

tvm = pytest.importorskip("tvm")
from tvm_schedules import lut  # noqa: E402
from tvm_schedules.kernels import Knobs  # noqa: E402
from tvm_schedules.tune import TARGETS, host_isa  # noqa: E402

needs_avx512 = pytest.mark.skipif(host_isa() != "avx512", reason="the LUT kernel is AVX-512 (VBMI, VNNI)")
ISAS = [pytest.param("avx512", marks=needs_avx512), "avx2"]
"""The LUT kernel's forms: AVX-512 where this CPU has it, AVX2 everywhere (every supported CPU has AVX2)."""


def packed_weight(k: int, n: int, gs: int, seed: int = 0) -> PackedWeight:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return pack("sherry", sherry_ternarize(weight, gs), gs)


def run(ls: lut.LutShape, knobs: Knobs, x: np.ndarray, packed: PackedWeight | None = None) -> np.ndarray:
    lib = tvm.compile(lut.scheduled_module(ls, knobs, m=x.shape[0]), target=tvm.target.Target(TARGETS[ls.isa]))
    ws, scales = lut.activations(ls, x)
    w = lut.weights(packed or packed_weight(ls.k, ls.n, ls.group_size), isa=ls.isa)
    y = tvm.runtime.tensor(np.full((x.shape[0], ls.n), np.nan, np.float32))
    args = (ws.reshape(x.shape[0], -1, lut.TABLE_BYTES), scales, w)
    lib["main"](*(tvm.runtime.tensor(a) for a in args), y)
    return y.numpy()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("order", lut.ORDERS)
@pytest.mark.parametrize(
    ("k", "n", "gs", "m"),
    [(256, 64, 128, 1), (320, 96, 128, 1), (320, 32, 64, 3), (512, 48, 512, 1), (96, 16, 32, 2), (2048, 128, 128, 1)],
)
def test_lut_kernel_matches_reference_bit_exactly(k: int, n: int, gs: int, m: int, order: str, isa: str) -> None:
    """Exact int dots from the tables, then y = Σ_g (α·s)·dot in group order, no FMA: the int8 reference bit
    for bit. K = 320 at group 128 has a short last group (64 columns: AVX-512, two of its four pairs are
    padding; AVX2, one of its two pairs is whole), group 512 is per-channel, group 32 is one (AVX2: half a)
    pair per group; blocks of 4, 2 and 1 tiles, K-chunks of 1 to 8 groups, and the largest unroll."""
    ls = lut.LutShape(k, n, gs, isa=isa)
    x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    x[0, :3] *= 40  # an outlier: the other groups of the row keep their own scale
    y = run(ls, Knobs(ls.block_tiles, lut.unroll_choices(ls)[-1], order), x)
    np.testing.assert_array_equal(y, reference_matmul(x, packed_weight(k, n, gs), activations="int8"))


@pytest.mark.parametrize("isa", ISAS)
def test_nan_row_and_zero_row(isa: str) -> None:
    ls = lut.LutShape(256, 32, 128, isa=isa)
    x = np.random.default_rng(2).standard_normal((3, 256), dtype=np.float32)
    x[1, 5] = np.nan
    x[2] = 0
    y = run(ls, Knobs(2, 2, "pair"), x)
    assert np.isnan(y[1]).all() and (y[2] == 0).all() and np.isfinite(y[0]).all()


def test_weight_stream_is_the_pair_records_at_1_25_bits() -> None:
    """Per block of tiles and group: 80 bytes per pair and tile, byte 4r + j the indices of code j of row r
    in pieces A (low nibble) and B (high nibble), then the sign bits of A and B (bit i of each 8-byte
    mask), pair after pair and tile after tile; then the tiles' float16 scales. Blocks ordered superblock,
    K-chunk (4 KiB of tables: here 4 groups of 2 pairs), block. 1.25 bits per weight."""
    packed = packed_weight(512, 192, 64)  # 8 groups of 2 pairs; 12 tiles: 3 blocks of 4
    ls = lut.LutShape(512, 192, 64, superblocks=3)
    w = lut.weights(packed, superblocks=3)
    assert (ls.block_tiles, ls.chunk_groups, ls.chunks, ls.step_blocks) == (4, 4, 2, 1)
    assert w.shape == (3, 2, 1, 4, 4 * (2 * 80 + lut.SCALE_BYTES)) and ls.pair_bytes == 80
    assert lut.LutShape(2048, 2048, 128).weight_bits == 1.25
    values = packed_values(packed)
    for block in range(3):
        for g in range(8):
            group = w[block, g // 4, 0, g % 4]
            for pair in range(2):
                for tile in range(4):
                    record = group[(pair * 4 + tile) * 80 :]
                    for r in range(16):
                        for j in range(4):
                            i = 4 * r + j
                            for piece, nibble in ((0, record[i] & 15), (1, record[i] >> 4)):
                                sign = record[64 + 8 * piece + i // 8] >> (i % 8) & 1
                                row, col = 64 * block + 16 * tile + r, 64 * g + 32 * pair + 16 * piece + 4 * j
                                np.testing.assert_array_equal(
                                    SHERRY_DECODE[nibble | sign << 4], values[row, col : col + 4]
                                )
            scales = group[4 * 2 * 80 :].view(np.float16).reshape(4 * 16)
            np.testing.assert_array_equal(scales, packed.scales[64 * block : 64 * block + 64, g])
    with pytest.raises(ValueError, match="2 superblocks do not divide"):
        lut.weights(packed, superblocks=2)


def test_avx2_weight_stream_is_the_hand_written_chunk_halves() -> None:
    """AVX2 records, per pair (64 columns: 16 units of 4, unit u = 2P + L) and tile, 160 bytes: byte
    32·(P // 2) + 16·L + r holds the index of unit u of row r in nibble P % 2, byte 128 + 16·L + r its sign
    in bit 7 - P (the hand-written AVX2 kernel's nibble and sign vectors for one 16-row half); then the
    tiles' float16 scales. 8 groups of 2 pairs (group 128), K-chunks of 4 groups; 1.25 bits per weight."""
    packed = packed_weight(1024, 64, 128)  # 4 tiles: one block
    ls = lut.LutShape(1024, 64, 128, isa="avx2")
    w = lut.weights(packed, isa="avx2")
    assert (ls.pairs_per_group, ls.chunk_groups, ls.chunks, ls.pair_bytes) == (2, 4, 2, 160)
    assert w.shape == (1, 2, 1, 4, 4 * (2 * 160 + lut.SCALE_BYTES)) and ls.weight_bits == 1.25
    values = packed_values(packed)
    for g in range(8):
        group = w[0, g // 4, 0, g % 4]
        for pair, tile, r, u in np.ndindex(2, 4, 16, 16):
            record = group[(pair * 4 + tile) * 160 :]
            p, lane = divmod(u, 2)
            nibble = record[32 * (p // 2) + 16 * lane + r] >> 4 * (p % 2) & 15
            sign = record[128 + 16 * lane + r] >> (7 - p) & 1
            row, col = 16 * tile + r, 128 * g + 64 * pair + 4 * u
            np.testing.assert_array_equal(SHERRY_DECODE[nibble | sign << 4], values[row, col : col + 4])
        scales = group[4 * 2 * 160 :].view(np.float16).reshape(4 * 16)
        np.testing.assert_array_equal(scales, packed.scales[:, g])


def test_superblocks_are_as_few_as_the_threads_allow() -> None:
    """The op's rule (kernel_tvm.cc lut_superblocks): one step per thread where the blocks allow, at least 4
    steps of up to 16 blocks where there are that many, whole divisors of the blocks, at most 4096 rows."""
    def steps(n: int, threads: int) -> int:
        return lut.superblocks_for(lut.LutShape(2048, n, 128), threads)

    assert [steps(2048, t) for t in (1, 2, 3, 4, 16, 64)] == [1, 2, 2, 4, 4, 4]  # 16 blocks of 8 tiles
    assert steps(8192, 1) == 2 and steps(8192, 2) == 2  # 4096 rows at most
    assert steps(512, 2) == 2 and steps(16 * 3, 2) == 1  # 4 blocks; 3 tiles: one block
    assert steps(8192, 64) == 4 and steps(16384, 64) == 8  # 64 and 128 blocks: steps of 16


def packed_values(packed: PackedWeight) -> np.ndarray:
    from sherry_export.formats import unpack

    return unpack(packed).values.numpy()


def test_tables_hold_every_codes_signed_dot() -> None:
    """Entry sign << 6 | j << 4 | idx of the xl (xh) table of a piece is ±Σ_p lanes(idx)[p] · xl (xh) of
    column 4j + p, and xl + 16 xh = xq: so the two lookups give the exact Σ w · xq of a block."""
    ls = lut.LutShape(32, 16, 32)
    x = np.random.default_rng(3).standard_normal((1, 32), dtype=np.float32)
    xq, _ = quantize_activations(x, 32)
    t = lut.tables(ls, xq).astype(np.int64).reshape(2, 2, 128)  # [piece, half, entry]
    for piece in range(2):
        for code in range(32):
            for j in range(4):
                e = (code >> 4) << 6 | j << 4 | (code & 15)
                block = xq[0, 16 * piece + 4 * j : 16 * piece + 4 * j + 4].astype(np.int64)
                assert t[piece, 0, e] + 16 * t[piece, 1, e] == SHERRY_DECODE[code].astype(np.int64) @ block


def test_avx2_tables_split_every_units_sum() -> None:
    """Per unit pair P of a pair's 64 columns: the U tables of units 2P and 2P + 1 (16 entries each), then their
    V tables, with 31·U + V = Σ_p lanes(idx)[p] · xq of the unit's column p, |U| <= 12, |V| <= 15."""
    ls = lut.LutShape(64, 16, 64, isa="avx2")
    x = np.random.default_rng(3).standard_normal((1, 64), dtype=np.float32)
    x[0, :4] = [9, -9, 9, -9]  # a unit at the int8 extremes: |S| = 381
    xq, _ = quantize_activations(x, 64)
    t = lut.tables(ls, xq).astype(np.int64).reshape(8, 2, 2, 16)  # [P, U/V, lane, idx]
    assert np.abs(t[:, 0]).max() <= 12 and np.abs(t[:, 1]).max() <= 15
    for u, idx in np.ndindex(16, 16):
        p, lane = divmod(u, 2)
        expected = SHERRY_DECODE[idx].astype(np.int64) @ xq[0, 4 * u : 4 * u + 4].astype(np.int64)
        assert 31 * t[p, 0, lane, idx] + t[p, 1, lane, idx] == expected


@needs_avx512
def test_lut_intrinsic_alone() -> None:
    """The intrinsic on random pair records and tables (its description: the entry each code indexes, of
    both pieces, xl + 16·xh), against numpy, the extreme table values included."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def f(
        W: T.Buffer((3, 80), "uint8"),
        X: T.Buffer((3, lut.TABLE_BYTES), "int8"),
        C: T.Buffer((3, 16), "int32"),
    ) -> None:
        for v, r, j, e in T.grid(3, 16, 4, lut.ENTRIES):
            with T.sblock("lut"):
                vv, vr, vj, ve = T.axis.remap("SSRR", [v, r, j, e])
                T.reads(C[vv, vr], W[vv, 0:80], X[vv, 0 : lut.TABLE_BYTES])
                T.writes(C[vv, vr])
                with T.init():
                    C[vv, vr] = 0
                C[vv, vr] = C[vv, vr] + lut.lut_term(W, [vv], X, [vv], vr, vj, ve)

    sch = tvm.s_tir.Schedule(f)
    block = sch.get_sblock("lut")
    _, r, _, _ = sch.get_loops(block)
    sch.decompose_reduction(block, r)
    sch.tensorize(r, lut.lut_name())
    lib = tvm.compile(sch.mod, target=tvm.target.Target(TARGETS["avx512"]))
    rng = np.random.default_rng(4)
    w = rng.integers(0, 256, (3, 80), dtype=np.uint8)
    x = rng.integers(-45, 46, (3, lut.TABLE_BYTES), dtype=np.int8)  # |xl sums| <= 45, as the tables hold
    x[1] = 45
    x[2, 128:256], x[2, 384:] = -24, -24  # the xh extremes
    c = tvm.runtime.tensor(np.zeros((3, 16), np.int32))
    lib["main"](tvm.runtime.tensor(w), tvm.runtime.tensor(x), c)
    expected = np.zeros((3, 16), np.int64)
    t = x.astype(np.int64)
    for v in range(3):
        for i in range(64):
            r, j = divmod(i, 4)
            for piece, nibble in ((0, int(w[v, i]) & 15), (1, int(w[v, i]) >> 4)):
                e = (int(w[v, 64 + 8 * piece + i // 8]) >> (i % 8) & 1) << 6 | j << 4 | nibble
                expected[v, r] += t[v, 256 * piece + e] + 16 * t[v, 256 * piece + 128 + e]
    np.testing.assert_array_equal(c.numpy(), expected)


def test_avx2_int16_sums_hold_the_largest_group() -> None:
    """The AVX2 form sums a row's lanes in int16 until its group ends: at the largest group it takes (640
    columns, 10 pairs) a row whose every block is (1, 1, 1, 0) against activations at +127 and -127 reaches
    30480 per lane, still exact; a larger group is declined with the reason."""
    k, n = 1280, 16
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(n, k // 4)
    weight[1::2] *= -1
    packed = pack("sherry", sherry_ternarize(weight, 640), 640)
    x = np.full((2, k), 3.0, np.float32)
    x[1] *= -1
    ls = lut.LutShape(k, n, 640, isa="avx2")
    y = run(ls, Knobs(ls.block_tiles, 2, "tile"), x, packed)
    np.testing.assert_array_equal(y, reference_matmul(x, packed, activations="int8"))
    assert "up to 640 columns, not 768" in lut.LutShape(1536, 16, 768, isa="avx2").supported()


def test_avx2_lut_intrinsic_alone() -> None:
    """The AVX2 intrinsic on random pair records and tables (its description: per unit, ±(31·U + V) of the
    entry its index picks, summed per row and lane), against numpy: the sign of every unit pair (pair 7's
    from bit 0, below which no guard bit fits), the int8 sums of 8 units per lane at their extremes, and
    the int16 lanes 16h + 8L + j (row 8h + j, even or odd units)."""
    from tvm.script import tirx as T

    pb = lut.LUT_ISAS["avx2"].pair_bytes

    @T.prim_func(s_tir=True)
    def f(W: T.Buffer((4, pb), "uint8"), X: T.Buffer((4, lut.TABLE_BYTES), "int8"), C: T.Buffer((4, 32), "int16")):
        for v, i, p, e in T.grid(4, 32, 8, 16):
            with T.sblock("lut"):
                vv, vi, vp, ve = T.axis.remap("SSRR", [v, i, p, e])
                T.reads(C[vv, vi], W[vv, 0:pb], X[vv, 0 : lut.TABLE_BYTES])
                T.writes(C[vv, vi])
                with T.init():
                    C[vv, vi] = T.int16(0)
                C[vv, vi] = C[vv, vi] + T.Cast("int16", lut.lut_term_avx2(W, [vv], X, [vv], vi, vp, ve))

    sch = tvm.s_tir.Schedule(f)
    block = sch.get_sblock("lut")
    _, r, _, _ = sch.get_loops(block)
    sch.decompose_reduction(block, r)
    sch.tensorize(r, lut.lut_name("avx2"))
    lib = tvm.compile(sch.mod, target=tvm.target.Target(TARGETS["avx2"]))
    rng = np.random.default_rng(4)
    w = rng.integers(0, 256, (4, pb), dtype=np.uint8)
    x = np.empty((4, 8, 2, 32), np.int8)  # [record, P, U/V, lane · 16 + idx]
    x[:, :, 0] = rng.integers(-12, 13, (4, 8, 32))
    x[:, :, 1] = rng.integers(-15, 16, (4, 8, 32))
    x[1, :, 0], x[1, :, 1], w[1, 128:] = 12, 15, 0  # every unit positive: the int8 sums at +96 and +120
    x[2, :, 0], x[2, :, 1], w[2, 128:] = -12, -15, 0
    x[3, :, 0], x[3, :, 1], w[3, 128:] = 12, 15, 255  # every unit negated
    x = x.reshape(4, lut.TABLE_BYTES)
    c = tvm.runtime.tensor(np.zeros((4, 32), np.int16))
    lib["main"](tvm.runtime.tensor(w), tvm.runtime.tensor(x), c)
    expected = np.zeros((4, 2, 2, 8), np.int64)  # [record, h, lane, j]
    t = x.astype(np.int64)
    for v, r, u in np.ndindex(4, 16, 16):
        p, lane = divmod(u, 2)
        idx = int(w[v, 32 * (p // 2) + 16 * lane + r]) >> 4 * (p % 2) & 15
        negative = int(w[v, 128 + 16 * lane + r]) >> (7 - p) & 1
        value = 31 * t[v, 64 * p + 16 * lane + idx] + t[v, 64 * p + 32 + 16 * lane + idx]
        expected[v, r // 8, lane, r % 8] += -value if negative else value
    np.testing.assert_array_equal(c.numpy(), expected.reshape(4, 32))


@pytest.mark.parametrize("isa", ISAS)
def test_schedule_tensorizes_the_lookup_and_allocates_nothing(isa: str) -> None:
    """The trace's Tensorize names the ISA's LUT intrinsic; the code has the hand-written kernel's
    instructions (AVX-512: vpermi2b/vpermt2b, vpdpbusd, the sign masks through kmovq, no plane decode;
    AVX2: vpshufb, vpsignb, vpmaddubsw, no AVX-512 register) and no workspace call at the largest step."""
    ls = lut.LutShape(256, 128, 128, isa=isa)
    sch = tvm.s_tir.Schedule(lut.workload(ls))
    lut.schedule(sch, "pair", Knobs(8, lut.unroll_choices(ls)[-1], "pair"))
    used = {str(inst.attrs[0]) for inst in sch.trace.insts if inst.kind.name == "Tensorize"}
    assert used == {lut.lut_name(isa)}
    lib = tvm.compile(sch.mod, target=tvm.target.Target(TARGETS[isa]))
    assert "TVMBackendAllocWorkspace" not in lib.mod.inspect_source("ll")
    asm = lib.mod.inspect_source("asm")
    if isa == "avx2":
        assert all(op in asm for op in ("vpshufb", "vpsignb", "vpmaddubsw")) and "zmm" not in asm
    else:
        assert "vpdpbusd" in asm and "kmovq" in asm and ("vpermi2b" in asm or "vpermt2b" in asm)
        assert "vpermb\t" not in asm  # no plane decode


def test_knob_space() -> None:
    space = lut.knob_space(lut.LutShape(2048, 2048, 128))  # 128 tiles, 4 pairs per group
    assert len(space) == 3 * 2 and {kn.order for kn in space} == set(lut.ORDERS) and {kn.tiles for kn in space} == {8}
    with pytest.raises(ValueError, match="design space"):
        lut.prim_func(lut.LutShape(256, 48, 128), Knobs(2, 1, "pair"))  # 3 tiles
    assert "multiple of 16" in lut.LutShape(64, 40, 64).supported()


def test_formulation_is_checked() -> None:
    from tvm_schedules.tune import check_formulation

    check_formulation("lut", "sherry", "avx512")
    check_formulation("plane", "tl2", "avx2")
    check_formulation("lut", "sherry", "avx2")
    with pytest.raises(ValueError, match="sherry kernel for avx512 and avx2, not tl2 on avx512"):
        check_formulation("lut", "tl2", "avx512")
    with pytest.raises(ValueError, match="unknown formulation"):
        check_formulation("decode", "sherry", "avx512")


@pytest.fixture(scope="module", params=ISAS)
def lut_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A fresh database holding one LUT kernel of a target (avx512, avx2), sherry 1024x256 group 128 (4 and 2
    K-chunks), from a real 3-trial MetaSchedule run, and its tuned.json entry, tuned once per target for the
    module's two slow tests."""
    from tvm_schedules.tune import tune

    out = tmp_path_factory.mktemp("db")
    [entry] = tune([(1024, 256, 128)], request.param, 3, out, ("sherry",), formulation="lut")
    return out, entry


@pytest.mark.slow
def test_a_tuned_lut_kernel_builds_and_matches_reference(lut_db: tuple) -> None:
    """A real MetaSchedule run of the LUT design space (3 trials) into a fresh database: tuned.json records
    the formulation, the build schedules the M = 1 function and the block functions (``_mx``, ``_mb``,
    row by row) with its decisions, for any superblock count, the table marks the entry as a LUT kernel,
    and all three functions equal the reference."""
    from tvm_schedules.build import TunedKernel, table_source, tuned_functions
    from tvm_schedules.kernels import BLOCK_M
    from tvm_schedules.layout import Shape
    from tvm_schedules.tune import database

    out, entry = lut_db
    isa = entry.isa
    assert entry.formulation == "lut" and entry.order in lut.ORDERS and entry.trials == 3
    assert entry.block_tiles is None  # no block function of its own was searched
    k, n = 1024, 256
    shape, packed = Shape("sherry", k, n, 128), packed_weight(k, n, 128)
    funcs, tuned = tuned_functions(database(out / isa), shape, isa, isa, "lut")
    assert tuned == TunedKernel(16 * entry.tiles, 16 * entry.tiles, BLOCK_M, lut.BLOCK_ROWS)
    target = tvm.target.Target(TARGETS[isa])
    for name, func in funcs.items():
        m = {"m1": 1, "mx": BLOCK_M, "mb": lut.BLOCK_ROWS}[name[-2:]]
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        x = np.random.default_rng(5).standard_normal((m, k), dtype=np.float32)
        expected = reference_matmul(x, packed, activations="int8")
        for superblocks in (1, 2):  # the op's count, chosen at run time: any divisor of the blocks
            ws, scales = lut.activations(lut.LutShape(k, n, 128, superblocks, isa), x)
            y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
            args = (ws.reshape(m, -1, lut.TABLE_BYTES), scales, lut.weights(packed, superblocks, isa))
            lib["main"](*(tvm.runtime.tensor(a) for a in args), y)
            np.testing.assert_array_equal(y.numpy(), expected)
    names = {0: tuple(funcs)}
    table = table_source([entry.__dict__], names, {0: tuned})
    assert table.rstrip().split("\n")[-5].endswith(f'"{isa}", 1}},')  # TvmEntry.formulation = lut


@pytest.mark.slow
def test_the_op_runs_a_linked_lut_kernel_in_every_regime(
    lut_db: tuple, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: the LUT entry tuned here, compiled by ``tvm_schedules.build`` and linked into an
    op library built here; the forced tvm path runs its three functions (M = 1; 8-row ``_mb`` and 24-row
    ``_mx`` blocks, the per-row LUT loop, and what they leave on ``_m1``) and equals the int8 reference,
    on 1 and 2 threads, with a bias."""
    import shutil
    import subprocess
    from pathlib import Path

    from sherry_export.onnx_ops import matmul_model
    from sherry_export.runtime import LIBRARY_ENV, make_session
    from tvm_schedules.build import build
    from tvm_schedules.kernels import BLOCK_M

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    tmp = tmp_path_factory.mktemp("tvm-lut-op")
    k, n = 1024, 256
    kernels, out, root = tmp / "tvm_kernels", tmp / "build", Path(__file__).resolve().parent.parent
    build(lut_db[0], kernels)  # the database holds the LUT record only
    configure = ["-S", str(root / "custom_ops"), "-B", str(out), "-DSHERRY_TVM=ON", f"-DSHERRY_TVM_DIR={kernels}"]
    for args in (configure, ["--build", str(out), "-j", "1"]):
        done = subprocess.run([cmake, *args], capture_output=True, text=True)
        assert done.returncode == 0, f"cmake {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    monkeypatch.setenv(LIBRARY_ENV, str(out / "libsherry_ops.so"))
    packed = packed_weight(k, n, 128)
    bias = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    for threads in (1, 2):
        session = make_session(matmul_model(packed, bias=bias), threads=threads, kernel="tvm")
        for m in (1, 3, lut.BLOCK_ROWS, lut.BLOCK_ROWS + 1, BLOCK_M, BLOCK_M + lut.BLOCK_ROWS + 3):
            x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            expected = reference_matmul(x, packed, bias, activations="int8")
            y = session.run(None, {"A": x})[0]
            np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_stale_database_is_a_clear_error(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """A record whose trace no longer replays (here: it names a tensor intrinsic that is not registered, as
    after an edit of an intrinsic's description) makes loading the database an InputError that names the
    folder, TVM's reason and how to recover, and the build (CMake's step) one line and exit status 1, not a
    traceback."""
    import shutil
    from pathlib import Path

    from sherry_export.errors import InputError
    from tvm_schedules.build import main as build_main
    from tvm_schedules.tune import database

    source = Path(__file__).resolve().parent.parent / "tvm_schedules" / "databases" / "avx2"
    target = tmp_path / "db" / "avx2"
    shutil.copytree(source, target)
    records = target / "database_tuning_record.json"
    text = records.read_text()
    assert lut.lut_name("avx2") in text
    records.write_text(text.replace(lut.lut_name("avx2"), "sherry_lut_pair_edited", 1))
    with pytest.raises(InputError, match=r"cannot be loaded \(.*sherry_lut_pair_edited.*not registered.*git checkout"):
        database(target)
    assert build_main([str(tmp_path / "db"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m tvm_schedules.build: error: the tuning database") and "Traceback" not in err
