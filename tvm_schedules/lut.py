"""The activation lookup-table formulation of the sherry M = 1 kernel in TensorIR (``formulation`` lut).

The plane kernel (tvm_schedules/kernels.py) decodes every code byte into one weight plane per lane
and dots each plane with the activations: 8 shuffle or dot µops per 256 weights on AVX-512, from a
byte per code (2 bits per weight). This formulation does what the hand-written AVX-512 kernel
(custom_ops/src/kernel_avx512.cc, ``lookup_pair``) does instead, in TensorIR:

- **Weights**, 1.25 bits per weight, the hand-written kernel's pair records: per tile (16 rows) and
  *pair* (two pieces of 4 codes of every row, 32 columns), 80 bytes: byte ``i = 4r + j`` holds the
  4-bit index of code j of piece A of row r in its low nibble and that of piece B in its high
  nibble, then two 64-bit masks of the codes' sign bits (bit i: piece A, then piece B). Every group
  is padded to whole pairs. The stream is ordered as the hand-written kernel's: *superblocks* (a
  parallel step each), in a superblock *K-chunks* (groups whose tables fill about 4 KiB per row of A),
  in a chunk block after block (:attr:`LutShape.block_tiles` tiles), in a block group after group
  (pair records, pair after pair with the block's tiles one after the other, then the tiles' float16
  scales). So a chunk's tables come from L2 once per superblock and stay in L1 for all its blocks,
  and each step reads one forward run: with the weights streaming from memory, every switch of
  tables that must come from L2 stalls the stream (docs/benchmarks.md, "switches of tables").
- **Activations**: per pair, per piece, the 256 table bytes of the hand-written ``build_tables``:
  the quantized activations split into low nibbles ``xl = xq & 15`` and high nibbles ``xh = xq >> 4``
  (both then fit int8 sums of 3 lanes), and for each a 128-entry table indexed by
  ``sign << 6 | j << 4 | idx``: ``±Σ_p lanes(idx)[p] · x[4j + p]`` (:func:`tables`). Then the float32
  group scales.
- **The lookup** (block ``lut``, tensorized by :func:`lut_name`): for the 64 codes of a piece of a
  tile, the index ``sign << 6 | j << 4 | idx`` (a blend on the sign mask and a ternary-logic op),
  one ``vpermi2b`` per table (4 per pair: A and B, xl and xh), the two pieces' bytes added in int8
  (|xl sum| <= 90, |xh sum| <= 48), and two ``vpdpbusd`` (by 1 and by 16) into each row's int32 lane:
  ``acc[r] += Σ_j xl-table + 16 · xh-table`` = the exact ``Σ w · xq`` of the pair's 512 weights.
  Per 256 weights: 2 byte permutes and 1 dot, against the plane kernel's 4 and 4.
- ``group``: ``y += (α·s)·float(acc)`` into Y in group order (chunk after chunk), the product fenced
  from FMA contraction (``llvm.arithmetic.fence``): bit for bit the int8 reference.

The superblock count is a runtime choice, not a tuned one: the op takes as few superblocks as its
threads allow (:func:`superblocks_for`, mirrored in kernel_tvm.cc), so the built library's functions
take it from the weight tensor's shape (``superblocks`` None: a symbolic extent), while tuning and
the Relax path compile a fixed count.

The design space (:func:`schedule`): ``unroll`` (pairs of a group unrolled together) and ``order``:
``pair`` (each pair over every tile of the block: its 8 table vectors are loaded once and stay in
registers across the tiles) or ``tile`` (each tile over its ``unroll`` pairs: the tables are
reloaded from L1 per tile); the tiles of a run are the block's (:func:`tile_choices`).

Only the M = 1 function is tuned. The op's block functions for M > 1 (``_mx``, ``kernels.BLOCK_M``
rows, and ``_mb``, :data:`BLOCK_ROWS` rows; tvm_schedules/build.py) run the same loop nest with the
M = 1 function's decisions for each row inside each parallel step: the tables are per row, so there
is no decode to share, only the step's weight stream, which stays in cache from row to row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from sherry_export.formats import SHERRY_DECODE, PackedWeight, quantize_activations, unpack
from tvm_schedules.kernels import FORMAT_KEY, ISA_KEY, ORDER_KEY, Knobs, _loops_after
from tvm_schedules.kernels import knobs_of as kernels_knobs_of
from tvm_schedules.layout import TILE, Shape, code_bytes, pad_groups

LUT_FORMAT = "sherry"
"""The one format this formulation decodes: its pair records are sherry's 5-bit codes."""
TABLE_BYTES = 512
"""Activation table bytes of a pair (both ISAs): AVX-512, per piece the xl tables (128) then the xh tables
(128); AVX2, per unit pair the U then the V tables of its two units (16 entries each)."""
SCALE_BYTES = 2 * 16
"""The float16 scales of one tile and group."""
MAX_UNROLL = 4
ORDERS = ("pair", "tile")
BLOCK_ROWS = 8
"""Rows of A of the LUT entry's single-block function (``_mb``), what is left of a call after whole
``kernels.BLOCK_M``-row calls before the last rows go one by one through the M = 1 function."""
CHUNK_PAIRS = 8
"""Pairs of a K-chunk: 4 KiB of tables per row of A (the hand-written kernel's chunk of 16 pieces), which
stay in L1 while the chunk's blocks stream through."""
MIN_STEP_BLOCKS, MIN_STEPS = 16, 4
"""The smallest superblocks many threads get: at least :data:`MIN_STEPS` steps of up to
:data:`MIN_STEP_BLOCKS` blocks, the hand-written kernel's rule (dispatch.cc superblock_blocks)."""
MAX_STEP_ROWS = 4096
"""Most rows of a superblock: the op copies a step that it cannot write in place through the stack."""
FORMULATIONS = ("plane", "lut")
"""The M = 1 kernel's formulations: weight planes (kernels.py) or activation lookup tables (here)."""


@dataclass(frozen=True)
class LutIsa:
    """One ISA's pair record: the columns a lookup intrinsic covers for a tile of 16 rows, its weight bytes
    (1.25 bits per weight) and the extents of the element-wise description's code and entry loops."""

    pair_cols: int
    pair_bytes: int
    codes: int
    entries: int
    acc_lanes: int
    """Accumulator lanes of a tile and group (the description's spatial loop): one per row, or per row and lane."""
    acc_dtype: str


LUT_ISAS = {
    "avx512": LutIsa(pair_cols=32, pair_bytes=80, codes=4, entries=128, acc_lanes=16, acc_dtype="int32"),
    "avx2": LutIsa(pair_cols=64, pair_bytes=160, codes=8, entries=16, acc_lanes=32, acc_dtype="int16"),
}
"""AVX-512: two pieces of 4 codes per row, a 128-entry ``vpermi2b`` table per piece and nibble half.
AVX2: the hand-written AVX2 kernel's chunk of 16 units (blocks of 4 columns) for one 16-row half, a
16-entry ``vpshufb`` table per unit and split (custom_ops/src/kernel_avx2.cc, ``lut_chunk``), summed per
row and 128-bit lane (even or odd units) in int16 until the group's end (:data:`AVX2_MAX_GROUP`)."""
AVX2_MAX_GROUP = 640
"""Largest group of the AVX2 form: a pair adds at most 8 units x 381 = 3048 to a row's lane, and a lane's
int16 sum holds 10 pairs (30480)."""


def lut_name(isa: str = "avx512") -> str:
    return f"sherry_lut_pair_{isa}"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LutShape:
    """The LUT kernel's geometry of one sherry weight."""

    k: int
    n: int
    group_size: int
    superblocks: int | None = 1
    """Parallel steps of the weight stream (:func:`superblocks_for`); None: any (a symbolic extent)."""
    isa: str = "avx512"
    """The pair record's ISA (:data:`LUT_ISAS`)."""

    @property
    def pair_cols(self) -> int:
        return LUT_ISAS[self.isa].pair_cols

    @property
    def pair_bytes(self) -> int:
        return LUT_ISAS[self.isa].pair_bytes

    @property
    def shape(self) -> Shape:
        return Shape(LUT_FORMAT, self.k, self.n, self.group_size)

    @property
    def groups(self) -> int:
        return _ceil_div(self.k, self.group_size)

    @property
    def pairs_per_group(self) -> int:
        return _ceil_div(self.group_size, self.pair_cols)

    @property
    def padded_group(self) -> int:
        return self.pairs_per_group * self.pair_cols

    @property
    def pairs(self) -> int:
        return self.groups * self.pairs_per_group

    @property
    def tiles(self) -> int:
        return self.n // TILE

    @property
    def block_tiles(self) -> int:
        """Tiles interleaved in one weight stream: 8 (the hand-written kernel's block), else the largest
        power of two that divides the tiles."""
        return next(b for b in (8, 4, 2, 1) if self.tiles % b == 0)

    @property
    def blocks(self) -> int:
        return self.tiles // self.block_tiles

    @property
    def step_blocks(self) -> int:
        """Blocks of a superblock (a fixed superblock count only)."""
        if self.superblocks is None or self.superblocks < 1 or self.blocks % self.superblocks:
            raise ValueError(f"{self.superblocks} superblocks do not divide {self.key}'s {self.blocks} blocks")
        return self.blocks // self.superblocks

    @property
    def chunk_groups(self) -> int:
        """Groups of a K-chunk: the most whose tables fit :data:`CHUNK_PAIRS` pairs (at least one), a divisor
        of the groups so that every chunk has as many."""
        most = max(1, CHUNK_PAIRS // self.pairs_per_group)
        return max(d for d in range(1, most + 1) if self.groups % d == 0)

    @property
    def chunks(self) -> int:
        return self.groups // self.chunk_groups

    @property
    def group_bytes(self) -> int:
        """Weight bytes of one group of a block: its pair records, tile after tile per pair, then the
        tiles' float16 scales."""
        return self.block_tiles * (self.pairs_per_group * self.pair_bytes + SCALE_BYTES)

    @property
    def scale_offset(self) -> int:
        return self.pairs * TABLE_BYTES

    @property
    def row_bytes(self) -> int:
        """Workspace bytes per row of A: the tables, then the float32 group scales, in whole 512-byte
        slots (the function reads the row as ``[slots, 512]``, a pair's tables per slot)."""
        return self.scale_offset + _ceil_div(4 * self.groups, TABLE_BYTES) * TABLE_BYTES

    @property
    def weight_bits(self) -> float:
        """Bits per weight of the codes in the weight stream (1.25 where the group size is a multiple of
        32; the float16 scales add 16 / group_size)."""
        return 8 * self.tiles * self.pairs * self.pair_bytes / (self.k * self.n)

    @property
    def key(self) -> str:
        return f"sherry_lut_k{self.k}_n{self.n}_g{self.group_size}"

    def supported(self) -> str:
        if self.isa not in LUT_ISAS:
            return f"the LUT kernel has no {self.isa} form (only {', '.join(LUT_ISAS)})"
        if self.isa == "avx2" and self.group_size > AVX2_MAX_GROUP:
            return (
                f"the AVX2 LUT kernel's int16 sums hold groups of up to {AVX2_MAX_GROUP} columns, not {self.group_size}"
            )
        if self.n % TILE:
            return f"N={self.n} is not a multiple of {TILE}"
        if self.k % 4 or self.group_size % 4:
            return f"sherry needs K and group_size multiples of 4, not K={self.k}, group_size={self.group_size}"
        return ""


def superblocks_for(ls: LutShape, threads: int) -> int:
    """The superblock count the op takes on ``threads`` hardware threads (kernel_tvm.cc ``lut_superblocks``): as few
    steps as keep every thread busy, but at least :data:`MIN_STEPS` of up to :data:`MIN_STEP_BLOCKS`
    blocks where there are that many, superblocks of whole blocks that divide the blocks, and none over
    :data:`MAX_STEP_ROWS` rows."""
    blocks, rows = ls.blocks, ls.block_tiles * TILE
    step = 1
    while step < MIN_STEP_BLOCKS and step * 2 * MIN_STEPS <= blocks:
        step *= 2
    step = max(step, _ceil_div(blocks, max(1, threads)))
    fits = [d for d in range(1, blocks + 1) if blocks % d == 0 and (d == 1 or d * rows <= MAX_STEP_ROWS)]
    step = min((d for d in fits if d >= step), default=fits[-1])
    return blocks // step


def _records_avx512(c: np.ndarray) -> np.ndarray:
    """AVX-512 pair records of codes ``[..., r, 8]`` (row r, code 4·piece + j): byte ``4r + j`` the indices of
    code j of pieces A (low nibble) and B (high nibble), then each piece's 64 sign bits (bit ``4r + j``)."""
    c = c.reshape(*c.shape[:-2], TILE, 2, 4)
    c = np.moveaxis(c, -2, -3).reshape(*c.shape[:-3], 2, 64)  # [..., piece, 4r + j]
    records = np.empty((*c.shape[:-2], 80), np.uint8)
    records[..., :64] = (c[..., 0, :] & 15) | (c[..., 1, :] & 15) << 4
    signs = (c >> 4).astype(np.uint8)
    records[..., 64:] = np.packbits(signs, axis=-1, bitorder="little").reshape(*records.shape[:-1], 16)
    return records


def _records_avx2(c: np.ndarray) -> np.ndarray:
    """AVX2 pair records of codes ``[..., r, 16]`` (row r, unit u = 2P + L: unit pair P, lane L), the
    hand-written AVX2 kernel's chunk for one 16-row half: 4 nibble vectors (byte ``32v + 16L + r``: the index
    of unit pair 2v in the low nibble, of 2v + 1 in the high one), then the sign vector (byte ``16L + r``,
    bit ``7 - P``)."""
    c = np.moveaxis(c.reshape(*c.shape[:-2], TILE, 8, 2), -3, -1)  # [..., P, L, r]
    records = np.empty((*c.shape[:-3], 160), np.uint8)
    records[..., :128] = ((c[..., 0::2, :, :] & 15) | (c[..., 1::2, :, :] & 15) << 4).reshape(*c.shape[:-3], 128)
    bits = (c >> 4).astype(np.uint8) << (7 - np.arange(8, dtype=np.uint8))[:, None, None]
    records[..., 128:] = np.bitwise_or.reduce(bits, axis=-3).reshape(*c.shape[:-3], 32)
    return records


def weights(packed: PackedWeight, superblocks: int = 1, isa: str = "avx512") -> np.ndarray:
    """The weight stream, uint8 ``[superblocks, chunks, blocks per superblock, groups per chunk,
    group_bytes]``: per block of ``block_tiles`` tiles and group, the pair records (``isa``'s; pair after
    pair, the block's tiles one after the other), then the tiles' float16 scales (16 each, as stored:
    the kernel widens them exactly); blocks ordered superblock, K-chunk, block (the module's top)."""
    ls = LutShape(packed.k, packed.n, packed.group_size, superblocks, isa)
    if packed.format != LUT_FORMAT:
        raise ValueError(f"the LUT kernel takes {LUT_FORMAT} weights, not {packed.format}")
    if problem := ls.supported():
        raise ValueError(problem)
    values = pad_groups(unpack(packed).values.numpy(), ls.k, ls.group_size, ls.padded_group)
    # 5-bit codes per block of 4 (padding blocks code 0: they meet zero activations)
    cols = ls.groups * ls.padded_group
    codes = code_bytes(Shape(LUT_FORMAT, cols, TILE, cols), values)
    B, PG = ls.block_tiles, ls.pairs_per_group
    c = codes.reshape(ls.blocks, B, TILE, ls.groups, PG, ls.pair_cols // 4)  # [b, tile, r, g, pair, code]
    c = c.transpose(0, 3, 4, 1, 2, 5)  # [b, g, pair, tile, r, code]
    records = _records_avx2(c) if isa == "avx2" else _records_avx512(c)
    alpha = packed.scales.astype(np.float16).reshape(ls.blocks, B, TILE, ls.groups).transpose(0, 3, 1, 2)
    out = np.concatenate(
        [
            records.reshape(ls.blocks, ls.groups, -1),
            np.ascontiguousarray(alpha).view(np.uint8).reshape(ls.blocks, ls.groups, -1),
        ],
        axis=-1,
    )
    # [blocks, groups] -> [superblocks, chunks, blocks of the superblock, groups of the chunk]
    out = out.reshape(superblocks, ls.step_blocks, ls.chunks, ls.chunk_groups, ls.group_bytes)
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3, 4))


SPLIT, SPLIT_RECIP = 31, 1057
"""The AVX2 tables' exact split S = 31·U + V of a unit's sum (|S| <= 384): U = round(S / 31) through
``vpmulhrsw`` by 1057 = round(32768 / 31), so |U| <= 12 and |V| <= 15 (kernel_avx2.cc)."""


def tables(ls: LutShape, xq: np.ndarray) -> np.ndarray:
    """The activation tables ``[M, pairs, 512]`` (int8) of quantized activations ``xq [M, K]``.

    AVX-512: per pair and piece (16 columns), for xl = xq & 15 and xh = xq >> 4, 128 entries
    ``sign << 6 | j << 4 | idx`` = ±Σ_p lanes(idx)[p] · x[4j + p], the positive sums then their negations.
    AVX2 (the hand-written kernel's build_lut): per unit pair P (units 2P, 2P + 1 of 4 columns each),
    the U tables of its two units (16 entries ``idx`` each) then their V tables, S = Σ_p lanes(idx)[p] ·
    x[p] = 31·U + V (:data:`SPLIT`)."""
    m = xq.shape[0]
    x = pad_groups(xq, ls.k, ls.group_size, ls.padded_group).astype(np.int32)
    lanes = SHERRY_DECODE[:16].astype(np.int32)  # [idx, p]
    if ls.isa == "avx2":
        s = np.einsum("mqup,ip->mqui", x.reshape(m, ls.pairs, 16, 4), lanes)  # [m, pair, unit, idx]
        u = (s * SPLIT_RECIP + (1 << 14)) >> 15
        split = np.stack([u, s - SPLIT * u], axis=2)  # [m, pair, U/V, unit, idx]
        split = split.reshape(m, ls.pairs, 2, 8, 2, 16).transpose(0, 1, 3, 2, 4, 5)  # [m, pair, P, U/V, L, idx]
        return split.astype(np.int8).reshape(m, ls.pairs, TABLE_BYTES)
    x = x.reshape(m, ls.pairs, 2, 4, 4)  # [m, pair, piece, j, p]
    out = np.empty((m, ls.pairs, 2, 2, 2, 4, 16), np.int32)  # [m, pair, piece, half, sign, j, idx]
    for half, part in enumerate((x & 15, x >> 4)):
        pos = np.einsum("mqcjp,ip->mqcji", part, lanes)
        out[:, :, :, half, 0] = pos
        out[:, :, :, half, 1] = -pos
    return out.astype(np.int8).reshape(m, ls.pairs, TABLE_BYTES)


def activations(ls: LutShape, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Workspace rows for ``x [M, K]``: int8 ``[M, row_bytes]`` (tables, then scales) and their float32
    view ``[M, row_bytes/4]`` starting at ``scale_offset``, as the plane kernel's (layout.activations)."""
    m = x.shape[0]
    xq, xs = quantize_activations(np.asarray(x, np.float32), ls.group_size)
    ws = np.zeros((m + 1, ls.row_bytes), np.uint8)  # one spare row: the scale view runs past the last
    ws[:m, : ls.scale_offset] = tables(ls, xq).reshape(m, -1).view(np.uint8)
    flat = ws.reshape(-1)
    scales = flat[ls.scale_offset : ls.scale_offset + m * ls.row_bytes].view(np.float32).reshape(m, -1)
    scales[:, : ls.groups] = xs
    return ws[:m].view(np.int8), np.ascontiguousarray(scales)


# --- the lookup, element-wise and as an intrinsic ------------------------------------------------


def _index(code: tirx.PrimExpr, sign: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
    """Table index sign << 6 | j << 4 | code (int32)."""
    return (
        tirx.Cast("int32", code)
        + tirx.Cast("int32", sign) * tirx.const(64, "int32")
        + tirx.Cast("int32", j) * tirx.const(16, "int32")
    )


ENTRIES = 128
"""Entries of one table: sign << 6 | j << 4 | idx."""


def lut_term(
    w: tirx.Buffer,
    wi: list,
    x: tirx.Buffer,
    xi: list,
    r: tirx.PrimExpr,
    j: tirx.PrimExpr,
    e: tirx.PrimExpr,
    w0: tirx.PrimExpr = 0,
) -> tirx.PrimExpr:
    """Entry ``e`` of the tables' contribution to code j of row r of a pair (both pieces), in
    element-wise TensorIR: summed over the 128 entries, the code's weights' dot with the pair's
    activations (xl table + 16 · xh table). The lookup is written as a selection of the entry that
    the code indexes, so that every buffer index stays affine: ``tensorize`` matches a
    data-dependent index only as its own expression, not through the buffers it reads. ``wi`` / ``xi``:
    the leading indices of the pair's 80 weight bytes (from ``w0`` in the last dimension) / 512 table
    bytes."""

    def wb(offset: tirx.PrimExpr) -> tirx.PrimExpr:
        return w[(*wi, w0 + offset)]

    def xb(offset: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.Cast("int32", x[(*xi, offset)])

    nib = wb(r * 4 + j)
    bit = tirx.Cast("uint8", tirx.floormod(r, 2) * 4 + j)
    one = tirx.const(1, "uint8")
    sa = (wb(64 + tirx.floordiv(r, 2)) >> bit) & one
    sb = (wb(72 + tirx.floordiv(r, 2)) >> bit) & one
    ia = _index(nib & tirx.const(15, "uint8"), sa, j)
    ib = _index(nib >> tirx.const(4, "uint8"), sb, j)
    zero, sixteen = tirx.const(0, "int32"), tirx.const(16, "int32")
    a = tirx.Select(ia == e, xb(e) + xb(ENTRIES + e) * sixteen, zero)
    b = tirx.Select(ib == e, xb(2 * ENTRIES + e) + xb(3 * ENTRIES + e) * sixteen, zero)
    return a + b


def accumulated(value: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """A term in the accumulators' type (the AVX2 form sums in int16)."""
    return value.astype(dtype)  # the value itself where it has the type already


def _description(isa: str) -> tirx.PrimFunc:
    """The element-wise description of ``isa``'s lookup intrinsic (one pair record of one tile): each
    accumulator lane plus its :data:`LUT_TERMS` selection, summed over the codes and the entries, as
    the workload's ``lut`` block computes it."""
    form, term = LUT_ISAS[isa], LUT_TERMS[isa]
    PB, AL, ACC = form.pair_bytes, form.acc_lanes, form.acc_dtype

    @T.prim_func(s_tir=True)
    def desc(
        W: T.Buffer((PB,), "uint8", offset_factor=1),
        X: T.Buffer((TABLE_BYTES,), "int8", offset_factor=1),
        C: T.Buffer((AL,), ACC, offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:AL], W[0:PB], X[0:TABLE_BYTES])
            T.writes(C[0:AL])
            for i, j, e in T.grid(AL, form.codes, form.entries):
                with T.sblock("lut"):
                    vi, vj, ve = T.axis.remap("SRR", [i, j, e])
                    T.reads(C[vi], W[0:PB], X[0:TABLE_BYTES])
                    T.writes(C[vi])
                    C[vi] = C[vi] + accumulated(term(W, [], X, [], vi, vj, ve), ACC)

    return desc


def _lut_avx512() -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    PAIR_BYTES = LUT_ISAS["avx512"].pair_bytes

    def bcast(value: int, dtype: str = "uint8") -> tirx.PrimExpr:
        return tirx.Broadcast(tirx.const(value, dtype), 64)

    def block_bits(sign: int) -> tirx.PrimExpr:
        # byte i: (i % 4) << 4 | sign << 6, from a ramp (LLVM folds it to a constant)
        ramp = tirx.Ramp(tirx.const(0, "uint8"), tirx.const(1, "uint8"), 64)
        return ((ramp & bcast(3)) << bcast(4)) | bcast(sign << 6)

    def lookup(x: tirx.Buffer, offset: int, idx: tirx.PrimExpr) -> tirx.PrimExpr:
        lo, hi = x.vload([offset], "int8x64"), x.vload([offset + 64], "int8x64")
        return tirx.call_llvm_pure_intrin(
            "int8x64", "llvm.x86.avx512.vpermi2var.qi.512", lo, tirx.reinterpret("int8x64", idx), hi
        )

    def value(acc: tirx.PrimExpr, w: tirx.Buffer, x: tirx.Buffer) -> tirx.PrimExpr:
        nib = w.vload([0], "uint8x64")
        idx = []
        for piece, code in enumerate((nib & bcast(15), nib >> bcast(4))):
            # the 64 sign bits as a <64 x i1> mask register (a kmovq), and a blend on it
            bits = tirx.reinterpret("uint1x64", tirx.reinterpret("uint64", w.vload([64 + 8 * piece], "uint8x8")))
            negative = bits != tirx.Broadcast(tirx.const(0, "uint1"), 64)
            idx.append(code | tirx.Select(negative, block_bits(1), block_bits(0)))
        lo = lookup(x, 0, idx[0]) + lookup(x, 256, idx[1])
        hi = lookup(x, 128, idx[0]) + lookup(x, 384, idx[1])
        acc = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, bcast(1), lo)
        return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, bcast(16), hi)

    @T.prim_func(s_tir=True)
    def impl(
        W: T.Buffer((PAIR_BYTES,), "uint8", offset_factor=1),
        X: T.Buffer((TABLE_BYTES,), "int8", offset_factor=1),
        C: T.Buffer((TILE,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:TILE], W[0:PAIR_BYTES], X[0:TABLE_BYTES])
            T.writes(C[0:TILE])
            C[0:TILE] = value(C.vload([0], "int32x16"), W, X)

    return _description("avx512"), impl


def lut_term_avx2(
    w: tirx.Buffer,
    wi: list,
    x: tirx.Buffer,
    xi: list,
    i: tirx.PrimExpr,
    pair: tirx.PrimExpr,
    e: tirx.PrimExpr,
    w0: tirx.PrimExpr = 0,
) -> tirx.PrimExpr:
    """Entry ``e`` of the contribution of unit pair ``pair``'s unit in lane L to accumulator lane ``i = 16h +
    8L + j`` (row r = 8h + j) of an AVX2 pair record (:func:`_records_avx2`), as :func:`lut_term`: where
    the unit's index is ``e``, ±(31·U + V) of its tables, negated where its sign bit is set; summed over
    the 8 unit pairs and the entries, the row's exact dot with the lane's 8 units (the even or the odd
    ones; the two lanes' sum is the row's dot with the pair's 64 columns)."""
    lane = tirx.floormod(tirx.floordiv(i, 8), 2)
    r = tirx.floordiv(i, 16) * 8 + tirx.floormod(i, 8)

    def xb(offset: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.Cast("int32", x[(*xi, offset)])

    nib = w[(*wi, w0 + tirx.floordiv(pair, 2) * 32 + lane * 16 + r)]
    code = (nib >> tirx.Cast("uint8", tirx.floormod(pair, 2) * 4)) & tirx.const(15, "uint8")
    sign = (w[(*wi, w0 + 128 + lane * 16 + r)] >> tirx.Cast("uint8", 7 - pair)) & tirx.const(1, "uint8")
    table = pair * 64 + lane * 16 + e
    value = xb(table) * tirx.const(SPLIT, "int32") + xb(table + 32)
    signed = tirx.Select(sign == tirx.const(1, "uint8"), -value, value)
    return tirx.Select(tirx.Cast("int32", code) == e, signed, tirx.const(0, "int32"))


def _lut_avx2() -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """The AVX2 lookup of one pair record (16 units x 16 rows), the hand-written ``lut_chunk`` for one half:
    per unit pair P, its index nibbles, one ``vpshufb`` each into its U and V tables (the pair's two units
    in the two 128-bit lanes), ``vpsignb`` by the sign vector shifted by P (sign in bit 7, a guard bit
    below keeps the operand non-zero), int8 sums of the 8 units of a lane (|U| <= 96, |V| <= 120); then
    ``vpmaddubsw`` by (1, 31) widens V + 31·U per row and lane to int16, added to C (lane 16h + 8L + j: row
    8h + j, the even (L = 0) or the odd units)."""
    TB, PB, AL = TABLE_BYTES, LUT_ISAS["avx2"].pair_bytes, LUT_ISAS["avx2"].acc_lanes

    def bcast(value: int, dtype: str = "uint8", lanes: int = 32) -> tirx.PrimExpr:
        return tirx.Broadcast(tirx.const(value, dtype), lanes)

    def i8(v: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.reinterpret("int8x32", v)

    def intrin(dtype: str, name: str, *args: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.call_llvm_pure_intrin(dtype, f"llvm.x86.avx2.{name}", *args)

    def value(acc: tirx.PrimExpr, w: tirx.Buffer, x: tirx.Buffer) -> tirx.PrimExpr:
        # sign operands: for P < 7, d_P = (signs | 1) << P, doubled pair after pair as 16-, 32- and 64-bit
        # lanes in turn (LLVM would merge shifts of one lane width into a vpsllw by P, which takes a shuffle
        # port as vpshufb does; a shift by 1 is a vpadd, any vector ALU): bit 7 of each byte is its own bit
        # 7 - P, the guard bit P keeps it non-zero, the bits below P are the next lower byte's. Pair 7's
        # sign is bit 0, which the guard occupies: the bare signs << 7 (a vpsllw), or 1
        signs = tirx.Var("signs", "uint8x32")
        doubled = [tirx.Var(f"d{p}", "uint8x32") for p in range(7)]
        nibbles = [tirx.Var(f"n{v}", "uint8x32") for v in range(4)]

        def shifted(vector: tirx.PrimExpr, by: int, lane_bits: int = 16) -> tirx.PrimExpr:
            lanes = 256 // lane_bits
            words = tirx.reinterpret(f"uint{lane_bits}x{lanes}", vector)
            return tirx.reinterpret("uint8x32", words << bcast(by, f"uint{lane_bits}", lanes))

        last = shifted(signs, 7) | bcast(1)
        combine = tirx.reinterpret("int8x32", bcast(SPLIT << 8 | 1, "int16", 16))

        def shuffle(vectors: list, picks: list[int]) -> tirx.PrimExpr:
            return tirx.Shuffle(vectors, [tirx.const(i, "int32") for i in picks])

        # the U and V sums pair after pair, each pair's index and sign bound once (Let) and used at once, in
        # this order in the generated code: the live vectors fit the 16 ymm registers
        sums = {kind: [tirx.Var(f"{kind}{p}", "int8x32") for p in range(8)] for kind in "uv"}
        indices = [tirx.Var(f"idx{p}", "uint8x32") for p in range(8)]

        def widen(half: int) -> tirx.PrimExpr:  # rows 8·half.. of both lanes, V + 31·U as int16 (vpunpck*bw)
            rows = [16 * lane + b for lane in (0, 1) for b in range(8 * half, 8 * half + 8)]
            interleaved = shuffle([sums["v"][7], sums["u"][7]], [i for row in rows for i in (row, 32 + row)])
            return intrin("int16x16", "pmadd.ub.sw", combine, interleaved)

        body = acc + shuffle([widen(0), widen(1)], list(range(32)))  # lanes 16h + 8L + j
        for pair in reversed(range(8)):
            sign = last if pair == 7 else doubled[pair]
            for kind, offset in (("v", 32), ("u", 0)):
                table = x.vload([64 * pair + offset], "int8x32")
                term = intrin("int8x32", "psign.b", intrin("int8x32", "pshuf.b", table, i8(indices[pair])), i8(sign))
                body = tirx.Let(sums[kind][pair], term if pair == 0 else sums[kind][pair - 1] + term, body)
            n = nibbles[pair // 2]
            body = tirx.Let(indices[pair], n & bcast(15) if pair % 2 == 0 else (n >> bcast(4)) & bcast(15), body)
        for p in reversed(range(1, 7)):
            body = tirx.Let(doubled[p], shifted(doubled[p - 1], 1, (16, 32, 64)[p % 3]), body)
        body = tirx.Let(doubled[0], signs | bcast(1), body)
        body = tirx.Let(signs, w.vload([128], "uint8x32"), body)
        for v in reversed(range(4)):
            body = tirx.Let(nibbles[v], w.vload([32 * v], "uint8x32"), body)
        return body

    @T.prim_func(s_tir=True)
    def impl(
        W: T.Buffer((PB,), "uint8", offset_factor=1),
        X: T.Buffer((TB,), "int8", offset_factor=1),
        C: T.Buffer((AL,), "int16", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:AL], W[0:PB], X[0:TB])
            T.writes(C[0:AL])
            for line in range(3):  # the record's lines (at most 3 of 64 bytes), PREFETCH bytes ahead, into L2
                T.evaluate(
                    T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(W[PREFETCH + 64 * line]), 0, 2, 1)
                )
            C[0:AL] = value(C.vload([0], "int16x32"), W, X)

    return _description("avx2"), impl


PREFETCH = 4096
"""Bytes ahead of its pair record that the AVX2 lookup prefetches the weight stream into L2 (the hand-written
AVX2 kernel's distance and cache level): its tables stay in L1."""
LUT_TERMS = {"avx512": lut_term, "avx2": lut_term_avx2}
"""The element-wise lookup of each ISA's pair record, as the workload and the intrinsic describe it."""


def workload(ls: LutShape, m: int = 1) -> tirx.PrimFunc:
    """The unscheduled LUT kernel for ``m`` rows of A (AVX-512): sblocks ``lut`` (the exact int32
    ``acc[m, step, block, tile, chunk, group, row]``, reduced over the pairs of a group, their codes j
    and the table entries: the :func:`lut_term` selection) and ``group`` (``Y += (α·s)·float(acc)``,
    fenced from FMA contraction, groups in order), as the plane kernel's (kernels.workload) without the
    +1 offset: the tables hold signed dots. Loops in the stream's order: superblock, chunk, block,
    tile, row of A, group of the chunk.

    Arguments, as the plane kernel's: the workspace rows as int8 ``X [M, row_bytes/512, 512]`` (the
    tables of pair p at ``X[m, p]``) and their float32 view from ``scale_offset`` ``S [M, row_bytes/4]``
    (group scales), the weight stream ``W`` (:func:`weights`; ``ls.superblocks`` None: its first and
    third extents symbolic) and ``Y [M, N]``."""
    if problem := ls.supported():
        raise ValueError(problem)
    PG, N, B, PB = ls.pairs_per_group, ls.n, ls.block_tiles, ls.pair_bytes
    C, CG, GB, SO = ls.chunks, ls.chunk_groups, ls.group_bytes, ls.block_tiles * ls.pairs_per_group * PB
    isa, term = LUT_ISAS[ls.isa], LUT_TERMS[ls.isa]
    CODES, ENTRIES_, AL, ACC = isa.codes, isa.entries, isa.acc_lanes, isa.acc_dtype
    if ls.superblocks is None:
        steps, step_blocks = tirx.Var("superblocks", "int32"), tirx.Var("step_blocks", "int32")
    else:
        steps, step_blocks = ls.superblocks, ls.step_blocks
    RB = ls.row_bytes
    f32v = f"float32x{TILE}"

    def alpha(w: tirx.Buffer, at: list, t: tirx.PrimExpr) -> tirx.PrimExpr:
        """The 16 scales of tile t of the group at ``at`` (its stream indices), widened from float16 (exact)."""
        return tirx.Cast(f32v, tirx.reinterpret(f"float16x{TILE}", w.vload([*at, SO + t * SCALE_BYTES], "uint8x32")))

    def row_dots(lanes: tirx.PrimExpr) -> tirx.PrimExpr:
        """The 16 rows' int32 dots of a tile's accumulator lanes (AVX2: each row's two lanes, in int32)."""
        if AL == TILE:
            return lanes
        half = [
            tirx.Shuffle([lanes], [tirx.const(h + 8 * lane + j, "int32") for h in (0, 16) for j in range(8)])
            for lane in (0, 1)
        ]
        return tirx.Cast(f"int32x{TILE}", half[0]) + tirx.Cast(f"int32x{TILE}", half[1])

    def y_lanes(s: tirx.PrimExpr, b: tirx.PrimExpr, t: tirx.PrimExpr) -> tirx.PrimExpr:
        return ((s * step_blocks + b) * B + t) * TILE

    @T.prim_func(s_tir=True)
    def kernel(
        X: T.Buffer((m, RB // TABLE_BYTES, TABLE_BYTES), "int8"),
        S: T.Buffer((m, RB // 4), "float32"),
        W: T.Buffer((steps, C, step_blocks, CG, GB), "uint8"),
        Y: T.Buffer((m, N), "float32"),
    ):
        T.func_attr(
            {
                "global_symbol": "main",
                "tirx.noalias": True,
                "estimated_flops": 2 * ls.k * N,
                ISA_KEY: ls.isa,
                FORMAT_KEY: LUT_FORMAT,
            }
        )
        # indexed by loop variables only: compute-at cannot solve a region through a sum of them
        acc = T.sblock_alloc_buffer((m, steps, step_blocks, B, C, CG, AL), ACC)
        for s, c, b, tb, mm, gi, q, r, j, e in T.grid(steps, C, step_blocks, B, m, CG, PG, AL, CODES, ENTRIES_):
            with T.sblock("lut"):
                vs, vc, vb, vtb, vm, vgi, vq, vr, vj, ve = T.axis.remap("SSSSSSRSRR", [s, c, b, tb, mm, gi, q, r, j, e])
                # whole records and tables (the inferred regions differ in form from the intrinsic's)
                T.reads(
                    acc[vm, vs, vb, vtb, vc, vgi, vr],
                    W[vs, vc, vb, vgi, (vq * B + vtb) * PB : (vq * B + vtb) * PB + PB],
                    X[vm, (vc * CG + vgi) * PG + vq, 0:TABLE_BYTES],
                )
                T.writes(acc[vm, vs, vb, vtb, vc, vgi, vr])
                with T.init():
                    acc[vm, vs, vb, vtb, vc, vgi, vr] = 0
                acc[vm, vs, vb, vtb, vc, vgi, vr] = acc[vm, vs, vb, vtb, vc, vgi, vr] + accumulated(
                    term(W, [vs, vc, vb, vgi], X, [vm, (vc * CG + vgi) * PG + vq], vr, vj, ve, (vq * B + vtb) * PB),
                    ACC,
                )
        for s, c, b, tb, mm, gi, h in T.grid(steps, C, step_blocks, B, m, CG, 1):
            with T.sblock("group"):
                vs, vc, vb, vtb, vm, vgi, vh = T.axis.remap("SRSSSRS", [s, c, b, tb, mm, gi, h])
                # the lanes indexed through vh (extent 1): compute-at solves every region for a block var
                T.reads(
                    W[vs, vc, vb, vgi, SO + vtb * SCALE_BYTES : SO + vtb * SCALE_BYTES + SCALE_BYTES],
                    S[vm, vc * CG + vgi],
                    acc[vm, vs, vb, vtb, vc, vgi, vh * AL : vh * AL + AL],
                )
                T.writes(Y[vm, y_lanes(vs, vb, vtb + vh) : y_lanes(vs, vb, vtb + vh) + TILE])
                with T.init():
                    Y[vm, y_lanes(vs, vb, vtb + vh) : y_lanes(vs, vb, vtb + vh) + TILE] = T.Broadcast(
                        T.float32(0), TILE
                    )
                Y[vm, y_lanes(vs, vb, vtb + vh) : y_lanes(vs, vb, vtb + vh) + TILE] = Y.vload(
                    [vm, y_lanes(vs, vb, vtb + vh)], f32v
                ) + T.call_llvm_pure_intrin(
                    f32v,
                    "llvm.arithmetic.fence",
                    (alpha(W, [vs, vc, vb, vgi], vtb) * T.Broadcast(S[vm, vc * CG + vgi], TILE))
                    * T.Cast(f32v, row_dots(acc.vload([vm, vs, vb, vtb, vc, vgi, vh * AL], f"{ACC}x{AL}"))),
                )

    return kernel


def tile_choices(ls: LutShape) -> list[int]:
    """Tiles per run of the lookup loop: the block's. A run of fewer tiles reads the block's pair records
    (tile after tile per pair) in strided pieces, once per run: as fast hot, but slower on a cold stream
    (2048→2048, 4 of 8 tiles: 45.6 against 35.6 µs in kernel_check, Zen 4)."""
    return [ls.block_tiles]


def unroll_choices(ls: LutShape) -> list[int]:
    return [u for u in range(1, MAX_UNROLL + 1) if ls.pairs_per_group % u == 0]


def knob_space(ls: LutShape) -> list[Knobs]:
    """Every point of the design space (3 x 2 = 6 at the LLaMA-3.2-1B shapes, group 128)."""
    return [Knobs(t, u, o) for t in tile_choices(ls) for u in unroll_choices(ls) for o in ORDERS]


def schedule(sch: Schedule, order: str, knobs: Knobs | None = None) -> None:
    """Schedule the LUT workload in loop order ``order`` (:data:`ORDERS`); ``knobs`` None samples the
    pair unroll (a MetaSchedule design space), else takes ``knobs``' values (``tiles``: the block's,
    :func:`tile_choices`).

    Per superblock (the parallel step), K-chunk, block, row of A and group: the pairs in runs of
    ``unroll``; in ``pair`` order each pair over the block's tiles (the pair's 8 table
    vectors loaded once, kept in registers across the tiles), in ``tile`` order each tile over its
    ``unroll`` pairs. The lookup is tensorized with :func:`lut_name`; the tiles, pairs and the group's
    epilogue are unrolled, so the accumulators live in registers."""
    lut, group = sch.get_sblock("lut"), sch.get_sblock("group")
    s, c, b, t, mm, g, q, *_ = sch.get_loops(lut)
    if knobs and knobs.tiles != int(sch.get(t).extent):
        raise ValueError(f"the LUT kernel runs whole blocks of {sch.get(t).extent} tiles, not {knobs.tiles}")
    pairs = int(sch.get(q).extent)
    pair_split = knobs and [pairs // knobs.unroll, knobs.unroll]
    qo, qi = sch.split(q, sch.sample_perfect_tile(q, n=2, max_innermost_factor=MAX_UNROLL, decision=pair_split))
    inner = (qi, t) if order == "pair" else (t, qi)
    sch.reorder(s, c, b, mm, g, qo, *inner)
    sch.annotate(lut, ORDER_KEY, order)
    sch.reverse_compute_at(group, g, preserve_unit_loops=True)
    sch.parallel(s)
    # AVX2 keeps the tile loop rolled: unrolled, LLVM loads the pair's 16 table vectors once for all the
    # tiles and spills them (16 ymm registers), 8-10% slower (2048→2048, 8192→2048, 2048→8192; Zen 5)
    isa = str(sch.mod["main"].attrs[ISA_KEY])
    for loop in (qi, *([t] if isa == "avx512" else []), *_loops_after(sch, group, g)):
        sch.unroll(loop)
    init = sch.decompose_reduction(lut, qo)
    *init_outer, init_lanes = _loops_after(sch, init, g)
    for loop in init_outer:
        sch.unroll(loop)
    sch.vectorize(init_lanes)
    sch.decompose_reduction(group, c)  # Y = 0 over the superblock's rows, before its first chunk
    sch.tensorize(sch.get_loops(lut)[-3], lut_name(isa))


def design_space(sch: Schedule) -> list[Schedule]:
    """MetaSchedule's space generator: one design space (trace) per loop order."""
    spaces = []
    for order in ORDERS:
        space = sch.copy()
        schedule(space, order)
        spaces.append(space)
    return spaces


def knobs_of(trace: tvm.s_tir.schedule.Trace, ls: LutShape) -> Knobs:
    """The knob point of a tuned LUT trace: its pair unroll and loop order, and the block's tiles (not a
    decision of the trace)."""
    return kernels_knobs_of(trace, tiles=ls.block_tiles)


def prim_func(ls: LutShape, knobs: Knobs, m: int = 1, name: str = "main") -> tirx.PrimFunc:
    if knobs not in knob_space(ls):
        raise ValueError(f"knobs {knobs} are not a point of {ls.key}'s design space")
    sch = Schedule(workload(ls, m))
    schedule(sch, knobs.order, knobs)
    return sch.mod["main"].with_attr("global_symbol", name)


def scheduled_module(ls: LutShape, knobs: Knobs, m: int = 1, name: str = "main") -> tvm.IRModule:
    return tvm.IRModule({name: prim_func(ls, knobs, m, name)})


def register() -> None:
    for isa, intrinsic in (("avx512", _lut_avx512), ("avx2", _lut_avx2)):
        if TensorIntrin.get(lut_name(isa), allow_missing=True) is None:
            TensorIntrin.register(lut_name(isa), *intrinsic())


register()
