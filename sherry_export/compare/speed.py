"""Prefill and decode speed of exported decoders, side by side in one run.

Every format runs in the same loop: repetition after repetition, thread count after thread count,
every format once each (in a rotated order), so drift in the machine's load hits all formats alike;
ratios are taken within a repetition, then their median is reported. Each measurement gets a fresh
session (the thread count is fixed when a session starts, and this keeps only one model's weights in
memory at a time) and one warm-up generation before the timed one.

Repetition 0 is the profiled pass: onnxruntime's profiler records every node of a few decode steps,
grouped by op type (the LM head apart), and its times are not used for speed. The machine's memory
read bandwidth is probed in the same loop (``sherry_export.bandwidth``), with the same thread counts,
so the fractions of it that the decode step and its projections reach compare like with like.
"""

from __future__ import annotations

import bisect
import os
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sherry_export.bandwidth import read_bandwidth
from sherry_export.compare.accounting import LM_HEAD_NODE
from sherry_export.compare.settings import SpeedSettings
from sherry_export.generate import GenerationResult, OnnxCausalLM
from sherry_export.profiling import kernel_events, read_profile

LM_HEAD_GROUP = "LM head"
OUTSIDE_NODES = "outside nodes"
"""Decode step time not inside any node: session overhead, input binding, sampling, Python."""
WARM_UP_RUNS = 3
"""Session runs of the warm-up generation before each measured one."""


@dataclass
class Timing:
    """One timed generation: a ``prompt_tokens`` prefill, then ``decode_steps`` single-token steps."""

    format: str
    threads: int
    repetition: int
    prefill_seconds: float
    step_seconds: list[float]

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(self.step_seconds)


@dataclass
class Profile:
    """Median µs per decode step in each op group (op type, the LM head, outside nodes), from the profiled pass."""

    format: str
    threads: int
    step_us: dict[str, float]


@dataclass
class SpeedResults:
    settings: SpeedSettings
    timings: list[Timing] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    bandwidth_gb_per_s: dict[int, list[float]] = field(default_factory=dict)
    """Every bandwidth probe per thread count; the best is the machine's figure."""

    def _of(self, fmt: str, threads: int) -> list[Timing]:
        return [t for t in self.timings if t.format == fmt and t.threads == threads]

    def prefill_tokens_per_s(self, fmt: str, threads: int) -> float:
        seconds = statistics.median(t.prefill_seconds for t in self._of(fmt, threads))
        return self.settings.prompt_tokens / seconds

    def decode_tokens_per_s(self, fmt: str, threads: int) -> float:
        """1 / the median over repetitions of each repetition's median step time."""
        return 1.0 / statistics.median(t.median_step_seconds for t in self._of(fmt, threads))

    def decode_range(self, fmt: str, threads: int) -> tuple[float, float]:
        """Slowest and fastest repetition, in decode tokens/s: the run's noise."""
        rates = [1.0 / t.median_step_seconds for t in self._of(fmt, threads)]
        return min(rates), max(rates)

    def _paired_ratio(self, ours: list[Timing], theirs: list[Timing]) -> float:
        """Median over repetitions of our decode tokens/s over theirs, both from that repetition."""
        mine = {t.repetition: t.median_step_seconds for t in ours}
        other = {t.repetition: t.median_step_seconds for t in theirs}
        return statistics.median(other[r] / mine[r] for r in mine)

    def speedup(self, fmt: str, baseline: str, threads: int) -> float:
        """Median over repetitions of fmt's decode tokens/s over baseline's, both from that repetition."""
        return self._paired_ratio(self._of(fmt, threads), self._of(baseline, threads))

    def bandwidth(self, threads: int) -> float:
        return max(self.bandwidth_gb_per_s[threads])

    def thread_scaling(self, fmt: str, threads: int, base: int = 1) -> float:
        """Median over repetitions of fmt's decode tokens/s on ``threads`` over that on ``base`` threads."""
        return self._paired_ratio(self._of(fmt, threads), self._of(fmt, base))

    def profile(self, fmt: str, threads: int) -> Profile | None:
        return next((p for p in self.profiles if p.format == fmt and p.threads == threads), None)


def run_generation(lm: OnnxCausalLM, prompt: list[int], steps: int) -> GenerationResult:
    """A warm-up generation (allocations, first touches), then the timed one: prefill plus ``steps`` steps.

    Both decode in the same preallocated KV buffer, sized for the timed one.
    """
    lm.decoder(len(prompt) + steps)
    lm.generate(prompt, WARM_UP_RUNS)  # n tokens = a prefill and n - 1 decode runs
    return lm.generate(prompt, steps + 1)


def decode_op_times(events: list[dict], warm_runs: int, step_seconds: list[float]) -> dict[str, float]:
    """Median µs per decode step of each op group, and of the time outside nodes, from a profile.

    The profile holds ``warm_runs`` runs, a prefill, then one run per entry of ``step_seconds`` (their
    wall-clock times). Node events are assigned to runs by the session's ``model_run`` start times;
    medians over the steps keep one slow step (another process, a page fault) from skewing the shares.
    """
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first = warm_runs + 1
    per_step: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(step_seconds))
    for event in kernel_events(events):
        step = bisect.bisect_right(starts, event["ts"]) - 1 - first
        if 0 <= step < len(step_seconds):
            node = event["name"].removesuffix("_kernel_time")
            group = LM_HEAD_GROUP if node == LM_HEAD_NODE else event["args"]["op_name"]
            per_step[group][step] += float(event["dur"])
    inside = [sum(times[i] for times in per_step.values()) for i in range(len(step_seconds))]
    per_step[OUTSIDE_NODES] = [max(0.0, 1e6 * wall - node) for wall, node in zip(step_seconds, inside, strict=True)]
    return {group: statistics.median(times) for group, times in per_step.items()}


def profile_decode(model_path: Path, fmt: str, threads: int, prompt: list[int], steps: int) -> Profile:
    """Node times of ``steps`` profiled decode steps, grouped, plus the time outside nodes."""
    with tempfile.TemporaryDirectory() as tmp:
        lm = OnnxCausalLM(model_path, threads=threads, profile_prefix=os.path.join(tmp, "profile"))
        result = run_generation(lm, prompt, steps)
        events = read_profile(lm.session.end_profiling())
    return Profile(fmt, threads, decode_op_times(events, WARM_UP_RUNS, result.step_seconds))


def rotated(items: Sequence[str], by: int) -> list[str]:
    """``items`` starting at position ``by``: each repetition runs the formats in another order."""
    by %= len(items)
    return [*items[by:], *items[:by]]


def measure_speed(
    models: dict[str, Path], threads: Sequence[int], settings: SpeedSettings, vocab_size: int
) -> SpeedResults:
    """Profile, then time, every format at every thread count, interleaved; probe bandwidth alongside."""
    rng = np.random.default_rng(settings.seed)
    prompt = rng.integers(0, vocab_size, settings.prompt_tokens).tolist()
    results = SpeedResults(settings)
    formats = list(models)
    total = (settings.repetitions + 1) * len(threads) * len(formats)
    with tqdm(total=total, desc="speed", unit="run") as bar:
        for rep in range(settings.repetitions + 1):
            for t in threads:
                results.bandwidth_gb_per_s.setdefault(t, []).append(read_bandwidth(t, settings.bandwidth_bytes))
                for fmt in rotated(formats, rep):
                    bar.set_postfix_str(f"{'profile' if rep == 0 else f'rep {rep}'} {fmt} t{t}")
                    if rep == 0:
                        results.profiles.append(profile_decode(models[fmt], fmt, t, prompt, settings.profile_steps))
                    else:
                        lm = OnnxCausalLM(models[fmt], threads=t)
                        result = run_generation(lm, prompt, settings.decode_steps)
                        del lm  # freed before the next session loads its weights
                        results.timings.append(Timing(fmt, t, rep, result.prefill_seconds, result.step_seconds))
                    bar.update()
    return results
