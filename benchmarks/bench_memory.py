"""Peak memory (RSS) of a short ASAC fine-tuning run on generated datasets of different sizes.

For each size, a fresh process builds the splits as the pipeline does (`build_splits`), runs a fixed
number of ASAC minibatches (`stage3.Stage3.train_minibatch`) from a shuffled DataLoader over the whole train
split, then evaluates the whole valid split (`evaluate`). Its peak resident set (VmHWM) is read at the end.
The run length is fixed, so any growth with the dataset size comes from what is held per image (labels,
ids, indices) and would show if images were kept in memory: one 64×64 image is 12 KB as uint8, 48 KB as
the float32 tensor the loader returns. The verdict: growth from the smallest to the largest dataset under
5% of the smallest run's peak.

Datasets are generated once (`python -m distributed_asac.data.synthetic`, a few minutes for 50,000) into
data/bench_synthetic_<n/1000>k and reused.

Usage (from the repository root)::

    python benchmarks/bench_memory.py [--sizes 10000 50000] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from _common import REPO, add_common_arguments, describe, machine, markdown_table, write_json
from distributed_asac.config import Config
from distributed_asac.data.build import build_splits
from distributed_asac.data.synthetic import generate
from distributed_asac.evaluate import evaluate
from distributed_asac.models import create_model
from distributed_asac.runtime import make_accelerator
from distributed_asac.stage3 import build_stage3

GROWTH_LIMIT = 0.05  # of the smallest dataset's peak


def vm_kib(field: str) -> int:
    """A `Vm*` line of /proc/self/status in KiB (VmHWM: peak resident set; VmRSS: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_config(root: Path, num_images: int, image_size: int) -> Config:
    """The embedded default on the generated dataset in `root` (reused: same images, bias, seed and size)."""
    cfg = Config()
    cfg.data.root, cfg.data.synthetic_num_images, cfg.data.image_size = str(root), num_images, image_size
    return cfg


def worker(args: argparse.Namespace) -> None:
    """One fine-tuning run in this process; writes its memory figures to args.out."""
    torch.set_num_threads(args.threads)
    accelerator = make_accelerator()
    cfg = run_config(args.data, args.num_images, args.image_size)
    splits = build_splits(cfg, accelerator)
    after_data = vm_kib("VmRSS")
    torch.manual_seed(0)
    model = create_model(cfg.model.backbone)
    stage = build_stage3(model, cfg, accelerator, torch.Generator().manual_seed(0), splits.train)
    steps = 0
    for x, y, a, _ in stage.loader:
        stage.train_minibatch(x, y, a)
        steps += 1
        if steps == args.steps:
            break
    evaluate(accelerator, model, splits.valid, cfg.finetune.batch_size)
    args.out.write_text(json.dumps({
        "num_images": args.num_images, "train_images": len(splits.train), "valid_images": len(splits.valid),
        "minibatches": steps, "rss_after_data_mib": after_data / 1024, "peak_rss_mib": vm_kib("VmHWM") / 1024,
    }))


def measure(args: argparse.Namespace, num_images: int, root: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--data", str(root), "--num-images",
           str(num_images), "--image-size", str(args.image_size), "--steps", str(args.steps),
           "--threads", str(args.threads), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run on {num_images} images failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def driver(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    info["torch_threads"] = args.threads  # the workers'; this process only launches them
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for n in args.sizes:
            root = args.data_dir / f"bench_synthetic_{n // 1000}k" if n >= 1000 else Path(tmp) / f"synthetic_{n}"
            data = run_config(root, n, args.image_size).data  # generated here once, so the runs time no generation
            generate(root, num_images=n, bias=data.synthetic_bias, seed=data.synthetic_seed,
                     size=(args.image_size, args.image_size))
            runs.append(measure(args, n, root, Path(tmp) / f"{n}.json"))
    smallest, largest = runs[0], runs[-1]
    growth = largest["peak_rss_mib"] - smallest["peak_rss_mib"]
    extra_images = largest["num_images"] - smallest["num_images"]
    result = {"runs": runs, "growth_mib": growth,
              "growth_bytes_per_extra_image": growth * 2**20 / extra_images if extra_images else 0.0,
              "growth_fraction": growth / smallest["peak_rss_mib"]}
    result["flat"] = result["growth_fraction"] < GROWTH_LIMIT
    print(f"machine: {describe(info)}")
    print(f"small_cnn, {args.image_size}×{args.image_size}, k = 64, ASAC FGSM; {args.steps} minibatches, then the "
          f"whole valid split\n")
    print(markdown_table(["dataset images", "train images", "valid images", "RSS after data MiB", "peak RSS MiB"],
                         [[r["num_images"], r["train_images"], r["valid_images"], r["rss_after_data_mib"],
                           r["peak_rss_mib"]] for r in runs]))
    print(f"\npeak growth {growth:+.1f} MiB ({100 * result['growth_fraction']:+.1f}%, "
          f"{result['growth_bytes_per_extra_image']:.0f} bytes per extra image): "
          f"{'flat' if result['flat'] else 'GROWS'} (limit {100 * GROWTH_LIMIT:.0f}%)")
    payload = {"benchmark": "memory", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "results": result}
    write_json(args.json, payload)
    return payload


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000], help="dataset sizes, ascending")
    parser.add_argument("--steps", type=int, default=20, help="ASAC minibatches per run (default 20)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data", help="where datasets of ≥ 1000 images go")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--num-images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    add_common_arguments(parser, repeats=None)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.smoke:
        args.sizes, args.steps, args.image_size = [200, 400], 2, 32
    return driver(args)


if __name__ == "__main__":
    main()
