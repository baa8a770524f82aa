"""Hostile input through ``sherry_export.cli.main``, as the console script runs it: damaged and missing
files, nonsense flags, a bad environment. Each case must exit 2 with one line that names the input,
never a traceback, a hang or a silent wrong answer.

The cases run in one process on one export of the shipped model (weights in ``model.onnx.data``),
each on a copy with one file damaged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from sherry_export.cli import main
from sherry_export.errors import max_threads
from sherry_export.export import graph
from sherry_export.models import DEFAULT_MODEL, tiny_llama
from sherry_export.verify import MANIFEST_FILE


@dataclass
class Fixtures:
    export: Path
    """A clean export of the shipped model with its weights in model.onnx.data, checksums recorded."""
    packed: Path
    """The shipped packed model folder (an export source)."""
    hf: Path
    """A tiny Hugging Face folder (config.json + model.safetensors, no tokenizer)."""


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Fixtures:
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)
        assert main(["export", str(DEFAULT_MODEL), "-o", str(root / "export")]) == 0
    tiny_llama(num_hidden_layers=1).save_pretrained(root / "hf")
    return Fixtures(root / "export", DEFAULT_MODEL, root / "hf")


def clone(folder: Path, to: Path) -> Path:
    """A copy of ``folder`` to damage. Copied, not hard-linked: onnx.checker refuses external data with
    several links (a "potential hardlink attack")."""
    shutil.copytree(folder, to)
    return to


def rewrite(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def truncate(path: Path) -> None:
    rewrite(path, path.read_bytes()[: path.stat().st_size // 2])


def randomize(path: Path, count: int | None = None, share: float | None = None, seed: int = 0) -> None:
    """Overwrite ``count`` bytes (or a ``share`` of the file) at random offsets with random values."""
    data = np.frombuffer(path.read_bytes(), np.uint8).copy()
    rng = np.random.default_rng(seed)
    n = count if count is not None else int(share * data.size)
    data[rng.choice(data.size, n, replace=False)] = rng.integers(0, 256, n, dtype=np.uint8)
    rewrite(path, data.tobytes())


def damaged(fx: Fixtures, tmp: Path, name: str, damage: Callable[[Path], None], source: str = "export") -> Path:
    folder = clone(getattr(fx, source), tmp / f"damaged-{source}")
    damage(folder / name)
    return folder


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    rewrite(path, json.dumps(config).encode())


@dataclass
class Run:
    argv: list[str]
    names: list[str]
    """What the one-line error must name: the file, flag or variable at fault, and the fix."""
    env: dict[str, str] = field(default_factory=dict)


def generate(folder: Path, *flags: str) -> list[str]:
    return ["generate", str(folder), "--prompt", "Once upon a time", "--max-new-tokens", "2", *flags]


def export(source: Path, tmp: Path) -> list[str]:
    return ["export", str(source), "-o", str(tmp / "out")]


REEXPORT = "export it again"
MODEL, DATA = "model.onnx", "model.onnx.data"
CASES: dict[str, Callable[[Fixtures, Path], Run]] = {
    # damaged weights: refused by the checksum check, and (with --no-verify) by onnxruntime
    "model.onnx empty": lambda fx, t: Run(
        generate(damaged(fx, t, MODEL, lambda p: rewrite(p, b""))), [f"{MODEL} does not match the checksum", REEXPORT]
    ),
    "model.onnx truncated": lambda fx, t: Run(
        generate(damaged(fx, t, MODEL, truncate)), [f"{MODEL} does not match the checksum", REEXPORT]
    ),
    "model.onnx random": lambda fx, t: Run(
        generate(damaged(fx, t, MODEL, lambda p: rewrite(p, os.urandom(5000)))), [MODEL, "checksum"]
    ),
    "model.onnx empty, --no-verify": lambda fx, t: Run(
        generate(damaged(fx, t, MODEL, lambda p: rewrite(p, b"")), "--no-verify"), [MODEL, "damaged", REEXPORT]
    ),
    "model.onnx truncated, --no-verify": lambda fx, t: Run(
        generate(damaged(fx, t, MODEL, truncate), "--no-verify"), [MODEL, "Protobuf parsing failed", REEXPORT]
    ),
    "model.onnx random, --no-verify": lambda fx, t: Run(
        generate(damaged(fx, t, MODEL, lambda p: rewrite(p, os.urandom(5000))), "--no-verify"), [MODEL, REEXPORT]
    ),
    "external data missing": lambda fx, t: Run(
        generate(damaged(fx, t, DATA, Path.unlink)), [f"{DATA} is missing", MANIFEST_FILE, REEXPORT]
    ),
    "external data truncated": lambda fx, t: Run(
        generate(damaged(fx, t, DATA, truncate)), [f"{DATA} does not match the checksum", REEXPORT]
    ),
    "external data empty": lambda fx, t: Run(
        generate(damaged(fx, t, DATA, lambda p: rewrite(p, b""))), [f"{DATA} does not match the checksum"]
    ),
    "external data missing, --no-verify": lambda fx, t: Run(
        generate(damaged(fx, t, DATA, Path.unlink), "--no-verify"), [DATA, "does not exist", REEXPORT]
    ),
    "external data truncated, --no-verify": lambda fx, t: Run(
        generate(damaged(fx, t, DATA, truncate), "--no-verify"), [MODEL, "out of bounds", REEXPORT]
    ),
    "external data empty, --no-verify": lambda fx, t: Run(
        generate(damaged(fx, t, DATA, lambda p: rewrite(p, b"")), "--no-verify"), [MODEL, "file_length: 0", REEXPORT]
    ),
    # corruption every value of which is valid: only the checksum can tell
    "2,000 random bytes in the weights": lambda fx, t: Run(
        generate(damaged(fx, t, DATA, lambda p: randomize(p, count=2000))), [f"{DATA} does not match the checksum"]
    ),
    "2% of the external data randomized": lambda fx, t: Run(
        generate(damaged(fx, t, DATA, lambda p: randomize(p, share=0.02))), [f"{DATA} does not match the checksum"]
    ),
    "sherry_export.json truncated": lambda fx, t: Run(
        generate(damaged(fx, t, MANIFEST_FILE, truncate)), [f"{MANIFEST_FILE} is not valid JSON", REEXPORT]
    ),
    # kernel paths and the op library
    "--kernel tvm on untuned shapes": lambda fx, t: Run(
        generate(fx.export, "--kernel", "tvm"), ["kernel path 'tvm'", "no tuned TVM kernel", "sherry tune"]
    ),
    "SHERRY_KERNEL=bogus": lambda fx, t: Run(
        generate(fx.export), ["SHERRY_KERNEL=bogus", "choose one of auto"], {"SHERRY_KERNEL": "bogus"}
    ),
    "SHERRY_OPS_LIBRARY not a library": lambda fx, t: Run(
        generate(fx.export),
        [f"SHERRY_OPS_LIBRARY={t / 'libfake.so'}", "does not load", "make lib"],
        {"SHERRY_OPS_LIBRARY": str(t / "libfake.so")},
    ),
    "SHERRY_OPS_LIBRARY missing": lambda fx, t: Run(
        generate(fx.export), [f"SHERRY_OPS_LIBRARY={t / 'nowhere.so'}"], {"SHERRY_OPS_LIBRARY": str(t / "nowhere.so")}
    ),
    # flags
    "--threads 100000": lambda fx, t: Run(generate(fx.export, "--threads", "100000"), ["--threads", "at most"]),
    "--threads 0": lambda fx, t: Run(generate(fx.export, "--threads", "0"), ["--threads", "positive"]),
    "tvm-run --threads 100000": lambda fx, t: Run(
        ["tvm-run", str(fx.export), "--prompt-ids", "1", "--threads", "100000"], ["--threads", "at most"]
    ),
    "compare --threads 100000": lambda fx, t: Run(
        ["compare", str(fx.packed), "-o", str(t), "--threads", "1", "100000"], ["--threads", "at most"]
    ),
    "bench kernels --threads 100000": lambda fx, t: Run(
        ["bench", "kernels", "--threads", "100000"], ["--threads", "at most"]
    ),
    "train --threads 100000": lambda fx, t: Run(["train", "--threads", "100000"], ["--threads", "at most"]),
    "--temperature -1": lambda fx, t: Run(generate(fx.export, "--temperature", "-1"), ["--temperature", ">= 0"]),
    "--temperature inf": lambda fx, t: Run(generate(fx.export, "--temperature", "inf"), ["--temperature", "finite"]),
    "--temperature nan": lambda fx, t: Run(generate(fx.export, "--temperature", "nan"), ["--temperature", "got nan"]),
    "--top-k -5": lambda fx, t: Run(generate(fx.export, "--top-k", "-5"), ["--top-k", "got -5"]),
    "--top-p 0": lambda fx, t: Run(generate(fx.export, "--top-p", "0"), ["--top-p", "(0, 1]"]),
    "--top-p 2": lambda fx, t: Run(generate(fx.export, "--top-p", "2"), ["--top-p", "(0, 1]"]),
    "--top-p nan": lambda fx, t: Run(generate(fx.export, "--top-p", "nan"), ["--top-p", "got nan"]),
    "--seed -1": lambda fx, t: Run(generate(fx.export, "--temperature", "1", "--seed", "-1"), ["--seed", "got -1"]),
    # prompt and tokenizer
    "empty prompt": lambda fx, t: Run(
        ["generate", str(fx.export), "--prompt", "", "--max-new-tokens", "2"], ["--prompt ''", "no tokens"]
    ),
    "tokenizer.json missing": lambda fx, t: Run(
        generate(damaged(fx, t, "tokenizer.json", Path.unlink)), ["no tokenizer.json", "export again"]
    ),
    "tokenizer.json truncated": lambda fx, t: Run(
        generate(damaged(fx, t, "tokenizer.json", truncate)), ["tokenizer.json is not valid JSON"]
    ),
    "tokenizer_config.json truncated": lambda fx, t: Run(
        generate(damaged(fx, t, "tokenizer_config.json", truncate)), ["tokenizer_config.json is not valid JSON"]
    ),
    # export sources and -o
    "export: packed source without its weights file": lambda fx, t: Run(
        export(damaged(fx, t, "weights.safetensors", Path.unlink, "packed"), t),
        ["weights.safetensors is missing"],
    ),
    "export: truncated safetensors": lambda fx, t: Run(
        export(damaged(fx, t, "weights.safetensors", truncate, "packed"), t),
        ["weights.safetensors", "damaged or truncated"],
    ),
    "export: config contradicts itself": lambda fx, t: Run(
        export(damaged(fx, t, "config.json", lambda p: edit_config(p, hidden_size=90), "packed"), t),
        ["config.json is inconsistent", "hidden size (90)"],
    ),
    "export: config contradicts the weights": lambda fx, t: Run(
        export(damaged(fx, t, "config.json", lambda p: edit_config(p, hidden_size=640), "packed"), t),
        ["weights.safetensors do not match", "config.json"],
    ),
    "export: truncated config.json": lambda fx, t: Run(
        export(damaged(fx, t, "config.json", truncate, "packed"), t),
        ["config.json is not valid JSON"],
    ),
    "export: Hugging Face folder without weights": lambda fx, t: Run(
        export(damaged(fx, t, "model.safetensors", Path.unlink, "hf"), t),
        ["damaged-hf", "no file named model.safetensors"],
    ),
    "export: truncated Hugging Face weights": lambda fx, t: Run(
        export(damaged(fx, t, "model.safetensors", truncate, "hf"), t),
        ["damaged-hf", "incomplete metadata"],
    ),
    "export: Hugging Face config contradicts the weights": lambda fx, t: Run(
        export(damaged(fx, t, "config.json", lambda p: edit_config(p, intermediate_size=96), "hf"), t),
        ["damaged-hf", "do not match its config.json"],
    ),
    "export -o a file": lambda fx, t: Run(
        ["export", str(fx.packed), "-o", str(fx.export / MODEL)], [f"{fx.export / MODEL} is a file"]
    ),
    "export -o under a file": lambda fx, t: Run(
        ["export", str(fx.packed), "-o", str(fx.export / MODEL / "sub")],
        [f"under {fx.export / MODEL}, which is a file"],
    ),
    # sherry verify
    "verify: damaged weights": lambda fx, t: Run(
        ["verify", str(damaged(fx, t, DATA, lambda p: randomize(p, count=10)))], [f"{DATA} does not match the checksum"]
    ),
    "verify: truncated genai_config.json": lambda fx, t: Run(
        ["verify", str(damaged(fx, t, "genai_config.json", truncate))], ["genai_config.json is not valid JSON"]
    ),
    "verify: not a folder": lambda fx, t: Run(["verify", str(t / "nowhere")], ["nowhere is not a folder"]),
}


def cpu_has_avx512() -> bool:
    """The features the AVX-512 path needs (custom_ops/src/dispatch.cc), from /proc/cpuinfo."""
    needed = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi"}
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return needed <= set(flags.split(":", 1)[1].split())


def run_main(run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of ``main`` (argparse exits with SystemExit; any other exception fails the test)."""
    for name, value in run.env.items():
        monkeypatch.setenv(name, value)
    try:
        status = main(run.argv)
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case: str, fx: Fixtures, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "libfake.so").write_bytes(b"not a shared library")
    run = CASES[case](fx, tmp_path)
    status, err = run_main(run, monkeypatch, capsys)
    assert status == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last, err
    for name in run.names:
        assert name in last, f"{name!r} not in {last!r}"


@pytest.mark.skipif(cpu_has_avx512(), reason="this CPU has AVX-512 (the refusal path is the --kernel tvm case's)")
def test_forced_avx512_on_a_cpu_without_it(fx, monkeypatch, capsys) -> None:
    status, err = run_main(Run(generate(fx.export, "--kernel", "avx512"), []), monkeypatch, capsys)
    assert status == 2 and "Traceback" not in err
    assert "kernel path 'avx512'" in err and "this CPU lacks" in err


def test_threads_bound_is_a_few_per_cpu() -> None:
    assert max_threads() == 4 * (os.cpu_count() or 1)


def test_clean_export_verifies_and_runs(fx, capsys) -> None:
    assert main(["verify", str(fx.export)]) == 0
    out = capsys.readouterr().out
    assert f"| {DATA}" in out and "onnx.checker" in out and "onnxruntime session" in out and "checks passed" in out
    manifest = json.loads((fx.export / MANIFEST_FILE).read_text())
    assert set(manifest["checksums"]) == {MODEL, DATA}
    assert all(v.startswith("sha256:") for v in manifest["checksums"].values())
    assert main(generate(fx.export, "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "3")) == 0


def test_no_verify_runs_damaged_weights(fx, tmp_path, capsys) -> None:
    """What the checksum guards against: damaged weights run without error unless checked."""
    folder = damaged(fx, tmp_path, DATA, lambda p: randomize(p, count=2000))
    assert main(generate(folder, "--no-verify")) == 0
    assert main(generate(folder)) == 2
    assert "does not match the checksum" in capsys.readouterr().err


def test_verify_table_lists_each_failure(fx, tmp_path, capsys) -> None:
    folder = damaged(fx, tmp_path, DATA, truncate)
    (folder / "genai_config.json").unlink()
    assert main(["verify", str(folder)]) == 2
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| ") and "ok |" not in line]
    assert any(DATA in row and "does not match" in row for row in rows)
    assert any("genai_config.json is missing" in row for row in rows)
    assert "checks failed" in captured.err


def test_library_refuses_bad_sampling_and_threads(fx) -> None:
    from sherry_export.generate import OnnxCausalLM

    with pytest.raises(ValueError, match=r"threads .* give at most"):
        OnnxCausalLM(fx.export / MODEL, threads=max_threads() + 1)
    lm = OnnxCausalLM(fx.export / MODEL)
    for bad, match in [
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(seed=-1), "seed must be an integer >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            lm.generate([1, 2], 2, **bad)
