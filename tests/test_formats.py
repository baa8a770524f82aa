"""The format registry: round trips, layout, size accounting, reference matmuls, bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sherry_export.formats import (
    FORMATS,
    MAX_GROUP_SIZE,
    PackedWeight,
    dequantize,
    get_format,
    pack,
    quantize_activations,
    reference_matmul,
    tl2_columns,
    tl2_triples,
    unpack,
)
from sherry_export.quant import Ternary, absmean_ternarize, dequantize_ternary, sherry_ternarize

GROUP_SIZES = [4, 8, 12, 32, 128]


@st.composite
def sherry_ternary(draw):
    """Random 3:4 ternary values with random scales, at random shapes (K tails and short groups included)."""
    n = draw(st.integers(1, 9))
    k = 4 * draw(st.integers(1, 70))
    gs = min(draw(st.sampled_from(GROUP_SIZES)), k)
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    return sherry_ternarize(torch.randn(n, k, generator=g), gs), gs


@st.composite
def dense_ternary(draw):
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, 300))
    gs = min(draw(st.sampled_from([1, 3, 5, *GROUP_SIZES])), k)
    seed = draw(st.integers(0, 2**31))
    values = torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    scales = torch.rand(n, math.ceil(k / gs), generator=torch.Generator().manual_seed(seed + 1))
    return Ternary(values, scales), gs


@pytest.mark.parametrize("fmt", list(FORMATS))
@given(case=sherry_ternary())
def test_round_trip_sherry_values(fmt, case):
    ternary, gs = case
    packed = pack(fmt, ternary, gs)
    values, scales = unpack(packed)
    np.testing.assert_array_equal(values.numpy(), ternary.values.numpy())
    np.testing.assert_array_equal(scales.numpy(), ternary.scales.numpy().astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("fmt", ["tl2", "i2s"])
@given(case=dense_ternary())
def test_round_trip_dense_values(fmt, case):
    ternary, gs = case
    packed = pack(fmt, ternary, gs)
    np.testing.assert_array_equal(unpack(packed).values.numpy(), ternary.values.numpy())


@pytest.mark.parametrize("fmt", list(FORMATS))
@given(case=sherry_ternary())
def test_size_accounting(fmt, case):
    ternary, gs = case
    n, k = ternary.values.shape
    packed = pack(fmt, ternary, gs)
    groups = math.ceil(k / gs)
    codes = {"sherry": k // 4, "tl2": sum(math.ceil(min(gs, k - s) / 3) for s in range(0, k, gs))}
    expected = math.ceil(k / 4) if fmt == "i2s" else math.ceil(codes[fmt] / 2) + math.ceil(codes[fmt] / 8)
    assert packed.data.shape == (n, expected)
    assert packed.scales.shape == (n, groups) and packed.scales.dtype == np.float16
    assert packed.nbytes == n * expected + 2 * n * groups
    assert packed.bits_per_weight == pytest.approx((8 * expected + 16 * groups) / k)


def test_nominal_bits_for_llama_rows():
    ternary = sherry_ternarize(torch.randn(4, 2048), 128)
    bits = {f: pack(f, ternary, 128) for f in FORMATS}
    assert bits["sherry"].code_bits_per_weight == 1.25
    assert bits["sherry"].bits_per_weight == 1.375
    assert bits["i2s"].code_bits_per_weight == 2.0
    assert bits["tl2"].data.shape[1] == 430  # 16 groups x 43 triples -> 344 nibble + 86 sign bytes
    for f in FORMATS:
        assert bits[f].code_bits_per_weight == pytest.approx(get_format(f).nominal_bits, abs=0.015)


def test_worked_example_from_docs():
    w = torch.tensor([[0.3, -0.9, 0.05, 0.6, -0.2, -0.7, 0.8, 0.1]])
    ternary = sherry_ternarize(w, 8)
    assert ternary.values.tolist() == [[1, -1, 0, 1, -1, -1, 1, 0]]
    expected = {"sherry": [0xDA, 0x02], "tl2": [0x56, 0x09, 0x00], "i2s": [0x92, 0x60]}
    for fmt, data in expected.items():
        packed = pack(fmt, ternary, 8)
        assert packed.data[0].tolist() == data, fmt
        assert packed.scales.view(np.uint16).tolist() == [[0x38AB]]


def test_sherry_paper_figure_code():
    """The paper's figure: (-1, +1, 0, -1) is index 1010 with sign bit 1."""
    packed = pack("sherry", Ternary(torch.tensor([[-1, 1, 0, -1]], dtype=torch.int8), torch.ones(1, 1)), 4)
    assert packed.data[0].tolist() == [0b1010, 0b1]


@pytest.mark.parametrize("fmt", list(FORMATS))
@given(case=sherry_ternary(), m=st.integers(1, 5))
def test_reference_matmul_float_matches_torch(fmt, case, m):
    ternary, gs = case
    packed = pack(fmt, ternary, gs)
    x = torch.randn(m, ternary.values.shape[1])
    stored = Ternary(ternary.values, ternary.scales.half().float())
    expected = (x @ dequantize_ternary(stored, gs).T).numpy()
    np.testing.assert_allclose(reference_matmul(x.numpy(), packed), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dequantize(packed), dequantize_ternary(stored, gs).numpy(), rtol=0, atol=0)


def plain_int8_matmul(x: np.ndarray, t: np.ndarray, alpha: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented activation numerics, written out one row and one group at a time.

    Returns the outputs and the sum of the absolute values of the per-group terms that make them up:
    float32 accumulation error scales with that sum, not with the (possibly cancelled) result.
    """
    m, k = x.shape
    y = np.zeros((m, t.shape[0]))
    magnitude = np.zeros((m, t.shape[0]))
    for r in range(m):
        for g, start in enumerate(range(0, k, gs)):
            xs = x[r, start : start + gs].astype(np.float32)
            amax = np.float32(np.abs(xs).max())
            if amax == 0:
                continue
            xq = np.clip(np.rint(xs * (np.float32(127) / amax)), -127, 127).astype(np.int64)
            dot = t[:, start : start + gs].astype(np.int64) @ xq
            term = alpha[:, g].astype(np.float64) * float(amax / np.float32(127)) * dot
            y[r] += term
            magnitude[r] += np.abs(term)
    return y, magnitude


@pytest.mark.parametrize("fmt", list(FORMATS))
@given(case=sherry_ternary(), m=st.integers(1, 4))
def test_reference_matmul_int8_numerics(fmt, case, m):
    ternary, gs = case
    packed = pack(fmt, ternary, gs)
    x = np.random.default_rng(m).standard_normal((m, ternary.values.shape[1])).astype(np.float32)
    x[0, :gs] = 0  # a group of zeros quantizes to s = 0
    expected, magnitude = plain_int8_matmul(x, ternary.values.numpy(), packed.scales.astype(np.float32), gs)
    got = reference_matmul(x, packed, activations="int8")
    # float32 sums of the group terms: each rounding moves the result by at most one ulp of a partial
    # sum, and every partial sum is bounded by the summed magnitudes.
    groups = -(-x.shape[1] // gs)
    tolerance = (groups + 4) * np.finfo(np.float32).eps * magnitude
    assert (np.abs(got - expected) <= tolerance + 1e-30).all()
    # Rounding moves each activation by at most s/2, so |error| <= sum_g alpha_g * s_g/2 * nnz(t in g).
    exact = reference_matmul(x, packed, activations="float")
    _, s = quantize_activations(x, gs)
    nnz = np.stack(
        [np.count_nonzero(ternary.values.numpy()[:, g : g + gs], axis=1) for g in range(0, x.shape[1], gs)], 1
    )
    bound = (s / 2) @ (packed.scales.astype(np.float32) * nnz).T
    assert (np.abs(got - exact) <= bound * 1.001 + 1e-6).all()


def test_quantize_activations_ties_and_range():
    x = np.array([[127.0, 0.5, 1.5, -2.5, -127.0, 0.0, 3.49, -0.5]], np.float32)
    xq, s = quantize_activations(x, 8)
    assert xq.tolist() == [[127, 0, 2, -2, -127, 0, 3, 0]]  # ties to even
    assert s.tolist() == [[1.0]]


def test_reference_matmul_keeps_leading_dims_and_bias():
    packed = pack("sherry", sherry_ternarize(torch.randn(6, 16), 8), 8)
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    bias = np.arange(6, dtype=np.float32)
    for mode in ("float", "int8"):
        y = reference_matmul(x, packed, bias=bias, activations=mode)
        assert y.shape == (2, 3, 6)
        np.testing.assert_allclose(
            y - reference_matmul(x, packed, activations=mode), np.broadcast_to(bias, y.shape), atol=1e-5
        )


def test_sherry_pack_rejects_dense_ternary():
    dense = absmean_ternarize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="exactly one zero"):
        pack("sherry", Ternary(torch.ones(4, 64, dtype=torch.int8), dense.scales), None)


@pytest.mark.parametrize(
    ("fmt", "values", "scales", "gs", "message"),
    [
        ("nope", torch.zeros(1, 4, dtype=torch.int8), torch.ones(1, 1), 4, "unknown weight format"),
        ("i2s", torch.zeros(1, 4, dtype=torch.int32), torch.ones(1, 1), 4, "int8"),
        ("i2s", torch.full((1, 4), 2, dtype=torch.int8), torch.ones(1, 1), 4, "-1, 0, \\+1"),
        ("i2s", torch.zeros(1, 4, dtype=torch.int8), torch.ones(1, 2), 4, "scales must have shape"),
        ("i2s", torch.zeros(1, 4, dtype=torch.int8), torch.tensor([[float("nan")]]), 4, "finite"),
        ("i2s", torch.zeros(1, 4, dtype=torch.int8), torch.tensor([[1e6]]), 4, "float16"),
        ("sherry", torch.zeros(1, 6, dtype=torch.int8), torch.ones(1, 1), None, "divisible by 4"),
        ("sherry", torch.zeros(1, 8, dtype=torch.int8), torch.ones(1, 2), 6, "multiple of 4"),
        ("tl2", torch.zeros(1, 8, dtype=torch.int8), torch.ones(1, 1), 9, "exceeds K"),
    ],
)
def test_pack_bad_input(fmt, values, scales, gs, message):
    with pytest.raises(ValueError, match=message):
        pack(fmt, Ternary(values, scales), gs)


def test_corrupt_data_is_rejected():
    ternary = sherry_ternarize(torch.randn(2, 12), 12)
    tl2 = pack("tl2", ternary, 12)
    tl2.data[0, 0] = 0x0F  # index 15 does not exist
    with pytest.raises(ValueError, match="corrupt tl2"):
        unpack(tl2)
    i2s = pack("i2s", ternary, 12)
    i2s.data[1, 0] = 0xFF  # code 3 does not exist
    with pytest.raises(ValueError, match="corrupt i2s"):
        unpack(i2s)
    good = pack("sherry", ternary, 12)
    with pytest.raises(ValueError, match="must have shape"):
        PackedWeight("sherry", good.data[:, :-1], good.scales, 12, 12)
    with pytest.raises(ValueError, match="float16"):
        PackedWeight("sherry", good.data, good.scales.astype(np.float32), 12, 12)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_group_size_bound(fmt):
    """The longest scale group keeps 127 x its length inside int32; one column more (four for Sherry) is refused."""
    assert 127 * MAX_GROUP_SIZE <= 2**31 - 1 < 127 * (MAX_GROUP_SIZE + 1)
    assert get_format(fmt).check_geometry(MAX_GROUP_SIZE, MAX_GROUP_SIZE) == MAX_GROUP_SIZE
    step = 4 if fmt == "sherry" else 1
    too_long = MAX_GROUP_SIZE + step
    with pytest.raises(ValueError, match=f"group_size must be at most {MAX_GROUP_SIZE} .* got {too_long}"):
        get_format(fmt).check_geometry(too_long, too_long)
    # Many groups are fine, however long the row.
    assert get_format(fmt).check_geometry(4 * MAX_GROUP_SIZE, 128) == 128


def test_tl2_triples_is_closed_form():
    """tl2_triples is O(1) (a hostile K of 10^18 returns at once) and counts what tl2_columns lays out."""
    for k in range(1, 40):
        for gs in range(1, k + 1):
            assert tl2_triples(k, gs) == len(tl2_columns(k, gs)) // 3
    assert tl2_triples(10**18, 1) == 10**18
    assert tl2_triples(10**18, 10**18 - 1) == (10**18 - 1 + 2) // 3 + 1


def test_tl2_nonzero_padding_lane_is_rejected():
    """K = 5, group 5: triples (0, 1, 2), (3, 4, pad); code 1 (lanes 0, 0, +1) puts +1 in the padding lane."""
    packed = pack("tl2", Ternary(torch.zeros(2, 5, dtype=torch.int8), torch.ones(2, 1)), 5)
    packed.data[1, 0] |= 0x10  # row 1, triple 1: index 1
    with pytest.raises(ValueError, match="row 1, triple 1 has a non-zero padding lane"):
        unpack(packed)


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_holds_what_its_projection_gives(name: str) -> None:
    """A format's ``projection`` (which the fuzzer and the TVM tuner use to make its weights) gives values
    it packs and gives back exactly, from any float weight."""
    from sherry_export.qat import PROJECTIONS

    ternary = PROJECTIONS[FORMATS[name].projection](torch.randn(16, 96, generator=torch.Generator().manual_seed(0)), 32)
    values, scales = unpack(pack(name, ternary, 32))
    assert torch.equal(values, ternary.values) and torch.equal(scales, ternary.scales.half().float())
