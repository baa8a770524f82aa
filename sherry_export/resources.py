"""Files that ship with the package: the built op library and the trained models.

An installed package (a wheel, or ``pip install .``) carries them as package data:
``sherry_export/_lib/libsherry_ops.so`` and ``sherry_export/_models/<name>/``. A source checkout run
in place (``python -m pytest`` from the repository) imports the package from the source tree, where
the library is not built; its editable install still records where the build put it, so the
distribution's file list is the second place to look. Only the standard library is imported here:
``import sherry_export`` must stay fast.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DISTRIBUTION = "sherry-export"
PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "libsherry_ops.so"
CHECKOUT_MODELS = PACKAGE_DIR.parent / "models"
"""A source checkout's ``models/``: preferred when present, so edits to it are seen without a reinstall."""


def _installed(relative: str) -> Path | None:
    """``relative`` (below the package) in the package folder itself, else in the installed distribution."""
    local = PACKAGE_DIR / relative
    if local.exists():
        return local
    try:
        located = Path(importlib.metadata.distribution(DISTRIBUTION).locate_file(f"sherry_export/{relative}"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return located if located.exists() else None


def built_library() -> Path | None:
    """The op library that the package build installed, or None when it was never built."""
    return _installed(f"_lib/{LIBRARY_NAME}")


def shipped_model(name: str) -> Path:
    """The folder of the shipped model ``name``: ``models/<name>`` in a checkout, package data when installed.

    Never raises, so module constants can name the models; a missing folder is reported where it is
    read (see :func:`require_shipped_model`).
    """
    if (CHECKOUT_MODELS / name).is_dir():
        return CHECKOUT_MODELS / name
    return _installed(f"_models/{name}") or PACKAGE_DIR / "_models" / name


def require_shipped_model(folder: Path) -> Path:
    """``folder`` if it holds a shipped model, else a FileNotFoundError that says how to get it back."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the shipped model {folder.name!r} is missing ({folder}); reinstall sherry-export "
            "(`pip install .` or `make setup` in a checkout)"
        )
    return folder
