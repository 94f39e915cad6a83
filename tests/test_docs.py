"""The documentation stays true to the tree and inside the repository: docs/design.md's layout
table lists exactly the package's modules, every function the docs and README cite exists, every
docs/ page the README links exists, and no file points at documents outside the repository."""

from __future__ import annotations

import re
import subprocess

from conftest import ROOT
from test_readme import function_source

DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
MODULE_CELL = re.compile(r"^`(distbp/[\w/]+\.py)`$")
# Pointers at the notes the project grew from, which live outside the repository (built from
# parts so that this file does not match itself).
OUTSIDE = ("../" + "shared", "DESIGN" + ".md", "seed-" + "backpropagation")
CHECKED_SUFFIXES = (".py", ".md", ".sh", ".sbatch", ".toml")
SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache",
                ".ruff_cache"}


def layout_table() -> list[str]:
    """The module column of docs/design.md's table under "### Layout", in order."""
    text = (DOCS / "design.md").read_text()
    section = text.split("### Layout", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    modules = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        m = MODULE_CELL.match(cells[1]) if len(cells) >= 3 else None
        assert m, f"docs/design.md layout row {row!r}: the second cell must be one `distbp/...py`"
        modules.append(m.group(1))
    return modules


def test_the_layout_table_lists_exactly_the_modules_of_the_package():
    listed = layout_table()
    tree = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "distbp").rglob("*.py")
                  if "__pycache__" not in p.parts)
    duplicates = sorted({m for m in listed if listed.count(m) > 1})
    assert duplicates == [], "listed twice in docs/design.md"
    assert sorted(set(listed) - set(tree)) == [], "in docs/design.md but not in the tree"
    assert sorted(set(tree) - set(listed)) == [], "in the tree but not in docs/design.md"


def repository_files() -> list[str]:
    """The repository's files (tracked, and new ones git does not ignore), relative paths;
    outside a git checkout, every file under ROOT but build and tool directories."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
        return [p for p in out.stdout.splitlines() if (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file()
                and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)
                and not any(part.endswith(".egg-info") for part in p.parts)]


def test_no_file_refers_to_documents_outside_the_repository():
    found = []
    for path in repository_files():
        if not path.endswith(CHECKED_SUFFIXES):
            continue
        text = (ROOT / path).read_text(errors="replace")
        found += [f"{path}: {word}" for word in OUTSIDE if word in text]
    assert found == []


def test_every_docs_page_the_readme_links_exists():
    links = re.findall(r"\]\((docs/[^)#\s]+)", README)
    assert links, "the README links no docs/ page"
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_every_page_in_docs_links_only_to_pages_that_exist():
    missing = [f"{page.name}: {link}" for page in sorted(DOCS.glob("*.md"))
               for link in re.findall(r"\]\(([\w.-]+\.md)\)", page.read_text())
               if not (DOCS / link).is_file()]
    assert missing == []


def test_every_function_the_docs_and_readme_cite_exists():
    # "`Qualname` in `distbp/file.py`": the function, method or class must be defined there
    texts = {"README.md": README} | {f"docs/{p.name}": p.read_text() for p in DOCS.glob("*.md")}
    for name, text in texts.items():
        for qualname, path in re.findall(r"`([\w.]+)` in `(distbp/[\w/]+\.py)`", text):
            assert (ROOT / path).is_file(), f"{name} cites {path}, which does not exist"
            if qualname[0].isupper() and "." not in qualname:
                assert re.search(rf"^class {qualname}\b", (ROOT / path).read_text(), re.M), \
                    f"{name} cites class {qualname} in {path}, which has none"
            else:
                function_source(path, qualname)  # AssertionError naming what is missing
