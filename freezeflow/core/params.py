"""Params: one frozen dataclass per file under params/, built from YAML with unknown keys rejected.

`load_params(params_dir, ["train.lr=0.01"])` reads data.yaml, train.yaml, tune.yaml, evaluate.yaml and
serve.yaml, applies `-S file.key=value` overrides and validates every value. Every failure is a ParamsError
naming the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from freezeflow.core.backbone_names import BACKBONE_NAMES, TIMM_SHOWN, is_timm_name  # the registry's, torch-free
from freezeflow.core.errors import ParamsError
from freezeflow.core.io import write_text_atomic
from freezeflow.core.schedules import SCHEDULES as SCHEDULE_TABLE
from freezeflow.core.strategies import STRATEGIES as STRATEGY_TABLE

STRATEGIES = tuple(STRATEGY_TABLE)  # names, in the tables' order (freezeflow.core.strategies, .schedules)
SCHEDULES = tuple(SCHEDULE_TABLE)
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class OpenChoice:
    """Values a `choice` field allows besides its listed choices, by pattern (train.backbone's timm/<name>)."""

    accepts: Callable[[Any], bool]
    shown: str  # how the one-line error writes it after the listed choices


def choice(default: Any, choices: tuple, doc: str = "", also: OpenChoice | None = None) -> Any:
    meta = {"choices": choices, "doc": doc} | ({"also": also} if also else {})
    return field(default=default, metadata=meta)


def bounded(default: Any, lo: float | None = None, hi: float | None = None, doc: str = "",
            lo_open: bool = False) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi, "lo_open": lo_open, "doc": doc})


def documented(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


def auto_or_bounded(default: Any, lo: float, hi: float, doc: str) -> Any:
    """A number in (lo, hi], or the string `auto` (resolved at run time)."""
    return field(default=default, metadata={"min": lo, "max": hi, "lo_open": True, "doc": doc, "auto": True})


@dataclass(frozen=True)
class SplitParams:
    val: float = bounded(0.15, 0.0, 0.5, "fraction of each class held out for validation", lo_open=True)
    test: float = bounded(0.15, 0.0, 0.5, "fraction of each class held out for the final test", lo_open=True)
    seed: int = bounded(0, 0, None, "seed of the split, which hashes each file's bytes (see README: Data)")


@dataclass(frozen=True)
class DataParams:
    dir: str = documented("data/digits", "dataset folder in ImageFolder layout (one subfolder per class)")
    image_size: int = bounded(64, 16, 1024, "side in pixels images are resized to, once, by prepare")
    split: SplitParams = field(default_factory=SplitParams)
    max_pixels: int = bounded(40_000_000, 1, None, "larger images are rejected as decompression bombs")
    min_side: int = bounded(16, 1, None, "images with a smaller side are rejected as too small")
    imbalance_warn: float = bounded(10.0, 1.0, None, "warn when largest/smallest class exceeds this")


@dataclass(frozen=True)
class FreezeParams:
    strategy: str = choice("head", STRATEGIES, "which stages train (see README: Freezing)")
    until: int = bounded(3, 0, None, "`until`: stages 0..until-1 are frozen")
    head_epochs: int = bounded(1, 0, None, "`gradual`: epochs with only the head training")
    every: int = bounded(1, 1, None, "`gradual`: epochs between unfreezing one more stage")
    lr_decay: float = bounded(0.75, 0.0, 1.0, "`gradual`: lr factor per stage below the top", lo_open=True)
    t0: float = bounded(0.5, 0.0, 1.0, "`freezeout`: stage i freezes at (t0 + (1 - t0) i / L)^3 of training; 0.5 "
                        "took 0.61x of `none`'s time at equal val accuracy, the paper's 0.8 0.85x (bench freezeout)",
                        lo_open=True)
    scale_lr: bool = documented(False, "`freezeout`: start stage i at lr / t_i (the paper's scaled variant; "
                                       "off by default: more accurate with AdamW in bench/)")


@dataclass(frozen=True)
class AugmentParams:
    enabled: bool = documented(False, "augment training images (on tensors, on the GPU if any)")
    crop_scale: float = bounded(0.7, 0.05, 1.0, "random resized crop: smallest area fraction")
    flip: bool = documented(True, "random horizontal flip")
    rotate: float = bounded(10.0, 0.0, 180.0, "random rotation, at most this many degrees")


@dataclass(frozen=True)
class CacheParams:
    max_gb: float = bounded(20.0, 0.0, None, "disk budget of cache/features in GB: past it the least recently "
                            "used entries are pruned (0 = unbounded; see `freezeflow cache`)")


@dataclass(frozen=True)
class LrFindParams:
    start: float = bounded(1e-7, 0.0, 10.0, "lr finder: first lr of the range test", lo_open=True)
    end: float = bounded(1.0, 0.0, 10.0, "lr finder: last lr of the range test", lo_open=True)
    steps: int = bounded(100, 10, 10_000, "lr finder: steps (one batch each) from start to end")

    def __post_init__(self) -> None:
        if self.start >= self.end:
            raise ParamsError("params/train.yaml", "lr_find.start",
                              f"{self.start} >= end {self.end}; allowed: start < end")


@dataclass(frozen=True)
class TrainParams:
    backbone: str = choice("efficientnet_lite0", BACKBONE_NAMES, "pretrained backbone",
                           also=OpenChoice(is_timm_name, TIMM_SHOWN))
    weights: str = documented("default", "`default` (ImageNet), `none`, a torchvision enum name or a .pth file")
    epochs: int = bounded(10, 1, 10_000, "training epochs")
    batch_size: int = bounded(64, 1, 65_536, "images per step")
    lr: float | str = auto_or_bounded(0.01, 0.0, 10.0, "peak learning rate of the head; `auto`: the lr "
                                      "finder's suggestion (see `freezeflow lr-find`)")
    body_lr_factor: float = bounded(0.3, 0.0, 1.0, "lr of the top trainable body stage relative to the head's "
                                    "(discriminative lrs; see README: Freezing)", lo_open=True)
    lr_decay: float = bounded(0.75, 0.0, 1.0, "further lr factor per body stage below the top one "
                              "(`gradual` uses freeze.lr_decay)", lo_open=True)
    bn: str = choice("train", ("train", "frozen"), "BatchNorm of trainable stages: `train` (batch statistics) or "
                     "`frozen` (running statistics kept, affine params still learn)")
    bn_adapt: bool = documented(False, "re-estimate BatchNorm statistics on the training images once before "
                                       "training (AdaBN); the feature cache stays valid")
    bn_momentum: float = bounded(0.1, 0.0, 1.0, "momentum of the BatchNorm running statistics (PyTorch's default); "
                                 "EfficientNet-Lite0 ships 0.01, whose statistics lag behind fine-tuned weights",
                                 lo_open=True)
    guard_epochs: int = bounded(2, 0, None, "divergence guard: report val accuracy at chance after this many "
                                "epochs (0 = off; NaN/inf loss always stops)")
    lr_find: LrFindParams = field(default_factory=LrFindParams)
    optimizer: str = choice("adamw", OPTIMIZERS, "optimizer over trainable params only")
    momentum: float = bounded(0.9, 0.0, 1.0, "SGD momentum")
    weight_decay: float = bounded(0.0001, 0.0, 1.0, "decoupled weight decay")
    schedule: str = choice("cosine", SCHEDULES, "learning-rate schedule")
    warmup_epochs: float = bounded(0.0, 0.0, None, "linear warmup before the schedule")
    step_size: int = bounded(3, 1, None, "`step`: epochs between lr drops")
    gamma: float = bounded(0.1, 0.0, 1.0, "`step`/`exponential`: lr factor", lo_open=True)
    plateau_patience: int = bounded(2, 0, None, "`plateau`: epochs without improvement")
    plateau_factor: float = bounded(0.5, 0.0, 1.0, "`plateau`: lr factor", lo_open=True)
    label_smoothing: float = bounded(0.0, 0.0, 0.5, "cross-entropy label smoothing")
    grad_clip: float = bounded(0.0, 0.0, None, "max gradient norm, 0 = off")
    early_stopping: int = bounded(0, 0, None, "stop after this many epochs without val gain, 0 = off")
    seed: int = bounded(0, 0, None, "seed of init, shuffling and augmentation")
    device: str = documented("auto", "`auto`, `cpu`, `cuda` or `cuda:N`")
    amp: str = choice("auto", ("auto", "off", "bf16", "fp16"), "mixed precision (GPU only)")
    channels_last: bool = documented(True, "channels_last memory format (faster convolutions on GPU and CPU)")
    compile: bool = documented(False, "torch.compile the trainable part")
    cache_features: str = choice("auto", ("auto", "on", "off"), "cache the frozen prefix's output")
    augment_views: int = bounded(0, 0, 64, "augmented views per image in the feature cache")
    feature_memory_mb: int = bounded(2048, 0, None, "FreezeOut features past this are memory-mapped (stored ones always are)")
    cache: CacheParams = field(default_factory=CacheParams)
    freeze: FreezeParams = field(default_factory=FreezeParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    use_best: bool = documented(False, "overlay params/best.yaml (written by tune) on these params")


POWERS_OF_TWO = tuple(2 ** k for k in range(17))  # 1 .. 65536: the batch sizes a sweep may try
LR_SCALINGS = ("none", "linear", "sqrt")


class AnyOf(tuple):
    """Allowed items of a list-valued param, used as its `choices` metadata: `[a, b] in AnyOf(...)`
    holds for a non-empty list of distinct allowed items (same type: 16.0 is not the batch size 16),
    so `check_value` rejects anything else with the usual one-line error and `iter_docs` lists them."""

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, list) or not value:
            return False
        if not all(any(type(v) is type(a) and v == a for a in self) for v in value):
            return False
        return len(set(value)) == len(value)


def subset(default: tuple, allowed: tuple, doc: str) -> Any:
    """A list-valued param: a non-empty YAML list of distinct items of `allowed`."""
    shown = ", ".join(map(str, default))
    return field(default_factory=lambda: list(default),
                 metadata={"choices": AnyOf(allowed), "doc": f"{doc} (default: [{shown}])"})


TUNE_FILE = "params/tune.yaml"  # what range errors name (as every tune.yaml check has)


def check_order(low: Any, high: Any, key: str) -> None:
    """`low <= high` for a search-space range; `key` (space.KEY) names it in the error."""
    if low > high:
        raise ParamsError(TUNE_FILE, key, f"low {low} > high {high}; allowed: low <= high")


class OrderedSpace:
    """A search-space dimension with low, high and keys of its own (enabled, ...); KEY names it."""

    KEY = ""

    def __post_init__(self) -> None:
        check_order(getattr(self, "low"), getattr(self, "high"), f"space.{self.KEY}")


@dataclass(frozen=True)
class Range:
    """low..high of a dimension a sweep samples with some schedules only (space.schedule.KEY).
    What each end allows and means is the field's (`ranged`); `build` checks it, then low <= high."""

    low: float  # an int for integer keys (step_size, plateau_patience)
    high: float


def ranged(low: Any, high: Any, kind: type, lo: float | None, hi: float | None, docs: tuple[str, str],
           lo_open: bool = False) -> Any:
    """A Range-valued param defaulting to low..high; each end an int or float `kind` within lo..hi."""
    ends = {end: {"min": lo, "max": hi, "lo_open": lo_open, "doc": doc} for end, doc in zip(("low", "high"), docs)}
    return field(default_factory=lambda: Range(low, high), metadata={"range": ends, "kind": kind})


@dataclass(frozen=True)
class BatchSizeSpace:
    enabled: bool = documented(True, "tune the batch size (off: train.yaml's batch_size)")
    choices: list[int] | None = subset((16, 32, 64, 128), POWERS_OF_TWO,
                                       "batch sizes to try; those above the train split's size are dropped")


@dataclass(frozen=True)
class LrSpace(OrderedSpace):
    KEY = "lr"
    enabled: bool = documented(True, "tune the peak learning rate, log-uniform (off: train.yaml's lr)")
    low: float = bounded(0.0001, 0.0, 10.0, "smallest lr", lo_open=True)
    high: float = bounded(0.1, 0.0, 10.0, "largest lr", lo_open=True)
    around_finder: bool = documented(False, "centre the range on the lr finder's suggestion s (run once per "
                                            "study): [s / span, s * span] instead of low..high")
    span: float = bounded(10.0, 1.0, 1000.0, "`around_finder`: factor below and above the suggestion", lo_open=True)


@dataclass(frozen=True)
class WeightDecaySpace(OrderedSpace):
    KEY = "weight_decay"
    enabled: bool = documented(False, "tune weight decay, log-uniform (off: train.yaml's weight_decay)")
    low: float = bounded(0.000001, 0.0, 1.0, "smallest weight decay", lo_open=True)
    high: float = bounded(0.01, 0.0, 1.0, "largest weight decay", lo_open=True)


@dataclass(frozen=True)
class BodyLrSpace(OrderedSpace):
    KEY = "body_lr_factor"
    enabled: bool = documented(False, "tune train.body_lr_factor, log-uniform (its best value depends on how far the "
                                      "data is from ImageNet: bench/README.md)")
    low: float = bounded(0.05, 0.0, 1.0, "smallest body_lr_factor", lo_open=True)
    high: float = bounded(1.0, 0.0, 1.0, "largest body_lr_factor", lo_open=True)


@dataclass(frozen=True)
class ScheduleSpace:
    enabled: bool = documented(True, "tune the lr schedule and its own params (off: train.yaml's)")
    choices: list[str] | None = subset(SCHEDULES, SCHEDULES, "schedules to try")
    # one Range per key some schedule reads (freezeflow.core.schedules: SCHEDULES[...].reads)
    step_size: Range = ranged(1, 3, int, 1, None, ("`step`: fewest epochs between lr drops",
                                                   "`step`: most epochs between lr drops"))
    gamma: Range = ranged(0.1, 0.9, float, 0.0, 1.0, ("`step`/`exponential`: smallest lr factor",
                                                      "`step`/`exponential`: largest lr factor"), lo_open=True)
    warmup_epochs: Range = ranged(0.0, 1.0, float, 0.0, None, ("`cosine`/`onecycle`: shortest warmup, in epochs",
                                                               "`cosine`/`onecycle`: longest warmup, in epochs"))
    plateau_patience: Range = ranged(0, 2, int, 0, None, ("`plateau`: least patience, in epochs",
                                                          "`plateau`: most patience, in epochs"))
    plateau_factor: Range = ranged(0.1, 0.9, float, 0.0, 1.0, ("`plateau`: smallest lr factor",
                                                               "`plateau`: largest lr factor"), lo_open=True)


@dataclass(frozen=True)
class FreezeSpace:
    enabled: bool = documented(False, "tune the freezing strategy (off: train.yaml's freeze)")
    choices: list[str] | None = subset(("head", "until"), STRATEGIES, "strategies to try")
    until_low: int = bounded(1, 0, None, "`until`: fewest frozen stages")
    until_high: int = bounded(3, 0, None, "`until`: most frozen stages (< the backbone's stage count)")

    def __post_init__(self) -> None:
        if self.until_low > self.until_high:
            raise ParamsError("params/tune.yaml", "space.freeze.until_low",
                              f"{self.until_low} > until_high {self.until_high}; allowed: until_low <= until_high")


@dataclass(frozen=True)
class OptimizerSpace:
    enabled: bool = documented(False, "tune the optimizer (off: train.yaml's optimizer)")
    choices: list[str] | None = subset(OPTIMIZERS, OPTIMIZERS, "optimizers to try")


@dataclass(frozen=True)
class SearchSpace:
    """What a sweep varies; a dimension that is not `enabled` keeps the value in train.yaml."""

    batch_size: BatchSizeSpace = field(default_factory=BatchSizeSpace)
    lr: LrSpace = field(default_factory=LrSpace)
    lr_scaling: str = choice("none", LR_SCALINGS, "scale the sampled lr with batch_size / base_batch_size")
    base_batch_size: int = bounded(64, 1, 65_536, "batch size the sampled lr refers to (`lr_scaling`)")
    schedule: ScheduleSpace = field(default_factory=ScheduleSpace)
    weight_decay: WeightDecaySpace = field(default_factory=WeightDecaySpace)
    body_lr_factor: BodyLrSpace = field(default_factory=BodyLrSpace)
    freeze: FreezeSpace = field(default_factory=FreezeSpace)
    optimizer: OptimizerSpace = field(default_factory=OptimizerSpace)


@dataclass(frozen=True)
class TuneParams:
    n_trials: int = bounded(12, 1, None, "trials in the study (complete + pruned)")
    epochs: int = bounded(5, 1, None, "epochs per trial")
    storage: str = documented("", "Optuna storage URL; empty = sqlite file under the project")
    study_name: str = documented("freezeflow", "study name (workers with the same name share it)")
    seed: int = bounded(0, 0, None, "TPE sampler seed")
    pruner: str = choice("median", ("median", "hyperband", "asha", "none"), "early pruning of bad trials")
    workers: int = bounded(1, 1, 256, "worker processes on this machine (`--workers` overrides)")
    heartbeat_interval: int = bounded(10, 1, None, "seconds between a running trial's heartbeats")
    grace_period: int = bounded(60, 1, None, "a trial without heartbeat this long failed (its worker died)")
    max_retry: int = bounded(2, 0, None, "retries of a trial whose worker died")
    fuse: int = bounded(8, 1, 64, "`head` trials that differ only in lr, schedule and weight decay train together "
                        "as one stacked head, up to this many (1 = each alone)")
    space: SearchSpace = field(default_factory=SearchSpace)


@dataclass(frozen=True)
class EvaluateParams:
    split: str = choice("test", ("val", "test"), "split the model is evaluated on")
    batch_size: int = bounded(256, 1, None, "images per inference batch")


@dataclass(frozen=True)
class ServeParams:
    runtime: str = choice("torch", ("torch", "onnx"), "what the registered MLflow model runs on: `torch` (weights.npz) "
                          "or `onnx` (model.onnx on onnxruntime, exported and parity-checked when the model is logged)")
    top_k: int = bounded(3, 1, None, "classes (with probabilities) in each served row's `top`; a request's "
                         "params.top_k overrides it")
    batch_size: int = bounded(64, 1, 65_536, "images per forward pass of the served model")
    max_pixels: int = bounded(40_000_000, 1, None, "larger served images are rejected (that row's error) as "
                              "decompression bombs")


FILES: dict[str, type] = {
    "data": DataParams,
    "train": TrainParams,
    "tune": TuneParams,
    "evaluate": EvaluateParams,
    "serve": ServeParams,
}


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    tune: TuneParams = field(default_factory=TuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    serve: ServeParams = field(default_factory=ServeParams)


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping with the safe loader; any problem is a ParamsError naming the file."""
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else {}
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        if "python/" in str(exc):
            problem = "unsafe YAML tag (only plain values are allowed)"
        raise ParamsError(str(path), "", problem) from None
    except OSError as exc:
        raise ParamsError(str(path), "", exc.strerror or str(exc)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError(str(path), "", "must be a mapping of key: value")
    return raw


def load_params(params_dir: Path | str = "params", overrides: list[str] | tuple = ()) -> Params:
    """Read params/*.yaml, apply `file.key=value` overrides, validate, return frozen Params."""
    params_dir = Path(params_dir)
    raw = {name: read_yaml(params_dir / f"{name}.yaml") for name in FILES}
    for item in overrides:
        name, keys, value = parse_override(item)
        set_nested(raw[name], keys, value)
    if raw["train"].get("use_best"):
        best = read_yaml(params_dir / "best.yaml")
        for key, value in flatten(best).items():
            set_nested(raw["train"], key.split("."), value)
    built = {name: build(cls, raw[name], str(params_dir / f"{name}.yaml"), "") for name, cls in FILES.items()}
    params = Params(**built)
    check_consistency(params, params_dir)
    return params


def parse_override(item: str) -> tuple[str, list[str], Any]:
    if "=" not in item:
        raise ParamsError("-S", item, "expected file.key=value, e.g. train.lr=0.001")
    path, text = item.split("=", 1)
    parts = path.strip().split(".")
    if parts[0] not in FILES or len(parts) < 2:
        raise ParamsError("-S", path, f"the part before the first dot must be one of {', '.join(FILES)}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return parts[0], parts[1:], value


def set_nested(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[keys[-1]] = value


def build(cls: type, raw: Any, file: str, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad values."""
    if not isinstance(raw, dict):
        raise ParamsError(file, prefix.rstrip("."), "must be a mapping of key: value")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ParamsError(file, prefix + str(key), f"unknown key; allowed: {', '.join(fields)}")
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        if "range" in spec.metadata:
            values[name] = build_range(raw[name], spec, file, key)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = build(hints[name], raw[name], file, key + ".")
        else:
            values[name] = check_value(raw[name], hints[name], spec.metadata, file, key)
    return cls(**values)


def build_range(raw: Any, spec: dataclasses.Field, file: str, key: str) -> Range:
    """A Range from {low, high} (a missing end keeps its default), each end checked against the
    field's bounds, then low <= high."""
    if not isinstance(raw, dict):
        raise ParamsError(file, key, "must be a mapping of key: value")
    for end in raw:
        if end not in ("low", "high"):
            raise ParamsError(file, f"{key}.{end}", "unknown key; allowed: low, high")
    default, ends, kind = spec.default_factory(), spec.metadata["range"], spec.metadata["kind"]
    low, high = (check_value(raw[end], kind, ends[end], file, f"{key}.{end}") if end in raw else getattr(default, end)
                 for end in ("low", "high"))
    check_order(low, high, key)
    return Range(low, high)


def check_value(value: Any, kind: Any, meta: typing.Mapping, file: str, key: str) -> Any:
    if meta.get("auto"):
        if value == "auto":
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ParamsError(file, key, f"{value!r} is not allowed; allowed: a number or auto")
        kind = float
    choices = meta.get("choices")
    if kind is str and isinstance(value, bool) and choices:
        value = {True: "on", False: "off"}[value]  # YAML 1.1 reads a bare on/off as a boolean
    value = coerce(value, kind, file, key)
    also = meta.get("also")
    if choices and value not in choices and not (also and also.accepts(value)):
        shown = ", ".join(map(str, choices)) + (f", or {also.shown}" if also else "")
        raise ParamsError(file, key, f"{value!r} is not allowed; allowed: {shown}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise ParamsError(file, key, f"{value!r} is out of range; allowed: {op} {lo}" + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise ParamsError(file, key, f"{value!r} is out of range; allowed: <= {hi}")
    return value


def coerce(value: Any, kind: Any, file: str, key: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(file, key, f"{value!r} is not allowed; allowed: true, false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ParamsError(file, key, f"{value!r} is not allowed; allowed: an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ParamsError(file, key, f"{value!r} is not allowed; allowed: a number")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ParamsError(file, key, f"{value!r} is not allowed; allowed: a string")
    if isinstance(kind, types.UnionType):
        return value
    raise TypeError(f"unsupported params type {kind}")


def check_consistency(params: Params, params_dir: Path) -> None:
    """Rules that involve two keys at once."""
    split = params.data.split
    if split.val + split.test >= 0.9:
        raise ParamsError(str(params_dir / "data.yaml"), "split", "val + test must leave at least 10% for training")
    train = params.train
    if train.augment_views and not train.augment.enabled:
        raise ParamsError(str(params_dir / "train.yaml"), "augment_views",
                          "needs augment.enabled: true (views of what?)")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'freeze': {'strategy': 'head'}} -> {'freeze.strategy': 'head'}; dataclasses too."""
    if dataclasses.is_dataclass(tree):
        tree = dataclasses.asdict(tree)
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def dump_params(params: Params, path: Path) -> None:
    """Write resolved params next to outputs (atomically)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(params), sort_keys=False))


def iter_docs(cls: type, prefix: str = ""):
    """(key, default, allowed, doc) for each field: feeds the README's params reference."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "range" in f.metadata:
            default = f.default_factory()
            for end, meta in f.metadata["range"].items():
                yield f"{prefix}{f.name}.{end}", getattr(default, end), describe_allowed(meta, f.metadata["kind"]), \
                    meta["doc"]
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_docs(hints[f.name], f"{prefix}{f.name}.")
            continue
        yield prefix + f.name, f.default, describe_allowed(f.metadata, hints[f.name]), f.metadata.get("doc", "")


def describe_allowed(meta: typing.Mapping, kind: Any) -> str:
    """The reference's `allowed` column: the choices, the bounds, or else the type."""
    allowed = ", ".join(map(str, meta["choices"])) if meta.get("choices") else ""
    if meta.get("min") is not None or meta.get("max") is not None:
        lo = meta.get("min")
        allowed = f"{'>' if meta.get('lo_open') else '>='} {lo}" if lo is not None else ""
        if meta.get("max") is not None:
            allowed += f"{' and ' if allowed else ''}<= {meta['max']}"
    if meta.get("auto"):
        allowed += ", or auto"
    if meta.get("also"):
        allowed += f", or {meta['also'].shown}"
    return allowed or getattr(kind, "__name__", str(kind))


def render_reference() -> str:
    """The README's params reference: one Markdown table per params file, from the dataclasses."""
    out = []
    for name, cls in FILES.items():
        out.append(f"**params/{name}.yaml**\n\n| key | default | allowed | meaning |\n|---|---|---|---|")
        for key, default, allowed, doc in iter_docs(cls):
            shown = "" if default is dataclasses.MISSING else repr(default) if isinstance(default, str) else default
            out.append(f"| `{key}` | `{shown}` | {allowed} | {doc} |")
        out.append("")
    return "\n".join(out)


def update_readme(path: Path) -> None:
    """Replace the README's section between the params markers with the current reference."""
    text = path.read_text()
    head, rest = text.split("<!-- params:start -->", 1)
    _, tail = rest.split("<!-- params:end -->", 1)
    path.write_text(f"{head}<!-- params:start -->\n{render_reference().strip()}\n<!-- params:end -->{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--readme"]:
        update_readme(Path(sys.argv[2] if len(sys.argv) > 2 else "README.md"))
    else:
        print(render_reference())
