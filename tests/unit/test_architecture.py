"""The domain core stays free of orchestration and its import graph has no circle: no prefect in
lora_tasks, ray only in the launcher pair, and no module importing one that imports it back."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lora_tasks"
IMPORT = r"^\s*(import|from)\s+{}\b"


def _importers(module: str) -> list[str]:
    return sorted(p.name for p in PKG.glob("*.py") if re.search(IMPORT.format(module), p.read_text(), re.M))


def _imports_graph() -> dict[str, set[str]]:
    """lora_tasks module -> the lora_tasks modules it imports anywhere (top level or in a function)."""
    modules = {p.stem for p in PKG.glob("*.py")}
    graph = {m: set() for m in modules}
    for m in modules:
        for node in ast.walk(ast.parse((PKG / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_tasks"):
                names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("lora_tasks.")]
            else:
                continue
            graph[m] |= {n for n in names if n in modules and n != m}
    return graph


def test_lora_tasks_never_imports_prefect():
    assert _importers("prefect") == []


def test_only_the_launcher_pair_imports_ray():
    """`launcher.py` decides how data and work reach the workers; `distributed.py`, which it calls,
    is the only module that touches Ray."""
    assert _importers("ray") == ["distributed.py"]


def test_no_import_circle_inside_lora_tasks():
    graph = _imports_graph()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    circles = sorted(m for m in graph if m in reaches(m))
    assert circles == [], f"modules on an import circle: {circles}"
