"""Imports point down the layers of docs/architecture.md, never in a circle.

The import graph of smi_hub, training, demo and hubconf is read with ``ast`` (imports at module
level and inside functions alike), so a cycle hidden by a function-local import counts.
A project import inside a function is allowed only where it defers work on purpose: the CLI's
commands (start-up time). Heavy optional libraries (faiss, gradio, datasets, timm, ...) are not
project modules and may be imported where they are needed.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("smi_hub", "training", "demo", "hubconf")

# bottom to top; a module may import its own layer and the layers below it. Keep in step with
# the "Layers" section of docs/architecture.md (test_architecture_doc_lists_the_layers).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "smi_hub.errors",
            "smi_hub.argtypes",
            "smi_hub.fileio",
            "smi_hub.outputs",
            "smi_hub.settings",
            "smi_hub.schema",
            "smi_hub.images",
            "smi_hub.fashion_mnist",
            "smi_hub.cli_format",
            "smi_hub.plan",
            "smi_hub.ood",
            "smi_hub.refine",
            "smi_hub.mmap_tensors",
            "smi_hub.script_modules",
        ),
    ),
    ("catalog", ("smi_hub.registry", "smi_hub.model_card")),
    ("weights folder format", ("smi_hub.weights",)),
    ("network", ("smi_hub.timm_compat", "smi_hub.hf_hub_mixin", "smi_hub.models")),
    ("loaders", ("smi_hub.download", "smi_hub.hub", "smi_hub.transforms", "smi_hub.export")),
    (
        "features and search",
        (
            "smi_hub.store_manifest",
            "smi_hub.feature_store",
            "smi_hub.jpeg_decode",
            "smi_hub.feature_sources",
            "smi_hub.features",
            "smi_hub.index_kinds",
            "smi_hub.index_vectors",
            "smi_hub.index_format",
            "smi_hub.index_build",
            "smi_hub.index_folder",
            "smi_hub.index",
            "smi_hub.localization",
            "smi_hub.gallery",
            "smi_hub.hf_datasets",
            "smi_hub.store_export",
            "smi_hub.search_service",
        ),
    ),
    (
        "entry points",
        (
            "smi_hub",
            "smi_hub.cli",
            "smi_hub.cli_args",
            "smi_hub.cli_weights",
            "smi_hub.cli_features",
            "smi_hub.cli_search",
            "smi_hub.cli_demo",
            "hubconf",
            "demo.app",
            "demo.engine",
            "demo.gallery_index",
            "demo.display",
            "smi_hub.serve",
        ),
    ),
    ("training", ("training", "training.*")),
]
# modules whose functions may import project modules (what they defer, and why)
_DEFERRED = "each command imports what it runs: start-up time"
LOCAL_IMPORTS_ALLOWED = {
    "smi_hub.cli_args": "the output check imports smi_hub.outputs when it runs: start-up time",
    "smi_hub.cli_weights": _DEFERRED,
    "smi_hub.cli_features": _DEFERRED,
    "smi_hub.cli_search": _DEFERRED,
    "smi_hub.cli_demo": _DEFERRED,
}


class Edge(NamedTuple):
    """``source`` imports ``target`` at ``line``; ``function`` names the enclosing function
    of a function-local import (None at module level)."""

    source: str
    target: str
    line: int
    function: str | None


def project_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for the packages (folders) and single-file modules."""
    found: dict[str, Path] = {}
    for name in packages:
        files = [root / f"{name}.py"] if (root / f"{name}.py").is_file() else []
        files += sorted((root / name).rglob("*.py")) if (root / name).is_dir() else []
        for path in files:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known) -> list:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # ``from pkg import submodule`` imports the submodule; ``from pkg import name`` the package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Edge]:
    """Every import of one project module by another, at module level or in a function."""
    known = project_modules(root, packages)
    edges: list[Edge] = []

    def visit(node: ast.AST, module: str, is_package: bool, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in _targets(child, module, is_package, known):
                    while target not in known and "." in target:  # import a.b.c -> a.b
                        target = target.rsplit(".", 1)[0]
                    if target in known and target != module:
                        edges.append(Edge(module, target, child.lineno, function))
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else None
            )
            visit(child, module, is_package, function or inner)

    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        visit(tree, module, path.name == "__init__.py", None)
    return edges


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def layer_of(module: str, layers=LAYERS) -> int | None:
    """Index of the layer whose patterns match ``module`` (None: in no layer)."""
    for i, (_, patterns) in enumerate(layers):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    return None


def upward_imports(edges: list[Edge], layers=LAYERS) -> list[str]:
    """One line per import of a higher layer by a lower one."""
    out = []
    for e in edges:
        src, dst = layer_of(e.source, layers), layer_of(e.target, layers)
        if src is not None and dst is not None and dst > src:
            out.append(
                f"{e.source}:{e.line} ({layers[src][0]}) imports {e.target} ({layers[dst][0]})"
            )
    return out


def local_imports(edges: list[Edge], allowed=LOCAL_IMPORTS_ALLOWED) -> list[str]:
    """One line per function-local project import outside the allowed modules."""
    return [
        f"{e.source}:{e.line} in {e.function}() imports {e.target}"
        for e in edges
        if e.function is not None and e.source not in allowed
    ]


# --- the project ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_graph(REPO)


def test_no_import_cycles(edges):
    assert find_cycles(edges) == [], "modules that import each other in a circle"


def test_imports_point_down_the_layers(edges):
    assert upward_imports(edges) == [], (
        "a module imports a higher layer (docs/architecture.md): move the function it needs "
        "down, or the importing module up"
    )


def test_every_module_has_a_layer():
    modules = project_modules(REPO)
    missing = [m for m in modules if layer_of(m) is None]
    assert missing == [], (
        "add these modules to LAYERS in tests/test_layering.py and to the Layers section of "
        "docs/architecture.md"
    )
    stale = [p for _, patterns in LAYERS for p in patterns if not fnmatch.filter(modules, p)]
    assert stale == [], "LAYERS names modules that no longer exist"


def test_no_function_local_project_imports(edges):
    assert local_imports(edges) == [], (
        "import project modules at the top of the module (a function-local import hides a "
        "cycle or an upward import); only the CLI defers them"
    )


def test_architecture_doc_lists_the_layers():
    """docs/architecture.md's Layers section: one ``### layer`` heading per layer, in order,
    and one ``- `path` ...`` line per module of the table (a glob as its folder)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    doc: list[tuple[str, list[str]]] = []
    for line in section.splitlines():
        if line.startswith("### "):
            doc.append((line[4:].strip(), []))
        elif m := re.match(r"- `([^`]+)`", line):
            doc[-1][1].append(m.group(1))

    def path(module: str) -> str:
        if module.endswith(".*") or module == "training":
            return module.split(".")[0] + "/"
        if module == "smi_hub":
            return "smi_hub/__init__.py"
        return module.replace(".", "/") + ".py"

    table = [(name, list(dict.fromkeys(path(m) for m in mods))) for name, mods in LAYERS]
    assert doc == table


# --- the checker, on packages made here -------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, code in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    return root


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    root = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import g\n\ndef f():\n    return g()\n",
            "pkg/b.py": "def g():\n    from pkg import a\n    return a\n",
            "pkg/c.py": "import pkg.a\n",
        },
    )
    edges = import_graph(root, ("pkg",))
    assert sorted(edges) == [
        Edge("pkg.a", "pkg.b", 1, None),
        Edge("pkg.b", "pkg.a", 2, "g"),
        Edge("pkg.c", "pkg.a", 1, None),
    ]
    assert find_cycles(edges) == [["pkg.a", "pkg.b"]]
    assert local_imports(edges, allowed={}) == ["pkg.b:2 in g() imports pkg.a"]
    assert local_imports(edges, allowed={"pkg.b": "deferred"}) == []


def test_checker_finds_a_longer_cycle_through_relative_imports(tmp_path):
    root = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from .x import X\n",
            "pkg/x.py": "from . import y\nX = 1\n",
            "pkg/y.py": "from .sub.z import Z\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/z.py": "from ..x import X as Z\n",
            "pkg/ok.py": "import os\nimport pkg.sub\n",
        },
    )
    edges = import_graph(root, ("pkg",))
    assert find_cycles(edges) == [["pkg.sub.z", "pkg.x", "pkg.y"]]
    assert Edge("pkg.ok", "pkg.sub", 2, None) in edges  # and nothing for os


def test_checker_finds_an_upward_import_and_accepts_a_clean_package(tmp_path):
    root = _package(
        tmp_path,
        {
            "low.py": "import json\n",
            "mid.py": "import low\n",
            "high.py": "import mid\nimport low\n",
        },
    )
    layers = [("bottom", ("low",)), ("middle", ("mid",)), ("top", ("high",))]
    edges = import_graph(root, ("low", "mid", "high"))
    assert find_cycles(edges) == [] and upward_imports(edges, layers) == []
    (root / "low.py").write_text("def helper():\n    import high\n")
    edges = import_graph(root, ("low", "mid", "high"))
    assert upward_imports(edges, layers) == ["low:2 (bottom) imports high (top)"]
    assert find_cycles(edges) == [["high", "low", "mid"]]
    assert layer_of("other", layers) is None
