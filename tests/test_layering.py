"""The architecture's import order (DESIGN.md, "One forward, many runners"), checked by parsing the imports.

Imports point down only: config <- nn <- models <- {train, serve} <- paper packages <- cli, experiments;
parallel and schedule plug in (parallel through nn's stage and sharding hooks, schedule as passes). Every
import counts, including those inside functions: a lazy import still ties the two files together.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER = {"quant", "offload", "vision", "sparsity", "cluster", "diffusion"}

# package -> the moejax packages it must not import (``moejax.cli`` and experiments: nothing may)
FORBIDDEN = {
    "config": {"nn", "models", "parallel", "schedule", "train", "serve", *PAPER},
    "nn": {"parallel", "models", "schedule", "train", "serve", *PAPER},
    "models": {"train", "serve", *PAPER},
    "parallel": {"models", "train", "serve", *PAPER},
    "schedule": {"train", "serve", *PAPER},
    "train": {"serve", *PAPER},
    "serve": {"train", *PAPER},
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """Absolute names of the moejax / pallas_kernels / experiments modules ``path`` imports (anywhere in it)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in ("moejax", "pallas_kernels", "experiments")}
    return out


def _graph() -> dict[str, set[str]]:
    files = [*ROOT.glob("moejax/**/*.py"), *ROOT.glob("pallas_kernels/**/*.py")]
    mods = {_module_name(p): p for p in files}
    graph = {}
    for name, path in mods.items():
        # "from pkg import name" names a module when pkg.name is one, else the package itself
        graph[name] = {t for t in _imports(path, name) if t in mods or t.split(".")[0] == "experiments"} - {name}
    return graph


GRAPH = _graph()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] != "moejax" else (parts[1] if len(parts) > 1 else "moejax")


def test_the_graph_sees_the_library():
    assert len(GRAPH) > 60 and "moejax.serve.engine" in GRAPH
    assert "moejax.serve.runner" in GRAPH["moejax.serve.engine"]  # an import found by the parser


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_import(package):
    bad = sorted((m, t) for m, ts in GRAPH.items() if _package(m) == package for t in ts
                 if _package(t) in FORBIDDEN[package])
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_kernels_import_nothing_from_moejax():
    bad = sorted((m, t) for m, ts in GRAPH.items() if m.startswith("pallas_kernels") for t in ts
                 if not t.startswith("pallas_kernels"))
    assert not bad, bad


def test_nothing_imports_the_cli_or_experiments():
    bad = sorted((m, t) for m, ts in GRAPH.items() for t in ts
                 if t == "moejax.cli" or t.split(".")[0] == "experiments")
    assert not bad, bad


def test_paper_packages_do_not_form_cycles_with_each_other_or_below():
    """A paper package may use another (offload uses quant), but never the other way round as well."""
    pairs = {(_package(m), _package(t)) for m, ts in GRAPH.items() for t in ts} - {(p, p) for p in PAPER}
    both = sorted((a, b) for a, b in pairs if a < b and (b, a) in pairs)
    assert not both, f"packages importing each other: {both}"


def test_no_file_level_import_cycle():
    """Tarjan's strongly connected components over the module graph: every component is a single module."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in comps if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_and_an_upward_import_are_caught(monkeypatch):
    """The checks can fail: a planted upward import (nn -> serve) and a planted cycle are reported."""
    planted = {**GRAPH, "moejax.nn.planted": {"moejax.serve.engine", "moejax.nn.planted2"},
               "moejax.nn.planted2": {"moejax.nn.planted"}}
    monkeypatch.setitem(globals(), "GRAPH", planted)
    with pytest.raises(AssertionError, match="nn must not import"):
        test_no_upward_import("nn")
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_file_level_import_cycle()
