"""Tests of prefect_lora.lora_tasks.data.sources: every format, every bad input, splits, sampling, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from prefect_lora.lora_tasks.data.sources import fingerprint, load_table, sample_rows, split_train_eval
from prefect_lora.lora_tasks.errors import DataError, LoraTaskError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

FRAME = pd.DataFrame(
    {
        "text": ["it 's a charming journey . ", 'a "quoted" phrase', "kids , spirit", "NA"],
        "label": [1, 0, 1, 0],
    }
)


def _write(path: Path, fmt: str, df: pd.DataFrame = FRAME) -> Path:
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        path.write_text(
            "text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in zip(df.text, df.label)), encoding="utf-8"
        )
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "datasets":
        import datasets

        datasets.Dataset.from_pandas(df, preserve_index=False).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    "fmt, name, labels",
    [
        ("csv", "d.csv", ["1", "0", "1", "0"]),  # CSV/TSV cells stay text: no type guessing
        ("tsv", "d.tsv", ["1", "0", "1", "0"]),
        ("jsonl", "d.jsonl", [1, 0, 1, 0]),
        ("parquet", "d.parquet", [1, 0, 1, 0]),
        ("datasets", "d_ds", [1, 0, 1, 0]),
    ],
)
def test_load_table_round_trips_each_format(tmp_path, fmt, name, labels):
    path = _write(tmp_path / name, fmt)
    df = load_table(path)  # format "auto"
    assert list(df.columns) == ["text", "label"]
    assert df["text"].tolist() == FRAME["text"].tolist()  # "NA" is text, quotes and trailing spaces kept
    assert df["label"].tolist() == labels
    assert df.index.tolist() == [1, 2, 3, 4]  # 1-based data row numbers
    assert load_table(path, format=fmt).equals(df)


def test_load_table_reads_explicit_format_regardless_of_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert load_table(path, format="jsonl")["text"].tolist() == ["a", "b"]


def test_jsonl_blank_lines_are_skipped_and_keys_united(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b", "label": 2}\n\n', encoding="utf-8")
    df = load_table(path)
    assert df["text"].tolist() == ["a", "b"]
    assert pd.isna(df.loc[1, "label"]) and df.loc[2, "label"] == 2


def test_csv_ragged_short_row_reads_missing_field_as_empty(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,1\nshort\n", encoding="utf-8")
    df = load_table(path)
    assert df.loc[2, "text"] == "short" and df.loc[2, "label"] == ""


def test_utf8_bom_is_dropped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufefftext,label\nhé,1\n".encode("utf-8"))
    df = load_table(path)
    assert list(df.columns) == ["text", "label"] and df.loc[1, "text"] == "hé"


def _bad(tmp_path: Path, name: str, content: bytes | str | None) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "name, content, fmt, expected",
    [
        ("missing.csv", None, "auto", "no such file"),
        ("empty.csv", b"", "auto", "is empty"),
        ("spaces.jsonl", b"  \n\n", "auto", "is empty"),
        ("empty.parquet", b"", "auto", "is empty"),
        ("data.xlsx", b"text\nx\n", "auto", "unknown extension '.xlsx'"),
        ("noext", b"text\nx\n", "auto", "unknown extension '(none)'"),
        ("d.csv", b"text\nx\n", "excel", "unknown format 'excel'"),
        ("latin1.csv", b"text\ncaf\xe9\n", "auto", "byte 0xe9 at offset 8 (line 2)"),
        ("latin1.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n', "auto", "(line 3)"),
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', "auto", "line 2 is not valid JSON"),
        ("list.jsonl", '{"text": "a"}\n["text", "b"]\n', "auto", "line 2 is a JSON list, not an object"),
        ("scalar.jsonl", "3\n", "auto", "line 1 is a JSON int"),
        ("ragged.csv", "text,label\na,1\nb,1,extra\n", "auto", "Expected 2 fields in line 3, saw 3"),
        ("ragged.tsv", "text\tlabel\na\t1\nb\t1\textra\n", "auto", "Expected 2 fields in line 3"),
        ("quote.csv", 'text,label\n"never closed,1\n', "auto", "cannot be parsed as CSV"),
        ("header_only.csv", "text,label\n", "auto", "no data rows"),
        ("dup_header.csv", "text,label,text\na,1,b\n", "auto", "repeats column name(s) ['text']"),
        ("dup_header.tsv", "text\ttext\na\tb\n", "auto", "repeats column name(s) ['text']"),
        ("junk.parquet", b"PAR1 not really parquet", "auto", "is not a readable Parquet file"),
        ("d.csv", "text\nx\n", "datasets", "needs a folder"),
    ],
)
def test_load_table_bad_input_raises_clear_data_error(tmp_path, name, content, fmt, expected):
    path = _bad(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_table(path, format=fmt)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "Fix" in message or "fix" in message
    assert isinstance(info.value, LoraTaskError)


def test_load_table_folder_errors(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(DataError, match="not one saved by"):
        load_table(plain)
    with pytest.raises(DataError, match="is a folder, not a csv file"):
        load_table(plain, format="csv")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="cannot be loaded as a saved dataset"):
        load_table(broken)


def test_load_table_dataset_dict_names_its_splits(tmp_path):
    import datasets

    ds = datasets.Dataset.from_pandas(FRAME, preserve_index=False)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits \['train', 'validation'\]"):
        load_table(tmp_path / "dd")
    assert len(load_table(tmp_path / "dd" / "train")) == 4


def test_split_train_eval_is_deterministic_and_complete():
    df = pd.DataFrame({"text": [f"row {i}" for i in range(100)]}, index=range(1, 101))
    train, eval_ = split_train_eval(df, 0.2, seed=7)
    again_train, again_eval = split_train_eval(df, 0.2, seed=7)
    assert train.equals(again_train) and eval_.equals(again_eval)
    assert len(eval_) == 20 and len(train) == 80
    assert sorted(train.index.tolist() + eval_.index.tolist()) == list(range(1, 101))
    assert train.index.is_monotonic_increasing and eval_.index.is_monotonic_increasing
    other_train, _ = split_train_eval(df, 0.2, seed=8)
    assert not other_train.index.equals(train.index)


@pytest.mark.parametrize("n, fraction", [(2, 0.01), (2, 0.99), (3, 0.5), (10, 0.95)])
def test_split_train_eval_keeps_both_splits_non_empty(n, fraction):
    train, eval_ = split_train_eval(pd.DataFrame({"text": ["x"] * n}), fraction, seed=0)
    assert len(train) >= 1 and len(eval_) >= 1 and len(train) + len(eval_) == n


@pytest.mark.parametrize("n, fraction", [(0, 0.1), (1, 0.1), (5, 0.0), (5, 1.0)])
def test_split_train_eval_rejects_impossible_splits(n, fraction):
    with pytest.raises(DataError):
        split_train_eval(pd.DataFrame({"text": ["x"] * n}), fraction, seed=0)


def test_sample_rows_is_seeded_and_keeps_order():
    df = pd.DataFrame({"text": [str(i) for i in range(50)]}, index=range(1, 51))
    a, b = sample_rows(df, 10, seed=1), sample_rows(df, 10, seed=1)
    assert a.equals(b) and len(a) == 10 and a.index.is_monotonic_increasing
    assert sample_rows(df, None, seed=1) is df
    assert sample_rows(df, 50, seed=1) is df
    assert not sample_rows(df, 10, seed=2).index.equals(a.index)


def test_fingerprint_ignores_index_and_dtype_quirks():
    base = pd.DataFrame({"text": ["a", "b", None], "label": [1, 2, 3]})
    quirky = pd.DataFrame(
        {"text": pd.Series(["a", "b", float("nan")], dtype=object), "label": pd.Series([1.0, 2.0, 3.0])}
    ).set_axis([10, 20, 30])
    assert fingerprint(base) == fingerprint(quirky)
    assert fingerprint(base) == fingerprint(base.astype({"label": "Int64"}))
    assert len(fingerprint(base)) == 64 and int(fingerprint(base), 16) >= 0


def test_fingerprint_changes_with_any_cell_column_or_order():
    base = pd.DataFrame({"text": ["a", "b"], "label": [1, 2]})
    variants = [
        base.assign(text=["a", "c"]),
        base.assign(label=[1, 3]),
        base.rename(columns={"label": "y"}),
        base.iloc[::-1],
        base.iloc[:1],
        base.assign(text=["a ", "b"]),
        base.assign(label=["1", "2"]),
    ]
    prints = {fingerprint(base)} | {fingerprint(v) for v in variants}
    assert len(prints) == len(variants) + 1
    train, eval_ = base.iloc[:1], base.iloc[1:]
    assert fingerprint(train, eval_) != fingerprint(base)
    assert fingerprint(train, eval_) != fingerprint(eval_, train)


def test_each_split_has_its_own_fingerprint_and_the_whole_keeps_its_own():
    from prefect_lora.lora_tasks.data.sources import fingerprints

    train, eval_ = pd.DataFrame({"text": ["a", "b"], "label": [1, 2]}), pd.DataFrame({"text": ["c"], "label": [3]})
    whole, (train_fp, eval_fp) = fingerprints(train, eval_)
    assert whole == fingerprint(train, eval_), "the data fingerprint (lineage, the skip) is unchanged"
    assert (train_fp, eval_fp) == (fingerprint(train), fingerprint(eval_)) and train_fp != eval_fp


def test_fingerprint_equal_across_formats(tmp_path):
    df = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]})
    prints = {
        fingerprint(load_table(_write(tmp_path / n, f, df)))
        for f, n in [("csv", "a.csv"), ("jsonl", "a.jsonl"), ("parquet", "a.parquet")]
    }
    assert len(prints) == 1


def test_real_sst2_validation_tsv_loads():
    path = SHARED_DATA / "sst2" / "validation.tsv"
    if not path.is_file():
        pytest.skip(f"real data not present at {path} (shared/data beside the checkout)")
    df = load_table(path)
    assert list(df.columns) == ["sentence", "label"]
    assert len(df) == 872
    assert set(df["label"]) == {"0", "1"}
    assert df.loc[1, "sentence"] == "it 's a charming and often affecting journey . "  # trailing space kept
    assert df["sentence"].str.contains('"').any() or df["sentence"].str.contains("'").any()


def test_real_cnndm_jsonl_loads_with_prompt_and_completion():
    path = SHARED_DATA / "cnndm_tldr" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"real data not present at {path} (shared/data beside the checkout)")
    df = load_table(path)
    assert {"prompt", "completion"} <= set(df.columns)
    assert len(df) == 200
    assert df["completion"].str.endswith("<|endoftext|>").all()
    with path.open(encoding="utf-8") as fh:
        assert df.loc[1, "prompt"] == json.loads(fh.readline())["prompt"]
