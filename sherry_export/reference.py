"""PyTorch twins of the kernels' numerics, to check exported models exactly.

``formats.reference_matmul(..., activations="int8")`` is the numpy reference of one op; this module
puts the same arithmetic in ``nn.Module`` form, so a whole transformers model can run with it and
its logits can be compared with the exported ONNX model's, position by position.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sherry_export.errors import num_groups
from sherry_export.formats import ACTIVATION_QMAX
from sherry_export.quant import Ternary, quantizable_linears


class KernelReferenceLinear(nn.Module):
    """y = x·Wᵀ with W ternary, computed as the kernels do (docs/formats.md, "Activations").

    Activations are quantized to int8 per row and scale group, the integer dot products are exact
    (float64 holds them exactly), and the group terms are summed in float32; α is read back from
    float16 as the packed formats store it.
    """

    def __init__(self, ternary: Ternary, group_size: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        values, scales = ternary
        self.k = values.shape[1]
        self.group_size = group_size
        groups = num_groups(self.k, group_size)
        padded = F.pad(values.to(torch.float64), (0, groups * group_size - self.k))
        self.register_buffer("values", padded.view(values.shape[0], groups, group_size))
        self.register_buffer("alpha", scales.to(torch.float16).to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.k).to(torch.float32)
        groups = self.values.shape[1]
        grouped = F.pad(rows, (0, groups * self.group_size - self.k)).view(rows.shape[0], groups, self.group_size)
        amax = grouped.abs().amax(-1)
        inv = torch.where(amax > 0, ACTIVATION_QMAX / torch.where(amax > 0, amax, 1.0), 0.0)
        xq = torch.round(grouped * inv[..., None]).clamp(-ACTIVATION_QMAX, ACTIVATION_QMAX)
        dot = torch.einsum("mgk,ngk->mng", xq.to(torch.float64), self.values).to(torch.float32)
        coefficient = self.alpha[None] * (amax / ACTIVATION_QMAX)[:, None, :]
        y = (coefficient * dot).sum(-1)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1).to(x.dtype)


def kernel_reference_model(model: nn.Module, ternaries: dict[str, tuple[Ternary, int]]) -> nn.Module:
    """A copy of ``model`` whose projections named in ``ternaries`` compute with the kernels' numerics."""
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for name, linear in quantizable_linears(reference).items():
        if name not in ternaries:
            continue
        ternary, group_size = ternaries[name]
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, KernelReferenceLinear(ternary, group_size, linear.bias))
    return reference.eval()
