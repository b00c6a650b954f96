"""Two-process CPU runs through `accelerate launch`: DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3.

Each checks that the run really had world size 2, its distributed type and ZeRO stage, and that parameters
agree across ranks (replicas.json is written from digests gathered from both ranks), and that its evaluation
on an odd-sized test split equals a single-process evaluation of the same final weights.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate import Accelerator
from mlflow.tracking import MlflowClient

from distributed_asac import pipeline
from distributed_asac.checkpoint import load_checkpoint
from distributed_asac.config import load_config
from distributed_asac.data.build import build_splits
from distributed_asac.evaluate import evaluate

from .conftest import run_to_end

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))  # the CLI of this venv


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, in_folder):
    """Stages 1–2 once, single process, on a generated set whose test split has an odd size."""
    tmp = tmp_path_factory.mktemp("dist")
    overrides = [*in_folder(tmp), "data.synthetic_num_images=305", "base.epochs=1", "probe.epochs=1"]
    cfg = load_config(REPO / "configs" / "smoke.yaml", [*overrides, "experiment=base"])
    out = pipeline.run(cfg, variants=[{"mode": "base"}])
    return tmp, overrides, out.run_dir / "probe"


def _launch(config_file: str, env_extra: dict, tmp: Path, overrides: list[str], experiment: str) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(env_extra, OMP_NUM_THREADS="1")  # two processes on two cores: one thread each
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / config_file),
           "-m", "distributed_asac.finetune", "--config", str(REPO / "configs" / "smoke.yaml"),
           *overrides, f"experiment={experiment}", "finetune.epochs=1"]
    run_to_end(cmd, env)
    (run_dir,) = (tmp / "runs" / experiment).iterdir()
    return run_dir / "asac_fgsm"


def _check(folder: Path, overrides: list[str], distributed_type: str, zero_stage):
    replicas = json.loads((folder / "replicas.json").read_text())
    assert replicas["world_size"] == 2 and replicas["distributed_type"] == distributed_type
    assert replicas["zero_stage"] == zero_stage
    assert len(replicas["parameter_digests"]) == 2 and len(set(replicas["parameter_digests"])) == 1
    reported = json.loads((folder / "results.json").read_text())[folder.name]

    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    accelerator = Accelerator(cpu=True)
    splits = build_splits(cfg, accelerator)
    assert len(splits.test) % 2 == 1  # uneven shards: one rank has one image more
    model, _ = load_checkpoint(folder)
    single = evaluate(accelerator, model, splits.test, batch_size=7, twins=splits.twins)
    assert reported["n"] == len(splits.test)
    expected = single.report()
    for key in ("DEO", "DEOp", "DDP", "ACC", "CF_flip_rate", "protected_ACC", "n_a0", "n_a1"):
        assert reported[key] == pytest.approx(expected[key], abs=1e-12), key
    # The scores (softmax probabilities) too: they are continuous, so they compare the weights even when a tiny
    # model's argmax is constant and the discrete metrics above would agree by accident.
    with (folder / "predictions.csv").open() as f:
        scores = {row["image_id"]: float(row["score"]) for row in csv.DictReader(f)}
    assert scores == pytest.approx({str(row[0]): row[4] for row in single.rows}, abs=1e-5)
    return model, splits, accelerator


def test_ddp_two_cpu_processes(base_checkpoint):
    tmp, overrides, ckpt = base_checkpoint
    folder = _launch("cpu_ddp.yaml", {"ACCELERATE_USE_CPU": "true"}, tmp, [*overrides, f"base_checkpoint={ckpt}"], "ddp")
    _check(folder, overrides, "MULTI_CPU", zero_stage=None)


@pytest.mark.slow  # ~64 s (DeepSpeed's imports in two processes): the DDP launch above covers the launch path by default
def test_deepspeed_zero2_two_cpu_processes(base_checkpoint):
    tmp, overrides, ckpt = base_checkpoint
    folder = _launch("deepspeed_zero2.yaml", {}, tmp, [*overrides, f"base_checkpoint={ckpt}"], "zero2")
    _check(folder, overrides, "DEEPSPEED", zero_stage=2)  # not plain DDP: ACCELERATE_USE_CPU would drop DeepSpeed


@pytest.mark.slow  # ~80 s: three stages under ZeRO-3
def test_deepspeed_zero3_two_cpu_processes(base_checkpoint):
    """All three stages under ZeRO-3 (no base checkpoint): the best-epoch keep and restore, stage 2 preparing
    the model again and stage 3 on a copy of it. deepspeed_zero3.json partitions every parameter (persistence
    threshold 0), so each rank holds half of each tensor while it trains.

    The test metrics come from the whole models the stages hand back. The valid metrics logged during
    training come from forwards of the partitioned model (DeepSpeed's hooks gather each layer as it runs):
    stage 3's last epoch ran on the weights that were then saved, and the base checkpoint must hold the
    epoch with the best logged valid ACC; both are checked against single-process evaluations.
    """
    tmp, overrides, _ = base_checkpoint
    # several epochs: the best-epoch keep and restore have a choice to make (a command line gives a key once)
    overrides = [*(o for o in overrides if not o.startswith("base.epochs=")), "base.epochs=4"]
    folder = _launch("deepspeed_zero3.yaml", {}, tmp, overrides, "zero3")
    model, splits, accelerator = _check(folder, overrides, "DEEPSPEED", zero_stage=3)
    base, _, _ = _check(folder.parent / "base", overrides, "DEEPSPEED", zero_stage=3)
    _check(folder.parent / "probe", overrides, "DEEPSPEED", zero_stage=3)

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("zero3").experiment_id])}
    valid = evaluate(accelerator, model, splits.valid, batch_size=7)
    for key in ("DEO", "DEOp", "DDP", "ACC", "protected_ACC"):
        logged = runs["asac_fgsm"].data.metrics[f"finetune/valid_{key}"]
        assert logged == pytest.approx(valid.report()[key], abs=1e-12), key

    history = [m.value for m in client.get_metric_history(runs["base"].info.run_id, "base/valid_ACC")]
    assert len(history) == 4
    restored = evaluate(accelerator, base, splits.valid, batch_size=7).report()["ACC"]
    assert restored == pytest.approx(max(history), abs=1e-12)


def test_unsynchronised_cpu_launch_is_refused(base_checkpoint):
    """The silent trap: --multi_gpu on CPU without ACCELERATE_USE_CPU starts two lone processes."""
    tmp, overrides, ckpt = base_checkpoint
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"), "-m",
           "distributed_asac.finetune", "--config", str(REPO / "configs" / "smoke.yaml"), *overrides,
           f"base_checkpoint={ckpt}", "experiment=lone"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Accelerate does not connect them" in proc.stderr and "ACCELERATE_USE_CPU=true" in proc.stderr
    assert not (tmp / "runs" / "lone").exists()
