"""Selection rules (distributed_asac/selection.py) against hand-made validation histories, and stage 3 keeping the
epoch its rule chose."""

import math

import pytest
import torch

from distributed_asac import selection
from distributed_asac.config import SELECTION_RULES, load_config

OVERRIDES = ("data.synthetic_num_images=160", "base.epochs=1", "probe.epochs=1", "finetune.lr=0.01",
             "analysis.robustness_images=0", "analysis.ig_images=0")
# Three epochs: valid accuracy peaks at epoch 2, worst-group accuracy at epoch 1, balanced accuracy at epoch 3.
HISTORY = [
    {"valid_ACC": 80.0, "valid_worst_group_ACC": 70.0, "balanced_valid_ACC": 75.0},
    {"valid_ACC": 90.0, "valid_worst_group_ACC": 40.0, "balanced_valid_ACC": 76.0},
    {"valid_ACC": 85.0, "valid_worst_group_ACC": 60.0, "balanced_valid_ACC": 79.0},
]


@pytest.mark.parametrize("rule, epoch", [("last", 3), ("avg_valid", 2), ("worst_group_valid", 1),
                                         ("balanced_valid", 3)])
def test_each_rule_keeps_the_epoch_its_valid_metric_peaks_at(rule, epoch):
    assert selection.selected_epoch(rule, HISTORY) == epoch


def test_ties_go_to_the_earliest_epoch_and_nan_never_wins():
    tied = [{"valid_ACC": 88.0}, {"valid_ACC": 88.0}, {"valid_ACC": math.nan}]
    assert selection.selected_epoch("avg_valid", tied) == 1
    late = [{"valid_worst_group_ACC": math.nan}, {"valid_worst_group_ACC": 10.0}]
    assert selection.selected_epoch("worst_group_valid", late) == 2


def test_the_config_accepts_exactly_the_rules_selection_defines():
    assert set(SELECTION_RULES) == set(selection.SCORES)
    for rule in SELECTION_RULES:
        assert load_config(None, [f"finetune.select={rule}"]).finetune.select == rule


def test_stage3_keeps_the_weights_of_the_epoch_the_rule_chose(tmp_path, smoke_config):
    """A 3-epoch fine-tune under worst_group_valid: the saved model is the one of the epoch whose logged valid
    worst-group accuracy is highest (read back from MLflow), and the summary names that epoch."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from distributed_asac import pipeline

    cfg = smoke_config(tmp_path, *OVERRIDES, "finetune.epochs=3", "finetune.select=worst_group_valid")
    out = pipeline.run(cfg, variants=[{"mode": "plain"}])
    plain = out.results["plain"]
    client = MlflowClient(cfg.tracking.uri)
    [run] = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
             if r.data.tags.get("mode") == "plain"]
    history = [{"valid_worst_group_ACC": m.value}
               for m in sorted(client.get_metric_history(run.info.run_id, "finetune/valid_worst_group_ACC"),
                               key=lambda m: m.step)]
    assert len(history) == 3
    chosen = selection.selected_epoch("worst_group_valid", history)
    assert plain["selected_epoch"] == chosen
    assert plain["selected_valid_worst_group_ACC"] == pytest.approx(history[chosen - 1]["valid_worst_group_ACC"])
    # The same seed trained for exactly `chosen` epochs and kept as it ends: the same weights, bit for bit.
    shorter = pipeline.run(smoke_config(tmp_path / "shorter", *OVERRIDES, f"finetune.epochs={chosen}",
                                        "finetune.select=last", f"base_checkpoint={out.run_dir / 'probe'}"),
                           variants=[{"mode": "plain"}])
    saved = load_file(str(out.run_dir / "plain" / "model.safetensors"))
    expected = load_file(str(shorter.run_dir / "plain" / "model.safetensors"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
