"""The sweep's report: a table per grid in the layout of the paper's Tables 3–6, per-trial CSV, Pareto plot.

A grid's table has one row per setting of its axes; each cell is the mean over seeds ± the half-width of
its 95% Student-t interval over seeds (shown when there are two or more). Grids with an axis that changes
the base model (backbone, target, dataset) also get the base classifier's rows first, as the paper's
Table 3 does. Below each table, every setting is compared with the grid's first setting (its reference:
list it first), paired by seed — the same base model and test images — as a mean difference with its 95%
t-interval and a verdict (`lower`, `higher`, `no detectable difference`; distributed_asac/stats.py).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional

from distributed_asac.metrics import COLUMNS
from distributed_asac.stats import paired_difference, t_interval

from .between import Other, between, write_between
from .claims import Claims, measure, write_claims
from .records import TrialRecord, status_counts
from .spec import AXES, is_base_key

METRICS = tuple((c.name, c.fmt) for c in COLUMNS if c.of_counts is not None)  # the headline metrics, as the demo shows them
# Shown in the grid tables beside METRICS when the trials report it (fine-tunes do).
EXTRA = (("balanced_valid_DEO_swing", "{:.3f}"),)


def is_base_axis(axis: str) -> bool:
    return axis != "seed" and is_base_key(AXES.get(axis, axis))


def write_report(records: list[TrialRecord], grids: dict[str, list[str]], out_dir: Path, title: str,
                 claims: Optional[Claims] = None, against: Optional[Other] = None) -> list[Path]:
    """Write report.md, `<grid>.csv` per grid, trials.csv and pareto.png into `out_dir` (and, for a sweep
    with a claims section, the claims tables first, claims.csv and claims_forest.png; with `against`, another
    sweep, the claims both state compared between the two, and between.csv); return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, paths = [f"# {title}", "", _summary(records), ""], []
    if claims is not None:
        measurements = measure(records, claims)
        markdown, claim_paths = write_claims(records, claims, measurements, out_dir)
        sections += [markdown, ""]
        paths += claim_paths
    if claims is not None and against is not None:
        comparisons, skipped = between(measurements, claims, against)
        sections += [write_between(comparisons, skipped, against.name, out_dir), ""]
        paths.append(out_dir / "between.csv")
    for grid, axes in grids.items():
        grid_records = [r for r in records if grid in r.grids]
        rows = grid_rows(grid_records, axes)
        sections += [f"## Grid `{grid}`", "", markdown_table(rows, axes), ""]
        paired = paired_rows(grid_records, axes)
        if paired:
            sections += [paired_table(paired, axes), ""]
        paths.append(_write_csv(out_dir / f"{grid}.csv", _grid_csv_rows(rows, axes)))
    sections += ["## Time", "", time_table(records, grids), ""]
    sections += ["## Trials", "", _trials_table(records), "", "![fairness-accuracy](pareto.png)", ""]
    paths.append(_write_csv(out_dir / "trials.csv", _trial_csv_rows(records)))
    paths.append(plot_pareto(records, out_dir / "pareto.png"))
    (out_dir / "report.md").write_text("\n".join(sections))
    return [out_dir / "report.md", *paths]


def grid_rows(records: list[TrialRecord], axes: list[str]) -> list[dict[str, Any]]:
    """Rows of one grid: base classifiers (when an axis changes the base), then one per setting of the axes."""
    base_axes = [a for a in axes if is_base_axis(a)]
    rows = []
    if base_axes:
        bases: dict[str, dict[int, dict]] = {}  # base setting → seed → base metrics (trials share bases)
        for record in records:
            if record.base:
                bases.setdefault(_key(record, base_axes), {})[record.axes.get("seed")] = record.base
        rows += [_row("base", json.loads(key), list(per_seed.values()), len(per_seed)) for key, per_seed in bases.items()]
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(_key(record, axes), []).append(record)
    for key, group in groups.items():
        finished = [r.metrics for r in group if r.status == "finished"]
        model = next((r.model for r in group if r.model), "")
        row = _row(model, json.loads(key), finished, len(group))
        row["errors"] = sorted({r.error for r in group if r.error})
        row["pending"] = sum(r.status == "pending" for r in group)
        row["stopped"] = sum(r.status == "stopped" for r in group)
        rows.append(row)
    return rows


def _key(record: TrialRecord, axes: list[str]) -> str:
    return json.dumps({a: record.axes.get(a) for a in axes})


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _row(model: str, setting: dict[str, Any], results: list[dict], total: int) -> dict[str, Any]:
    """stats[metric] = (mean over seeds, half-width of its 95% t-interval or None for fewer than 2 seeds)."""
    stats = {}
    for metric, _ in METRICS + EXTRA:
        interval = t_interval([r[metric] for r in results if _finite(r.get(metric))])
        stats[metric] = (None if interval.n == 0 else interval.estimate,
                         None if interval.n < 2 else interval.half_width)
    return {"model": model, "setting": setting, "stats": stats, "n": len(results), "total": total}


def paired_rows(records: list[TrialRecord], axes: list[str]) -> list[dict[str, Any]]:
    """Each fine-tuned setting of a grid against the grid's first setting with the same base (the same values
    of the axes that change the base model, e.g. the dataset; a grid of base axes only has one reference),
    paired by seed: per metric the `stats.Interval` of the per-seed differences (seeds where either trial did
    not finish are left out)."""
    by_setting: dict[str, dict[Any, dict]] = {}
    for record in records:
        if record.status == "finished":
            by_setting.setdefault(_key(record, [a for a in axes if a != "seed"]), {})[record.axes.get("seed")] = record
    base_axes = _grouping_axes(axes)
    references: dict[str, str] = {}  # base setting → the key of its first fine-tuned setting
    out = []
    for key, per_seed in by_setting.items():
        setting = json.loads(key)
        reference_key = references.setdefault(json.dumps({a: setting[a] for a in base_axes}), key)
        if reference_key == key:
            continue
        reference = by_setting[reference_key]
        seeds = [s for s in per_seed if s in reference]
        intervals = {m: paired_difference([per_seed[s].metrics[m] for s in seeds],
                                          [reference[s].metrics[m] for s in seeds])
                     for m, _ in METRICS + EXTRA if seeds and all(_finite(per_seed[s].metrics.get(m)) and
                                                          _finite(reference[s].metrics.get(m)) for s in seeds)}
        out.append({"setting": setting, "reference": json.loads(reference_key), "seeds": seeds, "intervals": intervals})
    return out


def _grouping_axes(axes: list[str]) -> list[str]:
    """The base axes a grid's pairs must share, when the grid also varies something else."""
    base = [a for a in axes if is_base_axis(a)]
    return base if any(a != "seed" and a not in base for a in axes) else []


def paired_table(paired: list[dict[str, Any]], axes: list[str]) -> str:
    shown = [a for a in axes if a != "seed"]
    columns = [(m, fmt) for m, fmt in METRICS + EXTRA if any(m in row["intervals"] for row in paired)]
    grouping = _grouping_axes(axes)
    reference = ", ".join(f"{a}={format_setting(paired[0]['reference'][a])}" for a in shown if a not in grouping)
    same_base = f" with the same {', '.join(grouping)}" if grouping else ""
    lines = [f"Paired by seed against the reference setting ({reference}){same_base}: mean difference ± 95% "
             "t-interval, verdict.",
             "", "| " + " | ".join([*shown, *(f"Δ{m}" for m, _ in columns), "Seeds"]) + " |",
             "|" + "---|" * (len(shown) + len(columns) + 1)]
    for row in paired:
        cells = [format_setting(row["setting"].get(a, "—")) for a in shown]
        for metric, fmt in columns:
            interval = row["intervals"].get(metric)
            if interval is None or math.isnan(interval.low):
                cells.append("n/a" if interval is None else fmt.format(interval.estimate))
            else:
                cells.append(f"{interval.estimate:+{fmt[2:-1]}} ± {fmt.format(interval.half_width)} {interval.verdict()}")
        lines.append("| " + " | ".join(cells + [str(len(row["seeds"]))]) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], axes: list[str]) -> str:
    extra = [(m, fmt) for m, fmt in EXTRA if any(row["stats"][m][0] is not None for row in rows)]
    header = ["Model", *axes, *(m for m, _ in METRICS + tuple(extra)), "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], *(format_setting(row["setting"].get(a, "—")) for a in axes)]
        for metric, fmt in METRICS + tuple(extra):
            mean, half = row["stats"][metric]
            cells.append(_missing(row) if mean is None else fmt.format(mean) + ("" if half is None else " ± " + fmt.format(half)))
        lines.append("| " + " | ".join(cells + [_seeds_cell(row)]) + " |")
    return "\n".join(lines)


def _unfinished(row: dict[str, Any]) -> dict[str, int]:
    """How many of a row's trials failed, were stopped early (ASHA) and are pending."""
    pending, stopped = row.get("pending", 0), row.get("stopped", 0)
    return {"failed": row["total"] - row["n"] - pending - stopped, "stopped early": stopped, "pending": pending}


def _missing(row: dict[str, Any]) -> str:
    """A metric cell without a number: what became of the row's trials when none finished, else n/a."""
    if row["n"]:
        return "n/a"
    counts = _unfinished(row)
    return next((what for what, count in counts.items() if count == row["total"]), "none finished")


def _seeds_cell(row: dict[str, Any]) -> str:
    if row["n"] == row["total"]:
        return str(row["n"])
    parts = [f"{count} {what}" for what, count in _unfinished(row).items() if count]
    return f"{row['n']}/{row['total']} ({', '.join(parts)})"


def format_setting(value: Any) -> str:
    """ε sets as the paper writes them ({0.001, 0.01}); section mappings as k=v pairs."""
    if isinstance(value, list):
        return "{" + ", ".join(map(str, value)) + "}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _summary(records: list[TrialRecord]) -> str:
    counts = status_counts(records)
    stopped = f"{counts['stopped']} stopped early by ASHA (left out of the cells), " if counts["stopped"] else ""
    return (f"{len(records)} trials: {counts['finished']} finished, {stopped}{counts['failed']} failed, "
            f"{counts['pending']} pending. Cells: mean over seeds ± half-width of the 95% Student-t interval over seeds "
            "(when 2 or more).")


def time_table(records: list[TrialRecord], grids: dict[str, list[str]]) -> str:
    """Where a sweep's time went: per grid, the seconds its finished, stopped and failed trials ran (a trial that
    trained its base model counts that too); then the sweep's wall time, first start to last end of its records."""
    lines = ["| Grid | Trials | Finished s | Stopped early s | Failed s |", "|---|---|---|---|---|"]
    for grid in grids:
        mine = [r for r in records if grid in r.grids]
        spent = {s: sum(r.seconds or 0.0 for r in mine if r.status == s) for s in ("finished", "stopped", "failed")}
        lines.append(f"| {grid} | {len(mine)} | {spent['finished']:.0f} | {spent['stopped']:.0f} | {spent['failed']:.0f} |")
    spans = [(r.started, r.started + r.seconds) for r in records if r.started is not None and r.seconds is not None]
    if spans:
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        lines += ["", f"Wall time of the recorded trials: {wall:.0f} s (the first one's start to the last one's end; "
                      "a resumed sweep's gaps between attempts included)."]
    return "\n".join(lines)


def _trials_table(records: list[TrialRecord]) -> str:
    lines = ["| Trial | Status | " + " | ".join(m for m, _ in METRICS) + " | Error |", "|" + "---|" * (len(METRICS) + 3)]
    for r in records:
        cells = [_fmt(r.metrics.get(m), fmt) for m, fmt in METRICS]
        error = (r.error or "").replace("|", "/").replace("\n", " ")[:200]
        status = f"stopped after epoch {r.stopped_epoch}" if r.status == "stopped" else r.status
        lines.append(f"| {r.name} | {status} | " + " | ".join(cells) + f" | {error} |")
    return "\n".join(lines)


def _fmt(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _grid_csv_rows(rows: list[dict[str, Any]], axes: list[str]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        line = {"model": row["model"], **{a: format_setting(row["setting"].get(a, "—")) for a in axes}}
        for metric, _ in METRICS:
            line[f"{metric}_mean"], line[f"{metric}_ci95_halfwidth"] = row["stats"][metric]
        line.update(seeds_ok=row["n"], seeds_total=row["total"], errors="; ".join(row.get("errors", [])))
        out.append(line)
    return out


def _trial_csv_rows(records: list[TrialRecord]) -> list[dict[str, Any]]:
    axes = list(dict.fromkeys(a for r in records for a in r.axes))
    return [{"trial": r.name, "status": r.status, "grids": "+".join(r.grids),
             **{a: format_setting(r.axes[a]) if a in r.axes else "" for a in axes},
             "model": r.model or "", **{m: r.metrics.get(m) for m, _ in METRICS},
             **{f"base_{m}": (r.base or {}).get(m) for m, _ in METRICS},
             "seconds": r.seconds, "stopped_epoch": r.stopped_epoch or "", "error": r.error or ""} for r in records]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    fields = list(dict.fromkeys(k for row in rows for k in row)) or ["empty"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (DEO, ACC) that no other point beats on both: lower DEO and higher ACC."""
    def dominated(i: int) -> bool:
        d, a = points[i]
        return any(d2 <= d and a2 >= a and (d2, a2) != (d, a) for d2, a2 in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: points[i])


def _points(records: list[TrialRecord]) -> list[dict[str, Any]]:
    """One point per setting (seeds averaged): every fine-tuned setting, then every distinct base classifier."""
    finished = [r for r in records if r.status == "finished"]
    settings = [a for a in dict.fromkeys(a for r in records for a in r.axes) if a != "seed"]
    base_axes = [a for a in settings if is_base_axis(a)]
    points = []
    for kind, axes, source in (("fine-tuned", settings, "metrics"), ("base", base_axes, "base")):
        groups: dict[str, dict[Any, dict]] = {}
        for r in finished:
            if getattr(r, source):
                groups.setdefault(_key(r, axes), {})[r.name if kind != "base" else r.axes.get("seed")] = getattr(r, source)
        for key, results in groups.items():
            row = _row(kind, json.loads(key), list(results.values()), len(results))
            if row["stats"]["DEO"][0] is not None and row["stats"]["ACC"][0] is not None:
                label = ", ".join(format_setting(v) for v in row["setting"].values() if v is not None)
                points.append({"kind": kind, "label": f"base {label}".strip() if kind == "base" else label or kind, **row})
    return points


def plot_pareto(records: list[TrialRecord], path: Path) -> Path:
    """Scatter of DEO (x, lower is fairer) against ACC (y), error bars over seeds, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _points(records)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for kind, marker in (("fine-tuned", "o"), ("base", "s")):
        chosen = [p for p in points if p["kind"] == kind]
        if chosen:
            ax.errorbar([p["stats"]["DEO"][0] for p in chosen], [p["stats"]["ACC"][0] for p in chosen],
                        xerr=[p["stats"]["DEO"][1] or 0 for p in chosen], yerr=[p["stats"]["ACC"][1] or 0 for p in chosen],
                        fmt=marker, capsize=3, label=kind, alpha=0.8)
    front = pareto_front([(p["stats"]["DEO"][0], p["stats"]["ACC"][0]) for p in points])
    if front:
        ax.step([points[i]["stats"]["DEO"][0] for i in front], [points[i]["stats"]["ACC"][0] for i in front],
                where="post", color="black", linewidth=1, label="Pareto front")
        for i in front:
            ax.annotate(points[i]["label"], (points[i]["stats"]["DEO"][0], points[i]["stats"]["ACC"][0]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("DEO (lower is fairer)")
    ax.set_ylabel("ACC (%)")
    ax.set_title("Fairness–accuracy trade-off (mean over seeds)")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
