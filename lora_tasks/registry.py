"""MLflow I/O: runs, metrics, artifacts, the adapter model, versions and aliases. No decisions."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from .config import PipelineConfig
from .errors import RegistryError

CHAMPION, CHALLENGER = "champion", "challenger"
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to `tracking_uri`; also points the fluent API there (pyfunc logging needs it)."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(c: MlflowClient, name: str, artifact_location: str) -> str:
    """The experiment's id, creating it with an explicit artifact location when absent."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location if "://" in artifact_location else Path(artifact_location).resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config as `section.key` -> string, the way MLflow params want it."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def start_run(cfg: PipelineConfig, run_name: str, tags: dict[str, str]) -> str:
    """Create the pipeline's MLflow run with the config as params; returns the run id."""
    c = client(cfg.tracking.tracking_uri)
    exp_id = ensure_experiment(c, cfg.experiment_name, cfg.tracking.artifact_location)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    params = flatten(cfg.model_dump(mode="json"))
    items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log numeric metrics in one batch; non-numbers are skipped."""
    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if items:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=items)


def metric_logger(tracking_uri: str, run_id: str):
    """A `(metrics, step)` callback for the training loop that logs to the run."""

    def log(metrics: dict, step: int) -> None:
        log_metrics(tracking_uri, run_id, metrics, step)

    return log


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or folder to the run's artifacts."""
    c = MlflowClient(tracking_uri)
    p = Path(path)
    (c.log_artifacts if p.is_dir() else c.log_artifact)(run_id, str(p), artifact_path)


def log_table(tracking_uri: str, run_id: str, rows: list[dict], artifact_file: str) -> None:
    """Log rows as an MLflow table (shown in the run's Artifacts and the evaluation view)."""
    if rows:
        import pandas as pd

        MlflowClient(tracking_uri).log_table(run_id, pd.DataFrame(rows), artifact_file)


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = MlflowClient(tracking_uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def _requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "transformers", "peft", "safetensors", "pandas", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    return reqs


def log_adapter_model(cfg: PipelineConfig, run_id: str, adapter_dir: str, base_name_or_path: str) -> str:
    """Log the adapter as a pyfunc model that references its base; returns the model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from . import pyfunc_model

    client(cfg.tracking.tracking_uri)
    if cfg.task == "causal_lm":
        outputs = Schema([ColSpec("string", "completion")])
        params = ParamSchema([ParamSpec("max_new_tokens", "long", 64)])
    else:
        outputs = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
        params = None
    signature = ModelSignature(inputs=Schema([ColSpec("string", pyfunc_model.INPUT_COLUMN[cfg.task])]), outputs=outputs, params=params)
    model_config = {
        "task": cfg.task,
        "base_model": base_name_or_path,
        "revision": cfg.base_model.revision,
        "labels": [str(x) for x in cfg.data.labels] if cfg.data.labels else None,
        "torch_dtype": cfg.base_model.torch_dtype,
        "max_seq_length": cfg.training.max_seq_length,
        "seed": cfg.training.seed,
        "chat_template": cfg.data.chat_template,
        "system_prompt": cfg.data.system_prompt,
    }
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="adapter",
            python_model=pyfunc_model.__file__,  # model from code: loading unpickles nothing
            artifacts={"adapter": str(adapter_dir)},
            model_config=model_config,
            signature=signature,
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=_requirements(),
        )
    return info.model_uri


@dataclass(frozen=True)
class VersionInfo:
    """A registered version and the metrics of the run that produced it."""

    version: str
    run_id: str | None
    metrics: dict[str, float]
    tags: dict[str, str]


def register_version(tracking_uri: str, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Register a new version of `name` from `model_uri` with lineage tags; alias it `challenger`."""
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="LoRA adapters trained and gated by prefect-lora")
    mv = c.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def get_alias(tracking_uri: str, name: str, alias: str = CHAMPION) -> VersionInfo | None:
    """The version behind `alias` and its run's metrics, or None when the alias is not set."""
    c = client(tracking_uri)
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            return None
        raise RegistryError(f"cannot read alias {alias!r} of {name!r}: {exc}") from exc
    metrics = c.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return VersionInfo(str(mv.version), mv.run_id, dict(metrics), dict(mv.tags))


def record_decision(tracking_uri: str, name: str, version: str, promote: bool, reasons: list[str]) -> None:
    """Tag the version with the gate's decision and reasons; move `champion` when it passed."""
    c = client(tracking_uri)
    c.set_model_version_tag(name, version, "promotion.decision", "promoted" if promote else "rejected")
    c.set_model_version_tag(name, version, "promotion.reasons", "\n".join(reasons)[:5000])
    if promote:
        c.set_registered_model_alias(name, CHAMPION, version)
