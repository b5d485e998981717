"""The import graph of toco/, models/ and datasets/: no circle between modules, toco/'s layers
import only downwards, and evaluation never reaches the training modules.

Read from the source (ast), so imports inside functions count as much as those at the top;
imports under `if TYPE_CHECKING:` (annotations only) do not. `from pkg import name` is an edge
to `pkg.name` when that is a module of the project, else to `pkg` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toco", "models", "datasets")
EVALUATION = "toco.evaluation"

# toco/'s layers, lowest first: a module imports modules of its own layer or lower ones only
# (annotation-only imports aside). The ground floor is shared by models/, datasets/ and every
# layer; build.py turns a config into the model, its loss modules and the datasets.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "toco",
        "toco.errors",
        "toco.atomic",
        "toco.cli",
        "toco.distributed",
        "toco.runtime",
        "toco.schema",
        "toco.checkpoint",
        "toco.release",
        "toco.images",
        "toco.visualize",
    ),
    ("toco.method",),
    ("toco.plugins",),
    ("toco.config",),
    ("toco.build", "toco.convert", "toco.export"),
    ("toco.evaluation",),
    ("toco.predict",),
    ("toco.train",),
)


def layer_of(module: str) -> int | None:
    """The layer of a toco module (None outside toco/); a package's modules share its layer."""
    for rank, names in enumerate(LAYERS):
        if module in names or any(module.startswith(n + ".") for n in names if n != "toco"):
            return rank
    return None


def training_modules(graph: dict[str, set[str]]) -> frozenset[str]:
    return frozenset(m for m in graph if m == "toco.train" or m.startswith("toco.train."))


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(module: str, source: str, modules: set[str], is_package: bool) -> set[str]:
    """The project modules `source` (the text of `module`) imports, at any depth."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolved against the importing package
                    package = module if is_package else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                for alias in child.names:
                    name = f"{base}.{alias.name}"
                    found.add(name if name in modules else base)
            visit(child)

    visit(ast.parse(source))
    return {m for m in found if m in modules and m != module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    names = set(files)
    return {
        m: imported_modules(m, p.read_text(), names, p.name == "__init__.py")
        for m, p in files.items()
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def path_to(graph: dict[str, set[str]], start: str, targets: frozenset[str]) -> list[str]:
    """The shortest import chain from `start` to any of `targets` ([] when none is reached)."""
    previous: dict[str, str] = {start: ""}
    frontier = [start]
    while frontier:
        following = []
        for m in frontier:
            for w in sorted(graph.get(m, ())):
                if w in previous:
                    continue
                previous[w] = m
                if w in targets:
                    chain = [w]
                    while previous[chain[-1]]:
                        chain.append(previous[chain[-1]])
                    return chain[::-1]
                following.append(w)
        frontier = following
    return []


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_circle(graph):
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_toco_module_has_a_layer(graph):
    missing = [m for m in graph if m.startswith("toco") and layer_of(m) is None]
    assert not missing, f"modules outside LAYERS: {missing}"


def test_layers_import_only_downwards(graph):
    upward = [
        f"{m} -> {w}"
        for m in sorted(graph)
        for w in sorted(graph[m])
        if layer_of(m) is not None and layer_of(w) is not None and layer_of(w) > layer_of(m)
    ]
    assert not upward, "imports from a lower layer up: " + "; ".join(upward)


def test_evaluation_never_reaches_training(graph):
    training = training_modules(graph)
    chains = [
        path_to(graph, m, training)
        for m in sorted(graph)
        if m == EVALUATION or m.startswith(EVALUATION + ".")
    ]
    chains = [" -> ".join(c) for c in chains if c]
    assert not chains, "evaluation imports training: " + "; ".join(chains)


def test_the_walk_sees_every_kind_of_import(tmp_path):
    """The checks themselves: a planted circle through a function-level and a relative import
    is found, a TYPE_CHECKING import is not an edge, and the chain to training is named."""
    pkg = tmp_path / "toco"
    (pkg / "evaluation").mkdir(parents=True)
    for package in ("models", "datasets"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "evaluation" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from toco import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import toco.a\n"
    )
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "runner.py").write_text("")
    (pkg / "evaluation" / "run.py").write_text(
        "from ..c import x\nimport toco.b as b\ndef g():\n    import toco.train.runner\n"
    )
    planted = import_graph(tmp_path)
    assert planted["toco.a"] == {"toco.b"} and planted["toco.b"] == {"toco.a"}
    assert planted["toco.c"] == set()
    assert circles(planted) == [["toco.a", "toco.b"]]
    training = training_modules(planted)
    assert training == {"toco.train", "toco.train.runner"}
    assert path_to(planted, "toco.evaluation.run", training) == [
        "toco.evaluation.run",
        "toco.train.runner",
    ]
    assert path_to(planted, "toco.a", training) == []
    assert layer_of("toco.evaluation.run") > layer_of("toco.method.cam") > layer_of("toco.cli")
    assert layer_of("toco.a") is None and layer_of("models.network") is None
