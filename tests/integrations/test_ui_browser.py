"""`freezeflow ui` in a real headless Chromium: the MLflow runs table shows our per-epoch metrics.

A tiny tracked training goes into a sqlite store in tmp_path; `freezeflow ui` serves it on a free
port of 127.0.0.1; Chromium (`--dump-dom`, `--screenshot`) renders the experiment's runs page.

MLflow 3 opens an experiment on its GenAI overview and shows no metric columns by default
("Show more columns"), so the page is opened the way a user shares a view (Views > Share): the
column choice is stored as the experiment tag `mlflow.sharedViewState.<key>` and the URL names
the key (`?viewStateShareKey=<key>`); `workflowType=machine_learning` picks the training UI.

Chromium comes from Debian (scripts/install_chromium.sh, run here when missing and we are root);
without it the test is skipped with that hint. The screenshot is written to the tmp project's
reports/mlflow-ui.png (its path is printed and named in every assertion message).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import BIN, REPO, free_port, write_figures_dataset
from freezeflow.core.params import load_params
from freezeflow.integrations.tracking import tracked_training, tracking_scope

SHARE_KEY = "freezeflow-ui-check"
COLUMNS = ("val_accuracy", "time_per_epoch_s")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--disable-extensions",
                "--disable-crash-reporter", "--hide-scrollbars", "--mute-audio")

pytestmark = pytest.mark.slow


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser() -> str:
    """Chromium's path; installed with scripts/install_chromium.sh when missing and we are root."""
    if find_browser() is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["sh", str(REPO / "scripts" / "install_chromium.sh")], capture_output=True, timeout=900,
                       check=False)
    path = find_browser()
    if path is None:
        pytest.skip("chromium not installed: run scripts/install_chromium.sh")
    return path


@pytest.fixture(scope="module")
def tracked_project(tmp_path_factory):
    """A project with one tracked 2-epoch training in <root>/mlflow/mlflow.db: (root, uri, result)."""
    root = tmp_path_factory.mktemp("ui") / "project"
    data = write_figures_dataset(root / "data" / "shapes", per_class=8)
    shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    (root / "mlflow").mkdir()
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    params = load_params(root / "params", [f"data.dir={data}", "data.image_size=32", "train.backbone=resnet18",
                                           "train.weights=none", "train.epochs=2", "train.batch_size=8"])
    with pytest.MonkeyPatch.context() as mp, tracking_scope(uri):
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = tracked_training(params, root, run_name="ui-check")
    return root, uri, result


def share_view(uri: str, experiment_id: str) -> None:
    """What Views > Share stores: the runs table with our metric columns, newest run first."""
    from mlflow.tracking import MlflowClient

    state = {"selectedColumns": [f"metrics.`{c}`" for c in COLUMNS] + ["params.`train.lr`"],
             "orderByKey": "attributes.start_time", "orderByAsc": False}
    MlflowClient(uri).set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(state))


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`freezeflow ui` exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    pytest.fail(f"`freezeflow ui` did not answer on {url} within {timeout:.0f}s:\n"
                f"{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End the UI server and its uvicorn workers: the process group this test started."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def chrome(browser: str, profile: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [browser, *CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1600,1000",
           "--virtual-time-budget=15000", *args]
    env = {**os.environ, "HOME": str(profile)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def dump_until(browser: str, profile: Path, url: str, needles: tuple[str, ...], tries: int = 3) -> str:
    """The rendered DOM of `url`; asked again (up to `tries`) while a needle is still missing."""
    dom = ""
    for _ in range(tries):
        dom = chrome(browser, profile, "--dump-dom", url).stdout
        if all(n in dom for n in needles):
            break
        time.sleep(2)
    return dom


def test_mlflow_ui_runs_table_shows_epoch_metrics(browser, tracked_project, tmp_path):
    root, uri, result = tracked_project
    experiment_id = result["experiment_id"]
    share_view(uri, experiment_id)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={SHARE_KEY}"
    shot = root / "reports" / "mlflow-ui.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    where = f"(screenshot: {shot}; url: {url})"
    print(f"\nMLflow UI screenshot: {shot}")
    log = tmp_path / "ui.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "freezeflow"), "ui", "--port", str(port)], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"{base}/", proc, log)
        profile = tmp_path / "chrome"
        dom = dump_until(browser, profile, url, (*COLUMNS, "ui-check"))
        done = chrome(browser, profile, f"--screenshot={shot}", url)
        assert shot.exists(), f"no screenshot {where}:\n{done.stderr[-2000:]}"
    finally:
        stop(proc)
    assert "ui-check" in dom, f"run 'ui-check' not in the runs table {where}"
    assert "does not exist" not in dom and "share key is invalid" not in dom, f"shared view not loaded {where}"
    for column in COLUMNS:
        assert f"metrics.`{column}`" in dom and f">{column}<" in dom, f"no {column} column in the runs table {where}"
    with Image.open(shot) as image:
        assert image.size == (1600, 1000), f"{image.size} {where}"
        gray = image.convert("L")
        lo, hi = gray.getextrema()
        assert hi - lo > 100 and len(gray.getcolors(1 << 16) or []) > 50, f"blank screenshot {where}"
