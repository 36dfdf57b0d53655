"""Shared fixtures: real image files written to tmp_path, a project folder with params files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NO_ANALYTICS = {"DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def pytest_configure(config):
    """Tests spawn dvc, prefect and mlflow: none of them may send usage analytics anywhere."""
    for key, value in NO_ANALYTICS.items():
        os.environ[key] = value
BIN = Path(sys.executable).parent
TINY_TRAIN = {"backbone": "resnet18", "weights": "none", "epochs": 2, "batch_size": 8, "schedule": "constant",
              "lr": 0.01}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def write_shapes_dataset(root: Path, classes: int = 3, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """A small, learnable ImageFolder of real PNGs: class c = a bright square at a class-specific place."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            x0 = (c * size // classes) % (size - 8)
            pixels[4:12, x0:x0 + 8, c % 3] = 230
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return root


CLASSES = ("circle", "square", "stripes")


def draw_figure(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One (size, size, 3) uint8 picture: a red disc, a green square or blue stripes, on noise."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(10, size - 10, 2).tolist() + [int(rng.integers(5, 9))]
    if kind == "circle":
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (230, 30, 30)
    elif kind == "square":
        img[cy - r:cy + r, cx - r:cx + r] = (30, 220, 30)
    else:
        img[(yy // 3) % 2 == 0] = (30, 30, 230)
    return img


def write_figures_dataset(root: Path, per_class: int = 12, suffix: str = ".png") -> Path:
    """CLASSES x per_class figures; suffix ".jpg" writes real JPEG files (quality 90) instead of PNGs."""
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(draw_figure(kind, rng)).save(root / kind / f"{i:02d}{suffix}", quality=90)
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """photo_folder(name, per_class) -> a real photo set (freezeflow.app.photosets: JPEG patches of
    scikit-image's sample photos, grayscale and RGB, one rare class), written once per session."""
    from freezeflow.app.photosets import write_photoset

    made: dict[tuple[str, int], Path] = {}

    def make(name: str, per_class: int = 10) -> Path:
        if (name, per_class) not in made:
            folder = tmp_path_factory.mktemp(f"photos-{name}") / name
            write_photoset(name, folder, per_class)
            made[name, per_class] = folder
        return made[name, per_class]

    return make


@pytest.fixture
def shapes_dir(tmp_path: Path) -> Path:
    return write_shapes_dataset(tmp_path / "shapes")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with a copy of the repo's params files."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    return root


def tiny_overrides(data_dir: Path, **extra) -> list[str]:
    """Fast settings: random-init resnet18 at 32 px, 4 epochs, batch 8 (no download, no GPU)."""
    base = {"data.dir": str(data_dir), "data.image_size": 32, "train.backbone": "resnet18",
            "train.weights": "none", "train.epochs": 4, "train.batch_size": 8, "train.schedule": "constant",
            "train.lr": 0.01}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect API for the whole session (each start costs ~15 s), with its own
    result storage so cached task results of earlier sessions never leak in."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


def write_tiny_params(root: Path) -> None:
    shutil.copytree(REPO / "params", root / "params", dirs_exist_ok=True)
    # the frozen `tune` stage's committed outputs (a real sweep's result): dvc checks they exist
    (root / "reports").mkdir(exist_ok=True)
    shutil.copy(REPO / "reports" / "tune.json", root / "reports" / "tune.json")
    data = yaml.safe_load((root / "params" / "data.yaml").read_text())
    data.update({"dir": "data/shapes", "image_size": 32})
    (root / "params" / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    train = yaml.safe_load((root / "params" / "train.yaml").read_text())
    train.update(TINY_TRAIN)
    (root / "params" / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False))


@pytest.fixture
def dvc_project(tmp_path: Path) -> tuple[Path, dict]:
    """A git + DVC repo with freezeflow's dvc.yaml, code, tiny params and data tracked in data.dvc."""
    root = tmp_path / "repo"
    root.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    shutil.copytree(REPO / "freezeflow", root / "freezeflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_tiny_params(root)
    write_shapes_dataset(root / "data" / "shapes", classes=3, per_class=10)
    run(["git", "init", "-q"], root, env)
    run([str(BIN / "dvc"), "init", "-q"], root, env)
    run([str(BIN / "dvc"), "add", "-q", "data"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "init"], root, env)
    return root, env


class WritesMarker:
    """A pickle payload: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
