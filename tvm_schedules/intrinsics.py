"""Tensor intrinsics of the TVM kernels: the weight decode (a table lookup) and the integer dot, per ISA.

Each intrinsic is a TensorIR description (what it computes, element by element, which ``tensorize``
matches against a block of :func:`tvm_schedules.kernels.workload`) and an implementation with the
x86 instructions, called through ``T.call_llvm_pure_intrin`` (LLVM does not find table lookups or
dot-product instructions in the element-wise form):

- ``decode`` (:func:`decode_name`, sherry and tl2): ``Out[p, i]`` = weight + 1 at lane p of the 5-bit
  code ``C[i]`` (:func:`lane_value`: the format's constant decode table, written arithmetically),
  for every lane p of a vector of codes. AVX-512: one ``vpermb`` of a 64-byte constant table per
  lane (64 codes); AVX2 (32 codes): two ``vpshufb`` of the table's halves and a blend on bit 4 of
  the code. Codes are 5-bit (below 32), as the weight layout guarantees.
- ``dot`` (:func:`dot_name`): ``C[r] += Σ_{p, j} int32(D[p, 4r + j]) · int32(X[4p + j])`` for the rows r
  of one vector, u8 weights + 1 ``D`` (0..2, planes p) and int8 activations ``X`` (4 per plane: one
  dword, broadcast). AVX-512: one ``vpdpbusd`` per plane; AVX2: one ``vpmaddubsw`` per plane, the
  planes added in int16 (at most 4 · 2 · 2 · 127, no saturation), then one ``vpmaddwd`` by 1.

Importing the module registers them (``TensorIntrin.register``), which ``tensorize`` in a schedule
and the replay of a tuned trace (its ``Tensorize`` instructions name them) both need.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from tvm_schedules.layout import LANES_PER_CODE

VECTOR_LANES = {"avx512": 16, "avx2": 8}
"""int32 lanes of one vector register: the output rows of one dot."""
LOOKUP_LANES = {"avx512": 64, "avx2": 32}
"""Code bytes one decode intrinsic decodes (into every plane)."""
TABLE_FORMATS = ("sherry", "tl2")
"""The formats of 5-bit codes, which decode through a constant table (i2s shifts and masks)."""


def decode_name(fmt: str, isa: str) -> str:
    return f"sherry_decode_{fmt}_{isa}"


def dot_name(isa: str, planes: int) -> str:
    return f"sherry_dot{planes}_{isa}"


def lane_values(fmt: str) -> np.ndarray:
    """[32, L]: weight + 1 (0..2) at each lane of every 5-bit code (sherry, tl2): the decode table."""
    from sherry_export.formats import SHERRY_DECODE, TL2_DECODE

    return (SHERRY_DECODE if fmt == "sherry" else TL2_DECODE).astype(np.int64) + 1


def lane_value(fmt: str, p: tirx.PrimExpr, code: tirx.PrimExpr) -> tirx.PrimExpr:
    """Weight + 1 at lane ``p`` of the 5-bit code ``code`` (taken mod 32), as u8, in element-wise TensorIR:
    shifts of two 32-bit constants per lane (bit c of ``lo`` / ``hi``: bit 0 / 1 of code c's value). ``code``
    is a u8 (a code byte)."""
    values = lane_values(fmt)
    c = tirx.Cast("uint64", tirx.floormod(code, tirx.const(32, "uint8")))
    one = tirx.const(1, "uint64")
    expr = None
    for lane in reversed(range(values.shape[1])):
        lo = sum((int(values[k, lane]) & 1) << k for k in range(32))
        hi = sum((int(values[k, lane]) >> 1 & 1) << k for k in range(32))
        value = ((tirx.const(lo, "uint64") >> c) & one) | (((tirx.const(hi, "uint64") >> c) & one) << one)
        expr = value if expr is None else tirx.Select(p == lane, value, expr)
    return tirx.Cast("uint8", expr)


def _bcast_u8(value: int, lanes: int) -> tirx.PrimExpr:
    return tirx.Broadcast(tirx.const(value, "uint8"), lanes)


def _const_u8(values: list[int], lanes: int) -> tirx.PrimExpr:
    """A constant u8 vector (values 0..3) written as shifts of a ramp, which LLVM folds to a constant."""
    lo = sum((v & 1) << i for i, v in enumerate(values))
    hi = sum((v >> 1 & 1) << i for i, v in enumerate(values))

    def b(v: int) -> tirx.PrimExpr:
        return tirx.Broadcast(tirx.const(v, "uint64"), lanes)

    r = tirx.Ramp(tirx.const(0, "uint64"), tirx.const(1, "uint64"), lanes) & b(63)
    return (((b(lo) >> r) & b(1)) | (((b(hi) >> r) & b(1)) << b(1))).astype(f"uint8x{lanes}")


def _select(p: tirx.PrimExpr, vectors: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    """vectors[p] for the (unrolled) lane p."""
    expr = vectors[-1]
    for lane in reversed(range(len(vectors) - 1)):
        expr = tirx.Select(p == lane, vectors[lane], expr)
    return expr


def _decode(fmt: str, isa: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    lanes, planes = LOOKUP_LANES[isa], LANES_PER_CODE[fmt]
    u8 = f"uint8x{lanes}"
    table = lane_values(fmt)
    if isa == "avx512":
        perm = [_const_u8([int(table[c % 32, p]) for c in range(64)], 64) for p in range(planes)]
    else:  # each half of the table in both 128-bit lanes: vpshufb looks up within a lane
        pos = [_const_u8([int(table[c % 16, p]) for c in range(32)], 32) for p in range(planes)]
        neg = [_const_u8([int(table[16 + c % 16, p]) for c in range(32)], 32) for p in range(planes)]

    def decode(codes: tirx.Buffer, p: tirx.PrimExpr) -> tirx.PrimExpr:
        c = codes.vload([0], u8)
        if isa == "avx512":
            return tirx.call_llvm_pure_intrin(u8, "llvm.x86.avx512.permvar.qi.512", _select(p, perm), c)
        lo = tirx.call_llvm_pure_intrin(u8, "llvm.x86.avx2.pshuf.b", _select(p, pos), c)
        hi = tirx.call_llvm_pure_intrin(u8, "llvm.x86.avx2.pshuf.b", _select(p, neg), c)
        return tirx.Select((c & _bcast_u8(16, lanes)) != _bcast_u8(0, lanes), hi, lo)

    @T.prim_func(s_tir=True)
    def desc(
        C: T.Buffer((lanes,), "uint8", offset_factor=1), Out: T.Buffer((planes, lanes), "uint8", offset_factor=1)
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes])
            T.writes(Out[0:planes, 0:lanes])
            for p, i in T.grid(planes, lanes):
                with T.sblock("decode"):
                    vp, vi = T.axis.remap("SS", [p, i])
                    Out[vp, vi] = lane_value(fmt, vp, C[vi])

    @T.prim_func(s_tir=True)
    def impl(
        C: T.Buffer((lanes,), "uint8", offset_factor=1), Out: T.Buffer((planes, lanes), "uint8", offset_factor=1)
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes])
            T.writes(Out[0:planes, 0:lanes])
            for p in T.unroll(planes):
                Out[p, 0:lanes] = decode(C, p)

    return desc, impl


def dot_value(isa: str, planes: int, acc: tirx.PrimExpr, weights: tirx.Buffer, x: tirx.Buffer) -> tirx.PrimExpr:
    """``acc`` (int32 x lanes) plus the dots of the u8 weight planes ``weights [planes, 4·lanes]`` with the
    activation dwords ``x [4·planes]``."""
    vw = VECTOR_LANES[isa]

    def dword(p: int, lanes: int, dtype: str) -> tirx.PrimExpr:
        word = tirx.reinterpret("int32", x.vload([4 * p], "int8x4"))
        return tirx.reinterpret(dtype, tirx.Broadcast(word, lanes))

    if isa == "avx512":
        for p in range(planes):
            w = weights.vload([p, 0], "uint8x64")
            # LLVM 22's signature: (<16 x i32>, <64 x i8> unsigned, <64 x i8> signed)
            x8 = dword(p, 16, "int8x64")
            acc = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, w, x8)
        return acc
    total = None
    for p in range(planes):
        w = weights.vload([p, 0], "uint8x32")
        prod = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", w, dword(p, 8, "int8x32"))
        total = prod if total is None else total + prod
    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    return acc + tirx.call_llvm_pure_intrin(f"int32x{vw}", "llvm.x86.avx2.pmadd.wd", total, ones)


def _dot(isa: str, planes: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    vw = VECTOR_LANES[isa]
    cb, xb = 4 * vw, 4 * planes

    @T.prim_func(s_tir=True)
    def desc(
        D: T.Buffer((planes, cb), "uint8", offset_factor=1),
        X: T.Buffer((xb,), "int8", offset_factor=1),
        C: T.Buffer((vw,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:vw], D[0:planes, 0:cb], X[0:xb])
            T.writes(C[0:vw])
            for p, r, j in T.grid(planes, vw, 4):
                with T.sblock("dot"):
                    vp, vr, vj = T.axis.remap("RSR", [p, r, j])
                    C[vr] = C[vr] + T.Cast("int32", D[vp, vr * 4 + vj]) * T.Cast("int32", X[vp * 4 + vj])

    @T.prim_func(s_tir=True)
    def impl(
        D: T.Buffer((planes, cb), "uint8", offset_factor=1),
        X: T.Buffer((xb,), "int8", offset_factor=1),
        C: T.Buffer((vw,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:vw], D[0:planes, 0:cb], X[0:xb])
            T.writes(C[0:vw])
            C[0:vw] = dot_value(isa, planes, C.vload([0], f"int32x{vw}"), D, X)

    return desc, impl


def register() -> None:
    """Register every intrinsic once per process (a second import finds them registered)."""
    for isa in VECTOR_LANES:
        for fmt in TABLE_FORMATS:
            if TensorIntrin.get(decode_name(fmt, isa), allow_missing=True) is None:
                TensorIntrin.register(decode_name(fmt, isa), *_decode(fmt, isa))
        for planes in sorted(set(LANES_PER_CODE.values())):
            if TensorIntrin.get(dot_name(isa, planes), allow_missing=True) is None:
                TensorIntrin.register(dot_name(isa, planes), *_dot(isa, planes))


register()
