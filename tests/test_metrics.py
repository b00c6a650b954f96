"""Metrics against hand-computed counts and against fairlearn on random data."""

import math

import numpy as np
import pytest
import torch
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference, true_positive_rate

from distributed_asac import metrics


def _counts(rows):
    y, a, y_hat = (torch.tensor(c) for c in zip(*rows))
    return metrics.group_counts(y, a, y_hat)


def test_hand_computed_case():
    # Group a=0: Y=1 → ŷ 1,1,0 (TPR 2/3); Y=0 → ŷ 0,1 (FPR 1/2).
    # Group a=1: Y=1 → ŷ 1 (TPR 1);       Y=0 → ŷ 0,0,0 (FPR 0).
    rows = [(1, 0, 1), (1, 0, 1), (1, 0, 0), (0, 0, 0), (0, 0, 1), (1, 1, 1), (0, 1, 0), (0, 1, 0), (0, 1, 0)]
    counts = _counts(rows)
    assert counts.sum() == 9 and counts[1, 0, 1] == 2
    assert metrics.deop(counts) == pytest.approx(1 - 2 / 3)
    assert metrics.deo(counts) == pytest.approx(0.5 * ((1 - 2 / 3) + (1 / 2 - 0)))
    assert metrics.ddp(counts) == pytest.approx(abs(3 / 5 - 1 / 4))  # positives 3 of 5 vs 1 of 4
    assert metrics.accuracy(counts) == pytest.approx(100 * 7 / 9)
    report = metrics.fairness_report(counts)
    assert report["TPR_a0"] == pytest.approx(2 / 3) and report["FPR_a1"] == 0.0 and report["n_a1"] == 4
    # group accuracies: (y=1, a=0) 2 of 3, (y=0, a=0) 1 of 2, (y=1, a=1) 1 of 1, (y=0, a=1) 3 of 3
    assert [report[f"ACC_y{y}_a{a}"] for y, a in [(1, 0), (0, 0), (1, 1), (0, 1)]] == pytest.approx([200 / 3, 50, 100, 100])
    assert metrics.worst_group_accuracy(counts) == pytest.approx(50.0) == report["worst_group_ACC"]


def test_empty_group_gives_nan_and_names_it():
    counts = _counts([(1, 0, 1), (0, 0, 0), (0, 1, 1)])  # no Y=1 image in group a=1
    assert math.isnan(metrics.deop(counts)) and math.isnan(metrics.deo(counts))
    assert not math.isnan(metrics.ddp(counts))
    assert metrics.empty_groups(counts) == ["Y=1,A=1"]
    assert math.isnan(metrics.worst_group_accuracy(counts))


def test_counts_add_across_shards():
    g = torch.Generator().manual_seed(0)
    y, a, y_hat = (torch.randint(0, 2, (101,), generator=g) for _ in range(3))
    whole = metrics.group_counts(y, a, y_hat)
    parts = sum(metrics.group_counts(y[r::3], a[r::3], y_hat[r::3]) for r in range(3))
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("seed", range(5))
def test_against_fairlearn(seed):
    rng = np.random.default_rng(seed)
    n = 500
    a = rng.integers(0, 2, n)
    y = rng.integers(0, 2, n)
    y_hat = np.where(rng.random(n) < 0.3 + 0.4 * a, 1 - y, y)  # group-dependent errors
    counts = metrics.group_counts(torch.tensor(y), torch.tensor(a), torch.tensor(y_hat))
    assert metrics.deo(counts) == pytest.approx(equalized_odds_difference(y, y_hat, sensitive_features=a, agg="mean"))
    assert metrics.ddp(counts) == pytest.approx(demographic_parity_difference(y, y_hat, sensitive_features=a))
    tpr = [true_positive_rate(y[a == g], y_hat[a == g]) for g in (0, 1)]
    assert metrics.deop(counts) == pytest.approx(abs(tpr[0] - tpr[1]))
    assert metrics.accuracy(counts) == pytest.approx(100 * np.mean(y == y_hat))


class _Planted(torch.nn.Module):
    """Two heads whose predictions are written in the image: pixel [0, 0, 0] is ŷ, pixel [1, 0, 0] is C's guess."""

    def forward(self, x, protected=True):
        y_hat, c_hat = x[:, 0, 0, 0].long(), x[:, 1, 0, 0].long()
        return torch.nn.functional.one_hot(y_hat, 2).float(), torch.nn.functional.one_hot(c_hat, 2).float()


def test_protected_accuracy_where_the_target_equals_the_protected_label_and_where_not():
    from accelerate import Accelerator
    from torch.utils.data import TensorDataset

    from distributed_asac.evaluate import evaluate

    # (y, a, C's guess): six images with y = a, C right on five; four with y ≠ a, C right on one (the last).
    rows = [(0, 0, 0), (0, 0, 0), (1, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0, 1),
            (0, 1, 0), (1, 0, 1), (1, 0, 1), (0, 1, 1)]
    y, a, c_hat = (torch.tensor(column) for column in zip(*rows))
    images = torch.zeros(len(rows), 3, 2, 2)
    images[:, 1, 0, 0] = c_hat.float()
    dataset = TensorDataset(images, y, a, torch.arange(len(rows)))
    report = evaluate(Accelerator(cpu=True), _Planted(), dataset, batch_size=3).report()
    assert report["protected_ACC_y_eq_a"] == pytest.approx(100 * 5 / 6)
    assert report["protected_ACC_y_ne_a"] == pytest.approx(100 * 1 / 4)
    assert report["protected_ACC"] == pytest.approx(100 * 6 / 10)
