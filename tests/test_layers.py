"""The package's import graph: layers that import only downwards, no cycle, one mpi4py importer,
no private names taken from another module. Read from the source with ast, so an import inside a
function counts like one at the top."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "distbp"

# Bottom up, as docs/design.md draws them; a module may import its own layer and those below.
LAYERS = [
    ("foundation", ["distbp.errors", "distbp.version", "distbp.durable", "distbp.paths"]),
    ("engine", ["distbp.network", "distbp.activations", "distbp.losses", "distbp.optim",
                "distbp.gradcheck"]),
    ("communication", ["distbp.comm", "distbp.launcher_env"]),
    ("data", ["distbp.data", "distbp.data.*", "distbp.loader", "distbp.in_memory",
              "distbp.preprocess", "distbp.idx", "distbp.ordered_sum",
              "distbp.data_import"]),
    ("state", ["distbp.checkpoint", "distbp.ckpt_integrity"]),
    ("run", ["distbp.config", "distbp.config_schema", "distbp.config_values", "distbp.config_rules",
             "distbp.session",
             "distbp.trainer", "distbp.evaluation", "distbp.metrics", "distbp.early_stop",
             "distbp.stopflag", "distbp.plot", "distbp.plot_files", "distbp.bench",
             "distbp.scaling",
             "distbp.bare_loop", "distbp.overlap", "distbp.step", "distbp.trace"]),
    ("launch", ["distbp.launch"]),
    ("API", ["distbp.api", "distbp"]),
    ("CLI", ["distbp.cli", "distbp.cli.*"]),
    ("entry points", ["distbp.entry", "distbp.__main__"]),
]


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m.endswith(".*") and module.startswith(m[:-1])):
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py (nor docs/design.md)")


def imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of `module`;
    `from distbp.cli import data` counts as an import of the module distbp.cli.data."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, []) if sub in MODULES else (base, [alias.name]))
    return found


def edges() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m) if target in MODULES} - {m} for m in MODULES}


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_layers():
    wrong = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
             for m, targets in edges().items() for t in sorted(targets)
             if layer_of(t) > layer_of(m)]
    assert wrong == []


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = edges(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_only_comm_imports_mpi4py():
    users = sorted({m for m in MODULES for t, _ in imports(m) if t.split(".")[0] == "mpi4py"})
    assert users == ["distbp.comm"]


def test_no_module_imports_a_private_name_of_another():
    taken = [f"{m} takes {name} from {t}" for m in MODULES for t, names in imports(m)
             if t in MODULES and t != m for name in names
             if name.startswith("_") and not name.endswith("__")]
    assert taken == []


def test_every_module_and_the_cli_import_on_their_own():
    # each in a fresh interpreter: an import that works only after another module has been
    # imported first (a hidden cycle) fails here
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for m in sorted(MODULES):
        if m == "distbp.__main__":
            continue  # runs the command
        proc = subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert proc.returncode == 0, f"import {m}:\n{proc.stderr}"


def test_no_module_imports_a_distbp_module_inside_a_function_but_the_entry_point():
    # entry.main imports the CLI only after installing the stop-signal handler (a signal during
    # the heavy imports must count); no other import of distbp hides a cycle in a function
    inside = []
    for m, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [node.module or "" for node in ast.walk(fn)
                         if isinstance(node, ast.ImportFrom)]
                names += [alias.name for node in ast.walk(fn) if isinstance(node, ast.Import)
                          for alias in node.names]
                inside += [f"{m}.{fn.name} imports {name}" for name in names
                           if name.split(".")[0] == "distbp"]
    assert inside == ["distbp.entry.main imports distbp.cli"]
