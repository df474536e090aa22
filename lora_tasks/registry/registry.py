"""MLflow model registry I/O: the adapter logged as a pyfunc model, its registered versions (read by
number or alias, described, downloaded, listed, deleted). No decisions; alias moves are in
`aliases.py`, what `status` and `history` read in `overview.py`."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..config import PipelineConfig
from ..errors import RegistryError, UnknownModel
from ..measurement.forgetting_table import forgetting_metric
from ..versions import CHALLENGER, CHAMPION, canonical_version, is_version  # noqa: F401  (the alias names, here too)
from .tracking import CURVE, client, flat_name, metric_key, run_datasets, run_metrics


def _requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "transformers", "peft", "safetensors", "pandas", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    return reqs


def log_adapter_model(cfg: PipelineConfig, run_id: str, adapter_dir: str, base_name_or_path: str) -> str:
    """Log the adapter as a pyfunc model that references its base, `<model>-adapter`, described
    (`adapter_about`) and linked to its run (`_link_to_run`); returns the model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from . import pyfunc_model

    c = client(cfg.tracking.tracking_uri)
    if cfg.task == "causal_lm":
        outputs = Schema([ColSpec("string", "completion")])
        params = ParamSchema([ParamSpec("max_new_tokens", "long", 64)])
    else:
        outputs = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
        params = None
    signature = ModelSignature(inputs=Schema([ColSpec("string", pyfunc_model.INPUT_COLUMN[cfg.task])]), outputs=outputs, params=params)
    run = c.get_run(run_id)
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
        # a local base is pinned by content: loading checks the folder still holds the same bytes
        "base_model_hash": run.data.tags.get("lineage.base_model_hash") or None,
        **answer_contract(cfg),
    }
    # Created here, outside an active run: `log_model` in the run would link to the model every
    # metric the run holds at its step (the first sample of CPU use, the timings), not what speaks for it.
    model = mlflow.initialize_logged_model(
        name=f"{cfg.model_name}-adapter", source_run_id=run_id, model_type="lora-adapter",
        experiment_id=run.info.experiment_id, params=run.data.params,
        tags={NOTE: f"{adapter_about(cfg.model_name, run.data.tags)}\n\nRegistered; the gate has not decided yet."})
    import tempfile

    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        # The signature is given; MLflow's advice to add an input example or type hints is noise here.
        warnings.filterwarnings("ignore", message=r".*(input example was not provided|Add type hints)", category=UserWarning)
        # The settings travel as an artifact, not as `model_config`, which MLflow would also log
        # as run params that repeat the config's (`seed` beside `training.seed`).
        settings = Path(tmp) / SETTINGS_FILE
        settings.write_text(json.dumps(model_config, indent=1))
        info = mlflow.pyfunc.log_model(
            name=model.name, model_id=model.model_id,
            python_model=pyfunc_model.__file__,  # model from code: loading unpickles nothing
            artifacts={"adapter": str(adapter_dir), "settings": str(settings)},
            signature=signature,
            code_paths=[str(Path(__file__).resolve().parents[1])],  # lora_tasks, which the model file imports
            pip_requirements=_requirements(),
        )
    _link_to_run(c, model.model_id, run_id)
    return info.model_uri


def answer_contract(cfg: PipelineConfig) -> dict:
    """What a served version's answers must be, for the live output checks: `answer_format`
    `json` (a JSON object, as evaluation scores `metric: json`) and its `required_fields`."""
    gen = cfg.evaluation.generation
    if cfg.task != "causal_lm" or gen is None or gen.metric != "json":
        return {}
    return {"answer_format": "json", "required_fields": list(gen.required_fields)}


NOTE = "mlflow.note.content"
"""The tag the MLflow UI shows as a logged model's (and a run's) description."""


def adapter_about(model_name: str, lineage: dict[str, str]) -> str:
    """A logged adapter's first lines: what it is for, its base (by id, with its revision or
    content hash) and its data, from the lineage tags of its run or version."""
    base, revision, digest = (lineage.get(f"lineage.base_model{k}") for k in ("", "_revision", "_hash"))
    pinned = f" at revision {revision}" if revision else f" (content sha256 {digest[:12]})" if digest else ""
    return (f"LoRA adapter of `{model_name}` ({lineage.get('lineage.task', 'task unknown')}) on the base model "
            f"{base or 'unknown'}{pinned}; trained on `{model_name}-train`, scored on `{model_name}-eval`.")


def _link_to_run(c: MlflowClient, model_id: str, run_id: str) -> None:
    """The run's output at its last training step; as the model's metrics, the run's own points
    (not copies): its headline figures (the task's on the eval dataset, forgetting on none) and
    its last training loss (on the train dataset), so the model's page names the datasets used."""
    from mlflow.entities import LoggedModelOutput, Metric

    datasets = run_datasets(c, run_id)
    curve = c.get_metric_history(run_id, metric_key("train_loss"))
    last = max(curve, key=lambda m: m.step) if curve else None
    c.log_outputs(run_id, [LoggedModelOutput(model_id, step=last.step if last else 0)])
    points = [(last, datasets.get("train"))] if last else []
    for key in c.get_run(run_id).data.metrics:
        if key.startswith("system/") or flat_name(key) in CURVE:
            continue
        point = max(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        points.append((point, None if forgetting_metric(flat_name(key)) else datasets.get("eval")))
    c.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id,
                                        dataset_name=on and on[0], dataset_digest=on and on[1]) for m, on in points])


SETTINGS_FILE = "adapter_settings.json"
"""The logged model's settings (task, base, revision, labels, prompting, answer contract): the `settings` artifact."""


@dataclass(frozen=True)
class VersionInfo:
    """A registered version and the metrics of the run that produced it."""

    version: str
    run_id: str | None
    metrics: dict[str, float]
    tags: dict[str, str]


def register_version(tracking_uri: str, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Register a new version of `name` from `model_uri` with `tags`, linked to its logged model.
    Pointing `challenger` at it is an alias move: `aliases.set_challenger`."""
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="LoRA adapters trained and gated by prefect-lora")
    # A tracking server accepts a `models:/m-...` source only with its model id (a SQLite store does not check).
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = c.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                model_id=model_id)
    if model_id:
        _link_logged_model(c, model_id, name, str(mv.version))
    return str(mv.version)


def version_tags(run_tags: dict[str, str]) -> dict[str, str]:
    """The run's tags its registered version carries too: lineage (what the skip check and the
    champion comparison read) and the remedy. The rest stay on the run, which the version links;
    with the gate's and the evaluation's tags a version has at most 15."""
    return {k: v for k, v in run_tags.items() if k.startswith("lineage.") or k == "remedy"}


def _link_logged_model(c: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Name the version on its logged model (`mlflow.modelVersions`), so the model's page in the
    UI links to it. A tracking server does this itself; a local store does not."""
    key = "mlflow.modelVersions"
    linked = json.loads(c.get_logged_model(model_id).tags.get(key) or "[]")
    if {"name": name, "version": version} not in linked:
        c.set_logged_model_tags(model_id, {key: json.dumps([*linked, {"name": name, "version": version}])})


def get_alias(tracking_uri: str, name: str, alias: str = CHAMPION) -> VersionInfo | None:
    """The version behind `alias` and its run's metrics, or None when the alias is not set."""
    c = client(tracking_uri)
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            return None
        raise RegistryError(f"cannot read alias {alias!r} of {name!r}: {exc}") from exc
    return VersionInfo(str(mv.version), mv.run_id, _version_metrics(tracking_uri, mv), dict(mv.tags))


def require_model(c: MlflowClient, name: str):
    """The registered model `name`; a clear error naming the models that exist when it does not."""
    try:
        return c.get_registered_model(name)
    except MlflowException:
        raise UnknownModel(name, sorted(m.name for m in c.search_registered_models(max_results=50))) from None


def get_version(tracking_uri: str, name: str, version: str) -> VersionInfo:
    """One version and its run's metrics; a clear error when the model or version does not exist."""
    c = client(tracking_uri)
    require_model(c, name)
    version = canonical_version(version)
    try:
        mv = c.get_model_version(name, version)
    except MlflowException:
        known = sorted((int(v.version) for v in c.search_model_versions(f"name = '{name}'")), reverse=True)
        raise RegistryError(
            f"{name!r} has no version {version!r}; its versions are {known[:20] or 'none'}"
        ) from None
    return VersionInfo(str(mv.version), mv.run_id, _version_metrics(tracking_uri, mv), dict(mv.tags))


def resolve_version(tracking_uri: str, name: str, ref: str | None = None) -> str:
    """A version number from an alias (`champion`, `challenger`, ...) or a version string."""
    ref = CHAMPION if ref in (None, "") else str(ref)
    if is_version(ref):
        return get_version(tracking_uri, name, ref).version
    c = client(tracking_uri)
    model = require_model(c, name)
    info = get_alias(tracking_uri, name, ref)
    if info is None:
        raise RegistryError(
            f"{name!r} has no alias {ref!r}; its aliases are {sorted(model.aliases) or 'none'}. "
            f"Promote a version first (prefect-lora promote {name} VERSION --reason ...) or name a version"
        )
    return info.version


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """`NAME@ALIAS`, `NAME/VERSION` or `NAME` (the champion) -> (name, alias or version or None)."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        return name, alias or None
    if "/" in ref:
        name, _, version = ref.rpartition("/")
        return name, version or None
    return ref, None


def record_evaluation(tracking_uri: str, name: str, version: str, metrics: dict[str, float], primary_metric: str) -> None:
    """Put the evaluation that justifies a version on the version itself, in three tags: the
    primary metric, its headline figures (`eval.summary`: base and adapted score, gain, the
    forgetting measures) and the gate's intervals (`eval.intervals`, `[low, high]` by name, which
    a later run's gate reads when it compares against this version). Every other figure stays on
    the run."""
    c = client(tracking_uri)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    headline = {k: round(v, 6) for k, v in numbers.items()
                if k in (f"base_{primary_metric}", f"adapted_{primary_metric}", "task_gain", "champion_delta")
                or (forgetting_metric(k) and "_ci_" not in k)}
    gated = [k for k in {k.removesuffix("_ci_low") for k in numbers} if k in ("task_gain", "champion_delta")
             or forgetting_metric(k)]  # what a gate reads of an incumbent (`promotion.candidate_from_metrics`)
    intervals = {k: [round(numbers[f"{k}_ci_low"], 6), round(numbers[f"{k}_ci_high"], 6)]
                 for k in sorted(gated) if f"{k}_ci_low" in numbers and f"{k}_ci_high" in numbers}
    c.set_model_version_tag(name, version, "eval.primary_metric", primary_metric)
    c.set_model_version_tag(name, version, "eval.summary", json.dumps(headline, sort_keys=True))
    c.set_model_version_tag(name, version, "eval.intervals", json.dumps(intervals, sort_keys=True))


def _version_metrics(tracking_uri: str, mv) -> dict[str, float]:
    """The flat metrics of the run behind version `mv`, with the evaluation recorded on the version:
    its headline figures (`eval.summary`: base and adapted score and the rest the run logs as
    no metric) and the gate's intervals (`eval.intervals`) as `<name>_ci_low/_ci_high`."""
    metrics = run_metrics(tracking_uri, mv.run_id) if mv.run_id else {}
    for k, v in json.loads(mv.tags.get("eval.summary") or "{}").items():
        metrics.setdefault(k, v)
    for k, (low, high) in json.loads(mv.tags.get("eval.intervals") or "{}").items():
        metrics.setdefault(f"{k}_ci_low", low)
        metrics.setdefault(f"{k}_ci_high", high)
    return metrics


def describe_version(tracking_uri: str, name: str, version: str, text: str) -> None:
    """Set a version's description (the MLflow UI shows it on the version page), and its logged
    model's: what the adapter is (`adapter_about`), then the same text."""
    c = client(tracking_uri)
    c.update_model_version(name, version, description=text[:5000])
    mv = c.get_model_version(name, version)
    model_id = mv.model_id or (mv.source.removeprefix("models:/") if mv.source.startswith("models:/m-") else None)
    if model_id:
        c.set_logged_model_tags(model_id, {NOTE: f"{adapter_about(name, mv.tags)}\n\nVersion {version}: {text}"[:5000]})


@dataclass(frozen=True)
class VersionFiles:
    """A registered version's files on local disk: its PEFT adapter and the pyfunc model config."""

    name: str
    version: str
    model_dir: Path
    adapter_dir: Path
    model_config: dict


def download_version(tracking_uri: str, name: str, version: str, dst: str | Path | None = None) -> VersionFiles:
    """Fetch version `version` of `name` (MLmodel + adapter) and check its adapter is safetensors."""
    import tempfile

    import yaml

    get_version(tracking_uri, name, version)  # a clear error for unknown names and versions
    client(tracking_uri)
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix=f"pl-{name}-v{version}-"))
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    model_config = _settings(mlmodel, lambda path: local / path)
    artifacts = (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}
    adapter = local / (artifacts.get("adapter", {}).get("path") or "artifacts/adapter")
    if not (adapter / "adapter_model.safetensors").is_file() or not (adapter / "adapter_config.json").is_file():
        raise RegistryError(
            f"version {version} of {name!r} has no adapter_config.json + adapter_model.safetensors under its "
            "artifacts/adapter; only safetensors adapters are loaded (no pickle). Re-register it with prefect-lora"
        )
    return VersionFiles(name, str(version), local, adapter, dict(model_config))


def version_settings(tracking_uri: str, name: str, version: str) -> dict:
    """A registered version's settings (`SETTINGS_FILE`: task, base, labels, answer contract)
    without its adapter's weights: what the serving gateway reads of a version."""
    import tempfile

    import yaml

    client(tracking_uri)
    uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        def fetch(path: str) -> Path:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{path}", dst_path=tmp))

        return _settings(yaml.safe_load(fetch("MLmodel").read_text()), fetch)


def _settings(mlmodel: dict, fetch) -> dict:
    """The settings of a logged model whose MLmodel is `mlmodel`; `fetch(path)` gives one of its files."""
    pyfunc = mlmodel.get("flavors", {}).get("python_function", {}) or {}
    artifacts = pyfunc.get("artifacts") or {}
    if "settings" in artifacts:
        return json.loads(fetch(artifacts["settings"]["path"]).read_text())
    return pyfunc.get("model_config") or pyfunc.get("config") or {}  # logged before the settings artifact


def download_adapter(tracking_uri: str, name: str, version: str, dst_dir: str | Path) -> Path:
    """The PEFT adapter folder of version `version` of `name`, downloaded under `dst_dir` (e.g.
    the champion's, to score it beside a new adapter on the same base and data)."""
    return download_version(tracking_uri, name, version, dst_dir).adapter_dir


# ---------------------------------------------------------------------------------------------
# Operations: retention deletes.
# ---------------------------------------------------------------------------------------------


def list_versions(tracking_uri: str, name: str) -> list[str]:
    """Every version number of `name` (an empty list when the model does not exist)."""
    c = client(tracking_uri)
    return sorted((str(v.version) for v in c.search_model_versions(f"name = '{name}'")), key=int)


def versions_with_tags(tracking_uri: str, name: str) -> list[tuple[str, dict[str, str]]]:
    """Every version number of `name` with its tags (lineage, the gate's decision), oldest first;
    an empty list when the model does not exist."""
    found = client(tracking_uri).search_model_versions(f"name = '{name}'")
    return [(str(v.version), dict(v.tags)) for v in sorted(found, key=lambda v: int(v.version))]


def delete_versions(tracking_uri: str, name: str, versions: list[str]) -> list[str]:
    """Delete these versions of `name`, refusing any that an alias points at; returns those deleted."""
    c = client(tracking_uri)
    aliased = set(c.get_registered_model(name).aliases.values()) if versions else set()
    done = []
    for v in versions:
        if str(v) in {str(a) for a in aliased}:
            raise RegistryError(f"refusing to delete version {v} of {name!r}: an alias points at it")
        c.delete_model_version(name, str(v))
        done.append(str(v))
    return done
