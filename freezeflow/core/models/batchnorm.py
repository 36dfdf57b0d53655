"""BatchNorm statistics re-estimated on the user's images (AdaBN), once, before any feature is cached.

A pretrained backbone's BatchNorm layers normalize with ImageNet's running statistics. On a
domain far from ImageNet (grayscale scans, glyphs on photos) those statistics are off, and a
frozen prefix then feeds the head features that are off too. AdaBN (Li et al. 2016,
arXiv:1603.04779) replaces them by the statistics of the target domain: one forward pass over
the training images with every BatchNorm layer accumulating a plain average (momentum=None) of
its batch statistics. Nothing else changes, so the frozen prefix stays deterministic and its
features can still be cached (their key records that the statistics were adapted).

The adapted buffers are a pure function of (data, backbone, weights), so they are stored next to
the feature cache and every later run and sweep trial loads them instead of redoing the pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from freezeflow.core.io import load_trusted, save_atomic
from freezeflow.core.errors import UserError

BN_TYPES = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    return [m for module in modules for m in module.modules() if isinstance(m, BN_TYPES)]


@torch.no_grad()
def adapt_batchnorm(stages: list[nn.Module], batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the running mean/var of every BatchNorm layer in `stages` from `batches`
    ((B, 3, S, S) normalized images, in a fixed order). Everything but BatchNorm runs in eval mode
    (no dropout or drop-path perturbs the statistics). Returns the number of layers adapted."""
    layers = batchnorm_layers(stages)
    if not layers:
        return 0
    modes = [stage.training for stage in stages]
    momenta = [layer.momentum for layer in layers]
    body = nn.Sequential(*stages).eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over all batches: independent of their order
        layer.train()  # normalize by batch statistics and accumulate them
    try:
        for x in batches:
            body(x)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for stage, mode in zip(stages, modes):
            stage.train(mode)
    return len(layers)


def set_bn_momentum(stages: list[nn.Module], momentum: float) -> int:
    """Set every BatchNorm layer's running-statistics momentum; returns the number of layers.

    Only trainable stages in train mode ever use it (frozen stages run in eval). TF-ported weights
    (EfficientNet-Lite0) ship 0.01: with a few hundred fine-tuning steps their running statistics
    still mostly describe the pretrained weights, so eval-mode accuracy lags train accuracy by up to
    20 points (bench/README.md, "BatchNorm momentum")."""
    layers = batchnorm_layers(stages)
    for layer in layers:
        layer.momentum = momentum
    return len(layers)


def batchnorm_state(stages: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The running statistics of `stages` by position: what an adapted cache file holds."""
    state = {}
    for i, layer in enumerate(batchnorm_layers(stages)):
        state[f"{i}.running_mean"] = layer.running_mean.detach().cpu().clone()
        state[f"{i}.running_var"] = layer.running_var.detach().cpu().clone()
        state[f"{i}.num_batches_tracked"] = layer.num_batches_tracked.detach().cpu().clone()
    return state


@torch.no_grad()
def load_batchnorm_state(stages: list[nn.Module], state: dict[str, torch.Tensor]) -> None:
    layers = batchnorm_layers(stages)
    if len(state) != 3 * len(layers):
        raise ValueError(f"adapted BatchNorm statistics for {len(state) // 3} layers, the model has {len(layers)}")
    for i, layer in enumerate(layers):
        layer.running_mean.copy_(state[f"{i}.running_mean"])
        layer.running_var.copy_(state[f"{i}.running_var"])
        layer.num_batches_tracked.copy_(state[f"{i}.num_batches_tracked"])


def adapt_or_load(stages: list[nn.Module], batches: Iterable[torch.Tensor], path: Path | None) -> bool:
    """Load the adapted statistics from `path`, or adapt now and store them there.
    Returns True when they were computed (not loaded)."""
    if path is not None and path.is_file():
        try:
            load_batchnorm_state(stages, load_trusted(path))
            return False
        except (UserError, ValueError, KeyError, RuntimeError):
            pass  # unreadable or from another architecture: recompute and replace
    adapt_batchnorm(stages, batches)
    if path is not None:
        save_atomic(batchnorm_state(stages), path)
    return True
