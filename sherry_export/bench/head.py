"""``sherry bench head``: the LM head alone, one node per head type, against the probed read bandwidth.

Each candidate is the node the exporter emits for ``--lm-head`` (``emit_lm_head``) on random codes of the
head's shape (LLaMA-3.2-1B's 128256 x 2048 by default): ``MatMulNBits`` 8- or 4-bit (block and
accuracy_level as given; the exporter's are block 32, level 4) and our ``Int8MatMul`` (group 32). At
batch 1 the head reads its whole table every call, far more than the caches hold, so every call is cold.
Candidates and thread counts run interleaved, round after round in rotated order, with a bandwidth probe
(``sherry_export.bandwidth``) per thread count each round; a call's time is the wall clock of
``run_with_iobinding`` on bound input and output arrays.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sherry_export.bandwidth import read_bandwidth
from sherry_export.export.graph import FLOAT, GraphBuilder
from sherry_export.export.llama import LM_HEAD_BLOCK, PackedTable, Table, emit_lm_head
from sherry_export.export.projections import nbits_weight
from sherry_export.formats import HEAD_FORMATS, Ternary, pack
from sherry_export.report import markdown_table
from sherry_export.runtime import make_session


@dataclass(frozen=True)
class Candidate:
    head: str
    block: int
    accuracy_level: int

    @property
    def label(self) -> str:
        if self.head in HEAD_FORMATS:
            return f"{self.head} (group {self.block})"
        return f"{self.head} (block {self.block}, accuracy_level {self.accuracy_level})"


def head_model(candidate: Candidate, vocab: int, hidden: int, rng: np.random.Generator) -> tuple[bytes, int]:
    """A graph of the one LM head node on random codes, serialized, and the weight bytes it reads per call."""
    b = GraphBuilder("head")
    x = b.add_input("x", FLOAT, [1, 1, hidden])
    groups = -(-hidden // candidate.block)
    scales = (rng.random((vocab, groups), dtype=np.float32) * 0.01).astype(np.float16).astype(np.float32)
    table: Table
    if candidate.head in HEAD_FORMATS:
        values = rng.integers(-127, 128, (vocab, hidden), dtype=np.int8)
        packed = pack(candidate.head, Ternary(values, scales), candidate.block)
        table = PackedTable(
            candidate.head,
            b.initializer("lm_head.B", packed.data),
            b.initializer("lm_head.scales", packed.scales),
            vocab,
            hidden,
            candidate.block,
        )
        nbytes = packed.nbytes
    else:
        bits = int(candidate.head.removeprefix("nbits"))
        codes = rng.integers(0, 1 << bits, (vocab, hidden), dtype=np.uint8)
        table = nbits_weight(b, "lm_head", codes, scales, bits, candidate.block)
        nbytes = vocab * groups * candidate.block * bits // 8 + scales.nbytes
    b.add_output(emit_lm_head(b, x, table), "logits", FLOAT, [1, 1, vocab])
    model = ir.to_proto(b.model())
    for node in model.graph.node:  # the accuracy_level under test (the exporter's is NBITS_ACCURACY_LEVEL)
        for attribute in node.attribute:
            if attribute.name == "accuracy_level":
                attribute.i = candidate.accuracy_level
    return model.SerializeToString(), nbytes


def cmd_head(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(0)
    blocks = args.blocks or [LM_HEAD_BLOCK]
    candidates = [
        Candidate(head, block, level if head not in HEAD_FORMATS else 0)
        for head in args.heads
        for block in blocks
        for level in (args.accuracy_levels if head not in HEAD_FORMATS else [0])
    ]
    candidates = list(dict.fromkeys(candidates))
    sessions = {}
    for candidate in candidates:
        blob, nbytes = head_model(candidate, args.vocab, args.hidden, rng)
        for threads in args.threads:
            session = make_session(blob, threads=threads)
            binding = session.io_binding()
            x = rng.standard_normal((1, 1, args.hidden), dtype=np.float32)
            y = np.empty((1, 1, args.vocab), np.float32)
            binding.bind_cpu_input("x", x)
            binding.bind_output("logits", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
            session.run_with_iobinding(binding)  # warm-up: first touches, thread pool start
            sessions[candidate, threads] = (session, binding, nbytes, x, y)
        del blob
    times: dict[tuple[Candidate, int], list[float]] = {key: [] for key in sessions}
    probes: dict[int, list[float]] = {t: [] for t in args.threads}
    keys = list(sessions)
    for r in range(args.rounds):
        for threads in args.threads:
            probes[threads].append(read_bandwidth(threads))
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            session, binding = sessions[key][:2]
            for _ in range(args.runs):
                start = time.perf_counter()
                session.run_with_iobinding(binding)
                times[key].append(time.perf_counter() - start)
    rows = []
    for (candidate, threads), seconds in times.items():
        nbytes = sessions[candidate, threads][2]
        median, fastest = statistics.median(seconds), min(seconds)
        best = max(probes[threads])
        rows.append(
            [
                candidate.label,
                threads,
                f"{nbytes / 1e6:.1f}",
                f"{median * 1e3:.2f}",
                f"{fastest * 1e3:.2f}",
                f"{nbytes / median / 1e9:.1f}",
                f"{nbytes / median / 1e9 / best:.0%}",
                f"{nbytes / fastest / 1e9 / best:.0%}",
            ]
        )
    headers = ["head", "threads", "MB read", "median ms", "min ms", "GB/s (median)", "% of probe", "% of probe (min)"]
    print(markdown_table(headers, rows))
    print()
    print(
        markdown_table(
            ["threads", "best probe GB/s", "worst probe GB/s"],
            [[t, f"{max(p):.1f}", f"{min(p):.1f}"] for t, p in probes.items()],
        )
    )
    return 0
