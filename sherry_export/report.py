"""Size and error reports over a model's quantizable layers, and the tables that print them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from sherry_export.formats import FORMATS, REFERENCE_FORMAT, PackedWeight, pack, reference_matmul
from sherry_export.quant import quantizable_linears, sherry_ternarize


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass
class LayerPack:
    """One linear layer packed in every format, from one Sherry projection."""

    name: str
    weight: torch.Tensor
    packed: dict[str, PackedWeight]


def pack_model_layers(model: torch.nn.Module, group_size: int | None) -> list[LayerPack]:
    """Project each quantizable linear to Sherry once, then pack the same ternary values in each format."""
    layers = []
    for name, linear in tqdm(quantizable_linears(model).items(), desc="project + pack", unit="layer"):
        ternary = sherry_ternarize(linear.weight, group_size)
        layers.append(LayerPack(name, linear.weight.detach(), {f: pack(f, ternary, group_size) for f in FORMATS}))
    return layers


def size_rows(layers: list[LayerPack]) -> list[list[object]]:
    """Rows of (format, code bpw, bpw with scales, MB, × smaller than fp16) over all layers."""
    weights = sum(layer.weight.numel() for layer in layers)
    fp16_bytes = 2 * weights
    rows: list[list[object]] = [["fp16", 16.0, 16.0, fp16_bytes / 1e6, 1.0]]
    for fmt in FORMATS:
        code = sum(layer.packed[fmt].data.nbytes for layer in layers)
        total = sum(layer.packed[fmt].nbytes for layer in layers)
        rows.append([fmt, 8 * code / weights, 8 * total / weights, total / 1e6, fp16_bytes / total])
    return rows


def error_rows(layers: list[LayerPack], inputs: dict[str, np.ndarray]) -> list[list[object]]:
    """Per layer: relative error of the ternary matmul (float, then the kernels' int8 numerics) against
    the original weight, on real activations; and whether every format gives the same int8 result."""
    rows = []
    for layer in layers:
        x = inputs[layer.name]
        exact = x @ layer.weight.numpy().T
        norm = float(np.linalg.norm(exact)) or 1.0
        outputs = {f: reference_matmul(x, p, activations="int8") for f, p in layer.packed.items()}
        float_out = reference_matmul(x, layer.packed[REFERENCE_FORMAT], activations="float")
        agree = all(np.array_equal(outputs[REFERENCE_FORMAT], out) for out in outputs.values())
        rows.append(
            [
                layer.name,
                float(np.linalg.norm(float_out - exact)) / norm,
                float(np.linalg.norm(outputs[REFERENCE_FORMAT] - exact)) / norm,
                float(np.linalg.norm(outputs[REFERENCE_FORMAT] - float_out)) / norm,
                "yes" if agree else "NO",
            ]
        )
    return rows


def capture_linear_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Run the model once and keep the input activations ``[tokens, K]`` of the named linears."""
    captured: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, args, _out, name=name: captured.__setitem__(
                name, args[0].detach().reshape(-1, args[0].shape[-1]).numpy()
            )
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured
