"""``sherry tvm-run``: compile an exported decoder with TVM (``relax_onnx``), generate greedily, and time
prefill and decode next to onnxruntime on the same export, interleaved, medians and ranges over rounds."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # onnxruntime loads when the command runs, not when its parser is built
    from sherry_export.generate import GenerationResult, OnnxCausalLM


@dataclass
class BackendSpeed:
    name: str
    tokens: list[int]
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    decode_range: tuple[float, float]
    """The slowest and fastest round's decode tok/s."""
    median_step_tokens_per_second: float
    """1 / the median decode step of all rounds: on a shared machine, what other processes' bursts move least."""


def race(
    backends: dict[str, OnnxCausalLM], prompt_ids: list[int], max_new_tokens: int, rounds: int
) -> list[BackendSpeed]:
    """Greedy generation on every backend, ``rounds`` times in turn (after one warm-up each); medians and the
    decode range."""
    results: dict[str, list[GenerationResult]] = {name: [] for name in backends}
    for lm in backends.values():
        lm.generate(prompt_ids, min(max_new_tokens, 4))
    for _ in range(rounds):
        for name, lm in backends.items():
            results[name].append(lm.generate(prompt_ids, max_new_tokens))
    return [
        BackendSpeed(
            name,
            runs[0].tokens,
            statistics.median(r.prefill_tokens_per_second for r in runs),
            statistics.median(r.decode_tokens_per_second for r in runs),
            (min(r.decode_tokens_per_second for r in runs), max(r.decode_tokens_per_second for r in runs)),
            1 / statistics.median(step for r in runs for step in r.step_seconds),
        )
        for name, runs in results.items()
    ]


def cmd_tvm_run(args: argparse.Namespace) -> int:
    from tvm_schedules.relax_onnx import RelaxCausalLM

    model_path = args.model_dir / "model.onnx"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} not found; make one with `sherry export SOURCE -o {args.model_dir}`")
    start = time.perf_counter()
    tvm_lm = RelaxCausalLM(model_path, threads=args.threads, measure_knobs=args.measure_knobs)
    tvm_lm.compile("decode")  # what generate runs on
    info = tvm_lm.info["decode"]
    print(
        f"compiled the decode module with TVM in {time.perf_counter() - start:.1f} s "
        f"(import {info.import_seconds:.1f} s, build {info.compile_seconds:.1f} s)",
        file=sys.stderr,
    )
    backends: dict[str, OnnxCausalLM] = {"tvm": tvm_lm}
    if args.compare_onnxruntime:
        from sherry_export.generate import OnnxCausalLM

        backends["onnxruntime"] = OnnxCausalLM(model_path, threads=args.threads)
    tvm_lm.check_length(len(args.prompt_ids) + args.max_new_tokens - 1)
    speeds = race(backends, args.prompt_ids, args.max_new_tokens, args.rounds)
    print("tokens:", " ".join(str(t) for t in speeds[0].tokens))
    print(
        f"| backend | prefill tok/s ({len(args.prompt_ids)} tokens) | decode tok/s (median) | decode range "
        f"({args.rounds} rounds) | 1 / median step | threads |"
    )
    print("|---|---|---|---|---|---|")
    for s in speeds:
        low, high = s.decode_range
        print(
            f"| {s.name} | {s.prefill_tokens_per_second:.1f} | {s.decode_tokens_per_second:.1f} "
            f"| {low:.0f}-{high:.0f} | {s.median_step_tokens_per_second:.0f} | {args.threads} |"
        )
    if len(speeds) > 1:
        ratio = speeds[0].decode_tokens_per_second / speeds[1].decode_tokens_per_second
        print(f"decode, tvm / onnxruntime: {ratio:.2f}x")
    if len(speeds) > 1 and speeds[0].tokens != speeds[1].tokens:
        first = next(i for i, (a, b) in enumerate(zip(*(s.tokens for s in speeds), strict=False)) if a != b)
        print(f"note: the greedy tokens differ from onnxruntime's from position {first} on", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from sherry_export.arguments import positive_int, thread_count, token_ids

    p = subparsers.add_parser(
        "tvm-run",
        description=__doc__,
        epilog="example: sherry tvm-run out/ship --prompt-ids 1,2,3,4 --compare-onnxruntime --threads 1",
    )
    p.add_argument("model_dir", type=Path, help="a folder written by `sherry export`, in any format")
    p.add_argument("--prompt-ids", type=token_ids, required=True, help="the prompt as token ids, e.g. 1,450,3681")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--threads", type=thread_count, default=1, help="threads for both backends (default: 1)")
    p.add_argument("--rounds", type=positive_int, default=5, help="timed generations per backend (default: 5)")
    p.add_argument("--compare-onnxruntime", action="store_true", help="time onnxruntime on the same export too")
    p.add_argument(
        "--measure-knobs",
        action="store_true",
        help="time every kernel knob candidate per shape at compile time instead of the tuning database/default",
    )
    p.set_defaults(func=cmd_tvm_run)
