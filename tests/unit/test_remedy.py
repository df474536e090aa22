"""Selection among remedy trials: the admissible set, tie-breaking, and the confirmation split."""

import math
import random

import pytest

from lora_tasks.config import PromotionPolicy
from lora_tasks.promotion import Candidate
from lora_tasks.remedy import (
    Trial, closest_trial, confirm_mask, forgetting_margin, judge, select_trial, split_for_confirmation,
)

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
    from test_training import make_cfg

    from lora_tasks.config import config_from_dict

    cfg = make_cfg()
    raw = cfg.model_dump(mode="json")
    used = config_from_dict({**raw, "remedy": {"strategy": "scale"}})
    assert used.config_hash() != cfg.config_hash(), "a remedy changes what gets registered"
    assert used.training_hash() == cfg.training_hash(), "scaling needs no retraining: the same run folder"
    assert used.remedy.scales[0] == 1.0 and used.remedy.scales == sorted(used.remedy.scales, reverse=True)
