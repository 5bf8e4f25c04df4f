"""The package's layers, read from its module-level imports (``make lint`` runs this file).

The sub-packages, bottom to top (:data:`LAYERS`); a module imports from its own package and
the packages below it, never above:

* ``core``: errors, output files, the Plan and its records, counts, progress, padding,
  covariance statistics, layer surgery, the configuration schema.
* ``factorize``: pure math on tensors; imports only ``factorize``.
* ``layers``: the blocks; import ``layers``, ``factorize`` and ``core.padding`` only.
* ``methods``: the plug-ins (math + block + fits), no orchestration.
* ``data``: datasets and evaluation.
* ``analysis``: ``inspect`` and the kernels' analysis.
* ``deploy``: ONNX export, timing, the bench and its plots.
* ``compress``: statistics, fits, budget, guard, sequential and reconstruction.
* ``transforms``: fixed kernels (VGNet; matched on calibration statistics) and CondConv
  upcycling.
* ``io``: architecture specs, checkpoints, archives (which register the transforms'
  structures), trust.
* ``train``: fine-tuning.
* ``app``: the recipe pipeline and the command line (``app.cli``: ``cli.common`` and one
  module per command; the command modules import ``cli.common``, not each other).

The package root (the public API) and ``__main__`` stand above everything; ``_version`` is
at the bottom, the architectures (``demo``, ``models``) stand on ``layers``. No import
cycle at module level anywhere (imports inside functions and under ``TYPE_CHECKING`` do not
count: they run later, or never). The package root resolves its names lazily, so that
importing a low module does not load the layers above it.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "bscompress"


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield from (node.body if isinstance(node, (ast.If, ast.Try)) else [node])


def _graph() -> dict[str, set[str]]:
    modules = {_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in _module_level(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


GRAPH = _graph()
CLI = {m for m in GRAPH if m == "bscompress.app.cli" or m.startswith("bscompress.app.cli.")}
COMMANDS = sorted(CLI - {"bscompress.app.cli", "bscompress.app.cli.common"})

#: the sub-packages (and top-level modules), bottom to top
LAYERS = ("_version", "core", "factorize", "layers", "demo", "models", "methods", "data",
          "analysis", "deploy", "compress", "transforms", "io", "train", "app")
#: the public API and ``python -m``: on top
TOP = ("bscompress", "bscompress.__main__")


def layer(module: str) -> str:
    """The sub-package (or top-level module) ``module`` belongs to."""
    return module.split(".")[1]


def upward(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` that go up the layers, as ``"a -> b"``."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{a} -> {b}" for a, deps in graph.items() if a not in TOP
                  for b in deps if b not in TOP and rank[layer(b)] > rank[layer(a)])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    assert sorted({layer(m) for m in GRAPH if m not in TOP} - set(LAYERS)) == []


def test_no_import_goes_up_the_layers():
    assert upward(GRAPH) == []


def test_a_planted_upward_import_is_found():
    graph = {"bscompress.core.plan": {"bscompress.compress.guard"},
             "bscompress.compress.guard": {"bscompress.core.plan"}}
    assert upward(graph) == ["bscompress.core.plan -> bscompress.compress.guard"]


def test_the_graph_is_read():
    assert "bscompress.app.cli.common" in GRAPH["bscompress.app.cli.decompose"]
    assert len(COMMANDS) >= 8
    assert "bscompress.factorize.gsvd" in GRAPH["bscompress.methods.bsconv_u"]


def test_no_module_level_import_cycle():
    assert _cycles(GRAPH) == []


def test_a_planted_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _outside(module: str, allowed: tuple[str, ...]) -> list[str]:
    return sorted(d for d in GRAPH[module] if not d.startswith(allowed))


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith(
    "bscompress.factorize")))
def test_factorize_is_pure_math(module):
    assert _outside(module, ("bscompress.factorize",)) == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith(
    "bscompress.layers")))
def test_layers_stand_on_factorize_and_padding(module):
    assert _outside(module, ("bscompress.layers", "bscompress.factorize",
                             "bscompress.core.padding")) == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith(
    "bscompress.methods")))
def test_methods_know_no_orchestration(module):
    assert sorted(d for d in GRAPH[module] if layer(d) in ("compress", "train", "app")) == []


def test_the_command_line_is_on_top():
    library = [m for m in GRAPH if m not in CLI and m != "bscompress.__main__"]
    assert [m for m in library if GRAPH[m] & CLI] == []
    for command in COMMANDS:
        assert GRAPH[command] & CLI == {"bscompress.app.cli.common"}, command


def test_the_public_api_resolves_lazily():
    import bscompress

    assert set(bscompress.__all__) == set(bscompress._API) | {"__version__"}
    for name, module in bscompress._API.items():
        assert getattr(bscompress, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        bscompress.nothing  # noqa: B018


def test_reading_a_checkpoint_does_not_load_the_method_stack():
    code = ("import sys, bscompress.io.checkpoint, bscompress.io.arch; "
            "print(sorted(m for m in sys.modules if m.startswith(('bscompress.methods', "
            "'bscompress.compress', 'bscompress.layers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "[]"
