"""Whole-model compilation: an exported decoder (``sherry export``) to a TVM Relax VM module.

``tvm.relax.frontend.onnx`` imports plain ONNX but knows none of the ops our decoder is built from
(the ``ai.sherry`` op of every format; onnxruntime's contrib ``GroupQueryAttention``,
``SkipSimplifiedLayerNormalization`` and ``MatMulNBits``). The frontend has no registration hook: its
converter table is a module function rebuilt on every lookup. :class:`DecoderImporter` subclasses the
frontend's own importer and consults an extra table first (its two lookup methods), so nothing of
TVM is patched and every standard op still goes through TVM's converters.

The ternary converters keep the weights as code bytes: each node's canonical packed bytes are
repacked once at import into the TVM kernels' tiled layout (``tvm_schedules.layout.repack``, one
byte per code) and called with ``call_tir`` on the dynamic-M TensorIR kernel of
``tvm_schedules.kernels`` for the host ISA (``tune.host_isa``). Its activation workspace rows come
from a TE function with exactly the numerics of docs/formats.md ("Activations"): per row and scale
group, m = max|x|, xq = clamp(rint(x·(127/m))), s = m/127, a non-finite group gives s = NaN and
xq = 0; the int8 values in the kernels' dword order (``layout.dword_order``), then the float32 group
scales and the int32 group sums Σ xq (``layout.activations``). Shapes stay dynamic (batch, sequence,
past length): one module serves prefill and decode.

GroupQueryAttention is converted for what the exporter emits and ``OnnxCausalLM`` feeds: packed
QKV, rotary (non-interleaved) from the cos/sin caches inside, past/present KV, causal attention over
past + new tokens, an all-ones attention mask (positions come from the past length; a padded batch
is not supported).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend.onnx import onnx_frontend as frontend
from tvm.s_tir import Schedule
from tvm.script import tirx as T

from sherry_export.export.projections import dequantize_nbits
from sherry_export.formats import FORMATS, HEAD_FORMATS, LM_HEADS, SHERRY_DECODE, PackedWeight
from sherry_export.generate import OnnxCausalLM
from sherry_export.verify import MAX_POSITIONS_KEY, verify_model_files
from tvm_schedules import lut
from tvm_schedules.kernels import Knobs, knob_space, prim_func, tile_choices, unroll_choices
from tvm_schedules.layout import CODES_PER_QUAD, TILE, Shape, repack
from tvm_schedules.lut import LUT_FORMAT, TABLE_BYTES, LutShape

Converter = Callable[[relax.BlockBuilder, Sequence[Any], dict[str, Any], Any], Any]
KnobChoice = Callable[..., Knobs]
"""Picks a ternary kernel's knobs: called as ``choice(shape, formulation=...)`` (:func:`tuned_knobs`, or
:func:`measured_knobs` with its target bound)."""
TERNARY_OPS = {spec.op_type: name for name, spec in FORMATS.items()}
"""The ``ai.sherry`` op of each format of the registry, converted to the format's TVM kernel."""
DATABASES = Path(__file__).resolve().parent / "databases"
ACTIVATION_QMAX = 127.0


def host_target(threads: int = 1) -> tvm.target.Target:
    """LLVM for this CPU (an explicit mcpu: ``native`` silently means generic in TVM 0.27)."""
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": threads})


# --------------------------------------------------------------------------- ternary matmuls


def formulation_for(shape: Shape, m: int | None, isa: str | None = None) -> str:
    """The kernel a Relax call of ``m`` rows (None: any) of ``shape`` compiles: ``lut`` for sherry's M = 1
    calls (the decode module) on AVX-512, whose 1.25-bit pair records and activation tables read 1.6x
    fewer weight bytes than the plane kernel's byte per code (at the 1B shape a decode step is a read of
    the weights); ``plane`` for everything else (the Relax path builds only the AVX-512 LUT kernel's
    tables, and the LUT kernel has no other format and no dynamic-M function)."""
    from tvm_schedules.tune import host_isa

    lut_ok = shape.format == LUT_FORMAT and not LutShape(shape.k, shape.n, shape.group_size).supported()
    return "lut" if m == 1 and lut_ok and (isa or host_isa()) == "avx512" else "plane"


def default_knobs(shape: Shape, formulation: str = "plane") -> Knobs:
    """Knobs valid for any shape: for the plane kernel the largest tiles and unroll up to 2 that divide
    it; for the LUT kernel a whole stream block per step, each pair over its tiles (``pair`` order: the
    pair's tables stay in registers), which ranked first of the LUT points at the LLaMA shapes cold
    (docs/tvm.md, "The LUT formulation")."""
    if formulation == "lut":
        return Knobs(tiles=LutShape(shape.k, shape.n, shape.group_size).block_tiles, unroll=1, order="pair")
    return Knobs(
        tiles=[t for t in tile_choices(shape) if t <= 2][-1], unroll=[u for u in unroll_choices(shape) if u <= 2][-1]
    )


def formulation_knob_space(shape: Shape, formulation: str) -> list[Knobs]:
    return lut.knob_space(LutShape(shape.k, shape.n, shape.group_size)) if formulation == "lut" else knob_space(shape)


def tuned_knobs(shape: Shape, isa: str | None = None, formulation: str = "plane") -> Knobs:
    """The knobs ``sherry tune`` found for this shape, ISA and formulation; for a shape the database lacks
    (the exporter's fused QKV and gate-up projections), those tuned for the same format, K, group size
    and formulation at the nearest N, when they are a point of this shape's space (at M = 1 the knobs
    shape the loop over K and the registers of a step; N only sets the number of steps); else
    :func:`default_knobs`. An entry of the other formulation is never taken: the knobs of the two
    kernels mean different loops."""
    from tvm_schedules.tune import host_isa

    path = DATABASES / (isa or host_isa()) / "tuned.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    same_k = [
        e
        for e in entries
        if e.get("formulation", "plane") == formulation
        and (e["format"], e["k"], e["group_size"]) == (shape.format, shape.k, shape.group_size)
    ]
    space = formulation_knob_space(shape, formulation)
    for e in sorted(same_k, key=lambda e: abs(e["n"] - shape.n)):
        knobs = Knobs(tiles=e["tiles"], unroll=e["unroll"], order=e["order"])
        if knobs in space:
            return knobs
    return default_knobs(shape, formulation)


def measured_knobs(shape: Shape, target: tvm.target.Target, number: int = 100, formulation: str = "plane") -> Knobs:
    """The fastest knobs for this shape at M = 1 on this machine, timing every candidate (a few seconds):
    a quick stand-in for ``sherry tune`` for shapes its database lacks (like the fused QKV projection)."""
    from tvm_schedules.tune import bare_timer, host_isa

    timings = []
    for knobs in formulation_knob_space(shape, formulation):
        func = kernel_func(shape, knobs, host_isa(), 1, formulation)
        timer = bare_timer(func, target, number, repeat=3, min_repeat_ms=0)
        timings.append((timer(), knobs))
    return min(timings, key=lambda timing: timing[0])[1]


def quantized_groups_te(x: te.Tensor, k: int, group_size: int, padded_group: int) -> tuple[te.Tensor, te.Tensor]:
    """``x [M, K]`` float32 to the int8 activations of docs/formats.md ("Activations") per scale group:
    ``amax [M, G]`` (max |x|; +inf marks a group holding a NaN or an infinity) and ``qv [M, G,
    padded_group]`` (xq, zero past the group and past K)."""
    rows = x.shape[0]
    groups = -(-k // group_size)
    f32 = "float32"
    inf = tirx.const(float("inf"), f32)

    def value(m: Any, g: Any, i: Any) -> tirx.PrimExpr:
        col = g * group_size + i
        inside = tirx.all(i < group_size, col < k)
        return tirx.if_then_else(inside, x[m, tirx.min(col, k - 1)], tirx.const(0.0, f32))

    r = te.reduce_axis((0, group_size), name="r")
    # max |x| over the group; a NaN or an infinity makes it +inf, which marks the group non-finite
    amax = te.compute(
        (rows, groups),
        lambda m, g: te.max(tirx.Select(tirx.isfinite(value(m, g, r)), tirx.abs(value(m, g, r)), inf), axis=r),
        name="amax",
    )
    inv = te.compute(
        (rows, groups),
        lambda m, g: tirx.Select(
            tirx.all(amax[m, g] < inf, amax[m, g] > 0),
            tirx.const(ACTIVATION_QMAX, f32) / amax[m, g],
            tirx.const(0.0, f32),
        ),
        name="inv",
    )

    def quantized(m: Any, g: Any, i: Any) -> tirx.PrimExpr:
        q = tirx.nearbyint(value(m, g, i) * inv[m, g])
        q = tirx.max(tirx.min(q, tirx.const(ACTIVATION_QMAX, f32)), tirx.const(-ACTIVATION_QMAX, f32))
        return tirx.Select(inv[m, g] > 0, q, tirx.const(0.0, f32)).astype("int8")

    return amax, te.compute((rows, groups, padded_group), quantized, name="qv")  # padded group order


def group_scale(amax: te.Tensor, m: Any, g: Any) -> tirx.PrimExpr:
    """s = max|x| / 127 of a group, NaN for a non-finite group (its outputs are NaN, as in a float matmul)."""
    f32 = "float32"
    finite = amax[m, g] < tirx.const(float("inf"), f32)
    return tirx.Select(finite, amax[m, g] / tirx.const(ACTIVATION_QMAX, f32), tirx.const(float("nan"), f32))


def quantize_te(x: te.Tensor, shape: Shape) -> tuple[te.Tensor, te.Tensor]:
    """``x [M, K]`` float32 to the plane kernel's activation workspace rows (``layout.activations``): int8
    ``[M, row_bytes]`` (each group at ``g·padded_group``, zero padded, quads in dword order) and the
    float32 view ``[M, row_bytes/4]`` from ``scale_offset``: the G group scales, then the G int32 group
    sums Σ xq (their bits), then zeros."""
    rows = x.shape[0]
    pg, groups, lanes = shape.padded_group, shape.groups, shape.lanes_per_code
    quad_bytes = CODES_PER_QUAD * lanes
    amax, qv = quantized_groups_te(x, shape.k, shape.group_size, pg)

    def ordered(m: Any, c: Any) -> tirx.PrimExpr:
        # byte 4p + j of a quad is column L·j + p of it (layout.dword_order)
        b = c % quad_bytes
        src = (c // quad_bytes) * quad_bytes + lanes * (b % CODES_PER_QUAD) + b // CODES_PER_QUAD
        g = tirx.min(src // pg, groups - 1)  # Select reads both branches: keep g in bounds
        return tirx.Select(c < groups * pg, qv[m, g, src % pg], tirx.const(0, "int8"))

    xq = te.compute((rows, shape.row_bytes), ordered, name="xq")
    ri = te.reduce_axis((0, pg), name="ri")
    sums = te.compute((rows, groups), lambda m, g: te.sum(qv[m, g, ri].astype("int32"), axis=ri), name="sums")

    def scale_row(m: Any, j: Any) -> tirx.PrimExpr:
        g = tirx.min(j, groups - 1)
        total = tirx.reinterpret("float32", sums[m, tirx.max(tirx.min(j - groups, groups - 1), 0)])
        return tirx.Select(
            j < groups, group_scale(amax, m, g), tirx.Select(j < 2 * groups, total, tirx.const(0.0, "float32"))
        )

    scales = te.compute((rows, shape.row_bytes // 4), scale_row, name="xs")
    return xq, scales


LUT_TABLE_AXES = (2, 2, 2, 4, 16)
"""A pair's 512 table bytes as axes (piece, nibble half, sign, j, idx): byte ``piece·256 + half·128 +
sign·64 + j·16 + idx`` (lut.tables)."""


def lut_activations_te(x: te.Tensor, lanes: te.Tensor, ls: LutShape) -> tuple[te.Tensor, te.Tensor]:
    """``x [M, K]`` float32 to the LUT kernel's workspace (``lut.activations``): the tables ``[M, slots,
    2, 2, 2, 4, 16]`` int8 (a pair's 512 bytes per slot, :data:`LUT_TABLE_AXES`; the slots past the
    pairs zero), which the caller views as ``[M, slots, 512]``, and the float32 ``[M, row_bytes/4]``
    (the G group scales, then zeros). ``lanes [4, 16]`` int8: lane p of each sherry index
    (``SHERRY_DECODE[:16]`` transposed), so the innermost loop, over the 16 indices, reads it in order."""
    rows = x.shape[0]
    amax, qv = quantized_groups_te(x, ls.k, ls.group_size, ls.padded_group)
    pairs, per_group, cols = ls.pairs, ls.pairs_per_group, ls.pair_cols  # AVX-512 records: the Relax path's

    def entry(m: Any, slot: Any, piece: Any, half: Any, sign: Any, j: Any, idx: Any) -> tirx.PrimExpr:
        pair = tirx.min(slot, pairs - 1)  # Select reads both branches: keep the pair in bounds
        base = pair % per_group * cols + piece * (cols // 2) + 4 * j

        def nibbles(p: int) -> tirx.PrimExpr:  # xl = xq & 15 or xh = xq >> 4 (arithmetic), as lut.tables
            v = qv[m, pair // per_group, base + p].astype("int32")
            return tirx.Select(half == 0, v & 15, v >> 4)

        total = sum((lanes[p, idx].astype("int32") * nibbles(p) for p in range(4)), tirx.const(0, "int32"))
        signed = tirx.Select(sign == 0, total, -total)
        return tirx.Select(slot < pairs, signed, tirx.const(0, "int32")).astype("int8")

    slots = ls.row_bytes // TABLE_BYTES
    tables = te.compute((rows, slots, *LUT_TABLE_AXES), entry, name="tables")
    scales = te.compute(
        (rows, ls.row_bytes // 4),
        lambda m, j: tirx.Select(
            j < ls.groups, group_scale(amax, m, tirx.min(j, ls.groups - 1)), tirx.const(0.0, "float32")
        ),
        name="xs",
    )
    return tables, scales


def emit_unscheduled_te(bb: relax.BlockBuilder, fn: Callable[..., Any], args: list[relax.Expr], name: str) -> relax.Var:
    """``emit_te``, with the PrimFunc marked scheduled so that DLight leaves it alone (its CPU
    reduction rule fails on multi-output functions like :func:`quantize_te`)."""
    call = bb.call_te(fn, *args, primfunc_name_hint=name)
    gv = call.args[0]
    bb.update_func(gv, bb.get()[gv].with_attr("tirx.is_scheduled", True))
    return bb.emit(call)


@functools.cache
def kernel_func(
    shape: Shape,
    knobs: Knobs,
    isa: str | None = None,
    m: int | None = None,
    formulation: str = "plane",
    superblocks: int = 1,
) -> tirx.PrimFunc:
    """The TensorIR kernel for M = ``m`` rows (None: any M) on ``isa`` (default: this host's), marked
    scheduled and opaque (no fusion, no re-schedule). ``m`` 1 is the function ``sherry tune`` tunes;
    ``formulation`` ``lut`` is its LUT form (M = 1 only), on a weight stream of ``superblocks`` parallel
    steps. Cached: every layer of a model has the same few shapes, and scheduling one takes a good part
    of a second."""
    from tvm_schedules.tune import host_isa

    if formulation == "lut":
        ls = LutShape(shape.k, shape.n, shape.group_size, superblocks)
        func = lut.prim_func(ls, knobs, m=1, name=f"ternary_{ls.key}_s{superblocks}_m1")
    else:
        name = f"ternary_{shape.key}" if m is None else f"ternary_{shape.key}_m{m}"
        func = prim_func(shape, m, knobs, isa or host_isa(), name)
    return func.with_attr({"tirx.is_scheduled": True, "op_pattern": 8})  # 8: kOpaque


@functools.cache
def lut_activations_func(ls: LutShape) -> tirx.PrimFunc:
    """:func:`lut_activations_te` for any number of rows, scheduled: per pair, its 32 runs of 16 table
    entries unrolled and each run one vector (4 µs a row at K = 2048 on Zen 4, as long as the plane
    kernel's unscheduled quantization; unscheduled, 9 µs)."""
    rows = tirx.Var("m", "int64")
    x = te.placeholder((rows, ls.k), "float32", name="x")
    lanes = te.placeholder((4, 16), "int8", name="lanes")
    sch = Schedule(te.create_prim_func([x, lanes, *lut_activations_te(x, lanes, ls)]))
    *outer, idx = sch.get_loops(sch.get_sblock("tables"))
    for loop in outer[2:]:  # piece, nibble half, sign, j
        sch.unroll(loop)
    sch.vectorize(idx)
    return sch.mod["main"].with_attr({"global_symbol": f"tables_{ls.key}", "tirx.is_scheduled": True})


SHERRY_LANES = np.ascontiguousarray(SHERRY_DECODE[:16].T.astype(np.int8))
"""Lane p of each 4-bit sherry index (sign bit clear), ``[4, 16]``: what :func:`lut_activations_te` sums."""


def emit_ternary_matmul(
    bb: relax.BlockBuilder,
    x: relax.Expr,
    packed: PackedWeight,
    bias: relax.Expr | None,
    knobs: KnobChoice | None = None,
) -> relax.Expr:
    """``x [..., K] @ Wᵀ (+ bias)`` on the packed weight: quantize (TE) then the TVM kernel (call_tir); the
    kernel and its workspace by :func:`formulation_for`, its knobs by ``knobs`` (default
    :func:`tuned_knobs`)."""
    shape = Shape(packed.format, packed.k, packed.n, packed.group_size)
    if problem := shape.supported():
        raise ValueError(f"the TVM kernels cannot take {shape.key}: {problem}")
    lead = list(x.ty.shape)[:-1]
    rows = bb.normalize(relax.op.reshape(x, [-1, shape.k]))
    m = rows.ty.shape[0]
    static = int(m) if isinstance(m, tirx.IntImm) else None  # the decode module's M = 1: the tuned function
    formulation = formulation_for(shape, static)
    superblocks = 1
    if formulation == "lut":  # the stream in as few superblocks as keep TVM's threads busy, as the op's
        superblocks = lut.superblocks_for(LutShape(shape.k, shape.n, shape.group_size), tvm.runtime.num_threads())
    chosen = (knobs or tuned_knobs)(shape, formulation=formulation)
    func = kernel_func(shape, chosen, m=static, formulation=formulation, superblocks=superblocks)
    gv = bb.add_func(func, str(func.attrs["global_symbol"]))
    if formulation == "lut":
        ls = LutShape(shape.k, shape.n, shape.group_size, superblocks)
        slots = ls.row_bytes // TABLE_BYTES
        tables_gv = bb.add_func(lut_activations_func(ls), f"tables_{ls.key}")
        acts = bb.emit(
            relax.call_tir(
                tables_gv,
                [rows, relax.const(SHERRY_LANES)],
                [
                    relax.TensorType([m, slots, *LUT_TABLE_AXES], "int8"),
                    relax.TensorType([m, ls.row_bytes // 4], "float32"),
                ],
            )
        )
        tables = bb.emit(relax.op.reshape(relax.TupleGetItem(acts, 0), [m, slots, TABLE_BYTES]))
        args = [tables, relax.TupleGetItem(acts, 1), relax.const(lut.weights(packed, superblocks))]
    else:
        planes, alpha = repack(packed)
        acts = emit_unscheduled_te(bb, functools.partial(quantize_te, shape=shape), [rows], f"quantize_{shape.key}")
        weights = [relax.const(a) for a in (*planes, alpha)]  # one plane: [N/16, quads, 64] code bytes
        args = [relax.TupleGetItem(acts, 0), relax.TupleGetItem(acts, 1), *weights]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType([m, shape.n], "float32")))
    if bias is not None:
        y = relax.op.add(y, bias)
    return relax.op.reshape(y, [*lead, shape.n])


def _constant(expr: relax.Expr, what: str) -> np.ndarray:
    if not isinstance(expr, tvm.ir.expr.Constant):
        raise ValueError(f"{what} must be an initializer (a constant) to be repacked at import")
    return expr.value.numpy()


def ternary_converter(fmt: str, knobs: KnobChoice) -> type[frontend.OnnxOpConverter]:
    """The converter of one ``ai.sherry`` op: inputs X, B (packed uint8), scales (float16), optional bias."""

    class TernaryMatMul(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Sequence[Any], attr: dict[str, Any], params: Any) -> Any:
            packed = PackedWeight(
                fmt, _constant(inputs[1], "B"), _constant(inputs[2], "scales"), int(attr["K"]), int(attr["group_size"])
            )
            return emit_ternary_matmul(bb, inputs[0], packed, inputs[3], knobs)

    TernaryMatMul.__name__ = f"{fmt.capitalize()}MatMul"
    return TernaryMatMul


# --------------------------------------------------------------------------- float MatMul on a constant weight


def dense_lanes(n: int) -> int:
    return next(v for v in (64, 32, 16, 8, 4, 2, 1) if n % v == 0)


def dense_weight(w: np.ndarray) -> np.ndarray:
    """``W [K, N]`` to ``[N/L, K, L]``: each block of L columns contiguous, as :func:`dense_func` reads it."""
    k, n = w.shape
    lanes = dense_lanes(n)
    return np.ascontiguousarray(w.reshape(k, n // lanes, lanes).transpose(1, 0, 2))


def dense_func(k: int, n: int) -> tirx.PrimFunc:
    """``Y [M, N] = X [M, K] @ W`` (W as :func:`dense_weight` lays it out) for dynamic M, vectorized across a
    block of L columns, the block's accumulators in registers, parallel over blocks.

    The frontend's MatMul legalizes to an unscheduled loop nest with K innermost (strided weight reads),
    about 50x slower than this on the LM head.
    """
    lanes = dense_lanes(n)
    rows = te.var("M", "int64")
    x = te.placeholder((rows, k), "float32", name="X")
    w = te.placeholder((n // lanes, k, lanes), "float32", name="W")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((rows, n), lambda m, j: te.sum(x[m, r] * w[j // lanes, r, j % lanes], axis=r), name="Y")
    name = f"dense_k{k}_n{n}"
    sch = tvm.s_tir.Schedule(tvm.IRModule({name: te.create_prim_func([x, w, y]).with_attr("global_symbol", name)}))
    sch.work_on(name)
    block = sch.get_sblock("Y")
    m, j, r = sch.get_loops(block)
    jo, ji = sch.split(j, factors=[None, lanes])
    sch.reorder(jo, m, r, ji)
    sch.parallel(jo)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, m)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(ji)
    sch.decompose_reduction(block, r)
    sch.vectorize(sch.get_loops(sch.get_sblock("Y_init"))[-1])
    return sch.mod[name].with_attr({"tirx.is_scheduled": True, "op_pattern": 8})


def emit_dense(bb: relax.BlockBuilder, x: relax.Expr, w: np.ndarray) -> relax.Expr:
    """``x [..., K] @ w [K, N]`` through the scheduled :func:`dense_func`."""
    k, n = w.shape
    lead = list(x.ty.shape)[:-1]
    rows = bb.normalize(relax.op.reshape(x, [-1, k]))
    gv = bb.add_func(dense_func(k, n), f"dense_k{k}_n{n}")
    weight = relax.const(dense_weight(w))
    y = bb.emit(relax.call_tir(gv, [rows, weight], relax.TensorType([rows.ty.shape[0], n], "float32")))
    return relax.op.reshape(y, [*lead, n])


class MatMul(frontend.OnnxOpConverter):
    """ONNX MatMul: on a constant 2-D weight, the scheduled :func:`dense_func`; otherwise the frontend's."""

    @classmethod
    def _impl_v13(cls, bb: relax.BlockBuilder, inputs: Sequence[Any], attr: dict[str, Any], params: Any) -> Any:
        x, w = inputs[0], inputs[1]
        if not isinstance(w, tvm.ir.expr.Constant) or len(w.ty.shape) != 2 or x.ty.dtype != "float32":
            return frontend.MatMul.get_converter(13)(bb, inputs, attr, params)
        return emit_dense(bb, x, w.value.numpy())


class FusedMatMul(frontend.OnnxOpConverter):
    """com.microsoft FusedMatMul as the exporter writes the float LM head: ``x @ Wᵀ`` on the constant
    ``[vocab, hidden]`` table (transB=1), through the same scheduled :func:`dense_func` as MatMul."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Sequence[Any], attr: dict[str, Any], params: Any) -> Any:
        if attr.get("transA", 0) or attr.get("transBatchA", 0) or attr.get("transBatchB", 0):
            raise ValueError("FusedMatMul: only transB is supported (the exporter's LM head)")
        if float(attr.get("alpha", 1.0)) != 1.0:
            raise ValueError(f"FusedMatMul: alpha={attr['alpha']} is not supported (the exporter writes 1)")
        w = _constant(inputs[1], "FusedMatMul's B").astype(np.float32)
        return emit_dense(bb, inputs[0], w.T if attr.get("transB", 0) else w)


class GatherBlockQuantized(frontend.OnnxOpConverter):
    """com.microsoft GatherBlockQuantized on uint8 codes with the default zero point (the exporter's quantized
    embedding, possibly sharing MatMulNBits' bytes): the constant table is dequantized once at import,
    exactly as onnxruntime does per row, and rows are taken from it."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Sequence[Any], attr: dict[str, Any], params: Any) -> Any:
        data = _constant(inputs[0], "GatherBlockQuantized's data")
        scales = _constant(inputs[2], "GatherBlockQuantized's scales")
        bits, block = int(attr.get("bits", 4)), int(attr.get("block_size", 128))
        if len(inputs) > 3 and inputs[3] is not None:
            raise ValueError("GatherBlockQuantized: explicit zero points are not supported")
        last_axis = int(attr.get("quantize_axis", 1)) % data.ndim == data.ndim - 1
        if data.dtype != np.uint8 or int(attr.get("gather_axis", 0)) != 0 or not last_axis:
            raise ValueError("GatherBlockQuantized: need uint8 data, gather_axis 0 and the last axis quantized")
        k = data.shape[-1] * (8 // bits)
        rows = dequantize_nbits(data.reshape(-1, data.shape[-1]), scales, bits, block, k)
        table = relax.const(rows.reshape(*data.shape[:-1], k))
        return relax.op.take(table, inputs[1], axis=0)


# --------------------------------------------------------------------------- MatMulNBits (onnxruntime contrib)


@dataclass(frozen=True)
class NBitsShape:
    """One MatMulNBits weight: ``bits`` per weight in blocks of ``block_size`` along K, default zero point."""

    k: int
    n: int
    bits: int
    block_size: int

    @property
    def groups(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def lane_block(self) -> int:
        """Rows interleaved per weight block, one parallel task of :func:`nbits_func`: up to 8 vectors of
        TILE rows, so that a task reads one forward stream (8 streams of 16 rows each read 1.2x slower on
        LLaMA-3.2-1B's head); 0 if N is not a multiple of TILE."""
        if self.n % TILE:
            return 0
        return TILE * next(v for v in (8, 4, 2, 1) if self.n // TILE % v == 0)

    @property
    def row_bytes(self) -> int:
        return self.groups * self.block_size * self.bits // 8


def nbits_func(shape: NBitsShape) -> tirx.PrimFunc:
    """``Y = X @ Wᵀ`` on MatMulNBits codes kept packed (rows interleaved in blocks of LB), dequantized in
    registers in float32: ``Y[m, n] = Σ_g scale[n, g] · Σ_j x[m, g·bs + j] · (q[n, g·bs + j] - 2^(bits-1))``.
    8-bit codes come as int8 ``q - 128`` (:func:`nbits_weights`), so a weight is one sign-extending load and
    one conversion from the float it dots with (the same float values: half the vector work per weight
    of shifting, masking, converting and subtracting, which had made the 1B shape's head compute-bound).
    Its own small schedule: a task takes one weight block (up to 8 vectors of TILE rows, tasks in
    parallel); for each group in order, the group's dots of the block (``dot``: the codes read in order,
    one accumulator register per vector of rows, so their dependency chains overlap), then ``Y += scale ·
    dot`` in registers; Y is written once. (A plain loop nest here kept the accumulators in memory and
    wrote every group's dots out, one chain of stores and loads: 3× slower on LLaMA-3.2-1B's head.)"""
    lb, bits, bs = shape.lane_block, shape.bits, shape.block_size
    per_byte = 8 // bits
    rows = te.var("M", "int64")
    x = te.placeholder((rows, shape.k), "float32", name="X")
    w = te.placeholder((shape.n // lb, shape.row_bytes, lb), "int8" if bits == 8 else "uint8", name="W0")
    scales = te.placeholder((shape.n // lb, shape.groups, lb), "float32", name="alpha")
    j = te.reduce_axis((0, bs), name="j")
    zero_point = tirx.const(float(1 << (bits - 1)), "float32")

    def term(m: Any, nb: Any, g: Any, lane: Any) -> tirx.PrimExpr:
        col = g * bs + j
        byte = w[nb, col // per_byte, lane]
        value = tirx.if_then_else(col < shape.k, x[m, tirx.min(col, shape.k - 1)], tirx.const(0.0, "float32"))
        if bits == 8:
            return value * byte.astype("float32")  # q - 128, stored
        code = ((byte >> ((col % per_byte) * bits).astype("uint8")) & ((1 << bits) - 1)).astype("float32")
        return value * (code - zero_point)

    dot = te.compute(
        (rows, shape.n // lb, shape.groups, lb),
        lambda m, nb, g, lane: te.sum(term(m, nb, g, lane), axis=j),
        name="dot",
    )
    gi = te.reduce_axis((0, shape.groups), name="gi")
    y = te.compute(
        (rows, shape.n),
        lambda m, n: te.sum(scales[n // lb, gi, n % lb] * dot[m, n // lb, gi, n % lb], axis=gi),
        name="Y",
    )
    name = f"nbits{bits}_k{shape.k}_n{shape.n}_b{bs}"
    func = te.create_prim_func([x, w, scales, y]).with_attr("global_symbol", name)
    sch = tvm.s_tir.Schedule(tvm.IRModule({name: func}))
    sch.work_on(name)
    y_block, dot_block = sch.get_sblock("Y"), sch.get_sblock("dot")
    m, n, gi = sch.get_loops(y_block)
    task, vectors, lane = sch.split(n, [None, lb // TILE, TILE])
    sch.reorder(task, m, gi, vectors, lane)
    sch.parallel(task)
    acc = sch.cache_write(y_block, 0, "local")
    sch.reverse_compute_at(acc, m)
    sch.vectorize(sch.get_loops(acc)[-1])
    # each group's dots right where Y takes them, in registers: one accumulator per vector, code by code
    sch.compute_at(dot_block, gi)
    sch.set_scope(dot_block, 0, "local")
    d_lanes, d_j = sch.get_loops(dot_block)[-2:]
    d_vectors, d_lane = sch.split(d_lanes, [None, TILE])
    # the codes of one byte together, unrolled: one load per byte and constant shifts
    d_byte, d_code = sch.split(d_j, [None, per_byte])
    sch.reorder(d_byte, d_code, d_vectors, d_lane)
    for loop in (d_code, d_vectors, vectors):
        sch.unroll(loop)
    sch.vectorize(d_lane)
    sch.vectorize(lane)
    for block, k in ((dot_block, d_byte), (y_block, gi)):
        init = sch.decompose_reduction(block, k)
        *_, init_lanes = sch.get_loops(init)
        init_vectors, init_lane = sch.split(init_lanes, [None, TILE])
        sch.unroll(init_vectors)
        sch.vectorize(init_lane)
    return sch.mod[name].with_attr({"tirx.is_scheduled": True, "op_pattern": 8})


def nbits_weights(codes: np.ndarray, scales: np.ndarray, shape: NBitsShape) -> tuple[np.ndarray, np.ndarray]:
    """A MatMulNBits node's B and scales as :func:`nbits_func` reads them: the rows interleaved in blocks of
    ``lane_block`` (``[N/LB, row_bytes, LB]`` and ``[N/LB, groups, LB]``), 8-bit codes q as int8 q - 128
    (flipping the top bit: exactly q minus the default zero point), narrower codes as they are."""
    lb = shape.lane_block
    rows = np.asarray(codes, np.uint8).reshape(shape.n, shape.row_bytes)
    if shape.bits == 8:
        rows = (rows ^ np.uint8(0x80)).view(np.int8)
    alpha = np.asarray(scales).astype(np.float32).reshape(shape.n, shape.groups)
    return tuple(np.ascontiguousarray(a.reshape(shape.n // lb, lb, -1).transpose(0, 2, 1)) for a in (rows, alpha))


class MatMulNBits(frontend.OnnxOpConverter):
    """com.microsoft MatMulNBits with the default zero point (what the exporter writes), computed in float
    on the packed codes. onnxruntime's accuracy_level 4 rounds the activations to int8 per block first,
    so the two agree to that rounding, not bit for bit."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Sequence[Any], attr: dict[str, Any], params: Any) -> Any:
        if inputs[3] is not None or inputs[4] is not None:
            raise ValueError("MatMulNBits: explicit zero points and g_idx are not supported")
        shape = NBitsShape(int(attr["K"]), int(attr["N"]), int(attr["bits"]), int(attr["block_size"]))
        if shape.bits not in (2, 4, 8) or not shape.lane_block:
            raise ValueError(f"MatMulNBits: bits={shape.bits}, N={shape.n} (need 2/4/8 bits, N a multiple of 16)")
        codes, scales = _constant(inputs[1], "B"), _constant(inputs[2], "scales")
        planes = [relax.const(a) for a in nbits_weights(codes, scales, shape)]
        x = inputs[0]
        lead = list(x.ty.shape)[:-1]
        rows = bb.normalize(relax.op.reshape(x, [-1, shape.k]))
        gv = bb.add_func(nbits_func(shape), f"nbits{shape.bits}_k{shape.k}_n{shape.n}")
        y = bb.emit(relax.call_tir(gv, [rows, *planes], relax.TensorType([rows.ty.shape[0], shape.n], "float32")))
        if inputs[5] is not None:
            y = relax.op.add(y, inputs[5])
        return relax.op.reshape(y, [*lead, shape.n])


# --------------------------------------------------------------------------- onnxruntime contrib ops


class SkipSimplifiedLayerNormalization(frontend.OnnxOpConverter):
    """com.microsoft: sum = x + skip (+ bias); out = RMSNorm(sum)·gamma. Outputs (out, -, -, sum)."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Sequence[Any], attr: dict[str, Any], params: Any) -> Any:
        x, skip, gamma, bias = inputs[0], inputs[1], inputs[2], inputs[3]
        total = bb.emit(relax.op.add(x, skip))
        if bias is not None:
            total = bb.emit(relax.op.add(total, bias))
        out = relax.op.nn.rms_norm(total, gamma, axes=[-1], epsilon=float(attr.get("epsilon", 1e-12)))
        unused = relax.const(0, "float32")  # mean and inv_std_var are never read by our graphs
        return relax.Tuple([out, unused, unused, total])


def rotary_te(x: te.Tensor, past: te.Tensor, cos: te.Tensor, sin: te.Tensor) -> te.Tensor:
    """Non-interleaved rotary on ``x [B, S, heads, D]``; token s sits at position past_length + s."""
    half = x.shape[3] // 2
    start = past.shape[2]

    def rot(b: Any, s: Any, h: Any, d: Any) -> tirx.PrimExpr:
        pos = start + s
        low = d < half
        j = tirx.Select(low, d, d - half)
        partner = x[b, s, h, tirx.Select(low, d + half, d - half)]
        signed = tirx.Select(low, -partner, partner)
        return x[b, s, h, d] * cos[pos, j] + signed * sin[pos, j]

    return te.compute(x.shape, rot, name="rotary")


def causal_mask_te(scores: te.Tensor) -> te.Tensor:
    """``scores [B, H, S, T]``: query s (position T - S + s) sees keys t ≤ its position."""
    s_len, t_len = scores.shape[2], scores.shape[3]
    lowest = tirx.const(float(np.finfo(np.float32).min), "float32")
    return te.compute(
        scores.shape,
        lambda b, h, s, t: tirx.Select(t <= t_len - s_len + s, scores[b, h, s, t], lowest),
        name="causal_mask",
    )


def pair_sum(terms: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """The sum of ``terms`` as a balanced tree (log depth: the additions of a level are independent)."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


@functools.cache
def decode_attention_func(heads: int, kv_heads: int, head_dim: int, scale: float, rotary: bool) -> tirx.PrimFunc:
    """GroupQueryAttention for one new token (batch 1, sequence 1) on KV buffers of any capacity C, in place.

    ``(qkv [1, 1, (H + 2·KVH)·D], K, V [1, KVH, C, D], cos, sin [P, D/2], mask [1, T]) -> out [1, 1, H·D]``:
    the token sits at position T − 1 (T, the sequence length, comes from the mask's shape, as in
    onnxruntime's shared-buffer mode; the mask's values are not read). It writes the token's rotated key
    and its value at that position of K and V, then for each query head h attends over positions 0..T−1
    of kv head h // (H / KVH): scores q·k·scale (q·k in D/VL vector lanes, summed as a tree), the softmax
    less the maximum, then Σ p·v / Σ p vectorized over D. Nothing is copied: positions ≥ T are never read.
    """
    H, KVH, D, half = heads, kv_heads, head_dim, head_dim // 2
    group, width = heads // kv_heads, (heads + 2 * kv_heads) * head_dim
    lanes = next(v for v in (16, 8, 4, 2, 1) if D % v == 0)
    chunks = D // lanes
    f32 = "float32"

    def rotated(x: tirx.Buffer, cos: tirx.Buffer, sin: tirx.Buffer, base: Any, pos: Any, d: Any) -> tirx.PrimExpr:
        if not rotary:
            return x[0, 0, base + d]
        j = tirx.Select(d < half, d, d - half)
        low, high = x[0, 0, base + tirx.min(d + half, D - 1)], x[0, 0, base + tirx.max(d - half, 0)]
        partner = tirx.Select(d < half, -low, high)
        return x[0, 0, base + d] * cos[pos, j] + partner * sin[pos, j]

    @T.prim_func(private=True)
    def attention(qkv: T.handle, k_cache: T.handle, v_cache: T.handle, cos: T.handle, sin: T.handle, mask: T.handle,
                  out: T.handle):  # fmt: skip
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        capacity, total, positions = T.int64(), T.int64(), T.int64()
        X = T.match_buffer(qkv, (1, 1, width), f32)
        K = T.match_buffer(k_cache, (1, KVH, capacity, D), f32)
        V = T.match_buffer(v_cache, (1, KVH, capacity, D), f32)
        CS = T.match_buffer(cos, (positions, half), f32)
        SN = T.match_buffer(sin, (positions, half), f32)
        T.match_buffer(mask, (1, total), "int64")
        Y = T.match_buffer(out, (1, 1, H * D), f32)
        q = T.alloc_buffer((D,), f32, scope="local")
        part = T.alloc_buffer((lanes,), f32, scope="local")
        acc = T.alloc_buffer((D,), f32, scope="local")
        top = T.alloc_buffer((1,), f32, scope="local")
        den = T.alloc_buffer((1,), f32, scope="local")
        scores = T.alloc_buffer((total,), f32)
        for g, d in T.grid(KVH, D):
            K[0, g, total - 1, d] = rotated(X, CS, SN, (H + g) * D, total - 1, d)
            V[0, g, total - 1, d] = X[0, 0, (H + KVH + g) * D + d]
        for h in range(H):
            for d in range(D):
                q[d] = rotated(X, CS, SN, h * D, total - 1, d)
            for t in range(total):
                for lane in T.vectorized(lanes):
                    part[lane] = T.float32(0)
                    for c in T.unroll(chunks):
                        part[lane] = part[lane] + q[c * lanes + lane] * K[0, h // group, t, c * lanes + lane]
                scores[t] = pair_sum([part[i] for i in range(lanes)]) * T.float32(scale)
            top[0] = scores[0]
            for t in range(total):
                top[0] = T.max(top[0], scores[t])
            den[0] = T.float32(0)
            for t in range(total):
                scores[t] = T.exp(scores[t] - top[0])
                den[0] = den[0] + scores[t]
            for d in T.vectorized(D):
                acc[d] = T.float32(0)
            for t in range(total):
                for d in T.vectorized(D):
                    acc[d] = acc[d] + scores[t] * V[0, h // group, t, d]
            for d in T.vectorized(D):
                Y[0, 0, h * D + d] = acc[d] / den[0]

    return attention


def attention_config(qkv: relax.Expr, attr: dict[str, Any]) -> tuple[int, int, int, float]:
    """Heads, KV heads, head size and score scale of a GroupQueryAttention node; refuses what is not converted."""
    if attr.get("rotary_interleaved", 0) or attr.get("local_window_size", -1) != -1 or attr.get("softcap", 0.0):
        raise ValueError("GroupQueryAttention: interleaved rotary, local windows and softcap are not supported")
    heads, kv_heads = int(attr["num_heads"]), int(attr["kv_num_heads"])
    head_dim = int(qkv.ty.shape[2]) // (heads + 2 * kv_heads)
    return heads, kv_heads, head_dim, float(attr.get("scale", 0.0)) or head_dim**-0.5


class GroupQueryAttention(frontend.OnnxOpConverter):
    """com.microsoft GroupQueryAttention as the exporter emits it: packed QKV, do_rotary with the cos/sin
    caches, past/present KV ``[B, kv_heads, T, D]``, causal; seqlens_k/total_sequence_length are implied by
    the shapes (the attention mask is all ones)."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Sequence[Any], attr: dict[str, Any], params: Any) -> Any:
        qkv, key, value, past_k, past_v = inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]
        cos, sin = inputs[7], inputs[8]
        if key is not None or value is not None:
            raise ValueError("GroupQueryAttention: only packed QKV (empty key/value inputs) is supported")
        heads, kv_heads, head_dim, scale = attention_config(qkv, attr)
        batch, seq, _ = qkv.ty.shape
        q, k, v = bb.emit(relax.op.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=2))
        q = bb.emit(relax.op.reshape(q, [batch, seq, heads, head_dim]))
        k = bb.emit(relax.op.reshape(k, [batch, seq, kv_heads, head_dim]))
        v = bb.emit(relax.op.reshape(v, [batch, seq, kv_heads, head_dim]))
        if attr.get("do_rotary", 0):
            q = bb.emit_te(rotary_te, q, past_k, cos, sin, primfunc_name_hint="rotary")
            k = bb.emit_te(rotary_te, k, past_k, cos, sin, primfunc_name_hint="rotary")
        present_k = bb.emit(relax.op.concat([past_k, relax.op.permute_dims(k, [0, 2, 1, 3])], axis=2))
        present_v = bb.emit(relax.op.concat([past_v, relax.op.permute_dims(v, [0, 2, 1, 3])], axis=2))
        keys, values = present_k, present_v
        if heads != kv_heads:  # head h reads kv head h // (heads / kv_heads)
            keys = relax.op.repeat(keys, heads // kv_heads, axis=1)
            values = relax.op.repeat(values, heads // kv_heads, axis=1)
        scores = relax.op.multiply(
            relax.op.matmul(relax.op.permute_dims(q, [0, 2, 1, 3]), relax.op.permute_dims(keys, [0, 1, 3, 2])),
            relax.const(scale, "float32"),
        )
        probs = relax.op.nn.softmax(bb.emit_te(causal_mask_te, bb.normalize(scores), primfunc_name_hint="mask"))
        out = relax.op.permute_dims(relax.op.matmul(probs, values), [0, 2, 1, 3])
        return relax.Tuple([relax.op.reshape(out, [batch, seq, heads * head_dim]), present_k, present_v])


class SharedCacheAttention(frontend.OnnxOpConverter):
    """GroupQueryAttention for the decode module (:func:`decode_model`): one token, the past and present KV
    being the same ``[1, kv_heads, capacity, D]`` buffers, written in place by :func:`decode_attention_func`
    (``call_tir_inplace``), the sequence length taken from the attention mask's shape."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: Sequence[Any], attr: dict[str, Any], params: Any) -> Any:
        qkv, key, value, past_k, past_v = inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]
        if key is not None or value is not None:
            raise ValueError("GroupQueryAttention: only packed QKV (empty key/value inputs) is supported")
        if [int(d) if isinstance(d, tirx.IntImm) else None for d in list(qkv.ty.shape)[:2]] != [1, 1]:
            raise ValueError(f"the decode module takes one token of one sequence, not QKV of shape {qkv.ty.shape}")
        heads, kv_heads, head_dim, scale = attention_config(qkv, attr)
        func = decode_attention_func(heads, kv_heads, head_dim, scale, bool(attr.get("do_rotary", 0)))
        gv = bb.add_func(func, f"decode_attention_h{heads}_kv{kv_heads}_d{head_dim}")
        mask = params[0]["attention_mask"]
        out_ty = [relax.TensorType([1, 1, heads * head_dim], "float32"), past_k.ty, past_v.ty]
        call = relax.call_tir_inplace(gv, [qkv, past_k, past_v, inputs[7], inputs[8], mask], [-1, 1, 2], out_ty)
        return bb.emit(call)


def converters(
    knobs: KnobChoice = tuned_knobs, shared_cache: bool = False
) -> dict[str, type[frontend.OnnxOpConverter]]:
    """Every op our decoders use that the frontend lacks, by ONNX op type; ``knobs`` picks each ternary
    kernel's schedule knobs; ``shared_cache``: attention for the decode module (:class:`SharedCacheAttention`)."""
    table: dict[str, type[frontend.OnnxOpConverter]] = {
        op: ternary_converter(f, knobs) for op, f in TERNARY_OPS.items()
    }
    table["SkipSimplifiedLayerNormalization"] = SkipSimplifiedLayerNormalization
    table["GroupQueryAttention"] = SharedCacheAttention if shared_cache else GroupQueryAttention
    table["MatMul"] = MatMul
    table["FusedMatMul"] = FusedMatMul
    table["MatMulNBits"] = MatMulNBits
    table["GatherBlockQuantized"] = GatherBlockQuantized
    return table


# --------------------------------------------------------------------------- import and compile


class DecoderImporter(frontend.ONNXGraphImporter):
    """TVM's ONNX importer with extra converters, consulted before the frontend's own table."""

    def __init__(self, extra: dict[str, type[frontend.OnnxOpConverter]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra = extra

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        known = set(frontend._get_convert_map()) | set(self.extra) | {"If", "Constant"}
        missing = sorted({node.op_type for node in graph.node} - known)
        if missing:
            heads = sorted(name for name, spec in HEAD_FORMATS.items() if spec.op_type in missing)
            hint = (
                f"; the LM head is in our {' / '.join(heads)} format, which the Relax path does not convert yet: "
                f"re-export with --lm-head {' or '.join(h for h in LM_HEADS if h not in HEAD_FORMATS)}"
                if heads
                else ""
            )
            raise tvm.error.OpNotImplemented(f"no Relax converter for: {', '.join(missing)}{hint}")

    def _convert_operator(self, op_name: str, inputs: list[relax.Expr], attrs: dict, opset: int) -> Any:
        if op_name not in self.extra:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        sym = self.extra[op_name].get_converter(opset)(self.bb, inputs, attrs, [self._nodes, self._params])
        return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym


def import_onnx(model: onnx.ModelProto, extra: dict[str, type[frontend.OnnxOpConverter]] | None = None) -> tvm.IRModule:
    """An ONNX model (weights loaded) to a Relax module, input dtypes and symbolic shapes as in the graph."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = DecoderImporter(converters() if extra is None else extra, shape_dict=None, dtype_dict={}, sanitize=False)
    return importer.from_onnx(model.graph, opset)


def set_threads(threads: int) -> None:
    """Size TVM's runtime thread pool (the kernels' ``parallel`` loops) to ``threads``.

    TVM starts its pool once per process, on the first parallel loop, with ``TVM_NUM_THREADS`` workers
    (unset: half the logical CPUs, one on a 2-core machine), and ``runtime.config_threadpool`` can use
    fewer of them, never more. So the variable is raised to the CPU count before the pool exists, and a
    pool that cannot give ``threads`` is an error rather than a silent single thread.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(max(threads, os.cpu_count() or 1)))
    tvm.get_global_func("runtime.config_threadpool")(1, threads)  # 1: big cores first (no big.LITTLE here)
    if (got := tvm.runtime.num_threads()) != threads:
        raise RuntimeError(
            f"TVM's thread pool runs {got} thread(s), not {threads}: it was started with TVM_NUM_THREADS="
            f"{os.environ.get('TVM_NUM_THREADS')}; set TVM_NUM_THREADS={threads} (or more) before running TVM"
        )


def decode_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place) with the decode module's input shapes: one token of one sequence
    (``input_ids [1, 1]``), the attention mask ``[1, total_sequence]`` (its length is the sequence's),
    and past KV ``[1, kv_heads, capacity, head_dim]``: the buffers :class:`RelaxDecoder` writes in place.
    Every other shape in the module is then static."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        names = {"input_ids": [1, 1], "attention_mask": [1, "total_sequence"]}
        shape = names.get(value.name, [1, None, "capacity", None] if value.name.startswith("past_key_values.") else [])
        for dim, new in zip(dims, shape, strict=False):
            if isinstance(new, int):
                dim.dim_value = new
            elif isinstance(new, str):
                dim.dim_param = new
    return model


@dataclass
class CompileInfo:
    import_seconds: float
    compile_seconds: float


class RelaxCausalLM(OnnxCausalLM):
    """An exported decoder compiled by TVM and run on the Relax VM, with :class:`OnnxCausalLM`'s interface.

    Two modules, each compiled when first needed (:meth:`compile`):

    - ``forward``: every shape symbolic (batch, sequence, past length), the KV cache grown by concatenation
      (a new present per call). ``forward`` and ``empty_cache`` behave as onnxruntime's; the cache holds
      TVM tensors; logits come back as numpy.
    - ``decode``: one token of one sequence, attention in place on preallocated KV buffers
      (:class:`SharedCacheAttention`), the ternary kernels' tuned M = 1 functions, every other shape
      static. ``generate`` runs on it through :class:`RelaxDecoder`, prompt token by token.
    """

    KINDS = ("forward", "decode")

    def __init__(
        self, model_path: str | os.PathLike[str], threads: int = 1, measure_knobs: bool = False, verify: bool = True
    ) -> None:
        """``measure_knobs``: time every kernel knob candidate per shape (:func:`measured_knobs`) instead of
        taking the tuning database's or the default. ``verify``: check the weights' recorded checksums first,
        as :class:`OnnxCausalLM` does. ``threads``: TVM's thread pool (:func:`set_threads`)."""
        path = Path(model_path)
        self.path = path / "model.onnx" if path.is_dir() else path
        if verify:
            verify_model_files(self.path)
        self.target = host_target(threads)
        self.knobs: KnobChoice = (
            functools.cache(functools.partial(measured_knobs, target=self.target)) if measure_knobs else tuned_knobs
        )
        set_threads(threads)
        self.device = tvm.cpu()
        self.info: dict[str, CompileInfo] = {}
        self._vms: dict[str, relax.VirtualMachine] = {}
        self._decoder: RelaxDecoder | None = None
        model = onnx.load(os.fspath(self.path), load_external_data=False)
        graph = model.graph
        # an op without a converter fails here, before any module is compiled
        DecoderImporter(converters(self.knobs), shape_dict=None, dtype_dict={})._check_for_unsupported_ops(graph)
        past = [i for i in graph.input if i.name.startswith("past_key_values.")]
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self.num_layers = len(past) // 2
        dims = past[0].type.tensor_type.shape.dim
        self.kv_heads, self.head_dim = dims[1].dim_value, dims[3].dim_value
        logits = next(o for o in graph.output if o.name == "logits")
        self.vocab_size = logits.type.tensor_type.shape.dim[-1].dim_value
        meta = {p.key: p.value for p in model.metadata_props}
        self.max_positions = int(meta[MAX_POSITIONS_KEY]) if MAX_POSITIONS_KEY in meta else None

    def compile(self, kind: str = "forward") -> relax.VirtualMachine:
        """The VM of module ``kind`` (:data:`KINDS`), imported and compiled on first use (``self.info[kind]``
        says how long each took)."""
        if kind not in self.KINDS:
            raise ValueError(f"unknown module {kind!r}: one of {', '.join(self.KINDS)}")
        if kind not in self._vms:
            start = time.perf_counter()
            model = onnx.load(os.fspath(self.path))
            decode = kind == "decode"
            mod = import_onnx(decode_model(model) if decode else model, converters(self.knobs, shared_cache=decode))
            imported = time.perf_counter()
            # The CPU backend's pipeline (legalize, fuse, lower); tvm.compile's "default" for CPU does not fuse.
            # DLight's CPU rules are not applied: on these dynamic shapes they emit per-element index
            # divisions that made attention 15x slower.
            pipeline = relax.get_default_pipeline(self.target)
            executable = tvm.compile(mod, target=self.target, relax_pipeline=pipeline)
            self.info[kind] = CompileInfo(imported - start, time.perf_counter() - imported)
            self._vms[kind] = relax.VirtualMachine(executable, self.device)
        return self._vms[kind]

    @property
    def vm(self) -> relax.VirtualMachine:
        return self.compile("forward")

    def decoder(self, positions: int) -> RelaxDecoder:
        """A :class:`RelaxDecoder` on the decode module holding at least ``positions`` positions, kept and
        reused by later calls that fit (as :meth:`OnnxCausalLM.decoder` keeps its buffers)."""
        self.check_length(positions)
        if self._decoder is None or self._decoder.capacity < positions:
            self._decoder = None  # the old buffers go before the new ones are allocated
            self._decoder = RelaxDecoder(self, positions)
        return self._decoder

    def _tensor(self, a: Any) -> Any:
        return tvm.runtime.tensor(np.ascontiguousarray(a), self.device) if isinstance(a, np.ndarray) else a

    def empty_cache(self, batch: int = 1) -> list[tuple[Any, Any]]:
        empty = tvm.runtime.tensor(np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32), self.device)
        return [(empty, empty) for _ in range(self.num_layers)]

    def forward(self, input_ids: np.ndarray, past: list[tuple[Any, Any]] | None = None) -> tuple[np.ndarray, Any]:
        input_ids = np.asarray(input_ids, np.int64)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {input_ids.shape}")
        past = past if past is not None else self.empty_cache(input_ids.shape[0])
        total = int(past[0][0].shape[2]) + input_ids.shape[1]
        self.check_length(total)
        feeds = {
            "input_ids": tvm.runtime.tensor(input_ids, self.device),
            "attention_mask": tvm.runtime.tensor(np.ones((input_ids.shape[0], total), np.int64), self.device),
        }
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = self._tensor(k)
            feeds[f"past_key_values.{i}.value"] = self._tensor(v)
        outputs = dict(
            zip(self.output_names, self.vm["main"](*(feeds[name] for name in self.input_names)), strict=True)
        )
        present = [(outputs[f"present.{i}.key"], outputs[f"present.{i}.value"]) for i in range(self.num_layers)]
        return outputs["logits"].numpy(), present


class RelaxDecoder:
    """Prefill, then decode step after step, on :class:`RelaxCausalLM`'s decode module and one preallocated
    ``[1, kv_heads, capacity, head_dim]`` key and value buffer per layer that are past and present at once.

    As onnxruntime's :class:`~sherry_export.generate.SharedKVDecoder`: each step passes the buffers and a
    view of one preallocated row of ones, one position longer, as the attention mask (its length is the
    sequence's); the module writes the token's key and value at the last position and attends over the
    ones before. No cache is copied or grown. The module takes one token, so the prompt runs token by
    token.
    """

    def __init__(self, lm: RelaxCausalLM, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the KV buffer must hold at least one position, got {capacity}")
        self.main = lm.compile("decode")["main"]
        self.capacity = capacity
        self.length = 0
        """Positions the cache holds now."""
        device = lm.device
        shape = (1, lm.kv_heads, capacity, lm.head_dim)
        self.cache = {
            f"past_key_values.{i}.{kv}": tvm.runtime.tensor(np.zeros(shape, np.float32), device)
            for i in range(lm.num_layers)
            for kv in ("key", "value")
        }
        self._ones = tvm.runtime.tensor(np.ones((1, capacity), np.int64), device)
        self._masks: dict[int, Any] = {}  # length -> a [1, length] view of the ones, made once
        token = tvm.runtime.tensor(np.zeros((1, 1), np.int64), device)
        self._token = np.from_dlpack(token)  # the tensor's memory: a token is written without a copy
        self._logits = lm.output_names.index("logits")
        self._args: list[Any] = [self.cache.get(name) for name in lm.input_names]
        self._args[lm.input_names.index("input_ids")] = token
        self._mask_slot = lm.input_names.index("attention_mask")

    def _run(self, token: int) -> np.ndarray:
        """One token at position ``length``: its logits ``[vocab]``, the VM's output tensor viewed without a
        copy (the next step makes a new one)."""
        length = self.length + 1
        if length not in self._masks:
            self._masks[length] = self._ones._create_view((1, length))
        self._token[0, 0] = token
        self._args[self._mask_slot] = self._masks[length]
        logits = np.from_dlpack(self.main(*self._args)[self._logits])
        self.length = length
        return logits[0, 0]

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Start a new sequence: logits ``[1, len(prompt_ids), vocab]`` of the prompt."""
        if not 1 <= len(prompt_ids) <= self.capacity:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this KV buffer holds 1 to {self.capacity}")
        self.length = 0
        return np.stack([self._run(token) for token in prompt_ids])[None]

    def step(self, token: int) -> np.ndarray:
        """Feed one token after the sequence so far: its logits ``[vocab]``."""
        if self.length == 0:
            raise RuntimeError("prefill a prompt before the first decode step")
        if self.length >= self.capacity:
            raise ValueError(f"the KV buffer is full ({self.capacity} positions); ask for a larger one")
        return self._run(token)
