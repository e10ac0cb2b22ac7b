"""The code's shape: no import cycle among the project's modules (module-level and function-local imports alike),
no source file over 450 lines outside tests/ and benchmarks/, and the CLI's targets read from the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qsvd_export.cli import build_parser
from qsvd_export.targets import TARGETS, TargetPolicy

ROOT = Path(__file__).resolve().parents[1]
# package name → source folder (pyproject's package-dir)
PACKAGES = {"qsvd_export": ROOT / "qsvd_export", "qsvd_export.passes": ROOT / "passes",
            "qsvd_export.runtimes": ROOT / "runtimes"}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file: ``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module, else as ``pkg``; parent packages a dotted import passes through are not edges."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 80 and sum(map(len, graph.values())) > 200  # the walk sees the project
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_source_file_over_the_limit() -> None:
    sources = [p for folder in (*PACKAGES.values(), ROOT / "scripts", ROOT / "samples") for p in folder.rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_cli_target_choices_come_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    dummy = TargetPolicy("dummy-ep", default_bits="w8a8", allowed_bits=("w8a8",), description="a test's target")
    monkeypatch.setitem(TARGETS, dummy.name, dummy)
    help_text = build_parser()._subparsers._group_actions[0].choices["export"].format_help()  # type: ignore[union-attr]
    assert "dummy-ep" in help_text and "a test's target" in help_text
    args = build_parser().parse_args(["export", "tiny-llama", "-o", "out", "--target", "dummy-ep"])
    assert args.target == "dummy-ep"
    monkeypatch.delitem(TARGETS, dummy.name)
    with pytest.raises(Exception, match="invalid choice: 'dummy-ep'"):
        build_parser().parse_args(["export", "tiny-llama", "-o", "out", "--target", "dummy-ep"])


def test_every_package_is_declared_for_installation() -> None:
    """A subpackage missing from pyproject's list installs as nothing outside an editable checkout."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert found - declared == set()
