"""The ternary weights every stage passes on: what a projection returns and a packer takes.

A leaf module with no heavy imports, so the format registry and the command line can name these
without loading PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

SHERRY_BLOCK = 4
"""Weights per Sherry block: 4 consecutive weights of one row along K, exactly one of them zero."""

QAT_METHODS = ("sherry", "ternary")
"""Quantization-aware training rules (``sherry_export.qat.CONFIGS``): Sherry's 3:4 and dense ternary."""

PROJECTION_NAMES = ("sherry", "absmean")
"""The post-training projections of float weights (``sherry_export.quant``): Sherry's 3:4 rule and
BitNet's dense absmean rule."""
CONFIG_KEY = "sherry_qat"
"""Attribute of ``model.config`` (so also a key of a saved ``config.json``) recording the QAT recipe
(``sherry_export.qat.quantize_`` writes it; kept in this leaf because the packed-model writer reads it too)."""
PTQ_KEY = "sherry_ptq"
"""Attribute of ``model.config`` recording a post-training projection (``sherry_export.qat.PTQConfig``)."""


class Ternary(NamedTuple):
    """Ternary values (int8, {-1, 0, +1}, ``[N, K]``) and their float32 scales (``[N, G]``); the int8 head format
    takes the same pair with values in [-127, 127] (``formats.quantize_int8``)."""

    values: torch.Tensor
    scales: torch.Tensor
