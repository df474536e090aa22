"""A remedy search (`remedy.strategy: search`): more adapters, trained over `remedy.search_space`
(learning rate, rank, replay share), each a Ray Tune trial and a child MLflow run under the
pipeline's run, each tried at every scale of `remedy.scales` on the search part of the evidence.

The choice among all trials and its confirmation stay in `gate.remedies.evaluate_remedies`: this
module only produces the trials (see `lora_tasks/measurement/evidence_split.py` for why the evidence is split)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path

from .config import PipelineConfig
from .gate.promotion import Candidate, candidate_from_metrics
from .gate.remedy import Trial, describe_trial, judge, search_grid, search_space, trial_config, trial_name
from .measurement.evaluation import Evaluation, primary_metric
from .measurement.evidence_split import Part
from .measurement.forgetting_table import forgetting_metric
from .modeling import BaseModelInfo
from .registry import tracking
from .training.launcher import run_trials, train_in_process
from .training.replay import replay_rows

TRIALS_DIR = "trials"
log = logging.getLogger(__name__)


def search_trials(cfg: PipelineConfig, task_rows: list[dict], run_dir: str, parent_run_id: str | None,
                  base_info: BaseModelInfo | None, search_rows: list[dict], incumbent: Candidate | None,
                  first_order: int = 0) -> list[Trial]:
    """Train and judge the search's trials beyond the configured run (`remedy.max_trials` - 1 of
    them, smallest change first), each at every scale. Trial order continues from `first_order`."""
    grid = search_grid(search_space(cfg), cfg.remedy.max_trials)[1:]
    log.info("remedy search: training %d more adapter(s) as Ray Tune trials: %s", len(grid),
             "; ".join(trial_name(g) for g in grid))
    trial = partial(run_trial, cfg, task_rows, search_rows, str(run_dir), parent_run_id, base_info)
    metric, higher = primary_metric(cfg)
    trials = []
    for rows in run_trials(cfg, trial, grid, run_dir):
        adapter_dir = local_adapter(cfg, rows[0]["adapter_dir"], rows[0]["run_id"], run_dir)
        for row in rows:
            cand = candidate_from_metrics(row["metrics"], metric, higher, row["forgetting"])
            trials.append(judge(Trial(trial_name(row["settings"]), row["settings"], cand, first_order + len(trials),
                                      row["seconds"], row["run_id"], adapter_dir), incumbent, cfg.promotion))
            log.info("remedy trial %s", describe_trial(trials[-1]))
    return trials


def run_trial(cfg: PipelineConfig, task_rows: list[dict], search_rows: list[dict], run_dir: str,
              parent_run_id: str | None, base_info: BaseModelInfo | None, settings: dict) -> list[dict]:
    """One trial, wherever Ray Tune placed it: train the adapter of `settings` (continuing from its
    checkpoint if an earlier attempt got that far), score it at every scale on the search part,
    record it as a child MLflow run (params, figures per scale, the adapter). Plain-JSON rows,
    one per scale: settings, flat metrics, forgetting, seconds, run id, adapter folder."""
    started = time.perf_counter()
    tcfg = trial_config(cfg, settings)
    trial_dir = Path(run_dir) / TRIALS_DIR / _slug(settings)
    uri = cfg.tracking.tracking_uri
    child = tracking.start_child_run(uri, parent_run_id, trial_name(settings), settings) if parent_run_id else None
    try:
        rows = task_rows + replay_rows(tcfg, len(task_rows), base_info)
        trained = train_in_process(tcfg, rows, trial_dir, step_log=child and tracking.metric_logger(uri, child, trial_dir))
        train_seconds = time.perf_counter() - started
        if child:  # what the store could not take during training (an outage), before the trial's other writes
            tracking.replay_kept_points(uri, child, trial_dir)
        ev = Evaluation(tcfg, trained.adapter_dir, base_info=base_info, train_rows=task_rows)
        out = []
        for scale in cfg.remedy.scales:
            t0 = time.perf_counter()
            rep = ev.report(search_rows, part=Part("search", cfg.remedy.confirm_fraction), scale=scale)
            seconds = time.perf_counter() - t0 + (train_seconds if not out else 0.0)
            out.append({"settings": {**settings, "scale": scale}, "metrics": rep.flat_metrics(), "forgetting": rep.forgetting,
                        "seconds": seconds, "run_id": child, "adapter_dir": trained.adapter_dir})
            if child:
                tracking.log_metrics(uri, child, {"task_gain": rep.task_gain, **rep.forgetting,
                                                  **{f"{k}_ci_high": v[2] for k, v in rep.intervals.items()},
                                                  **{f"{k}_ci_low": v[1] for k, v in rep.intervals.items()}},
                                     step=round(scale * 100))
        if child:
            tracking.log_artifact(uri, child, trained.adapter_dir, "adapter")
            tracking.set_run_tags(uri, child, {"mlflow.note.content": _trial_note(settings, out)})
            tracking.end_run(uri, child)
    except BaseException:
        if child:
            tracking.end_run(uri, child, status="FAILED")
        raise
    return out


def _trial_note(settings: dict, rows: list[dict]) -> str:
    """The child run's description: the trial's settings and its figures at each scale (search part)."""
    bounded = [k for k in rows[0]["forgetting"] if forgetting_metric(k)]  # what the gate reads
    lines = [f"Remedy search trial **{trial_name(settings)}**: figures on the search part, one row per scale.", "",
             "| scale | task gain | " + " | ".join(bounded) + " |", "| --- | --- | " + " | ".join("---" for _ in bounded) + " |"]
    for row in rows:
        lines.append(f"| {row['settings']['scale']:g} | {row['metrics']['task_gain']:.4g} | "
                     + " | ".join(f"{row['forgetting'][k]:.4g}" for k in bounded) + " |")
    return "\n".join(lines)


def local_adapter(cfg: PipelineConfig, adapter_dir: str, run_id: str | None, run_dir: str | Path) -> str:
    """A search trial's adapter on this machine: its folder when this machine trained it, else
    downloaded from its child run (a trial that ran on another node of the cluster)."""
    if Path(adapter_dir).is_dir() or not run_id:
        return adapter_dir
    dst = Path(run_dir) / TRIALS_DIR / "downloaded" / run_id
    return str(tracking.download_artifacts(cfg.tracking.tracking_uri, run_id, "adapter", dst))


def _slug(settings: dict) -> str:
    """A folder name per trial, the same for the same settings (a retry continues its checkpoints)."""
    return "trial-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
