"""The import rule of the README's layout table, checked on the sources (ast; nothing is imported).

Layers, lowest first: kernels <- format <- quantize, runtime (neither imports the other) <- benchmarks <-
lazymoe (commands, cli). A package imports only from layers below it; no module imports tests; no two
modules import each other, directly or around a cycle (function-level imports count too).
"""
from __future__ import annotations

import ast
import os

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BELOW = {
    "kernels": set(),
    "format": {"kernels"},
    "quantize": {"format", "kernels"},
    "runtime": {"format", "kernels"},
    "benchmarks": {"runtime", "quantize", "format", "kernels"},
    "lazymoe": {"benchmarks", "runtime", "quantize", "format", "kernels"},
}


def modules() -> dict[str, str]:
    """Installed module name -> source file, from pyproject's package-dir mapping."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    out = {}
    for pkg, folder in dirs.items():
        base = os.path.join(ROOT, folder)
        for name in os.listdir(base):
            if name.endswith(".py"):
                out[pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"] = os.path.join(base, name)
    return out


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in BELOW else "lazymoe"


def imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the project modules it imports (relative imports resolved, `from pkg import mod` as mod)."""
    out = {}
    for mod, path in mods.items():
        pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if n.split(".")[0] == "tests":
                    found.add("tests")
                while n and n not in mods and "." in n:
                    n = n.rsplit(".", 1)[0]
                if n in mods and n != mod and not mod.startswith(n + "."):
                    found.add(n)
        out[mod] = found
    return out


def test_layers_import_downwards_only():
    mods = modules()
    assert "lazymoe.kernels.dispatch" in mods and "lazymoe.runtime.model" in mods
    bad = []
    for mod, deps in imports(mods).items():
        for d in deps:
            if d == "tests":
                bad.append(f"{mod} imports tests")
            elif layer(d) != layer(mod) and layer(d) not in BELOW[layer(mod)]:
                bad.append(f"{mod} ({layer(mod)}) imports {d} ({layer(d)})")
    assert not bad, bad


def test_no_import_cycles():
    graph = imports(modules())
    for g in graph.values():
        g.discard("tests")
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):                       # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles
