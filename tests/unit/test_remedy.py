"""Selection among remedy trials: the admissible set, tie-breaking, and the confirmation split."""

import math
import random

import pytest
from prefect_lora.lora_tasks.config import PromotionPolicy
from prefect_lora.lora_tasks.gate.promotion import Candidate
from prefect_lora.lora_tasks.gate.remedy import (
    BEYOND,
    SHOWN,
    UNMEASURED,
    WITHIN,
    Trial,
    choose,
    closest_trial,
    forgetting_margin,
    forgetting_standing,
    judge,
    remedy_needed,
    remedy_reason,
    remedy_summary,
    select_trial,
)
from prefect_lora.lora_tasks.measurement.evidence_split import confirm_mask, split_for_confirmation

POLICY = PromotionPolicy(min_task_gain=0.3, max_perplexity_ratio=1.2, max_self_retention_ratio=1.2, max_kl=0.5)
RATIO = "self_retention_perplexity_ratio"


def trial(name, gain_low, ratio_high, order=0, gain=None, kl_high=0.1):
    gain = gain_low + 0.05 if gain is None else gain
    cand = Candidate("exact_match", True, 0.0, gain, {RATIO: ratio_high - 0.03, "reference_kl": kl_high - 0.01},
                     intervals={"task_gain": (gain_low, gain + 0.05), RATIO: (ratio_high - 0.06, ratio_high),
                                "reference_kl": (kl_high - 0.02, kl_high)})
    return judge(Trial(name, {}, cand, order=order), None, POLICY)


CASES = [
    # (trials as (name, gain_low, ratio_high, order), expected choice)
    ("the unconstrained adapter passes: it wins on gain", [("s1", 0.70, 1.15, 0), ("s.5", 0.50, 1.05, 1)], "s1"),
    ("forgetting rules out the strongest", [("s1", 0.70, 1.24, 0), ("s.75", 0.62, 1.12, 1), ("s.5", 0.45, 1.05, 2)], "s.75"),
    ("gain below the minimum is not admissible", [("s1", 0.70, 1.30, 0), ("s.25", 0.20, 1.01, 3)], None),
    ("a tie on gain goes to less forgetting", [("a", 0.60, 1.15, 0), ("b", 0.60, 1.05, 1)], "b"),
    ("a full tie goes to the smaller change", [("a", 0.60, 1.10, 2), ("b", 0.60, 1.10, 1)], "b"),
    ("nothing admissible", [("s1", 0.70, 1.40, 0), ("s.5", 0.65, 1.30, 1)], None),
]


@pytest.mark.parametrize("label,specs,expected", CASES, ids=[c[0] for c in CASES])
def test_select_trial(label, specs, expected):
    trials = [trial(*s) for s in specs]
    chosen = select_trial(trials, POLICY)
    assert (chosen.name if chosen else None) == expected


def test_a_nan_bound_is_never_admissible_and_is_farthest():
    bad = trial("nan", 0.9, math.nan)
    good = trial("ok", 0.4, 1.1, order=1)
    assert not bad.decision.promote
    assert select_trial([bad, good], POLICY).name == "ok"
    assert forgetting_margin(bad.candidate, POLICY) == math.inf
    assert closest_trial([bad, trial("far", 0.9, 1.3)], POLICY).name == "far"


def test_forgetting_margin_is_relative_to_the_limit():
    # ratio 1.1 of limit 1.2 is half the room above 1; KL 0.4 of 0.5 is 0.8 of it: the worst counts
    assert forgetting_margin(trial("x", 0.5, 1.1, kl_high=0.4).candidate, POLICY) == pytest.approx(0.8)
    assert forgetting_margin(trial("x", 0.5, 1.3, kl_high=0.1).candidate, POLICY) == pytest.approx(1.5)


def test_confirmation_split_is_by_content_and_stable():
    keys = [f"prompt {i}" for i in range(2000)]
    mask = confirm_mask(keys, 0.5)
    assert 0.45 < sum(mask) / len(mask) < 0.55
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    again = dict(zip(shuffled, confirm_mask(shuffled, 0.5)))
    assert all(again[k] == m for k, m in zip(keys, mask)), "a row's side depends on its content, not its position"
    search, confirm = split_for_confirmation(keys, keys, 0.5)
    assert not set(search) & set(confirm) and len(search) + len(confirm) == len(keys)


def test_duplicates_never_straddle_the_split():
    keys = ["same row"] * 5 + ["other"] * 5 + [f"r{i}" for i in range(50)]
    search, confirm = split_for_confirmation(keys, keys, 0.5)
    assert not set(search) & set(confirm)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_confirmation_share_must_leave_two_parts(fraction):
    with pytest.raises(ValueError, match="between 0 and 1"):
        confirm_mask(["a"], fraction)


def test_too_few_items_to_split_is_a_clear_error():
    with pytest.raises(ValueError, match="more eval rows"):
        split_for_confirmation(["only"], ["only"], 0.5)



def test_the_remedy_section_keeps_existing_hashes_until_it_is_used():
    from prefect_lora.lora_tasks.config import config_from_dict
    from test_training import make_cfg

    cfg = make_cfg()
    raw = cfg.model_dump(mode="json")
    used = config_from_dict({**raw, "remedy": {"strategy": "scale"}})
    assert used.config_hash() != cfg.config_hash(), "a remedy changes what gets registered"
    assert used.training_hash() == cfg.training_hash(), "scaling needs no retraining: the same run folder"
    assert used.remedy.scales[0] == 1.0 and used.remedy.scales == sorted(used.remedy.scales, reverse=True)


# ----------------------------------------------------------------------------- whether to remedy


def measured(ratio, kl=(0.1, 0.05, 0.15), gain=(0.7, 0.6, 0.8), policy=POLICY, name="scale=1"):
    """The adapter as trained, judged: each figure a (point, low, high)."""
    forgetting = {} if ratio is None else {RATIO: ratio[0], "reference_kl": kl[0]}
    intervals = {"task_gain": gain[1:]} | ({} if ratio is None else {RATIO: ratio[1:], "reference_kl": kl[1:]})
    return judge(Trial(name, {"scale": 1.0}, Candidate("exact_match", True, 0.0, gain[0], forgetting, intervals=intervals)),
                 None, policy)


NEED_CASES = [
    # (label, trial, how each forgetting check that did not pass stands, needed, the reason says)
    ("sound: within every limit", measured((1.05, 1.0, 1.1)), {}, False, "kept within every forgetting limit"),
    ("failed: forgetting shown", measured((1.3, 1.25, 1.35)), {RATIO: SHOWN}, True, "failed (forgetting shown)"),
    ("undecided, the estimate past the limit: a smaller update can bring it in", measured((1.25, 1.15, 1.35)),
     {RATIO: BEYOND}, True, "estimate past the limit"),
    ("undecided, the estimate within the limit: more evidence, no trials", measured((1.15, 1.05, 1.25)),
     {RATIO: WITHIN}, False, "needs more evidence, not a remedy"),
    ("undecided on the limit itself: not past it", measured((1.2, 1.1, 1.3)), {RATIO: WITHIN}, False, "more evidence"),
    ("one within, one past: the one past decides", measured((1.15, 1.05, 1.25), kl=(0.6, 0.45, 0.75)),
     {RATIO: WITHIN, "reference_kl": BEYOND}, True, "reference_kl 0.6 (limit 0.5) undecided with the estimate past"),
    ("not a finite number counts as failed", measured((math.nan, 1.0, 1.1)), {RATIO: SHOWN}, True, "failed"),
    ("refused for gain alone: nothing to remedy", measured((1.05, 1.0, 1.1), gain=(0.2, 0.1, 0.3)), {}, False,
     "kept within every forgetting limit"),
    ("nothing measured: no remedy measures it", measured(None), {"forgetting": UNMEASURED}, False, "No remedy can help"),
]


@pytest.mark.parametrize("label, t, standing, needed, says", NEED_CASES, ids=[c[0] for c in NEED_CASES])
def test_only_forgetting_shown_or_an_estimate_past_the_limit_starts_trials(label, t, standing, needed, says):
    assert forgetting_standing(t, POLICY) == standing
    assert remedy_needed(t, POLICY) is needed
    assert says in remedy_reason(t, POLICY)


def test_an_undecided_adapter_within_the_limit_stands_and_its_summary_says_why():
    """No trials for more evidence: the adapter as trained is confirmed as it is, and a refusal is the
    gate's (undecided) rather than the remedy's."""
    from prefect_lora.lora_tasks.gate.decide import apply_outcome
    from prefect_lora.lora_tasks.gate.promotion import Decision

    within = measured((1.15, 1.05, 1.25))
    chosen, needed = choose([within], POLICY)
    assert chosen is within and needed is False
    summary = remedy_summary("scale", [within], chosen, needed, POLICY, 1.0, 30, 30)
    assert summary["needed"] is False and "self_retention_perplexity_ratio 1.15 (limit 1.2)" in summary["why"]
    refused = Decision(False, ["undecided"], [RATIO], [RATIO])
    assert apply_outcome(refused, summary) is refused

    past = measured((1.25, 1.15, 1.35))
    assert choose([past], POLICY) == (None, True), "an adapter a remedy could mend is never confirmed unremedied"


# ----------------------------------------------------------------------------- the search's trials


def test_the_search_grid_starts_with_the_configured_run_and_grows_by_the_smallest_change():
    from prefect_lora.lora_tasks.gate.remedy import search_grid

    space = {"learning_rate": [4e-4, 2e-4, 1e-4], "r": [16, 8], "replay_share": [0.0, 0.25]}
    grid = search_grid(space, 12)
    assert len(grid) == 12 and grid[0] == {}
    assert grid[1:4] == [{"replay_share": 0.25}, {"r": 8}, {"learning_rate": 2e-4}]
    changed = [len(g) for g in grid]
    assert changed == sorted(changed), "one setting changed before two, two before three"
    assert len({tuple(sorted(g.items())) for g in grid}) == 12, "no trial twice"
    assert search_grid(space, 2) == grid[:2] and search_grid(space, 100)[-1] == {"learning_rate": 1e-4, "r": 8,
                                                                                "replay_share": 0.25}


def test_the_default_search_space_comes_from_the_configured_run():
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.gate.remedy import search_space
    from test_training import make_cfg

    cfg = make_cfg()
    space = search_space(cfg)
    lr, r = cfg.training.learning_rate, cfg.lora.r
    assert space == {"learning_rate": [lr, lr / 2, lr / 4], "r": [r, r // 2], "replay_share": [0.0, 0.25]}
    raw = cfg.model_dump(mode="json")
    given = config_from_dict({**raw, "remedy": {"strategy": "search", "search_space": {"r": [2 * r, r]}}})
    assert search_space(given)["r"] == [r, 2 * r], "the configured value first, no repeat"


def test_a_trial_trains_as_one_worker_with_the_same_global_batch_and_alpha_over_r():
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.gate.remedy import trial_config, trial_name
    from test_training import make_cfg

    raw = make_cfg().model_dump(mode="json")
    raw["scaling"] = {**raw["scaling"], "num_workers": 2, "cpus_per_worker": 3}
    raw["lora"] = {**raw["lora"], "r": 16, "alpha": 32}
    cfg = config_from_dict(raw)
    t = trial_config(cfg, {"learning_rate": 1e-4, "r": 4, "replay_share": 0.25})
    assert (t.scaling.num_workers, t.scaling.cpus_per_worker) == (1, 6)
    assert t.training.batch_size == 2 * cfg.training.batch_size
    assert (t.lora.r, t.lora.alpha, t.training.learning_rate, t.replay.share) == (4, 8, 1e-4, 0.25)
    assert t.training.max_steps == cfg.training.max_steps and cfg.lora.r == 16, "the configured run is untouched"
    assert trial_config(cfg, {}).lora == cfg.lora
    assert trial_name({"learning_rate": 1e-4, "r": 4, "scale": 0.8}) == "lr=0.0001 r=4 scale=0.8"
    assert trial_name({}) == "as configured"


@pytest.mark.parametrize("space,fragment", [
    ({"learning_rate": []}, "at least one value"),
    ({"r": [0]}, "positive"),
    ({"replay_share": [0.6]}, "at most 0.5"),
])
def test_a_bad_search_space_names_its_key(space, fragment):
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.errors import ConfigError
    from test_training import make_cfg

    raw = make_cfg().model_dump(mode="json")
    with pytest.raises(ConfigError, match=fragment) as err:
        config_from_dict({**raw, "remedy": {"strategy": "search", "search_space": space}})
    assert "remedy.search_space" in str(err.value)


def test_a_trial_reads_as_one_progress_line():
    from prefect_lora.lora_tasks.gate.remedy import describe_trial

    line = describe_trial(trial("scale=0.8", 0.62, 1.1))
    assert line.startswith("scale=0.8: task_gain 0.67 [0.62, 0.72], self_retention_perplexity_ratio 1.07 [1.04, 1.1]")
    assert line.endswith(", admissible (0 s)")
    assert "not admissible" in describe_trial(trial("scale=1", 0.7, 1.3))
