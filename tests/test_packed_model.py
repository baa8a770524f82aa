"""Packed model folders: save after QAT, load offline, export exactly what was trained."""

import numpy as np
import pytest
import torch

from sherry_export.compare.run import qat_kind
from sherry_export.export import ExportOptions
from sherry_export.export.llm import export_llm
from sherry_export.generate import OnnxCausalLM
from sherry_export.models import load_causal_lm, tiny_llama
from sherry_export.packed_model import WEIGHTS_FILE, FrozenTernaryLinear, save_packed_model
from sherry_export.qat import SherryConfig, TernaryConfig, quantize_, ternary_layers


@pytest.mark.parametrize(("config", "fmt"), [(SherryConfig(group_size=32), "sherry"), (TernaryConfig(), "i2s")])
def test_round_trip_keeps_the_ternary_weights(tmp_path, config, fmt):
    model = tiny_llama(seed=3)
    quantize_(model, config)
    save_packed_model(model.eval(), tmp_path / "m", fmt)
    loaded, _ = load_causal_lm(tmp_path / "m")
    trained = ternary_layers(model)
    frozen = {n: m for n, m in loaded.named_modules() if isinstance(m, FrozenTernaryLinear)}
    assert frozen.keys() == trained.keys()
    for name, module in frozen.items():
        np.testing.assert_array_equal(module.ternary().values.numpy(), trained[name].values.numpy())
        np.testing.assert_array_equal(module.ternary().scales.numpy(), trained[name].scales.half().float().numpy())
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(ids).logits.numpy(), model(ids).logits.numpy(), atol=2e-3)
    kind = "Sherry QAT" if isinstance(config, SherryConfig) else "dense-ternary QAT"
    assert qat_kind(loaded) == f"{kind}, packed {fmt}"  # the folder remembers how it was trained


def test_packed_model_exports_as_trained(tmp_path):
    model = tiny_llama(seed=5)
    quantize_(model, SherryConfig(group_size=32))
    save_packed_model(model.eval(), tmp_path / "m", "sherry")
    result = export_llm(tmp_path / "m", tmp_path / "onnx", ExportOptions(format="tl2"))
    assert result.provenance == "quantization-aware (packed checkpoint)"
    lm = OnnxCausalLM(result.model_path)
    assert len(lm.generate([1, 2, 3], 8).tokens) == 8


def test_packed_group_size_wins_and_a_clash_is_an_error(tmp_path, capsys):
    """The packed weights' group size is what the export holds and records; a contradicting
    ``--group-size`` stops the export (exit 2) instead of writing a manifest that disagrees with them."""
    import json

    from sherry_export.cli import main

    model = tiny_llama(seed=7)
    quantize_(model, SherryConfig(group_size=32))
    save_packed_model(model.eval(), tmp_path / "m", "sherry")
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "m"), "-o", str(out), "--group-size", "64"]) == 2
    assert "--group-size 64 contradicts the checkpoint, whose weights hold group size 32" in capsys.readouterr().err
    assert not (out / "sherry_export.json").exists()
    for argv in ([], ["--group-size", "32"]):
        assert main(["export", str(tmp_path / "m"), "-o", str(out), "--format", "nbits2", *argv]) == 0
        manifest = json.loads((out / "sherry_export.json").read_text())
        assert (manifest["group_size"], manifest["options"]["group_size"]) == (32, 32)
        assert manifest["group_size_origin"] == "checkpoint"
        assert manifest["provenance"] == "quantization-aware (packed checkpoint)"


def test_damaged_packed_model_is_a_clear_error(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = tiny_llama(seed=6)
    quantize_(model, SherryConfig(group_size=32))
    save_packed_model(model.eval(), tmp_path / "m", "sherry")
    tensors = load_file(tmp_path / "m" / WEIGHTS_FILE)
    tensors.pop("model.layers.1.mlp.down_proj.packed")
    save_file(tensors, tmp_path / "m" / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"lacks the packed weights of model\.layers\.1\.mlp\.down_proj"):
        load_causal_lm(tmp_path / "m")
    with pytest.raises(ValueError, match="not ternary"):
        save_packed_model(tiny_llama(), tmp_path / "x", "sherry")
