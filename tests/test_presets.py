"""Every preset resolves; the CelebA and LFW presets start training on fixtures in the exact formats."""

import json
from pathlib import Path

import pytest

from distributed_asac import pipeline
from distributed_asac.config import load_config
from distributed_asac.models import create_model


REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.stem.startswith(("celeba_", "lfw_")))
# A few steps at a tiny size, the rest as the preset has it.
SHRINK = ["base.epochs=1", "probe.epochs=1", "finetune.epochs=1", "data.image_size=32", "data.num_workers=0",
          "base.batch_size=4", "probe.batch_size=4", "finetune.batch_size=4"]


def test_the_paper_tables_have_their_presets():
    names = {p.stem for p in PRESETS}
    assert {"celeba_smiling", "celeba_big_nose", "celeba_wavy_hair"} <= names  # Table 1
    assert {"lfw_smiling", "lfw_bags_under_eyes", "lfw_wavy_hair"} <= names  # Table 2
    assert {"celeba_smiling_resnet50", "celeba_smiling_densenet121", "celeba_smiling_densenet169"} <= names  # Table 3


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_follows_method_defaults(preset):
    cfg = load_config(preset)
    assert cfg.base.epochs == 50 and cfg.finetune.epochs == 10 and cfg.finetune.alpha == 0.5
    assert sorted([0.0, *cfg.finetune.eps]) == [0.0, 0.001, 0.01] and cfg.finetune.attack == "fgsm"
    assert cfg.finetune.order == "ascending" and cfg.finetune.lr == 1e-3 and cfg.grad_clip == 1.0
    assert cfg.data.protected == "Male" and cfg.data.name in ("celeba", "lfw")
    create_model(cfg.model.backbone)


@pytest.mark.parametrize("preset, writer", [
    ("celeba_smiling", "celeba"),
    ("lfw_bags_under_eyes", "lfw"),
    pytest.param("celeba_big_nose", "celeba", marks=pytest.mark.slow),
    pytest.param("lfw_wavy_hair", "lfw", marks=pytest.mark.slow),
])
def test_preset_trains_on_a_fixture(preset, writer, tmp_path, write_celeba_fixture, write_lfw_fixture):
    root = tmp_path / writer
    if writer == "celeba":
        write_celeba_fixture(root, n=30, layout="torchvision")
    else:
        write_lfw_fixture(root)
    cfg = load_config(REPO / "configs" / f"{preset}.yaml", [
        f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "model.backbone=small_cnn", *SHRINK,
    ])
    out = pipeline.run(cfg)
    assert set(out.results) == {"base", "probe", "asac_fgsm"}
    report = json.loads((out.run_dir / "asac_fgsm" / "results.json").read_text())["asac_fgsm"]
    assert report["n"] == out.results["base"]["n"] > 0 and 0 <= report["ACC"] <= 100
    if writer == "lfw":
        assert (tmp_path / "runs" / preset / "lfw_split.json").is_file()  # written beside the runs, reused
