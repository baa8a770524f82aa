"""TensorIR kernels for the sherry, tl2 and i2s formats, and their schedule with a few knobs.

One PrimFunc computes ``Y[m, n] = Σ_g (α[n, g] · s[m, g]) · dot[m, n, g]`` from workspace rows that
hold the already quantized int8 activations and their float32 group scales (layout.py) and the
interleaved packed weights, exactly as docs/formats.md ("Activations") says: the dots are exact
(int16 when a group cannot overflow it, else int32), the float sum runs over the groups in order.

The schedule vectorizes across output rows: a vector holds ``lanes`` neighbouring rows of one
weight block, so every lane decodes the same bit position of its own row and multiplies it by the
same (broadcast) activation. Knobs (:class:`Knobs`): ``lanes`` (the vector, a divisor of the lane
block), ``unroll`` (of the code loop within a group). The outer loop over row blocks is ``parallel``;
the op runs its tasks on onnxruntime's threads (kernel_tvm.cc).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import tvm
from tvm import te, tirx

from tvm_schedules.layout import Shape

Expr = Any
"""A TIR expression or a schedule's sampled random variable."""
LANE_CHOICES = (16, 32, 64, 128)
UNROLL_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Knobs:
    lanes: int = 32
    unroll: int = 4

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def lane_choices(shape: Shape) -> list[int]:
    return [v for v in LANE_CHOICES if shape.lane_block % v == 0]


def unroll_choices(shape: Shape) -> list[int]:
    return [u for u in UNROLL_CHOICES if shape.codes_per_group % u == 0]


def function_name(shape: Shape, target_name: str, bucket: str) -> str:
    """The C symbol stem (the object exports ``__tvm_ffi_<name>``)."""
    return f"sherry_tvm_{target_name}_{shape.key}_{bucket}"


def _decode_term(
    shape: Shape, planes: list[te.Tensor], X: te.Tensor, m: Expr, nb: Expr, lane: Expr, g: Expr, j: Expr, acc: str
) -> tirx.PrimExpr:
    """The int dot contribution of code j of group g of row (nb, lane) with activation row m."""
    c = g * shape.codes_per_group + j  # code index within the row
    base = g * shape.padded_group + j * shape.lanes_per_code  # first activation of the code

    def x(p: int) -> tirx.PrimExpr:
        return X[m, base + p].astype(acc)

    if shape.format == "i2s":
        byte = planes[0][nb, c, lane].astype(acc)
        terms = [((byte >> (2 * p)) & 3) * x(p) for p in range(4)]
        return (terms[0] + terms[1]) + (terms[2] + terms[3]) - ((x(0) + x(1)) + (x(2) + x(3)))
    index = ((planes[0][nb, c // 2, lane] >> ((c % 2) * 4).astype("uint8")) & 15).astype(acc)
    negative = ((planes[1][nb, c // 8, lane] >> (c % 8).astype("uint8")) & 1) != 0
    zero = tirx.const(0, acc)
    if shape.format == "sherry":
        # nonzero lanes in column order skip the zero's position z; n1 = +1, n2/n3 flip per bits 1/0
        z = index >> 2
        first = tirx.Select(z == 0, x(1), x(0))
        second = tirx.Select(z <= 1, x(2), x(1))
        third = tirx.Select(z == 3, x(2), x(3))
        total = first + tirx.Select((index & 2) != 0, -second, second) + tirx.Select((index & 1) != 0, -third, third)
    else:
        # tl2: index = 9·w0 + 3·w1 + w2 (w0 ∈ {0, 1}); with r = index - 9·w0 = 3·w1 + w2 ∈ [-4, 4]:
        # w0·x0 + w1·x1 + w2·x2 = w0·x0 + r·x2 + w1·(x1 - 3·x2)
        high = index >= 5
        r = index - tirx.Select(high, tirx.const(9, acc), zero)
        d = x(1) - x(2) * tirx.const(3, acc)
        total = (tirx.Select(high, x(0), zero) + r * x(2)) + tirx.Select(r >= 2, d, tirx.Select(r <= -2, -d, zero))
    return tirx.Select(negative, -total, total)


def compute(shape: Shape, m: int | None) -> tuple[list[te.Tensor], te.Tensor]:
    """Placeholders (X, S, planes…, alpha) and the output Y for M = ``m`` rows (None: dynamic)."""
    if problem := shape.supported():
        raise ValueError(problem)
    rows = te.var("M", "int64") if m is None else m
    lb = shape.lane_block
    nblocks = shape.n // lb
    acc = shape.acc_dtype
    X = te.placeholder((rows, shape.row_bytes), "int8", name="X")
    S = te.placeholder((rows, shape.row_bytes // 4), "float32", name="S")
    planes = [
        te.placeholder((nblocks, nbytes, lb), "uint8", name=f"W{i}") for i, nbytes in enumerate(shape.plane_bytes)
    ]
    alpha = te.placeholder((nblocks, shape.groups, lb), "float32", name="alpha")
    j = te.reduce_axis((0, shape.codes_per_group), name="j")
    dot = te.compute(
        (rows, nblocks, shape.groups, lb),
        lambda mi, nb, g, lane: te.sum(_decode_term(shape, planes, X, mi, nb, lane, g, j, acc), axis=j),
        name="dot",
    )
    gi = te.reduce_axis((0, shape.groups), name="gi")
    Y = te.compute(
        (rows, shape.n),
        lambda mi, n: te.sum(
            (alpha[n // lb, gi, n % lb] * S[mi, gi]) * dot[mi, n // lb, gi, n % lb].astype("float32"), axis=gi
        ),
        name="Y",
    )
    return [X, S, *planes, alpha], Y


def prim_func(shape: Shape, m: int | None, name: str = "main") -> tirx.PrimFunc:
    args, Y = compute(shape, m)
    return te.create_prim_func([*args, Y]).with_attr("global_symbol", name)


def schedule(sch: tvm.s_tir.Schedule, shape: Shape, lanes: int | Expr, unroll: int | Expr) -> None:
    """Apply the schedule to a module made by :func:`prim_func`; lanes/unroll may be ints or sampled RVs."""
    lb = shape.lane_block
    y = sch.get_sblock("Y")
    dot = sch.get_sblock("dot")
    m, n, g = sch.get_loops(y)
    nb, lane = sch.split(n, factors=[None, lb])
    lane_o, lane_i = sch.split(lane, factors=[None, lanes])
    sch.reorder(nb, lane_o, m, g, lane_i)
    sch.parallel(nb)
    sch.compute_at(dot, g)
    dl = sch.get_loops(dot)[-2:]  # the lane loop and the code loop j under g
    d_lane, d_j = dl
    sch.reorder(d_j, d_lane)
    j_o, j_i = sch.split(d_j, factors=[None, unroll])
    sch.vectorize(d_lane)
    sch.vectorize(sch.get_loops(y)[-1])
    sch.unroll(j_i)
    sch.decompose_reduction(dot, j_o)
    sch.decompose_reduction(y, g)
    sch.vectorize(sch.get_loops(sch.get_sblock("Y_init"))[-1])
    sch.vectorize(sch.get_loops(sch.get_sblock("dot_init"))[-1])


def scheduled_module(shape: Shape, m: int | None, knobs: Knobs, name: str = "main") -> tvm.IRModule:
    sch = tvm.s_tir.Schedule(tvm.IRModule({name: prim_func(shape, m, name)}))
    sch.work_on(name)
    schedule(sch, shape, knobs.lanes, knobs.unroll)
    return sch.mod
