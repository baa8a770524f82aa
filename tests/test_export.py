"""The LLM exporter: graphs that pass onnx.checker and match the PyTorch model they came from."""

import json
import re
import shutil
from copy import deepcopy as copy_module
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper
from transformers import GPT2Config, GPT2LMHeadModel

from sherry_export.export import ExportOptions, build_decoder, graph
from sherry_export.export.llama import LM_HEAD_BLOCK, model_ternaries
from sherry_export.export.llm import export_model
from sherry_export.export.projections import (
    Projection,
    dequantize_nbits,
    emit_projection,
    gather_nbits,
    nbits_matmul,
    nbits_weight,
    pack_nbits,
    quantize_float_nbits,
)
from sherry_export.generate import ForwardDecoder, OnnxCausalLM
from sherry_export.models import TINY_CONFIG, tiny_llama
from sherry_export.provenance import resolve_group_size
from sherry_export.reference import kernel_reference_model

TERNARY_FORMATS = ["sherry", "tl2", "i2s", "nbits2", "nbits4"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=1, hidden_size=128, intermediate_size=256, num_hidden_layers=2)


def export(model, tmp_path, **options):
    result = export_model(model, tmp_path / options.get("format", "x"), ExportOptions(**options))
    return OnnxCausalLM(result.model_path), result


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_fp32_export_matches_transformers(tiny, tmp_path):
    lm, result = export(tiny, tmp_path, format="fp32")
    onnx.checker.check_model(onnx.load(result.model_path), full_check=True)
    ids = np.random.default_rng(0).integers(0, 256, (2, 17))
    logits, cache = lm.forward(ids)
    np.testing.assert_allclose(logits, torch_logits(tiny, ids), atol=1e-4)
    assert cache[0][0].shape == (2, 2, 17, 32)


@pytest.mark.parametrize("fmt", ["fp32", *TERNARY_FORMATS])
def test_kv_cache_matches_full_forward(tiny, tmp_path, fmt):
    lm, _ = export(tiny, tmp_path, format=fmt, group_size=32)
    ids = np.random.default_rng(1).integers(0, 256, (1, 20))
    full, _ = lm.forward(ids)
    steps, cache = lm.forward(ids[:, :9])
    pieces = [steps]
    for t in range(9, 20):
        logits, cache = lm.forward(ids[:, t : t + 1], cache)
        pieces.append(logits)
    stepped = np.concatenate(pieces, axis=1)
    if fmt == "fp32":
        np.testing.assert_allclose(stepped, full, atol=2e-4)
    else:  # attention's float rounding differs between prefill and decode; int8 rounding can amplify it by a step
        np.testing.assert_allclose(stepped, full, atol=1e-2 * np.abs(full).max())
        assert (stepped.argmax(-1) == full.argmax(-1)).mean() >= 0.95


def assert_shared_decode_equals_forward(lm: OnnxCausalLM, runs: list[tuple[list[int], int]]) -> None:
    """Prefill and decode in one shared KV buffer give ``forward``'s logits bit for bit, and the buffer ends up
    holding ``forward``'s present. The runs reuse one buffer, shorter after longer, so a stale position
    read would show."""
    decoder = lm.decoder(max(len(ids) for ids, _ in runs))
    for ids, prompt in runs:
        expected, cache = lm.forward(np.array([ids[:prompt]]))
        np.testing.assert_array_equal(decoder.prefill(ids[:prompt]), expected)
        for t in range(prompt, len(ids)):
            expected, cache = lm.forward(np.array([ids[t : t + 1]]), cache)
            np.testing.assert_array_equal(decoder.step(ids[t]), expected[0, 0])
        assert decoder.length == len(ids)
        for i, (k, v) in enumerate(cache):
            np.testing.assert_array_equal(decoder.cache[i, 0, :, :, : len(ids)], k)
            np.testing.assert_array_equal(decoder.cache[i, 1, :, :, : len(ids)], v)


@pytest.mark.parametrize("fmt", ["fp32", *TERNARY_FORMATS])
def test_shared_kv_decode_equals_copying_forward(tiny, tmp_path, fmt):
    lm, _ = export(tiny, tmp_path, format=fmt, group_size=32)
    rng = np.random.default_rng(2)
    runs = [(rng.integers(0, 256, 24).tolist(), 9), (rng.integers(0, 256, 10).tolist(), 4)]
    assert_shared_decode_equals_forward(lm, runs)


def test_shared_kv_decoder_is_reused_and_bounded(tiny, tmp_path):
    """Generation reuses a decoder that fits (its logits buffer is the same memory step after step) and
    replaces one that does not; stepping before a prefill or past the capacity is refused."""
    lm, _ = export(tiny, tmp_path, format="sherry", group_size=32)
    decoder = lm.decoder(12)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.step(1)
    greedy = lm.generate([5, 17, 99], 10).tokens
    assert lm.decoder(12) is decoder and decoder.length == 12
    with pytest.raises(ValueError, match="full"):
        decoder.step(greedy[-1])
    decoder.prefill([5, 17, 99])
    assert np.shares_memory(decoder.step(greedy[0]), decoder.step(greedy[1]))
    assert lm.generate([5, 17, 99], 11).tokens[:10] == greedy and lm.decoder(12) is not decoder

    plain = ForwardDecoder(lm)  # what a backend whose forward keeps its own cache can generate with
    with pytest.raises(RuntimeError, match="prefill"):
        plain.step(1)
    np.testing.assert_array_equal(plain.prefill([5, 17, 99]), decoder.prefill([5, 17, 99]))
    for token in greedy[:4]:
        np.testing.assert_array_equal(plain.step(token), decoder.step(token))


@pytest.mark.parametrize("fmt", TERNARY_FORMATS)
def test_ternary_export_matches_kernel_reference(tiny, tmp_path, fmt):
    options = {"format": fmt, "group_size": 32}
    lm, result = export(tiny, tmp_path, **options)
    onnx.checker.check_model(onnx.load(result.model_path), full_check=True)
    reference = kernel_reference_model(tiny, model_ternaries(tiny, ExportOptions(**options)))
    ids = np.random.default_rng(2).integers(0, 256, (1, 64))
    logits, _ = lm.forward(ids)
    expected = torch_logits(reference, ids)
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.99
    # MatMulNBits quantizes activations by its own rounding rules, so only ours are matched to the step
    tolerance = 1e-2 if fmt.startswith("nbits") else 2e-3
    np.testing.assert_allclose(logits, expected, atol=tolerance * np.abs(expected).max())
    # greedy generation is identical
    prompt = [5, 17, 99, 3]
    onnx_tokens = lm.generate(prompt, 32).tokens
    seq = list(prompt)
    for _ in range(32):
        seq.append(int(torch_logits(reference, np.array([seq]))[0, -1].argmax()))
    assert onnx_tokens == seq[len(prompt) :]


def test_file_size_matches_bits_accounting(tiny, tmp_path):
    sizes = {}
    for fmt in ("sherry", "tl2", "i2s"):
        _, result = export(tiny, tmp_path, format=fmt, group_size=32)
        model = onnx.load(result.model_path)
        sizes[fmt] = sum(len(t.raw_data) for t in model.graph.initializer if t.name.endswith((".B", ".scales")))
    weights = sum(p.numel() for n, p in tiny.named_parameters() if "proj" in n)
    groups = weights // 32
    assert sizes["sherry"] == weights * 5 // 32 + 2 * groups
    assert sizes["i2s"] == weights // 4 + 2 * groups
    assert sizes["sherry"] < sizes["tl2"] < sizes["i2s"]


@pytest.mark.parametrize("fmt", ["fp32", "sherry"])
def test_external_data_export_matches_inline(tiny, tmp_path, monkeypatch, fmt):
    """Past the threshold the weights go to model.onnx.data; the model is the same."""
    inline, inline_result = export(tiny, tmp_path / "inline", format=fmt, group_size=32)
    assert {f.name for f in inline_result.files}.isdisjoint({"model.onnx.data"})
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)
    external, result = export(tiny, tmp_path / "external", format=fmt, group_size=32)
    data = result.model_path.with_name("model.onnx.data")
    assert data in result.files and data.stat().st_size > result.model_path.stat().st_size
    onnx.checker.check_model(result.model_path, full_check=True)
    ids = np.random.default_rng(3).integers(0, 256, (1, 9))
    np.testing.assert_array_equal(external.forward(ids)[0], inline.forward(ids)[0])


def test_save_model_writes_large_weights_lazily_to_aligned_external_data(tmp_path, monkeypatch):
    """Past the threshold, every initializer of EXTERNAL_MIN_BYTES or more goes to model.onnx.data at an aligned
    offset, the small ones stay in the file, and onnxruntime runs it. A float weight's transpose is made only
    while it is written, never held in the graph. Under the threshold the file holds everything, and the data
    file of an earlier save is gone."""
    import onnxruntime as ort

    rng = np.random.default_rng(9)
    k, n = 64, 300
    weight, bias = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    b = graph.GraphBuilder("projection")
    x = b.add_input("x", graph.FLOAT, ["m", k])
    y = emit_projection(b, x, "proj", Projection(weight=weight, bias=bias), "fp32")
    b.add_output(b.op("Mul", y, b.constant("two", [2], np.float32)), "y", graph.FLOAT, ["m", n])
    model = b.model()
    assert isinstance(model.graph.initializers["proj.weight_t"].const_value, ir.LazyTensor)
    a = rng.standard_normal((3, k)).astype(np.float32)
    expected = 2 * (a @ weight.T + bias)
    path = tmp_path / "model.onnx"

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 4 * k * n)
    assert graph.save_model(model, path) == [path, tmp_path / "model.onnx.data"]
    onnx.checker.check_model(path, full_check=True)
    stored = {t.name: t for t in onnx.load(path, load_external_data=False).graph.initializer}
    external = {name for name, t in stored.items() if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {"proj.weight_t", "proj.bias"}  # 4 * n bytes of bias pass EXTERNAL_MIN_BYTES; "two" does not
    offsets = [int(e.value) for name in external for e in stored[name].external_data if e.key == "offset"]
    assert len(offsets) == 2 and all(offset % graph.EXTERNAL_ALIGNMENT == 0 for offset in offsets)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": a})[0], expected, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 4 * k * n + 4 * n + 4)
    assert graph.save_model(model, path) == [path]
    assert not (tmp_path / "model.onnx.data").exists()
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in onnx.load(path).graph.initializer)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": a})[0], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tied():
    """SmolLM2's case: the LM head is the input embedding's table (tie_word_embeddings)."""
    return tiny_llama(
        seed=1, vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, tie_word_embeddings=True
    )


def untied_copy(model, embedding: np.ndarray | None = None):
    """``model`` with its own LM head weight (same values), and optionally another embedding table."""
    copy = copy_module(model)
    copy.config.tie_word_embeddings = False
    copy.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    if embedding is not None:
        copy.model.embed_tokens.weight = torch.nn.Parameter(torch.from_numpy(embedding))
    assert copy.lm_head.weight is not copy.model.embed_tokens.weight
    return copy


def initializer_bytes(result, dims: list[int] | None = None) -> dict[str, int]:
    """Stored bytes of each initializer (of the shape ``dims`` only, if given)."""
    initializers = onnx.load(result.model_path).graph.initializer
    return {t.name: len(t.raw_data) for t in initializers if dims is None or list(t.dims) == dims}


@pytest.mark.parametrize("fmt", ["fp32", "sherry"])
def test_tied_embedding_is_stored_once(tied, tmp_path, fmt):
    """One float32 [V, H] table serves the Gather and the LM head (FusedMatMul, transB=1); the logits are
    those of the untied export, which stores the table twice."""
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    v, h = tied.config.vocab_size, tied.config.hidden_size
    lm, result = export(tied, tmp_path / "tied", format=fmt, group_size=32)
    untied_lm, untied = export(untied_copy(tied), tmp_path / "untied", format=fmt, group_size=32)
    stored, untied_stored = initializer_bytes(result), initializer_bytes(untied)
    assert initializer_bytes(result, [v, h]) == {"embed_tokens.weight": 4 * v * h}
    assert initializer_bytes(untied, [v, h]) == {"embed_tokens.weight": 4 * v * h, "lm_head.weight": 4 * v * h}
    assert sum(untied_stored.values()) - sum(stored.values()) == 4 * v * h
    assert result.size_split["embedding"] == 0 and result.size_split["lm_head"] == 4 * v * h
    assert untied.size_split["embedding"] == untied.size_split["lm_head"] == 4 * v * h
    assert sum(result.size_split.values()) == sum(stored.values())
    ids = np.random.default_rng(6).integers(0, v, (2, 13))
    logits = lm.forward(ids)[0]
    np.testing.assert_allclose(logits, untied_lm.forward(ids)[0], atol=1e-5 * np.abs(logits).max())
    if fmt == "fp32":
        np.testing.assert_allclose(logits, torch_logits(tied, ids), atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tied_embedding_shares_the_heads_bytes(tied, tmp_path, bits):
    """--lm-head nbits with the default --embedding auto: GatherBlockQuantized reads the head's MatMulNBits
    bytes, so there is no float table at all; the logits equal those of an export whose float embedding
    is the table dequantized in numpy."""
    v, h = tied.config.vocab_size, tied.config.hidden_size
    lm, result = export(tied, tmp_path / "shared", format="sherry", group_size=32, lm_head=f"nbits{bits}")
    assert result.options.embedding == f"nbits{bits}"
    model = onnx.load(result.model_path)
    stored = {t.name: t for t in model.graph.initializer}
    assert not any(t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [v, h] for t in stored.values())
    ops = {n.name: n for n in model.graph.node}
    codes, scales = ops["lm_head"].input[1:3]
    assert ops["embed"].op_type == "GatherBlockQuantized" and ops["embed"].input[0] == codes
    assert ops["embed.scales"].input[0] == scales
    blocks = h // LM_HEAD_BLOCK
    assert result.size_split["lm_head"] == v * h * bits // 8 + 4 * v * blocks
    assert result.size_split["embedding"] == 0

    table = dequantize_nbits(
        numpy_helper.to_array(stored[codes]), numpy_helper.to_array(stored[scales]), bits, LM_HEAD_BLOCK, h
    )
    options = {"format": "sherry", "group_size": 32, "lm_head": f"nbits{bits}", "embedding": "fp32"}
    reference, _ = export(untied_copy(tied, embedding=table), tmp_path / "reference", **options)
    ids = np.random.default_rng(7).integers(0, v, (1, 21))
    np.testing.assert_array_equal(lm.forward(ids)[0], reference.forward(ids)[0])


def test_quantized_embedding_of_an_untied_model(tiny, tmp_path):
    """--embedding nbits4 with a float head: the table is quantized for the gather only (scales stored in the
    [V, blocks, 1] shape it reads); the logits equal a float embedding of the dequantized table."""
    v, h = tiny.config.vocab_size, tiny.config.hidden_size
    lm, result = export(tiny, tmp_path / "q", format="fp32", embedding="nbits4")
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(result.model_path).graph.initializer}
    assert stored["embed_tokens.scales"].shape == (v, h // LM_HEAD_BLOCK, 1)
    assert result.size_split["embedding"] == v * h // 2 + 4 * v * h // LM_HEAD_BLOCK
    table = dequantize_nbits(stored["embed_tokens.B"], stored["embed_tokens.scales"], 4, LM_HEAD_BLOCK, h)
    assert np.abs(table - tiny.model.embed_tokens.weight.detach().numpy()).max() > 0  # it was quantized
    reference = copy_module(tiny)
    reference.model.embed_tokens.weight = torch.nn.Parameter(torch.from_numpy(table))
    ids = np.random.default_rng(8).integers(0, v, (2, 9))
    np.testing.assert_allclose(lm.forward(ids)[0], torch_logits(reference, ids), atol=1e-4)


@pytest.mark.parametrize(("bits", "k"), [(4, 96), (8, 96), (4, 80)])
def test_gathered_rows_are_the_dequantized_matmulnbits_weight(bits, k):
    """GatherBlockQuantized on MatMulNBits' own B and scales gives exactly the rows numpy dequantizes (also when
    the last block is padded), and those are the weight MatMulNBits multiplies by."""
    import onnxruntime as ort

    rng = np.random.default_rng(bits + k)
    n = 48
    weight = rng.standard_normal((n, k)).astype(np.float32)
    q, scales = quantize_float_nbits(weight, bits, LM_HEAD_BLOCK)
    b = graph.GraphBuilder("gather")
    ids = b.add_input("ids", graph.INT64, ["batch", "sequence"])
    x = b.add_input("x", graph.FLOAT, ["m", k])
    stored = nbits_weight(b, "table", q, scales, bits, LM_HEAD_BLOCK)
    b.add_output(gather_nbits(b, ids, "embed", stored), "rows", graph.FLOAT, ["batch", "sequence", k])
    b.add_output(nbits_matmul(b, x, "head", stored), "y", graph.FLOAT, ["m", n])
    session = ort.InferenceSession(ir.to_proto(b.model()).SerializeToString())
    table = dequantize_nbits(pack_nbits(q, bits, LM_HEAD_BLOCK), scales, bits, LM_HEAD_BLOCK, k)
    grouped = np.zeros((n, -(-k // LM_HEAD_BLOCK) * LM_HEAD_BLOCK), np.float32)
    grouped[:, :k] = q.astype(np.float32) - (1 << (bits - 1))
    expected = (grouped.reshape(n, -1, LM_HEAD_BLOCK) * scales[..., None]).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(table, expected)
    index = rng.integers(0, n, (3, 5))
    activations = rng.standard_normal((4, k)).astype(np.float32)
    rows, y = session.run(None, {"ids": index, "x": activations})
    np.testing.assert_array_equal(rows, table[index])
    # MatMulNBits rounds the activations to int8 per block (accuracy_level 4): equal to that rounding
    np.testing.assert_allclose(y, activations @ table.T, atol=2e-2 * np.abs(activations @ table.T).max())


def test_export_summary_prints_the_size_split(tied, tmp_path, capsys):
    from sherry_export.cli import main

    tied.save_pretrained(tmp_path / "hf")
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "hf"), "-o", str(out), "--group-size", "32", "--lm-head", "nbits4"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "sherry_export.json").read_text())
    split = manifest["size_split"]
    assert set(split) == {"projections", "embedding", "lm_head", "other"}
    assert manifest["options"]["embedding"] == "nbits4"
    assert "embedding nbits4, LM head nbits4" in printed
    rows = {
        cells[0]: cells[1:]
        for line in printed.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    assert float(rows["LM head"][0]) == pytest.approx(split["lm_head"] / 1e6, rel=1e-3)
    assert float(rows["projections"][0]) == pytest.approx(split["projections"] / 1e6, rel=1e-3)
    stored = onnx.load(out / "model.onnx", load_external_data=False).graph.initializer
    assert sum(split.values()) == sum(graph.stored_bytes(t) for t in stored)


def test_sequence_past_the_rotary_caches_is_refused(tiny, tmp_path):
    lm, _ = export(tiny, tmp_path, format="sherry", group_size=32)
    n = lm.max_positions
    assert n == tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"this model holds {n} "):
        lm.generate([1, 2, 3], max_new_tokens=n - 1)
    assert len(lm.generate([1, 2, 3], max_new_tokens=n - 2).tokens) == n - 2
    _, cache = lm.forward(np.zeros((1, n - 4), np.int64))
    with pytest.raises(ValueError, match=f"would reach {n + 1} positions"):
        lm.forward(np.zeros((1, 5), np.int64), cache)


def test_output_folder(tiny, tmp_path):
    _, result = export(tiny, tmp_path, format="sherry", group_size=32)
    names = {f.name for f in result.files}
    assert {"model.onnx", "genai_config.json", "sherry_export.json"} <= names
    config = json.loads((result.out_dir / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == "libsherry_ops.so"
    assert (result.out_dir / "libsherry_ops.so").is_file()  # relative to the folder: it runs where it is moved
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    manifest = json.loads((result.out_dir / "sherry_export.json").read_text())
    assert manifest["provenance"] == "post-training projection"
    assert (manifest["group_size"], manifest["group_size_origin"]) == (32, "export options")


@pytest.mark.parametrize(("fmt", "projection"), [("tl2", "sherry"), ("i2s", "absmean")])
def test_a_post_training_quantized_model_exports_as_the_float_model_does(tiny, tmp_path, fmt, projection):
    """Post-training projection has one code path: the exporter projects a float model's layers with the
    modules ``quantize_(model, PTQConfig(...))`` puts in, so both exports are the same file, and both
    say where the weights come from. The float model is left as it was."""
    import copy

    from sherry_export.qat import PTQConfig, quantize_

    original = {name: p.clone() for name, p in tiny.named_parameters()}
    direct = export_model(tiny, tmp_path / "direct", ExportOptions(format=fmt, group_size=32, projection=projection))
    assert all(torch.equal(p, original[name]) for name, p in tiny.named_parameters())
    quantized = copy.deepcopy(tiny)
    quantize_(quantized, PTQConfig(projection, 32))
    via_quantize = export_model(quantized, tmp_path / "quantized", ExportOptions(format=fmt))
    manifests = [json.loads((r.out_dir / "sherry_export.json").read_text()) for r in (direct, via_quantize)]
    assert manifests[0]["checksums"] == manifests[1]["checksums"]
    assert [m["provenance"] for m in manifests] == ["post-training projection"] * 2
    assert manifests[1]["group_size"] == 32 and manifests[1]["group_size_origin"] == "checkpoint"
    fp32 = export_model(quantized, tmp_path / "fp32", ExportOptions(format="fp32"))
    assert fp32.provenance == "post-training projection"  # its fp32 weights are the projection too


def test_qwen2_with_qkv_bias_matches_transformers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**TINY_CONFIG)
    qwen = Qwen2ForCausalLM(config).eval()
    for name, param in qwen.named_parameters():
        if name.endswith("proj.bias"):
            torch.nn.init.normal_(param, std=0.5)  # biases are zero at init; make them count
    lm, _ = export(qwen, tmp_path, format="fp32")
    ids = np.random.default_rng(3).integers(0, 256, (1, 11))
    np.testing.assert_allclose(lm.forward(ids)[0], torch_logits(qwen, ids), atol=1e-4)
    lm, _ = export(qwen, tmp_path, format="sherry", group_size=32)
    reference = kernel_reference_model(qwen, model_ternaries(qwen, ExportOptions(format="sherry", group_size=32)))
    assert (lm.forward(ids)[0].argmax(-1) == torch_logits(reference, ids).argmax(-1)).mean() >= 0.99


def test_qat_checkpoint_exports_its_trained_ternary(tmp_path):
    from sherry_export.export.llm import export_llm
    from sherry_export.qat import SherryConfig, quantize_, ternary_layers

    model = tiny_llama(seed=4)
    quantize_(model, SherryConfig(group_size=32))
    model.save_pretrained(tmp_path / "qat")
    with pytest.raises(ValueError, match="contradicts the checkpoint"):
        export_llm(tmp_path / "qat", tmp_path / "bad", ExportOptions(group_size=64), group_size_explicit=True)
    result = export_llm(tmp_path / "qat", tmp_path / "onnx", ExportOptions(format="sherry"))
    assert result.provenance == "quantization-aware (sherry train checkpoint)"
    assert result.options.group_size == 32  # the trained group size, not ExportOptions' default of 128
    reference = kernel_reference_model(model, {n: (t, 32) for n, t in ternary_layers(model).items()})
    ids = np.random.default_rng(5).integers(0, 256, (1, 24))
    logits, _ = OnnxCausalLM(result.model_path).forward(ids)
    assert (logits.argmax(-1) == torch_logits(reference, ids).argmax(-1)).mean() >= 0.99


def test_unsupported_architecture(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="cannot export GPT2LMHeadModel"):
        build_decoder(gpt2, ExportOptions())


def test_bad_geometry_and_options(tmp_path):
    odd = tiny_llama(hidden_size=70, num_attention_heads=1, num_key_value_heads=1, intermediate_size=128)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_decoder(odd, ExportOptions(format="sherry", group_size=None))
    with pytest.raises(ValueError, match="power-of-two"):
        build_decoder(tiny_llama(), ExportOptions(format="nbits2", group_size=12))
    with pytest.raises(ValueError, match="exactly one zero"):
        build_decoder(tiny_llama(), ExportOptions(format="sherry", group_size=32, projection="absmean"))
    with pytest.raises(ValueError, match="unknown format"):
        ExportOptions(format="int3")


def test_group_size_from_config_and_mismatch():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "sherry", "group_size": 64}
    assert resolve_group_size(model, 128, explicit=False) == 64
    with pytest.raises(ValueError, match="contradicts the checkpoint"):
        resolve_group_size(model, 128, explicit=True)


def test_onnxruntime_genai_runs_the_export(tiny, tmp_path, monkeypatch):
    """onnxruntime-genai loads the folder, registers our op library from genai_config.json, and
    generates the same greedy tokens as our own runner, after the folder was moved away from where
    it was exported and with a working directory that holds no library (nothing points back). It
    decodes in one shared KV buffer (``past_present_share_buffer``), as its log of the inputs shows."""
    og = pytest.importorskip("onnxruntime_genai")
    lm, result = export(tiny, tmp_path / "exported", format="sherry", group_size=32)
    moved = Path(shutil.move(result.out_dir, tmp_path / "elsewhere" / "model"))
    assert str(tmp_path / "exported") not in (moved / "genai_config.json").read_text()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    prompt = [5, 17, 99, 3]
    model = og.Model(str(moved))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 16, do_sample=False)
    log: list[str] = []
    og.set_log_callback(log.append)
    og.set_log_options(enabled=True, model_input_values=True)
    try:
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
    finally:
        og.set_log_options(enabled=False, model_input_values=False)
        og.set_log_callback(None)
    assert tokens == lm.generate(prompt, 16).tokens
    # past_present_share_buffer: every run, prefill and decode, gets the whole max_length buffer as its past
    text = re.sub(r"\x1b\[[0-9;]*m", "", "".join(log))  # the log's colours
    past_shapes = re.findall(r"Name: past_key_values\.0\.key ShapeDims\[ 4\]Shape\[ ([0-9 ]+) \]", text)
    assert past_shapes == [f"1 2 {len(prompt) + 16} 32"] * 16


HELD_OUT = (
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
    "part of the world. It is a way I have of driving off the spleen, and regulating the circulation."
)


def cross_entropy(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token negative log-likelihood (nats)."""
    shifted = logits[0, :-1].astype(np.float64)
    shifted -= shifted.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids[0]) - 1), ids[0, 1:]].mean())


@pytest.mark.slow
def test_smollm2_exports_match_pytorch(tmp_path):
    """SmolLM2-135M on real text. Float: logits within 1e-4 of transformers. Sherry (post-training
    projection): against PyTorch with the kernels' numerics. This 30-layer model, ternarized without
    training, is chaotic: a 1-ulp float difference (RMSNorm, attention) that moves one activation
    across an int8 rounding boundary grows layer after layer, so its top-1 agreement is measured
    but bounded loosely, and the cross-entropy must agree; trained models are held to 99% above."""
    from sherry_export.models import load_causal_lm, load_tokenizer

    model, source = load_causal_lm("smollm2")
    tokenizer = load_tokenizer(source)
    ids = np.array([tokenizer(HELD_OUT).input_ids])
    fp32 = export_model(model, tmp_path / "fp32", ExportOptions(format="fp32"), tokenizer=tokenizer)
    logits, _ = OnnxCausalLM(fp32.model_path, threads=2).forward(ids)
    expected = torch_logits(model, ids)
    np.testing.assert_allclose(logits, expected, atol=1e-4 * np.abs(expected).max())

    options = ExportOptions(format="sherry", group_size=128)
    sherry = export_model(model, tmp_path / "sherry", options, tokenizer=tokenizer)
    logits, _ = OnnxCausalLM(sherry.model_path, threads=2).forward(ids)
    expected = torch_logits(kernel_reference_model(model, model_ternaries(model, options)), ids)
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.7
    assert cross_entropy(logits, ids) == pytest.approx(cross_entropy(expected, ids), rel=0.02)


def test_shipped_sherry_model_matches_kernel_reference(tmp_path):
    """The shipped trained Sherry model on held-out text: the export agrees with PyTorch at the
    kernels' numerics on ≥ 99% of positions (a trained model has confident logits)."""
    from sherry_export.export.llm import export_llm
    from sherry_export.models import load_causal_lm, load_tokenizer, resolve_source

    folder = "models/sherry-qat-5m"
    model, _ = load_causal_lm(folder)
    result = export_llm(folder, tmp_path / "ship", ExportOptions(format="sherry"))
    assert result.provenance == "quantization-aware (packed checkpoint)"
    ids = np.array([load_tokenizer(resolve_source(folder))(HELD_OUT * 2).input_ids[:200]])
    logits, _ = OnnxCausalLM(result.model_path).forward(ids)
    reference = kernel_reference_model(
        model, {n: (m.ternary(), m.group_size) for n, m in model.named_modules() if hasattr(m, "ternary")}
    )
    assert (logits.argmax(-1) == torch_logits(reference, ids).argmax(-1)).mean() >= 0.99


@pytest.mark.parametrize("fmt", ["fp32", *TERNARY_FORMATS])
def test_shipped_model_decodes_in_the_shared_buffer_as_forward(tmp_path, fmt):
    """The shipped Sherry model in every format, on real text: generation's shared-buffer decode gives the
    functional forward's logits bit for bit, and the same greedy tokens."""
    from sherry_export.export.llm import export_llm
    from sherry_export.models import load_tokenizer, resolve_source

    folder = "models/sherry-qat-5m"
    lm = OnnxCausalLM(export_llm(folder, tmp_path / fmt, ExportOptions(format=fmt)).model_path, threads=2)
    ids = load_tokenizer(resolve_source(folder))(HELD_OUT).input_ids[:48]
    assert_shared_decode_equals_forward(lm, [(ids, 32)])
    prompt, greedy = ids[:16], []
    logits, cache = lm.forward(np.array([prompt]))
    for _ in range(12):
        greedy.append(int(logits[0, -1].argmax()))
        logits, cache = lm.forward(np.array([greedy[-1:]]), cache)
    assert lm.generate(prompt, 12).tokens == greedy
