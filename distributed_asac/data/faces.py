"""What every face dataset of this package shares (CelebA and LFW are subclasses): binary target and protected
labels, lazy or cached images, the bad-image policy, and attribute lookup by name."""

from __future__ import annotations

import difflib
import logging
import numbers
import os
import sys
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .cache import find_bad_images, open_image_cache
from .images import PIPELINE, BadImageError, check_image, image_to_tensor, load_image

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")  # data.on_bad_image: stop at the first undecodable image, or leave them out


def check_common_arguments(image_size: int, on_bad_image: str) -> None:
    """The argument checks every face dataset shares."""
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise UserError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, not {on_bad_image!r}")


class FaceDataset(Dataset):
    """What CelebA and LFW share: binary labels, lazy or cached images, and the bad-image policy.

    Items are ``(image, y, a, i)``: float32 [3, S, S] in [0, 1], target label, protected label, index.
    A subclass parses its labels, then calls :meth:`_init_images`.

    Bad images (files that exist but do not decode): with ``on_bad_image="error"`` the first read of one
    raises :class:`BadImageError` naming it (at construction when a cache is used, since building it
    decodes everything). With ``"skip"`` they are found at construction (by the cache build, or else by
    a decode-only pass over the split) and left out; ``skipped_images`` lists them.
    """

    image_ids: list[str]
    targets: torch.Tensor
    protected_labels: torch.Tensor
    attribute_names: list[str]
    image_size: int
    skipped_images: list[str]

    def _init_images(
        self,
        image_dir: Path,
        files: list[str],
        y: np.ndarray,
        a: np.ndarray,
        *,
        name: str,
        cache_dir: str | os.PathLike | None,
        on_bad_image: str,
    ) -> None:
        """Set up reading ``image_dir/files[k]`` for ``self.image_ids[k]``, then drop bad images if skipping.

        ``name`` (e.g. "celeba-train") names the cache and progress bars.
        """
        self._image_dir = image_dir
        self._files = files
        self._cache = None
        if cache_dir is not None:
            loader = partial(load_image, image_size=self.image_size)
            self._cache = open_image_cache(
                cache_dir, name, image_dir, files, loader, image_size=self.image_size, pipeline=PIPELINE
            )
            bad = self._cache.bad
        elif on_bad_image == "skip":
            bad = find_bad_images(image_dir, files, check_image, desc=f"checking {name} images")
        else:
            bad = {}
        if bad and on_bad_image == "error":
            first = bad[min(bad)]
            count = "" if len(bad) == 1 else f"{len(bad)} of {len(files)} images cannot be decoded; first: "
            raise BadImageError(count + first)
        if bad:
            log.warning("%s: skipping %d undecodable images (first: %s)", name, len(bad), files[min(bad)])
        # self._rows[i] is item i's row in files (and in the cache); the labels follow the kept rows.
        self._rows = np.array([row for row in range(len(files)) if row not in bad], dtype=np.int64)
        self.skipped_images = [self.image_ids[row] for row in sorted(bad)]
        if bad:
            self.image_ids = [self.image_ids[row] for row in self._rows.tolist()]
        # numpy arrays serve __getitem__ (fast scalar reads); the public tensors share their memory.
        self._y = np.ascontiguousarray(y[self._rows], dtype=np.int64)
        self._a = np.ascontiguousarray(a[self._rows], dtype=np.int64)
        self.targets = torch.from_numpy(self._y)
        self.protected_labels = torch.from_numpy(self._a)

    def check_images(self) -> None:
        """Decode every image of the split once and raise :class:`BadImageError` naming the first that fails.
        For ``on_bad_image="error"`` without a cache, whose reads are otherwise lazy: the pipeline runs it on
        the evaluation splits before training, so a corrupt test image is not found after hours of it."""
        if self._cache is not None:
            return  # the cache build decoded everything; bad rows were handled at construction
        bad = find_bad_images(self._image_dir, [self._files[row] for row in self._rows.tolist()], check_image,
                              progress=sys.stderr.isatty(), desc="checking images")
        if bad:
            first = bad[min(bad)]
            count = "" if len(bad) == 1 else f"{len(bad)} of {len(self)} images cannot be decoded; first: "
            raise BadImageError(count + first)

    @property
    def num_skipped(self) -> int:
        """How many undecodable images ``on_bad_image="skip"`` left out."""
        return len(self.skipped_images)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        pixels, y, a, i = self.uint8_item(i)
        return image_to_tensor(pixels), y, a, i

    def uint8_item(self, i: int) -> tuple[np.ndarray, int, int, int]:
        """Item ``i`` with its image as decoded, uint8 [S, S, 3]: what DataLoader workers send (batches.py)."""
        i = self._check_index(i)
        row = int(self._rows[i])
        if self._cache is not None:
            pixels = self._cache.pixels(row)
        else:
            pixels = load_image(self.image_path(i), self.image_size)
        return pixels, int(self._y[i]), int(self._a[i]), i

    def image_path(self, i: int) -> str:
        """The file item ``i`` comes from."""
        return os.path.join(self._image_dir, self._files[int(self._rows[self._check_index(i)])])

    def _check_index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} is out of range for a dataset of {len(self)} images")
        return i


def find_attribute(name: str, available: Sequence[str], *, role: str, source: str | os.PathLike) -> int:
    """Column of attribute ``name`` in ``available``; spaces and underscores are interchangeable.

    ``role`` ("target", "protected", ...) and ``source`` (the attribute file) only word the error, which
    lists the nearest names and all available ones.
    """
    wanted = _spelling_key(name)
    for column, candidate in enumerate(available):
        if _spelling_key(candidate) == wanted:
            return column
    nearest = difflib.get_close_matches(name, list(available), n=3, cutoff=0.5)
    hint = f"nearest: {', '.join(nearest)}; " if nearest else ""
    raise UserError(
        f"unknown {role} attribute {name!r} in {source} ({hint}available: {', '.join(available)}); "
        "use one of the available names"
    )


def _spelling_key(name: str) -> str:
    return name.strip().replace(" ", "_")

