"""Whole-model compilation (tvm_schedules.relax_onnx): exported decoders on TVM's Relax VM against
onnxruntime running the same export, and single ternary ops against the kernels' numerics reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sherry_export.export.llama import ExportOptions
from sherry_export.export.llm import export_model
from sherry_export.formats import pack, reference_matmul
from sherry_export.generate import OnnxCausalLM
from sherry_export.models import tiny_llama
from sherry_export.onnx_ops import matmul_model
from sherry_export.quant import absmean_ternarize, sherry_ternarize

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from tvm_schedules.relax_onnx import RelaxCausalLM, host_target, import_onnx  # noqa: E402

PROMPT = [3, 17, 200, 45, 9, 120, 77, 31, 5]
DECODE_STEPS = 4
# group sizes that leave a short last group (K = 128 and 256), and for tl2 a padded last triple
GROUP_SIZES = {"sherry": 48, "tl2": 40, "i2s": 40, "fp32": 48, "nbits4": 32}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # 4 query heads on 2 KV heads: the GQA head mapping is exercised
    return tiny_llama(seed=1, hidden_size=128, intermediate_size=256, num_hidden_layers=2)


def both_backends(
    model: torch.nn.Module, fmt: str, out: Path, head: str | None = None
) -> tuple[RelaxCausalLM, OnnxCausalLM]:
    head = head or ("nbits4" if fmt == "nbits4" else "fp32")  # MatMulNBits for the projections and the LM head
    export_model(model, out, ExportOptions(format=fmt, group_size=GROUP_SIZES[fmt], lm_head=head))
    return RelaxCausalLM(out), OnnxCausalLM(out / "model.onnx")


def prefill_and_decode(lm: OnnxCausalLM, tokens: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits of the prompt, then of each decode token in turn; and the final KV cache as numpy."""
    logits, cache = lm.forward(np.array([tokens[0]]))
    out = [logits]
    for token in tokens[1:]:
        logits, cache = lm.forward(np.array([token]), cache)
        out.append(logits)
    return out, [np.asarray(t.numpy() if hasattr(t, "numpy") else t) for pair in cache for t in pair]


def decode_tokens(ort: OnnxCausalLM) -> list[list[int]]:
    """The prompt and onnxruntime's greedy continuation, so both backends see the same inputs."""
    result = ort.generate(PROMPT, DECODE_STEPS + 1)
    return [PROMPT] + [[t] for t in result.tokens[:DECODE_STEPS]]


def test_fp32_export_matches_onnxruntime(model: torch.nn.Module, tmp_path: Path) -> None:
    """No int8 rounding anywhere: prefill, decode through the KV cache and the cache itself agree to float error."""
    lm, ort = both_backends(model, "fp32", tmp_path / "fp32")
    tokens = decode_tokens(ort)
    ours, our_cache = prefill_and_decode(lm, tokens)
    theirs, their_cache = prefill_and_decode(ort, tokens)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    for a, b in zip(our_cache, their_cache, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    # a batch of two different prompts in one call
    batch = np.array([PROMPT, PROMPT[::-1]])
    np.testing.assert_allclose(lm.forward(batch)[0], ort.forward(batch)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("fmt", "head"), [("sherry", None), ("tl2", None), ("i2s", None), ("nbits4", None), ("sherry", "nbits8")]
)
def test_quantized_export_matches_onnxruntime(
    model: torch.nn.Module, fmt: str, head: str | None, tmp_path: Path
) -> None:
    """sherry/tl2/i2s: both run the same int8 numerics, but a float difference upstream can move one
    activation across a rounding boundary; nbits4 and the nbits8 head: TVM computes MatMulNBits in float,
    onnxruntime with int8 activations (accuracy_level 4). So: the same top-1 everywhere, and logits within a
    small fraction of their spread."""
    lm, ort = both_backends(model, fmt, tmp_path / fmt, head)
    tokens = decode_tokens(ort)
    ours, _ = prefill_and_decode(lm, tokens)
    theirs, _ = prefill_and_decode(ort, tokens)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
        assert np.abs(a - b).max() <= 1e-2 * np.ptp(b), (np.abs(a - b).max(), np.ptp(b))
    generated = lm.generate(PROMPT, DECODE_STEPS + 1).tokens
    assert [[t] for t in generated[:DECODE_STEPS]] == tokens[1:]


@pytest.mark.parametrize("head", ["fp32", "nbits4"])
def test_tied_embedding_matches_onnxruntime(head: str, tmp_path: Path) -> None:
    """A tied table stored once: the float LM head as FusedMatMul (transB=1) on the embedding's table, or
    the quantized embedding as GatherBlockQuantized on the head's MatMulNBits bytes."""
    tied = tiny_llama(seed=2, hidden_size=128, intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=True)
    out = tmp_path / head
    export_model(tied, out, ExportOptions(format="fp32", lm_head=head))
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert {"fp32": "FusedMatMul", "nbits4": "GatherBlockQuantized"}[head] in ops
    lm, ort = RelaxCausalLM(out), OnnxCausalLM(out / "model.onnx")
    tokens = decode_tokens(ort)
    ours, _ = prefill_and_decode(lm, tokens)
    theirs, _ = prefill_and_decode(ort, tokens)
    for a, b in zip(ours, theirs, strict=True):
        if head == "fp32":
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
        else:  # TVM computes MatMulNBits in float, onnxruntime with int8 activations; the embedding is exact
            np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))
            assert np.abs(a - b).max() <= 1e-2 * np.ptp(b)


def test_int8_head_is_refused_with_what_to_do(model: torch.nn.Module, tmp_path: Path) -> None:
    """An export whose LM head is in our int8 format has no Relax converter yet: the import says which op
    and how to re-export, before any compilation."""
    out = tmp_path / "int8-head"
    export_model(model, out, ExportOptions(format="sherry", group_size=GROUP_SIZES["sherry"], lm_head="int8"))
    with pytest.raises(tvm.error.OpNotImplemented, match=r"Int8MatMul.*re-export with --lm-head fp32 or nbits8"):
        RelaxCausalLM(out)


def constant_bytes(mod: tvm.IRModule) -> dict[str, int]:
    """Bytes of the Relax module's constants, by dtype (the weights the compiled model holds)."""
    total: dict[str, int] = {}
    seen: list[relax.Expr] = []

    def visit(expr: relax.Expr) -> None:
        # tensor constants (not scalar immediates), each once however often it is used
        if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
            if any(expr.same_as(s) for s in seen):
                return
            seen.append(expr)
            array = expr.value.numpy()
            total[str(array.dtype)] = total.get(str(array.dtype), 0) + array.nbytes

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return total


def test_ternary_weights_stay_packed(model: torch.nn.Module, tmp_path: Path) -> None:
    """The compiled sherry model holds its projections as code bytes, not float32: the TVM kernels' layout
    (tvm_schedules/layout.py) stores one byte per code of 4 weights, 2 bits per weight (the canonical
    sherry packing is 1.25); group 32 needs no padding."""
    export_model(model, tmp_path / "s", ExportOptions(format="sherry", group_size=32))
    held = constant_bytes(import_onnx(onnx.load(tmp_path / "s" / "model.onnx")))
    weights = sum(p.numel() for n, p in model.named_parameters() if "proj" in n)
    assert held.get("uint8", 0) == weights // 4  # one byte per code of 4 weights: 2 bits per weight
    config = model.config
    embed_and_head = 2 * config.vocab_size * config.hidden_size * 4
    rotary = 2 * config.max_position_embeddings * (config.hidden_size // config.num_attention_heads // 2) * 4
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size * 4
    scales = weights // 32 * 4  # one float32 α per group
    assert 0 <= held["float32"] - (embed_and_head + rotary + norms + scales) <= 16  # and a few scalars


@pytest.mark.parametrize("fmt", ["sherry", "tl2", "i2s"])
def test_single_op_matches_int8_reference(fmt: str) -> None:
    """One ai.sherry node with a bias, a NaN row and an all-zero row: the converter's activation quantization
    and the kernel reproduce reference_matmul(activations="int8") up to the order of the float group sum."""
    k, n, gs = 200, 48, 64  # 4 groups, the last one short
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    packed = pack(fmt, (sherry_ternarize if fmt == "sherry" else absmean_ternarize)(weight, gs), gs)
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    x = np.random.default_rng(3).standard_normal((2, 3, k), dtype=np.float32)
    x[0, 0, :5] *= 50
    x[1, 1] = 0.0
    x[1, 2, 70] = np.nan
    target = host_target()
    lib = tvm.compile(import_onnx(matmul_model(packed, bias, ("B", "S"))), target=target)
    vm = relax.VirtualMachine(lib, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = reference_matmul(x, packed, bias, activations="int8")
    assert y.shape == (2, 3, n)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    assert np.isnan(y[1, 2]).all() and not np.isnan(y[1, 1]).any()
    np.testing.assert_array_equal(y[1, 1], bias)
    finite = ~np.isnan(ref)
    bound = 4 * np.finfo(np.float32).eps * (np.nanmax(np.abs(ref)) + 1) * (k // gs + 2)
    assert np.abs(y[finite] - ref[finite]).max() <= bound


def test_tvm_run_command(model: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sherry tvm-run` compiles, generates, and races onnxruntime: both rows, the same greedy tokens."""
    from sherry_export.cli import main

    export_model(model, tmp_path / "s", ExportOptions(format="sherry", group_size=32))
    ids = ",".join(str(t) for t in PROMPT)
    assert (
        main(
            [
                "tvm-run",
                str(tmp_path / "s"),
                "--prompt-ids",
                ids,
                "--max-new-tokens",
                "4",
                "--rounds",
                "1",
                "--compare-onnxruntime",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    ort_tokens = OnnxCausalLM(tmp_path / "s" / "model.onnx").generate(PROMPT, 4).tokens
    assert f"tokens: {' '.join(map(str, ort_tokens))}" in out
    assert "| tvm |" in out and "| onnxruntime |" in out and "differ" not in err


def test_decode_module_writes_the_cache_in_place(model: torch.nn.Module, tmp_path: Path) -> None:
    """The decode module (one token, KV buffers written in place, the length from the mask's shape) against
    onnxruntime's forward on the same fp32 export, with 4 query heads on 2 KV heads: the prompt token by
    token, then several decode steps give the same logits to float error; the buffers hold onnxruntime's
    present cache in their first positions and nothing was written past the sequence."""
    lm, ort = both_backends(model, "fp32", tmp_path / "fp32")
    tokens = decode_tokens(ort)
    theirs, their_cache = prefill_and_decode(ort, tokens)
    capacity = len(PROMPT) + DECODE_STEPS + 3
    decoder = lm.decoder(capacity)
    assert decoder.capacity == capacity
    ours = [decoder.prefill(tokens[0])] + [decoder.step(t[0])[None, None].copy() for t in tokens[1:]]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    length = len(PROMPT) + DECODE_STEPS
    assert decoder.length == length
    buffers = [
        decoder.cache[f"past_key_values.{i}.{kv}"].numpy() for i in range(lm.num_layers) for kv in ("key", "value")
    ]
    for buffer, present in zip(buffers, their_cache, strict=True):
        assert buffer.shape == (1, lm.kv_heads, capacity, lm.head_dim)
        np.testing.assert_allclose(buffer[:, :, :length], present, atol=2e-5, rtol=1e-4)
        assert not buffer[:, :, length:].any()
    # a new prompt starts over on the same buffers; a full buffer refuses another token
    assert lm.decoder(capacity) is decoder
    again = decoder.prefill(tokens[0])
    np.testing.assert_allclose(again, theirs[0], atol=2e-5, rtol=1e-4)
    for _ in range(capacity - len(PROMPT)):
        decoder.step(1)
    with pytest.raises(ValueError, match="KV buffer is full"):
        decoder.step(1)


def test_decode_module_uses_static_shapes_and_tuned_kernels(model: torch.nn.Module, tmp_path: Path) -> None:
    """The decode module's ternary calls are the static M = 1 kernels (what ``sherry tune`` tunes) and its
    attention is the in-place function; the KV cache is never concatenated."""
    from tvm_schedules.relax_onnx import converters, decode_model

    export_model(model, tmp_path / "s", ExportOptions(format="sherry", group_size=32))
    forward = import_onnx(onnx.load(tmp_path / "s" / "model.onnx"))
    mod = import_onnx(decode_model(onnx.load(tmp_path / "s" / "model.onnx")), converters(shared_cache=True))
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert any(n.startswith("ternary_") and n.endswith("_m1") for n in names)
    assert not any(n.startswith("ternary_") and not n.endswith("_m1") for n in names)
    assert any(n.startswith("decode_attention_") for n in names)
    assert "R.concat" in forward["main"].script() and "R.concat" not in mod["main"].script()


THREADS_PROBE = """
import importlib.util, sys
import tvm
spec = importlib.util.spec_from_file_location("relax_onnx_under_test", sys.argv[1])
module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for n in (2, 1, 2):
    module.set_threads(n)
    assert tvm.runtime.num_threads() == n, (n, tvm.runtime.num_threads())
print("ok")
"""


def test_threads_sets_the_tvm_pool() -> None:
    """``set_threads`` (``--threads``) sizes TVM's pool both ways; TVM's default on a 2-core machine is one
    worker, which ``runtime.config_threadpool`` alone cannot raise. In a fresh process, as the pool starts
    once per process; the module is loaded from its file, which an installed copy cannot shadow. A pool
    started too small is an error that says what to set."""
    import os
    import subprocess
    import sys

    import tvm_schedules.relax_onnx as relax_onnx

    probe = [sys.executable, "-c", THREADS_PROBE, relax_onnx.__file__]
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    run = subprocess.run(probe, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
    run = subprocess.run(probe, env={**env, "TVM_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert run.returncode != 0 and "set TVM_NUM_THREADS=2" in run.stderr, run.stderr[-2000:]


def test_untuned_shape_borrows_the_nearest_tuned_knobs() -> None:
    """A shape the tuning database lacks (the exporter's fused gate-up projection: twice the tuned N) takes
    the knobs tuned for the same format, K and group size at the nearest N; a tuned shape keeps its own;
    a K without any entry gets the default."""
    import json

    from tvm_schedules.kernels import Knobs, knob_space
    from tvm_schedules.layout import Shape
    from tvm_schedules.relax_onnx import DATABASES, default_knobs, tuned_knobs

    fmt = "i2s"  # plane entries (the avx512 sherry entries are LUT kernels)
    entries = [e for e in json.loads((DATABASES / "avx512" / "tuned.json").read_text()) if e["format"] == fmt]
    entry = max(entries, key=lambda e: e["n"])

    def knobs(e: dict) -> Knobs:
        return Knobs(tiles=e["tiles"], unroll=e["unroll"], order=e["order"])

    tuned = Shape(fmt, entry["k"], entry["n"], entry["group_size"])
    assert tuned_knobs(tuned, "avx512") == knobs(entry)
    wider = Shape(fmt, entry["k"], 2 * entry["n"], entry["group_size"])
    assert not any((e["k"], e["n"]) == (wider.k, wider.n) for e in entries)
    assert tuned_knobs(wider, "avx512") == knobs(entry) and knobs(entry) in knob_space(wider)
    untuned_k = Shape(fmt, 4 * max(e["k"] for e in entries), 256, entry["group_size"])
    assert tuned_knobs(untuned_k, "avx512") == default_knobs(untuned_k)


def test_entries_lend_knobs_within_their_formulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two kernels' knobs mean different loops: a ``lut`` entry lends its knobs only to the LUT kernel
    (its own shape, or borrowed for another N) and a plane entry only to the plane kernel; without an
    entry of its formulation each kernel takes its default."""
    import json

    from tvm_schedules import relax_onnx
    from tvm_schedules.kernels import Knobs
    from tvm_schedules.layout import Shape

    def entry(n: int, tiles: int, unroll: int, order: str, formulation: str) -> dict:
        shape = {"format": "sherry", "k": 2048, "n": n, "group_size": 128}
        return shape | {"tiles": tiles, "unroll": unroll, "order": order, "formulation": formulation}

    (tmp_path / "avx512").mkdir()
    tuned = tmp_path / "avx512" / "tuned.json"
    monkeypatch.setattr(relax_onnx, "DATABASES", tmp_path)
    shape = Shape("sherry", 2048, 2048, 128)
    tuned.write_text(json.dumps([entry(2048, 8, 1, "tile", "lut")]))
    assert relax_onnx.tuned_knobs(shape, "avx512") == relax_onnx.default_knobs(shape) != Knobs(8, 1, "tile")
    assert relax_onnx.tuned_knobs(shape, "avx512", formulation="lut") == Knobs(8, 1, "tile")
    tuned.write_text(json.dumps([entry(2048, 8, 1, "tile", "lut"), entry(512, 4, 2, "tile", "plane")]))
    assert relax_onnx.tuned_knobs(shape, "avx512") == Knobs(4, 2, "tile")
    assert relax_onnx.tuned_knobs(Shape("sherry", 2048, 1024, 128), "avx512") == Knobs(4, 2, "tile")
    assert relax_onnx.tuned_knobs(Shape("sherry", 2048, 1024, 128), "avx512", formulation="lut") == Knobs(8, 1, "tile")
    tuned.write_text(json.dumps([entry(512, 4, 2, "tile", "plane")]))
    lut_default = relax_onnx.tuned_knobs(shape, "avx512", formulation="lut")
    assert lut_default == relax_onnx.default_knobs(shape, "lut") == Knobs(8, 1, "pair")


def test_decode_calls_of_sherry_take_the_lut_kernel_on_avx512() -> None:
    """The formulation per call: the LUT kernel (1.25 bits per weight read) for sherry's M = 1 calls on
    AVX-512; the plane kernel for any-M calls (the forward module), AVX2, other formats and shapes the LUT
    layout cannot take."""
    from tvm_schedules.layout import Shape
    from tvm_schedules.relax_onnx import formulation_for

    sherry = Shape("sherry", 2048, 512, 128)
    assert formulation_for(sherry, 1, "avx512") == "lut"
    assert formulation_for(sherry, None, "avx512") == "plane"
    assert formulation_for(sherry, 1, "avx2") == "plane"
    assert formulation_for(Shape("tl2", 2048, 512, 128), 1, "avx512") == "plane"
    assert formulation_for(Shape("i2s", 2048, 512, 128), 1, "avx512") == "plane"
    assert formulation_for(Shape("sherry", 2048, 520, 128), 1, "avx512") == "plane"  # N not a multiple of 16


@pytest.mark.parametrize(("k", "gs"), [(200, 64), (256, 48), (2048, 128)])
def test_lut_tables_function_matches_numpy(k: int, gs: int) -> None:
    """The Relax path's activation tables (a scheduled TE function, any host) are lut.activations' bytes:
    every table of every pair, the padding of short groups, a NaN group's zero tables and NaN scale, an
    all-zero row; and nothing but zeros past the pairs."""
    from tvm_schedules import lut
    from tvm_schedules.lut import LutShape
    from tvm_schedules.relax_onnx import SHERRY_LANES, lut_activations_func

    ls = LutShape(k, 64, gs)
    x = np.random.default_rng(k).standard_normal((4, k), dtype=np.float32)
    x[0, :5] *= 60
    x[2, 7] = np.nan
    x[3] = 0.0
    slots = ls.row_bytes // lut.TABLE_BYTES
    tables = tvm.runtime.tensor(np.full((4, slots, 2, 2, 2, 4, 16), 99, np.int8))
    scales = tvm.runtime.tensor(np.full((4, ls.row_bytes // 4), 99, np.float32))
    lib = tvm.compile(tvm.IRModule({"main": lut_activations_func(ls)}), target=host_target())
    lib[f"tables_{ls.key}"](tvm.runtime.tensor(x), tvm.runtime.tensor(SHERRY_LANES), tables, scales)
    want_tables, want_scales = lut.activations(ls, x)
    got = tables.numpy().reshape(4, -1)
    np.testing.assert_array_equal(got[:, : ls.scale_offset], want_tables[:, : ls.scale_offset])
    assert not got[:, ls.scale_offset :].any()
    np.testing.assert_array_equal(scales.numpy()[:, : ls.groups], want_scales[:, : ls.groups])
    assert not scales.numpy()[:, ls.groups :].any()


def test_decode_sized_sherry_op_matches_int8_reference() -> None:
    """One sherry node of one token (the decode module's static M = 1): on AVX-512 the LUT kernel with the
    TE tables, elsewhere the plane kernel; either way the int8 reference up to the order of the float
    group sum, and a non-finite token gives NaN outputs."""
    from tvm_schedules.layout import Shape
    from tvm_schedules.relax_onnx import formulation_for

    k, n, gs = 200, 48, 64
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(4))
    packed = pack("sherry", sherry_ternarize(weight, gs), gs)
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    mod = import_onnx(matmul_model(packed, bias, (1, 1)))
    lut_kernel = formulation_for(Shape("sherry", k, n, gs), 1) == "lut"
    assert any(gv.name_hint.startswith("ternary_sherry_lut_") for gv in mod.get_global_vars()) == lut_kernel
    vm = relax.VirtualMachine(tvm.compile(mod, target=host_target()), tvm.cpu())
    for x in np.random.default_rng(5).standard_normal((3, 1, 1, k), dtype=np.float32):
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
        ref = reference_matmul(x, packed, bias, activations="int8")
        bound = 4 * np.finfo(np.float32).eps * (np.abs(ref).max() + 1) * (k // gs + 2)
        assert np.abs(y - ref).max() <= bound
    x[0, 0, 3] = np.inf
    assert np.isnan(vm["main"](tvm.runtime.tensor(x)).numpy()).all()


@pytest.mark.parametrize(("bits", "n"), [(8, 256), (8, 48), (4, 128), (2, 80)])
def test_nbits_function_matches_the_dequantized_weight(bits: int, n: int) -> None:
    """The MatMulNBits function on its layout (nbits_weights: one stream of up to 8 vectors of rows per
    task, 8-bit codes stored as q - 128) against x @ dequantize_nbitsᵀ in float64: every code value, a K
    that leaves the last block short, N in whole and partial 128-row blocks."""
    from sherry_export.export.projections import dequantize_nbits, pack_nbits
    from tvm_schedules.relax_onnx import NBitsShape, nbits_func, nbits_weights

    k, bs = 200, 32
    shape = NBitsShape(k, n, bits, bs)
    rng = np.random.default_rng(bits * n)
    q = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    q[:2].reshape(-1)[: 1 << bits] = np.arange(1 << bits)  # every code value
    codes = pack_nbits(q, bits, bs)
    scales = rng.random((n, shape.groups), dtype=np.float32).astype(np.float16)
    x = rng.standard_normal((3, k), dtype=np.float32)
    lib = tvm.compile(tvm.IRModule({"main": nbits_func(shape).with_attr("global_symbol", "main")}), host_target())
    y = tvm.runtime.tensor(np.zeros((3, n), np.float32))
    lib["main"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(a) for a in nbits_weights(codes, scales, shape)), y)
    want = x.astype(np.float64) @ dequantize_nbits(codes, scales, bits, bs, k).astype(np.float64).T
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("formulation", ["plane", "lut"])
def test_measured_knobs_time_the_formulations_own_space(formulation: str) -> None:
    """``--measure-knobs`` times every point of the call's kernel (the LUT kernel runs on AVX-512 only) and
    returns one of them."""
    from tvm_schedules.layout import Shape
    from tvm_schedules.relax_onnx import formulation_knob_space, measured_knobs
    from tvm_schedules.tune import host_isa

    if formulation == "lut" and host_isa() != "avx512":
        pytest.skip("the LUT kernel needs AVX-512")
    shape = Shape("sherry", 256, 64, 128)
    knobs = measured_knobs(shape, host_target(), number=3, formulation=formulation)
    assert knobs in formulation_knob_space(shape, formulation)
