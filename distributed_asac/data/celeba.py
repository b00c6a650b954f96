"""CelebA (aligned and cropped faces) read from its published text files, without torchvision.

torchvision's ``CelebA`` refuses to load unless every text file matches its MD5, which rules out the
generated CelebA-format dataset (it writes a subset of the attribute columns) and any edited copy, and it
re-reads the images' labels through Python lists of ints. This loader parses each text file once at
construction into numpy arrays, keeps only file names and labels in memory (no decoded images), and
opens each image lazily in ``__getitem__`` (or reads it from the preprocessed cache, ``cache.py``).

Also here, because every face dataset of this package goes through them: the image pipeline
(:func:`load_image`, :func:`image_to_tensor`), attribute lookup by name (:func:`find_attribute`) and
:class:`FaceDataset`, the base that CelebA and LFW share (lazy or cached images, the bad-image policy).
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from .cache import find_bad_images, open_image_cache

log = logging.getLogger(__name__)

SPLITS: dict[str, int] = {"train": 0, "valid": 1, "test": 2}
"""Split name → value in ``list_eval_partition.txt``."""

ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARKS_FILE = "list_landmarks_align_celeba.txt"
IMAGE_DIR = "img_align_celeba"
COUNTERFACTUAL_DIR = "counterfactual"
COUNTERFACTUAL_FILE = "list_counterfactual.txt"
COUNTERFACTUAL_HEADER = ("image_id", "twin_file", "flipped_attribute")
LANDMARK_NAMES = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
TORCHVISION_FOLDER = "celeba"


class BadImageError(UserError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image)."""


# --------------------------------------------------------------------------------------------------
# Image pipeline
# --------------------------------------------------------------------------------------------------


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square whose side is the shorter image side.

    The offsets round like ``torchvision.transforms.functional.center_crop`` so that the two agree.
    """
    side = min(width, height)
    left = int(round((width - side) / 2.0))
    top = int(round((height - side) / 2.0))
    return left, top, left + side, top + side


PIPELINE = "RGB, centred square crop of the shorter side, PIL bilinear (antialiased) resize, uint8 HWC; v1"
"""What :func:`load_image` does; a cache built by another pipeline is stale."""


def _decode(path: str | os.PathLike) -> Image.Image:
    """The fully decoded RGB image, or :class:`BadImageError` naming the file."""
    try:
        with Image.open(path) as image:
            # convert() forces the full decode, so a truncated file fails here and not later.
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise UserError(f"image file {path} does not exist; restore it or remove it from the list files") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(
            f"cannot decode image {path} ({err}); replace the file, or skip bad images with on_bad_image='skip'"
        ) from err


def check_image(path: str | os.PathLike) -> None:
    """Raise :class:`BadImageError` if ``path`` cannot be decoded (what ``on_bad_image='skip'`` scans with)."""
    _decode(path)


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode ``path`` → RGB → centred square crop → ``image_size``² bilinear resize; uint8 [S, S, 3].

    Why a centre crop rather than a squashing resize: CelebA's aligned images are 178×218 (W×H) with the
    face centred, so the centred 178×178 square keeps the whole face and drops 20 rows of background
    (hair top, neck) at each end, and faces keep their aspect ratio. PIL's bilinear resize is
    antialiased (its filter widens with the scale factor), so downscaling does not alias. The resize is
    skipped when the crop already has the requested size (e.g. the generated dataset written at it).

    Raises :class:`BadImageError` (a :class:`UserError`) naming the file when it cannot be decoded.
    """
    image = _decode(path)
    width, height = image.size
    if width != height:
        image = image.crop(center_crop_box(width, height))
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


def mouth_box_from_landmarks(
    points: np.ndarray, original_size: tuple[int, int], image_size: int, margin: float = 0.25
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the mouth, in pixels of the loader's output image (x1, y1 exclusive).

    ``points`` are CelebA's 5 landmarks [5, 2] in the original (width, height) image. The box spans the
    two mouth corners widened by ``margin``·(mouth width) on each side and is half as tall as it is
    wide, centred on the corners' midpoint, so it holds lips and teeth whether the mouth is closed or
    open. It is mapped through the centre crop and resize of :func:`load_image` and clipped to the image.
    """
    left, right = np.asarray(points, dtype=np.float64)[3:5]
    width = max(abs(right[0] - left[0]), 1.0)
    centre_x, centre_y = (left + right) / 2
    half_width = width / 2 + margin * width
    half_height = half_width / 2
    crop_left, crop_top, crop_right, _ = center_crop_box(*original_size)
    scale = image_size / (crop_right - crop_left)

    def to_output(value: float, offset: int, rounding: Callable[[float], int]) -> int:
        return int(min(max(rounding((value - offset) * scale), 0), image_size))

    return (
        to_output(centre_x - half_width, crop_left, math.floor),
        to_output(centre_y - half_height, crop_top, math.floor),
        to_output(centre_x + half_width, crop_left, math.ceil),
        to_output(centre_y + half_height, crop_top, math.ceil),
    )


def image_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [S, S, 3] → contiguous float32 [3, S, S] in [0, 1], bit-identical to torchvision's ``to_tensor``.

    numpy does it in one single-threaded pass: the same three steps in torch launch intra-op thread
    pools, which cost 100× more per image when the main process (num_workers=0) shares busy cores.
    """
    tensor = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    np.divide(pixels.transpose(2, 0, 1), np.float32(255), out=tensor, dtype=np.float32)
    return torch.from_numpy(tensor)


# --------------------------------------------------------------------------------------------------
# Attribute names
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Text files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeTable:
    """``list_attr_celeba.txt`` parsed: one row per image, values ±1 as in the file."""

    image_ids: list[str]
    names: list[str]
    values: np.ndarray  # int8 [N, K], ±1


def read_attribute_file(path: Path) -> AttributeTable:
    """Parse ``list_attr_celeba.txt``: count line, names line, then ``<file> ±1 ±1 ...`` rows.

    Any number of attribute columns is accepted (the generated dataset writes a subset of the 40).
    """
    with open(path) as handle:
        lines = handle.read().splitlines()
    if len(lines) < 2:
        raise UserError(f"{path} is malformed: expected a count line and an attribute-name line, found {len(lines)} lines")
    declared = _parse_count(lines[0], path)
    names = lines[1].split()
    if not names:
        raise UserError(f"{path} is malformed at line 2: expected the attribute names, found an empty line")
    image_ids: list[str] = []
    bodies: list[str] = []
    for line in _nonblank(lines, 2, path):
        image_id, _, body = line.strip().partition(" ")
        image_ids.append(image_id)
        bodies.append(body)
    if len(image_ids) != declared:
        raise UserError(
            f"{path} is malformed: line 1 declares {declared} images but {len(image_ids)} rows follow "
            "(truncated or edited file?); restore the original file"
        )
    values = _parse_signs(bodies, len(names), path, first_line=3)
    _reject_duplicates(image_ids, path)
    return AttributeTable(image_ids=image_ids, names=names, values=values)


def _parse_count(line: str, path: Path) -> int:
    try:
        return int(line.strip())
    except ValueError:
        raise UserError(f"{path} is malformed at line 1: expected the image count, found {line.strip()[:40]!r}") from None


def _nonblank(lines: list[str], first: int, path: Path) -> list[str]:
    """Lines from index ``first`` on; blank lines are allowed only at the end (a trailing newline)."""
    rows = lines[first:]
    while rows and not rows[-1].strip():
        rows.pop()
    for offset, line in enumerate(rows):
        if not line.strip():
            raise UserError(f"{path} is malformed at line {first + offset + 1}: a blank line between rows; remove it")
    return rows


def _parse_signs(bodies: list[str], width: int, path: Path, first_line: int) -> np.ndarray:
    """Rows of ``width`` whitespace-separated ±1 values → int8 [len(bodies), width].

    numpy's C parser does the work; only when it fails does a Python pass find the line to report.
    """
    if not bodies:
        return np.zeros((0, width), dtype=np.int8)
    try:
        values = np.loadtxt(bodies, dtype=np.int8, comments=None, ndmin=2)
    except ValueError:
        values = None
    if values is None or values.shape[1] != width or not np.all(np.abs(values) == 1):
        _raise_first_bad_row(bodies, width, path, first_line)
    return values


def _raise_first_bad_row(bodies: list[str], width: int, path: Path, first_line: int) -> None:
    for offset, body in enumerate(bodies):
        tokens = body.split()
        if len(tokens) != width:
            problem = f"expected {width} attribute values, found {len(tokens)}"
        elif any(token not in ("1", "-1") for token in tokens):
            problem = f"attribute values must be 1 or -1, found {body.strip()[:60]!r}"
        else:
            continue
        raise UserError(f"{path} is malformed at line {first_line + offset}: {problem}; fix or restore that line")
    raise UserError(f"{path} is malformed: its attribute values could not be parsed; restore the original file")


def _reject_duplicates(image_ids: list[str], path: Path) -> None:
    if len(set(image_ids)) == len(image_ids):
        return
    seen: set[str] = set()
    for image_id in image_ids:
        if image_id in seen:
            raise UserError(f"{path} lists image {image_id} more than once; keep one row per image")
        seen.add(image_id)


def read_partition_file(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse ``list_eval_partition.txt`` (no header; rows ``<file> <0|1|2>``) → (ids, int8 partitions)."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    image_ids: list[str] = []
    partitions = np.empty(len(lines), dtype=np.int8)
    for number, line in enumerate(_nonblank(lines, 0, path), start=1):
        tokens = line.split()
        if len(tokens) != 2 or tokens[1] not in ("0", "1", "2"):
            raise UserError(
                f"{path} is malformed at line {number}: expected '<image> <0|1|2>', found {line.strip()[:60]!r}"
            )
        image_ids.append(tokens[0])
        partitions[number - 1] = int(tokens[1])
    _reject_duplicates(image_ids, path)
    return image_ids, partitions[: len(image_ids)]


def read_landmarks_file(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse ``list_landmarks_align_celeba.txt`` → (ids, int64 [N, 5, 2] (x, y) points)."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    if len(lines) < 2:
        raise UserError(f"{path} is malformed: expected a count line and a header line")
    _parse_count(lines[0], path)
    image_ids: list[str] = []
    bodies: list[str] = []
    for line in _nonblank(lines, 2, path):
        image_id, _, body = line.strip().partition(" ")
        image_ids.append(image_id)
        bodies.append(body)
    width = 2 * len(LANDMARK_NAMES)
    try:
        points = np.loadtxt(bodies, dtype=np.int64, comments=None, ndmin=2) if bodies else np.zeros((0, width), np.int64)
    except ValueError:
        points = None
    if points is None or points.shape[1] != width:
        for offset, body in enumerate(bodies):
            tokens = body.split()
            if len(tokens) != width or not all(t.lstrip("-").isdigit() for t in tokens):
                raise UserError(
                    f"{path} is malformed at line {offset + 3}: expected {width} integer coordinates, "
                    f"found {body.strip()[:60]!r}"
                )
        raise UserError(f"{path} is malformed: its coordinates could not be parsed; restore the original file")
    return image_ids, points.reshape(-1, len(LANDMARK_NAMES), 2)


def read_counterfactual_file(path: Path) -> tuple[list[str], list[str], list[str]]:
    """Parse ``list_counterfactual.txt`` → (image ids, twin files, flipped attribute names)."""
    with open(path) as handle:
        lines = handle.read().splitlines()
    if len(lines) < 2:
        raise UserError(f"{path} is malformed: expected a count line and the header {' '.join(COUNTERFACTUAL_HEADER)!r}")
    declared = _parse_count(lines[0], path)
    if tuple(lines[1].split()) != COUNTERFACTUAL_HEADER:
        raise UserError(
            f"{path} is malformed at line 2: expected the header {' '.join(COUNTERFACTUAL_HEADER)!r}, "
            f"found {lines[1].strip()[:60]!r}"
        )
    columns: tuple[list[str], list[str], list[str]] = ([], [], [])
    for number, line in enumerate(_nonblank(lines, 2, path), start=3):
        tokens = line.split()
        if len(tokens) != 3:
            raise UserError(
                f"{path} is malformed at line {number}: expected '<image_id> <twin_file> <flipped_attribute>', "
                f"found {line.strip()[:60]!r}"
            )
        for column, token in zip(columns, tokens):
            column.append(token)
    if len(columns[0]) != declared:
        raise UserError(f"{path} is malformed: line 1 declares {declared} twins but {len(columns[0])} rows follow")
    _reject_duplicates(columns[0], path)
    return columns


# --------------------------------------------------------------------------------------------------
# Layout on disk
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CelebAFiles:
    """Where one CelebA copy keeps its files."""

    root: Path
    dataset_dir: Path  # root/celeba (torchvision layout) or root (flat layout)
    layout: str  # "torchvision" | "flat"

    @property
    def attributes(self) -> Path:
        return self.dataset_dir / ATTRIBUTE_FILE

    @property
    def partition(self) -> Path:
        return self.dataset_dir / PARTITION_FILE

    @property
    def landmarks(self) -> Path:
        return self.dataset_dir / LANDMARKS_FILE

    @property
    def images(self) -> Path:
        return self.dataset_dir / IMAGE_DIR


def locate_celeba(root: str | os.PathLike) -> CelebAFiles:
    """Find the CelebA files under ``root`` in either accepted layout, or raise naming what is missing."""
    root = Path(root).expanduser()
    layouts = (
        f"{root / TORCHVISION_FOLDER}/{{{ATTRIBUTE_FILE}, {PARTITION_FILE}, {IMAGE_DIR}/}} (torchvision layout) "
        f"or {root}/{{{ATTRIBUTE_FILE}, {PARTITION_FILE}, {IMAGE_DIR}/}} (flat layout)"
    )
    if not root.is_dir():
        raise UserError(f"CelebA root {root} does not exist or is not a folder; set it to a folder holding {layouts}")
    required = (ATTRIBUTE_FILE, PARTITION_FILE, IMAGE_DIR)
    nested = root / TORCHVISION_FOLDER
    # The torchvision layout wins as soon as its folder holds any CelebA file, so that a half-copied
    # root/celeba/ is reported as such instead of falling through to a confusing flat-layout error.
    if nested.is_dir() and any((nested / name).exists() for name in required):
        files = CelebAFiles(root=root, dataset_dir=nested, layout="torchvision")
    else:
        files = CelebAFiles(root=root, dataset_dir=root, layout="flat")
    missing = [name for name in required if not (files.dataset_dir / name).exists()]
    if missing:
        raise UserError(
            f"CelebA root {root} ({files.layout} layout) is missing {', '.join(missing)} in {files.dataset_dir}; "
            f"the loader expects {layouts}"
        )
    return files


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


# --------------------------------------------------------------------------------------------------
# The datasets
# --------------------------------------------------------------------------------------------------

BAD_IMAGE_POLICIES = ("error", "skip")


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


class CelebA(FaceDataset):
    """One split of CelebA (or of a CelebA-format dataset) with a binary target and protected attribute.

    Items are ``(image, y, a, i)``: float32 [3, S, S] in [0, 1], target label, protected label, index.
    A label is 1 when the attribute is present (+1 in the file) and 0 when absent (-1).

    ``counterfactual=True`` (test split only) serves the twins listed in
    ``root/counterfactual/list_counterfactual.txt`` instead of the originals: same ``image_ids`` and
    order, images from the twin files, and each row's ``flipped_attribute`` label negated.
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
        if counterfactual and split != "test":
            raise UserError(f"counterfactual twins exist for the test split only, not {split!r}; use split='test'")
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
        self._landmarks: np.ndarray | None = None

    def _select_split(self, table: AttributeTable) -> tuple[list[str], np.ndarray]:
        """The split's ids in partition-file order, and their attribute rows (int8 ±1 [N, K])."""
        partition_ids, partitions = read_partition_file(self.files.partition)
        wanted = SPLITS[self.split]
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
                f"{len(lacking)} of {len(self.image_ids)} test images have no twin in {listing} "
                f"(first: {', '.join(lacking[:3])}); regenerate the dataset with twins for the whole test split"
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
