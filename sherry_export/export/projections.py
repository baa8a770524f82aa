"""How a linear layer becomes ONNX nodes in each export format.

Ternary formats (``sherry``, ``tl2``, ``i2s``) become one ``ai.sherry`` op on the packed weight.
``nbits2`` / ``nbits4`` carry the *same* ternary values and scales in onnxruntime's own
``MatMulNBits`` (q = t + 2^(bits-1), the op's default zero point, one block per scale group), so
they are the strongest like-for-like baseline on the same runtime. ``fp32`` keeps the float weight
in a plain ``MatMul``. ``MatMulNBits`` also quantizes float weights, for the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sherry_export.export.graph import FLOAT, MS_DOMAIN, GraphBuilder
from sherry_export.formats import (
    EXPORT_FORMATS,
    FORMATS,
    FP32,
    NBITS_FORMATS,
    SCALE_DTYPE,
    PackedWeight,
    get_format,
    pack,
)
from sherry_export.onnx_ops import SHERRY_DOMAIN, matmul_attributes, matmul_initializers
from sherry_export.ternary import Ternary

NBITS_ACCURACY_LEVEL = 4
"""MatMulNBits accuracy_level 4 (int8 activations per block) is its fastest CPU path."""


@dataclass(frozen=True)
class Projection:
    """One linear layer's weight, as the exporter sees it: float, or ternary with its group size."""

    weight: np.ndarray | None = None
    """float32 ``[N, K]`` for the fp32 format."""
    ternary: Ternary | None = None
    group_size: int | None = None
    bias: np.ndarray | None = None


def pack_nbits(q: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes ``q [N, K]`` to MatMulNBits' B ``[N, ceil(K/block), block*bits/8]`` (low bits first)."""
    n, k = q.shape
    blocks = -(-k // block_size)
    zero_point = 1 << (bits - 1)
    padded = np.full((n, blocks * block_size), zero_point, np.uint8)
    padded[:, :k] = q
    per_byte = 8 // bits
    lanes = padded.reshape(n, -1, per_byte)
    packed = np.zeros(lanes.shape[:-1], np.uint8)
    for j in range(per_byte):
        packed |= lanes[..., j] << (bits * j)
    return packed.reshape(n, blocks, block_size * bits // 8)


def check_nbits_block(block_size: int, k: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"MatMulNBits needs a power-of-two block size >= 16, got group_size {block_size} (K={k}); "
            "re-export with --group-size 128 or use a sherry/tl2/i2s format"
        )


@dataclass(frozen=True)
class NBitsWeight:
    """A weight stored as MatMulNBits reads it: the initializers of its packed codes
    ``B [N, blocks, block*bits/8]`` and float32 ``scales [N, blocks]``, with its geometry."""

    b: ir.Value
    scales: ir.Value
    n: int
    k: int
    bits: int
    block_size: int
    gather_only: bool = False
    """Scales stored as ``[N, blocks, 1]``, the shape GatherBlockQuantized reads, for a table no matmul uses."""

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)


def nbits_weight(
    builder: GraphBuilder,
    name: str,
    q: np.ndarray,
    scales: np.ndarray,
    bits: int,
    block_size: int,
    gather_only: bool = False,
) -> NBitsWeight:
    """Store unsigned codes ``q [N, K]`` (default zero point) and their scales ``[N, blocks]`` as ``{name}.B``
    and ``{name}.scales``."""
    n, k = q.shape
    scales = scales.astype(np.float32).reshape(n, -1, 1) if gather_only else scales.astype(np.float32).reshape(n, -1)
    return NBitsWeight(
        b=builder.initializer(f"{name}.B", pack_nbits(q, bits, block_size)),
        scales=builder.initializer(f"{name}.scales", scales),
        n=n,
        k=k,
        bits=bits,
        block_size=block_size,
        gather_only=gather_only,
    )


def nbits_matmul(
    builder: GraphBuilder,
    x: ir.Value,
    name: str,
    weight: NBitsWeight,
    bias: np.ndarray | None = None,
) -> ir.Value:
    """A MatMulNBits node computing ``x @ W.T (+ bias)`` on a stored weight."""
    if weight.gather_only:
        raise ValueError(
            f"{name}: {weight.b.name} is stored for GatherBlockQuantized only; MatMulNBits needs 2-D scales"
        )
    inputs = [x, weight.b, weight.scales]
    if bias is not None:
        inputs += [None, None, builder.initializer(f"{name}.bias", bias.astype(np.float32))]  # no zero_points, g_idx
    return builder.op(
        "MatMulNBits",
        *inputs,
        domain=MS_DOMAIN,
        name=name,
        K=weight.k,
        N=weight.n,
        bits=weight.bits,
        block_size=weight.block_size,
        accuracy_level=NBITS_ACCURACY_LEVEL,
    )


def nbits_node(
    builder: GraphBuilder,
    x: ir.Value,
    name: str,
    q: np.ndarray,
    scales: np.ndarray,
    bits: int,
    block_size: int,
    bias: np.ndarray | None,
) -> ir.Value:
    """A MatMulNBits node for unsigned codes ``q`` with the default zero point and float32 scales ``[N, G]``."""
    return nbits_matmul(builder, x, name, nbits_weight(builder, name, q, scales, bits, block_size), bias)


def gather_nbits(builder: GraphBuilder, ids: ir.Value, name: str, weight: NBitsWeight) -> ir.Value:
    """Rows ``ids [batch, sequence]`` of a MatMulNBits weight, dequantized: ``[batch, sequence, K]`` float32.

    onnxruntime's ``GatherBlockQuantized`` reads MatMulNBits' bytes as they are: uint8 data with the
    quantized axis last, ``bits`` codes per byte low bits first, the default zero point 2^(bits-1).
    Seen as ``[N, blocks, block*bits/8]`` (B's own shape, quantize_axis 2), each block is one scale
    group, so the scales only need the shape ``[N, blocks, 1]``: stored so for a table only gathered,
    a Reshape of MatMulNBits' ``[N, blocks]`` scales (folded once at load) for a table both read. The
    result comes out as ``[batch, sequence, blocks, block]`` and is flattened, and cut to K when the last
    block is padded.
    """
    scales = weight.scales
    if not weight.gather_only:
        scales = builder.op(
            "Reshape",
            scales,
            builder.constant(f"{name}.scales_shape", [weight.n, weight.blocks, 1]),
            name=f"{name}.scales",
        )
    blocks = builder.op(
        "GatherBlockQuantized",
        weight.b,
        ids,
        scales,
        domain=MS_DOMAIN,
        name=name,
        gather_axis=0,
        quantize_axis=2,
        block_size=weight.block_size,
        bits=weight.bits,
    )
    rows = builder.op("Reshape", blocks, builder.constant(f"{name}.rows_shape", [0, 0, -1]), name=f"{name}.rows")
    if weight.blocks * weight.block_size == weight.k:
        return rows
    return builder.op(
        "Slice",
        rows,
        builder.constant(f"{name}.start", [0]),
        builder.constant(f"{name}.end", [weight.k]),
        builder.constant(f"{name}.axis", [-1]),
        name=f"{name}.unpad",
    )


def unpack_nbits(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' B ``[N, blocks, block*bits/8]`` back to the unsigned codes ``[N, K]`` (inverse of pack_nbits)."""
    per_byte = 8 // bits
    flat = packed.reshape(len(packed), -1)
    lanes = np.stack([(flat >> (bits * j)) & ((1 << bits) - 1) for j in range(per_byte)], axis=-1)
    return lanes.reshape(len(packed), -1)[:, :k].astype(np.uint8)


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """The float32 ``[N, K]`` weight a MatMulNBits B and its scales (default zero point) stand for."""
    q = unpack_nbits(packed, bits, k).astype(np.float32) - (1 << (bits - 1))
    n = len(q)
    padded = np.zeros((n, scales.size // n * block_size), np.float32)
    padded[:, :k] = q
    grouped = padded.reshape(n, -1, block_size) * scales.reshape(n, -1, 1).astype(np.float32)
    return grouped.reshape(n, -1)[:, :k]


def quantize_float_nbits(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of a float weight to ``bits`` per block (absmax scale), for the LM head."""
    n, k = weight.shape
    check_nbits_block(block_size, k)
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = weight
    grouped = padded.reshape(n, blocks, block_size)
    qmax = (1 << (bits - 1)) - 1
    scales = np.abs(grouped).max(-1) / qmax
    safe = np.where(scales > 0, scales, 1)
    q = np.clip(np.rint(grouped / safe[..., None]), -qmax - 1, qmax).astype(np.int16) + (1 << (bits - 1))
    return q.reshape(n, -1)[:, :k].astype(np.uint8), scales.astype(np.float32)


def transposed(weight: np.ndarray) -> ir.LazyTensor:
    """``weight.T`` in float32, made only when the model is written: the exporter holds the ``[N, K]`` weight
    (for an unfused projection, the torch model's own memory) and never a second, transposed copy of every one."""
    n, k = weight.shape
    return ir.LazyTensor(
        lambda: ir.tensor(np.ascontiguousarray(weight.T, np.float32)), dtype=FLOAT, shape=ir.Shape([k, n])
    )


def packed_matmul(
    builder: GraphBuilder, x: ir.Value, name: str, packed: PackedWeight, bias: np.ndarray | None = None
) -> ir.Value:
    """The ``ai.sherry`` node computing ``x @ W.T (+ bias)`` on a packed weight, with its initializers."""
    inputs = [builder.initializer(f"{name}.{role}", a) for role, a in matmul_initializers(packed, bias).items()]
    op_type = get_format(packed.format).op_type
    return builder.op(op_type, x, *inputs, domain=SHERRY_DOMAIN, name=name, **matmul_attributes(packed))


def emit_projection(builder: GraphBuilder, x: ir.Value, name: str, proj: Projection, fmt: str) -> ir.Value:
    """Add the nodes computing ``x @ W.T (+ bias)`` in ``fmt``; returns the output."""
    if fmt == FP32:
        if proj.weight is None:
            raise ValueError(f"{name}: the fp32 format needs the float weight")
        y = builder.op("MatMul", x, builder.initializer(f"{name}.weight_t", transposed(proj.weight)), name=name)
        if proj.bias is not None:
            y = builder.op("Add", y, builder.initializer(f"{name}.bias", proj.bias.astype(np.float32)))
        return y
    if proj.ternary is None or proj.group_size is None:
        raise ValueError(f"{name}: format {fmt} needs ternary weights")
    if fmt in NBITS_FORMATS:
        values, scales = (np.asarray(a) for a in proj.ternary)
        check_nbits_block(proj.group_size, values.shape[1])
        bits = NBITS_FORMATS[fmt]
        stored = scales.astype(SCALE_DTYPE).astype(np.float32)  # the same rounded α as the ternary formats
        q = (values.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
        return nbits_node(builder, x, name, q, stored, bits, proj.group_size, proj.bias)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    return packed_matmul(builder, x, name, pack(fmt, proj.ternary, proj.group_size), proj.bias)
