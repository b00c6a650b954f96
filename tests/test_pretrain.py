"""Stage 0 (pretrain.py) and the backbones users start from: the backbone file it writes, which any backbone of the
registry loads and another refuses; `backbone_lr_scale`; a run with stage 0 read back (stage 1 starts from its θ);
and, slow, stage 0 resumed after a kill and on 1 and 2 processes."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from distributed_asac import pipeline
from distributed_asac.checkpoint import PRETRAINED, save_pretrained
from distributed_asac.config import load_config
from distributed_asac.errors import UserError
from distributed_asac.models import BACKBONES, create_model
from distributed_asac.resume import STATE
from distributed_asac.stages import _Training

from .conftest import run_to_end
from .test_resume import _kill_at, _run, _run_folder

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# A tiny run with stage 0: 160 generated faces for each of stage 0's set and the run's, one epoch per stage.
TINY = ["data.synthetic_num_images=160", "pretrain.num_images=160", "pretrain.epochs=2", "pretrain.batch_size=32",
        "base.epochs=1", "probe.epochs=1", "finetune.mode=base", "analysis.robustness_images=16",
        "analysis.ig_images=0"]


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
def test_a_stage_zero_file_starts_its_backbone_and_no_other(backbone, tmp_path):
    torch.manual_seed(0)
    theta = create_model(backbone).backbone.state_dict()
    cfg = load_config(SMOKE, [f"model.backbone={backbone}"])
    path = save_pretrained(theta, cfg, tmp_path / "pretrain")
    loaded = BACKBONES.get(backbone)(str(path))[0].state_dict()
    assert loaded.keys() == theta.keys() and all(torch.equal(loaded[k], theta[k]) for k in theta)
    other = "resnet18" if backbone == "small_cnn" else "small_cnn"
    with pytest.raises(UserError, match=rf"model\.weights '.*backbone\.safetensors' holds a {backbone} backbone "
                                        rf"\(written by stage 0 of a run with model\.backbone={backbone}\), not a "
                                        rf"{other}; set model\.backbone={backbone}, or pretrain a {other}"):
        BACKBONES.get(other)(str(path))


def _training(scale: float) -> tuple[_Training, dict[str, torch.Tensor]]:
    """Stage 1 of a small CNN at `base.backbone_lr_scale=scale`, prepared on 16 seeded images; and its weights."""
    torch.manual_seed(0)
    cfg = load_config(SMOKE, [f"base.backbone_lr_scale={scale}", "base.batch_size=8"])
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % 2
    train = TensorDataset(images, labels, 1 - labels, torch.arange(16))
    model = create_model("small_cnn")
    return _Training.prepare("base", model, train, cfg, Accelerator(cpu=True)), {
        k: t.clone() for k, t in model.state_dict().items()}


def test_backbone_lr_scale_lowers_the_backbones_rate_and_zero_freezes_it_with_its_statistics():
    training, _ = _training(0.1)
    rates = sorted(group["lr"] for group in training.optimizer.param_groups)
    assert rates == pytest.approx([1e-4, 1e-3])  # θ at 0.1 · base.lr, the heads at base.lr
    slow = {id(p) for g in training.optimizer.param_groups if g["lr"] < 1e-3 for p in g["params"]}
    assert slow == {id(p) for p in training.model.backbone.parameters()}

    training, before = _training(0.0)
    training.epoch(0, training.loader)  # two steps
    after = training.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"target_head.weight", "target_head.bias"}  # θ's weights and batch-norm statistics kept


def test_a_run_with_stage_zero_reads_back(tmp_path, smoke_config):
    """Stage 0 is a stage of the run: its folder, report, state and MLflow run; stage 1 starts from its θ (with
    the backbone frozen, the base's θ is stage 0's, tensor for tensor) and its config says so."""
    cfg = smoke_config(tmp_path, *TINY, f"pretrain.root={tmp_path / 'pretrain_data'}", "base.backbone_lr_scale=0")
    out = pipeline.run(cfg, variants=[{"mode": "base"}])
    theta = load_file(str(out.run_dir / "pretrain" / PRETRAINED))
    base = load_file(str(out.run_dir / "base" / "model.safetensors"))
    assert theta and all(torch.equal(base[f"backbone.{k}"], t) for k, t in theta.items())
    saved = (out.run_dir / "base" / "config.yaml").read_text()
    assert f"weights: {out.run_dir / 'pretrain' / PRETRAINED}" in saved
    report = json.loads((out.run_dir / "pretrain" / "results.json").read_text())["pretrain"]
    names = ["Big_Nose", "Eyeglasses", "Male", "Smiling", "Wavy_Hair"]
    assert report["ACC"] == pytest.approx(sum(report[f"ACC_{n}"] for n in names) / 5)
    state = json.loads((out.run_dir / STATE).read_text())
    assert list(state["finished"]) == ["pretrain", "base", "probe"]
    assert not (out.run_dir / "pretrain" / "state").exists()  # dropped once the stage finished
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(state["mlflow_runs"]["pretrain"])
    assert run.data.tags["stage"] == "pretrain" and run.data.metrics["test_ACC_Male"] == report["ACC_Male"]
    assert len(client.get_metric_history(run.info.run_id, "pretrain/valid_ACC_Male")) == 2  # one per epoch


def test_jtt_starts_from_the_theta_its_base_started_from(tmp_path, smoke_config, monkeypatch):
    """JTT trains its models anew from stage 1's initialisation: with stage 0 that is stage 0's θ, in a run that
    trains its own base and in one given the base as base_checkpoint (as a sweep's trials are, whose own config
    names no weights); the identification model it trains starts from that file, tensor for tensor."""
    from distributed_asac.stages import STAGE_ONE

    starts = []
    initial_model = STAGE_ONE["initial_model"]

    def spy(cfg, accelerator):
        model = initial_model(cfg, accelerator)
        starts.append((cfg.model.weights, {k: v.clone() for k, v in model.backbone.state_dict().items()}))
        return model

    monkeypatch.setitem(STAGE_ONE, "initial_model", spy)
    cfg = smoke_config(tmp_path, *TINY, f"pretrain.root={tmp_path / 'pretrain_data'}", "jtt.identification_epochs=1")
    out = pipeline.run(cfg, variants=[{"mode": "jtt"}])
    theta_path = out.run_dir / "pretrain" / PRETRAINED
    theta = load_file(str(theta_path))
    given = pipeline.run(dataclasses.replace(cfg, base_checkpoint=str(out.run_dir / "probe")), variants=[{"mode": "jtt"}])
    assert given.results["jtt"] and [weights for weights, _ in starts] == [str(theta_path)] * 2
    for _, backbone in starts:
        assert all(torch.equal(backbone[k], t) for k, t in theta.items())


def _stage_zero_overrides(data: Path, out: Path) -> list[str]:
    return [f"data.root={data}", f"pretrain.root={data.parent / 'pretrain'}", f"output_dir={out / 'runs'}",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "experiment=resume", *TINY]


@pytest.mark.slow  # about 40 s: three runs in new interpreters (the kill needs a process of its own)
def test_a_run_killed_in_stage_zero_resumes_to_the_same_files(tmp_path):
    data = tmp_path / "data"
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert _run(reference, _stage_zero_overrides(data, reference)).returncode == 0
    _kill_at(killed, _stage_zero_overrides(data, killed), "stage.epoch_end:stage=pretrain,epoch=1")
    proc = _run(killed, [*_stage_zero_overrides(data, killed), "resume=latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrain epoch 2:" in proc.stdout and "pretrain epoch 1:" not in proc.stdout  # it continued
    ours, theirs = _run_folder(killed), _run_folder(reference)
    for file in (f"pretrain/{PRETRAINED}", "pretrain/results.json", "base/model.safetensors",
                 "probe/model.safetensors"):
        assert (ours / file).read_bytes() == (theirs / file).read_bytes(), file


@pytest.mark.slow  # about 60 s: stage 0 on 1 process, then under `accelerate launch` on 2 (gloo, 2 loaded cores)
def test_stage_zero_is_the_same_experiment_on_1_and_2_processes(tmp_path):
    """As test_scale.py checks stage 3: the global batch, the global batch norm and one data order make stage 0 on
    2 processes end with the weights of 1 process, up to summation order (stage 0 alone: `tests/scale_run.py
    --until pretrain`)."""
    thetas = {}
    for world in (1, 2):
        env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
        env.update(OMP_NUM_THREADS="1")
        run = ["-m", "tests.scale_run", "--config", str(SMOKE), "--until", "pretrain",
               *_stage_zero_overrides(tmp_path / "data", tmp_path), f"experiment=w{world}"]
        if world == 1:
            command = [sys.executable, *run]
        else:
            env["ACCELERATE_USE_CPU"] = "true"
            command = [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"),
                       "--num_processes", "2", *run]
        run_to_end(command, env)
        (run_dir,) = (tmp_path / "runs" / f"w{world}").iterdir()
        thetas[world] = load_file(str(run_dir / "pretrain" / PRETRAINED))
    difference = max(float((thetas[1][k].double() - thetas[2][k].double()).abs().max()
                           / max(1.0, float(thetas[1][k].abs().max())))
                     for k in thetas[1] if thetas[1][k].is_floating_point())
    print("stage 0, largest relative weight difference of 2 processes to 1:", difference)
    assert difference < 1e-4, difference
