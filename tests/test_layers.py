"""The import graph of src/qprobe follows the layers written in the package docstring.

Every `import` / `from ... import` under src/qprobe is read with ast, module level and inside
functions alike; a module that imports a registry from `qprobe.catalog` also depends on that
registry's targets. The graph must have no cycle, and no module may import from a higher layer.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections import Counter
from pathlib import Path

import pytest

import qprobe
from qprobe import catalog
from qprobe.registry import Registry

SRC = Path(qprobe.__file__).parent

_LAYER_LINE = re.compile(r"^\s*(\d+)\.\s+([\w-]+)\s+(.*)$")


def layers() -> list[tuple[str, list[str]]]:
    """[(layer name, module patterns)], lowest first, from the package docstring."""
    out = []
    for line in (qprobe.__doc__ or "").splitlines():
        m = _LAYER_LINE.match(line)
        if m:
            assert int(m[1]) == len(out) + 1, f"layer numbers out of order at {line!r}"
            out.append((m[2], re.findall(r"qprobe(?:\.[\w*]+)*", m[3].split("(")[0])))
    return out


def modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _known(name: str, mods: dict[str, Path]) -> str:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def registry_targets() -> dict[str, set[str]]:
    """Registry name in qprobe.catalog -> the modules its entries name."""
    return {name: {e.target.partition(":")[0] for e in reg}
            for name, reg in vars(catalog).items() if isinstance(reg, Registry)}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the qprobe modules it imports (anywhere in its body)."""
    mods = modules(src)
    targets = registry_targets()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {_known(a.name, mods) for a in node.names if a.name.split(".")[0] == "qprobe"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "qprobe":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in mods else _known(base, mods))
                    if base == "qprobe.catalog" and alias.name in targets:
                        deps |= {_known(t, mods) for t in targets[alias.name]}
        graph[mod] = deps - {mod, ""}
    return graph


def layer_of(mod: str, table: list[tuple[str, list[str]]]) -> int:
    """Index of the layer whose most specific pattern matches `mod` (a pattern covers sub-modules)."""
    best, best_len = -1, -1
    for i, (_, patterns) in enumerate(table):
        for pat in patterns:
            if fnmatch.fnmatchcase(mod, pat) or fnmatch.fnmatchcase(mod, pat + ".*"):
                if len(pat) > best_len:
                    best, best_len = i, len(pat)
    return best


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]], table: list[tuple[str, list[str]]]) -> list[str]:
    def name(mod: str) -> str:
        i = layer_of(mod, table)
        return table[i][0] if i >= 0 else "no layer"

    return sorted(f"{m} ({name(m)}) -> {d} ({name(d)})" for m, deps in graph.items() if m != "qprobe"
                  for d in deps if d != "qprobe" and layer_of(d, table) > layer_of(m, table))


# ------------------------------------------------------------------------------------ tests
def test_docstring_lists_the_layers_and_every_module_has_one() -> None:
    table = layers()
    assert [name for name, _ in table] == ["core", "rewards", "tasks", "generation", "features", "store",
                                           "collection", "probes", "policy", "evaluation", "learning", "serving",
                                           "cli"]
    homeless = [m for m in modules() if m != "qprobe" and layer_of(m, table) < 0]
    assert homeless == []


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_no_import_from_a_higher_layer() -> None:
    assert upward_imports(import_graph(), layers()) == []


def test_store_knows_only_runs_on_disk() -> None:
    graph = import_graph()
    deps = set().union(*(d for m, d in graph.items() if m.startswith("qprobe.store")))
    assert {d.split(".")[1] for d in deps} <= {"errors", "core", "features", "store"}


def test_one_registry_of_losses() -> None:
    """`qprobe.catalog.LOSSES` is the only name -> loss mapping (no re-export module, no second dict)."""
    assert not (SRC / "losses.py").exists()
    defined = []
    for mod, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            names = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            defined += [mod for t in names if isinstance(t, ast.Name) and t.id.startswith("LOSS")]
    assert defined == ["qprobe.catalog"]


# The checker itself must see what it is meant to catch.
def test_checker_finds_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    pkg = tmp_path / "qprobe"
    (pkg / "store").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "store" / "__init__.py").write_text("")
    (pkg / "store" / "run.py").write_text("def f():\n    from qprobe.probes import io\n")
    (pkg / "probes").mkdir()
    (pkg / "probes" / "__init__.py").write_text("")
    (pkg / "probes" / "io.py").write_text("from qprobe.probes.models import Probe\n")
    (pkg / "probes" / "models.py").write_text("from . import io\n")
    graph = import_graph(pkg)
    assert graph["qprobe.store.run"] == {"qprobe.probes.io"}
    assert find_cycle(graph) in (["qprobe.probes.io", "qprobe.probes.models", "qprobe.probes.io"],
                                 ["qprobe.probes.models", "qprobe.probes.io", "qprobe.probes.models"])
    table = [("store", ["qprobe.store"]), ("probes", ["qprobe.probes"])]
    assert upward_imports(graph, table) == ["qprobe.store.run (store) -> qprobe.probes.io (probes)"]


@pytest.mark.parametrize("registry", ["TASKS", "BACKENDS", "REWARDS", "LOSSES", "EMBEDDERS", "EXTERNAL_EMBEDDERS"])
def test_catalog_targets_exist(registry: str) -> None:
    mods = modules()
    for target in registry_targets()[registry]:
        assert target in mods, f"{registry} names {target}, which is not a module of qprobe"


# ------------------------------------------------------------------------ one home, clear names
def _public_defs() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for mod, path in modules().items():
        if mod.startswith("qprobe._sandbox"):
            continue  # the sandbox worker's own `main` runs in a child process
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                out.setdefault(node.name, []).append(mod)
    return out


def test_public_functions_and_classes_have_one_home() -> None:
    assert {name: mods for name, mods in _public_defs().items() if len(mods) > 1} == {}


def test_names_say_what_they_do() -> None:
    defs, mods = _public_defs(), modules()
    assert "summarize" not in defs and "evaluate" not in defs
    assert [m for m in mods if m.rpartition(".")[2] == "consensus"] == []


def test_one_selection_softmax() -> None:
    import numpy as np

    from qprobe import metrics
    from qprobe.evaluation import consensus_return
    from qprobe.policy import select

    assert select.selection_probs is metrics.selection_probs is consensus_return.selection_probs
    rows = np.array([[1.0, 3.0, 3.0], [0.0, np.log(3.0), -1e9]])
    np.testing.assert_allclose(metrics.selection_probs(rows, 0.0), [[0, 0.5, 0.5], [0, 1, 0]])
    np.testing.assert_allclose(metrics.selection_probs(rows, 1.0)[1], [0.25, 0.75, 0.0])
    np.testing.assert_allclose(metrics.selection_probs(rows[1], 1.0), [0.25, 0.75, 0.0])


# Written for issue 16's pass@k item (real-valued rewards), which wires it into `eval`.
NOT_YET_CALLED = {"oracle_values"}


def test_no_dead_definitions() -> None:
    """Every module-level function, class and constant is used somewhere (the library, its tests,
    the benchmarks, the README); click commands are reached through their decorators."""
    repo = SRC.parents[1]
    words = Counter(re.findall(r"\w+", "\n".join(
        p.read_text() for pattern in ("src/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "benchmarks/**/*.sh",
                                      "README.md") for p in repo.glob(pattern))))
    dead = []
    for mod, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.decorator_list:
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if name.startswith("__") or name in NOT_YET_CALLED:
                    continue
                if words[name] < 2:
                    dead.append(f"{mod}.{name}")
    assert dead == []
