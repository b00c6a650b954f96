"""Controlled-bias cartoon faces, written in CelebA's exact on-disk format.

Every attribute is drawn, so the label causes the pixels:

- ``Male``: a full dark beard along the jaw and chin (a large, high-contrast shape: the easy shortcut).
- ``Smiling``: a small open smile (a filled half-ellipse under the lip line) versus the lip line alone.
  The smile's depth is a per-image draw, uniform from nothing to full: the shallowest smiles look like
  a closed mouth, so the mouth alone does not settle every label. As in real faces, an ambiguous
  mouth leaves a biased model free to lean on the protected cue.
- ``Wavy_Hair``: a wavy hair outline and hairline versus smooth ones.
- ``Big_Nose``: a large versus a small nose.
- ``Eyeglasses``: round frames with a bridge and temples.

Nuisance variation (skin tone, hair colour, face position, scale and aspect, background gradient, shirt
colour, pixel noise) comes from a per-image RNG seeded by ``(seed, image index)``. The labels come from
a separate label plan, so an image, its landmarks and its twin depend only on (seed, index, labels,
size): the output is byte-identical whatever the worker count.

Bias: in train and valid, P(Smiling == Male) = ``bias`` with P(Male) = P(Smiling) = 0.5, realised
with exact cell counts, so the measured rate is ``bias`` to within 1/(2n).
The test split has four equal (Smiling, Male) cells, so a biased model shows its bias there. For
every test image a counterfactual twin is written: the same draws, only ``Male`` flipped; with
``train_twins`` (``--train-twins``) every train image gets its twin too (the oracle_counterfactual row).

Files (CelebA's formats, plus this project's additions)::

    DIR/img_align_celeba/000001.jpg ...           6-digit, 1-based names, JPEG quality 95
    DIR/list_attr_celeba.txt                       the drawn attributes, in CelebA's column order
    DIR/list_eval_partition.txt                    0/1/2 = train/valid/test (70/10/20)
    DIR/list_landmarks_align_celeba.txt            the 5 CelebA landmarks, pixels of the written image
    DIR/list_regions_celeba.txt                    a box per attribute: x1 y1 inclusive, x2 y2 exclusive
    DIR/counterfactual/img_align_celeba/<name>     the Male-flipped twin of each test (and train) image
    DIR/counterfactual/list_counterfactual.txt     image_id twin_file flipped_attribute
    DIR/dataset_info.json                          args, format version, measured per-split statistics

A region box covers every pixel the attribute can change, for either value of the attribute (the
beard area for ``Male`` even on a beardless face), so flipping one attribute changes pixels inside its
box only (before JPEG compression). An image and its twin share their boxes and landmarks.

Speed: 20,000 images at 64x64 (plus their 4,000 test twins) took 80 s wall with ``--workers 2`` on the
2-core development machine while other jobs shared it (76 CPU-seconds in all, so about 40 s on two free
cores; Python 3.11, Pillow 13). Reusing a finished dataset takes a fraction of a second.

Usage::

    python -m distributed_asac.data.synthetic --out data/synthetic --num-images 20000 --bias 0.9 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from distributed_asac.errors import UserError, exit_on_user_error
from distributed_asac.logs import setup_logging

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The drawn attributes, in CelebA's column order (a subset of its 40-name header).
ATTRIBUTES: tuple[str, ...] = ("Big_Nose", "Eyeglasses", "Male", "Smiling", "Wavy_Hair")
TARGET_ATTRIBUTE = "Smiling"
PROTECTED_ATTRIBUTE = "Male"
# Column order of list_regions_celeba.txt: the target and protected attributes first.
REGION_ATTRIBUTES: tuple[str, ...] = ("Smiling", "Male", "Big_Nose", "Eyeglasses", "Wavy_Hair")
LANDMARK_NAMES: tuple[str, ...] = (
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
)
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")
SPLIT_FRACTIONS: tuple[float, ...] = (0.7, 0.1, 0.2)
TRAIN_SPLIT, TEST_SPLIT = 0, 2

IMAGE_DIR = "img_align_celeba"
COUNTERFACTUAL_DIR = "counterfactual"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARK_FILE = "list_landmarks_align_celeba.txt"
REGION_FILE = "list_regions_celeba.txt"
COUNTERFACTUAL_INDEX = "list_counterfactual.txt"
INFO_FILE = "dataset_info.json"
# Written first and removed last: a folder holding it is an interrupted run of this generator.
IN_PROGRESS_FILE = "generation_in_progress.json"

# Each of the four (Smiling, Male) cells of the test split needs images for the fairness metrics.
MIN_IMAGES = 40
MAX_IMAGES = 999_999  # CelebA's 6-digit file names
MIN_SIDE, MAX_SIDE = 32, 1024
JPEG_QUALITY = 95
# Faces are drawn at an integer multiple of the output size with at least this short side, then
# box-reduced: exact supersampling antialiasing whose footprint is known, so region boxes are exact.
SUPERSAMPLED_MIN_SIDE = 256
IMAGES_PER_TASK = 64

# Spawn keys that keep the label plan's random stream apart from the per-image streams.
_PLAN_STREAM, _IMAGE_STREAM = 0, 1

RGB = tuple[int, int, int]
_LIGHT_SKIN = np.array([255.0, 224.0, 196.0])
_DARK_SKIN = np.array([105.0, 68.0, 45.0])
_HAIR_COLOURS = np.array(
    [[28, 24, 24], [62, 40, 28], [105, 70, 42], [128, 62, 34], [196, 164, 98], [150, 146, 142]],
    dtype=float,
)


# ---------------------------------------------------------------------------------------------
# Label plan and splits
# ---------------------------------------------------------------------------------------------


def split_counts(num_images: int) -> tuple[int, int, int]:
    """Train/valid/test sizes for ``num_images``: 70/10/20, test takes the rounding remainder."""
    train = round(SPLIT_FRACTIONS[0] * num_images)
    valid = round(SPLIT_FRACTIONS[1] * num_images)
    return train, valid, num_images - train - valid


def _cell_counts(n: int, p_agree: float) -> np.ndarray:
    """Sizes of the (Smiling, Male) cells (0,0), (0,1), (1,0), (1,1) for ``n`` images.

    round(p_agree·n) images agree (Smiling == Male), split evenly between the two agreeing cells, and
    the rest between the two disagreeing ones, so P(Male) and P(Smiling) are 0.5 to within one image.
    """
    agree = round(p_agree * n)
    disagree = n - agree
    return np.array([agree // 2, disagree // 2, disagree - disagree // 2, agree - agree // 2])


def plan_labels(num_images: int, bias: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split of every image and its labels.

    Returns ``(splits, labels)``: ``splits`` is (N,) int in {0, 1, 2}, contiguous blocks like CelebA's
    partition; ``labels`` is (N, len(ATTRIBUTES)) bool in ATTRIBUTES order. Train and valid have
    P(Smiling == Male) = ``bias``; test has 0.5 (four equal cells). The other attributes are
    independent fair coins.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLAN_STREAM,)))
    splits = np.repeat(np.arange(len(SPLIT_NAMES)), split_counts(num_images))
    labels = rng.random((num_images, len(ATTRIBUTES))) < 0.5
    smiling, male = ATTRIBUTES.index("Smiling"), ATTRIBUTES.index("Male")
    for split in range(len(SPLIT_NAMES)):
        rows = np.flatnonzero(splits == split)
        p_agree = 0.5 if split == TEST_SPLIT else bias
        cells = np.repeat(np.arange(4), _cell_counts(len(rows), p_agree))
        cells = rng.permutation(cells)
        labels[rows, smiling] = cells >= 2
        labels[rows, male] = cells % 2 == 1
    return splits, labels


def split_statistics(splits: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per-split counts and the measured (Smiling, Male) statistics of ``labels``."""
    smiling = labels[:, ATTRIBUTES.index("Smiling")]
    male = labels[:, ATTRIBUTES.index("Male")]
    stats: dict[str, dict[str, Any]] = {}
    for split, name in enumerate(SPLIT_NAMES):
        rows = splits == split
        s, m = smiling[rows], male[rows]
        stats[name] = {
            "split_id": split,
            "count": int(rows.sum()),
            "p_smiling_eq_male": float(np.mean(s == m)),
            "p_smiling": float(np.mean(s)),
            "p_male": float(np.mean(m)),
            "cells": {
                f"Smiling={2 * a - 1:d},Male={2 * b - 1:d}": int(np.sum((s == a) & (m == b)))
                for a in (0, 1)
                for b in (0, 1)
            },
        }
    return stats


# ---------------------------------------------------------------------------------------------
# One face: nuisance draws, shapes, rendering
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceDraws:
    """One face's random draws, in supersampled pixels; an image and its twin share them."""

    size: tuple[int, int]  # output (width, height)
    factor: int  # supersampling factor
    cx: float
    cy: float
    rx: float
    ry: float
    skin: RGB
    hair: RGB
    background: tuple[RGB, RGB]
    gradient_angle: float
    shirt: RGB
    lips: RGB
    frame: RGB
    iris: RGB
    wave_phase: float
    smile_depth: float  # fraction of the full smile depth drawn when Smiling (0: looks closed)
    noise: np.ndarray  # (H, W, 3) float32, added at output resolution


class Shape(NamedTuple):
    """One PIL primitive: ``kind`` is polygon, ellipse (filled, or an outline when width > 0) or line."""

    kind: str
    xy: tuple[float, ...]
    colour: RGB
    width: int = 0


def supersampling_factor(size: tuple[int, int]) -> int:
    """The integer factor that brings the short side of ``size`` to at least SUPERSAMPLED_MIN_SIDE."""
    return max(2, math.ceil(SUPERSAMPLED_MIN_SIDE / min(size)))


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The RNG of image ``index`` (0-based): independent of every other image and of the label plan."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_IMAGE_STREAM, index)))


def _rgb(values: Iterable[float]) -> RGB:
    r, g, b = (min(255, max(0, round(float(v)))) for v in values)
    return r, g, b


def _shade(colour: RGB, factor: float) -> RGB:
    return _rgb(np.asarray(colour, dtype=float) * factor)


def sample_face(rng: np.random.Generator, size: tuple[int, int]) -> FaceDraws:
    """Draw one face's nuisance parameters; the number and order of draws never depend on labels."""
    width, height = size
    factor = supersampling_factor(size)
    unit = min(width, height) * factor
    ry = 0.31 * unit * rng.uniform(0.88, 1.06)
    rx = ry * rng.uniform(0.76, 0.86)
    cx = width * factor / 2 + rng.uniform(-0.06, 0.06) * unit
    cy = height * factor / 2 + (0.03 + rng.uniform(-0.05, 0.05)) * unit
    skin = _rgb(_LIGHT_SKIN + rng.uniform() * (_DARK_SKIN - _LIGHT_SKIN))
    hair = _rgb(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.85, 1.15))
    background = (_rgb(rng.uniform(30, 230, 3)), _rgb(rng.uniform(30, 230, 3)))
    gradient_angle = rng.uniform(0.0, 2 * math.pi)
    shirt = _rgb(rng.uniform(20, 235, 3))
    lips = _rgb((rng.uniform(130, 190), rng.uniform(25, 60), rng.uniform(35, 70)))
    frame = _rgb(rng.uniform(10, 60, 3))
    iris = _rgb(rng.uniform(20, 110, 3))
    wave_phase = rng.uniform(0.0, 2 * math.pi)
    smile_depth = rng.uniform(0.0, 1.0)
    noise = rng.normal(0.0, rng.uniform(2.0, 6.0), (height, width, 3)).astype(np.float32)
    return FaceDraws(
        size, factor, cx, cy, rx, ry, skin, hair, background, gradient_angle, shirt, lips, frame, iris,
        wave_phase, smile_depth, noise,
    )


def _ellipse_points(
    cx: float, cy: float, rx: float, ry: float, start: float, stop: float, count: int,
    wave: float = 0.0, waves: float = 0.0, phase: float = 0.0,
) -> np.ndarray:
    """(count, 2) points on an ellipse from angle ``start`` to ``stop`` (radians, PIL's clockwise,
    y down), the radius optionally modulated by ``1 + wave·sin(waves·t + phase)`` for a wavy outline."""
    t = np.linspace(start, stop, count)
    r = 1.0 + wave * np.sin(waves * (t - start) + phase)
    return np.stack([cx + r * rx * np.cos(t), cy + r * ry * np.sin(t)], axis=1)


def _flat(points: np.ndarray) -> tuple[float, ...]:
    """(n, 2) points as the flat (x0, y0, x1, y1, ...) tuple that PIL takes."""
    return tuple(points.ravel().tolist())


def _eye_centres(f: FaceDraws) -> tuple[tuple[float, float], tuple[float, float]]:
    """Image-left then image-right eye centre (CelebA's lefteye is the one on the image's left)."""
    y = f.cy - 0.1 * f.ry
    return (f.cx - 0.36 * f.rx, y), (f.cx + 0.36 * f.rx, y)


def _stroke(f: FaceDraws, fraction: float) -> int:
    """A line width in supersampled pixels, at least about one output pixel wide."""
    return max(f.factor, round(fraction * f.ry))


def _body(f: FaceDraws) -> list[Shape]:
    """Shoulders and neck, drawn first (not an attribute)."""
    left, right = f.cx - 0.4 * f.rx, f.cx + 0.4 * f.rx
    return [
        Shape("ellipse", (f.cx - 1.7 * f.rx, f.cy + 0.95 * f.ry, f.cx + 1.7 * f.rx, f.cy + 3.3 * f.ry),
              f.shirt),
        Shape("polygon", (left, f.cy, right, f.cy, right, f.cy + 1.2 * f.ry, left, f.cy + 1.2 * f.ry),
              _shade(f.skin, 0.88)),
    ]


def _head(f: FaceDraws) -> list[Shape]:
    """The bare face, drawn over the hair cap."""
    return [Shape("ellipse", (f.cx - f.rx, f.cy - f.ry, f.cx + f.rx, f.cy + f.ry), f.skin)]


def _hair_back(f: FaceDraws, wavy: bool) -> list[Shape]:
    """The hair cap behind the head: visible above and beside the face; wavy hair has a wavy edge."""
    points = _ellipse_points(
        f.cx, f.cy - 0.08 * f.ry, 1.14 * f.rx, 1.08 * f.ry, math.radians(160), math.radians(380), 160,
        wave=0.06 if wavy else 0.0, waves=16.0, phase=f.wave_phase,
    )
    return [Shape("polygon", _flat(points), f.hair)]


def _fringe(f: FaceDraws, wavy: bool) -> list[Shape]:
    """Hair over the forehead down to the hairline; the hairline waves for wavy hair."""
    hairline = -0.55  # in units of ry below the face centre
    start = math.pi + math.asin(-hairline)
    stop = 2 * math.pi - math.asin(-hairline)
    top = _ellipse_points(f.cx, f.cy, 1.02 * f.rx, 1.02 * f.ry, start, stop, 60)
    left_x, right_x = top[0, 0], top[-1, 0]
    u = np.linspace(1.0, 0.0, 48)  # back along the hairline, right to left
    if wavy:
        drop = 0.07 * np.sin(2 * math.pi * 2.5 * u + f.wave_phase)
    else:
        drop = 0.04 * np.sin(math.pi * u)
    edge = np.stack([left_x + u * (right_x - left_x), f.cy + (hairline + drop) * f.ry], axis=1)
    return [Shape("polygon", _flat(np.concatenate([top, edge])), f.hair)]


def _beard(f: FaceDraws, strength: float = 1.0) -> list[Shape]:
    """A full beard: the crescent between the jaw and an inner ellipse that stays below the mouth. Its colour
    is the dark hair shade at `strength` 1 and fades toward the skin as strength falls (a faint shadow near 0):
    the shape and box stay, only the protected cue's contrast changes."""
    outer = _ellipse_points(f.cx, f.cy, 1.04 * f.rx, 1.04 * f.ry, math.radians(12), math.radians(168), 60)
    inner = _ellipse_points(f.cx, f.cy, 0.8 * f.rx, 0.7 * f.ry, math.radians(168), math.radians(12), 60)
    colour = _shade(f.hair, 0.7)
    if strength != 1.0:  # the default draws exactly the colour it always drew
        colour = _rgb(np.asarray(f.skin, dtype=float) + strength * (np.asarray(colour, dtype=float) - f.skin))
    return [Shape("polygon", _flat(np.concatenate([outer, inner])), colour)]


def _eyes(f: FaceDraws) -> list[Shape]:
    """Eye whites, irises and eyebrows (not an attribute)."""
    shapes = []
    brow = _shade(f.hair, 0.8)
    for side, (x, y) in zip((-1, 1), _eye_centres(f)):
        shapes.append(Shape("ellipse", (x - 0.15 * f.rx, y - 0.09 * f.ry, x + 0.15 * f.rx, y + 0.09 * f.ry),
                            (245, 245, 240)))
        iris = 0.075 * f.rx
        shapes.append(Shape("ellipse", (x - iris, y - iris, x + iris, y + iris), f.iris))
        inner, outer = x - side * 0.15 * f.rx, x + side * 0.16 * f.rx
        shapes.append(Shape("line", (inner, y - 0.26 * f.ry, outer, y - 0.29 * f.ry), brow, _stroke(f, 0.05)))
    return shapes


def _nose_radii(f: FaceDraws, big: bool) -> tuple[float, float, float]:
    """Centre y and radii of the nose ellipse."""
    return (f.cy + 0.16 * f.ry, (0.19 if big else 0.1) * f.rx, (0.15 if big else 0.085) * f.ry)


def _nose(f: FaceDraws, big: bool) -> list[Shape]:
    y, rx, ry = _nose_radii(f, big)
    return [Shape("ellipse", (f.cx - rx, y - ry, f.cx + rx, y + ry), _shade(f.skin, 0.78))]


def _mouth_geometry(f: FaceDraws) -> tuple[float, float, float]:
    """Mouth centre y, half-width and smile depth: modest, so Smiling is learnable but not the
    easiest cue."""
    return f.cy + 0.47 * f.ry, 0.24 * f.rx, 0.14 * f.ry


def _mouth_corners(f: FaceDraws, smiling: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """The ends of the lip line: the same for both labels, so only the smile's opening tells them apart."""
    y, half, _ = _mouth_geometry(f)
    return (f.cx - half, y), (f.cx + half, y)


def _mouth(f: FaceDraws, smiling: bool) -> list[Shape]:
    """The lip line, plus, when smiling, an open smile (the lower half of an ellipse, filled) whose depth
    is ``f.smile_depth`` of the full depth."""
    y, half, depth = _mouth_geometry(f)
    left, right = _mouth_corners(f, smiling)
    shapes = [Shape("line", (*left, *right), f.lips, _stroke(f, 0.06))]
    if smiling:
        points = _ellipse_points(f.cx, y, half, depth * f.smile_depth, 0.0, math.pi, 32)
        shapes.append(Shape("polygon", _flat(points), f.lips))
    return shapes


def _glasses(f: FaceDraws) -> list[Shape]:
    """Round frames around both eyes, a bridge, and temples out to the edge of the face."""
    radius = 0.25 * f.rx
    width = _stroke(f, 0.06)
    (lx, y), (rx, _) = _eye_centres(f)
    shapes = [
        Shape("ellipse", (x - radius, y - radius, x + radius, y + radius), f.frame, width) for x in (lx, rx)
    ]
    shapes.append(Shape("line", (lx + radius, y, rx - radius, y), f.frame, width))
    shapes.append(Shape("line", (lx - radius, y, f.cx - 0.99 * f.rx, y - 0.03 * f.ry), f.frame, width))
    shapes.append(Shape("line", (rx + radius, y, f.cx + 0.99 * f.rx, y - 0.03 * f.ry), f.frame, width))
    return shapes


def _paint(draw: ImageDraw.ImageDraw, shapes: Iterable[Shape]) -> None:
    for shape in shapes:
        if shape.kind == "polygon":
            draw.polygon(shape.xy, fill=shape.colour)
        elif shape.kind == "ellipse" and shape.width:
            draw.ellipse(shape.xy, outline=shape.colour, width=shape.width)
        elif shape.kind == "ellipse":
            draw.ellipse(shape.xy, fill=shape.colour)
        else:
            draw.line(shape.xy, fill=shape.colour, width=shape.width, joint="curve")


def _background(f: FaceDraws) -> Image.Image:
    """A linear gradient between two colours at a random angle, at supersampled resolution.

    Computed at output resolution and upsampled: it is smooth, and this is most of the cost otherwise.
    """
    width, height = f.size
    along = (np.arange(width, dtype=np.float32)[None, :] * math.cos(f.gradient_angle)
             + np.arange(height, dtype=np.float32)[:, None] * math.sin(f.gradient_angle))
    t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
    start, stop = (np.asarray(c, dtype=np.float32) for c in f.background)
    pixels = start + t[..., None] * (stop - start)
    small = Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
    return small.resize((width * f.factor, height * f.factor), Image.Resampling.BILINEAR)


def render(f: FaceDraws, attributes: Mapping[str, bool], beard_strength: float = 1.0) -> np.ndarray:
    """The (H, W, 3) uint8 image of face ``f`` with ``attributes`` (a bool per name in ATTRIBUTES); the
    beard (``Male``) drawn at ``beard_strength`` contrast (1: full, the default)."""
    canvas = _background(f)
    draw = ImageDraw.Draw(canvas)
    # Painter's order: the hair cap sits behind the head; everything else goes on top of the face.
    _paint(draw, _body(f))
    _paint(draw, _hair_back(f, attributes["Wavy_Hair"]))
    _paint(draw, _head(f))
    if attributes["Male"]:
        _paint(draw, _beard(f, beard_strength))
    _paint(draw, _fringe(f, attributes["Wavy_Hair"]))
    _paint(draw, _eyes(f))
    _paint(draw, _nose(f, attributes["Big_Nose"]))
    _paint(draw, _mouth(f, attributes["Smiling"]))
    if attributes["Eyeglasses"]:
        _paint(draw, _glasses(f))
    pixels = np.asarray(canvas.reduce(f.factor), dtype=np.float32) + f.noise
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _output_box(f: FaceDraws, shapes: Sequence[Shape]) -> tuple[int, int, int, int]:
    """The output-pixel box ``(x1, y1, x2, y2)`` (x2, y2 exclusive) holding every pixel of ``shapes``."""
    xs = [x for s in shapes for x in s.xy[0::2]]
    ys = [y for s in shapes for y in s.xy[1::2]]
    # Half a line width around lines, plus 2 px for PIL's rounding of vertices to pixels.
    pad = max(s.width for s in shapes) / 2 + 2
    width, height = f.size
    return (
        max(0, math.floor((min(xs) - pad) / f.factor)),
        max(0, math.floor((min(ys) - pad) / f.factor)),
        min(width, math.floor((max(xs) + pad) / f.factor) + 1),
        min(height, math.floor((max(ys) + pad) / f.factor) + 1),
    )


def region_boxes(f: FaceDraws) -> dict[str, tuple[int, int, int, int]]:
    """Per attribute, the output-pixel box of everything it can draw, for either of its values."""
    return {
        "Smiling": _output_box(f, _mouth(f, True) + _mouth(f, False)),
        "Male": _output_box(f, _beard(f)),
        "Big_Nose": _output_box(f, _nose(f, True) + _nose(f, False)),
        "Eyeglasses": _output_box(f, _glasses(f)),
        "Wavy_Hair": _output_box(
            f, _hair_back(f, True) + _hair_back(f, False) + _fringe(f, True) + _fringe(f, False)
        ),
    }


def landmarks(f: FaceDraws, attributes: Mapping[str, bool]) -> tuple[int, ...]:
    """CelebA's 10 landmark coordinates (LANDMARK_NAMES order) in pixels of the written image."""
    nose_y, _, nose_ry = _nose_radii(f, attributes["Big_Nose"])
    points = [*_eye_centres(f), (f.cx, nose_y + nose_ry), *_mouth_corners(f, attributes["Smiling"])]
    width, height = f.size
    coords = []
    for x, y in points:
        coords.append(min(width - 1, max(0, round(x) // f.factor)))
        coords.append(min(height - 1, max(0, round(y) // f.factor)))
    return tuple(coords)


# ---------------------------------------------------------------------------------------------
# Writing a dataset
# ---------------------------------------------------------------------------------------------


def image_name(index: int) -> str:
    """CelebA's file name of the 0-based image ``index``: ``000001.jpg`` for index 0."""
    return f"{index + 1:06d}.jpg"


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


def _render_task(task: _Task) -> list[_Result]:
    """Write the images (and twins) of one chunk; return (index, landmarks, region row) each."""
    out_dir = Path(task.out_dir)
    results = []
    for index, labels, with_twin in task.rows:
        face = sample_face(image_rng(task.seed, index), task.size)
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
    beard_strength: float = 1.0, twins: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render every image (and its twin where ``twins``, (N,) bool, says; default: the test split's) across
    ``workers`` processes; returns (N, 10) landmarks and (N, 20) boxes."""
    twins = splits == TEST_SPLIT if twins is None else twins
    num_images = len(splits)
    tasks = [
        _Task(str(out_dir), seed, size, [
            (i, tuple(bool(v) for v in labels[i]), bool(twins[i]))
            for i in range(start, min(start + IMAGES_PER_TASK, num_images))
        ], beard_strength)
        for start in range(0, num_images, IMAGES_PER_TASK)
    ]
    marks = np.zeros((num_images, len(LANDMARK_NAMES)), dtype=int)
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


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="ascii")


def _write_annotations(out_dir: Path, splits: np.ndarray, labels: np.ndarray,
                       marks: np.ndarray, boxes: np.ndarray, twins: np.ndarray) -> None:
    """The CelebA annotation files, the region file and the counterfactual index (of the images ``twins``,
    (N,) bool, marks)."""
    n = len(splits)
    names = [image_name(i) for i in range(n)]
    signed = np.where(labels, 1, -1)
    # CelebA: a trailing space after the attribute names, then each value as " %2d".
    _write_lines(out_dir / ATTR_FILE, [str(n), " ".join(ATTRIBUTES) + " "] + [
        name + "".join(f" {v:2d}" for v in row) for name, row in zip(names, signed)
    ])
    _write_lines(out_dir / PARTITION_FILE, [f"{name} {split}" for name, split in zip(names, splits)])
    # CelebA's aligned landmarks: the first value as " %2d", the others as "%5d".
    _write_lines(out_dir / LANDMARK_FILE, [str(n), " ".join(LANDMARK_NAMES)] + [
        f"{name} {row[0]:2d}" + "".join(f"{v:5d}" for v in row[1:]) for name, row in zip(names, marks)
    ])
    region_header = " ".join(f"{a}_{c}" for a in REGION_ATTRIBUTES for c in ("x1", "y1", "x2", "y2"))
    _write_lines(out_dir / REGION_FILE, [str(n), region_header] + [
        name + "".join(f"{v:5d}" for v in row) for name, row in zip(names, boxes)
    ])
    twin_names = [name for name, twin in zip(names, twins) if twin]
    _write_lines(out_dir / COUNTERFACTUAL_DIR / COUNTERFACTUAL_INDEX,
                 [str(len(twin_names)), "image_id twin_file flipped_attribute"]
                 + [f"{name} {IMAGE_DIR}/{name} {PROTECTED_ATTRIBUTE}" for name in twin_names])


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


def _check_args(num_images: int, bias: float, seed: int, size: tuple[int, int], workers: int,
                beard_strength: float = 1.0) -> None:
    if not (isinstance(num_images, numbers.Integral) and MIN_IMAGES <= num_images <= MAX_IMAGES):
        raise UserError(
            f"--num-images {num_images} is out of range: pass {MIN_IMAGES}..{MAX_IMAGES} (at least "
            f"{MIN_IMAGES} so every (Smiling, Male) cell of the test split has images)"
        )
    if not (isinstance(bias, (int, float)) and 0.0 <= bias <= 1.0):
        raise UserError(
            f"--bias {bias} is not a probability: pass P(Smiling == Male) in [0, 1] (0.5 = unbiased)"
        )
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise UserError(f"--seed {seed} is negative: pass a seed >= 0")
    if len(size) != 2 or not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
        raise UserError(f"--size {size} is out of range: each side must be {MIN_SIDE}..{MAX_SIDE} pixels")
    if workers < 1:
        raise UserError(f"--workers {workers} must be at least 1")
    if not (isinstance(beard_strength, (int, float)) and 0.0 < beard_strength <= 1.0):
        raise UserError(f"--beard-strength {beard_strength} is out of range: pass a contrast in (0, 1] (1 = full beard)")


def generate(
    out_dir: str | os.PathLike[str],
    num_images: int,
    bias: float,
    seed: int,
    size: tuple[int, int] = (64, 64),
    workers: int | None = None,
    beard_strength: float = 1.0,
    train_twins: bool = False,
) -> dict[str, Any]:
    """Generate (or reuse) a controlled-bias face dataset in ``out_dir``; return its info.

    ``bias`` is P(Smiling == Male) in train and valid; ``size`` is (width, height); ``workers``
    defaults to one per CPU and never changes the output. A folder already holding a dataset made
    with the same (num_images, bias, seed, size, beard_strength) is reused as it is. Returns the content of
    ``dataset_info.json``. ``beard_strength`` in (0, 1] is the contrast of the protected cue (the beard):
    1, the default, draws the full dark beard (datasets made before the knob existed are the same bytes);
    lower values fade it toward the skin, down to a faint shadow. ``train_twins`` also writes the Male-flipped twin
    of every train image (test images always get theirs).

    With ``workers > 1`` the pool uses the spawn start method, so a calling script needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    out_dir = Path(out_dir)
    size = (int(size[0]), int(size[1]))
    workers = default_workers() if workers is None else workers
    _check_args(num_images, bias, seed, size, workers, beard_strength)
    args = {"num_images": num_images, "bias": float(bias), "seed": seed, "size": list(size)}
    if beard_strength != 1.0:  # absent at the default, so earlier datasets' info still matches
        args["beard_strength"] = float(beard_strength)
    if train_twins:  # likewise absent at the default
        args["train_twins"] = True
    existing = _existing_dataset(out_dir, args)
    if existing is not None:
        log.info("reusing the synthetic dataset in %s (generated earlier with the same arguments)", out_dir)
        return existing

    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / COUNTERFACTUAL_DIR / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / IN_PROGRESS_FILE, {"format_version": FORMAT_VERSION, "args": args})
    splits, labels = plan_labels(num_images, bias, seed)
    twins = (splits == TEST_SPLIT) | ((splits == TRAIN_SPLIT) & bool(train_twins))  # (N,) bool: images given a twin
    marks, boxes = _render_all(out_dir, seed, size, splits, labels, workers, beard_strength, twins)
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
            "index": f"{COUNTERFACTUAL_DIR}/{COUNTERFACTUAL_INDEX}",
        },
        "regions": f"{REGION_FILE}: per attribute x1 y1 x2 y2 in pixels of the written image, "
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
    parser.add_argument("--train-twins", action="store_true",
                        help="also write the Male-flipped twin of every train image (test images always get theirs)")
    with exit_on_user_error():
        args = parser.parse_args(argv)
        setup_logging()
        info = generate(args.out, args.num_images, args.bias, args.seed, parse_size(args.size), args.workers,
                        args.beard_strength, args.train_twins)
        rates = ", ".join(f"{name} {info['splits'][name]['p_smiling_eq_male']:.3f}" for name in SPLIT_NAMES)
        print(f"{args.out}: {args.num_images} images; P(Smiling == Male): {rates}")


if __name__ == "__main__":
    main()
