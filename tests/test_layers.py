"""The layer rule's second half (the first is import-linter's contract in pyproject.toml, run by
.ci/run): a first-party import inside a function hides a dependency from a reader of the module's
head, so each one must say why on its line (start-up time)."""

from __future__ import annotations

import ast
from pathlib import Path

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
