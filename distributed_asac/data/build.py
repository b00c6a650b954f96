"""The train / valid / test datasets a config names (and counterfactual twins where they exist), on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from accelerate import Accelerator

from ..config import Config
from .datasets import DATASETS, Splits


def build_splits(cfg: Config, accelerator: Accelerator) -> Splits:
    """Load the dataset `cfg.data.name`. The main process goes first: it generates the synthetic set,
    builds the cache and draws the LFW split file, which the other ranks then read."""
    data = cfg.data
    split_file = str(Path(cfg.output_dir) / cfg.experiment / "lfw_split.json")
    with accelerator.main_process_first():
        splits = DATASETS.get(data.name)(data, split_file, accelerator.is_main_process)
    check_evaluation_images(splits, data.on_bad_image, data.cache_dir)
    return splits


def check_evaluation_images(splits: Splits, on_bad_image: str, cache_dir: Optional[str]) -> None:
    """Under `on_bad_image: error` without a cache images are decoded lazily: a corrupt valid or test image
    would stop the run only after training. Decode those splits once now (the train split is read from the
    first step on)."""
    if on_bad_image == "error" and cache_dir is None:
        for dataset in (splits.valid, splits.test, splits.twins):
            if dataset is not None:
                dataset.check_images()
