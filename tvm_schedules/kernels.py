"""TensorIR kernels for the sherry, tl2 and i2s formats: a weight-decode block and an integer-dot block,
each tensorized with x86 intrinsics, under a schedule that MetaSchedule searches.

One PrimFunc computes ``Y[m, n] = Σ_g (α[n, g] · s[m, g]) · dot[m, n, g]`` from workspace rows that
hold the already quantized int8 activations, their float32 group scales and int32 group sums
(layout.py), and the tiled code bytes of the weights, exactly as docs/formats.md ("Activations")
says: the dots are exact int32, the float sum runs over the groups in order, each product rounded
on its own.

"Rows in lanes", as the hand-written AVX-512 kernels do: a tile is 16 output rows, one per int32 lane.
A quad (4 codes) of a tile is 64 code bytes (byte 4r + j: code j of row r). The workload
(:func:`workload`) is element-wise TensorIR in separate blocks: ``decode`` turns the code bytes into
weight planes (plane p: weight + 1 at lane p of each code, as u8), ``dot`` reduces planes times
activations into exact int32 per row and group, ``group`` scales and sums the groups, ``store``
writes Y. The schedule (:func:`schedule`) tensorizes the decode with the ``decode`` intrinsic
(sherry and tl2: a byte permute of a constant 32-entry table per plane, ``vpermb``; AVX2: two
``vpshufb`` and a blend) or vectorizes it (i2s: a shift and a mask), and the dot with the ``dot`` intrinsic
(``vpdpbusd`` per plane on AVX-512; ``vpmaddubsw`` per plane and one ``vpmaddwd`` on AVX2), both in
tvm_schedules/intrinsics.py. The activation dword of plane p (the 4 activations that meet lane p of
the quad's codes) is broadcast to every row. At the end of a group, dot = lane − Σ xq of the group
(the +1 of the weights), and y += (α·s)·float(dot).

The schedule's knobs (:class:`Knobs`, MetaSchedule decisions): ``tiles`` (tiles processed together,
sharing the activation loads: the rows per step are 16·tiles, which is also the op's work item),
``unroll`` (of the quad loop within a group) and ``order`` (of the quad and tile loops). The outer
loop over steps is ``parallel``; the op runs its tasks on onnxruntime's threads (kernel_tvm.cc).
For M > 1 the op calls a block function (M = :data:`BLOCK_M`, tuned on its own: blocks of
:data:`BLOCK_ROWS` rows of A that share each decoded weight vector), then the M = 1 function for the
remaining rows; the whole-model Relax path compiles the
dynamic-M function (``m`` None), row after row.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.script import tirx as T

from tvm_schedules.intrinsics import VECTOR_LANES, decode_name, dot_name, lane_value
from tvm_schedules.layout import TILE, Shape

MAX_TILES = 8
"""Largest tiles per step: 8 tiles are 8 (AVX2: 16) accumulator registers."""
MAX_UNROLL = 4
ORDERS = ("quad", "tile")
"""Loop orders inside a group: ``quad``: for each quad, every tile of the step (the tiles share the
activation dwords); ``tile``: for each tile, its ``unroll`` quads in a row."""
ISAS = ("avx512", "avx2")
ISA_KEY, FORMAT_KEY = "sherry.isa", "sherry.format"
"""The workload's function attributes that name its ISA and format (the intrinsics the schedule
tensorizes with)."""
ORDER_KEY = "sherry.order"
"""The block annotation that records a design space's loop order in its trace."""


@dataclass(frozen=True)
class Knobs:
    """One point of the design space: the decisions of :func:`schedule`'s two ``sample_perfect_tile``
    instructions and the loop order of its design space."""

    tiles: int = 2
    unroll: int = 2
    order: str = "quad"
    rows: int = 1
    """Rows of A that share each decode: 1 for the M = 1 function, one of :data:`BLOCK_ROWS` for the block
    function (a structural choice of its design space, like ``order``)."""


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


def workload(shape: Shape, m: int | None, isa: str = "avx512") -> tirx.PrimFunc:
    """The unscheduled kernel for M = ``m`` rows of A (None: any M) on ``isa``: what MetaSchedule tunes,
    at M = 1 and at M = :data:`BLOCK_M` (the block function, whose schedule cuts the rows into blocks).

    Sblocks, each in its own loop nest, element by element:

    - ``decode``: the weight planes, ``D[t, q, h, p, i]`` = weight + 1 at lane p of code byte i of
      vector h of quad q of tile t: the format's decode table (sherry, tl2: :func:`lane_value`, the
      ``decode`` intrinsic), or ``(byte >> 2p) & 3`` (i2s, vectorized);
    - ``dot``: a reduction over the quads of a group, their planes and codes into the exact int32
      ``acc[m, t, g, row]`` (the ``dot`` intrinsic): Σ int32(D) · int32(X), with the activation of
      plane p, code j at byte 4p + j of the quad's workspace bytes;
    - ``group``: the in-order reduction over the groups, a vector of ``VW`` rows at a time:
      yacc += (α·s)·float(acc − Σ xq), the product kept from contracting into an FMA
      (``llvm.arithmetic.fence``), so each product rounds on its own as formats.md says;
    - ``store``.

    ``h`` runs over the vectors of a tile (1 on AVX-512, 2 on AVX2). The group and store blocks keep
    whole vectors as elements (``float32x16``), so that each has a block variable per dimension,
    which compute-at needs; :func:`schedule` places all of them in one nest, where buffer compaction
    shrinks the intermediates to one step, which LLVM keeps in registers."""
    if problem := shape.supported():
        raise ValueError(problem)
    if isa not in ISAS:
        raise ValueError(f"unknown isa {isa!r}")
    L, Q, G = shape.lanes_per_code, shape.quads_per_group, shape.groups
    RB, N, QB, tiles, quads = shape.row_bytes, shape.n, 4 * L, shape.tiles, shape.quads
    VW = VECTOR_LANES[isa]  # int32 lanes of a vector: rows per dot
    H = TILE // VW  # vectors per tile
    CB = 4 * VW  # code bytes per vector
    fmt = shape.format
    M = tirx.Var("M", "int64") if m is None else m
    # the rows as MO x R, R a unit loop of M's type (the M = 1 workload's structure, which the committed
    # records' hashes key; the block schedule splits MO)
    R = 1 if m is not None else tirx.const(1, "int64")
    MO = M
    f32v = f"float32x{VW}"

    def weight(W: tirx.Buffer, t: tirx.PrimExpr, q: tirx.PrimExpr, i: tirx.PrimExpr, p: tirx.PrimExpr) -> tirx.PrimExpr:
        code = W[t, q, i]
        if fmt == "i2s":
            return (code >> tirx.Cast("uint8", 2 * p)) & tirx.const(3, "uint8")
        return lane_value(fmt, p, code)

    @T.prim_func(s_tir=True)
    def kernel(
        X: T.Buffer((M, RB), "int8"),
        S: T.Buffer((M, RB // 4), "float32"),
        W: T.Buffer((tiles, quads, 64), "uint8"),
        A: T.Buffer((tiles, G, TILE), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        # estimated_flops: MetaSchedule's flop counter knows no vector intrinsics (2·K·N per row of A)
        T.func_attr(
            {
                "global_symbol": "main",
                "tirx.noalias": True,
                "estimated_flops": 2 * shape.k * N,
                ISA_KEY: isa,
                FORMAT_KEY: fmt,
            }
        )
        D = T.sblock_alloc_buffer((tiles, quads, H, L, CB), "uint8")
        acc = T.sblock_alloc_buffer((M, tiles, G, TILE), "int32")
        yacc = T.sblock_alloc_buffer((M, tiles, H), f32v)
        for t, q, h, p, i in T.grid(tiles, quads, H, L, CB):
            with T.sblock("decode"):
                vt, vq, vh, vp, vi = T.axis.remap("SSSSS", [t, q, h, p, i])
                D[vt, vq, vh, vp, vi] = weight(W, vt, vq, vh * CB + vi, vp)
        for t, mo, mb, g, q, h, p, r, j in T.grid(tiles, MO, R, G, Q, H, L, VW, 4):
            with T.sblock("dot"):
                vt = T.axis.spatial(tiles, t)
                vm = T.axis.spatial(M, mo * R + mb)
                vg, vq, vh, vp, vr, vj = T.axis.remap("SRSRSR", [g, q, h, p, r, j])
                with T.init():
                    acc[vm, vt, vg, vh * VW + vr] = 0
                acc[vm, vt, vg, vh * VW + vr] = acc[vm, vt, vg, vh * VW + vr] + T.Cast(
                    "int32", D[vt, vg * Q + vq, vh, vp, vr * 4 + vj]
                ) * T.Cast("int32", X[vm, (vg * Q + vq) * QB + vp * 4 + vj])
        for t, mo, mb, g, h in T.grid(tiles, MO, R, G, H):
            with T.sblock("group"):
                vt = T.axis.spatial(tiles, t)
                vm = T.axis.spatial(M, mo * R + mb)
                vg, vh = T.axis.remap("RS", [g, h])
                T.reads(
                    A[vt, vg, vh * VW : vh * VW + VW],
                    S[vm, vg],
                    S[vm, G + vg],
                    acc[vm, vt, vg, vh * VW : vh * VW + VW],
                )
                T.writes(yacc[vm, vt, vh])
                with T.init():
                    yacc[vm, vt, vh] = T.Broadcast(T.float32(0), VW)
                yacc[vm, vt, vh] = yacc[vm, vt, vh] + T.call_llvm_pure_intrin(
                    f32v,
                    "llvm.arithmetic.fence",
                    (A.vload([vt, vg, vh * VW], f32v) * T.Broadcast(S[vm, vg], VW))
                    * T.Cast(
                        f32v,
                        acc.vload([vm, vt, vg, vh * VW], f"int32x{VW}")
                        - T.Broadcast(T.reinterpret("int32", S[vm, G + vg]), VW),
                    ),
                )
        for t, mo, mb, h in T.grid(tiles, MO, R, H):
            with T.sblock("store"):
                vt = T.axis.spatial(tiles, t)
                vm = T.axis.spatial(M, mo * R + mb)
                vh = T.axis.remap("S", [h])
                T.reads(yacc[vm, vt, vh])
                T.writes(Y[vm, vt * TILE + vh * VW : vt * TILE + vh * VW + VW])
                Y[vm, vt * TILE + vh * VW : vt * TILE + vh * VW + VW] = yacc[vm, vt, vh]

    return kernel


BLOCK_M = 24
"""Rows of A of the block function MetaSchedule tunes (``_mx``, M >= 16): a multiple of every
:data:`BLOCK_ROWS`, so that each design space cuts it into whole blocks (no predicate, which
``tensorize`` would not match). The op calls it per 24 rows, a single block (``_mb``) for what is left
of whole blocks, and the M = 1 function for the last rows."""
BLOCK_ROWS = (4, 8, 12)
"""Rows of A that share one decode in the block function: each decoded weight vector meets this many
activation rows, one accumulator register each (AVX2: two), so 12 spills on AVX2 and may pay on AVX-512."""
BLOCK_ORDERS = ("block", "tile")
"""Loop orders of the block function's step: ``block``: for each block of rows, the tiles of the step
(the step's codes stream once per block); ``tile``: for each tile, every block of rows (its codes stay
in L1 for the next block)."""
ROWS_KEY = "sherry.rows"
"""The block annotation that records a block design space's rows of A in its trace."""


def _loops_after(sch: Schedule, block: SBlockRV, loop: LoopRV) -> list[LoopRV]:
    """The loops of ``block`` nested inside ``loop``."""
    target = sch.get(loop)
    loops = sch.get_loops(block)
    k = next(i for i, candidate in enumerate(loops) if sch.get(candidate).same_as(target))
    return loops[k + 1 :]


def schedule(sch: Schedule, order: str, knobs: Knobs | None = None, rows: int = 1) -> None:
    """Schedule the workload in loop order ``order``. With ``knobs`` None the two tile sizes are
    sampled (a design space for MetaSchedule), else they are ``knobs``' (a fixed point).

    - tiles per step: ``sample_perfect_tile`` of the tile loop (innermost factor ≤ 8); the outer
      loop over steps is ``parallel`` (the op's tasks, kernel_tvm.cc);
    - unroll: ``sample_perfect_tile`` of the quad loop (innermost ≤ 4), its inner loop unrolled;
    - ``order``: the loops inside a group (:data:`ORDERS`), or for the block function those of a step
      (:data:`BLOCK_ORDERS`).

    ``rows`` 1 (the M = 1 function): per group, quad and tile (in ``order``) the decode, then the
    dots. ``rows`` > 1 (the block function, a static M that is a multiple of ``rows``): the rows of A
    in blocks of ``rows``, each step tile by tile, per group and quad the decode, then its dots with
    every row of the block, so that a decoded vector serves ``rows`` rows.

    The decode and the dot are tensorized with the ISA's intrinsics (tvm_schedules/intrinsics.py);
    the tiles of a step, the planes, the group and store epilogues and the accumulator
    initializations are unrolled, so the accumulators live in registers as in the hand-written
    kernels."""
    isa, fmt = (str(sch.mod["main"].attrs[key]) for key in (ISA_KEY, FORMAT_KEY))
    dot, decode, group, store = (sch.get_sblock(name) for name in ("dot", "decode", "group", "store"))
    t, mo, mb, g, q, h, p, *_ = sch.get_loops(dot)
    tiles, quads, planes = (int(sch.get(loop).extent) for loop in (t, q, p))
    tile_split = knobs and [tiles // knobs.tiles, knobs.tiles]
    quad_split = knobs and [quads // knobs.unroll, knobs.unroll]
    step, ts = sch.split(t, sch.sample_perfect_tile(t, n=2, max_innermost_factor=MAX_TILES, decision=tile_split))
    qo, qi = sch.split(q, sch.sample_perfect_tile(q, n=2, max_innermost_factor=MAX_UNROLL, decision=quad_split))
    unrolled = [qi, ts]
    if rows == 1:
        pair = (qi, ts) if order == "quad" else (ts, qi)
        sch.reorder(step, mo, mb, g, qo, *pair, h)
        inner, store_at = pair[-1], mb
    else:
        m = int(sch.get(mo).extent)
        if m % rows:
            raise ValueError(f"blocks of {rows} rows need a static M that is a multiple of it, not {m}")
        bo, bi = sch.split(mo, [m // rows, rows])
        outer = (bo, ts) if order == "block" else (ts, bo)
        sch.reorder(step, *outer, g, qo, qi, bi, mb, h)
        inner, store_at = qi, outer[-1]
        sch.annotate(dot, ROWS_KEY, rows)
        unrolled = [qi, bi] if order == "tile" else [qi, ts, bi]  # a tile loop outside the blocks stays a loop
    sch.annotate(dot, ORDER_KEY, order)
    # unit loops kept: the loop count must not depend on the decisions, or traces do not replay
    sch.compute_at(decode, inner, preserve_unit_loops=True)
    sch.reverse_compute_at(group, g, preserve_unit_loops=True)
    sch.reverse_compute_at(store, store_at, preserve_unit_loops=True)
    sch.parallel(step)
    dh, dp, di = sch.get_loops(decode)[-3:]
    for loop in (*unrolled, mb, h, dh, *_loops_after(sch, group, g), *_loops_after(sch, store, store_at)):
        sch.unroll(loop)
    # the reductions' initializations out of the loops, after `parallel` (which wants whole reductions)
    init = sch.decompose_reduction(dot, qo)
    *init_outer, init_lanes = _loops_after(sch, init, g)
    for loop in init_outer:
        sch.unroll(loop)
    sch.vectorize(init_lanes)
    sch.decompose_reduction(group, g)
    sch.tensorize(sch.get_loops(dot)[-3], dot_name(isa, planes))
    if fmt == "i2s":  # a shift and a mask: LLVM vectorizes it
        sch.unroll(dp)
        sch.vectorize(di)
    else:
        sch.tensorize(dp, decode_name(fmt, isa))


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


def block_design_space(sch: Schedule) -> list[Schedule]:
    """The block function's space generator: one design space per loop order (:data:`BLOCK_ORDERS`) and
    rows per block (:data:`BLOCK_ROWS`), each sampling the tiles per step and the unroll."""
    spaces = []
    for order in BLOCK_ORDERS:
        for rows in BLOCK_ROWS:
            space = sch.copy()
            schedule(space, order, rows=rows)
            spaces.append(space)
    return spaces


def block_knob_space(shape: Shape) -> list[Knobs]:
    """Every point of the block function's design space (4 x 3 x 2 x 3 = 72 for sherry and i2s at the
    LLaMA shapes)."""
    return [
        Knobs(t, u, o, r)
        for t in tile_choices(shape)
        for u in unroll_choices(shape)
        for o in BLOCK_ORDERS
        for r in BLOCK_ROWS
    ]


def knobs_of(trace: tvm.s_tir.schedule.Trace, tiles: int | None = None) -> Knobs:
    """The knob point a tuned trace chose: its two perfect-tile decisions (one where ``tiles`` is given: a
    trace that does not sample its tiles), its loop order and (block function) its rows per block."""
    decided, order, rows = [] if tiles is None else [tiles], ORDERS[0], 1
    for inst in trace.insts:
        if inst.kind.name == "SamplePerfectTile":
            decided.append(int(trace.decisions[inst][-1]))
        elif inst.kind.name == "Annotate" and str(inst.attrs[0]) == ORDER_KEY:
            order = str(inst.inputs[1])
        elif inst.kind.name == "Annotate" and str(inst.attrs[0]) == ROWS_KEY:
            rows = int(inst.inputs[1])
    return Knobs(tiles=decided[0], unroll=decided[1], order=order, rows=rows)


def prim_func(shape: Shape, m: int | None, knobs: Knobs, isa: str = "avx512", name: str = "main") -> tirx.PrimFunc:
    """The kernel for M = ``m`` rows of A (None: any M) scheduled at the knob point ``knobs``; with
    ``knobs.rows`` > 1 (a block function: a static ``m``, a multiple of it) in blocks of that many rows,
    each decode shared by the block."""
    if knobs not in (knob_space(shape) if knobs.rows == 1 else block_knob_space(shape)):
        raise ValueError(f"knobs {knobs} do not divide {shape.key}")
    sch = Schedule(workload(shape, m, isa))
    schedule(sch, knobs.order, knobs, knobs.rows)
    return sch.mod["main"].with_attr("global_symbol", name)


def scheduled_module(
    shape: Shape, m: int | None, knobs: Knobs, name: str = "main", isa: str = "avx512"
) -> tvm.IRModule:
    return tvm.IRModule({name: prim_func(shape, m, knobs, isa, name)})
