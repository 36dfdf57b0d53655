"""bench suite `gpu`: freezeflow's training loop against the bare GPU step, and `head` on a GPU.

    python -m bench gpu [--repeats 3] [--epochs 10] [--batch-size 64] [--weights default]

resnet50 at 224 px, AMP (bf16 where supported, else fp16) and channels_last, on the bench data
(re-prepared at 224 px). Contenders, alternating per repeat, each in a fresh spawned process:
  bare-step        the same model, optimizer (AdamW via make_optimizer) and loss on one synthetic batch
                   already on the GPU: warm-up steps, then timed steps; images/s. The ceiling.
  freezeflow-loop  `build_trainer(...).run()` with strategy none fed by its own pipeline (uint8 memmap ->
                   prefetch thread -> pinned copy -> normalize on the GPU); images/s is the engine's own
                   per-epoch figure, the median over every epoch but the first (cudnn autotuning).
  plain-head       the textbook recipe (harness.run_plain: ImageFolder + PIL, fp32, full forward every step)
  freezeflow-head  run_training with strategy head (cached features, AMP, channels_last)
Target: freezeflow-loop images/s >= 90% of bare-step's. Peak GPU memory per contender.

Needs CUDA; `--device cpu` runs the same code on the CPU (no AMP) only so that the test suite can smoke-test
it. Core module: torch, torchvision, numpy, Pillow, PyYAML, the stdlib and freezeflow's core only.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import harness
from freezeflow.core.models.registry import build_backbone
from freezeflow.core.errors import first_line
from freezeflow.core.train.loop import resolve_amp, resolve_device
from freezeflow.core.train.freezing import FreezePlan, make_optimizer, set_train_mode
from freezeflow.core.data.prepare import load_prepared, prepare_dataset
from freezeflow.core.layout import Layout
from freezeflow.core.train.run import build_trainer

BACKBONE = "resnet50"
IMAGE_SIZE = 224
LOOP_TARGET = 0.9
MIN_LOOP_EPOCHS = 3  # the first epoch (cudnn autotuning, CUDA context) is left out of images/s


def check_ready(settings: harness.Settings) -> str | None:
    if settings.device == "cpu" or torch.cuda.is_available():
        return None
    return "no CUDA device here (run it on a GPU machine; --device cpu only smoke-tests the suite's code)"


@dataclass(frozen=True)
class NoCheckpointLayout(Layout):
    """The project layout without the per-epoch checkpoint: ~300 MB of resnet50 + AdamW state per epoch
    is written outside the timed epoch anyway, but it would slow the bench down for nothing."""

    @property
    def checkpoint(self) -> None:
        return None


# ---- setting up -------------------------------------------------------------------------------------

def pick_weights(settings: harness.Settings, backbone: str) -> tuple[str, str | None]:
    """settings.weights when they load here (a GPU box may have no internet), else random init."""
    try:
        build_backbone(backbone, settings.weights)
        return settings.weights, None
    except Exception as exc:  # noqa: BLE001 - any failure to load means "not available on this machine"
        return "none", f"weights {settings.weights!r} for {backbone} not loadable here ({first_line(exc)}" \
                       "): random init; images/s do not depend on weights, head accuracies are meaningless"


def make_gpu_context(ctx: harness.Context) -> tuple[harness.Context, Path, str | None]:
    """The suite's settings (resnet50 at 224 px unless --tiny) and data prepared at that size."""
    s = ctx.settings
    if s.tiny:  # the tiny dataset, model and size of the other suites: seconds on a CPU
        return ctx, ctx.work / "prepared", None
    weights, note = pick_weights(s, BACKBONE)
    settings = replace(s, backbone=BACKBONE, image_size=IMAGE_SIZE, weights=weights)
    out_root = ctx.work / f"prepared-{IMAGE_SIZE}"
    start = time.perf_counter()
    prepared = prepare_dataset(harness.make_params(settings, "head", 0).data, out_root)
    harness.log(f"prepared {len(prepared.labels)} images at {IMAGE_SIZE} px in {time.perf_counter() - start:.1f} s")
    names = list(build_backbone(BACKBONE, "none").stage_names)  # make_spec's `until` k counts these stages
    return replace(ctx, settings=settings, prepared=prepared, stage_names=names, stage_flops=[]), out_root, note


def make_gpu_spec(ctx: harness.Context, out_root: Path, name: str, kind: str, strategy: str, **extra) -> dict:
    """bench.make_spec on this suite's data, with the device, AMP and channels_last pinned."""
    spec = harness.make_spec(ctx, name, kind, strategy)
    device = "cpu" if ctx.settings.device == "cpu" else "cuda"
    batch = min(ctx.settings.batch_size, len(ctx.prepared.split["train"]))  # --tiny: 28 train images
    train = replace(spec["params"].train, device=device, amp="auto", channels_last=True, batch_size=batch)
    return spec | {"params": replace(spec["params"], train=train), "prepared": str(out_root),
                   "prepared_root": str(ctx.prepared.root), "classes": len(ctx.prepared.classes)} | extra


def list_contenders(ctx: harness.Context, out_root: Path) -> list[dict]:
    epochs = max(ctx.settings.epochs, MIN_LOOP_EPOCHS)
    steps = max(1, len(ctx.prepared.split["train"]) // min(ctx.settings.batch_size, len(ctx.prepared.split["train"])))
    loop = make_gpu_spec(ctx, out_root, "freezeflow-loop", "loop", "none", runner="bench.gpu:run_loop")
    loop["params"] = replace(loop["params"], train=replace(loop["params"].train, epochs=epochs))
    # the bare step runs as many steps as the loop: one epoch's worth to warm up, the others timed
    bare = make_gpu_spec(ctx, out_root, "bare-step", "bare", "none", runner="bench.gpu:run_bare_step",
                         warmup_steps=steps, steps=steps * (epochs - 1))
    return [bare, loop, make_gpu_spec(ctx, out_root, "plain-head", "plain", "head"),
            make_gpu_spec(ctx, out_root, "freezeflow-head", "freezeflow", "head")]


# ---- contenders (in the worker) ----------------------------------------------------------------------

def run_bare_step(spec: dict) -> dict:
    """Forward, loss, backward, step on one fixed batch on the device: no data movement, no .item()."""
    tp, size = spec["params"].train, spec["params"].data.image_size
    device = resolve_device(tp.device)
    amp = resolve_amp(tp.amp, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the engine sets it
    torch.manual_seed(tp.seed)
    model = build_backbone(tp.backbone, tp.weights, num_classes=spec["classes"]).to(device)
    model = model.to(memory_format=torch.channels_last)
    plan = FreezePlan.from_params(tp, len(model.stages))
    optimizer = make_optimizer(model, tp.optimizer, tp.lr, tp.weight_decay, tp.momentum, plan, 0)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    set_train_mode(model, 0)
    x = torch.randn(tp.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec["classes"], (tp.batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=tp.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(spec["warmup_steps"]):
        step()
    harness.sync_device(device)
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    harness.sync_device(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": spec["steps"] * tp.batch_size / seconds, "seconds": seconds, "steps": spec["steps"],
            "batch_size": tp.batch_size, "amp": str(amp).replace("torch.", "") if amp else "off"}


def run_loop(spec: dict) -> dict:
    """The engine end to end (strategy none) in a fresh root; images/s from its own epoch reports."""
    params = spec["params"]
    prepared = load_prepared(Path(spec["prepared_root"]))
    root = Path(tempfile.mkdtemp(prefix="loop-", dir=spec["work"]))
    try:
        start = time.perf_counter()
        trainer = build_trainer(params, prepared, NoCheckpointLayout(root), [])
        result = trainer.run()
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    steady = result.history[1:] or result.history
    return {"images_per_s": statistics.median(r.images_per_s for r in steady),
            "epoch_images_per_s": [round(r.images_per_s, 1) for r in result.history],
            "data_wait_fraction": statistics.median(r.data_wait_fraction for r in steady),
            "wall_s": wall, "train_time_s": result.train_time_s, "batch_size": params.train.batch_size,
            "amp": str(trainer.amp).replace("torch.", "") if trainer.amp else "off"}


# ---- the report ---------------------------------------------------------------------------------------

def summarize_rate(spec: dict, runs: list[dict]) -> dict:
    gpu = [r["peak_gpu_mb"] for r in runs if r["peak_gpu_mb"] is not None]
    row = {"name": spec["name"], "kind": spec["kind"], "repeats": len(runs), "batch_size": runs[0]["batch_size"],
           "amp": runs[0]["amp"], "images_per_s": harness.summarize_values([r["images_per_s"] for r in runs], 1),
           "peak_gpu_mb": max(gpu) if gpu else None, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    if spec["kind"] == "loop":
        row |= {"epochs": len(runs[0]["epoch_images_per_s"]),
                "epoch_images_per_s_runs": [r["epoch_images_per_s"] for r in runs],
                "data_wait_fraction": round(statistics.median(r["data_wait_fraction"] for r in runs), 4),
                "wall_s": harness.summarize_values([r["wall_s"] for r in runs])}
    else:
        row["steps"] = runs[0]["steps"]
    return row


def check_targets(rows: dict[str, dict]) -> list[dict]:
    ratio = rows["freezeflow-loop"]["images_per_s"]["median"] / rows["bare-step"]["images_per_s"]["median"]
    return [{"name": "training loop vs bare step", "criterion": f"freezeflow-loop images/s >= {LOOP_TARGET:.0%} "
             "of bare-step's (same model, optimizer, loss, AMP, channels_last, batch size)",
             "value": round(ratio, 3), "met": ratio >= LOOP_TARGET}]


def compare_head(rows: dict[str, dict]) -> dict:
    plain, ff = rows["plain-head"], rows["freezeflow-head"]
    return {"speedup_wall": round(plain["wall_s"]["median"] / ff["wall_s"]["median"], 2),
            "speedup_train_time": round(plain["train_time_s"]["median"] / ff["train_time_s"]["median"], 2),
            "plain_val_accuracy": plain["val_accuracy"], "freezeflow_val_accuracy": ff["val_accuracy"]}


def run(ctx: harness.Context, pool) -> dict:
    gpu_ctx, out_root, note = make_gpu_context(ctx)
    contenders = list_contenders(gpu_ctx, out_root)
    results = harness.run_alternating(pool, contenders, "gpu")
    rows = {c["name"]: (summarize_rate(c, results[c["name"]]) if c["kind"] in ("bare", "loop")
                        else harness.summarize_training(c, results[c["name"]])) for c in contenders}
    s = gpu_ctx.settings
    return {"contenders": list(rows.values()), "targets": check_targets(rows), "head": compare_head(rows),
            "gpu_settings": {"backbone": s.backbone, "image_size": s.image_size, "weights": s.weights,
                             "device": "cpu" if s.device == "cpu" else "cuda", "channels_last": True,
                             "train_images": len(gpu_ctx.prepared.split["train"])},
            "weights_note": note}


def render(report: dict) -> list[str]:
    g = report["gpu_settings"]
    out = [f"{g['backbone']} at {g['image_size']} px, weights {g['weights']}, device {g['device']}, "
           f"channels_last; {g['train_images']} train images (these replace the Settings line's backbone, image "
           "size and weights).", ""]
    if report["weights_note"]:
        out += [f"Note: {report['weights_note']}", ""]
    rows = [[c["name"], c["batch_size"], c["amp"], c.get("steps", c.get("epochs")), format_rate(c),
             c.get("data_wait_fraction", "-"), c["peak_gpu_mb"] or "-", c["peak_rss_mb"]]
            for c in report["contenders"] if "images_per_s" in c]
    out += harness.render_table(["contender", "batch", "amp", "timed steps / epochs", "images/s median [min–max]",
                               "data wait", "peak GPU MB", "peak RSS MB"], rows)
    rows = [[c["name"], harness.format_span(c["wall_s"]), harness.format_span(c["train_time_s"]), c["val_accuracy"],
             c["peak_gpu_mb"] or "-", c["peak_rss_mb"]] for c in report["contenders"] if "images_per_s" not in c]
    out += [""] + harness.render_table(["contender", "wall s median [min–max]", "train-loop s", "val acc",
                                      "peak GPU MB", "peak RSS MB"], rows)
    h = report["head"]
    return out + ["", f"head: plain / freezeflow wall = {h['speedup_wall']}x (train loop {h['speedup_train_time']}x)"]


def format_rate(row: dict) -> str:
    return harness.format_span(row["images_per_s"])
