"""Intervals and paired verdicts against hand values, scipy, simulated coverage and the metrics themselves."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from distributed_asac import metrics
from distributed_asac.stats import (HIGHER, LOWER, NONE, Interval, bootstrap_interval, paired_bootstrap,
                                    paired_difference, t_interval)


def test_t_interval_by_hand():
    # values 1..4: mean 2.5, s = sqrt(5/3) = 1.2910, t_{0.975, 3} = 3.1824 (a printed t table)
    interval = t_interval([1.0, 2.0, 3.0, 4.0])
    assert interval.estimate == 2.5 and interval.n == 4
    assert interval.half_width == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-6)


def test_t_interval_matches_scipy_and_skips_nan():
    values = [0.31, 0.12, 0.55, 0.47, 0.29]
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    interval = t_interval(values + [math.nan])  # an empty group's NaN rate is left out, not averaged
    assert (interval.low, interval.high, interval.n) == (pytest.approx(low), pytest.approx(high), 5)


def test_one_value_has_no_spread():
    interval = t_interval([0.4])
    assert interval.estimate == 0.4 and math.isnan(interval.low) and interval.verdict() == NONE


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    draws = rng.normal(loc=0.3, scale=0.2, size=(4000, 4))  # 4000 studies of 4 seeds each
    covered = [t_interval(row).low <= 0.3 <= t_interval(row).high for row in draws]
    assert 0.94 <= np.mean(covered) <= 0.96  # binomial sd at 4000 draws: 0.0034


def test_verdict_words():
    assert Interval(-0.2, -0.3, -0.1, 3, "t over seeds").verdict() == LOWER
    assert Interval(0.2, 0.1, 0.3, 3, "t over seeds").verdict() == HIGHER
    assert Interval(0.05, -0.1, 0.2, 3, "t over seeds").verdict() == NONE


def test_paired_difference_arithmetic():
    # per-seed differences −0.1, −0.2, −0.3: mean −0.2, s = 0.1, t_{0.975, 2} = 4.3027: ±0.248 spans 0
    interval = paired_difference([0.5, 0.4, 0.3], [0.6, 0.6, 0.6])
    assert interval.estimate == pytest.approx(-0.2)
    assert interval.half_width == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert interval.verdict() == NONE
    # differences −0.2, −0.25, −0.3: s = 0.05, ±0.124 around −0.25: wholly below 0
    assert paired_difference([0.4, 0.35, 0.3], [0.6, 0.6, 0.6]).verdict() == LOWER
    with pytest.raises(ValueError, match="one reference per seed"):
        paired_difference([0.1, 0.2], [0.1])


def _predictions(n=400, seed=0, flip=0.2):
    g = torch.Generator().manual_seed(seed)
    y, a = torch.randint(2, (n,), generator=g), torch.randint(2, (n,), generator=g)
    wrong = torch.rand(n, generator=g) < flip
    return y, a, torch.where(wrong, 1 - y, y)


def test_bootstrap_point_estimates_are_the_metrics_and_bounds_bracket_them():
    y, a, y_hat = _predictions()
    counts = metrics.group_counts(y, a, y_hat)
    intervals = bootstrap_interval(y, a, y_hat)
    for name, metric in metrics.HEADLINE.items():
        assert intervals[name].estimate == pytest.approx(metric(counts))
        assert intervals[name].low < intervals[name].estimate < intervals[name].high
    assert bootstrap_interval(y, a, y_hat)["DEO"] == intervals["DEO"]  # fixed seed: reproducible


def test_batched_metrics_equal_one_table_at_a_time():
    tables = torch.stack([metrics.group_counts(*_predictions(n=50, seed=s)) for s in range(6)])  # [6, 2, 2, 2]
    for metric in metrics.HEADLINE.values():
        assert metric(tables).tolist() == pytest.approx([metric(t) for t in tables])


def test_bootstrap_of_a_perfect_model_is_a_point():
    y, a, _ = _predictions()
    acc = bootstrap_interval(y, a, y.clone())["ACC"]
    assert (acc.low, acc.estimate, acc.high) == (100.0, 100.0, 100.0)


def test_bootstrap_interval_covers_the_population_accuracy():
    # accuracy 80% in the population; 200 test sets of 300 images: the 95% interval covers 0.8 in about 95%
    covered = []
    for seed in range(200):
        y, a, y_hat = _predictions(n=300, seed=seed, flip=0.2)
        acc = bootstrap_interval(y, a, y_hat, samples=400)["ACC"]
        covered.append(acc.low <= 80.0 <= acc.high)
    assert 0.88 <= np.mean(covered) <= 0.99  # binomial sd at 200 draws: 0.015


def test_paired_bootstrap_sees_a_difference_on_the_same_images():
    y, a, worse = _predictions(flip=0.3)
    better = torch.where(torch.arange(len(y)) % 2 == 0, y, worse)  # right on every other image
    diff = paired_bootstrap(y, a, better, worse)["ACC"]
    assert diff.estimate == pytest.approx(metrics.accuracy(metrics.group_counts(y, a, better))
                                          - metrics.accuracy(metrics.group_counts(y, a, worse)))
    assert diff.verdict() == HIGHER
    same = paired_bootstrap(y, a, worse, worse.clone())["DEO"]
    assert (same.low, same.high) == (0.0, 0.0) and same.verdict() == NONE


def test_power_of_the_paired_verdict_against_published_and_hand_values():
    from distributed_asac.stats import detectable_effect, paired_power, seeds_for_power

    # No true difference: the verdict errs exactly at the test's level, 5%.
    assert paired_power(0.0, 1.0, 7) == pytest.approx(0.05, abs=1e-12)
    # The paired (one-sample) t-test's standard sample sizes for 80% power at the two-sided 5% level
    # (Cohen's d = effect/sd): d = 1 needs 10 pairs (power 0.8031), d = 0.5 needs 34 (power 0.8078).
    assert seeds_for_power(1.0, 1.0) == 10 and paired_power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=1e-4)
    assert seeds_for_power(-0.5, 1.0) == 34 and paired_power(0.5, 1.0, 34) == pytest.approx(0.8078, abs=1e-4)
    # Only the ratio matters: the paper's C1 effect (−0.038) against a per-seed sd of 0.076 is d = 0.5.
    assert seeds_for_power(-0.038, 0.076) == 34
    # Large n: the normal approximation n ≈ ((z₀.₉₇₅ + z₀.₈) · sd/effect)² = 7.849 · 100 = 785, t adds ~2.
    assert 785 <= seeds_for_power(0.1, 1.0) <= 788
    # The smallest detectable effect inverts the power: at 10 seeds and sd 1, just under d = 1.
    effect = detectable_effect(1.0, 10)
    assert paired_power(effect, 1.0, 10) == pytest.approx(0.8, abs=1e-6) and 0.99 < effect < 1.0
