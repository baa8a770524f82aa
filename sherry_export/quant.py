"""Weight projections to ternary values: Sherry's 3:4-sparse rule and BitNet's dense absmean rule.

Both return int8 values in {-1, 0, +1} of shape ``[N, K]`` and float32 scales ``[N, G]`` with
``G = ceil(K / group_size)``: scale group ``g`` of a row covers columns ``[g*gs, min((g+1)*gs, K))``,
so when ``group_size`` does not divide ``K`` the last group of every row is short. The packers and
every kernel follow the same rule (``docs/formats.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sherry_export.errors import check_group_size, check_weight_matrix, num_groups
from sherry_export.ternary import SHERRY_BLOCK, Ternary

__all__ = [
    "SHERRY_BLOCK",
    "Ternary",
    "absmean_ternarize",
    "dequantize_ternary",
    "quantizable_linears",
    "sherry_ternarize",
]


def group_reduce(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum ``x [N, K]`` over each row's scale groups, giving ``[N, G]`` (a short last group is zero-padded)."""
    n, k = x.shape
    groups = num_groups(k, group_size)
    padded = F.pad(x, (0, groups * group_size - k)) if groups * group_size != k else x
    return padded.reshape(n, groups, group_size).sum(dim=-1)


def group_lengths(k: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Number of weights in each scale group of a row (all ``group_size`` but a possibly short last one)."""
    groups = num_groups(k, group_size)
    lengths = torch.full((groups,), group_size, dtype=torch.float32, device=device)
    lengths[-1] = k - (groups - 1) * group_size
    return lengths


def expand_groups(scales: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Broadcast per-group scales ``[N, G]`` to per-weight ``[N, K]``."""
    return scales.repeat_interleave(group_size, dim=1)[:, :k]


def sherry_ternarize(weight: torch.Tensor, group_size: int | None = 128, check_finite: bool = True) -> Ternary:
    """Sherry's 3:4 projection (AngelSlim ``NMQuant`` with N=3, M=4).

    In each block of 4 consecutive weights of a row, the smallest |w| becomes 0 (ties: the lowest
    index); the other three become sign(w)·α with α the mean |w| of the kept weights of the group.
    A kept weight that is exactly 0.0 gets sign +1 (AngelSlim's fake-quant would output 0 there,
    which the 5-bit code cannot hold as a second zero). ``group_size=None`` means per channel.
    ``check_finite=False`` skips the NaN/Inf scan (for the QAT forward pass under ``torch.compile``).
    """
    check_weight_matrix(weight, finite=check_finite)
    n, k = weight.shape
    if k % SHERRY_BLOCK:
        raise ValueError(
            f"Sherry needs K (in_features) divisible by {SHERRY_BLOCK}, got K={k}; "
            "pad the layer's input dimension or leave this layer unquantized"
        )
    group_size = check_group_size(group_size, k, multiple_of=SHERRY_BLOCK)
    w = weight.detach().to(torch.float32)
    blocks_abs = w.abs().view(n, k // SHERRY_BLOCK, SHERRY_BLOCK)
    block_min, zero_pos = blocks_abs.min(dim=-1, keepdim=True)  # torch takes the first minimum on ties
    keep = (torch.arange(SHERRY_BLOCK, dtype=torch.uint8, device=w.device) != zero_pos.to(torch.uint8)).view(n, k)
    values = (1 - 2 * (w < 0).to(torch.int8)) * keep  # a kept 0.0 (or -0.0) gets +1
    kept_abs = group_reduce(blocks_abs.view(n, k), group_size) - group_reduce(
        block_min.view(n, -1), group_size // SHERRY_BLOCK
    )
    scales = kept_abs / (group_lengths(k, group_size, w.device) * 0.75)
    return Ternary(values, scales)


def absmean_ternarize(weight: torch.Tensor, group_size: int | None = None, check_finite: bool = True) -> Ternary:
    """BitNet b1.58's dense ternary rule: α = mean|W| (per tensor, or per group), t = clip(round(W/α), -1, 1).

    Per tensor (``group_size=None``) returns scales ``[N, 1]`` holding the one α on every row, so
    the packers treat it as per-channel with equal scales. Where α is 0, t is 0. ``check_finite`` as in
    :func:`sherry_ternarize`.
    """
    check_weight_matrix(weight, finite=check_finite)
    n, k = weight.shape
    w = weight.detach().to(torch.float32)
    if group_size is None:
        scales = w.abs().mean().expand(n, 1).clone()
        group_size = k
    else:
        group_size = check_group_size(group_size, k)
        scales = group_reduce(w.abs(), group_size) / group_lengths(k, group_size, w.device)
    alpha = expand_groups(scales, k, group_size)
    ratio = torch.where(alpha > 0, w / torch.where(alpha > 0, alpha, torch.ones_like(alpha)), torch.zeros_like(w))
    values = ratio.round().clamp(-1, 1).to(torch.int8)
    return Ternary(values, scales)


def dequantize_ternary(ternary: Ternary, group_size: int | None) -> torch.Tensor:
    """Ternary values times their group scales, as float32 ``[N, K]``."""
    values, scales = ternary
    k = values.shape[1]
    return values.to(torch.float32) * expand_groups(scales, k, group_size or k)


def quantizable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The attention and MLP projections that ternary QAT replaces (not embeddings, norms or the LM head)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names
    }
