"""``sherry export``: a causal LM folder or GGUF to an output folder that onnxruntime and
onnxruntime-genai run: ``model.onnx`` (+ ``model.onnx.data`` when large), the tokenizer files,
``genai_config.json`` and ``sherry_export.json`` (what was exported, and how).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx
import torch
from transformers import PreTrainedModel

from sherry_export.errors import output_folder
from sherry_export.export.graph import save_model
from sherry_export.export.llama import ExportOptions, build_decoder, resolve_embedding, tied_embedding
from sherry_export.export.sizes import size_split
from sherry_export.formats import FP32
from sherry_export.models import load_causal_lm, load_tokenizer
from sherry_export.provenance import (
    ORIGIN_CHECKPOINT,
    ORIGIN_OPTIONS,
    PreparedSource,
    Provenance,
    checkpoint_provenance,
    held_group_size,
    manifest_group_size,
    prepare_checkpoint,
)
from sherry_export.quant import quantizable_linears
from sherry_export.resources import LIBRARY_NAME
from sherry_export.runtime import get_library_path
from sherry_export.verify import CHECKSUMS_KEY, MANIFEST_FILE, MODEL_FILE, weight_checksums


@dataclass
class ExportResult:
    out_dir: Path
    files: list[Path]
    options: ExportOptions
    provenance: str
    """Where the weights come from (``sherry_export.provenance``): a label starting with "quantization-aware"
    for trained ternary weights, else "post-training projection" or "float weights"."""
    size_split: dict[str, int] = field(default_factory=dict)
    """Stored bytes of the projections, the embedding, the LM head and the rest (``export.sizes``)."""

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.name.startswith(MODEL_FILE))


def genai_config(model: PreTrainedModel, tokenizer: object, context_length: int, custom_ops: bool) -> dict:
    """onnxruntime-genai's config for our decoder graph.

    With ``custom_ops`` (a graph with ``ai.sherry`` nodes) it registers the op library by its bare
    file name: onnxruntime-genai resolves a relative ``custom_ops_library`` against the model folder
    (and refuses libraries outside the model folder, its execution providers' folders and the working
    directory), so the export carries its own copy and the folder runs wherever it is moved.

    ``past_present_share_buffer``: onnxruntime-genai keeps one KV buffer of ``max_length`` positions per
    layer and binds it as both past and present, so ``GroupQueryAttention`` writes each step in place
    instead of copying the cache into a new present every step. The graph needs nothing for it: it
    takes ``seqlens_k`` and ``total_sequence_length`` from the attention mask, which genai grows by one
    position per step whatever the buffer's size (sherry's own runner decodes the same way, see
    :class:`sherry_export.generate.SharedKVDecoder`). ``sherry generate`` runs the folder through this
    config (:mod:`sherry_export.genai`).
    """
    config = model.config
    heads = config.num_attention_heads
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", 0)
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom_ops:
        session_options["custom_ops_library"] = LIBRARY_NAME
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": context_length,
            "decoder": {
                "session_options": session_options,
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
            "past_present_share_buffer": True,
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
    source: PreparedSource | None = None,
) -> ExportResult:
    """Export an in-memory model (float or quantization-aware) to ``out_dir``.

    ``source``: what :func:`~sherry_export.provenance.prepare_checkpoint` made of a loaded checkpoint;
    without it, the model's own projections say what it is.
    """
    out = output_folder(out_dir)
    if source is None:
        trained = any(hasattr(m, "ternary") for m in model.modules())
        provenance = checkpoint_provenance(model) if trained else Provenance("float")
        group_size = held_group_size(model) if trained else options.group_size
        source = PreparedSource(provenance, group_size, ORIGIN_CHECKPOINT if trained else ORIGIN_OPTIONS)
    if source.provenance.holds_ternary:  # the weights' own group size, not a flag's, goes into the manifest
        options = replace(options, group_size=source.options_group_size)
    provenance = source.provenance.label(options.format)
    carries_groups = source.provenance.holds_ternary or options.format != FP32
    options = resolve_embedding(options, tied_embedding(model))  # the manifest records what was exported
    with torch.no_grad():
        decoder = build_decoder(model, options, progress=progress)
    files = save_model(decoder, out / MODEL_FILE)
    del decoder
    onnx.checker.check_model(os.fspath(out / MODEL_FILE), full_check=True)  # by path: works past 2 GiB
    split = size_split(onnx.load(out / MODEL_FILE, load_external_data=False))
    context = min(int(model.config.max_position_embeddings), 4096)
    custom_ops = options.uses_op_library
    (out / "genai_config.json").write_text(json.dumps(genai_config(model, tokenizer, context, custom_ops), indent=2))
    files.append(out / "genai_config.json")
    if custom_ops:  # the copy onnxruntime-genai loads (x86-64, every kernel path: it picks one at run time)
        files.append(Path(shutil.copyfile(get_library_path(), out / LIBRARY_NAME)))
    if tokenizer is not None:
        files += [Path(f) for f in tokenizer.save_pretrained(out)]
    linears = quantizable_linears(model)
    manifest = {
        "source": source_label,
        "provenance": provenance,
        "group_size": manifest_group_size(source.group_size) if carries_groups else None,
        "group_size_origin": source.group_size_origin if carries_groups else None,
        "options": asdict(options),
        "architecture": type(model).__name__,
        "quantized_weights": sum(m.weight.numel() for m in linears.values()),
        "model_bytes": sum(f.stat().st_size for f in files if f.name.startswith(MODEL_FILE)),
        "size_split": split,
    }
    manifest[CHECKSUMS_KEY] = weight_checksums(files)  # checked on load: damaged weights still run
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    files.append(out / MANIFEST_FILE)
    return ExportResult(out, files, options, provenance, split)


def export_llm(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ExportOptions,
    group_size_explicit: bool = False,
    progress: bool = False,
    qat: str | None = None,
) -> ExportResult:
    """Load ``source`` ('smollm2', a .gguf file or a Hugging Face folder) and export it.

    ``qat``: the QAT method (``sherry``/``ternary``) whose latent weights ``source`` holds, for checkpoints
    that do not say so themselves (AngelSlim's); see :func:`~sherry_export.provenance.prepare_checkpoint`.
    """
    model, src = load_causal_lm(source)
    prepared = prepare_checkpoint(model, qat, options.group_size, group_size_explicit, label=src.label)
    options = replace(options, group_size=prepared.options_group_size)
    return export_model(
        model,
        out_dir,
        options,
        tokenizer=load_tokenizer(src),
        source_label=src.label,
        progress=progress,
        source=prepared,
    )
