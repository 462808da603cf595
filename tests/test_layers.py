"""The package's layers: no module imports from a layer above its own, and no import cycle anywhere.

Imports are read with `ast` from every module of `src/mmcompose`, function-level imports included (a
deferred import still makes a cycle; it only hides it until run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mmcompose"

# Lowest first. A module may import from its own layer and the layers below; a new subpackage or top-level
# module must be placed here. `checkpoint` is the public face of a format `model` itself reads and writes.
LAYERS: list[set[str]] = [
    {"__init__", "__main__", "errors"},
    {"files", "tensorfiles", "io"},
    {"modalities"},
    {"model"},
    {"checkpoint", "data"},
    {"compose", "importers"},
    {"eval", "world"},
    {"train"},
    {"chat", "experiment", "serve"},
    {"cli"},
]


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The `mmcompose` modules `path` imports anywhere in its body (`from a import b` counts as `a.b` when
    `b` is a module, else as `a`). Imports under `if TYPE_CHECKING:` never run, so they are not counted."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(node) for block in ast.walk(tree)
                 if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                 for statement in block.body for node in ast.walk(statement)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def _graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {_module_name(path, root): path for path in root.rglob("*.py")}
    return {name: _imports(path, set(paths), root) for name, path in paths.items()}


def _unit(module: str) -> str:
    """The subpackage or top-level module `module` belongs to (`__init__` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer_of(module: str) -> int:
    unit = _unit(module)
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"{module}: {unit!r} is in no layer; add it to LAYERS in {Path(__file__).name}")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `a -> ... -> a`, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child):], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = [f"{module} (layer {_layer_of(module)}) imports {target} (layer {_layer_of(target)})"
              for module, targets in sorted(_graph().items()) for target in sorted(targets)
              if _layer_of(target) > _layer_of(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycle_between_subpackages() -> None:
    """Stricter than modules: `checkpoint.store -> model.mllm -> checkpoint.fingerprint` is no module cycle,
    but it ties the two packages together (neither can be understood or tested without the other)."""
    units: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    cycle = _cycle(units)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert _cycle(graph) == expected


def test_function_level_and_relative_imports_count(tmp_path: Path) -> None:
    root = tmp_path / "mmcompose"
    (root / "model").mkdir(parents=True)
    (root / "checkpoint").mkdir()
    for name in ("__init__.py", "model/__init__.py", "checkpoint/__init__.py", "model/spec.py"):
        (root / name).write_text("")
    (root / "model" / "mllm.py").write_text("from . import spec\n\ndef f():\n"
                                            "    from mmcompose.checkpoint import fingerprint_base\n")
    (root / "checkpoint" / "store.py").write_text("import mmcompose.model.mllm\n")
    graph = _graph(root)
    assert graph["mmcompose.model.mllm"] == {"mmcompose.model.spec", "mmcompose.checkpoint"}
    assert graph["mmcompose.checkpoint.store"] == {"mmcompose.model.mllm"}
