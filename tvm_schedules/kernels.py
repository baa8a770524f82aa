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

The kernel is written directly in TensorIR (TVMScript with LLVM intrinsics) per (shape, ISA, knobs):
LLVM does not find table lookups or dot-product instructions in the arithmetic form. Knobs
(:class:`Knobs`): ``tiles`` (tiles processed together, sharing the activation loads: the rows per
step are 16·tiles, which is also the op's work item), ``unroll`` (of the quad loop within a group).
The outer loop over steps is ``parallel``; the op runs its tasks on onnxruntime's threads
(kernel_tvm.cc).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from tvm_schedules.layout import TILE, Shape

TILE_CHOICES = (1, 2, 4, 8)
UNROLL_CHOICES = (1, 2, 4)
ISAS = ("avx512", "avx2")


@dataclass(frozen=True)
class Knobs:
    tiles: int = 2
    unroll: int = 2

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tile_choices(shape: Shape) -> list[int]:
    return [t for t in TILE_CHOICES if shape.tiles % t == 0]


def unroll_choices(shape: Shape) -> list[int]:
    return [u for u in UNROLL_CHOICES if shape.quads_per_group % u == 0]


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


def prim_func(shape: Shape, m: int | None, knobs: Knobs, isa: str = "avx512", name: str = "main") -> tirx.PrimFunc:
    """The kernel for M = ``m`` rows of A (None: any M) with these knobs, for ``isa`` (avx512 or avx2)."""
    if problem := shape.supported():
        raise ValueError(problem)
    if shape.tiles % knobs.tiles or shape.quads_per_group % knobs.unroll:
        raise ValueError(f"knobs {knobs} do not divide {shape.key}")
    if isa not in ISAS:
        raise ValueError(f"unknown isa {isa!r}")
    L, Q, G = shape.lanes_per_code, shape.quads_per_group, shape.groups
    TS, U = knobs.tiles, knobs.unroll
    steps, RB, N, QB = shape.tiles // TS, shape.row_bytes, shape.n, 4 * L
    plane_bytes = shape.quads
    decode = _decoder(shape, isa)
    # vector width in int32 lanes, halves per tile
    VW = 16 if isa == "avx512" else 8
    H = TILE // VW
    CB = 4 * VW  # code bytes per vector

    def dot(acc: tirx.PrimExpr, codes: tirx.PrimExpr, xw: tirx.PrimExpr) -> tirx.PrimExpr:
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

    @T.prim_func
    def kernel(
        X: T.Buffer((M, RB), "int8"),
        S: T.Buffer((M, RB // 4), "float32"),
        W: T.Buffer((shape.tiles, plane_bytes, 64), "uint8"),
        A: T.Buffer((shape.tiles, G, TILE), "float32"),
        Y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"global_symbol": name, "tirx.noalias": True})
        for step in T.parallel(steps):
            for mi in range(M):
                yacc = T.decl_buffer((TS * TILE,), "float32", scope="global")
                acc = T.decl_buffer((TS * TILE,), "int32", scope="global")
                for v in T.unroll(TS * H):
                    yacc[v * VW : v * VW + VW] = T.Broadcast(T.float32(0), VW)
                for g in range(G):
                    for v in T.unroll(TS * H):
                        acc[v * VW : v * VW + VW] = T.Broadcast(T.int32(0), VW)
                    for qo in range(Q // U):
                        for qi in T.unroll(U):
                            for v in T.unroll(TS * H):
                                acc[v * VW : v * VW + VW] = dot(
                                    acc.vload([v * VW], i32v),
                                    W.vload([step * TS + v // H, g * Q + qo * U + qi, (v % H) * CB], u8v),
                                    xword(X, mi, g * Q + qo * U + qi),
                                )
                    for v in T.unroll(TS * H):
                        yacc[v * VW : v * VW + VW] = yacc.vload([v * VW], f32v) + (
                            A.vload([step * TS + v // H, g, (v % H) * VW], f32v) * T.Broadcast(S[mi, g], VW)
                        ) * T.Cast(
                            f32v, acc.vload([v * VW], i32v) - T.Broadcast(T.reinterpret("int32", S[mi, G + g]), VW)
                        )
                for v in T.unroll(TS * H):
                    Y[mi, step * TS * TILE + v * VW : step * TS * TILE + v * VW + VW] = yacc.vload([v * VW], f32v)

    return kernel


def scheduled_module(
    shape: Shape, m: int | None, knobs: Knobs, name: str = "main", isa: str = "avx512"
) -> tvm.IRModule:
    return tvm.IRModule({name: prim_func(shape, m, knobs, isa, name)})
