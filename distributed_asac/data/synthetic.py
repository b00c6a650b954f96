"""The generator of controlled-bias cartoon faces, written in CelebA's exact on-disk format: it plans the labels
(``synthetic_labels``), renders each face and its counterfactual twin across worker processes
(``synthetic_render``), writes the images and CelebA's list files (``celeba_format``), and reuses a finished
dataset made with the same arguments.
Test images always get a Male-flipped twin; with ``train_twins`` (``--train-twins``) train images do too (the
oracle_counterfactual row).

Files (CelebA's formats, plus this project's additions)::

    DIR/img_align_celeba/000001.jpg ...           6-digit, 1-based names, JPEG quality 95
    DIR/list_attr_celeba.txt                       the drawn attributes, in CelebA's column order
    DIR/list_eval_partition.txt                    0/1/2 = train/valid/test (70/10/20)
    DIR/list_landmarks_align_celeba.txt            the 5 CelebA landmarks, pixels of the written image
    DIR/list_regions_celeba.txt                    a box per attribute: x1 y1 inclusive, x2 y2 exclusive
    DIR/counterfactual/img_align_celeba/<name>     the Male-flipped twin of each test (and train) image
    DIR/counterfactual/list_counterfactual.txt     image_id twin_file flipped_attribute
    DIR/dataset_info.json                          args, format version, measured per-split statistics

For every test image a counterfactual twin is written: the same draws, only ``Male`` flipped. The output is
byte-identical whatever the worker count; reusing a finished dataset takes a fraction of a second.

Usage::

    python -m distributed_asac.data.synthetic --out data/synthetic --num-images 20000 --bias 0.9 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from distributed_asac.errors import UserError, exit_on_user_error
from distributed_asac.files import atomic_write
from distributed_asac.locks import flocked
from distributed_asac.logs import setup_logging

from .celeba_format import (ATTRIBUTE_FILE, COUNTERFACTUAL_DIR, COUNTERFACTUAL_FILE, IMAGE_DIR, LANDMARK_COLUMNS,
                            LANDMARKS_FILE, PARTITION_FILE, REGIONS_FILE, image_name, write_attribute_file,
                            write_counterfactual_file, write_landmarks_file, write_partition_file, write_regions_file)
from .splits import SPLITS
from .synthetic_labels import (ATTRIBUTES, PROTECTED_ATTRIBUTE, TARGET_ATTRIBUTE, TEST_SPLIT, TRAIN_SPLIT,
                               plan_labels, split_statistics)
from .synthetic_render import image_rng, landmarks, region_boxes, render, sample_face

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Column order of list_regions_celeba.txt: the target and protected attributes first.
REGION_ATTRIBUTES: tuple[str, ...] = ("Smiling", "Male", "Big_Nose", "Eyeglasses", "Wavy_Hair")
INFO_FILE = "dataset_info.json"
# Written first and removed last: a folder holding it is an interrupted run of this generator.
IN_PROGRESS_FILE = "generation_in_progress.json"
# Held while a process generates, beside the folder (whose files stay CelebA's exactly): a second run of the same
# new data.root waits for the first and reuses its work.
LOCK_SUFFIX = ".generate.lock"

# Each of the four (Smiling, Male) cells of the test split needs images for the fairness metrics.
MIN_IMAGES = 40
MAX_IMAGES = 999_999  # CelebA's 6-digit file names
MIN_SIDE, MAX_SIDE = 32, 1024
JPEG_QUALITY = 95
IMAGES_PER_TASK = 64


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    # Fixed quality and 4:4:4 chroma (the cues are one or two pixels wide); PIL writes no timestamps.
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


# What a worker returns per image: (index, landmark row, region row).
_Result = tuple[int, tuple[int, ...], tuple[int, ...]]


class _Task(NamedTuple):
    """A chunk of images for one worker call: (index, labels in ATTRIBUTES order, with_twin) rows."""

    out_dir: str
    seed: int
    size: tuple[int, int]
    rows: list[tuple[int, tuple[bool, ...], bool]]
    beard_strength: float = 1.0
    smile_floor: float = 0.0


def _render_task(task: _Task) -> list[_Result]:
    """Write the images (and twins) of one chunk; return (index, landmarks, region row) each."""
    out_dir = Path(task.out_dir)
    results = []
    for index, labels, with_twin in task.rows:
        face = sample_face(image_rng(task.seed, index), task.size)
        # The target cue's strength: depths U(0, 1) become U(floor, 1); exactly the same floats at floor 0.
        face = dataclasses.replace(face, smile_depth=task.smile_floor + (1.0 - task.smile_floor) * face.smile_depth)
        attributes = dict(zip(ATTRIBUTES, labels))
        name = image_name(index)
        _save_jpeg(render(face, attributes, task.beard_strength), out_dir / IMAGE_DIR / name)
        if with_twin:
            twin = {**attributes, PROTECTED_ATTRIBUTE: not attributes[PROTECTED_ATTRIBUTE]}
            _save_jpeg(render(face, twin, task.beard_strength), out_dir / COUNTERFACTUAL_DIR / IMAGE_DIR / name)
        boxes = region_boxes(face)
        region_row = tuple(v for attribute in REGION_ATTRIBUTES for v in boxes[attribute])
        results.append((index, landmarks(face, attributes), region_row))
    return results


def _render_all(
    out_dir: Path, seed: int, size: tuple[int, int], splits: np.ndarray, labels: np.ndarray, workers: int,
    beard_strength: float = 1.0, twins: np.ndarray | None = None, smile_floor: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render every image (and its twin where ``twins``, (N,) bool, says; default: the test split's) across
    ``workers`` processes; returns (N, 10) landmarks and (N, 20) boxes."""
    twins = splits == TEST_SPLIT if twins is None else twins
    num_images = len(splits)
    tasks = [
        _Task(str(out_dir), seed, size, [
            (i, tuple(bool(v) for v in labels[i]), bool(twins[i]))
            for i in range(start, min(start + IMAGES_PER_TASK, num_images))
        ], beard_strength, smile_floor)
        for start in range(0, num_images, IMAGES_PER_TASK)
    ]
    marks = np.zeros((num_images, len(LANDMARK_COLUMNS)), dtype=int)
    boxes = np.zeros((num_images, 4 * len(REGION_ATTRIBUTES)), dtype=int)
    with tqdm(total=num_images, desc="synthetic faces", unit="img", disable=None) as progress:
        workers = min(workers, len(tasks))
        if workers == 1:
            _collect(map(_render_task, tasks), marks, boxes, progress)
        else:
            # spawn, not fork: the caller may hold CUDA or thread pools (torch) that fork would copy.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                _collect(pool.imap_unordered(_render_task, tasks), marks, boxes, progress)
    return marks, boxes


def _collect(chunks: Iterable[list[_Result]], marks: np.ndarray, boxes: np.ndarray, progress: tqdm) -> None:
    """Store each chunk's landmark and region rows at their image index, in whatever order they come."""
    for chunk in chunks:
        for index, mark_row, box_row in chunk:
            marks[index] = mark_row
            boxes[index] = box_row
        progress.update(len(chunk))


def _write_annotations(out_dir: Path, splits: np.ndarray, labels: np.ndarray,
                       marks: np.ndarray, boxes: np.ndarray, twins: np.ndarray) -> None:
    """The CelebA annotation files, the region file and the counterfactual index (of the images ``twins``,
    (N,) bool, marks)."""
    names = [image_name(i) for i in range(len(splits))]
    write_attribute_file(out_dir / ATTRIBUTE_FILE, names, ATTRIBUTES, labels)
    write_partition_file(out_dir / PARTITION_FILE, names, splits)
    write_landmarks_file(out_dir / LANDMARKS_FILE, names, marks)
    write_regions_file(out_dir / REGIONS_FILE, names, REGION_ATTRIBUTES, boxes)
    twin_names = [name for name, twin in zip(names, twins) if twin]
    write_counterfactual_file(out_dir / COUNTERFACTUAL_DIR / COUNTERFACTUAL_FILE, twin_names, PROTECTED_ATTRIBUTE)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}): delete {path.parent} and rerun") from err


def _describe(stamp: Mapping[str, Any]) -> str:
    """``num_images=200 bias=0.9 seed=3 size=[64, 64] format_version=1`` for error messages."""
    args = stamp.get("args") if isinstance(stamp.get("args"), Mapping) else {}
    fields = [f"{key}={args.get(key)}" for key in ("num_images", "bias", "seed", "size")]
    fields.append(f"train_twins={args.get('train_twins', False)}")  # absent from the info at its default
    fields.append(f"beard_strength={args.get('beard_strength', 1.0)}")  # absent from the info at its default
    fields.append(f"smile_floor={args.get('smile_floor', 0.0)}")  # likewise
    return " ".join(fields + [f"format_version={stamp.get('format_version')}"])


def _existing_dataset(out_dir: Path, args: Mapping[str, Any]) -> dict[str, Any] | None:
    """The info of a finished dataset made with ``args`` in ``out_dir``; None when generation must run.

    Raises UserError when ``out_dir`` holds anything else (a dataset made with other arguments,
    unrelated files, or a file in place of the folder).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder: pass a new or empty folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    stamp = {"format_version": FORMAT_VERSION, "args": dict(args)}
    if (out_dir / INFO_FILE).is_file():
        info = _read_json(out_dir / INFO_FILE)
        if {k: info.get(k) for k in stamp} == stamp:
            return info
        raise UserError(
            f"{out_dir} holds a synthetic dataset made with {_describe(info)}, not {_describe(stamp)}: "
            f"pass another --out, or delete {out_dir} to regenerate"
        )
    if (out_dir / IN_PROGRESS_FILE).is_file() and _read_json(out_dir / IN_PROGRESS_FILE) == stamp:
        return None  # an interrupted run with the same arguments: regenerating overwrites it exactly
    raise UserError(
        f"{out_dir} is not empty and holds no finished synthetic dataset (no {INFO_FILE}): "
        f"pass a new or empty --out, or delete {out_dir}"
    )


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS or Windows
        return os.cpu_count() or 1


def parse_size(text: str) -> tuple[int, int]:
    """``"64"`` → (64, 64); ``"178x218"`` → (178, 218) as (width, height)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise UserError(f"--size {text!r} is not a size: pass one side like 64, or WIDTHxHEIGHT like 178x218")
    width, height = values if len(values) == 2 else values * 2
    return width, height


def _flag(argument: str, value: Any) -> str:
    """An argument as the CLI user gave it: ``--num-images 10``."""
    return f"--{argument.replace('_', '-')} {value}"


def check_arguments(num_images: int, bias: float, seed: int, size: tuple[int, int], beard_strength: float = 1.0,
                    train_twins: bool = False, smile_floor: float = 0.0,
                    spell: Callable[[str, Any], str] = _flag) -> None:
    """Refuse arguments the generator cannot honour. ``spell(argument, value)`` words an argument as the user gave
    it: a CLI flag here, a config key when ``config.validate`` checks a config's ``data.synthetic_*`` with this.
    ``train_twins`` is a switch: every value is honoured."""
    if not (isinstance(num_images, numbers.Integral) and MIN_IMAGES <= num_images <= MAX_IMAGES):
        raise UserError(
            f"{spell('num_images', num_images)} is out of range: pass {MIN_IMAGES}..{MAX_IMAGES} (at least "
            f"{MIN_IMAGES} so every (Smiling, Male) cell of the test split has images)"
        )
    if not (isinstance(bias, (int, float)) and 0.0 <= bias <= 1.0):
        raise UserError(
            f"{spell('bias', bias)} is not a probability: pass P(Smiling == Male) in [0, 1] (0.5 = unbiased)"
        )
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise UserError(f"{spell('seed', seed)} is negative: pass a seed >= 0")
    if len(size) != 2 or not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
        raise UserError(f"{spell('size', size)} is out of range: each side must be {MIN_SIDE}..{MAX_SIDE} pixels")
    if not (isinstance(beard_strength, (int, float)) and 0.0 < beard_strength <= 1.0):
        raise UserError(f"{spell('beard_strength', beard_strength)} is out of range: pass a contrast in (0, 1] "
                        "(1 = full beard)")
    if not (isinstance(smile_floor, (int, float)) and 0.0 <= smile_floor < 1.0):
        raise UserError(f"{spell('smile_floor', smile_floor)} is out of range: pass the shallowest smile's share of "
                        "the full depth in [0, 1) (0 = from a closed-looking mouth)")


def generate(
    out_dir: str | os.PathLike[str],
    num_images: int,
    bias: float,
    seed: int,
    size: tuple[int, int] = (64, 64),
    workers: int | None = None,
    beard_strength: float = 1.0,
    train_twins: bool = False,
    smile_floor: float = 0.0,
) -> dict[str, Any]:
    """Generate (or reuse) a controlled-bias face dataset in ``out_dir``; return its info.

    ``bias`` is P(Smiling == Male) in train and valid; ``size`` is (width, height); ``workers``
    defaults to one per CPU and never changes the output. A folder already holding a dataset made
    with the same (num_images, bias, seed, size, beard_strength) is reused as it is. Returns the content of
    ``dataset_info.json``. ``beard_strength`` in (0, 1] is the contrast of the protected cue (the beard):
    1, the default, draws the full dark beard (datasets made before the knob existed are the same bytes);
    lower values fade it toward the skin, down to a faint shadow. ``train_twins`` also writes the Male-flipped twin
    of every train image (test images always get theirs). ``smile_floor`` in [0, 1) is the target cue's strength:
    a smile's depth is drawn from U(smile_floor, 1) of the full depth instead of U(0, 1), so that fewer smiles look
    closed; 0, the default, keeps earlier datasets the same bytes.

    With ``workers > 1`` the pool uses the spawn start method, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    out_dir = Path(out_dir)
    size = (int(size[0]), int(size[1]))
    workers = default_workers() if workers is None else workers
    check_arguments(num_images, bias, seed, size, beard_strength, smile_floor=smile_floor)
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1")
    args = {"num_images": num_images, "bias": float(bias), "seed": seed, "size": list(size)}
    if beard_strength != 1.0:  # absent at the default, so earlier datasets' info still matches
        args["beard_strength"] = float(beard_strength)
    if train_twins:  # likewise absent at the default
        args["train_twins"] = True
    if smile_floor != 0.0:  # likewise
        args["smile_floor"] = float(smile_floor)
    existing = _existing_dataset(out_dir, args)
    if existing is None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with flocked(lock_path(out_dir), f"waiting for another process to finish generating {out_dir}"):
            existing = _existing_dataset(out_dir, args)  # that process's, if one generated it while this one waited
            if existing is None:
                return _write_dataset(out_dir, args, size, workers, beard_strength, train_twins, smile_floor)
    log.info("reusing the synthetic dataset in %s (generated earlier with the same arguments)", out_dir)
    return existing


def lock_path(out_dir: Path) -> Path:
    """The lock a process holds while it generates `out_dir`: `<parent>/.<name>.generate.lock`."""
    folder = out_dir.resolve()  # `--out .` has no name of its own
    return folder.with_name(f".{folder.name}{LOCK_SUFFIX}")


def _write_dataset(out_dir: Path, args: dict[str, Any], size: tuple[int, int], workers: int, beard_strength: float,
                   train_twins: bool, smile_floor: float) -> dict[str, Any]:
    """Generate the dataset of `args` in `out_dir` (under its lock, `generate`); return its info."""
    num_images, bias, seed = args["num_images"], args["bias"], args["seed"]
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / COUNTERFACTUAL_DIR / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / IN_PROGRESS_FILE, {"format_version": FORMAT_VERSION, "args": args})
    splits, labels = plan_labels(num_images, bias, seed)
    twins = (splits == TEST_SPLIT) | ((splits == TRAIN_SPLIT) & bool(train_twins))  # (N,) bool: images given a twin
    marks, boxes = _render_all(out_dir, seed, size, splits, labels, workers, beard_strength, twins, smile_floor)
    _write_annotations(out_dir, splits, labels, marks, boxes, twins)
    info = {
        "format_version": FORMAT_VERSION,
        "generator": "distributed_asac.data.synthetic",
        "args": args,
        "attributes": list(ATTRIBUTES),
        "target_attribute": TARGET_ATTRIBUTE,
        "protected_attribute": PROTECTED_ATTRIBUTE,
        "splits": split_statistics(splits, labels),
        "counterfactual": {
            "count": int(np.sum(twins)),
            "flipped_attribute": PROTECTED_ATTRIBUTE,
            "index": f"{COUNTERFACTUAL_DIR}/{COUNTERFACTUAL_FILE}",
        },
        "regions": f"{REGIONS_FILE}: per attribute x1 y1 x2 y2 in pixels of the written image, "
                   "x1 y1 inclusive, x2 y2 exclusive; the box covers both values of the attribute",
    }
    # dataset_info.json last: its presence marks a finished dataset.
    _write_json(out_dir / INFO_FILE, info)
    (out_dir / IN_PROGRESS_FILE).unlink()
    log.info("wrote %d synthetic faces to %s", num_images, out_dir)
    return info


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, so bad arguments give one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: parse the arguments and call :func:`generate`."""
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder: new, empty, or holding a dataset made with the same arguments")
    parser.add_argument("--num-images", required=True, type=int, help=f"number of images (>= {MIN_IMAGES})")
    parser.add_argument("--bias", required=True, type=float,
                        help="P(Smiling == Male) in train and valid; 0.5 = no correlation")
    parser.add_argument("--seed", required=True, type=int, help="random seed (>= 0)")
    parser.add_argument("--size", default="64", help="64 (square) or WIDTHxHEIGHT like 178x218 (default 64)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes; the output does not depend on it (default: one per CPU)")
    parser.add_argument("--beard-strength", type=float, default=1.0,
                        help="contrast of the protected cue (Male's beard) in (0, 1]; 1 = full dark beard (default)")
    parser.add_argument("--smile-floor", type=float, default=0.0,
                        help="the target cue's strength: the shallowest smile as a share of the full depth, in [0, 1) "
                             "(default 0: from a closed-looking mouth)")
    parser.add_argument("--train-twins", action="store_true",
                        help="also write the Male-flipped twin of every train image (test images always get theirs)")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        setup_logging()
        info = generate(args.out, args.num_images, args.bias, args.seed, parse_size(args.size), args.workers,
                        args.beard_strength, args.train_twins, args.smile_floor)
        rates = ", ".join(f"{name} {info['splits'][name]['p_smiling_eq_male']:.3f}" for name in SPLITS)
        print(f"{args.out}: {args.num_images} images; P(Smiling == Male): {rates}")


if __name__ == "__main__":
    main()

