"""Auto mode's choice of a TVM kernel, end to end: a tuning database written here, with verified times
for this CPU model, another one and none, compiled by ``tvm_schedules.build`` and linked into an op
library built here, then sessions on the auto path whose kernel report must name the kernel and why.

The committed databases' verdicts depend on the CPU and the load that timed them (docs/tvm.md), so
only such a database shows every case. Building the library takes a minute or more: the tests are marked slow.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sherry_export.formats import PackedWeight, pack, reference_matmul
from sherry_export.onnx_ops import matmul_model
from sherry_export.quant import absmean_ternarize, sherry_ternarize
from sherry_export.runtime import LIBRARY_ENV, make_session

pytest.importorskip("tvm")
from tvm_schedules.tune import (
    AUTO_MIN_SPEEDUP,
    cpu_model,
    host_isa,
    load_entries,
    verified_faster,
    verified_faster_batch,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DATABASE = ROOT / "tvm_schedules" / "databases"
ISA = host_isa()
OTHER_CPU = ("GenuineIntel family 6 model 85", "Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz")
BATCH_FIELDS = ("tvm_batch_us", "hand_batch_us", "batch", "batch_min_rows")


def verified(
    entry: dict,
    hot: tuple[float, float],
    cold: tuple[float, float],
    cpu: tuple[str, str],
    batch: tuple[float, float] | None = None,
) -> dict:
    """``entry`` as ``sherry tune --verify`` leaves it: (TVM, hand-written) µs at M = 1 hot and cold and
    (unless None) at batch 128, and the CPU."""
    times = {
        "tvm_node_us": hot[0],
        "hand_node_us": hot[1],
        "tvm_cold_us": cold[0],
        "hand_cold_us": cold[1],
        "cpu": cpu[0],
        "cpu_name": cpu[1],
    }
    unverified = {k: v for k, v in entry.items() if k not in BATCH_FIELDS}  # the committed entry's own verify
    if batch is not None:
        times |= {"tvm_batch_us": batch[0], "hand_batch_us": batch[1], "batch": 128, "batch_min_rows": 16}
    return unverified | times


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The op library with a database of the committed records of the host ISA's shipped-model kernels,
    whose tuned.json says, at M = 1 and at batch 128: sherry 256x256 wins both on this CPU model; tl2
    wins both on another one; i2s 256x256 loses at M = 1 and wins at batch 128 here; sherry 256x768 wins
    hot and loses cold here, and was never timed at batch 128; sherry 768x256 wins at M = 1 and loses at
    batch 128 here; i2s 768x256 is ahead in both regimes, but by less than auto's margin."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    from tvm_schedules.build import build

    tmp = tmp_path_factory.mktemp("tvm-auto")
    db = tmp / "db" / ISA
    db.mkdir(parents=True)
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(DATABASE / ISA / name, db / name)
    committed = {(e["format"], e["k"], e["n"]): e for e in load_entries(DATABASE / ISA / "tuned.json")}
    here = cpu_model()
    entries = [
        verified(committed["sherry", 256, 256], (3.0, 4.0), (5.0, 8.0), here, (300.0, 318.0)),
        verified(committed["tl2", 256, 256], (3.0, 4.0), (5.0, 8.0), OTHER_CPU, (300.0, 400.0)),
        verified(committed["i2s", 256, 256], (7.0, 4.0), (13.0, 9.0), here, (300.0, 330.0)),
        verified(committed["sherry", 256, 768], (4.0, 5.0), (12.0, 10.0), here),
        verified(committed["sherry", 768, 256], (4.0, 5.0), (8.0, 10.0), here, (400.0, 300.0)),
        verified(committed["i2s", 768, 256], (4.0, 4.1), (8.0, 8.2), here, (300.0, 309.0)),
    ]
    (db / "tuned.json").write_text(json.dumps(entries, indent=1) + "\n")
    kernels = tmp / "tvm_kernels"
    build(tmp / "db", kernels)
    out = tmp / "build"
    configure = ["-S", str(ROOT / "custom_ops"), "-B", str(out), "-DSHERRY_TVM=ON", f"-DSHERRY_TVM_DIR={kernels}"]
    for args in (configure, ["--build", str(out), "-j", "1"]):
        done = subprocess.run([cmake, *args], capture_output=True, text=True)
        assert done.returncode == 0, f"cmake {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return out / "libsherry_ops.so"


def weight(fmt: str, k: int, n: int, group_size: int = 128) -> PackedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    return pack(fmt, (sherry_ternarize if fmt == "sherry" else absmean_ternarize)(w, group_size), group_size)


def auto_report(
    library: Path, fmt: str, k: int, n: int, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> str:
    """The kernel report of an auto session on ``library``; its output must match the int8 reference in
    both regimes (3 rows; 16 and 37, the batch regime's kernel)."""
    monkeypatch.setenv(LIBRARY_ENV, str(library))
    monkeypatch.delenv("SHERRY_TVM_TARGET", raising=False)
    monkeypatch.delenv("SHERRY_KERNEL", raising=False)
    packed = weight(fmt, k, n)
    capfd.readouterr()
    session = make_session(matmul_model(packed), threads=2, report_kernel=True)  # auto by default
    report = capfd.readouterr().err
    for m in (3, 16, 37):
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        expected = reference_matmul(x, packed, activations="int8")
        np.testing.assert_allclose(session.run(None, {"A": x})[0], expected, atol=1e-5 * np.abs(expected).max())
    return report


def test_auto_takes_the_tvm_kernel_the_database_timed_faster_on_this_cpu(
    library: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    report = auto_report(library, "sherry", 256, 256, monkeypatch, capfd)
    here = f"on this CPU ({cpu_model()[1]}, {cpu_model()[0]})"
    assert "uses the tvm kernel (requested: auto by default; why: M < 16: tvm: the tuning database timed" in report
    assert f"the TVM kernel ({ISA} target) at 1.33x the speed of {ISA} hot and 1.60x cold" in report
    assert f"; M >= 16: tvm: the tuning database timed the TVM kernel ({ISA} target) at 1.06x the speed of {ISA} " in (
        report
    )
    assert f"at batch 128 (onnxruntime nodes, hot) {here})" in report


def test_auto_takes_the_tvm_kernel_for_the_regime_it_wins(
    library: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Batch only (i2s 256x256): the hand-written kernel for decode, TVM from 16 rows; M = 1 only (sherry
    768x256): the other way round."""
    report = auto_report(library, "i2s", 256, 256, monkeypatch, capfd)
    assert f"uses the {ISA} kernel for M < 16 and the tvm kernel for M >= 16 (requested: auto by default; " in report
    assert f"why: M < 16: {ISA}: the tuning database timed the TVM kernel ({ISA} target) at 0.57x" in report
    assert "on this CPU" in report and "not faster both hot and cold; M >= 16: tvm: " in report
    assert f"at 1.10x the speed of {ISA} at batch 128" in report
    report = auto_report(library, "sherry", 768, 256, monkeypatch, capfd)
    assert f"uses the tvm kernel for M < 16 and the {ISA} kernel for M >= 16" in report
    assert f"M >= 16: {ISA}: the tuning database timed the TVM kernel ({ISA} target) at 0.75x" in report


def test_auto_ignores_a_win_measured_on_another_cpu_model(
    library: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    report = auto_report(library, "tl2", 256, 256, monkeypatch, capfd)
    assert f"uses the {ISA} kernel (requested: auto by default; why: M < 16: {ISA}: the tuning database timed" in report
    assert f"on another CPU model ({OTHER_CPU[1]}, {OTHER_CPU[0]}), not this one" in report
    assert f"; M >= 16: {ISA}: the tuning database timed the TVM kernel ({ISA} target) at 1.33x" in report


@pytest.mark.parametrize(("fmt", "n", "ratios"), [("sherry", 768, "1.25x")])
def test_auto_keeps_the_hand_written_kernel_unless_tvm_wins_hot_and_cold(
    library: Path,
    fmt: str,
    n: int,
    ratios: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    report = auto_report(library, fmt, 256, n, monkeypatch, capfd)
    assert f"uses the {ISA} kernel (requested" in report
    assert ratios.format(isa=ISA) in report
    assert "on this CPU" in report and "not faster both hot and cold" in report
    assert f"M >= 16: {ISA}: the TVM kernel ({ISA} target) was never timed against {ISA} at batch 128" in report


def test_auto_keeps_the_hand_written_kernel_for_a_win_within_the_margin(
    library: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """i2s 768x256, timed 1.02-1.03x faster in both regimes: one verify run's noise, not worth a second
    copy of the weights."""
    report = auto_report(library, "i2s", 768, 256, monkeypatch, capfd)
    assert f"uses the {ISA} kernel (requested" in report
    assert f"at 1.02x the speed of {ISA} hot and 1.02x cold" in report
    assert "within the 1.05x margin auto asks for" in report
    assert f"M >= 16: {ISA}: the tuning database timed the TVM kernel ({ISA} target) at 1.03x" in report


def test_the_python_auto_rule_mirrors_the_libraries_margin() -> None:
    """``sherry tune --verify``'s summary counts the kernels the op library will take: the same margin."""
    header = (ROOT / "custom_ops" / "src" / "kernel_tvm_table.h").read_text()
    [margin] = re.findall(r"constexpr double kTvmMinSpeedup = ([0-9.]+);", header)
    assert float(margin) == AUTO_MIN_SPEEDUP
    entry = {"tvm_node_us": 1.0, "hand_node_us": AUTO_MIN_SPEEDUP, "tvm_cold_us": 1.0, "hand_cold_us": 1.2}
    assert verified_faster(entry)
    assert not verified_faster(entry | {"hand_node_us": 1.04})
    assert verified_faster_batch({"tvm_batch_us": 100.0, "hand_batch_us": 105.0})
    assert not verified_faster_batch({"tvm_batch_us": 100.0, "hand_batch_us": 103.0})


def test_auto_says_when_no_tvm_kernel_was_tuned(
    library: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    report = auto_report(library, "sherry", 640, 320, monkeypatch, capfd)
    assert f"uses the {ISA} kernel (requested: auto by default; why: {ISA}: no tuned TVM kernel for this shape)" in (
        report
    )


def test_the_forced_tvm_path_runs_a_kernel_auto_passes_over(
    library: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(LIBRARY_ENV, str(library))
    packed = weight("i2s", 256, 256)
    session = make_session(matmul_model(packed), kernel="tvm", report_kernel=True)
    assert "uses the tvm kernel (requested: session config sherry.kernel=tvm)" in capfd.readouterr().err
    x = np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32)
    expected = reference_matmul(x, packed, activations="int8")
    np.testing.assert_allclose(session.run(None, {"A": x})[0], expected, atol=1e-5 * np.abs(expected).max())
