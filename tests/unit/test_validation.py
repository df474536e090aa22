"""Tests of the data contract: one case per check, reports, policies, quarantine, real data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from prefect_lora.lora_tasks.config import config_from_dict, load_config
from prefect_lora.lora_tasks.data.demo import write_demo_data
from prefect_lora.lora_tasks.data.prepare import contract_kwargs
from prefect_lora.lora_tasks.data.sources import load_table, split_train_eval
from prefect_lora.lora_tasks.data.validation import ValidationReport, build_schema, enforce_policy, validate_splits
from prefect_lora.lora_tasks.errors import LoraTaskError, ValidationFailed

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]
CLS = {"task": "sequence_classification", "labels": [0, 1]}
LM = {"task": "causal_lm"}
PC = {"task": "causal_lm", "prompt_column": "prompt", "completion_column": "completion"}


def _frame(rows: list[dict]) -> pd.DataFrame:
    """A frame indexed like load_table's: 1-based data row numbers."""
    return pd.DataFrame(rows).set_axis(range(1, len(rows) + 1))


def _cls(*texts_labels) -> pd.DataFrame:
    return _frame([{"text": t, "label": lab} for t, lab in texts_labels])


CLEAN_TRAIN = _cls(("good film", 1), ("bad film", 0), ("fine acting", 1))
CLEAN_EVAL = _cls(("great plot", 1), ("dull plot", 0))


def _found(result) -> list[tuple]:
    return [(i.split, i.check, i.column, i.row) for i in result.report.issues]


def _pc(*pairs) -> pd.DataFrame:
    return _frame([{"prompt": p, "completion": c} for p, c in pairs])


ONE_ANSWER = {"one_answer_per_prompt": True}
CONFLICT_CASES = [
    pytest.param(
        CLS,
        {},
        _cls(("a", 1), ("b", 0), (" a", 0)),
        CLEAN_EVAL,
        [("train", "conflicting_label", "text, label", 1), ("train", "conflicting_label", "text, label", 3)],
        id="conflicting_label",
    ),
    pytest.param(
        CLS,
        {},
        CLEAN_TRAIN,
        _cls(("x", "1"), ("x ", 0), ("y", 0)),
        [("eval", "conflicting_label", "text, label", 1), ("eval", "conflicting_label", "text, label", 2)],
        id="conflicting_label_in_eval",
    ),
    pytest.param(CLS, {}, _cls(("a", 1), ("a ", "1.0"), ("b", 0)), CLEAN_EVAL,
                 [("train", "duplicate_row", "text, label", 2)], id="same_label_is_a_duplicate_not_a_conflict"),
    pytest.param(CLS, {"check_duplicates": False}, _cls(("a", 1), ("a", 1)), CLEAN_EVAL, [],
                 id="same_label_without_duplicate_check_passes"),
    pytest.param(CLS, {"check_conflicts": False}, _cls(("a", 1), ("a", 0)), CLEAN_EVAL, [], id="conflicts_off"),
    pytest.param(CLS, {}, _cls(("a", 1), ("a", 7)), CLEAN_EVAL, [("train", "label_not_in_set", "label", 2)],
                 id="an_undeclared_label_is_not_a_conflict"),
    pytest.param(
        CLS,
        {},
        _cls((None, 1), ("  ", 0), ("", 1), ("ok", 0)),
        CLEAN_EVAL,
        [("train", "null_value", "text", 1), ("train", "blank_text", "text", 2), ("train", "blank_text", "text", 3)],
        id="missing_texts_do_not_conflict",
    ),
    pytest.param(CLS, {}, _cls(("a", 1), ("b", 0)), _cls(("a", 0)), [("eval", "train_eval_overlap", "text", 1)],
                 id="across_splits_it_is_overlap"),
    pytest.param(
        PC,
        ONE_ANSWER,
        _pc(("p1", "c1"), ("p2", "c2"), ("p1 ", "c3")),
        _pc(("p3", "c3")),
        [("train", "conflicting_completion", "prompt, completion", 1),
         ("train", "conflicting_completion", "prompt, completion", 3)],
        id="conflicting_completion",
    ),
    pytest.param(PC, ONE_ANSWER, _pc(("p1", "c1"), ("p1", " c1 ")), _pc(("p3", "c3")),
                 [("train", "duplicate_row", "prompt, completion", 2)], id="same_completion_is_a_duplicate"),
    pytest.param(PC, {}, _pc(("p1", "c1"), ("p1", "c2")), _pc(("p3", "c3")), [], id="several_completions_allowed"),
    pytest.param(PC, {**ONE_ANSWER, "check_conflicts": False}, _pc(("p1", "c1"), ("p1", "c2")), _pc(("p3", "c3")), [],
                 id="completion_conflicts_off"),
    pytest.param(LM, ONE_ANSWER, _frame([{"text": "t"}, {"text": "t"}]), _frame([{"text": "z"}]),
                 [("train", "duplicate_row", "text", 2)], id="plain_text_has_no_answer_to_conflict"),
]

CASES = [
    pytest.param(
        CLS, {}, _cls(("a", 1), (None, 0), ("c", 1)), CLEAN_EVAL, [("train", "null_value", "text", 2)], id="null_text"
    ),
    pytest.param(
        CLS,
        {},
        _cls(("a", 1), ("b", None), ("c", 1)),
        CLEAN_EVAL,
        [("train", "null_value", "label", 2)],
        id="null_label",
    ),
    pytest.param(
        CLS,
        {},
        _cls(("a", 1), ("b", 0), (42, 1)),
        CLEAN_EVAL,
        [("train", "text_not_str", "text", 3)],
        id="text_not_str",
    ),
    pytest.param(
        CLS, {}, _cls(("  \t ", 1), ("b", 0)), CLEAN_EVAL, [("train", "blank_text", "text", 1)], id="blank_text"
    ),
    pytest.param(
        CLS,
        {"max_chars": 10},
        _cls(("short", 1), ("far too long text", 0), ("   padded   ", 1)),
        CLEAN_EVAL,
        [("train", "text_length", "text", 2)],
        id="too_long",
    ),
    pytest.param(
        CLS,
        {"min_chars": 3},
        _cls(("ab ", 1), ("abc", 0)),
        CLEAN_EVAL,
        [("train", "text_length", "text", 1)],
        id="too_short",
    ),
    pytest.param(
        CLS,
        {},
        _cls(("a", 1), ("b", 0), ("c", 2)),
        _cls(("d", "pos"), ("e", "1")),
        [("train", "label_not_in_set", "label", 3), ("eval", "label_not_in_set", "label", 1)],
        id="label_not_in_set",
    ),
    pytest.param(
        CLS,
        {},
        _cls(("a", 1), ("b", 0), ("a ", "1"), ("b", 0)),
        CLEAN_EVAL,
        [("train", "duplicate_row", "text, label", 3), ("train", "duplicate_row", "text, label", 4)],
        id="duplicate_row",
    ),
    pytest.param(
        CLS,
        {},
        _cls(("a", 1), ("b", 0), ("a ", "1"), ("a", 0)),
        CLEAN_EVAL,
        [("train", "duplicate_row", "text, label", 3)]
        + [("train", "conflicting_label", "text, label", r) for r in (1, 3, 4)],
        id="duplicate_in_a_conflict_is_both",
    ),
    pytest.param(CLS, {"check_duplicates": False}, _cls(("a", 1), ("a", 1)), CLEAN_EVAL, [], id="duplicates_off"),
    pytest.param(
        CLS,
        {},
        CLEAN_TRAIN,
        _cls(("great plot", 1), (" good film ", 1)),
        [("eval", "train_eval_overlap", "text", 2)],
        id="train_eval_overlap",
    ),
    pytest.param(CLS, {"check_overlap": False}, CLEAN_TRAIN, _cls(("good film", 1)), [], id="overlap_off"),
    *CONFLICT_CASES,
    pytest.param(
        CLS,
        {},
        _frame([{"text": "a"}, {"text": "b"}]),
        CLEAN_EVAL,
        [("train", "missing_column", "label", None)],
        id="missing_column",
    ),
    pytest.param(
        CLS,
        {},
        CLEAN_TRAIN,
        _frame([{"sentence": "a", "label": 1}]),
        [("eval", "missing_column", "text", None)],
        id="missing_text_column",
    ),
    pytest.param(
        LM,
        {},
        _frame([{"text": "x"}, {"text": ""}, {"text": "y"}]),
        _frame([{"text": "z"}]),
        [("train", "blank_text", "text", 2)],
        id="causal_blank",
    ),
    pytest.param(
        PC,
        {},
        _frame([{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": " "}]),
        _frame([{"prompt": "p3", "completion": None}]),
        [("train", "blank_text", "completion", 2), ("eval", "null_value", "completion", 1)],
        id="prompt_completion",
    ),
    pytest.param(
        PC,
        {},
        _frame([{"prompt": "p1", "completion": "c1"}]),
        _frame([{"prompt": "p1", "completion": "other"}]),
        [("eval", "train_eval_overlap", "prompt", 1)],
        id="prompt_overlap",
    ),
    pytest.param(
        PC,
        {},
        _frame([{"text": "t"}]),
        _frame([{"prompt": "p", "completion": "c"}]),
        [("train", "missing_column", "prompt", None), ("train", "missing_column", "completion", None)],
        id="prompt_missing",
    ),
]


@pytest.mark.parametrize("task_kwargs, options, train, eval_, expected", CASES)
def test_each_check_names_split_row_column(task_kwargs, options, train, eval_, expected):
    result = validate_splits(train, eval_, **task_kwargs, **options)
    assert sorted(_found(result), key=str) == sorted(expected, key=str)
    report = result.report
    assert report.ok == (not expected)
    for issue in report.issues:
        assert issue.reason and len(issue.reason) > 20
        assert issue.value is None or len(issue.value) <= 80
    invalid_rows = {(s, r) for s, _, _, r in expected if r is not None}
    whole_split = {s for s, _, _, r in expected if r is None}
    for split, frame, valid in (("train", train, result.train), ("eval", eval_, result.eval)):
        want = [] if split in whole_split else [r for r in frame.index if (split, r) not in invalid_rows]
        assert valid.index.tolist() == want
        assert report.valid_rows[split] == len(want)
    assert len(result.invalid) == sum(report.invalid_rows.values())
    json.dumps(report.to_dict())


def test_missing_column_names_existing_columns_and_fails_every_row():
    train = _frame([{"text": "a", "y": 1}, {"text": "b", "y": 0}])
    result = validate_splits(train, CLEAN_EVAL, **CLS)
    [issue] = result.report.issues
    assert issue.reason.startswith("column 'label' is missing; the columns are ['text', 'y']")
    assert result.report.counts_by_check == {"missing_column": 2}
    assert result.invalid["row"].tolist() == [1, 2]


def test_duplicate_reason_names_first_occurrence():
    result = validate_splits(_cls(("a", 1), ("b", 0), ("b", 0), ("b ", 0)), CLEAN_EVAL, **CLS)
    rows = [(i.row, i.reason) for i in result.report.issues]
    assert [r for r, _ in rows] == [3, 4]
    assert all("repeats row 2 of train" in reason for _, reason in rows)


def test_conflict_reasons_name_the_other_rows_their_labels_and_the_fix():
    train = _cls(("a", 1), ("b", 0), ("a ", "0"), ("a", 1.0), ("b", 1))
    result = validate_splits(train, CLEAN_EVAL, check_duplicates=False, **CLS)
    reasons = {i.row: i.reason for i in result.report.issues}
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert reasons[1].startswith("the same text has label 0 in row 3 of train (label 1 here); fix or drop one of")
    assert reasons[3].startswith("the same text has label 1 in rows 1, 4 of train (label 0 here)")
    assert "label 1 in row 5 of train (label 0 here)" in reasons[2]
    assert all("fix or drop one of the rows" in r for r in reasons.values())
    assert result.train.empty and len(result.invalid) == 5


def test_a_large_conflict_names_a_few_rows_and_counts_the_rest():
    train = _cls(*[(f"t{i % 2}" if i else "t0", 1) for i in range(15)], ("t0", 0))
    issues = {i.row: i for i in validate_splits(train, CLEAN_EVAL, check_duplicates=False, **CLS).report.issues}
    assert issues[16].reason.startswith("the same text has label 1 in rows 1, 3, 5, 7, 9 and 3 more row(s) of train")
    assert "label 0 in row 16 of train (label 1 here)" in issues[1].reason
    assert sorted(issues) == [1, 3, 5, 7, 9, 11, 13, 15, 16]


@pytest.mark.parametrize(
    "generation, reported",
    [({"metric": "exact"}, True), ({"metric": "json"}, True), ({"metric": "rouge_l"}, False), (None, False)],
)
def test_completion_conflicts_follow_the_generation_metric(generation, reported, tmp_path):
    cfg = config_from_dict({
        "model_name": "m", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": str(tmp_path / "x.jsonl"), "prompt_column": "prompt", "completion_column": "completion"},
        "training": {"max_steps": 5}, "evaluation": {"generation": generation},
    })
    train = _frame([{"prompt": "2+2?", "completion": "4"}, {"prompt": "hi", "completion": "hello"},
                    {"prompt": "2+2? ", "completion": "5"}])
    result = validate_splits(train, _frame([{"prompt": "3+3?", "completion": "6"}]), **contract_kwargs(cfg))
    assert _found(result) == ([("train", "conflicting_completion", "prompt, completion", 1),
                               ("train", "conflicting_completion", "prompt, completion", 3)] if reported else [])
    if reported:
        assert result.report.issues[0].reason.startswith("the same prompt has completion '5' in row 3 of train")
        assert "exact and json scoring expect one right completion per prompt" in result.report.issues[0].reason
    cfg.data.validation.check_conflicts = False
    assert validate_splits(train, _frame([{"prompt": "3+3?", "completion": "6"}]), **contract_kwargs(cfg)).report.ok


def test_the_demo_data_has_one_answer_per_prompt_as_its_json_metric_expects(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert contract_kwargs(cfg)["one_answer_per_prompt"]
    train, eval_ = write_demo_data(tmp_path)  # as `prefect-lora demo prepare` writes it
    report = validate_splits(load_table(train), load_table(eval_), **contract_kwargs(cfg)).report
    assert report.ok, report.to_markdown()


def test_conflicts_under_quarantine_go_to_the_file_and_render_in_the_report(tmp_path):
    train = _cls(*[(f"text {i}", i % 2) for i in range(18)], ("text 3", 0))
    result = validate_splits(train, CLEAN_EVAL, **CLS)
    out, path = enforce_policy(result, policy="quarantine", max_invalid_fraction=0.2, quarantine_dir=tmp_path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["row"], r["checks"], r["text"], r["label"]) for r in records] == [
        (4, "conflicting_label", "text 3", 1), (19, "conflicting_label", "text 3", 0)]
    assert "label 0 in row 19 of train" in records[0]["reason"]
    assert "text 3" not in out.train["text"].tolist() and len(out.train) == 17
    md = result.report.to_markdown()
    assert "### conflicting_label: 2 row(s)" in md and "| train | 19 | text, label | ('text 3', 0) |" in md
    assert json.loads(json.dumps(result.report.to_dict()))["counts_by_check"] == {"conflicting_label": 2}
    with pytest.raises(ValidationFailed, match="conflicting_label 2 row"):
        enforce_policy(result, policy="fail")


def test_valid_rows_are_stripped_and_labels_as_declared():
    train = _cls(("  good film  ", "1"), ("bad film\t", " 0"), ("ok", 1.0))
    result = validate_splits(train, CLEAN_EVAL, **CLS)
    assert result.report.ok
    assert result.train["text"].tolist() == ["good film", "bad film", "ok"]
    assert result.train["label"].tolist() == [1, 0, 1]
    assert all(type(v) is int for v in result.train["label"])


@pytest.mark.parametrize(
    "declared, data_labels, ok",
    [
        ([0, 1], ["0", "1"], True),
        (["0", "1"], [0, 1], True),
        ([0, 1], [" 1", "+0"], True),
        (["neg", "pos"], ["pos", "neg "], True),
        ([0, 1], [1.0, 0.0], True),
        ([0, 1], ["1.0", "0.00"], True),  # a CSV cell reads as the JSON float does
        ([0, 1], [True, 0], False),
        ([0, 1], ["1.5", 1], False),
        (["neg", "pos"], ["Pos", "neg"], False),
    ],
)
def test_int_and_str_labels_compare_robustly(declared, data_labels, ok):
    train = _frame([{"text": f"t{i}", "label": v} for i, v in enumerate(data_labels)])
    result = validate_splits(
        train, CLEAN_EVAL.assign(label=[declared[1], declared[0]]), task="sequence_classification", labels=declared
    )
    assert result.report.ok == ok
    if ok:
        assert set(result.train["label"]) <= set(declared)


def test_build_schema_has_the_task_columns():
    cls = build_schema("sequence_classification", text_column="sentence", label_column="y", labels=["a", "b"])
    assert set(cls.columns) == {"sentence", "y"}
    pc = build_schema("causal_lm", prompt_column="p", completion_column="c")
    assert set(pc.columns) == {"p", "c"}
    assert set(build_schema("causal_lm").columns) == {"text"}
    with pytest.raises(ValueError):
        build_schema("sequence_classification")
    with pytest.raises(ValueError):
        build_schema("regression")


MIXED_TRAIN = [
    {"text": "a fine film", "label": 1},
    {"text": None, "label": 0},
    {"text": "   ", "label": 1},
    {"text": "quite bad", "label": 7},
    {"text": "leaked sentence", "label": 1},
    {"text": "a fine film", "label": 1},
    {"text": "solid", "label": "maybe"},
]
MIXED_EVAL = [
    {"text": "another", "label": 0},
    {"text": "leaked sentence ", "label": 1},
    {"text": "", "label": None},
]
MIXED_EXPECTED = [
    ("train", 2, "null_value", "text"),
    ("train", 3, "blank_text", "text"),
    ("train", 4, "label_not_in_set", "label"),
    ("train", 6, "duplicate_row", "text, label"),
    ("train", 7, "label_not_in_set", "label"),
    ("eval", 2, "train_eval_overlap", "text"),
    ("eval", 3, "blank_text", "text"),
    ("eval", 3, "null_value", "label"),
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mixed_bad_file_fail_policy_names_every_row_and_check(tmp_path):
    train = load_table(_write_jsonl(tmp_path / "train.jsonl", MIXED_TRAIN))
    eval_ = load_table(_write_jsonl(tmp_path / "eval.jsonl", MIXED_EVAL))
    result = validate_splits(train, eval_, **CLS)
    assert sorted((i.split, i.row, i.check, i.column) for i in result.report.issues) == sorted(MIXED_EXPECTED)
    with pytest.raises(ValidationFailed) as info:
        enforce_policy(result, policy="fail")
    assert info.value.report is result.report
    assert "Validation failed: 7 of 10 rows are invalid (train: 5 of 7, eval: 2 of 3)" in str(info.value)
    message = info.value.report.to_markdown(50)
    for split, row, check, column in MIXED_EXPECTED:
        assert f"| {split} | {row} | {column} |" in message
        assert f"### {check}" in message
    assert "| train | 2 | text | null |" in message  # JSON null shown as null, not nan
    assert result.report.counts_by_check == {
        "label_not_in_set": 2,
        "blank_text": 2,
        "null_value": 2,
        "duplicate_row": 1,
        "train_eval_overlap": 1,
    }


def test_fail_policy_passes_clean_data():
    result = validate_splits(CLEAN_TRAIN, CLEAN_EVAL, **CLS)
    assert enforce_policy(result, policy="fail") == (result, None)
    assert "passed" in result.report.to_markdown()
    assert result.report.summary().startswith("Validation passed")


def _twenty_rows(bad: int) -> pd.DataFrame:
    return _cls(*[("   " if i < bad else f"text {i}", i % 2) for i in range(20)])


def test_quarantine_under_limit_writes_invalid_rows(tmp_path):
    result = validate_splits(_twenty_rows(1), CLEAN_EVAL, **CLS)
    out, path = enforce_policy(result, policy="quarantine", max_invalid_fraction=0.1, quarantine_dir=tmp_path / "q")
    assert out is result and path == tmp_path / "q" / "quarantine.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == [
        {"split": "train", "row": 1, "checks": "blank_text", "reason": records[0]["reason"], "text": "   ", "label": 0}
    ]
    assert "blank after stripping" in records[0]["reason"]
    assert len(out.train) == 19
    assert load_table(path)["text"].tolist() == ["   "]  # quarantine files load back


def test_quarantine_without_invalid_rows_writes_nothing(tmp_path):
    result = validate_splits(CLEAN_TRAIN, CLEAN_EVAL, **CLS)
    assert enforce_policy(result, policy="quarantine", max_invalid_fraction=0.0, quarantine_dir=tmp_path) == (
        result,
        None,
    )
    assert not (tmp_path / "quarantine.jsonl").exists()


def test_quarantine_over_limit_raises_naming_share_limit_and_file(tmp_path):
    result = validate_splits(_twenty_rows(5), CLEAN_EVAL, **CLS)
    with pytest.raises(ValidationFailed) as info:
        enforce_policy(result, policy="quarantine", max_invalid_fraction=0.1, quarantine_dir=tmp_path)
    message = str(info.value)
    assert "5 of 20 train rows are invalid (25.0%)" in message
    assert "max_invalid_fraction=10.0%" in message
    assert str(tmp_path / "quarantine.jsonl") in message
    assert len((tmp_path / "quarantine.jsonl").read_text().splitlines()) == 5


def test_quarantine_raises_when_a_split_has_no_valid_rows(tmp_path):
    result = validate_splits(CLEAN_TRAIN, _cls(("  ", 1)), **CLS)
    with pytest.raises(ValidationFailed, match="The eval split has no valid rows"):
        enforce_policy(result, policy="quarantine", max_invalid_fraction=1.0, quarantine_dir=tmp_path)


def test_invalid_frame_keeps_original_columns_without_clashes():
    train = _frame([{"text": "a", "label": 1, "reason": "mine"}, {"text": "", "label": 0, "reason": "x"}])
    result = validate_splits(train, CLEAN_EVAL, **CLS)
    assert list(result.invalid.columns) == ["split", "row", "checks", "reason", "text", "label", "data_reason"]
    assert result.invalid.loc[0, "data_reason"] == "x"


def test_report_markdown_truncates_and_dict_is_json():
    train = _cls(*[(" ", 1)] * 8, ("ok", 0))
    report = validate_splits(train, CLEAN_EVAL, check_duplicates=False, **CLS).report
    assert isinstance(report, ValidationReport)
    md = report.to_markdown(max_rows_per_check=3)
    assert md.count("| train |") == 4  # split table row + 3 issue rows
    assert "and 5 more blank_text issue(s)" in md
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts_by_check"] == {"blank_text": 8} and data["invalid_rows"] == {"train": 8, "eval": 0}
    assert data["issues"][0]["row"] == 1


def test_long_values_are_truncated_and_pipes_escaped():
    train = _cls(("x|" * 100, 1), ("ok", 0))
    report = validate_splits(train, CLEAN_EVAL, max_chars=50, **CLS).report
    [issue] = report.issues
    assert len(issue.value) == 80 and issue.value.endswith("...")
    assert "x\\|x" in report.to_markdown()


def test_non_integer_index_is_numbered_by_position():
    train = _cls(("a", 1), ("", 0)).set_axis(["r1", "r2"])
    [issue] = validate_splits(train, CLEAN_EVAL, **CLS).report.issues
    assert issue.row == 2


def test_errors_share_the_base_class():
    assert issubclass(ValidationFailed, LoraTaskError)


def test_real_sst2_validates_with_trailing_spaces_stripped():
    path = SHARED_DATA / "sst2" / "validation.tsv"
    if not path.is_file():
        pytest.skip(f"real data not present at {path} (shared/data beside the checkout)")
    raw = load_table(path)
    assert raw["sentence"].str.endswith(" ").mean() > 0.5  # the trait the contract must absorb
    train, eval_ = split_train_eval(raw, 0.2, seed=0)
    result = validate_splits(train, eval_, task="sequence_classification", text_column="sentence", labels=[0, 1])
    enforce_policy(result, policy="fail")
    assert result.report.ok, result.report.to_markdown()
    assert len(result.train) + len(result.eval) == 872
    assert not result.train["sentence"].str.endswith(" ").any()
    assert set(result.train["label"]) == {0, 1}


def test_real_sst2_train_has_three_phrases_with_two_labels(tmp_path):
    path = SHARED_DATA / "sst2" / "train.tsv"
    if not path.is_file():
        pytest.skip(f"real data not present at {path} (shared/data beside the checkout)")
    cfg = load_config(REPO / "configs" / "sst2.yaml")
    result = validate_splits(load_table(path), load_table(path.with_name("validation.tsv")), **contract_kwargs(cfg))
    conflicts = sorted((i.row, i.value) for i in result.report.issues if i.check == "conflicting_label")
    assert [v for _, v in conflicts] == [repr(("excruciatingly ", "0")), repr(("excruciatingly ", "1")),
                                         repr(("sillier ", "0")), repr(("the only reason ", "0")),
                                         repr(("sillier ", "1")), repr(("the only reason ", "1"))]
    assert result.report.counts_by_check == {"duplicate_row": 290, "conflicting_label": 6}
    assert not result.train["sentence"].isin(["excruciatingly", "sillier", "the only reason"]).any()
    v = cfg.data.validation  # the shipped policy still lets the whole file through, the conflicts set aside
    enforce_policy(result, policy=v.policy, max_invalid_fraction=v.max_invalid_fraction, quarantine_dir=tmp_path)


def test_real_cnndm_quarantines_its_few_duplicates(tmp_path):
    path = SHARED_DATA / "cnndm_tldr" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"real data not present at {path} (shared/data beside the checkout)")
    train, eval_ = split_train_eval(load_table(path), 0.1, seed=0)
    result = validate_splits(train, eval_, **PC)
    assert set(result.report.counts_by_check) <= {"duplicate_row", "train_eval_overlap"}
    _, qpath = enforce_policy(result, policy="quarantine", max_invalid_fraction=0.1, quarantine_dir=tmp_path)
    assert (qpath is None) == result.report.ok


def test_a_csv_without_a_header_or_with_another_delimiter_says_so(tmp_path):
    headless = tmp_path / "h.csv"
    headless.write_text("I loved it,1\nawful,0\nfine,1\n")
    semi = tmp_path / "s.csv"
    semi.write_text("text;label\ngood;1\nbad;0\n")
    for path, says in ((headless, "If the first row is data, not a header, add the header row: text,label"),
                       (semi, "the file separates fields with ';', not ','")):
        train = load_table(path)
        result = validate_splits(train, CLEAN_EVAL, **CLS)
        assert not result.report.ok and all(says in i.reason for i in result.report.issues if i.split == "train")
        assert result.report.counts_by_check == {"missing_column": len(train)}, "two missing columns, each row once"


def test_a_device_or_a_fifo_is_refused_before_reading(tmp_path):
    import os

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        with pytest.raises(LoraTaskError, match="is not a regular file"):
            load_table(path, "jsonl")
