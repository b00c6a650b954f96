"""The tests' shared helpers, as pytest fixtures (a test asks for one by naming it as a parameter).

- Tiny datasets written in the exact on-disk formats of the real ones: `write_celeba_fixture`,
  `write_counterfactual_fixture`, `write_lfw_fixture` (and `corrupt_jpeg`, `draw_face`, `save_jpeg`,
  `lfw_image_id`). Each writer returns what it wrote (labels, per-image colours, landmarks) so that tests
  compare a loader's output with the truth instead of with hard-coded numbers. Images are flat colour fields:
  each image has its own "face" colour in the centred square and a fixed magenta band in the rows that a
  centre crop must remove, so a wrong crop, a wrong file or a label/image misalignment is visible.
- `smoke_config`: the tiny end-to-end config (configs/smoke.yaml) with its data, run folders and MLflow store
  inside a test's own folder.
- `compared`: one two-seed smoke comparison (rows plain and asac_fgsm) with its MLflow store, run once for the
  tests that read it (test_comparison.py, test_mlflow_models.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
from PIL import Image, ImageDraw

from distributed_asac.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]

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
    """What :func:`_write_celeba_fixture` wrote."""

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


def _distinct_colours(n: int, rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
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


def _draw_face(size: tuple[int, int], colour: Sequence[int], mouth: np.ndarray | None = None) -> Image.Image:
    """A (width, height) image: the centred square of the shorter side in ``colour``, the rest magenta.

    ``mouth`` (two (x, y) corners) adds a black 3-pixel line between them.
    """
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BAND_COLOUR
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top : top + side, left : left + side] = colour
    image = Image.fromarray(pixels)
    if mouth is not None:
        ImageDraw.Draw(image).line([tuple(corner) for corner in mouth.tolist()], fill=(0, 0, 0), width=3)
    return image


def _save_jpeg(image: Image.Image, path: Path) -> None:
    """JPEG as CelebA's are, at high quality without chroma subsampling so flat colours stay exact-ish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=95, subsampling=0)


def _write_celeba_fixture(
    root: Path,
    n: int = 24,
    layout: str = "flat",
    size: tuple[int, int] = (178, 218),
    attribute_names: Sequence[str] = CELEBA_ATTRIBUTES,
    seed: int = 0,
    interleave_partitions: bool = True,
    torchvision_extras: bool = True,
    mark_mouth: bool = False,
) -> CelebAFixture:
    """Write ``n`` CelebA-format images and list files under ``root``; returns what was written.

    ``layout="torchvision"`` puts everything in ``root/celeba/``, ``"flat"`` directly in ``root``.
    ``attribute_names`` other than the 40 mimics the generated dataset (a subset of the columns).
    Partitions cycle 0,1,2 (interleaved, so a loader that assumes contiguous splits fails) or, with
    ``interleave_partitions=False``, come in contiguous blocks as in the real file. Every split gets both
    labels of every attribute. ``torchvision_extras`` also writes identity_CelebA.txt and
    list_bbox_celeba.txt, which torchvision's CelebA insists on reading. ``mark_mouth`` draws a black
    line between the two mouth-corner landmarks.
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
    colours = _distinct_colours(n, rng)
    landmarks = _random_landmarks(n, size, rng)

    images = dataset_dir / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    for image_id, colour, points in zip(image_ids, colours, landmarks):
        _save_jpeg(_draw_face(size, colour, points[3:5] if mark_mouth else None), images / image_id)
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


def _write_counterfactual_fixture(
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
    fresh = _distinct_colours(len(ids), rng, avoid=fixture.colours)
    folder = fixture.dataset_dir / "counterfactual"
    rows = []
    for image_id, colour in zip(ids, fresh):
        _save_jpeg(_draw_face(fixture.size, colour), folder / "img_align_celeba" / image_id)
        rows.append(f"{image_id} img_align_celeba/{image_id} {flipped_attribute}")
    _write(folder / "list_counterfactual.txt", [str(len(ids)), "image_id twin_file flipped_attribute"] + rows)
    return dict(zip(ids, fresh))


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _corrupt_jpeg(path: Path, how: str = "truncate") -> None:
    """Damage an image file: ``"truncate"`` keeps its first half (PIL: "image file is truncated"),
    ``"garbage"`` replaces it with bytes that are no image format at all."""
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        raise ValueError(f"how must be 'truncate' or 'garbage', not {how!r}")


# --------------------------------------------------------------------------------------------------
# LFW with the attributes of Kumar et al.
# --------------------------------------------------------------------------------------------------

# The 73 attribute names of lfw_attributes.txt, in file order (written out, not imported from the loader).
LFW_ATTRIBUTES: tuple[str, ...] = (
    "Male", "Asian", "White", "Black", "Baby", "Child", "Youth", "Middle Aged", "Senior", "Black Hair",
    "Blond Hair", "Brown Hair", "Bald", "No Eyewear", "Eyeglasses", "Sunglasses", "Mustache", "Smiling",
    "Frowning", "Chubby", "Blurry", "Harsh Lighting", "Flash", "Soft Lighting", "Outdoor", "Curly Hair",
    "Wavy Hair", "Straight Hair", "Receding Hairline", "Bangs", "Sideburns", "Fully Visible Forehead",
    "Partially Visible Forehead", "Obstructed Forehead", "Bushy Eyebrows", "Arched Eyebrows", "Narrow Eyes",
    "Eyes Open", "Big Nose", "Pointy Nose", "Big Lips", "Mouth Closed", "Mouth Slightly Open",
    "Mouth Wide Open", "Teeth Not Visible", "No Beard", "Goatee", "Round Jaw", "Double Chin", "Wearing Hat",
    "Oval Face", "Square Face", "Round Face", "Color Photo", "Posed Photo", "Attractive Man",
    "Attractive Woman", "Indian", "Gray Hair", "Bags Under Eyes", "Heavy Makeup", "Rosy Cheeks", "Shiny Skin",
    "Pale Skin", "5 o' Clock Shadow", "Strong Nose-Mouth Lines", "Wearing Lipstick", "Flushed Face",
    "High Cheekbones", "Brown Eyes", "Wearing Earrings", "Wearing Necktie", "Wearing Necklace",
)
LFW_COMMENT = "# lfw attributes file: scores of the attribute classifiers of Kumar et al. (test fixture)"
# Invented people, several with more than one space in the name, image counts as uneven as LFW's.
LFW_PEOPLE: tuple[tuple[str, int], ...] = (
    ("Ada Quill", 1), ("Ben Arlo Cruz", 6), ("Cora Dale", 2), ("Dev Patel Ray", 4), ("Eli Ford", 1),
    ("Fay Gunn Hart", 3), ("Gus Ives", 2), ("Hana Jo Kerr", 5), ("Ian Lowe", 1), ("Jun Mori", 3),
    ("Kai Nash", 2), ("Lea Orr Pike", 4), ("Max Quinn", 1), ("Nia Ross", 2), ("Oto Sato", 3),
)


@dataclass
class LFWFixture:
    """What :func:`_write_lfw_fixture` wrote. Image ids are ``Person_Name/Person_Name_NNNN.jpg``."""

    root: Path
    image_dir: Path
    people: Sequence[tuple[str, int]]  # (person with spaces, image count) as written
    attribute_names: tuple[str, ...]  # the 73 names of the header, in file order
    rows: list[tuple[str, int]]  # (person with spaces, image number) per attribute row, in file order
    scores: np.ndarray  # float32 [len(rows), 73]
    colours: dict[str, np.ndarray]  # image id → face colour, for every image written
    missing_image: str | None  # a row's image id whose file was not written
    orphan_image: str | None  # an image written without a row

    def label(self, image_id: str, attribute: str) -> int:
        row = [_lfw_image_id(person, number) for person, number in self.rows].index(image_id)
        return int(self.scores[row, LFW_ATTRIBUTES.index(attribute)] > 0)

    def image_ids(self) -> list[str]:
        """Ids of the rows that have an image, in file order."""
        ids = [_lfw_image_id(person, number) for person, number in self.rows]
        return [image_id for image_id in ids if image_id != self.missing_image]


def _lfw_image_id(person: str, number: int) -> str:
    folder = person.replace(" ", "_")
    return f"{folder}/{folder}_{number:04d}.jpg"


def _write_lfw_fixture(
    root: Path,
    people: Sequence[tuple[str, int]] = LFW_PEOPLE,
    folder: str = "lfw-deepfunneled",
    size: tuple[int, int] = (250, 250),
    seed: int = 0,
    missing_image: bool = True,
    orphan_image: bool = True,
) -> LFWFixture:
    """Write ``lfw_attributes.txt`` and ``folder/<Name>/<Name>_NNNN.jpg`` under ``root``, as LFW ships them.

    The attribute file has the comment line, the ``#<TAB>person<TAB>imagenum<TAB>...`` header and TAB
    rows of 73 scores. Neighbouring columns get opposite signs (Asian = -Male, Smiling = -Mustache,
    ...), so a reader that shifts names by one column gets every such label wrong. With
    ``missing_image`` the last row's image is not written; with ``orphan_image`` one image gets no row.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = [(person, number) for person, count in people for number in range(1, count + 1)]
    scores = rng.normal(0.0, 1.2, size=(len(rows), len(LFW_ATTRIBUTES))).astype(np.float32)
    scores[:, 1::2] = -scores[:, 0:-1:2]  # each odd column is the negation of its left neighbour
    orphan = (people[0][0], people[0][1] + 1) if orphan_image else None
    written = rows[:-1] if missing_image else list(rows)
    colours = _distinct_colours(len(written) + (orphan is not None), rng)
    image_colours: dict[str, np.ndarray] = {}
    for (person, number), colour in zip(written + ([orphan] if orphan else []), colours):
        image_id = _lfw_image_id(person, number)
        _save_jpeg(_draw_face(size, colour), root / folder / image_id)
        image_colours[image_id] = colour
    header = "\t".join(["#", "person", "imagenum", *LFW_ATTRIBUTES])
    body = ["\t".join([person, str(number), *(f"{v:.6g}" for v in row)]) for (person, number), row in zip(rows, scores.tolist())]
    _write(root / "lfw_attributes.txt", [LFW_COMMENT, header] + body)
    return LFWFixture(
        root=root,
        image_dir=root / folder,
        people=people,
        attribute_names=LFW_ATTRIBUTES,
        rows=rows,
        scores=scores,
        colours=image_colours,
        missing_image=_lfw_image_id(*rows[-1]) if missing_image else None,
        orphan_image=_lfw_image_id(*orphan) if orphan else None,
    )


# --------------------------------------------------------------------------------------------------
# The fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def write_celeba_fixture():
    """`write_celeba_fixture(root, n=24, layout="flat", ...)` → CelebAFixture (see `_write_celeba_fixture`)."""
    return _write_celeba_fixture


@pytest.fixture(scope="session")
def write_counterfactual_fixture():
    """`write_counterfactual_fixture(celeba_fixture, flipped_attribute="Male", ...)` → id → twin colour."""
    return _write_counterfactual_fixture


@pytest.fixture(scope="session")
def write_lfw_fixture():
    """`write_lfw_fixture(root, people=LFW_PEOPLE, folder="lfw-deepfunneled", ...)` → LFWFixture."""
    return _write_lfw_fixture


@pytest.fixture(scope="session")
def lfw_image_id():
    """`lfw_image_id("Ada Quill", 1)` → "Ada_Quill/Ada_Quill_0001.jpg", LFW's file layout written out."""
    return _lfw_image_id


@pytest.fixture(scope="session")
def corrupt_jpeg():
    """`corrupt_jpeg(path, how="truncate" | "garbage")` damages an image file."""
    return _corrupt_jpeg


@pytest.fixture(scope="session")
def draw_face():
    """`draw_face((width, height), colour, mouth=None)` → the fixtures' flat-colour face image."""
    return _draw_face


@pytest.fixture(scope="session")
def save_jpeg():
    """`save_jpeg(image, path)`: JPEG as the fixtures write them (quality 95, no chroma subsampling)."""
    return _save_jpeg


@pytest.fixture(scope="session")
def smoke_config():
    """`smoke_config(folder, *overrides)` → configs/smoke.yaml with `overrides`, its generated data in
    `folder/data`, run folders in `folder/runs` and the MLflow store `folder/mlflow.db`."""

    def make(folder: Path, *overrides: str) -> Config:
        return load_config(REPO / "configs" / "smoke.yaml", [*_in_folder(folder), *overrides])

    return make


@pytest.fixture(scope="session")
def compared(tmp_path_factory, smoke_config):
    """(folder, ComparisonOutput) of `make demo` on the smoke config, seeds 3 and 5, rows plain and asac_fgsm: its
    data, run folders and MLflow store (mlflow.db) in `folder`."""
    from distributed_asac.comparison import compare
    from distributed_asac.demo import row_variants

    tmp = tmp_path_factory.mktemp("compare")
    cfg = smoke_config(tmp, "seeds=[3,5]", "analysis.ig_images=4", "analysis.robustness_images=32")
    return tmp, compare(cfg, variants=row_variants("plain,asac_fgsm"))


@pytest.fixture(scope="session")
def in_folder():
    """`in_folder(folder)` → the overrides that keep a run's generated data, run folders and MLflow store inside
    `folder` (for runs started as a command)."""
    return _in_folder


@pytest.fixture(scope="session")
def free_port():
    """`free_port()` → a TCP port on 127.0.0.1 that was free a moment ago (for a launch's rendezvous)."""
    return _free_port


def run_to_end(cmd: list[str], env: dict[str, str]) -> str:
    """Run a launch (`accelerate launch ...`) in the repository to its end and return its stderr; it must exit 0.
    A session of its own: on a timeout (a collective one rank never joins hangs) the ranks are killed with the
    launcher instead of living on."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"launch timed out (a hung collective?): {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


@pytest.fixture(scope="session")
def marker_of():
    """`marker_of(folder)` → a hex string unique to a test's own folder (pytest numbers each session's folders), to
    find the processes a test started by their environment; derived, never drawn from the machine's entropy."""
    return _marker_of


def _marker_of(folder: Path) -> str:
    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]


@pytest.fixture(scope="session")
def waits_on_lock():
    """`waits_on_lock(lock, work)` → (waited, work's result): runs `work()` in a thread while this test holds an
    flock on `lock` (as another process making the same thing would), and says whether `work` logged that it
    waits for the lock before it finished; then lets go so that `work` ends. No clock decides the answer: `work`
    cannot finish while the lock is held unless it ignores it."""
    return _waits_on_lock


def _waits_on_lock(lock: Path, work: Callable[[], Any]) -> tuple[bool, Any]:
    waiting, done, outcome = threading.Event(), threading.Event(), {}

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("waiting for another process"):
                waiting.set()

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as err:  # re-raised in the test below
            outcome["error"] = err
        finally:
            done.set()

    logger, handler = logging.getLogger("distributed_asac.locks"), Seen()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(lock, "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            thread = threading.Thread(target=target)
            thread.start()
            for _ in range(6000):  # the bound (5 minutes) only turns a hang into a failure
                if waiting.wait(0.05) or done.is_set():
                    break
            waited = waiting.is_set() and not done.is_set()
            fcntl.flock(held, fcntl.LOCK_UN)
        thread.join(300)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if "error" in outcome:
        raise outcome["error"]
    return waited, outcome.get("result")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def process_running():
    """`process_running(pid)` → whether the process still runs; a zombie has exited (a killed driver's orphans
    may never be reaped)."""
    return _process_running


def _process_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # after "(comm)"
    except FileNotFoundError:
        return False


def _in_folder(folder: Path) -> list[str]:
    return [f"data.root={folder / 'data'}", f"output_dir={folder / 'runs'}",
            f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]
