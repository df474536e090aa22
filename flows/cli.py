"""`prefect-lora`: run the retraining flow, or only check a config and its data."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from prefect_lora.flows import settings  # noqa: F401  (quiet defaults first)
from prefect_lora.lora_tasks.errors import LoraTaskError, RegistryError, ValidationFailed
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from prefect_lora.lora_tasks.registry.lifecycle import RunResult

def _flag_type(option: typer.core.TyperOption, ctx) -> str | None:
    """A flag takes no value: its help shows no type (typer prints `<bool>`, as if one were typed)."""
    return None if option.is_flag else _typed(option, ctx)


_typed, typer.core.TyperOption.display_type_rich = typer.core.TyperOption.display_type_rich, _flag_type

app = typer.Typer(add_completion=False, no_args_is_help=True)
console = Console(stderr=True)
SetOption = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config key: key.path=value (repeatable).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for jq and scripts) instead of a table; an error "
                                                          'as {"error": MESSAGE, "kind": TYPE}.')]
ConfigArg = Annotated[Path, typer.Argument(metavar="CONFIG", help="The pipeline's YAML config.", show_default=False)]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Registered model.", show_default=False)]


def _show_version(value: bool) -> None:
    if value:
        from prefect_lora.lora_tasks import __version__

        typer.echo(f"prefect-lora {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """LoRA retraining pipelines on Prefect, Ray Train and MLflow.

    Exit codes: 0 done (promoted or not: the reasons are printed), 1 an error (one message; with
    --json, a JSON object on stdout too), 2 a usage error, 3 the data broke its contract (the report
    names each row and check), 143 / 130 stopped by SIGTERM / Ctrl-C (the MLflow run is marked
    KILLED; the same command resumes)."""


DATA_CONTRACT_BROKEN = 3


def _fail(exc: Exception, code: int = 1, as_json: bool = False) -> None:
    if as_json:
        _json_error(exc)
    if isinstance(exc, ValidationFailed) and exc.report is not None:
        Console().print(Markdown(exc.report.to_markdown(50)))
    console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)  # verbatim
    raise typer.Exit(code)


def _json_error(exc: Exception) -> None:
    """A failed `--json` command's stdout: one JSON object a script can read (`jq .error`)."""
    typer.echo(json.dumps({"error": str(exc), "kind": type(exc).__name__}))


def _exit_on_errors(*also: type[Exception]):
    """End a command on an error the user can act on with one message and an exit code, never a
    traceback: ValidationFailed exits 3 after its row-by-row report; LoraTaskError, a tracking
    server that does not answer, and the command's own `also` types, exit 1 (2 is Click's usage error).
    Under `--json` each failure also prints a JSON object on stdout (`_json_error`)."""
    def decorate(command):
        @functools.wraps(command)
        def run_command(*args, **kwargs):
            as_json = kwargs.get("as_json") is True
            try:
                return command(*args, **kwargs)
            except ValidationFailed as exc:
                _fail(exc, DATA_CONTRACT_BROKEN, as_json)
            except (LoraTaskError, *also) as exc:
                _fail(exc, as_json=as_json)
            except (typer.Exit, typer.Abort, typer.BadParameter):
                raise
            except Exception as exc:
                from prefect_lora.lora_tasks.registry.tracking import unreachable_server

                if (message := unreachable_server(exc)) is None:
                    if as_json:  # a bug's traceback still follows, on stderr
                        _json_error(exc)
                    raise
                _fail(RegistryError(message), as_json=as_json)

        return run_command

    return decorate


@app.command()
@_exit_on_errors()
def validate(config: ConfigArg, set_: SetOption = None) -> None:
    """Check CONFIG and its data against the contract; print the report. Trains nothing."""
    from prefect_lora.lora_tasks.config import load_config

    cfg = load_config(config, set_)  # a config error before torch and the data layer are imported
    from prefect_lora.lora_tasks.measurement import power
    from prefect_lora.lora_tasks.training.launcher import prepare_data

    data = prepare_data(cfg, _checks_dir(cfg))
    Console().print(Markdown(data.report.to_markdown()))
    console.print(f"[green]ok[/]: {data.train_count} train and {len(data.eval_rows)} eval rows valid; "
                  f"fingerprint {data.fingerprint[:16]}")
    checks = power.plan(cfg, len(data.eval_rows))
    console.print("\n".join(power.report(cfg, checks)), highlight=False, soft_wrap=True, markup=False)
    for warning in power.enforce(cfg, checks):
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def _checks_dir(cfg) -> Path:
    """Where `validate` and `warm` write the data contract's report (no run folder: nothing trains)."""
    return Path(cfg.scaling.storage_path) / cfg.model_name / "validate"


@app.command()
@_exit_on_errors()
def warm(config: ConfigArg, set_: SetOption = None) -> None:
    """Compute now what every run of CONFIG reads of the base model alone. Trains nothing.

    Its answers to the replay prompts and probes, its scores on the eval split and its side of the
    forgetting comparison are kept, so the first scheduled run costs what later ones do."""
    from prefect_lora.lora_tasks.config import load_config

    _warm(load_config(config, set_))


def _warm(cfg) -> None:
    import logging

    from prefect_lora.flows.settings import create_prefect_database_early
    from prefect_lora.lora_tasks.warm import warm_base

    console.print(f"{cfg.model_name}: the base's answers and scores, computed once for every later run ...",
                  highlight=False, soft_wrap=True)
    database_ready = create_prefect_database_early()  # not in the first run
    progress = logging.StreamHandler(sys.stderr)  # minutes on a small CPU: its progress lines (no Prefect here)
    progress.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("prefect_lora.lora_tasks").addHandler(progress)
    try:
        w = warm_base(cfg, _checks_dir(cfg))
    finally:
        logging.getLogger("prefect_lora.lora_tasks").removeHandler(progress)
        database_ready()
    scored = (f"{w.eval_rows} eval rows scored, task scores and forgetting states kept" if w.scores_kept else
              "no scores kept: a hub id at a branch or tag may change; pin base_model.revision to a commit to keep them")
    console.print(f"[green]ok[/]: {w.replay_prompts} replay prompts answered, {scored} ({w.seconds:.0f} s)",
                  highlight=False, soft_wrap=True)


@app.command()
@_exit_on_errors()
def run(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="The pipeline's YAML config, or block:NAME (a saved "
                                                                 "config block).", show_default=False)],
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even when data and config equal those of the champion "
                                                        "or of the latest version the gate decided.")] = False,
) -> None:
    """Run the retraining flow for CONFIG (a YAML file, or block:NAME): validate, train, evaluate, register, gate."""
    from prefect_lora.flows.blocks import block_name
    from prefect_lora.lora_tasks.config import load_config

    if block_name(str(config)) is None:  # a block is read by the flow
        load_config(config, set_)  # config errors before any engine starts
    from prefect_lora.flows.settings import hide_expected_tracebacks, start_prefect_api_early

    api_ready = start_prefect_api_early()
    from prefect_lora.flows.retrain import retrain

    hide_expected_tracebacks()
    api_ready()
    _print_summary(retrain(str(config), secrets_to_environment(set_ or []), force=force))


@app.command()
@_exit_on_errors()
def fleet(
    fleet_file: Annotated[Path, typer.Argument(metavar="FLEET", help="Fleet YAML: a shared `config` and its `members`.")],
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain members even when data and config equal those of "
                                                        "their champion or latest decided version.")] = False,
    member: Annotated[Optional[list[str]], typer.Option("--member", metavar="NAME", help="Run only this member (repeat it).")] = None,
) -> None:
    """Retrain every member of a fleet in one flow run; exit 1 when a member failed."""
    from prefect_lora.lora_tasks.fleet import SUMMARY_COLUMNS, load_fleet, only_members, summary_rows

    only_members(load_fleet(fleet_file, set_), member)  # the file's errors before any engine starts
    from prefect_lora.flows.settings import hide_expected_tracebacks, start_prefect_api_early

    api_ready = start_prefect_api_early()
    from prefect_lora.flows.fleet import retrain_fleet

    hide_expected_tracebacks()
    api_ready()
    outcomes = retrain_fleet(str(fleet_file), secrets_to_environment(set_ or []), force=force, members=member)
    table = Table(title=f"fleet {fleet_file.name}: {len(outcomes)} members")
    for c in SUMMARY_COLUMNS:
        table.add_column(c)
    for row in summary_rows(outcomes):
        table.add_row(*row)
    screen = Console()
    (screen if screen.is_terminal else Console(width=200)).print(table)  # piped or logged: no column cut
    if failed := [o.name for o in outcomes if o.decision == "failed"]:
        _fail(RuntimeError(f"{len(failed)} of {len(outcomes)} members failed: {', '.join(failed)} (the others ran)"))


@app.command()
@_exit_on_errors()
def watch(
    fleet_file: Annotated[Path, typer.Argument(metavar="FLEET", help="Fleet YAML whose members' data to look at.")],
) -> None:
    """Emit a data-changed event for each member of FLEET whose data changed since the last look.

    Looks at every member's data once (the first look only records it); a deployment trigger on the
    event retrains the member."""
    from prefect_lora.lora_tasks.fleet import load_fleet

    load_fleet(fleet_file)
    from prefect_lora.flows.settings import start_prefect_api_early

    api_ready = start_prefect_api_early()
    from prefect_lora.flows.fleet import watch_fleet

    api_ready()
    changed = watch_fleet(str(fleet_file))
    print(f"data changed: {', '.join(changed)}" if changed else "no member's data changed since the last look")


def secrets_to_environment(overrides: list[str]) -> list[str]:
    """`overrides` without `notifications.webhook_url`, whose value goes to the environment the
    in-process flow reads it from (`PREFECT_LORA_WEBHOOK_URL`): Prefect stores a flow's parameters
    and shows them in its UI, and a webhook URL often carries a token."""
    from prefect_lora.flows.notifications import WEBHOOK_ENV
    from prefect_lora.lora_tasks.config_io import parse_overrides

    kept = []
    for item, (keys, value) in zip(overrides, parse_overrides(overrides)):
        if keys == ["notifications", "webhook_url"] and value:
            os.environ[WEBHOOK_ENV] = str(value)
        else:
            kept.append(item)
    return kept


@app.command("compare-full")
@_exit_on_errors()
def compare_full(
    config: ConfigArg,
    set_: SetOption = None,
    full_lr: Annotated[Optional[float], typer.Option(help="Learning rate of full fine-tuning (default: the config's, usually too high for it; 2e-5 is usual).")] = None,
    eval_rows: Annotated[Optional[int], typer.Option(help="Score at most this many eval rows (default: all sampled).")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Memory, speed and size only: skip scoring gain and forgetting.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the JSON here (default: the run folder's compare_full.json).")] = None,
) -> None:
    """Train CONFIG with LoRA and with full fine-tuning; print both side by side.

    Same data and steps, in this process (no Ray, no MLflow): trainable parameters, training-state
    and peak memory, step time, artifact size, task gain and forgetting."""
    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.measurement.compare import compare_methods, format_table, to_json
    from prefect_lora.lora_tasks.training.launcher import prepare_data

    cfg = load_config(config, set_)
    folder = Path(cfg.scaling.storage_path) / cfg.model_name / "compare-full"
    data = prepare_data(cfg, folder / "data")
    if data.train_stream is not None:
        raise LoraTaskError("compare-full reads its rows in memory: set data.loader: memory for it")
    rows = data.eval_rows[:eval_rows] if eval_rows else data.eval_rows
    results = compare_methods(cfg, data.train_rows, rows, learning_rates={"full": full_lr} if full_lr else None,
                              evaluate=not no_eval, log=lambda m: console.print(m, highlight=False))
    Console().print(format_table(results), highlight=False, soft_wrap=True)
    path = out or folder / "compare_full.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results), indent=2, default=float))
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


block_app = typer.Typer(no_args_is_help=True, help="The pipeline config as a Prefect block: saved by name, edited in the UI.")
app.add_typer(block_app, name="block")


@block_app.command("save")
@_exit_on_errors()
def block_save(config: ConfigArg, name: Annotated[str, typer.Option(help="The block's name: lowercase letters, digits, dashes.")],
               set_: SetOption = None, overwrite: Annotated[bool, typer.Option(help="Replace a block of that name.")] = False) -> None:
    """Save CONFIG as the Prefect block NAME: edit it in the Prefect UI, run it with `prefect-lora run block:NAME`."""
    from prefect_lora.flows.blocks import save_config_block
    from prefect_lora.flows.settings import bind_prefect_server

    bind_prefect_server()  # without a server configured, Prefect's temporary one ends with this process
    save_config_block(config, name, set_, overwrite)
    console.print(f"[green]ok[/]: {config} saved as block {name} (run it: prefect-lora run block:{name})",
                  highlight=False, soft_wrap=True)


demo_app = typer.Typer(no_args_is_help=True, help="The offline demo: SmolLM2 learns customer messages -> JSON.")
app.add_typer(demo_app, name="demo")


@demo_app.command("prepare")
@_exit_on_errors()
def demo_prepare(
    data_dir: Annotated[Path, typer.Option(help="Where train.jsonl and eval.jsonl go.")] = Path(".prefect-lora/demo/data"),
    rows: Annotated[int, typer.Option(help="Training rows to generate.")] = 2000,
    eval_rows: Annotated[int, typer.Option(help="Eval rows to generate.")] = 200,
    config: Annotated[Path, typer.Option(help="The demo's config, warmed for its data (see `warm`).")] = Path("configs/demo.yaml"),
    warm_: Annotated[bool, typer.Option("--warm/--no-warm", help="Compute the base's answers and scores now, not in the first run.")] = True,
) -> None:
    """Materialise the demo models, write the demo data and warm the demo's config.

    The models are converted once (GGUF -> safetensors); warming computes what the demo's runs read
    of the base model alone (see `warm`)."""
    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.data.demo import write_demo_data
    from prefect_lora.lora_tasks.modeling import resolve_base_model

    for name in ("builtin:smollm2-135m-instruct", "builtin:all-minilm-l6-v2"):
        console.print(f"{name} -> {resolve_base_model(name)}", highlight=False, soft_wrap=True)
    train, eval_ = write_demo_data(data_dir, rows, eval_rows)
    console.print(f"demo data: {train} ({rows} rows), {eval_} ({eval_rows} rows)", highlight=False, soft_wrap=True)
    if warm_ and config.is_file():
        _warm(load_config(config, [f"data.train_path={train}", f"data.eval_path={eval_}"]))


def _print_summary(result: RunResult) -> None:
    from prefect_lora.lora_tasks.registry.report import baseline_note, metrics_table

    if result.skipped:
        Console().print(f"[cyan]{result.reasons[0]}[/] (nothing trained)", highlight=False, soft_wrap=True)
        return

    columns, rows = metrics_table(result.metrics)
    baseline = result.method == "full"
    what = "full fine-tuning baseline (not registered)" if baseline else f"version {result.version}"
    table = Table(title=f"{result.model_name} {what}  (bootstrap intervals in brackets)")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    screen = Console()
    out = screen if screen.is_terminal else Console(width=200)  # piped or logged: no column squeezed or cut
    out.print(table)
    if note := baseline_note(result.metrics):
        out.print(note.rstrip(), highlight=False)
    verdict = ("[green]promoted to champion[/]" if result.promoted else
               "[cyan]baseline, logged only[/]" if baseline else "[yellow]not promoted[/]")
    out.print(f"decision: {verdict}")
    for reason in result.reasons:
        out.print(f"  - {reason}", highlight=False)
    out.print(f"MLflow run {result.run_id}; run folder {result.run_dir}", highlight=False, soft_wrap=True)
    for line in _mlflow_pages(result):
        out.print(line, highlight=False, soft_wrap=True)


def _mlflow_pages(result: RunResult) -> list[str]:
    """Where to look in the MLflow UI: the command that starts it on a local store, the run's page
    and the version's; or the store, when it cannot be read now (a server down, a store gone):
    never a new store created by looking."""
    from prefect_lora.lora_tasks.registry import tracking

    try:
        uri = _tracking(result.tracking_uri)
        lines = [] if tracking.is_server(uri) else [f"MLflow UI: {tracking.ui_command(uri)}, then open"]
        lines.append(f"  run:     {tracking.run_page(uri, result.run_id)}")
        lines.append(f"  runs:    {tracking.runs_page(uri, result.run_id)}")
        if result.version:
            lines.append(f"  version: {tracking.version_page(uri, result.model_name, result.version)}")
        return lines
    except Exception:  # noqa: BLE001  (the run id printed above still finds it)
        return [f"MLflow: the store {result.tracking_uri}, run {result.run_id}"]


TrackingOption = Annotated[str | None, typer.Option("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else this folder's store sqlite:///.prefect-lora/mlflow.db).")]
NotifyOption = Annotated[str | None, typer.Option("--notify", help="URL of a running `prefect-lora serve` to swap at once (POST /admin/refresh).")]


def _read_only() -> None:
    """A read at a terminal: a tracking server that is down is said after two MLflow HTTP retries
    (~5 s), not MLflow's default seven (~4 min). A value the user set stands."""
    import os

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


def _tracking(uri: str | None) -> str:
    """The MLflow store of a command that takes no config: --tracking-uri, else MLFLOW_TRACKING_URI,
    else this folder's default store. A SQLite store that does not exist is an error, never created."""
    import os

    from prefect_lora.lora_tasks.config import TrackingConfig

    env = os.environ.get("MLFLOW_TRACKING_URI")
    chosen = uri or env or TrackingConfig().tracking_uri
    if chosen.startswith("sqlite:///") and not Path(chosen.removeprefix("sqlite:///")).is_file():
        source = "--tracking-uri" if uri else "MLFLOW_TRACKING_URI" if env else "the default store of this folder"
        raise RegistryError(f"no MLflow store at {Path(chosen.removeprefix('sqlite:///')).resolve()} ({source}): run "
                            "from the project folder, or pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return chosen


def _print_record(record: dict) -> None:
    console.print(f"[green]{record['action']}[/]: {record['name']} {record['alias']} "
                  f"{record['from_version']} -> {record['to_version']} by {record['actor']} at {record['at']}",
                  highlight=False, soft_wrap=True)


@app.command()
@_exit_on_errors()
def promote(
    name: NameArg,
    version: Annotated[str, typer.Argument(metavar="VERSION", help="Version number to make the champion.",
                                           show_default=False)],
    reason: Annotated[str, typer.Option("--reason", help="Why this version: kept in the audit history.")],
    tracking_uri: TrackingOption = None,
    notify: NotifyOption = None,
) -> None:
    """Make VERSION of model NAME the champion (manual; audited with --reason)."""
    from prefect_lora.lora_tasks.registry import registry

    registry.get_version(_tracking(tracking_uri), name, version)  # typos fail here, before any engine starts
    from prefect_lora.flows.promote import promote as promote_flow
    from prefect_lora.flows.settings import bind_prefect_server, hide_expected_tracebacks

    bind_prefect_server()  # its temporary Prefect server ends with this process, even a killed one
    hide_expected_tracebacks()
    _print_record(promote_flow(name, version, reason, _tracking(tracking_uri), notify))


@app.command()
@_exit_on_errors()
def rollback(
    name: NameArg,
    to: Annotated[str | None, typer.Option("--to", help="Version to go back to (default: the previous champion).")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why: kept in the audit history.")] = None,
    tracking_uri: TrackingOption = None,
    notify: NotifyOption = None,
) -> None:
    """Point NAME's champion back at the previous champion (or --to VERSION); audited."""
    from prefect_lora.lora_tasks.registry import aliases, registry

    uri = _tracking(tracking_uri)
    if to is None and aliases.previous_champion(uri, name) is None:
        aliases.rollback_champion(uri, name)  # raises the clear "no previous champion" message
    elif to is not None:
        registry.get_version(uri, name, to)
    from prefect_lora.flows.rollback import rollback as rollback_flow
    from prefect_lora.flows.settings import bind_prefect_server, hide_expected_tracebacks

    bind_prefect_server()  # its temporary Prefect server ends with this process, even a killed one
    hide_expected_tracebacks()
    _print_record(rollback_flow(name, to, reason, uri, notify))


@app.command()
@_exit_on_errors()
def history(name: NameArg, tracking_uri: TrackingOption = None, as_json: JsonOption = False) -> None:
    """Print every version of NAME, then every recorded alias move (who, when, from, to, why), oldest first."""
    from prefect_lora.flows.cli_views import history_view
    from prefect_lora.lora_tasks.registry import overview

    _read_only()
    uri = _tracking(tracking_uri)
    versions, records = overview.versions_overview(uri, name), overview.alias_history(uri, name)
    if as_json:
        typer.echo(json.dumps({"name": name, "versions": versions, "alias_moves": records}, indent=2, default=str))
        return
    Console().print(history_view(name, versions, records), highlight=False)


@app.command()
@_exit_on_errors(ValueError)  # an invalid serve config (deploy.serve_core raises ValueError)
def serve(
    name: Annotated[str | None, typer.Argument(help="Registered model to serve (the default for requests "
                                                       "that name none); with --fleet, the fleet's first member.")] = None,
    member: Annotated[Optional[list[str]], typer.Option("--member", metavar="NAME", help="Another registered model on the same base "
                                                        "to serve beside NAME (repeat it).")] = None,
    fleet: Annotated[Optional[Path], typer.Option("--fleet", help="Serve every member of this fleet file.")] = None,
    port: Annotated[Optional[int], typer.Option(help="HTTP port (default: the serve config's, else 8000).")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default: the serve config's, else 127.0.0.1; "
                                                     "another address needs a token).")] = None,
    tracking_uri: TrackingOption = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Serve config YAML (limits, canary, token block...).")] = None,
    mode: Annotated[str | None, typer.Option(help="adapter (multiplexed on one base) or merged.")] = None,
    canary_share: Annotated[Optional[float], typer.Option(help="Share of champion traffic sent to the challenger.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Existing Ray cluster (default: start a local one).")] = None,
) -> None:
    """Serve NAME's champion (and any version by alias or number) over HTTP.

    Runs until Ctrl-C or SIGTERM, which stop Serve and Ray (exit 130 / 143). With --member or
    --fleet, many registered models of one base, each by NAME@ALIAS."""
    from prefect_lora.deploy.serve_core import load_serve_config
    from prefect_lora.lora_tasks.errors import RegistryError
    from prefect_lora.lora_tasks.fleet import load_fleet
    from prefect_lora.lora_tasks.registry import registry

    names = [*([name] if name else []), *(member or [])]
    uri = load_serve_config(config, model_name="_", tracking_uri=tracking_uri).tracking_uri
    for served in names:  # one clear message before Ray starts
        registry.resolve_version(uri, served, None)
    waiting = []  # fleet members without a champion: followed from the start, served once promoted
    for m in load_fleet(fleet).members if fleet else []:
        try:
            registry.resolve_version(uri, m.name, None)
            names.append(m.name)
        except RegistryError as exc:
            waiting.append(m.name)
            print(f"no champion yet: {m.name} (served once promoted; {exc})")
    if not names:  # the default (first) model must have a champion: it fixes the replicas' base
        raise typer.BadParameter("give the registered model to serve (NAME), or --fleet FILE with a promoted member")
    names += waiting
    cfg = load_serve_config(config, model_name=names[0], members=names[1:] or None, port=port, host=host,
                            tracking_uri=tracking_uri, mode=mode, canary_share=canary_share)
    from prefect_lora.deploy.serve import run_forever

    if signum := run_forever(cfg, ray_address=ray_address):
        import signal

        from prefect_lora.flows.settings import release_and_exit

        console.print(f"stopped by {signal.Signals(signum).name}: Serve and Ray are shut down", highlight=False)
        release_and_exit(128 + signum)  # 143 / 130, as `run`; at once, past Ray's native threads


@app.command()
@_exit_on_errors()
def export(
    ref: Annotated[str, typer.Argument(help="NAME@ALIAS (e.g. demo@champion), NAME/VERSION, or NAME (the champion).")],
    merged: Annotated[Optional[Path], typer.Option("--merged", help="Write a merged model (safetensors) here.")] = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="Write the PEFT adapter folder (vLLM-loadable) here.")] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty target folder.")] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Export a registered adapter: --adapter DIR (PEFT folder) and/or --merged DIR (merged model)."""
    from prefect_lora.lora_tasks.registry import export as exporter

    if not merged and not adapter:
        raise LoraTaskError("say what to write: --adapter DIR, --merged DIR, or both")
    uri = _tracking(tracking_uri)
    results = []
    if adapter:
        results.append(exporter.export_adapter(uri, ref, adapter, force=force))
    if merged:
        results.append(exporter.export_merged(uri, ref, merged, force=force))
    for r in results:
        console.print(f"[green]{r.kind}[/] of {r.name} version {r.version} -> {r.path} ({', '.join(r.files)})",
                      highlight=False, soft_wrap=True)


@app.command()
@_exit_on_errors()
def status(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Registered model (default: every model in "
                                                                   "the store).")] = None,
    tracking_uri: TrackingOption = None,
    as_json: JsonOption = False,
) -> None:
    """Champion and challenger of each model: version, age, key metrics, lineage, last decision."""
    from prefect_lora.lora_tasks.registry import overview

    _read_only()
    uri = _tracking(tracking_uri)
    models = [overview.model_status(uri, n) for n in ([name] if name else overview.model_names(uri))]
    if as_json:
        typer.echo(json.dumps({"tracking_uri": uri, "models": models}, indent=2, default=str))
        return
    if not models:
        console.print(f"no registered models in {uri}", highlight=False, soft_wrap=True)
        return
    from prefect_lora.flows.cli_views import status_view

    Console().print(status_view(uri, models), highlight=False)


@app.command()
@_exit_on_errors()
def register(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (storage_path/MODEL/run-KEY) holding registration.json.")],
    tracking_uri: TrackingOption = None,
) -> None:
    """Complete a registration that failed (e.g. MLflow was down): register, gate, promote. No training."""
    from prefect_lora.lora_tasks.registry.lifecycle import read_pending

    pending = read_pending(run_dir)  # a clear error before any engine starts
    from prefect_lora.flows.retrain import register_run
    from prefect_lora.flows.settings import bind_prefect_server, hide_expected_tracebacks

    bind_prefect_server()  # its temporary Prefect server ends with this process, even a killed one
    hide_expected_tracebacks()
    if console.is_terminal:
        with console.status(f"registering {pending.config.get('model_name')} from {run_dir}"):
            result = register_run(str(run_dir.resolve()), tracking_uri)
    else:
        console.print(f"registering {pending.config.get('model_name')} from {run_dir}", highlight=False, soft_wrap=True)
        result = register_run(str(run_dir.resolve()), tracking_uri)
    _print_summary(result)


def _reflow_help(typer_app: typer.Typer) -> None:
    """Each help paragraph of `typer_app`'s commands as one line, for Rich to wrap at the terminal's
    width: typer keeps a docstring's line breaks after its first paragraph, and in the commands list."""
    reflow = lambda text: text and "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))
    for info in [*typer_app.registered_commands, *filter(None, [typer_app.registered_callback])]:
        info.help = reflow(info.help or info.callback.__doc__)
    for group in typer_app.registered_groups:
        _reflow_help(group.typer_instance)


_reflow_help(app)


def main() -> None:
    from prefect_lora.flows.settings import release_and_exit, stop_cleanly_on_signals, stop_signal

    with stop_cleanly_on_signals():  # a stopped command ends its MLflow run and stops Ray and Prefect's server
        try:
            app()
        except SystemExit:
            if signum := stop_signal():
                import signal

                Console(stderr=True).print(f"stopped by {signal.Signals(signum).name}: shutting down Ray and the "
                                           "temporary Prefect server; the same command resumes from the last checkpoint",
                                           highlight=False, soft_wrap=True)
                release_and_exit(128 + signum)
            raise


if __name__ == "__main__":
    sys.exit(main())
