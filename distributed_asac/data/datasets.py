"""The datasets a config can name (`data.name`): one registered builder each, returning its splits.

A builder is `(data, split_file, first) -> Splits`: `data` is the config's data section, `split_file` where a
dataset without an official split keeps the one it draws (LFW), and `first` is true in the process that runs
before every other (the main process): only it writes what the others then read (the generated dataset).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from torch.utils.data import Dataset

from ..registry import Registry
from .celeba import CelebA
from .lfw import LFW
from .splits import SPLITS
from .synthetic import generate

if TYPE_CHECKING:
    from ..config import DataConfig


@dataclass
class Splits:
    train: Dataset
    valid: Dataset
    test: Dataset
    twins: Optional[Dataset] = None  # test images with only the protected attribute flipped

    def num_skipped(self) -> int:
        """Undecodable images left out under `data.on_bad_image: skip`, over all splits."""
        return sum(getattr(ds, "num_skipped", 0) for ds in (self.train, self.valid, self.test))


Builder = Callable[["DataConfig", str, bool], Splits]
DATASETS: Registry[Builder] = Registry("dataset")


def synthetic_arguments(data: DataConfig) -> dict[str, Any]:
    """The generator's arguments a data config asks for (equal arguments: the same dataset, byte for byte)."""
    return dict(num_images=data.synthetic_num_images, bias=data.synthetic_bias, seed=data.synthetic_seed,
                size=(data.image_size, data.image_size), beard_strength=data.synthetic_beard_strength,
                train_twins=data.synthetic_train_twins, smile_floor=data.synthetic_smile_floor)


def generate_synthetic(data: DataConfig) -> None:
    """Generate (or reuse) the controlled-bias dataset of `data` in `data.root`."""
    generate(Path(data.root), **synthetic_arguments(data))


@DATASETS.register("celeba")
def celeba(data: DataConfig, split_file: str, first: bool) -> Splits:
    """CelebA (or any copy in its format) at `data.root`, with its own partition."""
    return Splits(*(CelebA(data.root, split, data.target, data.protected, data.image_size,
                           cache_dir=data.cache_dir, on_bad_image=data.on_bad_image) for split in SPLITS))


@DATASETS.register("synthetic")
def synthetic(data: DataConfig, split_file: str, first: bool) -> Splits:
    """The controlled-bias faces, generated at `data.root` on first use, with the counterfactual twins."""
    if first:
        generate_synthetic(data)
    splits = celeba(data, split_file, first)
    splits.twins = CelebA(data.root, "test", data.target, data.protected, data.image_size, counterfactual=True,
                          cache_dir=data.cache_dir, on_bad_image=data.on_bad_image)
    return splits


@DATASETS.register("lfw")
def lfw(data: DataConfig, split_file: str, first: bool) -> Splits:
    """LFW with Kumar et al.'s attributes, split person-disjointly (`data.split_file`, else `split_file`)."""
    return Splits(*(LFW(data.root, split, data.target, data.protected, data.image_size,
                        split_file=data.split_file or split_file, split_seed=data.split_seed,
                        cache_dir=data.cache_dir, on_bad_image=data.on_bad_image) for split in SPLITS))
