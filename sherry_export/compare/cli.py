"""The ``sherry compare`` and ``sherry demo`` commands: their parsers import nothing heavy, the
pipeline (:mod:`sherry_export.compare.run`) loads when a command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sherry_export.compare.settings import DEMO_LIMIT, DEMO_PPL_TOKENS, TASKS, AccuracySettings, SpeedSettings
from sherry_export.formats import EXPORT_FORMATS, LM_HEADS
from sherry_export.ternary import PROJECTION_NAMES


def cmd_compare(args: argparse.Namespace) -> int:
    from sherry_export.compare.report import markdown_report
    from sherry_export.compare.run import CompareConfig, run_compare

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


def cmd_demo(args: argparse.Namespace) -> int:
    from sherry_export.assets import ensure_assets, missing_assets
    from sherry_export.compare.report import headline_table
    from sherry_export.compare.run import demo_config, run_compare
    from sherry_export.models import DEFAULT_FP_MODEL, DEFAULT_MODEL, DEFAULT_TERNARY_MODEL
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
    from sherry_export.arguments import add_checkpoint_args, positive_int, thread_count

    parser = subparsers.add_parser(
        "compare",
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
    parser.add_argument("--threads", nargs="+", type=thread_count, default=[1, 2], help="thread counts (default: 1 2)")
    parser.add_argument("--lm-head", default="fp32", choices=LM_HEADS, help="LM head of every format (default: fp32)")
    add_checkpoint_args(parser)
    parser.add_argument(
        "--projection", default="sherry", choices=PROJECTION_NAMES, help="post-training projection (default: sherry)"
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
        help="bytes the bandwidth probe reads per pass (default: 2**30)",
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
        description="Export the shipped Sherry + Arenas model (models/sherry-arenas-scratch-10m) to all six "
        "formats, time decode side by side, score held-out perplexity and zero-shot accuracy on small "
        "subsets, score the shipped dense-ternary and full-precision models next to it, and print the "
        "headline table. For full runs use `sherry compare` (docs/results.md).",
    )
    demo.add_argument(
        "-o", "--output", type=Path, default=Path("results/demo"), help="results folder (default: results/demo)"
    )
    demo.add_argument("--threads", nargs="+", type=thread_count, default=[1], help="thread counts (default: 1)")
    demo.set_defaults(func=cmd_demo)
