"""BatchNorm of trainable stages (train.bn) and AdaBN (train.bn_adapt), on a real photo folder with the
pretrained EfficientNet-Lite0: what runs in which mode while train_epoch runs, what learns, what is cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from freezeflow.core.models.batchnorm import BN_TYPES, adapt_batchnorm, batchnorm_layers
from freezeflow.core.train.features import feature_key
from freezeflow.core.params import AugmentParams, load_params
from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.layout import Layout
from freezeflow.core.train.run import build_trainer
from tests.conftest import REPO


def trainer_for(root: Path, data: Path, **extra):
    sets = {"data.dir": str(data), "data.image_size": 32, "train.epochs": 1, "train.batch_size": 16} | extra
    params = load_params(REPO / "params", [f"{k}={v}" for k, v in sets.items()])
    prepared = prepare_dataset(params.data, root / "prepared")
    return build_trainer(params, prepared, Layout(root), [])


def record_bn_modes(trainer) -> dict[int, set[bool]]:
    """stage index -> the `training` flags its BatchNorm layers had in forward calls during train_epoch."""
    seen: dict[int, set[bool]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, _, i=i: seen.setdefault(i, set()).add(m.training))
             for i, stage in enumerate(trainer.model.stages) for m in stage.modules() if isinstance(m, BN_TYPES)]
    trainer.train_epoch()
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_bn_mode_of_trainable_stages_while_training(tmp_path, photo_folder, bn):
    trainer = trainer_for(tmp_path, photo_folder("textures", 10), **{"train.freeze.strategy": "until",
                                                                     "train.freeze.until": 5, "train.bn": bn,
                                                                     "train.cache_features": "off"})
    layers = [m for s in trainer.model.stages[5:] for m in s.modules() if isinstance(m, BN_TYPES)]
    before = [(m.weight.detach().clone(), m.running_mean.clone()) for m in layers]
    seen = record_bn_modes(trainer)
    assert all(seen[i] == {False} for i in range(5)), "frozen stages always run BatchNorm in eval"
    trainable = {i for i in seen if i >= 5}
    assert trainable and all(seen[i] == {bn == "train"} for i in trainable)
    weights_moved = any(not torch.equal(m.weight, w) for m, (w, _) in zip(layers, before))
    stats_moved = any(not torch.equal(m.running_mean, r) for m, (_, r) in zip(layers, before))
    assert weights_moved, "affine BatchNorm params learn in both modes"
    assert stats_moved == (bn == "train"), "bn: frozen keeps the running statistics"


def test_bn_adapt_re_estimates_statistics_once_and_keeps_the_cache_valid(tmp_path, photo_folder):
    data = photo_folder("glyphs", 10)
    plain = trainer_for(tmp_path / "a", data, **{"train.freeze.strategy": "head"})
    adapted = trainer_for(tmp_path / "b", data, **{"train.freeze.strategy": "head", "train.bn_adapt": True})
    body = slice(0, len(adapted.model.stages) - 1)
    pairs = list(zip(batchnorm_layers(plain.model.stages[body]), batchnorm_layers(adapted.model.stages[body])))
    assert pairs and all(not torch.allclose(p.running_mean, a.running_mean) for p, a in pairs[:3])

    # the same statistics as one adapt_batchnorm pass over the train images, in order (the definition)
    rows = adapted.split["train"]
    batches = [plain.to_layout(plain.normalize(torch.from_numpy(plain.images[rows[i:i + 128]])))
               for i in range(0, len(rows), 128)]
    adapt_batchnorm(list(plain.model.stages[body]), batches)
    for p, a in pairs:
        assert torch.allclose(p.running_mean, a.running_mean, atol=1e-5)
        assert torch.allclose(p.running_var, a.running_var, atol=1e-5, rtol=1e-4)

    # stored beside the feature cache: a second run loads the file instead of redoing the pass
    (stored,) = Layout(tmp_path / "b").features.glob("*-adabn-*.pt")
    stamp = stored.stat().st_mtime_ns
    again = trainer_for(tmp_path / "b", data, **{"train.freeze.strategy": "head", "train.bn_adapt": True})
    assert stored.stat().st_mtime_ns == stamp
    for a, b in zip(batchnorm_layers(adapted.model.stages), batchnorm_layers(again.model.stages)):
        assert torch.equal(a.running_var, b.running_var)

    # cached features (BatchNorm folded) equal a live forward pass of the adapted prefix
    k = adapted.frozen
    cached = adapted.cache.level(k, ("val",))["val"][0]  # (N, C)
    images = torch.from_numpy(np.asarray(adapted.images[adapted.split["val"]]))
    with torch.no_grad():
        adapted.model.eval()
        x = adapted.to_layout(adapted.normalize(images))
        for stage in adapted.model.stages[:k]:
            x = stage(x)
    assert np.allclose(np.asarray(cached).astype(np.float32), x.numpy(), atol=2e-2, rtol=1e-2)


def test_bn_adapt_is_part_of_the_feature_key():
    args = ("data", "efficientnet_lite0", "default", 3, AugmentParams(), 0, 0)
    assert feature_key(*args, bn_adapt=False) != feature_key(*args, bn_adapt=True)
    assert feature_key(*args) == feature_key(*args, bn_adapt=False)


@pytest.mark.parametrize("momentum", [0.1, 0.03])
def test_bn_momentum_reaches_every_batchnorm_layer(tmp_path, photo_folder, momentum):
    """train.bn_momentum replaces the pretrained weights' own (0.01 for EfficientNet-Lite0), and a training
    step then moves the running statistics of a trainable stage by exactly that fraction."""
    trainer = trainer_for(tmp_path, photo_folder("textures", 10),
                          **{"train.bn_momentum": momentum, "train.freeze.strategy": "none"})
    layers = batchnorm_layers(trainer.model.stages)
    assert layers and {layer.momentum for layer in layers} == {momentum}
    layer = layers[-1]
    seen = {}

    def record_before(module, args):  # returns None: a pre-hook's return value would replace the input
        if "before" not in seen:
            seen["before"] = (module.running_mean.clone(), args[0].detach().float().mean((0, 2, 3)))

    def record_after(module, args, out):
        seen.setdefault("after", module.running_mean.clone())

    pre, post = layer.register_forward_pre_hook(record_before), layer.register_forward_hook(record_after)
    trainer.train_epoch()
    pre.remove()
    post.remove()
    before, batch_mean = seen["before"]
    # the first training batch: running = (1 - m) * running + m * batch mean (PyTorch's update rule)
    assert torch.allclose(seen["after"], (1 - momentum) * before + momentum * batch_mean, atol=1e-4)
