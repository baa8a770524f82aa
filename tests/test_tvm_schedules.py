"""The TVM kernels (tvm_schedules) against the kernels' numerics reference, compiled here on the spot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sherry_export.formats import PackedWeight, pack, reference_matmul
from sherry_export.quant import absmean_ternarize, sherry_ternarize
from tvm_schedules.layout import Shape, activations, repack

tvm = pytest.importorskip("tvm")
from tvm_schedules.kernels import Knobs, scheduled_module, tile_choices  # noqa: E402
from tvm_schedules.tune import TARGETS, host_isa  # noqa: E402

ISAS = ["avx2", "avx512"] if host_isa() == "avx512" else ["avx2"]


def packed_weight(fmt: str, k: int, n: int, gs: int, seed: int = 0) -> PackedWeight:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    ternary = sherry_ternarize(weight, gs) if fmt == "sherry" else absmean_ternarize(weight, gs)
    return pack(fmt, ternary, gs)


def run(
    fmt: str, k: int, n: int, gs: int, m: int, knobs: Knobs, dynamic: bool, isa: str = "avx2"
) -> tuple[np.ndarray, np.ndarray]:
    packed = packed_weight(fmt, k, n, gs)
    shape = Shape(fmt, k, n, gs)
    module = scheduled_module(shape, None if dynamic else m, knobs, isa=isa)
    lib = tvm.compile(module, target=tvm.target.Target(TARGETS[isa]))
    x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    x[0, :3] *= 40  # an outlier: other groups of the row keep their own scale
    ws, scales = activations(shape, x)
    planes, alpha = repack(packed)
    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (ws, scales, *planes, alpha)), y)
    return y.numpy(), reference_matmul(x, packed, activations="int8")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["sherry", "tl2", "i2s"])
@pytest.mark.parametrize(
    ("k", "n", "gs", "m", "dynamic"),
    [(256, 64, 128, 1, False), (320, 96, 128, 1, False), (320, 32, 64, 3, True), (512, 48, 512, 2, True)],
)
def test_kernel_matches_reference(fmt: str, k: int, n: int, gs: int, m: int, dynamic: bool, isa: str) -> None:
    """Exact int dots; only the float sum over groups may round differently (contraction to FMA)."""
    knobs = Knobs(tiles=tile_choices(Shape(fmt, k, n, gs))[-1], unroll=1 if fmt == "tl2" else 2)
    y, ref = run(fmt, k, n, gs, m, knobs, dynamic, isa)
    bound = 4 * np.finfo(np.float32).eps * np.abs(ref).max(axis=1, keepdims=True) * (k // gs + 1)
    assert np.all(np.abs(y - ref) <= bound), np.abs(y - ref).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["sherry", "tl2", "i2s"])
def test_single_group_is_bit_exact(fmt: str, isa: str) -> None:
    """With one scale group there is no float sum to reorder: y = (α·s)·dot exactly."""
    y, ref = run(fmt, 96, 32, 96, 2, Knobs(tiles=1, unroll=1), dynamic=True, isa=isa)
    np.testing.assert_array_equal(y, ref)


def test_nan_row_and_zero_row() -> None:
    packed = packed_weight("sherry", 256, 32, 128)
    shape = Shape("sherry", 256, 32, 128)
    lib = tvm.compile(scheduled_module(shape, None, Knobs(1, 2), isa="avx2"), target=tvm.target.Target(TARGETS["avx2"]))
    x = np.random.default_rng(2).standard_normal((3, 256), dtype=np.float32)
    x[1, 5] = np.nan
    x[2] = 0
    ws, scales = activations(shape, x)
    planes, alpha = repack(packed)
    y = tvm.runtime.tensor(np.zeros((3, 32), np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (ws, scales, *planes, alpha)), y)
    out = y.numpy()
    assert np.isnan(out[1]).all() and (out[2] == 0).all() and np.isfinite(out[0]).all()


def test_repack_bit_width() -> None:
    """A code byte per code: 2 bits per weight for sherry and i2s, 2.67 for tl2 (group 128: 11 quads)."""
    for fmt, bits in (("sherry", 2.0), ("tl2", 2.75), ("i2s", 2.0)):
        packed = packed_weight(fmt, 2048, 128, 128)
        planes, _ = repack(packed)
        assert sum(p.nbytes for p in planes) * 8 / (2048 * 128) <= bits


def test_unsupported_n() -> None:
    assert "multiple of 16" in Shape("i2s", 64, 40, 64).supported()
    with pytest.raises(ValueError, match="multiple of 16"):
        repack(packed_weight("i2s", 64, 40, 64))


def test_model_shapes_of_the_shipped_model() -> None:
    from tvm_schedules.tune import model_shapes

    shapes = model_shapes(Path(__file__).resolve().parent.parent / "models" / "sherry-arenas-scratch-10m")
    assert shapes == [(320, 320, 128), (320, 896, 128), (896, 320, 128)]


def test_build_writes_objects_that_need_no_tvm_runtime(tmp_path: Path) -> None:
    """One database entry → an object exporting both functions, needing only the error hook."""
    from tvm_schedules.build import build

    entry = {"format": "tl2", "k": 320, "n": 64, "group_size": 128, "target": "avx2", "isa": "avx2",
             "mcpu": "x86-64-v3", "tiles": 2, "unroll": 1, "tvm_us": 9.5, "hand_us": 3.0, "trials": 1,
             "tune_seconds": 1.0}  # fmt: skip
    (tmp_path / "db" / "avx2").mkdir(parents=True)
    (tmp_path / "db" / "avx2" / "tuned.json").write_text(json.dumps([entry]))
    [obj] = build(tmp_path / "db", tmp_path / "out")
    symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout.split("\n")
    undefined = {line.split()[-1] for line in symbols if line.strip().startswith("U ")}
    assert undefined == {"TVMFFIErrorSetRaisedFromCStrParts"}
    table = (tmp_path / "out" / "tvm_table.cc").read_text()
    for bucket in ("m1", "mx"):
        name = f"__tvm_ffi_sherry_tvm_avx2_tl2_k320_n64_g128_{bucket}"
        assert any(line.endswith(" T " + name) for line in symbols)
        assert name in table
    assert "{1, 320, 64, 128, 1, 32," in table  # tl2, K, N, group_size, avx2, rows per task 2 x 16
    assert "_mx, false," in table  # not timed as nodes (sherry tune --verify): auto mode never takes it
    entry |= {"tvm_node_us": 4.0, "hand_node_us": 5.0, "tvm_cold_us": 9.0, "hand_cold_us": 8.0}
    (tmp_path / "db" / "avx2" / "tuned.json").write_text(json.dumps([entry]))
    build(tmp_path / "db", tmp_path / "out2")
    assert "_mx, false," in (tmp_path / "out2" / "tvm_table.cc").read_text()  # faster hot, slower cold
    entry["tvm_cold_us"] = 7.0
    (tmp_path / "db" / "avx2" / "tuned.json").write_text(json.dumps([entry]))
    build(tmp_path / "db", tmp_path / "out3")
    assert "_mx, true," in (tmp_path / "out3" / "tvm_table.cc").read_text()
    assert (tmp_path / "out" / "include" / "tvm" / "ffi" / "c_api.h").is_file()
