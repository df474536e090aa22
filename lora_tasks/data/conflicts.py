"""When two rows are the same example, and when the same input is given two answers.

Keys strip texts and read whole-number labels as numbers, so "a film " and "a film", or 1, 1.0 and
"1", compare equal; `validation`'s duplicate and train/eval overlap checks compare rows by them.
A conflict is one input with different answers in one split: a text with two labels, or, where
one right answer is expected, a prompt with two completions. Noisy labels are the commonest way a
sound pipeline trains a useless model; which row of a conflict is right is not known, so every
row of the group is reported (exact repeats are the duplicate check's business, not this one's).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from .sources import canonical_value

CONFLICTING_LABEL = "conflicting_label"
CONFLICTING_COMPLETION = "conflicting_completion"
"""Check names as they appear in reports (see `validation`)."""

SHOWN_PARTNERS = 5
"""Conflicting rows named in one row's reason; the rest are counted."""


def label_key(v) -> str | None:
    """Normalize a label so that 1, 1.0, np.int64(1) and "1" compare equal; None if unusable."""
    if isinstance(v, (bool, np.bool_)):
        return f"bool:{bool(v)}"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return str(int(v)) if math.isfinite(v) and float(v).is_integer() else None
    if isinstance(v, str):  # "1" and "1.0" (a CSV cell) are the label 1, as 1 and 1.0 are in JSON or Parquet
        s = v.strip()
        whole = re.fullmatch(r"([+-]?\d+)(?:\.0*)?", s) if len(s) < 50 else None
        return str(int(whole.group(1))) if whole else s
    return None


def cell_key(v) -> str:
    """A hashable, normalized form of one cell, for duplicate and overlap checks."""
    if isinstance(v, str):
        return "s:" + v.strip()
    label = label_key(v)
    if label is not None:
        return "l:" + label
    return "o:" + json.dumps(canonical_value(v), default=str, sort_keys=True)


def label_cell_key(v) -> str:
    label = label_key(v)
    return "l:" + label if label is not None else cell_key(v)


def row_keys(df: pd.DataFrame, columns: list[str], label_column: str | None) -> pd.Series:
    """One normalized string per row over `columns` (texts stripped, labels normalized)."""
    keys = [df[c].map(label_cell_key if c == label_column else cell_key) for c in columns]
    out = keys[0].astype(object)
    for k in keys[1:]:
        out = out + "\x1f" + k.astype(object)
    return out


def check_no_duplicates(columns: list[str], label_column: str | None) -> Callable[[pd.DataFrame], pd.Series]:
    """Later repeats of a row (after stripping) fail; the first occurrence passes."""

    def check(df: pd.DataFrame) -> pd.Series:
        if any(c not in df.columns for c in columns):
            return pd.Series(True, index=df.index)
        return ~row_keys(df, columns, label_column).duplicated(keep="first")

    return check


def text_key(v) -> str | None:
    """A text as the conflict check compares it (stripped, as for duplicates); None unless non-blank text."""
    return (v.strip() or None) if isinstance(v, str) else None


class Conflicts:
    """The conflict groups of one split: rows that share an input and differ in their answer.

    Rows whose input or answer key is None (not text, blank, an undeclared label) take no part:
    their own checks report them."""

    def __init__(self, inputs: Sequence[str | None], answers: Sequence[str | None]):
        self.answers = list(answers)
        groups: dict[str, list[int]] = {}
        for pos, (i, a) in enumerate(zip(inputs, self.answers)):
            if i is not None and a is not None:
                groups.setdefault(i, []).append(pos)
        self._group_of: dict[int, tuple[list[int], Counter]] = {}
        for members in groups.values():
            counts = Counter(self.answers[p] for p in members)
            if len(counts) > 1:
                self._group_of.update((p, (members, counts)) for p in members)

    @classmethod
    def of_frame(cls, df: pd.DataFrame, input_column: str, answer_column: str, labels: dict | None) -> Conflicts:
        """The groups of a frame; with `labels` (normalized key -> declared label) answers are labels."""
        # lists, not Series.map: a string column would turn the None of "takes no part" into NaN
        if labels is None:
            answers = [text_key(v) for v in df[answer_column]]
        else:
            answers = [k if (k := label_key(v)) in labels else None for v in df[answer_column]]
        return cls([text_key(v) for v in df[input_column]], answers)

    def __contains__(self, pos: int) -> bool:
        return pos in self._group_of

    def others(self, pos: int, limit: int = SHOWN_PARTNERS) -> tuple[list[int], int]:
        """Up to `limit` positions (in order) giving `pos`'s input another answer, and how many there are."""
        members, counts = self._group_of[pos]
        mine = self.answers[pos]
        shown = list(itertools.islice((q for q in members if self.answers[q] != mine), limit))
        return shown, len(members) - counts[mine]


def check_no_conflicts(
    input_column: str, answer_column: str, labels: dict | None
) -> Callable[[pd.DataFrame], pd.Series]:
    """Every row of an input given two answers fails (which answer is right is not known)."""

    def check(df: pd.DataFrame) -> pd.Series:
        if input_column not in df.columns or answer_column not in df.columns:
            return pd.Series(True, index=df.index)
        found = Conflicts.of_frame(df, input_column, answer_column, labels)
        return pd.Series([p not in found for p in range(len(df))], index=df.index)

    return check


def conflict_reason(
    split: str, columns: tuple[str, str], here: str, others: list[tuple[int, str]], total: int, is_label: bool
) -> str:
    """Why a row conflicts: the other rows (row number, shown answer) with the same input, and the fix."""
    input_column, answer_column = columns
    by_answer: dict[str, list[str]] = {}
    for row, shown in others:
        by_answer.setdefault(shown, []).append(str(row))
    listing = "; ".join(f"{answer_column} {a} in row{'s' if len(r) > 1 else ''} {', '.join(r)}"
                        for a, r in by_answer.items())
    more = f" and {total - len(others)} more row(s)" if total > len(others) else ""
    why = ("one text with two labels is label noise" if is_label else
           "exact and json scoring expect one right completion per prompt")
    return (f"the same {input_column} has {listing}{more} of {split} ({answer_column} {here} here); "
            f"fix or drop one of the rows ({why})")
