"""``sherry export``: a causal LM folder or GGUF to an output folder that onnxruntime and
onnxruntime-genai run: ``model.onnx`` (+ ``model.onnx.data`` when large), the tokenizer files,
``genai_config.json`` and ``sherry_export.json`` (what was exported, and how).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx
import torch
from transformers import PreTrainedModel

from sherry_export.export.graph import external_data_path, save_model
from sherry_export.export.llama import ExportOptions, build_decoder, resolve_embedding, tied_embedding
from sherry_export.export.sizes import size_split
from sherry_export.models import load_causal_lm, load_tokenizer, quantizable_linears
from sherry_export.qat import requantize_from_config
from sherry_export.runtime import get_library_path

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "sherry_export.json"
GROUP_SIZE_KEYS = ("group_size", "w_group_size", "weight_group_size")


@dataclass
class ExportResult:
    out_dir: Path
    files: list[Path]
    options: ExportOptions
    provenance: str
    """"quantization-aware" or "post-training projection": whether the ternary weights were trained."""
    size_split: dict[str, int] = field(default_factory=dict)
    """Stored bytes of the projections, the embedding, the LM head and the rest (``export.sizes``)."""

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.name.startswith(MODEL_FILE))


def config_group_size(config: object) -> int | None:
    """A Sherry group size recorded in a checkpoint's config (AngelSlim-style keys), if any."""
    for holder in (getattr(config, "sherry_qat", None), getattr(config, "quantization_config", None), config):
        if isinstance(holder, dict):
            found = next((holder[k] for k in GROUP_SIZE_KEYS if k in holder), None)
        else:
            found = next((getattr(holder, k) for k in GROUP_SIZE_KEYS if getattr(holder, k, None) is not None), None)
        if found is not None:
            return int(found)
    return None


def resolve_group_size(model: PreTrainedModel, requested: int | None, explicit: bool) -> int | None:
    """The group size to project with: the config's, unless the command line says otherwise.

    A command-line value that contradicts the checkpoint's config is an error, not a silent choice:
    projecting a Sherry checkpoint with another group size than it was trained with loses accuracy.
    """
    recorded = config_group_size(model.config)
    if recorded is None:
        return requested
    if explicit and requested != recorded:
        raise ValueError(
            f"--group-size {requested} contradicts the checkpoint's config (group size {recorded}); "
            f"drop --group-size or pass --group-size {recorded}"
        )
    return recorded


def genai_config(model: PreTrainedModel, tokenizer: object, context_length: int) -> dict:
    """onnxruntime-genai's config for our decoder graph, with the op library registered."""
    config = model.config
    heads = config.num_attention_heads
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", 0)
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "custom_ops_library": os.fspath(get_library_path()),
                    "provider_options": [],
                },
                "filename": MODEL_FILE,
                "head_size": getattr(config, "head_dim", None) or config.hidden_size // heads,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "do_sample": False,
            "max_length": context_length,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def export_model(
    model: PreTrainedModel,
    out_dir: str | os.PathLike[str],
    options: ExportOptions,
    tokenizer: object | None = None,
    source_label: str = "",
    progress: bool = False,
) -> ExportResult:
    """Export an in-memory model (float or quantization-aware) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = any(hasattr(m, "ternary") for m in model.modules())
    provenance = "quantization-aware" if trained else "post-training projection"
    if options.format == "fp32" and not trained:
        provenance = "float weights"
    options = resolve_embedding(options, tied_embedding(model))  # the manifest records what was exported
    with torch.no_grad():
        builder = build_decoder(model, options, progress=progress, external_data=external_data_path(out / MODEL_FILE))
        model_proto = builder.model()
        del builder
    split = size_split(model_proto)
    files = save_model(model_proto, out / MODEL_FILE)
    del model_proto
    onnx.checker.check_model(os.fspath(out / MODEL_FILE), full_check=True)  # by path: works past 2 GiB
    context = min(int(model.config.max_position_embeddings), 4096)
    (out / "genai_config.json").write_text(json.dumps(genai_config(model, tokenizer, context), indent=2))
    files.append(out / "genai_config.json")
    if tokenizer is not None:
        files += [Path(f) for f in tokenizer.save_pretrained(out)]
    linears = quantizable_linears(model)
    manifest = {
        "source": source_label,
        "provenance": provenance,
        "options": asdict(options),
        "architecture": type(model).__name__,
        "quantized_weights": sum(m.weight.numel() for m in linears.values()),
        "model_bytes": sum(f.stat().st_size for f in files if f.name.startswith(MODEL_FILE)),
        "size_split": split,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    files.append(out / MANIFEST_FILE)
    return ExportResult(out, files, options, provenance, split)


def export_llm(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ExportOptions,
    group_size_explicit: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Load ``source`` ('smollm2', a .gguf file or a Hugging Face folder) and export it."""
    model, src = load_causal_lm(source)
    requantize_from_config(model)  # a `sherry train` checkpoint gets its QAT modules (and trained ternary) back
    options = replace(options, group_size=resolve_group_size(model, options.group_size, group_size_explicit))
    return export_model(
        model, out_dir, options, tokenizer=load_tokenizer(src), source_label=src.label, progress=progress
    )
