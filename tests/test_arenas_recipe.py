"""models/recipes/arenas_ablation.py at toy size: every stage runs, resumes, and reports what it trained."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).parents[1] / "models" / "recipes" / "arenas_ablation.py"
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_corpus.txt"


def load_recipe():
    spec = importlib.util.spec_from_file_location("arenas_ablation", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_recipe_runs_every_stage_and_resumes(tmp_path, capsys):
    recipe = load_recipe()
    out = tmp_path / "runs"
    argv = [
        "all", "--out", str(out), "--jobs", "2", "--hidden", "64", "--layers", "1", "--heads", "2", "--vocab", "300",
        "--group-size", "32", "--batch", "2", "--seq-len", "32", "--pretrain-steps", "4", "--steps", "4",
        "--evals", "2", "--eval-batches", "1", "--lrs", "1e-3", "3e-3", "--lambda-max", "1", "--seeds", "0", "1",
        "--data", str(FIXTURE), "--cache", str(tmp_path / "cache"), "--ppl-tokens", "256", "--window", "32",
    ]  # fmt: skip
    assert recipe.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["chosen_lr"]["lr"] in (1e-3, 3e-3) and 0 < min(results["pretrained_grad_erank"]) <= 1
    records = results["regimes"]["pretrained"]
    assert list(records) == ["sherry", "sherry+arenas λ1", "dense ternary"]
    assert all(len(runs) == 2 for runs in records.values())  # both seeds of every arm
    for runs in records.values():
        for run in runs:
            assert run["heldout_ppl"] > 1 and sorted(run["eval_loss"], key=int) == ["2", "4"]
            assert sorted(run["grad_erank"], key=int) == ["0", "2", "4"] and run["zero_flip_rate"]
    seeds = [json.loads((Path(r["folder"]) / "config.json").read_text()) for r in records["sherry"]]
    assert all(c["sherry_qat"]["method"] == "sherry" for c in seeds)
    report = (out / "report.md").read_text()
    assert "sherry+arenas λ1 vs sherry" in report and "dense ternary" in report
    assert (out / "arenas_ablation.png").stat().st_size > 10_000
    capsys.readouterr()
    assert recipe.main(argv) == 0  # everything finished: nothing trains again
    assert "training" not in capsys.readouterr().out
