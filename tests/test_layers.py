"""The layer rule's second half (the first is import-linter's contract in pyproject.toml, run by
.ci/run): a first-party import inside a function hides a dependency from a reader of the module's
head, so each one must say why on its line (start-up time)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("demo", "encoder", "indexer", "search", "server", "store")


def product_modules() -> list[Path]:
    return [ROOT / "cli.py"] + sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def local_first_party_imports(source: str) -> list[int]:
    """Line numbers of first-party imports made inside a function body."""
    lines = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(name.split(".")[0] in (*PACKAGES, "cli") for name in names):
                lines.append(node.lineno)
    return lines


def test_the_check_sees_function_local_imports():
    source = "def f():\n    from store.errors import InputError\n    import json\n    return InputError, json\n"
    assert local_first_party_imports(source) == [2]


def test_every_function_local_first_party_import_says_why():
    unexplained = []
    for path in product_modules():
        lines = path.read_text().splitlines()
        for number in local_first_party_imports("\n".join(lines)):
            if "#" not in lines[number - 1]:
                unexplained.append(f"{path.relative_to(ROOT)}:{number}: {lines[number - 1].strip()}")
    assert not unexplained, "function-local first-party imports need a comment saying why:\n" + "\n".join(unexplained)


def import_cycles(graph) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (Tarjan's algorithm,
    without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on_stack, cycles = [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        cycles.append(sorted(group))
    return cycles


def test_the_cycle_check_sees_a_loop():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_around_a_loop():
    """Function-local and TYPE_CHECKING imports count: the engines call the feed, the model does
    not know it (encoder.model and encoder.feed used to import each other)."""
    grimp = pytest.importorskip("grimp")
    built = grimp.build_graph(*PACKAGES)
    graph = {module: built.find_modules_directly_imported_by(module) for module in built.modules}
    assert import_cycles(graph) == []


def test_no_function_below_the_command_line_takes_more_than_eight_parameters():
    """Configs and small value objects travel whole (issue 24: run_pipeline had 9, embed_on_ray 11)."""
    long = []
    for path in product_modules()[1:]:  # cli.py, the composition root, maps options onto configs
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args
                names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
                count = len(names) - (names[:1] in (["self"], ["cls"])) + bool(arguments.vararg) + bool(arguments.kwarg)
                if count > 8:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {count} parameters")
    assert not long, "\n".join(long)
