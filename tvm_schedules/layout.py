"""The TVM kernels' private layouts, in numpy: the C++ op (``custom_ops/src/kernel_tvm.cc``) builds the
same bytes, and the tests check the kernels through these functions.

Rows are cut into tiles of 16 (the int32 lanes of a zmm register, two ymm registers on AVX2). Every
row is a stream of *code bytes*, one per code of ``lanes_per_code`` weights: sherry and tl2 their
5-bit code (index | sign << 4), i2s the byte of 4 two-bit codes t+1. Every scale group is padded to
a whole number of *quads* (4 codes: 16 weights for sherry/i2s, 12 for tl2), and a quad of a tile is
64 bytes, byte ``4r + j`` = code j of the quad of row r: ``W[n // 16, quad, 4 (n % 16) + j]``. One
byte permute (sherry, tl2) or one shift and mask (i2s) per weight position p of the codes turns the
64 bytes into 64 weights + 1 (u8 0..2), and one VNNI dot with the activation dword of position p
sums each row's 4 weights into its own int32 lane. So the weights cost 8 bits per code: 2 bits per
weight for sherry and i2s, 2.67 for tl2 (the hand-written kernels keep sherry at 1.25).

Activations (one workspace row per row of A, ``row_bytes`` long, 64-byte aligned): the int8 values
quad by quad in *dword order*: byte ``4p + j`` of a quad is column ``L·j + p`` of it (L =
lanes_per_code), so dword p holds the 4 activations that meet position p of the quad's 4 codes; each
group at ``g·padded_group``, zero-padded. Then at ``scale_offset`` the float32 group scales, and
after them (at float index ``groups``) the int32 sums Σ xq of each group, which remove the +1 of the
weights. The values come from the op's shared ``quantize_group`` (formats.h), i.e.
:func:`sherry_export.formats.quantize_activations`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sherry_export.formats import PackedWeight, quantize_activations, unpack

LANES_PER_CODE = {"sherry": 4, "tl2": 3, "i2s": 4}
TILE = 16
"""Rows per tile: the int32 lanes of one zmm register."""
CODES_PER_QUAD = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round64(n: int) -> int:
    return _ceil_div(n, 64) * 64


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
    def quads_per_group(self) -> int:
        return _ceil_div(self.group_size, CODES_PER_QUAD * self.lanes_per_code)

    @property
    def codes_per_group(self) -> int:
        return self.quads_per_group * CODES_PER_QUAD

    @property
    def padded_group(self) -> int:
        return self.codes_per_group * self.lanes_per_code

    @property
    def quads(self) -> int:
        """Quads per row."""
        return self.groups * self.quads_per_group

    @property
    def codes(self) -> int:
        """Code bytes per row."""
        return self.quads * CODES_PER_QUAD

    @property
    def tiles(self) -> int:
        return self.n // TILE

    @property
    def plane_bytes(self) -> tuple[int, ...]:
        """Bytes per row of each weight plane (one plane: a byte per code)."""
        return (self.codes,)

    @property
    def scale_offset(self) -> int:
        return _round64(self.groups * self.padded_group)

    @property
    def row_bytes(self) -> int:
        """Workspace bytes per activation row (a multiple of 64): values, float scales, int32 sums."""
        return self.scale_offset + _round64(8 * self.groups)

    @property
    def key(self) -> str:
        return f"{self.format}_k{self.k}_n{self.n}_g{self.group_size}"

    def supported(self) -> str:
        """Empty if the TVM kernels take this shape, else why not."""
        if self.n % TILE:
            return f"N={self.n} is not a multiple of {TILE}"
        return ""


def pad_groups(values: np.ndarray, k: int, group_size: int, padded_group: int) -> np.ndarray:
    """``values [M, K]`` with every group of ``group_size`` columns zero-padded to ``padded_group``
    columns: ``[M, G·padded_group]``, of the same dtype. The kernels' geometries pad to different units
    (whole quads here, whole pairs for the LUT kernel)."""
    groups = _ceil_div(k, group_size)
    out = np.zeros((values.shape[0], groups * padded_group), values.dtype)
    for g in range(groups):
        start = g * group_size
        length = min(group_size, k - start)
        out[:, g * padded_group : g * padded_group + length] = values[:, start : start + length]
    return out


def padded_values(shape: Shape, values: np.ndarray) -> np.ndarray:
    """Ternary ``[N, K]`` to int8 ``[N, G·padded_group]``, each group zero-padded."""
    return pad_groups(values, shape.k, shape.group_size, shape.padded_group).astype(np.int8, copy=False)


def code_bytes(shape: Shape, values: np.ndarray) -> np.ndarray:
    """The code byte stream ``[N, codes]`` of padded ternary values ``[N, G·padded_group]``."""
    n = values.shape[0]
    lanes = values.reshape(n, shape.codes, shape.lanes_per_code)
    if shape.format == "i2s":
        c = (lanes + 1).astype(np.uint8)
        return c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6
    from sherry_export.formats import SHERRY_ENCODE, TL2_WEIGHTS, _base3_key

    if shape.format == "sherry":
        # padding blocks (all zero) are not valid Sherry blocks; they meet zero activations anyway
        codes = SHERRY_ENCODE[_base3_key(lanes)]
        codes[codes == 255] = 0
        return codes
    v = lanes.astype(np.int8) @ TL2_WEIGHTS
    return np.abs(v).astype(np.uint8) | ((v < 0).astype(np.uint8) << 4)


def repack(packed: PackedWeight) -> tuple[list[np.ndarray], np.ndarray]:
    """The kernel's weight plane (uint8 ``[N/16, quads, 64]``) and float32 scales ``[N/16, G, 16]``."""
    shape = Shape(packed.format, packed.k, packed.n, packed.group_size)
    if problem := shape.supported():
        raise ValueError(problem)
    codes = code_bytes(shape, padded_values(shape, unpack(packed).values.numpy()))
    tiles = shape.tiles
    plane = codes.reshape(tiles, TILE, shape.quads, CODES_PER_QUAD).transpose(0, 2, 1, 3)
    alpha = packed.scales.astype(np.float32).reshape(tiles, TILE, shape.groups).transpose(0, 2, 1)
    return [np.ascontiguousarray(plane.reshape(tiles, shape.quads, 64))], np.ascontiguousarray(alpha)


def dword_order(shape: Shape, xq: np.ndarray) -> np.ndarray:
    """Padded activations ``[M, G·padded_group]`` in the kernels' order: byte 4p + j of a quad is
    column L·j + p of it."""
    m, lanes = xq.shape[0], shape.lanes_per_code
    return np.ascontiguousarray(xq.reshape(m, -1, CODES_PER_QUAD, lanes).transpose(0, 1, 3, 2)).reshape(m, -1)


def activations(shape: Shape, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Workspace rows for ``x [M, K]``: int8 ``[M, row_bytes]`` and their float32 view ``[M, row_bytes/4]``
    starting at ``scale_offset`` (as the op passes them: two views of one buffer)."""
    m = x.shape[0]
    xq, xs = quantize_activations(np.asarray(x, np.float32), shape.group_size)
    padded = padded_values(shape, xq)
    ws = np.zeros((m + 1, shape.row_bytes), np.uint8)  # one spare row: the scale view runs past the last
    ws[:m, : shape.groups * shape.padded_group] = dword_order(shape, padded).view(np.uint8)
    flat = ws.reshape(-1)
    scales = flat[shape.scale_offset : shape.scale_offset + m * shape.row_bytes].view(np.float32)
    scales = scales.reshape(m, shape.row_bytes // 4)
    scales[:, : shape.groups] = xs
    sums = padded.reshape(m, shape.groups, shape.padded_group).sum(axis=-1, dtype=np.int32)
    scales[:, shape.groups : 2 * shape.groups] = sums.view(np.float32)
    return ws[:m].view(np.int8), np.ascontiguousarray(scales)
