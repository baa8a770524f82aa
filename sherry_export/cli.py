"""The ``sherry`` command line: one verb per pipeline stage (quantize → pack → export → run → measure)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

DESCRIPTION = """\
sherry-export: ternary LLMs (Sherry 1.25-bit, TL2 1.67-bit, I2_S 2-bit) from PyTorch to fast CPU
inference with ONNX and onnxruntime.

Start with `sherry sizes smollm2`: it projects SmolLM2-135M's linear layers to Sherry, packs them in
every format, and prints bits per weight, file sizes and the matmul error on real activations.
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def group_size_arg(text: str) -> int | None:
    """``--group-size`` accepts a positive multiple of 4, or ``channel`` for one scale per row."""
    if text == "channel":
        return None
    value = positive_int(text)
    if value % 4:
        raise argparse.ArgumentTypeError(f"must be a multiple of 4 (a Sherry block) or 'channel', got {text}")
    return value


def cmd_sizes(args: argparse.Namespace) -> int:
    from sherry_export.models import load_causal_lm, load_tokenizer
    from sherry_export.report import capture_linear_inputs, error_rows, markdown_table, pack_model_layers, size_rows

    model, source = load_causal_lm(args.model)
    layers = pack_model_layers(model, args.group_size)
    weights = sum(layer.weight.numel() for layer in layers)
    gs = "per channel" if args.group_size is None else args.group_size
    print(f"\n{source.label}: {len(layers)} linear layers, {weights / 1e6:.1f}M weights, group size {gs}\n")
    print(
        markdown_table(
            ["format", "code bits/weight", "bits/weight incl. scales", "MB", "x smaller than fp16"], size_rows(layers)
        )
    )
    tokenizer = load_tokenizer(source)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    sample = [layer.name for layer in layers[: args.layers]]
    inputs = capture_linear_inputs(model, ids, sample)
    print(
        f"\nMatmul error on the activations of {ids.shape[1]} prompt tokens (relative Frobenius norm vs the "
        "original weight; int8 = the kernels' numerics):\n"
    )
    print(
        markdown_table(
            ["layer", "ternary (float)", "ternary (int8 acts)", "int8 vs float", "formats agree"],
            error_rows([layer for layer in layers if layer.name in inputs], inputs),
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sherry", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sizes = sub.add_parser(
        "sizes",
        help="project a model to Sherry, pack it in every format, print sizes and errors",
        description="Project every attention/MLP projection of MODEL to Sherry's 3:4 ternary "
        "values, pack the same values as sherry, tl2 and i2s, and print the size "
        "table and the reference matmul error on real activations.",
    )
    sizes.add_argument(
        "model",
        nargs="?",
        default="smollm2",
        help="'smollm2' (packaged SmolLM2-135M), a .gguf file, or a Hugging Face folder (default: smollm2)",
    )
    sizes.add_argument(
        "--group-size",
        type=group_size_arg,
        default=128,
        help="weights per scale group along K, a multiple of 4, or 'channel' (default: 128)",
    )
    sizes.add_argument(
        "--prompt",
        default="The capital of France is Paris. The Eiffel Tower was built in 1889.",
        help="text whose activations the error table uses",
    )
    sizes.add_argument(
        "--layers", type=positive_int, default=7, help="how many layers the error table shows (default: 7)"
    )
    sizes.set_defaults(func=cmd_sizes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sherry {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
