"""What `prefect-lora status` and `history` print: tables that fit the console's width (the
terminal's, or COLUMNS when piped), short labels, lines broken only between words, and the gate's
decision in colour on a terminal (Rich drops colour when piped or under NO_COLOR)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

DECISION_STYLES = {"promoted": "green", "rejected": "yellow"}
LABELS = {"task_gain": "gain", "reference_perplexity_ratio": "ppl ratio", "reference_kl": "KL",
          "self_retention_perplexity_ratio": "self ppl ratio", "champion_delta": "vs champion"}
"""Short column labels of the key metrics (`overview.KEY_METRICS`); another name is shown with spaces
for underscores, so that it wraps between words."""
NONE = "–"


def age(seconds: float) -> str:
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def label(metric: str) -> str:
    return LABELS.get(metric) or metric.removeprefix("adapted_").replace("_", " ")


def decision(text: str | None) -> Text:
    return Text(text or "", style=DECISION_STYLES.get(text or "", ""))


class FittedTable:
    """Rows under headers, each column as wide as the console allows with no word broken: headers
    wrap first, then the column with the most room to spare. Where even every column at its longest
    word does not fit, each row is a line of `header value` pairs instead."""

    GAP = 2

    def __init__(self, headers: list[str], rows: list[list[str | Text]]):
        self.headers, self.rows = headers, rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cells = [[Text(h), *(Text(r[i]) if isinstance(r[i], str) else r[i] for r in self.rows)]
                 for i, h in enumerate(self.headers)]
        measured = [[Measurement.get(console, options, c) for c in column] for column in cells]
        words = [max(m.minimum for m in ms) for ms in measured]
        body = [max([w, *(m.maximum for m in ms[1:])]) for w, ms in zip(words, measured)]
        widths = fit_widths([max(m.maximum for m in ms) for ms in measured],
                            options.max_width - self.GAP * (len(self.headers) - 1), body, words)
        if widths is None:
            yield from (self._as_line(row) for row in self.rows)
            return
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, self.GAP - 1, 0, 0),
                      header_style="bold")
        for header, width in zip(self.headers, widths):
            table.add_column(header, width=width)
        for row in self.rows:
            table.add_row(*row)
        yield table

    def _as_line(self, row: list[str | Text]) -> Text:
        first, *rest = row
        pairs = [Text.assemble(f"{h} ", v) for h, v in zip(self.headers[1:], rest) if str(v)]
        return Text.assemble(first, ": ", Text(", ").join(pairs))


def fit_widths(maximums: list[int], room: int, *floors: list[int]) -> list[int] | None:
    """Column widths that sum to at most `room`, from each column's longest line down toward each
    list of `floors` in turn (its body's longest line, so that headers wrap first; then its longest
    word), the most slack first. None when even the last floors overflow."""
    if sum(floors[-1]) > room:
        return None
    widths = list(maximums)
    for floor in floors:
        while sum(widths) > room and any(w > f for w, f in zip(widths, floor)):
            i = max(range(len(widths)), key=lambda j: widths[j] - floor[j])
            widths[i] -= 1
    return widths


def status_view(tracking_uri: str, models: list[dict]) -> Group:
    """Each model in a few lines: its champion and challenger (one row when both aliases sit on
    one version), their key metrics, then lineage."""
    parts: list = [Text(f"prefect-lora models in {tracking_uri}", style="bold")]
    for m in models:
        parts += ["", *_model_block(m)]
    return Group(*parts)


def _model_block(m: dict) -> Iterable:
    slots: dict[str, dict | None] = {}  # a version (or an unset alias) -> its status, the aliases on it gathered
    for alias in ("champion", "challenger"):
        v = m[alias]
        slots.setdefault(v["version"] if v else alias, {**v, "aliases": []} if v else None)
        if v:
            slots[v["version"]]["aliases"].append(alias)
    shown = [v for v in slots.values() if v]
    base = next((v["lineage"]["base_model"] for v in shown if v["lineage"].get("base_model")), None)
    count = f"{m['versions']} version{'s' if m['versions'] != 1 else ''}"
    yield Text.assemble((m["name"], "bold"), f": {count}", f", base {base}" if base else "")
    metrics = list(dict.fromkeys(k for v in shown for k in v["metrics"]))
    rows = [[", ".join(v["aliases"]), v["version"], age(v["age_s"]), decision(v["decision"]),
             *(f"{v['metrics'][k]:.4g}" if k in v["metrics"] else "" for k in metrics)] if v else
            [key, NONE, "", "", *("" for _ in metrics)] for key, v in slots.items()]
    table = FittedTable(["alias", "version", "age", "decision", *map(label, metrics)], rows)
    yield _indent(table, 2)
    for v in shown:
        yield _indent(Text(_lineage_line(v, base)), 2)


def _lineage_line(v: dict, base: str | None) -> str:
    lin = v["lineage"]
    parts = [f"data {lin.get('data_fingerprint', NONE)[:12]}", f"config {lin.get('config_hash', NONE)[:12]}"]
    if lin.get("base_model") and lin["base_model"] != base:
        parts.append(f"base {lin['base_model']}")
    if v.get("last_skip"):
        parts.append(f"last skip {v['last_skip']['at'][:16].replace('T', ' ')}")
    return f"version {v['version']}: {', '.join(parts)}"


def history_view(name: str, versions: list[dict], moves: list[dict]) -> Group:
    """Every version (number, creation, aliases, decision, the end of its staged rollout where a
    server rolled one out, run), then every alias move and kept decision, oldest first: when, which
    alias, what, from and to, by whom, and why (whole lines)."""
    rollouts = any(v.get("rollout") for v in versions)
    rows = [[v["version"], _when_ms(v["created_ms"]), ", ".join(v["aliases"]) or NONE, decision(v["decision"] or NONE),
             *([v.get("rollout") or NONE] if rollouts else []), str(v["run_id"] or NONE)] for v in versions]
    header = ["version", "created", "aliases", "decision", *(["rollout"] if rollouts else []), "MLflow run"]
    parts: list = [Text(f"{name}: versions", style="bold"), FittedTable(header, rows),
                   "", Text(f"{name}: alias moves and kept decisions, oldest first", style="bold")]
    if not moves:
        parts.append(Text("none recorded", style="dim"))
    widths = {k: max(len(str(r[k])) for r in moves) for k in ("alias", "action")} if moves else {}
    for r in moves:
        parts += ["", *_move(r, widths)]
    return Group(*parts)


def _move(r: dict, widths: dict[str, int]) -> Iterable:
    """One record: a line saying when, which alias, what, from and to; by whom and why below it."""
    dash = lambda v: NONE if v in (None, "", "None") else str(v)
    yield Text.assemble((r["at"][:19].replace("T", " "), "bold"), "  ", r["alias"].ljust(widths["alias"]), "  ",
                        (r["action"].ljust(widths["action"]), "bold"),
                        f"  {dash(r['from_version'])} → {dash(r['to_version'])}")
    yield _indent(Text(f"by {dash(r['actor'])}"), 4)
    for line in dash(r["reason"]).splitlines():
        yield _indent(Text(line), 4)


def _indent(renderable, spaces: int) -> Padding:
    return Padding(renderable, (0, 0, 0, spaces), expand=False)


def _when_ms(ms: int | None) -> str:
    return datetime.fromtimestamp((ms or 0) / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
