"""The weight formats: one registry that the packer, the kernels, the exporter and the harness read.

Every ternary format (:data:`FORMATS`: the projections) takes the same input, ternary values ``t``
(int8 ``[N, K]``) and per-group scales ``[N, G]`` from :mod:`sherry_export.quant`, so one model packs
into each format and compares like for like. :data:`HEAD_FORMATS` holds the formats of wider weights
that the same ops and numerics serve, for the LM head: ``int8`` (values in [-127, 127]).
``docs/formats.md`` is the bit-by-bit specification; ``custom_ops/src/formats.h`` mirrors it in C++,
in one traits table (``kFormats``) that ``tests/test_format_table.py`` checks against
:data:`ALL_FORMATS`. Each format is a :class:`WeightFormat`: a row layout plus the trio of reference
functions (encode, decode, and the matmul in :func:`reference_matmul`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np

from sherry_export.errors import check_group_size, num_groups
from sherry_export.ternary import SHERRY_BLOCK, Ternary

if TYPE_CHECKING:  # torch loads where tensors are made: the registry itself needs only numpy
    import torch

SCALE_DTYPE = np.float16
"""Stored scale type: one IEEE half per (row, group)."""
SCALE_BITS = 16

ACTIVATION_QMAX = 127
"""Activations are quantized to int8 in [-127, 127] per row and scale group."""
INT32_MAX = 2**31 - 1
MAX_GROUP_SIZE = INT32_MAX // ACTIVATION_QMAX
"""The longest scale group of ternary weights (16,909,320 columns): its exact dot product Σ t·xq reaches
127 x its length and must fit the int32 every kernel accumulates it in (docs/formats.md, "Scale groups").
A format of wider weights has a shorter bound (:meth:`WeightFormat.max_group_size`)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- 5-bit codes stored as a nibble plane followed by a sign plane (Sherry and TL2) ------------


def code5_row_bytes(codes_per_row: int) -> int:
    """Bytes a row of 5-bit codes takes: ceil(C/2) index nibbles, then ceil(C/8) sign bytes."""
    return _ceil_div(codes_per_row, 2) + _ceil_div(codes_per_row, 8)


def pack_code5(codes: np.ndarray) -> np.ndarray:
    """Pack 5-bit codes ``[N, C]`` (bit 4 = sign, bits 0-3 = index) into ``[N, code5_row_bytes(C)]``."""
    n, c = codes.shape
    index = codes & 0x0F
    if c % 2:
        index = np.concatenate([index, np.zeros((n, 1), np.uint8)], axis=1)
    nibbles = index[:, 0::2] | (index[:, 1::2] << 4)
    signs = np.packbits(codes >> 4, axis=1, bitorder="little")
    return np.concatenate([nibbles, signs], axis=1)


def unpack_code5(data: np.ndarray, codes_per_row: int) -> np.ndarray:
    """Inverse of :func:`pack_code5`: ``[N, row_bytes]`` to 5-bit codes ``[N, C]``."""
    half = _ceil_div(codes_per_row, 2)
    nibbles = data[:, :half]
    index = np.empty((data.shape[0], 2 * half), np.uint8)
    index[:, 0::2] = nibbles & 0x0F
    index[:, 1::2] = nibbles >> 4
    signs = np.unpackbits(data[:, half:], axis=1, count=codes_per_row, bitorder="little")
    return index[:, :codes_per_row] | (signs << 4)


def _base3_key(lanes: np.ndarray) -> np.ndarray:
    """Map ternary lanes ``[..., L]`` (int8) to their base-3 key Σ (t_p + 1)·3^p as uint8."""
    key = np.zeros(lanes.shape[:-1], np.uint8)
    for p in range(lanes.shape[-1] - 1, -1, -1):
        key = key * np.uint8(3) + (lanes[..., p] + 1).astype(np.uint8)
    return key


# --- sherry: 1.25 bits ----------------------------------------------------------------------


def _sherry_tables() -> tuple[np.ndarray, np.ndarray]:
    """DECODE[code] = the 4 lanes of 5-bit code; ENCODE[base-3 key] = code, or 255 if not 3:4."""
    decode = np.zeros((32, SHERRY_BLOCK), np.int8)
    encode = np.full(3**SHERRY_BLOCK, 255, np.uint8)
    for code in range(32):
        zero, r2, r3, sign = code >> 2 & 3, code >> 1 & 1, code & 1, code >> 4
        first = -1 if sign else 1
        nonzero = [first, -first if r2 else first, -first if r3 else first]
        lanes = [*nonzero[:zero], 0, *nonzero[zero:]]
        decode[code] = lanes
        encode[_base3_key(np.array(lanes, np.int8))] = code
    return decode, encode


SHERRY_DECODE, SHERRY_ENCODE = _sherry_tables()


def _sherry_row_bytes(k: int, group_size: int) -> int:
    return code5_row_bytes(k // SHERRY_BLOCK)


def _sherry_encode(values: np.ndarray, group_size: int) -> np.ndarray:
    n, k = values.shape
    codes = SHERRY_ENCODE[_base3_key(values.reshape(n, k // SHERRY_BLOCK, SHERRY_BLOCK))]
    bad = np.argwhere(codes == 255)
    if bad.size:
        row, block = (int(i) for i in bad[0])
        lanes = values[row, block * 4 : block * 4 + 4].tolist()
        raise ValueError(
            f"{len(bad)} block(s) are not 3:4 sparse ternary, first at row {row}, columns "
            f"{block * 4}-{block * 4 + 3}: {lanes}; Sherry needs exactly one zero in every block of 4 "
            "(project the weights with sherry_ternarize, or pack dense ternary as i2s/tl2)"
        )
    return pack_code5(codes)


def _sherry_decode(data: np.ndarray, k: int, group_size: int) -> np.ndarray:
    codes = unpack_code5(data, k // SHERRY_BLOCK)
    return SHERRY_DECODE[codes].reshape(data.shape[0], k)


# --- i2s: 2 bits ------------------------------------------------------------------------------

I2S_ZERO_CODE = 1
"""i2s stores t + 1; padding lanes past K hold this code (weight 0)."""


def _i2s_row_bytes(k: int, group_size: int) -> int:
    return _ceil_div(k, 4)


def _i2s_encode(values: np.ndarray, group_size: int) -> np.ndarray:
    n, k = values.shape
    codes = np.full((n, 4 * _ceil_div(k, 4)), I2S_ZERO_CODE, np.uint8)
    codes[:, :k] = (values + 1).astype(np.uint8)
    return codes[:, 0::4] | codes[:, 1::4] << 2 | codes[:, 2::4] << 4 | codes[:, 3::4] << 6


def _i2s_decode(data: np.ndarray, k: int, group_size: int) -> np.ndarray:
    codes = np.stack([data >> s & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(data.shape[0], -1)[:, :k]
    if (codes == 3).any():
        raise ValueError("corrupt i2s data: code 3 does not name a ternary value")
    return codes.astype(np.int8) - 1


# --- tl2: 1.67 bits ---------------------------------------------------------------------------


@lru_cache(maxsize=64)
def tl2_columns(k: int, group_size: int) -> np.ndarray:
    """Column of each lane of each TL2 triple of a row (``-1`` marks a padding lane).

    Every scale group is cut into ceil(L/3) triples of consecutive columns; when 3 does not divide
    the group length L, the group's last triple is padded with zero lanes, so no triple straddles
    two scales.
    """
    full, rest = divmod(k, group_size)
    lane = np.arange(3 * _ceil_div(group_size, 3))  # lanes of a whole group, padding included
    whole = np.where(lane < group_size, np.arange(full)[:, None] * group_size + lane, -1).ravel()
    last = np.full(3 * _ceil_div(rest, 3), -1, np.int64)
    last[:rest] = np.arange(full * group_size, k)
    return np.concatenate([whole.astype(np.int64), last])


def tl2_triples(k: int, group_size: int) -> int:
    """TL2 triples in a row: ceil(group_size/3) per whole group plus those of a short last group (O(1) in K)."""
    return (k // group_size) * _ceil_div(group_size, 3) + _ceil_div(k % group_size, 3)


TL2_WEIGHTS = np.array([9, 3, 1], np.int8)
"""A triple (w0, w1, w2) has the value v = 9·w0 + 3·w1 + w2 in [-13, 13]; the code is |v| | (v < 0) << 4."""


def _tl2_decode_table() -> np.ndarray:
    """TL2_DECODE[code] = the 3 lanes of a 5-bit TL2 code (unused codes decode to zeros)."""
    table = np.zeros((32, 3), np.int8)
    for lanes in np.ndindex(3, 3, 3):
        lanes_t = np.array(lanes, np.int8) - 1
        v = int(lanes_t @ TL2_WEIGHTS)
        table[abs(v) | (v < 0) << 4] = lanes_t
    return table


TL2_DECODE = _tl2_decode_table()
TL2_VALID = np.array([(c & 15) <= 13 and c != 16 for c in range(32)])


def _tl2_row_bytes(k: int, group_size: int) -> int:
    return code5_row_bytes(tl2_triples(k, group_size))


def _tl2_encode(values: np.ndarray, group_size: int) -> np.ndarray:
    n, k = values.shape
    columns = tl2_columns(k, group_size)
    lanes = np.where(columns >= 0, values[:, np.maximum(columns, 0)], 0).reshape(n, -1, 3)
    v = lanes.astype(np.int8) @ TL2_WEIGHTS
    codes = np.abs(v).astype(np.uint8) | ((v < 0).astype(np.uint8) << 4)
    return pack_code5(codes)


def _tl2_decode(data: np.ndarray, k: int, group_size: int) -> np.ndarray:
    codes = unpack_code5(data, tl2_triples(k, group_size))
    if not TL2_VALID[codes].all():
        raise ValueError("corrupt tl2 data: a code's index exceeds 13 or is a negative zero")
    lanes = TL2_DECODE[codes].reshape(data.shape[0], -1)
    columns = tl2_columns(k, group_size)
    padding = lanes[:, columns < 0]
    if padding.any():
        row, lane = (int(i) for i in np.argwhere(padding)[0])
        triple = int(np.flatnonzero(columns < 0)[lane]) // 3
        raise ValueError(
            f"corrupt tl2 data: row {row}, triple {triple} has a non-zero padding lane "
            "(the lanes past a scale group's end must decode to 0)"
        )
    return lanes[:, columns >= 0]


# --- int8: 8 bits, for LM heads -----------------------------------------------------------------

INT8_MAX = 127
"""int8 weights lie in [-127, 127]; the code is w + 128, so code 0 (-128) is invalid."""


def _int8_row_bytes(k: int, group_size: int) -> int:
    return k


def _int8_encode(values: np.ndarray, group_size: int) -> np.ndarray:
    return (values.astype(np.int16) + 128).astype(np.uint8)


def _int8_decode(data: np.ndarray, k: int, group_size: int) -> np.ndarray:
    if (data == 0).any():
        row, column = (int(i) for i in np.argwhere(data == 0)[0])
        raise ValueError(f"corrupt int8 data: row {row}, column {column} holds code 0 (-128; int8 weights lie in ±127)")
    return (data.astype(np.int16) - 128).astype(np.int8)


def in_groups(a: np.ndarray, group_size: int) -> np.ndarray:
    """``a [rows, K]`` as float32 ``[rows, groups, group_size]``, the last group padded with zeros."""
    rows, k = a.shape
    groups = num_groups(k, group_size)
    padded = np.zeros((rows, groups * group_size), np.float32)
    padded[:, :k] = a
    return padded.reshape(rows, groups, group_size)  # explicit groups: rows may be 0


def quantize_int8(weight: np.ndarray, group_size: int) -> Ternary:
    """Symmetric round-to-nearest of a float ``weight [N, K]`` to the ``int8`` format: per row and scale group,
    α = max|w| / 127 rounded to float16 (the stored scale), q = clip(rint(w / α), ±127); an all-zero group
    gets α = 0, q = 0. Returns int8 values and float32 scales (exact float16 values) for :func:`pack`."""
    weight = np.asarray(weight, np.float32)
    n, k = weight.shape
    grouped = in_groups(weight, group_size)
    amax = np.abs(grouped).max(axis=-1)
    if amax.max(initial=0.0) / INT8_MAX > np.finfo(SCALE_DTYPE).max:
        raise ValueError(f"a weight of magnitude {amax.max():g} needs a scale past float16's range; rescale the layer")
    alpha = (amax / np.float32(INT8_MAX)).astype(SCALE_DTYPE).astype(np.float32)
    safe = np.where(alpha > 0, alpha, np.float32(1))
    q = np.clip(np.rint(grouped / safe[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return Ternary(q.reshape(n, -1)[:, :k], alpha)


# --- the registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFormat:
    """One packed ternary layout: its geometry and its reference encoder and decoder."""

    name: str
    op_type: str
    """The onnxruntime custom op (domain ``ai.sherry``) that multiplies by this format."""
    summary: str
    nominal_bits: float
    """Code bits per weight for long rows, scales excluded."""
    k_multiple: int
    """K (in_features) must be a multiple of this."""
    group_multiple: int
    """group_size must be a multiple of this."""
    lanes_per_code: int
    """Weights per code of the canonical row: 4 per Sherry block, 3 per TL2 triple, 1 per i2s 2-bit code."""
    projection: str | None
    """The post-training projection (``ternary.PROJECTION_NAMES``) whose values this format holds for any float
    weight: Sherry's 3:4 rule for a format of 3:4 blocks, BitNet's dense absmean rule for one of any ternary;
    ``None`` for a format of wider weights (``HEAD_FORMATS``), which no ternary projection fills."""
    max_weight: int
    """The largest |w| a code stands for: 1 for the ternary formats, 127 for int8."""
    row_bytes: Callable[[int, int], int]
    encode: Callable[[np.ndarray, int], np.ndarray]
    decode: Callable[[np.ndarray, int, int], np.ndarray]

    @property
    def max_group_size(self) -> int:
        """The longest scale group: 127 x max_weight x group_size must fit int32 (``MAX_GROUP_SIZE`` for ternary)."""
        return INT32_MAX // (ACTIVATION_QMAX * self.max_weight)

    def check_geometry(self, k: int, group_size: int | None) -> int:
        """Validate K and group_size for this format; return the resolved group size."""
        if k <= 0 or k % self.k_multiple:
            raise ValueError(f"format {self.name!r} needs K divisible by {self.k_multiple}, got K={k}")
        group_size = check_group_size(group_size, k, multiple_of=self.group_multiple)
        if group_size > self.max_group_size:
            weight = "" if self.max_weight == 1 else f"{self.max_weight} x "
            raise ValueError(
                f"group_size must be at most {self.max_group_size} (127 x {weight}group_size must fit the int32 dot "
                f"product of a scale group), got {group_size}; use smaller scale groups"
            )
        return group_size


FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat(
            "sherry",
            "SherryMatMul",
            "3:4-sparse ternary, 5-bit code per 4 weights",
            1.25,
            SHERRY_BLOCK,
            SHERRY_BLOCK,
            SHERRY_BLOCK,
            "sherry",
            1,
            _sherry_row_bytes,
            _sherry_encode,
            _sherry_decode,
        ),
        WeightFormat(
            "tl2",
            "TL2MatMul",
            "ternary, 5-bit code per 3 weights (bitnet.cpp TL2 style)",
            5 / 3,
            1,
            1,
            3,
            "absmean",
            1,
            _tl2_row_bytes,
            _tl2_encode,
            _tl2_decode,
        ),
        WeightFormat(
            "i2s",
            "I2SMatMul",
            "ternary, 2-bit code per weight (bitnet.cpp I2_S style)",
            2.0,
            1,
            1,
            1,
            "absmean",
            1,
            _i2s_row_bytes,
            _i2s_encode,
            _i2s_decode,
        ),
    )
}
"""The ternary formats, the projections' packings: what ``sherry pack``, ``compare`` and the benchmarks iterate."""
REFERENCE_FORMAT = "sherry"
"""The format the project is about: the default wherever a format is chosen, and the one whose speed-ups
the reports give over every other."""
FP32 = "fp32"
"""Dense float32 weights in a plain ``MatMul``: a projection format, and an LM head and embedding precision."""
HEAD_FORMATS: dict[str, WeightFormat] = {
    "int8": WeightFormat(
        "int8",
        "Int8MatMul",
        "signed 8-bit weights in [-127, 127] per scale group (LM heads)",
        8.0,
        1,
        1,
        1,
        None,
        INT8_MAX,
        _int8_row_bytes,
        _int8_encode,
        _int8_decode,
    ),
}
"""Formats of wider weights on the same ops and numerics, for the LM head (``--lm-head int8``)."""
ALL_FORMATS: dict[str, WeightFormat] = {**FORMATS, **HEAD_FORMATS}
"""Every op of the library, in the order of the C++ ``Format`` values (``kFormats``)."""
NBITS_FORMATS = {"nbits2": 2, "nbits4": 4}
"""onnxruntime's own ``MatMulNBits`` at these bit widths, carrying the same ternary values: the baselines."""
EXPORT_FORMATS = (*FORMATS, *NBITS_FORMATS, FP32)
"""Every projection format an export can use: ours, ``MatMulNBits``, and dense float32."""
LM_HEADS = (FP32, "nbits8", "nbits4", *HEAD_FORMATS)
"""LM head precisions, the same for every format: float32, ``MatMulNBits`` at 8 or 4 bits, or our ``int8``
format (``Int8MatMul``: fp16 scales, our AVX-512 VNNI and AVX2 kernels)."""
SPEED_BASELINES = (*(f for f in FORMATS if f != REFERENCE_FORMAT), "nbits2")
"""What the reference format's speed-up is reported over: every other format of ours, and ``MatMulNBits``
at the bit width nearest ours (the strongest like-for-like baseline on the same runtime)."""
SPEED_TARGETS = {"i2s": 1.2, "tl2": 1.15, "nbits2": 1.5}
"""The reference format's decode speed-up over these baselines that the project aims for (LLaMA-3.2-1B
shape, 2 threads, the same LM head), on the AVX2 and the AVX-512 paths alike. A new format needs no
entry: the reports check the targets there are."""
EMBEDDINGS = ("auto", *LM_HEADS)
"""Input embedding precisions. ``auto``: a tied embedding takes the LM head's precision (and shares its
stored table, read by ``GatherBlockQuantized``); an untied one stays fp32."""


def get_format(name: str) -> WeightFormat:
    """Look a format up by name (any of :data:`ALL_FORMATS`), with an error that lists the known ones."""
    try:
        return ALL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; choose one of {', '.join(ALL_FORMATS)}") from None


@dataclass(frozen=True)
class PackedWeight:
    """A packed ``[N, K]`` weight: ``data`` uint8 ``[N, row_bytes]`` and float16 ``scales`` ``[N, G]``."""

    format: str
    data: np.ndarray
    scales: np.ndarray
    k: int
    group_size: int

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def code_bits_per_weight(self) -> float:
        return self.data.size * 8 / (self.n * self.k)

    @property
    def bits_per_weight(self) -> float:
        """Code bits plus scale bits, per weight."""
        return (self.data.nbytes + self.scales.nbytes) * 8 / (self.n * self.k)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        group_size = fmt.check_geometry(self.k, self.group_size)
        if self.data.dtype != np.uint8 or self.data.ndim != 2:
            raise ValueError(f"packed data must be a 2-D uint8 array, got {self.data.dtype} {self.data.shape}")
        expected = (self.n, fmt.row_bytes(self.k, group_size))
        if self.data.shape != expected:
            raise ValueError(
                f"packed {self.format} data for K={self.k}, group_size={group_size} must have "
                f"shape {expected}, got {self.data.shape}"
            )
        scales_shape = (self.n, num_groups(self.k, group_size))
        if self.scales.dtype != SCALE_DTYPE or self.scales.shape != scales_shape:
            raise ValueError(f"scales must be float16 {scales_shape}, got {self.scales.dtype} {self.scales.shape}")


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def pack(format: str, ternary: Ternary, group_size: int | None) -> PackedWeight:
    """Pack ternary values and float32 scales (from :mod:`sherry_export.quant`) into ``format``."""
    fmt = get_format(format)
    values, scales = (_as_numpy(a) for a in ternary)
    if values.dtype != np.int8 or values.ndim != 2:
        raise ValueError(f"ternary values must be a 2-D int8 array, got {values.dtype} {values.shape}")
    n, k = values.shape
    group_size = fmt.check_geometry(k, group_size)
    if scales.shape != (n, num_groups(k, group_size)):
        raise ValueError(
            f"scales must have shape {(n, num_groups(k, group_size))} for K={k} and "
            f"group_size={group_size}, got {scales.shape}"
        )
    if ((values < -fmt.max_weight) | (values > fmt.max_weight)).any():
        raise ValueError(
            "ternary values must lie in {-1, 0, +1}"
            if fmt.max_weight == 1
            else f"{format} values must lie in [-{fmt.max_weight}, {fmt.max_weight}]"
        )
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError("scales must be finite and non-negative")
    if (np.abs(scales) > np.finfo(SCALE_DTYPE).max).any():
        raise ValueError(f"a scale exceeds float16's range ({np.finfo(SCALE_DTYPE).max}); rescale the layer")
    data = fmt.encode(np.ascontiguousarray(values), group_size)
    return PackedWeight(format, data, scales.astype(SCALE_DTYPE), k, group_size)


def unpack(packed: PackedWeight) -> Ternary:
    """Recover the ternary values (int8) and scales (float32, as stored in float16)."""
    values = get_format(packed.format).decode(packed.data, packed.k, packed.group_size)
    import torch

    return Ternary(torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(packed.scales.astype(np.float32)))


def dequantize(packed: PackedWeight) -> np.ndarray:
    """The float32 weight ``[N, K]`` a packed weight stands for: t·α with α read back from float16."""
    values, scales = unpack(packed)
    alpha = np.repeat(scales.numpy(), packed.group_size, axis=1)[:, : packed.k]
    return values.numpy().astype(np.float32) * alpha


def quantize_activations(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' activation numerics: int8 per row and per weight scale group.

    For each row of ``x [M, K]`` and each group: m = max|x|, xq = rint(x · (127/m)) (ties to even),
    s = m/127, all in float32; a group of zeros gets s = 0 and xq = 0, and a group holding a NaN or
    an infinity gets s = NaN and xq = 0, so the outputs of that row are NaN, as in a float matmul.
    """
    m, k = x.shape
    grouped = in_groups(x, group_size)
    finite = np.isfinite(grouped).all(axis=-1)
    amax = np.where(finite, np.abs(np.where(np.isfinite(grouped), grouped, 0)).max(axis=-1, initial=0.0), 0)
    inv = np.divide(np.float32(ACTIVATION_QMAX), amax, out=np.zeros_like(amax), where=amax > 0)
    xq = np.clip(np.rint(np.where(finite[..., None], grouped, 0) * inv[..., None]), -ACTIVATION_QMAX, ACTIVATION_QMAX)
    scales = np.where(finite, amax / np.float32(ACTIVATION_QMAX), np.float32(np.nan)).astype(np.float32)
    return xq.astype(np.int8).reshape(m, grouped.shape[1] * group_size)[:, :k], scales  # explicit: m may be 0


def reference_matmul(
    x: np.ndarray,
    packed: PackedWeight,
    bias: np.ndarray | None = None,
    activations: Literal["float", "int8"] = "float",
) -> np.ndarray:
    """y = x·Wᵀ (+ bias) for ``x [..., K]``, in numpy.

    ``activations="float"`` multiplies by the dequantized weight in float32. ``"int8"`` mirrors the
    kernels: activations quantized by :func:`quantize_activations`, an exact integer dot product per
    scale group, and y = Σ_g (α_g · s_g) · dot_g accumulated in float32 in group order.
    """
    x = np.asarray(x, np.float32)
    if x.shape[-1] != packed.k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight expects K={packed.k}")
    rows = x.reshape(-1, packed.k)
    if activations == "float":
        y = rows @ dequantize(packed).T
    elif activations == "int8":
        values = unpack(packed).values.numpy().astype(np.float64)
        xq, xs = quantize_activations(rows, packed.group_size)
        alpha = packed.scales.astype(np.float32)
        y = np.zeros((rows.shape[0], packed.n), np.float32)
        for g, start in enumerate(range(0, packed.k, packed.group_size)):
            cols = slice(start, start + packed.group_size)
            dot = (xq[:, cols].astype(np.float64) @ values[:, cols].T).astype(np.float32)  # exact integers
            y += (xs[:, g : g + 1] * alpha[None, :, g]) * dot
    else:
        raise ValueError(f"activations must be 'float' or 'int8', got {activations!r}")
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y.reshape(*x.shape[:-1], packed.n).astype(np.float32)
