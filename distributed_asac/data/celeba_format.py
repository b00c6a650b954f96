"""CelebA's on-disk format, read and written by the same code: the loader (``celeba.py``) reads it, the
generator (``synthetic.py``) writes it.

A CelebA copy (the real one, or a generated dataset in its format)::

    <dir>/img_align_celeba/000001.jpg ...           6-digit, 1-based image names
    <dir>/list_attr_celeba.txt                       count line, names line, then ``<image> ±1 ±1 ...`` rows
    <dir>/list_eval_partition.txt                    ``<image> <0|1|2>`` rows (train, valid, test), no header
    <dir>/list_landmarks_align_celeba.txt            count line, header, then 10 coordinates per image

plus, in generated datasets only, this project's two additions::

    <dir>/list_regions_celeba.txt                    count line, header, then a box per attribute per image
    <dir>/counterfactual/list_counterfactual.txt     count line, ``image_id twin_file flipped_attribute``, rows
    <dir>/counterfactual/img_align_celeba/<image>    the twins

``<dir>`` is the root itself (flat layout) or ``root/celeba`` (torchvision's layout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import UserError

ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARKS_FILE = "list_landmarks_align_celeba.txt"
REGIONS_FILE = "list_regions_celeba.txt"
IMAGE_DIR = "img_align_celeba"
COUNTERFACTUAL_DIR = "counterfactual"
COUNTERFACTUAL_FILE = "list_counterfactual.txt"
COUNTERFACTUAL_HEADER = ("image_id", "twin_file", "flipped_attribute")
LANDMARK_NAMES = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
LANDMARK_COLUMNS = tuple(f"{point}_{axis}" for point in LANDMARK_NAMES for axis in "xy")  # the file's header
TORCHVISION_FOLDER = "celeba"


def image_name(index: int) -> str:
    """CelebA's file name of the 0-based image ``index``: ``000001.jpg`` for index 0."""
    return f"{index + 1:06d}.jpg"


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_text_lines(path: Path) -> list[str]:
    """The lines of a dataset's list file (CelebA's, LFW's), decoded as UTF-8 with a leading byte-order mark
    dropped (an editor's BOM glued to the first image name made an image that no other file lists); a byte that is
    not UTF-8 is one UserError naming the file, the byte and its line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} at line {line} ({err.reason}); "
                        "restore the original file, or save it as UTF-8") from None
    return text.splitlines()


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
    lines = read_text_lines(path)
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
    except Exception:  # noqa: BLE001 - any failure of the parse: the pass below names the line
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
    lines = read_text_lines(path)
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
    lines = read_text_lines(path)
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
    except Exception:  # noqa: BLE001 - any failure of the parse: the pass below names the line
        points = None
    if points is None or points.shape[1] != width:
        for offset, body in enumerate(bodies):
            tokens = body.split()
            if len(tokens) != width or not all(t.lstrip("-").isdecimal() for t in tokens):
                raise UserError(
                    f"{path} is malformed at line {offset + 3}: expected {width} integer coordinates, "
                    f"found {body.strip()[:60]!r}"
                )
        raise UserError(f"{path} is malformed: its coordinates could not be parsed; restore the original file")
    return image_ids, points.reshape(-1, len(LANDMARK_NAMES), 2)


def read_counterfactual_file(path: Path) -> tuple[list[str], list[str], list[str]]:
    """Parse ``list_counterfactual.txt`` → (image ids, twin files, flipped attribute names)."""
    lines = read_text_lines(path)
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
# Writing (in CelebA's exact spacing, so that a generated copy reads like the real one)
# --------------------------------------------------------------------------------------------------


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="ascii")


def write_attribute_file(path: Path, image_ids: Sequence[str], names: Sequence[str], present: np.ndarray) -> None:
    """``list_attr_celeba.txt`` from ``present`` (bool [N, K], column k is ``names[k]``): CelebA's trailing space
    after the names, then each value as `` %2d``."""
    signed = np.where(present, 1, -1)
    _write_lines(path, [str(len(image_ids)), " ".join(names) + " "] + [
        image_id + "".join(f" {v:2d}" for v in row) for image_id, row in zip(image_ids, signed)
    ])


def write_partition_file(path: Path, image_ids: Sequence[str], partitions: Sequence[int]) -> None:
    """``list_eval_partition.txt``: ``<image> <0|1|2>`` per image."""
    _write_lines(path, [f"{image_id} {split}" for image_id, split in zip(image_ids, partitions)])


def write_landmarks_file(path: Path, image_ids: Sequence[str], points: np.ndarray) -> None:
    """``list_landmarks_align_celeba.txt`` from int [N, 10] coordinates (LANDMARK_COLUMNS order): as CelebA's
    aligned file, the first value as `` %2d`` and the others as ``%5d``."""
    _write_lines(path, [str(len(image_ids)), " ".join(LANDMARK_COLUMNS)] + [
        f"{image_id} {row[0]:2d}" + "".join(f"{v:5d}" for v in row[1:]) for image_id, row in zip(image_ids, points)
    ])


def write_regions_file(path: Path, image_ids: Sequence[str], attributes: Sequence[str], boxes: np.ndarray) -> None:
    """``list_regions_celeba.txt`` from int [N, 4·len(attributes)] boxes: per attribute ``x1 y1 x2 y2`` in pixels
    of the written image (x1 y1 inclusive, x2 y2 exclusive), each as ``%5d``."""
    header = " ".join(f"{a}_{c}" for a in attributes for c in ("x1", "y1", "x2", "y2"))
    _write_lines(path, [str(len(image_ids)), header] + [
        image_id + "".join(f"{v:5d}" for v in row) for image_id, row in zip(image_ids, boxes)
    ])


def write_counterfactual_file(path: Path, image_ids: Sequence[str], flipped_attribute: str) -> None:
    """``counterfactual/list_counterfactual.txt``: the twin of each image has its name, under IMAGE_DIR of the
    counterfactual folder, and differs by ``flipped_attribute``."""
    _write_lines(path, [str(len(image_ids)), " ".join(COUNTERFACTUAL_HEADER)]
                 + [f"{image_id} {IMAGE_DIR}/{image_id} {flipped_attribute}" for image_id in image_ids])


# --------------------------------------------------------------------------------------------------
# Layout of a copy on disk
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

