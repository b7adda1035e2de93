"""The layering, checked on the source (AST, imports inside functions included): no import circle in src/ftx, no
stage module imports another stage module, the core layer imports nothing outside itself, every registry entry
lives in its seam, and `ftx --help` stays free of heavy imports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FTX

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / "ftx").rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """ftx modules that `name` imports (at module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ftx")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ftx"):
                continue
            for a in node.names:  # `from . import x` imports the module x when there is one
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def test_no_import_circle(graph):
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
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
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_stages_never_import_each_other(graph):
    stages = {m for m in graph if m.startswith("ftx.stages.")}
    assert len(stages) >= 8
    bad = {(a, b) for a in stages for b in graph[a] if b in stages}
    assert not bad, f"stage modules importing stage modules: {sorted(bad)}"


def test_core_imports_only_core(graph):
    bad = {
        (a, b)
        for a in graph
        if a.startswith("ftx.core")
        for b in graph[a]
        if not b.startswith("ftx.core") and b != "ftx"
    }
    assert not bad, f"the core layer imports outside itself: {sorted(bad)}"


def test_seams_import_no_stage_and_no_cli(graph):
    seams = ("ftx.engines", "ftx.formats", "ftx.packaging", "ftx.metrics", "ftx.bench", "ftx.serving")
    bad = {(a, b) for a in graph if a.startswith(seams) for b in graph[a] if b.startswith(("ftx.stages", "ftx.cli"))}
    assert not bad, sorted(bad)


def test_every_registry_entry_is_one_module_of_its_seam():
    from ftx import pipeline
    from ftx.bench.loads import PROFILES
    from ftx.engines import ENGINES
    from ftx.formats import FORMATS
    from ftx.metrics import METRICS
    from ftx.packaging import STEPS

    for entries, package in (
        (pipeline.STAGES, "ftx.stages."),
        (ENGINES.values(), "ftx.engines."),
        (FORMATS.values(), "ftx.formats."),
        (METRICS, "ftx.metrics."),
        (STEPS, "ftx.packaging."),
        (PROFILES.values(), "ftx.bench.loads"),
    ):
        for e in entries:
            assert type(e).__module__.startswith(package), (type(e), package)
    # the recipe, the CLI's stage names and the card come from the stage registry
    sections = [f for f in pipeline.Recipe.model_fields if f not in pipeline.RecipeBase.model_fields]
    assert sections == [s.name for s in pipeline.STAGES]


def test_cli_modules_are_small():
    for p in (SRC / "ftx" / "cli").glob("*.py"):
        assert len(p.read_text().splitlines()) <= 150, p.name


def test_help_does_not_import_heavy_packages():
    code = (
        "import sys; from ftx.cli import cli; sys.argv=['ftx','--help']\ntry: cli()\nexcept SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'llama_cpp', 'peft') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().endswith("[]"), proc.stdout + proc.stderr


def test_every_verb_help_works():
    for verb in (
        "recipe run",
        "train",
        "data split",
        "merge",
        "export",
        "modelfile",
        "serve run",
        "serve k8s",
        "bench run",
        "bench compare",
        "plan",
        "doctor",
    ):
        proc = subprocess.run([*FTX, *verb.split(), "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (verb, proc.stderr)
