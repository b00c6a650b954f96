"""Preprocessed image cache: same tensors as the direct loader, staleness, concurrent builders, bad images."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_asac.data import cache as cache_module
from distributed_asac.data.cache import find_bad_images, open_image_cache
from distributed_asac.data.celeba import CelebA
from distributed_asac.data.images import PIPELINE, BadImageError, check_image, load_image
from distributed_asac.data.lfw import LFW
from distributed_asac.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def images_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/images-*"))


def assert_same_items(a, b) -> None:
    assert len(a) == len(b) and a.image_ids == b.image_ids
    for k in range(len(a)):
        image_a, *labels_a = a[k]
        image_b, *labels_b = b[k]
        assert torch.equal(image_a, image_b) and labels_a == labels_b


@pytest.mark.parametrize("counterfactual", [False, True])
def test_cached_celeba_equals_direct(tmp_path, counterfactual, write_celeba_fixture, write_counterfactual_fixture):
    fixture = write_celeba_fixture(tmp_path / "data", n=12)
    write_counterfactual_fixture(fixture)
    split = "test" if counterfactual else "train"
    direct = CelebA(fixture.root, split, "Smiling", "Male", image_size=32, counterfactual=counterfactual)
    cached = CelebA(
        fixture.root, split, "Smiling", "Male", image_size=32, counterfactual=counterfactual, cache_dir=tmp_path / "cache"
    )
    assert_same_items(direct, cached)
    assert len(images_files(tmp_path / "cache")) == 1


def test_cached_lfw_equals_direct(tmp_path, write_lfw_fixture):
    fixture = write_lfw_fixture(tmp_path / "lfw")
    split_file = tmp_path / "split.json"
    direct = LFW(fixture.root, "train", "Smiling", "Male", image_size=24, split_file=split_file)
    cached = LFW(fixture.root, "train", "Smiling", "Male", image_size=24, split_file=split_file, cache_dir=tmp_path / "c")
    assert_same_items(direct, cached)


def test_valid_cache_is_reused_and_read_through_a_memmap(tmp_path, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path / "data", n=9)
    first = CelebA(fixture.root, "valid", "Smiling", "Male", cache_dir=tmp_path / "cache")
    built = images_files(tmp_path / "cache")
    stamp = built[0].stat().st_mtime_ns
    second = CelebA(fixture.root, "valid", "Smiling", "Male", cache_dir=tmp_path / "cache")
    assert images_files(tmp_path / "cache") == built and built[0].stat().st_mtime_ns == stamp
    # Other sizes and splits get caches of their own.
    CelebA(fixture.root, "valid", "Smiling", "Male", image_size=16, cache_dir=tmp_path / "cache")
    CelebA(fixture.root, "test", "Smiling", "Male", cache_dir=tmp_path / "cache")
    assert len(images_files(tmp_path / "cache")) == 3
    # What DataLoader workers receive holds no pixels: they reopen the memmap.
    payload = pickle.dumps(second)
    assert len(payload) < built[0].stat().st_size
    clone = pickle.loads(payload)
    assert torch.equal(clone[1][0], first[1][0])
    assert isinstance(np.load(built[0], mmap_mode="r"), np.memmap)


@pytest.mark.parametrize("cut", [1, 64])
def test_a_short_images_file_is_rebuilt(tmp_path, caplog, cut, write_celeba_fixture):
    """The size check counts the .npy header: a file `cut` bytes short is stale, not a traceback later."""
    fixture = write_celeba_fixture(tmp_path / "data", n=9)
    CelebA(fixture.root, "valid", "Smiling", "Male", cache_dir=tmp_path / "cache")
    (images,) = images_files(tmp_path / "cache")
    whole = images.read_bytes()
    images.write_bytes(whole[:-cut])
    with caplog.at_level(logging.WARNING):
        again = CelebA(fixture.root, "valid", "Smiling", "Male", cache_dir=tmp_path / "cache")
    assert "missing or incomplete" in caplog.text
    (rebuilt,) = images_files(tmp_path / "cache")  # a new file (name) replaces the short one
    assert rebuilt.read_bytes() == whole
    assert_same_items(CelebA(fixture.root, "valid", "Smiling", "Male"), again)


def test_a_flipped_byte_in_the_pixels_is_found_by_the_checksum(tmp_path, caplog, monkeypatch, write_celeba_fixture):
    """Same size, same sources: only the recorded checksums tell. The cache is refused or rebuilt, never read."""
    monkeypatch.setattr(cache_module, "CHUNK", 4)  # several checksummed blocks from a few images
    fixture = write_celeba_fixture(tmp_path / "data", n=12)
    direct = CelebA(fixture.root, "train", "Smiling", "Male")
    arguments = dict(split="train", target="Smiling", protected="Male", cache_dir=tmp_path / "cache")
    CelebA(fixture.root, **arguments)
    (images,) = images_files(tmp_path / "cache")
    whole = bytearray(images.read_bytes())
    row_bytes = 64 * 64 * 3
    flipped = len(whole) - 2 * row_bytes + 100  # a pixel of the next-to-last row
    whole[flipped] ^= 0x01
    images.write_bytes(bytes(whole))
    rows = len(direct)
    first = (rows - 2) // 4 * 4  # the block of 4 rows that holds row rows - 2
    message = rf"rows {first}-{min(first + 4, rows) - 1} \(first file: .*\) do not match the checksum recorded"
    files = [os.path.basename(direct.image_path(k)) for k in range(rows)]  # the cache's rows, in order
    with pytest.raises(UserError, match="is stale: the pixels of " + message):
        open_image_cache(tmp_path / "cache", "celeba-train", fixture.dataset_dir / "img_align_celeba", files,
                         partial(load_image, image_size=64), image_size=64, pipeline=PIPELINE, on_stale="error",
                         progress=False)
    with caplog.at_level(logging.WARNING):
        rebuilt = CelebA(fixture.root, **arguments)
    assert "do not match the checksum" in caplog.text
    assert_same_items(direct, rebuilt)


def test_changed_source_file_is_detected(tmp_path, caplog, draw_face, save_jpeg, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path / "data", n=9)
    ds = CelebA(fixture.root, "train", "Smiling", "Male", cache_dir=tmp_path / "cache")
    image_id = ds.image_ids[1]
    new_colour = (250, 250, 20)
    save_jpeg(draw_face(fixture.size, new_colour), fixture.image_path(image_id))
    stat = fixture.image_path(image_id).stat()
    os.utime(fixture.image_path(image_id), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    cache_dir = tmp_path / "cache"
    files = [fixture.dataset_dir / "img_align_celeba" / i for i in ds.image_ids]
    with pytest.raises(UserError, match=rf"is stale: 1 source files changed .*first: {image_id}"):
        open_image_cache(
            cache_dir, "celeba-train", files[0].parent, [f.name for f in files], partial(load_image, image_size=64),
            image_size=64, pipeline=PIPELINE, on_stale="error", progress=False,
        )
    with caplog.at_level(logging.WARNING):
        rebuilt = CelebA(fixture.root, "train", "Smiling", "Male", cache_dir=cache_dir)
    assert "is stale (1 source files changed" in caplog.text
    colour = torch.tensor(new_colour, dtype=torch.float32).view(3, 1, 1) / 255
    assert (rebuilt[1][0] - colour).abs().max() <= 8 / 255
    assert len(images_files(cache_dir)) == 1  # the old build was removed


def test_a_different_pipeline_file_list_or_mtime_is_stale(tmp_path, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path / "data", n=6)
    source = fixture.dataset_dir / "img_align_celeba"
    files = sorted(os.listdir(source))
    arguments = dict(image_size=8, progress=False, on_stale="error")
    open_image_cache(tmp_path / "c", "x", source, files, partial(load_image, image_size=8), pipeline="v1", **arguments)
    stat = (source / files[3]).stat()
    os.utime(source / files[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same bytes, new mtime
    with pytest.raises(UserError, match=f"1 source files changed .*first: {files[3]}"):
        open_image_cache(tmp_path / "c", "x", source, files, partial(load_image, image_size=8), pipeline="v1", **arguments)
    os.utime(source / files[3], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match="its pipeline is 'v1', not 'v2'"):
        open_image_cache(tmp_path / "c", "x", source, files, partial(load_image, image_size=8), pipeline="v2", **arguments)
    with pytest.raises(UserError, match=r"the file list changed \(6 cached, 5 now\)"):
        open_image_cache(tmp_path / "c", "x", source, files[1:], partial(load_image, image_size=8), pipeline="v1", **arguments)


CHILD = """
import logging, sys, time
from PIL import Image
import numpy as np
from distributed_asac.data.cache import open_image_cache

def slow_loader(path):
    time.sleep(0.1)  # keeps the first builder busy while the second one arrives
    with Image.open(path) as image:
        return np.array(image.convert("RGB").resize((8, 8)))

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
source, cache_dir = sys.argv[1], sys.argv[2]
files = sorted(__import__("os").listdir(source))
opened = open_image_cache(cache_dir, "race", source, files, slow_loader, image_size=8, pipeline="p", workers=1, progress=False)
print(opened.path.name)
"""


def test_two_processes_building_at_once_end_with_one_cache(tmp_path, draw_face, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path / "data", n=12, size=(20, 20), torchvision_extras=False)
    source = fixture.dataset_dir / "img_align_celeba"
    command = [sys.executable, "-c", CHILD, str(source), str(tmp_path / "cache")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [child.communicate(timeout=600) for child in children]  # bounds a hang only
    assert [child.returncode for child in children] == [0, 0], [err for _, err in results]
    assert results[0][0] == results[1][0]  # both opened the same build
    assert sum("built image cache" in err for _, err in results) == 1
    assert [path.name for path in images_files(tmp_path / "cache")] == [results[0][0].strip()]
    expected = np.stack([np.array(draw_face((20, 20), c).resize((8, 8))) for c in fixture.colours])
    assert np.abs(np.load(images_files(tmp_path / "cache")[0]).astype(int) - expected).max() <= 8


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bad_images_are_recorded_by_the_build(tmp_path, policy, corrupt_jpeg, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path / "data", n=12)
    victim = fixture.split_ids(0)[1]
    corrupt_jpeg(fixture.image_path(victim))
    arguments = dict(split="train", target="Smiling", protected="Male", cache_dir=tmp_path / "cache")
    if policy == "error":
        with pytest.raises(BadImageError, match=rf"cannot decode image .*{victim}"):
            CelebA(fixture.root, **arguments, on_bad_image="error")
        return
    cached = CelebA(fixture.root, **arguments, on_bad_image="skip")
    direct = CelebA(fixture.root, "train", "Smiling", "Male", on_bad_image="skip")
    assert cached.skipped_images == direct.skipped_images == [victim]
    assert victim not in cached.image_ids
    assert_same_items(direct, cached)


def test_parallel_pass_matches_inline(tmp_path, monkeypatch, corrupt_jpeg, write_celeba_fixture):
    fixture = write_celeba_fixture(tmp_path / "data", n=10, size=(30, 36), torchvision_extras=False)
    corrupt_jpeg(fixture.image_path(fixture.image_ids[6]), "garbage")
    source = fixture.dataset_dir / "img_align_celeba"
    monkeypatch.setattr(cache_module, "CHUNK", 3)  # several tasks from a few images
    loader = partial(load_image, image_size=12)
    arguments = dict(image_size=12, pipeline=PIPELINE, progress=False)
    inline = open_image_cache(tmp_path / "one", "x", source, fixture.image_ids, loader, workers=1, **arguments)
    parallel = open_image_cache(tmp_path / "two", "x", source, fixture.image_ids, loader, workers=2, **arguments)
    assert list(inline.bad) == list(parallel.bad) == [6]
    assert all(np.array_equal(inline.pixels(k), parallel.pixels(k)) for k in range(10))
    assert find_bad_images(source, fixture.image_ids, check_image, workers=2, progress=False).keys() == {6}


def test_the_full_checksum_pass_runs_once_per_build_and_node(tmp_path, monkeypatch, write_celeba_fixture):
    """The build stamps its own node; later opens check the first and last blocks only, until the file changes."""
    monkeypatch.setattr(cache_module, "CHUNK", 1)  # one block per row
    fixture = write_celeba_fixture(tmp_path / "data", n=12)
    arguments = dict(split="train", target="Smiling", protected="Male", cache_dir=tmp_path / "cache")
    CelebA(fixture.root, **arguments)
    (images,) = images_files(tmp_path / "cache")
    (stamp,) = images.parent.glob("checked-*.json")
    assert stamp.name == f"checked-{images.stem}-{socket.gethostname()}.json"
    passes = []
    real = cache_module._corruption
    monkeypatch.setattr(cache_module, "_corruption", lambda *a, **k: passes.append(k.get("blocks")) or real(*a, **k))
    CelebA(fixture.root, **arguments)
    blocks = len(json.loads((images.parent / "manifest.json").read_text())["checksums"])
    assert blocks > 2 and passes == [[0, blocks - 1]]  # the cheap check of an open
    stamp.unlink()  # another node (no stamp of its own): the full pass, once, then a stamp
    passes.clear()
    CelebA(fixture.root, **arguments)
    CelebA(fixture.root, **arguments)
    assert passes == [None, [0, blocks - 1]] and stamp.exists()
    os.utime(images)  # rewritten since the stamp (a copy, an edit): the full pass again
    passes.clear()
    CelebA(fixture.root, **arguments)
    assert passes == [None]


def test_a_full_file_system_stops_the_build_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch,
                                                                                write_celeba_fixture):
    """The images file's blocks are reserved before it is mapped: on a full file system the memmap's first write
    would kill the process by SIGBUS, saying nothing; the reservation fails with an OSError naming the file, and the
    half-made file goes (a full tmpfs, checked by hand: docs/data.md)."""
    import errno

    fixture = write_celeba_fixture(tmp_path / "data", n=12)
    asked = []

    def full(fd: int, offset: int, length: int) -> None:
        asked.append((offset, length))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as raised:
        CelebA(fixture.root, "train", "Smiling", "Male", image_size=32, cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    assert raised.value.errno == errno.ENOSPC
    assert Path(raised.value.filename).parent == folder and raised.value.filename.endswith(".npy.partial")
    rows = len(CelebA(fixture.root, "train", "Smiling", "Male", image_size=32))
    assert asked == [(0, 128 + rows * 32 * 32 * 3)]  # the whole file: its .npy header and every row
    assert images_files(tmp_path / "cache") == [] and not (folder / "manifest.json").exists()


def test_a_file_system_that_cannot_reserve_blocks_builds_as_before(tmp_path, monkeypatch, write_celeba_fixture):
    import errno

    fixture = write_celeba_fixture(tmp_path / "data", n=12)

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    cached = CelebA(fixture.root, "train", "Smiling", "Male", image_size=32, cache_dir=tmp_path / "cache")
    assert_same_items(CelebA(fixture.root, "train", "Smiling", "Male", image_size=32), cached)
    assert len(images_files(tmp_path / "cache")) == 1
