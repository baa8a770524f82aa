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
import sys
from pathlib import Path

DISTRIBUTION = "sherry-export"
PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "libsherry_ops.so"
CHECKOUT_MODELS = PACKAGE_DIR.parent / "models"
"""A source checkout's ``models/``: preferred when present, so edits to it are seen without a reinstall."""


def _installed(relative: str) -> Path | None:
    """``relative`` (below the package) in one of the package's folders, else in the installed distribution.

    An editable install's package spans the source folder and the install folder that holds the
    build products (its ``__path__`` lists both); a regular install is one folder.
    """
    package = sys.modules[__package__]  # the package is imported before any of its modules
    for folder in dict.fromkeys([PACKAGE_DIR, *map(Path, package.__path__)]):
        if (folder / relative).exists():
            return folder / relative
    try:
        located = Path(importlib.metadata.distribution(DISTRIBUTION).locate_file(f"sherry_export/{relative}"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return located if located.is_absolute() and located.exists() else None


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
            "(`pip install .`, or `make lib` in a checkout)"
        )
    return folder
