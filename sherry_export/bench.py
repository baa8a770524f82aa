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
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from sherry_export.export.graph import FLOAT, GraphBuilder
from sherry_export.export.projections import EXPORT_FORMATS, NBITS_FORMATS, Projection, emit_projection
from sherry_export.formats import FORMATS, PackedWeight, get_format, pack
from sherry_export.onnx_ops import matmul_node
from sherry_export.quant import dequantize_ternary, sherry_ternarize
from sherry_export.report import markdown_table
from sherry_export.runtime import make_session

LLAMA_1B_SHAPES = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
"""LLaMA-3.2-1B's linear shapes as (K, N): q/o, k/v, gate/up, down."""
GROUP_SIZE = 128
PREFILL_BATCH = 128
MAX_COLD_NODES = 1024
"""Cap on a cold graph's nodes: graph building and profiling cost grows with them, and 1024 copies of
the smallest matrix (2048->512 Sherry, 0.18 MB) still exceed the caches several times over."""
COLD_BYTES = 3e8
"""Weight bytes a cold graph cycles through by default: about 10x this machine's 32 MB L3."""


@dataclass(frozen=True)
class Candidate:
    """One thing to time: a weight format, and for our ops the forced kernel path."""

    format: str
    path: str | None = None

    @property
    def label(self) -> str:
        if self.format in FORMATS:
            return f"{FORMATS[self.format].op_type}[{self.path}]"
        return {"nbits2": "MatMulNBits-2bit", "nbits4": "MatMulNBits-4bit", "fp32": "MatMul-fp32"}[self.format]


@dataclass
class Timing:
    candidate: str
    k: int
    n: int
    batch: int
    threads: int
    mode: str
    median_us: float
    weight_bytes: int

    @property
    def gb_per_s(self) -> float:
        return self.weight_bytes / (self.median_us * 1e3)


def candidates(paths: list[str]) -> list[Candidate]:
    ours = [Candidate(fmt, path) for path in paths for fmt in FORMATS]
    return [*ours, Candidate("nbits2"), Candidate("nbits4"), Candidate("fp32")]


def projection_for(fmt: str, k: int, n: int, seed: int = 0) -> Projection:
    """Random weights, projected to Sherry once: every format carries the same ternary values."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    ternary = sherry_ternarize(weight, GROUP_SIZE)
    if fmt == "fp32":
        return Projection(weight=dequantize_ternary(ternary, GROUP_SIZE).numpy())
    return Projection(ternary=ternary, group_size=GROUP_SIZE)


def bench_model(
    fmt: str, proj: Projection, packed: PackedWeight | None, batch: int, k: int
) -> tuple[onnx.ModelProto, int]:
    """A graph of one projection reading A, and its weight bytes."""
    b = GraphBuilder("bench")
    a = b.add_input("A", FLOAT, [batch, k])
    if packed is not None:  # packed once per shape, shared by every configuration
        node, initializers = matmul_node(packed, a, "Y", name="node")
        b.add_initializers(initializers)
        b.nodes.append(node)
        y = "Y"
    else:
        y = emit_projection(b, a, "node", proj, fmt)
    b.add_output(y, FLOAT, None)
    model = b.model()
    return model, sum(len(t.raw_data) for t in model.graph.initializer)


def replicate(model: onnx.ModelProto, copies: int) -> bytes:
    """``copies`` copies of a graph's nodes, each with weights of its own, all reading its inputs.

    Copy c > 0 permutes the rows (axis 0) of every initializer with its own seeded permutation, so no
    two copies hold the same bytes: onnxruntime shares one prepacked buffer among initializers of
    identical content (measured: MatMulNBits 2048->512 "cold" ran at its hot speed, 17 µs, with
    identical copies and 27 µs with distinct ones). Whole rows stay whole, so every packed code stays
    valid; the products change, which no timing depends on.
    """
    if copies == 1:
        return model.SerializeToString()
    graph = model.graph
    inputs = {i.name for i in graph.input}
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    nodes, initializers, outputs = [], [], []
    for c in range(copies):

        def rename(name: str, c: int = c) -> str:
            return name if not name or name in inputs else f"{name}#{c}"

        rng = np.random.default_rng(c)
        for name, array in arrays.items():
            rows = array if c == 0 or array.ndim == 0 else array[rng.permutation(array.shape[0])]
            initializers.append(onnx.numpy_helper.from_array(rows, rename(name)))
        for n in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = rename(n.name)
            copy.input[:] = [rename(i) for i in n.input]
            copy.output[:] = [rename(o) for o in n.output]
            nodes.append(copy)
        for o in graph.output:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(o)
            copy.name = rename(o.name)
            outputs.append(copy)
    out = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, graph.name, list(graph.input), outputs, initializer=initializers),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    return out.SerializeToString()


def profiled_node_times(
    blob: bytes, nodes: int, candidate: Candidate, threads: int, a: np.ndarray, runs: int, warmup: int = 2
) -> list[float]:
    """Per-node kernel times (µs) over ``runs`` calls, from onnxruntime's profiler; warm-up calls dropped."""
    with tempfile.TemporaryDirectory() as tmp:
        kernel = candidate.path if candidate.format in FORMATS else None
        session = make_session(blob, threads=threads, kernel=kernel, profile_prefix=os.path.join(tmp, "profile"))
        for _ in range(warmup + runs):
            session.run(None, {"A": a})
        events = kernel_events(read_profile(session.end_profiling()))
    return [float(e["dur"]) for e in events[warmup * nodes :]]


def read_profile(profile_path: str) -> list[dict]:
    """The events of an onnxruntime profile file, which is deleted once read (they pile up otherwise)."""
    with open(profile_path) as f:
        events = json.load(f)
    os.unlink(profile_path)
    return events


def kernel_events(events: list[dict]) -> list[dict]:
    """The per-node kernel events of a profile (``args.op_name`` is the op type, ``dur`` the µs)."""
    return [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def configurations(shapes: list[tuple[int, int]], threads: list[int]) -> Iterator[tuple[int, int, int, int, str]]:
    for k, n in shapes:
        for t in threads:
            yield k, n, 1, t, "hot"
            yield k, n, 1, t, "cold"
            yield k, n, PREFILL_BATCH, t, "hot"  # no cold prefill: each weight serves 128 rows of A


def cold_copies(cold_bytes: float, per_node: int) -> int:
    """Nodes of a cold graph: enough distinct weights to exceed ``cold_bytes``, at most MAX_COLD_NODES."""
    return max(2, min(MAX_COLD_NODES, int(np.ceil(cold_bytes / per_node))))


def run_kernel_bench(
    shapes: list[tuple[int, int]],
    threads: list[int],
    paths: list[str],
    cold_bytes: float,
    hot_runs: int,
    cold_runs: int,
) -> list[Timing]:
    """Time every candidate on every configuration; returns one Timing each."""
    timings: list[Timing] = []
    configs = list(configurations(shapes, threads))
    todo = candidates(paths)
    rng = np.random.default_rng(0)
    with tqdm(total=len(configs) * len(todo), desc="bench kernels", unit="run") as bar:
        for k, n in shapes:
            projections = {c.format: projection_for(c.format, k, n) for c in todo}
            packed = {f: pack(f, projections[f].ternary, GROUP_SIZE) for f in FORMATS if f in projections}
            for k_, n_, batch, t, mode in configs:
                if (k_, n_) != (k, n):
                    continue
                a = rng.standard_normal((batch, k), dtype=np.float32)
                for cand in todo:
                    bar.set_postfix_str(f"{cand.label} {k}->{n} b{batch} t{t} {mode}")
                    model, per_node = bench_model(
                        cand.format, projections[cand.format], packed.get(cand.format), batch, k
                    )
                    copies = 1 if mode == "hot" else cold_copies(cold_bytes, per_node)
                    # Prefill calls are long and steady: a tenth of the calls suffices.
                    runs = cold_runs if mode == "cold" else hot_runs if batch == 1 else max(5, hot_runs // 10)
                    nodes = copies * len(model.graph.node)
                    try:
                        times = profiled_node_times(replicate(model, copies), nodes, cand, t, a, runs)
                    except Exception as e:  # the tvm path has kernels for the tuned shapes only
                        if cand.path != "tvm" or "no tuned TVM kernel" not in str(e):
                            raise
                        bar.update()
                        continue
                    timings.append(Timing(cand.label, k, n, batch, t, mode, statistics.median(times), per_node))
                    bar.update()
    return timings


def ratio_rows(timings: list[Timing], paths: list[str]) -> tuple[list[str], list[list[object]]]:
    """One row per configuration: each candidate's median µs, then Sherry's speed-ups on each path."""
    labels = list(dict.fromkeys(t.candidate for t in timings))
    by_config: dict[tuple, dict[str, Timing]] = {}
    for t in timings:
        by_config.setdefault((t.k, t.n, t.batch, t.threads, t.mode), {})[t.candidate] = t
    ratio_headers = []
    for path in paths:
        ratio_headers += [f"nbits2/sherry[{path}]", f"i2s/sherry[{path}]", f"tl2/sherry[{path}]"]
    headers = ["K->N", "batch", "threads", "weights", *[f"{label} µs" for label in labels], *ratio_headers]
    rows = []
    for (k, n, batch, threads, mode), cands in by_config.items():
        row: list[object] = [f"{k}->{n}", batch, threads, mode]
        row += [round(cands[c].median_us, 1) if c in cands else "-" for c in labels]  # tvm: tuned shapes only
        for path in paths:
            sherry = cands.get(f"SherryMatMul[{path}]")
            for other in ("MatMulNBits-2bit", f"I2SMatMul[{path}]", f"TL2MatMul[{path}]"):
                row.append(cands[other].median_us / sherry.median_us if sherry and other in cands else "-")
        rows.append(row)
    return headers, rows


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {ort.__version__}"


def cmd_kernels(args: argparse.Namespace) -> int:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else LLAMA_1B_SHAPES
    timings = run_kernel_bench(shapes, args.threads, args.paths, args.cold_bytes, args.hot_runs, args.cold_runs)
    headers, rows = ratio_rows(timings, args.paths)
    table = markdown_table(headers, rows)
    machine = machine_description()
    print(
        f"\n{machine}; median µs per call, from onnxruntime's profiler; cold = batch 1 over "
        f"{args.cold_bytes / 1e9:.2f} GB of distinct weights per candidate (at most {MAX_COLD_NODES} nodes)\n\n{table}"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "kernels.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "cold_bytes": args.cold_bytes,
                "timings": [asdict(t) | {"gb_per_s": t.gb_per_s} for t in timings],
            },
            indent=1,
        )
    )
    (args.output / "kernels.md").write_text(f"Machine: {machine}\n\n{table}\n")
    print(f"\nwrote {args.output / 'kernels.json'} and {args.output / 'kernels.md'}")
    return 0


def expected_projection_bytes(fmt: str, k: int, n: int, group_size: int) -> int:
    """Bytes a K→N projection should store in ``fmt`` (codes and scales), from the formats' bit accounting."""
    groups = -(-k // group_size)
    if fmt == "fp32":
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


def register(subparsers: argparse._SubParsersAction) -> None:
    from sherry_export.cli import thread_count

    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: kernels side by side, and large exports",
        description="Benchmarks print ratios measured side by side in one run.",
    )
    sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    kernels = sub.add_parser(
        "kernels",
        help="time SherryMatMul/I2SMatMul/TL2MatMul against MatMulNBits and fp32 MatMul",
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
        choices=["scalar", "avx2", "avx512", "tvm"],
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
    kernels.add_argument("-o", "--output", type=Path, default=Path("results/bench"), help="where JSON/Markdown go")
    kernels.set_defaults(func=cmd_kernels)
    export = sub.add_parser(
        "export",
        help="export a public shape with random weights: time, memory, file size",
        epilog="example: sherry bench export --shape llama-3.2-1b --format sherry -o /tmp/l1b",
    )
    export.add_argument("--shape", default="llama-3.2-1b", choices=["llama-3.2-1b", "llama-3.2-3b", "bitnet-0.7b"])
    export.add_argument("--format", default="sherry", choices=EXPORT_FORMATS)
    export.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    export.set_defaults(func=cmd_export)
    pack_bench = sub.add_parser("pack", help="time the Sherry projection and each packer on 1e9 weights (LLaMA-3.2-1B)")
    pack_bench.set_defaults(func=cmd_pack)
