"""The comparison table in the layout of the paper's Table 1."""

from __future__ import annotations

import math
from pathlib import Path

# Row order of the paper's Table 1: the base classifier, the comparators, then the ASAC rows.
ROW_ORDER = ("base", "plain", "adv_augment", "asac_fgsm", "asac_pgd")
COLUMNS = (("DEO", "{:.3f}"), ("DEOp", "{:.3f}"), ("DDP", "{:.3f}"), ("ACC", "{:.2f}"), ("CF_flip_rate", "{:.3f}"),
           ("IG_mouth_share", "{:.3f}"))


def format_table(results: dict[str, dict], label: str) -> str:
    """Markdown table: one row per model (the probe is not a target classifier and is left out)."""
    names = [n for n in ROW_ORDER if n in results] + sorted(n for n in results if n not in ROW_ORDER and n != "probe")
    header = ["Label", "Method", *(c for c, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = []
        for column, fmt in COLUMNS:
            value = results[name].get(column)
            cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        lines.append("| " + " | ".join([label, name, *cells]) + " |")
    return "\n".join(lines)


def plot_robustness(curves: dict[str, list[dict]], path: Path) -> None:
    """One PNG: M's accuracy (solid) and C's accuracy (dashed) on ASACs against ε, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, curve) in enumerate(curves.items()):
        eps = [p["eps"] for p in curve]
        ax.plot(eps, [p["target_ACC"] for p in curve], "-o", color=f"C{i}", label=f"{name}: M (target)")
        ax.plot(eps, [p["protected_ACC"] for p in curve], "--x", color=f"C{i}", label=f"{name}: C (protected)")
    ax.set_xlabel("ε of FGSM ASACs against C")
    ax.set_ylabel("accuracy on ASACs (%)")
    ax.set_title("Robustness to ASACs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
