"""From text to a config: YAML read within bounds (file size, nesting, alias expansion, number
size: no input hangs or escapes as anything but a ConfigError), `--set key.path=value` overrides,
the sections' strict numbers, pydantic errors as one line each, and paths made absolute when a
config is loaded. `config.py` holds the config's types."""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import os
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationInfo, field_validator

from .errors import ConfigError

MAX_FILE_BYTES = 256 * 1024
"""Largest config, fleet or serve file read: a config is a few KiB, and YAML is read at ~0.3 MB/s."""
MAX_DEPTH = 32
"""Deepest nesting of sections and lists a config may have (one nests four levels), refused by key."""
MAX_YAML_DEPTH = 100
"""Deepest nesting the YAML reader composes (beyond it, a YAML error at its line: no RecursionError)."""
MAX_VALUES = 100_000
"""Most keys and values (sections, list items, scalars) a file may expand to, YAML aliases counted each time used."""
MAX_CHARS = 10_000_000
"""Most characters of text (keys and strings) a file may expand to, aliases counted each time."""
LARGEST_INT = 2**63 - 1
"""Largest integer any setting takes (a 64-bit count or seed); beyond it an integer is refused by key."""
OUT_OF_RANGE = f"the number is out of range: no setting takes an integer beyond {LARGEST_INT:,} (2**63 - 1)"

REPLACED = {
    "max_representation_drift": "no longer a setting: a classifier's forgetting is now the share of its encoder's retrieval hits lost "
                                "on the reference corpus, bounded by promotion.max_retrieval_loss (docs/gate.md)",
}
"""Keys of earlier versions, with what replaced them."""


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to about `limit` characters (a long string says how long it was)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than str() converts
        return "(a number of thousands of digits)"
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return f"{text[: limit - 20]}...{size}"


def format_error(err: dict, model: type[BaseModel] | None = None) -> str:
    """One pydantic error as `key.path: what is wrong (got value)`; an unknown key of a `model`
    config names the key meant (`unknown_key`)."""
    path = ".".join(_in_path(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: {REPLACED.get(str(err['loc'][-1])) or unknown_key(model, err['loc'])}"
    if kind == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if kind != "value_error" and not isinstance(value, (dict, list)):
        return f"{path}: {msg} (got {shown(value)})"
    return f"{path}: {msg}"


def unknown_key(model: type[BaseModel] | None, loc: tuple) -> str:
    """What to say of the unknown key at `loc` (a pydantic error's location) of a `model` config:
    the nearest key of its section (`did you mean `learning_rate`?`), else the key of that name in
    another section (`scaling.num_workers`), else to check its spelling and section."""
    key, section = str(loc[-1]), _section_at(model, loc[:-1])
    if section is not None and (near := difflib.get_close_matches(key, list(section.model_fields), n=1)):
        return f"unknown key: did you mean `{near[0]}`?"
    if model is not None and (elsewhere := [p for p in _key_paths(model) if p.rpartition(".")[2] == key]):
        return f"unknown key here: did you mean `{elsewhere[0]}`?"
    return "unknown key (check its spelling and section)"


def _section_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The section type at key path `loc` of `model` (list indexes skipped), None when none is."""
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        model = _section_type(field.annotation) if field else None
    return model


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section type `annotation` holds (itself, or inside an Optional or a list), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((t for a in get_args(annotation) if (t := _section_type(a))), None)


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of a `model` config, sections first-level first (`training.learning_rate`)."""
    paths = [f"{prefix}{name}" for name in model.model_fields]
    for name, field in model.model_fields.items():
        if section := _section_type(field.annotation):
            paths += _key_paths(section, f"{prefix}{name}.")
    return paths


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
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            problems.append(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})")
            continue
        parsed.append((key.strip().split("."), value))
    if problems:
        raise ConfigError(problems, source="overrides")
    return parsed


class HugeInt(str):
    """A YAML integer of more digits than Python converts (4,300): kept as its text, for `plain` to
    refuse under its key (no setting takes a number that large)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: nesting deeper than MAX_YAML_DEPTH is a YAML error (not a
    RecursionError), and an integer too long to convert is a HugeInt (not a ValueError)."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep (a "
                                                  "config nests a few)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | HugeInt:
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # more digits than int() converts
        return HugeInt(node.value)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(text: str) -> Any:
    """The YAML document in `text`, read safely (`yaml.safe_load`'s types) and bounded (`_Loader`).
    Raises yaml.YAMLError. Aliases still share their anchor's object: `plain` bounds the expansion."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: Path, source: str) -> Any:
    """The YAML document of the file at `path` (`load_yaml`): a ConfigError for a file larger than
    MAX_FILE_BYTES (reading stops there, a device never ends), not UTF-8 text, or not valid YAML.
    An OSError of reading is raised as it is."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        problem = (f"the file is larger than {MAX_FILE_BYTES // 1024} KiB, and a config is a few KiB: "
                   "give the path of the YAML config")
        raise ConfigError([problem], source)
    try:
        return load_yaml(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(["file is not UTF-8 text"], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_error(exc)], source) from None


def plain(value: Any, path: str = "", problems: list[str] | None = None, source: str = "config") -> Any:
    """A deep copy of `value` as plain data (mappings with string keys, lists, strings, numbers,
    booleans, null): a YAML date or time stays the text it was written as (the field then says
    whether it takes one); binary data, sets, NUL characters and integers beyond LARGEST_INT, which
    no setting takes, are problems naming their key. Raises one ConfigError with every problem when
    called at the top; at once, naming the key it reached, when the copy would nest deeper than
    MAX_DEPTH or exceed MAX_VALUES or MAX_CHARS (YAML aliases inside aliases: a few lines can
    expand to billions of values)."""
    top = problems is None
    problems = [] if top else problems
    out = _PlainCopy(problems, source).copy(value, path, 0)
    if top and problems:
        raise ConfigError(problems, source=source)
    return out


class _PlainCopy:
    """One bounded walk of `plain`: where its problems go, and how much it has copied."""

    def __init__(self, problems: list[str], source: str):
        self.problems, self.source, self.values, self.chars = problems, source, 0, 0

    def copy(self, value: Any, path: str, depth: int) -> Any:
        self._count(value, path, depth)
        if isinstance(value, dict):
            return {self._key(k, path, depth): self.copy(v, f"{path}.{_in_path(k)}" if path else _in_path(k), depth + 1)
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.copy(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, (datetime.date, datetime.time)):
            return value.isoformat()
        if problem := _not_plain(value):
            self.problems.append(f"{path or '(top level)'}: {problem}")
            return None
        return value

    def _key(self, key: Any, path: str, depth: int) -> str:
        key = str(key) if not isinstance(key, int) or abs(key) <= LARGEST_INT else "(a number too large)"
        self._count(key, path, depth)
        if problem := _not_plain(key):
            self.problems.append(f"{path}.{_in_path(key)}: the key {problem}" if path else f"{_in_path(key)}: the key {problem}")
        return key

    def _count(self, value: Any, path: str, depth: int) -> None:
        self.values += 1
        self.chars += len(value) if isinstance(value, str) else 0
        where = path or "(top level)"
        if depth > MAX_DEPTH:
            problem = (f"{where}: nested more than {MAX_DEPTH} levels deep (a YAML alias inside its own anchor?); "
                       "a config nests a few")
            raise ConfigError([problem], self.source)
        if self.values > MAX_VALUES or self.chars > MAX_CHARS:
            size = f"{MAX_VALUES:,} values" if self.values > MAX_VALUES else f"{MAX_CHARS:,} characters of text"
            problem = (f"{where}: the config expands to more than {size} (YAML aliases, *name, that repeat anchors "
                       "holding aliases?); a config holds a few hundred values: write each one out once")
            raise ConfigError([problem], self.source)


def _not_plain(value: Any) -> str | None:
    """What makes a scalar no setting's value (a problem to show under its key), or None."""
    if isinstance(value, HugeInt) or (isinstance(value, int) and abs(value) > LARGEST_INT):
        return OUT_OF_RANGE
    if isinstance(value, str) and "\x00" in value:
        return "contains a NUL character (\\x00); remove it"
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # YAML's "\ud800": no file, name or log line can hold it
            return f"contains a lone surrogate ({value[exc.start]!a}), which is no character; remove it"
    if isinstance(value, (bytes, set)):
        kind = "binary data (!!binary)" if isinstance(value, bytes) else "a set (!!set)"
        return f"{kind} is not a setting; write a plain value"
    return None


def _in_path(key: Any) -> str:
    """`key` as it is shown in a key path: a long one cut short."""
    text = str(key) if not isinstance(key, int) or abs(key) <= LARGEST_INT else "(a number too large)"
    text = text if len(text) <= 60 else f"{text[:40]}...({len(text):,} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate as \ud800


class StrictNumbers(BaseModel):
    """Base of the config's sections: a boolean is no number. pydantic reads `true` as 1 where an
    int or a float is taken (and unquoted yes/no as true/false, so `labels: [yes, no]` as [1, 0]);
    here it is an error under its key. (An integer beyond LARGEST_INT never gets here: `plain`
    refuses it, and pydantic reads no float beyond 64 bits as an int.)"""

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name and bool_as_number(cls.model_fields[info.field_name].annotation, value):
            what = "holds a boolean" if isinstance(value, list) else "is a boolean"
            raise ValueError(f"{shown(value)} {what} (so are unquoted yes/no/on/off), not a number: give a number, "
                             "or quote the text")
        return value


def bool_as_number(annotation: Any, value: Any) -> bool:
    """Whether `value` is a boolean, or a list holding one, where `annotation` takes a number and no boolean."""
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if isinstance(value, list):
        items = [get_args(m)[0] for m in members if get_origin(m) is list and get_args(m)]
        return any(bool_as_number(item, v) for item in items for v in value)
    return isinstance(value, bool) and bool not in members and any(m in (int, float) for m in members)


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


NAME_MAX = 255
"""Longest name (in bytes) of one file or folder that the usual file systems take; 4,096 bounds a whole path."""


def _expand(path: str, key: str) -> Path:
    """`path` with `~` or `~user` expanded; a user without a home here is a config error naming `key`."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # ~name of no user pathlib can find
        home = shown(path.split("/")[0])
        problem = f"{key}: path {shown(path)}: {home} names no home directory on this machine; write the full path"
        raise ConfigError([problem]) from None


def _absolute(path: str | None, key: str) -> str | None:
    """`path` made absolute (a URI or builtin: name as it is); a ConfigError naming `key` for a
    path no file system takes (an OSError, "file name too long", when a run first writes there)."""
    if path is None or "://" in path or path.startswith("builtin:"):
        return path
    full = str(_expand(path, key).resolve())
    if len(full.encode()) >= 4096 or any(len(name.encode()) > NAME_MAX for name in full.split("/")):
        raise ConfigError([(f"{key}: {shown(path)} holds a name longer than file systems take ({NAME_MAX} bytes "
                            "a name, 4,096 a path); shorten it")])
    return full


def _exists(path: str, key: str) -> bool:
    try:
        return _expand(path, key).exists()
    except OSError:  # a name longer than the file system takes: no such file
        return False


def resolve_paths(cfg: BaseModel, source: str = "config") -> BaseModel:
    """A `PipelineConfig`'s relative paths made absolute against the working directory (Ray workers have another one);
    `RAY_ADDRESS` as the cluster address when the config names none. A path no file system takes is a ConfigError."""
    try:
        return _resolve_paths(cfg)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None


_HUB_ID = re.compile(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}")
"""A Hugging Face repository id (huggingface_hub's own rule, without importing it here)."""


def _resolve_paths(cfg: BaseModel) -> BaseModel:
    cfg.data.train_path = _absolute(cfg.data.train_path, "data.train_path")
    cfg.data.eval_path = _absolute(cfg.data.eval_path, "data.eval_path")
    if cfg.evaluation.reference and cfg.evaluation.reference.path:
        cfg.evaluation.reference.path = _absolute(cfg.evaluation.reference.path, "evaluation.reference.path")
    if cfg.evaluation.reference and cfg.evaluation.reference.benchmarks:
        cfg.evaluation.reference.benchmarks = [_absolute(b, "evaluation.reference.benchmarks")
                                               for b in cfg.evaluation.reference.benchmarks]
    bm = cfg.base_model.name_or_path
    if bm.startswith((".", "/", "~")) or _exists(bm, "base_model.name_or_path"):
        cfg.base_model.name_or_path = _absolute(bm, "base_model.name_or_path")
    elif not bm.startswith("builtin:") and (not _HUB_ID.fullmatch(bm) or "--" in bm or ".." in bm):
        shown = bm if len(bm) <= 80 else f"{bm[:60]}... ({len(bm)} characters)"
        raise ConfigError([f"base_model.name_or_path: {shown!r} is no local folder and no Hugging Face hub id; give a "
                           "folder that exists, or an id `namespace/name` of letters, digits, '-', '_' and '.' "
                           "(at most 96 characters each)"])
    cfg.replay.path = _absolute(cfg.replay.path, "replay.path")
    cfg.scaling.storage_path = _absolute(cfg.scaling.storage_path, "scaling.storage_path")
    cfg.tracking.artifact_location = _absolute(cfg.tracking.artifact_location, "tracking.artifact_location")
    uri = cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.tracking.tracking_uri = "sqlite:///" + _absolute(uri.removeprefix("sqlite:///"), "tracking.tracking_uri")
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


def config_digest(d: dict) -> str:
    """sha256 of the canonical JSON of a dumped config (or part), as first hashed (`without_defaults_added_later`)."""
    blob = json.dumps(without_defaults_added_later(d), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


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
                ("promotion", "max_retrieval_loss", 0.7),
                ("evaluation.generation", "required_fields", []))
