"""The domain core's shape: stages that import only the stages before them, no circle, no prefect
in lora_tasks, ray only in the launcher pair, no module reaching into another's private names, and
one installed package, `prefect_lora`, whose import stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "lora_tasks"
STAGES = ["data", "training", "measurement", "gate", "registry"]
"""The pipeline's stages, in its order: a stage imports the foundation, itself and earlier stages."""
FOUNDATION = {"config", "config_io", "errors", "exports", "modeling", "secrets", "versions"}
"""What every stage reads: config types, errors, model loading. Imports no stage."""
CROSS_STAGE = {"fleet", "search", "warm"}
"""Runs that span the stages (a fleet's members, the remedy search's trials, warming the caches)."""


def _modules() -> dict[str, Path]:
    """Dotted names under lora_tasks (`gate.promotion`; a package's `__init__` as `gate`)."""
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """lora_tasks modules (dotted) that module `name` imports anywhere, top level or in a function."""
    path, out = MODULES[name], set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = package[: len(package) - (node.level - 1)]
        stem = ".".join([*base, *([node.module] if node.module else [])])
        for alias in node.names:
            full = f"{stem}.{alias.name}".strip(".")
            out.add(full if full in MODULES else stem)
    return {m for m in out if m in MODULES and m and m != name}


def _layer(module: str) -> str:
    head = module.split(".")[0]
    return head if head in STAGES else ("foundation" if head in FOUNDATION else "cross-stage")


def test_every_module_has_a_place():
    top = {m.split(".")[0] for m in MODULES if m}
    assert top <= set(STAGES) | FOUNDATION | CROSS_STAGE, top - set(STAGES) - FOUNDATION - CROSS_STAGE


def test_a_stage_imports_only_the_foundation_and_the_stages_before_it():
    upward = []
    for m in MODULES:
        layer = _layer(m)
        if not m or layer == "cross-stage":
            continue
        allowed = {"foundation"} if layer == "foundation" else {"foundation", *STAGES[: STAGES.index(layer) + 1]}
        upward += [f"{m} -> {t}" for t in _imports(m) if _layer(t) not in allowed]
    assert upward == []


def test_no_import_circle_inside_lora_tasks():
    graph = {m: {t for t in _imports(m) if not t.startswith(m + ".")} for m in MODULES if m}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen and m in graph:
                seen.add(m)
                todo += graph[m]
        return seen

    assert sorted(m for m in graph if m in reaches(m)) == []


def _sources_importing(top: str) -> list[str]:
    hits = []
    for name, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            if any(n.split(".")[0] == top for n in names):
                hits.append(name)
    return sorted(set(hits))


def test_lora_tasks_never_imports_prefect():
    assert _sources_importing("prefect") == []


def test_only_the_launcher_pair_imports_ray():
    """`training.launcher` decides how data and work reach the workers; `training.distributed`,
    which it calls, is the only module that touches Ray."""
    assert _sources_importing("ray") == ["training.distributed"]


def test_every_stage_names_its_public_face():
    import importlib

    for stage in STAGES:
        pkg = importlib.import_module(f"prefect_lora.lora_tasks.{stage}")
        assert pkg.__all__, stage
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, f"{stage}.{name}"


OURS = {"prefect_lora", "lora_tasks", "flows", "deploy"}


def test_no_module_imports_another_modules_private_names():
    crossing = []
    for folder in ("lora_tasks", "flows", "deploy", "bench", "prefect_lora"):
        for p in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                ours = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in OURS)
                if ours:
                    crossing += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                                 if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []


@pytest.mark.parametrize("module", ["prefect_lora.lora_tasks.gate.promotion", "prefect_lora.lora_tasks.data.validation"])
def test_the_domain_core_imports_without_prefect_ray_or_torch(module):
    """A pure function of the gate or the contract costs no orchestration, no Ray, no model code."""
    out = subprocess.run([sys.executable, "-c", f"import sys, {module}; "
                          "print(sorted(m for m in ('prefect', 'ray', 'torch') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_code_imports_the_installed_names_only():
    """`flows`, `deploy` and `lora_tasks` are folders of the checkout, installed as
    `prefect_lora.flows` etc.: an import by the folder's name works only from a checkout. The
    pyfunc model file is the one exception: MLflow loads it beside a copy of lora_tasks."""
    by_folder = []
    for folder in ("lora_tasks", "flows", "deploy", "bench", "tests", "prefect_lora"):
        for p in (ROOT / folder).rglob("*.py"):
            if p.name == "pyfunc_model.py":
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
                by_folder += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in OURS - {"prefect_lora"}]
    assert by_folder == []


def test_the_librarys_progress_lines_reach_the_flow_log_under_the_installed_name():
    import logging

    from prefect_lora.flows import settings
    from prefect_lora.lora_tasks.measurement import evaluation

    assert evaluation.log.getEffectiveLevel() == logging.INFO
    assert evaluation.log.name.startswith(settings.DEFAULTS["PREFECT_LOGGING_EXTRA_LOGGERS"] + "."), "Prefect forwards them"
