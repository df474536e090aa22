"""prefect-lora inside a typical Prefect project: the user's own `flows/` package beside ours, and
the README's example flow, as written, composing our tasks around a step of the user's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_fault_tolerance import tiny_raw

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    """The Python block of the README's section "In a flow of your own"."""
    section = (REPO / "README.md").read_text().split("### In a flow of your own", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_flow_runs_in_a_project_with_its_own_flows_package(tmp_path):
    from mlflow import MlflowClient

    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "__init__.py").write_text('"""The user\'s own flows."""\nOWNER = "user"\n')
    (project / "flows" / "nightly.py").write_text(readme_example())
    raw = tiny_raw(tmp_path, max_steps=40)
    raw["scaling"].update({"num_workers": 1, "launcher": "local"})
    config = project / "sums.yaml"
    config.write_text(yaml.safe_dump(raw))
    script = ("import flows, prefect_lora.flows\n"
              "from flows.nightly import nightly\n"
              "assert flows.OWNER == 'user' and prefect_lora.flows.__name__ == 'prefect_lora.flows'\n"
              f"print('promoted:', nightly({str(config)!r}, {str(tmp_path / 'export.jsonl')!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    promoted = done.stdout.strip().splitlines()[-1]

    uri = raw["tracking"]["tracking_uri"]
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("tiny-sums", "1")
    run = client.get_run(version.run_id)
    assert run.data.tags["lineage.data_fingerprint"] and run.info.status == "FINISHED"
    assert run.data.tags["promotion.decision"] == ("promoted" if promoted == "promoted: True" else "rejected")
    assert {"adapted_eval_loss", "task_gain"} <= set(run.data.metrics), sorted(run.data.metrics)
    assert (tmp_path / "export.jsonl").read_text().count("\n") == 400, "the user's step wrote the data the run read"
