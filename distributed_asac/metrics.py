"""Fairness and accuracy from per-group counts (docs/method.md, Metrics; paper supplement A.1).

Everything is computed from one integer tensor `counts[y, a, ŷ]` of shape [2, 2, 2]: the number of test
images with target label y, protected label a and prediction ŷ. Counts add across ranks and batches, so a
distributed evaluation sums them (never averages per-rank rates) and gets the exact single-process numbers.

A rate over an empty group is undefined: it is NaN, and `empty_groups` says which group was empty.

Every metric also accepts a batch of count tables, shape [..., 2, 2, 2], and then returns a float64 tensor
of shape [...] (the bootstrap in `stats.py` evaluates a thousand resamples in one call); a single table gives
a Python float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


def group_counts(y: torch.Tensor, a: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """counts[y, a, ŷ] (int64 [2, 2, 2]) from three binary label vectors of equal length."""
    cell = (y.long() * 4 + a.long() * 2 + y_hat.long()).flatten()
    return torch.bincount(cell, minlength=8).view(2, 2, 2)


def _scalar(value: torch.Tensor) -> float | torch.Tensor:
    return float(value) if value.dim() == 0 else value


def _rate(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator in float64, NaN where the denominator is 0 (an empty group)."""
    denominator = denominator.double()
    return torch.where(denominator > 0, numerator.double() / denominator.clamp(min=1), torch.nan)


def _positive_rate(counts: torch.Tensor, y: int | None, a: int) -> torch.Tensor:
    cells = counts[..., :, a, :].sum(-2) if y is None else counts[..., y, a, :]  # [..., ŷ]
    return _rate(cells[..., 1], cells.sum(-1))


def positive_rate(counts: torch.Tensor, *, y: int | None, a: int) -> float | torch.Tensor:
    """P(Ŷ = 1 | Y = y, A = a), or P(Ŷ = 1 | A = a) when y is None."""
    return _scalar(_positive_rate(counts, y, a))


def deo(counts: torch.Tensor) -> float | torch.Tensor:
    """Difference in Equalized Odds: ½ Σ_{y∈{0,1}} |P(Ŷ=1 | Y=y, A=0) − P(Ŷ=1 | Y=y, A=1)|.

    The mean of the false-positive-rate gap (y = 0) and the true-positive-rate gap (y = 1); fairlearn's
    `equalized_odds_difference(..., agg="mean")` gives the same number.
    """
    gaps = [(_positive_rate(counts, y, 0) - _positive_rate(counts, y, 1)).abs() for y in (0, 1)]
    return _scalar(0.5 * (gaps[0] + gaps[1]))


def deop(counts: torch.Tensor) -> float | torch.Tensor:
    """Difference in Equalized Opportunity: |P(Ŷ=1 | Y=1, A=0) − P(Ŷ=1 | Y=1, A=1)| (the TPR gap)."""
    return _scalar((_positive_rate(counts, 1, 0) - _positive_rate(counts, 1, 1)).abs())


def ddp(counts: torch.Tensor) -> float | torch.Tensor:
    """Difference in Demographic Parity: |P(Ŷ=1 | A=0) − P(Ŷ=1 | A=1)|."""
    return _scalar((_positive_rate(counts, None, 0) - _positive_rate(counts, None, 1)).abs())


def accuracy(counts: torch.Tensor) -> float | torch.Tensor:
    """ACC in percent: 100 · (Σ_a counts[0, a, 0] + counts[1, a, 1]) / Σ counts."""
    correct = counts[..., 0, :, 0].sum(-1) + counts[..., 1, :, 1].sum(-1)
    return _scalar(100.0 * _rate(correct, counts.sum((-3, -2, -1))))


def _group_accuracies(counts: torch.Tensor) -> torch.Tensor:
    """[..., 2, 2]: accuracy in percent of each (Y = y, A = a) group, NaN for an empty group."""
    correct = torch.stack([counts[..., 0, :, 0], counts[..., 1, :, 1]], -2)  # [..., y, a]
    return 100.0 * _rate(correct, counts.sum(-1))


def group_accuracy(counts: torch.Tensor, *, y: int, a: int) -> float | torch.Tensor:
    """Accuracy in percent within the group Y = y, A = a: 100 · counts[y, a, y] / Σ_ŷ counts[y, a, ŷ]."""
    return _scalar(_group_accuracies(counts)[..., y, a])


def worst_group_accuracy(counts: torch.Tensor) -> float | torch.Tensor:
    """min over the four (Y, A) groups of the group accuracy, in percent (as subpopulation-shift benchmarks
    report it); NaN if any group is empty."""
    return _scalar(_group_accuracies(counts).flatten(-2).amin(-1))


@dataclass(frozen=True)
class Column:
    """A metric of the result tables (the demo's, a run's table.md, the sweep report)."""

    name: str  # its key in a test report (results.json)
    fmt: str  # how a table writes it
    of_counts: Optional[Callable[[torch.Tensor], float | torch.Tensor]] = None  # from counts[y, a, ŷ]; None: not


# Every table's metric columns, in order. Those computed from the counts are the headline metrics: they also
# get a bootstrap interval over test images and paired verdicts (stats.py). A new metric is one entry here.
COLUMNS = (
    Column("DEO", "{:.3f}", deo), Column("DEOp", "{:.3f}", deop), Column("DDP", "{:.3f}", ddp),
    Column("ACC", "{:.2f}", accuracy), Column("worst_group_ACC", "{:.2f}", worst_group_accuracy),
    Column("CF_flip_rate", "{:.3f}"),  # predictions that change on the counterfactual twin (evaluate.py)
    Column("IG_mouth_share", "{:.3f}"),  # the share of |Integrated Gradients| in the mouth box (analysis.py)
    Column("grad_abs_cosine_mean", "{:.3f}"),  # |cos(∇ₓ CE of the attacked C, ∇ₓ CE of M)|, mean over images (analysis.py)
    Column("grad_abs_cosine_q75", "{:.3f}"),  # its upper quartile over images: a mean hides a tail of aligned images
    Column("asac_flips_M", "{:.3f}"),  # share of ASACs at the training ε that flip M's prediction (analysis.py)
    Column("attack_success_rate", "{:.3f}"),  # ASAC rows: C right clean and wrong attacked (stage3.measure_attack)
    Column("attacked_C_clean_accuracy", "{:.3f}"),  # ASAC rows: the attacked C's clean accuracy, beside it
)
HEADLINE = {column.name: column.of_counts for column in COLUMNS if column.of_counts is not None}


def empty_groups(counts: torch.Tensor) -> list[str]:
    """Names of the (Y, A) groups with no image, e.g. ['Y=1,A=0']; their rates are NaN."""
    return [f"Y={y},A={a}" for y in (0, 1) for a in (0, 1) if int(counts[y, a].sum()) == 0]


def fairness_report(counts: torch.Tensor) -> dict[str, object]:
    """The headline metrics plus per-group TPR, FPR, positive rate, size and accuracy, as a JSON-ready dict."""
    report: dict[str, object] = {name: metric(counts) for name, metric in HEADLINE.items()}
    report["n"] = int(counts.sum())
    for a in (0, 1):
        report[f"TPR_a{a}"] = positive_rate(counts, y=1, a=a)
        report[f"FPR_a{a}"] = positive_rate(counts, y=0, a=a)
        report[f"positive_rate_a{a}"] = positive_rate(counts, y=None, a=a)
        report[f"n_a{a}"] = int(counts[:, a].sum())
        for y in (0, 1):
            report[f"ACC_y{y}_a{a}"] = group_accuracy(counts, y=y, a=a)
    report["empty_groups"] = empty_groups(counts)
    return report
