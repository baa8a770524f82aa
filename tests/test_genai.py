"""onnxruntime-genai as the engine of ``sherry generate``: the same greedy tokens as our runner, the
kernel and thread settings reach its session, and a folder it cannot load falls back with a reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sherry_export import runtime
from sherry_export.cli import main
from sherry_export.errors import InputError
from sherry_export.export import ExportOptions
from sherry_export.export.llm import export_model
from sherry_export.genai import GenaiCausalLM, open_generator
from sherry_export.generate import OnnxCausalLM
from sherry_export.models import tiny_llama
from sherry_export.resources import LIBRARY_NAME
from sherry_export.runtime import KERNEL_ENV, LIBRARY_ENV
from sherry_export.verify import GENAI_CONFIG_FILE

pytest.importorskip("onnxruntime_genai")

PROMPT = [5, 17, 99, 3]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    model = tiny_llama(seed=1, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    out = tmp_path_factory.mktemp("genai") / "sherry"
    return export_model(model, out, ExportOptions(format="sherry", group_size=32)).out_dir


def test_greedy_tokens_match_our_runner(folder):
    ours = OnnxCausalLM(folder / "model.onnx").generate(PROMPT, 24)
    genai = GenaiCausalLM(folder).generate(PROMPT, 24)
    assert genai.tokens == ours.tokens and genai.prompt_tokens == len(PROMPT)
    assert len(genai.step_seconds) == len(genai.tokens) - 1  # the first token needs no decode run
    stop = ours.tokens[3]
    stopped = GenaiCausalLM(folder).generate(PROMPT, 24, stop_tokens={stop})
    assert stopped.tokens == ours.tokens[: ours.tokens.index(stop) + 1]


def test_sampling_is_seeded_and_stays_in_the_vocabulary(folder):
    lm = GenaiCausalLM(folder, threads=2)
    draws = [lm.generate(PROMPT, 12, temperature=1.5, top_k=50, top_p=0.9, seed=7).tokens for _ in range(2)]
    assert draws[0] == draws[1] and all(0 <= t < lm.vocab_size for t in draws[0])


def test_a_forced_kernel_reaches_the_session_and_the_environment_is_restored(folder, capfd, monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setenv("SHERRY_KERNEL_REPORT", "1")
    GenaiCausalLM(folder, kernel="scalar")
    assert "uses the scalar kernel" in capfd.readouterr().err
    assert KERNEL_ENV not in os.environ


def test_length_limit_is_the_context_length(folder):
    lm = GenaiCausalLM(folder)
    lm.check_length(lm.context_length - 1)
    with pytest.raises(ValueError, match="context_length"):
        lm.check_length(lm.context_length)


def test_a_folder_genai_cannot_load_falls_back_with_the_reason(folder, tmp_path, capsys, monkeypatch):
    """The config names an op library the folder lacks (removing the real one would not do: its bare name
    finds the copy this process has already loaded). SHERRY_OPS_LIBRARY goes (it sends every folder to our
    runner), and our runner finds the same build as the package's."""
    if library := os.environ.get(LIBRARY_ENV):
        monkeypatch.delenv(LIBRARY_ENV)
        monkeypatch.setattr(runtime, "built_library", lambda: Path(library))
    broken = Path(shutil.copytree(folder, tmp_path / "no-library"))
    config = broken / GENAI_CONFIG_FILE
    config.write_text(config.read_text().replace(f'"{LIBRARY_NAME}"', '"libsherry_ops_gone.so"'))
    with pytest.raises(InputError, match=r"cannot load .*libsherry_ops_gone\.so.*--engine sherry"):
        open_generator(broken, "genai", threads=1)
    lm, engine = open_generator(broken, None, threads=1)
    assert engine == "sherry" and isinstance(lm, OnnxCausalLM)
    assert "libsherry_ops_gone.so" in capsys.readouterr().err
    (broken / GENAI_CONFIG_FILE).unlink()
    assert open_generator(broken, None, threads=1)[1] == "sherry"
    assert GENAI_CONFIG_FILE in capsys.readouterr().err


def test_sherry_generate_runs_on_either_engine(folder, capsys, monkeypatch):
    argv = ["generate", str(folder), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6"]
    outputs = {}
    for engine in ("genai", "sherry"):
        assert main([*argv, "--engine", engine]) == 0
        captured = capsys.readouterr()
        outputs[engine] = captured.out.split()
        assert ("onnxruntime-genai" in captured.err) == (engine == "genai")
    assert outputs["genai"] == outputs["sherry"]
    library = os.environ.get(LIBRARY_ENV)
    if library:  # another build of the op library: genai could not load it, so our runner generates
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert "sherry runner" in captured.err and "onnxruntime-genai" not in captured.err
        monkeypatch.delenv(LIBRARY_ENV)
    assert main(argv) == 0  # the default: genai, which loads this folder (and its copy of the library)
    captured = capsys.readouterr()
    assert captured.out.split() == outputs["genai"] and "onnxruntime-genai)" in captured.err
