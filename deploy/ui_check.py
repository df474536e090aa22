"""What a user sees in the MLflow UI (and the Prefect UI), checked in a real browser: starts `mlflow ui` on a store,
opens a registered model's champion in headless Chromium (Debian's `chromium` driven by
Playwright) at 1440x900 and asserts that the runs list names the run for its decision and shows
its headline figures, that the run's first chart is its loss curve, that its datasets, the
report's images, the `champion` alias, the logged model's description and datasets and the links
between version, run and logged model are on screen. Saves a screenshot of each page (docs/ uses
them). With `--prefect-ui`, also opens the champion's flow run in the Prefect UI: its outcome on
the runs list, its training and evaluation progress in its logs.

    python -m deploy.ui_check --tracking-uri sqlite:///.prefect-lora/mlflow.db --model demo-orders --out docs/ \
        [--prefect-ui http://127.0.0.1:4200]

Exit 0 when every check passed; otherwise each failed check is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect_lora.deploy.testing import free_port
from prefect_lora.lora_tasks.registry.tracking import RUNS_VIEW

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """A Chromium binary on PATH (Debian: `apt-get install chromium`), or None."""
    return next((p for p in map(shutil.which, CHROMIUM) if p), None)


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, port: int | None = None):
    """`mlflow ui` on `tracking_uri` (this environment's mlflow), yielding its base URL."""
    import httpx

    port = port or free_port()
    # One worker: a page check needs no more, and each of the default four took start-up time.
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", tracking_uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # a machine under load took over 90 s to start it
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui on {tracking_uri} did not start (exit code {proc.poll()})")
            time.sleep(0.5)
        yield url
    finally:  # the whole group: `mlflow ui` stopped alone took 5 s and left its server's workers 5 s more
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        _signal_group(proc, signal.SIGKILL)  # what is left of it


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@dataclass
class Findings:
    """What each page showed: `passed` and `failed` checks by name, and the screenshots saved."""

    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        (self.passed if ok else self.failed).append(what)


def _targets(tracking_uri: str, model: str) -> dict:
    """The champion's version, run, experiment and logged model ids."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    mv = c.get_model_version_by_alias(model, "champion")
    run = c.get_run(mv.run_id)
    model_id = mv.model_id or (mv.source.removeprefix("models:/") if mv.source.startswith("models:/m-") else None)
    return {"version": str(mv.version), "run": mv.run_id, "experiment": run.info.experiment_id, "model_id": model_id,
            "flow_run": run.data.tags.get("prefect.flow_run_id")}


def check_mlflow_ui(tracking_uri: str, model: str, out_dir: str | Path, chromium: str | None = None) -> Findings:
    """Open the champion of `model` in the MLflow UI and check what a user must see (module doc)."""
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if not chromium:
        raise RuntimeError("no Chromium found: apt-get install chromium (Debian) or set --chromium")
    t, found, out = _targets(tracking_uri, model), Findings(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exp, run, version = t["experiment"], t["run"], t["version"]
    with mlflow_ui(tracking_uri) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})

        def visit(route: str, ready: str | None = None, ready_css: str | None = None) -> str:
            """Open `route` and wait until the text `ready` (or an element matching `ready_css`) is shown."""
            sep = "&" if "?" in route else "?"  # every page in the model training view, not GenAI's
            page.goto(f"{url}/#/{route}{sep}workflowType=machine_learning")
            with contextlib.suppress(Exception):  # a missing element is a failed check below, not a crash
                (page.locator(ready_css) if ready_css else page.get_by_text(ready, exact=False)).first.wait_for(timeout=30_000)
            with contextlib.suppress(Exception):  # the MLflow Assistant panel hides a third of the page
                page.get_by_role("button", name="Close").last.click(timeout=1_000)
            page.wait_for_timeout(1500)  # charts and images settle
            return page.inner_text("body")

        def shot(name: str) -> None:
            page.screenshot(path=str(out / name))
            found.screenshots.append(out / name)

        _check_runs_list(visit(f"experiments/{exp}/runs?viewStateShareKey={RUNS_VIEW}", "promotion.decision"),
                         found, model, version)
        shot("mlflow-runs.png")
        _check_version_page(visit(f"models/{model}/versions/{version}", "champion"), page, found, run, version)
        shot("mlflow-version.png")
        text = visit(f"experiments/{exp}/runs/{run}", "Datasets")
        found.check(page.locator(f"a[href*='/models/{model}/versions/{version}']").count() > 0,
                    "run overview links the registered version")
        shot("mlflow-run-overview.png")
        more = page.get_by_text("+1", exact=True)  # the overview shows one dataset and "+1" (so do its models)
        for i in range(more.count()):
            if f"{model}-eval" in text:
                break
            with contextlib.suppress(Exception):
                more.nth(i).click(timeout=2_000)
                page.wait_for_timeout(1000)
                text = page.inner_text("body")
        found.check(f"{model}-train" in text and f"{model}-eval" in text, "run overview lists the train and eval datasets")
        _check_charts_and_report(page, visit, shot, found, f"experiments/{exp}/runs/{run}")
        if t["model_id"]:
            version_link = f"a[href*='/models/{model}/versions/{version}']"
            text = visit(f"experiments/{exp}/models/{t['model_id']}", ready_css=version_link)
            found.check(page.locator(version_link).count() > 0,
                        "the logged model links its registered version")
            found.check(f"LoRA adapter of {model}" in text and f"Version {version}: Promoted" in text,
                        "the logged model is described: base, task, decision")
            found.check(f"{model}-train" in text and f"{model}-eval" in text, "the logged model names its datasets")
            shot("mlflow-logged-model.png")
        browser.close()
    return found


def _check_runs_list(text: str, found: Findings, model: str, version: str) -> None:
    """The runs list in the pipeline's saved view: the run named for its decision, the decision
    and the gain with its interval as columns."""
    found.check(f"{model} v{version} promoted" in text, "the runs list names the run for its version and decision")
    columns = ("promotion.decision", "task_gain", "task_gain_ci_low", "task_gain_ci_high")
    found.check(all(f"\n{c}\n" in text for c in columns), f"the runs list shows the columns {', '.join(columns)}")


def _check_charts_and_report(page, visit, shot, found: Findings, run_route: str) -> None:
    """The run's charts (the loss curve first, on the first screen; the headline figures after)
    and its HTML report with its plots."""
    text = visit(f"{run_route}/model-metrics", "Model metrics")
    lines = [line.strip() for line in text.split("Auto-refresh", 1)[-1].splitlines() if line.strip()]
    first = (lines[0], lines[lines.index("Add chart") + 1]) if "Add chart" in lines else tuple(lines[:1])
    found.check(first == ("train", "loss"), f"the first chart is the loss curve (section, chart: {first})")
    with contextlib.suppress(Exception):  # the chart draws after the page's text (late on a loaded machine)
        page.locator("canvas, svg.main-svg").first.wait_for(timeout=60_000)
    box = page.get_by_text("loss", exact=True).first.bounding_box()
    found.check(bool(box) and box["y"] + 300 < 900 and page.locator("canvas, svg.main-svg").count() > 0,
                "the loss curve is drawn within the first screen")
    found.check("Model metrics" in text and "eval/" not in text and "gate/" not in text,
                "no section of one-bar charts per prefix: the headline figures follow the curve")
    shot("mlflow-run-charts.png")
    visit(f"{run_route}/artifactPath/reports/evaluation_report.html", "evaluation_report.html")

    def drawn() -> int:
        return sum(f.evaluate("() => [...document.images].filter(i => i.complete && i.naturalWidth > 300).length")
                   for f in page.frames[1:])

    loaded = 0
    for _ in range(60):  # the report renders in its own frame: up to 60 s on a loaded machine
        page.wait_for_timeout(1000)
        with contextlib.suppress(Exception):  # (a frame replaced while it is read)
            loaded = drawn()
        if loaded >= 2:
            break
    found.check(loaded >= 2, f"the report shows its plots ({loaded} images drawn)")
    for frame in page.frames[1:]:  # the screenshot shows the plots, not only the summary above them
        with contextlib.suppress(Exception):
            frame.get_by_role("heading", name="Plots").scroll_into_view_if_needed(timeout=2_000)
    shot("mlflow-report.png")


def check_prefect_ui(ui_url: str, flow_run_id: str, out_dir: str | Path, chromium: str | None = None) -> Findings:
    """Open a retraining flow run in the Prefect UI (a `prefect server start` with its UI at
    `ui_url`) and check what an operator must see: on the runs list, the run's outcome (decision,
    gain) without opening it; on its page, the training and evaluation progress in its logs."""
    import httpx
    from playwright.sync_api import sync_playwright

    chromium = chromium or find_chromium()
    if not chromium:
        raise RuntimeError("no Chromium found: apt-get install chromium (Debian) or set --chromium")
    run = httpx.get(f"{ui_url}/api/flow_runs/{flow_run_id}", timeout=30).json()
    found, out = Findings(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outcome = run["name"].partition(" — ")[2].split(":")[0]  # "v1 promoted": a finished run's name carries it
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"{ui_url}/runs")
        with contextlib.suppress(Exception):
            page.get_by_text(outcome, exact=False).first.wait_for(timeout=30_000)
        text = page.inner_text("body")
        found.check(bool(outcome) and "[" in run["name"] and run["name"] in text,
                    f"the runs list shows the run's outcome: {run['name']!r}")
        page.screenshot(path=str(out / "prefect-runs.png"))
        found.screenshots.append(out / "prefect-runs.png")
        page.goto(f"{ui_url}/runs/flow-run/{flow_run_id}")
        with contextlib.suppress(Exception):
            page.get_by_text("training step", exact=False).first.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        text = page.inner_text("body")
        found.check(text.count("training step") >= 2, "the flow run's logs show the training progress")
        found.check("evaluated on" in text, "the flow run's logs show the evaluation")
        with contextlib.suppress(Exception):  # the screenshot shows the training lines
            page.get_by_text("training step", exact=False).first.scroll_into_view_if_needed(timeout=2_000)
        page.screenshot(path=str(out / "prefect-flow-run.png"))
        found.screenshots.append(out / "prefect-flow-run.png")
        browser.close()
    return found


def _check_version_page(text: str, page, found: Findings, run: str, version: str) -> None:
    found.check("champion" in text, f"version {version} page shows the champion alias")
    found.check(page.locator(f"a[href*='{run}']").count() > 0, "the version page links its run")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--model", required=True, help="registered model whose champion is checked")
    p.add_argument("--out", default="ui-screenshots", help="folder for the screenshots")
    p.add_argument("--chromium", default=None, help="Chromium binary (default: found on PATH)")
    p.add_argument("--prefect-ui", default=None, help="also check the champion's flow run in this Prefect UI "
                                                        "(e.g. http://127.0.0.1:4200, from `prefect server start`)")
    args = p.parse_args(argv)
    found = check_mlflow_ui(args.tracking_uri, args.model, args.out, args.chromium)
    if args.prefect_ui:
        flow_run = _targets(args.tracking_uri, args.model)["flow_run"]
        prefect = check_prefect_ui(args.prefect_ui.rstrip("/"), flow_run, args.out, args.chromium)
        found.passed += prefect.passed
        found.failed += prefect.failed
        found.screenshots += prefect.screenshots
    for what in found.passed:
        print(f"ok    {what}")
    for what in found.failed:
        print(f"FAIL  {what}")
    print("screenshots: " + ", ".join(str(s) for s in found.screenshots))
    return 1 if found.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
