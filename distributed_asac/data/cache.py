"""Preprocessed image cache: one pass of decode → crop → resize, stored as a uint8 memmap per split.

Why this format: after the first pass an item costs a 12 KB read (at 64 px) and a float conversion,
with no JPEG decoding or resampling. A single ``.npy`` file is self-describing (shape and dtype in its
header), opens with ``np.load(mmap_mode="r")`` in every rank and DataLoader worker, and is served from
the OS page cache shared by all of them, so no process copies it into its own memory. Its size is
N·S²·3 bytes: CelebA's 202,599 images take 2.49 GB at 64 px (2.0 GB for train alone), 9.96 GB at 128 px.

Layout of one cache (``<cache_dir>/<name>-<S>px-<hash of the source folder>/``)::

    manifest.json          source folder, file list, sizes, mtimes, pipeline, undecodable files, checksums
    images-<build>.npy     uint8 [N, S, S, 3], row k = files[k]
    checked-images-<build>-<host>.json   this node has checked every block of that build (see below)
    .lock                  held (flock) by the one process that builds

The manifest is the cache's validity proof: a cache whose source files (list, sizes, mtimes), image
size or pipeline differ is stale, and is rebuilt (with a warning saying why) or refused
(``on_stale="error"``), never used. So is one whose pixels no longer match the CRC-32 of each block of
CHUNK rows recorded when it was built (a byte changed on disk, a bad copy): all of them are checked once per
build and per node (about 0.5 s per GB read; a ``checked-<build>-<host>.json`` stamp records it, with the file's
size, inode, mtime and ctime), and again whenever the file changed since; every other open checks the first and
last blocks only. So corrupted pixels are not trained on, and 16 ranks opening a 10 GB cache read it once per node. Several processes may open the same cache at once: the first takes
the lock and builds, the others wait on it and then read what it built.

Also here, sharing the same parallel pass: :func:`find_bad_images`, which only decodes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import socket
import sys
import time
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..locks import flocked

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: per-block checksums of the pixels
MANIFEST = "manifest.json"
CHUNK = 256  # images per worker task: large enough to amortise task overhead, small for a smooth bar
STALE_POLICIES = ("rebuild", "error")

Loader = Callable[[str], np.ndarray]
"""Picklable ``path → uint8 [S, S, 3]`` that raises a UserError naming the file when it cannot decode it."""


class ImageCache:
    """A built cache, read through a memmap opened lazily in each process (never pickled)."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.path = folder / manifest["images_file"]
        self.image_size: int = manifest["image_size"]
        self.files: list[str] = manifest["files"]
        self.bad: dict[int, str] = {int(row): message for row, message in manifest["bad"].items()}
        """Row → why it could not be decoded; those rows hold zeros."""
        # Opened now so that a rebuild deleting the file later cannot pull it from under this process.
        self._images: np.ndarray | None = self._open()

    def _open(self) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r")
        except FileNotFoundError:
            raise UserError(
                f"image cache {self.path} vanished (another run rebuilt it while this one started); start again"
            ) from None

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, row: int) -> np.ndarray:
        """uint8 [S, S, 3] of row ``row``: a copy, so that torch gets a writable array of its own."""
        if self._images is None:
            self._images = self._open()
        return np.array(self._images[row])

    def __getstate__(self) -> dict[str, Any]:
        # A pickled np.memmap carries its whole array; DataLoader workers reopen the file instead.
        state = self.__dict__.copy()
        state["_images"] = None
        return state


def open_image_cache(
    cache_dir: str | os.PathLike,
    name: str,
    source_dir: str | os.PathLike,
    files: Sequence[str],
    loader: Loader,
    *,
    image_size: int,
    pipeline: str,
    on_stale: str = "rebuild",
    workers: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """The cache of ``loader(source_dir/f)`` for each of ``files``: opened if valid, else built first.

    ``name`` (e.g. ``"celeba-train"``) and ``image_size`` name the cache folder; ``pipeline`` describes
    what ``loader`` does, so that changing the preprocessing invalidates old caches. ``workers``
    processes decode in parallel (default: the usable cores). Undecodable files do not stop the build:
    they are recorded in :attr:`ImageCache.bad` for the caller's ``on_bad_image`` policy.
    """
    if on_stale not in STALE_POLICIES:
        raise UserError(f"on_stale must be one of {', '.join(STALE_POLICIES)}, not {on_stale!r}")
    source_dir = Path(source_dir).resolve()
    digest = hashlib.sha1(str(source_dir).encode()).hexdigest()[:10]
    folder = Path(cache_dir).expanduser() / f"{name}-{image_size}px-{digest}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the image cache folder {folder} ({err}); choose a writable cache_dir") from err
    expected = {"format": FORMAT_VERSION, "image_size": image_size, "pipeline": pipeline, "source_dir": str(source_dir)}
    files = list(files)

    manifest = _read_manifest(folder)
    if manifest is not None and _staleness(folder, manifest, expected, files) is None:
        return ImageCache(folder, manifest)
    with flocked(folder / ".lock", f"waiting for another process to finish building the image cache {folder}"):
        # Another process may have built it while this one waited for the lock.
        manifest = _read_manifest(folder)
        reason = "it has never been built" if manifest is None else _staleness(folder, manifest, expected, files)
        if reason is None:
            return ImageCache(folder, manifest)
        if manifest is not None:
            if on_stale == "error":
                raise UserError(
                    f"image cache {folder} is stale: {reason}; delete that folder or allow rebuilding (on_stale='rebuild')"
                )
            log.warning("image cache %s is stale (%s); rebuilding it", folder, reason)
        manifest = _build(folder, source_dir, files, loader, expected, workers, progress, desc=f"caching {name}")
    return ImageCache(folder, manifest)


def find_bad_images(
    source_dir: str | os.PathLike,
    files: Sequence[str],
    check: Callable[[str], Any],
    *,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "checking images",
) -> dict[int, str]:
    """Index → error message of every file that ``check`` (a decoder raising UserError) rejects."""
    return _run_pass(Path(source_dir), list(files), check, None, workers, progress, desc)[0]


# --------------------------------------------------------------------------------------------------


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of the uint8 .npy at ``path`` if its header is intact and the file holds all its bytes
    (header included), else None."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            data_start = handle.tell()
        complete = path.stat().st_size >= data_start + int(np.prod(shape)) * np.dtype(dtype).itemsize
    except (OSError, ValueError):
        return None
    return tuple(shape) if complete and np.dtype(dtype) == np.uint8 else None


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Unreadable counts as stale, never as valid; the builder replaces it.
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _staleness(folder: Path, manifest: dict[str, Any], expected: dict[str, Any], files: list[str]) -> str | None:
    """Why the cache cannot serve ``files`` as they are now, or None if it can."""
    if not manifest:
        return "its manifest is unreadable"
    for key, value in expected.items():
        if manifest.get(key) != value:
            return f"its {key} is {manifest.get(key)!r}, not {value!r}"
    if manifest.get("files") != files:
        cached = manifest.get("files") or []
        return f"the file list changed ({len(cached)} cached, {len(files)} now)"
    images = folder / str(manifest.get("images_file"))
    image_size = expected["image_size"]
    if _npy_shape(images) != (len(files), image_size, image_size, 3):
        return f"its images file {images.name} is missing or incomplete"
    sizes, mtimes = _stat_files(Path(expected["source_dir"]), files)
    changed = np.flatnonzero((sizes != np.asarray(manifest["sizes"])) | (mtimes != np.asarray(manifest["mtimes_ns"])))
    if len(changed):
        return f"{len(changed)} source files changed since it was built (first: {files[changed[0]]})"
    return _checked(folder, images, manifest)


def _stamp_path(folder: Path, images: Path) -> Path:
    """The stamp of one build's full checksum pass on this node (host name): `checked-<build>-<host>.json`."""
    return folder / f"checked-{images.stem}-{socket.gethostname()}.json"


def _file_identity(images: Path) -> dict[str, int]:
    """What changes when the images file is rewritten, replaced or copied over: size, inode, mtime and ctime."""
    stat = images.stat()
    return {"size": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _write_stamp(folder: Path, images: Path) -> None:
    stamp = _stamp_path(folder, images)
    staging = stamp.with_name(f"{stamp.name}.{uuid.uuid4().hex[:8]}")
    staging.write_text(json.dumps({**_file_identity(images), "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    os.replace(staging, stamp)


def _checked(folder: Path, images: Path, manifest: dict[str, Any]) -> str | None:
    """`_corruption` once per build and per node, not per open: the full pass (every byte, about 0.5 s per GB) runs
    when this node holds no stamp for the build or the file changed since (size, inode, mtime, ctime), under a
    per-node lock so that the ranks of one node check once; every open also checks the first and last blocks."""
    stamp = _stamp_path(folder, images)

    def stamped() -> bool:
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return False
        return {k: recorded.get(k) for k in ("size", "inode", "mtime_ns", "ctime_ns")} == _file_identity(images)

    if stamped():
        n = len(manifest["checksums"])
        return _corruption(images, manifest, blocks=sorted({0, n - 1}) if n else [])
    with flocked(folder / f".check-{socket.gethostname()}.lock",
                 f"waiting for another process to finish checking the image cache {folder}"):
        if stamped():  # another process of this node checked it while this one waited
            return None
        reason = _corruption(images, manifest)
        if reason is None:
            _write_stamp(folder, images)
        return reason


def _corruption(images: Path, manifest: dict[str, Any], blocks: Sequence[int] | None = None) -> str | None:
    """Which rows of ``images`` no longer match the checksums recorded at the build (of ``blocks``; default all),
    or None if all do."""
    pixels = np.load(images, mmap_mode="r")
    rows = manifest["checksum_rows"]
    for block in range(len(manifest["checksums"])) if blocks is None else blocks:
        expected = manifest["checksums"][block]
        first = block * rows
        if zlib.crc32(pixels[first : first + rows]) != expected:  # a slice of whole rows is contiguous
            last = min(first + rows, len(pixels)) - 1
            return (f"the pixels of rows {first}-{last} (first file: {manifest['files'][first]}) do not match "
                    f"the checksum recorded when it was built: {images.name} was modified or corrupted")
    return None


def _stat_files(source_dir: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Sizes and mtimes (ns) of ``files``; a missing file gets -1 so that it never matches."""
    sizes = np.full(len(files), -1, dtype=np.int64)
    mtimes = np.full(len(files), -1, dtype=np.int64)
    for k, name in enumerate(files):
        try:
            stat = os.stat(source_dir / name)
        except FileNotFoundError:
            continue
        sizes[k], mtimes[k] = stat.st_size, stat.st_mtime_ns
    return sizes, mtimes


def _build(
    folder: Path,
    source_dir: Path,
    files: list[str],
    loader: Loader,
    expected: dict[str, Any],
    workers: int | None,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """Decode everything into a fresh images file, then publish it by atomically replacing the manifest."""
    started = time.time()
    # Stat before decoding: a file edited during the build then fails the next validation.
    sizes, mtimes = _stat_files(source_dir, files)
    size = expected["image_size"]
    build = uuid.uuid4().hex[:12]
    partial = folder / f"images-{build}.npy.partial"
    try:
        _create_images_file(partial, (len(files), size, size, 3))
        bad, checksums = _run_pass(source_dir, files, loader, partial, workers, progress, desc)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    images = folder / f"images-{build}.npy"
    os.replace(partial, images)
    manifest = dict(
        expected,
        images_file=images.name,
        files=files,
        sizes=sizes.tolist(),
        mtimes_ns=mtimes.tolist(),
        bad={str(row): message for row, message in sorted(bad.items())},
        checksum_rows=CHUNK,
        checksums=[checksums[start] for start in range(0, len(files), CHUNK)],  # CRC-32 of each block of rows
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        build_seconds=round(time.time() - started, 1),
    )
    staging = folder / f"{MANIFEST}.{build}"
    staging.write_text(json.dumps(manifest))
    os.replace(staging, folder / MANIFEST)
    _write_stamp(folder, images)  # its checksums were computed from the rows as written: checked on this node
    # Older builds (and partial files of crashed builders): processes still reading them keep their
    # mapping, since unlinking a file does not unmap it.
    for old in (*folder.glob("images-*"), *folder.glob("checked-*")):
        if old != images and not old.name.startswith(f"checked-{images.stem}-"):
            old.unlink(missing_ok=True)
    log.info("built image cache %s: %d images in %.1f s", folder, len(files), manifest["build_seconds"])
    if bad:
        log.warning("image cache %s: %d of %d files could not be decoded", folder, len(bad), len(files))
    return manifest


def _create_images_file(path: Path, shape: tuple[int, ...]) -> None:
    """A zeroed uint8 .npy of ``shape`` at ``path`` with all its blocks allocated now. The memmap of a sparse file
    allocates a page at its first write, and on a full file system (a full tmpfs, a quota) that write kills the
    process with SIGBUS, saying nothing; posix_fallocate fails instead with an OSError (ENOSPC, EDQUOT, EFBIG) that
    names the file. Where the file system cannot reserve blocks (EOPNOTSUPP, EINVAL) the file stays sparse."""
    try:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        if hasattr(os, "posix_fallocate"):  # not on macOS
            with open(path, "rb+") as handle:
                try:
                    os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
    except OSError as err:
        if err.filename is None:  # posix_fallocate and numpy's writes do not say which file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _run_pass(
    source_dir: Path,
    files: list[str],
    loader: Callable[[str], Any],
    images: Path | None,
    workers: int | None,
    progress: bool,
    desc: str,
) -> tuple[dict[int, str], dict[int, int]]:
    """Apply ``loader`` to every file, CHUNK files per task (writing rows into ``images`` if given).
    Returns the bad files (index → message) and, with ``images``, each task's first row → CRC-32 of its rows."""
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), -(-len(files) // CHUNK)))
    starts = range(0, len(files), CHUNK)
    tasks = [(str(source_dir), files[start : start + CHUNK], start, loader, images) for start in starts]
    bad: dict[int, str] = {}
    checksums: dict[int, int] = {}

    def collect(task: tuple, result: tuple[dict[int, str], int | None]) -> None:
        bad.update(result[0])
        if result[1] is not None:
            checksums[task[2]] = result[1]
        bar.update(len(task[1]))

    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        if workers == 1:
            for task in tasks:
                collect(task, _process_chunk(task))
            return bad, checksums
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
            futures = {pool.submit(_process_chunk, task): task for task in tasks}
            for future in as_completed(futures):
                collect(futures[future], future.result())
    return bad, checksums


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork, as DataLoader workers use on Linux. spawn and forkserver re-import the caller's ``__main__``
    in every worker: a script without a main guard would construct its dataset again there and block on
    this cache's lock, and a script read from stdin cannot be re-imported at all; each worker would also
    pay torch's import (~3 s). The forked workers run only the decoder (PIL, numpy): no torch ops, no
    threads, so the parent's threads and locks are never touched in them."""
    return multiprocessing.get_context("fork")


def _process_chunk(
    task: tuple[str, list[str], int, Callable[[str], Any], Path | None],
) -> tuple[dict[int, str], int | None]:
    """Bad files of one task, and the CRC-32 of the rows it wrote (None when it writes none)."""
    source_dir, files, start, loader, images_path = task
    images = np.load(images_path, mmap_mode="r+") if images_path is not None else None
    bad: dict[int, str] = {}
    for offset, name in enumerate(files):
        try:
            pixels = loader(os.path.join(source_dir, name))
        except UserError as err:
            bad[start + offset] = str(err)
            continue
        if images is not None:
            images[start + offset] = pixels
    if images is None:
        return bad, None
    images.flush()
    return bad, zlib.crc32(images[start : start + len(files)])  # bad rows hold zeros, and are checked as such
