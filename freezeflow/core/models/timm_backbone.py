"""`train.backbone=timm/<name>`: any timm CNN with a `group_matcher`, cut into a StagedNet.

The only module of core that imports timm, and only inside functions: core imports without it.

Stages are timm's own coarse parameter groups (`model.group_matcher(coarse=True)`: stem, block
groups, head). The model's top-level modules are walked in registration order; each joins the group
its parameters belong to, a module whose parameters span groups is split into its children, and a
parameter-free module (activation, pooling) joins the group before it, or the head once the last
block group is done. So the head is, as for every freezeflow backbone, "everything after the last
conv stage" ending in the final nn.Linear; a 1x1 conv that timm groups with the last blocks
(efficientnet's conv_head, MATCH_PREV) stays in the last conv stage, one that timm groups with the
classifier (mobilenetv3's conv_head, run after pooling) is in the head. Registration order is not
guaranteed to be forward order, so every build checks the staged forward against timm's own.

Weights: `default` is timm's pretrained download (the Hugging Face cache first), `none` random
init, a path a local .pth / .safetensors state dict, either in timm's key names (loaded by timm,
strictly; a head of another size is replaced by a fresh one) or in StagedNet's (`stages.<i>. ...`,
a fine-tuned freezeflow model, loaded as for every backbone by core.models.weights).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from freezeflow.core.backbone_names import TIMM_PREFIX
from freezeflow.core.errors import UserError, first_line
from freezeflow.core.models.staged import StagedNet, stage_names_for
from freezeflow.core.models.weights import load_staged_state

TIMM_PIN = "timm==1.0.31"
PARITY_SIZE = 64  # side of the random images of the build-time parity check (at least the model's minimum)
PARITY_ATOL = 1e-4  # times max(1, largest logit): the staged forward must equal timm's up to float noise
READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)


class CutError(Exception):
    """Why a timm model cannot be cut into a sequential StagedNet (becomes one UserError line)."""


@dataclass(frozen=True)
class TimmInfo:
    """What timm's pretrained_cfg says about feeding `name`, read without building the model."""

    mean: tuple[float, float, float]  # per RGB channel, for inputs scaled to [0, 1]
    std: tuple[float, float, float]
    interpolation: str  # resize filter of the weights' training recipe: bilinear, bicubic
    min_size: int  # pretrained_cfg's min_input_size side, 0 when it has none
    fixed_size: int  # input side a fixed-size model needs (a transformer's), 0 when any side works


@dataclass(frozen=True)
class TimmWeights:
    """core.models.weights' WeightsSource for timm/<name>: timm resolves and loads its weights itself
    (build_timm_backbone), so nothing here is ever asked for a state dict."""

    name: str

    def resolve(self, spec: str):
        return None

    def names(self) -> list[str]:
        return []

    def to_staged_keys(self, model, original, state, source):
        return state


def import_timm(name: str):
    """timm, or a one-line UserError saying how to install it."""
    try:
        import timm
    except ImportError as exc:
        raise UserError(f"train.backbone={name} needs timm: pip install {TIMM_PIN}") from exc
    return timm


def resolve_model_name(name: str) -> str:
    """ "timm/resnet18" -> "resnet18", checked against timm's registry."""
    timm = import_timm(name)
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        family = re.match(r"[A-Za-z]*", arch).group()  # "resnet_nope" -> "resnet": what to list
        raise UserError(f"train.backbone={name}: timm has no model {arch!r}; see timm.list_models('{family}*')")
    return arch


@lru_cache(maxsize=None)
def describe_timm(name: str) -> TimmInfo:
    """Normalization and input sizes from timm's pretrained_cfg registry (no model is built)."""
    arch = resolve_model_name(name)
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError as exc:  # a known architecture with an unknown .tag
        raise UserError(f"train.backbone={name}: {first_line(exc)}") from exc
    if cfg is None:  # an architecture without registered weights: timm's defaults
        from timm.models import PretrainedCfg
        cfg = PretrainedCfg()
    min_size = cfg.min_input_size[-1] if cfg.min_input_size else 0
    fixed = cfg.input_size[-1] if cfg.fixed_input_size else 0
    return TimmInfo(tuple(cfg.mean), tuple(cfg.std), cfg.interpolation, min_size, fixed)


def build_timm_backbone(name: str, weights: str, num_classes: int | None, min_size: int) -> StagedNet:
    """timm/<name> as a StagedNet, its forward checked against timm's on random (2, 3, S, S) images.

    num_classes=None keeps the weights' classifier (1000 classes for default and none); an int gives
    a fresh head with that many outputs."""
    arch = resolve_model_name(name)
    model, staged_file = create_with_weights(name, arch, weights, num_classes)
    try:
        stages, feature_dim = cut_stages(model)
        staged = StagedNet(name, stages, stage_names_for(len(stages) - 2), feature_dim)
        info = describe_timm(name)
        check_parity(model, staged, info.fixed_size or max(PARITY_SIZE, min_size))
    except CutError as exc:
        raise UserError(f"{name}: its stages cannot be cut into a sequential StagedNet ({exc})") from exc
    if staged_file is not None:  # a file in StagedNet's own key names (a freezeflow model.pt, a fine-tuned net)
        path, state = staged_file
        load_staged_state(staged, state, str(path), num_classes)
    return staged.train()


# --- weights ------------------------------------------------------------------------------------------------

def create_with_weights(name: str, arch: str, weights: str,
                        num_classes: int | None) -> tuple[nn.Module, tuple | None]:
    """timm.create_model with the `weights` spec: default, none or a state-dict file. A file in
    StagedNet's key names (`stages.<i>. ...`) comes back as (path, state), loaded once the model is cut."""
    timm = import_timm(name)
    spec = str(weights).strip()
    if spec.lower() in ("none", "default"):
        return call_create_model(timm, name, arch, num_classes, pretrained=spec.lower() == "default"), None
    if not any(c in spec for c in "/\\.") and not Path(spec).exists():
        raise UserError(f"train.weights: unknown weights {spec!r} for {name}; "
                        "allowed: default, none, a .pth or .safetensors path")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"train.weights: weights file not found: {path}")
    state = read_timm_state(name, path)
    if any(key.startswith("stages.") for key in state):
        return call_create_model(timm, name, arch, num_classes, pretrained=False), (path, state)
    return create_from_file(timm, name, arch, path, state, num_classes), None


def create_from_file(timm, name: str, arch: str, path: Path, state: dict, num_classes: int | None) -> nn.Module:
    """Load a local state dict in timm's key names with timm's loader, strictly: built with the file's
    own head size, so timm loads every key (its classifier too), then given a fresh head if asked."""
    file_classes = count_head_classes(arch, state)
    # a headless file: timm sees a head size that differs (-1), drops the classifier and loads unstrictly
    overlay = {"file": str(path), "num_classes": -1 if file_classes is None else file_classes}
    classes = num_classes if file_classes is None else file_classes
    model = call_create_model(timm, name, arch, classes, pretrained=True, pretrained_cfg_overlay=overlay,
                              source=path)
    if file_classes is None:
        check_body_loaded(model, name, path, state)
    elif num_classes is not None and num_classes != file_classes:
        model.reset_classifier(num_classes)
    return model


def count_head_classes(arch: str, state: dict) -> int | None:
    """Output count of the state dict's classifier (timm's pretrained_cfg names its key), None if it has none."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    keys = cfg.classifier if cfg is not None else None
    for key in (keys,) if isinstance(keys, str) else tuple(keys or ()):
        weight = state.get(f"{key}.weight")
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            return int(weight.shape[0])
    return None


def read_timm_state(name: str, path: Path) -> dict:
    """The file's state dict by timm's own reader: .safetensors or torch.load(weights_only), EMA and
    "module." prefixes unwrapped; a file it cannot read is a one-line UserError."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError besides READ_ERRORS
        if not isinstance(exc, READ_ERRORS) and type(exc).__name__ != "SafetensorError":
            raise
        raise UserError(f"train.weights: cannot read {path} as a state dict for {name}: {first_line(exc)}") from exc


def check_body_loaded(model: nn.Module, name: str, path: Path, state: dict) -> None:
    """timm loads a headless file unstrictly: require every non-classifier key of the model in it."""
    head = {id(t) for t in model.get_classifier().state_dict(keep_vars=True).values()}
    missing = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) not in head and k not in state]
    if missing:
        raise UserError(f"train.weights: {path} does not fit {name}: {len(missing)} missing keys {missing[:3]}")


def call_create_model(timm, name: str, arch: str, num_classes: int | None, pretrained: bool,
                      pretrained_cfg_overlay: dict | None = None, source: Path | None = None) -> nn.Module:
    """timm.create_model; its errors (a bad tag, a download that failed, a file that does not fit) as one line."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if pretrained_cfg_overlay:
        kwargs["pretrained_cfg_overlay"] = pretrained_cfg_overlay
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        if source is not None:
            lines = [ln.strip() for ln in str(exc).splitlines()
                     if "size mismatch" in ln or "Missing key" in ln or "Unexpected key" in ln]
            reason = (lines[0][:200] if lines else first_line(exc))
            raise UserError(f"train.weights: {source} does not fit {name}: {reason}") from exc
        if pretrained:
            raise UserError(f"{name} default weights could not be loaded ({first_line(exc)}); "
                            "pass -S train.weights=/path/to/file.safetensors (or .pth)") from exc
        raise UserError(f"train.backbone={name}: timm cannot build it: {first_line(exc)}") from exc


# --- cutting --------------------------------------------------------------------------------------------------

def cut_stages(model: nn.Module) -> tuple[list[nn.Module], int]:
    """(stages stem..head, feature_dim) sharing `model`'s modules; the head ends in its final nn.Linear."""
    group_of = map_parameter_groups(model)
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise CutError(f"its classifier is a {type(classifier).__name__}, not an nn.Linear")
    head = group_of[id(classifier.weight)]
    if head != max(group_of.values()):
        raise CutError("the classifier is not in the last parameter group")
    placed = place_modules(model, group_of, head)
    groups: dict[int, list[nn.Module]] = {}
    for group, module in placed:
        groups.setdefault(group, []).append(module)
    body = [nn.Sequential(*mods) if len(mods) > 1 else mods[0] for g, mods in groups.items() if g != head]
    head_modules = flatten_head(groups[head], classifier)
    if head_modules[-1] is not classifier:
        raise CutError(f"{type(head_modules[-1]).__name__} runs after the classifier: it is not the final nn.Linear")
    if getattr(model, "drop_rate", 0) and not any(isinstance(m, nn.Dropout) for m in head_modules):
        # timm applies this dropout functionally in forward_head: make it a module so train mode matches
        head_modules.insert(len(head_modules) - 1, nn.Dropout(p=float(model.drop_rate)))
    if len(body) < 2:
        raise CutError(f"{len(body) + 1} parameter groups; a StagedNet needs stem, >= 1 block group and head")
    return [*body, nn.Sequential(*head_modules)], classifier.in_features


def map_parameter_groups(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> timm's coarse group index (0 = stem, last = head)."""
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        raise CutError(f"{type(model).__name__} has no group_matcher")
    from timm.models._manipulate import group_parameters

    try:
        by_name = group_parameters(model, matcher(coarse=True), reverse=True)  # parameter name -> group
    except (NotImplementedError, TypeError, AttributeError) as exc:
        raise CutError(f"its group_matcher fails: {first_line(exc)}") from exc
    params = dict(model.named_parameters())
    if len(set(by_name.values())) < 3:
        raise CutError(f"group_matcher gives {len(set(by_name.values()))} groups; a StagedNet needs stem, "
                       ">= 1 block group and head")
    return {id(params[n]): g for n, g in by_name.items()}


def place_modules(model: nn.Module, group_of: dict[int, int], head: int) -> list[tuple[int, nn.Module]]:
    """(group, module) in registration order, groups non-decreasing: modules split where their
    parameters span groups, parameter-free ones (act, pool) given the group before them, or the
    head's once no block-group module follows. nn.Identity modules are left out."""
    own = [n for n, _ in model.named_parameters(recurse=False)]
    if own:
        raise CutError(f"parameters {', '.join(own[:3])} belong to the model itself, not to a layer "
                       "(a transformer's tokens or embeddings: not a CNN)")
    found: list[tuple[int | None, str, nn.Module]] = []
    for child_name, child in model.named_children():
        split_module(child_name, child, group_of, found)
    last_body = max((i for i, (g, _, _) in enumerate(found) if g is not None and g != head), default=-1)
    placed, current = [], 0
    for i, (group, module_name, module) in enumerate(found):
        if group is None:
            group = head if i > last_body else current
        if group < current:
            raise CutError(f"{module_name} (group {group}) is registered after group {current}: "
                           "registration order is not forward order")
        current = group
        if not isinstance(module, nn.Identity):
            placed.append((group, module))
    return placed


def split_module(name: str, module: nn.Module, group_of: dict[int, int],
                 found: list[tuple[int | None, str, nn.Module]]) -> None:
    """Append (group or None, name, module), or recurse into its children when its parameters span groups."""
    groups = {group_of[id(p)] for p in module.parameters()}
    if len(groups) <= 1:
        found.append((groups.pop() if groups else None, name, module))
        return
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own or not list(module.children()):
        raise CutError(f"{name} holds parameters of groups {sorted(groups)} itself")
    for child_name, child in module.named_children():
        split_module(f"{name}.{child_name}", child, group_of, found)


def flatten_head(modules: list[nn.Module], classifier: nn.Linear) -> list[nn.Module]:
    """The head's modules with the one holding the classifier opened up (timm's ClassifierHead,
    NormMlpClassifierHead: pool, norm, flatten, drop, fc), nn.Identity left out; classifier last."""
    out: list[nn.Module] = []
    for module in modules:
        if module is not classifier and any(m is classifier for m in module.modules()):
            out += flatten_head(list(module.children()), classifier)
        elif not isinstance(module, nn.Identity):
            out.append(module)
    return out


@torch.no_grad()
def check_parity(model: nn.Module, staged: StagedNet, size: int) -> None:
    """Eval mode: the staged forward of random (2, 3, size, size) images equals timm's model(x);
    every stage but the head outputs a 4-D (B, C, H, W) feature map. The global RNG is not touched."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model.eval()
    staged.eval()  # the head's added nn.Dropout is not one of model's modules
    try:
        expected = model(x)
    except RuntimeError as exc:
        model.train()
        raise CutError(f"timm's own forward fails at {size}x{size} px: {first_line(exc)}") from exc
    try:
        h = x
        for i, stage in enumerate(staged.stages[:-1]):
            h = stage(h)
            if h.dim() != 4:
                raise CutError(f"{staged.stage_names[i]} outputs a {h.dim()}-D tensor {tuple(h.shape)}, "
                               "not a (B, C, H, W) feature map: not a CNN")
        got = staged.stages[-1](h)
    except RuntimeError as exc:
        raise CutError(f"the staged forward fails at {size}x{size} px: {first_line(exc)}") from exc
    finally:
        model.train()
        staged.train()
    if got.shape != expected.shape:
        raise CutError(f"staged output {tuple(got.shape)} != timm's {tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not diff <= PARITY_ATOL * max(1.0, float(expected.abs().max())):
        raise CutError(f"the staged forward differs from timm's by {diff:.3g}")
