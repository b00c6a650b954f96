"""The comparison between two sweeps (`--against`): each claim both state, measured in each on the seeds both ran,
and the difference between them paired by seed, with its 95% Student-t interval.

Both sweeps must number their seeds alike: seed s here is paired with seed s there. The verdict is two-sided (lower,
higher, no detectable difference), since neither sweep's claimed direction carries over to their difference.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distributed_asac.stats import Interval, paired_difference, t_interval

from .claims import Claim, Claims, Measurement, per_seed, verdict

if TYPE_CHECKING:
    from .records import TrialRecord


@dataclass(frozen=True)
class Other:
    """Another sweep's finished records and claims, for the comparison between two sweeps (`--against`)."""
    name: str  # its sweep's name, as the tables call it
    records: list[TrialRecord]
    claims: Claims


@dataclass(frozen=True)
class Between:
    claim: Claim  # as this sweep states it (the other sweep's claim of the same id measures the same thing)
    regime: str  # this sweep's regime
    other_regime: str
    here: Interval  # treatment − reference here, over the seeds both sweeps measured
    there: Interval  # the same over the same seeds in the other sweep
    difference: Interval  # here − there, paired by seed
    verdict: str  # lower / higher / no detectable difference: which side of 0 the difference's interval lies on


def _measurement(claim: Claim) -> tuple[str, str, str]:
    """What a claim measures, whatever its selectors: its metric, its reference's metric and kind of reference."""
    kind = claim.reference if isinstance(claim.reference, str) else "another setting"
    return claim.metric, claim.reference_metric or claim.metric, kind


def between(measurements: list[Measurement], claims: Claims, other: Other) -> tuple[list[Between], list[str]]:
    """Each claim that both sweeps state under one id with the same metric and kind of reference, compared between
    every regime here and every regime there that measured it on common seeds: per seed s, d(s) = (treatment −
    reference here) − (treatment − reference there), and the 95% t-interval of d over the common seeds (the same
    seed number in both: valid whatever the two seeds share, and where they share data or shuffles it removes what
    those do to both). `measurements` are this sweep's (`claims.measure`). Returns the comparisons and one line per
    shared claim id left out, saying why."""
    ours = {(m.claim.id, m.regime): m.per_seed for m in measurements}
    theirs = {c.id: c for c in other.claims.claims}
    other_finished = [r for r in other.records if r.status == "finished"]
    out, skipped = [], []
    for claim in claims.claims:
        if claim.id not in theirs:
            continue
        if _measurement(claim) != _measurement(theirs[claim.id]):
            skipped.append(f"{claim.id}: measures {claim.metric} here and {theirs[claim.id].metric} in {other.name} "
                           "(or against another kind of reference); not compared")
            continue
        for name in claims.regimes:
            here = ours[claim.id, name]
            for other_name, other_regime in other.claims.regimes.items():
                there = per_seed(other_finished, theirs[claim.id], other_regime,
                                 f"{other.name}: claim {claim.id!r}, regime {other_name!r}")
                seeds = [s for s in here if s in there]
                if not seeds:
                    continue
                a, b = [here[s] for s in seeds], [there[s] for s in seeds]
                difference = paired_difference(a, b)
                out.append(Between(claim, name, other_name, t_interval(a), t_interval(b), difference,
                                   verdict(difference, "none")))
    return out, skipped


def write_between(comparisons: list[Between], skipped: list[str], other: str, out_dir: Path) -> str:
    """between.csv in `out_dir`; returns the markdown section (the report's, after the claims)."""
    lines = [f"## Between sweeps: this one − {other}", "",
             "Each claim that both sweeps state, measured in each (treatment − reference, mean ± 95% t half-width over "
             f"the seeds both ran), and the difference here − {other}, paired by seed, with its 95% t-interval; the "
             "verdict says which side of 0 that interval lies on (two-sided: neither sweep's claimed direction "
             "carries over to their difference).", "",
             f"| Claim | Metric | Regime here | Regime in {other} | here | {other} | here − {other} | Verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        digits = 2 if "ACC" in c.claim.metric or abs(c.difference.estimate) >= 1 else 3
        here, there, difference = (_interval_text(i, digits) for i in (c.here, c.there, c.difference))
        lines.append(f"| **{c.claim.id}** {c.claim.claim} | {c.claim.metric} | {c.regime} | {c.other_regime} | "
                     f"{here} | {there} | {difference} | **{c.verdict}** |")
    if not comparisons:
        lines.append("| (no claim of both sweeps was measured on common seeds) | | | | | | | |")
    lines += [""] + [f"- {line}" for line in skipped] + ([""] if skipped else [])
    with (out_dir / "between.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["claim", "metric", "regime", "other_sweep", "other_regime", "here", "there", "estimate",
                         "ci95_low", "ci95_high", "seeds", "verdict"])
        for c in comparisons:
            d = c.difference
            writer.writerow([c.claim.id, c.claim.metric, c.regime, other, c.other_regime, c.here.estimate,
                             c.there.estimate, d.estimate, d.low, d.high, d.n, c.verdict])
    return "\n".join(lines)


def _interval_text(interval: Interval, digits: int) -> str:
    spread = "" if interval.n < 2 else f" ± {interval.half_width:.{digits}f}"
    return f"{interval.estimate:+.{digits}f}{spread} (n={interval.n})"
