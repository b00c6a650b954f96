"""The base-model cache: stages 1–2 trained once per distinct base and shared by every trial that needs it.

An entry is `<output_dir>/base_cache/<key>/`, the key a hash of exactly the config fields that stages 1–2
read (`base_fields`). Inside: the base run's folder (whose `probe/` is the checkpoint stage 3 starts from)
and `base.json`, written last and atomically, so an entry without it is unfinished and is rebuilt. A file
lock per entry makes concurrent builders (two sweeps sharing a cache, or tasks on a cluster with a shared
file system) train it once: the first builds, the others wait and then read what it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock

from distributed_asac.config import Config
from distributed_asac.errors import UserError

CACHE_DIR = "base_cache"
ENTRY_FILE = "base.json"
# The data section minus settings of how images are loaded: what images and labels the base sees.
_DATA_LOADER_ONLY = ("data.num_workers", "data.cache_dir")
# Outside data, model, base and probe: the seed and the optimiser settings that stages 1–2 use.
_TOP_LEVEL = ("seed", "grad_clip", "adam_betas", "adam_eps")


def is_base_key(key: str) -> bool:
    """Whether a config key (or a whole section, e.g. `data`) changes the base model that stages 1–2 train."""
    return (key.split(".")[0] in ("data", "model", "base", "probe") and key not in _DATA_LOADER_ONLY) or key in _TOP_LEVEL


def base_fields(cfg: Config) -> dict[str, Any]:
    """The config fields that define the base model; fine-tuning, output and tracking keys are left out."""
    return {key: value for key, value in cfg.flat().items() if is_base_key(key)}


def base_key(cfg: Config) -> str:
    text = json.dumps(base_fields(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def entry_dir(output_dir: str | Path, key: str) -> Path:
    return Path(output_dir) / CACHE_DIR / key


def read_entry(folder: Path) -> Optional[dict[str, Any]]:
    """The finished entry's {key, checkpoint, results, fields}, or None if it was never finished."""
    path = folder / ENTRY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_base(job: dict[str, Any]) -> dict[str, Any]:
    """Return the cache entry for `job`'s base, training stages 1–2 first if no finished entry exists.

    `job` is a trial job (see `trial.run_trial`) whose `key` names the entry; the build runs the same
    `pipeline.run` as the CLI, with only the `base` variant, nested under the sweep's parent run.
    """
    from .trial import call_pipeline, load_trial_config

    folder = entry_dir(job["output_dir"], job["key"])
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        entry = read_entry(folder)
        if entry is not None:
            return entry
        build = {**job, "overrides": [*job["overrides"], f"output_dir={json.dumps(str(folder))}", "base_checkpoint=null"],
                 "variants": [{"mode": "base"}], "folder": str(folder)}
        cfg = load_trial_config(build)
        if base_key(cfg) != job["key"]:
            raise RuntimeError(f"base key mismatch for {folder}: the trial's config hashes to {base_key(cfg)}")
        outcome = call_pipeline(build)
        entry = {"key": job["key"], "checkpoint": str(Path(outcome["run_dir"]) / "probe"),
                 "results": outcome["results"], "fields": base_fields(cfg)}
        tmp = folder / f".{ENTRY_FILE}.tmp"
        tmp.write_text(json.dumps(entry, indent=2, allow_nan=True))
        os.replace(tmp, folder / ENTRY_FILE)
        return entry


def prepare_data(configs: list[Config]) -> None:
    """Generate each synthetic dataset once, in the driver, before any base or trial reads it.

    Concurrent runs pointing at one `data.root` would otherwise all start generating into it; two different
    generated datasets sharing a root would overwrite each other, so that is refused.
    """
    from distributed_asac.data.datasets import generate_synthetic, synthetic_arguments

    wanted: dict[str, Any] = {}  # data.root → the data config that generates it
    for cfg in configs:
        if cfg.data.name != "synthetic":
            continue
        first = wanted.setdefault(cfg.data.root, cfg.data)
        if synthetic_arguments(first) != synthetic_arguments(cfg.data):
            raise UserError(f"two generated datasets with different settings share data.root {cfg.data.root!r}; "
                            "give each its own data.root")
    for data in wanted.values():
        generate_synthetic(data)
