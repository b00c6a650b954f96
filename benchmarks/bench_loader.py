"""Images/s through a DataLoader for CelebA readers on one CelebA-format folder.

(a) torchvision's ``CelebA`` with PIL transforms (CenterCrop → Resize → ToTensor), (b) this project's
``CelebA`` without the cache, (c) with the preprocessed cache, both as training reads them: uint8 batches
from the workers, converted to float32 by ``to_pixels`` in this process (data/batches.py); (d) the cache
with float32 batches from the workers, as before that change, for the side-by-side comparison. Every
reader delivers the same float32 [B, 3, S, S] batches. Same split, image size, batch size, worker count
and shuffled order for all. The clock starts when the first batch arrives (worker start-up is not
counted) and every source file is read once beforehand, so the page cache is equally warm for all. The
cache build is timed separately. With ``--repeats`` the readers run in rounds (a, b, c, d, a, ...) and each
reports its median, so that load from other processes, which the printed load average shows, falls on all
alike. Each pass also reports the CPU time of this process and its workers per image: the work, which on
a loaded machine varies less than the elapsed time.

Usage (from the repository root; the folder is generated if it has no list_attr_celeba.txt)::

    python benchmarks/bench_loader.py --data data/bench_celeba_20k --num-images 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from distributed_asac.data.batches import to_pixels, uint8_images
from distributed_asac.data.celeba import CelebA
from distributed_asac.data.celeba_format import locate_celeba


class UncheckedTorchvisionCelebA(torchvision.datasets.CelebA):
    """torchvision's CelebA minus its MD5 check, which a generated folder cannot pass; reading is untouched."""

    def _check_integrity(self) -> bool:
        return True


def ensure_data(folder: Path, num_images: int) -> None:
    """Generate the CelebA-format folder at CelebA's 178×218 unless it is already there."""
    if (folder / "list_attr_celeba.txt").is_file():
        return
    command = [
        sys.executable, "-m", "distributed_asac.data.synthetic", "--out", str(folder),
        "--num-images", str(num_images), "--bias", "0.5", "--seed", "0", "--size", "178x218",
    ]
    subprocess.run(command, check=True)


def torchvision_view(dataset_dir: Path, view: Path) -> Path:
    """A ``view/celeba/`` of symlinks that torchvision accepts; the files it insists on but does not use
    here (identity, bounding boxes, landmarks) are written as placeholders when the source lacks them."""
    folder = view / "celeba"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"):
        link = folder / name
        if not link.exists():
            link.symlink_to((dataset_dir / name).resolve())
    ids = [line.split()[0] for line in (dataset_dir / "list_eval_partition.txt").read_text().splitlines() if line.strip()]
    placeholders = {
        "identity_CelebA.txt": [f"{i} 1" for i in ids],
        "list_bbox_celeba.txt": [str(len(ids)), "image_id x_1 y_1 width height"] + [f"{i} 0 0 1 1" for i in ids],
        "list_landmarks_align_celeba.txt": [str(len(ids)), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                                            "leftmouth_x leftmouth_y rightmouth_x rightmouth_y"]
        + [f"{i} 0 0 0 0 0 0 0 0 0 0" for i in ids],
    }
    for name, lines in placeholders.items():
        target = folder / name
        if target.exists():
            continue
        if (dataset_dir / name).is_file():
            target.symlink_to((dataset_dir / name).resolve())
        else:
            target.write_text("\n".join(lines) + "\n")
    return view


def warm_page_cache(folder: Path) -> None:
    for entry in os.scandir(folder):
        with open(entry.path, "rb") as handle:
            handle.read()


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def one_pass(dataset: Dataset, batch_size: int, workers: int, max_images: int) -> tuple[float, float]:
    """Steady-state images/s of one shuffled pass (up to ``max_images``), from the first batch on, and the CPU
    milliseconds per image of this process and its workers over the whole pass (worker start-up included)."""
    cpu_before = cpu_seconds()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
        generator=torch.Generator().manual_seed(0), persistent_workers=False,
    )
    batches = iter(loader)
    delivered = len(to_pixels(next(batches)[0]))
    started, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(to_pixels(batch[0]))  # float32 [B, 3, S, S], whatever crossed from the workers
        if seen >= max_images:
            break
    rate = seen / (time.perf_counter() - started)
    del batches  # joins the workers, so that their CPU time is counted
    return rate, 1e3 * (cpu_seconds() - cpu_before) / (delivered + seen)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    model = models[0] if models else platform.processor() or "unknown CPU"
    return f"{model}, {len(os.sched_getaffinity(0))} usable cores, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/bench_celeba_20k"), help="CelebA-format folder")
    parser.add_argument("--num-images", type=int, default=20000, help="images to generate if --data is empty")
    parser.add_argument("--image-size", type=int, default=64, help="training size (default 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for every reader")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-images", type=int, default=10**9, help="stop each pass after this many images")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the readers; medians reported")
    parser.add_argument("--cache-dir", type=Path, help="default: <data>_cache next to the data")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    ensure_data(args.data, args.num_images)
    files = locate_celeba(args.data)
    cache_dir = args.cache_dir or args.data.with_name(args.data.name + "_cache")
    view = torchvision_view(files.dataset_dir, args.data.with_name(args.data.name + "_torchvision_view"))
    warm_page_cache(files.images)

    with Image.open(next(files.images.iterdir())) as first:
        side = min(first.size)
    transform = torchvision.transforms.Compose([
        torchvision.transforms.CenterCrop(side),
        torchvision.transforms.Resize(args.image_size),
        torchvision.transforms.ToTensor(),
    ])
    uncached = CelebA(args.data, args.split, "Smiling", "Male", image_size=args.image_size)
    shutil.rmtree(cache_dir, ignore_errors=True)  # time a full build, not a reuse
    started = time.perf_counter()
    cached = CelebA(args.data, args.split, "Smiling", "Male", image_size=args.image_size, cache_dir=cache_dir)
    build_seconds = time.perf_counter() - started
    readers: dict[str, Dataset] = {
        "a_torchvision": UncheckedTorchvisionCelebA(str(view), split=args.split, target_type="attr", transform=transform),
        "b_uncached": uint8_images(uncached),
        "c_cached": uint8_images(cached),
        "d_cached_float": cached,
    }
    cache_bytes = sum(path.stat().st_size for path in cache_dir.rglob("images-*.npy"))

    load_before = os.getloadavg()[0]
    rounds = [
        {name: one_pass(ds, args.batch_size, args.workers, args.max_images) for name, ds in readers.items()}
        for _ in range(args.repeats)
    ]
    rates = {name: statistics.median(r[name][0] for r in rounds) for name in readers}
    cpu_ms = {name: statistics.median(r[name][1] for r in rounds) for name in readers}
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pillow": PIL.__version__},
        "images": len(uncached),
        "split": args.split,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "repeats": args.repeats,
        "images_per_second": {name: round(rate, 1) for name, rate in rates.items()},
        "ratio_to_torchvision": {name: round(rate / rates["a_torchvision"], 2) for name, rate in rates.items()},
        "cpu_ms_per_image": {name: round(ms, 3) for name, ms in cpu_ms.items()},
        "cache_build_seconds": round(build_seconds, 1),
        "cache_megabytes": round(cache_bytes / 1e6, 1),
    }
    print(f"{results['date']} on {results['machine']}")
    print(f"{results['images']} {args.split} images at {args.image_size}px, batch {args.batch_size}, {args.workers} workers, "
          f"median of {args.repeats}, load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after")
    for name, rate in rates.items():
        print(f"  {name:<14} {rate:9.1f} images/s   {rate / rates['a_torchvision']:6.2f}x (a)   "
              f"{cpu_ms[name]:6.3f} CPU ms/image")
    print(f"  cache build {build_seconds:.1f} s, {cache_bytes / 1e6:.1f} MB on disk")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
