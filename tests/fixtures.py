"""Tiny datasets written in the exact on-disk formats of the real ones, for tests.

Each writer returns what it wrote (labels, per-image colours, landmarks) so that tests compare a
loader's output with the truth instead of with hard-coded numbers. Images are flat colour fields: each
image has its own "face" colour in the centred square and a fixed magenta band in the rows that a
centre crop must remove, so a wrong crop, a wrong file or a label/image misalignment is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# CelebA's list_attr_celeba.txt line 2, byte for byte (single spaces and a trailing space). It is
# written out here, not imported from the loader, so that the fixture is an independent statement of
# the format.
CELEBA_HEADER = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young "
)
CELEBA_ATTRIBUTES: tuple[str, ...] = tuple(CELEBA_HEADER.split())
LANDMARKS_HEADER = (
    "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
)
BAND_COLOUR = (255, 0, 255)
"""Colour of the rows outside the centred square; no face colour comes near it."""


@dataclass
class CelebAFixture:
    """What :func:`write_celeba_fixture` wrote."""

    root: Path  # pass this as the loader's root
    dataset_dir: Path  # where the list files and img_align_celeba/ are
    image_ids: list[str]
    attribute_names: list[str]
    signs: np.ndarray  # int8 [n, K], ±1 as written
    partition: np.ndarray  # int [n], 0/1/2
    colours: np.ndarray  # uint8 [n, 3], the face colour of each image
    landmarks: np.ndarray  # int64 [n, 5, 2]
    size: tuple[int, int]  # (width, height)

    def label(self, image_id: str, attribute: str) -> int:
        """0/1 label of ``attribute`` for ``image_id`` as written."""
        row = self.image_ids.index(image_id)
        return int(self.signs[row, self.attribute_names.index(attribute)] > 0)

    def colour(self, image_id: str) -> np.ndarray:
        return self.colours[self.image_ids.index(image_id)]

    def split_ids(self, split: int) -> list[str]:
        """Ids of partition ``split`` in file order."""
        return [image_id for image_id, part in zip(self.image_ids, self.partition) if part == split]

    def image_path(self, image_id: str) -> Path:
        return self.dataset_dir / "img_align_celeba" / image_id


def distinct_colours(n: int, rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    """``n`` uint8 RGB colours, channels in [30, 220], each ≥ 24 away (max-norm) from the others and ``avoid``.

    The spacing survives JPEG's small colour errors, so a decoded colour identifies its image.
    """
    taken = [c.astype(np.int64) for c in (avoid if avoid is not None else [])]
    colours: list[np.ndarray] = []
    while len(colours) < n:
        candidate = rng.integers(30, 221, size=3)
        if all(np.abs(candidate - c).max() >= 24 for c in taken):
            taken.append(candidate)
            colours.append(candidate)
    return np.stack(colours).astype(np.uint8) if colours else np.zeros((0, 3), np.uint8)


def draw_face(size: tuple[int, int], colour: Sequence[int]) -> Image.Image:
    """A (width, height) image: the centred square of the shorter side in ``colour``, the rest magenta."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BAND_COLOUR
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top : top + side, left : left + side] = colour
    return Image.fromarray(pixels)


def save_jpeg(image: Image.Image, path: Path) -> None:
    """JPEG as CelebA's are, at high quality without chroma subsampling so flat colours stay exact-ish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=95, subsampling=0)


def write_celeba_fixture(
    root: Path,
    n: int = 24,
    layout: str = "flat",
    size: tuple[int, int] = (178, 218),
    attribute_names: Sequence[str] = CELEBA_ATTRIBUTES,
    seed: int = 0,
    interleave_partitions: bool = True,
    torchvision_extras: bool = True,
) -> CelebAFixture:
    """Write ``n`` CelebA-format images and list files under ``root``; returns what was written.

    ``layout="torchvision"`` puts everything in ``root/celeba/``, ``"flat"`` directly in ``root``.
    ``attribute_names`` other than the 40 mimics the generated dataset (a subset of the columns).
    Partitions cycle 0,1,2 (interleaved, so a loader that assumes contiguous splits fails) or, with
    ``interleave_partitions=False``, come in contiguous blocks as in the real file. Every split gets both
    labels of every attribute. ``torchvision_extras`` also writes identity_CelebA.txt and
    list_bbox_celeba.txt, which torchvision's CelebA insists on reading.
    """
    if layout not in ("flat", "torchvision"):
        raise ValueError(f"layout must be 'flat' or 'torchvision', not {layout!r}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    dataset_dir = root / "celeba" if layout == "torchvision" else root
    names = list(attribute_names)
    image_ids = [f"{k + 1:06d}.jpg" for k in range(n)]
    if interleave_partitions:
        partition = np.arange(n) % 3
    else:
        partition = np.repeat([0, 1, 2], [n - 2 * (n // 4), n // 4, n // 4])
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, len(names)))
    for split in range(3):
        rows = np.flatnonzero(partition == split)
        if len(rows) >= 2:  # both labels present in every split, whatever the seed
            signs[rows[0]], signs[rows[1]] = 1, -1
    colours = distinct_colours(n, rng)
    landmarks = _random_landmarks(n, size, rng)

    images = dataset_dir / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    for image_id, colour in zip(image_ids, colours):
        save_jpeg(draw_face(size, colour), images / image_id)
    header = CELEBA_HEADER if names == list(CELEBA_ATTRIBUTES) else " ".join(names) + " "
    rows = ["".join(f" {v:2d}" for v in row) for row in signs.tolist()]
    _write(dataset_dir / "list_attr_celeba.txt", [str(n), header] + [i + r for i, r in zip(image_ids, rows)])
    _write(dataset_dir / "list_eval_partition.txt", [f"{i} {p}" for i, p in zip(image_ids, partition.tolist())])
    points = ["".join(f" {v:4d}" for v in row.reshape(-1).tolist()) for row in landmarks]
    _write(
        dataset_dir / "list_landmarks_align_celeba.txt",
        [str(n), LANDMARKS_HEADER] + [i + p for i, p in zip(image_ids, points)],
    )
    if torchvision_extras:
        _write(dataset_dir / "identity_CelebA.txt", [f"{i} {k % 7 + 1}" for k, i in enumerate(image_ids)])
        bbox = [f"{i} {k % 50 + 10:5d} {k % 40 + 5:4d} {size[0] - 20:4d} {size[1] - 20:4d}" for k, i in enumerate(image_ids)]
        _write(dataset_dir / "list_bbox_celeba.txt", [str(n), "image_id x_1 y_1 width height"] + bbox)
    return CelebAFixture(
        root=root,
        dataset_dir=dataset_dir,
        image_ids=image_ids,
        attribute_names=names,
        signs=signs,
        partition=partition,
        colours=colours,
        landmarks=landmarks,
        size=tuple(size),
    )


def _random_landmarks(n: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Plausible (x, y) eyes, nose and mouth corners inside a (width, height) image: int64 [n, 5, 2]."""
    width, height = size
    template = np.array([[0.39, 0.50], [0.60, 0.52], [0.44, 0.65], [0.41, 0.70], [0.61, 0.71]])
    jitter = rng.uniform(-0.02, 0.02, size=(n, 5, 2))
    return np.rint((template + jitter) * [width, height]).astype(np.int64)


def write_counterfactual_fixture(
    fixture: CelebAFixture,
    flipped_attribute: str = "Male",
    image_ids: Sequence[str] | None = None,
    seed: int = 1,
) -> dict[str, np.ndarray]:
    """Write twins for ``image_ids`` (default: the whole test split) under ``dataset_dir/counterfactual``.

    Twins are files ``counterfactual/img_align_celeba/<id>`` in new colours; returns id → twin colour.
    """
    rng = np.random.default_rng(seed)
    ids = list(image_ids) if image_ids is not None else fixture.split_ids(2)
    # Twin colours are far from every original colour, so a test can tell twin from original.
    fresh = distinct_colours(len(ids), rng, avoid=fixture.colours)
    folder = fixture.dataset_dir / "counterfactual"
    rows = []
    for image_id, colour in zip(ids, fresh):
        save_jpeg(draw_face(fixture.size, colour), folder / "img_align_celeba" / image_id)
        rows.append(f"{image_id} img_align_celeba/{image_id} {flipped_attribute}")
    _write(folder / "list_counterfactual.txt", [str(len(ids)), "image_id twin_file flipped_attribute"] + rows)
    return dict(zip(ids, fresh))


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
