"""``sherry bench kernels``: one matmul node of every candidate, hot and cold, side by side."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch
from tqdm import tqdm

from sherry_export.bandwidth import read_bandwidth
from sherry_export.bench import GROUP_SIZE, LLAMA_1B_SHAPES, MAX_COLD_NODES, PREFILL_BATCH, cold_copies
from sherry_export.export.graph import FLOAT, GraphBuilder
from sherry_export.export.projections import Projection, emit_projection, packed_matmul
from sherry_export.formats import (
    EXPORT_FORMATS,
    FORMATS,
    FP32,
    NBITS_FORMATS,
    REFERENCE_FORMAT,
    SPEED_BASELINES,
    PackedWeight,
    pack,
)
from sherry_export.profiling import kernel_events, machine_description, read_profile
from sherry_export.quant import dequantize_ternary, sherry_ternarize
from sherry_export.report import markdown_table
from sherry_export.runtime import make_session


@dataclass(frozen=True)
class Candidate:
    """One thing to time: a weight format, and for our ops the forced kernel path."""

    format: str
    path: str | None = None

    @property
    def label(self) -> str:
        if self.format in FORMATS:
            return f"{FORMATS[self.format].op_type}[{self.path}]"
        if self.format in NBITS_FORMATS:
            return f"MatMulNBits-{NBITS_FORMATS[self.format]}bit"
        return f"MatMul-{self.format}"


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
    repetition: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.weight_bytes / (self.median_us * 1e3)


def candidates(paths: list[str]) -> list[Candidate]:
    """Every format of ours on each kernel path, then onnxruntime's own ops (one candidate each)."""
    ours = [Candidate(fmt, path) for path in paths for fmt in FORMATS]
    return [*ours, *(Candidate(fmt) for fmt in EXPORT_FORMATS if fmt not in FORMATS)]


def projection_for(fmt: str, k: int, n: int, seed: int = 0) -> Projection:
    """Random weights, projected to Sherry once: every format carries the same ternary values."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    ternary = sherry_ternarize(weight, GROUP_SIZE)
    if fmt == FP32:
        return Projection(weight=dequantize_ternary(ternary, GROUP_SIZE).numpy())
    return Projection(ternary=ternary, group_size=GROUP_SIZE)


def bench_model(
    fmt: str, proj: Projection, packed: PackedWeight | None, batch: int, k: int
) -> tuple[onnx.ModelProto, int]:
    """A graph of one projection reading A, and its weight bytes."""
    b = GraphBuilder("bench")
    a = b.add_input("A", FLOAT, [batch, k])
    # packed once per shape, shared by every configuration
    y = packed_matmul(b, a, "node", packed) if packed is not None else emit_projection(b, a, "node", proj, fmt)
    b.add_output(y, "Y", FLOAT, None)
    model = ir.to_proto(b.model())
    return model, sum(len(t.raw_data) for t in model.graph.initializer)


def replicate(model: onnx.ModelProto, copies: int) -> bytes:
    """``copies`` copies of a graph's nodes, each with weights of its own, all reading its inputs.

    Copy c > 0 permutes the rows (axis 0) of every initializer with its own seeded permutation, so no
    two copies hold the same bytes: onnxruntime shares one prepacked buffer among initializers of
    identical content, so copies of one weight would time MatMulNBits hot however many there are
    (docs/benchmarks.md). Whole rows stay whole, so every packed code stays valid; the products
    change, which no timing depends on.
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


def configurations(shapes: list[tuple[int, int]], threads: list[int]) -> Iterator[tuple[int, int, int, int, str]]:
    for k, n in shapes:
        for t in threads:
            yield k, n, 1, t, "hot"
            yield k, n, 1, t, "cold"
            yield k, n, PREFILL_BATCH, t, "hot"  # no cold prefill: each weight serves 128 rows of A


def run_kernel_bench(
    shapes: list[tuple[int, int]],
    threads: list[int],
    paths: list[str],
    cold_bytes: float,
    hot_runs: int,
    cold_runs: int,
    repetitions: int = 1,
) -> list[Timing]:
    """Time every candidate on every configuration ``repetitions`` times; returns one Timing each.

    The repetitions of a configuration follow each other, every one over all candidates in an order
    rotated by one, so that a slow spell of a shared machine falls on all candidates alike and no
    candidate always runs right after the same one.
    """
    timings: list[Timing] = []
    configs = list(configurations(shapes, threads))
    todo = candidates(paths)
    rng = np.random.default_rng(0)
    with tqdm(total=len(configs) * len(todo) * repetitions, desc="bench kernels", unit="run") as bar:
        for k, n in shapes:
            projections = {c.format: projection_for(c.format, k, n) for c in todo}
            packed = {f: pack(f, projections[f].ternary, GROUP_SIZE) for f in FORMATS if f in projections}
            for k_, n_, batch, t, mode in configs:
                if (k_, n_) != (k, n):
                    continue
                a = rng.standard_normal((batch, k), dtype=np.float32)
                graphs: dict[Candidate, tuple[bytes, int, int]] = {}
                for cand in todo:
                    model, per_node = bench_model(
                        cand.format, projections[cand.format], packed.get(cand.format), batch, k
                    )
                    copies = 1 if mode == "hot" else cold_copies(cold_bytes, per_node)
                    graphs[cand] = (replicate(model, copies), copies * len(model.graph.node), per_node)
                # Prefill calls are long and steady: a tenth of the calls suffices.
                runs = cold_runs if mode == "cold" else hot_runs if batch == 1 else max(5, hot_runs // 10)
                for rep in range(repetitions):
                    for cand in todo[rep % len(todo) :] + todo[: rep % len(todo)]:
                        bar.set_postfix_str(f"{cand.label} {k}->{n} b{batch} t{t} {mode} #{rep + 1}")
                        blob, nodes, per_node = graphs[cand]
                        try:
                            times = profiled_node_times(blob, nodes, cand, t, a, runs)
                        except Exception as e:  # the tvm path has kernels for the tuned shapes only
                            if cand.path != "tvm" or "no tuned TVM kernel" not in str(e):
                                raise
                            bar.update()
                            continue
                        median = statistics.median(times)
                        timings.append(Timing(cand.label, k, n, batch, t, mode, median, per_node, rep))
                        bar.update()
    return timings


def spread(values: list[float], digits: int = 2, unit: str = "") -> str:
    """The median of ``values``, and their range when they differ: ``1.23 (1.18–1.30)``, ``61% (58–64%)``."""
    median = f"{statistics.median(values):.{digits}f}{unit}"
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return median if low == high else f"{median} ({low}–{high}{unit})"


def ratio_rows(
    timings: list[Timing], paths: list[str], bandwidth: dict[int, float] | None = None
) -> tuple[list[str], list[list[object]]]:
    """One row per configuration: each candidate's median µs (the median over repetitions of each
    repetition's median), then the reference format's speed-up over each of
    :data:`~sherry_export.formats.SPEED_BASELINES` on each path, as the median and range of the
    per-repetition ratios (the candidates of one repetition ran side by side). With ``bandwidth``
    (GB/s probed per thread count), the cold rows also give the share of it at which the reference
    format's kernel reads its weights on each path."""
    labels = list(dict.fromkeys(t.candidate for t in timings))
    by_config: dict[tuple, dict[str, dict[int, Timing]]] = {}
    for t in timings:
        by_config.setdefault((t.k, t.n, t.batch, t.threads, t.mode), {}).setdefault(t.candidate, {})[t.repetition] = t
    ratio_headers = [f"{b}/{REFERENCE_FORMAT}[{path}]" for path in paths for b in SPEED_BASELINES]
    share_headers = [f"{REFERENCE_FORMAT}[{path}] cold % of probe" for path in paths] if bandwidth else []
    headers = ["K->N", "batch", "threads", "weights", *[f"{label} µs" for label in labels], *ratio_headers]
    headers += share_headers
    rows = []
    for (k, n, batch, threads, mode), cands in by_config.items():
        row: list[object] = [f"{k}->{n}", batch, threads, mode]
        for c in labels:  # tvm: tuned shapes only
            row.append(round(statistics.median(t.median_us for t in cands[c].values()), 1) if c in cands else "-")
        for path in paths:
            reference = cands.get(Candidate(REFERENCE_FORMAT, path).label, {})
            for other in (cands.get(Candidate(b, path).label, {}) for b in SPEED_BASELINES):
                ratios = [other[r].median_us / reference[r].median_us for r in reference if r in other]
                row.append(spread(ratios) if ratios else "-")
        for path in paths if bandwidth else []:
            reference = cands.get(Candidate(REFERENCE_FORMAT, path).label, {})
            if mode != "cold" or not reference:
                row.append("-")
                continue
            shares = [100 * t.gb_per_s / bandwidth[threads] for t in reference.values()]
            row.append(spread(shares, 0, "%"))
        rows.append(row)
    return headers, rows


def cmd_kernels(args: argparse.Namespace) -> int:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else LLAMA_1B_SHAPES
    bandwidth = {t: read_bandwidth(t, args.bandwidth_bytes) for t in args.threads}
    timings = run_kernel_bench(
        shapes, args.threads, args.paths, args.cold_bytes, args.hot_runs, args.cold_runs, args.repetitions
    )
    headers, rows = ratio_rows(timings, args.paths, bandwidth)
    table = markdown_table(headers, rows)
    machine = machine_description()
    probes = ", ".join(f"{v:.1f} GB/s on {t} thread{'s' if t > 1 else ''}" for t, v in bandwidth.items())
    print(
        f"\n{machine}; median µs per call, from onnxruntime's profiler, over {args.repetitions} interleaved "
        f"repetitions (ratios: median and range of the per-repetition ratios); cold = batch 1 over "
        f"{args.cold_bytes / 1e9:.2f} GB of distinct weights per candidate (at most {MAX_COLD_NODES} nodes); "
        f"read bandwidth probed at {probes}\n\n{table}"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "kernels.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "cold_bytes": args.cold_bytes,
                "repetitions": args.repetitions,
                "bandwidth_gb_per_s": bandwidth,
                "timings": [asdict(t) | {"gb_per_s": t.gb_per_s} for t in timings],
            },
            indent=1,
        )
    )
    (args.output / "kernels.md").write_text(f"Machine: {machine}; read bandwidth probed at {probes}\n\n{table}\n")
    print(f"\nwrote {args.output / 'kernels.json'} and {args.output / 'kernels.md'}")
    return 0
