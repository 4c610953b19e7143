"""The package's shape: its static import graph (every import statement, function-level ones included, read from the
AST) has no cycle, and the boundaries hold: stages never import the CLI or the pipeline, kernels/ imports nothing of
edgeft, rundir.py depends on nothing but errors and fsutil. kernels/ (and the QAT references in it) import without
Triton."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("edgeft.training", "edgeft.qat", "edgeft.exporters", "edgeft.devices", "edgeft.data")
TOP = ("edgeft.cli", "edgeft.pipeline")


def _package_dirs(root: Path) -> dict[str, Path]:
    """Package name -> folder, from pyproject's [tool.setuptools] packages and package-dir (kernels/ is
    edgeft.kernels, ...)."""
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib

        tool = tomllib.loads(text)["tool"]["setuptools"]
        packages, mapped = tool["packages"], tool.get("package-dir", {})
    except ImportError:  # Python 3.10: the two tables are simple enough to read by pattern
        packages = re.findall(r'"(edgeft[\w.]*)"', text.split("[tool.setuptools]")[1].split("[")[0])
        block = text.split("[tool.setuptools.package-dir]")[1].split("\n[")[0]
        mapped = dict(re.findall(r'"([\w.]+)"\s*=\s*"([^"]+)"', block))
    dirs = {}
    for pkg in packages:
        top = max((m for m in mapped if pkg == m or pkg.startswith(m + ".")), key=len, default=None)
        base = root / mapped[top] / Path(*pkg[len(top) + 1 :].split(".")) if top else root / Path(*pkg.split("."))
        dirs[pkg] = base
    return dirs


@dataclass
class Graph:
    files: dict[str, Path] = field(default_factory=dict)  # module -> its file
    edges: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> {imported module: "file:line"}

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module (Tarjan), each sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on: set[str] = set()
        out: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in self.edges[v]:
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
                    out.append(sorted(comp))

        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
        for v in sorted(self.edges):
            if v not in index:
                visit(v)
        return out


def import_graph(root: Path = ROOT) -> Graph:
    """The modules of the edgeft distribution and what each imports of it (the deepest module an import names)."""
    g = Graph()
    for pkg, d in _package_dirs(root).items():
        for f in d.glob("*.py"):
            name = pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"
            g.files[name] = f
    for mod, f in g.files.items():
        deps: dict[str, str] = {}
        is_pkg = f.stem == "__init__"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in g.files:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    deps.setdefault(name, f"{f.relative_to(root)}:{node.lineno}")
        g.edges[mod] = deps
    return g


def _under(mod: str, pkgs: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in pkgs)


def test_the_graph_sees_the_whole_package():
    g = import_graph()
    for mod in (
        "edgeft",
        "edgeft.pipeline",
        "edgeft.rundir",
        "edgeft.kernels.patch",
        "edgeft.qat.convert",
        "edgeft.exporters.pte",
        "edgeft.devices.evaluate",
        "edgeft.data.templates",
    ):
        assert mod in g.files, mod
    # a relative import, a function-level import and an import of a package-dir package all count
    assert "edgeft.rundir" in g.edges["edgeft.devices.evaluate"]
    assert "edgeft.models" in g.edges["edgeft.devices.evaluate"]  # float_dir, imported in a function
    assert "edgeft.kernels.lora" in g.edges["edgeft.qat.prepare"]


def test_the_cycle_finder_finds_a_cycle():
    g = Graph(edges={"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}})
    assert g.cycles() == [["a", "b", "c"]]


def test_no_import_cycles():
    g = import_graph()
    assert g.cycles() == [], "\n".join(
        " -> ".join(c) + ": " + "; ".join(f"{m} imports {d} ({g.edges[m][d]})" for m in c for d in g.edges[m] if d in c)
        for c in g.cycles()
    )


def test_stages_never_import_the_cli_or_the_pipeline():
    g = import_graph()
    bad = [
        f"{m} imports {d} ({where})"
        for m, deps in g.edges.items()
        if _under(m, STAGES)
        for d, where in deps.items()
        if _under(d, TOP)
    ]
    assert not bad, "\n".join(bad)


def test_kernels_import_nothing_of_edgeft():
    g = import_graph()
    bad = [
        f"{m} imports {d} ({where})"
        for m, deps in g.edges.items()
        if _under(m, ("edgeft.kernels",))
        for d, where in deps.items()
        if not _under(d, ("edgeft.kernels",)) and d != "edgeft"
    ]
    assert not bad, "\n".join(bad)


def test_rundir_is_a_leaf():
    """Every stage may read the run directory's layout: rundir.py depends on nothing that could depend on it."""
    assert set(import_graph().edges["edgeft.rundir"]) <= {"edgeft", "edgeft.errors", "edgeft.fsutil"}


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing of this process's imports carried over); its stdout."""
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_kernels_and_the_qat_references_import_without_triton():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from edgeft.kernels import rms_norm\n"
        "from edgeft.kernels._common import HAS_TRITON\n"
        "from edgeft.qat.fake_quant import WeightQuant, int_weight_ref\n"
        "assert not HAS_TRITON and 'triton' not in sys.modules\n"
        "w = torch.arange(64.0).reshape(2, 32)\n"
        "print(float(int_weight_ref(w, WeightQuant('int', 4, 32)).sum()))\n"
    )
    out = _python(code)
    # each row's grid: scale = max/7.5 = (31/7.5, 63/7.5); the sum of the dequantized rows, computed by hand
    w = [float(i) for i in range(64)]
    total = 0.0
    for row in (w[:32], w[32:]):
        s = max(row) / 7.5
        total += sum(max(-8, min(7, round(x / s))) * s for x in row)
    assert abs(float(out.strip().splitlines()[-1]) - total) < 1e-3


def test_the_train_verb_survives_importing_the_training_package():
    """``edgeft.train`` is the pipeline's verb even after ``edgeft.training`` (and its modules) are imported."""
    code = (
        "import edgeft\n"
        "import edgeft.training.loop\n"
        "from edgeft.training import train_loop\n"
        "import edgeft.pipeline\n"
        "assert edgeft.train is edgeft.pipeline.train, edgeft.train\n"
        "assert edgeft.training.loop.train_loop is train_loop\n"
    )
    _python(code)


def test_module_docstrings_say_what_the_module_guarantees_in_at_most_20_lines():
    """Long write-ups live in docs/ (docs/exporters.md, docs/qat.md ...), not at the top of a module."""
    g = import_graph()
    long = {}
    for mod, f in g.files.items():
        doc = ast.get_docstring(ast.parse(f.read_text(), str(f)), clean=False)
        if doc and len(doc.strip("\n").split("\n")) > 20:
            long[mod] = len(doc.strip("\n").split("\n"))
    assert not long, long
