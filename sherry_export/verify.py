"""Checksums of an export's weights, checked when a model is loaded, and ``sherry verify`` for a whole folder.

Every 5-bit Sherry code and every float scale is a valid value, so neither onnxruntime nor the kernels
can tell damaged weights from trained ones: a few random bytes in ``model.onnx`` or ``model.onnx.data``
run without error and generate garbage. ``sherry export`` therefore records the SHA-256 of each weight
file in ``sherry_export.json`` (``"checksums": {"model.onnx": "sha256:…"}``), and
:class:`sherry_export.generate.OnnxCausalLM` (so ``sherry generate``, ``compare``, ``tvm-run``) checks
them before it creates a session, once per file and process: one read of the weights (docs/export.md
gives the cost). ``--no-verify`` (``verify=False``) skips it. Folders exported before checksums were
recorded load unchecked.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sherry_export.errors import InputError, load_json, one_line

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "sherry_export.json"
GENAI_CONFIG_FILE = "genai_config.json"
CHECKSUMS_KEY = "checksums"
MAX_POSITIONS_KEY = "sherry.max_positions"
"""Metadata of ``model.onnx`` that the exporter writes and the runners read: how many positions the
rotary caches hold."""
ALGORITHM = "sha256"
REEXPORT = "export it again with `sherry export`"

_verified: dict[tuple[str, int, int], str] = {}
"""Digests this process has already checked, by (path, size, mtime): ``sherry compare`` loads each export
once per thread count and repetition, and a multi-GB file need not be hashed each time."""


def file_checksum(path: str | os.PathLike[str]) -> str:
    """``"sha256:<hex>"`` of the file at ``path``, streamed (never held in memory)."""
    with open(path, "rb") as f:
        return f"{ALGORITHM}:{hashlib.file_digest(f, ALGORITHM).hexdigest()}"


def weight_checksums(files: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """The manifest's ``checksums`` entry: file name → checksum, for the weight files among ``files``
    (``model.onnx`` and its external data)."""
    return {Path(f).name: file_checksum(f) for f in files if Path(f).name.startswith(MODEL_FILE)}


def read_manifest(folder: Path) -> dict:
    """``sherry_export.json`` of an export folder, parsed; damage is an :class:`InputError` naming it."""
    manifest = load_json(folder / MANIFEST_FILE, f"{REEXPORT} (or restore the file)")
    if not isinstance(manifest, dict):
        raise InputError(f"{folder / MANIFEST_FILE} is not a JSON object: the file is damaged; {REEXPORT}")
    return manifest


def recorded_checksums(folder: Path, manifest: dict) -> dict[str, str]:
    checksums = manifest.get(CHECKSUMS_KEY, {})
    if not isinstance(checksums, dict) or not all(
        isinstance(v, str) and Path(k).name == k for k, v in checksums.items()
    ):
        raise InputError(f"{folder / MANIFEST_FILE} has a damaged {CHECKSUMS_KEY!r} entry; {REEXPORT}")
    return checksums


def check_file(path: Path, expected: str) -> None:
    """Compare ``path`` with its recorded checksum; a missing or changed file is an :class:`InputError`."""
    if not path.is_file():
        raise InputError(f"{path} is missing, but {path.parent / MANIFEST_FILE} records it; {REEXPORT}")
    stat = path.stat()
    key = (os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _verified.get(key) == expected:
        return
    actual = file_checksum(path)
    if actual != expected:
        raise InputError(
            f"{path} does not match the checksum recorded at export in {path.parent / MANIFEST_FILE} "
            f"({ALGORITHM} {actual.partition(':')[2][:12]}… instead of {expected.partition(':')[2][:12]}…): "
            f"the weights are damaged or were changed; {REEXPORT} (--no-verify / verify=False skips this check)"
        )
    _verified[key] = expected


def verify_model_files(model_path: str | os.PathLike[str]) -> list[str]:
    """Check the weight files of the export that holds ``model_path`` against its manifest.

    Returns the names checked: none when the folder has no manifest or its manifest records no
    checksum for this model file (a graph made outside ``sherry export``, or an older export).
    """
    model_path = Path(model_path)
    folder = model_path.parent
    if not (folder / MANIFEST_FILE).is_file():
        return []
    checksums = recorded_checksums(folder, read_manifest(folder))
    if model_path.name not in checksums:
        return []
    names = [name for name in checksums if name.startswith(model_path.name)]
    for name in names:
        check_file(folder / name, checksums[name])
    return names


@dataclass
class Check:
    """One row of ``sherry verify``'s table."""

    what: str
    detail: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_folder(folder: str | os.PathLike[str], session: bool = True) -> list[Check]:
    """Every check ``sherry verify`` makes on an export folder, continuing past failures.

    The manifest and ``genai_config.json`` parse; each recorded weight file has its checksum; the graph
    passes ``onnx.checker`` (full check, by path so it works past 2 GiB); and, with ``session``,
    onnxruntime creates a session with the op library (the kernels accept every node).
    """
    import onnx

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give a folder written by `sherry export`")
    checks: list[Check] = []

    def attempt(what: str, detail: str, action) -> bool:
        try:
            action()
        except (InputError, OSError, ValueError, onnx.checker.ValidationError) as error:
            checks.append(Check(what, detail, one_line(error)))
            return False
        checks.append(Check(what, detail))
        return True

    manifest: dict = {}

    def parse_manifest() -> None:
        manifest.update(read_manifest(folder))

    attempt(MANIFEST_FILE, "parses", parse_manifest)
    attempt(GENAI_CONFIG_FILE, "parses", lambda: load_json(folder / GENAI_CONFIG_FILE, REEXPORT))
    checksums: dict[str, str] = {}
    if manifest:
        attempt(MANIFEST_FILE, "records checksums", lambda: checksums.update(recorded_checksums(folder, manifest)))
        if not checksums and checks[-1].ok:
            checks[-1].problem = f"no checksums recorded (exported before sherry-export recorded them); {REEXPORT}"
    for name, expected in checksums.items():
        path = folder / name
        size = f"{path.stat().st_size:,} bytes, " if path.is_file() else ""
        attempt(name, f"{size}{expected[:19]}…", lambda path=path, expected=expected: check_file(path, expected))
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        checks.append(Check(MODEL_FILE, "present", f"{model_path} is missing; {REEXPORT}"))
        return checks
    weights_ok = all(c.ok for c in checks if c.what in checksums)
    if attempt(MODEL_FILE, "onnx.checker (full)", lambda: check_graph(model_path)) and session and weights_ok:
        attempt(MODEL_FILE, "onnxruntime session with the ai.sherry ops", lambda: load_session(model_path))
    return checks


def check_graph(model_path: Path) -> None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        onnx.checker.check_model(os.fspath(model_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, DecodeError) as error:
        raise InputError(f"{model_path} fails onnx.checker: {one_line(error)}; {REEXPORT}") from error


def load_session(model_path: Path) -> None:
    from sherry_export.runtime import make_session

    make_session(model_path)


def cmd_verify(args: argparse.Namespace) -> int:
    from sherry_export.report import markdown_table

    checks = verify_folder(args.model_dir, session=not args.no_session)
    print(markdown_table(["file", "check", "result"], [[c.what, c.detail, c.problem or "ok"] for c in checks]))
    failed = [c for c in checks if not c.ok]
    if failed:
        raise InputError(f"{len(failed)} of {len(checks)} checks failed on {args.model_dir}: {failed[0].problem}")
    print(f"\n{args.model_dir}: all {len(checks)} checks passed")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sherry verify`` to the command line."""
    p = subparsers.add_parser(
        "verify",
        description="Check a folder written by `sherry export`: sherry_export.json and genai_config.json parse, "
        "every weight file matches the SHA-256 recorded at export, the graph passes onnx.checker, and "
        "onnxruntime loads it with the ai.sherry ops. Prints a table; exits 2 if any check fails.",
        epilog="example: sherry verify out/smollm2-sherry",
    )
    p.add_argument("model_dir", type=Path, help="a folder written by `sherry export`")
    p.add_argument("--no-session", action="store_true", help="skip creating the onnxruntime session")
    p.set_defaults(func=cmd_verify)
