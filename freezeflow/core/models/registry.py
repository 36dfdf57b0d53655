"""Backbone registry: one declarative `BackboneSpec` per backbone (how to build its stages, its input
normalization, its smallest input, where its weights come from) and `build_backbone`.

Every backbone becomes a `StagedNet` whose last stage, the head, is "everything after the
last conv stage": global average pool + flatten (+ what the original classifier had before
its final Linear: convnext's LayerNorm, mobilenet_v3's Linear+Hardswish+Dropout, dropout
for efficientnet) + the final Linear. The 1x1 conv that some nets run before pooling
(efficientnet's 320->1280, mobilenet_v3's last conv) is part of the last conv stage.
Weights specs are described in core.models.weights. `timm/<name>` backbones are built by
core.models.timm_backbone (timm's own parameter groups as stages, its pretrained_cfg for
normalization); their specs are made on first use, not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

from torch import nn

from freezeflow.core.backbone_names import BACKBONE_NAMES, TIMM_SHOWN, is_timm_name
from freezeflow.core.errors import UserError
from freezeflow.core.models import efficientnet_lite, timm_backbone
from freezeflow.core.models.staged import StagedNet, stage_names_for
from freezeflow.core.models.weights import (Lite0Weights, TorchvisionWeights, WeightsSource, load_staged_state,
                                            read_weights)

Rgb = tuple[float, float, float]
IMAGENET_MEAN: Rgb = (0.485, 0.456, 0.406)
IMAGENET_STD: Rgb = (0.229, 0.224, 0.225)
# All backbones downsample by 32; convnext's unpadded strided convs fail below 32 px.
MIN_IMAGE_SIZE = 32
Split = Callable[[nn.Module], tuple[list[nn.Module], list[str]]]  # torchvision model -> (stages, stage names)


@dataclass(frozen=True)
class StagedParts:
    """What a builder returns: randomly initialised stages and, for torchvision nets, the model they came from."""

    stages: list[nn.Module]
    stage_names: list[str]
    feature_dim: int  # input width of the head's final Linear
    original: nn.Module | None = None  # shares the stages' modules: maps its state-dict names to StagedNet's


@dataclass(frozen=True)
class BackboneSpec:
    """Everything freezeflow knows about one backbone."""

    name: str
    build: Callable[[], StagedParts]  # architecture only, random init
    weights: WeightsSource  # how "default" and named weights resolve, how file keys are renamed
    mean: Rgb = IMAGENET_MEAN  # per RGB channel, for inputs scaled to [0, 1]
    std: Rgb = IMAGENET_STD
    min_image_size: int = MIN_IMAGE_SIZE  # smallest input side (the last stage is then 1x1)
    # resize filter of the weights' training recipe where known (timm's pretrained_cfg: bilinear, bicubic);
    # informational: prepare resizes every backbone's images the same way (core.data.images)
    interpolation: str | None = None


def split_resnet(net: nn.Module) -> tuple[list[nn.Module], list[str]]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)  # (B, 64, H/4, W/4)
    head = nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)
    stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4, head]
    return stages, ["stem", "stage1", "stage2", "stage3", "stage4", "head"]


def split_efficientnet(net: nn.Module) -> tuple[list[nn.Module], list[str]]:
    features = list(net.features)  # [stem, 7 MBConv stages, 1x1 conv 320->1280]
    body = features[1:-2] + [nn.Sequential(*features[-2], features[-1])]
    head = nn.Sequential(net.avgpool, nn.Flatten(1), *net.classifier)  # dropout, Linear
    return [features[0], *body, head], stage_names_for(len(body))


def split_mobilenet(net: nn.Module, groups: tuple[tuple[int, ...], ...]) -> tuple[list[nn.Module], list[str]]:
    """groups: torchvision features[] indices per stage, grouped by output width (the nets' own stages)."""
    body = [nn.Sequential(*(net.features[i] for i in group)) for group in groups]
    head = nn.Sequential(net.avgpool, nn.Flatten(1), *net.classifier)  # Linear, Hardswish, Dropout, Linear
    return [net.features[0], *body, head], stage_names_for(len(body))


def split_convnext(net: nn.Module) -> tuple[list[nn.Module], list[str]]:
    features = net.features  # [stem, stage, down, stage, down, stage, down, stage]
    body = [features[1]] + [nn.Sequential(features[i], features[i + 1]) for i in (2, 4, 6)]
    head = nn.Sequential(net.avgpool, *net.classifier)  # LayerNorm2d, Flatten, Linear
    return [features[0], *body, head], stage_names_for(len(body))


def build_torchvision(name: str, split: Split) -> StagedParts:
    import torchvision  # here, not at import: its ops pull in torch._dynamo (~2 s), and lite0 and timm need none

    net = torchvision.models.get_model(name, weights=None)
    stages, names = split(net)
    return StagedParts(stages, names, stages[-1][-1].in_features, net)


def build_lite0() -> StagedParts:
    return StagedParts(*efficientnet_lite.build_lite0_stages())


def torchvision_spec(name: str, split: Split) -> BackboneSpec:
    return BackboneSpec(name, partial(build_torchvision, name, split), TorchvisionWeights(name))


BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("efficientnet_lite0", build_lite0, Lite0Weights(), efficientnet_lite.LITE_MEAN,
                 efficientnet_lite.LITE_STD),
    torchvision_spec("resnet18", split_resnet),
    torchvision_spec("resnet34", split_resnet),
    torchvision_spec("resnet50", split_resnet),
    torchvision_spec("resnet101", split_resnet),
    torchvision_spec("mobilenet_v3_small", partial(split_mobilenet,
                                                   groups=((1,), (2, 3), (4, 5, 6), (7, 8), (9, 10, 11, 12)))),
    torchvision_spec("mobilenet_v3_large", partial(split_mobilenet, groups=(
        (1,), (2, 3), (4, 5, 6), (7, 8, 9, 10), (11, 12), (13, 14, 15, 16)))),
    torchvision_spec("efficientnet_b0", split_efficientnet),
    torchvision_spec("convnext_tiny", split_convnext),
)}
if tuple(BACKBONES) != BACKBONE_NAMES:  # params validates against BACKBONE_NAMES: the two must agree
    raise ImportError(f"core.models.registry backbones {list(BACKBONES)} differ from core.backbone_names")


def get_backbone(name: str) -> BackboneSpec:
    """The spec of `name`; UserError naming the allowed backbones otherwise."""
    if is_timm_name(name):
        return timm_spec(name)
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}, or {TIMM_SHOWN}")
    return BACKBONES[name]


@lru_cache(maxsize=None)
def timm_spec(name: str) -> BackboneSpec:
    """timm/<name>'s spec from timm's pretrained_cfg (no model built); at least MIN_IMAGE_SIZE px."""
    info = timm_backbone.describe_timm(name)
    return BackboneSpec(name, partial(build_timm_parts, name), timm_backbone.TimmWeights(name), info.mean,
                        info.std, max(MIN_IMAGE_SIZE, info.min_size, info.fixed_size), info.interpolation)


def build_timm_parts(name: str) -> StagedParts:
    model = build_backbone(name, weights="none")
    return StagedParts(list(model.stages), model.stage_names, model.feature_dim)


def normalization(name: str) -> tuple[Rgb, Rgb]:
    """(mean, std) per RGB channel for inputs already scaled to [0, 1]."""
    spec = get_backbone(name)
    return spec.mean, spec.std


def min_image_size(name: str) -> int:
    """Smallest input side the backbone accepts (the last stage is then 1x1)."""
    return get_backbone(name).min_image_size


def build_backbone(name: str, weights: str = "default", num_classes: int | None = None) -> StagedNet:
    """Build `name` as a StagedNet with the requested weights.

    num_classes=None keeps the weights' own classifier (1000 ImageNet classes for "default");
    an int replaces the head's final Linear by a fresh Linear(feature_dim, num_classes).
    """
    spec = get_backbone(name)
    if num_classes is not None and num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes}")
    if is_timm_name(name):  # timm resolves and loads its own weights
        return timm_backbone.build_timm_backbone(name, weights, num_classes, spec.min_image_size)
    parts = spec.build()
    model = StagedNet(name, parts.stages, parts.stage_names, parts.feature_dim)
    state, source = read_weights(name, spec.weights, weights)
    if state is not None:
        state = spec.weights.to_staged_keys(model, parts.original, state, source)
        load_staged_state(model, state, source, num_classes)
    if num_classes is not None:
        model.stages[-1][-1] = nn.Linear(model.feature_dim, num_classes)
    return model
