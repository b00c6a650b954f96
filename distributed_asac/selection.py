"""Model selection rules: which epoch of a fine-tune is kept (`finetune.select`), and, in a sweep's search, which
setting is chosen (tune/search.py). A rule reads validation metrics only, never test data.

    last               the last epoch (the paper's protocol); a search then ranks settings by their last epoch's
                       average valid accuracy
    avg_valid          the epoch (setting) with the highest accuracy on the valid split (the field's choice where
                       valid has no group labels)
    worst_group_valid  the epoch (setting) with the highest worst-group accuracy on the valid split: the lowest of
                       the four (target, protected) groups' accuracies (GroupDRO's, JTT's and the resampling
                       baselines' choice; DomainBed/SubpopBench's where valid has group labels)
    balanced_valid     the epoch (setting) with the highest accuracy on a balanced subset of valid (equal cells):
                       the mean of the four groups' accuracies

Ties go to the earliest epoch (the first setting drawn); an epoch whose score is not a number (a group absent from
valid) is never chosen over one that has a score.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

# rule → the per-epoch metric it maximises (as stage 3 logs it: finetune/<metric>); None: the last epoch.
SCORES: dict[str, Optional[str]] = {
    "last": None,
    "avg_valid": "valid_ACC",
    "worst_group_valid": "valid_worst_group_ACC",
    "balanced_valid": "balanced_valid_ACC",
}
# The rules whose score needs every (target, protected) group present in the valid split.
NEEDS_GROUPS = ("worst_group_valid", "balanced_valid")
# What ranks settings under `last` (which picks no epoch by score).
LAST_SETTING_SCORE = "valid_ACC"


def score(rule: str, metrics: Mapping[str, float]) -> float:
    """The rule's score of one epoch's metrics (NaN when the metric is missing or not a number)."""
    key = SCORES[rule] or LAST_SETTING_SCORE
    value = metrics.get(key, math.nan)
    return float(value) if isinstance(value, (int, float)) else math.nan


def improves(rule: str, candidate: float, best: float) -> bool:
    """Whether an epoch scoring `candidate` replaces the kept one scoring `best` (NaN: none kept yet). Under `last`
    every epoch replaces the one before it."""
    if rule == "last":
        return True
    if math.isnan(candidate):
        return False
    return math.isnan(best) or candidate > best


def selected_epoch(rule: str, history: Sequence[Mapping[str, float]]) -> int:
    """The 1-based epoch the rule keeps from `history`, one mapping of valid metrics per epoch (epoch 1 first)."""
    if not history:
        raise ValueError("no epochs to select from")
    chosen, best = len(history), math.nan
    for epoch, metrics in enumerate(history, 1):
        candidate = score(rule, metrics)
        if rule == "last" or improves(rule, candidate, best):
            chosen, best = epoch, candidate
    return chosen
