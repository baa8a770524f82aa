"""Shared argument checks, so every entry point words the same problem the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def check_weight_matrix(weight: torch.Tensor, what: str = "weight", finite: bool = True) -> None:
    """Reject anything that is not a finite, floating-point, 2-D ``[N, K]`` tensor.

    ``finite=False`` skips the NaN/Inf scan: it waits for the values, which breaks ``torch.compile``
    graphs in the QAT forward pass (where a NaN shows in the loss anyway).
    """
    import torch

    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D [N, K] (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{what} must be non-empty, got shape {tuple(weight.shape)}")
    if finite and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{what} contains {bad} NaN/Inf value(s); fix the checkpoint before quantizing")


def check_group_size(group_size: int | None, k: int, multiple_of: int = 1) -> int:
    """Resolve ``group_size`` (``None`` means one group per row) and check it against ``K``."""
    if group_size is None:
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size must be an int or None, got {group_size!r}")
    group_size = int(group_size)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if group_size % multiple_of:
        raise ValueError(f"group_size must be a multiple of {multiple_of}, got {group_size}")
    if group_size > k:
        raise ValueError(f"group_size {group_size} exceeds K={k}; pass group_size=K (or None) for one scale per row")
    return group_size


def num_groups(k: int, group_size: int) -> int:
    """Scale groups per row: the last one is short when ``group_size`` does not divide ``K``."""
    return -(-k // group_size)
