"""What a sweep keeps on disk, the source of truth for `--resume` and `--report <sweep dir>`.

    <output_dir>/sweeps/<name>/<timestamp>/
        sweep.json              the expanded trials, resources, MLflow store, experiment and parent run id
        trials/<trial>/         the trial's pipeline run folder, trial.json (its record) and error.txt if it failed
        ray/                    Ray Tune's own experiment folders (one per attempt)
        report/                 report.md, one CSV per grid, trials.csv, pareto.png

Ray Tune snapshots its experiment state only every few seconds, so a trial that finished just before the
driver was killed could be run again by `Tuner.restore`; a trial's record, written atomically as its last
act, cannot be lost that way.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from distributed_asac.errors import UserError

STATE = "sweep.json"
RECORD = "trial.json"
TRIALS = "trials"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    os.replace(tmp, path)


def read_record(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    write_json(folder / RECORD, record)


def trial_folder(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / TRIALS / name


def new_sweep_dir(output_dir: Path, name: str) -> Path:
    """A fresh `<output_dir>/sweeps/<name>/<timestamp>` (suffixed if two sweeps start within one second)."""
    base = output_dir / "sweeps" / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, suffix = base / stamp, 1
    while folder.exists():
        suffix += 1
        folder = base / f"{stamp}-{suffix}"
    folder.mkdir(parents=True)
    return folder


def latest_sweep_dir(output_dir: Path, name: str) -> Path:
    """The most recent sweep folder of `name` that holds a sweep.json (what `--resume` continues)."""
    folders = sorted((p for p in (output_dir / "sweeps" / name).glob("*") if (p / STATE).is_file()),
                     key=lambda p: (p / STATE).stat().st_mtime)
    if not folders:
        raise UserError(f"--resume: no earlier sweep {name!r} under {output_dir / 'sweeps' / name} to resume; "
                        "run without --resume to start one")
    return folders[-1]


def read_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / STATE
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep folder (no {STATE}); pass the folder a sweep printed")
    return json.loads(path.read_text())


def load_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per trial of the sweep, in grid order; trials that never finished are `pending`."""
    records = []
    for trial in read_state(sweep_dir)["trials"]:
        record = read_record(trial_folder(sweep_dir, trial["name"]))
        records.append(record or {"name": trial["name"], "axes": trial["axes"], "grids": trial["grids"],
                                  "status": "pending", "metrics": {}, "base": None, "error": None})
    return records
