"""The comparison table in the layout of the paper's Table 1."""

from __future__ import annotations

import math

# Row order of the paper's Table 1: the base classifier, the comparators, then the ASAC rows.
ROW_ORDER = ("base", "plain", "adv_augment", "asac_fgsm", "asac_pgd")
COLUMNS = (("DEO", "{:.3f}"), ("DEOp", "{:.3f}"), ("DDP", "{:.3f}"), ("ACC", "{:.2f}"), ("CF_flip_rate", "{:.3f}"))


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
