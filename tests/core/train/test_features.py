"""Frozen-feature cache: rows computed exactly when what they depend on changes, equal to a live forward pass,
and training from it matches training without it (cache_features auto vs off)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.io import load_trusted
from freezeflow.core.layout import Layout
from freezeflow.core.models.registry import build_backbone, normalization
from freezeflow.core.params import load_params
from freezeflow.core.train import feature_store
from freezeflow.core.train.run import run_training
from tests.conftest import tiny_overrides


def write_weights(path: Path, seed: int) -> Path:
    """A resnet18 state dict with non-trivial BatchNorm (random statistics and affine), so that folding
    BatchNorm into the convs is really tested. A rewrite gets a fresh mtime (what the cache key sees)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0.0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0.0, 0.2)
    state = net.state_dict()
    torch.save(state, path)
    stamp = path.stat().st_mtime_ns + 10**9 * (seed + 1)  # distinct even on a coarse-mtime file system
    os.utime(path, ns=(stamp, stamp))
    return path


def stores(root: Path) -> set[str]:
    """Names of the feature stores in the shared cache."""
    folder = Layout(root).features
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.exists() else set()


def train(root: Path, data: Path, **extra) -> dict:
    params = load_params(root / "params", tiny_overrides(data, **{"train.epochs": 1,
                                                                  "train.freeze.strategy": "head", **extra}))
    return run_training(params, root)


def test_rows_are_computed_exactly_when_their_inputs_change(project, shapes_dir, tmp_path, monkeypatch):
    weights = write_weights(tmp_path / "w.pt", seed=0)
    base = {"train.weights": str(weights), "train.augment.enabled": "true", "train.augment_views": 1}
    first = train(project, shapes_dir, **base)
    sizes = {name: len(ix) for name, ix in prepare_dataset(
        load_params(project / "params", tiny_overrides(shapes_dir)).data, Layout(project).prepared).split.items()}
    everything, train_rows = sum(sizes.values()), sizes["train"]
    assert first["feature_rows_computed"] == everything and len(stores(project)) == 1  # one level (L5)
    assert train(project, shapes_dir, **base)["feature_rows_computed"] == 0, "nothing changed, yet rows were computed"

    changes = [  # (what, action, overrides, rows it must compute: a new store, or new train views only)
        ("weights file rewritten", lambda: write_weights(weights, seed=1), {}, everything),
        ("augmentation params", None, {"train.augment.rotate": 5.0}, train_rows),
        ("number of views", None, {"train.augment.rotate": 5.0, "train.augment_views": 2}, train_rows),
        ("seed (with augmented views)", None, {"train.augment.rotate": 5.0, "train.seed": 1}, train_rows),
        ("feature version", lambda: monkeypatch.setattr(feature_store, "FEATURE_VERSION",
                                                        feature_store.FEATURE_VERSION + 1), {}, everything),
    ]
    for what, act, extra, expected in changes:
        if act is not None:
            act()
        before = stores(project)
        got = train(project, shapes_dir, **(base | extra))["feature_rows_computed"]
        assert got == expected, f"{what}: {got} rows computed, expected {expected}"
        assert len(stores(project) - before) == (expected == everything), f"{what}: wrong number of new stores"
        assert train(project, shapes_dir, **(base | extra))["feature_rows_computed"] == 0, f"{what}: not reused"


def test_the_same_weights_from_another_path_share_the_store(project, shapes_dir, tmp_path):
    weights = write_weights(tmp_path / "w.pt", seed=0)
    train(project, shapes_dir, **{"train.weights": str(weights)})
    copy = tmp_path / "elsewhere.pt"
    shutil.copy(weights, copy)  # same bytes, new path and mtime: the prefix's own weights are the key
    assert train(project, shapes_dir, **{"train.weights": str(copy)})["feature_rows_computed"] == 0


def test_seed_without_augmented_views_reuses_the_cache(project, shapes_dir, tmp_path):
    weights = {"train.weights": str(write_weights(tmp_path / "w.pt", seed=0))}
    train(project, shapes_dir, **weights)
    assert train(project, shapes_dir, **weights, **{"train.seed": 1})["feature_rows_computed"] == 0  # plain rows


def test_a_random_init_prefix_is_keyed_by_its_weights(project, shapes_dir):
    """weights: none draws the prefix from train.seed: another seed is another prefix (its own store)."""
    train(project, shapes_dir)
    assert train(project, shapes_dir, **{"train.seed": 1})["feature_rows_computed"] > 0
    assert len(stores(project)) == 2


@torch.no_grad()
def live_prefix(weights: Path, images: np.ndarray, level: int) -> torch.Tensor:
    """Stages 0..level-1 of a freshly loaded backbone, eval mode, fp32, BatchNorm not folded."""
    model = build_backbone("resnet18", str(weights), num_classes=3).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization("resnet18"))
    x = (torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0 - mean) / std
    for stage in model.stages[:level]:
        x = stage(x)
    return x


def test_cached_features_equal_a_live_forward_pass(project, shapes_dir, tmp_path):
    weights = write_weights(tmp_path / "w.pt", seed=0)
    overrides = {"train.weights": str(weights), "train.freeze.strategy": "gradual", "train.epochs": 4}
    train(project, shapes_dir, **overrides)  # gradual: levels 5, 4, 3, 2 of the pretrained prefix
    params = load_params(project / "params", tiny_overrides(shapes_dir))
    prepared = prepare_dataset(params.data, Layout(project).prepared)
    root = Layout(project).features
    levels = {name: root / name for name in stores(project)}
    assert sorted(name.split("-")[1] for name in levels) == ["L2", "L3", "L4", "L5"]
    for name, store in levels.items():
        level = int(name.split("-")[1][1:])
        for split in ("train", "val"):
            keys = [f"{prepared.digests[i]}:plain" for i in prepared.split[split]]
            cached = feature_store.open_stored_rows(store, keys, 1)  # (V=1, N, C, H, W) fp16
            assert cached.dtype == np.float16 and cached.shape[0] == 1
            live = live_prefix(weights, prepared.images[prepared.split[split]], level)
            got = torch.from_numpy(np.asarray(cached[0]).astype(np.float32))
            scale = float(live.abs().max())
            torch.testing.assert_close(got, live, rtol=2e-3, atol=1e-3 * max(scale, 1.0),
                                       msg=lambda m: f"{name} {split}: {m}")


def test_cache_auto_trains_like_cache_off(project, shapes_dir, tmp_path):
    weights = write_weights(tmp_path / "w.pt", seed=0)
    runs = {}
    for cache in ("auto", "off"):
        root = tmp_path / cache
        shutil.copytree(project / "params", root / "params")
        metrics = train(root, shapes_dir, **{"train.weights": str(weights), "train.epochs": 2,
                                             "train.cache_features": cache})
        assert metrics["feature_cache"] is (cache == "auto")
        runs[cache] = (metrics, load_trusted(root / "models" / "model.pt"))
    (auto, auto_model), (off, off_model) = runs["auto"], runs["off"]
    assert auto["val_loss"] == pytest.approx(off["val_loss"], rel=1e-3, abs=1e-4)
    assert (auto["val_accuracy"], auto["test_accuracy"]) == (off["val_accuracy"], off["test_accuracy"])
    for key, value in off_model.items():
        torch.testing.assert_close(auto_model[key], value, rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_features_that_overflow_fp16_are_refused_in_one_line():
    """fp16 holds at most 65504: a level whose features exceed it must not be cached as inf."""
    from freezeflow.core.errors import UserError
    from freezeflow.core.train.features import HalfRows

    rows = HalfRows((1, 2, 3), torch.device("cpu"))
    rows.put((0, slice(0, 1)), torch.full((1, 3), 1.5))
    rows.put((0, slice(1, 2)), torch.tensor([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(rows.result(4), np.array([[[1.5] * 3, [1.0, 2.0, 3.0]]], dtype=np.float16))
    rows.put((0, slice(1, 2)), torch.full((1, 3), 1e6))
    with pytest.raises(UserError, match="features at level 4 overflow fp16"):
        rows.result(4)


def test_a_folded_prefix_says_so_and_matches_the_original():
    from freezeflow.core.train.features import make_inference_prefix

    model = build_backbone("efficientnet_lite0", "default", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    prefix = make_inference_prefix(list(model.stages[:3]), x)
    assert prefix.bn_folded is True
    expected = torch.nn.Sequential(*model.stages[:3])(x)
    torch.testing.assert_close(prefix(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-3, atol=1e-3)
