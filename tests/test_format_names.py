"""Adding a format costs one registry entry: no Python layer spells the formats out for itself.

``sherry_export/formats.py`` is the only Python module that may name a format (``FORMATS``, the
``MatMulNBits`` baselines, ``fp32``, the reference format, the speed targets); every other layer (the
exporter, the command-line choices, the bench labels and ratio columns, the compare report, the TVM
build, tuning and Relax mapping) reads those names from it. ``tests/test_format_table.py`` checks the C++
table against the registry; this test reads the Python source (``ast``) and fails on a format name written
as a literal elsewhere, so a new format cannot be missed by a layer that lists the old ones.

What counts as naming a format:

- a string literal equal to a format's name. ``sherry``, ``fp32`` and ``int8`` are also the names of other
  things (the Sherry projection and QAT method, sherry's own runner, the program; the float32 LM head; the
  kernels' int8 activations and numpy's dtype), so for
  them only a literal in a format position counts: compared with, assigned to, or the default or keyword
  value of a name that says ``format``/``fmt``, or the default of a ``--format`` option;
- a collection literal (tuple, list, set, dict keys) holding two or more format names, whatever they are.

Docstrings and help text may mention formats (they are documentation). Per-format code that is a
kernel's own job, its code layout and decoder, is allowed where it lives (``KERNEL_MODULES``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sherry_export.formats import EXPORT_FORMATS, FORMATS, FP32, HEAD_FORMATS, LM_HEADS, NBITS_FORMATS, REFERENCE_FORMAT

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("sherry_export", "tvm_schedules", "models/recipes")
REGISTRY = Path("sherry_export/formats.py")
KERNEL_MODULES = {
    Path("tvm_schedules/layout.py"): "the TVM kernels' code-byte layout of each format",
    Path("tvm_schedules/kernels.py"): "the TVM kernels' per-format decode instructions",
    Path("tvm_schedules/intrinsics.py"): "the TVM kernels' per-format decode intrinsics",
    Path("tvm_schedules/lut.py"): "the TVM LUT formulation, a kernel of sherry's pair records only",
}
NAMES = frozenset(EXPORT_FORMATS) | frozenset(LM_HEADS)
AMBIGUOUS = frozenset({REFERENCE_FORMAT, FP32, *HEAD_FORMATS})
"""Format names that are also the names of other things: a literal of them counts only in a format position."""


def says_format(node: ast.AST | None) -> bool:
    """Whether a name, attribute, argument or keyword is named as a format (``fmt``, ``format``, ``shape.format``)."""
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute):
        name = node.attr
    elif isinstance(node, ast.arg | ast.keyword):
        name = node.arg
    else:
        return False
    return name is not None and ("format" in name.lower() or name == "fmt")


def format_positions(tree: ast.AST) -> set[int]:
    """ids of the string constants that sit in a format position: ``fmt == "x"``, ``format = "x"``,
    ``format: str = "x"``, ``def f(format="x")``, ``f(format="x")``, ``add_argument("--format", default="x")``."""
    found: set[int] = set()

    def mark(value: ast.AST | None) -> None:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            found.add(id(value))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(says_format(o) for o in operands):
                for o in operands:
                    mark(o)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(says_format(t) for t in targets):
                mark(node.value)
        elif isinstance(node, ast.keyword):
            if says_format(node):
                mark(node.value)
        elif isinstance(node, ast.Call) and any(
            isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--format")
            for a in node.args
        ):  # parser.add_argument("--format", default="x", choices=...)
            for keyword in node.keywords:
                mark(keyword.value)
        elif isinstance(node, ast.arguments):
            positional = [*node.posonlyargs, *node.args]
            for arg, default in zip(positional[len(positional) - len(node.defaults) :], node.defaults, strict=True):
                if says_format(arg):
                    mark(default)
            for arg, default in zip(node.kwonlyargs, node.kw_defaults, strict=True):
                if says_format(arg):
                    mark(default)
    return found


def literal_format_names(source: str, filename: str) -> list[str]:
    """Where ``source`` names a format by a literal: ``line: what``."""
    tree = ast.parse(source, filename)
    positions = format_positions(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES:
            if node.value not in AMBIGUOUS or id(node) in positions:
                problems.append(f"{node.lineno}: format name {node.value!r}")
        elif isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict):
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            named = [i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES]
            if len(named) >= 2:
                problems.append(f"{node.lineno}: a literal list of formats {named}")
    return problems


def scanned_files() -> list[Path]:
    files = [path.relative_to(ROOT) for part in SCANNED for path in sorted((ROOT / part).rglob("*.py"))]
    return [path for path in files if path != REGISTRY and path not in KERNEL_MODULES]


def test_the_scan_finds_each_way_of_naming_a_format() -> None:
    """Guards the scanner: each pattern is caught, and ``sherry``/``fp32`` in other roles are not."""
    source = """
TARGETS = {"tl2": 1.1}
LABELS = ("sherry", "fp32")
if fmt == "sherry": pass
if options.format != "fp32": pass
format = "sherry"
class Options:
    format: str = "sherry"
def pack(module, format="sherry"): pass
def run(*, fmt="fp32"): pass
export(format="sherry")
parser.add_argument("--format", default="sherry")
method = "sherry"
engine = "sherry"
lm_head = "fp32"
if self.quant == "sherry": pass
PROJECTIONS = ("sherry", "absmean")
"""
    lines = sorted({int(problem.split(":")[0]) for problem in literal_format_names(source, "<probe>")})
    assert lines == [2, 3, 4, 5, 6, 8, 9, 10, 11, 12]


def test_the_scan_reads_every_layer() -> None:
    """The scan covers the exporter, the command line, bench, compare and the TVM build, tune and Relax code."""
    files = {str(path) for path in scanned_files()}
    for expected in (
        "sherry_export/export/projections.py",
        "sherry_export/cli.py",
        "sherry_export/bench/kernels.py",
        "sherry_export/compare/report.py",
        "tvm_schedules/build.py",
        "tvm_schedules/tune.py",
        "tvm_schedules/relax_onnx.py",
    ):
        assert expected in files
    assert all((ROOT / path).is_file() for path in KERNEL_MODULES), "KERNEL_MODULES names a file that is gone"


@pytest.mark.parametrize("path", scanned_files(), ids=str)
def test_no_layer_spells_out_the_formats(path: Path) -> None:
    problems = literal_format_names((ROOT / path).read_text(), str(path))
    assert not problems, (
        f"{path} names formats itself: {problems}. Read them from sherry_export.formats (FORMATS, NBITS_FORMATS, "
        "EXPORT_FORMATS, FP32, REFERENCE_FORMAT, SPEED_BASELINES, a WeightFormat's fields) so a new format is one "
        "registry entry"
    )


def test_the_registry_names_every_format_it_lists() -> None:
    """The names the scan looks for are the registry's, so a new format is scanned for as soon as it exists."""
    assert set(FORMATS) | set(NBITS_FORMATS) <= NAMES
    assert REFERENCE_FORMAT in FORMATS
