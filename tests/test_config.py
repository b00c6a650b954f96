"""Config: defaults ← YAML ← overrides; every bad input is one UserError naming the key."""

import subprocess
import sys

import numpy as np
import pytest
import yaml

from distributed_asac.config import Config, choices, config_from_dict, load_config
from distributed_asac.errors import UserError


def test_precedence_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"experiment": "x", "finetune": {"alpha": 0.3, "eps": [0.02]}, "seed": 5}))
    cfg = load_config(path, ["finetune.alpha=0.7", "model.backbone=resnet18"])
    assert cfg.experiment == "x" and cfg.seed == 5
    assert cfg.finetune.alpha == 0.7  # the override wins over the file
    assert cfg.finetune.eps == [0.02]
    assert cfg.model.backbone == "resnet18"
    assert cfg.finetune.order == Config().finetune.order  # untouched keys keep their defaults


def test_types_are_coerced_only_where_safe():
    cfg = load_config(None, ["finetune.alpha=1", "finetune.eps=0.05", "model.weights=null"])
    assert isinstance(cfg.finetune.alpha, float) and cfg.finetune.eps == [0.05] and cfg.model.weights is None
    with pytest.raises(UserError, match="'base.epochs': expected int"):
        load_config(None, ["base.epochs=2.5"])
    with pytest.raises(UserError, match="expected int"):
        load_config(None, ["seed=true"])


def test_a_name_stays_as_typed():
    """YAML reads 0x1F as 31, yes as True and 1e3 as a float: a str key keeps the text (a non-str key does not)."""
    cfg = load_config(None, ["experiment=0x1F", "data.target=yes", "data.protected=1e3", "model.weights='a b'"])
    assert (cfg.experiment, cfg.data.target, cfg.data.protected, cfg.model.weights) == ("0x1F", "yes", "1e3", "a b")
    assert load_config(None, ["base_checkpoint=null", "seed=0x1F"]).base_checkpoint is None
    assert load_config(None, ["seed=0x1F"]).seed == 31


def test_a_name_in_a_yaml_file_stays_as_written(tmp_path):
    """The same in a config file: `experiment: 0x1F` is the name "0x1F", not "31"; numbers stay numbers, and a
    name written in quotes or through an anchor is read as written."""
    path = tmp_path / "config.yaml"
    path.write_text("experiment: 0x1F\nseed: 0x1F\ndata:\n  target: yes\n  protected: &p 1e3\nfinetune:\n"
                    "  alpha: 0.25\nmodel:\n  weights: '007'\nbase_checkpoint: null\ntracking:\n  uri: *p\n")
    cfg = load_config(path)
    assert (cfg.experiment, cfg.data.target, cfg.data.protected, cfg.model.weights) == ("0x1F", "yes", "1e3", "007")
    assert (cfg.seed, cfg.finetune.alpha, cfg.base_checkpoint, cfg.tracking.uri) == (31, 0.25, None, "1e3")


def test_a_command_line_text_value_is_kept_as_typed():
    """Read as YAML, `output_dir=/a/b #c` lost ` #c`, a newline became a space and `~` was null: a key that holds
    text keeps what was typed (`null` still clears a key that may be none; a YAML-quoted string is its content)."""
    cfg = load_config(None, ["output_dir=/runs/x #1", "data.root=/data/two\nlines", "experiment=a  b",
                             "model.weights=null", "tracking.uri=\"sqlite:///quoted.db\""])
    assert (cfg.output_dir, cfg.data.root, cfg.experiment) == ("/runs/x #1", "/data/two\nlines", "a  b")
    assert (cfg.model.weights, cfg.tracking.uri) == (None, "sqlite:///quoted.db")
    assert load_config(None, ["finetune.eps=[0.01] # a YAML comment"]).finetune.eps == [0.01]  # a list is YAML


def test_a_path_that_starts_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """`output_dir=~/x` made a folder named `~` in the working directory; on the command line and in a file."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["output_dir=~/runs", "base_checkpoint=~/b/probe", "data.cache_dir=~", "resume=latest"])
    assert (cfg.output_dir, cfg.base_checkpoint) == (str(tmp_path / "runs"), str(tmp_path / "b" / "probe"))
    assert (cfg.data.cache_dir, cfg.resume) == (str(tmp_path), "latest")
    (tmp_path / "exp.yaml").write_text("data:\n  root: ~/faces\nexperiment: ~x\n")
    cfg = load_config("~/exp.yaml")  # --config=~/exp.yaml: no shell expands it
    assert (cfg.data.root, cfg.experiment) == (str(tmp_path / "faces"), "~x")  # a name is no path


def test_a_yaml_null_where_text_is_needed_says_why(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("output_dir: ~\n")
    with pytest.raises(UserError, match=r"^config key 'output_dir': expected str, got no value \(YAML reads ~, null and "
                                        r"an empty value as none\); give a value, or quote it \('~'\) to mean the home"):
        load_config(path)


def test_any_yaml_that_cannot_be_read_is_one_line(tmp_path):
    """PyYAML raises more than YAMLError on bad input (a date that does not exist: ValueError; deep nesting:
    RecursionError); seeded garbage from YAML's own punctuation, 24 fixed seeds."""
    path = tmp_path / "exp.yaml"
    for text in ("seed: 2001-13-01\n", "[" * 5000 + "]" * 5000 + "\n"):
        path.write_text(text)
        with pytest.raises(UserError, match=r"^config file .*exp\.yaml' is not valid YAML: "):
            load_config(path)
    alphabet = np.array(list("{}[]:,-?!&*#|>'\"%@ \n\tab01.~=<"))
    for seed in range(24):
        path.write_text("".join(np.random.default_rng(seed).choice(alphabet, 200)))
        with pytest.raises(UserError):
            load_config(path)


def test_zero_epochs_are_refused_only_in_a_stage_that_runs():
    """A base_checkpoint skips stages 1–2, so their epochs do not matter then; stage 3 always trains."""
    assert load_config(None, ["base_checkpoint=runs/x/probe", "base.epochs=0", "probe.epochs=0"]).base.epochs == 0
    with pytest.raises(UserError, match=r"'base\.epochs': 0 epochs would train nothing .*\(or base_checkpoint="):
        load_config(None, ["base.epochs=0"])
    with pytest.raises(UserError, match=r"'finetune\.epochs': 0 epochs would train nothing .*>= 1$"):
        load_config(None, ["base_checkpoint=runs/x/probe", "finetune.epochs=0"])


def test_yaml_keeps_its_meaning_without_repeats(tmp_path):
    """The loader is yaml.safe_load's apart from repeated keys: anchors and merge keys still work."""
    path = tmp_path / "merged.yaml"
    path.write_text("base: &stage {epochs: 2, lr: 0.01}\nprobe:\n  <<: *stage\n  epochs: 1\n")
    cfg = load_config(path)
    assert (cfg.base.epochs, cfg.probe.epochs, cfg.probe.lr) == (2, 1, 0.01)


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.alpah=0.5", "did you mean 'finetune.alpha'"),
        ("finetune.alpha=1.5", "'finetune.alpha'.*out of range"),
        ("finetune.eps=[0.01,1.2]", "'finetune.eps'.*outside \\[0, 1\\]"),
        ("finetune.eps=[-0.1]", "outside"),
        ("model.backbone=resnet19", "did you mean 'resnet18'"),
        ("finetune.order=ascend", "did you mean 'ascending'"),
        ("finetune.attack=pgdd", "did you mean 'pgd'"),
        ("data.name=celeb", "did you mean 'celeba'"),
        ("finetune=3", "unknown config key 'finetune'"),
        ("novalue", "key=value"),
        ("data.target=Male", "same attribute"),
        # the generated dataset's settings: the generator's own checks, worded with the config key
        ("data.synthetic_num_images=10", "config key 'data.synthetic_num_images': 10 is out of range: pass 40"),
        ("data.synthetic_bias=1.5", "config key 'data.synthetic_bias': 1.5 is not a probability"),
        ("data.synthetic_beard_strength=0", "config key 'data.synthetic_beard_strength': 0.0 is out of range"),
        ("data.image_size=16", "config key 'data.image_size': 16 is out of range: each side must be 32..1024"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_bad_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)
    bad.write_text("0\n")  # a falsy scalar too: it is not an empty file
    with pytest.raises(UserError, match=r"must hold a mapping of keys .*not a int \(0\)"):
        load_config(bad)
    bad.write_text("# nothing yet\n")
    assert load_config(bad) == Config()
    bad.write_text("base:\n  epochs: 1\nfinetune: {alpha: 0.3, alpha: 0.4}\n")
    with pytest.raises(UserError, match=r"key 'alpha' appears twice, at line 3, columns 12 and 24; the second"):
        load_config(bad)


def test_round_trip_through_saved_dict():
    cfg = load_config(None, ["finetune.eps=[0.03,0.05]", "experiment=rt"])
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert cfg.flat()["finetune.eps"] == [0.03, 0.05]


def test_cli_error_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_asac.finetune", "finetune.alpha=2"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: config key 'finetune.alpha'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("key, name", [(key, name) for key, names in choices().items() for name in names])
def test_every_registered_name_is_a_valid_value(key, name):
    """Every name of every registry (datasets, backbones, attacks, orders, modes) and fixed choice loads, with no
    list of them here: a newly registered part is a valid config value without editing this test."""
    assert load_config(None, [f"{key}={name}"]).flat()[key] == name
