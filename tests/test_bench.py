"""``sherry bench``: the cold graphs really hold distinct weights, and the kernel benchmark runs end to end
at a tiny size (its full run, minutes long, stays out of CI)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from sherry_export.bench.kernels import (
    Candidate,
    Timing,
    bench_model,
    candidates,
    projection_for,
    ratio_rows,
    replicate,
)
from sherry_export.cli import main
from sherry_export.formats import EXPORT_FORMATS, FORMATS, NBITS_FORMATS, pack
from sherry_export.runtime import get_library_path, make_session

K, N = 256, 64


@pytest.fixture(scope="module", autouse=True)
def library() -> None:
    """Fail every test with the fix (`make lib`) when the library is not built."""
    get_library_path()


@pytest.mark.parametrize("fmt", [*FORMATS, "nbits2", "nbits4", "fp32"])
def test_replicated_copies_hold_distinct_weights_and_still_run(fmt: str) -> None:
    proj = projection_for(fmt, K, N)
    packed = pack(fmt, proj.ternary, proj.group_size) if fmt in FORMATS else None
    model, per_node = bench_model(fmt, proj, packed, 1, K)
    copies = 3
    blob = replicate(model, copies)
    graph = onnx.load_from_string(blob).graph
    assert len(graph.node) == copies * len(model.graph.node)
    by_copy: dict[str, list[bytes]] = {}
    for t in graph.initializer:
        by_copy.setdefault(t.name.split("#")[0], []).append(onnx.numpy_helper.to_array(t).tobytes())
    for name, contents in by_copy.items():
        if len(contents[0]) > 64:  # every weight-sized initializer differs between copies
            assert len(set(contents)) == copies, name
    assert sum(len(c[0]) for c in by_copy.values()) >= per_node // 2
    session = make_session(blob, threads=1, kernel="scalar" if fmt in FORMATS else None)
    outputs = session.run(None, {"A": np.ones((1, K), np.float32)})
    assert len(outputs) == copies and all(o.shape == (1, N) and np.isfinite(o).all() for o in outputs)


def test_kernel_benchmark_runs_and_writes_its_tables(tmp_path: Path) -> None:
    rc = main(
        [
            "bench",
            "kernels",
            "--shapes",
            f"{K}x{N}",
            "--threads",
            "1",
            "--paths",
            "scalar",
            "--cold-bytes",
            "2e5",
            "--hot-runs",
            "3",
            "--cold-runs",
            "1",
            "--repetitions",
            "2",
            "--bandwidth-bytes",
            "1e6",
            "-o",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    timings = result["timings"]
    labels = {c.label for c in candidates(["scalar"])}
    assert {t["candidate"] for t in timings} == labels
    assert {(t["batch"], t["mode"]) for t in timings} == {(1, "hot"), (1, "cold"), (128, "hot")}
    assert sorted(t["repetition"] for t in timings) == sorted([0, 1] * (len(labels) * 3))
    assert all(t["median_us"] > 0 and t["weight_bytes"] > 0 for t in timings)
    assert set(result["bandwidth_gb_per_s"]) == {"1"} and result["bandwidth_gb_per_s"]["1"] > 0
    table = (tmp_path / "kernels.md").read_text()
    assert "i2s/sherry[scalar]" in table and f"{K}" in table and "sherry[scalar] cold % of probe" in table


def test_ratios_are_paired_per_repetition_and_shares_use_the_probe() -> None:
    """A ratio cell is the median (range) of the per-repetition ratios, each from the candidates timed side
    by side in that repetition; the cold share is the reference format's read rate over the probed GB/s."""
    paths = ["avx2"]
    reference, baseline = Candidate("sherry", "avx2").label, Candidate("i2s", "avx2").label
    timings = [
        Timing(reference, K, N, 1, 1, "cold", 10.0, 10_000, 0),
        Timing(baseline, K, N, 1, 1, "cold", 20.0, 20_000, 0),
        Timing(reference, K, N, 1, 1, "cold", 40.0, 10_000, 1),  # a slow spell hits both candidates
        Timing(baseline, K, N, 1, 1, "cold", 40.0, 20_000, 1),
    ]
    headers, (row,) = ratio_rows(timings, paths, bandwidth={1: 0.5})
    cells = dict(zip(headers, row, strict=True))
    assert cells[f"{reference} µs"] == 25.0
    assert cells["i2s/sherry[avx2]"] == "1.50 (1.00–2.00)"
    assert cells["sherry[avx2] cold % of probe"] == "125% (50–200%)"


def test_candidate_labels_name_the_op_and_the_path() -> None:
    """A label names the op a candidate runs (ours also the kernel path, MatMulNBits its bit width), and no
    two candidates share one: the table's columns and kernels.json's entries are keyed by them."""
    paths = ["avx2", "avx512"]
    every = candidates(paths)
    labels = [c.label for c in every]
    assert len(set(labels)) == len(labels) == len(paths) * len(FORMATS) + len(EXPORT_FORMATS) - len(FORMATS)
    for c in every:
        if c.format in FORMATS:
            assert FORMATS[c.format].op_type in c.label and c.path in c.label
        elif c.format in NBITS_FORMATS:
            assert "MatMulNBits" in c.label and str(NBITS_FORMATS[c.format]) in c.label
        else:
            assert "MatMul" in c.label and c.format in c.label


def test_head_benchmark_times_every_head_type(capsys: pytest.CaptureFixture[str]) -> None:
    """`sherry bench head` at a tiny shape: a row per head type, block and thread count, with the bytes each
    reads (nbits: codes plus float32 scales per block; int8: codes plus float16 scales per group)."""
    from sherry_export.bench.head import Candidate, head_model

    rc = main(["bench", "head", "--vocab", "100", "--hidden", "128", "--threads", "1", "--rounds", "1", "--runs", "2"])
    assert rc == 0
    table = capsys.readouterr().out
    for label in ("nbits8 (block 32, accuracy_level 4)", "nbits4 (block 32, accuracy_level 4)", "int8 (group 32)"):
        assert re.search(rf"\| {re.escape(label)} +\| 1 +\|", table), label
    rng = np.random.default_rng(0)
    assert head_model(Candidate("nbits8", 32, 4), 100, 128, rng)[1] == 100 * 128 + 4 * 100 * 4
    assert head_model(Candidate("int8", 32, 0), 100, 128, rng)[1] == 100 * 128 + 2 * 100 * 4
    model = onnx.load_from_string(head_model(Candidate("nbits4", 64, 0), 100, 128, rng)[0])
    (node,) = model.graph.node
    attributes = {a.name: a.i for a in node.attribute}
    assert node.name == "lm_head" and attributes["bits"] == 4 and attributes["block_size"] == 64
    assert attributes["accuracy_level"] == 0
