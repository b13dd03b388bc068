"""The package's import graph: one name, one direction, no circles.

segflow.models is the bottom layer (networks, graphical models, score kernels); the
engine (segflow.pipeline) builds on it and the flows (segflow.flows) on both. An import
edge the other way, or any import circle between modules, fails here. Imports inside
functions count too: they are still edges a reader has to follow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pipeline": "segflow.pipeline", "flows": "segflow.flows", "models": "segflow.models", "segflow": "segflow"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]]] + parts[1:]) if parts[0] != "segflow" else ".".join(parts)


def _edges() -> dict[str, set[str]]:
    modules = {}
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            modules[_module_name(path)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in modules:
                    c = c.rpartition(".")[0]
                if c and c != name:
                    targets.add(c)
        graph[name] = targets
    return graph


def test_models_never_import_the_engine_or_the_flows():
    bad = [
        f"{src} -> {dst}"
        for src, dsts in _edges().items()
        if src.startswith("segflow.models")
        for dst in dsts
        if dst.startswith(("segflow.pipeline", "segflow.flows"))
    ]
    assert not bad, "models/ must not import pipeline/ or flows/: " + ", ".join(sorted(bad))


def test_the_engine_never_imports_the_flows():
    bad = [f"{s} -> {d}" for s, ds in _edges().items() if s.startswith("segflow.pipeline") for d in ds if d.startswith("segflow.flows")]
    assert not bad, ", ".join(sorted(bad))


def test_no_import_circles():
    graph = _edges()
    # A package's __init__ importing its own submodules lazily is not a circle a reader follows.
    graph = {s: {d for d in ds if not s.startswith(d + ".") and not (s == "segflow" and d.startswith("segflow."))} for s, ds in graph.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_nothing_installs_a_top_level_pipeline_flows_or_models(tmp_path):
    code = (
        "import importlib.util as u, segflow, segflow.pipeline, segflow.flows, segflow.models\n"
        "print([n for n in ('pipeline', 'flows', 'models') if u.find_spec(n) is not None])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_public_api_comes_from_segflow_itself(tmp_path):
    code = (
        "import sys, segflow\n"
        "assert 'torch' not in sys.modules and 'prefect' not in sys.modules and 'ray' not in sys.modules\n"
        "from segflow import segment_flow, evaluate_flow, reprocess_flow, read_masks, load_mask, iter_masks\n"
        "print(segment_flow.name, evaluate_flow.name, reprocess_flow.name, read_masks.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "segflow.pipeline.reader" in out.stdout
