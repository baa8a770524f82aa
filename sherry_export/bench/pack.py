"""``sherry bench pack``: the Sherry projection and each packer timed on LLaMA-3.2-1B-sized weights."""

from __future__ import annotations

import argparse
import os
import time

import torch
from tqdm import tqdm

from sherry_export.bench import GROUP_SIZE
from sherry_export.formats import FORMATS, pack
from sherry_export.quant import sherry_ternarize
from sherry_export.report import markdown_table


def cmd_pack(args: argparse.Namespace) -> int:
    """Project and pack LLaMA-3.2-1B's linear weights (random values) in every format; time each step."""
    shapes = [(2048, 2048 + 2 * 512), (2048, 2048), (2048, 2 * 8192), (8192, 2048)] * 16  # (K, N) per layer
    weights = sum(k * n for k, n in shapes)
    totals = {"project": 0.0, **{f: 0.0 for f in FORMATS}}
    generator = torch.Generator().manual_seed(0)
    for k, n in tqdm(shapes, desc="project + pack", unit="matrix"):
        w = torch.randn(n, k, generator=generator)
        start = time.perf_counter()
        ternary = sherry_ternarize(w, GROUP_SIZE)
        totals["project"] += time.perf_counter() - start
        for fmt in FORMATS:
            start = time.perf_counter()
            pack(fmt, ternary, GROUP_SIZE)
            totals[fmt] += time.perf_counter() - start
    rows = [[step, round(seconds, 2), round(weights / seconds / 1e6, 1)] for step, seconds in totals.items()]
    print(
        f"\n{weights / 1e9:.2f}e9 weights (LLaMA-3.2-1B's linears), group size {GROUP_SIZE}, {os.cpu_count()} cores\n"
    )
    print(markdown_table(["step", "seconds", "M weights/s"], rows))
    return 0
