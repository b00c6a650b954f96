"""Uncertainty for every reported number: intervals over seeds, bootstrap intervals over test images, and
paired verdicts. Pure functions; the comparison (`comparison.py`) decides which one a table shows.

Two intervals, for two questions:
- **Over seeds** (`t_interval`): the mean of a metric over n independent seeds, with the 95% Student-t
  interval mean ± t_{0.975, n−1} · s / √n (s the sample standard deviation). It covers the whole training
  randomness (initialisation, data order, attack starts) and is the one verdicts use when n ≥ 2.
- **Over test images** (`bootstrap_interval`): for ONE trained model, the 2.5% and 97.5% percentiles of
  the metric over B resamples (with replacement) of the test images — the percentile bootstrap. It covers
  only the finite test set, not training noise; `predictions.csv` (columns y, a, y_hat) reproduces it.

A paired difference (`paired_difference`) compares two rows on the same units: over seeds (each seed's
rows share one base model and one test set), d_s = row_s − reference_s and the t-interval of the d_s; with
a single seed, the paired bootstrap resamples the same test images for both models. The verdict is
`lower` when the whole interval is below 0, `higher` when above, else `no detectable difference`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from scipy import stats as scipy_stats

from .metrics import HEADLINE

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed: the same predictions always give the same interval
LOWER, HIGHER, NONE = "lower", "higher", "no detectable difference"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval [low, high]; `n` units (seeds or test images) behind it."""

    estimate: float
    low: float
    high: float
    n: int
    method: str  # "t over seeds" | "bootstrap over test images"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def verdict(self) -> str:
        """For a difference: which side of 0 the whole interval lies on, if either."""
        if math.isnan(self.low) or math.isnan(self.high):
            return NONE
        return LOWER if self.high < 0 else HIGHER if self.low > 0 else NONE

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "half_width": self.half_width}


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of `values` with the Student-t interval mean ± t_{(1+c)/2, n−1} · s/√n (NaN bounds for n < 2,
    where no spread can be estimated; NaN values, e.g. a rate over an empty group, are left out)."""
    kept = [float(v) for v in values if not math.isnan(float(v))]
    n = len(kept)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "t over seeds")
    mean = sum(kept) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "t over seeds")
    sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t over seeds")


def _resampled_counts(y: torch.Tensor, a: torch.Tensor, y_hat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """counts[b, y, a, ŷ] ([B, 2, 2, 2]) of each resample b, where `index` [B, n] holds its image indices."""
    cell = (y.long() * 4 + a.long() * 2 + y_hat.long())[index]  # [B, n] cell of each drawn image
    counts = torch.zeros(index.shape[0], 8, dtype=torch.long)
    counts.scatter_add_(1, cell, torch.ones_like(cell))
    return counts.view(-1, 2, 2, 2)


def _bootstrap_index(n: int, samples: int, seed: int) -> torch.Tensor:
    return torch.randint(n, (samples, n), generator=torch.Generator().manual_seed(seed))  # [B, n]


def _percentile_interval(estimate: float, draws: torch.Tensor, n: int, confidence: float) -> Interval:
    tail = (1 - confidence) / 2
    low, high = torch.nanquantile(draws, torch.tensor([tail, 1 - tail], dtype=draws.dtype)).tolist()
    return Interval(estimate, low, high, n, "bootstrap over test images")


def bootstrap_interval(y: torch.Tensor, a: torch.Tensor, y_hat: torch.Tensor, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> dict[str, Interval]:
    """Percentile-bootstrap interval of each headline metric (DEO, DEOp, DDP, ACC) of one model's
    predictions over its test images: y, a, y_hat are [n] binary vectors (the columns of predictions.csv).
    All B resamples are evaluated at once from their [B, 2, 2, 2] group counts."""
    counts = _resampled_counts(y, a, y_hat, _bootstrap_index(len(y), samples, seed))
    full = _resampled_counts(y, a, y_hat, torch.arange(len(y)).unsqueeze(0))[0]
    return {name: _percentile_interval(metric(full), metric(counts), len(y), confidence)
            for name, metric in HEADLINE.items()}


def paired_bootstrap(y: torch.Tensor, a: torch.Tensor, y_hat: torch.Tensor, y_hat_ref: torch.Tensor,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> dict[str, Interval]:
    """metric(y_hat) − metric(y_hat_ref) for two models' predictions on the SAME test images, with the
    percentile interval of the difference over resamples that draw the same images for both models."""
    index = _bootstrap_index(len(y), samples, seed)
    counts, ref = (_resampled_counts(y, a, p, index) for p in (y_hat, y_hat_ref))
    whole = torch.arange(len(y)).unsqueeze(0)
    full, full_ref = (_resampled_counts(y, a, p, whole)[0] for p in (y_hat, y_hat_ref))
    return {name: _percentile_interval(metric(full) - metric(full_ref), metric(counts) - metric(ref), len(y),
                                       confidence)
            for name, metric in HEADLINE.items()}


def paired_difference(values: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> Interval:
    """The t-interval of the per-seed differences values[s] − reference[s] (same seeds, in the same order)."""
    if len(values) != len(reference):
        raise ValueError(f"paired values need one reference per seed, got {len(values)} and {len(reference)}")
    return t_interval([v - r for v, r in zip(values, reference)], confidence)


# Power of the paired verdict: with n seeds, the per-seed differences d_s ~ N(δ, σ²) give the statistic
# T = mean(d)/(s/√n), noncentral t with n − 1 degrees of freedom and noncentrality δ√n/σ. The verdict is not
# "no detectable difference" exactly when |T| > t_{(1+c)/2, n−1} (the interval excludes 0).
POWER = 0.8


def paired_power(effect: float, sd: float, n: int, confidence: float = CONFIDENCE) -> float:
    """P(the paired t-interval over n seeds excludes 0) when the true mean difference is `effect` and the
    per-seed differences have standard deviation `sd` (both sides of 0 count, as the verdict does)."""
    if n < 2:
        return 0.0
    critical = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1))
    shift = effect * math.sqrt(n) / sd
    return float(scipy_stats.nct.sf(critical, n - 1, shift) + scipy_stats.nct.cdf(-critical, n - 1, shift))


def seeds_for_power(effect: float, sd: float, power: float = POWER, confidence: float = CONFIDENCE,
                    most: int = 10_000) -> int:
    """The fewest seeds (≥ 2) whose paired verdict detects a true mean difference `effect` with probability
    ≥ `power`, when per-seed differences have standard deviation `sd`; `most` + 1 when even `most` would not."""
    n = 2
    while n <= most and paired_power(effect, sd, n, confidence) < power:
        n += 1
    return n


def detectable_effect(sd: float, n: int, power: float = POWER, confidence: float = CONFIDENCE) -> float:
    """The smallest |mean difference| that n seeds detect with probability `power` (bisection on the power,
    which grows with |effect|)."""
    low, high = 0.0, sd
    while paired_power(high, sd, n, confidence) < power:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if paired_power(middle, sd, n, confidence) < power else (low, middle)
    return high
