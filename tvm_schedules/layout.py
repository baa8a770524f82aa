"""The TVM kernels' private layouts, in numpy: the C++ op (``custom_ops/src/kernel_tvm.cc``) builds the
same bytes, and the tests check the kernels through these functions.

Weights stay at their packed bit width. Rows are cut into blocks of ``lane_block`` (LB) consecutive
output rows; within a block the packed bytes of the LB rows are interleaved, byte ``b`` of every row
side by side, so a kernel loads LB (or a slice of them) bytes that share one bit position and decodes
them with the same shifts: ``plane[n // LB, b, n % LB]``.

Every scale group is padded to ``padded_group`` weights (sherry: group_size; tl2: 3·ceil(gs/3), whole
triples; i2s: 4·ceil(gs/4), whole bytes), so a short last group looks like a full one whose padding
weights meet zero activations. The per-row code streams:

- sherry: code ``c`` (4 weights, columns 4c…4c+3 of the padded row) as in docs/formats.md, index
  nibble in plane 0 (byte c/2, low nibble if c is even), sign in plane 1 (byte c/8, bit c % 8);
- tl2: code ``c = g·T + j`` for triple j of group g (T = ceil(gs/3)), the same two planes;
- i2s: one plane, weight ``k`` of the padded row as the 2-bit code t+1 at bits 2(k%4) of byte k/4.

Activations (one workspace row per row of A, ``row_bytes`` long, 64-byte aligned): the int8 values
group by group, each group at ``g·padded_group`` and zero-padded, then at ``scale_offset`` the
float32 group scales. Both are produced by the op's shared ``quantize_group`` (formats.h), i.e.
:func:`sherry_export.formats.quantize_activations`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sherry_export.formats import PackedWeight, pack_code5, quantize_activations, unpack

LANES_PER_CODE = {"sherry": 4, "tl2": 3, "i2s": 4}
MAX_INT16_GROUP = 32767 // 127
"""A group of at most this many weights has |dot| ≤ 32767: its int8 dot products fit int16."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round64(n: int) -> int:
    return _ceil_div(n, 64) * 64


def lane_block(n: int) -> int:
    """Rows interleaved per weight block: the largest of 128, 64, 32, 16 that divides N (0 if none)."""
    return next((lb for lb in (128, 64, 32, 16) if n % lb == 0), 0)


@dataclass(frozen=True)
class Shape:
    """One matmul weight: format, K (in_features), N (out_features), group_size."""

    format: str
    k: int
    n: int
    group_size: int

    @property
    def groups(self) -> int:
        return _ceil_div(self.k, self.group_size)

    @property
    def lanes_per_code(self) -> int:
        return LANES_PER_CODE[self.format]

    @property
    def codes_per_group(self) -> int:
        return _ceil_div(self.group_size, self.lanes_per_code)

    @property
    def padded_group(self) -> int:
        return self.codes_per_group * self.lanes_per_code

    @property
    def codes(self) -> int:
        """Codes per row (i2s: bytes per row)."""
        return self.groups * self.codes_per_group

    @property
    def lane_block(self) -> int:
        return lane_block(self.n)

    @property
    def acc_dtype(self) -> str:
        """int16 when a group's dot product cannot overflow it, else int32."""
        return "int16" if self.padded_group <= MAX_INT16_GROUP else "int32"

    @property
    def plane_bytes(self) -> tuple[int, ...]:
        """Bytes per row of each weight plane."""
        if self.format == "i2s":
            return (self.codes,)
        return (_ceil_div(self.codes, 2), _ceil_div(self.codes, 8))

    @property
    def scale_offset(self) -> int:
        return _round64(self.groups * self.padded_group)

    @property
    def row_bytes(self) -> int:
        """Workspace bytes per activation row (a multiple of 64)."""
        return self.scale_offset + _round64(4 * self.groups)

    @property
    def key(self) -> str:
        return f"{self.format}_k{self.k}_n{self.n}_g{self.group_size}"

    def supported(self) -> str:
        """Empty if the TVM kernels take this shape, else why not."""
        if self.lane_block == 0:
            return f"N={self.n} is not a multiple of 16"
        return ""


def padded_values(shape: Shape, values: np.ndarray) -> np.ndarray:
    """Ternary ``[N, K]`` to ``[N, G·padded_group]``, each group zero-padded."""
    out = np.zeros((shape.n, shape.groups * shape.padded_group), np.int8)
    for g in range(shape.groups):
        start = g * shape.group_size
        length = min(shape.group_size, shape.k - start)
        out[:, g * shape.padded_group : g * shape.padded_group + length] = values[:, start : start + length]
    return out


def _interleave(plane: np.ndarray, lb: int) -> np.ndarray:
    """Row-major ``[N, B]`` to ``[N/LB, B, LB]``."""
    n, b = plane.shape
    return np.ascontiguousarray(plane.reshape(n // lb, lb, b).transpose(0, 2, 1))


def repack(packed: PackedWeight) -> tuple[list[np.ndarray], np.ndarray]:
    """The kernel's weight planes (uint8 ``[N/LB, bytes, LB]``) and float32 scales ``[N/LB, G, LB]``."""
    shape = Shape(packed.format, packed.k, packed.n, packed.group_size)
    if problem := shape.supported():
        raise ValueError(problem)
    values = padded_values(shape, unpack(packed).values.numpy())
    n = shape.n
    if shape.format == "i2s":
        codes = (values + 1).astype(np.uint8).reshape(n, -1, 4)
        planes = [codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6]
    else:
        from sherry_export.formats import SHERRY_ENCODE, TL2_WEIGHTS, _base3_key

        lanes = values.reshape(n, shape.codes, shape.lanes_per_code)
        if shape.format == "sherry":
            # padding blocks (all zero) are not valid Sherry blocks; they meet zero activations anyway
            codes = SHERRY_ENCODE[_base3_key(lanes)]
            codes[codes == 255] = 0
        else:
            v = lanes.astype(np.int8) @ TL2_WEIGHTS
            codes = np.abs(v).astype(np.uint8) | ((v < 0).astype(np.uint8) << 4)
        both = pack_code5(codes)
        half = _ceil_div(shape.codes, 2)
        planes = [both[:, :half], both[:, half:]]
    alpha = packed.scales.astype(np.float32)
    return [_interleave(p, shape.lane_block) for p in planes], _interleave(alpha, shape.lane_block)


def activations(shape: Shape, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Workspace rows for ``x [M, K]``: int8 ``[M, row_bytes]`` and their float32 view ``[M, row_bytes/4]``
    starting at ``scale_offset`` (as the op passes them: two views of one buffer)."""
    m = x.shape[0]
    xq, xs = quantize_activations(np.asarray(x, np.float32), shape.group_size)
    ws = np.zeros((m + 1, shape.row_bytes), np.uint8)  # one spare row: the scale view runs past the last
    ws[:m, : shape.groups * shape.padded_group] = padded_values(
        Shape(shape.format, shape.k, m, shape.group_size), xq
    ).view(np.uint8)
    flat = ws.reshape(-1)
    scales = flat[shape.scale_offset : shape.scale_offset + m * shape.row_bytes].view(np.float32)
    scales = scales.reshape(m, shape.row_bytes // 4)
    scales[:, : shape.groups] = xs
    return ws[:m].view(np.int8), np.ascontiguousarray(scales)
