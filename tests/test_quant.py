"""sherry_export.quant against plainly written reimplementations of the rules in docs/formats.md."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sherry_export.quant import absmean_ternarize, dequantize_ternary, sherry_ternarize


def plain_sherry(w: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Sherry's rule, one block and one group at a time."""
    n, k = w.shape
    t = np.zeros((n, k), np.int8)
    for r in range(n):
        for b in range(0, k, 4):
            block = [abs(float(v)) for v in w[r, b : b + 4]]
            zero = block.index(min(block))  # the first minimum
            for p in range(4):
                if p != zero:
                    t[r, b + p] = -1 if w[r, b + p] < 0 else 1
    groups = math.ceil(k / gs)
    scales = np.zeros((n, groups), np.float64)
    for r in range(n):
        for g in range(groups):
            cols = range(g * gs, min((g + 1) * gs, k))
            kept = [abs(float(w[r, c])) for c in cols if t[r, c] != 0]
            scales[r, g] = sum(kept) / len(kept)
    return t, scales


def plain_absmean(w: np.ndarray, gs: int | None) -> tuple[np.ndarray, np.ndarray]:
    n, k = w.shape
    per_tensor = gs is None
    gs = gs or k
    groups = math.ceil(k / gs)
    if per_tensor:
        scales = np.full((n, 1), np.abs(w).mean())
    else:
        scales = np.array([[np.abs(w[r, g * gs : (g + 1) * gs]).mean() for g in range(groups)] for r in range(n)])
    t = np.zeros((n, k), np.int8)
    for r in range(n):
        for c in range(k):
            a = scales[r, c // gs]
            t[r, c] = 0 if a == 0 else int(np.clip(np.round(w[r, c] / a), -1, 1))
    return t, scales


weights = st.tuples(st.integers(1, 6), st.integers(1, 12), st.sampled_from([4, 8, 12, 32]), st.integers(0, 2**31))


def random_weight(n: int, k: int, seed: int, integer_valued: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (n, k), generator=g).float() if integer_valued else torch.randn(n, k, generator=g)
    return w


@given(weights, st.booleans())
def test_sherry_matches_plain_rule(shape, integer_valued):
    n, blocks, gs, seed = shape
    k = 4 * blocks
    gs = min(gs, k)
    w = random_weight(n, k, seed, integer_valued)  # integer values force ties and exact zeros
    t, scales = sherry_ternarize(w, gs)
    t_ref, scales_ref = plain_sherry(w.numpy(), gs)
    np.testing.assert_array_equal(t.numpy(), t_ref)
    np.testing.assert_allclose(scales.numpy(), scales_ref, rtol=1e-6, atol=1e-7)
    assert t.dtype == torch.int8 and scales.dtype == torch.float32


@given(weights)
def test_sherry_one_zero_per_block(shape):
    n, blocks, gs, seed = shape
    w = random_weight(n, 4 * blocks, seed, integer_valued=True)
    t, _ = sherry_ternarize(w, min(gs, 4 * blocks))
    zeros = (t.view(n, blocks, 4) == 0).sum(-1)
    assert bool((zeros == 1).all())


def test_sherry_per_channel_and_short_last_group():
    w = torch.randn(3, 576)
    t_pc, s_pc = sherry_ternarize(w, None)
    assert s_pc.shape == (3, 1)
    np.testing.assert_array_equal(sherry_ternarize(w, 576).values.numpy(), t_pc.numpy())
    _t, s = sherry_ternarize(w, 128)  # 576 = 4 * 128 + 64: the last group is short
    assert s.shape == (3, 5)
    _t_ref, s_ref = plain_sherry(w.numpy(), 128)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-6)


def test_sherry_dequantized_is_three_quarters_dense_with_mean_kept_scale():
    w = torch.randn(8, 256)
    t, s = sherry_ternarize(w, 128)
    deq = dequantize_ternary((t, s), 128)
    kept = t != 0
    assert kept.float().mean().item() == 0.75
    assert torch.allclose(deq[kept].abs().view(8, 2, -1).mean(-1), s, rtol=1e-6)


def test_sherry_matches_fake_quant_formula():
    """AngelSlim's NMQuant as fake-quant: zero the block minimum, sign(w)·α with α = Σ|kept| / (gs·3/4)."""
    w = torch.randn(16, 512)
    gs = 128
    blocks = w.view(16, -1, 4)
    mask = torch.ones_like(blocks).scatter_(-1, blocks.abs().argmin(-1, keepdim=True), 0).view(16, 512)
    alpha = (w.abs() * mask).view(16, -1, gs).sum(-1) / (gs * 3 / 4)
    fake = torch.sign(w) * mask * alpha.repeat_interleave(gs, 1)
    assert torch.allclose(dequantize_ternary(sherry_ternarize(w, gs), gs), fake, atol=1e-6)


@given(st.integers(1, 5), st.integers(1, 40), st.sampled_from([None, 1, 3, 16, 64]), st.integers(0, 2**31))
def test_absmean_matches_plain_rule(n, k, gs, seed):
    if gs is not None and gs > k:
        gs = k
    w = random_weight(n, k, seed, integer_valued=False)
    t, s = absmean_ternarize(w, gs)
    t_ref, s_ref = plain_absmean(w.numpy(), gs)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-5)
    # round() at exactly ±0.5 can flip with float32 vs float64 division; compare away from ties
    ratio = np.abs(w.numpy()) / np.repeat(s_ref, gs or k, axis=1)[:, :k]
    clear = np.abs(ratio - 0.5) > 1e-4
    np.testing.assert_array_equal(t.numpy()[clear], t_ref[clear])


def test_absmean_zero_weight():
    t, s = absmean_ternarize(torch.zeros(2, 8))
    assert not t.any() and not s.any()


@pytest.mark.parametrize(
    ("weight", "kwargs", "message"),
    [
        (torch.ones(4, 8, dtype=torch.int32), {}, "floating-point"),
        (torch.ones(8), {}, "2-D"),
        (torch.ones(2, 4, 8), {}, "2-D"),
        (torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), {}, "NaN/Inf"),
        (torch.tensor([[1.0, float("inf"), 0.0, 1.0]]), {}, "NaN/Inf"),
        (torch.ones(4, 10), {}, "divisible by 4"),
        (torch.ones(4, 16), {"group_size": 6}, "multiple of 4"),
        (torch.ones(4, 16), {"group_size": 0}, "positive"),
        (torch.ones(4, 16), {"group_size": 32}, "exceeds K"),
        (torch.ones(0, 16), {}, "non-empty"),
        ([[1.0, 2.0, 3.0, 4.0]], {}, "torch.Tensor"),
    ],
)
def test_sherry_bad_input(weight, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sherry_ternarize(weight, **({"group_size": 4} | kwargs))


def test_absmean_bad_input():
    with pytest.raises(ValueError, match="NaN/Inf"):
        absmean_ternarize(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="group_size"):
        absmean_ternarize(torch.ones(2, 8), group_size=2.5)
