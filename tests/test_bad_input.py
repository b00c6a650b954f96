"""Bad input and faults, as a user meets them through the real CLI: one row per kind.

Every row runs the finetune command's entry point (`finetune.main`; for the rows in SUBPROCESS,
`python -m distributed_asac.finetune` in a new interpreter) beside a finished earlier run (its folder, dataset
and MLflow records), and asserts exit status 2, a stderr of exactly one `error: ...` line that
names the problem, and that nothing of the earlier run, the dataset or the MLflow store changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distributed_asac import finetune, pipeline, tracking
from distributed_asac.checkpoint import WRITTEN_BY, save_pretrained
from distributed_asac.config import load_config, save_config
from distributed_asac.data.celeba_format import ATTRIBUTE_FILE, read_attribute_file, write_attribute_file
from distributed_asac.locks import LOCK, acquire
from distributed_asac.resume import INCOMPLETE, STATE, mark_incomplete

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
# The earlier run and every row share these: a 120-image generated set (84 train images) at 32 px.
TINY = ["data.synthetic_num_images=120", "base.epochs=1", "probe.epochs=1", "finetune.epochs=1",
        "analysis.robustness_images=0", "analysis.ig_images=0"]


@dataclass
class World:
    root: Path  # the working directory of every row: data/, runs/, mlflow.db (the default store)
    probe: Path  # the earlier run's base checkpoint
    corrupt_jpeg: Callable[[Path], None]  # the conftest fixture, for the cases that damage an image


@pytest.fixture(scope="module")
def world(tmp_path_factory, smoke_config, corrupt_jpeg) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    out = pipeline.run(smoke_config(root, "experiment=earlier", *TINY), variants=[{"mode": "base"}])
    assert not (out.run_dir / INCOMPLETE).exists()  # a finished run loses its marker
    return World(root, out.run_dir / "probe", corrupt_jpeg)


def _snapshot(world: World) -> tuple[dict, dict]:
    """sha256 of every file under data/ and runs/, and every MLflow run's status, params, metrics and tags."""
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest()
             for folder in ("data", "runs") for p in sorted((world.root / folder).rglob("*")) if p.is_file()}
    client = MlflowClient(f"sqlite:///{world.root / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {r.info.run_id: (r.info.status, r.info.end_time, r.data.params, r.data.metrics, r.data.tags)
            for r in client.search_runs(experiments)}
    return files, runs


def _copy_probe(world: World, tmp_path: Path) -> Path:
    folder = tmp_path / "probe"
    shutil.copytree(world.probe, folder)
    return folder


def truncated_weights(world: World, tmp_path: Path) -> list[str]:
    folder = _copy_probe(world, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return [f"base_checkpoint={folder}"]


def other_backbone(world: World, tmp_path: Path) -> list[str]:
    """small_cnn weights under a config.yaml that says resnet18 (the run asks for resnet18 too)."""
    folder = _copy_probe(world, tmp_path)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    saved["model"]["backbone"] = "resnet18"
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    return [f"base_checkpoint={folder}", "model.backbone=resnet18"]


def invalid_checkpoint_config(world: World, tmp_path: Path) -> list[str]:
    folder = _copy_probe(world, tmp_path)
    (folder / "config.yaml").write_text("finetune: [1, 2\n")
    return [f"base_checkpoint={folder}"]


def unknown_key_in_checkpoint_config(world: World, tmp_path: Path) -> list[str]:
    folder = _copy_probe(world, tmp_path)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    saved["finetune"]["alpah"] = 0.5
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    return [f"base_checkpoint={folder}"]


def _celeba_copy(world: World, tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A copy of the dataset to read as CelebA: its root and the images of each split ("0" train, "2" test)."""
    root = tmp_path / "celeba"
    shutil.copytree(world.root / "data", root)
    partition = (root / "list_eval_partition.txt").read_text().split()
    splits: dict[str, list[str]] = {}
    for name, split in zip(partition[::2], partition[1::2]):
        splits.setdefault(split, []).append(name)
    return root, splits


def _set_attribute(root: Path, images: list[str], attribute: str, value: int) -> None:
    """Set `attribute` to `value` (±1) for `images` in the copy's list_attr_celeba.txt."""
    path = root / ATTRIBUTE_FILE
    table = read_attribute_file(path)
    values = table.values.copy()
    rows = [table.image_ids.index(image) for image in images]
    values[rows, table.names.index(attribute)] = value
    write_attribute_file(path, table.image_ids, table.names, values > 0)


def corrupt_test_image(world: World, tmp_path: Path) -> list[str]:
    """A copy of the dataset, read as CelebA, whose last test image is a truncated JPEG."""
    root, splits = _celeba_copy(world, tmp_path)
    world.corrupt_jpeg(root / "img_align_celeba" / splits["2"][-1])
    return ["data.name=celeba", f"data.root={root}"]


def corrupt_train_image_in_a_worker(world: World, tmp_path: Path) -> list[str]:
    """A copy of the dataset, read as CelebA by a DataLoader worker, whose first train image is truncated."""
    root, splits = _celeba_copy(world, tmp_path)
    world.corrupt_jpeg(root / "img_align_celeba" / splits["0"][0])
    return ["data.name=celeba", f"data.root={root}", "data.num_workers=1"]


def train_split_of_one_target_label(world: World, tmp_path: Path) -> list[str]:
    """A copy of the dataset, read as CelebA, where every train image is Smiling."""
    root, splits = _celeba_copy(world, tmp_path)
    _set_attribute(root, splits["0"], "Smiling", 1)
    return ["data.name=celeba", f"data.root={root}"]


def attribute_file_not_utf8(world: World, tmp_path: Path) -> list[str]:
    """A copy of the dataset, read as CelebA, whose attribute file holds a Latin-1 byte (a name saved by an editor)."""
    root, _ = _celeba_copy(world, tmp_path)
    path = root / ATTRIBUTE_FILE
    path.write_bytes(path.read_bytes().replace(b"000007.jpg", b"000007\xe9.jpg", 1))
    return ["data.name=celeba", f"data.root={root}"]


def float_test_image(world: World, tmp_path: Path) -> list[str]:
    """A copy of the dataset, read as CelebA, whose last test image is a 32-bit float TIFF (under its .jpg name)."""
    root, splits = _celeba_copy(world, tmp_path)
    Image.fromarray(np.zeros((32, 32), np.float32), "F").save(root / "img_align_celeba" / splits["2"][-1], "TIFF")
    return ["data.name=celeba", f"data.root={root}"]


def no_smiling_man_in_test(world: World, tmp_path: Path) -> list[str]:
    """A copy of the dataset, read as CelebA, whose test split has no smiling man: every test man is made female."""
    root, splits = _celeba_copy(world, tmp_path)
    _set_attribute(root, splits["2"], "Male", -1)
    return ["data.name=celeba", f"data.root={root}"]


def stage_one_folder(world: World, tmp_path: Path) -> list[str]:
    return [f"base_checkpoint={world.probe.parent / 'base'}"]


def fine_tuned_row_folder(world: World, tmp_path: Path) -> list[str]:
    """A copy of the earlier run with a fine-tuned row beside its probe/: the probe's weights as stage 3 writes
    them (its metadata naming the row asac_fgsm)."""
    run = tmp_path / "run"
    shutil.copytree(world.probe.parent, run)
    row = run / "asac_fgsm"
    shutil.copytree(run / "probe", row)
    save_file(load_file(row / "model.safetensors"), row / "model.safetensors",
              metadata={WRITTEN_BY: json.dumps({"row": "asac_fgsm", "stage": 3})})
    (row / "results.json").write_text(json.dumps({"asac_fgsm": {}}))
    return [f"base_checkpoint={row}"]


def run_folder(world: World, tmp_path: Path) -> list[str]:
    return [f"base_checkpoint={world.probe.parent}"]


HELD_OPEN: list = []  # sqlite connections that keep a store's write lock for the rest of the session


def store_locked_by_another_process(world: World, tmp_path: Path) -> list[str]:
    """A store that can be read but not written: another connection keeps its write lock (as a running writer
    would; a read-only file behaves alike, but permissions do not stop root)."""
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'locked.db'}"
    MlflowClient(uri).search_experiments()  # creates the store's tables
    connection = sqlite3.connect(tmp_path / "locked.db")
    connection.execute("BEGIN IMMEDIATE")
    HELD_OPEN.append(connection)
    return [f"tracking.uri={uri}"]


def weights_not_a_state_dict(world: World, tmp_path: Path) -> list[str]:
    # Seeded garbage (never the machine's entropy): seed 17's bytes make torch's unpickler raise IndexError.
    (tmp_path / "resnet18.pth").write_bytes(np.random.default_rng(17).bytes(4096))
    return ["model.backbone=resnet18", f"model.weights={tmp_path / 'resnet18.pth'}"]


def name_too_long(world: World, tmp_path: Path) -> list[str]:
    return [f"output_dir={tmp_path / ('x' * 300)}"]


def symlink_loop(world: World, tmp_path: Path) -> list[str]:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return [f"output_dir={tmp_path / 'loop' / 'runs'}"]


def _unfinished_run(world: World, name: str) -> Path:
    """The folder of an unfinished run of row `name`'s config, as its start writes it (nothing trained)."""
    folder = world.root / "runs" / f"case_{name}" / "unfinished"
    folder.mkdir(parents=True)
    save_config(load_config(SMOKE, _row_overrides(world, name)), folder / "config.yaml")
    (folder / STATE).write_text(json.dumps({"kind": "pipeline"}))
    mark_incomplete(folder)
    return folder


def run_held_by_another_process(world: World, tmp_path: Path) -> list[str]:
    """An unfinished run of this row's config whose folder this test process holds (as a running run would)."""
    folder = _unfinished_run(world, "run_in_use")
    acquire(folder, "run folder", "rerun")  # held by this (live) process until the test session ends
    return [f"resume={folder}"]


def damaged_run_state(world: World, tmp_path: Path) -> list[str]:
    folder = _unfinished_run(world, "damaged_run_state")
    (folder / STATE).write_bytes(b"\x00" * 64)  # a disk fault
    return [f"resume={folder}"]


def base(world: World, tmp_path: Path) -> list[str]:
    return [f"base_checkpoint={world.probe}"]


def garbage_sqlite(world: World, tmp_path: Path) -> list[str]:
    (tmp_path / "garbage.db").write_bytes(np.random.default_rng(0).bytes(4096))
    return [f"tracking.uri=sqlite:///{tmp_path / 'garbage.db'}"]


def output_dir_is_a_file(world: World, tmp_path: Path) -> list[str]:
    (tmp_path / "a_file").write_text("not a folder\n")
    return [f"output_dir={tmp_path / 'a_file'}"]


def pretrained_small_cnn(world: World, tmp_path: Path) -> list[str]:
    """A backbone file as stage 0 writes it, of a small_cnn (the earlier run's θ), given to a resnet18 run."""
    theta = {k.removeprefix("backbone."): t for k, t in load_file(world.probe / "model.safetensors").items()
             if k.startswith("backbone.")}
    path = save_pretrained(theta, load_config(SMOKE), tmp_path / "pretrain")
    return ["model.backbone=resnet18", f"model.weights={path}"]


def stage_one_folder_of_a_probe(world: World, tmp_path: Path) -> list[str]:
    return [f"stage1_checkpoint={world.probe}"]


def stage_one_folder_with_invalid_config(world: World, tmp_path: Path) -> list[str]:
    folder = tmp_path / "base"
    shutil.copytree(world.probe.parent / "base", folder)
    (folder / "config.yaml").write_text("finetune: [1, 2\n")
    return [f"stage1_checkpoint={folder}"]


def classifier_as_generator(world: World, tmp_path: Path) -> list[str]:
    """A safetensors file that is no generator: the earlier run's classifier weights."""
    return [f"gan.checkpoint={world.probe / 'model.safetensors'}"]


@dataclass
class Case:
    overrides: list[str]
    message: str  # a regular expression the one error line must match
    setup: Optional[Callable[[World, Path], list[str]]] = None  # more overrides, made in the row's tmp_path
    env: dict[str, str] = field(default_factory=dict)
    starts: bool = False  # the run starts and must stop: its folder keeps INCOMPLETE, its MLflow run FAILED
    config: Optional[str | bytes] = None  # what the --config file holds (default: configs/smoke.yaml)


CASES = {
    # non-finite values: refused by the config, for any float key
    "alpha_nan": Case(["finetune.alpha=.nan"], r"config key 'finetune\.alpha': nan is not a finite number"),
    "lr_inf": Case(["finetune.lr=.inf"], r"config key 'finetune\.lr': inf is not a finite number"),
    "eps_item_nan": Case(["finetune.eps=[0.01,.nan]"], r"config key 'finetune\.eps': nan is not a finite"),
    # a diverging loss stops the run before its model is saved or reported (stage 1 and stage 3)
    "base_diverges": Case(["base.lr=1e30"], r"base epoch 1: .*training diverged.*lower base\.lr \(now 1e\+30\)",
                          starts=True),
    "finetune_diverges": Case(["finetune.lr=1e30"], r"finetune epoch 1: .*training diverged.*lower finetune\.lr",
                              setup=base, starts=True),
    # a batch larger than the train split would train nothing (the loaders drop the last batch)
    "base_batch_too_big": Case(["base.batch_size=85"], r"'base\.batch_size': 85 is larger than the train split "
                                                       r"\(84 images\).*set base\.batch_size <= 84"),
    "finetune_batch_too_big": Case(["finetune.batch_size=1000"], r"'finetune\.batch_size': 1000 is larger", setup=base),
    # an ASAC row without an ε > 0 is plain fine-tuning
    "eps_empty": Case(["finetune.eps=[]"], r"'finetune\.eps': \[\] holds no ε > 0"),
    "eps_only_zero": Case(["finetune.eps=[0]"], r"'finetune\.eps': \[0\.0\] holds no ε > 0"),
    # a corrupt test image is found before training, not after it
    "corrupt_test_image": Case([], r"cannot decode image .*\.jpg .*on_bad_image='skip'", setup=corrupt_test_image),
    # an image whose pixels have no known 8-bit RGB (a float TIFF): refused naming it, not trained as it clips
    "image_of_no_8_bit_rgb": Case([], r"image .*\.jpg has mode F \(pixels of no 8-bit RGB meaning .*"
                                      r"on_bad_image='skip'$", setup=float_test_image),
    "corrupt_train_image_in_a_worker": Case([], r"^error: cannot decode image .*\.jpg .*on_bad_image='skip'$",
                                            setup=corrupt_train_image_in_a_worker, starts=True),
    # a base checkpoint must match what a base fixes, and be intact
    "base_other_target": Case(["data.target=Big_Nose"], r"trained with data\.target=Smiling but this run has "
                                                         r"data\.target=Big_Nose; set data\.target=Smiling", setup=base),
    "base_other_protected": Case(["data.protected=Eyeglasses"], r"data\.protected=Male but", setup=base),
    "base_other_size": Case(["data.image_size=48"], r"data\.image_size=32 but this run has data\.image_size=48",
                            setup=base),
    "base_other_backbone": Case(["model.backbone=resnet18"], r"model\.backbone=small_cnn but", setup=base),
    "truncated_weights": Case([], r"checkpoint weights .*model\.safetensors' cannot be read", setup=truncated_weights),
    "weights_of_other_backbone": Case([], r"do not fit a resnet18, the backbone its config\.yaml names",
                                      setup=other_backbone),
    "invalid_checkpoint_yaml": Case([], r"checkpoint config .*config\.yaml' is invalid",
                                    setup=invalid_checkpoint_config),
    "checkpoint_yaml_unknown_key": Case([], r"is invalid \(unknown config key 'finetune\.alpah'",
                                        setup=unknown_key_in_checkpoint_config),
    # tracking: fail fast, before any data or training
    "server_unreachable": Case([], r"MLflow tracking server http://127\.0\.0\.1:9 \(\$MLFLOW_TRACKING_URI\) is "
                                   r"unreachable", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
    "unknown_uri_scheme": Case(["tracking.uri=foo://bar"], r"MLflow tracking store foo://bar \(tracking\.uri\) "
                                                           r"cannot be used"),
    "garbage_sqlite": Case([], r"garbage\.db \(tracking\.uri\) cannot be used: .*file is not a database",
                           setup=garbage_sqlite),
    "store_cannot_be_written": Case([], r"locked\.db \(tracking\.uri\) cannot be written: database is locked; "
                                        r"make it writable, stop the process that holds it",
                                    setup=store_locked_by_another_process),
    "weights_not_a_state_dict": Case([], r"model\.weights '.*resnet18\.pth' cannot be read as a state dict \(.*\); "
                                         r"give a torchvision resnet18 state dict", setup=weights_not_a_state_dict),
    # faults of a path the user gave: one line naming it, wherever they happen
    "output_dir_name_too_long": Case([], r"^error: .*/x{300}/case_\w+: File name too long; give a shorter path, "
                                         r"then rerun$", setup=name_too_long),
    "output_dir_in_a_symlink_loop": Case([], r"^error: .*/loop.*: Too many levels of symbolic links; the path runs "
                                             r"through a loop", setup=symlink_loop),
    "config_not_utf8": Case([], r"config\.yaml' is not UTF-8 text \(invalid start byte at byte 0\)",
                            config=b"\xff\xfe" + np.random.default_rng(0).bytes(64)),
    "output_dir_is_a_file": Case([], r"config key 'output_dir': .*a_file' is an existing file",
                                 setup=output_dir_is_a_file),
    # a comparator row refuses, before any training, what it cannot run on
    "gan_checkpoint_missing": Case(["finetune.mode=gan_augment", "gan.checkpoint=nowhere.safetensors"],
                                   r"gan\.checkpoint 'nowhere\.safetensors' not found"),
    "gan_checkpoint_not_a_generator": Case(["finetune.mode=gan_augment"], r"model\.safetensors' holds no generator",
                                           setup=classifier_as_generator),
    "oracle_without_train_twins": Case(["finetune.mode=oracle_counterfactual"],
                                       r"oracle_counterfactual needs the true twin of every train image.*"
                                       r"data\.synthetic_train_twins=true"),
    # the rows beside ASAC (distributed_asac/mitigations/): their keys, and a valid split DFR cannot balance
    "group_dro_eta_zero": Case(["finetune.mode=group_dro", "group_dro.eta=0"],
                               r"config key 'group_dro\.eta': must be > 0, got 0\.0"),
    "jtt_upweight_below_one": Case(["finetune.mode=jtt", "jtt.upweight=0.5"],
                                   r"config key 'jtt\.upweight': must be >= 1, got 0\.5"),
    "jtt_identification_epochs_zero": Case(["finetune.mode=jtt", "jtt.identification_epochs=0"],
                                           r"config key 'jtt\.identification_epochs': 0 is out of range \(must be >= 1\)"),
    "jtt_final_unknown": Case(["finetune.mode=jtt", "jtt.final=scratch"],
                              r"config key 'jtt\.final': unknown value 'scratch' .*valid: retrain, finetune"),
    "dfr_c_grid_empty": Case(["finetune.mode=dfr", "dfr.c_grid=[]"],
                             r"config key 'dfr\.c_grid': need at least one C > 0, got \[\] \(default null"),
    "dfr_valid_too_small": Case(["finetune.mode=dfr"], r"finetune\.mode=dfr \(the valid split\) needs at least 2 "
                                                       r"image\(s\) in every \(target, protected\) group.*\(y=0, a=1\) 0"),
    # names and numbers the config refuses
    "experiment_empty": Case(["experiment="], r"config key 'experiment': '' is not a plain folder name"),
    "experiment_outside": Case(["experiment=../x"], r"config key 'experiment': '\.\./x' is not a plain folder name"),
    "seed_negative": Case(["seed=-1"], r"config key 'seed': -1 is out of range"),
    "synthetic_seed_negative": Case(["data.synthetic_seed=-1"], r"config key 'data\.synthetic_seed': -1 is out"),
    "grad_clip_zero": Case(["grad_clip=0"], r"config key 'grad_clip': must be > 0"),
    "ig_steps_zero": Case(["analysis.ig_steps=0"], r"config key 'analysis\.ig_steps': 0 is out of range \(must be "
                                                  r">= 1\)"),
    "tracking_lock_wait_zero": Case(["tracking.lock_wait_s=0"], r"config key 'tracking\.lock_wait_s': must be > 0, "
                                                                r"got 0\.0 \(default 60\.0\)"),
    # runs that could not mean anything, refused before training
    "zero_epochs": Case(["probe.epochs=0"], r"config key 'probe\.epochs': 0 epochs would train nothing .*set "
                                            r"probe\.epochs >= 1"),
    "same_attribute_spelled_otherwise": Case(["data.protected=smiling"],
                                             r"'data\.target' and 'data\.protected' name the same attribute "
                                             r"\('Smiling' and 'smiling'\)"),
    "train_split_of_one_target_label": Case([], r"the train split \(84 images\) has only Smiling=1 \(data\.target\)",
                                            setup=train_split_of_one_target_label),
    "attribute_file_not_utf8": Case([], r"list_attr_celeba\.txt is not UTF-8 text: byte 0xe9 at line 9 .*restore "
                                        r"the original file", setup=attribute_file_not_utf8),
    "test_split_without_a_group": Case([], r"the test split lacks a \(target, protected\) group .*\(y=1, a=1\) 0\)"
                                           r", so every fairness metric would be n/a", setup=no_smiling_man_in_test),
    "base_checkpoint_of_stage_one": Case([], r"is a stage-1 \(base\) folder: .*point base_checkpoint at .*/probe, the "
                                             r"probe/ folder", setup=stage_one_folder),
    "base_checkpoint_of_a_fine_tuned_row": Case([], r"/run/asac_fgsm' holds the fine-tuned row 'asac_fgsm' \(stage 3\), "
                                                    r"not a base: .*point base_checkpoint at .*/run/probe, the probe/ "
                                                    r"folder of the same run$", setup=fine_tuned_row_folder),
    "base_checkpoint_is_a_run_folder": Case([], r"base_checkpoint '.*/earlier/\d{8}-\d{6}' is a run folder, not a "
                                                r"checkpoint; point base_checkpoint at .*/earlier/\d{8}-\d{6}/probe, its "
                                                r"base", setup=run_folder),
    # stage 0 and the backbones users start from (pretrain.py, docs/method.md)
    "pretrain_unknown_attribute": Case(["pretrain.epochs=1", "pretrain.attributes=[Smiling,Beard]"],
                                       r"config key 'pretrain\.attributes' names an attribute the generator does not "
                                       r"draw, 'Beard'; give .* \(valid: Big_Nose, Eyeglasses, Male, Smiling, Wavy_Hair\)"),
    "pretrain_on_the_runs_own_faces": Case(["pretrain.epochs=1", "pretrain.seed=0"],
                                           r"'pretrain\.seed' and 'data\.synthetic_seed' are both 0: .*set pretrain\.seed"),
    "backbone_lr_scale_negative": Case(["base.backbone_lr_scale=-0.5"],
                                       r"config key 'base\.backbone_lr_scale': -0\.5 is below 0; give the backbone's "
                                       r"learning rate as a share of base\.lr, >= 0 \(0: frozen"),
    "pretrained_weights_of_another_backbone": Case([], r"model\.weights '.*backbone\.safetensors' holds a small_cnn "
                                                       r"backbone .*not a resnet18; set model\.backbone=small_cnn",
                                                   setup=pretrained_small_cnn),
    "stage1_checkpoint_of_a_probe": Case([], r"stage1_checkpoint '.*/probe' holds the model 'probe', not stage 1's M; "
                                             r"point stage1_checkpoint at the base/ folder of a run",
                                         setup=stage_one_folder_of_a_probe),
    "stage1_checkpoint_invalid_yaml": Case([], r"checkpoint config .*base/config\.yaml' is invalid .*; point "
                                               r"stage1_checkpoint at an intact checkpoint folder",
                                           setup=stage_one_folder_with_invalid_config),
    # Accelerate's environment: DeepSpeed asked for in a process no launcher started
    "deepspeed_without_a_launcher": Case([], r"ACCELERATE_USE_DEEPSPEED=true, but this process was not started by a "
                                             r"launcher .*accelerate launch --config_file launch/deepspeed_zero2\.yaml",
                                         env={"ACCELERATE_USE_DEEPSPEED": "true"}),
    # config files and command lines say what they mean
    "yaml_repeated_section": Case([], r"config\.yaml': key 'finetune' appears twice, at line 1 and line 5; the "
                                      r"second would silently replace the first",
                                  config="finetune:\n  alpha: 0.3\nbase:\n  epochs: 1\nfinetune:\n  lr: 0.01\n"),
    "yaml_null_for_a_path": Case([], r"config key 'data\.root': expected str, got no value \(YAML reads ~, null and "
                                     r"an empty value as none\); give a value, or quote it \('~'\)",
                                 config="data:\n  root: ~\n"),
    "yaml_not_a_mapping": Case([], r"config\.yaml' must hold a mapping of keys .*not a int \(0\)",
                               config="0\n"),
    "key_twice_on_the_command_line": Case(["finetune.alpha=0.3", "finetune.alpha=0.4"],
                                          r"config key 'finetune\.alpha' is given twice on the command line "
                                          r"\('finetune\.alpha=0\.3' and 'finetune\.alpha=0\.4'\); give it once"),
    # one process at a time in a run folder
    "run_in_use": Case([], r"run folder .*unfinished is in use by pid \d+ on this host .*\(kill \d+\), then "
                           r"continue it with resume=.*unfinished$", setup=run_held_by_another_process),
    "damaged_run_state": Case([], r"the run state .*unfinished/state\.json is damaged \(.*\), so this run cannot be "
                                  r"resumed; start a new run \(without resume=\) or restore the file$",
                              setup=damaged_run_state),
}


# Rows that run as a user meets them, `python -m distributed_asac.finetune` in a new interpreter: one that trains and
# stops (its exit status and marker from a real process) and one whose fault is in a DataLoader worker process
# (a refusal by the config through the real CLI: tests/test_config.py). Every other row calls the same entry point,
# `finetune.main`, in this process (a new interpreter costs seconds of imports per row, and adds nothing these two
# do not check).
SUBPROCESS = {"base_diverges", "corrupt_train_image_in_a_worker"}

# Kinds that repeat another row's code path with other values (a checkpoint field, a damaged file): each still
# runs in `make test-slow`, so the default run stays within its time budget.
SLOW = {"base_other_protected", "base_other_size", "weights_of_other_backbone", "checkpoint_yaml_unknown_key",
        "gan_checkpoint_not_a_generator"}


def _row_overrides(world: World, name: str) -> list[str]:
    """What every row passes: the earlier run's data and folders, the tiny sizes, an experiment of its own."""
    return [f"data.root={world.root / 'data'}", f"output_dir={world.root / 'runs'}", *TINY, f"experiment=case_{name}"]


def _as_a_command(monkeypatch, world: World, case: Case) -> None:
    """This process as a row's command would start: in the world's folder, with the row's environment."""
    monkeypatch.chdir(world.root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)


def _with_own(shared: list[str], own: list[str]) -> list[str]:
    """`shared` overrides less the keys that `own` sets, then `own`: a row's value replaces the shared one (a
    command line must give each key once); a row that repeats a key on purpose keeps both."""
    keys = {item.partition("=")[0] for item in own}
    return [*(item for item in shared if item.partition("=")[0] not in keys), *own]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_bad_input_is_one_line_and_changes_nothing(name, world, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    overrides = _with_own(_row_overrides(world, name),
                          [*case.overrides, *(case.setup(world, tmp_path) if case.setup else [])])
    config = SMOKE
    if case.config is not None:
        config = tmp_path / "config.yaml"
        config.write_bytes(case.config if isinstance(case.config, bytes) else case.config.encode())
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **case.env)
    before = _snapshot(world)
    if name not in SUBPROCESS:
        _as_a_command(monkeypatch, world, case)
        # the store probe's wait for another process's write lock (5 s): the lock here is never let go
        monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 0.2)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            finetune.main(["--config", str(config), *overrides])
        code, stderr = stopped.value.code, capsys.readouterr().err
    else:
        proc = subprocess.run([sys.executable, "-m", "distributed_asac.finetune", "--config", str(config), *overrides],
                              cwd=world.root, env=env, capture_output=True, text=True, timeout=600)
        code, stderr = proc.returncode, proc.stderr
    assert code == 2, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert re.search(case.message, lines[0]), lines[0]
    files, runs = _snapshot(world)
    assert {p: h for p, h in files.items() if p in before[0]} == before[0]  # nothing earlier changed or went
    assert {r: v for r, v in runs.items() if r in before[1]} == before[1]
    new_files = sorted(set(files) - set(before[0]))
    new_runs = [runs[r] for r in set(runs) - set(before[1])]
    assert not (world.root / "x").exists() and not (world.root.parent / "x").exists()
    if case.starts:  # the stopped run keeps its marker and is FAILED in MLflow; no checkpoint was written
        assert [p.name for p in new_files if p.name in (INCOMPLETE, "model.safetensors")] == ["INCOMPLETE"]
        assert [status for status, *_ in new_runs] == ["FAILED"]
    else:  # refused before any run folder or MLflow run
        assert new_files == [] and new_runs == []


def test_sweep_with_an_unreachable_tracking_server_stops_before_its_parent_run(tmp_path, monkeypatch, capsys):
    from tune.sweep import main

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--config", "configs/sweeps/smoke.yaml", "tracking.uri=http://127.0.0.1:9", f"output_dir={tmp_path / 'runs'}"])
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2, stderr[-3000:]
    lines = stderr.splitlines()
    assert len(lines) == 1 and re.match(r"error: MLflow tracking server http://127\.0\.0\.1:9 \(the sweep's "
                                        r"tracking URI\) is unreachable", lines[0]), stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # no sweep folder, no data, no base


def test_an_empty_rows_list_is_one_line(capsys):
    """`--rows ''` named no row; it used to run the config's own row instead."""
    from distributed_asac import demo

    with pytest.raises(SystemExit) as stopped:
        demo.main(["--rows", "", "--config", str(SMOKE)])
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1
    assert re.match(r"error: --rows '' names no row; give at least one of .*asac_fgsm", lines[0])


def test_a_base_checkpoint_is_told_for_what_it_is(tmp_path):
    """Folders as the pipeline writes them, without training: a comparison's folder names a seed's base; a
    fine-tuned row saved before checkpoints recorded their row is found by its results.json; a base is accepted,
    with or without the record."""
    import torch

    from distributed_asac.checkpoint import check_base_folder
    from distributed_asac.errors import UserError

    def checkpoint(folder: Path, row: Optional[str] = None, report: Optional[str] = None) -> Path:
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(1)}, folder / "model.safetensors",
                  metadata={WRITTEN_BY: json.dumps({"row": row, "stage": 2})} if row else None)
        if report:
            (folder / "results.json").write_text(json.dumps({report: {"ACC": 50.0}}))
        return folder

    seed = checkpoint(tmp_path / "comparison" / "seed_0" / "probe", row="probe")
    with pytest.raises(UserError, match=rf"is a comparison's folder .*one seed's base, e\.g\. {re.escape(str(seed))}$"):
        check_base_folder(tmp_path / "comparison")
    check_base_folder(seed)
    run = tmp_path / "older_run"
    probe, plain = checkpoint(run / "probe", report="probe"), checkpoint(run / "plain", report="plain")
    with pytest.raises(UserError, match=rf"holds the fine-tuned row 'plain' \(stage 3\).* at {re.escape(str(probe))}, "):
        check_base_folder(plain)
    check_base_folder(probe)
    check_base_folder(checkpoint(tmp_path / "made_by_hand"))


@pytest.mark.parametrize("kind", ["server_unreachable", "garbage_sqlite", "output_dir_is_a_file",
                                  "base_other_backbone", "train_split_of_one_target_label",
                                  "test_split_without_a_group", "base_batch_too_big", "corrupt_test_image"])
def test_the_demo_refuses_what_finetune_refuses_before_its_folder_and_parent_run(kind, world, tmp_path, monkeypatch,
                                                                                   capsys):
    """The comparison (`python -m distributed_asac.demo`) runs the finetune command's preflight first."""
    from distributed_asac import demo

    case = CASES[kind]
    _as_a_command(monkeypatch, world, case)
    shared = [f"data.root={world.root / 'data'}", f"output_dir={tmp_path / 'runs'}", *TINY, "experiment=demo_case"]
    overrides = _with_own(shared, [*case.overrides, *(case.setup(world, tmp_path) if case.setup else [])])
    before = _snapshot(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--config", str(SMOKE), "--rows", "plain", *overrides])
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and re.search(case.message, lines[0]), lines
    assert not (tmp_path / "runs" / "demo_case").exists() and _snapshot(world) == before


def test_a_second_driver_on_a_running_sweep_is_refused_and_changes_nothing(tmp_path, monkeypatch, capsys):
    """This test process opens a sweep as its driver would (folder, parent run, lock); a second driver's
    `--resume` of it (the same entry point, `tune.sweep.main`; the lock file, not the process, decides) must stop
    in one line naming this process, before it deletes or reopens anything."""
    import shlex

    from tune.spec import load_sweep
    from tune.sweep import main, open_sweep, parse_args

    overrides = [f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    sweep = load_sweep(REPO / "configs" / "sweeps" / "smoke.yaml", overrides, None)
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with open_sweep(sweep, parse_args(["--config", "configs/sweeps/smoke.yaml", *overrides])) as (folder, state):
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            main(["--config", "configs/sweeps/smoke.yaml", *overrides, "--resume", str(folder)])
        stderr = capsys.readouterr().err
        assert stopped.value.code == 2, stderr[-3000:]
        lines = stderr.splitlines()
        refusal = re.match(rf"error: sweep folder {re.escape(str(folder))} is in use by pid {os.getpid()} on this host "
                           rf".*\(kill {os.getpid()}\), then continue it with: (.*)$", lines[0])
        assert len(lines) == 1 and refusal, stderr[-3000:]
        # the command it prints resumes this sweep: its overrides kept, or its trials would differ
        command = shlex.split(refusal.group(1))
        args = parse_args(command[3:])
        assert command[:3] == [sys.executable, "-m", "tune.sweep"]
        assert (args.config, args.overrides, args.resume) == ("configs/sweeps/smoke.yaml", overrides, str(folder))
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
        parent = MlflowClient(state["tracking_uri"]).get_run(state["parent_run_id"])
        assert parent.info.status == "RUNNING" and parent.info.end_time is None
    assert not (folder / LOCK).exists()  # the first driver's lock went with it


def test_a_killed_run_is_marked_killed_by_the_next_run_and_others_are_left_alone(tmp_path):
    """A killed process cannot end its MLflow run: the next run of the experiment on this host does, for run
    folders whose INCOMPLETE marker names a dead process. Live processes and other hosts are left alone."""
    from distributed_asac.resume import mark_incomplete
    from distributed_asac.tracking import Tracker, close_killed_runs

    cfg = load_config(None, [f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                             "experiment=killed"])
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # a process that has exited
    runs = {}
    for name in ("dead", "alive", "elsewhere"):
        folder = Path(cfg.output_dir) / cfg.experiment / name
        folder.mkdir(parents=True)
        mark_incomplete(folder)  # the marker of a run of this process, on this host
        text = (folder / INCOMPLETE).read_text()
        if name == "dead":
            text = text.replace(f"pid {os.getpid()} ", f"pid {dead_pid} ")
        elif name == "elsewhere":
            text = re.sub(r"pid \d+ on \S+;", f"pid {dead_pid} on another-host;", text)
        (folder / INCOMPLETE).write_text(text)
        tracker = Tracker(cfg, name, active=True, tags={"run_dir": str(folder)}).__enter__()  # never exited
        runs[name] = tracker.run_id
    assert close_killed_runs(cfg, INCOMPLETE) == [runs["dead"]]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {name: client.get_run(run_id).info.status for name, run_id in runs.items()} == {
        "dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert close_killed_runs(cfg, INCOMPLETE) == []  # once


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_is_one_line(code, capsys):
    """A full disk (or quota) anywhere under an entry point: one line naming the file, exit status 2."""
    import errno

    from distributed_asac.errors import exit_on_user_error

    with pytest.raises(SystemExit) as stopped, exit_on_user_error():
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/runs/demo/x/model.safetensors")
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: no space left on the device while writing /runs/demo/x/model.safetensors")


def test_sigterm_is_one_line_naming_the_outermost_run_folder_and_the_handler_is_restored(capsys):
    """A comparison's folder (outer) replaces its seed's (inner) in the command; a resume= already given goes."""
    import signal

    from distributed_asac.errors import exit_on_user_error, interrupted_in

    before = signal.getsignal(signal.SIGTERM)
    command = ["python", "-m", "distributed_asac.demo", "seed=1", "resume=latest"]
    with pytest.raises(SystemExit) as stopped, exit_on_user_error(command):
        with interrupted_in(Path("/runs/demo/1")), interrupted_in(Path("/runs/demo/1/seed_1")):
            os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
    assert capsys.readouterr().err.splitlines() == [
        "interrupted; resume with: python -m distributed_asac.demo seed=1 resume=/runs/demo/1"]
    with pytest.raises(SystemExit) as stopped, exit_on_user_error(command[:-1]):
        raise KeyboardInterrupt  # Ctrl-C before any run folder
    assert stopped.value.code == 130 and capsys.readouterr().err.splitlines() == [
        "interrupted before a run folder existed; nothing to resume: rerun python -m distributed_asac.demo seed=1"]


@pytest.mark.parametrize("raised", [
    RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/0: file "
                 "write failed"),  # torch.save
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                    'on device" })'),  # safetensors' save_file
])
def test_a_write_that_torch_or_safetensors_reports_failed_is_one_line(raised, capsys):
    from distributed_asac.errors import exit_on_user_error

    with pytest.raises(SystemExit) as stopped, exit_on_user_error():
        try:
            raise raised
        except Exception as err:
            raise RuntimeError("while saving the training state") from err  # wrapped, as Accelerate may
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: a file could not be written ({type(raised).__name__}: ")
    assert "most likely because the disk or quota is full" in lines[0]


def test_other_os_errors_are_not_hidden():
    """A fault that is no path's (an I/O error, or one without a file name) keeps its traceback."""
    import errno

    from distributed_asac.errors import exit_on_user_error

    with pytest.raises(OSError), exit_on_user_error():
        raise OSError(errno.EIO, "Input/output error", "/x")
    with pytest.raises(PermissionError), exit_on_user_error():
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(RuntimeError, match="no write"), exit_on_user_error():
        raise RuntimeError("no write failed here")


def test_a_read_only_path_is_one_line(capsys):
    """Permissions do not stop root, which runs these tests: the fault is raised as the OS raises it."""
    import errno

    from distributed_asac.errors import exit_on_user_error

    with pytest.raises(SystemExit) as stopped, exit_on_user_error():
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/runs/demo")
    assert stopped.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: /mnt/ro/runs/demo: Read-only file system; give a path on a writable file system, then rerun"]


# Loaded by the run's interpreter at start-up (sitecustomize on PYTHONPATH): every sqlite connection may use
# no more pages than the store has now, so the run's first write that needs a new page fails with sqlite's
# own SQLITE_FULL, as on a full disk.
STORE_LIMIT = """
from sqlalchemy import event
from sqlalchemy.engine import Engine

@event.listens_for(Engine, "connect")
def _no_more_pages(connection, record):
    cursor = connection.cursor()
    cursor.execute("PRAGMA max_page_count = {pages}")
    cursor.close()
"""


# full while it trains; full at the run's first write (slow: the same one-line handler, ~5 s for a new interpreter)
@pytest.mark.parametrize("spare_pages", [8, pytest.param(0, marks=pytest.mark.slow)])
def test_a_full_tracking_store_is_one_line_and_changes_nothing(spare_pages, world, tmp_path):
    import sqlite3

    before = _snapshot(world)
    pages = sqlite3.connect(world.root / "mlflow.db").execute("PRAGMA page_count").fetchone()[0]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STORE_LIMIT.format(pages=pages + spare_pages))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "distributed_asac.finetune", "--config",
                           str(REPO / "configs" / "smoke.yaml"), f"data.root={world.root / 'data'}",
                           f"output_dir={world.root / 'runs'}", *TINY, f"experiment=case_store_full_{spare_pages}"],
                          cwd=world.root, env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: the MLflow tracking store is full (sqlite: database or disk is full)")
    files, runs = _snapshot(world)
    assert {p: h for p, h in files.items() if p in before[0]} == before[0]
    assert {r: v for r, v in runs.items() if r in before[1]} == before[1]


# Builds an image cache of 1,000 rows at 32 px (3 MB) in the folder argv[1], under the entry points' error handling.
BUILD_CACHE = """
import sys
import numpy as np
from distributed_asac.data.cache import open_image_cache
from distributed_asac.errors import exit_on_user_error

with exit_on_user_error():
    open_image_cache(sys.argv[1], "big", sys.argv[1], [f"{k}.jpg" for k in range(1000)],
                     lambda path: np.zeros((32, 32, 3), np.uint8), image_size=32, pipeline="zeros", workers=1)
"""


def test_an_image_cache_over_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """The file a cache is built in is made whole before it is mapped: a file system that cannot hold it is an
    OSError naming it (here EFBIG, from a file size limit below its size, as `ulimit -f` sets), not a SIGBUS at a
    later write, and the half-made file is removed (a full tmpfs, ENOSPC, was checked by hand: docs/data.md)."""
    import resource
    import signal

    def limited() -> None:  # in the child: a write past 64 KiB fails with EFBIG instead of killing it by SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", BUILD_CACHE, str(tmp_path / "cache")], env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=limited)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    (folder,) = (tmp_path / "cache").iterdir()
    assert re.fullmatch(rf"error: {re.escape(str(folder))}/images-\w+\.npy\.partial: File too large; the file is too "
                        r"large for its file system or for this process's file size limit \(ulimit -f\): raise the "
                        r"limit or give a path on another file system, then rerun", lines[0]), lines[0]
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no images file, no manifest


def _as_mlflow_raises(error: Exception) -> Exception:
    """`error` (sqlite3's) as MLflow's SQL store raises it: an MlflowException from SQLAlchemy's OperationalError
    from sqlite3's (mlflow/store/db/utils.py, make_managed_session)."""
    import sqlalchemy
    from mlflow.exceptions import MlflowException

    wrapped = sqlalchemy.exc.OperationalError("INSERT INTO metrics ...", (), error)
    wrapped.__cause__ = error
    raised = MlflowException(message=wrapped)
    raised.__cause__ = wrapped
    return raised


def test_a_write_to_a_locked_store_is_tried_again_with_pauses_then_stops_in_one_line(capsys):
    """`while_locked` on a fake clock: each try costs 1 s (sqlite's busy wait), pauses double up to 5 s, the bound
    is tracking.lock_wait_s; the line names the store and the command that resumes the run folder."""
    import sqlite3

    from distributed_asac.errors import exit_on_user_error, interrupted_in
    from distributed_asac.tracking import while_locked

    now, pauses, tries = [0.0], [], []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    def write(free_after: int) -> str:
        tries.append(now[0])
        now[0] += 1.0
        if len(tries) <= free_after:
            raise _as_mlflow_raises(sqlite3.OperationalError("database is locked"))
        return "written"

    uri = "sqlite:///store/mlflow.db"
    assert while_locked(lambda: write(3), uri, 30, lambda: now[0], sleep) == "written"
    assert pauses == pytest.approx([0.1, 0.2, 0.4]) and len(tries) == 4
    now[0], pauses[:], tries[:] = 0.0, [], []
    command = ["python", "-m", "distributed_asac.finetune", "seed=1", "resume=latest"]
    with pytest.raises(SystemExit) as stopped, exit_on_user_error(command), interrupted_in(Path("/runs/exp/1")):
        while_locked(lambda: write(1000), uri, 30, lambda: now[0], sleep)
    assert pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 4.7])  # the last one ends at the bound
    assert stopped.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: MLflow tracking store sqlite:///store/mlflow.db stayed locked for 31 s (another process holds its "
        "write lock; tracking.lock_wait_s=30); stop that process, then resume with: python -m "
        "distributed_asac.finetune seed=1 resume=/runs/exp/1"]
    full = _as_mlflow_raises(sqlite3.OperationalError("database or disk is full"))
    with pytest.raises(type(full)):  # not a lock: raised at once, to its own one line (a full store)
        while_locked(lambda: (_ for _ in ()).throw(full), uri, 30, lambda: now[0], sleep)
    assert len(pauses) == 9


def test_a_store_locked_mid_run_stops_in_one_line_and_leaves_the_stage_failed(tmp_path, monkeypatch, capsys):
    """Another process takes the store's write lock while a stage's MLflow run is open (this test's own sqlite
    connection, as the run logs its first metric): the write waits tracking.lock_wait_s, then the command stops in
    one line; the test lets the lock go when that line's error is raised, and the stage's run ends FAILED, not
    RUNNING. MLflow makes every try wait 20 s in sqlite's busy handler: here 50 ms, so the test takes a second."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from distributed_asac.errors import exit_on_user_error, interrupted_in
    from distributed_asac.logs import setup_logging
    from distributed_asac.tracking import Tracker

    def shorter_busy_wait(conn, cursor, statement, parameters, context, executemany):
        return statement.replace("PRAGMA busy_timeout = 20000", "PRAGMA busy_timeout = 50"), parameters

    setup_logging()  # as every entry point: MLflow's SQL store logs each failed try with its traceback
    event.listen(Engine, "before_cursor_execute", shorter_busy_wait, retval=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db, run_dir = tmp_path / "mlflow.db", tmp_path / "runs" / "locked" / "20261205-101500"
    cfg = load_config(None, [f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{db}", "experiment=locked",
                             "tracking.lock_wait_s=1"])
    command = ["python", "-m", "distributed_asac.finetune", "tracking.lock_wait_s=1"]
    try:
        with pytest.raises(SystemExit) as stopped, exit_on_user_error(command):
            with interrupted_in(run_dir), Tracker(cfg, "base", active=True) as tracker:
                run_id = tracker.run_id
                holder = sqlite3.connect(db, isolation_level=None)
                holder.execute("BEGIN IMMEDIATE")
                try:
                    tracker.log_metrics({"base/train_loss": 0.5}, step=0)
                finally:  # the other process lets go: the stage's run can be ended
                    holder.execute("ROLLBACK")
                    holder.close()
    finally:
        event.remove(Engine, "before_cursor_execute", shorter_busy_wait)
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"error: MLflow tracking store sqlite:///{re.escape(str(db))} stayed locked for \d+ s "
                        r"\(another process holds its write lock; tracking\.lock_wait_s=1\); stop that process, then "
                        rf"resume with: python -m distributed_asac\.finetune tracking\.lock_wait_s=1 "
                        rf"resume={re.escape(str(run_dir))}", lines[0]), lines[0]
    run = MlflowClient(f"sqlite:///{db}").get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {} and run.data.params["experiment"] == "locked"


def test_a_new_store_is_created_by_one_process_at_a_time(tmp_path, waits_on_lock):
    """Two runs creating one new sqlite store at once: one failed in MLflow's table creation ("Online migration
    expected to match one row ...") and was told to fix a store that was fine. The first open holds the store's
    lock (here this test holds it, as the other run would); the second waits, then opens the store made."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    waited, _ = waits_on_lock(tmp_path / "mlflow.db.lock", lambda: tracking.probe_store(uri, "tracking.uri"))
    assert waited and MlflowClient(uri).search_experiments()[0].name == "Default"
