"""The image pipeline every face dataset shares: decode → RGB → centred square crop → resize → uint8, and the
float tensor a model reads (from the file, or from the preprocessed cache of ``cache.py``)."""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..errors import UserError


class BadImageError(UserError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image)."""


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square whose side is the shorter image side.

    The offsets round like ``torchvision.transforms.functional.center_crop`` so that the two agree.
    """
    side = min(width, height)
    left = int(round((width - side) / 2.0))
    top = int(round((height - side) / 2.0))
    return left, top, left + side, top + side


PIPELINE = "RGB, centred square crop of the shorter side, PIL bilinear (antialiased) resize, uint8 HWC; v2"
"""What :func:`load_image` does; a cache built by another pipeline is stale (v2: 16-bit images scaled, not
clipped, and images with transparent pixels refused)."""

# Modes whose conversion to RGB Pillow does exactly, 8 bits per channel (1-bit, grey, palette, CMYK, YCbCr, the
# alpha modes once their alpha is known to be opaque); 16-bit grey is scaled here, every other mode is refused.
EIGHT_BIT = {"1", "L", "P", "RGB", "CMYK", "YCbCr"}
WITH_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_SKIP = "replace the file, or skip bad images with on_bad_image='skip'"


def _decode(path: str | os.PathLike) -> Image.Image:
    """The fully decoded image as 8-bit RGB (`_to_rgb`), or :class:`BadImageError` naming the file."""
    try:
        with Image.open(path) as image:
            image.load()  # the full decode, so a truncated file fails here and not later
    except FileNotFoundError as err:
        raise UserError(f"image file {path} does not exist; restore it or remove it from the list files") from err
    except Exception as err:  # noqa: BLE001 - any failure of the decoder is a bad file, not our bug
        raise BadImageError(f"cannot decode image {path} ({err}); {_SKIP}") from err
    return _to_rgb(image, path)


def _to_rgb(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """`image` as the 8-bit RGB it shows, or :class:`BadImageError` naming `path` when that is not known.

    Pillow's convert("RGB") clips a 16-bit grey image (values up to 65535) to 255: it trained as a white square.
    Here 16-bit grey is scaled to 8 bits (v·255/65535, rounded). Transparent pixels would show whatever colour
    the file stores under them, which no viewer shows: an image with any is refused (an opaque alpha channel is
    dropped). 32-bit integer and float images have no known range, and other modes no exact conversion: refused.
    """
    if image.mode in WITH_ALPHA or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        if alpha.min() < 255:
            raise BadImageError(f"image {path} has {int((alpha < 255).sum())} transparent pixel(s) (mode "
                                f"{image.mode}), whose colour is undefined; flatten it onto a background, or {_SKIP}")
        return image.convert("RGBA").convert("RGB")
    if image.mode in SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in EIGHT_BIT:
        return image.convert("RGB")
    raise BadImageError(f"image {path} has mode {image.mode} (pixels of no 8-bit RGB meaning this loader knows: "
                        f"32-bit integer or float, or another colour space); save it as 8-bit RGB, or {_SKIP}")


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

