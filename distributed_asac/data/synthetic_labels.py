"""The label plan of the generated dataset: which split each image is in, and its attributes.

Bias: in train and valid, P(Smiling == Male) = ``bias`` with P(Male) = P(Smiling) = 0.5, realised with exact
cell counts, so the measured rate is ``bias`` to within 1/(2n). The test split has four equal (Smiling, Male)
cells, so a biased model shows its bias there. The other attributes are independent fair coins.

The plan has its own random stream, apart from the per-image streams of the renderer (``synthetic_render``):
an image depends only on (seed, index, labels, size), whatever the worker count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .splits import SPLIT_FRACTIONS, SPLITS

# The drawn attributes, in CelebA's column order (a subset of its 40-name header).
ATTRIBUTES: tuple[str, ...] = ("Big_Nose", "Eyeglasses", "Male", "Smiling", "Wavy_Hair")
TARGET_ATTRIBUTE = "Smiling"
PROTECTED_ATTRIBUTE = "Male"
TRAIN_SPLIT, TEST_SPLIT = SPLITS.index("train"), SPLITS.index("test")

# Spawn keys that keep the label plan's random stream apart from the per-image streams.
PLAN_STREAM, IMAGE_STREAM = 0, 1


def split_counts(num_images: int) -> tuple[int, int, int]:
    """Train/valid/test sizes for ``num_images``: 70/10/20, test takes the rounding remainder."""
    train = round(SPLIT_FRACTIONS[0] * num_images)
    valid = round(SPLIT_FRACTIONS[1] * num_images)
    return train, valid, num_images - train - valid


def _cell_counts(n: int, p_agree: float) -> np.ndarray:
    """Sizes of the (Smiling, Male) cells (0,0), (0,1), (1,0), (1,1) for ``n`` images.

    round(p_agree·n) images agree (Smiling == Male), split evenly between the two agreeing cells, and
    the rest between the two disagreeing ones, so P(Male) and P(Smiling) are 0.5 to within one image.
    """
    agree = round(p_agree * n)
    disagree = n - agree
    return np.array([agree // 2, disagree // 2, disagree - disagree // 2, agree - agree // 2])


def plan_labels(num_images: int, bias: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split of every image and its labels.

    Returns ``(splits, labels)``: ``splits`` is (N,) int in {0, 1, 2}, contiguous blocks like CelebA's
    partition; ``labels`` is (N, len(ATTRIBUTES)) bool in ATTRIBUTES order. Train and valid have
    P(Smiling == Male) = ``bias``; test has 0.5 (four equal cells). The other attributes are
    independent fair coins.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(PLAN_STREAM,)))
    splits = np.repeat(np.arange(len(SPLITS)), split_counts(num_images))
    labels = rng.random((num_images, len(ATTRIBUTES))) < 0.5
    smiling, male = ATTRIBUTES.index("Smiling"), ATTRIBUTES.index("Male")
    for split in range(len(SPLITS)):
        rows = np.flatnonzero(splits == split)
        p_agree = 0.5 if split == TEST_SPLIT else bias
        cells = np.repeat(np.arange(4), _cell_counts(len(rows), p_agree))
        cells = rng.permutation(cells)
        labels[rows, smiling] = cells >= 2
        labels[rows, male] = cells % 2 == 1
    return splits, labels


def split_statistics(splits: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per-split counts and the measured (Smiling, Male) statistics of ``labels``."""
    smiling = labels[:, ATTRIBUTES.index("Smiling")]
    male = labels[:, ATTRIBUTES.index("Male")]
    stats: dict[str, dict[str, Any]] = {}
    for split, name in enumerate(SPLITS):
        rows = splits == split
        s, m = smiling[rows], male[rows]
        stats[name] = {
            "split_id": split,
            "count": int(rows.sum()),
            "p_smiling_eq_male": float(np.mean(s == m)),
            "p_smiling": float(np.mean(s)),
            "p_male": float(np.mean(m)),
            "cells": {
                f"Smiling={2 * a - 1:d},Male={2 * b - 1:d}": int(np.sum((s == a) & (m == b)))
                for a in (0, 1)
                for b in (0, 1)
            },
        }
    return stats

