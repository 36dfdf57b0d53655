"""On a CUDA device (skipped elsewhere; scripts/gpu-check runs them): the feature cache built there matches
the CPU's, and fused head trials train there to the same accuracy as on the CPU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.layout import Layout
from freezeflow.core.params import load_params
from freezeflow.core.train.fused import train_fused
from freezeflow.core.train.run import build_trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PARAMS = Path(__file__).parents[3] / "params"


@pytest.fixture(scope="module")
def setup(photo_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    params = load_params(PARAMS, [f"data.dir={photo_folder('textures', 10)}", "data.image_size=64",
                                  "train.epochs=2", "train.batch_size=16", "train.freeze.strategy=until",
                                  "train.freeze.until=5", "train.amp=off"])
    return params, prepare_dataset(params.data, root / "prepared"), root


def on(params, device: str):
    return replace(params, train=replace(params.train, device=device))


def test_features_cached_on_cuda_match_the_cpu(setup):
    params, prepared, root = setup
    levels = {}
    for device in ("cpu", "cuda"):
        trainer = build_trainer(on(params, device), prepared, Layout(root / device), [], checkpoint=False)
        levels[device] = np.asarray(trainer.cache.level(trainer.frozen)["train"], dtype=np.float32)
    assert np.isfinite(levels["cuda"]).all()
    error = np.abs(levels["cuda"] - levels["cpu"]).max() / np.abs(levels["cpu"]).max()
    assert error < 1e-2


def test_fused_heads_on_cuda_reach_the_cpu_accuracy(setup):
    params, prepared, root = setup
    head = replace(params, train=replace(params.train, freeze=replace(params.train.freeze, strategy="head")))
    best = {}
    for device in ("cpu", "cuda"):
        p = on(head, device)
        members = [p.train, replace(p.train, lr=0.003)]
        trainer = build_trainer(p, prepared, Layout(root / f"fused-{device}"), [], checkpoint=False)
        best[device] = [o.result.best_val_accuracy for o in train_fused(trainer, members, [[], []])]
    assert best["cuda"] == pytest.approx(best["cpu"], abs=0.03)
