"""Shared fixtures: real image files written to tmp_path, a project folder with params files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


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
