"""The comparator rows: one registered function in rows.py is a row everywhere (config, demo, tables), in the
paper's order."""

from __future__ import annotations

import torch

from distributed_asac.config import help_text, load_config
from distributed_asac.demo import row_variants
from distributed_asac.report import format_table
from distributed_asac.rows import MODES, Chunk, in_table_order, mode, row_name, table_rows


def test_the_rows_are_the_papers_table_1_in_order():
    assert list(table_rows()) == ["base", "plain", "adv_augment", "gan_augment", "asac_fgsm", "asac_pgd",
                                  "oracle_counterfactual", "resample", "group_dro", "dfr", "jtt"]
    assert row_variants("asac_pgd,plain") == [{"mode": "asac", "attack": "pgd"}, {"mode": "plain"}]
    assert row_name(load_config(None, ["finetune.attack=pgd"]).finetune) == "asac_pgd"
    assert row_name(load_config(None, ["finetune.mode=adv_augment", "finetune.attack=pgd"]).finetune) == "adv_augment"
    assert in_table_order({"zeta", "asac_fgsm", "alpha", "base"}) == ["base", "asac_fgsm", "alpha", "zeta"]


def test_a_new_comparator_is_one_registered_function(monkeypatch):
    """Registered with nothing else edited, a mode is a valid finetune.mode (listed in --help), a --rows choice,
    the row name of its config and a table row after the ones registered before it."""
    monkeypatch.setattr(MODES, "_items", dict(MODES._items))  # the registration below ends with the test

    @mode("clean_twice")
    def clean_twice(ctx, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        return [Chunk(torch.cat([x, x]), torch.cat([y, y]))] * len(ctx.magnitudes)

    cfg = load_config(None, ["finetune.mode=clean_twice"])
    assert row_name(cfg.finetune) == "clean_twice" and "clean_twice" in help_text()
    assert row_variants("clean_twice") == [{"mode": "clean_twice"}]
    results = {name: {"DEO": 0.1, "ACC": 90.0} for name in ("clean_twice", "asac_fgsm", "base", "probe")}
    rows = [line.split(" | ")[1] for line in format_table(results, "Smiling").splitlines()[2:]]
    assert rows == ["base", "asac_fgsm", "clean_twice"]  # the probe is no target classifier: never a row
