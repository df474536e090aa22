"""When two rows are the same example: normalized keys, and the duplicate check that compares them.

Keys strip texts and read whole-number labels as numbers, so "a film " and "a film", or 1, 1.0 and
"1", compare equal; `validation`'s duplicate and train/eval overlap checks compare rows by them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from .data import canonical_value


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
