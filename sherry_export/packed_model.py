"""Ternary models in packed form, the pack stage's artifact: a few MB on disk, loadable without any network.

A packed model folder holds ``config.json`` (the transformers config plus a ``sherry_packed``
record), the tokenizer files, and ``weights.safetensors``: every quantized projection as its packed
codes (uint8) and float16 scales in one of the formats of ``docs/formats.md``, and the remaining
weights (embeddings in float16, norms in float32). Loading gives a transformers model whose
projections are :class:`FrozenTernaryLinear`: they compute with the stored ternary weights and hand
exactly those to the exporter, so a shipped model exports bit for bit as it was trained.

The record says how the ternary weights were made: ``trained_with`` (the QAT recipe) or
``projected_with`` (a post-training projection, :class:`sherry_export.qat.PTQConfig`), kept through
re-packing. ``sherry pack`` (:mod:`sherry_export.pack`) writes these folders from any source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from sherry_export.errors import InputError, load_json, one_line
from sherry_export.formats import PackedWeight, get_format, pack, unpack
from sherry_export.quant import Ternary, dequantize_ternary, quantizable_linears
from sherry_export.ternary import CONFIG_KEY, PTQ_KEY

PACKED_KEY = "sherry_packed"
TRAINED_WITH = "trained_with"
"""Key of the packed record holding the QAT recipe the weights were trained with (``None``: unrecorded)."""
PROJECTED_WITH = "projected_with"
"""Key of the packed record holding the post-training projection the weights are (absent when trained)."""
WEIGHTS_FILE = "weights.safetensors"


class FrozenTernaryLinear(nn.Linear):
    """A linear layer with fixed ternary weights: y = x·(t·α)ᵀ + b, and ``ternary()`` for export."""

    def __init__(self, ternary: Ternary, group_size: int | None, bias: torch.Tensor | None) -> None:
        values, scales = ternary
        n, k = values.shape
        super().__init__(k, n, bias=bias is not None, device="meta")
        self.group_size = group_size
        self.register_buffer("values", values.to(torch.int8))
        self.register_buffer("scales", scales.to(torch.float32))
        self.weight = nn.Parameter(
            dequantize_ternary(Ternary(self.values, self.scales), group_size), requires_grad=False
        )
        if bias is not None:
            self.bias = nn.Parameter(bias.to(torch.float32), requires_grad=False)

    def ternary(self) -> Ternary:
        return Ternary(self.values, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def save_packed_model(
    model: PreTrainedModel, folder: str | os.PathLike[str], format: str, tokenizer: object | None = None
) -> Path:
    """Write ``model`` (whose projections have ``ternary()``: after ``quantize_``, or loaded packed) in packed form.

    The output is a function of the weights and the config alone: ``config.json`` is transformers' own
    diff form (no local paths) with sorted keys, so packing a packed folder again gives the same bytes.
    """
    get_format(format)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    linears = quantizable_linears(model)
    missing = [name for name, m in linears.items() if not hasattr(m, "ternary")]
    if missing:
        raise ValueError(f"{len(missing)} projections are not ternary (first: {missing[0]}); quantize or train first")
    tensors: dict[str, np.ndarray] = {}
    group_sizes = {}
    for name, module in linears.items():
        ternary = module.ternary()
        group_size = module.group_size or ternary.values.shape[1]
        packed = pack(format, Ternary(*(t.detach().cpu() for t in ternary)), group_size)
        tensors[f"{name}.packed"], tensors[f"{name}.scales"] = packed.data, packed.scales
        group_sizes[name] = group_size
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().float().numpy()
    skip = {f"{name}.{p}" for name in linears for p in ("weight", "bias")}
    for name, tensor in model.state_dict().items():
        if name in skip or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        if name.endswith(("values", "scales")) and name.rsplit(".", 1)[0] in linears:
            continue
        dtype = np.float16 if tensor.dim() == 2 else np.float32  # embeddings and untied heads in half
        tensors[name] = tensor.detach().float().numpy().astype(dtype)
    save_file(tensors, out / WEIGHTS_FILE)
    config = model.config.to_diff_dict()
    # The packed weights are final: no recipe to re-apply, but the record says how they were made.
    previous = config.pop(PACKED_KEY, None) or {}
    record = {"format": format, "group_sizes": group_sizes}
    record[TRAINED_WITH] = config.pop(CONFIG_KEY, None) or previous.get(TRAINED_WITH)
    projected_with = config.pop(PTQ_KEY, None) or previous.get(PROJECTED_WITH)
    if projected_with is not None:
        record[PROJECTED_WITH] = projected_with
    config[PACKED_KEY] = record
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def is_packed_model(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder``'s config.json has the packed record (its weights file may still be missing)."""
    config = Path(folder) / "config.json"
    return config.is_file() and PACKED_KEY in read_config(Path(folder))


def read_config(folder: Path) -> dict:
    config = load_json(folder / "config.json", "restore it from the model's source")
    if not isinstance(config, dict):
        raise InputError(f"{folder / 'config.json'} is not a JSON object; restore it from the model's source")
    return config


def load_packed_model(folder: str | os.PathLike[str]) -> PreTrainedModel:
    """Rebuild a transformers model from a packed folder (float32 compute, frozen ternary projections).

    A missing or truncated weights file, or a config that contradicts itself or the weights, is an
    :class:`InputError` naming the file.
    """
    folder = Path(folder)
    record = read_config(folder)[PACKED_KEY]
    if not isinstance(record, dict) or not {"format", "group_sizes"} <= record.keys():
        raise InputError(f"{folder / 'config.json'} has a damaged {PACKED_KEY} record; restore it")
    weights = folder / WEIGHTS_FILE
    damaged = f"{folder} is a packed model folder (config.json, {WEIGHTS_FILE}, tokenizer)"
    if not weights.is_file():
        raise InputError(f"{weights} is missing: {damaged}; restore the file from the model's source")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, StrictDataclassError) as error:
        raise InputError(
            f"{folder / 'config.json'} is inconsistent: {one_line(error)}; restore it from the model's source"
        ) from error
    try:
        tensors = load_file(weights)
    except (OSError, SafetensorError) as error:
        raise InputError(f"cannot read {weights} ({error}): the file is damaged or truncated; restore it") from error
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    modules = dict(model.named_modules())
    for name, group_size in record["group_sizes"].items():
        if f"{name}.packed" not in tensors or f"{name}.scales" not in tensors:
            raise ValueError(f"{folder / WEIGHTS_FILE} lacks the packed weights of {name}: the file is damaged")
        if not isinstance(modules.get(name), nn.Linear):
            raise InputError(
                f"{folder / 'config.json'} is inconsistent: its {PACKED_KEY} record packs {name}, which the "
                "architecture it describes lacks; restore the file from the model's source"
            )
        data, scales = tensors.pop(f"{name}.packed"), tensors.pop(f"{name}.scales")
        try:
            ternary = unpack(PackedWeight(record["format"], data, scales, modules[name].in_features, group_size))
        except ValueError as error:
            raise InputError(
                f"the packed weights of {name} in {weights} do not match {folder / 'config.json'} ({error})"
            ) from error
        bias = tensors.pop(f"{name}.bias", None)
        parent, _, child = name.rpartition(".")
        setattr(
            modules[parent],
            child,
            FrozenTernaryLinear(ternary, group_size, None if bias is None else torch.from_numpy(bias)),
        )
    state = {name: torch.from_numpy(array.astype(np.float32)) for name, array in tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # torch's word for tensors whose shapes contradict the config
        raise InputError(f"{weights} does not match {folder / 'config.json'}: {one_line(error)}") from error
    missing = [
        m
        for m in missing
        if not m.endswith((".values", ".scales"))
        and m != "lm_head.weight"
        and not any(m.startswith(f"{n}.") for n in record["group_sizes"])
    ]
    if missing or unexpected:
        raise ValueError(f"{folder} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.model.rotary_emb.__init__(config)  # buffers made on the meta device are recomputed
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
