"""A fleet: many adapters of one base, each its own registered model, retrained by one flow run.

A fleet file names one shared config and its members; a member is that config with its own
`model_name` (the member's name: its own champion, lineage and gate) and a few keys of its own,
written as `prefect-lora run --set` would take them:

    config: configs/tiny.yaml
    fdr: 0.05            # the members' gates decided together (Benjamini–Hochberg); null: each alone
    concurrency: 1       # members trained at once (a Ray cluster: one Ray Train job each); 1: in turn
    members_from: {glob: data/members/*.jsonl, set: data.train_path}   # one member per file, optional
    members:
      - name: sums-en
        set: {data.train_path: data/en.jsonl}
      - name: sums-de
        set: {data.train_path: data/de.jsonl, training.learning_rate: 0.0005}

Only the fleet file's shape is checked here; each member's config is loaded (and may fail) in
its own run, so one member's broken config or data never stops the others. Pure: no Prefect.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config_io import plain, read_yaml
from .errors import ConfigError
from .gate.promotion import FleetGate, fdr_threshold
from .registry.lifecycle import RunResult

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Member:
    name: str
    overrides: list[str]
    """`key.path=value` strings applied to the shared config, `model_name` first."""


@dataclass(frozen=True)
class Fleet:
    path: str
    config: str
    """The shared config every member starts from: a YAML file, or block:NAME (a saved config block)."""
    members: list[Member]
    fdr: float | None = 0.05
    """False discovery rate across the members' gates: each member's run is held after its
    evaluation, and a member promotes only when its gate's p-value is within the
    Benjamini–Hochberg threshold of every member evaluated in the same fleet run
    (`promotion.fdr_threshold`), so the expected share of wrongly promoted members among the
    promoted stays <= fdr. null: each member promotes on its own gate, in its own run."""
    concurrency: int = 1
    """Members run at once. Each member's training is its own Ray Train job (on the cluster at
    `scaling.address`, which must hold that many members' workers) and its evaluation runs in
    the fleet's process, so one member evaluates while others train. 1 (the default): in turn,
    the fastest on one machine, where members would only share the same cores."""


def load_fleet(path: str | Path, overrides: list[str] | None = None) -> Fleet:
    """Read a fleet file; `overrides` (`key.path=value`) apply to every member, after its own.
    Every problem of the file's shape is reported at once, naming the member."""
    p = Path(path)
    try:
        raw = read_yaml(p, str(p))
    except OSError as exc:
        raise ConfigError([f"cannot read the fleet file ({exc.strerror or exc}): give the path to a fleet YAML"], str(p)) from None
    problems: list[str] = []
    raw = plain(raw, problems=problems, source=str(p)) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise ConfigError(["a fleet file is a mapping with `config` (the shared config) and `members` (a list)"], str(p))
    problems += [f"{k}: unknown key (a fleet file has `config`, `members`, `members_from`, `fdr` and `concurrency`)"
                 for k in raw if k not in ("config", "members", "members_from", "fdr", "concurrency")]
    fdr = raw.get("fdr", Fleet.fdr)
    if fdr is not None and (isinstance(fdr, bool) or not isinstance(fdr, (int, float)) or not 0 < fdr < 1):
        problems.append(f"fdr: {fdr!r} is not a rate: give the false discovery rate across members' gates, "
                        "e.g. 0.05, or null to let each member promote on its own gate")
    concurrency = raw.get("concurrency", Fleet.concurrency)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        problems.append(f"concurrency: {concurrency!r} is not a count: give how many members run at once, "
                        "e.g. 4 on a Ray cluster that holds four members' workers, or 1 to run them in turn")
    config = raw.get("config")
    if not isinstance(config, str) or not config.strip():
        problems.append("config: the path of the config every member shares is required")
    elif not config.startswith("block:") and not Path(config).expanduser().is_file():
        problems.append(f"config: no such file {config!r} (relative paths are relative to the working directory; "
                        "block:NAME names a config saved as a Prefect block)")
    members = _members(_with_globbed(raw.get("members"), raw.get("members_from"), problems), list(overrides or []), problems)
    if problems:
        raise ConfigError(problems, str(p))
    return Fleet(str(p), str(Path(config).expanduser()), members, None if fdr is None else float(fdr), concurrency)


def only_members(fleet: Fleet, names: list[str] | None) -> Fleet:
    """The fleet with only the members named (all of them for None), in the file's order; an
    unknown name is an error that lists the fleet's members."""
    if not names:
        return fleet
    known = {m.name for m in fleet.members}
    if unknown := [n for n in names if n not in known]:
        problem = f"members: no member named {', '.join(map(repr, unknown))}; the fleet's members are {', '.join(sorted(known))}"
        raise ConfigError([problem], fleet.path)
    return replace(fleet, members=[m for m in fleet.members if m.name in set(names)])


def data_state(paths: list[str]) -> str:
    """What the watcher compares between two looks at a member's data: the path, size and
    modification time of every file under `paths` (files or folders; a missing one counts as
    missing). Cheap: no file is read. A touched but unchanged file wakes the member's run, which
    then skips on its own data fingerprint."""
    h = hashlib.sha256()
    for root in sorted(set(paths)):
        p = Path(root).expanduser()
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat() if f.exists() else None
            h.update(f"{f}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()


def changed_members(states: dict[str, str], previous: dict[str, str] | None) -> list[str]:
    """Members whose data state differs from the previous look; none on the first look (it only
    records where the data stand), a member new to the fleet counts as changed."""
    if previous is None:
        return []
    return [name for name, state in states.items() if previous.get(name) != state]


def _with_globbed(members, spec, problems: list[str]):
    """The file's `members` plus one per file that `members_from` matches (named after the file,
    its path under the key `set` names); a listed member of the same name adds its own keys."""
    if spec is None:
        return members
    if not isinstance(spec, dict) or not isinstance(spec.get("glob"), str) or not isinstance(spec.get("set", ""), str):
        problems.append("members_from: a mapping {glob: 'data/members/*.jsonl', set: data.train_path}: one member per "
                        "file, named after it, its path under the key `set` (default data.train_path)")
        return members
    problems += [f"members_from.{k}: unknown key (it has `glob` and `set`)" for k in spec if k not in ("glob", "set")]
    listed = {m["name"]: m for m in members or [] if isinstance(m, dict) and isinstance(m.get("name"), str)}
    files = sorted(glob.glob(os.path.expanduser(spec["glob"])))
    if not files:
        problems.append(f"members_from.glob: no file matches {spec['glob']!r} (relative to the working directory)")
    found = []
    for f in files:
        name = Path(f).stem
        if not NAME.match(name):
            problems.append(f"members_from: {f}: {name!r} cannot name a member (letters, digits, '.', '_' or '-'); rename the file")
            continue
        own = listed.get(name, {}).get("set")
        found.append({"name": name, "set": {spec.get("set", "data.train_path"): f, **(own if isinstance(own, dict) else {})}})
    names = {m["name"] for m in found}
    return found + [m for m in members or [] if not (isinstance(m, dict) and m.get("name") in names)]


def _members(raw, extra: list[str], problems: list[str]) -> list[Member]:
    if not isinstance(raw, list) or not raw:
        problems.append("members: a list of members is required, each with a `name` and optional `set`")
        return []
    members, seen = [], set()
    for i, m in enumerate(raw):
        where = f"members[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not NAME.match(m["name"]):
            problems.append(f"{where}: a member is a mapping with a `name` of letters, digits, '.', '_' or '-' "
                            f"(it becomes the member's registered model), e.g. {{name: sums-en, set: {{...}}}}")
            continue
        name, sets = m["name"], m.get("set") or {}
        where = f"{where} ({name})"
        if name.lower() in seen:
            problems.append(f"{where}: the name is taken by an earlier member: each member is its own registered model")
        seen.add(name.lower())
        problems += [f"{where}.{k}: unknown key (a member has `name` and `set`)" for k in m if k not in ("name", "set")]
        if not isinstance(sets, dict):
            problems.append(f"{where}.set: a mapping of key paths to values, e.g. {{data.train_path: data/{name}.jsonl}}")
            continue
        if "model_name" in sets:
            problems.append(f"{where}.set.model_name: a member's model name is its `name`")
        own = [f"{k}={json.dumps(v)}" for k, v in sets.items()]
        members.append(Member(name, [f"model_name={json.dumps(name)}", *own, *extra]))
    return members


@dataclass(frozen=True)
class MemberOutcome:
    """What one member's run did, as the fleet summary shows it."""

    name: str
    decision: str
    """`promoted`, `not promoted`, `skipped` (data and config unchanged), `baseline`, `failed`, or
    `held` (evaluated, waiting for the fleet's gate: only between the fleet's two phases)."""
    seconds: float
    version: str | None = None
    reason: str = ""
    """What stopped a member: the first check that did not pass, why nothing ran, or the error
    that failed it (empty when promoted)."""
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    tracking_uri: str | None = None
    p_value: float | None = None
    """The member's gate as one test (`promotion.Decision.p_value`); None when it was not gated."""

    @classmethod
    def of(cls, name: str, result: RunResult, seconds: float) -> MemberOutcome:
        decision = ("skipped" if result.skipped else "held" if result.held else "baseline" if result.method == "full"
                    else "promoted" if result.promoted else "not promoted")
        failed = [r for r in result.reasons if r.split(":", 1)[0] in result.failed_checks]
        reason = "" if result.promoted else (failed or result.reasons or [""])[0]
        if result.held:
            reason = "a baseline, completed after the fleet's gate" if result.gate_p_value is None else \
                f"gate p-value {result.gate_p_value:.2g}, decided with the other members"
        return cls(name, decision, seconds, result.version, reason, result.metrics, result.run_id, result.tracking_uri,
                   result.gate_p_value)

    @classmethod
    def failure(cls, name: str, exc: BaseException, seconds: float) -> MemberOutcome:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return cls(name, "failed", seconds, reason=first if len(first) <= 600 else first[:599] + "…")


def summary_rows(outcomes: list[MemberOutcome]) -> list[list[str]]:
    """One row per member: name, decision, version, task gain [interval], forgetting (the
    perplexity ratio [interval] and KL of the first source measured), the gate's p-value,
    seconds, the reason (last: the one long cell)."""
    return [[o.name, o.decision, o.version or "", _with_interval(o.metrics, "task_gain"), _forgetting(o.metrics),
             "" if o.p_value is None else f"{o.p_value:.2g}", f"{o.seconds:.{1 if o.seconds < 10 else 0}f}", o.reason]
            for o in outcomes]


def _with_interval(m: dict[str, float], key: str) -> str:
    if key not in m:
        return ""
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return f"{m[key]:.3g}" + (f" [{low:.3g}, {high:.3g}]" if low is not None and high is not None else "")


def _forgetting(m: dict[str, float]) -> str:
    for prefix in ("reference", "self_retention"):
        if f"{prefix}_perplexity_ratio" in m:
            kl = f", KL {m[f'{prefix}_kl']:.3g}" if f"{prefix}_kl" in m else ""
            return f"ratio {_with_interval(m, f'{prefix}_perplexity_ratio')}{kl}"
    return ""


SUMMARY_COLUMNS = ["member", "decision", "version", "task gain [interval]", "forgetting", "gate p", "seconds", "reason"]


def fleet_gate(fdr: float | None, p_values: list[float]) -> FleetGate | None:
    """The threshold every member gated in this fleet run is held to (None: `fdr: null`)."""
    return None if fdr is None else FleetGate(fdr, fdr_threshold(p_values, fdr), len(p_values))


def gate_line(fleet: Fleet, gate: FleetGate | None) -> str:
    """How the members' gates were decided, as the summary says it."""
    if fleet.fdr is None:
        return "Each member promotes on its own gate (`fdr: null`)."
    if gate is None:
        return f"No member reached its gate in this run (false discovery rate {fleet.fdr:g} across members)."
    line = "none of them reached it" if gate.threshold is None else f"p <= {gate.threshold:.2g}"
    return (f"{gate.members} member(s) gated together: a member promotes only when its gate p-value is "
            f"within the Benjamini–Hochberg threshold ({line}), so at most {gate.fdr:.0%} of the promotions are "
            f"expected to be wrong (false discovery rate {gate.fdr:g}).")


def member_counts(outcomes: list[MemberOutcome]) -> str:
    """`3 members (1 not promoted, 2 promoted)`: the fleet run's outcome in a few words."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.decision] = counts.get(o.decision, 0) + 1
    return f"{len(outcomes)} members ({', '.join(f'{n} {d}' for d, n in sorted(counts.items()))})"


def summary_markdown(fleet: Fleet, outcomes: list[MemberOutcome], links: dict[str, str] | None = None,
                     gate: FleetGate | None = None) -> str:
    """The fleet run's summary: counts by decision, how the gates were decided together, the
    table of members (each member's name linking to its MLflow run where `links` has one), and
    below it what stopped each member that did not promote: a long reason in a table cell runs
    off the Prefect UI's page."""
    columns = SUMMARY_COLUMNS[:-1]
    lines = [f"# Fleet `{Path(fleet.path).name}`: {member_counts(outcomes)}", "",
             f"Shared config `{fleet.config}`; each member is its own registered model with its own champion and gate.", "",
             gate_line(fleet, gate), "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in summary_rows(outcomes):
        cells = [cell.replace("|", "\\|") for cell in row[:-1]]
        if (links or {}).get(row[0]):
            cells[0] = f"[{cells[0]}]({links[row[0]]})"
        lines.append("| " + " | ".join(cells) + " |")
    reasons = [f"- **{o.name}** ({o.decision}): {o.reason}" for o in outcomes if o.reason]
    return "\n".join(lines + (["", "What stopped a member:", "", *reasons] if reasons else [])) + "\n"
