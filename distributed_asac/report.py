"""The comparison table in the layout of the paper's Table 1."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .metrics import COLUMNS
from .rows import in_table_order
from .stats import HIGHER, LOWER, NONE, Interval



def _spread(interval: Interval, fmt: str) -> str:
    """How an interval is shown after its estimate: ` [low, high]` (bootstrap, not symmetric) or ` ± half-width`
    (t over seeds); nothing when it has no bounds (a single value)."""
    if math.isnan(interval.low):
        return ""
    if interval.method.startswith("bootstrap"):
        return f" [{fmt.format(interval.low)}, {fmt.format(interval.high)}]"
    return f" ± {fmt.format(interval.half_width)}"


def _cell(value, fmt: str) -> str:
    """A number, or an interval: `mean ± half-width` (t over seeds) or `value [low, high]` (bootstrap)."""
    if isinstance(value, Interval):
        return "n/a" if math.isnan(value.estimate) else fmt.format(value.estimate) + _spread(value, fmt)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def format_table(results: dict[str, dict], label: str) -> str:
    """Markdown table: one row per model (the probe is not a target classifier and is left out). A cell is
    a number (one run) or an `stats.Interval` (a comparison over seeds). Rows in the order of rows.py (the
    paper's Table 1), columns those of metrics.COLUMNS."""
    names = in_table_order(set(results) - {"probe"})
    header = ["Label", "Method", *(c.name for c in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [_cell(results[name].get(c.name), c.fmt) for c in COLUMNS]
        lines.append("| " + " | ".join([label, name, *cells]) + " |")
    return "\n".join(lines)


def _signed(value: float, fmt: str) -> str:
    return ("+" if value >= 0 else "−") + fmt.format(abs(value))


def format_paired(paired: list[dict]) -> str:
    """Markdown table of paired differences, one line per (row, reference): each cell `Δ ± half-width` and
    its verdict (`lower`, `higher`, `no detectable difference`)."""
    formats = {c.name: c.fmt for c in COLUMNS}
    metrics = list(dict.fromkeys(p["metric"] for p in paired))
    pairs = list(dict.fromkeys((p["row"], p["reference"]) for p in paired))
    lines = ["| Paired difference | " + " | ".join(f"Δ{m}" for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for row, reference in pairs:
        cells = []
        for metric in metrics:
            (found,) = [p["interval"] for p in paired if (p["row"], p["reference"], p["metric"]) == (row, reference, metric)]
            shown = f"{_difference(found, formats[metric])} **{found.verdict()}**"
            cells.append("n/a" if math.isnan(found.estimate) else shown)
        lines.append(f"| {row} − {reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference(interval: Interval, fmt: str) -> str:
    return f"{_signed(interval.estimate, fmt)}{_spread(interval, fmt)}"


def format_verdicts(paired: list[dict]) -> str:
    """The paired verdicts in a few markdown lines, one per (row, reference), those against plain fine-tuning
    first: the metrics found lower or higher, each with its difference and interval, then the rest."""
    pairs = sorted(dict.fromkeys((p["row"], p["reference"]) for p in paired), key=lambda pair: pair[1] != "plain")
    return "\n".join(f"- **{row} − {reference}**: {verdict_line(paired, row, reference)}" for row, reference in pairs)


def verdict_line(paired: list[dict], row: str, reference: str) -> str:
    """The verdicts of `row` − `reference` in one line: the metrics found lower or higher, each with its difference
    and interval, then the rest ('' if `paired` has no such pair)."""
    formats = {c.name: c.fmt for c in COLUMNS}
    found = [p for p in paired if (p["row"], p["reference"]) == (row, reference)]
    parts = [f"{verdict} " + ", ".join(f"{p['metric']} {_difference(p['interval'], formats[p['metric']])}"
                                       for p in found if p["interval"].verdict() == verdict)
             for verdict in (LOWER, HIGHER) if any(p["interval"].verdict() == verdict for p in found)]
    undecided = [p["metric"] for p in found if p["interval"].verdict() == NONE]
    if undecided:
        parts.append(f"{NONE} in {', '.join(undecided)}")
    return "; ".join(parts)


def plot_paired(paired: list[dict], path: Path, subtitle: str) -> None:
    """A forest plot: one panel per metric, each paired difference as a point with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(p["metric"] for p in paired))
    panels = max(len(metrics), 1)
    rows = len(paired) / panels  # pairs per panel
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 2.0 + 0.45 * rows), sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        entries = [p for p in paired if p["metric"] == metric]
        for y, p in enumerate(entries):
            interval = p["interval"]
            colour = {"lower": "C0", "higher": "C3"}.get(interval.verdict(), "0.4")
            ax.errorbar(interval.estimate, y, xerr=[[interval.estimate - interval.low], [interval.high - interval.estimate]],
                        fmt="o", color=colour, capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(entries)), [f"{p['row']} − {p['reference']}" for p in entries])
        ax.set_title(f"Δ{metric}")
    fig.suptitle(subtitle, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_robustness(curves: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """One PNG, two panels, one colour per model (curves: name → its `robustness` and `robustness_own_C`): left,
    ASACs made against the C that stage 3 attacks (the paper's §4.2.1): each model's M (solid) and that C
    (dotted, the same images for every model); right, ASACs against each model's own C: its M (solid) and C
    (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = (("robustness", "ASACs of the attacked C (the base's)", "attacker_protected_ACC", ":"),
              ("robustness_own_C", "ASACs of each model's own C", "protected_ACC", "--"))
    for ax, (key, title, c_column, style) in zip(axes, panels):
        for i, (name, model_curves) in enumerate(curves.items()):
            curve = model_curves.get(key, [])
            eps = [p["eps"] for p in curve]
            ax.plot(eps, [p["target_ACC"] for p in curve], "-o", color=f"C{i}", label=f"{name}: M (target)")
            if curve and c_column in curve[0]:
                ax.plot(eps, [p[c_column] for p in curve], style + "x", color=f"C{i}", label=f"{name}: C (protected)")
        ax.set_xlabel("ε of FGSM ASACs")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("accuracy on ASACs (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ig_figure(images: torch.Tensor, labels: list[tuple[int, int]], boxes: torch.Tensor,
                   maps: dict[str, torch.Tensor], path: Path) -> int:
    """The paper's Fig. 3 for one run: a row per image (images [n, 3, H, W] in [0, 1], their (y, a) labels and
    mouth boxes [n, 4]), the image, then |IG| of each model (maps: name → [n, H, W]) with the mouth box and
    its share of |IG|. Returns the number of panels drawn (n · (1 + models))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .analysis import box_share

    n, columns = len(images), 1 + len(maps)
    fig, axes = plt.subplots(n, columns, figsize=(1.6 * columns, 1.6 * n + 0.4), squeeze=False)
    for i in range(n):
        panels = [("image", images[i].permute(1, 2, 0).numpy(), None)]
        panels += [(name, m[i].numpy(), float(box_share(m[i:i + 1], boxes[i:i + 1]))) for name, m in maps.items()]
        for j, (name, picture, share) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(picture, cmap=None if share is None else "inferno")
            x0, y0, x1, y1 = boxes[i].tolist()
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", lw=1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if share is None:
                ax.set_ylabel("y={} a={}".format(*labels[i]), fontsize=7)
            else:
                ax.set_xlabel(f"mouth {share:.0%}", fontsize=7)
    fig.suptitle("|Integrated Gradients| of M's true-class logit (cyan: mouth box)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return n * columns
