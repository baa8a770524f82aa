"""Generic export: any ``torch.nn.Module`` whose linears are ternary-quantized, via the dynamo exporter.

Each quantized linear (a module with ``ternary()`` and ``group_size``, such as ``SherryLinear``) is
swapped for a :class:`PackedLinear` holding the packed weight as uint8 and float16 buffers. In eager
mode its forward calls a ``torch.library`` custom op with the kernels' numerics; under export it emits
the format's ``ai.sherry`` node (``torch.onnx.ops.symbolic``, the op type read from the format
registry), so the buffers become the node's initializers and no format is named here. Dynamic batch
and sequence dimensions are kept.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import onnx
import torch

from sherry_export.formats import FORMATS, REFERENCE_FORMAT, PackedWeight, pack, reference_matmul
from sherry_export.onnx_ops import SHERRY_DOMAIN, SHERRY_OPSET_VERSION


def _eager(fmt: str):
    def matmul(
        x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, k: int, n: int, group_size: int
    ) -> torch.Tensor:
        packed = PackedWeight(fmt, data.numpy(), scales.numpy(), k, group_size)
        y = reference_matmul(x.detach().numpy(), packed, bias.numpy(), activations="int8")
        return torch.from_numpy(y)

    return matmul


def _fake(
    x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, k: int, n: int, group_size: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


PACKED_OPS = {}
for _fmt, _spec in FORMATS.items():
    _op = torch.library.custom_op(f"sherry::{_fmt}_matmul", mutates_args=())(_eager(_fmt))
    _op.register_fake(_fake)
    PACKED_OPS[_fmt] = _op


class PackedLinear(torch.nn.Module):
    """A linear layer on a packed ternary weight; it runs the kernels' numerics and exports as one node."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.format, self.k, self.n, self.group_size = packed.format, packed.k, packed.n, packed.group_size
        self.register_buffer("data", torch.from_numpy(packed.data.copy()))
        self.register_buffer("scales", torch.from_numpy(packed.scales.copy()))
        zero = torch.zeros(self.n)  # the op's bias input is always wired; zeros when the layer has none
        self.register_buffer("bias", zero if bias is None else bias.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return torch.onnx.ops.symbolic(
                f"{SHERRY_DOMAIN}::{FORMATS[self.format].op_type}",
                (x, self.data, self.scales, self.bias),
                {"K": self.k, "N": self.n, "group_size": self.group_size},
                dtype=x.dtype,
                shape=(*x.shape[:-1], self.n),
                version=SHERRY_OPSET_VERSION,
            )
        return PACKED_OPS[self.format](x, self.data, self.scales, self.bias, self.k, self.n, self.group_size)


def pack_module(module: torch.nn.Module, format: str = REFERENCE_FORMAT) -> torch.nn.Module:
    """A copy of ``module`` with every quantized linear replaced by a :class:`PackedLinear` in ``format``."""
    if format not in FORMATS:
        raise ValueError(f"generic export supports the formats {', '.join(FORMATS)}, got {format!r}")
    packed = copy.deepcopy(module).eval()
    targets = [(name, m) for name, m in packed.named_modules() if hasattr(m, "ternary") and name]
    if not targets:
        raise ValueError("the module has no quantized linear layers (modules with ternary()); quantize it first")
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = packed.get_submodule(parent_name) if parent_name else packed
        group_size = child.group_size or child.ternary().values.shape[1]
        setattr(parent, attr, PackedLinear(pack(format, child.ternary(), group_size), getattr(child, "bias", None)))
    return packed


def to_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    format: str = REFERENCE_FORMAT,
    dynamic_shapes: Sequence[Mapping[int, object]] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` with each quantized linear as one ``ai.sherry`` node on packed weights.

    ``dynamic_shapes`` defaults to dynamic batch and sequence dimensions (0 and 1) of every input of
    rank ≥ 2. The model is checked with ``onnx.checker`` (full check) and saved to ``path`` if given.
    """
    packed = pack_module(module, format)
    if dynamic_shapes is None:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
        dynamic_shapes = [{d: dim for d, dim in dims.items() if d < x.dim() - 1} for x in example_inputs]
    program = torch.onnx.export(
        packed,
        tuple(example_inputs),
        dynamo=True,
        dynamic_shapes=tuple(dynamic_shapes),
        optimize=True,
    )
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save_model(model, os.fspath(path))
    return model
