"""The ai.sherry onnxruntime ops (libsherry_ops.so) against the numpy reference, on every kernel path.

Each correctness case forces one kernel path through the session config and checks, from the
library's own report, that the node really runs it: a SIMD path is skipped only when the library
says this CPU lacks it or its kernel declines the geometry (as the placeholder SIMD kernels do for
all geometries), so the same tests exercise the AVX2 and AVX-512 kernels once they land.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sherry_export.formats import FORMATS, MAX_GROUP_SIZE, PackedWeight, pack, reference_matmul, unpack
from sherry_export.onnx_ops import matmul_model
from sherry_export.quant import Ternary, absmean_ternarize, sherry_ternarize
from sherry_export.runtime import (
    KERNEL_CONFIG_KEY,
    KernelPath,
    get_library_path,
    make_session,
    session_options,
)

PATHS: tuple[KernelPath, ...] = ("scalar", "avx2", "avx512")
NODE = "sherry_matmul"  # the node name matmul_model gives
TOLERANCE = 1e-5  # of the output's scale: the kernels reproduce the int8 reference up to float rounding


@dataclass(frozen=True)
class Case:
    """One op invocation: weight geometry and the shape of A's leading dims."""

    k: int
    group_size: int
    n: int
    leading: tuple[int, ...]
    bias: bool
    threads: int

    @property
    def id(self) -> str:
        """A readable pytest id, so a failure names its geometry."""
        dims = "x".join(map(str, self.leading)) or "1d"
        return f"K{self.k}-g{self.group_size}-N{self.n}-A{dims}-{'bias' if self.bias else 'nobias'}-t{self.threads}"


# Shared by all formats: K a multiple of 4, so Sherry takes them too.
COMMON_CASES = [
    Case(128, 32, 48, (1,), True, 2),  # decode: one row, N split over both threads
    Case(128, 128, 40, (7,), False, 1),  # per channel: group_size = K
    Case(200, 64, 33, (2, 5), True, 2),  # K tail (200 = 3*64 + 8), 3-D A, odd N
    Case(96, 96, 17, (64,), True, 2),  # batch 64, per channel
    Case(260, 128, 70, (3, 1, 4), False, 1),  # 4-D A, K tail
    Case(36, 8, 5, (3,), True, 2),  # tiny: one row tile, short last group
    Case(512, 128, 256, (1,), False, 2),  # bigger decode, many row tiles
    Case(1024, 128, 512, (4,), True, 2),  # 4-row decode in many items: each thread prepares A itself
]
# TL2 and I2S take any K and group_size: K not a multiple of 4 (or 3), odd group sizes.
DENSE_CASES = [
    Case(203, 64, 29, (4,), True, 2),
    Case(97, 97, 11, (1,), False, 1),
    Case(30, 7, 9, (2, 3), True, 2),
    Case(131, 130, 18, (5,), False, 2),
]


def format_cases() -> list[pytest.param]:
    """Every (format, case) pair the format's geometry allows."""
    params = []
    for fmt in FORMATS:
        cases = COMMON_CASES + ([] if fmt == "sherry" else DENSE_CASES)
        params += [pytest.param(fmt, case, id=f"{fmt}-{case.id}") for case in cases]
    return params


def make_weight(fmt: str, k: int, n: int, group_size: int, seed: int = 0) -> PackedWeight:
    """A random weight projected the way the format expects (3:4 for Sherry, absmean otherwise)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    ternarize = sherry_ternarize if fmt == "sherry" else absmean_ternarize
    return pack(fmt, ternarize(w, group_size), group_size)


def make_input(case: Case, rng: np.random.Generator) -> np.ndarray:
    """Random activations with one all-zero scale group (its activation scale is 0)."""
    x = rng.standard_normal((*case.leading, case.k)).astype(np.float32) * 3
    x.reshape(-1, case.k)[0, : case.group_size] = 0
    return x


def open_session(model: onnx.ModelProto, kernel: KernelPath, threads: int = 1) -> ort.InferenceSession:
    """A session on the forced path; skips when the library reports the path cannot run here."""
    try:
        return make_session(model, threads=threads, kernel=kernel, report_kernel=True)
    except Exception as e:  # onnxruntime raises its own exception classes
        reason = re.search(r"the \w+ kernel was requested .*", str(e))
        if kernel != "scalar" and reason and ("this CPU lacks" in reason[0] or "does not support" in reason[0]):
            pytest.skip(reason[0])
        raise


def check_against_reference(y: np.ndarray, expected: np.ndarray) -> None:
    """Within float rounding of the int8 reference, measured against the output's own scale."""
    scale = max(float(np.abs(expected).max()), 1e-6)
    assert y.shape == expected.shape
    assert y.dtype == np.float32
    err = float(np.abs(y - expected).max())
    assert err <= TOLERANCE * scale, f"max error {err:.3g} exceeds {TOLERANCE:g} x output scale {scale:.3g}"


@pytest.fixture(scope="module", autouse=True)
def library() -> None:
    """Fail every test with the fix (`make lib`) when the library is not built."""
    get_library_path()


def test_registers_with_the_ecosystem_idiom() -> None:
    """The onnxruntime-extensions idiom, exactly as users write it: get_library_path() is a str."""
    import sherry_export

    so = ort.SessionOptions()
    so.register_custom_ops_library(sherry_export.get_library_path())
    packed = make_weight("sherry", 64, 8, 32)
    session = ort.InferenceSession(matmul_model(packed).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    (y,) = session.run(None, {"A": x})
    check_against_reference(y, reference_matmul(x, packed, activations="int8"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("fmt", "case"), format_cases())
def test_matches_int8_reference(fmt: str, case: Case, path: KernelPath, capfd: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(case.k * 1000 + case.n)
    packed = make_weight(fmt, case.k, case.n, case.group_size)
    bias = rng.standard_normal(case.n).astype(np.float32) if case.bias else None
    leading_names = [f"d{i}" for i in range(len(case.leading))]
    session = open_session(matmul_model(packed, bias, leading_names), path, case.threads)
    assert f"node '{NODE}' (N={case.n}, K={case.k}, group_size={case.group_size}) uses the {path} kernel" in (
        capfd.readouterr().err
    )
    x = make_input(case, rng)
    y = session.run(None, {"A": x})[0]
    check_against_reference(y, reference_matmul(x, packed, bias, activations="int8"))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_error_against_float_matmul_is_small(fmt: str, record_property: Callable[[str, object], None]) -> None:
    """int8 activations cost little accuracy: report the error against the exact fp32 product."""
    k, n = 512, 96
    packed = make_weight(fmt, k, n, 128)
    x = np.random.default_rng(1).standard_normal((8, k)).astype(np.float32)
    y = make_session(matmul_model(packed), threads=2).run(None, {"A": x})[0]
    exact = reference_matmul(x, packed, activations="float")
    rel = float(np.linalg.norm(y - exact) / np.linalg.norm(exact))
    record_property("relative_error_vs_fp32", rel)
    print(f"{fmt}: relative error against the fp32 matmul {rel:.4%}")
    assert rel < 0.02, f"{fmt}: relative error against the fp32 matmul is {rel:.2%}"


def test_thread_count_does_not_change_results() -> None:
    """Every output element is computed by one work item, so threading is bit-exact."""
    packed = make_weight("sherry", 256, 200, 64)
    x = np.random.default_rng(2).standard_normal((9, 256)).astype(np.float32)
    one, two = (make_session(matmul_model(packed), threads=t).run(None, {"A": x})[0] for t in (1, 2))
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("path", ["avx2", "avx512"])
@pytest.mark.parametrize("fmt", ["sherry", "tl2", "i2s"])
def test_prefill_rows_match_the_scalar_kernel_bit_for_bit(fmt: str, path: KernelPath) -> None:
    """Prefill calls (the AVX-512 plane path, the AVX2 GEMM) under the op's work split into row chunks and
    column items, on a K tail, a short last group and N a multiple of no tile: the outputs of every SIMD
    path are those of the scalar kernel, bit for bit."""
    k, group_size, n = 260, 64, 300
    model = matmul_model(make_weight(fmt, k, n, group_size), np.linspace(-1, 1, n, dtype=np.float32))
    scalar, fast = open_session(model, "scalar", 2), open_session(model, path, 2)
    rng = np.random.default_rng(6)
    for rows in (9, 20, 40, 130):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        want = scalar.run(None, {"A": x})[0]
        np.testing.assert_array_equal(fast.run(None, {"A": x})[0], want, err_msg=f"{rows} rows of A")


def test_decode_calls_never_reuse_another_calls_rows() -> None:
    """At decode sizes each thread prepares A itself, once per call: successive calls with new inputs,
    alternating between two nodes' sessions, must each see their own A (2 threads, many work items)."""
    rng = np.random.default_rng(4)
    models = [matmul_model(make_weight(fmt, 1024, 512, 128, seed=i)) for i, fmt in enumerate(("sherry", "i2s"))]
    parallel = [make_session(model, threads=2) for model in models]
    serial = [make_session(model, threads=1) for model in models]
    for step in range(12):
        x = rng.standard_normal((1 + step % 4, 1024)).astype(np.float32)
        i = step % 2
        np.testing.assert_array_equal(parallel[i].run(None, {"A": x})[0], serial[i].run(None, {"A": x})[0])


def test_concurrent_sessions_give_identical_results() -> None:
    """Two sessions (and two runs of one session) in two Python threads at once."""
    rng = np.random.default_rng(3)
    models = [matmul_model(make_weight(fmt, 384, 160, 128, seed=i)) for i, fmt in enumerate(("sherry", "tl2"))]
    sessions = [make_session(model, threads=2) for model in models]
    x = rng.standard_normal((4, 384)).astype(np.float32)
    expected = [s.run(None, {"A": x})[0] for s in sessions]

    def hammer(index: int) -> list[np.ndarray]:
        return [sessions[index % 2].run(None, {"A": x})[0] for _ in range(30)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(hammer, range(4)))
    for index, outputs in enumerate(results):
        for y in outputs:
            np.testing.assert_array_equal(y, expected[index % 2])


@pytest.mark.parametrize(("leading", "expected_shape"), [((0, 5), (0, 5, 24)), ((), (24,))])
def test_empty_and_1d_inputs(leading: tuple[int, ...], expected_shape: tuple[int, ...]) -> None:
    packed = make_weight("i2s", 64, 24, 64)
    x = np.random.default_rng(4).standard_normal((*leading, 64)).astype(np.float32)
    y = make_session(matmul_model(packed, leading_dims=[f"d{i}" for i in range(len(leading))])).run(None, {"A": x})[0]
    assert y.shape == expected_shape
    if x.size:  # the numpy reference cannot take zero rows
        check_against_reference(y, reference_matmul(x, packed, activations="int8"))


def test_non_constant_bias_is_read_at_run_time() -> None:
    packed = make_weight("tl2", 64, 24, 32)
    bias = np.arange(24, dtype=np.float32)
    model = matmul_model(packed, bias)
    graph_input_from_initializer(model, f"{NODE}.bias")
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    y = make_session(model).run(None, {"A": x, f"{NODE}.bias": bias})[0]
    check_against_reference(y, reference_matmul(x, packed, bias, activations="int8"))


def test_session_config_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    model = matmul_model(make_weight("sherry", 32, 8, 32))
    monkeypatch.setenv("SHERRY_KERNEL", "bogus")
    with pytest.raises(Exception, match=r"unknown kernel path 'bogus' \(SHERRY_KERNEL=bogus in the environment\)"):
        make_session(model)
    make_session(model, kernel="scalar")


def test_unknown_kernel_in_session_config_is_rejected() -> None:
    options = session_options()
    options.add_session_config_entry(KERNEL_CONFIG_KEY, "avx1024")
    model = matmul_model(make_weight("sherry", 32, 8, 32)).SerializeToString()
    with pytest.raises(Exception, match=r"unknown kernel path 'avx1024' \(session config sherry.kernel=avx1024\)"):
        ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


# --- malformed models --------------------------------------------------------------------------


def graph_input_from_initializer(model: onnx.ModelProto, name: str) -> None:
    """Turn an initializer into a graph input, i.e. a value fed at run time."""
    init = next(i for i in model.graph.initializer if i.name == name)
    model.graph.initializer.remove(init)
    model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))


def replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Swap an initializer's value (dtype and shape included), keeping its name."""
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(array, name))


def set_attribute(model: onnx.ModelProto, name: str, value: object) -> None:
    """Set the node's attribute ``name`` to ``value`` (any type), or drop it when ``value`` is None."""
    attrs = model.graph.node[0].attribute
    for attr in attrs:
        if attr.name == name:
            attrs.remove(attr)
            break
    if value is not None:
        attrs.append(helper.make_attribute(name, value))


def corrupt_first_code(fmt: str, packed: PackedWeight) -> np.ndarray:
    """B with an invalid first code: a TL2 index above 13, an I2S 2-bit code 3."""
    data = packed.data.copy()
    data[0, 0] = 0x0F if fmt == "tl2" else 0x03
    return data


K, N, GROUP = 64, 24, 32
"""Geometry of the weight the malformed models start from (a TL2 one unless the case says otherwise)."""

MALFORMED = {
    "A float64": (
        lambda m, p: setattr(m.graph.input[0].type.tensor_type, "elem_type", TensorProto.DOUBLE),
        "input A must be float32, got float64",
    ),
    "B int8": (
        lambda m, p: replace_initializer(m, f"{NODE}.B", p.data.view(np.int8)),
        "input B must be uint8, got int8",
    ),
    "scales float32": (
        lambda m, p: replace_initializer(m, f"{NODE}.scales", p.scales.astype(np.float32)),
        "input scales must be float16, got float32",
    ),
    "bias float64": (
        lambda m, p: replace_initializer(m, f"{NODE}.bias", np.zeros(N, np.float64)),
        "input bias must be float32, got float64",
    ),
    "B one byte short": (
        lambda m, p: replace_initializer(m, f"{NODE}.B", p.data[:, :-1].copy()),
        "input B must have shape [N, row_bytes] for tl2 with K=64, group_size=32 = [24, 14], got [24, 13]",
    ),
    "B one row short": (
        lambda m, p: replace_initializer(m, f"{NODE}.B", p.data[:-1].copy()),
        "input B must have shape [N, row_bytes] for tl2 with K=64, group_size=32 = [24, 14], got [23, 14]",
    ),
    "B flattened": (
        lambda m, p: replace_initializer(m, f"{NODE}.B", p.data.ravel()),
        "input B must have shape [N, row_bytes] for tl2 with K=64, group_size=32 (at least K/8 bytes",
    ),
    "K too large for B": (lambda m, p: set_attribute(m, "K", 1 << 62), "(at least K/8 bytes per row), got [24, 14]"),
    "K mismatches B": (
        lambda m, p: set_attribute(m, "K", 2 * K),
        "input B must have shape [N, row_bytes] for tl2 with K=128",
    ),
    "scales shape": (
        lambda m, p: replace_initializer(m, f"{NODE}.scales", p.scales[:, :1].copy()),
        "input scales must have shape [N, ceil(K/group_size)] = [24, 2], got [24, 1]",
    ),
    "bias shape": (
        lambda m, p: replace_initializer(m, f"{NODE}.bias", np.zeros(N + 1, np.float32)),
        "input bias must have shape [N] = [24], got [25]",
    ),
    "missing K": (lambda m, p: set_attribute(m, "K", None), "attribute 'K' is missing or not an int"),
    "missing N": (lambda m, p: set_attribute(m, "N", None), "attribute 'N' is missing or not an int"),
    "missing group_size": (
        lambda m, p: set_attribute(m, "group_size", None),
        "attribute 'group_size' is missing or not an int",
    ),
    "float group_size": (
        lambda m, p: set_attribute(m, "group_size", 32.0),
        "attribute 'group_size' is missing or not an int",
    ),
    "group_size > K": (lambda m, p: set_attribute(m, "group_size", K + 1), "group_size must be in [1, K=64], got 65"),
    "N = 0": (lambda m, p: set_attribute(m, "N", 0), "N must be positive, got 0"),
    "B not constant": (
        lambda m, p: graph_input_from_initializer(m, f"{NODE}.B"),
        "input B must be a constant initializer",
    ),
    "scales not constant": (
        lambda m, p: graph_input_from_initializer(m, f"{NODE}.scales"),
        "input scales must be a constant initializer",
    ),
    "corrupt tl2 code": (
        lambda m, p: replace_initializer(m, f"{NODE}.B", corrupt_first_code("tl2", p)),
        "corrupt tl2 weights: row 0 holds an invalid code",
    ),
}


@pytest.mark.parametrize("problem", list(MALFORMED))
def test_malformed_model_is_rejected(problem: str) -> None:
    mutate, message = MALFORMED[problem]
    packed = make_weight("tl2", K, N, GROUP)
    model = matmul_model(packed, np.zeros(N, np.float32))
    mutate(model, packed)
    with pytest.raises(Exception, match=re.escape(f"TL2MatMul node '{NODE}': ") + ".*" + re.escape(message)):
        make_session(model)


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("i2s", "corrupt i2s weights: row 0 holds an invalid code"),
        ("sherry", "sherry needs K and group_size divisible by 4, got K=64, group_size=30"),
    ],
)
def test_format_specific_rejections(fmt: str, message: str) -> None:
    packed = make_weight(fmt, K, N, GROUP)
    model = matmul_model(packed)
    if fmt == "i2s":
        replace_initializer(model, f"{NODE}.B", corrupt_first_code(fmt, packed))
    else:
        set_attribute(model, "group_size", 30)
    with pytest.raises(Exception, match=re.escape(message)):
        make_session(model)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"A": np.zeros((2, K - 4), np.float32)}, "input A must have shape [..., K] with K=64, got [2, 60]"),
        ({"A": np.zeros((), np.float32)}, "input A must have shape [..., K] with K=64, got []"),
        (
            {"A": np.zeros((2, K), np.float32), "bias": np.zeros(N - 1, np.float32)},
            "input bias must have shape [N] = [24], got [23]",
        ),
    ],
)
def test_bad_inputs_at_run_time_are_rejected(feeds: dict[str, np.ndarray], message: str) -> None:
    """With A and bias of unknown shape in the graph, only the op can catch a mismatch."""
    packed = make_weight("sherry", K, N, GROUP)
    model = matmul_model(packed, np.zeros(N, np.float32))
    graph_input_from_initializer(model, f"{NODE}.bias")
    for value in model.graph.input:
        value.type.tensor_type.ClearField("shape")
    feeds = {f"{NODE}.bias" if k == "bias" else k: v for k, v in feeds.items()}
    feeds.setdefault(f"{NODE}.bias", np.zeros(N, np.float32))
    session = make_session(model)
    with pytest.raises(Exception, match=re.escape(f"SherryMatMul node '{NODE}': {message}")):
        session.run(None, feeds)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_non_finite_activations_give_nan_rows(fmt: str, path: KernelPath) -> None:
    """A NaN or infinity in a row of A makes that row's outputs NaN (docs/formats.md), on every path;
    the other rows are unaffected."""
    packed = make_weight(fmt, 256, 40, 128)
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    x[1, 5], x[2, 200] = np.nan, np.inf
    expected = reference_matmul(x, packed, activations="int8")
    session = open_session(matmul_model(packed), path)
    for rows in (x, x[1:2]):  # batched, and the decode (one row) path
        y = session.run(None, {"A": rows})[0]
        want = expected if rows is x else expected[1:2]
        np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
        finite = ~np.isnan(want)
        np.testing.assert_allclose(y[finite], want[finite], atol=TOLERANCE * np.abs(want[finite]).max(initial=1.0))
    assert np.isnan(expected[1]).all() and np.isnan(expected[2]).all() and np.isfinite(expected[[0, 3]]).all()


# --- hostile geometry: long scale groups, tiny scale groups ----------------------------------------


def all_plus_one_i2s(k: int) -> onnx.ModelProto:
    """One row of K i2s weights, all +1, in one scale group of scale 1: y = 127·K·(1/127) for A = ones.

    Built from bytes (every 2-bit code 2), so that a group size the packer refuses can be tried.
    """
    packed = pack("i2s", Ternary(np.ones((1, 4), np.int8), np.ones((1, 1), np.float32)), 4)  # type: ignore[arg-type]
    model = matmul_model(packed)
    replace_initializer(model, f"{NODE}.B", np.full((1, -(-k // 4)), 0xAA, np.uint8))
    for name in ("K", "group_size"):
        set_attribute(model, name, k)
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value = k
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 1
    return model


def test_longest_scale_group_is_exact_and_one_more_is_refused() -> None:
    """127 x MAX_GROUP_SIZE is the largest dot product int32 holds: the longest group gives it exactly
    (auto falls back to scalar there: the SIMD layouts of one 16.9M-column row are over their memory
    budget); one column more is refused when the session is created, naming the bound."""
    assert 127 * MAX_GROUP_SIZE <= 2**31 - 1 < 127 * (MAX_GROUP_SIZE + 1)
    session = make_session(all_plus_one_i2s(MAX_GROUP_SIZE))
    y = session.run(None, {"A": np.ones((1, MAX_GROUP_SIZE), np.float32)})[0]
    assert y[0, 0] == np.float32(MAX_GROUP_SIZE)
    with pytest.raises(Exception, match=re.escape(f"group_size must be at most {MAX_GROUP_SIZE}") + ".*got 16909321"):
        make_session(all_plus_one_i2s(MAX_GROUP_SIZE + 1))


def test_tl2_nonzero_padding_lane_is_rejected_by_python_and_the_op() -> None:
    """K = 4, one group: triples (0, 1, 2) and (3, pad, pad). Code 1 (v = 1: lanes 0, 0, +1) puts a +1
    in a padding lane of the second triple; the reference and the op must both refuse it."""
    packed = pack("tl2", Ternary(np.ones((1, 4), np.int8), np.ones((1, 1), np.float32)), 4)  # type: ignore[arg-type]
    data = packed.data.copy()
    data[0, 0] = (data[0, 0] & 0x0F) | 0x10  # the second code's index nibble: 1
    bad = PackedWeight("tl2", data, packed.scales, 4, 4)
    with pytest.raises(ValueError, match="row 0, triple 1 has a non-zero padding lane"):
        unpack(bad)
    with pytest.raises(Exception, match=re.escape("corrupt tl2 weights: row 0 holds an invalid code")):
        make_session(matmul_model(bad))


@pytest.mark.parametrize("path", ["avx2", "avx512"])
def test_tiny_scale_groups_stay_within_the_memory_budget(path: KernelPath, capfd: pytest.CaptureFixture[str]) -> None:
    """tl2 with group_size 1 pads every column to whole SIMD pieces with tables of their own: the SIMD
    layouts would take 148-256 bytes of workspace per 4-byte input column. Auto falls back to the
    scalar kernel; a forced SIMD path is refused with the sizes."""
    k = 4096
    packed = pack("tl2", absmean_ternarize(torch.randn(1, k), 1), 1)
    x = np.random.default_rng(3).standard_normal((3, k)).astype(np.float32)
    y = make_session(matmul_model(packed), kernel="auto", report_kernel=True).run(None, {"A": x})[0]
    assert "uses the scalar kernel" in capfd.readouterr().err
    check_against_reference(y, reference_matmul(x, packed, activations="int8"))
    try:
        make_session(matmul_model(packed), kernel=path)
    except Exception as e:  # onnxruntime raises its own exception classes
        if "this CPU lacks" in str(e):
            pytest.skip(str(e))
        assert re.search(r"its layout would take [\d.]+ MB of workspace per row of A, over its budget", str(e))
    else:
        pytest.fail(f"the {path} kernel took tl2 weights with group_size 1")


# --- the tvm path: every kernel of the committed tuning database --------------------------------

TVM_DATABASE = Path(__file__).resolve().parent.parent / "tvm_schedules" / "databases"


def tvm_database_kernels() -> list[pytest.param]:
    """(target, format, K, N, group_size) of every tuned kernel in the committed database."""
    kernels = set()
    for tuned in sorted(TVM_DATABASE.glob("*/tuned.json")):
        kernels |= {(e["target"], e["format"], e["k"], e["n"], e["group_size"]) for e in json.loads(tuned.read_text())}
    return [pytest.param(*s, id="-".join(map(str, s))) for s in sorted(kernels)]


def tvm_kernel_missing(target: str) -> str:
    """Why the library may lawfully lack a database kernel: built without TVM, or this CPU lacks its ISA."""
    if os.environ.get("SHERRY_TVM") == "OFF":
        return "SHERRY_TVM=OFF: the library was built without the TVM kernels (make lib SHERRY_TVM=OFF)"
    flags = Path("/proc/cpuinfo").read_text().split()
    isa = {"avx2": ["avx2", "fma", "f16c"], "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"]}
    needed = isa.get(target, isa["avx512"] if "avx512f" in flags else isa["avx2"])  # native: this CPU
    missing = [f for f in needed if f not in flags]
    return f"this CPU lacks {', '.join(missing)} for the {target} kernels" if missing else ""


@pytest.mark.parametrize(("target", "fmt", "k", "n", "group_size"), tvm_database_kernels())
def test_tvm_kernels_of_the_database_match_reference(
    target: str, fmt: str, k: int, n: int, group_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make lib` links every database kernel; each matches the int8 reference (GEMV, GEMM, 2 threads): M = 16
    (single blocks of the block function), 37 (a call of the block function, a single block and single
    rows, for every rows per block it may have tuned) and, on the smaller shapes, 128."""
    if reason := tvm_kernel_missing(target):
        pytest.skip(reason)
    monkeypatch.setenv("SHERRY_TVM_TARGET", target)
    packed = make_weight(fmt, k, n, group_size)
    bias = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    model = matmul_model(packed, bias=bias)
    rng = np.random.default_rng(4)
    for threads in (1, 2):
        session = make_session(model, threads=threads, kernel="tvm")
        for m in (1, 3, 16, 37, *((128,) if k * n <= 2048 * 2048 else ())):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[0, :group_size] = 0  # a zero group: scale 0
            check_against_reference(session.run(None, {"A": x})[0], reference_matmul(x, packed, bias, "int8"))


def test_tune_verify_times_tvm_and_hand_written_as_nodes(tmp_path: Path) -> None:
    """`sherry tune --verify` records both kernels as onnxruntime nodes: what auto mode compares."""
    pytest.importorskip("tvm")
    from tvm_schedules.tune import cpu_model, verify

    target = "avx2"
    if reason := tvm_kernel_missing(target):
        pytest.skip(reason)
    entry = min(json.loads((TVM_DATABASE / target / "tuned.json").read_text()), key=lambda e: e["k"] * e["n"])
    timings = ("tvm_node_us", "hand_node_us", "tvm_cold_us", "hand_cold_us", "tvm_batch_us", "hand_batch_us")
    for key in timings:
        entry.pop(key, None)
    (tmp_path / target).mkdir()
    (tmp_path / target / "tuned.json").write_text(json.dumps([entry]))
    [verified] = verify(target, tmp_path)
    assert all(verified[key] > 0 for key in timings)
    assert (verified["batch"], verified["batch_min_rows"]) == (128, 16)
    assert (verified["cpu"], verified["cpu_name"]) == cpu_model()  # the op trusts the times on this model only
    assert json.loads((tmp_path / target / "tuned.json").read_text()) == [verified]
    assert "SHERRY_TVM_TARGET" not in os.environ


def test_tvm_forced_on_an_untuned_shape_is_a_clear_error() -> None:
    model = matmul_model(make_weight("i2s", 96, 16, 32))
    with pytest.raises(Exception, match=r"the tvm kernel was requested .* no tuned TVM kernel for this shape"):
        make_session(model, kernel="tvm")
