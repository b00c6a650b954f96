"""The claims table: each claim of the paper as a paired difference over seeds, in each regime, with a verdict.

A sweep file may hold a `claims:` section (configs/sweeps/claims.yaml is the study that uses it):

    claims:
      regimes:                 # named slices of the trials, selected by axis values (see `matches`)
        strong: {data: {synthetic_bias: 0.9}}
        mild: {data: {synthetic_bias: 0.6}}
      tables:                  # one table per entry: its regime columns, in order
        main: [strong, mild]
      list:
        - id: C1
          claim: ASAC (FGSM) lowers DEO against the base
          paper: "Table 1, Smile: 0.050 vs 0.088"
          metric: DEO
          expect: lower        # lower | higher | none (no direction claimed: the verdict names the sign)
          treatment: {finetune: {mode: asac, attack: fgsm}}
          reference: base      # base (the trial's own base model) | same (the same trial, another metric:
                               # give reference_metric) | a selector of another setting, paired by seed
          effect: -0.038       # optional: the difference to power the study for (the report's power table)

In each regime a claim's measurement is the mean over seeds of treatment − reference, each seed's pair
sharing its base model and test images, with the 95% Student-t interval of the per-seed differences
(`stats.t_interval`). Verdict: `supported` when the interval lies wholly on the claimed side of 0,
`contradicted` when it lies wholly on the other side, `not detectable` otherwise (and always with fewer than
two seeds). A selector that matches several settings in a regime is an error, one that matches none leaves
the cell empty.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from distributed_asac.analysis import curve_metrics
from distributed_asac.errors import UserError
from distributed_asac.stats import (HIGHER, LOWER, POWER, Interval, detectable_effect,
                                    seeds_for_power, t_interval)

if TYPE_CHECKING:
    from .records import TrialRecord

EXPECT = ("lower", "higher", "none")
SUPPORTED, CONTRADICTED, NOT_DETECTABLE = "supported", "contradicted", "not detectable"
_CLAIM_KEYS = {"id", "claim", "paper", "metric", "expect", "treatment", "reference", "reference_metric", "effect"}


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str  # the claim in words
    paper: str  # the paper's evidence for it
    metric: str  # a trial metric (see `claim_metrics`)
    expect: str  # lower | higher | none: the sign of treatment − reference that the claim predicts
    treatment: dict[str, Any]  # selector of the treatment setting
    reference: Any  # "base", "same", or a selector of the reference setting
    reference_metric: Optional[str] = None  # the reference's metric; None: `metric`
    effect: Optional[float] = None  # the difference the study is powered to detect (the report's power table)


@dataclass(frozen=True)
class Claims:
    regimes: dict[str, dict[str, Any]]  # regime → selector
    tables: dict[str, list[str]]  # table → its regimes
    claims: list[Claim]

    def to_dict(self) -> dict[str, Any]:
        return {"regimes": self.regimes, "tables": self.tables, "list": [asdict(c) for c in self.claims]}


@dataclass(frozen=True)
class Measurement:
    claim: Claim
    regime: str
    interval: Optional[Interval]  # None: no trial in this regime matches the claim
    verdict: str
    sd: float = math.nan  # standard deviation of the per-seed differences (NaN below two seeds)
    per_seed: dict[Any, float] = field(default_factory=dict)  # seed → treatment − reference (what the interval is over)


def parse_claims(where: str, data: Any) -> Claims:
    """The `claims:` section of a sweep file (UserError naming `where` and the key on any problem)."""
    if not isinstance(data, dict) or set(data) != {"regimes", "tables", "list"}:
        raise UserError(f"{where}: 'claims' must hold exactly 'regimes', 'tables' and 'list'")
    regimes, tables, items = data["regimes"], data["tables"], data["list"]
    if not isinstance(regimes, dict) or not regimes or not all(isinstance(s, dict) for s in regimes.values()):
        raise UserError(f"{where}: 'claims.regimes' must map regime names to selectors such as "
                        "{data: {synthetic_bias: 0.9}}")
    if not isinstance(tables, dict) or not tables:
        raise UserError(f"{where}: 'claims.tables' must map table names to lists of regime names")
    for name, columns in tables.items():
        unknown = [r for r in columns or [] if r not in regimes] if isinstance(columns, list) else None
        if not columns or unknown is None or unknown:
            raise UserError(f"{where}: claims table {name!r} must list regimes of 'claims.regimes' "
                            f"({', '.join(regimes)}); got {columns!r}")
    if not isinstance(items, list) or not items:
        raise UserError(f"{where}: 'claims.list' must be a non-empty list of claims")
    claims = [_claim(where, item) for item in items]
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: 'claims.list' names a claim id twice: {sorted(i for i in ids if ids.count(i) > 1)[0]}")
    return Claims({str(k): v for k, v in regimes.items()}, {str(k): list(v) for k, v in tables.items()}, claims)


def _claim(where: str, item: Any) -> Claim:
    if not isinstance(item, dict) or "id" not in item:
        raise UserError(f"{where}: each entry of 'claims.list' must be a mapping with an 'id'; got {item!r}")
    here = f"{where}: claim {item['id']!r}"
    unknown = set(item) - _CLAIM_KEYS
    missing = {"claim", "paper", "metric", "expect", "treatment", "reference"} - set(item)
    if unknown or missing:
        raise UserError(f"{here}: {'unknown key ' + repr(sorted(unknown)[0]) if unknown else 'missing ' + repr(sorted(missing)[0])}"
                        f" (a claim has {', '.join(sorted(_CLAIM_KEYS))})")
    if item["expect"] not in EXPECT:
        raise UserError(f"{here}: 'expect' must be one of {', '.join(EXPECT)}; got {item['expect']!r}")
    if not isinstance(item["treatment"], dict) or not item["treatment"]:
        raise UserError(f"{here}: 'treatment' must be a selector mapping axes to values, e.g. {{order: random}}")
    reference = item["reference"]
    if reference not in ("base", "same") and not (isinstance(reference, dict) and reference):
        raise UserError(f"{here}: 'reference' must be base, same, or a selector mapping axes to values")
    if reference == "same" and not item.get("reference_metric"):
        raise UserError(f"{here}: 'reference: same' compares two metrics of one trial: give 'reference_metric'")
    effect = item.get("effect")
    if effect is not None and (isinstance(effect, bool) or not isinstance(effect, (int, float)) or effect == 0
                               or not math.isfinite(effect)):
        raise UserError(f"{here}: 'effect' must be a non-zero number (the difference to power the study for); "
                        f"got {effect!r}")
    return Claim(str(item["id"]), str(item["claim"]), str(item["paper"]), str(item["metric"]), item["expect"],
                 item["treatment"], reference, item.get("reference_metric"),
                 None if effect is None else float(effect))


def matches(axes: dict[str, Any], selector: dict[str, Any]) -> bool:
    """Whether a trial's axes hold every value of the selector; a mapping value (a section axis such as
    `data` or `finetune`) matches when each of its keys has the selector's value."""
    for axis, wanted in selector.items():
        if axis not in axes:
            return False
        value = axes[axis]
        if isinstance(wanted, dict):
            if not isinstance(value, dict) or any(k not in value or value[k] != v for k, v in wanted.items()):
                return False
        elif value != wanted:
            return False
    return True


def _setting(axes: dict[str, Any]) -> str:
    return json.dumps({a: v for a, v in axes.items() if a != "seed"}, sort_keys=True)


def select(records: Iterable[Any], regime: dict[str, Any], selector: dict[str, Any], where: str) -> dict[Any, Any]:
    """seed → the one record of `regime` matching `selector` (trial records or the sweep's trials: anything with
    `axes`); UserError when the selector does not single out one setting."""
    chosen = [r for r in records if matches(r.axes, regime) and matches(r.axes, selector)]
    settings = {_setting(r.axes) for r in chosen}
    if len(settings) > 1:
        raise UserError(f"{where}: the selector {json.dumps(selector)} matches {len(settings)} settings; "
                        f"add an axis value that tells them apart (e.g. {sorted(settings)[0]})")
    return {r.axes.get("seed"): r for r in chosen}


def measured(claims: Claims, claim: Claim, trials: list[Any], where: str) -> bool:
    """Whether some regime has trials of the claim's treatment (and of its reference setting, if it names one);
    a UserError where a selector singles out more than one setting."""
    found = False
    for name, regime in claims.regimes.items():
        here = f"{where}: claim {claim.id!r}, regime {name!r}"
        treated = select(trials, regime, claim.treatment, here)
        if isinstance(claim.reference, dict):
            found |= bool(treated) and bool(select(trials, regime, claim.reference, here))
        else:
            found |= bool(treated)
    return found


def check_claims(claims: Claims, trials: list[Any], where: str) -> None:
    """Every selector singles out at most one setting in each regime, and every claim is measured somewhere."""
    for claim in claims.claims:
        if not measured(claims, claim, trials, where):
            raise UserError(f"{where}: claim {claim.id!r} matches no trial in any regime; check its selectors "
                            "against the grids (python tune/sweep.py --dry-run lists the trials' axes)")


def claim_metrics(results: Optional[dict[str, Any]]) -> dict[str, float]:
    """A model's finite scalar results, plus its robustness curves flattened as `robust_<column>_eps_<ε>` and
    `robust_own_<column>_eps_<ε>` (the names its MLflow metrics have)."""
    out = {k: float(v) for k, v in (results or {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    out.update(curve_metrics(results or {}))
    return out


def verdict(interval: Optional[Interval], expect: str) -> str:
    """supported / contradicted / not detectable for a directional claim; lower / higher / no detectable
    difference (the interval's own verdict) when `expect` is none."""
    if interval is None or interval.n < 2 or math.isnan(interval.low):
        return NOT_DETECTABLE if expect != "none" else "n/a"
    side = interval.verdict()
    if expect == "none":
        return side
    if side not in (LOWER, HIGHER):
        return NOT_DETECTABLE
    return SUPPORTED if side == expect else CONTRADICTED


def seed_order(seed: Any) -> tuple:
    """Sort key of seeds: integers in numeric order (2 before 10), then anything else by its text."""
    return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def per_seed(finished: list[TrialRecord], claim: Claim, regime: dict[str, Any], where: str) -> dict[Any, float]:
    """seed → treatment − reference of the claim's metric in one regime (finished trials only; a seed with the
    metric missing on either side is left out)."""
    treated = select(finished, regime, claim.treatment, where)
    if claim.reference == "base":
        references = {seed: r.base for seed, r in treated.items()}
    elif claim.reference == "same":
        references = {seed: r.metrics for seed, r in treated.items()}
    else:
        references = {seed: r.metrics for seed, r in select(finished, regime, claim.reference, where).items()}
    out = {}
    for seed in sorted(treated, key=seed_order):
        t = claim_metrics(treated[seed].metrics).get(claim.metric)
        r = claim_metrics(references.get(seed)).get(claim.reference_metric or claim.metric)
        if seed in references and t is not None and r is not None:
            out[seed] = t - r
    return out


def measure(records: list[TrialRecord], claims: Claims) -> list[Measurement]:
    """Every claim in every regime, from the finished trial records."""
    finished = [r for r in records if r.status == "finished"]
    out = []
    for claim in claims.claims:
        for name, regime in claims.regimes.items():
            seeds = per_seed(finished, claim, regime, f"claim {claim.id!r}, regime {name!r}")
            differences = list(seeds.values())
            interval = t_interval(differences) if differences else None  # the per-seed differences' interval
            sd = statistics.stdev(differences) if len(differences) >= 2 else math.nan
            out.append(Measurement(claim, name, interval, verdict(interval, claim.expect), sd, seeds))
    return out


def _cell(m: Measurement) -> str:
    if m.interval is None:
        return "—"
    digits = 2 if abs(m.interval.estimate) >= 1 or "ACC" in m.claim.metric else 3
    spread = "" if m.interval.n < 2 else f" ± {m.interval.half_width:.{digits}f}"
    return f"{m.interval.estimate:+.{digits}f}{spread} (n={m.interval.n}) **{m.verdict}**"


def claims_table(measurements: list[Measurement], claims: Claims, table: str) -> str:
    """One table's markdown: claim | the paper's evidence | metric | per regime: Δ ± 95% t half-width, verdict.
    Claims measured in none of the table's regimes are left out."""
    columns = claims.tables[table]
    cells = {(m.claim.id, m.regime): m for m in measurements}
    lines = ["| Claim | The paper's evidence | Measured (treatment − reference) | "
             + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]
    for claim in claims.claims:
        row = [cells[(claim.id, r)] for r in columns]
        if all(m.interval is None for m in row):
            continue
        reference = (f"{claim.reference_metric or claim.metric} of the base model" if claim.reference == "base" else
                     f"{claim.reference_metric} of the same model" if claim.reference == "same" else
                     _selector_text(claim.reference))
        lines.append(f"| **{claim.id}** {claim.claim} | {claim.paper} | {claim.metric}: "
                     f"{_selector_text(claim.treatment)} − {reference} | " + " | ".join(map(_cell, row)) + " |")
    return "\n".join(lines)


def _selector_text(selector: dict[str, Any]) -> str:
    parts = []
    for axis, value in selector.items():
        if isinstance(value, dict):
            parts += [f"{k}={_value_text(v)}" for k, v in value.items()]
        else:
            parts.append(f"{axis}={_value_text(value)}")
    return ", ".join(parts)


def _value_text(value: Any) -> str:
    return "{" + ", ".join(map(str, value)) + "}" if isinstance(value, list) else str(value)


def plot_forest(measurements: list[Measurement], claims: Claims, path: Path) -> Path:
    """Each claim's paired difference with its 95% interval, one marker per regime; one panel per unit
    (`metric_unit`) so that DEO-scale and accuracy-scale differences keep their own axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = [m for m in measurements if m.interval is not None]
    panels = sorted({metric_unit(m.claim.metric) for m in shown}) or ["difference"]
    regimes = list(claims.regimes)
    rows = list(dict.fromkeys(m.claim.id for m in shown))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * max(len(rows), 4) + 1.5),
                             dpi=120, squeeze=False)
    colours = dict(zip(regimes, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(regimes)))
    for ax, panel in zip(axes[0], panels):
        ids = [c for c in rows if any(m.claim.id == c and metric_unit(m.claim.metric) == panel for m in shown)]
        for row, claim_id in enumerate(ids):
            here = [m for m in shown if m.claim.id == claim_id]  # in regime order; centred on the claim's tick
            for k, m in enumerate(here):
                spread = 0.0 if math.isnan(m.interval.low) else m.interval.half_width
                ax.errorbar([m.interval.estimate], [row + (k - (len(here) - 1) / 2) * 0.22], xerr=[spread], fmt="o",
                            capsize=3, markersize=4, color=colours[m.regime])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(ids)))
        ax.set_ylim(max(len(ids), 1) - 0.5, -0.5)  # first claim on top
        ax.set_yticklabels([f"{c}: {next(m.claim.metric for m in shown if m.claim.id == c)}" for c in ids], fontsize=7)
        ax.set_xlabel(f"treatment − reference ({panel})")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))  # narrow panels: default ticks of small numbers overlap
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[r]) for r in regimes]
    axes[0][0].legend(handles, regimes, fontsize=7, title="regime", title_fontsize=7)
    fig.suptitle("Claims: paired difference over seeds, 95% t-interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def metric_unit(metric: str) -> str:
    """The forest plot's panel of a metric: claims share an x axis only when their numbers share a unit."""
    if "ACC" in metric:
        return "accuracy points"
    if metric.split("_")[0] in ("DEO", "DEOp", "DDP"):
        return "fairness gap"
    if "cosine" in metric:
        return "cosine"
    if any(word in metric for word in ("share", "flip", "rate")):
        return "share"
    return metric


def power_table(measurements: list[Measurement]) -> list[str]:
    """Markdown lines of the power table (claims with an `effect`, in regimes with ≥ 2 seeds): the spread of the
    per-seed differences found here, the seeds that detect the claim's effect with 80% power at the 5% level, and
    the smallest effect these seeds detect with that power (stats.seeds_for_power, stats.detectable_effect)."""
    rows = [m for m in measurements if m.claim.effect is not None and not math.isnan(m.sd) and m.sd > 0]
    if not rows:
        return []
    lines = ["### Power", "",
             f"The seeds each claim needs to detect its `effect` with {POWER:.0%} power at the 5% level (paired t over "
             "seeds), from the spread of the per-seed differences measured here.", "",
             "| Claim | Metric | Effect | Regime | Seeds here | sd of per-seed differences | Seeds needed | "
             "Smallest effect these seeds detect |", "|---|---|---|---|---|---|---|---|"]
    for m in rows:
        needed = seeds_for_power(m.claim.effect, m.sd)
        lines.append(f"| {m.claim.id} | {m.claim.metric} | {m.claim.effect:+.4g} | {m.regime} | {m.interval.n} | "
                     f"{m.sd:.4g} | {needed} | {detectable_effect(m.sd, m.interval.n):.4g} |")
    return lines + [""]


def write_claims(records: list[TrialRecord], claims: Claims, measurements: list[Measurement],
                 out_dir: Path) -> tuple[str, list[Path]]:
    """claims.md (every table), claims.csv (one line per claim and regime) and claims_forest.png in `out_dir`, from
    `measure(records, claims)`; returns the markdown and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = ["## Claims", "",
                "Each cell: mean over seeds of treatment − reference, paired by seed (same base model and test images), "
                "± half-width of the 95% Student-t interval of the per-seed differences, the number of seeds, and the "
                "verdict: **supported** / **contradicted** when the interval lies wholly on the claimed / the other side "
                "of 0, **not detectable** otherwise; for a claim without a direction, the sign found.", ""]
    for table, columns in claims.tables.items():
        sections += [f"### Claims table `{table}` (regimes: {', '.join(columns)})", "",
                     claims_table(measurements, claims, table), ""]
    sections += power_table(measurements)
    per_seed_lines, per_seed_rows = per_seed_table(records, claims, measurements)
    sections += per_seed_lines
    sections += ["![claims forest plot](claims_forest.png)", ""]
    markdown = "\n".join(sections)
    (out_dir / "claims.md").write_text(markdown)
    with (out_dir / "claims.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["claim", "regime", "metric", "expect", "estimate", "ci95_low", "ci95_high", "seeds", "verdict"])
        for m in measurements:
            i = m.interval
            writer.writerow([m.claim.id, m.regime, m.claim.metric, m.claim.expect, *(
                (i.estimate, i.low, i.high, i.n) if i is not None else ("", "", "", 0)), m.verdict])
    paths = [out_dir / "claims.md", out_dir / "claims.csv"]
    if per_seed_rows:
        with (out_dir / "claims_per_seed.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(per_seed_rows[0]))
            writer.writeheader()
            writer.writerows(per_seed_rows)
        paths.append(out_dir / "claims_per_seed.csv")
    return markdown, [*paths, plot_forest(measurements, claims, out_dir / "claims_forest.png")]


def per_seed_table(records: list[TrialRecord], claims: Claims,
                   measurements: list[Measurement]) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown lines and CSV rows of each regime's seeds: the base's ACC and DEO (that of the first claim measured
    against the base; every trial of a seed on that base shares it) and each claim's treatment − reference at that
    seed (`measurements`' own), so that a reader sees the spread behind every interval and any outlying base."""
    finished = [r for r in records if r.status == "finished"]
    anchor = next((c for c in claims.claims if c.reference == "base"), None)
    lines, rows = [], []
    for name, regime in claims.regimes.items():
        where = f"regime {name!r}"
        columns = {m.claim.id: m.per_seed for m in measurements if m.regime == name}
        bases = {s: r.base or {} for s, r in select(finished, regime, anchor.treatment, where).items()} if anchor else {}
        seeds = sorted({s for values in columns.values() for s in values} | set(bases), key=seed_order)
        ids = [c.id for c in claims.claims if columns[c.id]]
        if not seeds or not ids:
            continue
        source = f"; the base is the one {anchor.id} is measured against" if anchor else ""
        lines += [f"### Per seed, regime `{name}`", "",
                  f"Each claim's treatment − reference at each seed (the intervals above are over these){source}.", "",
                  "| Seed | Base ACC | Base DEO | " + " | ".join(ids) + " |", "|" + "---|" * (3 + len(ids))]
        for seed in seeds:
            base = bases.get(seed, {})
            row = {"regime": name, "seed": seed, "base_ACC": base.get("ACC"), "base_DEO": base.get("DEO"),
                   **{i: columns[i].get(seed) for i in ids}}
            rows.append(row)
            cells = [_number(base.get("ACC"), 2), _number(base.get("DEO"), 3)]
            cells += [_number(columns[c.id].get(seed), 2 if "ACC" in c.metric else 3, sign=True)
                      for c in claims.claims if c.id in ids]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines, rows


def _number(value: Optional[float], digits: int, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
