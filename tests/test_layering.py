"""lmkit's packages import downward only: a test walks every import and fails on a cycle.

DESIGN.md: cli -> export/analysis/evaluation/training -> models/data -> monitor/config
-> events/errors. Function-level (lazy) imports count too: a lazy import still ties the
two packages together. The unit is a subpackage (``lmkit.training``) or a top-level module
(``lmkit.config``); ``lmkit/__init__.py`` only holds the version.
"""

import ast
from pathlib import Path

import lmkit

ROOT = Path(lmkit.__file__).parent


def unit_of(module: str) -> str | None:
    """``lmkit.training.loop`` -> ``training``; ``lmkit.config`` -> ``config``; else None."""
    parts = module.split(".")
    if parts[0] != "lmkit" or len(parts) < 2:
        return None
    if not ((ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").exists()):
        return None  # a name defined in lmkit/__init__.py (the version)
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> ["file:line", ...] for every import between two units."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        source = unit_of(name)
        if source is None:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    targets = [".".join([*base, node.module] if node.module else base)]
                elif node.module:
                    targets = [node.module]
                if node.module == "lmkit" or (node.level and not node.module):
                    targets = [f"{targets[0]}.{a.name}" for a in node.names]
            for target in targets:
                unit = unit_of(target)
                if unit is not None and unit != source:
                    graph.setdefault(source, {}).setdefault(unit, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_real_imports_and_reports_a_planted_cycle():
    graph = import_graph()
    assert "models" in graph["training"] and "training" in graph["cli"]  # it reads the tree
    planted = {k: dict(v) for k, v in graph.items()}
    planted.setdefault("events", {})["cli"] = ["planted"]
    assert find_cycle(planted) is not None


def test_no_import_cycle_between_lmkit_packages():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        where = "; ".join(f"{a} -> {b} at {', '.join(graph[a][b][:3])}" for a, b in zip(cycle, cycle[1:], strict=False))
        raise AssertionError(f"import cycle {' -> '.join(cycle)}: {where}")


def test_the_low_layers_import_nothing_above_them():
    graph = import_graph()
    bottom = {"errors", "events", "numbers"}
    low = {"events": set(), "errors": set(), "numbers": set(), "config": set(), "device": {"config"},
           "monitor": {"config"}}
    for unit, allowed in low.items():
        above = set(graph.get(unit, {})) - allowed - bottom
        assert not above, f"lmkit.{unit} imports {sorted(above)}"
