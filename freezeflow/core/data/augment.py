"""Augmentation on tensors, batched, on whatever device the batch lives on.

One random affine per image does random-resized-crop, horizontal flip and rotation in a single
`grid_sample`: no PIL, no per-image Python work, so it runs on the GPU when there is one. Measured on
one CPU thread at 64 px (bench/README.md): `F.affine_grid` cost as much as the sampling (a (H*W, 3) x
(3, 2) matmul per image), so the grid is built by broadcasting; reflection padding cost twice zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from freezeflow.core.params import AugmentParams

# 2: zeros padding and the broadcast grid. Part of each cached augmented view's id (feature_store.view_ids),
# so views computed by an earlier version are never read as this one's
AUGMENT_VERSION = 2


def sample_affine(n: int, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine matrices mapping output to input coordinates in [-1, 1]."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    area = uniform(params.crop_scale, 1.0)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width as a fraction of the image
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = uniform(-1.0, 1.0) * (1 - sx)  # keep the crop inside the image
    ty = uniform(-1.0, 1.0) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if params.flip else torch.ones(n)
    angle = uniform(-params.rotate, params.rotate) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos * sx * flip, -sin * sy, tx], dim=1),
        torch.stack([sin * sx * flip, cos * sy, ty], dim=1),
    ], dim=1)
    return theta


def augment_batch(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """x: (B, C, H, W) float -> augmented (B, C, H, W). The generator lives on the CPU (reproducible)."""
    return warp_batch(x, sample_affine(x.shape[0], params, generator))


def augment_seeded(x: torch.Tensor, params: AugmentParams, seeds: list[int]) -> torch.Tensor:
    """Like augment_batch, but image i's transform comes from its own seed: the same image gets the
    same view in any batch (what a per-image feature cache needs)."""
    theta = torch.cat([sample_affine(1, params, torch.Generator().manual_seed(s)) for s in seeds])
    return warp_batch(x, theta)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, C, H, W), align_corners=False) by broadcasting: (B, H, W, 2) sampling points."""
    xs = (torch.arange(width, dtype=theta.dtype, device=theta.device) * 2 + 1) / width - 1  # (W,) pixel centres
    ys = (torch.arange(height, dtype=theta.dtype, device=theta.device) * 2 + 1) / height - 1  # (H,)
    grid = torch.empty(theta.shape[0], height, width, 2, dtype=theta.dtype, device=theta.device)
    for axis in (0, 1):  # x then y: row `axis` of theta applied to (x, y, 1)
        a, b, c = (theta[:, axis, k].view(-1, 1, 1) for k in range(3))
        torch.add(a * xs.view(1, 1, -1), b * ys.view(1, -1, 1) + c, out=grid[..., axis])
    return grid


def warp_batch(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """One grid_sample of x (B, C, H, W) through the affine matrices theta (B, 2, 3). Points outside the
    image (rotated corners) read 0, the mean colour once normalized."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = affine_grid(theta, x.shape[2], x.shape[3])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
