"""The comparison report: ``report.md``, ``results.json`` and two plots, from one :class:`CompareResults`.

Tables are built as rows here and printed by :func:`sherry_export.report.markdown_table`; speed-ups
are Sherry's decode tokens/s over each baseline's, from the same repetition (see ``speed.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sherry_export.compare.accounting import TERNARY_OPS, ModelAccounting
from sherry_export.compare.accuracy import Evaluation
from sherry_export.compare.speed import LM_HEAD_GROUP, OUTSIDE_NODES, SpeedResults
from sherry_export.formats import REFERENCE_FORMAT, SPEED_TARGETS
from sherry_export.report import markdown_table

TARGET_THREADS = 2
BANDWIDTH_TARGET = 0.75
"""Sherry's decode step should read at this fraction of the probed memory read bandwidth, on 1 and 2 threads."""
BANDWIDTH_TARGET_THREADS = (1, 2)
SCALING_TARGET = 1.8
"""Sherry's decode tokens/s on 2 threads over 1 thread."""
MB = 1e6
PROJECTION_OPS = TERNARY_OPS | {"MatMulNBits", "MatMul"}
"""Op types of the projections in the profile (the LM head's node is grouped apart before this)."""


@dataclass
class CompareResults:
    model: str
    source: str
    provenance: str
    machine: str
    date: str
    settings: dict
    formats: list[str]
    sizes: dict[str, ModelAccounting]
    speed: SpeedResults | None = None
    accuracy: list[Evaluation] = field(default_factory=list)
    eval_sizes: dict[str, int] = field(default_factory=dict)
    """Documents per task and scored tokens per corpus actually used."""


@dataclass(frozen=True)
class DecodeBandwidth:
    """How close one format's decode comes to the probed read bandwidth on one thread count.

    The step: bytes read per step (every weight, one embedding row and the KV cache at the middle
    timed step's context) over the median step time. The projections and the LM head: their weight
    bytes over their node time per step in the profiled pass (None without a profile of that node).
    """

    step_bytes: float
    step_gb_per_s: float
    step_fraction: float
    projections_gb_per_s: float | None
    projections_fraction: float | None
    lm_head_ms: float | None
    """The LM head's node time per decode step in the profiled pass (ms)."""
    lm_head_gb_per_s: float | None
    lm_head_fraction: float | None
    scaling: float | None
    """Decode tokens/s on these threads over 1 thread (None on 1 thread, or when 1 thread was not run)."""


def decode_bandwidth(results: CompareResults, fmt: str, threads: int) -> DecodeBandwidth:
    speed, size = results.speed, results.sizes[fmt]
    probe = speed.bandwidth(threads)
    step_bytes = size.step_bytes(speed.settings.decode_context(speed.settings.decode_steps))
    step = step_bytes * speed.decode_tokens_per_s(fmt, threads) / 1e9
    profile = speed.profile(fmt, threads)

    def rate(nbytes: int, step_us: float) -> float | None:
        return nbytes / step_us / 1e3 if step_us > 0 else None  # bytes per µs / 1e3 = GB/s

    projections = lm_head = lm_head_ms = None
    if profile is not None:
        projections = rate(size.projections.total_bytes, _projection_us(profile.step_us))
        head_us = profile.step_us.get(LM_HEAD_GROUP, 0.0)
        lm_head = rate(size.lm_head.total_bytes, head_us)
        lm_head_ms = head_us / 1e3 if head_us > 0 else None
    scaling = speed.thread_scaling(fmt, threads) if threads != 1 and 1 in speed.bandwidth_gb_per_s else None
    return DecodeBandwidth(
        step_bytes=step_bytes,
        step_gb_per_s=step,
        step_fraction=step / probe,
        projections_gb_per_s=projections,
        projections_fraction=None if projections is None else projections / probe,
        lm_head_ms=lm_head_ms,
        lm_head_gb_per_s=lm_head,
        lm_head_fraction=None if lm_head is None else lm_head / probe,
        scaling=scaling,
    )


def _projection_us(step_us: dict[str, float]) -> float:
    return sum(us for op, us in step_us.items() if op in PROJECTION_OPS)


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{fraction:.0%}"


def size_table(results: CompareResults) -> str:
    rows = []
    for fmt, a in results.sizes.items():
        rows.append(
            [
                fmt,
                round(a.file_bytes / MB, 2),
                a.projections.weights,
                round(a.projections.code_bits_per_weight, 4),
                round(a.projections.bits_per_weight, 4),
                round(a.projections.total_bytes / MB, 2),
                round(a.lm_head.bits_per_weight, 3),
                round(a.lm_head.total_bytes / MB, 2),
                round(a.decode_weight_bytes / MB, 2),
            ]
        )
    headers = [
        "format",
        "file MB",
        "projection weights",
        "code bits/weight",
        "bits/weight incl. scales",
        "projections MB",
        "LM head bits/weight",
        "LM head MB",
        "read per decode step MB",
    ]
    return markdown_table(headers, rows)


def _baselines(results: CompareResults) -> list[str]:
    return [f for f in results.formats if f != REFERENCE_FORMAT] if REFERENCE_FORMAT in results.formats else []


def paper_table(results: CompareResults) -> str:
    """Decode tokens/s per format and thread count, then Sherry's speed-up over each baseline."""
    speed = results.speed
    baselines = _baselines(results)
    headers = ["threads", *[f"{f} tok/s" for f in results.formats], *[f"{REFERENCE_FORMAT}/{b}" for b in baselines]]
    rows = []
    for t in speed.bandwidth_gb_per_s:
        row: list[object] = [t, *[f"{speed.decode_tokens_per_s(f, t):.2f}" for f in results.formats]]
        rows.append(row + [f"{speed.speedup(REFERENCE_FORMAT, b, t):.3f}x" for b in baselines])
    return markdown_table(headers, rows)


def speed_detail_table(results: CompareResults) -> str:
    speed = results.speed
    headers = [
        "threads",
        "format",
        "prefill tok/s",
        "decode tok/s",
        "decode range (reps)",
        "ms/token",
        "× 1-thread decode",
        "step MB read",
        "step GB/s",
        "step % of probe",
        "projections % of probe",
        "LM head ms",
        "LM head % of probe",
    ]
    rows = []
    for t in speed.bandwidth_gb_per_s:
        for fmt in results.formats:
            rate = speed.decode_tokens_per_s(fmt, t)
            low, high = speed.decode_range(fmt, t)
            b = decode_bandwidth(results, fmt, t)
            rows.append(
                [
                    t,
                    fmt,
                    f"{speed.prefill_tokens_per_s(fmt, t):.1f}",
                    f"{rate:.2f}",
                    f"{low:.2f}–{high:.2f}",
                    f"{1000 / rate:.3f}",
                    "" if b.scaling is None else f"{b.scaling:.2f}",
                    f"{b.step_bytes / MB:.2f}",
                    f"{b.step_gb_per_s:.2f}",
                    _percent(b.step_fraction),
                    _percent(b.projections_fraction),
                    "" if b.lm_head_ms is None else f"{b.lm_head_ms:.3f}",
                    _percent(b.lm_head_fraction),
                ]
            )
    return markdown_table(headers, rows)


def op_share_table(results: CompareResults) -> str:
    """Per format and thread count, the share of a profiled decode step in each part of the graph.

    The projections are whichever matmul op the format uses; every op type's own time is in results.json.
    """
    rows = []
    for p in results.speed.profiles:
        step = sum(p.step_us.values())
        projections = _projection_us(p.step_us)
        attention = p.step_us.get("GroupQueryAttention", 0.0)
        head, outside = p.step_us.get(LM_HEAD_GROUP, 0.0), p.step_us.get(OUTSIDE_NODES, 0.0)
        other = step - projections - attention - head - outside
        parts = [projections, head, attention, other, outside]
        rows.append([p.threads, p.format, f"{step / 1000:.3f}", *[f"{v / step:.1%}" for v in parts]])
    headers = [
        "threads",
        "format",
        "profiled step ms",
        "projections",
        LM_HEAD_GROUP,
        "attention",
        "other ops",
        OUTSIDE_NODES,
    ]
    return markdown_table(headers, rows)


def bandwidth_table(results: CompareResults) -> str:
    speed = results.speed
    rows = [
        [t, round(max(v), 2), round(min(v), 2), len(v), f"{speed.settings.bandwidth_bytes / 1e9:.2f}"]
        for t, v in speed.bandwidth_gb_per_s.items()
    ]
    return markdown_table(["threads", "best GB/s", "worst GB/s", "probes", "buffer GB"], rows)


def target_rows(results: CompareResults) -> list[list[object]]:
    """The project's speed targets against this run's measurements (where the formats and threads were run)."""
    speed = results.speed
    if speed is None or REFERENCE_FORMAT not in results.formats:
        return []
    rows: list[list[object]] = []
    if TARGET_THREADS in speed.bandwidth_gb_per_s:
        for baseline, goal in SPEED_TARGETS.items():
            if baseline in results.formats:
                value = speed.speedup(REFERENCE_FORMAT, baseline, TARGET_THREADS)
                rows.append(
                    [f"{REFERENCE_FORMAT}/{baseline} decode tok/s", f">= {goal}", f"{value:.3f}", _met(value >= goal)]
                )
    for t in BANDWIDTH_TARGET_THREADS:
        if t in speed.bandwidth_gb_per_s:
            fraction = decode_bandwidth(results, REFERENCE_FORMAT, t).step_fraction
            rows.append(
                [
                    f"{REFERENCE_FORMAT} decode step, share of the probed bandwidth ({t} thread{'s' if t > 1 else ''})",
                    f">= {BANDWIDTH_TARGET:.0%}",
                    f"{fraction:.1%}",
                    _met(fraction >= BANDWIDTH_TARGET),
                ]
            )
    if TARGET_THREADS in speed.bandwidth_gb_per_s and 1 in speed.bandwidth_gb_per_s:
        scaling = speed.thread_scaling(REFERENCE_FORMAT, TARGET_THREADS)
        rows.append(
            [
                f"{REFERENCE_FORMAT} decode tok/s, {TARGET_THREADS} threads / 1 thread",
                f">= {SCALING_TARGET}",
                f"{scaling:.2f}",
                _met(scaling >= SCALING_TARGET),
            ]
        )
    return rows


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _with_se(value: float, se: float) -> str:
    return f"{value:.4f} ± {se:.4f}" if not math.isnan(se) else f"{value:.4f}"


def accuracy_table(results: CompareResults) -> str:
    rows_in = results.accuracy
    corpora = list(rows_in[0].perplexity)
    tasks = list(rows_in[0].tasks)
    normed = [t for t in tasks if rows_in[0].tasks[t].acc_norm is not None]
    headers = [
        "model",
        "backend",
        "bits/weight",
        *[f"ppl {c}" for c in corpora],
        *[f"{t} acc" for t in tasks],
        *([] if not tasks else ["mean acc"]),
        *[f"{t} acc_norm" for t in normed],
    ]
    rows = []
    for e in rows_in:
        size = results.sizes.get(e.label) if e.backend == "onnxruntime" else None
        rows.append(
            [
                e.label,
                e.backend,
                "" if size is None else round(size.projections.bits_per_weight, 3),
                *[round(e.perplexity[c].value, 3) for c in corpora],
                *[_with_se(e.tasks[t].acc, e.tasks[t].acc_stderr) for t in tasks],
                *([] if not tasks else [round(e.mean_acc, 4)]),
                *[_with_se(e.tasks[t].acc_norm, e.tasks[t].acc_norm_stderr) for t in normed],
            ]
        )
    return markdown_table(headers, rows)


def headline_table(results: CompareResults) -> str:
    """One row per format: size, decode speed on the most threads and Sherry's speed-up, accuracy;
    then the PyTorch rows (the trained dense-ternary and full-precision models) that have accuracy."""
    threads = max(results.speed.bandwidth_gb_per_s) if results.speed is not None else None
    accuracy = {e.label: e for e in results.accuracy}
    corpora = list(results.accuracy[0].perplexity) if results.accuracy else []
    headers = ["model", "bits/weight incl. scales", "file MB"]
    if threads is not None:
        headers += [f"decode tok/s ({threads} thr)", f"{REFERENCE_FORMAT} speed-up"]
    headers += ["mean held-out ppl", "mean zero-shot acc"] if results.accuracy else []

    def accuracy_cells(e: Evaluation | None) -> list[object]:
        if not results.accuracy:
            return []
        if e is None:
            return ["", ""]
        ppl = math.exp(sum(math.log(e.perplexity[c].value) for c in corpora) / len(corpora)) if corpora else None
        return ["" if ppl is None else round(ppl, 2), "" if e.mean_acc is None else round(e.mean_acc, 4)]

    rows = []
    for fmt, a in results.sizes.items():
        row: list[object] = [fmt, round(a.projections.bits_per_weight, 3), round(a.file_bytes / MB, 2)]
        if threads is not None:
            speedup = (
                ""
                if fmt == REFERENCE_FORMAT or REFERENCE_FORMAT not in results.formats
                else (f"{results.speed.speedup(REFERENCE_FORMAT, fmt, threads):.3f}x")
            )
            row += [f"{results.speed.decode_tokens_per_s(fmt, threads):.1f}", speedup]
        rows.append(row + accuracy_cells(accuracy.get(fmt)))
    for e in results.accuracy:
        if e.backend == "pytorch":
            rows.append([e.label, "", "", *([""] * 2 if threads is not None else []), *accuracy_cells(e)])
    return markdown_table(headers, rows)


def markdown_report(results: CompareResults) -> str:
    s = results.settings
    parts = [
        f"# Comparison: {results.source}",
        "",
        f"- model: `{results.model}` ({results.provenance})",
        f"- machine: {results.machine}",
        f"- date: {results.date}",
        f"- formats: {', '.join(results.formats)}; LM head {s['lm_head']} in all; group size {s['group_size']}",
        "",
        "## Headline",
        "",
        "Perplexity is the geometric mean over the held-out corpora, accuracy the mean over the zero-shot tasks; "
        "details below.",
        "",
        headline_table(results),
        "",
        "## Size",
        "",
        "Projections are the attention and MLP linears; bits per weight from the packed initializers in "
        "the file. A decode step reads every weight once and one row of the embedding and rotary tables.",
        "",
        size_table(results),
    ]
    if results.speed is not None:
        sp = results.speed.settings
        parts += [
            "",
            "## Speed",
            "",
            f"Prefill: a {sp.prompt_tokens}-token prompt. Decode: {sp.decode_steps} steps after it, median step. "
            f"{sp.repetitions} repetitions, formats interleaved in rotated order; each figure is the median over "
            "repetitions, speed-ups the median of per-repetition ratios. A fresh session and a warm-up "
            "generation precede every measurement.",
            "",
            paper_table(results),
            "",
            speed_detail_table(results),
            "",
            "### Where decode time goes",
            "",
            f"onnxruntime profiler, {sp.profile_steps} decode steps in a separate pass; node time by op type, "
            f"the LM head apart, and the rest of the wall-clock step ({OUTSIDE_NODES}).",
            "",
            op_share_table(results),
            "",
            "### Memory bandwidth",
            "",
            "Probed in the same run, before each thread count's models: as many threads as the decode runs "
            "with each read a buffer of their own (an int64 sum, STREAM-style, started together, pinned to "
            "distinct CPUs in every other pass); the best pass of the best probe is the machine's figure "
            "(`sherry_export/bandwidth.py`). In the speed table: step MB read = every weight a decode step "
            "reads (LM head and one embedding row included) plus the KV cache at the middle timed step's "
            f"context ({sp.decode_context(sp.decode_steps):g} positions); step GB/s = that over the median "
            "step time; LM head ms = the head node's time per step in the profiled pass; projections and LM "
            "head % of probe = their weight bytes over their node time in the profiled pass; × 1-thread "
            "decode = decode tok/s over 1 thread's, median of per-repetition ratios.",
            "",
            bandwidth_table(results),
        ]
        targets = target_rows(results)
        if targets:
            parts += [
                "",
                "### Targets",
                "",
                f"Defined for the LLaMA-3.2-1B shape with the same LM head in every format: speed-ups on "
                f"{TARGET_THREADS} threads, the step's share of the probed bandwidth on "
                f"{' and '.join(map(str, BANDWIDTH_TARGET_THREADS))} threads, and the {TARGET_THREADS}-thread scaling.",
                "",
                markdown_table(["target", "goal", "measured", "status"], targets),
            ]
        parts += ["", "![decode and prefill speed vs bits per weight](latency_vs_bpw.png)"]
    if results.accuracy:
        sizes = ", ".join(f"{k} {v}" for k, v in results.eval_sizes.items())
        parts += [
            "",
            "## Accuracy",
            "",
            f"Subset sizes (documents per task, scored tokens per corpus): {sizes}. Zero-shot `acc` as "
            "lm-evaluation-harness defines it, ± standard error; perplexity on held-out text in sliding "
            f"windows of {s['window']} tokens (stride {s['stride']}). onnxruntime rows run the exported models "
            "(ternary formats with int8 activations, as the kernels compute; fp32 in float); PyTorch rows "
            "run float activations (a QAT model's ternary weights included).",
            "",
            accuracy_table(results),
            "",
            "![accuracy vs bits per weight](accuracy_vs_bpw.png)",
        ]
    return "\n".join(parts) + "\n"


def results_json(results: CompareResults) -> dict:
    data = asdict(results)
    for fmt, a in results.sizes.items():
        for part in ("projections", "lm_head"):
            data["sizes"][fmt][part] |= {
                "code_bits_per_weight": getattr(a, part).code_bits_per_weight,
                "bits_per_weight": getattr(a, part).bits_per_weight,
            }
    if results.speed is not None:
        speed = results.speed
        data["speed"]["summary"] = [
            {
                "format": f,
                "threads": t,
                "prefill_tokens_per_s": speed.prefill_tokens_per_s(f, t),
                "decode_tokens_per_s": speed.decode_tokens_per_s(f, t),
                "weights_gb_per_s": results.sizes[f].achieved_gb_per_s(1 / speed.decode_tokens_per_s(f, t)),
                "bandwidth_gb_per_s": speed.bandwidth(t),
                **asdict(decode_bandwidth(results, f, t)),
                **{
                    f"speedup_vs_{b}": speed.speedup(REFERENCE_FORMAT, b, t)
                    for b in _baselines(results)
                    if f == REFERENCE_FORMAT
                },
            }
            for t in speed.bandwidth_gb_per_s
            for f in results.formats
        ]
    for row, e in zip(data["accuracy"], results.accuracy, strict=True):
        row["mean_acc"] = e.mean_acc
        for name, p in e.perplexity.items():
            row["perplexity"][name]["value"] = p.value
    return data


def _bpw_axis(ax) -> None:
    """A log-2 bits-per-weight axis labelled in plain numbers (1.25 … 32 spans formats unevenly)."""
    from matplotlib.ticker import ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("projection bits per weight (incl. scales)")
    ax.grid(alpha=0.3)


def plot_speed(results: CompareResults, path: Path) -> None:
    import matplotlib.pyplot as plt

    speed = results.speed
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, what, rate in (
        (axes[0], "decode", speed.decode_tokens_per_s),
        (axes[1], "prefill", speed.prefill_tokens_per_s),
    ):
        for t in speed.bandwidth_gb_per_s:
            xs = [results.sizes[f].projections.bits_per_weight for f in results.formats]
            ys = [rate(f, t) for f in results.formats]
            ax.plot(xs, ys, "o", label=f"{t} thread{'s' if t > 1 else ''}")
            for f, x, y in zip(results.formats, xs, ys, strict=True):
                ax.annotate(f, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        _bpw_axis(ax)
        ax.set_ylabel(f"{what} tokens/s")
        ax.set_title(f"{what} speed")
        ax.legend()
    fig.suptitle(results.source, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(results: CompareResults, path: Path) -> None:
    """Mean zero-shot acc and perplexity against bits per weight; PyTorch rows as horizontal lines."""
    import matplotlib.pyplot as plt

    onnx_rows = [e for e in results.accuracy if e.backend == "onnxruntime"]
    other_rows = [e for e in results.accuracy if e.backend != "onnxruntime"]
    first_corpus = next(iter(results.accuracy[0].perplexity))
    panels = [("perplexity", lambda e: e.perplexity[first_corpus].value, f"perplexity ({first_corpus})")]
    if results.accuracy[0].tasks:
        panels.insert(0, ("accuracy", lambda e: e.mean_acc, "mean zero-shot acc"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, value, ylabel) in zip(axes[0], panels, strict=True):
        xs = [results.sizes[e.label].projections.bits_per_weight for e in onnx_rows]
        ys = [value(e) for e in onnx_rows]
        ax.plot(xs, ys, "o")
        for e, x, y in zip(onnx_rows, xs, ys, strict=True):
            ax.annotate(e.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for i, e in enumerate(other_rows):
            ax.axhline(value(e), linestyle="--", color=f"C{i + 1}", label=e.label)
        _bpw_axis(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if other_rows:
            ax.legend(fontsize=8)
    fig.suptitle(results.source, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: CompareResults, out_dir: Path) -> list[Path]:
    """Write report.md, results.json and the plots into ``out_dir``; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "report.md", out_dir / "results.json"]
    files[0].write_text(markdown_report(results))
    files[1].write_text(json.dumps(results_json(results), indent=1, default=str))
    if results.speed is not None:
        files.append(out_dir / "latency_vs_bpw.png")
        plot_speed(results, files[-1])
    if results.accuracy:
        files.append(out_dir / "accuracy_vs_bpw.png")
        plot_accuracy(results, files[-1])
    return files
