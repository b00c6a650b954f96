"""One generated face: its nuisance draws, the shapes each attribute draws, the rendered image, the region
of every attribute and the landmarks.

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
colour, pixel noise) comes from a per-image RNG seeded by ``(seed, image index)``, drawn in a fixed number
and order whatever the labels: an image and its counterfactual twin share every draw.

A region box covers every pixel the attribute can change, for either value of the attribute (the beard area
for ``Male`` even on a beardless face), so flipping one attribute changes pixels inside its box only (before
JPEG compression). An image and its twin share their boxes and landmarks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from .synthetic_labels import IMAGE_STREAM

# Faces are drawn at an integer multiple of the output size with at least this short side, then
# box-reduced: exact supersampling antialiasing whose footprint is known, so region boxes are exact.
SUPERSAMPLED_MIN_SIDE = 256

RGB = tuple[int, int, int]
_LIGHT_SKIN = np.array([255.0, 224.0, 196.0])
_DARK_SKIN = np.array([105.0, 68.0, 45.0])
_HAIR_COLOURS = np.array(
    [[28, 24, 24], [62, 40, 28], [105, 70, 42], [128, 62, 34], [196, 164, 98], [150, 146, 142]],
    dtype=float,
)


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
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(IMAGE_STREAM, index)))


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
    """The (H, W, 3) uint8 image of face ``f`` with ``attributes`` (a bool per name in synthetic_labels.ATTRIBUTES); the
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
    """CelebA's 10 landmark coordinates (celeba_format.LANDMARK_COLUMNS order) in pixels of the written image."""
    nose_y, _, nose_ry = _nose_radii(f, attributes["Big_Nose"])
    points = [*_eye_centres(f), (f.cx, nose_y + nose_ry), *_mouth_corners(f, attributes["Smiling"])]
    width, height = f.size
    coords = []
    for x, y in points:
        coords.append(min(width - 1, max(0, round(x) // f.factor)))
        coords.append(min(height - 1, max(0, round(y) // f.factor)))
    return tuple(coords)

