"""The MLflow UI as a user meets it (slow): `mlflow ui` on 127.0.0.1 with a smoke comparison's store, the
experiment's runs and the parent run's page rendered by headless Chromium (Debian's `chromium`: `make browser`,
which `make test-slow` runs first), and their text checked: the runs view with every run named by row and seed,
the verdicts on the parent run, and the Models page with a registered model per row. Every process the test starts runs in a process group of its own and is stopped
by that group's id.

With ASAC_UI_SCREENSHOTS=<folder> the screenshots of the pages are also copied there, as mlflow_ui_runs.png,
mlflow_ui.png, mlflow_ui_models.png and mlflow_ui_model_version.png (`make ui-screenshots` writes those of docs/
this way).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest
from mlflow.tracking import MlflowClient

from distributed_asac.comparison import compare
from distributed_asac.demo import row_variants
from distributed_asac.tracking import ui_link

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1600,1000")
# Chromium's virtual time stands still while the page's requests are pending: the budget is what the app's own
# timers get after its data arrived, not a wait on the machine's speed.
BUDGET_MS = 20000
WAIT_S = 300  # bound on the server's start and on one render; each normally takes seconds
SEEDS = (1, 2)
ROWS = ("base", "probe", "plain", "asac_fgsm")


@pytest.fixture(scope="module")
def store(tmp_path_factory, smoke_config) -> tuple[Path, dict]:
    """A two-seed smoke comparison; its folder (mlflow.db inside) and what the UI should show."""
    tmp = tmp_path_factory.mktemp("ui")
    cfg = smoke_config(tmp, f"seeds={list(SEEDS)}", "analysis.ig_images=0", "analysis.robustness_images=0")
    out = compare(cfg, variants=row_variants("plain,asac_fgsm"))
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke").experiment_id
    (parent,) = client.search_runs([experiment], "tags.stage = 'comparison'")
    verdicts = {p["verdict"] for p in json.loads((out.run_dir / "results.json").read_text())["paired"]}
    return tmp, {"experiment": experiment, "parent": parent.info.run_id, "verdicts": verdicts,
                 "commit": parent.data.tags["git_commit"]}


@pytest.fixture(scope="module")
def ui(store, process_running) -> Iterator[str]:
    """`mlflow ui` on the store at a free loopback port; its address. Stopped (its whole process group) after."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: run `make browser` (Debian's chromium)")
    tmp, _ = store
    port = _free_port()
    log = (tmp / "mlflow-ui.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                               f"sqlite:///{tmp / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # GenAI job runners
    try:
        _wait_until_serving(f"http://127.0.0.1:{port}/health", server)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_group(server, process_running)
        log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen) -> None:
    """Poll `url` until it answers 200, the server exits, or WAIT_S pass (each poll blocks up to 1 s)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow ui exited with status {server.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow ui did not answer {url} within {WAIT_S} s")


def _stop_group(process: subprocess.Popen, process_running) -> None:
    """Stop the process group the test started (by its leader's pid): SIGTERM, then SIGKILL to whatever is left
    after 30 s; then wait (bounded) until none of the group runs."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, WAIT_S)):
        if process.poll() is not None and not _group(process.pid, process_running):
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (process.poll() is None or _group(process.pid, process_running)):
            time.sleep(0.1)
    assert process.poll() is not None and not _group(process.pid, process_running), _group(process.pid, process_running)


def _group(pgid: int, process_running) -> list[int]:
    """The running processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        if int(fields[2]) == pgid and process_running(int(entry.name)):
            members.append(int(entry.name))
    return members


def render(url: str, folder: Path, process_running, screenshot: Optional[Path] = None) -> str:
    """The page's visible text after the app rendered it in headless Chromium (a fresh profile in `folder`);
    with `screenshot`, also a PNG of it."""
    profile = folder / f"profile-{len(list(folder.glob('profile-*')))}"
    output = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    browser = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}",
                                f"--virtual-time-budget={BUDGET_MS}", *output, url],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        dom, _ = browser.communicate(timeout=WAIT_S)
    finally:
        _stop_group(browser, process_running)
    assert browser.returncode == 0, f"chromium exited with status {browser.returncode} on {url}"
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", dom.decode(), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_runs_view_lists_every_run_by_row_and_seed(store, ui, tmp_path, process_running):
    _, shown = store
    url = ui_link(ui, shown["experiment"])
    text = render(url, tmp_path, process_running)
    assert "Runs" in text and f"{len(SEEDS) * len(ROWS) + 1} matching runs" in text, text[:2000]
    assert "No data available for the selected time range" not in text  # not the GenAI trace overview
    for row in ROWS:
        for seed in SEEDS:
            assert f"{row} · seed {seed}" in text, (row, seed, text[:2000])
    assert "comparison" in text
    _screenshot(url, tmp_path / "mlflow_ui_runs.png", process_running)


def test_parent_run_page_carries_the_verdicts(store, ui, tmp_path, process_running):
    tmp, shown = store
    url = ui_link(ui, shown["experiment"], shown["parent"])
    text = render(url, tmp_path, process_running)
    assert "Description" in text and f"Comparison over 2 seeds ({', '.join(map(str, SEEDS))})" in text, text[:3000]
    assert "asac_fgsm − plain" in text and "asac_fgsm − base" in text
    for verdict in shown["verdicts"]:
        assert verdict in text, (verdict, text[:3000])
    assert "pytest" in text and shown["commit"][:7] in text  # the Source: entry point and git commit
    _screenshot(url, tmp_path / "mlflow_ui.png", process_running)


def test_models_page_lists_a_registered_model_per_row(store, ui, tmp_path, process_running):
    """The Model Registry (the sidebar's Models): each row's registered model, a version per seed, and a version's
    page with its figures and verdicts. The list page is not pictured: a fresh browser profile opens it under
    MLflow's announcement of its new registry UI, which covers the list."""
    text = render(f"{ui}/#/models", tmp_path, process_running)
    for row in ROWS:
        assert (f"smoke-{row}" in text) == (row != "probe"), (row, text[:2000])  # the probe ships no model
    url = f"{ui}/#/models/smoke-asac_fgsm"
    text = render(url, tmp_path, process_running)
    assert all(f"Version {i + 1}" in text for i in range(len(SEEDS))) and "test_worst_group_ACC" in text, text[:2000]
    _screenshot(url, tmp_path / "mlflow_ui_models.png", process_running)
    url = f"{ui}/#/models/smoke-asac_fgsm/versions/{len(SEEDS)}"
    text = render(url, tmp_path, process_running)
    assert f"asac_fgsm, seed {SEEDS[-1]}" in text and "asac_fgsm − plain:" in text, text[:2000]
    assert "Source Run" in text and f"asac_fgsm · seed {SEEDS[-1]}" in text
    _screenshot(url, tmp_path / "mlflow_ui_model_version.png", process_running)


def _screenshot(url: str, picture: Path, process_running) -> None:
    """A PNG of the page, also copied into $ASAC_UI_SCREENSHOTS when set."""
    render(url, picture.parent, process_running, screenshot=picture)
    assert picture.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("ASAC_UI_SCREENSHOTS"):
        shutil.copyfile(picture, Path(os.environ["ASAC_UI_SCREENSHOTS"]) / picture.name)
