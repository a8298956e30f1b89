"""The package's structure, read from its import statements: no circle between its rooms
(top-level modules and subpackages), data flowing one way (data -> models -> losses ->
engine -> evaluation), and kernels importing nothing from the package above them.

Imports under `if TYPE_CHECKING:` are types for the reader and the type checker, not
edges that run, and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOW = ("data", "models", "losses", "engine", "evaluation")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] == "kernels":  # installed as jrcl_fast.kernels
        parts = ("jrcl_fast", *parts)
    return ".".join(p for p in parts if p != "__init__")


def _imported(tree: ast.AST) -> list[str]:
    """Absolute module names imported anywhere in the tree but inside `if TYPE_CHECKING:`."""
    if isinstance(tree, ast.If) and getattr(tree.test, "id", None) == "TYPE_CHECKING":
        return [name for child in tree.orelse for name in _imported(child)]
    if isinstance(tree, ast.Import):
        return [alias.name for alias in tree.names]
    if isinstance(tree, ast.ImportFrom) and tree.level == 0 and tree.module:
        return [tree.module] + [f"{tree.module}.{alias.name}" for alias in tree.names]
    return [name for child in ast.iter_child_nodes(tree) for name in _imported(child)]


def _room(module: str) -> str:
    """jrcl_fast.data.sets.adapters -> data; jrcl_fast.kernels.o2a -> kernels."""
    return module.split(".")[1] if "." in module else module


def room_edges() -> dict[str, set[str]]:
    rooms = {p.stem for p in (REPO / "jrcl_fast").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    rooms.add("kernels")
    edges: dict[str, set[str]] = {}
    for path in [*(REPO / "jrcl_fast").rglob("*.py"), *(REPO / "kernels").rglob("*.py")]:
        source = _room(_module_name(path))
        for name in _imported(ast.parse(path.read_text())):
            if name.startswith("jrcl_fast.") and _room(name) in rooms and _room(name) != source:
                edges.setdefault(source, set()).add(_room(name))
    return edges


def test_the_reader_sees_the_rooms_and_their_imports():
    """The graph the other tests read is the real one (a parser that found nothing would pass them)."""
    edges = room_edges()
    assert {"data", "losses", "registry"} <= edges["engine"] and "config" in edges["data"]
    assert "cli" in edges["__main__"] and "config_checks" in edges["config"]


def test_no_import_circle_between_rooms():
    edges, done, path = room_edges(), set(), []

    def visit(room: str) -> None:
        assert room not in path, f"import circle: {' -> '.join(path[path.index(room):] + [room])}"
        if room in done:
            return
        path.append(room)
        for target in sorted(edges.get(room, ())):
            visit(target)
        path.pop()
        done.add(room)

    for room in sorted(edges):
        visit(room)


def test_data_flows_one_way():
    back = [f"{source} -> {target}" for source, targets in room_edges().items() if source in FLOW
            for target in targets if target in FLOW and FLOW.index(target) > FLOW.index(source)]
    assert not back, f"imports running back up the flow {' -> '.join(FLOW)}: {back}"


def test_kernels_import_nothing_above_them():
    assert room_edges().get("kernels", set()) == set()
