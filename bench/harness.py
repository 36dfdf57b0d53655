"""bench: freezeflow side by side with the plain torchvision recipe, its peers and the hardware's limits.

    python -m bench [SUITE ...] [--repeats 3] [--epochs 10] [--image-size 64]
        [--backbone efficientnet_lite0] [--data data/digits] [--out bench/results] [--tiny]

Suites (all when none is named; a suite this machine cannot run is skipped with the reason):
  recipes  the textbook recipe (torchvision ImageFolder + PIL transforms + DataLoader, full forward every
           epoch, model.train(), fp32, AdamW) against `run_training`, per freezing strategy.
  loader   images/s of ImageFolder + PIL transforms (num_workers 0 and 2) against batches gathered from
           freezeflow's prepared uint8 cache, without and with augmentation.
  limit    one eval inference pass over the train images (already a tensor in memory) against
           freezeflow's `head` training time.
  sweep    an Optuna sweep with pruning + the shared feature cache against both off, beside one plain
           training (bench_sweep.py; needs the pipeline extras).
  peers    fastai and PyTorch Lightning on the same task (bench_peers.py; `pip install -e .[bench]`).
  gpu      resnet50 at 224 px, AMP + channels_last: freezeflow's loop vs a bare step on GPU tensors, and
           `head` vs the plain recipe (bench_gpu.py; needs CUDA).
  quality  accuracy: every strategy at its defaults on three real photo folders built offline, against
           fastai fine_tune and Lightning BackboneFinetuning at theirs (bench_quality.py; needs the
           `bench` extras and scikit-image).
  retrain  a scheduled retrain on grown data: `freezeflow pipeline` on a photo set, +30% new images, the
           pipeline again; images decoded, feature rows computed, prepare + feature-build time and the gate's
           two scores, for head and until (bench/retrain.py; needs the pipeline extras and scikit-image).
  serve    images/s through the registered model's pyfunc on PyTorch and onnxruntime, batch 1 and 64, against
           PIL + torchvision transforms + the eager model (bench/serve.py; needs the pipeline and serve extras).

Every contender runs in a fresh spawned process (peak RSS is per contender; `--tiny` shares one worker
to stay fast), and contenders run alternately (repeat 1: A, B, C...; repeat 2: A, B, C...) so that
background load hits all of them alike. Each suite writes <out>/<suite>-<machine>.json and .md.
Core module: imports only torch, torchvision, numpy, Pillow, PyYAML, the stdlib and freezeflow.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from freezeflow.core.data.augment import augment_batch
from freezeflow.core.models.registry import build_backbone, normalization
from freezeflow.core.models.staged import count_stage_flops
from freezeflow.core.train.batches import Batches, prefetch
from freezeflow.core.data.preprocess import normalize_batch
from freezeflow.core.train.freezing import FreezePlan
from freezeflow.core.train.loop import peak_cuda_mb
from freezeflow.core.params import AugmentParams, Params, load_params
from freezeflow.core.data.prepare import Prepared, load_prepared, prepare_dataset
from freezeflow.core.train.run import run_training

SUITES = ("recipes", "loader", "limit", "sweep", "peers", "gpu", "quality", "retrain", "serve", "overhead",
          "freezeout")
# suites in their own modules, imported only when they run: each has check_ready(settings) -> reason to skip
# or None, run(ctx, pool) -> report body, render(report) -> Markdown lines
EXTRA_SUITES = {"sweep": "bench.sweep", "peers": "bench.peers", "gpu": "bench.gpu",
                "quality": "bench.quality", "retrain": "bench.retrain", "serve": "bench.serve",
                "overhead": "bench.overhead", "freezeout": "bench.freezeout"}
STRATEGIES = ("head", "until", "gradual", "freezeout", "none")  # every core.strategies name, most frozen first
# --slow-repeats applies to every recipes contender but the head pair (minutes per run on a small CPU)
SLOW_CONTENDERS = tuple(f"{recipe}-{strategy}" for strategy in ("until", "gradual", "freezeout", "none")
                        for recipe in ("plain", "freezeflow"))
SPEEDUP_TARGETS = {"head": 8.0, "until": 1.5}
FREEZEOUT_TIME_FRACTION = 0.8  # "20% faster": freezeout takes at most 80% of none's time
FREEZEOUT_VAL_TOLERANCE = 0.03  # relative
LOADER_TARGET = 5.0
LIMIT_TARGET = 1.3
INFERENCE_BATCH = 256
LOADER_PASSES = 5  # epochs per loader measurement (one epoch of digits takes well under a second)


@dataclass(frozen=True)
class Settings:
    suites: tuple[str, ...]
    repeats: int
    epochs: int
    image_size: int
    backbone: str
    weights: str
    data: str
    out: str
    params_dir: str
    batch_size: int
    slow_repeats: int  # repeats of SLOW_CONTENDERS; 0 = --repeats
    threads: int  # torch intra-op threads per contender; 0 = torch's default
    tiny: bool
    isolate: bool  # one fresh process per contender (False only for --tiny)
    trials: int = 12  # sweep suite: trials per study
    strategies: tuple[str, ...] = STRATEGIES  # recipes suite: which plain/freezeflow pairs run
    device: str = "auto"  # auto | cpu | cuda; the gpu suite needs cuda unless --device cpu (smoke test only)
    datasets: tuple[str, ...] = ("textures", "scenes", "glyphs")  # quality suite: photo sets (photosets.py)
    per_class: int = 130  # quality suite: images per class (the rare class gets a quarter)


@dataclass(frozen=True)
class Context:
    """What every suite shares: settings, a scratch folder, the prepared data and the machine."""

    settings: Settings
    work: Path
    prepared: Prepared
    prepare_time_s: float
    machine: dict
    code: dict  # taken at the start: the package folder and commit that every contender imports
    stage_names: list[str]
    stage_flops: list[int]


# ---- settings and machine -------------------------------------------------------------------------

def parse_settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=0,
                        help=f"repeats of {', '.join(SLOW_CONTENDERS)} (0 = --repeats)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per contender (0 = torch's default; 1 is steadier on a busy machine)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--data", default="data/digits")
    parser.add_argument("--params", default="params", help="params folder (bench pins the keys it compares)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--trials", type=int, default=12, help="sweep suite: trials per study")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="recipes and retrain suites: comma-separated strategies to compare (default: all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="gpu suite: cuda (auto) or cpu to smoke-test its code without a GPU")
    parser.add_argument("--datasets", default="textures,scenes,glyphs",
                        help="quality suite: comma-separated photo sets (textures, scenes, glyphs)")
    parser.add_argument("--per-class", type=int, default=130, help="quality suite: images per class")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run on a generated dataset")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; allowed: {', '.join(SUITES)}")
    strategies = tuple(x.strip() for x in args.strategies.split(",") if x.strip())
    if not strategies or set(strategies) - set(STRATEGIES):
        parser.error(f"--strategies {args.strategies!r}; allowed: a comma-separated subset of {', '.join(STRATEGIES)}")
    if min(args.repeats, args.epochs, args.trials) < 1 or min(args.slow_repeats, args.threads) < 0:
        parser.error("--repeats, --epochs and --trials must be >= 1, --slow-repeats and --threads >= 0")
    names = tuple(x.strip() for x in args.datasets.split(",") if x.strip())
    if not names or set(names) - {"textures", "scenes", "glyphs"}:
        parser.error(f"--datasets {args.datasets!r}; allowed: a comma-separated subset of textures, scenes, glyphs")
    if args.per_class < 4:
        parser.error("--per-class must be >= 4")
    return Settings(tuple(args.suites) or SUITES, args.repeats, args.epochs, args.image_size, args.backbone,
                    args.weights, args.data, args.out, args.params, args.batch_size, args.slow_repeats,
                    args.threads, args.tiny, not args.tiny, trials=args.trials, device=args.device,
                    strategies=strategies, datasets=names, per_class=args.per_class)


def shrink_settings(settings: Settings, data_dir: Path) -> Settings:
    """--tiny: 2 classes x 20 real PNGs, 32 px, 1 epoch, 1 repeat, random-init resnet18."""
    return replace(settings, repeats=1, slow_repeats=0, epochs=1, image_size=32, backbone="resnet18",
                   weights="none", data=str(data_dir), isolate=False, per_class=8)


def write_tiny_dataset(root: Path, classes: int = 2, per_class: int = 20, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[4:12, 8 * c:8 * c + 8, c % 3] = 230  # a bright square at a class-specific place
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return root


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    slug = slugify(gpu) if gpu else f"{slugify(cpu)}-{cores}c"
    return {"slug": slug, "cpu": cpu, "cores": cores, "gpu": gpu, "torch_default_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "platform": platform.platform(), "mp_start_method": multiprocessing.get_start_method()}


def describe_code() -> dict:
    """Which freezeflow was measured: the imported package's folder and the commit of the current folder."""
    info: dict = {"package": str(Path(__file__).resolve().parent), "source_hash": hash_sources(), "commit": None,
                  "dirty": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = {"capture_output": True, "text": True, "timeout": 20, "check": True}
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "freezeflow", "params"], **run).stdout
        info["dirty"] = [line[3:] for line in status.splitlines()]
    return info


def hash_sources() -> str:
    """Hash of the package's .py files: contenders import them fresh, so a change mid-run would mix versions."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def list_notes(ctx: Context, suite: str) -> list[str]:
    settings, notes = ctx.settings, []
    if hash_sources() != ctx.code["source_hash"]:
        notes.append("freezeflow's sources changed while this suite ran: its contenders may mix code versions")
    if suite == "recipes" and settings.slow_repeats and settings.slow_repeats < settings.repeats:
        notes.append(f"--slow-repeats {settings.slow_repeats}: {', '.join(SLOW_CONTENDERS)} ran "
                     f"{settings.slow_repeats} time(s), the others {settings.repeats}")
    if settings.threads:
        notes.append(f"torch.set_num_threads({settings.threads}) in every contender (--threads)")
    return notes


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def make_params(settings: Settings, strategy: str, until: int) -> Params:
    """The project's params with the keys this benchmark compares pinned."""
    pinned = pin_values(settings, strategy, until)
    return load_params(settings.params_dir, [f"{k}={v}" for k, v in pinned.items()])


def pin_values(settings: Settings, strategy: str, until: int) -> dict:
    """The keys every contender shares (as -S overrides: file.key -> value)."""
    return {"data.dir": str(Path(settings.data).resolve()), "data.image_size": settings.image_size,
              "train.backbone": settings.backbone, "train.weights": settings.weights,
              "train.epochs": settings.epochs, "train.batch_size": settings.batch_size,
              "train.freeze.strategy": strategy, "train.freeze.until": until, "train.use_best": False,
              "train.augment.enabled": False, "train.augment_views": 0, "train.cache_features": "auto",
              "train.early_stopping": 0}


def build_context(settings: Settings, work: Path) -> Context:
    """Prepare the data once (timed, cold) and count the backbone's FLOPs per stage."""
    params = make_params(settings, "head", 0)
    start = time.perf_counter()
    prepared = prepare_dataset(params.data, work / "prepared")
    prepare_time = time.perf_counter() - start
    model = build_backbone(settings.backbone, settings.weights, num_classes=len(prepared.classes))
    flops = count_stage_flops(model, settings.image_size)
    return Context(settings, work, prepared, prepare_time, describe_machine(), describe_code(),
                   list(model.stage_names), flops)


def pick_until_stage(ctx: Context) -> int:
    return len(ctx.stage_names) // 2


# ---- running contenders ---------------------------------------------------------------------------

@contextlib.contextmanager
def open_runner(isolate: bool):
    """A one-worker spawn pool: a fresh process per contender when isolating, else one shared worker."""
    mp = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=mp, max_tasks_per_child=1 if isolate else None) as pool:
        yield pool


def run_alternating(pool, contenders: list[dict], suite: str, vary=None) -> dict[str, list[dict]]:
    """Repeat r runs every contender that still has repeats left, in the same order each time.
    vary(spec, r) -> spec: what changes between repeats (bench quality: the seed)."""
    results: dict[str, list[dict]] = {c["name"]: [] for c in contenders}
    rounds = max(c["repeats"] for c in contenders)
    for r in range(rounds):
        for spec in contenders:
            if r >= spec["repeats"]:
                continue
            start = time.perf_counter()
            results[spec["name"]].append(pool.submit(run_contender, vary(spec, r) if vary else spec).result())
            log(f"[{suite} {r + 1}/{rounds}] {spec['name']}: {time.perf_counter() - start:.1f} s")
    return results


def run_contender(spec: dict) -> dict:
    """Entry point in the worker process: run one contender, add its peak memory."""
    # a spawned worker inherits "spawn"; DataLoader workers get the start method a user's script would
    multiprocessing.set_start_method(spec["start_method"], force=True)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    baseline = read_peak_rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runners = {"freezeflow": run_freezeflow, "plain": run_plain, "inference": run_inference,
               "loader": run_loader}
    result = (runners.get(spec["kind"]) or resolve_runner(spec["runner"]))(spec)
    result["baseline_rss_mb"] = baseline  # after importing torch, before any work
    result["torch_threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = read_peak_rss_mb()
    peak = peak_cuda_mb()  # the device the contender used, not only the current one
    result["peak_gpu_mb"] = round(peak, 1) if peak is not None else None
    return result


def resolve_runner(reference: str):
    """A contender defined in another module, named "module:function" (peers, sweep, gpu suites)."""
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def read_peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---- contender: freezeflow -------------------------------------------------------------------------

def run_freezeflow(spec: dict) -> dict:
    """run_training in a fresh project root: cold feature cache, prepared images shared (read-only)."""
    root = Path(tempfile.mkdtemp(prefix="freezeflow-", dir=spec["work"]))
    try:
        (root / "prepared").symlink_to(Path(spec["prepared"]).resolve(), target_is_directory=True)
        start = time.perf_counter()
        metrics = run_training(spec["params"], root)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)  # unlinks the symlink, never follows it
    return {"wall_s": wall, "train_time_s": metrics["train_time_s"], "epoch_time_s": metrics["epoch_time_s"],
            "val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
            "best_epoch": metrics["best_epoch"], "feature_cache": metrics["feature_cache"]}


# ---- contender: the plain recipe -------------------------------------------------------------------

def build_plain_transform(image_size: int, backbone: str, augment: bool) -> transforms.Compose:
    mean, std = normalization(backbone)
    if augment:
        steps = [transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0)), transforms.RandomHorizontalFlip(),
                 transforms.RandomRotation(10)]
    else:
        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def map_split(folder: datasets.ImageFolder, prepared_root: Path) -> tuple[dict[str, list[int]], dict]:
    """freezeflow's split indices (rows of the prepared arrays) as ImageFolder indices, matched by file."""
    manifest = json.loads((Path(prepared_root) / "manifest.json").read_text())
    root = Path(folder.root)
    folder_files = [Path(path).relative_to(root).as_posix() for path, _ in folder.samples]
    index = {name: i for i, name in enumerate(folder_files)}
    files = manifest["files"]
    missing = [f for f in files if f not in index]
    if missing:
        raise RuntimeError(f"{missing[0]}: in freezeflow's manifest but not in torchvision's ImageFolder")
    split = {name: [index[files[row]] for row in rows] for name, rows in manifest["split"].items()}
    check = {"files": len(files), "file_lists_equal": folder_files == files,
             "classes_equal": list(folder.classes) == manifest["classes"]}
    return split, check


def build_plain_subsets(params: Params, prepared_root: Path, augment: bool = False) -> dict[str, Subset]:
    """The textbook datasets: one ImageFolder per transform, split like freezeflow's manifest."""
    eval_set = datasets.ImageFolder(params.data.dir, build_plain_transform(params.data.image_size,
                                                                           params.train.backbone, False))
    train_set = datasets.ImageFolder(params.data.dir, build_plain_transform(params.data.image_size,
                                                                            params.train.backbone, augment))
    split, _ = map_split(eval_set, prepared_root)
    return {"train": Subset(train_set, split["train"]), "val": Subset(eval_set, split["val"]),
            "test": Subset(eval_set, split["test"])}


def build_plain_optimizer(model: torch.nn.Module, plan: FreezePlan, lr: float, weight_decay: float):
    """AdamW, one group per stage that ever trains (lr scaled per stage only for gradual/freezeout)."""
    lowest = 0 if plan.changes_over_time else plan.frozen_count(0, 0.0)  # none: 0 as well
    groups = [{"params": list(model.stages[i].parameters()), "stage": i, "base_lr": lr * plan.lr_scale(i),
               "lr": lr * plan.lr_scale(i)} for i in range(lowest, plan.n_stages)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def set_requires_grad(model: torch.nn.Module, frozen: int) -> None:
    for i, stage in enumerate(model.stages):
        for p in stage.parameters():
            p.requires_grad_(i >= frozen)


@torch.no_grad()
def evaluate_plain(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = seen = 0
    for x, y in loader:
        logits = model(x.to(device))
        correct += int((logits.argmax(1).cpu() == y).sum())
        seen += len(y)
    return correct / seen


def train_plain(model, loaders: dict, plan: FreezePlan, params: Params, device: torch.device) -> dict:
    """The textbook loop: model.train() (frozen BatchNorm too), full forward, backward, step; val per epoch."""
    tp = params.train
    optimizer = build_plain_optimizer(model, plan, tp.lr, tp.weight_decay)
    total_steps, step, frozen = tp.epochs * len(loaders["train"]), 0, -1
    epoch_times, best = [], {"val_accuracy": -1.0, "epoch": 0, "state": None}
    for epoch in range(tp.epochs):
        model.train()
        start = time.perf_counter()
        for x, y in loaders["train"]:
            progress = step / total_steps
            if plan.frozen_count(epoch, progress) != frozen:  # the same requires_grad pattern as freezeflow
                frozen = plan.frozen_count(epoch, progress)
                set_requires_grad(model, frozen)
            for group in optimizer.param_groups:  # constant lr, except FreezeOut's per-stage anneal
                group["lr"] = group["base_lr"] * plan.lr_factor(group["stage"], progress, 1.0)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        sync_device(device)
        epoch_times.append(time.perf_counter() - start)
        val = evaluate_plain(model, loaders["val"], device)
        if val > best["val_accuracy"]:
            best = {"val_accuracy": val, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
    return best | {"epoch_time_s": epoch_times}


def run_plain(spec: dict) -> dict:
    """The plain recipe, end to end: datasets, loaders, model, training, best-val model on test."""
    params: Params = spec["params"]
    start = time.perf_counter()
    subsets = build_plain_subsets(params, Path(spec["prepared_root"]))
    bs = params.train.batch_size
    loaders = {"train": DataLoader(subsets["train"], batch_size=bs, shuffle=True),
               "val": DataLoader(subsets["val"], batch_size=bs), "test": DataLoader(subsets["test"], batch_size=bs)}
    device = pick_device()
    torch.manual_seed(params.train.seed)  # the same head init as freezeflow's build_trainer
    model = build_backbone(params.train.backbone, params.train.weights,
                           num_classes=len(subsets["train"].dataset.classes)).to(device)
    plan = FreezePlan.from_params(params.train, len(model.stages))
    best = train_plain(model, loaders, plan, params, device)
    model.load_state_dict(best["state"])
    test = evaluate_plain(model, loaders["test"], device)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "train_time_s": sum(best["epoch_time_s"]), "epoch_time_s": best["epoch_time_s"],
            "val_accuracy": best["val_accuracy"], "test_accuracy": test, "best_epoch": best["epoch"]}


# ---- contenders: inference limit and loaders -------------------------------------------------------

def time_inference(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                   batch: int = INFERENCE_BATCH) -> float:
    sync_device(device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    sync_device(device)
    return time.perf_counter() - start


def run_inference(spec: dict) -> dict:
    """One eval, no_grad, fp32 pass (batch 256) over the train images, already normalized in memory."""
    params: Params = spec["params"]
    prepared = load_prepared(Path(spec["prepared_root"]))
    device = pick_device()
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in normalization(params.train.backbone))
    every = normalize_batch(torch.from_numpy(np.array(prepared.images)).to(device), mean, std)  # copy: memmap
    train = every[torch.from_numpy(prepared.split["train"]).to(device)].contiguous()
    fit = every[torch.from_numpy(np.concatenate([prepared.split["train"], prepared.split["val"]])).to(device)]
    torch.manual_seed(params.train.seed)
    model = build_backbone(params.train.backbone, params.train.weights, num_classes=len(prepared.classes))
    model = model.to(device).eval()
    cold = time_inference(model, train, device)  # first pass, as the feature cache's first pass is
    train_val = time_inference(model, fit.contiguous(), device)
    warm = time_inference(model, train, device)
    small = time_inference(model, train, device, batch=64)  # diagnostic: batch size matters on small caches
    return {"inference_s": cold, "inference_warm_s": warm, "inference_train_val_s": train_val,
            "inference_b64_s": small, "train_images": len(train), "train_val_images": len(fit)}


def run_loader(spec: dict) -> dict:
    """`passes` shuffled epochs over the train split, batch 64, each batch landing on the device.

    Set-up (scanning the folder, opening the memmap) is outside the clock; a plain DataLoader with
    workers starts them every epoch, as a default (non-persistent) one does.
    """
    params: Params = spec["params"]
    device, augment = pick_device(), spec["augment"]
    if spec["source"] == "plain":
        subsets = build_plain_subsets(params, Path(spec["prepared_root"]), augment)
        batches = DataLoader(subsets["train"], batch_size=params.train.batch_size, shuffle=True,
                             num_workers=spec["workers"])
        read_epoch = functools.partial(read_plain_epoch, batches, device)
    else:
        prepared = load_prepared(Path(spec["prepared_root"]))
        gen = torch.Generator().manual_seed(params.train.seed)
        read_epoch = functools.partial(gather_prepared, prepared, params, device, augment, gen)
    start = time.perf_counter()
    seen = sum(read_epoch() for _ in range(spec["passes"]))
    sync_device(device)
    seconds = time.perf_counter() - start
    return {"images": seen, "seconds": seconds, "images_per_s": seen / seconds}


def read_plain_epoch(batches: DataLoader, device: torch.device) -> int:
    return sum(len(x.to(device)) for x, _ in batches)


def gather_prepared(prepared: Prepared, params: Params, device: torch.device, augment: bool,
                    gen: torch.Generator) -> int:
    """freezeflow's input path: rows of the uint8 memmap (prefetch thread) -> normalize (-> augment)."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in normalization(params.train.backbone))
    order = torch.randperm(len(prepared.split["train"]), generator=gen).numpy()
    source, seen = Batches(prepared.images, prepared.split["train"], 0), 0
    for x_cpu, _ in prefetch(source, order, params.train.batch_size, device.type == "cuda"):
        x = normalize_batch(x_cpu.to(device, non_blocking=True), mean, std)
        if augment:
            x = augment_batch(x, AugmentParams(enabled=True), gen)
        seen += len(x)
    return seen


# ---- summaries ----------------------------------------------------------------------------------------

def summarize_values(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def summarize_training(spec: dict, runs: list[dict]) -> dict:
    epochs = [t for r in runs for t in r["epoch_time_s"]]
    gpu = [r["peak_gpu_mb"] for r in runs if r["peak_gpu_mb"] is not None]
    return {"name": spec["name"], "recipe": spec["kind"], "strategy": spec["strategy"], "repeats": len(runs),
            "wall_s": summarize_values([r["wall_s"] for r in runs]),
            "train_time_s": summarize_values([r["train_time_s"] for r in runs]),
            "epoch_time_s_median": round(statistics.median(epochs), 4),
            "first_epoch_s_median": round(statistics.median(r["epoch_time_s"][0] for r in runs), 4),
            "val_accuracy": round(statistics.median(r["val_accuracy"] for r in runs), 4),
            "test_accuracy": round(statistics.median(r["test_accuracy"] for r in runs), 4),
            "val_accuracy_runs": [round(r["val_accuracy"], 4) for r in runs],
            "best_epoch_runs": [r["best_epoch"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "baseline_rss_mb": statistics.median(r["baseline_rss_mb"] for r in runs),
            "peak_gpu_mb": max(gpu) if gpu else None}


def estimate_plain_flops(plan: FreezePlan, flops: list[int], sizes: tuple[int, int, int], epochs: int,
                      batch: int) -> float:
    """FLOPs of the plain recipe: full forward every step, backward (~2x forward) of trainable stages."""
    n_train, n_val, n_test = sizes
    total, steps = sum(flops), math.ceil(n_train / batch)
    work = 0.0
    for epoch in range(epochs):
        for s in range(steps):
            frozen = plan.frozen_count(epoch, (epoch * steps + s) / (epochs * steps))
            work += min(batch, n_train - s * batch) * (total + 2 * sum(flops[frozen:]))
        work += n_val * total
    return work + n_test * total


def estimate_freezeflow_flops(plan: FreezePlan, flops: list[int], sizes: tuple[int, int, int], epochs: int,
                           batch: int) -> float:
    """FLOPs of the engine: cached prefix levels (train + val), suffix forward + backward, test at the end."""
    n_train, n_val, n_test = sizes
    steps, cached = max(1, n_train // batch), not plan.trains_everything
    state = {"level": 0, "trained_from": None}
    work, frozen = 0.0, plan.frozen_count(0, 0.0)

    def switch_level(k: int) -> float:  # make level k the cache's current level: what FeatureCache.level computes
        if not cached or k == 0 or k == state["level"]:
            return 0.0
        pretrained = state["trained_from"] is None or k <= state["trained_from"]
        start = 0 if pretrained or state["level"] > k else state["level"]
        state["level"] = k
        return (n_train + n_val) * sum(flops[start:k])

    for epoch in range(epochs):
        for s in range(steps):
            frozen = plan.frozen_count(epoch, (epoch * steps + s) / (epochs * steps))
            state["trained_from"] = min(frozen, state["trained_from"] if state["trained_from"] is not None
                                        else frozen)
            if s == 0:
                level = frozen if cached and frozen > 0 else 0
                work += switch_level(level)
            work += min(batch, n_train) * (sum(flops[level:]) + 2 * sum(flops[frozen:]))
        val_level = frozen if cached and frozen > 0 else 0
        work += switch_level(val_level) + n_val * sum(flops[val_level:])
    return work + n_test * sum(flops)  # test features: computed from the images once, after training


def compare_strategy(ctx: Context, strategy: str, plain: dict, ff: dict) -> dict:
    split = ctx.prepared.split
    sizes = (len(split["train"]), len(split["val"]), len(split["test"]))
    params = make_params(ctx.settings, strategy, pick_until_stage(ctx))
    plan = FreezePlan.from_params(params.train, len(ctx.stage_names))
    args = (plan, ctx.stage_flops, sizes, ctx.settings.epochs, ctx.settings.batch_size)
    flop_ratio = estimate_plain_flops(*args) / estimate_freezeflow_flops(*args)
    return {"strategy": strategy, "plain_wall_s": plain["wall_s"]["median"],
            "freezeflow_wall_s": ff["wall_s"]["median"],
            "speedup_wall": round(plain["wall_s"]["median"] / ff["wall_s"]["median"], 2),
            "speedup_train_time": round(plain["train_time_s"]["median"] / ff["train_time_s"]["median"], 2),
            "speedup_flop_model": round(flop_ratio, 2),
            "plain_val_accuracy": plain["val_accuracy"], "freezeflow_val_accuracy": ff["val_accuracy"],
            "plain_test_accuracy": plain["test_accuracy"], "freezeflow_test_accuracy": ff["test_accuracy"]}


def check_recipe_targets(comparisons: dict[str, dict], rows: dict[str, dict]) -> list[dict]:
    targets = []
    for strategy, goal in SPEEDUP_TARGETS.items():
        if strategy not in comparisons:  # --strategies left it out
            continue
        c = comparisons[strategy]
        head = strategy == "head"
        ok = c["speedup_wall"] >= goal and (not head or c["freezeflow_val_accuracy"] >= c["plain_val_accuracy"])
        criterion = f"plain/freezeflow wall time >= {goal}x" + (" at equal or better val accuracy" if head else "")
        targets.append({"name": f"{strategy} speedup", "criterion": criterion, "value": c["speedup_wall"], "met": ok})
    if "freezeflow-freezeout" not in rows or "freezeflow-none" not in rows:
        return targets
    fo, none = rows["freezeflow-freezeout"], rows["freezeflow-none"]
    fraction = fo["wall_s"]["median"] / none["wall_s"]["median"]
    acc_drop = (none["val_accuracy"] - fo["val_accuracy"]) / max(none["val_accuracy"], 1e-9)
    err_none, err_fo = 1 - none["val_accuracy"], 1 - fo["val_accuracy"]
    targets.append({"name": "freezeout vs none (freezeflow)",
                    "criterion": f"freezeout wall <= {FREEZEOUT_TIME_FRACTION} x none wall, val accuracy within "
                                 f"{FREEZEOUT_VAL_TOLERANCE:.0%} (relative)",
                    "value": round(fraction, 3), "relative_val_accuracy_drop": round(acc_drop, 4),
                    "relative_val_error_change": round((err_fo - err_none) / err_none, 4) if err_none else None,
                    "met": fraction <= FREEZEOUT_TIME_FRACTION and acc_drop <= FREEZEOUT_VAL_TOLERANCE})
    return targets


# ---- suites -----------------------------------------------------------------------------------------

def make_spec(ctx: Context, name: str, kind: str, strategy: str, repeats: int | None = None) -> dict:
    return {"name": name, "kind": kind, "strategy": strategy, "repeats": repeats or ctx.settings.repeats,
            "params": make_params(ctx.settings, strategy, pick_until_stage(ctx)),
            "prepared": str(ctx.work / "prepared"),
            "prepared_root": str(ctx.prepared.root), "work": str(ctx.work),
            "start_method": multiprocessing.get_start_method(), "threads": ctx.settings.threads}


def run_recipes(ctx: Context, pool) -> dict:
    s = ctx.settings
    contenders = []
    for strategy in s.strategies:
        for recipe in ("plain", "freezeflow"):
            name = f"{recipe}-{strategy}"
            slow = s.slow_repeats if s.slow_repeats and name in SLOW_CONTENDERS else None
            contenders.append(make_spec(ctx, name, recipe, strategy, slow))
    results = run_alternating(pool, contenders, "recipes")
    rows = {c["name"]: summarize_training(c, results[c["name"]]) for c in contenders}
    comparisons = {st: compare_strategy(ctx, st, rows[f"plain-{st}"], rows[f"freezeflow-{st}"]) for st in s.strategies}
    plain_fo = rows["plain-freezeout"]["wall_s"]["median"] / rows["plain-none"]["wall_s"]["median"] \
        if {"freezeout", "none"} <= set(s.strategies) else None
    total = sum(ctx.stage_flops)
    return {"contenders": list(rows.values()), "comparisons": list(comparisons.values()),
            "targets": check_recipe_targets(comparisons, rows),
            "plain_freezeout_over_none_wall": round(plain_fo, 3) if plain_fo else None,
            "stage_flops": [{"stage": n, "mflops": round(f / 1e6, 3), "fraction": round(f / total, 4)}
                            for n, f in zip(ctx.stage_names, ctx.stage_flops)],
            "until_k": pick_until_stage(ctx), "split_check": check_split(ctx),
            "plain_recipe": describe_plain(ctx), "freezeflow_recipe": describe_freezeflow(ctx)}


def check_split(ctx: Context) -> dict:
    folder = datasets.ImageFolder(str(Path(ctx.settings.data).resolve()))
    split, check = map_split(folder, ctx.prepared.root)
    same = all(split[k] == ctx.prepared.split[k].tolist() for k in split)
    return check | {"same_indices": same, "sizes": {k: len(v) for k, v in split.items()}}


def describe_plain(ctx: Context) -> dict:
    return {"data": "torchvision datasets.ImageFolder + PIL Resize/CenterCrop/ToTensor/Normalize, decoded every epoch",
            "loader": f"DataLoader(batch_size={ctx.settings.batch_size}, shuffle=True, num_workers=0); "
                      "keeps the last partial batch",
            "model": "build_backbone(name, weights, num_classes); requires_grad per the strategy's frozen prefix",
            "mode": "model.train() for the whole net: BatchNorm of frozen stages runs on batch statistics and "
                    "updates its running stats; dropout on", "precision": "fp32",
            "optimizer": "AdamW(same lr and weight_decay), constant lr (no scheduler); gradual: lr_decay per "
                         "stage, freezeout: per-stage cosine to t_i",
            "eval": "val every epoch; best-val weights on test"}


def describe_freezeflow(ctx: Context) -> dict:
    p = make_params(ctx.settings, "head", pick_until_stage(ctx)).train
    return {"entry": "freezeflow.core.train.run.run_training in a fresh root (cold cache/features, shared prepared/)",
            "schedule": p.schedule, "lr": p.lr, "weight_decay": p.weight_decay, "amp": p.amp,
            "steps_per_epoch": "len(train) // batch_size (drops the last partial batch)",
            "wall_includes": "prepare reuse check, model build, training, val per epoch, checkpoint per epoch, "
                             "test, model + report writes",
            "train_time_s": "engine's sum of epoch times (includes feature-cache builds, excludes validation)"}


def run_loader_suite(ctx: Context, pool) -> dict:
    contenders, passes = [], 1 if ctx.settings.tiny else LOADER_PASSES
    for augment in (False, True):
        tag = "-aug" if augment else ""
        for workers in (0, 2):
            spec = make_spec(ctx, f"plain-w{workers}{tag}", "loader", "head")
            contenders.append(spec | {"source": "plain", "workers": workers, "augment": augment, "passes": passes})
        spec = make_spec(ctx, f"freezeflow-cache{tag}", "loader", "head")
        contenders.append(spec | {"source": "prepared", "workers": 0, "augment": augment, "passes": passes})
    results = run_alternating(pool, contenders, "loader")
    rows = [{"name": c["name"], "source": c["source"], "workers": c["workers"], "augment": c["augment"],
             "repeats": len(results[c["name"]]), "passes": passes, "images": results[c["name"]][0]["images"],
             "images_per_s": summarize_values([r["images_per_s"] for r in results[c["name"]]], 1),
             "peak_rss_mb": max(r["peak_rss_mb"] for r in results[c["name"]])} for c in contenders]
    return {"contenders": rows, "comparisons": compare_loaders(rows), "targets": check_loader_targets(rows)}


def compare_loaders(rows: list[dict]) -> list[dict]:
    speed = {r["name"]: r["images_per_s"]["median"] for r in rows}
    out = []
    for tag in ("", "-aug"):
        ff = speed[f"freezeflow-cache{tag}"]
        out.append({"augment": bool(tag), "freezeflow_images_per_s": ff,
                    "ratio_vs_plain_w0": round(ff / speed[f"plain-w0{tag}"], 2),
                    "ratio_vs_plain_w2": round(ff / speed[f"plain-w2{tag}"], 2)})
    return out


def check_loader_targets(rows: list[dict]) -> list[dict]:
    return [{"name": f"loader{' with augmentation' if c['augment'] else ''}",
             "criterion": f"freezeflow images/s >= {LOADER_TARGET}x the default plain loader (num_workers=0)",
             "value": c["ratio_vs_plain_w0"], "value_vs_w2": c["ratio_vs_plain_w2"],
             "met": c["ratio_vs_plain_w0"] >= LOADER_TARGET} for c in compare_loaders(rows)]


def run_limit(ctx: Context, pool) -> dict:
    contenders = [make_spec(ctx, "inference", "inference", "head"),
                  make_spec(ctx, "freezeflow-head", "freezeflow", "head")]
    results = run_alternating(pool, contenders, "limit")
    inf, head = results["inference"], results["freezeflow-head"]
    inference = summarize_values([r["inference_s"] for r in inf])
    train_time = summarize_values([r["train_time_s"] for r in head])
    ratio = train_time["median"] / inference["median"]
    rows = [{"name": "inference", "seconds": inference,
             "warm_seconds": summarize_values([r["inference_warm_s"] for r in inf]),
             "train_val_seconds": summarize_values([r["inference_train_val_s"] for r in inf]),
             "batch64_seconds": summarize_values([r["inference_b64_s"] for r in inf]), "images": inf[0]["train_images"],
             "train_val_images": inf[0]["train_val_images"], "peak_rss_mb": max(r["peak_rss_mb"] for r in inf)},
            {"name": "freezeflow-head", "seconds": train_time, "wall_s": summarize_values([r["wall_s"] for r in head]),
             "val_accuracy": head[0]["val_accuracy"], "peak_rss_mb": max(r["peak_rss_mb"] for r in head)}]
    fit_ratio = train_time["median"] / rows[0]["train_val_seconds"]["median"]
    return {"contenders": rows, "ratio": round(ratio, 3), "ratio_vs_train_val_inference": round(fit_ratio, 3),
            "targets": [{"name": "limit", "criterion": f"head train_time_s / one inference pass over the train "
                         f"images <= {LIMIT_TARGET}", "value": round(ratio, 3), "met": ratio <= LIMIT_TARGET}]}


# ---- output -----------------------------------------------------------------------------------------

def render_markdown(suite: str, report: dict) -> str:
    m = report["machine"]
    head = [f"# freezeflow bench: {suite}", "",
            f"{m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if m['gpu'] else ''}; torch {m['torch']}, "
            f"torchvision {m['torchvision']}, Python {m['python']}; {report['date']}", "",
            "Settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items() if k != "suites"),
            f"Code: commit {report['code']['commit']}, uncommitted: {report['code']['dirty'] or 'none'}", ""]
    head += [f"Note: {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    renders = {"recipes": render_recipes, "loader": render_loader, "limit": render_limit}
    body = renders[suite](report) if suite in renders else importlib.import_module(EXTRA_SUITES[suite]).render(report)
    targets = ["", "| target | criterion | value | met |", "|---|---|---|---|"]
    verdict = {True: "yes", False: "NO", None: "not measured"}
    targets += [f"| {t['name']} | {t['criterion']} | {t['value']} | {verdict[t['met']]} |" for t in report["targets"]]
    return "\n".join(head + body + targets) + "\n"


def render_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def format_span(s: dict) -> str:
    return f"{s['median']} [{s['min']}–{s['max']}]"


def render_recipes(report: dict) -> list[str]:
    rows = [[c["name"], c["repeats"], format_span(c["wall_s"]), format_span(c["train_time_s"]),
             c["epoch_time_s_median"], c["val_accuracy"], c["test_accuracy"], c["peak_rss_mb"],
             c["peak_gpu_mb"] or "-"] for c in report["contenders"]]
    out = render_table(["contender", "repeats", "wall s median [min–max]", "train-loop s", "epoch s (median)",
                        "val acc", "test acc", "peak RSS MB", "peak GPU MB"], rows)
    ratios = [[c["strategy"], c["plain_wall_s"], c["freezeflow_wall_s"], c["speedup_wall"], c["speedup_train_time"],
               c["speedup_flop_model"], c["plain_val_accuracy"], c["freezeflow_val_accuracy"],
               c["plain_test_accuracy"], c["freezeflow_test_accuracy"]] for c in report["comparisons"]]
    header = ["strategy", "plain wall s", "freezeflow wall s", "speedup (wall)", "speedup (train loop)",
              "speedup (FLOP model)", "plain val", "freezeflow val", "plain test", "freezeflow test"]
    out += [""] + render_table(header, ratios)
    flops = [[f["stage"], f["mflops"], f"{f['fraction']:.1%}"] for f in report["stage_flops"]]
    out += ["", f"FLOPs per image by stage (until k = {report['until_k']}):", ""]
    return out + render_table(["stage", "MFLOPs", "share"], flops)


def render_loader(report: dict) -> list[str]:
    rows = [[c["name"], c["workers"], c["augment"], format_span(c["images_per_s"]), c["peak_rss_mb"]]
            for c in report["contenders"]]
    out = render_table(["contender", "num_workers", "augment", "images/s median [min–max]", "peak RSS MB"], rows)
    ratios = [[c["augment"], c["ratio_vs_plain_w0"], c["ratio_vs_plain_w2"]] for c in report["comparisons"]]
    return out + [""] + render_table(["augment", "freezeflow / plain (w0)", "freezeflow / plain (w2)"], ratios)


def render_limit(report: dict) -> list[str]:
    inf, head = report["contenders"]
    rows = [[f"inference, {inf['images']} train images (cold pass)", format_span(inf["seconds"])],
            [f"inference, {inf['images']} train images (warm pass)", format_span(inf["warm_seconds"])],
            [f"inference, {inf['images']} train images, batch 64 (warm pass)", format_span(inf["batch64_seconds"])],
            [f"inference, {inf['train_val_images']} train + val images (what the feature cache computes while "
             "training)", format_span(inf["train_val_seconds"])],
            ["freezeflow head: engine train_time_s", format_span(head["seconds"])],
            ["freezeflow head: run_training wall", format_span(head["wall_s"])]]
    return render_table(["measurement", "seconds median [min–max]"], rows) + [
        "", f"ratio head / inference = {report['ratio']} (vs train + val inference: "
            f"{report['ratio_vs_train_val_inference']})"]


def write_report(ctx: Context, suite: str, body: dict) -> Path:
    s = ctx.settings
    settings = {k: v for k, v in asdict(s).items() if k not in ("out", "isolate")}
    settings["isolation"] = "process per contender" if s.isolate else "one shared worker (--tiny)"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dataset = {"name": ctx.prepared.name, "images": int(len(ctx.prepared.labels)), "classes": len(ctx.prepared.classes)}
    report = {"suite": suite, "machine": ctx.machine, "code": ctx.code, "date": now, "settings": settings,
              "notes": list_notes(ctx, suite), "prepare_time_s": round(ctx.prepare_time_s, 3), "dataset": dataset}
    report |= body
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}-{ctx.machine['slug']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(render_markdown(suite, report))
    return path


def pick_suite(suite: str, settings: Settings):
    """The suite's run function, or None (with the reason logged) when this machine cannot run it."""
    builtin = {"recipes": run_recipes, "loader": run_loader_suite, "limit": run_limit}
    if suite in builtin:
        return builtin[suite]
    module = importlib.import_module(EXTRA_SUITES[suite])
    reason = module.check_ready(settings)
    if reason:
        log(f"skipped suite {suite}: {reason}")
        return None
    return module.run


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    work = Path(tempfile.mkdtemp(prefix="freezeflow-bench-"))
    try:
        if settings.tiny:
            settings = shrink_settings(settings, write_tiny_dataset(work / "tiny"))
        ctx = build_context(settings, work)
        log(f"prepared {len(ctx.prepared.labels)} images in {ctx.prepare_time_s:.1f} s; machine {ctx.machine['slug']}")
        with open_runner(settings.isolate) as pool:
            for suite in settings.suites:
                run_suite = pick_suite(suite, settings)
                if run_suite is None:
                    continue
                path = write_report(ctx, suite, run_suite(ctx, pool))
                log(f"wrote {path} and {path.with_suffix('.md')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
