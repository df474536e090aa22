"""The retraining flow: validate -> train on Ray -> evaluate vs base -> register -> gate -> promote.

Tasks are thin wrappers around `lora_tasks`; retries sit only on the tasks that talk to MLflow.
Every step writes into the run folder under the storage path, so a failure keeps what came before.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.utilities.urls import url_for
from prefect_lora.flows import (
    notifications,
    settings,
)
from prefect_lora.flows.blocks import read_config
from prefect_lora.flows.locks import shared_alias_lock
from prefect_lora.lora_tasks.config import PipelineConfig, config_from_dict
from prefect_lora.lora_tasks.data.prepare import PreparedData, columns, lineage_tags, run_dir_for, same_base
from prefect_lora.lora_tasks.errors import ConfigError, DataError, NonFiniteLoss, ValidationFailed
from prefect_lora.lora_tasks.gate.decide import decide_on_report
from prefect_lora.lora_tasks.gate.promotion import Decision, FleetGate
from prefect_lora.lora_tasks.gate.remedies import evaluate_with_remedies
from prefect_lora.lora_tasks.gate.remedy import remedy_tags
from prefect_lora.lora_tasks.gate.verdict import evaluation_line, headline
from prefect_lora.lora_tasks.measurement import power
from prefect_lora.lora_tasks.measurement.evaluation import EvalReport
from prefect_lora.lora_tasks.measurement.forgetting_table import forgetting_limits
from prefect_lora.lora_tasks.measurement.stats import figure
from prefect_lora.lora_tasks.modeling import BaseModelInfo, describe_base_model, write_scaled_adapter
from prefect_lora.lora_tasks.registry import aliases, lifecycle, registry, tracking
from prefect_lora.lora_tasks.registry.lifecycle import RunResult
from prefect_lora.lora_tasks.registry.report import (
    baseline_markdown,
    comparison_rows,
    headline_metrics,
    metrics_rows,
    mlflow_markdown,
    prefect_markdown,
    redecision_markdown,
    remedy_rows,
    run_title,
    skip_markdown,
    summary_markdown,
    version_description,
)
from prefect_lora.lora_tasks.search import search_trials
from prefect_lora.lora_tasks.secrets import redacted_config
from prefect_lora.lora_tasks.training.launcher import baseline_rows, prepare_data
from prefect_lora.lora_tasks.training.replay import replay_rows


def _retry_delays() -> list[float]:
    """Backoff between attempts of the MLflow tasks: PREFECT_LORA_MLFLOW_RETRY_DELAYS="2,10,30"."""
    raw = os.environ.get("PREFECT_LORA_MLFLOW_RETRY_DELAYS", "2,10,30")
    try:
        delays = [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"PREFECT_LORA_MLFLOW_RETRY_DELAYS must be seconds separated by commas, e.g. 2,10,30; got {raw!r}") from None
    return delays


STEP = {"cache_policy": NO_CACHE, "on_failure": [notifications.note_failed_task]}
"""Every task: no caching, and a failure names its step in the notification."""
MLFLOW_RETRIES = {**STEP, "retries": len(_retry_delays()), "retry_delay_seconds": _retry_delays()}
"""Tasks that talk to MLflow retry with backoff (a tracking server restarting, a network blip)."""


def _artifact_key(kind: str, cfg: PipelineConfig) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{kind}-" + "".join(c if c.isalnum() else "-" for c in cfg.model_name.lower())


@task(name="validate-data", **STEP)
def validate_data(cfg: PipelineConfig, run_dir: str) -> PreparedData:
    try:
        data = prepare_data(cfg, run_dir)
    except ValidationFailed as exc:
        if exc.report is not None:  # the full report, row by row, where the Prefect UI shows it
            create_markdown_artifact(key=_artifact_key("validation", cfg), markdown=exc.report.to_markdown(50),
                                     description=f"{cfg.model_name}: data contract failed")
        raise
    log = get_run_logger()
    log.info("data contract: %s (fingerprint %s)", data.report.summary(), data.fingerprint[:12])
    if data.quarantine_path:
        log.warning("invalid rows quarantined to %s", data.quarantine_path)
    checks = power.plan(cfg, len(data.eval_rows))  # before training: can each check show its limit?
    power.save(cfg, checks, Path(run_dir) / "power.json")
    log.info("%s", "\n".join(power.report(cfg, checks)))
    for warning in power.enforce(cfg, checks):
        log.warning("%s", warning)
    return data


@task(name="describe-base-model", **STEP)
def describe_base(cfg: PipelineConfig) -> BaseModelInfo:
    return describe_base_model(cfg.base_model.name_or_path, cfg.base_model.revision)


@task(name="start-mlflow-run", **MLFLOW_RETRIES)
def start_mlflow_run(cfg: PipelineConfig, run_dir: str, tags: dict[str, str]) -> tuple[str, str]:
    """The run's id and where it is seen (the link notifications carry)."""
    name = f"{cfg.model_name} {run_dir.rsplit('/', 1)[-1]}"  # until the gate decides (`report.run_title`)
    run_id = tracking.start_run(cfg, run_name=name, tags=tags)
    return run_id, tracking.run_url(cfg.tracking.tracking_uri, run_id)


def _worth_retrying(task, task_run, state) -> bool:
    """Retry training unless its error would only come again (bad config or data, a diverged loss)
    or came from stopping this process (Ctrl-C, SIGTERM: its Ray instance is going away)."""
    if settings.stop_signal():
        return False
    try:
        state.result()
    except (ConfigError, DataError, NonFiniteLoss):
        return False
    except BaseException:  # noqa: BLE001  (a worker lost, a node gone: worth another attempt)
        return True
    return True


# A retry (Ray gave up after scaling.max_failures, or training in this process failed) continues
# from the latest checkpoint in the run folder.
@task(name="train-adapter", **STEP, retries=1, retry_delay_seconds=10, retry_condition_fn=_worth_retrying)
def train(cfg: PipelineConfig, rows: list[dict], stream, run_dir: str, run_id: str):
    from prefect_lora.lora_tasks.training.launcher import train_adapter

    log = get_run_logger()
    result = train_adapter(cfg, rows, run_dir, step_log=tracking.metric_logger(cfg.tracking.tracking_uri, run_id, run_dir),
                           stream=stream,  # a store outage never fails training: the curve is kept in run_dir
                           progress=log.info)  # the workers' progress lines, in this task's log as they come
    m = result.metrics
    if m.get("start_step"):
        log.warning("training continued from the checkpoint of step %s", m["start_step"])
    loss = f"final loss {figure(m['train_loss'])}" if m.get("train_loss") is not None else "no step left to train"
    hosts = ", ".join(sorted(set(str(m.get("worker_hosts") or m.get("worker_nodes") or "").split(",")) - {""})) or "-"
    log.info("adapter trained to step %s (%s) on host(s) %s", m.get("step"), loss, hosts)
    return result


@task(name="prepare-replay", **STEP)
def prepare_replay(cfg: PipelineConfig, data: PreparedData, base: BaseModelInfo) -> list[dict]:
    """The training rows: the task's, plus general rows at `replay.share` (none while it is 0)."""
    extra = replay_rows(cfg, len(data.train_rows), base)
    if extra:
        get_run_logger().info("replay: %d general rows (%s) mixed into %d task rows", len(extra), cfg.replay.source,
                              len(data.train_rows))
    return data.train_rows + extra


@task(name="evaluate-vs-base", **STEP)
def evaluate(cfg: PipelineConfig, run_dir: str, adapter_dir: str, data: PreparedData, base: BaseModelInfo,
             run_id: str, champion=None, champion_dir: str | None = None) -> tuple[EvalReport, str]:
    """The evaluation, and the adapter it speaks for: the trained one, or the remedy's choice
    (its scale written beside it, so what is registered and served is what was evaluated). A
    `remedy.strategy: search` trains its trials from here, as Ray Tune trials and child runs."""
    import json

    search, log = partial(search_trials, cfg, data.train_rows, run_dir, run_id, base), get_run_logger()
    report = evaluate_with_remedies(cfg, adapter_dir, data.eval_rows, base_info=base, champion_adapter_dir=champion_dir,
                                    champion_version=champion.version if champion else None,
                                    champion_metrics=champion.metrics if champion else None, search=search,
                                    train_rows=baseline_rows(cfg, data), progress=log.info)
    (Path(run_dir) / "eval_report.json").write_text(json.dumps(report.to_dict(), indent=2))  # kept whatever follows
    share = 1.0 if report.evidence == "all" else power.gate_share(cfg)  # a remedy's confirm part
    power.remember(cfg, len(data.eval_rows), report.intervals, run_id, share)  # the next run plans with these spreads
    log.info("evaluated on %s", evaluation_line(report))
    if report.remedy:
        log.info("remedy %s: %d trial(s), chosen %s. %s", report.remedy["strategy"], len(report.remedy["trials"]),
                 report.remedy["chosen"] or "none", report.remedy.get("why", ""))
    adapter_dir = report.remedy.get("adapter_dir") or adapter_dir  # a search trial's, when one was chosen
    return report, str(write_scaled_adapter(adapter_dir, Path(run_dir) / "adapter-remedied", report.adapter_scale))


@task(name="log-to-mlflow", **MLFLOW_RETRIES)
def log_results(cfg: PipelineConfig, run_id: str, run_dir: str, data: lifecycle.DataSummary | PreparedData,
                report: EvalReport, train_metrics: dict) -> None:
    """The run's metrics, tables, datasets and the data contract's reports into its MLflow run."""
    import json

    data = data if isinstance(data, lifecycle.DataSummary) else lifecycle.DataSummary.of(data)

    uri, m = cfg.tracking.tracking_uri, train_metrics
    kept = tracking.replay_kept_points(uri, run_id, run_dir)  # first: the curve training could not log, once
    if kept:
        get_run_logger().info("logged %d point(s) of the training curve kept while the MLflow store was unreachable", kept)
    tracking.set_run_tags(uri, run_id, {"training.method": cfg.training.method,
                                        **{f"train.{k}": str(m[k]) for k in ("worker_nodes", "worker_hosts", "precision") if k in m},
                                        **({"eval.baseline": report.baseline["kind"]} if report.baseline else {})})
    names = {"step": "train_step", "start_step": "train_start_step", "train_tokens_per_s": "train_tokens_per_s",
             "train_loop_seconds": "train_loop_seconds"}
    flat = {**{names[k]: v for k, v in m.items() if k in names}, **report.flat_metrics(),
            "train_rows": data.train_count, "eval_rows": data.eval_count}
    headline = headline_metrics(flat, report.primary_metric)  # the rest: one table, not a chart each
    tracking.log_metrics(uri, run_id, headline)
    tracking.keep_runs_view(uri, run_id, list(headline))
    tracking.log_table(uri, run_id, metrics_rows(flat), tracking.METRICS_TABLE)  # intervals and counts too
    tracking.log_table(uri, run_id, comparison_rows(flat), "reports/comparison.json")
    d = cfg.data
    tracking.log_datasets(uri, run_id, {"train": (d.train_path, data.train_count, data.digest("train")),
                                        "eval": (d.eval_path or d.train_path, data.eval_count, data.digest("eval"))},
                          cfg.model_name, columns(cfg))
    eval_path = Path(run_dir) / "eval_report.json"
    if not eval_path.exists():
        eval_path.write_text(json.dumps(report.to_dict(), indent=2))
    tracking.log_artifact(uri, run_id, eval_path, "reports")
    tracking.log_table(uri, run_id, report.samples, "reports/eval_samples.json")  # base vs adapted answers
    for path in (*data.files.values(), data.quarantine_path, Path(run_dir) / "power.json"):
        if path and Path(path).exists():
            tracking.log_artifact(uri, run_id, path, "reports")


@task(name="publish-reports", **MLFLOW_RETRIES)
def publish_reports(cfg: PipelineConfig, run_id: str, run_dir: str, report: EvalReport, summary: str) -> None:
    """Markdown report and PNG plots into the run folder and the MLflow run (`reports/`)."""
    from prefect_lora.lora_tasks.registry.report import embed_images, write_report

    uri = cfg.tracking.tracking_uri
    limits = {"min_task_gain": cfg.promotion.min_task_gain, **forgetting_limits(cfg.promotion, report.forgetting)}
    files = write_report(report, summary, tracking.metric_history(uri, run_id), Path(run_dir) / "reports", limits)
    for path in files:
        tracking.log_artifact(uri, run_id, path, "reports")
    create_markdown_artifact(key=_artifact_key("evaluation", cfg),
                             markdown=embed_images(files[0].read_text(encoding="utf-8"), files[0].parent),
                             description=f"{cfg.model_name}: evaluation report ({cfg.training.method})")
    if report.remedy:  # the frontier, readable in the Prefect UI without MLflow
        create_table_artifact(key=_artifact_key("remedy", cfg), table=remedy_rows(report),
                              description=f"{cfg.model_name}: remedy trials ({report.remedy['strategy']}), search part; "
                                          f"chosen {report.remedy['chosen']}")


@task(name="register-adapter", **MLFLOW_RETRIES)
def register(cfg: PipelineConfig, run_id: str, adapter_dir: str, base_model: str, tags: dict[str, str]) -> str:
    model_uri = registry.log_adapter_model(cfg, run_id, adapter_dir, base_model)
    return registry.register_version(cfg.tracking.tracking_uri, cfg.model_name, model_uri, run_id,
                                     registry.version_tags(tags))


@task(name="fetch-champion-adapter", **MLFLOW_RETRIES)
def fetch_champion_adapter(cfg: PipelineConfig, champion, tags: dict[str, str], run_dir: str) -> str | None:
    """The champion's adapter, to score it beside the new one on the same data; None when there
    is no champion or it was trained on another base (then its own recorded metrics are used)."""
    if champion is None:
        return None
    if not same_base(champion.tags, tags):
        get_run_logger().warning("champion version %s was trained on another base model: compared by its recorded metrics",
                                 champion.version)
        return None
    return str(registry.download_adapter(cfg.tracking.tracking_uri, cfg.model_name, champion.version,
                                         Path(run_dir) / f"champion-v{champion.version}"))


@task(name="read-champion", **MLFLOW_RETRIES)
def read_champion(cfg: PipelineConfig):
    return registry.get_alias(cfg.tracking.tracking_uri, cfg.model_name, registry.CHAMPION)


@task(name="decide-promotion", **STEP)
def decide(cfg: PipelineConfig, report: EvalReport, version: str, champion, fleet_gate: FleetGate | None = None) -> Decision:
    decision = decide_on_report(cfg.promotion, report, version, champion, fleet_gate)
    get_run_logger().info("the gate %s version %s: %s", "promotes" if decision.promote else "does not promote", version,
                          "; ".join(decision.reasons))
    return decision


@task(name="apply-decision", **MLFLOW_RETRIES)
def apply_decision(cfg: PipelineConfig, version: str, decision: Decision, run_id: str, summary: str,
                   report: EvalReport, champion, fleet_gate: FleetGate | None = None) -> tuple[Decision, str]:
    """Act on the gate with compare-and-set on `champion`; if another run moved it since the
    evaluation, decide again (the same pure gate) against the new champion. Returns the final
    decision and the summary, which then names the MLflow run for the Prefect side."""
    uri, name = cfg.tracking.tracking_uri, cfg.model_name

    def redecide(current):  # the new champion was not scored in this run: its recorded metrics count
        again = decide_on_report(cfg.promotion, report, version, current, fleet_gate, same_data=False)
        get_run_logger().warning("champion moved to version %s during this run; decided again: %s",
                                 current.version if current else None, "promote" if again.promote else "refuse")
        return again

    registry.record_evaluation(uri, name, version, report.flat_metrics(), report.primary_metric)
    actor, lock = aliases.default_actor(str(flow_run.id or "") or None), shared_alias_lock()
    final, against, record = aliases.settle_decision(uri, name, version, decision, champion, redecide,
                                                     actor=actor, run_id=run_id, lock=lock)
    registry.describe_version(uri, name, version, version_description(report, final))
    if final.admitted:  # fit for canary traffic; a version refused for its gain or forgetting never gets it
        aliases.set_challenger(uri, name, version, "admitted by the gate: " + "; ".join(final.reasons)[:4000], run_id,
                               actor=actor, lock=lock)
    if final is not decision:
        summary += redecision_markdown(final, against.version if against else None)
    summary += mlflow_markdown(run_id, tracking.run_page(uri, run_id), version, tracking.version_page(uri, name, version),
                               record.action, record.from_version, record.to_version, tracking.runs_page(uri, run_id))
    tracking.set_run_tags(uri, run_id, {"promotion.decision": "promoted" if final.promote else "rejected",
                                        "mlflow.note.content": summary,
                                        "mlflow.runName": run_title(name, version, final.promote)})
    tracking.end_run(uri, run_id)
    _notify_server(final.promote)
    return final, summary


def _notify_server(promoted: bool) -> None:
    """Tell a running `prefect-lora serve` to swap now (PREFECT_LORA_SERVE_URL); it also polls."""
    import os

    url = os.environ.get("PREFECT_LORA_SERVE_URL")
    if not (url and promoted):
        return
    from prefect_lora.deploy.serve_core import notify_server

    try:
        get_run_logger().info("server at %s now serves %s", url, notify_server(url).get("aliases"))
    except Exception as exc:  # noqa: BLE001  (the promotion stands; the server swaps at its next poll)
        get_run_logger().warning("could not notify the server at %s (%s); it swaps at its next alias poll", url, exc)




@task(name="read-version", **MLFLOW_RETRIES)
def read_version(cfg: PipelineConfig, version: str | None):
    return registry.get_version(cfg.tracking.tracking_uri, cfg.model_name, version) if version else None


@task(name="read-latest-decision", **MLFLOW_RETRIES)
def read_latest_decided(cfg: PipelineConfig) -> lifecycle.Decided | None:
    """The newest version the gate decided, promoted or not (`lifecycle.read_latest_decided`)."""
    return lifecycle.read_latest_decided(cfg.tracking.tracking_uri, cfg.model_name)


@task(name="record-skip", **MLFLOW_RETRIES)
def record_skip(cfg: PipelineConfig, tags: dict[str, str], repeat: lifecycle.Repeat, champion) -> tuple[str, str]:
    """A short MLflow run tagged `promotion.decision=skipped`; returns (run id, reason)."""
    reason = lifecycle.skip_reason(tags, repeat)
    get_run_logger().info("%s", reason)
    return tracking.record_skip(cfg, tags, repeat.version, champion.version if champion else None, reason), reason


@task(name="apply-retention", **STEP)
def apply_retention(cfg: PipelineConfig, run_dir: str, version: str | None) -> lifecycle.Retention:
    """Delete checkpoints and registered versions beyond `retention` (`lifecycle.apply_retention`).
    A failure here is logged: the run's result stands."""
    log = get_run_logger()
    try:
        deleted = lifecycle.apply_retention(cfg, run_dir, version)
    except lifecycle.RetentionStopped as exc:  # cleanup is retried by the next run
        deleted = exc.deleted
        log.warning("retention stopped early (%s); the next run tries again", exc)
    if deleted.checkpoints or deleted.versions:
        log.info("retention deleted %d checkpoint folder(s) and version(s) %s", len(deleted.checkpoints),
                 deleted.versions or "none")
    return deleted


def _finish_baseline(cfg: PipelineConfig, data: lifecycle.DataSummary, report: EvalReport, run_id: str, run_dir: str,
                     champion, flow_run_url: str | None) -> State:
    """End a `training.method: full` run: reports in MLflow and Prefect, no version, no promotion."""
    champion_before = champion.version if champion else None
    summary = baseline_markdown(cfg, data, report, run_id, champion_before) + prefect_markdown(flow_run_url)
    publish_reports(cfg, run_id, run_dir, report, summary)
    tracking.set_run_tags(cfg.tracking.tracking_uri, run_id, {
        "promotion.decision": "baseline", "mlflow.note.content": summary,
        "mlflow.runName": f"{cfg.model_name} full fine-tuning baseline"})
    tracking.end_run(cfg.tracking.tracking_uri, run_id)
    create_markdown_artifact(key=_artifact_key("retrain", cfg), markdown=summary, description=f"{cfg.model_name} full fine-tuning baseline")
    result = RunResult(cfg.model_name, None, False, [lifecycle.BASELINE_REASON], run_id, run_dir,
                       cfg.tracking.tracking_uri, report.flat_metrics(), champion_before=champion_before,
                       summary=summary, method="full")
    return _finished(cfg, headline(cfg.model_name, report), result, "baseline")


def _complete(cfg: PipelineConfig, pending: lifecycle.PendingRegistration, report: EvalReport, champion,
              fleet_gate: FleetGate | None = None) -> State:
    """Log, register, gate and promote a trained and evaluated adapter: the end of `retrain` and
    all of `register_run`. `pending` (registration.json) says how far an earlier attempt got.
    The flow's final state: Completed with the decision and the gain as its message, the
    `RunResult` as its result."""
    run_id, run_dir, flow_run_url = pending.run_id, pending.run_dir, pending.tags.get(FLOW_RUN_URL_TAG)
    log_results(cfg, run_id, run_dir, pending.data, report, pending.train_metrics)
    if cfg.training.method == "full":  # a baseline: evaluated and logged, never registered or promoted
        result = _finish_baseline(cfg, pending.data, report, run_id, run_dir, champion, flow_run_url)
        pending.status = "done"
        pending.save()
        return result
    version = pending.version
    if version is None:
        version = register(cfg, run_id, pending.adapter_dir, pending.base_model, pending.tags)
        pending.version, pending.status = version, "registered"
        pending.save()
    champion_before = champion.version if champion else None
    decision = decide(cfg, report, version, champion, fleet_gate)
    summary = summary_markdown(cfg, pending.data, report, decision, version, run_id, champion_before)
    summary += prefect_markdown(flow_run_url)
    publish_reports(cfg, run_id, run_dir, report, summary)
    decision, summary = apply_decision(cfg, version, decision, run_id, summary, report, champion, fleet_gate)
    pending.status = "done"
    pending.save()
    create_markdown_artifact(key=_artifact_key("retrain", cfg), markdown=summary, description=f"{cfg.model_name} v{version}")
    notifications.remember(flow_run.id, promoted=decision.promote, version=version, champion_before=champion_before)
    apply_retention(cfg, run_dir, version)
    result = RunResult(cfg.model_name, version, decision.promote, decision.reasons, run_id, run_dir,
                       cfg.tracking.tracking_uri, report.flat_metrics(), champion_before=champion_before,
                       summary=summary, method=cfg.training.method, failed_checks=list(decision.failed_checks),
                       gate_p_value=decision.p_value)
    return _finished(cfg, headline(cfg.model_name, report, decision, version), result,
                     "promoted" if decision.promote else "not-promoted")


def _mark_failed(cfg: PipelineConfig, run_id: str, exc: BaseException) -> None:
    """The MLflow run ended: KILLED when the process was stopped (Ctrl-C, SIGTERM), else FAILED."""
    stopped = isinstance(exc, (KeyboardInterrupt, SystemExit, TerminationSignal))
    try:
        tracking.end_run(cfg.tracking.tracking_uri, run_id, status="KILLED" if stopped else "FAILED")
    except Exception as err:  # noqa: BLE001  (the tracking server may be the failure itself)
        get_run_logger().warning("could not mark MLflow run %s ended (%s)", run_id, err)


OUTCOME_SEP = " — "
"""Between a finished run's name and its outcome, as the Prefect runs list shows them."""


def label_flow_run(name: str | None = None, tags: list[str] = (), outcome: str | None = None) -> None:
    """Name and tag this flow run as the Prefect UI lists it (`<model>-<run key>`; the model and
    the decision as tags); a finished run's name ends with its `outcome` (the runs list shows a
    run's name and tags, not its state's message). Best effort: a label never fails a run."""
    if not flow_run.id:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run.id)
            name = name or current.name.split(OUTCOME_SEP)[0]
            client.update_flow_run(flow_run.id, name=f"{name}{OUTCOME_SEP}{outcome}" if outcome else name,
                                   tags=sorted({*current.tags, *tags}))
    except Exception as exc:  # noqa: BLE001
        get_run_logger().warning("could not name or tag the flow run (%s)", exc)


def _finished(cfg: PipelineConfig, message: str, result: RunResult, decision: str) -> State:
    """The end of a run as Prefect lists it: its outcome after its name, the decision as a tag, and
    a Completed state with `message` (`verdict.headline`) as its message and `result` as its result."""
    label_flow_run(tags=[cfg.model_name, decision], outcome=message.removeprefix(f"{cfg.model_name} "))
    return Completed(message=message, data=result)


def _skip(cfg: PipelineConfig, run_dir: str, tags: dict[str, str], repeat: lifecycle.Repeat, champion):
    skip_run, reason = record_skip(cfg, tags, repeat, champion)
    champion_before = champion.version if champion else None
    md = skip_markdown(cfg.model_name, reason, champion_before, skip_run)
    create_markdown_artifact(key=_artifact_key("retrain", cfg), markdown=md, description=f"{cfg.model_name}: skipped")
    result = RunResult(cfg.model_name, repeat.version, False, [reason], skip_run, run_dir, cfg.tracking.tracking_uri,
                       skipped=True, champion_before=champion_before, summary=md)
    return _finished(cfg, lifecycle.skip_headline(cfg.model_name, repeat), result, "skipped")


settings.hide_expected_tracebacks()  # a bad config or bad data is one log line under a worker too

HOOKS = {"on_failure": [notifications.on_failure], "on_crashed": [notifications.on_failure],
         "on_completion": [notifications.on_completion]}

FLOW_RUN_URL_TAG = "prefect.flow_run_url"
"""The MLflow run's link back to its Prefect flow run, where Prefect has a UI (not on the ephemeral API)."""

_RUN_DIRS: dict[str, str] = {}
"""Each starting flow run's run folder, found while naming it (hashing the data once per run)."""


def _retrain_run_name() -> str:
    """`<model>-<run key>`: what the Prefect UI lists a retraining run as, set before its first log
    line. A config that does not load names the run after its file; the flow then says why."""
    params = flow_run.parameters
    try:
        cfg = read_config(params["config_path"], params.get("overrides"))
        run_dir = _RUN_DIRS[str(flow_run.id)] = str(run_dir_for(cfg))
        return f"{cfg.model_name}-{run_dir.rsplit('run-', 1)[-1]}"
    except Exception:  # noqa: BLE001  (a run is named whatever its config; its first task reports the error)
        return f"lora-retrain-{Path(str(params.get('config_path', 'config'))).stem}"


def _register_run_name() -> str:
    """`<model>-<run key>-register`: the run folder's own names (`storage/MODEL/run-KEY`)."""
    run_dir = Path(flow_run.parameters["run_dir"])
    return f"{run_dir.parent.name}-{run_dir.name.removeprefix('run-')}-register"


@flow(name="lora-retrain", log_prints=True, flow_run_name=_retrain_run_name, **HOOKS)
def retrain(config_path: str, overrides: list[str] | None = None, force: bool = False, hold: bool = False) -> RunResult:
    """Retrain a LoRA adapter from CONFIG (a YAML file, or block:NAME of a saved `PipelineConfigBlock`),
    evaluate it against its base, register and gate it.

    The run ends Completed with the outcome in one line as its message (`tiny-sums v3 promoted:
    eval_loss -0.611 [-0.658, -0.563]; forgetting within limits (...)`, `verdict.headline`) and the
    `RunResult` as its result. Skipped (message "<model> skipped: no new data (...)") when the
    champion, or the latest version the gate decided (promoted or not), was trained on the same data
    and config, unless `force`. `hold` stops after the evaluation, with registration.json written
    and the gate's p-value in the result, for a caller that gates many runs together (a fleet) and
    completes each with `register_run`."""
    cfg = read_config(config_path, overrides)
    # Named by config and data (a retry finds its checkpoints there); found once while naming the run.
    run_dir = _RUN_DIRS.pop(str(flow_run.id), None) or str(run_dir_for(cfg))
    notifications.remember(flow_run.id, model_name=cfg.model_name, run_dir=run_dir,
                           notifications=cfg.notifications.model_dump())
    data = validate_data(cfg, run_dir)
    base = describe_base(cfg)
    tags = {**lineage_tags(cfg, base, data.fingerprint), "prefect.flow_run_id": str(flow_run.id or ""),
            "run_dir": run_dir, "lora.run_key": run_dir.rsplit("run-", 1)[-1]}
    if flow_run.id and (url := url_for("flow-run", obj_id=flow_run.id)):  # none on Prefect's ephemeral API
        tags[FLOW_RUN_URL_TAG] = url
    champion = read_champion(cfg)
    repeat = None if force else lifecycle.repeated_version(tags, champion, read_latest_decided(cfg))
    if repeat is not None:
        return _skip(cfg, run_dir, tags, repeat, champion)
    label_flow_run(f"{cfg.model_name}-{tags['lora.run_key']}", [cfg.model_name])  # a fleet's member is named so too
    run_id, run_url = start_mlflow_run(cfg, run_dir, tags)
    notifications.remember(flow_run.id, mlflow_run_id=run_id, mlflow_run_url=run_url)
    try:
        with tracking.system_metrics(cfg.tracking.tracking_uri, run_id):  # what training and evaluation cost
            champion_dir = fetch_champion_adapter(cfg, champion, tags, run_dir)
            trained = train(cfg, prepare_replay(cfg, data, base), data.train_stream, run_dir, run_id)
            report, adapter_dir = evaluate(cfg, run_dir, trained.adapter_dir, data, base, run_id, champion, champion_dir)
        # Before any MLflow write: what `prefect-lora register RUN_DIR` needs if the server is down from here on.
        pending = lifecycle.new_pending(redacted_config(cfg.model_dump(mode="json"), drop=True), run_id, run_dir, adapter_dir,
                                        base.name_or_path, {**tags, **remedy_tags(report.remedy)},
                                        lifecycle.DataSummary.of(data), report.to_dict(),
                                        trained.metrics, champion.version if champion else None)
        pending.save()
        if hold:
            return _held(cfg, pending, report, champion)
        return _complete(cfg, pending, report, champion)
    except BaseException as exc:
        _mark_failed(cfg, run_id, exc)
        raise


def _held(cfg: PipelineConfig, pending: lifecycle.PendingRegistration, report: EvalReport, champion) -> State:
    """A run evaluated and held for its fleet's gate: nothing registered yet, its MLflow run open."""
    own = None if cfg.training.method == "full" else decide_on_report(cfg.promotion, report, None, champion)
    p_value = own.p_value if own else None
    get_run_logger().info("evaluated; held for the fleet's gate (gate p-value %s)",
                          "none: a baseline" if p_value is None else figure(p_value))
    result = RunResult(cfg.model_name, None, False, ["held for the fleet's gate"], pending.run_id, pending.run_dir,
                       cfg.tracking.tracking_uri, report.flat_metrics(), champion_before=pending.champion_version,
                       method=cfg.training.method, held=True, gate_p_value=p_value)
    return _finished(cfg, headline(cfg.model_name, report, own, held=True), result, "held")


@flow(name="lora-register", log_prints=True, flow_run_name=_register_run_name, **HOOKS)
def register_run(run_dir: str, tracking_uri: str | None = None, fleet_gate: FleetGate | None = None) -> RunResult:
    """Complete the registration of a run that trained and evaluated its adapter but could not
    register it (e.g. the tracking server was down), or that was held for its fleet's gate
    (`fleet_gate`): log, register, gate, promote. No training."""
    pending = lifecycle.read_pending(run_dir)
    raw = dict(pending.config)
    if tracking_uri:
        raw["tracking"] = {**raw["tracking"], "tracking_uri": tracking_uri}
    cfg = config_from_dict(raw, source=str(Path(run_dir) / lifecycle.REGISTRATION_FILE))
    notifications.remember(flow_run.id, model_name=cfg.model_name, run_dir=run_dir, mlflow_run_id=pending.run_id,
                           notifications=cfg.notifications.model_dump())
    if pending.status == "done":
        result = lifecycle.already_registered(pending, run_dir, cfg.model_name, cfg.tracking.tracking_uri)
        get_run_logger().info(result.reasons[0])
        return Completed(message=f"{cfg.model_name}: {result.reasons[0]}", data=result)
    report = EvalReport(**{k: v for k, v in pending.report.items() if k != "task_gain"})
    champion = read_version(cfg, pending.champion_version)
    try:
        return _complete(cfg, pending, report, champion, fleet_gate)
    except BaseException as exc:
        _mark_failed(cfg, pending.run_id, exc)
        raise
