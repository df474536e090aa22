"""`prefect-lora`: run the retraining flow, or only check a config and its data."""

from __future__ import annotations

from flows import settings  # noqa: F401  (quiet defaults first)

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from lora_tasks.errors import LoraTaskError, ValidationFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LoRA retraining pipelines on Prefect, Ray Train and MLflow.")
console = Console(stderr=True)
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: key.path=value (repeatable).")]


def _fail(exc: Exception, code: int = 1) -> None:
    if isinstance(exc, ValidationFailed) and exc.report is not None:
        Console().print(Markdown(exc.report.to_markdown(50)))
    console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    raise typer.Exit(code)


@app.command()
def validate(config: Path, set_: SetOption = None) -> None:
    """Check CONFIG and its data against the contract; print the report. Trains nothing."""
    from lora_tasks.config import load_config
    from lora_tasks.pipeline import prepare_data

    try:
        cfg = load_config(config, set_)
        out = Path(cfg.scaling.storage_path) / cfg.model_name / "validate"
        data = prepare_data(cfg, out)
    except ValidationFailed as exc:
        _fail(exc, 2)
    except LoraTaskError as exc:
        _fail(exc)
    Console().print(Markdown(data.report.to_markdown()))
    console.print(f"[green]ok[/]: {len(data.train_rows)} train and {len(data.eval_rows)} eval rows valid; "
                  f"fingerprint {data.fingerprint[:16]}")


@app.command()
def run(config: Path, set_: SetOption = None) -> None:
    """Run the retraining flow for CONFIG: validate, train, evaluate, register, gate."""
    from lora_tasks.config import load_config

    try:
        load_config(config, set_)  # config errors before any engine starts
        from flows.retrain import retrain
        from flows.settings import hide_expected_tracebacks

        hide_expected_tracebacks()
        result = retrain(str(config), set_ or [])
    except ValidationFailed as exc:
        _fail(exc, 2)
    except LoraTaskError as exc:
        _fail(exc)
    _print_summary(result)


demo_app = typer.Typer(no_args_is_help=True, help="The offline demo: SmolLM2 learns customer messages -> JSON.")
app.add_typer(demo_app, name="demo")


@demo_app.command("prepare")
def demo_prepare(
    data_dir: Annotated[Path, typer.Option(help="Where train.jsonl and eval.jsonl go.")] = Path(".prefect-lora/demo/data"),
    rows: Annotated[int, typer.Option(help="Training rows to generate.")] = 2000,
    eval_rows: Annotated[int, typer.Option(help="Eval rows to generate.")] = 200,
) -> None:
    """Materialise the demo models once (GGUF -> safetensors) and write the demo data."""
    from lora_tasks.demo import write_demo_data
    from lora_tasks.modeling import resolve_base_model

    try:
        for name in ("builtin:smollm2-135m-instruct", "builtin:all-minilm-l6-v2"):
            console.print(f"{name} -> {resolve_base_model(name)}", highlight=False, soft_wrap=True)
    except LoraTaskError as exc:
        _fail(exc)
    train, eval_ = write_demo_data(data_dir, rows, eval_rows)
    console.print(f"demo data: {train} ({rows} rows), {eval_} ({eval_rows} rows)", highlight=False, soft_wrap=True)


def _print_summary(result: dict) -> None:
    m = result["metrics"]
    table = Table(title=f"{result['model_name']} version {result['version']}")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("adapted", justify="right")
    for key in sorted(k.removeprefix("adapted_") for k in m if k.startswith("adapted_")):
        table.add_row(key, f"{m.get('base_' + key, float('nan')):.4g}", f"{m['adapted_' + key]:.4g}")
    for key in sorted(k for k in m if k.startswith("reference_")):
        table.add_row(key, "", f"{m[key]:.4g}")
    out = Console()
    out.print(table)
    verdict = "[green]promoted to champion[/]" if result["promoted"] else "[yellow]not promoted[/]"
    out.print(f"decision: {verdict}")
    for reason in result["reasons"]:
        out.print(f"  - {reason}", highlight=False)
    out.print(f"MLflow run {result['run_id']}; run folder {result['run_dir']}", highlight=False, soft_wrap=True)
    out.print(f"open the UI: mlflow ui --backend-store-uri {result['tracking_uri']}", highlight=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
