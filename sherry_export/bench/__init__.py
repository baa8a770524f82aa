"""``sherry bench``: kernel and export benchmarks. Speed lives here, never in timed tests.

``sherry bench kernels`` times one matmul node of every candidate (our three ops on each kernel path,
onnxruntime's own MatMulNBits 2- and 4-bit at their fastest settings, fp32 MatMul) on the same
shapes, threads and input, side by side in one run, and prints ratios. Times are per node, read
from onnxruntime's profiler, so Python and session overhead are not in them.

- hot: one node, the same weights on every call (they stay in the caches);
- cold: a graph of many nodes with distinct copies of the weights, more bytes in all than the caches
  hold, each node reading the same A; every node's time counts. Cold runs only at batch 1: at batch
  128 every weight is used 128 times per call, so where it comes from hardly matters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sherry_export.arguments import lazy_command, positive_int, thread_count
from sherry_export.bandwidth import DEFAULT_BYTES
from sherry_export.formats import EXPORT_FORMATS, FP32, LM_HEADS, REFERENCE_FORMAT
from sherry_export.runtime import KERNEL_PATHS

LLAMA_1B_SHAPES = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
"""LLaMA-3.2-1B's linear shapes as (K, N): q/o, k/v, gate/up, down."""
GROUP_SIZE = 128
PREFILL_BATCH = 128
MAX_COLD_NODES = 1024
"""Cap on a cold graph's nodes: graph building and profiling cost grows with them, and 1024 copies of
the smallest matrix (2048->512 Sherry, 0.18 MB) still exceed the caches several times over."""
COLD_BYTES = 3e8
"""Weight bytes a cold graph cycles through by default: about 10x this machine's 32 MB L3."""


def cold_copies(cold_bytes: float, per_node: int) -> int:
    """Nodes of a cold graph: enough distinct weights to exceed ``cold_bytes``, at most MAX_COLD_NODES."""
    return max(2, min(MAX_COLD_NODES, int(np.ceil(cold_bytes / per_node))))


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        description="Benchmarks print ratios measured side by side in one run.",
    )
    sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    kernels = sub.add_parser(
        "kernels",
        help="time the ai.sherry ops (one per format) against MatMulNBits and fp32 MatMul",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: sherry bench kernels --threads 1 2 -o results/bench",
    )
    kernels.add_argument("--shapes", nargs="+", metavar="KxN", help="shapes as KxN (default: LLaMA-3.2-1B's four)")
    kernels.add_argument(
        "--threads", nargs="+", type=thread_count, default=[1, 2], help="intra-op threads (default: 1 2)"
    )
    kernels.add_argument(
        "--paths",
        nargs="+",
        default=["avx512", "avx2"],
        choices=[p for p in KERNEL_PATHS if p != "auto"],
        help="kernel paths of our ops to time (default: avx512 avx2; tvm: the linked tuned kernels, where tuned)",
    )
    kernels.add_argument(
        "--cold-bytes",
        type=float,
        default=COLD_BYTES,
        help="weight bytes cycled through in cold mode, per candidate (default: 3e8, about 10x this "
        f"machine's 32 MB L3; at most {MAX_COLD_NODES} nodes)",
    )
    kernels.add_argument(
        "--hot-runs",
        type=int,
        default=100,
        help="calls timed in hot mode at batch 1 (default: 100; at batch 128, a tenth)",
    )
    kernels.add_argument("--cold-runs", type=int, default=2, help="passes over all nodes in cold mode (default: 2)")
    kernels.add_argument(
        "--repetitions",
        type=positive_int,
        default=3,
        help="interleaved repetitions of every timing; ratios are given as median (range) (default: 3)",
    )
    kernels.add_argument(
        "--bandwidth-bytes",
        type=float,
        default=DEFAULT_BYTES,
        help="bytes the read-bandwidth probe reads per pass, well above the caches (default: %(default).3g)",
    )
    kernels.add_argument("-o", "--output", type=Path, default=Path("results/bench"), help="where JSON/Markdown go")
    kernels.set_defaults(func=lazy_command("sherry_export.bench.kernels", "cmd_kernels"))
    export = sub.add_parser(
        "export",
        help="export a public shape with random weights: time, memory, file size",
        epilog="example: sherry bench export --shape llama-3.2-1b --format sherry -o /tmp/l1b",
    )
    export.add_argument("--shape", default="llama-3.2-1b", choices=["llama-3.2-1b", "llama-3.2-3b", "bitnet-0.7b"])
    export.add_argument("--format", default=REFERENCE_FORMAT, choices=EXPORT_FORMATS, help="(default: %(default)s)")
    export.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    export.set_defaults(func=lazy_command("sherry_export.bench.export", "cmd_export"))
    head = sub.add_parser(
        "head",
        help="time the LM head alone (MatMulNBits 8/4-bit, our int8) against the probed bandwidth",
        description=(
            "The LM head node the exporter emits for each --lm-head, alone, on random codes of the head's "
            "shape; interleaved rounds, a bandwidth probe per round; every call reads the whole table."
        ),
        epilog="example: sherry bench head --threads 1 2",
    )
    head.add_argument("--threads", nargs="+", type=thread_count, default=[1, 2], help="intra-op threads (default: 1 2)")
    head.add_argument("--vocab", type=int, default=128256, help="rows of the head (default: LLaMA-3.2's 128256)")
    head.add_argument("--hidden", type=int, default=2048, help="columns of the head (default: 2048)")
    quantized_heads = [h for h in LM_HEADS if h != FP32]
    head.add_argument(
        "--heads", nargs="+", choices=quantized_heads, default=quantized_heads, help="head types (default: all)"
    )
    head.add_argument("--blocks", nargs="+", type=int, help="block / group sizes (default: the exporter's, 32)")
    head.add_argument(
        "--accuracy-levels",
        nargs="+",
        type=int,
        default=[4],
        help="MatMulNBits accuracy_level values (default: 4, int8 activations, the exporter's)",
    )
    head.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default: 4)")
    head.add_argument("--runs", type=int, default=10, help="calls per candidate and round (default: 10)")
    head.set_defaults(func=lazy_command("sherry_export.bench.head", "cmd_head"))
    pack_bench = sub.add_parser("pack", help="time the Sherry projection and each packer on 1e9 weights (LLaMA-3.2-1B)")
    pack_bench.set_defaults(func=lazy_command("sherry_export.bench.pack", "cmd_pack"))
