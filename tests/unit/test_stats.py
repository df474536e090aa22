"""Bootstrap intervals: coverage on data with a known answer, pairing, degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prefect_lora.lora_tasks.measurement.stats import bootstrap, mean_ci, paired_diff_ci, perplexity_ratio_ci, ratio_ci


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(200):
        sample = rng.normal(0.3, 1.0, 80)
        ci = mean_ci(sample, resamples=300, seed=trial)
        hits += ci.low <= 0.3 <= ci.high
        assert ci.low <= ci.point <= ci.high
    assert 0.88 <= hits / 200 <= 0.99  # percentile bootstrap at n=80 is slightly narrow, never wild


def test_pairing_detects_a_small_consistent_gain_that_unpaired_noise_hides():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1.0, 100)           # large between-example spread
    adapted = base + 0.05 + rng.normal(0, 0.01, 100)  # a small gain on every example
    paired = paired_diff_ci(adapted, base)
    assert paired.low > 0.03                 # the gain is certain
    unpaired = mean_ci(adapted).low - mean_ci(base).high
    assert unpaired < 0                      # the two separate intervals overlap


def test_ratio_of_sums_weights_examples_by_their_tokens():
    ci = ratio_ci([10.0, 1.0], [10, 1], resamples=50)
    assert ci.point == pytest.approx(1.0)
    assert ratio_ci([20.0, 1.0], [10, 1], resamples=0).point == pytest.approx(21 / 11)


def test_perplexity_ratio_is_exp_of_the_mean_nll_difference():
    ci = perplexity_ratio_ci([12.0, 8.0], [10.0, 6.0], [4, 4], resamples=100)
    assert ci.point == pytest.approx(math.exp(4 / 8))
    assert ci.low <= ci.point <= ci.high


def test_a_single_unit_gives_a_point_interval_and_nan_stays_nan():
    assert mean_ci([0.7]).to_list() == [0.7, 0.7, 0.7]
    ci = bootstrap(lambda i: math.nan, 5, resamples=20)
    assert math.isnan(ci.point) and math.isnan(ci.low) and math.isnan(ci.high)
