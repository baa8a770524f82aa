"""The package's layout is the pipeline's picture: imports point one way, and no module imports another
that imports it back.

The import graph is read from the source (``ast``), so the test needs none of the heavy libraries. It
counts every import a module can execute: at module level and inside functions (a function-level import
is a dependency all the same, only a later one), but not those under ``if TYPE_CHECKING:``, which never
run. Commands named by string for dispatch (``sherry_export.cli.COMMANDS``, ``arguments.lazy_command``)
are not imports: the parser names its implementation, it uses none of its names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sherry_export", "tvm_schedules")

STAGES: dict[str, tuple[str, ...]] = {
    "quantize": ("sherry_export.quant", "sherry_export.qat"),
    "pack": ("sherry_export.formats", "sherry_export.packed_model", "sherry_export.provenance", "sherry_export.pack"),
    "export": ("sherry_export.export", "sherry_export.onnx_ops"),
    "run": ("sherry_export.generate", "sherry_export.genai"),
    "measure": ("sherry_export.compare", "sherry_export.bench"),
}
"""quantize → pack → export → run → measure: a stage imports its own and earlier stages only. Modules
in no stage (errors, ternary, models, runtime, verify, report, …) are shared helpers any stage may use."""
TRAINING = ("sherry_export.train", "sherry_export.train_config")
"""The training loop and its settings: they use the pipeline, and no stage of it uses them (the text
corpora of `sherry_export.data` are shared: `sherry compare` scores on them)."""


def module_files() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, for its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``tree`` imports. ``from X import Y`` imports the submodule ``X.Y``
    when there is one, else ``X`` itself. Importing a submodule also runs its parent packages'
    ``__init__``; that is Python's package machinery, not a dependency of the importer, and no edge."""
    found: set[str] = set()
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
        pending.extend(ast.iter_child_nodes(node))
    return (found & known) - {module}


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of the packages it imports."""
    files = module_files()
    return {
        module: imported_modules(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py", set(files))
        for module, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, …, a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def stage_of(module: str) -> int | None:
    for rank, prefixes in enumerate(STAGES.values()):
        if any(module == p or module.startswith(f"{p}.") for p in prefixes):
            return rank
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    """Guards the parser itself: module-level, function-level and relative imports are edges, a
    ``from pkg import sub`` is an edge to the submodule, and an import under TYPE_CHECKING is none."""
    source = """
import p.a
from p import b, CONSTANT
from . import c
from .d import name
if TYPE_CHECKING:
    from p import e
else:
    import p.f
def later():
    from p.g import thing
"""
    known = {"p", "p.a", "p.b", "p.c", "p.d", "p.e", "p.f", "p.g", "p.x"}
    found = imported_modules(ast.parse(source), "p.x", False, known)
    assert found == {"p", "p.a", "p.b", "p.c", "p.d", "p.f", "p.g"}
    assert "sherry_export.formats" in graph["sherry_export.packed_model"]  # module level
    assert "sherry_export.packed_model" in graph["sherry_export.models"]  # inside load_causal_lm
    assert "sherry_export.formats" in graph["tvm_schedules.tune"]  # across the two packages
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}; move what both need into a leaf module"


def test_stages_import_only_earlier_stages(graph):
    names = list(STAGES)
    backwards = [
        f"{module} ({names[stage_of(module)]}) imports {target} ({names[stage_of(target)]})"
        for module, targets in graph.items()
        if stage_of(module) is not None
        for target in targets
        if stage_of(target) is not None and stage_of(target) > stage_of(module)
    ]
    assert not backwards, "the pipeline runs quantize → pack → export → run → measure:\n" + "\n".join(backwards)
    assert all(stage_of(p) == rank for rank, prefixes in enumerate(STAGES.values()) for p in prefixes)
    missing = [p for prefixes in STAGES.values() for p in prefixes if p not in graph]
    assert not missing, f"STAGES names modules that do not exist: {missing}"


def test_nothing_imports_the_command_line_or_training(graph):
    """The command line sits on top of everything, and no pipeline stage needs the training loop."""
    importers = sorted(m for m, targets in graph.items() if "sherry_export.cli" in targets)
    assert importers == [], f"{importers} import sherry_export.cli: move what they need to a leaf module"
    staged = sorted(
        f"{m} imports {t}" for m, targets in graph.items() if stage_of(m) is not None for t in targets & set(TRAINING)
    )
    assert staged == [], staged


def pipeline_section() -> str:
    """The README's "The pipeline" section: the table of stages, their commands, artifacts and modules."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## The pipeline")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end >= 0 else None]


def test_the_readme_pipeline_names_every_command_and_stage_module() -> None:
    """A reviewer finds each command and each stage's code from the README's pipeline table alone."""
    from sherry_export.cli import COMMANDS

    section = pipeline_section()
    missing = [name for name in COMMANDS if f"`sherry {name}" not in section]
    assert not missing, f"the README's pipeline table does not name the commands {missing}"
    for prefixes in STAGES.values():
        for prefix in prefixes:
            path = prefix.replace(".", "/")
            leaf = path.rsplit("/", 1)[-1]
            named = f"{path}/" in section or f"{path}.py" in section or f"`{leaf}.py`" in section
            assert named, f"the README's pipeline table does not say where {prefix} is"
