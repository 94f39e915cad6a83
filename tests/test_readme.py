"""README claims that can drift: the equation table's line numbers, the opening commands, CI."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()

# README row -> a fragment that must appear in the cited lines
EQUATIONS = {
    "z_j = a_k W_jᵀ + b_j": "z_j = a_k W_jᵀ",
    "a_j = g(z_j)": "a_j = g(z_j)",
    "δ_L = ∂L/∂z_L": "δ_L",
    "ΔW_j = δ_jᵀ a_k": "ΔW_j = δ_jᵀ a_k",
    "Δb_j = Σ_rows δ_j": "Δb_j = Σ_rows δ_j",
    "Δa_k = δ_j W_j": "Δa_k = δ_j W_j",
    "δ_k = Δa_k ⊙ g′(z_k)": "δ_k = Δa_k ⊙ g′(z_k)",
    "grad /= count": "self.grad /= count",
    "w = w − α·u": "w = w − α·u",
}


def _row(key: str) -> str:
    rows = [line for line in README.splitlines() if line.startswith("|") and key in line]
    assert len(rows) == 1, key
    return rows[0]


def test_every_cited_line_range_holds_its_equation():
    for key, fragment in EQUATIONS.items():
        m = re.search(r"`(distbp/[\w/]+\.py)` L(\d+)(?:–(\d+))?", _row(key))
        assert m, key
        path, first, last = m.group(1), int(m.group(2)), int(m.group(3) or m.group(2))
        text = (ROOT / path).read_text().splitlines()
        found = [i for i, line in enumerate(text, start=1) if fragment in line]
        assert any(first <= i <= last for i in found), \
            f"README cites {path} L{first}-{last} for {key!r}; it is at line(s) {found}"


def _function_span(path: str, qualname: str) -> tuple[int, int]:
    """(first, last) line of the def `qualname` ("func" or "Class.method") in the file."""
    tree = ast.parse((ROOT / path).read_text())
    *owners, name = qualname.split(".")
    body = tree.body
    for owner in owners:
        body = next(n.body for n in body if isinstance(n, ast.ClassDef) and n.name == owner)
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    return node.lineno, node.end_lineno


def test_every_cited_line_range_lies_in_the_named_function():
    for key in EQUATIONS:
        m = re.search(r"`([\w.]+)` in `(distbp/[\w/]+\.py)` L(\d+)(?:–(\d+))?", _row(key))
        assert m, f"README row for {key!r} does not name its function: `func` in `path` Lfirst"
        name, path, first = m.group(1), m.group(2), int(m.group(3))
        last = int(m.group(4) or first)
        lo, hi = _function_span(path, name)
        assert lo <= first <= last <= hi, \
            f"README cites {path} L{first}-{last} as {name}, which spans L{lo}-{hi}"


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = ".venv/bin/python -m pytest -q"
    assert f"&& {command}\n" in README
    assert ci.rstrip().splitlines()[-1] == command
    first_block = README.split("```")[1]
    assert "mpiexec -n 2 .venv/bin/distbp train" in first_block
