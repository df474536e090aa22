"""The data contract: pandera schemas per task type, a report naming every bad row, quarantine.

Row numbers in reports are the index of the frames given to `validate_splits`; frames from
`lora_tasks.data.load_table` are indexed by the 1-based data row of their source file (header
and blank lines not counted), and split/sample keep it. A frame with a non-integer index is
numbered by position, from 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from ..errors import DataError, ValidationFailed
from .conflicts import (
    CONFLICTING_COMPLETION,
    CONFLICTING_LABEL,
    Conflicts,
    check_no_conflicts,
    check_no_duplicates,
    conflict_reason,
    label_key,
    row_keys,
)
from .sources import header_hint

MISSING_COLUMN = "missing_column"
DUPLICATE_COLUMN = "duplicate_column_name"
NULL_VALUE = "null_value"
TEXT_NOT_STR = "text_not_str"
BLANK_TEXT = "blank_text"
TEXT_LENGTH = "text_length"
LABEL_NOT_IN_SET = "label_not_in_set"
DUPLICATE_ROW = "duplicate_row"
TRAIN_EVAL_OVERLAP = "train_eval_overlap"
CHECK_ERROR = "check_error"
"""Check names as they appear in reports (`Issue.check`, `counts_by_check`); with CONFLICTING_LABEL and
CONFLICTING_COMPLETION (from `conflicts`)."""

ROW_CONVENTION = (
    "Row numbers are 1-based data rows of each split's source (header and blank lines not counted: "
    "JSONL row N is line N, CSV/TSV row N is line N+1)."
)
_META_COLUMNS = ("split", "row", "checks", "reason")
_SPLITS = ("train", "eval")


@dataclass
class Issue:
    """One failed check: which split, check, column and row, the bad value, and what to do."""

    split: str
    check: str
    column: str | None
    row: int | None
    value: str | None
    reason: str


@dataclass
class ValidationReport:
    """What the contract found, per split and per check; JSON- and Markdown-ready."""

    task: str
    rows: dict[str, int]
    valid_rows: dict[str, int]
    issues: list[Issue] = field(default_factory=list)
    counts_by_check: dict[str, int] = field(default_factory=dict)
    """Check name -> number of failing rows (all splits)."""

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def invalid_rows(self) -> dict[str, int]:
        return {s: self.rows[s] - self.valid_rows[s] for s in self.rows}

    def invalid_fraction(self, split: str) -> float:
        """Share of the split's rows that are invalid (0 for an empty split)."""
        return self.invalid_rows[split] / self.rows[split] if self.rows[split] else 0.0

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "task": self.task,
            "rows": dict(self.rows),
            "valid_rows": dict(self.valid_rows),
            "invalid_rows": self.invalid_rows,
            "counts_by_check": dict(self.counts_by_check),
            "issues": [asdict(i) for i in self.issues],
        }

    @classmethod
    def combine(cls, task: str, parts: list[ValidationReport], max_issues: int | None = None) -> ValidationReport:
        """One report of parts of the same data (a stream's batches, an eval split read on its own):
        rows, valid rows and failing counts add up; the first `max_issues` issues are kept in order."""
        rows, valid, counts, issues = {"train": 0, "eval": 0}, {"train": 0, "eval": 0}, {}, []
        for part in parts:
            for total, own in ((rows, part.rows), (valid, part.valid_rows), (counts, part.counts_by_check)):
                for k, n in own.items():
                    total[k] = total.get(k, 0) + n
            issues += part.issues[: None if max_issues is None else max(max_issues - len(issues), 0)]
        return cls(task=task, rows=rows, valid_rows=valid, issues=issues, counts_by_check=counts)

    def write(self, out_dir: str | Path) -> dict[str, str]:
        """`validation_report.json` and `.md` in `out_dir`: their paths, by kind."""
        (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
        files = {"report_json": out / "validation_report.json", "report_md": out / "validation_report.md"}
        files["report_json"].write_text(json.dumps(self.to_dict(), indent=2, default=str))
        files["report_md"].write_text(self.to_markdown())
        return {k: str(v) for k, v in files.items()}

    def summary(self) -> str:
        """One paragraph: verdict, invalid rows per split, failing rows per check."""
        total, invalid = sum(self.rows.values()), sum(self.invalid_rows.values())
        if self.ok:
            sizes = ", ".join(f"{s} {n}" for s, n in self.rows.items())
            return f"Validation passed: all {total} rows ({sizes}) meet the {self.task} contract."
        per_split = ", ".join(f"{s}: {self.invalid_rows[s]} of {n}" for s, n in self.rows.items())
        checks = ", ".join(f"{c} {n} row(s)" for c, n in self.counts_by_check.items())
        return (
            f"Validation failed: {invalid} of {total} rows are invalid ({per_split}). "
            f"Failing checks: {checks}. {len(self.issues)} issue(s) in total."
        )

    def to_markdown(self, max_rows_per_check: int = 5) -> str:
        """A table of splits, then one table per check with its first failing rows."""
        lines = [f"## Data validation ({self.task}): {'passed' if self.ok else 'FAILED'}", "", self.summary(), ""]
        lines += ["| split | rows | valid | invalid |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {s} | {n} | {self.valid_rows[s]} | {self.invalid_rows[s]} |" for s, n in self.rows.items()]
        if self.ok:
            return "\n".join(lines) + "\n"
        lines += ["", ROW_CONVENTION]
        for check, count in self.counts_by_check.items():
            issues = [i for i in self.issues if i.check == check]
            lines += ["", f"### {check}: {count} row(s)", "", "| split | row | column | value | reason |",
                      "| --- | ---: | --- | --- | --- |"]
            for i in issues[:max_rows_per_check]:
                cells = [i.split, "all" if i.row is None else str(i.row), i.column or "", i.value or "", i.reason]
                lines.append("| " + " | ".join(_escape_cell(c) for c in cells) + " |")
            if len(issues) > max_rows_per_check:
                lines.append(f"\n...and {len(issues) - max_rows_per_check} more {check} issue(s) (see the full report).")
        return "\n".join(lines) + "\n"


@dataclass
class ValidationResult:
    """Valid rows per split (texts stripped, labels as declared), invalid rows, and the report."""

    train: pd.DataFrame
    eval: pd.DataFrame
    invalid: pd.DataFrame
    """Invalid rows: columns split, row, checks, reason, then the original columns."""
    report: ValidationReport


@dataclass
class _Spec:
    """Which columns the contract reads for a task."""

    task: str
    text_columns: list[str]
    input_column: str
    label_column: str | None
    labels: dict[str, Any] | None  # normalized key -> declared label
    key_columns: list[str]

    @property
    def answer_column(self) -> str | None:
        """What a conflict differs in: the label, or the completion of a prompt (None for plain text)."""
        return self.label_column or (self.text_columns[1] if len(self.text_columns) > 1 else None)


def _make_spec(task, text_column, prompt_column, completion_column, label_column, labels) -> _Spec:
    if task == "causal_lm":
        if (prompt_column is None) != (completion_column is None):
            raise ValueError("prompt_column and completion_column go together: set both or neither")
        cols = [prompt_column, completion_column] if prompt_column else [text_column]
        return _Spec(task, cols, cols[0], None, None, cols)
    if task == "sequence_classification":
        if not labels:
            raise ValueError("sequence_classification needs the declared label set (labels)")
        keys = {label_key(v): v for v in labels}
        return _Spec(task, [text_column], text_column, label_column, keys, [text_column, label_column])
    raise ValueError(f"unknown task {task!r}: use causal_lm or sequence_classification")


def _stripped_len(v) -> int | None:
    return len(v.strip()) if isinstance(v, str) else None


def _check_is_text() -> Callable[[pd.Series], pd.Series]:
    """Texts must be strings: numbers, lists or booleans would tokenize as something else."""
    return lambda s: s.map(lambda v: isinstance(v, str)).astype(bool)


def _check_not_blank() -> Callable[[pd.Series], pd.Series]:
    """A text of only whitespace teaches nothing (non-text is left to `_check_is_text`)."""
    return lambda s: s.map(lambda v: not isinstance(v, str) or bool(v.strip())).astype(bool)


def _check_length(min_chars: int, max_chars: int) -> Callable[[pd.Series], pd.Series]:
    """Stripped length within [min_chars, max_chars]; blank and non-text have their own checks."""

    def within(v) -> bool:
        n = _stripped_len(v)
        return not n or min_chars <= n <= max_chars

    return lambda s: s.map(within).astype(bool)


def _check_label_in_set(keys: set[str]) -> Callable[[pd.Series], pd.Series]:
    """Labels must be declared; 1, 1.0 and "1" all match a declared 1."""
    return lambda s: s.map(lambda v: label_key(v) in keys).astype(bool)


def build_schema(
    task: str,
    *,
    text_column: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    label_column: str = "label",
    labels: list[str | int] | None = None,
    min_chars: int = 1,
    max_chars: int = 20_000,
    check_duplicates: bool = True,
    check_conflicts: bool = True,
    one_answer_per_prompt: bool = False,
) -> pa.DataFrameSchema:
    """The pandera contract for one split of a task's data (cross-split checks live elsewhere).

    Conflicts (one input, different answers) are checked for classification, and for prompts and
    completions only with `one_answer_per_prompt` (exact or JSON scoring: one right answer)."""
    spec = _make_spec(task, text_column, prompt_column, completion_column, label_column, labels)
    text_checks = [
        pa.Check(_check_is_text(), name=TEXT_NOT_STR),
        pa.Check(_check_not_blank(), name=BLANK_TEXT),
        pa.Check(_check_length(min_chars, max_chars), name=TEXT_LENGTH),
    ]
    columns = {c: pa.Column(nullable=False, checks=text_checks) for c in spec.text_columns}
    if spec.label_column is not None:
        label_check = pa.Check(_check_label_in_set(set(spec.labels)), name=LABEL_NOT_IN_SET)
        columns[spec.label_column] = pa.Column(nullable=False, checks=[label_check])
    frame_checks = []
    if check_duplicates:
        frame_checks.append(pa.Check(check_no_duplicates(spec.key_columns, spec.label_column), name=DUPLICATE_ROW))
    if check_conflicts and spec.answer_column and (spec.label_column or one_answer_per_prompt):
        conflicts = check_no_conflicts(spec.input_column, spec.answer_column, spec.labels)
        frame_checks.append(pa.Check(conflicts, name=CONFLICTING_LABEL if spec.labels else CONFLICTING_COMPLETION))
    return pa.DataFrameSchema(columns, checks=frame_checks, name=f"{task} data contract")


def validate_splits(
    train_df: pd.DataFrame,
    eval_df: pd.DataFrame,
    *,
    task: str,
    text_column: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    label_column: str = "label",
    labels: list[str | int] | None = None,
    min_chars: int = 1,
    max_chars: int = 20_000,
    check_duplicates: bool = True,
    check_overlap: bool = True,
    check_conflicts: bool = True,
    one_answer_per_prompt: bool = False,
) -> ValidationResult:
    """Check both splits against the task's contract and each other; never raises on bad data.

    Valid rows come back with texts stripped of surrounding whitespace and labels replaced by
    the declared label they match (so `labels.index(value)` works). A row failing any check is
    invalid; a duplicate keeps its first occurrence and flags the later ones; every row of a
    conflict (one text with two labels; with `one_answer_per_prompt`, as exact or JSON scoring
    expects, one prompt with two completions) is flagged, naming the rows it conflicts with.
    """
    spec = _make_spec(task, text_column, prompt_column, completion_column, label_column, labels)
    schema = build_schema(
        task, text_column=text_column, prompt_column=prompt_column, completion_column=completion_column,
        label_column=label_column, labels=labels, min_chars=min_chars, max_chars=max_chars,
        check_duplicates=check_duplicates, check_conflicts=check_conflicts, one_answer_per_prompt=one_answer_per_prompt,
    )
    checked = {
        name: _SplitCheck(name, df, spec, min_chars, max_chars) for name, df in zip(_SPLITS, (train_df, eval_df))
    }
    for c in checked.values():
        c.run_schema(schema)
    if check_overlap:
        checked["eval"].check_overlap(checked["train"])
    return _collect(task, checked)


def _collect(task: str, checked: dict[str, _SplitCheck]) -> ValidationResult:
    """The result of both splits' checks: valid and invalid rows, and one report."""
    issues = [i for c in checked.values() for i in c.sorted_issues()]
    invalid_frames = [c.invalid_frame() for c in checked.values()]
    counts: dict[str, int] = {}
    for c in checked.values():
        for check, n in c.counts_by_check().items():
            counts[check] = counts.get(check, 0) + n
    report = ValidationReport(
        task=task,
        rows={s: len(c.df) for s, c in checked.items()},
        valid_rows={s: len(c.valid_positions()) for s, c in checked.items()},
        issues=issues,
        counts_by_check=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    )
    invalid = (
        pd.concat([f for f in invalid_frames if len(f)], ignore_index=True)
        if any(len(f) for f in invalid_frames)
        else pd.DataFrame(columns=list(_META_COLUMNS))
    )
    return ValidationResult(checked["train"].valid_frame(), checked["eval"].valid_frame(), invalid, report)


class _SplitCheck:
    """Issues of one split, kept by position so that any index works."""

    def __init__(self, name: str, df: pd.DataFrame, spec: _Spec, min_chars: int, max_chars: int):
        self.name, self.df, self.spec = name, df, spec
        self.min_chars, self.max_chars = min_chars, max_chars
        self.frame = df.reset_index(drop=True)
        if pd.api.types.is_integer_dtype(df.index.dtype):
            self.rows = [int(r) for r in df.index]
        else:
            self.rows = list(range(1, len(df) + 1))
        self.split_issues: list[Issue] = []  # issues that make every row invalid
        self.row_issues: dict[int, list[Issue]] = {}
        self._keys: list[str] = []
        self._first_of_key: dict[str, int] | None = None
        self._conflicts: Conflicts | None = None

    def add(self, check: str, column: str | None, pos: int | None, reason: str, value: Any = None) -> None:
        if pos is None:
            self.split_issues.append(Issue(self.name, check, column, None, None, reason))
            return
        issues = self.row_issues.setdefault(pos, [])
        if any(i.check == check and i.column == column for i in issues):
            return
        issues.append(Issue(self.name, check, column, self.rows[pos], _short_repr(value), reason))

    def run_schema(self, schema: pa.DataFrameSchema) -> None:
        """Validate lazily and turn pandera's failure cases into issues."""
        if not self.frame.columns.is_unique:
            dups = sorted({str(c) for c in self.frame.columns[self.frame.columns.duplicated()]})
            self.add(
                DUPLICATE_COLUMN,
                ", ".join(dups),
                None,
                f"column name(s) {dups} appear more than once; give every column a unique name",
            )
            return
        try:
            schema.validate(self.frame, lazy=True)
        except SchemaErrors as exc:
            for case in exc.failure_cases.to_dict("records"):
                self._add_failure(case)

    def _add_failure(self, case: dict) -> None:
        check, column, index = str(case["check"]), case["column"], case["index"]
        column = None if column is None or (isinstance(column, float) and math.isnan(column)) else str(column)
        if check == "column_in_dataframe":
            missing = str(case["failure_case"])
            existing = [str(c) for c in self.frame.columns]
            self.add(
                MISSING_COLUMN,
                missing,
                None,
                f"column {missing!r} is missing; the columns are {existing}. "
                f"Rename the column in the data or set the matching *_column option"
                f"{header_hint(existing, [*self.spec.text_columns, *filter(None, [self.spec.label_column])])}",
            )
            return
        if index is None or (isinstance(index, float) and math.isnan(index)):
            self.add(
                CHECK_ERROR,
                column,
                None,
                f"check {check} could not run ({case['failure_case']}); fix the column's values",
            )
            return
        pos = int(index)
        if check == DUPLICATE_ROW:
            self._add_duplicate(pos)
            return
        if check in (CONFLICTING_LABEL, CONFLICTING_COMPLETION):
            self._add_conflict(check, pos)
            return
        value = self.frame.at[pos, column] if column in self.frame.columns else None
        name, column, reason = self._describe(check, column, value)
        self.add(name, column, pos, reason, value)

    def _describe(self, check: str, column: str, value: Any) -> tuple[str, str, str]:
        """(check name, column, reason) for one failing cell."""
        if check == "not_nullable":
            return NULL_VALUE, column, f"{column} is missing (null); fill it in or remove the row"
        if check == TEXT_NOT_STR:
            return check, column, f"{column} is a {type(value).__name__}, not text; write it as a string"
        if check == BLANK_TEXT:
            return check, column, f"{column} is blank after stripping whitespace; fill in the text or remove the row"
        if check == TEXT_LENGTH:
            n = _stripped_len(value)
            bound = (
                f"below min_chars={self.min_chars}"
                if n is not None and n < self.min_chars
                else f"above max_chars={self.max_chars}"
            )
            reason = f"{column} has {n} characters after stripping, {bound}; fix the text or change "
            return check, column, reason + "validation.min_chars/max_chars"
        if check == LABEL_NOT_IN_SET:
            declared = list(self.spec.labels.values())
            reason = f"{column} {_short_repr(value)} is not one of the declared labels {declared}; "
            return check, column, reason + "fix the label or add it to data.labels"
        return check, column, f"check {check} failed on {column}"

    def _add_duplicate(self, pos: int) -> None:
        cols = self.spec.key_columns
        if self._first_of_key is None:
            keys = row_keys(self.frame, cols, self.spec.label_column)
            self._keys = keys.tolist()
            self._first_of_key = {}
            for p, k in enumerate(self._keys):
                self._first_of_key.setdefault(k, p)
        first = self._first_of_key[self._keys[pos]]
        value = tuple(self.frame.at[pos, c] for c in cols)
        self.add(
            DUPLICATE_ROW,
            ", ".join(cols),
            pos,
            f"repeats row {self.rows[first]} of {self.name} on ({', '.join(cols)}); remove the repeat",
            value if len(value) > 1 else value[0],
        )

    def _add_conflict(self, check: str, pos: int) -> None:
        cols = (self.spec.input_column, self.spec.answer_column)
        if self._conflicts is None:
            self._conflicts = Conflicts.of_frame(self.frame, *cols, self.spec.labels)
        if pos not in self._conflicts:
            return
        shown, total = self._conflicts.others(pos)
        answer = self._shown_answer
        others = [(self.rows[q], answer(q)) for q in shown]
        reason = conflict_reason(self.name, cols, answer(pos), others, total, self.spec.label_column is not None)
        self.add(check, ", ".join(cols), pos, reason, tuple(self.frame.at[pos, c] for c in cols))

    def _shown_answer(self, pos: int) -> str:
        """A row's label as declared, or its completion stripped, short enough for a reason."""
        v = self.frame.at[pos, self.spec.answer_column]
        return _short_repr(self.spec.labels[label_key(v)] if self.spec.labels else v.strip(), 40)

    def check_overlap(self, train: _SplitCheck) -> None:
        """Flag rows of this (eval) split whose input text appears in train's valid rows."""
        col = self.spec.input_column
        if (
            col not in self.frame.columns
            or col not in train.frame.columns
            or not train.frame.columns.is_unique
            or not self.frame.columns.is_unique
        ):
            return
        seen: dict[str, int] = {}
        for pos in train.valid_positions():
            v = train.frame.at[pos, col]
            if isinstance(v, str):
                seen.setdefault(v.strip(), train.rows[pos])
        for pos, v in enumerate(self.frame[col]):
            if isinstance(v, str) and v.strip() in seen:
                self.add(
                    TRAIN_EVAL_OVERLAP,
                    col,
                    pos,
                    f"{col} also appears in train row {seen[v.strip()]}; "
                    f"remove it from one split (leakage inflates eval metrics)",
                    v,
                )

    def valid_positions(self) -> list[int]:
        if self.split_issues:
            return []
        return [p for p in range(len(self.frame)) if p not in self.row_issues]

    def sorted_issues(self) -> list[Issue]:
        return self.split_issues + [i for pos in sorted(self.row_issues) for i in self.row_issues[pos]]

    def counts_by_check(self) -> dict[str, int]:
        """Check -> failing rows; a split-wide issue fails every row."""
        counts: dict[str, int] = {}
        for check in dict.fromkeys(i.check for i in self.split_issues):  # two missing columns fail each row once
            counts[check] = counts.get(check, 0) + len(self.frame)
        for issues in self.row_issues.values():
            for check in dict.fromkeys(i.check for i in issues):
                counts[check] = counts.get(check, 0) + 1
        return counts

    def valid_frame(self) -> pd.DataFrame:
        """Valid rows with the original index, texts stripped and labels as declared."""
        out = self.df.iloc[self.valid_positions()].copy()
        if out.empty:
            return out
        for col in self.spec.text_columns:
            out[col] = out[col].map(str.strip).astype(object)
        if self.spec.label_column is not None:
            out[self.spec.label_column] = (
                out[self.spec.label_column].map(lambda v: self.spec.labels[label_key(v)]).astype(object)
            )
        return out

    def invalid_frame(self) -> pd.DataFrame:
        """Invalid rows: split, row, checks, reason, then the original columns."""
        positions = list(range(len(self.frame))) if self.split_issues else sorted(self.row_issues)
        if not positions or not self.frame.columns.is_unique:
            return self._meta_only(positions)
        data = self.frame.iloc[positions].reset_index(drop=True)
        data.columns = [f"data_{c}" if c in _META_COLUMNS else c for c in data.columns]
        meta = self._meta_only(positions)
        return pd.concat([meta, data], axis=1)

    def _meta_only(self, positions: list[int]) -> pd.DataFrame:
        records = []
        for pos in positions:
            issues = self.split_issues + self.row_issues.get(pos, [])
            records.append(
                {
                    "split": self.name,
                    "row": self.rows[pos],
                    "checks": ",".join(dict.fromkeys(i.check for i in issues)),
                    "reason": "; ".join(i.reason for i in issues),
                }
            )
        return pd.DataFrame(records, columns=list(_META_COLUMNS))


def enforce_policy(
    result: ValidationResult,
    *,
    policy: Literal["fail", "quarantine"] = "fail",
    max_invalid_fraction: float = 0.05,
    quarantine_dir: str | Path | None = None,
) -> tuple[ValidationResult, Path | None]:
    """Apply the validation policy: stop on bad data, or set invalid rows aside in a file.

    `fail` raises ValidationFailed on any issue. `quarantine` writes invalid rows to
    `quarantine_dir/quarantine.jsonl` (only when there are some) and raises if a split's
    invalid share exceeds `max_invalid_fraction`. Either way a split left with no valid rows
    raises. Returns the result and the quarantine file (or None).
    """
    report = result.report
    if policy == "fail":
        if not report.ok:
            raise ValidationFailed(
                f"The data broke its contract (validation.policy: fail): {report.summary()} The report "
                "names each row and check; fix those rows, or set data.validation.policy to quarantine "
                "to set them aside.",
                report,
            )
        _check_not_empty(report, None)
        return result, None
    if policy != "quarantine":
        raise ValueError(f"unknown policy {policy!r}: use fail or quarantine")
    if quarantine_dir is None:
        raise ValueError("policy quarantine needs quarantine_dir")
    path = _write_quarantine(result.invalid, Path(quarantine_dir)) if len(result.invalid) else None
    where = f" Invalid rows are in {path}." if path else ""
    for split in report.rows:
        share = report.invalid_fraction(split)
        if share > max_invalid_fraction:
            raise ValidationFailed(
                f"{report.invalid_rows[split]} of {report.rows[split]} {split} rows are invalid ({share:.1%}), "
                f"above the limit max_invalid_fraction={max_invalid_fraction:.1%}.{where} Fix the data or raise "
                f"data.validation.max_invalid_fraction.",
                report,
            )
    _check_not_empty(report, path)
    return result, path


def _check_not_empty(report: ValidationReport, path: Path | None) -> None:
    for split, n in report.valid_rows.items():
        if n == 0:
            where = f" Invalid rows are in {path}." if path else ""
            raise ValidationFailed(f"The {split} split has no valid rows ({report.rows[split]} rows in total).{where} "
                                   f"Training needs at least one valid row in each split.", report)


_SURROGATE = re.compile("[\ud800-\udfff]")  # valid in a JSON escape, not in UTF-8: such rows are written escaped


def _write_quarantine(invalid: pd.DataFrame, folder: Path) -> Path:
    """Write invalid rows as JSON Lines (re-loadable with `load_table`); returns the file."""
    path = folder / "quarantine.jsonl"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for record in invalid.to_dict("records"):
                row = {str(k): _json_value(v) for k, v in record.items()}
                line = json.dumps(row, ensure_ascii=False, default=str)
                fh.write((json.dumps(row, default=str) if _SURROGATE.search(line) else line) + "\n")
    except OSError as exc:
        raise DataError(f"{path}: cannot write the quarantine file ({exc.strerror or exc}). Fix: choose a writable folder.") from exc
    return path


def _json_value(v):
    """A JSON-safe form of one cell: NaN/NA -> null, numpy scalars and arrays -> Python."""
    if isinstance(v, np.ndarray):
        return [_json_value(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and not math.isfinite(v)):
        return None
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _short_repr(value: Any, limit: int = 80) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, tuple):  # a row's cells (duplicates, conflicts): (' a', 1), not (' a', np.int64(1))
        value = tuple(v.item() if isinstance(v, np.generic) else v for v in value)
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return "null"
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("\r", " ")
