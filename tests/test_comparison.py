"""The demo's comparison over seeds on the smoke config: results.json, table, plot and MLflow read back."""

import csv
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from distributed_asac import pipeline
from distributed_asac.comparison import compare
from distributed_asac.config import load_config
from distributed_asac.demo import row_variants
from distributed_asac.metrics import HEADLINE
from distributed_asac.stats import bootstrap_interval, paired_difference, t_interval

REPO = Path(__file__).resolve().parents[1]


def test_results_hold_each_seed_and_the_aggregate(compared):
    tmp, out = compared
    saved = json.loads((out.run_dir / "results.json").read_text())
    assert saved["seeds"] == [3, 5] and set(saved["per_seed"]) == {"3", "5"}
    for seed in ("3", "5"):  # each seed's numbers are its own pipeline run's
        own = json.loads((out.run_dir / f"seed_{seed}" / "results.json").read_text())
        assert saved["per_seed"][seed]["asac_fgsm"]["DEO"] == pytest.approx(own["asac_fgsm"]["DEO"])
    deo = [saved["per_seed"][s]["asac_fgsm"]["DEO"] for s in ("3", "5")]
    assert saved["aggregate"]["asac_fgsm"]["DEO"]["estimate"] == pytest.approx(sum(deo) / 2)
    assert saved["aggregate"]["asac_fgsm"]["DEO"]["high"] == pytest.approx(t_interval(deo).high)
    pairs = {(p["row"], p["reference"], p["metric"]): p for p in saved["paired"]}
    assert set(pairs) == {(r, ref, m) for r, ref in [("plain", "base"), ("asac_fgsm", "base"), ("asac_fgsm", "plain")]
                          for m in HEADLINE}
    acc = pairs[("asac_fgsm", "plain", "ACC")]
    by_seed = [saved["per_seed"][s]["asac_fgsm"]["ACC"] - saved["per_seed"][s]["plain"]["ACC"] for s in ("3", "5")]
    assert acc["per_seed"] == pytest.approx(by_seed)
    expected = paired_difference([saved["per_seed"][s]["asac_fgsm"]["ACC"] for s in ("3", "5")],
                                 [saved["per_seed"][s]["plain"]["ACC"] for s in ("3", "5")])
    assert acc["interval"]["low"] == pytest.approx(expected.low) and acc["verdict"] == expected.verdict()
    table = (out.run_dir / "table.md").read_text()
    assert "| Smiling | asac_fgsm |" in table and " ± " in table and "| asac_fgsm − plain |" in table
    assert (out.run_dir / "paired.png").read_bytes()[:4] == b"\x89PNG"


def test_bootstrap_interval_reproduced_from_predictions_csv(compared):
    tmp, out = compared
    folder = out.run_dir / "seed_5" / "asac_fgsm"
    with (folder / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    y, a, y_hat = (torch.tensor([int(r[c]) for r in rows]) for c in ("y", "a", "y_hat"))
    reported = json.loads((folder / "results.json").read_text())["asac_fgsm"]["ci95_bootstrap"]
    for name, interval in bootstrap_interval(y, a, y_hat).items():
        assert reported[name] == pytest.approx([interval.low, interval.high])


def test_mlflow_parent_with_every_seed_and_row_nested(compared):
    tmp, out = compared
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke").experiment_id
    (parent,) = client.search_runs([experiment], "tags.stage = 'comparison'")
    assert parent.info.status == "FINISHED" and parent.data.tags["seeds"] == "3,5"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = sorted((r.data.params["seed"], r.info.run_name) for r in children)
    assert names == sorted((s, f"{n} · seed {s}") for s in ("3", "5") for n in ("base", "probe", "plain", "asac_fgsm"))
    assert parent.data.metrics["asac_fgsm_DEO_mean"] == pytest.approx(out.aggregate["asac_fgsm"]["DEO"].estimate)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "table.md", "paired.png", "config.yaml", "seed_3", "seed_5"} <= artifacts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "seed_3")] == ["seed_3/robustness.png"]
    # the paper's Fig. 3: each model's run holds the figure of the run so far; the last row's has every model
    (last,) = [r for r in children if r.info.run_name == "asac_fgsm · seed 3"]
    assert "ig_figure.png" in {a.path for a in client.list_artifacts(last.info.run_id)}
    seed_dir = out.run_dir / "seed_3"
    assert (seed_dir / "ig_figure.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.parent.name for p in seed_dir.glob("*/ig_maps.safetensors")) == ["asac_fgsm", "base", "plain"]
    assert json.loads((seed_dir / "asac_fgsm" / "results.json").read_text())["asac_fgsm"]["ig_figure"] == "ig_figure.png"


def test_mlflow_ui_shows_the_answer_on_the_parent_run(compared):
    """What the MLflow UI shows first: a model-training experiment, the verdicts as the parent run's description,
    the tables as sortable MLflow tables, and every run's source (entry point and commit)."""
    tmp, out = compared
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([experiment.experiment_id], "tags.stage = 'comparison'")
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("**Comparison over 2 seeds (3, 5)**")
    assert description.count("\n") > 10 and (out.run_dir / "table.md").read_text().strip() in description
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "verdicts.json", str(tmp))).read_text())
    columns = table["columns"]
    lines = [dict(zip(columns, line)) for line in table["data"]]
    assert len(lines) == 3 * len(HEADLINE)  # plain − base, asac_fgsm − base, asac_fgsm − plain
    paired = json.loads((out.run_dir / "results.json").read_text())["paired"]
    saved = {(p["row"], p["reference"], p["metric"]): p for p in paired}
    for line in lines:
        expected = saved[(line["row"], line["reference"], line["metric"])]
        assert line["verdict"] == expected["verdict"]
        assert line["difference"] == pytest.approx(expected["interval"]["estimate"])
        assert line["verdict"] in description
    logged = json.loads(parent.data.tags["mlflow.loggedArtifacts"])  # how the UI knows to show them as tables
    assert {"path": "verdicts.json", "type": "table"} in logged and {"path": "table.json", "type": "table"} in logged
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    for run in [parent, *children]:
        assert run.data.tags["mlflow.source.name"] == "pytest" and run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]


def test_a_row_does_not_depend_on_the_rows_before_it(compared):
    """Each fine-tune starts from the base weights and the seed's random state: asac_fgsm alone, from the saved
    base, gives bit-identical predictions to asac_fgsm run after plain in the comparison."""
    tmp, out = compared
    seed_dir = out.run_dir / "seed_3"
    cfg = load_config(seed_dir / "config.yaml", [f"base_checkpoint={seed_dir / 'probe'}", "experiment=alone"])
    alone = pipeline.run(cfg, variants=row_variants("asac_fgsm"))
    for name in ("predictions.csv", "model.safetensors"):
        assert (alone.run_dir / "asac_fgsm" / name).read_bytes() == (seed_dir / "asac_fgsm" / name).read_bytes()


@pytest.mark.parametrize("seeds, message", [("[]", "the list is empty"), ("[1,2,1]", "[1] appear more than once")])
def test_bad_seed_lists_give_one_line(tmp_path, seeds, message, capsys):
    from distributed_asac import demo

    with pytest.raises(SystemExit) as stopped:
        demo.main(["--config", str(REPO / "configs" / "smoke.yaml"), f"seeds={seeds}", f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()


def test_one_seed_reports_bootstrap_intervals_and_paired_bootstrap_verdicts(tmp_path, smoke_config):
    """With a single seed the only interval is over test images: the table shows [low, high] from each model's
    bootstrap and the verdicts come from the paired bootstrap of the two models' predictions.csv."""
    from distributed_asac.stats import paired_bootstrap

    cfg = smoke_config(tmp_path, "tracking.enabled=false", "seeds=[4]", "analysis.ig_images=0",
                       "analysis.robustness_images=0")
    out = compare(cfg, variants=row_variants("plain"))
    saved = json.loads((out.run_dir / "results.json").read_text())
    assert saved["seeds"] == [4] and "one seed (4)" in saved["interval"]
    (pair,) = [p for p in saved["paired"] if p["metric"] == "ACC"]
    predictions = {}
    for row in ("plain", "base"):
        with (out.run_dir / "seed_4" / row / "predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
        predictions[row] = {c: torch.tensor([int(r[c]) for r in rows]) for c in ("y", "a", "y_hat")}
    expected = paired_bootstrap(predictions["plain"]["y"], predictions["plain"]["a"], predictions["plain"]["y_hat"],
                                predictions["base"]["y_hat"])["ACC"]
    assert (pair["row"], pair["reference"]) == ("plain", "base")
    assert pair["interval"]["method"] == "bootstrap over test images"
    assert [pair["interval"]["low"], pair["interval"]["high"]] == pytest.approx([expected.low, expected.high])
    table = (out.run_dir / "table.md").read_text()
    assert "| Smiling | base | " in table and " [" in table and " ± " not in table.split("| Paired")[0]


@pytest.mark.slow
def test_seeds_at_once_give_the_numbers_of_seeds_one_after_another(tmp_path):
    """The layout changes where seeds run, not what they compute: at the same threads per run (1), two seeds
    in two processes give the results.json of the same seeds run one after another, and log the same runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.root={tmp_path / 'data'}", f"tracking.uri={uri}", "seeds=[1,2]", "base.epochs=1",
                 "analysis.ig_images=0", "analysis.robustness_images=0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two processes gets: 1 // 2, at least 1
    try:
        outs = {layout: compare(load_config(REPO / "configs" / "smoke.yaml", [*overrides, f"experiment={layout}"]),
                                variants=row_variants("plain"), parallel=parallel)
                for layout, parallel in (("sequential", 1), ("parallel", 2))}
    finally:
        torch.set_num_threads(threads)
    saved = {layout: json.loads((out.run_dir / "results.json").read_text()) for layout, out in outs.items()}
    for key in ("per_seed", "aggregate", "paired"):  # compared as JSON text: NaN equals NaN there
        assert json.dumps(saved["parallel"][key], sort_keys=True) == json.dumps(saved["sequential"][key], sort_keys=True)
    client = MlflowClient(uri)
    for layout in outs:
        experiment = client.get_experiment_by_name(layout).experiment_id
        (parent,) = client.search_runs([experiment], "tags.stage = 'comparison'")
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted((r.data.params["seed"], r.info.run_name) for r in children) == [
            (s, f"{n} · seed {s}") for s in ("1", "2") for n in ("base", "plain", "probe")]
