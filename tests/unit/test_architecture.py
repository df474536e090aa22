"""The domain core stays free of orchestration: no prefect in lora_tasks, ray only in the launcher."""

import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lora_tasks"
IMPORT = r"^\s*(import|from)\s+{}\b"


def _importers(module: str) -> list[str]:
    return sorted(p.name for p in PKG.glob("*.py") if re.search(IMPORT.format(module), p.read_text(), re.M))


def test_lora_tasks_never_imports_prefect():
    assert _importers("prefect") == []


def test_only_the_launcher_imports_ray():
    assert _importers("ray") == ["distributed.py"]
