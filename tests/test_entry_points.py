"""What every entry point shares: --help generated from the config dataclasses, provenance tags on every
MLflow run (what the MLflow UI shows of it), and logging configured on the main rank only."""

import importlib
import logging
import shlex
import signal
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from distributed_asac import logs
from distributed_asac.config import Config, describe_keys, load_config
from distributed_asac.data.lfw import LFW
from distributed_asac.errors import Interrupted
from distributed_asac.tracking import ENTRY_POINT_ENV, MAX_NOTE, Tracker, note

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def test_every_config_key_has_a_meaning():
    rows = describe_keys()
    keys = [key for key, kind, _, _ in rows if kind != "section"]
    assert set(keys) == set(Config().flat())
    assert not [key for key, _, _, meaning in rows if not meaning], "add a trailing # comment to these fields"
    by_key = {key: (kind, default, meaning) for key, kind, default, meaning in rows}
    assert by_key["finetune.alpha"] == ("float", 0.5, "weight of the clean term in α·CE(x) + (1 − α)·CE(x')")
    assert by_key["base.epochs"][1] == 8 and by_key["probe.epochs"][1] == 3  # defaults of the instance, not the class
    assert by_key["model.weights"][0] == "str|null"
    assert "[fgsm | pgd]" in by_key["finetune.attack"][2]  # valid names come from the registry


@pytest.mark.parametrize("module", ["distributed_asac.finetune", "distributed_asac.demo"])
def test_help_lists_every_key_with_type_and_default(module, capsys):
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main(["--help"])
    out = capsys.readouterr().out
    assert stopped.value.code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for key, value in Config().flat().items():
        assert key in lines, key
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        assert f"= {shown} " in lines[key] or lines[key].rstrip().endswith(f"= {shown}"), lines[key]


def test_every_mlflow_run_carries_its_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "experiment=prov"])
    with Tracker(cfg, "stage", active=True, tags={"stage": "base"}) as tracker:
        pass
    tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id).data.tags
    assert tags["stage"] == "base" and tags["world_size"] == "3"
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")  # the tests run from a checkout
    assert tags["mlflow.source.git.commit"] == tags["git_commit"]
    assert tags["mlflow.source.name"] == "pytest" and tags["mlflow.source.type"] == "LOCAL"  # python -m pytest
    assert tags["user"] and tags["host"] and sys.executable in tags["command"]
    monkeypatch.setenv(ENTRY_POINT_ENV, "tune.sweep")  # what a sweep's driver hands its trials' processes
    with Tracker(cfg, "trial", active=True) as tracker:
        pass
    assert MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).data.tags["mlflow.source.name"] == "tune.sweep"


def test_experiments_are_model_training_ones_also_those_made_before(tmp_path):
    """The MLflow UI takes an experiment without a kind for a GenAI one: new experiments get the kind, and so
    does one an earlier version of the project made without it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("old", artifact_location=(tmp_path / "old").as_uri())
    for name in ("old", "new"):
        with Tracker(load_config(None, [f"tracking.uri={uri}", f"experiment={name}"]), "stage", active=True):
            pass
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_long_description_is_cut_at_a_line_end_and_names_the_whole_text():
    text = "\n".join(f"| row {i} | {i / 7:.6f} |" for i in range(2000))
    cut = note(text, "the artifact table.md")
    assert len(cut) <= MAX_NOTE < len(text) and cut.endswith("the whole text: the artifact table.md)")
    kept = cut.split("\n\n…")[0]
    assert text.startswith(kept + "\n")  # whole lines only
    assert note("short", "x") == "short"


@pytest.fixture()
def package_loggers():
    """Restore the package loggers after a test that configures them."""
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in logs.LOGGERS}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.level, logger.propagate = handlers, level, propagate


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_lfw_join_counts_are_logged_on_the_main_rank_only(rank, shown, tmp_path, monkeypatch, capsys,
                                                          package_loggers, write_lfw_fixture):
    monkeypatch.setenv("RANK", rank)
    fixture = write_lfw_fixture(tmp_path / "lfw")
    logs.setup_logging()
    logs.setup_logging()  # idempotent: still one line per record
    LFW(fixture.root, "train", "Smiling", "Male", split_file=tmp_path / "split.json")
    logging.getLogger("distributed_asac.data.cache").warning("a warning")
    out, err = capsys.readouterr()
    joins = [line for line in out.splitlines() if line.startswith("LFW ") and "without" in line]
    assert len(joins) == (1 if shown else 0), out
    assert err == "a warning\n"  # warnings on every rank, on stderr


def test_sweep_resume_does_not_swallow_an_override(tmp_path):
    from tune.sweep import parse_args

    args = parse_args(["--config", "s.yaml", "--resume", "seed=1", "finetune.epochs=2"])
    assert args.resume == "latest" and args.overrides == ["seed=1", "finetune.epochs=2"]
    folder = tmp_path / "a=b"
    folder.mkdir()
    assert parse_args(["--config", "s.yaml", "--resume", str(folder)]).resume == str(folder)  # a real folder stays


@pytest.mark.parametrize("module, runner, options", [
    ("finetune", "run", []), ("demo", "compare", ["--rows", "plain", "--parallel-seeds", "1"])])
def test_a_printed_resume_command_runs_as_printed(module, runner, options, tmp_path, monkeypatch, capsys):
    """With the overrides before --config (or --rows, --parallel-seeds), argparse refused the resume= that the
    printed command appends: the line an interrupted command prints is run through the same entry point."""
    entry = importlib.import_module(f"distributed_asac.{module}")
    run_dir = tmp_path / "runs" / "x" / "1"

    def interrupted(cfg, **kwargs):
        raise Interrupted(signal.SIGTERM, run_dir)

    monkeypatch.setattr(entry, runner, interrupted)
    with pytest.raises(SystemExit) as stopped:
        entry.main(["seed=3", "--config", str(SMOKE), *options])
    assert stopped.value.code == 143
    (line,) = capsys.readouterr().err.splitlines()
    command = shlex.split(line.removeprefix("interrupted; resume with: "))
    assert command[:3] == [sys.executable, "-m", f"distributed_asac.{module}"]
    started = []
    monkeypatch.setattr(entry, runner, lambda cfg, **kwargs: started.append(cfg))
    entry.main(command[3:])
    assert [(cfg.resume, cfg.seed) for cfg in started] == [(str(run_dir), 3)]


def test_the_printed_sweep_commands_run_as_printed(tmp_path, monkeypatch, capsys):
    """The resume command an interrupted sweep prints (overrides given before --config) runs the same sweep,
    resumed in its folder (the command a second driver is told to run: tests/test_bad_input.py)."""
    from tune import sweep

    monkeypatch.chdir(REPO)
    folder = tmp_path / "runs" / "sweeps" / "smoke" / "1"
    given = ["seed=2", f"output_dir={tmp_path / 'runs'}", "--config", "configs/sweeps/smoke.yaml", "--seeds", "0,1"]

    def interrupted(spec, args):
        raise Interrupted(signal.SIGINT, folder)

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert sweep.main(given) == 130
    line = capsys.readouterr().err.splitlines()[-1]
    printed = shlex.split(line.removeprefix("interrupted; resume with: "))
    assert printed[:3] == [sys.executable, "-m", "tune.sweep"]
    resumed = []
    monkeypatch.setattr(sweep, "run_sweep", lambda spec, args: resumed.append(args) or 0)
    assert sweep.main(printed[3:]) == 0
    expected = sweep.parse_args(given)
    for args in (*resumed, sweep.parse_args(printed[3:])):
        assert (args.config, args.seeds, args.overrides, args.resume) == (expected.config, [0, 1], expected.overrides,
                                                                         str(folder))


def test_the_sweep_report_takes_an_override_after_its_folder(tmp_path):
    """`--report <folder> tracking.uri=...` read the override as a second folder (and so would --against's list)."""
    from tune.sweep import parse_args

    args = parse_args(["--report", str(tmp_path), "tracking.uri=sqlite:///x.db"])
    assert args.report == [str(tmp_path)] and args.overrides == ["tracking.uri=sqlite:///x.db"]
    args = parse_args(["--report", str(tmp_path), "--against", str(tmp_path), "tracking.uri=sqlite:///x.db"])
    assert args.against == [str(tmp_path)] and args.overrides == ["tracking.uri=sqlite:///x.db"]


def test_the_sweep_parent_run_carries_provenance(tmp_path):
    from tune import records

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = records.start_parent(uri, "sweeps", "smoke", tags={"sweep_dir": "x"}, params={"trials": 1})
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["sweep_dir"] == "x" and len(tags["git_commit"]) == 40 and tags["world_size"]
