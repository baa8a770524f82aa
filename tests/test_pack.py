"""``sherry pack``: every kind of source to the packed folder the shipped models are, exported as the source is."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sherry_export.cli import main
from sherry_export.compare.run import qat_kind
from sherry_export.generate import OnnxCausalLM
from sherry_export.models import load_causal_lm, tiny_llama
from sherry_export.pack import pack_checkpoint
from sherry_export.packed_model import PACKED_KEY, read_config
from sherry_export.qat import SherryConfig, quantize_, recipe
from sherry_export.resources import shipped_model

SHIPPED_PACKED = ("sherry-qat-5m", "ternary-qat-5m")


def record(folder) -> dict:
    return read_config(Path(folder))[PACKED_KEY]


def manifest(folder) -> dict:
    return json.loads((folder / "sherry_export.json").read_text())


def logits(folder, ids: np.ndarray) -> np.ndarray:
    return OnnxCausalLM(folder / "model.onnx").forward(ids)[0]


def test_a_packed_float_model_exports_as_the_model_itself(tmp_path, capsys):
    """The shipped full-precision model packed post-training and then exported is the very model that
    exporting it directly gives: same weight files, same logits, same provenance."""
    packed, direct, via_pack = tmp_path / "packed", tmp_path / "direct", tmp_path / "via-pack"
    assert main(["pack", "fp-5m", "-o", str(packed), "--format", "sherry"]) == 0
    captured = capsys.readouterr()
    assert "(post-training projection)" in captured.out
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "post-training" in notes[0]
    assert record(packed)["projected_with"] == {"projection": "sherry", "group_size": 128}
    assert record(packed)["trained_with"] is None
    assert main(["export", str(packed), "-o", str(via_pack), "--format", "sherry"]) == 0
    assert main(["export", "fp-5m", "-o", str(direct), "--format", "sherry"]) == 0
    assert [manifest(f)["provenance"] for f in (via_pack, direct)] == ["post-training projection"] * 2
    assert manifest(via_pack)["checksums"] == manifest(direct)["checksums"]
    ids = np.random.default_rng(0).integers(0, 8192, (1, 24))
    np.testing.assert_array_equal(logits(via_pack, ids), logits(direct, ids))


def test_a_packed_trained_checkpoint_keeps_its_recipe(tmp_path, capsys):
    """A `sherry train` checkpoint packs its trained ternary at its own group size; the record keeps the
    recipe, so the export reads quantization-aware, and computes what exporting the checkpoint does."""
    model = tiny_llama(seed=2)
    with torch.no_grad():  # float16-exact weights: the packed folder keeps embeddings in float16
        for param in model.parameters():
            param.copy_(param.half().float())
    quantize_(model, SherryConfig(group_size=32))
    model.save_pretrained(tmp_path / "run")
    packed = tmp_path / "packed"
    assert main(["pack", str(tmp_path / "run"), "-o", str(packed), "--format", "tl2", "--group-size", "64"]) == 2
    assert "contradicts the checkpoint, whose weights hold group size 32" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "run"), "-o", str(packed), "--format", "tl2"]) == 0
    captured = capsys.readouterr()
    assert "(quantization-aware (packed checkpoint))" in captured.out and "note:" not in captured.err
    assert record(packed)["trained_with"] == recipe(SherryConfig(group_size=32))
    assert "projected_with" not in record(packed)
    assert set(record(packed)["group_sizes"].values()) == {32}
    for source, out in ((packed, tmp_path / "a"), (tmp_path / "run", tmp_path / "b")):
        assert main(["export", str(source), "-o", str(out), "--format", "sherry"]) == 0
    assert manifest(tmp_path / "a")["provenance"] == "quantization-aware (packed checkpoint)"
    assert manifest(tmp_path / "b")["provenance"] == "quantization-aware (sherry train checkpoint)"
    ids = np.random.default_rng(1).integers(0, 256, (1, 16))
    np.testing.assert_array_equal(logits(tmp_path / "a", ids), logits(tmp_path / "b", ids))


def test_post_training_packs_say_so_in_every_format(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "hf")
    hf, packed = str(tmp_path / "hf"), str(tmp_path / "packed")
    assert main(["pack", hf, "-o", hf, "--format", "sherry", "--group-size", "32"]) == 2
    assert "is the source's own folder" in capsys.readouterr().err
    assert main(["pack", hf, "-o", packed, "--format", "sherry", "--group-size", "32", "--projection", "absmean"]) == 2
    assert "exactly one zero" in capsys.readouterr().err  # dense ternary does not fit Sherry's 3:4 code
    per_tensor = ["--group-size", "channel", "--projection", "absmean"]
    assert main(["pack", hf, "-o", packed, "--format", "i2s", *per_tensor]) == 0
    assert record(packed)["projected_with"] == {"projection": "absmean", "group_size": None}
    assert qat_kind(load_causal_lm(packed)[0]) == "absmean post-training projection, packed i2s"
    capsys.readouterr()
    assert main(["export", packed, "-o", str(tmp_path / "fp32"), "--format", "fp32"]) == 0
    assert manifest(tmp_path / "fp32")["provenance"] == "post-training projection"  # not "float weights"
    assert sum(line.startswith("note:") for line in capsys.readouterr().err.splitlines()) == 1
    assert main(["export", packed, "-o", str(tmp_path / "x"), "--qat", "sherry"]) == 2
    assert "post-training absmean projection" in capsys.readouterr().err


@pytest.mark.parametrize("name", SHIPPED_PACKED)
def test_repacking_a_shipped_model_reproduces_its_bytes(tmp_path, name):
    """`sherry pack` is what made models/: packing a shipped folder again in its format gives every file
    back byte for byte (the recipe in models/recipes/pack_shipped.sh relies on it)."""
    folder = shipped_model(name)
    result = pack_checkpoint(name, tmp_path / name, record(folder)["format"])
    assert result.provenance == "quantization-aware (packed checkpoint)"
    written = {"config.json", "weights.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert {f.name for f in result.files} == written
    for file in result.files:
        assert file.read_bytes() == (folder / file.name).read_bytes(), f"{file.name} differs"
