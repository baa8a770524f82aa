"""The ``sherry`` command line: help that teaches, bad arguments that say what is wrong, the size report."""

import subprocess
import sys

import pytest

from sherry_export.cli import COMMANDS, build_parser, main

HEAVY_MODULES = ("torch", "onnx", "onnxruntime", "transformers", "tvm")
"""Imports that take seconds each: help and `import sherry_export` must not need them."""


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "sherry demo" in out


def loaded_heavy_modules(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return eval(out.strip().splitlines()[-1])


def test_import_is_light():
    assert loaded_heavy_modules("import sherry_export; sherry_export.get_library_path") == []


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_loads_no_heavy_module(command):
    """`sherry --help` and `sherry CMD --help` build only what they print, so they answer at once."""
    argv = ["--help"] if command is None else [command, "--help"]
    code = f"from sherry_export.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert loaded_heavy_modules(code) == []


def test_every_command_parses(capsys):
    """The full parser (every command registered at once) has each command of the table."""
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
    assert "usage: sherry" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sizes", "--group-size", "6"], "multiple of 4"),
        (["sizes", "--group-size", "-8"], "positive integer"),
        (["sizes", "--layers", "0"], "positive integer"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["sizes", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sizes", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_sizes_on_packaged_smollm2():
    """The demo's main job end to end, in a subprocess as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "sherry_export.cli", "sizes", "smollm2", "--layers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    assert rows["sherry"][0] == "1.25" and rows["i2s"][0] == "2"
    assert rows["model.layers.0.self_attn.q_proj"][-1] == "yes"


def test_export_and_generate_from_a_hugging_face_folder(tmp_path, capsys):
    """`sherry export` on a transformers folder (no tokenizer), then `sherry generate` from token ids."""
    from sherry_export.models import tiny_llama

    tiny_llama(num_hidden_layers=1).save_pretrained(tmp_path / "hf")
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "hf"), "-o", str(out), "--format", "tl2", "--group-size", "32"]) == 0
    captured = capsys.readouterr()
    assert "post-training projection" in captured.out
    warning = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(warning) == 1 and "destroys a pretrained LLM" in warning[0]  # one line, and why
    assert main(["generate", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 5 and "decode: 5 tokens" in captured.err
    assert sum(line.startswith("note:") and "post-training" in line for line in captured.err.splitlines()) == 1
    assert main(["generate", str(out), "--prompt", "hello"]) == 2
    assert "pass --prompt-ids" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt-ids", "1,999"]) == 2
    assert "token ids must lie in [0, 256)" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "1"]) == 2
    assert "make one with `sherry export" in capsys.readouterr().err


def test_trained_and_float_exports_carry_no_post_training_note(tmp_path, capsys):
    """The note is for projected ternary weights only: the shipped trained model and a float export say nothing."""
    from sherry_export.models import tiny_llama

    assert main(["export", "sherry-qat-5m", "-o", str(tmp_path / "ship")]) == 0
    assert "note:" not in capsys.readouterr().err
    generate = ["generate", str(tmp_path / "ship"), "--prompt", "Once", "--max-new-tokens", "2", "--threads", "1"]
    assert main(generate) == 0
    assert "note:" not in capsys.readouterr().err
    tiny_llama(num_hidden_layers=1).save_pretrained(tmp_path / "hf")
    assert main(["export", str(tmp_path / "hf"), "-o", str(tmp_path / "fp32"), "--format", "fp32"]) == 0
    assert "note:" not in capsys.readouterr().err
