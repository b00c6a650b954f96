"""LFW with the 73 attribute scores of Kumar et al. (``lfw_attributes.txt``), split person-disjointly.

The attribute file's quirks, all handled here:

- line 1 is a comment (``# ...``);
- line 2 is the header, tab-separated and starting with ``#``: ``#<TAB>person<TAB>imagenum<TAB>Male<TAB>...``.
  Read naively (e.g. ``pandas.read_csv(sep="\\t", skiprows=1)``) the ``#`` takes the first column name and
  every name lands one column to the right of its values;
- 73 real-valued classifier scores per row; > 0 means the attribute is present;
- attribute names contain spaces ("Wavy Hair", "Bags Under Eyes"): either spelling is accepted;
- person names contain spaces in the file ("Aaron Eckhart") and underscores on disk
  (``Aaron_Eckhart/Aaron_Eckhart_0001.jpg``, under ``lfw/``, ``lfw_funneled/`` or ``lfw-deepfunneled/``).

Rows without an image and images without a row are joined away; ``join_counts`` reports how many.

LFW has no official attribute split, so the split is person-disjoint (no person in two splits, so a
model cannot score by recognising identities) with 70/10/20 of the images, drawn from a fixed seed and
written to a split file that later runs reuse.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_write
from .celeba_format import read_text_lines
from .faces import FaceDataset, check_common_arguments, find_attribute
from .splits import SPLIT_FRACTIONS, SPLITS

log = logging.getLogger(__name__)

ATTRIBUTE_FILE = "lfw_attributes.txt"
IMAGE_FOLDERS = ("lfw-deepfunneled", "lfw_funneled", "lfw")
"""Accepted image folders, in the order picked when several exist (best aligned first)."""
SPLIT_FORMAT = "distributed_asac/lfw-person-split/1"


@dataclass(frozen=True)
class LFWAttributes:
    """``lfw_attributes.txt`` parsed: one row per (person, image number)."""

    persons: list[str]  # as in the file, with spaces
    numbers: np.ndarray  # int64 [N], 1-based image number
    names: list[str]  # the 73 attribute names, as in the header
    scores: np.ndarray  # float32 [N, K]


def read_lfw_attributes(path: Path) -> LFWAttributes:
    """Parse the attribute file: leading ``#`` comment lines, the ``#``-prefixed header, then TAB rows."""
    lines = read_text_lines(path)
    header_line, names = _find_header(lines, path)
    persons: list[str] = []
    numbers: list[int] = []
    bodies: list[str] = []
    for number, line in enumerate(lines[header_line:], start=header_line + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 + len(names) or not fields[1].strip().isdecimal():
            raise UserError(
                f"{path} is malformed at line {number}: expected a person, an image number and {len(names)} "
                f"scores separated by tabs, found {len(fields)} fields"
            )
        persons.append(fields[0].strip())
        numbers.append(int(fields[1]))
        bodies.append("\t".join(fields[2:]))
    try:
        scores = np.loadtxt(bodies, dtype=np.float32, delimiter="\t", comments=None, ndmin=2)
    except Exception:  # noqa: BLE001 - any failure of the parse: the pass below names the line
        scores = None
    if scores is None or scores.shape != (len(bodies), len(names)) or not np.isfinite(scores).all():
        _raise_first_bad_scores(lines, header_line, path)
    keys = list(zip(persons, numbers))
    if len(set(keys)) != len(keys):
        seen: set[tuple[str, int]] = set()
        for key in keys:
            if key in seen:
                raise UserError(f"{path} has two rows for {key[0]} image {key[1]}; keep one")
            seen.add(key)
    return LFWAttributes(persons, np.asarray(numbers, dtype=np.int64), names, scores.reshape(len(bodies), len(names)))


def _find_header(lines: list[str], path: Path) -> tuple[int, list[str]]:
    """(index of the first data line, attribute names) from the leading ``#`` lines."""
    for index, line in enumerate(lines):
        if not line.startswith("#"):
            break
        fields = [field.strip() for field in line.split("\t")]
        # The real header puts a lone "#" before a TAB; "#person" without the TAB is accepted too.
        fields[0] = fields[0].lstrip("#").strip()
        if not fields[0]:
            fields = fields[1:]
        if fields[:2] == ["person", "imagenum"] and len(fields) > 2:
            return index + 1, fields[2:]
    raise UserError(
        f"{path} is malformed: none of its leading '#' lines is the header '#<TAB>person<TAB>imagenum<TAB><attributes>'; "
        "restore the original lfw_attributes.txt"
    )


def _raise_first_bad_scores(lines: list[str], header_line: int, path: Path) -> None:
    for number, line in enumerate(lines[header_line:], start=header_line + 1):
        for field in line.split("\t")[2:] if line.strip() else []:
            try:
                if not np.isfinite(float(field)):
                    raise ValueError
            except ValueError:
                raise UserError(
                    f"{path} is malformed at line {number}: score {field.strip()[:20]!r} is not a finite number"
                ) from None
    raise UserError(f"{path} is malformed: its scores could not be parsed; restore the original file")


def disk_name(person: str, number: int) -> str:
    """``Aaron Eckhart``, 1 → ``Aaron_Eckhart/Aaron_Eckhart_0001.jpg`` (LFW's layout)."""
    folder = person.replace(" ", "_")
    return f"{folder}/{folder}_{number:04d}.jpg"


def locate_lfw(root: str | os.PathLike, image_folder: str | None = None) -> tuple[Path, Path]:
    """(attribute file, image folder) under ``root``; ``image_folder`` picks one of IMAGE_FOLDERS."""
    root = Path(root).expanduser()
    expected = f"{root}/{ATTRIBUTE_FILE} and one image folder of {', '.join(IMAGE_FOLDERS)}"
    if not root.is_dir():
        raise UserError(f"LFW root {root} does not exist or is not a folder; set it to a folder holding {expected}")
    attributes = root / ATTRIBUTE_FILE
    if not attributes.is_file():
        raise UserError(f"LFW root {root} has no {ATTRIBUTE_FILE}; the loader expects {expected}")
    if image_folder is not None:
        if image_folder not in IMAGE_FOLDERS:
            raise UserError(f"unknown LFW image folder {image_folder!r}; use one of {', '.join(IMAGE_FOLDERS)}")
        if not (root / image_folder).is_dir():
            raise UserError(
                f"LFW root {root} has no {image_folder}/ folder; extract it there or choose another image folder"
            )
        return attributes, root / image_folder
    for name in IMAGE_FOLDERS:
        if (root / name).is_dir():
            return attributes, root / name
    raise UserError(f"LFW root {root} has no image folder; the loader expects {expected}")


def list_images(folder: Path) -> set[str]:
    """Every ``Person/Person_NNNN.jpg`` under ``folder``, from one listing per person folder."""
    found: set[str] = set()
    with os.scandir(folder) as people:
        for person in people:
            if person.is_dir():
                found.update(f"{person.name}/{entry}" for entry in os.listdir(person.path) if entry.endswith(".jpg"))
    return found


# --------------------------------------------------------------------------------------------------
# The person-disjoint split
# --------------------------------------------------------------------------------------------------


def person_disjoint_split(
    image_counts: dict[str, int], seed: int, fractions: Sequence[float] = SPLIT_FRACTIONS
) -> dict[str, list[str]]:
    """Split persons into train/valid/test holding about ``fractions`` of the images.

    Persons are shuffled from ``seed`` (after sorting, so file order does not matter) and dealt in that
    order: to train while train holds under 70 % of the images, then valid up to 80 %, then test. Each
    split's share is therefore off by at most one person's image count.
    """
    persons = sorted(image_counts)
    order = np.random.default_rng(seed).permutation(len(persons))
    total = sum(image_counts.values())
    bounds = np.cumsum(fractions) * total
    split: dict[str, list[str]] = {name: [] for name in SPLITS}
    dealt = 0
    for k in order.tolist():
        person = persons[k]
        part = next((s for s, bound in zip(SPLITS, bounds) if dealt < bound), SPLITS[-1])
        split[part].append(person)
        dealt += image_counts[person]
    return {name: sorted(members) for name, members in split.items()}


def load_or_create_split(path: Path, image_counts: dict[str, int], seed: int) -> dict[str, list[str]]:
    """The split stored at ``path``, or a new one from ``seed`` written there (atomically) and returned."""
    if path.is_file():
        split = _read_split(path, seed)
        assigned = {person for members in split.values() for person in members}
        unassigned = sorted(set(image_counts) - assigned)
        if unassigned:
            raise UserError(
                f"split file {path} assigns no split to {len(unassigned)} persons of this LFW copy "
                f"(first: {', '.join(unassigned[:3])}); delete it to draw a new split, or point split_file elsewhere"
            )
        return split
    split = person_disjoint_split(image_counts, seed)
    payload = {
        "format": SPLIT_FORMAT,
        "seed": seed,
        "fractions": dict(zip(SPLITS, SPLIT_FRACTIONS)),
        "images": {name: sum(image_counts[p] for p in members) for name, members in split.items()},
        "persons": split,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(payload, indent=1) + "\n")  # several ranks may write it: the same content
    except OSError as err:
        raise UserError(f"cannot write the LFW split file {path} ({err}); choose a writable split_file") from err
    log.info("wrote the LFW person split (seed %d) to %s", seed, path)
    return split


def _read_split(path: Path, seed: int) -> dict[str, list[str]]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the LFW split file {path} ({err}); delete it to draw a new split") from err
    if not isinstance(payload, dict) or payload.get("format") != SPLIT_FORMAT:
        raise UserError(f"{path} is not an LFW split file of this project; delete it or point split_file elsewhere")
    if payload.get("seed") != seed:
        raise UserError(
            f"split file {path} was drawn with seed {payload.get('seed')}, not {seed}; "
            "use that seed, or delete the file to draw a new split"
        )
    split = payload.get("persons", {})
    if sorted(split) != sorted(SPLITS):
        raise UserError(f"split file {path} must assign persons to exactly {', '.join(SPLITS)}; delete it to redraw")
    owner: dict[str, str] = {}
    for name, members in split.items():
        for person in members:
            if person in owner:
                raise UserError(f"split file {path} puts {person} in both {owner[person]} and {name}; delete it to redraw")
            owner[person] = name
    return split


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


class LFW(FaceDataset):
    """One person-disjoint split of LFW with a binary target and protected attribute (score > 0 → 1).

    Same items and attributes as :class:`~distributed_asac.data.celeba.CelebA`: ``(image, y, a, i)``,
    ``image_ids`` (``Person_Name/Person_Name_0001.jpg``, in attribute-file order), ``targets``,
    ``protected_labels``, ``attribute_names`` (the file's 73 names, with spaces).

    ``split_file`` is where the person split is stored: read if it exists (and must have been drawn with
    ``split_seed``), else drawn and written there. ``image_folder`` picks the image folder (default: the first
    of ``lfw-deepfunneled``, ``lfw_funneled``, ``lfw`` that exists). ``cache_dir`` and ``on_bad_image`` are
    as for CelebA.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        target: str,
        protected: str,
        image_size: int = 64,
        *,
        split_file: str | os.PathLike,
        split_seed: int = 0,
        image_folder: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        on_bad_image: str = "error",
    ) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown LFW split {split!r}; use one of {', '.join(SPLITS)}")
        check_common_arguments(image_size, on_bad_image)
        attribute_file, image_dir = locate_lfw(root, image_folder)
        self.root = Path(root).expanduser()
        self.split = split
        self.image_size = int(image_size)
        self.image_folder = image_dir.name

        table = read_lfw_attributes(attribute_file)
        self.attribute_names = table.names
        target_column = find_attribute(target, table.names, role="target", source=attribute_file)
        protected_column = find_attribute(protected, table.names, role="protected", source=attribute_file)
        self.target_name, self.protected_name = table.names[target_column], table.names[protected_column]

        names = [disk_name(person, number) for person, number in zip(table.persons, table.numbers.tolist())]
        on_disk = list_images(image_dir)
        matched = np.array([name in on_disk for name in names], dtype=bool)
        self.join_counts = {
            "attribute_rows": len(names),
            "images_on_disk": len(on_disk),
            "matched": int(matched.sum()),
            "rows_without_image": int((~matched).sum()),
            "images_without_row": len(on_disk - set(names)),
        }
        log.info("LFW %s: %s", image_dir, ", ".join(f"{key} {value}" for key, value in self.join_counts.items()))
        if not matched.any():
            raise UserError(
                f"none of the {len(names)} rows of {attribute_file} has an image under {image_dir} "
                f"(looked for e.g. {names[0] if names else '<none>'}); check the image folder"
            )

        image_counts: dict[str, int] = {}
        for person, present in zip(table.persons, matched.tolist()):
            if present:
                image_counts[person] = image_counts.get(person, 0) + 1
        members = set(load_or_create_split(Path(split_file).expanduser(), image_counts, split_seed)[split])
        rows = [row for row, person in enumerate(table.persons) if matched[row] and person in members]
        self.image_ids = [names[row] for row in rows]
        self._init_images(
            image_dir,
            self.image_ids,
            table.scores[rows, target_column] > 0,
            table.scores[rows, protected_column] > 0,
            name=f"lfw-{self.image_folder}-{split}",
            cache_dir=cache_dir,
            on_bad_image=on_bad_image,
        )

    def person(self, i: int) -> str:
        """The person (as spelled in the attribute file's folder name) of item ``i``."""
        return self.image_ids[self._check_index(i)].split("/", 1)[0]

    def landmarks(self, i: int) -> torch.Tensor:
        """LFW ships no landmarks; this says so, keeping the interface of CelebA."""
        raise UserError("LFW has no landmark file: landmarks and mouth boxes are available for CelebA only")

    def __repr__(self) -> str:
        cached = ", cached" if self._cache is not None else ""
        return (
            f"LFW({self.split}: {len(self)} images at {self.image_size}px{cached}, target={self.target_name}, "
            f"protected={self.protected_name}, root={self.root} [{self.image_folder}])"
        )
