"""What `status` and `history` print, on realistic records: within the width (100 and 80 columns,
the width COLUMNS gives a pipe), words never broken, one row for a version that holds both aliases,
the decision in colour on a terminal only."""

import io
import re

import pytest
from prefect_lora.flows.cli_views import age, fit_widths, history_view, label, status_view
from rich.console import Console

HOUR_MS = 3_600_000
REASONS = ("task_gain: exact_match improved by 0.852 [0.759, 0.944] over base (required: more than 0.05)\n"
           "self_retention_perplexity_ratio: 0.8891 [0.8759, 0.9061] within the limit 1.2\n"
           "reference_kl: 0.06913 [0.06471, 0.07399] within the limit 0.5\n"
           "champion: exact_match lead over version 1 is [-0.01852, 0.09259] on the same data: within the tolerance 0")


def _version(alias, version, decision, metrics, config_hash="88b7252e882380d5e886a02f31a55400b9e3d355", skip=None):
    return {"alias": alias, "version": version, "run_id": f"{version * 8:0<32}"[:32], "created_ms": 0, "age_s": 4000.0,
            "primary_metric": "exact_match", "metrics": metrics, "decision": decision,
            "lineage": {"base_model": "/root/.cache/prefect-lora/models/smollm2-135m-instruct-q4_1",
                        "base_model_hash": "0435b37b71d83cb9b0ad11b344c0a437e777836bd21883b66e86d5af72a94941",
                        "data_fingerprint": "ce002ec7941ff921c02c70b76972ad1bc4145ccffde97a6439d0c017a463e573",
                        "config_hash": config_hash, "code_version": "0.1.0+bb7be6d", "task": "causal_lm"},
            "last_skip": skip}


DEMO_METRICS = {"adapted_exact_match": 0.8519, "task_gain": 0.8519, "reference_perplexity_ratio": 0.8891,
                "reference_kl": 0.06913, "self_retention_perplexity_ratio": 0.8891, "champion_delta": 0.03704}
MODELS = [
    {"name": "demo-orders", "versions": 3,
     "champion": _version("champion", "3", "promoted", DEMO_METRICS, skip={"at": "2026-12-07T02:00:04+0000"}),
     "challenger": _version("challenger", "3", "promoted", DEMO_METRICS)},
    {"name": "tiny-sums", "versions": 2,
     "champion": _version("champion", "1", "promoted", {
         "adapted_eval_loss": 4.979, "task_gain": 0.4891, "reference_perplexity_ratio": 0.9684, "reference_kl": 0.02669}),
     "challenger": _version("challenger", "2", "rejected", {
         "adapted_eval_loss": 5.008, "task_gain": 0.4604, "reference_perplexity_ratio": 0.9821, "reference_kl": 0.02002,
         "champion_delta": -0.02873}, config_hash="230e2a59137b9de7")},
    {"name": "sums-careful", "versions": 1, "champion": None,
     "challenger": _version("challenger", "1", "rejected", {"adapted_eval_loss": 5.1})},
]
ACTOR = "root@vm (prefect flow run e14c8355-e89f-400e-a7fd-22140ae0337e)"
MOVES = [
    {"at": "2026-12-07T08:16:45+0000", "alias": "champion", "action": "auto-promote", "from_version": None,
     "to_version": "1", "actor": ACTOR, "reason": REASONS},
    {"at": "2026-12-07T08:16:45+0000", "alias": "challenger", "action": "admit", "from_version": None, "to_version": "1",
     "actor": ACTOR, "reason": "admitted by the gate: " + REASONS.replace("\n", "; ")},
    {"at": "2026-12-08T09:00:00+0000", "alias": "champion", "action": "rollback", "from_version": "2", "to_version": "1",
     "actor": "alice@laptop", "reason": "bad answers in production"},
]
VERSIONS = [{"version": "1", "created_ms": 1796631403869, "aliases": ["challenger", "champion"], "decision": "promoted",
             "run_id": "ea91a3eb940549518c21aadae1a50148"},
            {"version": "2", "created_ms": 1796631490752, "aliases": [], "decision": "rejected",
             "run_id": "d542c5567f4f40c1b48b538e28cacfb6"}]


def _render(renderable, width: int, **console) -> str:
    out = io.StringIO()
    Console(file=out, width=width, **console).print(renderable, highlight=False)
    return out.getvalue()


def _words(*texts: str) -> set[str]:
    """The words of `texts`, a comma or semicolon after one aside."""
    return {w.rstrip(",;") for t in texts for w in t.split()}


def _status_words() -> set[str]:
    words = _words("alias version age decision", *(label(k) for k in DEMO_METRICS), label("adapted_eval_loss"))
    for m in MODELS:
        for v in filter(None, (m["champion"], m["challenger"])):
            words |= _words(v["lineage"]["base_model"], v["lineage"]["data_fingerprint"][:12],
                            v["lineage"]["config_hash"][:12], *(f"{x:.4g}" for x in v["metrics"].values()))
    return words


@pytest.mark.parametrize("width", [100, 80])
def test_status_fits_the_width_and_breaks_no_word(width):
    out = _render(status_view("sqlite:///.prefect-lora/mlflow.db", MODELS), width)
    assert max(map(len, out.splitlines())) <= width, out
    assert _status_words() <= _words(out), _status_words() - _words(out)
    assert "…" not in out


def test_status_takes_a_few_lines_a_model_and_one_row_for_a_version_with_both_aliases():
    out = _render(status_view("sqlite:///m.db", MODELS), 100)
    demo = out.split("demo-orders")[1].split("tiny-sums")[0]
    rows = [line for line in demo.splitlines() if re.match(r"\s+champion|\s+challenger", line)]
    assert len(rows) == 1 and rows[0].split()[:3] == ["champion,", "challenger", "3"], demo
    assert len(demo.strip().splitlines()) <= 7, demo  # title, header (wrapped between words), rule, the row, lineage
    tiny = out.split("tiny-sums")[1].split("sums-careful")[0]
    assert [line.split()[:2] for line in tiny.splitlines() if re.match(r"\s+(champion|challenger)\b", line)] == [
        ["champion", "1"], ["challenger", "2"]]
    assert "last skip 2026-12-07 02:00" in demo and "version 2: data ce002ec7941f, config 230e2a59137b" in tiny
    careful = out.split("sums-careful")[1]
    assert [line.split()[:2] for line in careful.splitlines()[3:5]] == [["champion", "–"], ["challenger", "1"]], careful


def test_the_decision_is_coloured_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = _render(status_view("sqlite:///m.db", MODELS), 100, force_terminal=True, color_system="standard")
    assert re.search(r"\x1b\[32mpromoted", coloured) and re.search(r"\x1b\[33mrejected", coloured)
    assert "\x1b[" not in _render(status_view("sqlite:///m.db", MODELS), 100)  # a file or a pipe
    monkeypatch.setenv("NO_COLOR", "1")
    no_color = _render(status_view("sqlite:///m.db", MODELS), 100, force_terminal=True, color_system="standard")
    assert "\x1b[3" not in no_color


@pytest.mark.parametrize("width", [100, 80])
def test_history_fits_the_width_and_breaks_no_word(width):
    out = _render(history_view("demo-orders", VERSIONS, MOVES), width)
    assert max(map(len, out.splitlines())) <= width, out
    expected = _words(REASONS, ACTOR, "auto-promote rollback admit bad answers in production",
                      *(v["run_id"] for v in VERSIONS), "2026-12-07 08:16:45")
    assert expected <= _words(out), expected - _words(out)
    assert "reference_perple" not in out.replace("reference_perplexity", "")


def test_history_says_each_move_in_a_few_lines_oldest_first():
    out = _render(history_view("demo-orders", VERSIONS, MOVES), 100)
    heads = [line.split() for line in out.splitlines() if line.startswith("2026-")]
    assert [h[2:] for h in heads] == [["champion", "auto-promote", "–", "→", "1"],
                                      ["challenger", "admit", "–", "→", "1"], ["champion", "rollback", "2", "→", "1"]]
    rollback = out.split("rollback")[1]
    assert rollback.splitlines()[1:3] == ["    by alice@laptop", "    bad answers in production"]
    assert re.search(r"^1\s+2026-12-07 08:16:43\s+challenger, champion\s+promoted\s+ea91a3eb", out, re.MULTILINE), out


def test_history_shows_a_staged_rollouts_end_only_for_models_that_had_one():
    rolled = [VERSIONS[0], {**VERSIONS[1], "rollout": "rolled-back at 0.25"}]
    out = _render(history_view("demo-orders", rolled, MOVES), 120)
    assert re.search(r"^version\s+created\s+aliases\s+decision\s+rollout\s+MLflow run", out, re.MULTILINE), out
    assert re.search(r"^2\s+.*rejected\s+rolled-back at 0\.25\s+d542c556", out, re.MULTILINE), out
    assert "rollout" not in _render(history_view("demo-orders", VERSIONS, MOVES), 120).split("alias moves")[0]


def test_column_widths_shrink_the_widest_slack_first_headers_before_cells_and_never_below_a_word():
    assert fit_widths([20, 10, 12], 30, [5, 10, 3]) == [11, 10, 9]
    assert fit_widths([20, 10, 12], 40, [5, 10, 3]) == [18, 10, 12]
    assert fit_widths([20, 10, 12], 30, [18, 10, 3], [5, 10, 3]) == [17, 10, 3]  # the soft floors first
    assert fit_widths([20, 10, 12], 17, [5, 10, 3]) is None


def test_status_falls_back_to_a_line_a_version_where_no_table_fits():
    out = _render(status_view("sqlite:///m.db", MODELS[:1]), 60)
    assert max(map(len, out.splitlines())) <= 60, out
    assert "champion, challenger: version 3, age 1.1h, decision promoted, exact match 0.8519" in " ".join(out.split())


def test_labels_are_short_and_ages_read_like_a_person_would_say_them():
    names = ("adapted_exact_match", "task_gain", "reference_kl", "champion_delta", "benchmark_mmlu_accuracy_drop")
    assert [label(k) for k in names] == ["exact match", "gain", "KL", "vs champion", "benchmark mmlu accuracy drop"]
    assert [age(s) for s in (5, 90, 7200, 3 * 86400)] == ["5s", "1.5m", "2.0h", "3.0d"]


def test_history_of_a_model_with_no_versions_left_nor_moves():
    out = _render(history_view("m", [], []), 80)
    assert out.splitlines()[1].split() == ["version", "created", "aliases", "decision", "MLflow", "run"]
    assert out.rstrip().endswith("none recorded")
