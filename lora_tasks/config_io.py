"""From text to a config: `--set key.path=value` overrides, pydantic errors as one line each,
and paths made absolute when a config is loaded. `config.py` holds the config's types."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .errors import ConfigError

REPLACED = {
    "max_representation_drift": "no longer a setting: a classifier's forgetting is now the share of its encoder's retrieval hits lost "
                                "on the reference corpus, bounded by promotion.max_retrieval_loss (docs/gate.md)",
}
"""Keys of earlier versions, with what replaced them."""


def format_error(err: dict) -> str:
    """One pydantic error as `key.path: what is wrong (got value)`."""
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: {REPLACED.get(str(err['loc'][-1]), 'unknown key (check its spelling and section)')}"
    if kind == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if kind != "value_error" and not isinstance(value, (dict, list)):
        return f"{path}: {msg} (got {value!r})"
    return f"{path}: {msg}"


def yaml_error(exc: Exception) -> str:
    """`not valid YAML at line L, column C: what` for a YAMLError (its mark, where it has one)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"


def parse_overrides(overrides: list[str] | None) -> list[tuple[list[str], Any]]:
    """Parse `key.path=value` strings; values are read as YAML (numbers, booleans, lists)."""
    parsed, problems = [], []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not k for k in key.strip().split(".")):
            problems.append(f"--set {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problems.append(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})")
            continue
        parsed.append((key.strip().split("."), value))
    if problems:
        raise ConfigError(problems, source="overrides")
    return parsed


def plain(value: Any, path: str = "", problems: list[str] | None = None, source: str = "config") -> Any:
    """A deep copy of `value` as plain data (mappings with string keys, lists, strings, numbers,
    booleans, null): a YAML date or time stays the text it was written as (the field then says
    whether it takes one); binary data and sets, which no setting takes, are problems naming
    their key. Raises one ConfigError with every problem when called at the top."""
    top = problems is None
    problems = [] if top else problems
    if isinstance(value, dict):
        out = {str(k): plain(v, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        out = [plain(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    elif isinstance(value, (datetime.date, datetime.time)):
        out = value.isoformat()
    elif isinstance(value, str) and "\x00" in value:
        problems.append(f"{path or '(top level)'}: contains a NUL character (\\x00); remove it")
        out = None
    elif isinstance(value, (bytes, set)):
        kind = "binary data (!!binary)" if isinstance(value, bytes) else "a set (!!set)"
        problems.append(f"{path or '(top level)'}: {kind} is not a setting; write a plain value")
        out = None
    else:
        out = value
    if top and problems:
        raise ConfigError(problems, source=source)
    return out


def apply_overrides(raw: dict, overrides: list[str] | None, source: str = "config") -> dict:
    """Return a plain copy of `raw` (`plain`) with every `key.path=value` override applied."""
    data = plain(raw, source=source)
    problems = []
    for keys, value in parse_overrides(overrides):
        value = plain(value, ".".join(keys), source="overrides")
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section")
                break
            node = child
        else:
            node[keys[-1]] = value
    if problems:
        raise ConfigError(problems, source="overrides")
    return data


def _expand(path: str) -> Path:
    """`path` with `~` or `~user` expanded; a user without a home here is a config error."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # ~name of no user pathlib can find
        home = path.split("/")[0]
        raise ConfigError([f"path {path!r}: {home!r} names no home directory on this machine; write the full path"]) from None


def _absolute(path: str | None) -> str | None:
    if path is None or "://" in path or path.startswith("builtin:"):
        return path
    return str(_expand(path).resolve())


def resolve_paths(cfg: BaseModel) -> BaseModel:
    """A `PipelineConfig`'s relative paths made absolute against the working directory (Ray workers have another one);
    `RAY_ADDRESS` as the cluster address when the config names none."""
    cfg.data.train_path = _absolute(cfg.data.train_path)
    cfg.data.eval_path = _absolute(cfg.data.eval_path)
    if cfg.evaluation.reference and cfg.evaluation.reference.path:
        cfg.evaluation.reference.path = _absolute(cfg.evaluation.reference.path)
    if cfg.evaluation.reference and cfg.evaluation.reference.benchmarks:
        cfg.evaluation.reference.benchmarks = [_absolute(b) for b in cfg.evaluation.reference.benchmarks]
    bm = cfg.base_model.name_or_path
    if bm.startswith((".", "/", "~")) or _expand(bm).exists():
        cfg.base_model.name_or_path = _absolute(bm)
    cfg.replay.path = _absolute(cfg.replay.path)
    cfg.scaling.storage_path = _absolute(cfg.scaling.storage_path)
    cfg.tracking.artifact_location = _absolute(cfg.tracking.artifact_location)
    uri = cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.tracking.tracking_uri = "sqlite:///" + _absolute(uri.removeprefix("sqlite:///"))
    if cfg.scaling.address is None and os.environ.get("RAY_ADDRESS"):
        cfg.scaling.address = os.environ["RAY_ADDRESS"]
    return cfg


def without_default(d: dict, path: list[str], key: str, default: Any) -> dict:
    """`d` without `key` of the section at `path` (a list of keys) when it holds `default`."""
    node = d.get(path[0])
    if not isinstance(node, dict):
        return d
    if len(path) > 1:
        return {**d, path[0]: without_default(node, path[1:], key, default)}
    if key in node and node[key] == default:
        return {**d, path[0]: {k: v for k, v in node.items() if k != key}}
    return d


def without_defaults_added_later(d: dict) -> dict:
    """`d` without settings added after configs were first hashed, while they hold their
    default: a config that does not use them keeps the hash it had (and its run folder, and the
    scheduled run still skips)."""
    unused = {"remedy": d.get("remedy", {}).get("strategy") == "none", "replay": not d.get("replay", {}).get("share")}
    d = {k: v for k, v in d.items() if not unused.get(k)}  # sections added later, while unused
    for section, key, default in _ADDED_LATER:
        d = without_default(d, section.split("."), key, default)
    if d.get("task") == "causal_lm" and isinstance(d.get("promotion"), dict):  # as hashed before it was replaced
        d = {**d, "promotion": {**d["promotion"], "max_representation_drift": 0.2}}
    return d


# (section, setting, default) of settings added after configs were first hashed
_ADDED_LATER = (("training", "packing", False), ("scaling", "launcher", "auto"), ("training", "attention", "auto"),
                ("replay", "kl_weight", 0.0), ("promotion", "underpowered", "error"),
                ("promotion", "more_evidence", None), ("evaluation.reference", "max_probes", None),
                ("data.validation", "check_conflicts", True), ("evaluation", "baseline_rows", 20_000),
                ("promotion", "max_retrieval_loss", 0.7))
