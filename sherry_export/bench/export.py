"""``sherry bench export``: a public shape exported with random weights: time, memory, bytes."""

from __future__ import annotations

import argparse
import resource
import time

from sherry_export.bench import GROUP_SIZE
from sherry_export.formats import FP32, NBITS_FORMATS, get_format
from sherry_export.report import markdown_table


def expected_projection_bytes(fmt: str, k: int, n: int, group_size: int) -> int:
    """Bytes a K→N projection should store in ``fmt`` (codes and scales), from the formats' bit accounting."""
    groups = -(-k // group_size)
    if fmt == FP32:
        return 4 * k * n
    if fmt in NBITS_FORMATS:  # MatMulNBits: one block per scale group, padded to the block; float32 scales
        return n * groups * group_size * NBITS_FORMATS[fmt] // 8 + 4 * n * groups
    return n * get_format(fmt).row_bytes(k, group_size) + 2 * n * groups


def cmd_export(args: argparse.Namespace) -> int:
    """Export a public shape with random weights; report time, peak memory and bytes vs the accounting."""
    from sherry_export.compare.accounting import account
    from sherry_export.export import ExportOptions, export_llm
    from sherry_export.models import SHAPE_PRESETS

    start = time.perf_counter()
    result = export_llm(f"shape:{args.shape}", args.output, ExportOptions(format=args.format), progress=True)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    config = SHAPE_PRESETS[args.shape]
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    shapes = [(h, h + 2 * kv), (h, h), (h, 2 * i), (i, h)]  # (K, N): qkv, o, gate+up, down
    expected = layers * sum(expected_projection_bytes(args.format, k, n, GROUP_SIZE) for k, n in shapes)
    stored = account(args.output).projections.total_bytes
    rows = [
        ["export time (s)", round(seconds, 1)],
        ["peak RSS (GB)", round(peak_gb, 2)],
        ["model files (MB)", round(result.total_bytes / 1e6, 1)],
        ["projection bytes in file", stored],
        ["bits accounting (bytes)", expected],
        ["match", "yes" if stored == expected else "NO"],
    ]
    print(markdown_table([f"{args.shape} as {args.format}", "value"], rows))
    return 0 if stored == expected else 1
