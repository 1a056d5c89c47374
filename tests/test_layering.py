"""The package's import graph, read from the source with `ast` (nothing is imported): no cycles between
modules, lower subpackages never import higher ones, argparse only in the command layer, and one
module owning `torch.distributed`.

Every import counts: top-level, inside functions, and under `if TYPE_CHECKING:` (a type-only import is
still a dependency a reader has to follow). Relative imports are resolved against the importing module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "glmkit"

# Lower never imports higher; names on one level may import each other (the cycle check still applies).
LAYERS = [("errors", "batch"), ("data",), ("model",), ("checkpoint",), ("infer",), ("chat",), ("train",),
          ("eval",), ("serve",), ("bench",), ("cli",)]
RANK = {name: i for i, level in enumerate(LAYERS) for name in level}
# The package root (its docstring and __version__) and `python -m glmkit` sit outside the layers: any
# module may read glmkit.__version__, and the root may re-export. The cycle check still covers them.
EXEMPT = {"glmkit", "glmkit.__main__"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE, modules: set[str] | None = None) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, wherever it sits.

    `from P import x` imports the module P.x when there is one (a sibling module: the edge goes to it,
    not to P's __init__, which every import of a submodule runs anyway), else the name x of P. Without
    `modules` to tell the two apart, both P.x and P are listed."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if modules is None:
                    out += [(sub, node.lineno), (base, node.lineno)]
                else:
                    out.append((sub if sub in modules else base, node.lineno))
    return out


def graph() -> dict[str, dict[str, int]]:
    """module -> {glmkit module it imports: line}, for every module under glmkit/."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges: dict[str, dict[str, int]] = {}
    for f in files:
        src = module_name(f)
        for target, line in imports_of(f, modules=modules):
            if target in modules and target != src:
                edges.setdefault(src, {}).setdefault(target, line)
        edges.setdefault(src, {})
    return edges


def subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _where(module: str) -> str:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    return str(path.relative_to(PACKAGE.parent)) if path.exists() else module.replace(".", "/") + "/__init__.py"


def test_the_graph_is_read():
    """The reader sees real edges of every kind (top-level, function-level, relative), so the checks
    below cannot pass by reading nothing."""
    edges = graph()
    assert "glmkit.errors" in edges["glmkit.data.spans"]
    assert "glmkit.model.glm" in edges["glmkit.train.setup"]
    assert len(edges) >= 30 and sum(map(len, edges.values())) >= 60


def test_no_import_cycles():
    edges = graph()
    found = cycles(edges)
    lines = []
    for comp in found:
        members = set(comp)
        lines += [f"  {a} ({_where(a)}:{edges[a][b]}) -> {b}" for a in comp for b in sorted(edges[a]) if b in members]
    assert not found, "import cycles:\n" + "\n".join(lines)


def test_lower_subpackages_never_import_higher_ones():
    bad = []
    for src, targets in graph().items():
        if src in EXEMPT:
            continue
        for dst, line in targets.items():
            if dst in EXEMPT:
                continue
            a, b = subpackage(src), subpackage(dst)
            assert a in RANK and b in RANK, f"{src} or {dst} is in no layer; add it to LAYERS in {__file__}"
            if RANK[b] > RANK[a]:
                bad.append(f"  {src} ({_where(src)}:{line}) -> {dst}")
    order = " < ".join(", ".join(level) for level in LAYERS)
    assert not bad, f"imports against the layer order {order}:\n" + "\n".join(sorted(bad))


def _importers(prefix: str) -> list[tuple[str, int]]:
    """Modules (with the line) that import `prefix` or anything under it."""
    out = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for target, line in imports_of(f):
            if target == prefix or target.startswith(prefix + "."):
                out.append((module_name(f), line))
                break
    return out


def test_argparse_only_in_the_command_layer():
    bad = [f"  {m} ({_where(m)}:{line})" for m, line in _importers("argparse") if subpackage(m) != "cli"]
    assert not bad, "argparse imported outside glmkit/cli/:\n" + "\n".join(bad)


def test_one_module_imports_torch_distributed():
    bad = [f"  {m} ({_where(m)}:{line})" for m, line in _importers("torch.distributed")
           if m != "glmkit.train.distributed"]
    assert not bad, "torch.distributed imported outside glmkit/train/distributed.py:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("import torch.distributed as dist", "torch.distributed"),
    ("from torch import distributed", "torch.distributed"),
    ("def f():\n    from torch.distributed.fsdp import fully_shard", "torch.distributed.fsdp"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import argparse", "argparse"),
    ("from . import objectives", "glmkit.data.objectives"),
    ("from ..model.glm import GLM", "glmkit.model.glm"),
])
def test_the_reader_finds_imports_anywhere(tmp_path, source, expected):
    (tmp_path / "glmkit" / "data").mkdir(parents=True)
    path = tmp_path / "glmkit" / "data" / "spans.py"
    path.write_text(source + "\n")
    assert expected in [t for t, _ in imports_of(path, tmp_path / "glmkit")]


def test_importing_a_sibling_module_from_the_package_is_an_edge_to_the_module(tmp_path):
    """`from glmkit.chat import glm4` in glmkit/chat/render.py depends on glm4, not on chat/__init__;
    `from glmkit.chat import render_chat` (a name the __init__ defines) depends on the __init__."""
    pkg = tmp_path / "glmkit" / "chat"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from glmkit.chat.render import render_chat\n")
    (pkg / "glm4.py").write_text("")
    (pkg / "render.py").write_text("from glmkit.chat import glm4\n\ndef render_chat():\n    pass\n")
    (pkg / "cli.py").write_text("from glmkit.chat import render_chat\n")
    modules = {"glmkit.chat", "glmkit.chat.glm4", "glmkit.chat.render", "glmkit.chat.cli"}
    root = tmp_path / "glmkit"
    assert imports_of(pkg / "render.py", root, modules) == [("glmkit.chat.glm4", 1)]
    assert imports_of(pkg / "cli.py", root, modules) == [("glmkit.chat", 1)]


def test_cycles_are_found_and_reported_whole():
    edges = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"d": 1}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
