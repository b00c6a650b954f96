"""A sweep's models in the MLflow Model Registry: each finished trial's fine-tuned model as a version of the
registered model of its setting (distributed_asac/mlflow_models.py does the registering).

A sweep's row is a setting of its axes (every trial's name without its index and seed, already MLflow-safe:
spec.py); its versions are the setting's seeds. Each version carries its grid's paired verdicts against the
grid's reference setting (report.paired_rows), the sweep's counterpart of a comparison's rows against base and plain.
"""

from __future__ import annotations

import re
from pathlib import Path

from distributed_asac.config import Config, load_config
from distributed_asac.metrics import HEADLINE
from distributed_asac.mlflow_models import Chosen, Registered, check_registry, closing_lines, register
from distributed_asac.report import verdict_line
from distributed_asac.rows import row_name

from .records import TrialRecord
from .report import paired_rows
from .spec import Sweep


def row(trial_name: str, model: str) -> str:
    """`t003-order=random-seed=1` → `order=random` (a seeds-only grid: the trial's row, e.g. `asac_fgsm`)."""
    return re.sub(r"^t\d+-|-?seed=[^-]*$", "", trial_name) or model


def first_config(sweep: Sweep) -> Config:
    """A trial's config: what the registry keys (`registry.*`, tracking) of the whole sweep are read from."""
    return load_config(sweep.base_config, sweep.trials[0].overrides)


def check(sweep: Sweep, configs: list[Config]) -> None:
    """Before any trial: `check_registry` on the registered names of every trial's row (`configs`: the trials')."""
    rows = {row(t.name, row_name(cfg.finetune)) for t, cfg in zip(sweep.trials, configs)}
    check_registry(configs[0], sorted(rows))


def register_trials(sweep: Sweep, records: list[TrialRecord], parent_run_id: str) -> list[Registered]:
    """Register every finished trial's model and print what it registered (the sweep's last lines). A finished
    trial whose model folder is not on this machine (a sweep resumed from its records alone, e.g. kept in git) is
    left out, and a line says how many were."""
    cfg = first_config(sweep)
    finished = [r for r in records if r.status == "finished" and r.run_dir and r.model]
    gone = [r for r in finished if not (Path(r.run_dir) / r.model).is_dir()]
    if gone:
        print(f"{len(gone)} finished trial(s) not registered: their run folders are not on this machine (e.g. "
              f"{gone[0].run_dir}); their records and MLflow runs stand", flush=True)
        finished = [r for r in finished if r not in gone]
    verdicts: dict[str, dict[str, str]] = {r.name: {} for r in finished}
    for grid, axes in sweep.grids.items():
        for pair in paired_rows([r for r in finished if grid in r.grids], axes):
            shown = [{"row": "setting", "reference": "reference", "metric": m, "interval": i}
                     for m, i in pair["intervals"].items() if m in HEADLINE]
            reference = ", ".join(f"{a}={v}" for a, v in pair["reference"].items())
            for record in finished:
                if grid in record.grids and {a: record.axes[a] for a in pair["setting"]} == pair["setting"]:
                    verdicts[record.name][grid] = f"against {reference}: {verdict_line(shown, 'setting', 'reference')}"
    chosen = [Chosen(row(r.name, r.model), r.axes.get("seed", cfg.seed), Path(r.run_dir) / r.model,
                     f"finetune.select={cfg.finetune.select} (epoch {r.metrics.get('selected_epoch')})",
                     verdicts[r.name]) for r in finished]
    registered = register(cfg, chosen, f"sweep {sweep.name} (MLflow run {parent_run_id})")
    if registered:
        print(closing_lines(cfg, registered))
    return registered
