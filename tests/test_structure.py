"""The code stays readable: no function longer than 80 lines, no module longer than 600.

Lines are counted from a function's ``def`` line to its last line, docstring included (a
decorator is not counted); nested functions and methods are counted on their own too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdiga", "pipeline", "bench")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def _sources() -> list[tuple[str, str]]:
    """(path relative to the repository root, text) of every .py file of the packages."""
    return [
        (path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    ]


def _functions(body: list[ast.stmt]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function defined in ``body``, nested ones and methods included (a def is a
    statement, so only statement lists are searched: faster than ``ast.walk``)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, name, None)
            if isinstance(inner, list):
                yield from _functions(inner)


def test_the_packages_have_sources():
    assert len(_sources()) > 50


def test_no_function_is_longer_than_80_lines():
    too_long = []
    for rel, text in _sources():
        for node in _functions(ast.parse(text, filename=rel).body):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{rel}:{node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: split them: {too_long}"


def test_no_module_is_longer_than_600_lines():
    too_long = []
    for rel, text in _sources():
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{rel} ({lines} lines)")
    assert not too_long, f"modules over {MAX_FILE_LINES} lines: split them: {too_long}"
