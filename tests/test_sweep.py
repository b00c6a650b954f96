"""Ray Tune sweeps (tune/) on the smoke config: runs, MLflow nesting, base cache, report, failures, resume.

The sweeps run as the CLI does (`python tune/sweep.py` in a subprocess) with every output under a temporary
folder. Each subprocess carries a marker variable, which Ray's processes inherit; after a sweep ends (or its
driver is killed and its watchdog has exited) no process may still carry it or hold a file open in the test's
Ray temp folder.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from distributed_asac.config import load_config
from distributed_asac.errors import UserError
from distributed_asac.failpoints import PAUSE_AT, PAUSE_DIR
from tune import registered, report
from tune.records import RECORD, TrialRecord, read_state
from tune.spec import base_key, load_sweep
from tune.trials import ENTRY_FILE, entry_dir
from tune.sweep import main, open_sweep, parse_args

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "sweep-test"
MARKER = "ASAC_SWEEP_TEST_MARKER"


def _write_sweep(root: Path, name: str, grids: dict, **extra) -> Path:
    spec = {"name": name, "base_config": str(REPO / "configs" / "smoke.yaml"), "experiment": EXPERIMENT,
            "overrides": {"data.root": str(root / "data"), "output_dir": str(root / "runs"),
                          "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
                          # what a sweep does with a run's analysis is checked by none of these tests
                          "analysis.ig_images": 0, "analysis.robustness_images": 0},
            "seeds": [0], "resources": {"cpu": 1, "gpu": 0}, "grids": grids, **extra}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # grid order is trial order
    return path


@pytest.fixture(scope="module")
def ray_tmp():
    """A short Ray temp folder for this module: Ray's socket paths under it must stay below the 107-byte limit
    of Unix sockets, which pytest's tmp_path can exceed."""
    folder = os.path.realpath(tempfile.mkdtemp(prefix="asr-"))  # as /proc/PID/fd links read
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _env(marker: str, ray_tmp: str) -> dict[str, str]:
    return {**os.environ, MARKER: marker, "ASAC_RAY_TEMP_DIR": ray_tmp, "OMP_NUM_THREADS": "1"}


def _sweep_cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "tune" / "sweep.py"), *args]


def _marked_processes(marker: str, ray_tmp: str) -> dict[int, str]:
    """pid → command line of the processes this test started: those whose environment holds its marker (the
    driver and what it started; Ray renames its workers, so the command line alone would not find them) and
    those holding a file open under the test's Ray temp folder (Ray's agents rename themselves in a way that
    can blank the environment /proc shows)."""
    found, needle = {}, f"{MARKER}={marker}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            ours = needle in (proc / "environ").read_bytes().split(b"\0") or any(
                os.readlink(fd).startswith(ray_tmp + os.sep) for fd in (proc / "fd").iterdir())
            if ours:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def _wait_for_exit(pid: int, process_running) -> None:
    """Block until `pid` has exited; the bound only turns a hung process into a failure."""
    give_up = time.monotonic() + 600
    while process_running(pid):
        assert time.monotonic() < give_up, f"process {pid} never exited"
        time.sleep(0.1)


def _sweep_dir(root: Path, name: str) -> Path:
    (folder,) = (root / "runs" / "sweeps" / name).iterdir()
    return folder


def _children(root: Path, parent_id: str):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _wait_for_files(driver: subprocess.Popen, *patterns: tuple[Path, str]) -> None:
    """Block until every (folder, glob) pattern matches a file, failing at once if the driver exits first.
    The files are written by the sweep at the points the test paused it (distributed_asac.failpoints), so
    this waits on events, never on how fast the machine is; the timeout only bounds a broken run."""
    give_up = time.monotonic() + 600
    while not all(list(folder.glob(pattern)) for folder, pattern in patterns):
        assert driver.poll() is None, "the sweep ended before it reached the point the test waits for"
        if time.monotonic() > give_up:
            driver.kill()  # it must not outlive the test (its watchdog cleans up after it)
            pytest.fail(f"the sweep never reached {patterns}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_tmp, process_running, marker_of) -> SimpleNamespace:
    """Two fine-tunes that start at once (1 and 3 epochs), then a trial whose base checkpoint does not exist.
    The 3-epoch trial pauses at the end of its second epoch and the broken one before writing its record;
    the driver is killed (SIGKILL) once the 1-epoch trial has finished and both others are paused, so the
    kill lands between "one trial finished" and "the others finished" whatever the machine's speed. Then
    the sweep is resumed (no pause points) to its end."""
    root = tmp_path_factory.mktemp("sweep")
    path = _write_sweep(root, "main", {"length": {"finetune.epochs": [1, 3]},
                                       "broken": {"base_checkpoint": [str(root / "no_such_base")]}},
                        max_concurrent=2)
    marker = marker_of(root)
    pauses = root / "pauses"
    pauses.mkdir()
    env = {**_env(marker, ray_tmp), PAUSE_DIR: str(pauses),
           PAUSE_AT: "stage.epoch_end:stage=finetune,epoch=2;trial.before_record:status=failed"}
    driver = subprocess.Popen(_sweep_cli("--config", str(path)), env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_files(driver, (root / "runs" / "sweeps" / "main", f"*/trials/*/{RECORD}"),
                    (pauses, "stage.epoch_end.*.reached"), (pauses, "trial.before_record.*.reached"))
    (dog,) = [pid for pid, cmd in _marked_processes(marker, ray_tmp).items() if "watchdog.py" in cmd]
    driver.kill()  # no finally, no signal handler: what a crash or an OOM kill does
    driver.wait()
    # Ray's core dies with its driver; the sweep's watchdog kills the rest (its agents would otherwise try for
    # 60 s, a fixed timeout in Ray, to report the raylet's death to the dead GCS) and then exits.
    _wait_for_exit(dog, process_running)
    left_after_kill = _marked_processes(marker, ray_tmp)
    folder = _sweep_dir(root, "main")
    before = {p.parent.name: json.loads(p.read_text()) for p in folder.glob(f"trials/*/{RECORD}")}
    resumed = subprocess.run(_sweep_cli("--config", str(path), "--resume"), env=_env(marker, ray_tmp), cwd=REPO,
                             capture_output=True, text=True, timeout=400)
    return SimpleNamespace(root=root, folder=folder, state=read_state(folder), marker=marker, resumed=resumed,
                           before=before, left_after_kill=left_after_kill, ray_tmp=ray_tmp)


def test_sweep_finishes_and_records_the_failed_trial(swept):
    assert swept.resumed.returncode == 1, swept.resumed.stderr[-3000:]  # 1: it ran to the end; a trial failed
    records = {r["name"]: r for r in map(json.loads, (p.read_text() for p in swept.folder.glob(f"trials/*/{RECORD}")))}
    # each record's status and error in the message: a failure shows which trial went wrong, and how
    outcome = {name: (r["status"], (r["error"] or "")[-500:]) for name, r in records.items()}
    assert len(records) == 3, outcome
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "no_such_base" in failed[0]["error"], outcome
    error_file = swept.folder / "trials" / failed[0]["name"] / "error.txt"
    assert error_file.read_text().strip()
    # one line names it, in the sweep folder; Ray's traceback and its error file (in Ray's session folder,
    # deleted when the sweep ends) are not shown
    output = swept.resumed.stdout + swept.resumed.stderr
    expected = f"trial {failed[0]['name']} failed: {failed[0]['error'].splitlines()[0]}; traceback: {error_file}"
    assert [line for line in output.splitlines() if "failed: " in line] == [expected], output[-3000:]
    assert "Traceback" not in output and "error file" not in output.lower(), output[-3000:]
    finished = [r for r in records.values() if r["status"] == "finished"]
    assert sorted(r["axes"]["finetune.epochs"] for r in finished) == [1, 3], outcome
    for r in finished:
        assert 0 <= r["metrics"]["DEO"] <= 1 and 0 <= r["metrics"]["ACC"] <= 100
    # That two trials ran at once (writing to one sqlite store) is established by the fixture, not by the clock:
    # the driver was killed only when one trial was paused at its epoch 2 while another was paused at its record
    # (comparing the records' start and end times raced the scheduler: one fresh-clone run in five failed).


def test_mlflow_children_nested_under_one_parent(swept):
    client = MlflowClient(f"sqlite:///{swept.root / 'mlflow.db'}")
    parent = client.get_run(swept.state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_dir"] == str(swept.folder)
    runs = [r for r in _children(swept.root, parent.info.run_id) if "sweep.trial" in r.data.tags]
    trials = {r.data.tags["sweep.trial"]: r for r in runs}
    assert len(runs) == len(trials) == 3  # one run per trial: the killed attempt's run was removed
    assert set(trials) == {t["name"] for t in swept.state["trials"]}
    for name, run in trials.items():
        axes = next(t["axes"] for t in swept.state["trials"] if t["name"] == name)
        assert run.info.run_name == name
        if "finetune.epochs" in axes:  # a fine-tune: the pipeline's run, labelled with the trial's axes
            assert run.info.status == "FINISHED"
            epochs = axes["finetune.epochs"]
            assert run.data.params["axis.finetune.epochs"] == str(epochs) == run.data.params["finetune.epochs"]
            assert run.data.params["axis.seed"] == "0" and run.data.params["data.image_size"] == "32"
            record = json.loads((swept.folder / "trials" / name / RECORD).read_text())
            assert run.data.metrics["test_DEO"] == pytest.approx(record["metrics"]["DEO"])
            assert {"test_DEOp", "test_DDP", "test_ACC", "base_ACC"} <= set(run.data.metrics)
            assert len(client.get_metric_history(run.info.run_id, "finetune/loss")) == epochs  # per epoch
        else:
            assert run.info.status == "FAILED" and "no_such_base" in run.data.tags["error"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/trials.csv", "report/length.csv", "report/pareto.png"} <= artifacts
    # what the MLflow UI shows first: a model-training experiment; the answer as the parent's description; the
    # report's tables as sortable MLflow tables; every run's source; the base build named by its setting
    assert client.get_experiment_by_name(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("# Sweep main") and "## Grid `length`" in description
    assert "| asac_fgsm | 3 |" in description
    assert "## Trials" not in description and "![" not in description
    logged = json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    assert {(a["path"], a["type"]) for a in logged} == {(f"tables/{name}.json", "table")
                                                       for name in ("trials", "length", "broken")}
    children = _children(swept.root, parent.info.run_id)
    for run in [parent, *children]:
        # the driver's entry point, also on the runs made in Ray's workers
        assert run.data.tags["mlflow.source.name"] == "sweep.py", run.info.run_name
    builds = sorted(r.info.run_name for r in children if "sweep.trial" not in r.data.tags)
    assert builds == ["base · seed 0", "probe · seed 0"]


def test_each_finished_trial_is_a_registered_version_of_its_setting(swept):
    """The sweep's last lines name them; the failed trial has no model to register."""
    uri = f"sqlite:///{swept.root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    names = sorted(m.name for m in client.search_registered_models())
    assert names == [f"{EXPERIMENT}-finetune.epochs=1", f"{EXPERIMENT}-finetune.epochs=3"]
    (longer,) = client.search_model_versions(f"name = '{EXPERIMENT}-finetune.epochs=3'")
    assert longer.tags["seed"] == "0" and longer.tags["selection"] == "finetune.select=last (epoch 3)"
    assert longer.tags["verdict_vs_length"].startswith("against finetune.epochs=1: ")  # the grid's reference
    assert "-finetune.epochs=3-" in client.get_run(longer.run_id).data.tags["sweep.trial"]
    assert f"models:/{EXPERIMENT}-finetune.epochs=3/1" in swept.resumed.stdout


def test_base_trained_once(swept):
    stages = [r.data.tags.get("stage") for r in _children(swept.root, swept.state["parent_run_id"])]
    assert stages.count("base") == 1 and stages.count("probe") == 1
    entries = [p for p in (swept.root / "runs" / "base_cache").iterdir() if (p / "base.json").is_file()]
    assert len(entries) == 1
    assert {t["base_key"] for t in swept.state["trials"] if t["base_key"]} == {entries[0].name}


def test_report_has_one_row_per_trial(swept):
    with (swept.folder / "report" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial"] for r in rows) == sorted(t["name"] for t in swept.state["trials"])
    assert sorted(r["status"] for r in rows) == ["failed", "finished", "finished"]
    with (swept.folder / "report" / "length.csv").open() as f:
        assert [r["finetune.epochs"] for r in csv.DictReader(f)] == ["1", "3"]
    text = (swept.folder / "report" / "report.md").read_text()
    assert "## Grid `length`" in text and "| asac_fgsm | 3 |" in text
    assert (swept.folder / "report" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| asac_fgsm | 1 |" in swept.resumed.stdout  # the closing summary prints the tables


@pytest.mark.slow  # a third Ray start (~45 s here): the fast tests already check no process outlives a sweep
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_the_sweep_and_ray(signum, swept, ray_tmp, marker_of):
    """SIGINT or SIGTERM while a trial runs (its base is cached): Tune stops it, Ray is shut down, the trial's run
    and the parent end KILLED, the driver exits 130 or 143 naming the command that resumes the sweep."""
    path = _write_sweep(swept.root, f"interrupted-{signum}", {"g": {"finetune.epochs": [3]}})
    pauses = swept.root / f"interrupted-{signum}-pauses"
    marker = marker_of(pauses)
    pauses.mkdir()
    env = {**_env(marker, ray_tmp), PAUSE_DIR: str(pauses), PAUSE_AT: "stage.epoch_end:stage=finetune,epoch=1"}
    driver = subprocess.Popen(_sweep_cli("--config", str(path)), env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_files(driver, (pauses, "stage.epoch_end.*.reached"))  # the trial is mid-run, paused
    driver.send_signal(signum)
    _, err = driver.communicate(timeout=600)  # bounds a hang only
    folder = _sweep_dir(swept.root, f"interrupted-{signum}")
    assert driver.returncode == 128 + signum, err[-3000:]
    assert err.splitlines()[-1] == (f"interrupted; resume with: {sys.executable} -m tune.sweep --config {path} "
                                    f"--resume {folder}")
    children = _children(swept.root, read_state(folder)["parent_run_id"])  # the trial's fine-tune (its base is cached)
    assert children and "RUNNING" not in {r.info.status for r in children}, [r.info.status for r in children]
    assert not list(folder.glob(f"trials/*/{RECORD}"))  # unfinished: --resume would run it
    parent = MlflowClient(f"sqlite:///{swept.root / 'mlflow.db'}").get_run(read_state(folder)["parent_run_id"])
    assert parent.info.status == "KILLED" and parent.data.metrics["trials_pending"] == 1
    assert _marked_processes(marker, ray_tmp) == {}  # the driver exits after its watchdog's clean-up


def test_resume_after_killed_driver_reruns_nothing_finished(swept):
    assert swept.left_after_kill == {}
    assert list(swept.before) == [swept.state["trials"][0]["name"]]  # the 1-epoch trial; the others were paused
    assert swept.before[swept.state["trials"][0]["name"]]["status"] == "finished"
    runs = [r for r in _children(swept.root, swept.state["parent_run_id"]) if "sweep.trial" in r.data.tags]
    client = MlflowClient(f"sqlite:///{swept.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    deleted = client.search_runs([experiment], run_view_type=ViewType.DELETED_ONLY)
    killed = str(swept.folder / "trials" / swept.state["trials"][1]["name"])
    assert deleted and all(r.data.tags["run_dir"].startswith(killed) for r in deleted)  # its stale run, removed
    for name, record in swept.before.items():
        assert json.loads((swept.folder / "trials" / name / RECORD).read_text()) == record  # not run again
        assert len(list((swept.folder / "trials" / name / EXPERIMENT).iterdir())) == 1  # one pipeline run folder
        assert {r.info.run_id for r in runs if r.data.tags["sweep.trial"] == name} == set(record["mlflow_run_ids"])
    assert sorted(p.name for p in (swept.folder / "ray").iterdir()) == ["attempt-1", "attempt-2"]
    # Nothing of either attempt outlived the resumed sweep (whose driver exits after its watchdog's clean-up).
    assert _marked_processes(swept.marker, swept.ray_tmp) == {}


@pytest.mark.parametrize("change, message", [
    ({"grids": {"g": {"order": ["ascendng"]}}}, "unknown value 'ascendng'"),
    ({"grids": {"g": {"alpah": [0.3]}}}, "unknown axis 'alpah' (did you mean 'alpha'?"),
    ({"grids": {"g": {"finetune.alpah": [0.3]}}}, "unknown config key 'finetune.alpah'"),
    ({"grids": {"g": {"alpha": [1.5]}}}, "finetune.alpha"),
    ({"grids": {"g": {"seed": [1, 2]}}}, "top-level 'seeds'"),
    ({"resources": {"cpu": 1, "gpus": 1}}, "'resources' takes cpu, gpu and processes"),
    ({"seed": [0]}, "unknown key 'seed' (did you mean 'seeds'?"),
])
def test_bad_sweep_file_is_one_error_line(tmp_path, capsys, change, message):
    change = dict(change)
    path = _write_sweep(tmp_path, "bad", change.pop("grids", {"g": {"order": ["ascending"]}}), **change)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_resume_without_an_earlier_sweep_is_refused(tmp_path, capsys):
    path = _write_sweep(tmp_path, "fresh", {"g": {"order": ["ascending"]}})
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--resume"])
    assert exit_info.value.code == 2 and "no earlier sweep 'fresh'" in capsys.readouterr().err


def test_resume_latest_takes_the_newest_sweep_of_the_same_grids(tmp_path):
    """`--resume` with `--grids a` after a whole-file sweep began: the `a` sweep is continued, not the newer
    whole-file one (refused as "trials differ" before); with no sweep of those trials, one line says so."""
    path = _write_sweep(tmp_path, "two", {"a": {"order": ["ascending"]}, "b": {"order": ["descending"]}})
    only_a, whole = load_sweep(path, only=["a"]), load_sweep(path)
    folders = {}
    for label, sweep, grids in (("a", only_a, ["--grids", "a"]), ("whole", whole, [])):
        with open_sweep(sweep, parse_args(["--config", str(path), *grids])) as (folder, _):
            folders[label] = folder
    os.utime(folders["a"] / "sweep.json", (1, 1))  # the order of the two starts, whatever the clock's resolution
    damaged = folders["whole"].parent / "damaged"  # the newest folder, its sweep.json cut short: passed over
    damaged.mkdir()
    (damaged / "sweep.json").write_text('{"name": "two", "tri')
    with open_sweep(only_a, parse_args(["--config", str(path), "--grids", "a", "--resume"])) as (folder, state):
        assert folder == folders["a"] and [t["name"] for t in state["trials"]] == [t.name for t in only_a.trials]
    with open_sweep(whole, parse_args(["--config", str(path), "--resume"])) as (folder, _):
        assert folder == folders["whole"]
    with pytest.raises(UserError, match=r"no sweep 'two' under .*sweeps/two runs these trials \(they ran other"):
        with open_sweep(load_sweep(path, only=["b"]), parse_args(["--config", str(path), "--grids", "b", "--resume"])):
            pass


def test_resume_of_a_sweep_kept_without_its_store_nests_the_rest_under_a_new_parent(tmp_path, capsys):
    """A sweep folder kept (e.g. in git) while its mlflow.db was lost: --resume says so in a line, starts a new
    parent run and writes its id into sweep.json; the records already in the folder are not touched."""
    path = _write_sweep(tmp_path, "kept", {"g": {"order": ["ascending"]}})
    sweep = load_sweep(path)
    with open_sweep(sweep, parse_args(["--config", str(path)])) as (folder, state):
        first = state["parent_run_id"]
    record = folder / "trials" / "t000" / RECORD
    record.parent.mkdir(parents=True)
    record.write_text('{"kept": true}')
    # the store it names is gone (a fresh file: this process keeps the first store's connection open)
    state = read_state(folder)
    state["tracking_uri"] = f"sqlite:///{tmp_path / 'gone.db'}"
    (folder / "sweep.json").write_text(json.dumps(state))
    capsys.readouterr()
    with open_sweep(sweep, parse_args(["--config", str(path), "--resume"])) as (again, state):
        assert again == folder and state["parent_run_id"] != first
    assert f"does not hold this sweep's parent run {first}" in capsys.readouterr().out
    assert read_state(folder)["parent_run_id"] == state["parent_run_id"] and record.read_text() == '{"kept": true}'
    parent = MlflowClient(f"sqlite:///{tmp_path / 'gone.db'}").get_run(state["parent_run_id"])
    assert parent.info.status == "RUNNING" and parent.data.tags["sweep_dir"] == str(folder)



def test_finished_trials_without_their_run_folders_are_left_out_of_the_registry(tmp_path, capsys):
    """A search resumed from records kept without their run folders (the trials of an earlier machine): the end of the
    sweep registers what it has and says in a line what it left out, instead of a traceback after the report."""
    path = _write_sweep(tmp_path, "kept", {"g": {"order": ["ascending"]}})
    sweep = load_sweep(path)
    gone = TrialRecord(name=sweep.trials[0].name, axes=sweep.trials[0].axes, grids=["g"], status="finished",
                       metrics={"DEO": 0.1, "ACC": 90.0}, model="asac_fgsm", run_dir=str(tmp_path / "elsewhere"))
    assert registered.register_trials(sweep, [gone], "no-parent") == []
    out = capsys.readouterr().out
    assert f"1 finished trial(s) not registered: their run folders are not on this machine (e.g. {tmp_path}" in out


def test_dry_run_counts_each_cached_stage_the_trials_need(tmp_path, capsys):
    """Two probe kinds with stage 0 on one seed: 2 bases on 1 stage-1 M on 1 stage-0 θ; an entry already in the cache
    (its base.json written, as trials.ensure_stage writes it last) is counted as cached."""
    path = _write_sweep(tmp_path, "stages", {"g": {"model.protected_classifier": ["probe", "independent"]}},
                        overrides={"data.root": str(tmp_path / "data"), "output_dir": str(tmp_path / "runs"),
                                   "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "pretrain.epochs": 1})
    sweep = load_sweep(path)
    stage1 = base_key(load_config(sweep.base_config, sweep.trials[0].overrides), "base")
    entry = entry_dir(sweep.output_dir, stage1, "base")
    entry.mkdir(parents=True)
    (entry / ENTRY_FILE).write_text(json.dumps({"key": stage1}))
    assert main(["--config", str(path), "--dry-run"]) == 0
    assert ("2 trials from 1 grid(s), 2 base model(s) (0 already cached), 1 stage-1 M (1 cached), 1 stage-0 "
            "backbone(s) (0 cached)") in capsys.readouterr().out

def test_paper_grid_shares_its_default_point(tmp_path):
    """Tables 3–6 around one default: 16 settings × 3 seeds, and one base per backbone and seed."""
    spec = yaml.safe_load((REPO / "configs" / "sweeps" / "paper_ablations.yaml").read_text())
    assert spec["base_config"] == "configs/celeba_smiling.yaml"
    # The CelebA images are not here: check the grids against the smoke config with ResNet-18 as its backbone.
    spec["base_config"] = str(REPO / "configs" / "smoke.yaml")
    spec["overrides"].update({"model.backbone": "resnet18", "output_dir": str(tmp_path)})
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    assert len(sweep.trials) == 48 and len({t.base_key for t in sweep.trials}) == 12
    shared = [t for t in sweep.trials if len(t.grids) > 1]
    assert len(shared) == 3 and set(shared[0].grids) == {"table3_backbone", "table4_order", "table5_eps", "table6_alpha"}


def test_base_key_is_the_base_defining_fields():
    base = load_config(REPO / "configs" / "smoke.yaml")
    key = base_key(base)
    for same in ("finetune.alpha=0.3", "finetune.eps=[0.05]", "finetune.order=random", "experiment=x",
                 "output_dir=/elsewhere", "tracking.uri=sqlite:////x.db", "data.num_workers=2"):
        assert base_key(load_config(REPO / "configs" / "smoke.yaml", [same])) == key, same
    for different in ("seed=1", "model.backbone=resnet18", "base.epochs=3", "probe.lr=0.01", "data.root=/other",
                      "data.image_size=48", "data.target=Young", "data.protected=Young", "grad_clip=0.5",
                      "sync_batchnorm=false"):
        assert base_key(load_config(REPO / "configs" / "smoke.yaml", [different])) != key, different


def test_each_cached_stage_is_keyed_by_what_defines_it():
    smoke = REPO / "configs" / "smoke.yaml"
    pretrained = ["pretrain.epochs=2", "pretrain.seed=5"]
    keys = {stage: base_key(load_config(smoke, pretrained), stage) for stage in ("pretrain", "base", "probe")}
    for overrides, same in ((["seed=3"], ("pretrain",)),  # every seed starts from one pretrained θ
                            (["model.protected_classifier=independent"], ("pretrain", "base")),  # one M, two Cs
                            (["probe.epochs=2", "probe.backbone_lr_scale=0.5"], ("pretrain", "base")),
                            (["base.epochs=2", "base.backbone_lr_scale=0.1"], ("pretrain",)),
                            (["pretrain.attributes=[Smiling,Male]"], ()),
                            (["sync_batchnorm=false"], ()),  # on several processes, another model at every stage
                            (["finetune.alpha=0.3"], ("pretrain", "base", "probe"))):
        cfg = load_config(smoke, [*pretrained, *overrides])
        assert {stage for stage in keys if base_key(cfg, stage) == keys[stage]} == set(same), overrides
    # without stage 0 its section defines nothing (but that it is off), so its other keys cannot split the cache
    assert base_key(load_config(smoke, ["pretrain.lr=0.1"])) == base_key(load_config(smoke))


def _record(name, seed, deo, acc, status="finished", backbone="resnet18", grids=("g",)):
    return TrialRecord(name=name, axes={"backbone": backbone, "seed": seed}, grids=list(grids), status=status,
                       model="asac_fgsm" if status == "finished" else None,
                       error=None if status == "finished" else "boom",
                       metrics={"DEO": deo, "DEOp": deo, "DDP": deo, "ACC": acc,
                                "worst_group_ACC": None if acc is None else acc - 10} if status == "finished" else {},
                       base={"DEO": 0.5 + seed, "DEOp": 0.1, "DDP": 0.1, "ACC": 80.0})


def test_report_mean_and_interval_over_seeds(tmp_path):
    records = [_record("a0", 0, 0.1, 90.0), _record("a1", 1, 0.3, 92.0), _record("a2", 2, None, None, "failed"),
               _record("b0", 0, 0.2, 95.0, backbone="resnet50")]
    rows = report.grid_rows(records, ["backbone"])
    assert [r["model"] for r in rows] == ["base", "base", "asac_fgsm", "asac_fgsm"]  # Table 3: bases first
    base18 = rows[0]
    assert base18["stats"]["DEO"][0] == pytest.approx(1.5) and base18["n"] == 3  # three seeds' bases
    r18 = rows[2]
    # two seeds: half-width t_{0.975, 1} · s / √2 = 12.706 · 0.1414 / 1.414 = 1.2706
    assert r18["stats"]["DEO"] == (pytest.approx(0.2), pytest.approx(12.706205 * math.sqrt(0.02) / math.sqrt(2)))
    assert (r18["n"], r18["total"]) == (2, 3)
    table = report.markdown_table(rows, ["backbone"])
    assert "| asac_fgsm | resnet18 | 0.200 ± 1.271 | 0.200 ± 1.271 | 0.200 ± 1.271 | 91.00 ± 12.71 | 81.00 ± 12.71 | 2/3 (1 failed) |" in table
    assert "| asac_fgsm | resnet50 | 0.200 | 0.200 | 0.200 | 95.00 | 85.00 | 1 |" in table
    paths = report.write_report(records, {"g": ["backbone"]}, tmp_path, "t")
    assert {p.name for p in paths} == {"report.md", "g.csv", "trials.csv", "pareto.png"}
    with (tmp_path / "g.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_a_setting_asha_stopped_says_stopped_not_failed():
    """A setting whose every trial ASHA stopped has no numbers, and its cells say so (they said "failed")."""
    records = [_record("a0", 0, 0.1, 90.0), _record("c0", 0, None, None, "stopped", backbone="resnet50"),
               _record("c1", 1, None, None, "stopped", backbone="resnet50"),
               _record("d0", 0, None, None, "stopped", backbone="densenet121"),
               _record("d1", 1, None, None, "failed", backbone="densenet121")]
    table = report.markdown_table(report.grid_rows(records, ["backbone"]), ["backbone"])
    assert "|  | resnet50 | stopped early | stopped early | stopped early | stopped early | stopped early | 0/2 (2 stopped early) |" in table
    assert "|  | densenet121 | none finished | none finished | none finished | none finished | none finished | 0/2 (1 failed, 1 stopped early) |" in table


def test_paired_rows_against_the_grid_reference():
    # reference alpha 0.5 first; 0.3 lowers DEO by 0.10, 0.11, 0.12 (interval below 0); 0.7 moves it ±0.05
    records = [_record(f"r{s}", s, 0.5, 90.0) for s in range(3)]
    records += [_record(f"l{s}", s, 0.4 - 0.01 * s, 91.0 + 0.1 * s) for s in range(3)]
    records += [_record(f"h{s}", s, 0.5 + (0.05 if s % 2 else -0.05), 90.0) for s in range(3)]
    for r, alpha in zip(records, [0.5] * 3 + [0.3] * 3 + [0.7] * 3):
        r.axes = {"alpha": alpha, "seed": r.axes["seed"]}
    records.append(_record("l3", 3, 0.1, 99.0))  # a seed the reference lacks: left out of the pairing
    records[-1].axes = {"alpha": 0.3, "seed": 3}
    paired = report.paired_rows(records, ["alpha"])
    assert [(p["setting"], p["reference"], p["seeds"]) for p in paired] == [
        ({"alpha": 0.3}, {"alpha": 0.5}, [0, 1, 2]), ({"alpha": 0.7}, {"alpha": 0.5}, [0, 1, 2])]
    lower, unclear = paired[0]["intervals"], paired[1]["intervals"]
    assert lower["DEO"].estimate == pytest.approx(-0.11) and lower["DEO"].verdict() == "lower"
    assert lower["ACC"].estimate == pytest.approx(1.1) and lower["ACC"].verdict() == "higher"
    assert unclear["DEO"].verdict() == "no detectable difference"
    table = report.paired_table(paired, ["alpha"])
    assert "reference setting (alpha=0.5)" in table and "| 0.3 | -0.110 ± " in table and " lower |" in table


def test_pareto_front():
    points = [(0.1, 90.0), (0.2, 95.0), (0.3, 94.0), (0.05, 85.0), (0.1, 89.0)]
    assert report.pareto_front(points) == [3, 0, 1]  # (0.3, 94) and (0.1, 89) are dominated


@pytest.mark.slow
def test_smoke_preset_runs_to_the_end(tmp_path, ray_tmp, marker_of):
    """configs/sweeps/smoke.yaml itself (6 trials on 2 bases), outputs redirected to tmp_path."""
    marker = marker_of(tmp_path)
    proc = subprocess.run(_sweep_cli("--config", "configs/sweeps/smoke.yaml", f"data.root={tmp_path / 'data'}",
                                     f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"),
                          env=_env(marker, ray_tmp), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = _sweep_dir(tmp_path, "smoke")
    records = [json.loads(p.read_text()) for p in folder.glob(f"trials/*/{RECORD}")]
    assert len(records) == 6 and all(r["status"] == "finished" for r in records)
    assert len(list((tmp_path / "runs" / "base_cache").glob("*/base.json"))) == 2
    assert _marked_processes(marker, ray_tmp) == {}


@pytest.mark.slow
def test_trial_with_two_accelerate_processes(tmp_path, ray_tmp, marker_of):
    """resources.processes: 2 runs the trial's fine-tune under `accelerate launch` (CPU: gloo), both ranks synced."""
    path = _write_sweep(tmp_path, "ddp", {"g": {"order": ["ascending"]}}, resources={"cpu": 2, "gpu": 0, "processes": 2})
    marker = marker_of(tmp_path)
    proc = subprocess.run(_sweep_cli("--config", str(path)), env=_env(marker, ray_tmp), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record_path,) = _sweep_dir(tmp_path, "ddp").glob(f"trials/*/{RECORD}")
    record = json.loads(record_path.read_text())
    replicas = json.loads((Path(record["run_dir"]) / record["model"] / "replicas.json").read_text())
    assert replicas["world_size"] == 2 and len(set(replicas["parameter_digests"])) == 1
    base = json.loads(next((tmp_path / "runs" / "base_cache").glob("*/base.json")).read_text())
    assert json.loads((Path(base["checkpoint"]).parent / "base" / "replicas.json").read_text())["world_size"] == 2
    assert _marked_processes(marker, ray_tmp) == {}


def test_report_merges_sweeps_of_more_seeds(tmp_path):
    """Seeds added later (a second sweep of the same file with --seeds) report together with the first ones."""
    from tune.records import start_parent, write_json, write_record
    from tune.sweep import report_command

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folders = []
    for part, seeds in enumerate(([0, 1, 2], [3, 4])):
        folder = tmp_path / f"sweep{part}"
        trials = []
        for s in seeds:
            for alpha, deo in ((0.5, 0.5), (0.3, 0.4 - 0.01 * s)):
                record = _record(f"a{alpha}-s{s}", s, deo, 90.0, grids=("alpha",))
                record.axes = {"alpha": alpha, "seed": s}
                trials.append({"name": record.name, "overrides": [], "axes": record.axes, "grids": ["alpha"]})
                write_record(folder / "trials" / record.name, record)
        parent = start_parent(uri, "merge-test", f"part{part}", tags={}, params={})
        write_json(folder / "sweep.json", {"name": "s", "grids": {"alpha": ["alpha"]}, "tracking_uri": uri,
                                           "parent_run_id": parent, "trials": trials})
        folders.append(str(folder))
    assert report_command(folders, []) == 0
    text = (tmp_path / "sweep0" / "report" / "report.md").read_text()
    assert "2 sweeps merged" in text and "| 0.3 | -0.120 ± " in text and "lower" in text  # five seeds paired
    assert text.count("| 5 |") >= 2  # each setting's row counts five seeds
    assert report_command(folders, []) == 0  # a rewritten report replaces the parent's tables, not appends to them
    client = MlflowClient(uri)
    parent = client.get_run(json.loads((tmp_path / "sweep0" / "sweep.json").read_text())["parent_run_id"])
    assert "| 0.3 | -0.120 ± " in parent.data.tags["mlflow.note.content"]
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "tables/trials.json",
                                                      str(tmp_path))).read_text())
    assert sorted(line[table["columns"].index("trial")] for line in table["data"]) == sorted(
        f"a{alpha}-s{s}" for s in range(5) for alpha in (0.5, 0.3))


def test_report_of_a_sweep_folder_kept_without_its_store(tmp_path, capsys):
    """A sweep folder whose MLflow store is gone (copied elsewhere, or its machine restarted): --report writes the
    report from the records alone, says so in one line, and creates no store."""
    from tune.records import write_json, write_record
    from tune.sweep import report_command

    gone = tmp_path / "gone" / "mlflow.db"
    folder, trials = tmp_path / "kept", []
    for s in (0, 1):
        record = _record(f"a-s{s}", s, 0.5 - 0.1 * s, 90.0, grids=("alpha",))
        record.axes = {"alpha": 0.5, "seed": s}
        trials.append({"name": record.name, "overrides": [], "axes": record.axes, "grids": ["alpha"]})
        write_record(folder / "trials" / record.name, record)
    write_json(folder / "sweep.json", {"name": "s", "grids": {"alpha": ["alpha"]}, "tracking_uri": f"sqlite:///{gone}",
                                       "parent_run_id": "0123456789abcdef", "trials": trials})
    assert report_command([str(folder)], []) == 0
    assert "| 0.5 | 0.450 ± " in (folder / "report" / "report.md").read_text()
    err = capsys.readouterr().err
    assert "does not hold the sweep's parent run 0123456789abcdef" in err and err.count("\n") == 1
    assert not gone.parent.exists()


def test_time_table_adds_each_grids_seconds_by_status_and_the_wall_time():
    records = [_record("a", 0, 0.1, 90.0), _record("b", 1, 0.1, 90.0), _record("c", 0, None, None, "failed"),
               _record("d", 1, 0.1, 90.0, grids=("h",))]
    for record, (started, seconds) in zip(records, ((100.0, 10.0), (105.0, 20.0), (100.0, 1.0), (130.0, 5.0))):
        record.started, record.seconds = started, seconds
    records[1].status = "stopped"
    text = report.time_table(records, {"g": [], "h": []})
    assert "| g | 3 | 10 | 20 | 1 |" in text and "| h | 1 | 5 | 0 | 0 |" in text
    assert "Wall time of the recorded trials: 35 s" in text  # 100 to 135


def test_probe_kinds_share_one_stage_one_model(tmp_path):
    """The independent-C grid and the probe grid differ only in stage 2: two bases, built on one cached stage-1 M
    (one stage-1 entry, one `base` MLflow run, two `probe` runs), and the independent base is the one a run of
    stages 1–2 in one go trains, tensor for tensor. The cache is built as trials build it (`ensure_base`), without
    Ray: what Ray adds is covered by the sweeps above. About 15 s of CPU: four runs of 120 images, one epoch each."""
    from safetensors.torch import load_file

    from distributed_asac import pipeline
    from tune.trials import TrialJob, ensure_base

    path = _write_sweep(tmp_path, "kinds", {"probe": {"model.protected_classifier": ["probe"]},
                                            "independent": {"model.protected_classifier": ["independent"]}})
    spec = yaml.safe_load(path.read_text())
    spec["overrides"].update({"data.synthetic_num_images": 120, "base.epochs": 1, "probe.epochs": 1})
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep = load_sweep(path)
    assert len({t.base_key for t in sweep.trials}) == 2
    entries = {t.axes["model.protected_classifier"]: ensure_base(TrialJob(
        name=t.name, base_config=str(sweep.base_config), overrides=t.overrides, folder=str(tmp_path / t.name),
        parent_run_id=None, tracking_uri=sweep.tracking_uri, experiment=sweep.experiment, resources=sweep.resources,
        axes=t.axes, grids=t.grids, key=t.base_key, output_dir=str(sweep.output_dir))) for t in sweep.trials}

    cache = tmp_path / "runs" / "base_cache"
    assert len(list(cache.glob("stage1/*/base.json"))) == 1 and len(list(cache.glob("*/base.json"))) == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    stages = [r.data.tags.get("stage") for r in client.search_runs([experiment])]
    assert sorted(stages) == ["base", "probe", "probe"]
    probe, independent = entries["probe"]["results"]["base"], entries["independent"]["results"]["base"]
    assert (probe["ACC"], probe["DEO"]) == (independent["ACC"], independent["DEO"])  # one M

    (trial,) = [t for t in sweep.trials if t.axes["model.protected_classifier"] == "independent"]
    whole = pipeline.run(load_config(sweep.base_config, [*trial.overrides, f"output_dir={tmp_path / 'whole'}"]),
                         variants=[{"mode": "base"}])
    cached, direct = (load_file(str(Path(folder) / "model.safetensors"))
                      for folder in (entries["independent"]["checkpoint"], whole.run_dir / "probe"))
    assert cached.keys() == direct.keys() and all(torch.equal(cached[k], direct[k]) for k in cached)
