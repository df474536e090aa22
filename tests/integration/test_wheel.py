"""The built wheel installs one top-level package, `prefect_lora`, and nothing generic beside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_one_package_and_its_console_script(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = tmp_path.glob("prefect_lora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"prefect_lora", wheel.name.split("-py3")[0] + ".dist-info"}
    packages = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    assert {"prefect_lora", "prefect_lora/flows", "prefect_lora/deploy", "prefect_lora/lora_tasks",
            *(f"prefect_lora/lora_tasks/{s}" for s in ("data", "training", "measurement", "gate", "registry"))} == packages
    # every module of the checkout is in the wheel, under its installed name
    checkout = {f"prefect_lora/{p.relative_to(REPO).as_posix()}" for d in ("flows", "deploy", "lora_tasks")
                for p in (REPO / d).rglob("*.py")}
    assert checkout <= set(names), sorted(checkout - set(names))
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "prefect-lora = prefect_lora.flows.cli:main" in entry
