"""TensorIR kernels for the sherry, tl2 and i2s formats: byte-permute decode and integer dot instructions.

One PrimFunc computes ``Y[m, n] = Σ_g (α[n, g] · s[m, g]) · dot[m, n, g]`` from workspace rows that
hold the already quantized int8 activations, their float32 group scales and int32 group sums
(layout.py), and the tiled code bytes of the weights, exactly as docs/formats.md ("Activations")
says: the dots are exact int32, the float sum runs over the groups in order.

"Rows in lanes", as the hand-written AVX-512 kernels do: a tile is 16 output rows, one per int32 lane.
For each quad (4 codes) of a tile the kernel loads its 64 code bytes (byte 4r + j: code j of row
r) and, for each weight position p of the codes, decodes them to 64 weights + 1 as u8: sherry and tl2
with one byte permute of a constant 32-entry table (``vpermb``; AVX2: two ``vpshufb`` and a blend on
the sign bit), i2s with a shift and a mask. A dot instruction then multiplies them with the
activation dword of position p (the 4 activations that meet position p of the quad's codes,
broadcast) and adds each row's 4 products into its lane: ``vpdpbusd`` on AVX-512 (VNNI), ``vpmaddubsw``
+ ``vpmaddwd`` on AVX2. At the end of a group, dot = lane − Σ xq of the group (the +1 of the weights),
and y += (α·s)·float(dot).

The kernel is a TensorIR workload (TVMScript with LLVM intrinsics, :func:`workload`) of three
sblocks; the decode and dot instructions are the body of the ``dot`` block, which no schedule
primitive rewrites: LLVM does not find table lookups or dot-product instructions in an arithmetic
form. The schedule (:func:`schedule`, MetaSchedule's design space :func:`design_space`) decides the
rest (:class:`Knobs`): ``tiles`` (tiles processed together, sharing the activation loads: the rows
per step are 16·tiles, which is also the op's work item), ``unroll`` (of the quad loop within a
group) and ``order`` (of the quad and tile loops). The outer loop over steps is ``parallel``; the op
runs its tasks on onnxruntime's threads (kernel_tvm.cc).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.script import tirx as T

from tvm_schedules.layout import TILE, Shape

MAX_TILES = 8
"""Largest tiles per step: 8 tiles are 8 (AVX2: 16) accumulator registers."""
MAX_UNROLL = 4
ORDERS = ("quad", "tile")
"""Loop orders inside a group: ``quad``: for each quad, every tile of the step (the tiles share the
activation dwords); ``tile``: for each tile, its ``unroll`` quads in a row."""
ISAS = ("avx512", "avx2")


@dataclass(frozen=True)
class Knobs:
    """One point of the design space: the decisions of :func:`schedule`'s two ``sample_perfect_tile``
    instructions and the loop order of its design space."""

    tiles: int = 2
    unroll: int = 2
    order: str = "quad"


def tile_choices(shape: Shape) -> list[int]:
    """What ``sample_perfect_tile`` can pick for the tiles per step: divisors of the tiles up to 8."""
    return [t for t in range(1, MAX_TILES + 1) if shape.tiles % t == 0]


def unroll_choices(shape: Shape) -> list[int]:
    return [u for u in range(1, MAX_UNROLL + 1) if shape.quads_per_group % u == 0]


def knob_space(shape: Shape) -> list[Knobs]:
    """Every point of the design space (at most 8 x 4 x 2 = 64; 4 x 3 x 2 = 24 for sherry and i2s at the
    LLaMA shapes)."""
    return [Knobs(t, u, o) for t in tile_choices(shape) for u in unroll_choices(shape) for o in ORDERS]


def rows_per_step(knobs: Knobs) -> int:
    """Output rows of one parallel task: the table's lane block, the op's row tile."""
    return TILE * knobs.tiles


def function_name(shape: Shape, target_name: str, bucket: str) -> str:
    """The C symbol stem (the object exports ``__tvm_ffi_<name>``)."""
    return f"sherry_tvm_{target_name}_{shape.key}_{bucket}"


def _lane_values(fmt: str) -> np.ndarray:
    """[32, L]: weight + 1 (0..2) of each lane of every 5-bit code (sherry, tl2)."""
    from sherry_export.formats import SHERRY_DECODE, TL2_DECODE

    return (SHERRY_DECODE if fmt == "sherry" else TL2_DECODE).astype(np.int64) + 1


def _const_u8(values: list[int], lanes: int) -> tirx.PrimExpr:
    """A constant u8 vector (values 0..3) written as shifts of a ramp, which LLVM folds to a constant."""
    lo = sum((v & 1) << i for i, v in enumerate(values))
    hi = sum((v >> 1 & 1) << i for i, v in enumerate(values))

    def b(v: int) -> tirx.PrimExpr:
        return tirx.Broadcast(tirx.const(v, "uint64"), lanes)

    r = tirx.Ramp(tirx.const(0, "uint64"), tirx.const(1, "uint64"), lanes) & b(63)
    return (((b(lo) >> r) & b(1)) | (((b(hi) >> r) & b(1)) << b(1))).astype(f"uint8x{lanes}")


def _decoder(shape: Shape, isa: str) -> callable:
    """decode(codes, p): the u8 vector of weights + 1 at position p of the code bytes ``codes``."""
    lanes = 64 if isa == "avx512" else 32
    u8 = f"uint8x{lanes}"

    def bc(v: int) -> tirx.PrimExpr:
        return tirx.Broadcast(tirx.const(v, "uint8"), lanes)

    if shape.format == "i2s":
        return lambda codes, p: (codes >> bc(2 * p)) & bc(3)
    table = _lane_values(shape.format)
    if isa == "avx512":
        tables = [_const_u8([int(table[c % 32, p]) for c in range(64)], 64) for p in range(shape.lanes_per_code)]
        return lambda codes, p: tirx.call_llvm_pure_intrin(u8, "llvm.x86.avx512.permvar.qi.512", tables[p], codes)
    pos = [_const_u8([int(table[c % 16, p]) for c in range(32)], 32) for p in range(shape.lanes_per_code)]
    neg = [_const_u8([int(table[16 + c % 16, p]) for c in range(32)], 32) for p in range(shape.lanes_per_code)]

    def decode(codes: tirx.PrimExpr, p: int) -> tirx.PrimExpr:
        lo = tirx.call_llvm_pure_intrin(u8, "llvm.x86.avx2.pshuf.b", pos[p], codes)
        hi = tirx.call_llvm_pure_intrin(u8, "llvm.x86.avx2.pshuf.b", neg[p], codes)
        return tirx.Select((codes & bc(16)) != bc(0), hi, lo)

    return decode


def workload(shape: Shape, m: int | None, isa: str = "avx512") -> tirx.PrimFunc:
    """The unscheduled kernel for M = ``m`` rows of A (None: any M) on ``isa``: what MetaSchedule tunes.

    Three sblocks, each in its own loop nest over (tile, row of A, group, ...): ``dot`` (a reduction
    over the quads of a group into the exact int32 lanes ``acc``: decode and dot instructions, left
    whole by the schedule), ``group`` (a reduction over the groups in order: y += (α·s)·(acc − Σ xq))
    and ``store``. The intermediates hold whole vectors (``int32x16`` elements), so every region has
    a block variable in every dimension, which compute-at needs. ``h`` runs over the vectors of a
    tile (1 on AVX-512, 2 on AVX2). After :func:`schedule` places them in one nest, buffer compaction
    shrinks ``acc`` and ``yacc`` to the tiles of one step, which LLVM keeps in registers."""
    if problem := shape.supported():
        raise ValueError(problem)
    if isa not in ISAS:
        raise ValueError(f"unknown isa {isa!r}")
    L, Q, G = shape.lanes_per_code, shape.quads_per_group, shape.groups
    RB, N, QB, tiles = shape.row_bytes, shape.n, 4 * L, shape.tiles
    decode = _decoder(shape, isa)
    VW = 16 if isa == "avx512" else 8  # vector width in int32 lanes
    H = TILE // VW  # vectors per tile
    CB = 4 * VW  # code bytes per vector

    def dot(acc: tirx.PrimExpr, codes: tirx.PrimExpr, xw: list[tirx.PrimExpr]) -> tirx.PrimExpr:
        """acc (int32 x VW) + the dots of the decoded codes with the activation dwords (int32 scalar) xw[p]."""
        if isa == "avx512":
            for p in range(L):
                x8 = tirx.reinterpret("int8x64", tirx.Broadcast(xw[p], 16))
                # LLVM 22's signature: (<16 x i32>, <64 x i8> unsigned, <64 x i8> signed)
                acc = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, decode(codes, p), x8)
            return acc
        total = None
        for p in range(L):
            x8 = tirx.reinterpret("int8x32", tirx.Broadcast(xw[p], 8))
            prod = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", decode(codes, p), x8)
            total = prod if total is None else total + prod  # |Σ| ≤ 3 · 2 · 2 · 127: no overflow
        ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
        return acc + tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", total, ones)

    def xword(X: tirx.Buffer, mi: tirx.PrimExpr, quad: tirx.PrimExpr) -> list[tirx.PrimExpr]:
        return [tirx.reinterpret("int32", X.vload([mi, quad * QB + 4 * p], "int8x4")) for p in range(L)]

    M = tirx.Var("M", "int64") if m is None else m
    i32v, f32v, u8v = f"int32x{VW}", f"float32x{VW}", f"uint8x{CB}"

    @T.prim_func(s_tir=True)
    def kernel(
        X: T.Buffer((M, RB), "int8"),
        S: T.Buffer((M, RB // 4), "float32"),
        W: T.Buffer((tiles, shape.quads, 64), "uint8"),
        A: T.Buffer((tiles, G, TILE), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        # estimated_flops: MetaSchedule's flop counter knows no vector intrinsics (2·K·N per row of A)
        T.func_attr({"global_symbol": "main", "tirx.noalias": True, "estimated_flops": 2 * shape.k * N})
        acc = T.alloc_buffer((M, tiles, G, H), i32v)
        yacc = T.alloc_buffer((M, tiles, H), f32v)
        for t, mi, g, q, h in T.grid(tiles, M, G, Q, H):
            with T.sblock("dot"):
                vt, vm, vg, vq, vh = T.axis.remap("SSSRS", [t, mi, g, q, h])
                T.reads(W[vt, vg * Q + vq, vh * CB : vh * CB + CB], X[vm, (vg * Q + vq) * QB : (vg * Q + vq + 1) * QB])
                T.writes(acc[vm, vt, vg, vh])
                with T.init():
                    acc[vm, vt, vg, vh] = T.Broadcast(T.int32(0), VW)
                acc[vm, vt, vg, vh] = dot(
                    acc[vm, vt, vg, vh], W.vload([vt, vg * Q + vq, vh * CB], u8v), xword(X, vm, vg * Q + vq)
                )
        for t, mi, g, h in T.grid(tiles, M, G, H):
            with T.sblock("group"):
                vt, vm, vg, vh = T.axis.remap("SSRS", [t, mi, g, h])
                T.reads(A[vt, vg, vh * VW : vh * VW + VW], S[vm, vg], S[vm, G + vg], acc[vm, vt, vg, vh])
                T.writes(yacc[vm, vt, vh])
                with T.init():
                    yacc[vm, vt, vh] = T.Broadcast(T.float32(0), VW)
                yacc[vm, vt, vh] = yacc[vm, vt, vh] + (
                    A.vload([vt, vg, vh * VW], f32v) * T.Broadcast(S[vm, vg], VW)
                ) * T.Cast(f32v, acc[vm, vt, vg, vh] - T.Broadcast(T.reinterpret("int32", S[vm, G + vg]), VW))
        for t, mi, h in T.grid(tiles, M, H):
            with T.sblock("store"):
                vt, vm, vh = T.axis.remap("SSS", [t, mi, h])
                T.reads(yacc[vm, vt, vh])
                T.writes(Y[vm, vt * TILE + vh * VW : vt * TILE + vh * VW + VW])
                Y[vm, vt * TILE + vh * VW : vt * TILE + vh * VW + VW] = yacc[vm, vt, vh]

    return kernel


ORDER_KEY = "sherry.order"
"""The block annotation that records a design space's loop order in its trace."""


def schedule(sch: Schedule, order: str, knobs: Knobs | None = None) -> None:
    """Schedule the workload in loop order ``order``. With ``knobs`` None the two tile sizes are
    sampled (a design space for MetaSchedule), else they are ``knobs``' (a fixed point).

    - tiles per step: ``sample_perfect_tile`` of the tile loop (innermost factor ≤ 8); the outer
      loop over steps is ``parallel`` (the op's tasks, kernel_tvm.cc);
    - unroll: ``sample_perfect_tile`` of the quad loop (innermost ≤ 4), its inner loop unrolled;
    - ``order``: the loops inside a group (:data:`ORDERS`).

    The tiles of a step, the group and store epilogues and the accumulator initializations are
    unrolled, so the accumulators live in registers as in the hand-written kernels."""
    dot, group, store = (sch.get_sblock(name) for name in ("dot", "group", "store"))
    t, mi, g, q, h = sch.get_loops(dot)
    tiles, quads = (int(sch.get(loop).extent) for loop in (t, q))
    tile_split = knobs and [tiles // knobs.tiles, knobs.tiles]
    quad_split = knobs and [quads // knobs.unroll, knobs.unroll]
    step, ts = sch.split(t, sch.sample_perfect_tile(t, n=2, max_innermost_factor=MAX_TILES, decision=tile_split))
    qo, qi = sch.split(q, sch.sample_perfect_tile(q, n=2, max_innermost_factor=MAX_UNROLL, decision=quad_split))
    sch.reorder(step, mi, g, qo, *((qi, ts) if order == "quad" else (ts, qi)), h)
    sch.annotate(dot, ORDER_KEY, order)
    # unit loops kept: the loop count must not depend on the decisions, or traces do not replay
    sch.reverse_compute_at(group, g, preserve_unit_loops=True)
    sch.reverse_compute_at(store, mi, preserve_unit_loops=True)
    sch.parallel(step)
    for loop in (qi, ts, h, *sch.get_loops(group)[3:], *sch.get_loops(store)[2:]):
        sch.unroll(loop)
    # the reductions' initializations out of the loops, after `parallel` (which wants whole reductions)
    sch.decompose_reduction(dot, qo)
    sch.decompose_reduction(group, g)


def design_space(sch: Schedule) -> list[Schedule]:
    """MetaSchedule's space generator (``ScheduleFn``): one design space per loop order, whose traces
    sample the tile sizes. A loop order is a different trace, not a decision: search and mutation
    replay a trace with new decisions and never re-run this function."""
    spaces = []
    for order in ORDERS:
        space = sch.copy()
        schedule(space, order)
        spaces.append(space)
    return spaces


def knobs_of(trace: tvm.s_tir.schedule.Trace) -> Knobs:
    """The knob point a tuned trace chose: its two perfect-tile decisions and its loop order."""
    tiles, order = [], ORDERS[0]
    for inst in trace.insts:
        if inst.kind.name == "SamplePerfectTile":
            tiles.append(int(trace.decisions[inst][-1]))
        elif inst.kind.name == "Annotate" and str(inst.attrs[0]) == ORDER_KEY:
            order = str(inst.inputs[1])
    return Knobs(tiles=tiles[0], unroll=tiles[1], order=order)


def prim_func(shape: Shape, m: int | None, knobs: Knobs, isa: str = "avx512", name: str = "main") -> tirx.PrimFunc:
    """The kernel for M = ``m`` rows of A (None: any M) scheduled at the knob point ``knobs``."""
    if knobs not in knob_space(shape):
        raise ValueError(f"knobs {knobs} do not divide {shape.key}")
    sch = Schedule(workload(shape, m, isa))
    schedule(sch, knobs.order, knobs)
    return sch.mod["main"].with_attr("global_symbol", name)


def scheduled_module(
    shape: Shape, m: int | None, knobs: Knobs, name: str = "main", isa: str = "avx512"
) -> tvm.IRModule:
    return tvm.IRModule({name: prim_func(shape, m, knobs, isa, name)})
