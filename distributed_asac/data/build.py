"""The train / valid / test datasets a config names (and counterfactual twins where they exist)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from torch.utils.data import Dataset

from ..config import Config, DataConfig

SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class Splits:
    train: Dataset
    valid: Dataset
    test: Dataset
    twins: Optional[Dataset] = None  # test images with only the protected attribute flipped

    def num_skipped(self) -> int:
        """Undecodable images left out under `data.on_bad_image: skip`, over all splits."""
        return sum(getattr(ds, "num_skipped", 0) for ds in (self.train, self.valid, self.test))


def synthetic_arguments(data: DataConfig) -> dict[str, Any]:
    """The generator's arguments a data config asks for (equal arguments: the same dataset, byte for byte)."""
    return dict(num_images=data.synthetic_num_images, bias=data.synthetic_bias, seed=data.synthetic_seed,
                size=(data.image_size, data.image_size), beard_strength=data.synthetic_beard_strength,
                train_twins=data.synthetic_train_twins)


def generate_synthetic(data: DataConfig) -> None:
    """Generate (or reuse) the controlled-bias dataset of `data` in `data.root`."""
    from .synthetic import generate

    generate(Path(data.root), **synthetic_arguments(data))


def build_splits(cfg: Config, accelerator: Accelerator) -> Splits:
    """Load the dataset `cfg.data.name`. The main process goes first: it generates the synthetic set,
    builds the cache and draws the LFW split file, which the other ranks then read."""
    data = cfg.data
    with accelerator.main_process_first():
        if data.name == "synthetic" and accelerator.is_main_process:
            generate_synthetic(data)
        common = dict(cache_dir=data.cache_dir, on_bad_image=data.on_bad_image)
        if data.name == "lfw":
            from .lfw import LFW

            split_file = data.split_file or str(Path(cfg.output_dir) / cfg.experiment / "lfw_split.json")
            splits = Splits(*(LFW(data.root, split, data.target, data.protected, data.image_size,
                                  split_file=split_file, split_seed=data.split_seed, **common)
                              for split in SPLIT_NAMES))
        else:
            from .celeba import CelebA

            splits = Splits(*(CelebA(data.root, split, data.target, data.protected, data.image_size, **common)
                              for split in SPLIT_NAMES))
            if data.name == "synthetic":
                splits.twins = CelebA(data.root, "test", data.target, data.protected, data.image_size,
                                      counterfactual=True, **common)
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
