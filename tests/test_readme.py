"""README claims that can drift: the equation table's functions, the opening commands, CI.

The equation table names a function for each equation (`Qualname` in `distbp/file.py`), never
line numbers: an edit elsewhere in a file cannot break it, while moving an equation's code out
of its function (or renaming the function) does.
"""

from __future__ import annotations

import ast
import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()
TABLE_HEADING = "## The seed's equations in the code"

# README row (a text unique to it) -> the code that computes its equation, which must lie inside
# the function the row names. Compared with runs of whitespace squashed to one space.
EQUATIONS = {
    "z_j = a_k W_jᵀ + b_j": ["np.matmul(self.weights[k], ws.a[k].T, out=ws.zT[j])",
                             "ws.zT[j] += self._bias_columns[k]"],
    "a_j = g(z_j)": ["self.g.g(ws.zT[j], ws.aT[j])"],
    "a_L = g_out(z_L)": ["np.subtract(z, s.row, out=a)", "np.exp(a, out=a)", "a /= s.row2"],
    "δ_L = a·ΣT − T": ["np.multiply(a, s.row, out=delta)", "delta -= t"],
    "ΔW_j = δ_jᵀ a_k": ["np.matmul(delta[lo:hi], ws.a[k], out=dW[k][lo:hi])"],
    "Δb_j = Σ_rows δ_j": ["np.add.reduce(delta, axis=1, out=db[k])"],
    "Δa_k = δ_j W_j": ["np.matmul(self.weights[k].T, delta, out=ws.deltaT[k])"],
    "δ_k = Δa_k ⊙ g′(z_k)": ["self.g.gprime(ws.zT[k], ws.aT[k], ws.zT[k])",
                             "ws.deltaT[k] *= ws.zT[k]"],
    "grad /= count": ["self.buckets.wait()", "self.grad /= count"],
    "w = w − α·u": ["np.multiply(u, dt(lr), out=s2)", "params -= s2"],
}
CITATION = re.compile(r"`([\w.]+)` in `(distbp/[\w/]+\.py)`")


def _squash(text: str) -> str:
    return " ".join(text.split())


def _table_rows() -> list[str]:
    """The body rows of the equation table (header and separator left out)."""
    section = README.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return rows[2:]


def _row(key: str) -> str:
    rows = [line for line in _table_rows() if key in line]
    assert len(rows) == 1, f"{key!r} is in {len(rows)} rows of the README's equation table"
    return rows[0]


def function_source(path: str, qualname: str) -> str:
    """The source of the def `qualname` ("func" or "Class.method") in ROOT/path, comments and
    docstring included; AssertionError naming it if the file has no such function."""
    text = (ROOT / path).read_text()
    body = ast.parse(text).body
    *owners, name = qualname.split(".")
    for owner in owners:
        classes = [n for n in body if isinstance(n, ast.ClassDef) and n.name == owner]
        assert classes, f"{path} has no class {owner}"
        body = classes[0].body
    defs = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name == name]
    assert defs, f"{path} has no function {qualname}"
    return ast.get_source_segment(text, defs[0])


def test_every_row_of_the_equation_table_is_checked():
    rows = _table_rows()
    assert rows, "the README has no equation table"
    for row in rows:
        keys = [key for key in EQUATIONS if key in row]
        assert len(keys) == 1, f"README row {row!r} matches {keys} of tests/test_readme.py"


def test_every_equation_is_computed_inside_the_function_its_row_names():
    for key, fragments in EQUATIONS.items():
        m = CITATION.search(_row(key))
        assert m, f"README row for {key!r} does not name its function: `Qualname` in `path`"
        qualname, path = m.groups()
        source = _squash(function_source(path, qualname))
        for fragment in fragments:
            assert _squash(fragment) in source, \
                f"README says {qualname} in {path} computes {key!r}, but it lacks {fragment!r}"


def test_the_readme_cites_no_line_numbers():
    assert not re.search(r"\.py`?\s+L\d+", README)


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = ".venv/bin/python -m pytest -q"
    assert f"&& {command}\n" in README
    assert ci.rstrip().splitlines()[-1] == command
    first_block = README.split("```")[1]
    assert "mpiexec -n 2 .venv/bin/distbp train" in first_block
