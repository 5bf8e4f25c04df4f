"""The package's layers, read from its module-level imports (``make lint`` runs this file).

Allowed directions, bottom to top:

* ``factorize``: pure math on tensors; imports only ``factorize``.
* ``layers``: the blocks; import ``layers``, ``factorize`` and ``padding`` only.
* ``methods``: the plug-ins; import no orchestration (``decomposition``, ``pipeline``,
  ``finetune``) and no command line.
* the command line (the ``cli`` package: ``cli.common`` and one module per command) is on
  top: no library module imports it, and its command modules import ``cli.common``, not
  each other.
* no import cycle at module level anywhere (imports inside functions and under
  ``TYPE_CHECKING`` do not count: they run later, or never).
"""

from __future__ import annotations

import ast
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
CLI = {m for m in GRAPH if m == "bscompress.cli" or m.startswith("bscompress.cli.")}
COMMANDS = sorted(CLI - {"bscompress.cli", "bscompress.cli.common"})


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


def test_the_graph_is_read():
    assert "bscompress.cli.common" in GRAPH["bscompress.cli.decompose"]
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
                             "bscompress.padding")) == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith(
    "bscompress.methods")))
def test_methods_know_no_orchestration(module):
    banned = {"bscompress.decomposition", "bscompress.pipeline", "bscompress.finetune"} | CLI
    assert sorted(GRAPH[module] & banned) == []


def test_the_command_line_is_on_top():
    library = [m for m in GRAPH if m not in CLI and m != "bscompress.__main__"]
    assert [m for m in library if GRAPH[m] & CLI] == []
    for command in COMMANDS:
        assert GRAPH[command] & CLI == {"bscompress.cli.common"}, command
