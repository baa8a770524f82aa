"""The ``sherry compare`` and ``sherry demo`` commands: their parsers import nothing heavy, the
pipeline (:mod:`sherry_export.compare.run`) loads when a command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sherry_export.arguments import add_options, from_options
from sherry_export.compare.settings import DEMO_LIMIT, DEMO_PPL_TOKENS, CompareConfig


def cmd_compare(args: argparse.Namespace) -> int:
    from sherry_export.compare.report import markdown_report
    from sherry_export.compare.run import run_compare

    config = from_options(
        CompareConfig,
        args,
        group_size=args.group_size,
        group_size_explicit=args.group_size_given,
        qat=args.qat,
        run_speed=not args.accuracy_only,
        run_accuracy=not args.speed_only,
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
    from sherry_export.arguments import add_checkpoint_args, thread_count

    parser = subparsers.add_parser(
        "compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  sherry compare smollm2 --limit 100 --ppl-tokens 20000 -o results/smollm2\n"
        "  sherry compare shape:llama-3.2-1b --speed-only --lm-head nbits4 --formats sherry tl2 i2s nbits2 "
        "-o results/l1b",
    )
    add_options(parser, CompareConfig)
    add_checkpoint_args(parser)
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--speed-only", action="store_true", help="sizes and speed, no accuracy (shape: models)")
    parts.add_argument("--accuracy-only", action="store_true", help="sizes and accuracy, no speed")
    parser.set_defaults(func=cmd_compare)

    demo = subparsers.add_parser(
        "demo",
        description="Export the shipped Sherry model (models/sherry-qat-5m) to every "
        "format, time decode side by side, score held-out perplexity and zero-shot accuracy on small "
        "subsets, score the shipped dense-ternary and full-precision models next to it, and print the "
        "headline table. For full runs use `sherry compare` (docs/results.md).",
    )
    demo.add_argument(
        "-o", "--output", type=Path, default=Path("results/demo"), help="results folder (default: results/demo)"
    )
    demo.add_argument("--threads", nargs="+", type=thread_count, default=[1], help="thread counts (default: 1)")
    demo.set_defaults(func=cmd_demo)
