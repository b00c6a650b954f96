"""Resume inside a stage: a run killed (SIGKILL, at a named pause point, not after a guessed time) and resumed
with `resume=latest` ends with the same files as an uninterrupted run of the same config, in the same folder
and the same MLflow runs; a folder that is not a resumable run, or a differing config, is one clear error."""

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distributed_asac import pipeline
from distributed_asac.config import load_config, save_config
from distributed_asac.errors import UserError
from distributed_asac.failpoints import PAUSE_AT, PAUSE_DIR, RELEASE
from distributed_asac.locks import LOCK
from distributed_asac.resume import INCOMPLETE, STATE, find_run

from .conftest import _free_port

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))  # the CLI of this venv
EXPERIMENT = "resume"
EPOCHS = {"base": 3, "probe": 1, "asac_fgsm": 2}
WAIT_S = 900  # upper bound for a run to reach its pause point on a loaded machine; never a timing assumption


def _overrides(data: Path, out: Path) -> list[str]:
    return [f"data.root={data}", f"output_dir={out / 'runs'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
            f"experiment={EXPERIMENT}", "data.synthetic_num_images=240", f"base.epochs={EPOCHS['base']}",
            f"probe.epochs={EPOCHS['probe']}", f"finetune.epochs={EPOCHS['asac_fgsm']}",
            "finetune.order=random",  # the curriculum generator shuffles each step: its state must be resumed
            "analysis.robustness_images=16", "analysis.ig_images=4", "analysis.ig_steps=4"]


def _env(pauses: Path | None = None, point: str | None = None, ddp: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", PAUSE_AT, PAUSE_DIR)}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if ddp:
        env["ACCELERATE_USE_CPU"] = "true"
    if point:
        env.update({PAUSE_AT: point, PAUSE_DIR: str(pauses)})
    return env


def _command(overrides: list[str], ddp: bool) -> list[str]:
    args = ["-m", "distributed_asac.finetune", "--config", str(REPO / "configs" / "smoke.yaml"), *overrides]
    if not ddp:
        return [sys.executable, *args]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--main_process_port", str(_free_port()), *args]


def _run(out: Path, overrides: list[str], ddp: bool = False) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(_command(overrides, ddp), cwd=out, env=_env(ddp=ddp), capture_output=True, text=True,
                          timeout=WAIT_S)


def _kill_at(out: Path, overrides: list[str], point: str, ddp: bool = False) -> None:
    """Start the run, wait until every rank holds at `point`, then SIGKILL the whole process group."""
    pauses = out / "pauses"
    pauses.mkdir(parents=True)
    log = (out / "killed.log").open("w")
    proc = subprocess.Popen(_command(overrides, ddp), cwd=out, env=_env(pauses, point, ddp), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    ranks, deadline = 2 if ddp else 1, time.monotonic() + WAIT_S
    try:
        while len(list(pauses.glob(f"{point.split(':')[0]}.*.reached"))) < ranks:
            assert proc.poll() is None, (out / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"never reached {point}"
            time.sleep(0.05)  # polls the file the run writes; no timing assumed
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL


def _held_at(out: Path, overrides: list[str], point: str) -> subprocess.Popen:
    """Start a one-process run (stdout and stderr piped) and return it once it holds at `point`; creating
    `out/pauses/release` lets it go on."""
    pauses = out / "pauses"
    pauses.mkdir()
    run = subprocess.Popen(_command(overrides, False), cwd=out, env=_env(pauses, point), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + WAIT_S
    while not list(pauses.glob(f"{point.split(':')[0]}.*.reached")):
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            raise AssertionError(f"never reached {point}: {run.communicate()[1][-3000:]}")
        time.sleep(0.05)  # polls the file the run writes; no timing assumed
    return run


def _run_folder(out: Path) -> Path:
    (folder,) = (out / "runs" / EXPERIMENT).iterdir()
    return folder


def _same_outputs(resumed: Path, reference: Path, names: list[str]) -> None:
    assert not (resumed / INCOMPLETE).exists() and not (reference / INCOMPLETE).exists()
    ours, theirs = json.loads((resumed / "results.json").read_text()), json.loads((reference / "results.json").read_text())
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)  # every number, NaN included
    assert set(ours) == set(names)
    for name in names:
        for file in ("model.safetensors", "predictions.csv", "results.json", "replicas.json"):
            assert (resumed / name / file).read_bytes() == (reference / name / file).read_bytes(), (name, file)
        assert not (resumed / name / "state").exists()  # training states are dropped once a stage finishes


def _histories(out: Path, run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """stage → metric → [(step, value)] of the experiment's MLflow runs, checked to be one FINISHED run per
    stage (the ids of state.json) with each metric logged once per step."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(EPOCHS)  # no duplicate runs
    ids = json.loads((run_dir / STATE).read_text())["mlflow_runs"]
    histories = {}
    for run in runs:
        assert run.info.status == "FINISHED" and ids[run.info.run_name] == run.info.run_id
        histories[run.info.run_name] = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics if "images_per_s" not in key}  # the one timing-dependent metric
        for key, points in histories[run.info.run_name].items():
            steps = [step for step, _ in points]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)
    for name, loss in (("base", "base/train_loss"), ("probe", "probe/train_loss"), ("asac_fgsm", "finetune/loss")):
        assert [step for step, _ in histories[name][loss]] == list(range(EPOCHS[name]))  # epochs 0..E-1 once each
    return histories


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume_data") / "data"  # generated by the first run, shared by all


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """The uninterrupted run, one process."""
    out = tmp_path_factory.mktemp("reference")
    proc = _run(out, _overrides(data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _run_folder(out)


@pytest.mark.parametrize("point, first_epoch", [
    # in stage 1, after its first epoch's state is saved; slow (~16 s): the SIGTERM test below stops and resumes
    # a run at this same point, and the stale lock and metric histories are checked by the other points
    pytest.param("stage.epoch_end:stage=base,epoch=1", "base epoch 2:", marks=pytest.mark.slow),
    # in stage 3 mid-epoch, epoch 2 restarting from its start; slow (~45 s): the point below also resumes stage 3
    # at epoch 2, from a harder state (the last epoch's files written but not renamed into place)
    pytest.param("finetune.step:epoch=2,step=3", "finetune epoch 2:", marks=pytest.mark.slow),
    # stages 1-2 finished, stage 3 not begun; slow (~15 s): the other points resume mid-stage, a harder case
    pytest.param("pipeline.between_stages:finished=probe", "finetune epoch 1:", marks=pytest.mark.slow),
    # during the save of stage 3's last epoch, its files written but not yet renamed into place: the previous
    # epoch's state is the newest whole one, and the last epoch is redone
    ("state.before_rename:stage=asac_fgsm,epoch=2", "finetune epoch 2:"),
])
def test_killed_run_resumes_to_the_same_results(point, first_epoch, tmp_path, data, reference):
    overrides = _overrides(data, tmp_path)
    _kill_at(tmp_path, overrides, point)
    killed = _run_folder(tmp_path)
    assert (killed / INCOMPLETE).is_file() and (killed / LOCK).is_file()  # a killed process keeps its lock
    if point.startswith("state.before_rename"):
        saved = sorted(p.name for p in (killed / "asac_fgsm" / "state").iterdir())
        assert saved == [".epoch_0002.tmp", "epoch_0001"]
    proc = _run(tmp_path, [*overrides, "resume=latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {killed}" in proc.stdout
    assert "took over the stale lock" in proc.stderr and not (killed / LOCK).exists()  # its holder is dead
    epochs = [line for line in proc.stdout.splitlines() if " epoch " in line]
    assert epochs[0].startswith(first_epoch), epochs  # it continued, it did not start over
    assert _run_folder(tmp_path) == killed  # continued in the same folder, no new one
    _same_outputs(killed, reference, ["base", "probe", "asac_fgsm"])
    # the metric history continues: every epoch's numbers (losses, valid metrics) equal the uninterrupted run's
    assert _histories(tmp_path, killed) == _histories(reference.parents[2], reference)


@pytest.mark.slow  # about 30 s: the one-process kill tests above cover the same code paths in the default run
def test_two_process_run_killed_in_stage_3_resumes_to_the_same_results(tmp_path, data, reference):
    """DDP (gloo, 2 processes), stage 3 only (on the reference's base): killed mid-epoch 2 on both ranks. About
    90 s here (three 2-process launches), so not marked slow. Its shuffle order comes from the sampler's own
    generator (synchronised from rank 0), which the state must carry: without it the numbers differ."""
    def overrides(out: Path) -> list[str]:
        return [*_overrides(data, out), f"base_checkpoint={reference / 'probe'}"]

    proc = _run(tmp_path / "uninterrupted", overrides(tmp_path / "uninterrupted"), ddp=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _run_folder(tmp_path / "uninterrupted")
    _kill_at(tmp_path / "killed", overrides(tmp_path / "killed"), "finetune.step:epoch=2,step=2", ddp=True)
    proc = _run(tmp_path / "killed", [*overrides(tmp_path / "killed"), "resume=latest"], ddp=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finetune epoch 1:" not in proc.stdout and "finetune epoch 2:" in proc.stdout
    resumed = _run_folder(tmp_path / "killed")
    assert json.loads((resumed / "asac_fgsm" / "replicas.json").read_text())["world_size"] == 2
    _same_outputs(resumed, expected, ["asac_fgsm"])


@pytest.mark.slow  # about 35 s: two seeds of the demo path, twice
def test_killed_comparison_skips_finished_seeds_and_resumes_the_unfinished_one(tmp_path, data):
    """The demo over seeds [0, 1], killed in seed 1 between stages 2 and 3: seed 0 is read back, seed 1 resumed,
    and the comparison (per seed, aggregate, paired) equals an uninterrupted one: three demo launches of two
    seeds each."""
    def command(out: Path) -> list[str]:
        overrides = [o for o in _overrides(data, out) if not o.startswith("output_dir")]
        return [sys.executable, "-m", "distributed_asac.demo", "--config", str(REPO / "configs" / "smoke.yaml"),
                "--rows", "asac_fgsm", *overrides, f"output_dir={out / 'runs'}", "seeds=[0,1]"]

    folders = {}
    for name in ("uninterrupted", "killed"):
        out = tmp_path / name
        (out / "pauses").mkdir(parents=True)
        point = "pipeline.between_stages:finished=probe,seed=1"
        env = _env(out / "pauses", point if name == "killed" else None)
        with (out / "log").open("w") as log:
            proc = subprocess.Popen(command(out), cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.monotonic() + WAIT_S
            while name == "killed" and not list((out / "pauses").glob("pipeline.between_stages.*.reached")):
                assert proc.poll() is None, (out / "log").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)  # polls the file the run writes; no timing assumed
            if name == "killed":
                os.killpg(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=WAIT_S) == (-signal.SIGKILL if name == "killed" else 0)
        folders[name] = _run_folder(out)
    killed = folders["killed"]
    assert (killed / INCOMPLETE).is_file() and not (killed / "seed_0" / INCOMPLETE).exists()
    assert (killed / "seed_1" / INCOMPLETE).is_file()
    proc = subprocess.run([*command(tmp_path / "killed"), "resume=latest"], cwd=tmp_path / "killed", env=_env(),
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "=== seed 0" not in proc.stdout and "=== seed 1" in proc.stdout and "base epoch" not in proc.stdout
    assert not (killed / INCOMPLETE).exists()
    for file in ("results.json", "table.md"):
        assert (killed / file).read_text() == (folders["uninterrupted"] / file).read_text(), file
    for seed in ("seed_0", "seed_1"):
        _same_outputs(killed / seed, folders["uninterrupted"] / seed, ["base", "probe", "asac_fgsm"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    names = ["comparison", *(f"{model} · seed {seed}" for seed in (0, 1) for model in EPOCHS)]
    assert sorted(r.info.run_name for r in runs) == sorted(names)  # no duplicates
    assert {r.info.status for r in runs} == {"FINISHED"}


def _fake_run(tmp_path: Path, *overrides: str) -> tuple[Path, list[str]]:
    """A resumable-looking run folder (what pipeline.run writes first), without training anything."""
    base = [f"output_dir={tmp_path / 'runs'}", f"experiment={EXPERIMENT}", *overrides]
    folder = tmp_path / "runs" / EXPERIMENT / "20260101-000000"
    folder.mkdir(parents=True)
    save_config(load_config(REPO / "configs" / "smoke.yaml", base), folder / "config.yaml")
    (folder / STATE).write_text(json.dumps({"kind": "pipeline", "world_size": 1, "variants": [{}],
                                            "mlflow_runs": {}, "finished": {}}))
    (folder / INCOMPLETE).write_text("")
    return folder, base


def test_a_damaged_run_is_one_line_and_latest_resumes_the_others(tmp_path, caplog):
    older, base = _fake_run(tmp_path)
    damaged = older.with_name("20260101-000001")
    shutil.copytree(older, damaged)
    os.utime(damaged / "config.yaml", ns=(time.time_ns(), time.time_ns() + 10**9))  # the newest run
    (damaged / STATE).write_text('{"kind": ')  # a disk fault or a hand edit

    def resume(value: str):
        return load_config(REPO / "configs" / "smoke.yaml", [*base, f"resume={value}"])

    with caplog.at_level(logging.WARNING):
        assert find_run(resume("latest"), "pipeline") == older
    assert f"resume=latest skips {damaged}: the run state {damaged / STATE} is damaged" in caplog.text
    with pytest.raises(UserError, match=r"the run state .*000001/state\.json is damaged \(Expecting value: .*\), so "
                                        r"this run cannot be resumed; start a new run \(without resume=\)"):
        find_run(resume(str(damaged)), "pipeline")
    shutil.copy(older / STATE, damaged / STATE)
    (damaged / "config.yaml").write_text("- a list\n")
    with pytest.raises(UserError, match=r"the run config .*000001/config\.yaml is damaged \(it holds a list"):
        find_run(resume(str(damaged)), "pipeline")
    assert find_run(resume("latest"), "pipeline") == older


@pytest.mark.slow  # about a minute: a whole run, held at a pause point while a second process tries to resume it
def test_a_second_resume_of_a_running_run_is_refused_and_the_run_goes_on(tmp_path, data, reference):
    overrides = _overrides(data, tmp_path)
    first = _held_at(tmp_path, overrides, "stage.epoch_end:stage=base,epoch=1")
    try:
        held = _run_folder(tmp_path)
        before = {p: p.read_bytes() for p in held.rglob("*") if p.is_file()}
        second = _run(tmp_path, [*overrides, "resume=latest"])
        assert second.returncode == 2 and second.stderr.splitlines() == [
            f"error: run folder {held} is in use by pid {first.pid} on this host ({socket.gethostname()}; lock "
            f"{held / LOCK}); wait for it to finish or stop it (kill {first.pid}), then continue it with "
            f"resume={held}"], second.stderr[-3000:]
        assert {p: p.read_bytes() for p in held.rglob("*") if p.is_file()} == before
        (tmp_path / "pauses" / RELEASE).write_text("")
        out, err = first.communicate(timeout=WAIT_S)
        assert first.returncode == 0, err[-3000:]
    finally:
        first.kill()
    _same_outputs(held, reference, ["base", "probe", "asac_fgsm"])
    assert not (held / LOCK).exists()


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])
def test_an_interrupted_run_is_one_line_and_resumes_with_the_command_it_prints(signum, tmp_path, data, reference):
    """Ctrl-C or SIGTERM in stage 1: exit 130 or 143, one line with the exact command that resumes the run, the
    stage's MLflow run KILLED, the lock released and the marker kept; that command then finishes the run."""
    overrides = _overrides(data, tmp_path)
    first = _held_at(tmp_path, overrides, "stage.epoch_end:stage=base,epoch=1")
    try:
        first.send_signal(signum)
        _, err = first.communicate(timeout=WAIT_S)
    finally:
        first.kill()
    run_dir = _run_folder(tmp_path)
    resume = [*_command(overrides, False), f"resume={run_dir}"]
    assert first.returncode == 128 + signum and err.splitlines() == [
        f"interrupted; resume with: {shlex.join(resume)}"], err[-3000:]
    assert (run_dir / INCOMPLETE).is_file() and not (run_dir / LOCK).exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (base,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert base.info.run_name == "base" and base.info.status == "KILLED"
    proc = subprocess.run(resume, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_outputs(run_dir, reference, ["base", "probe", "asac_fgsm"])


def test_a_differing_config_key_is_named(tmp_path):
    folder, base = _fake_run(tmp_path)
    assert find_run(load_config(REPO / "configs" / "smoke.yaml", [*base, "resume=latest"]), "pipeline") == folder
    assert find_run(load_config(REPO / "configs" / "smoke.yaml", [*base, f"resume={folder}"]), "pipeline") == folder
    changed = load_config(REPO / "configs" / "smoke.yaml", [*base, "finetune.alpha=0.3", "resume=latest"])
    with pytest.raises(UserError, match=r"config key 'finetune.alpha' differs .*0\.5.*0\.3"):
        find_run(changed, "pipeline")


def test_not_a_resumable_run_is_refused(tmp_path):
    folder, base = _fake_run(tmp_path)

    def resume(value: str):
        return load_config(REPO / "configs" / "smoke.yaml", [*base, f"resume={value}"])

    with pytest.raises(UserError, match="not a resumable run folder"):
        find_run(resume(str(tmp_path)), "pipeline")
    with pytest.raises(UserError, match="folder is a pipeline run; resume it with python -m distributed_asac.finetune"):
        find_run(resume(str(folder)), "comparison")
    (folder / INCOMPLETE).unlink()
    with pytest.raises(UserError, match="has finished"):
        find_run(resume(str(folder)), "pipeline")
    with pytest.raises(UserError, match="resume=latest: no unfinished pipeline run of experiment 'resume'"):
        find_run(resume("latest"), "pipeline")
    with pytest.raises(UserError, match="not a resumable run folder"):
        pipeline.run(resume(str(tmp_path / "nowhere")))


def test_the_cli_error_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    from distributed_asac import finetune

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        finetune.main(["--config", str(REPO / "configs" / "smoke.yaml"), f"output_dir={tmp_path / 'runs'}",
                       f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "resume=latest"])
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: resume=latest: no unfinished pipeline run")
