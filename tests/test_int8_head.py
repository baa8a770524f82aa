"""The int8 head format (``Int8MatMul``, ``--lm-head int8``): its quantizer, its bytes, its kernels against the
numpy reference, and a tiny model exported and run with it as the LM head and the tied embedding."""

from __future__ import annotations

import json
from copy import deepcopy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_custom_ops import open_session
from test_export import untied_copy

from sherry_export.export import ExportOptions
from sherry_export.export.llama import LM_HEAD_BLOCK
from sherry_export.export.llm import export_model
from sherry_export.formats import (
    HEAD_FORMATS,
    INT8_MAX,
    LM_HEADS,
    SCALE_DTYPE,
    Ternary,
    dequantize,
    pack,
    quantize_int8,
    reference_matmul,
    unpack,
)
from sherry_export.generate import OnnxCausalLM
from sherry_export.models import tiny_llama
from sherry_export.onnx_ops import matmul_model
from sherry_export.runtime import make_session

KERNELS = ("scalar", "avx2", "avx512", "auto")

def test_int8_is_an_lm_head_choice() -> None:
    assert "int8" in HEAD_FORMATS and "int8" in LM_HEADS
    fmt = HEAD_FORMATS["int8"]
    assert fmt.max_weight == INT8_MAX == 127
    assert fmt.max_group_size == (2**31 - 1) // (127 * 127)
    assert 127 * 127 * fmt.max_group_size <= 2**31 - 1 < 127 * 127 * (fmt.max_group_size + 1)
    with pytest.raises(ValueError, match=r"at most 133144 \(127 x 127 x group_size"):
        fmt.check_geometry(200_000, 133_145)


def test_quantize_int8_rounds_to_the_stored_scale() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((9, 70)).astype(np.float32)
    weight[3, 35:] = 0  # an all-zero group
    values, scales = quantize_int8(weight, 35)
    assert values.dtype == np.int8 and values.shape == (9, 70) and scales.shape == (9, 2)
    assert np.array_equal(scales, scales.astype(SCALE_DTYPE).astype(np.float32))  # float16 values, stored exactly
    assert scales[3, 1] == 0 and not values[3, 35:].any()
    assert np.abs(values).max() == 127
    alpha = np.repeat(scales, 35, axis=1)
    error = np.abs(values * alpha - weight)
    # round to nearest on the stored scale: within half a step, plus what clipping at ±127 costs when the
    # float16 scale rounded down (at most 127 x its 2^-11 relative rounding)
    assert (error <= alpha * (0.5 + 127 * 2.0**-11) + 1e-7).all()
    with pytest.raises(ValueError, match="float16's range"):
        quantize_int8(np.full((1, 4), 1e7, np.float32), 4)


def test_golden_bytes() -> None:
    """The stored layout: one byte per weight, w + 128, row after row; float16 scales per group."""
    values = np.array([[-127, -1, 0, 1, 127, 5], [2, 0, 0, -3, 0, 9]], np.int8)
    scales = np.array([[0.5, 2.0], [1.0, 0.25]], np.float32)
    packed = pack("int8", Ternary(values, scales), 3)
    assert packed.data.tobytes() == bytes([1, 127, 128, 129, 255, 133, 130, 128, 128, 125, 128, 137])
    assert packed.scales.dtype == np.float16 and packed.scales.tobytes() == scales.astype(np.float16).tobytes()
    assert packed.bits_per_weight == pytest.approx(8 + 16 / 3)
    back = unpack(packed)
    assert np.array_equal(back.values.numpy(), values)
    assert np.array_equal(dequantize(packed), values * np.repeat(scales, 3, axis=1))


def test_pack_refuses_what_int8_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"int8 values must lie in \[-127, 127\]"):
        pack("int8", Ternary(np.full((1, 4), -128, np.int8), np.ones((1, 1), np.float32)), 4)
    with pytest.raises(ValueError, match="ternary values must lie"):  # the ternary formats keep their rule
        pack("i2s", Ternary(np.full((1, 4), 2, np.int8), np.ones((1, 1), np.float32)), 4)


@pytest.mark.parametrize(("n", "k", "group_size", "m"), [(100, 256, 32, 1), (37, 70, 35, 5), (130, 2048, 128, 3)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_op_equals_the_numpy_reference(n: int, k: int, group_size: int, m: int, kernel: str) -> None:
    """Every kernel path gives reference_matmul(activations="int8") bit for bit, with and without a bias."""
    rng = np.random.default_rng(n + k)
    packed = pack("int8", quantize_int8(rng.standard_normal((n, k)).astype(np.float32), group_size), group_size)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :group_size] = 0  # a group of zeros: s = 0
    bias = rng.standard_normal(n).astype(np.float32)
    for b in (None, bias):
        y = open_session(matmul_model(packed, bias=b), kernel).run(None, {"A": x})[0]
        np.testing.assert_array_equal(y, reference_matmul(x, packed, bias=b, activations="int8"))


def test_op_refuses_code_zero() -> None:
    packed = pack("int8", quantize_int8(np.ones((4, 8), np.float32), 8), 8)
    data = packed.data.copy()
    data[2, 5] = 0
    model = matmul_model(packed)
    for init in model.graph.initializer:
        if init.name.endswith(".B"):
            init.CopyFrom(numpy_helper.from_array(data, init.name))
    with pytest.raises(Exception, match="corrupt int8 weights: row 2"):
        make_session(model)


@pytest.fixture(scope="module")
def tied() -> torch.nn.Module:
    return tiny_llama(
        seed=2, vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=True
    )


def test_exported_int8_head_and_shared_embedding(tied, tmp_path) -> None:
    """--lm-head int8 on a tied model: one int8 table, read by Int8MatMul (the head) and GatherBlockQuantized
    (the embedding, in float16, cast to float32); the logits equal, bit for bit, those of an untied export whose
    float embedding is that float16 lookup and whose head is the same int8 table; the op library travels with
    the folder even for fp32 projections."""
    v, h = tied.config.vocab_size, tied.config.hidden_size
    options = ExportOptions(format="fp32", lm_head="int8")
    result = export_model(tied, tmp_path / "int8", options)
    assert result.options.embedding == "int8"
    model = onnx.load(result.model_path)
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    head, embed = nodes["lm_head"], nodes["embed"]
    assert head.op_type == "Int8MatMul" and head.domain == "ai.sherry"
    assert embed.op_type == "GatherBlockQuantized" and list(embed.input[::2]) == list(head.input[1:3])
    codes, scales = stored[head.input[1]], stored[head.input[2]]
    assert codes.shape == (v, h) and codes.dtype == np.uint8 and scales.shape == (v, h // LM_HEAD_BLOCK)
    assert not any(a.dtype == np.float32 and a.shape == (v, h) for a in stored.values())
    assert result.size_split == {**result.size_split, "lm_head": v * h + 2 * v * h // LM_HEAD_BLOCK, "embedding": 0}
    assert (result.model_path.parent / "libsherry_ops.so").is_file()
    genai = json.loads((result.model_path.parent / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["custom_ops_library"] == "libsherry_ops.so"

    # what the head multiplies by is the quantized table of quantize_int8
    expect = quantize_int8(tied.lm_head.weight.detach().numpy(), LM_HEAD_BLOCK)
    assert np.array_equal(codes.astype(np.int16) - 128, expect.values)
    table = (codes.astype(np.float32) - 128) * np.repeat(scales.astype(np.float32), LM_HEAD_BLOCK, axis=1)
    reference_model = untied_copy(tied, embedding=table.astype(np.float16).astype(np.float32))
    reference_model.lm_head.weight = torch.nn.Parameter(deepcopy(tied.lm_head.weight.detach()))
    reference = export_model(
        reference_model, tmp_path / "reference", ExportOptions(format="fp32", lm_head="int8", embedding="fp32")
    )
    ids = np.random.default_rng(3).integers(0, v, (2, 11))
    lm, ref = OnnxCausalLM(result.model_path), OnnxCausalLM(reference.model_path)
    logits = lm.forward(ids)[0]
    np.testing.assert_array_equal(logits, ref.forward(ids)[0])

    # close to the float head: the 8-bit table and int8 activations cost little
    float_lm = OnnxCausalLM(export_model(tied, tmp_path / "fp32", ExportOptions(format="fp32")).model_path)
    float_logits = float_lm.forward(ids)[0]
    assert np.abs(logits - float_logits).max() < 0.05 * np.abs(float_logits).max()
    assert (logits.argmax(-1) == float_logits.argmax(-1)).mean() >= 0.9

    # shared-buffer decode gives forward's logits bit for bit
    prompt = ids[0, :6].tolist()
    generated = lm.generate(prompt, 5).tokens
    sequence = prompt + generated[:-1]
    full = lm.forward(np.array([sequence]))[0][0]
    assert generated == [int(t) for t in full[len(prompt) - 1 :].argmax(-1)]
