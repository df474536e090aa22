"""Property tests: malformed files of every format give DataError or ValidationFailed, nothing else.

Each example writes one file (random bytes, ragged CSV, wrong types, missing columns, invalid
UTF-8, 100k-character rows, random JSON values, corrupt Parquet or dataset folders) and runs
the whole data step: load, split, validate, apply the policy.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prefect_lora.lora_tasks.data.sources import load_table, split_train_eval
from prefect_lora.lora_tasks.data.validation import enforce_policy, validate_splits
from prefect_lora.lora_tasks.errors import DataError, ValidationFailed

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
}
COLUMNS = ["text", "label", "prompt", "completion", "sentence", ""]
TASKS = [
    {"task": "sequence_classification", "labels": [0, 1]},
    {"task": "sequence_classification", "labels": ["neg", "pos"]},
    {"task": "causal_lm"},
    {"task": "causal_lm", "prompt_column": "prompt", "completion_column": "completion"},
]
TRICKY = [
    "",
    " ",
    "0",
    "1",
    "2",
    "neg",
    "pos",
    "NA",
    "null",
    '"',
    '""',
    "a,b",
    "a\tb",
    "x\ny",
    "\r",
    "\x00",
    "\ufeff",
    "é",
]

fields = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(TRICKY),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(COLUMNS), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def corrupt(draw, raw: bytes) -> bytes:
    """Leave the bytes, or break them: invalid UTF-8, truncation, a BOM, a NUL, a huge row."""
    how = draw(st.sampled_from(["none", "none", "none", "bad_utf8", "truncate", "bom", "huge"]))
    at = draw(st.integers(0, len(raw)))
    if how == "bad_utf8":
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9t\xe9", b"\xed\xa0\x80"])) + raw[at:]
    if how == "truncate":
        return raw[:at]
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "huge":
        return raw[:at] + b"y" * draw(st.integers(50_000, 110_000)) + raw[at:]
    return raw


HEADERS = [["text", "label"], ["sentence", "label"], ["prompt", "completion"], ["text"], ["label", "text", "prompt"]]
headers = st.one_of(st.sampled_from(HEADERS), st.lists(st.sampled_from(COLUMNS), max_size=4))


@st.composite
def delimited_files(draw):
    """CSV or TSV bytes: plausible or random header, rows sometimes ragged, tricky fields."""
    fmt = draw(st.sampled_from(["csv", "tsv"]))
    header = draw(headers)
    ragged = draw(st.booleans())
    row = st.lists(fields, max_size=4) if ragged else st.lists(fields, min_size=len(header), max_size=len(header))
    rows = draw(st.lists(row, min_size=draw(st.sampled_from([0, 2])), max_size=8))
    sep = "\t" if fmt == "tsv" else ","
    if fmt == "csv" and draw(st.booleans()):
        buf = io.StringIO()
        writer = csv.writer(buf)
        for r in [header, *rows]:
            writer.writerow(r)
        text = buf.getvalue()
    else:
        text = "".join(sep.join(r) + "\n" for r in [header, *rows])
    return fmt, draw(corrupt(text.encode("utf-8")))


@st.composite
def jsonl_files(draw):
    """JSONL bytes: objects with plausible or random keys and values, sometimes other lines."""
    keys = draw(headers) or COLUMNS
    objects = st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys))
    if draw(st.integers(0, 3)) == 0:  # a quarter of the files mix in non-objects and garbage
        line = st.one_of(objects.map(json.dumps), json_values.map(json.dumps), st.text(max_size=20), st.just(""))
    else:
        line = objects.map(json.dumps)
    lines = draw(st.lists(line, max_size=8))
    return "jsonl", draw(corrupt("\n".join(lines).encode("utf-8")))


column_values = st.one_of(
    st.lists(st.none() | st.sampled_from(TRICKY) | st.text(max_size=10), min_size=6, max_size=6),
    st.lists(st.none() | st.integers(-3, 3), min_size=6, max_size=6),
    st.lists(st.floats(), min_size=6, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=6, max_size=6),
    st.lists(st.binary(max_size=5), min_size=6, max_size=6),
)


@st.composite
def arrow_tables(draw, unique_names: bool = False) -> pa.Table:
    """A small Arrow table: random column names (maybe repeated) and typed columns."""
    n = draw(st.integers(0, 6))
    names = draw(headers)
    if unique_names:
        names = list(dict.fromkeys(names))
    arrays = [pa.array(draw(column_values)[:n]) for _ in names]
    return pa.Table.from_arrays(arrays, names=names)


@st.composite
def parquet_files(draw):
    buf = io.BytesIO()
    pq.write_table(draw(arrow_tables()), buf)
    raw = buf.getvalue()
    if draw(st.integers(0, 2)) == 0:
        at = draw(st.integers(0, len(raw) - 1))
        raw = draw(st.sampled_from([raw[:at], raw[:at] + b"\x00garbage" + raw[at + 8 :]]))
    return "parquet", raw


def _run_data_step(path: Path, fmt: str, task: dict, policy: str, work: Path) -> None:
    """Load, split, validate and enforce; only the two contract errors may escape, with a message."""
    try:
        df = load_table(path, format=fmt)
        train, eval_ = split_train_eval(df, 0.5, seed=0)
        result = validate_splits(train, eval_, **task)
        assert result.report.rows == {"train": len(train), "eval": len(eval_)}
        assert len(result.invalid) == sum(result.report.invalid_rows.values())
        for split, frame, valid in (("train", train, result.train), ("eval", eval_, result.eval)):
            bad = result.invalid.loc[result.invalid["split"] == split, "row"].tolist()
            assert sorted(valid.index.tolist() + bad) == sorted(frame.index.tolist())  # no row lost
        json.dumps(result.report.to_dict())
        result.report.to_markdown()
        event(f"validated: {'ok' if result.report.ok else 'issues'}")
        _, qpath = enforce_policy(result, policy=policy, max_invalid_fraction=0.5, quarantine_dir=work / "q")
        if qpath is not None:
            lines = qpath.read_text(encoding="utf-8").split("\n")[:-1]  # not splitlines: texts may hold U+2028
            assert len(lines) == len(result.invalid)
            for line in lines:
                json.loads(line)
        event("passed the policy")
    except (DataError, ValidationFailed) as exc:
        event(f"{type(exc).__name__}: {_kind(str(exc))}")
        assert str(exc).strip(), f"{type(exc).__name__} with an empty message"


def _kind(message: str) -> str:
    """A short label of an error message, for hypothesis statistics."""
    for words in (
        "no data rows",
        "cannot split",
        "not UTF-8",
        "is empty",
        "not valid JSON",
        "not an object",
        "has no JSON objects",
        "cannot be parsed",
        "Parquet",
        "no columns",
        "saved dataset",
        "broke its contract",
        "above the limit",
        "has no valid rows",
    ):
        if words in message:
            return words
    return "other"


def _check_bytes(fmt_raw, task, policy, auto) -> None:
    fmt, raw = fmt_raw
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / f"data.{fmt}"
        path.write_bytes(raw)
        _run_data_step(path, "auto" if auto else fmt, task, policy, work)


@settings(max_examples=300, **SETTINGS)
@given(delimited_files(), st.sampled_from(TASKS), st.sampled_from(["fail", "quarantine"]), st.booleans())
def test_malformed_csv_and_tsv_give_only_contract_errors(fmt_raw, task, policy, auto):
    _check_bytes(fmt_raw, task, policy, auto)


@settings(max_examples=300, **SETTINGS)
@given(jsonl_files(), st.sampled_from(TASKS), st.sampled_from(["fail", "quarantine"]), st.booleans())
def test_malformed_jsonl_gives_only_contract_errors(fmt_raw, task, policy, auto):
    _check_bytes(fmt_raw, task, policy, auto)


@settings(max_examples=300, **SETTINGS)
@given(parquet_files(), st.sampled_from(TASKS), st.sampled_from(["fail", "quarantine"]), st.booleans())
def test_malformed_parquet_gives_only_contract_errors(fmt_raw, task, policy, auto):
    _check_bytes(fmt_raw, task, policy, auto)


@settings(max_examples=300, **SETTINGS)
@given(
    st.sampled_from(["csv", "tsv", "jsonl", "parquet"]),
    st.one_of(st.binary(max_size=300), st.binary(max_size=20).map(lambda b: b"PAR1" + b + b"PAR1")),
    st.sampled_from(TASKS),
)
def test_random_bytes_give_only_data_errors(fmt, raw, task):
    _check_bytes((fmt, raw), task, "fail", True)


@settings(max_examples=40, **SETTINGS)
@given(
    arrow_tables(unique_names=True), st.sampled_from(["none", "none", "state", "arrow", "info"]), st.sampled_from(TASKS)
)
def test_malformed_dataset_folders_give_only_contract_errors(table, damage, task):
    datasets = pytest.importorskip("datasets")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "ds"
        datasets.Dataset(table).save_to_disk(str(folder))
        if damage == "state":
            (folder / "state.json").write_text("{broken", encoding="utf-8")
        elif damage == "arrow":
            for f in folder.glob("*.arrow"):
                f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        elif damage == "info":
            shutil.rmtree(folder)
            folder.mkdir()
            (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
        _run_data_step(folder, "auto", task, "quarantine", work)


@st.composite
def labelled_frames(draw):
    """A classification frame of good rows (padded texts, int or str labels) with a few bad ones."""
    good = st.tuples(
        st.text(min_size=1, max_size=15).filter(str.strip).map(lambda t: f" {t} "),
        st.sampled_from([0, 1, "0", "1", " 1"]),
    )
    bad = st.tuples(st.sampled_from([None, "", "   ", 7, 1.5]), st.sampled_from([0, 2, "x", None]))
    rows = draw(st.lists(st.one_of(good, good, good, bad), min_size=2, max_size=12))
    return pd.DataFrame(rows, columns=["text", "label"], dtype=object).set_axis(range(1, len(rows) + 1))


@settings(max_examples=150, **SETTINGS)
@given(labelled_frames(), st.integers(0, 3))
def test_quarantine_keeps_every_row_somewhere(frame, seed):
    train, eval_ = split_train_eval(frame, 0.5, seed=seed)
    result = validate_splits(train, eval_, task="sequence_classification", labels=[0, 1])
    for valid in (result.train, result.eval):
        assert all(isinstance(t, str) and t == t.strip() and t for t in valid["text"])
        assert all(type(v) is int and v in (0, 1) for v in valid["label"])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _, path = enforce_policy(result, policy="quarantine", max_invalid_fraction=1.0, quarantine_dir=tmp)
        except ValidationFailed as exc:
            assert "has no valid rows" in str(exc)
            path = Path(tmp) / "quarantine.jsonl"
        quarantined = path.read_text(encoding="utf-8").split("\n")[:-1] if path is not None and path.exists() else []
    assert len(quarantined) == len(result.invalid)
    assert len(result.train) + len(result.eval) + len(quarantined) == len(frame)
