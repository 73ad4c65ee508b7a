"""Docstrings say the truth about signatures: every name an ``Args:`` section documents is a
parameter of its function (or of the class's ``__init__``).

metanet documents parameters that share a meaning on one line (``in_channels, out_channels:
channels per weight``). griffe's Google parser, which builds the API reference (``make docs``),
cannot check such lines, so mkdocs.yml turns its unknown-parameter warning off and this test
checks every name instead, without importing anything.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
ENTRY = re.compile(r"^(\s*)([A-Za-z_*][\w*, /]*?)\s*(\([^)]*\))?:(\s|$)")


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    names = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}
    names |= {p.arg for p in (a.vararg, a.kwarg) if p is not None}
    return names


def documented_names(docstring: str) -> Iterator[tuple[int, str]]:
    """``(line offset, name)`` of every name in the docstring's ``Args:`` sections."""
    lines = docstring.expandtabs().split("\n")
    i = 0
    while i < len(lines):
        m = SECTION.match(lines[i])
        i += 1
        if not m:
            continue
        base, entry_indent = len(m.group(1)), None
        while i < len(lines):
            line = lines[i]
            if line.strip():
                indent = len(line) - len(line.lstrip())
                if indent <= base:
                    break  # the section ended
                if entry_indent is None:
                    entry_indent = indent
                if indent == entry_indent:
                    e = ENTRY.match(line)
                    if e:
                        for name in re.split(r"[,/]", e.group(2)):
                            yield i, name.strip().lstrip("*")
            i += 1


def _documented(tree: ast.AST) -> Iterator[tuple[ast.AST, set[str], str]]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node, _params(node), doc
        elif isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node, clean=False)
            init = next(
                (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
                None,
            )
            if doc and init is not None:
                yield node, _params(init), doc


def stale_names(path: Path) -> list[str]:
    """``file:line: name`` for every documented name that is not a parameter."""
    out = []
    for node, params, doc in _documented(ast.parse(path.read_text(), str(path))):
        first = node.body[0].lineno  # the docstring's first line
        for offset, name in documented_names(doc):
            if name not in params:
                out.append(f"{path.relative_to(ROOT)}:{first + offset}: {name!r}")
    return out


def test_the_checker_reads_shared_lines_and_finds_stale_names(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "def f(a, b, *rest, c=1, **extra):\n"
        '    """Do it.\n\n'
        "    Args:\n"
        "        a, b: the inputs.\n"
        "        c (int): a count,\n"
        "            continued: not an entry.\n"
        "        *rest, **extra: passed on.\n"
        "        gone: a parameter that was removed.\n\n"
        "    Returns:\n"
        "        x: not a parameter, not checked.\n"
        '    """\n'
    )
    doc = ast.get_docstring(ast.parse(src.read_text()).body[0], clean=False)
    names = [n for _, n in documented_names(doc)]
    assert names == ["a", "b", "c", "rest", "extra", "gone"]


def test_documented_parameters_exist() -> None:
    stale = [s for path in sorted((ROOT / "metanet").rglob("*.py")) for s in stale_names(path)]
    assert not stale, "Args entries that name no parameter:\n" + "\n".join(stale)
