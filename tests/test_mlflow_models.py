"""Every finished model as an MLflow Model (pyfunc from code, safetensors weights), each row's model of each seed
registered, loaded in a fresh process and served: read back from the smoke comparison (`compared`, conftest)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from distributed_asac import demo, mlflow_models, predict
from distributed_asac.data.images import load_image

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
ROWS = ("base", "plain", "asac_fgsm")


def _client(tmp: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return MlflowClient(uri, uri)


def _version(tmp: Path, row: str, seed: int):
    (version,) = [v for v in _client(tmp).search_model_versions(f"name = 'smoke-{row}'") if v.tags["seed"] == str(seed)]
    return version


def _test_images(tmp: Path, folder: Path) -> tuple[list[dict], np.ndarray]:
    """The rows of a model's predictions.csv and its test images as the run read them, uint8 N × 32 × 32 × 3."""
    with (folder / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows, np.stack([load_image(tmp / "data" / "img_align_celeba" / r["image_id"], 32) for r in rows])


def test_each_row_and_seed_is_a_registered_version_with_its_figures_and_verdicts(compared):
    tmp, out = compared
    client = _client(tmp)
    assert sorted(m.name for m in client.search_registered_models()) == sorted(f"smoke-{row}" for row in ROWS)
    for row in ROWS:
        for seed in (3, 5):
            version = _version(tmp, row, seed)
            report = out.per_seed[seed][row]
            logged = client.get_logged_model(version.source.removeprefix("models:/"))
            assert logged.source_run_id == version.run_id and logged.tags["row"] == row
            tags = version.tags
            low, high = report["ci95_bootstrap"]["worst_group_ACC"]
            assert tags["test_worst_group_ACC"] == f"{report['worst_group_ACC']:.2f} [{low:.2f}, {high:.2f}]"
            assert {"test_DEO", "test_ACC", "git_commit", "selection"} <= set(tags)
            assert tags["selection"] == ("stage 1's epoch with the best valid ACC (of 4)" if row == "base"
                                         else "finetune.select=last (epoch 1 of 1)")
            verdicts = {p["reference"] for p in out.paired if p["row"] == row}
            assert {k for k in tags if k.startswith("verdict_vs_")} == {f"verdict_vs_{r}" for r in verdicts}
            assert f"seed {seed}" in version.description and str(out.run_dir) in version.description
            assert client.get_run(version.run_id).info.run_name == f"{row} · seed {seed}"


def test_a_model_loads_from_code_and_safetensors_without_a_pickle(compared):
    tmp, _ = compared
    version = _version(tmp, "asac_fgsm", 3)
    logged = _client(tmp).get_logged_model(version.source.removeprefix("models:/"))
    model_dir = Path(logged.artifact_location.removeprefix("file://"))
    shipped = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {"MLmodel", "served_model.py", "artifacts/model.safetensors", "artifacts/config.yaml",
            "requirements.txt"} <= shipped and not any(name.endswith((".pkl", ".pickle")) for name in shipped)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert mlmodel["metadata"]["project"] == "distributed_asac" and mlmodel["metadata"]["image_size"] == 32
    assert (model_dir / "requirements.txt").read_text().split() == list(mlflow_models.requirements())


def test_a_registered_version_predicts_in_a_fresh_process_what_the_run_did(compared):
    """mlflow.pyfunc.load_model("models:/<name>/<version>") in a new interpreter, given the test images as the run
    read them: the run's own predictions.csv (score and y_hat), image by image."""
    tmp, out = compared
    version = _version(tmp, "asac_fgsm", 5)
    rows, images = _test_images(tmp, out.run_dir / "seed_5" / "asac_fgsm")
    np.save(tmp / "test_images.npy", images)
    script = ("import json, sys, mlflow, numpy; out = mlflow.pyfunc.load_model(sys.argv[1]).predict("
              "numpy.load(sys.argv[2])); print(json.dumps({c: out[c].tolist() for c in out}))")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", script, f"models:/smoke-asac_fgsm/{version.version}",
                           str(tmp / "test_images.npy")], env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = json.loads(done.stdout.strip().splitlines()[-1])
    assert predicted["label"] == [int(r["y_hat"]) for r in rows]
    assert predicted["probability"] == pytest.approx([float(r["score"]) for r in rows], abs=1e-5)


def test_the_predict_command_reads_image_files_as_the_run_did(compared, capsys, monkeypatch):
    tmp, out = compared
    version = _version(tmp, "plain", 3)
    rows, _ = _test_images(tmp, out.run_dir / "seed_3" / "plain")
    files = [str(tmp / "data" / "img_align_celeba" / r["image_id"]) for r in rows[:5]]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    predict.main([f"models:/smoke-plain/{version.version}", *files])
    lines = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [line["image"] for line in lines] == files
    assert [int(line["label"]) for line in lines] == [int(r["y_hat"]) for r in rows[:5]]
    assert [float(line["probability"]) for line in lines] == pytest.approx([float(r["score"]) for r in rows[:5]],
                                                                           rel=1e-5)


def _other_projects_model(tmp: Path) -> str:
    """An MLflow Model that is no model of this project: a pyfunc from a code file of its own."""
    import mlflow

    code = tmp / "other_model.py"
    code.write_text("import mlflow\nmlflow.models.set_model(lambda model_input: model_input)\n")
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    return mlflow.pyfunc.log_model(name="other", python_model=str(code), pip_requirements=["mlflow"]).model_uri


def test_the_loader_names_what_a_wrong_model_or_wrong_images_are(compared, capsys, monkeypatch):
    tmp, _ = compared
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    np.save(tmp / "small.npy", np.zeros((2, 16, 16, 3), np.uint8))
    registered = f"models:/smoke-plain/{_version(tmp, 'plain', 3).version}"
    cases = [([_other_projects_model(tmp), str(tmp / "small.npy")], "is not a model of distributed_asac"),
             ([registered, str(tmp / "small.npy")], "holds uint8 images of shape (2, 16, 16, 3), but"),
             (["models:/smoke-plain/99", str(tmp / "small.npy")], "no MLflow Model at models:/smoke-plain/99")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stopped:
            predict.main(argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A tracking store made once (a new sqlite store costs seconds of MLflow's migrations) for the refusals."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _refused(argv: list[str], capsys) -> str:
    """The demo's one stderr line for `argv`, which must stop it with exit status 2."""
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--config", str(SMOKE), *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("overrides, message", [
    (["registry.name=smoke/{row}"], "would be registered as 'smoke/base', which MLflow refuses"),
    (["registry.name=smoke"], "lacks {row}, so every row would be a version of one registered model"),
    (["registry.name={row}-{seed}"], "'registry.name': '{row}-{seed}' is not a name template (KeyError('seed'))"),
    (["registry.uri=file:///nowhere/mlruns"], "MLflow model registry file:///nowhere/mlruns (registry.uri) cannot be used"),
])
def test_a_registry_that_cannot_take_the_models_is_refused_before_anything_runs(tmp_path, store, overrides, message,
                                                                                capsys):
    capsys.readouterr()  # the store fixture's MLflow lines
    assert message in _refused([f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
                                f"tracking.uri={store}", *overrides], capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_a_registry_store_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, store, capsys):
    """Another process holds the registry store's write lock (what a read-only file gives a user who is not root)."""
    import sqlite3

    registry = tmp_path / "registry.db"
    shutil.copyfile(store.removeprefix("sqlite:///"), registry)  # a store of MLflow's schema, registry included
    capsys.readouterr()  # the store fixture's MLflow lines
    holder = sqlite3.connect(registry)
    holder.execute("BEGIN IMMEDIATE")  # readers still read; the probe's write waits 5 s, then gives up
    try:
        err = _refused([f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", f"tracking.uri={store}",
                        f"registry.uri=sqlite:///{registry}"], capsys)
    finally:
        holder.rollback()
        holder.close()
    assert "registry.db (registry.uri) cannot be written: database is locked" in err
    assert not (tmp_path / "runs").exists()


def test_models_that_would_not_fit_a_local_artifact_store_are_refused_before_anything_runs(tmp_path, store, capsys,
                                                                                          monkeypatch):
    capsys.readouterr()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
    err = _refused([f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}", f"tracking.uri={store}",
                    "seeds=[0,1]"], capsys)
    assert "has 0 MiB free, but this run logs 14 copies of a small_cnn model" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_mlflow_models_serve_answers_on_loopback_with_the_runs_predictions(compared, free_port):
    """`mlflow models serve -m models:/<name>/<version> --env-manager local -h 127.0.0.1`, one REST request."""
    tmp, out = compared
    version = _version(tmp, "asac_fgsm", 3)
    rows, images = _test_images(tmp, out.run_dir / "seed_3" / "asac_fgsm")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # it starts uvicorn from the PATH
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                               f"models:/smoke-asac_fgsm/{version.version}", "--env-manager", "local", "-h",
                               "127.0.0.1", "-p", str(port)], env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-3000:]
                time.sleep(1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert [p["label"] for p in answer] == [int(r["y_hat"]) for r in rows]
    assert [p["probability"] for p in answer] == pytest.approx([float(r["score"]) for r in rows], abs=1e-5)
