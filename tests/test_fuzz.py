"""The fuzz harness (sherry_export.fuzz): a short campaign against the built library, and the
committed reproducers in tests/fuzz_corpus/, which must now be accepted and correct or cleanly refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sherry_export import fuzz
from sherry_export.runtime import get_library_path

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"


@pytest.fixture(scope="module")
def library() -> str:
    return str(Path(get_library_path()).resolve())


def test_short_campaign_finds_nothing(library: str, tmp_path: Path) -> None:
    counts = fuzz.run_campaign(20, seed=2024, library=library, corpus=tmp_path, timeout=60)
    assert sum(counts.values()) == 20
    assert set(counts) <= set(fuzz.GOOD_OUTCOMES), fuzz.format_counts(counts)
    assert counts["equal"] and counts["clean-error"]  # both kinds of case are generated
    assert not list(tmp_path.iterdir())


def test_cases_are_reproducible_and_round_trip(tmp_path: Path) -> None:
    case = fuzz.make_case(5, 17)
    again = fuzz.make_case(5, 17)
    assert case.model == again.model and case.mutations == again.mutations
    case.save(tmp_path / "case.npz")
    loaded = fuzz.Case.load(tmp_path / "case.npz")
    assert (loaded.model, loaded.config, loaded.threads, loaded.mutations) == (
        case.model,
        case.config,
        case.threads,
        case.mutations,
    )
    assert loaded.feeds.keys() == case.feeds.keys()
    for name, value in case.feeds.items():
        np.testing.assert_array_equal(loaded.feeds[name], value)


def test_harness_classifies_a_crash_and_a_hang(library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child's own failures are told apart: a signal is a crash, running past the limit a hang."""
    case = fuzz.make_case(5, 0)
    monkeypatch.setattr(fuzz, "evaluate", lambda case, library: __import__("os").abort())
    assert fuzz.run_case(case, library, timeout=10).kind == "crash"
    monkeypatch.setattr(fuzz, "evaluate", lambda case, library: __import__("time").sleep(30))
    assert fuzz.run_case(case, library, timeout=0.5).kind == "hang"


def test_memory_limit_counts_what_the_case_adds(library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forked child starts with its parent's resident pages: a parent holding 300 MiB does not make a
    case with a 200 MiB budget run out of memory (a test process holds about 2 GiB by the time it fuzzes)."""
    held = np.ones(300 * 2**20, dtype=np.uint8)  # resident in the parent, inherited by the child
    case = fuzz.make_case(5, 0)
    monkeypatch.setattr(fuzz, "evaluate", lambda case, library: fuzz.Outcome("equal", ""))
    assert fuzz.run_case(case, library, timeout=30, memory_mb=200).kind == "equal"
    assert held[-1] == 1


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.npz")), ids=lambda p: p.name)
def test_committed_reproducer(path: Path, library: str) -> None:
    outcome = fuzz.replay([path], library, timeout=120)[path]
    assert outcome.kind in fuzz.GOOD_OUTCOMES, outcome.detail
