"""The whole method end to end on the smoke config: outputs and MLflow runs are read back and checked."""

import csv
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distributed_asac import pipeline
from distributed_asac.checkpoint import load_checkpoint
from distributed_asac.config import Config, load_config
from distributed_asac.demo import row_variants

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smoke_config):
    tmp_path = tmp_path_factory.mktemp("smoke")
    cfg = smoke_config(tmp_path)
    out = pipeline.run(cfg, variants=row_variants("plain,asac_fgsm,asac_pgd"))
    assert out.run_dir.parent == tmp_path / "runs" / "smoke"
    return tmp_path, cfg, out.results, out.run_dir


def test_results_files_read_back(smoke_run):
    tmp_path, cfg, results, run_dir = smoke_run
    assert set(results) == {"base", "probe", "plain", "asac_fgsm", "asac_pgd"}
    merged = json.loads((run_dir / "results.json").read_text())
    assert merged.keys() == results.keys()
    n_test = merged["base"]["n"]
    for name in results:
        folder = run_dir / name
        own = json.loads((folder / "results.json").read_text())[name]
        assert own["DEO"] == pytest.approx(results[name]["DEO"], nan_ok=True)
        with (folder / "predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n_test and len({r["image_id"] for r in rows}) == n_test  # each test image once
        accuracy = 100 * sum(r["y"] == r["y_hat"] for r in rows) / n_test
        assert accuracy == pytest.approx(own["ACC"])  # the CSV audits the reported number
        flips = sum(r["y_hat"] != r["y_hat_twin"] for r in rows) / n_test
        assert flips == pytest.approx(own["CF_flip_rate"])
        assert json.loads((folder / "replicas.json").read_text())["world_size"] == 1
    assert "| Smiling | asac_fgsm |" in (run_dir / "table.md").read_text()


def test_robustness_and_mechanism_against_the_stage_3_attack_c(smoke_run):
    """Every row's `robustness` attacks the same C (the probe's, which stage 3 attacks): the attacking C's accuracy
    is the same for every row; at ε = 0 both curves are the clean images; the base row's curves are the probe's
    (its M is the base's), and the base's own results.json, written before the probe existed, has none."""
    _, cfg, results, run_dir = smoke_run
    attacker = [p["attacker_protected_ACC"] for p in results["plain"]["robustness"]]
    for name in ("plain", "asac_fgsm", "asac_pgd"):
        curve, own = results[name]["robustness"], results[name]["robustness_own_C"]
        assert [p["attacker_protected_ACC"] for p in curve] == attacker
        assert curve[0]["target_ACC"] == own[0]["target_ACC"] and curve[0]["eps"] == own[0]["eps"] == 0
        assert -1 <= results[name]["grad_cosine_q25"] <= results[name]["grad_cosine_median"] <= 1
        assert f"asac_flips_M_eps_{cfg.finetune.eps[-1]:g}" in results[name]
    probe_curve = results["probe"]["robustness"]
    assert results["base"]["robustness"] == probe_curve == results["probe"]["robustness_own_C"]
    assert [p["protected_ACC"] for p in probe_curve] == attacker  # the probe's C is the attacking C
    assert results["base"]["grad_cosine_mean"] == results["probe"]["grad_cosine_mean"]
    assert "robustness" not in json.loads((run_dir / "base" / "results.json").read_text())["base"]
    asac = results["asac_fgsm"]
    assert 0 <= asac["attack_success_rate"] <= asac["attacked_C_clean_accuracy"] <= 1
    assert "attack_success_rate" not in results["plain"]


def test_checkpoint_reloads_to_the_same_weights(smoke_run):
    tmp_path, cfg, results, run_dir = smoke_run
    model, saved_cfg = load_checkpoint(run_dir / "asac_fgsm")
    assert saved_cfg.finetune.mode == "asac" and saved_cfg.data.root == cfg.data.root
    assert set(model.state_dict()) >= {"target_head.weight", "protected_head.weight"}


def test_mlflow_runs_read_back(smoke_run):
    tmp_path, cfg, results, run_dir = smoke_run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == set(results)
    for name, run in by_name.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["finetune.alpha"] == "0.5" and run.data.params["data.image_size"] == "32"
        assert run.data.metrics["test_ACC"] == pytest.approx(results[name]["ACC"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"results.json", "predictions.csv", "model.safetensors", "config.yaml"} <= artifacts
    asac = by_name["asac_fgsm"]
    history = client.get_metric_history(asac.info.run_id, "finetune/loss_asac")
    assert len(history) == cfg.finetune.epochs
    for key in ("finetune/attack_success_rate", "finetune/attacked_C_clean_accuracy", "finetune/asac_flips_M_rate",
                "finetune/mean_DS_eps_0.01", "grad_cosine_mean", "robust_own_protected_ACC_eps_0.05",
                "finetune/images_per_s", "finetune/loss_clean", "finetune/loss"):
        assert key in asac.data.metrics
    assert "base/valid_ACC" in by_name["base"].data.metrics


def test_same_seed_same_numbers(smoke_run, tmp_path, smoke_config):
    _, _, results, _ = smoke_run
    again = pipeline.run(smoke_config(tmp_path, "experiment=again"), variants=[{"mode": "base"}]).results
    for name in ("base", "probe"):
        assert again[name] == results[name]


def test_failed_run_is_marked_and_damages_nothing(smoke_run, tmp_path, monkeypatch, smoke_config):
    cfg = smoke_config(tmp_path, "experiment=fails", "probe.epochs=1")
    first = pipeline.run(cfg, variants=[{"mode": "base"}])
    run_dir = first.run_dir
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(pipeline, "finetune", broken)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run(smoke_config(tmp_path, "experiment=fails", f"base_checkpoint={run_dir / 'probe'}"))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    statuses = sorted((r.info.run_name, r.info.status) for r in runs)
    assert statuses == [("asac_fgsm", "FAILED"), ("base", "FINISHED"), ("probe", "FINISHED")]
    assert first.results["base"]["n"] > 0


def test_demo_yaml_is_the_defaults_plus_its_seeds():
    demo, defaults = load_config(REPO / "configs" / "demo.yaml").flat(), Config().flat()
    assert {k for k in defaults if demo[k] != defaults[k]} == {"seeds"}
    assert len(demo["seeds"]) >= 3
