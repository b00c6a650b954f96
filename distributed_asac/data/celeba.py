"""CelebA (aligned and cropped faces), or a dataset in its format, as a :class:`~.faces.FaceDataset`.

torchvision's ``CelebA`` refuses to load unless every text file matches its MD5, which rules out the
generated CelebA-format dataset (it writes a subset of the attribute columns) and any edited copy, and it
re-reads the images' labels through Python lists of ints. This loader parses each text file once at
construction (``celeba_format.py``) into numpy arrays, keeps only file names and labels in memory (no
decoded images), and opens each image lazily in ``__getitem__`` (or reads it from the preprocessed cache,
``cache.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .celeba_format import (COUNTERFACTUAL_DIR, COUNTERFACTUAL_FILE, LANDMARKS_FILE, PARTITION_FILE, AttributeTable,
                            locate_celeba, read_attribute_file, read_counterfactual_file, read_landmarks_file,
                            read_partition_file)
from .faces import FaceDataset, check_common_arguments, find_attribute
from .images import mouth_box_from_landmarks
from .splits import SPLITS


class CelebA(FaceDataset):
    """One split of CelebA (or of a CelebA-format dataset) with a binary target and protected attribute.

    Items are ``(image, y, a, i)``: float32 [3, S, S] in [0, 1], target label, protected label, index.
    A label is 1 when the attribute is present (+1 in the file) and 0 when absent (-1).

    ``counterfactual=True`` serves the twins listed in ``root/counterfactual/list_counterfactual.txt``
    instead of the originals: same ``image_ids`` and order, images from the twin files, and each row's
    ``flipped_attribute`` label negated. The generated dataset lists every test image there, and every
    train image when made with train twins.
    ``cache_dir`` reads images from a preprocessed cache there (built on first use, see ``cache.py``);
    ``on_bad_image`` is ``"error"`` or ``"skip"`` (see :class:`FaceDataset`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        target: str,
        protected: str,
        image_size: int = 64,
        counterfactual: bool = False,
        *,
        cache_dir: str | os.PathLike | None = None,
        on_bad_image: str = "error",
    ) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown CelebA split {split!r}; use one of {', '.join(SPLITS)}")
        check_common_arguments(image_size, on_bad_image)
        self.files = locate_celeba(root)
        self.split = split
        self.image_size = int(image_size)
        self.counterfactual = counterfactual

        table = read_attribute_file(self.files.attributes)
        self.attribute_names = table.names
        self.target_name = table.names[find_attribute(target, table.names, role="target", source=self.files.attributes)]
        self.protected_name = table.names[
            find_attribute(protected, table.names, role="protected", source=self.files.attributes)
        ]
        self.image_ids, signs = self._select_split(table)
        if counterfactual:
            image_dir, files, signs = self._twins(signs)
        else:
            image_dir, files = self.files.images, self.image_ids
            _check_present(image_dir, files, f"{split} images listed in {PARTITION_FILE}")
        self._init_images(
            image_dir,
            files,
            signs[:, table.names.index(self.target_name)] > 0,
            signs[:, table.names.index(self.protected_name)] > 0,
            name=f"celeba-{split}" + ("-twins" if counterfactual else ""),
            cache_dir=cache_dir,
            on_bad_image=on_bad_image,
        )
        self._signs = signs  # int8 ±1 [N, K], the rows of `files` (attribute_labels keeps the rows kept)
        self._landmarks: np.ndarray | None = None

    def attribute_labels(self, names: Sequence[str]) -> torch.Tensor:
        """float32 [len(self), len(names)]: 1 where the item has the attribute, 0 where not (stage 0's targets)."""
        columns = [find_attribute(name, self.attribute_names, role="pretraining", source=self.files.attributes)
                   for name in names]
        return torch.from_numpy(self._signs[self._rows][:, columns] > 0).float()

    def _select_split(self, table: AttributeTable) -> tuple[list[str], np.ndarray]:
        """The split's ids in partition-file order, and their attribute rows (int8 ±1 [N, K])."""
        partition_ids, partitions = read_partition_file(self.files.partition)
        wanted = SPLITS.index(self.split)
        ids = [image_id for image_id, part in zip(partition_ids, partitions.tolist()) if part == wanted]
        row_of = {image_id: row for row, image_id in enumerate(table.image_ids)}
        unlabelled = [image_id for image_id in ids if image_id not in row_of]
        if unlabelled:
            raise UserError(
                f"{len(unlabelled)} {self.split} images in {self.files.partition} have no row in "
                f"{self.files.attributes} (first: {', '.join(unlabelled[:3])}); the two files must list the same images"
            )
        rows = np.fromiter((row_of[image_id] for image_id in ids), dtype=np.int64, count=len(ids))
        return ids, table.values[rows]

    def _twins(self, signs: np.ndarray) -> tuple[Path, list[str], np.ndarray]:
        """(twin folder, twin files, signs with each twin's flipped attribute negated), in split order."""
        candidates = [self.files.root / COUNTERFACTUAL_DIR, self.files.dataset_dir / COUNTERFACTUAL_DIR]
        listing = next((f / COUNTERFACTUAL_FILE for f in candidates if (f / COUNTERFACTUAL_FILE).is_file()), None)
        if listing is None:
            raise UserError(
                f"no counterfactual twins under {self.files.root}: {candidates[0] / COUNTERFACTUAL_FILE} does not exist "
                "(only the generated dataset has twins); use counterfactual=False or generate a dataset with twins"
            )
        twin_ids, twin_files, flipped = read_counterfactual_file(listing)
        twin_of = {image_id: row for row, image_id in enumerate(twin_ids)}
        lacking = [image_id for image_id in self.image_ids if image_id not in twin_of]
        if lacking:
            raise UserError(
                f"{len(lacking)} of {len(self.image_ids)} {self.split} images have no twin in {listing} "
                f"(first: {', '.join(lacking[:3])}); regenerate the dataset with twins for the whole {self.split} split"
            )
        rows = [twin_of[image_id] for image_id in self.image_ids]
        signs = signs.copy()
        column_of = {name: column for column, name in enumerate(self.attribute_names)}
        for index, row in enumerate(rows):
            column = column_of.get(flipped[row])
            if column is None:
                raise UserError(
                    f"{listing} line {row + 3} flips {flipped[row]!r}, which is not a column of "
                    f"{self.files.attributes}; use one of {', '.join(self.attribute_names)}"
                )
            signs[index, column] = -signs[index, column]
        files = [twin_files[row] for row in rows]
        _check_present(listing.parent, files, f"twin images listed in {listing.name}")
        return listing.parent, files, signs

    def landmarks(self, i: int) -> torch.Tensor:
        """int64 [5, 2] (x, y) of eyes, nose and mouth corners, in the original image's pixels.

        The landmark file is parsed on the first call (it is optional) and only this split's rows kept.
        Counterfactual twins share their original's landmarks.
        """
        if self._landmarks is None:
            self._landmarks = self._load_landmarks()
        return torch.from_numpy(self._landmarks[self._check_index(i)].copy())

    def mouth_box(self, i: int, margin: float = 0.25) -> torch.Tensor:
        """int64 [4] (x0, y0, x1, y1), x1/y1 exclusive, around the mouth in item ``i``'s output pixels.

        From the landmarks' mouth corners (see :func:`mouth_box_from_landmarks`): the region where a
        Smiling classifier's attributions should concentrate.
        """
        points = self.landmarks(i).numpy()
        with Image.open(self.image_path(i)) as image:  # reads the header only
            original_size = image.size
        return torch.tensor(mouth_box_from_landmarks(points, original_size, self.image_size, margin), dtype=torch.int64)

    def _load_landmarks(self) -> np.ndarray:
        path = self.files.landmarks
        if not path.is_file():
            raise UserError(f"landmarks need {path}, which does not exist; put CelebA's {LANDMARKS_FILE} there")
        ids, points = read_landmarks_file(path)
        row_of = {image_id: row for row, image_id in enumerate(ids)}
        lacking = [image_id for image_id in self.image_ids if image_id not in row_of]
        if lacking:
            raise UserError(
                f"{len(lacking)} {self.split} images have no row in {path} (first: {', '.join(lacking[:3])}); "
                "restore the original landmark file"
            )
        return points[[row_of[image_id] for image_id in self.image_ids]]

    def __repr__(self) -> str:
        kind = "counterfactual twins of " if self.counterfactual else ""
        cached = ", cached" if self._cache is not None else ""
        return (
            f"CelebA({kind}{self.split}: {len(self)} images at {self.image_size}px{cached}, target={self.target_name}, "
            f"protected={self.protected_name}, root={self.files.root} [{self.files.layout}])"
        )



def _check_present(folder: Path, names: Sequence[str], what: str) -> None:
    """Raise if any of ``names`` (paths relative to ``folder``) is absent, from one listing per folder."""
    listings: dict[str, set[str]] = {}
    missing: list[str] = []
    for name in names:
        parent, _, leaf = name.rpartition("/")
        if parent not in listings:
            directory = folder / parent
            listings[parent] = set(os.listdir(directory)) if directory.is_dir() else set()
        if leaf not in listings[parent]:
            missing.append(name)
    if missing:
        raise UserError(
            f"{len(missing)} of {len(names)} {what} are missing from {folder} (first: {', '.join(missing[:3])}); "
            "restore the files, or regenerate the list files so that they match the image folder"
        )

