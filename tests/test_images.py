"""Images are what they say: every mode Pillow opens from a face folder becomes the 8-bit RGB it shows, or is
refused naming its file (`data/images.py`). Each case is a hand-made 2×2 image with known pixels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distributed_asac.data.images import BadImageError, load_image


def _png16(path: Path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written byte by byte (Pillow writes no 16-bit colour PNG): `pixels` uint16 [H, W(, C)]."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _grey(values: list[list[int]]) -> np.ndarray:
    """The RGB image of grey `values`: uint8 [2, 2, 3]."""
    return np.repeat(np.array(values, dtype=np.uint8)[..., None], 3, axis=2)


def _palette(path: Path, transparent: int | None) -> None:
    image = Image.new("P", (2, 2))
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    image.putdata([0, 1, 1, 0])
    image.save(path, **({} if transparent is None else {"transparency": transparent}))


def _write(kind: str, path: Path) -> None:
    """The hand-made image of case `kind` at `path`."""
    if kind == "1-bit":
        image = Image.new("1", (2, 2))
        image.putdata([0, 1, 1, 0])
        image.save(path)
    elif kind == "L":
        Image.fromarray(np.array([[0, 64], [128, 255]], dtype=np.uint8), "L").save(path)
    elif kind.startswith("P"):
        _palette(path, {"P": None, "P, unused transparent entry": 2, "P, transparent pixel": 1}[kind])
    elif kind.split(",")[0] == "LA":
        Image.fromarray(np.array([[[0, 255], [64, 255]], [[128, 255], [255, 0 if "transparent" in kind else 255]]],
                                 dtype=np.uint8), "LA").save(path)
    elif kind.startswith("RGBA"):
        pixels = np.full((2, 2, 4), 255, dtype=np.uint8)
        pixels[..., :3] = [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]]
        if "transparent" in kind:
            pixels[1, 1, 3] = 128
        Image.fromarray(pixels, "RGBA").save(path)
    elif kind == "CMYK":
        cmyk = [(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0), (0, 255, 255, 0)]
        image = Image.new("CMYK", (2, 2))
        image.putdata(cmyk)
        image.save(path)
    elif kind in ("I;16", "I;16B"):  # 16-bit grey: PNG (little-endian in memory) and big-endian TIFF
        Image.fromarray(np.array([[0, 257], [32896, 65535]], dtype="<u2" if kind == "I;16" else ">u2")).save(path)
    elif kind == "16-bit RGB":
        _png16(path, np.array([[[65535, 0, 0], [0, 257 * 128, 0]], [[0, 0, 65535], [257 * 10, 257 * 20, 257 * 30]]],
                              dtype=np.uint16), color_type=2)
    elif kind == "I":
        Image.fromarray(np.array([[0, 1], [70000, -5]], dtype=np.int32), "I").save(path)
    elif kind == "F":
        Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.5]], dtype=np.float32), "F").save(path)
    elif kind == "LAB":
        Image.new("LAB", (2, 2), (50, 0, 0)).save(path)


RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
CONVERTED = {  # case → (file suffix, the 8-bit RGB it shows)
    "1-bit": (".png", _grey([[0, 255], [255, 0]])),
    "L": (".png", _grey([[0, 64], [128, 255]])),
    "P": (".png", np.array([[[10, 20, 30], [40, 50, 60]], [[40, 50, 60], [10, 20, 30]]], dtype=np.uint8)),
    "P, unused transparent entry": (".png", np.array([[[10, 20, 30], [40, 50, 60]], [[40, 50, 60], [10, 20, 30]]],
                                                     dtype=np.uint8)),
    "LA": (".png", _grey([[0, 64], [128, 255]])),
    "RGBA": (".png", RGB),
    "CMYK": (".tif", np.array([[[0, 255, 255], [0, 0, 0]], [[255, 255, 255], [255, 0, 0]]], dtype=np.uint8)),
    "I;16": (".png", _grey([[0, 1], [128, 255]])),  # scaled (v·255/65535), where Pillow clipped to 255
    "I;16B": (".tif", _grey([[0, 1], [128, 255]])),
    "16-bit RGB": (".png", np.array([[[255, 0, 0], [0, 128, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)),
}
REFUSED = {  # case → (file suffix, what the line says)
    "P, transparent pixel": (".png", r"has 2 transparent pixel\(s\) \(mode P\)"),
    "LA, transparent pixel": (".png", r"has 1 transparent pixel\(s\) \(mode LA\)"),
    "RGBA, transparent pixel": (".png", r"has 1 transparent pixel\(s\) \(mode RGBA\)"),
    "I": (".tif", r"has mode I \("),
    "F": (".tif", r"has mode F \("),
    "LAB": (".tif", r"has mode LAB \("),
}


@pytest.mark.parametrize("kind", CONVERTED)
def test_an_image_becomes_the_8_bit_rgb_it_shows(kind, tmp_path):
    suffix, expected = CONVERTED[kind]
    path = tmp_path / f"image{suffix}"
    _write(kind, path)
    with Image.open(path) as opened:
        assert kind.split(",")[0] in (opened.mode, "1-bit", "16-bit RGB")  # the mode the case is about
    assert np.array_equal(load_image(path, 2), expected)


@pytest.mark.parametrize("kind", REFUSED)
def test_an_image_without_a_known_8_bit_rgb_is_refused_naming_its_file(kind, tmp_path):
    suffix, message = REFUSED[kind]
    path = tmp_path / f"000001{suffix}"
    _write(kind, path)
    with pytest.raises(BadImageError, match=rf"^image {path} {message}.*on_bad_image='skip'$"):
        load_image(path, 2)


def test_any_decoder_failure_is_one_refusal_naming_the_file(tmp_path):
    """Seeded garbage behind a PNG signature: whatever Pillow raises is a BadImageError naming the file."""
    for seed in range(12):
        path = tmp_path / f"{seed}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(seed).bytes(256))
        with pytest.raises(BadImageError, match=rf"^cannot decode image {path} "):
            load_image(path, 2)
