"""The default dataset under DVC, ingest through the CLI, push/pull through a DVC remote, dirty data refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_shapes_dataset, write_tiny_params

BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An empty git + DVC project with freezeflow's params and a local DVC remote."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    sh(["git", "init", "-q"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    sh([str(BIN / "dvc"), "remote", "add", "-d", "local", str(tmp_path / "remote")], root)
    return root


def test_digits_hash_equals_the_committed_data_dvc(repo):
    sh([str(BIN / "freezeflow"), "data", "digits"], repo)
    committed = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    written = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    assert written["md5"] == committed["md5"] and written["nfiles"] == 1797
    status = sh([str(BIN / "dvc"), "status", "data.dvc"], repo).stdout
    assert "up to date" in status.lower()


def test_push_then_pull_restores_the_data(repo):
    sh([str(BIN / "freezeflow"), "data", "digits"], repo)
    sh([str(BIN / "dvc"), "push", "-q"], repo)
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    sh([str(BIN / "dvc"), "pull", "-q"], repo)
    assert len(list((repo / "data" / "digits").rglob("*.png"))) == 1797


def test_ingest_cli_reports_quarantines_and_versions(repo, tmp_path):
    src = write_shapes_dataset(tmp_path / "photos", classes=3, per_class=6)
    (src / "class_0" / "zero.png").write_bytes(b"")
    (src / "class_1" / "notes.jpg").write_text("not an image")
    (src / ".DS_Store").write_bytes(b"\0\0")
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    proc = sh([str(BIN / "freezeflow"), "ingest", str(src), "--name", "photos"], repo)
    assert "rejected (empty): 1" in proc.stderr and "rejected (not_an_image): 1" in proc.stderr
    report = json.loads((repo / "reports" / "ingest.json").read_text())
    assert report["classes"] == {"class_0": 6, "class_1": 6, "class_2": 6}
    assert (repo / "quarantine" / "photos" / "class_0" / "zero.png").exists()
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before  # the source is never modified
    assert (repo / "data.dvc").exists()
    assert "up to date" in sh([str(BIN / "dvc"), "status", "data.dvc"], repo).stdout.lower()


def test_ingest_of_folder_without_classes_is_one_line_exit_2(repo, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    proc = sh([str(BIN / "freezeflow"), "ingest", str(flat)], repo, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(flat) in proc.stderr


def test_training_refuses_data_that_differs_from_data_dvc(repo):
    sh([str(BIN / "freezeflow"), "data", "digits"], repo)
    target = repo / "data" / "digits" / "3" / sorted(os.listdir(repo / "data" / "digits" / "3"))[0]
    target.write_bytes(target.read_bytes() + b"tampered")
    fast = ["-S", "train.backbone=resnet18", "-S", "train.weights=none", "-S", "data.image_size=32",
            "-S", "train.epochs=1"]
    proc = sh([str(BIN / "freezeflow"), "train", "--no-track", *fast], repo, check=False)
    assert proc.returncode == 2 and "differs from data.dvc" in proc.stderr and "--allow-dirty-data" in proc.stderr
    assert not (repo / "models").exists()
    dvc_status = sh([str(BIN / "dvc"), "status", "data.dvc"], repo).stdout
    assert "modified" in dvc_status


def fresh_clone(tmp_path: Path) -> Path:
    """What `git clone` gives: code, dvc.yaml, data.dvc (of data/digits) and params whose data.dir is
    data/digits, but no data/ (never pulled); tiny training params."""
    root = tmp_path / "clone"
    shutil.copytree(REPO / "freezeflow", root / "freezeflow", ignore=shutil.ignore_patterns("__pycache__"))
    write_tiny_params(root)
    data = yaml.safe_load((root / "params" / "data.yaml").read_text())
    (root / "params" / "data.yaml").write_text(yaml.safe_dump({**data, "dir": "data/digits"}, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    for name in ("dvc.yaml", ".dvcignore", "data.dvc"):
        shutil.copy(REPO / name, root / name)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "clone"], root)
    return root


def dvc_lock_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The pipeline's dvc.lock line (Prefect's own log lines, e.g. its temporary server stopping, follow)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("dvc.lock")]


@pytest.mark.slow
def test_fresh_clone_ingest_then_pipeline_with_override_then_without(tmp_path):
    """ingest tex; `pipeline -S data.dir=data/tex` trains, evaluates, registers and leaves dvc.lock
    alone (one line says so); with data.dir in params/data.yaml, `pipeline` records dvc.lock."""
    from mlflow import MlflowClient

    root = fresh_clone(tmp_path)
    assert not (root / "data").exists()
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home")}  # the flow's temporary Prefect server
    src = write_shapes_dataset(tmp_path / "tex", classes=3, per_class=10)
    sh([str(BIN / "freezeflow"), "ingest", str(src), "--name", "tex"], root, env=env)
    proc = sh([str(BIN / "freezeflow"), "pipeline", "-S", "data.dir=data/tex"], root, env=env)
    [line] = dvc_lock_lines(proc)
    assert line.startswith("dvc.lock not updated: run with -S overrides (data.dir=data/tex); params/*.yaml stay")
    assert not (root / "dvc.lock").exists()
    assert json.loads((root / "reports" / "eval.json").read_text())["split"] == "test"
    registry = MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert str(registry.get_model_version_by_alias("tex", "champion").version) == "1"

    data = yaml.safe_load((root / "params" / "data.yaml").read_text())
    (root / "params" / "data.yaml").write_text(yaml.safe_dump({**data, "dir": "data/tex"}, sort_keys=False))
    proc = sh([str(BIN / "freezeflow"), "pipeline"], root, env=env)
    assert dvc_lock_lines(proc) == ["dvc.lock updated: prepare, train, evaluate (and frozen tune)"]
    assert "up to date" in sh([str(BIN / "dvc"), "status"], root).stdout.lower()
