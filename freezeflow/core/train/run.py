"""train: prepared data + params -> trained model, metrics and history. Core only (no MLflow/Prefect).

`run_training` is what `freezeflow train`, the DVC `train` stage and the Prefect `train` task call.
`python -m freezeflow.core.train -S train.epochs=3` runs it on a bare GPU box;
`torchrun --nproc-per-node N -m freezeflow.core.train ...` runs it data-parallel (see `distributed`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from freezeflow.core.train import distributed
from freezeflow.core.models.registry import build_backbone, min_image_size, normalization
from freezeflow.core.train.callbacks import Callback, CallbackList
from freezeflow.core.train.features import feature_spec
from freezeflow.core.train.loop import Trainer, TrainerSpec
from freezeflow.core.train.state import TrainResult
from freezeflow.core.io import load_trusted
from freezeflow.core.errors import ParamsError, UserError
from freezeflow.core.train.freezing import FreezePlan
from freezeflow.core.train.lr_finder import LrFindResult, find_lr
from freezeflow.core.metrics import summarize_predictions
from freezeflow.core.models.batchnorm import set_bn_momentum
from freezeflow.core.models.io import ModelInfo, save_model
from freezeflow.core.params import Params, dump_params, load_params
from freezeflow.core.strategies import STRATEGIES
from freezeflow.core.data.prepare import Prepared, open_prepared
from freezeflow.core.io import write_json_atomic
from freezeflow.core.layout import Layout


def check_image_size(params: Params) -> None:
    smallest = min_image_size(params.train.backbone)
    if params.data.image_size < smallest:
        raise ParamsError("params/data.yaml", "image_size", f"{params.data.image_size} is too small for "
                          f"{params.train.backbone}; allowed: >= {smallest}")


def validate_params(params: Params) -> None:
    """Checks that need the backbone, done before anything is written."""
    check_image_size(params)
    if STRATEGIES[params.train.freeze.strategy].uses_cut:
        stages = len(build_backbone(params.train.backbone, "none").stages)  # architecture only, no weights
        FreezePlan.from_params(params.train, stages)


PROBE_EPOCHS = 3  # the divergence guard's head-alone reference: a short linear probe on cached features
FINDER_PLACEHOLDER_LR = 1.0  # the lr finder sets every group's lr itself; groups keep their share of it


def build_trainer(params: Params, prepared: Prepared, layout: Layout, callbacks: list[Callback],
                  checkpoint: bool = True, reference=None) -> Trainer:
    """Model with a fresh head for the dataset's classes, freezing plan, optimizer, cache.
    checkpoint=False: a throwaway trainer (lr finder, the guard's probe) that writes nothing."""
    check_image_size(params)
    torch.manual_seed(params.train.seed)  # the new head's init
    model = build_backbone(params.train.backbone, params.train.weights, num_classes=len(prepared.classes))
    set_bn_momentum(list(model.stages), params.train.bn_momentum)
    plan = FreezePlan.from_params(params.train, len(model.stages))
    path = layout.checkpoint if checkpoint else None  # None: a layout or caller that writes no checkpoint
    run_root = path.parent / "run-features" if path is not None else None  # kept with the checkpoint
    features = feature_spec(model.name, prepared.pixels, params.train, layout.features, run_root)
    spec = TrainerSpec(model, prepared, params.train, plan, normalization(params.train.backbone), features,
                       path, reference)
    return Trainer(spec, callbacks)


def with_lr(params: Params, lr: float) -> Params:
    return replace(params, train=replace(params.train, lr=float(lr)))


def find_learning_rate(params: Params, prepared: Prepared, layout: Layout) -> LrFindResult:
    """The range test on the trainable part of `params.train` (a throwaway trainer: nothing is written
    but the frozen-feature cache, which the training that follows reuses)."""
    trainer = build_trainer(with_lr(params, FINDER_PLACEHOLDER_LR), prepared, layout, [], checkpoint=False)
    return find_lr(trainer, params.train.lr_find)


def resolve_lr(params: Params, prepared: Prepared, layout: Layout, resume: bool,
               callbacks: list[Callback]) -> Params:
    """train.lr=auto becomes the lr finder's suggestion (a resumed run keeps the one it started with)."""
    if params.train.lr != "auto":
        return params
    if resume and layout.checkpoint.exists():
        saved = load_trusted(layout.checkpoint).get("lr")
        if isinstance(saved, float):
            return with_lr(params, saved)
    result = find_learning_rate(params, prepared, layout)
    CallbackList(callbacks).on_lr_found(result)
    return with_lr(params, result.suggestion)


def probe_head_accuracy(params: Params, prepared: Prepared, layout: Layout) -> float:
    """Best val accuracy of the head alone (PROBE_EPOCHS epochs on cached, un-augmented features)."""
    t = params.train
    probe = replace(t, freeze=replace(t.freeze, strategy="head"), epochs=PROBE_EPOCHS, guard_epochs=0,
                    augment=replace(t.augment, enabled=False), augment_views=0, early_stopping=0)
    return build_trainer(replace(params, train=probe), prepared, layout, [], checkpoint=False).run().best_val_accuracy


def run_training(params: Params, root: Path = Path("."), resume: bool = False,
                 callbacks: list[Callback] | None = None, progress=None) -> dict:
    """Prepare (or reuse) the data, train, evaluate on val and test, write model + reports."""
    validate_params(params)
    world = distributed.init_distributed(params.train.device)  # under torchrun: join the group
    layout = Layout(Path(root))
    with distributed.main_first():  # rank 0 decodes the images once, the others open its cache
        prepared = open_prepared(params, layout, progress if world.is_main else None)
    params = resolve_lr(params, prepared, layout, resume, (callbacks or []) if world.is_main else [])
    reference = lambda: probe_head_accuracy(params, prepared, layout)  # noqa: E731 - asked for lazily
    trainer = build_trainer(params, prepared, layout, callbacks or [], reference=reference)
    if resume:
        if not layout.checkpoint.exists():
            raise UserError(f"{layout.checkpoint}: no checkpoint to resume from; run without --resume")
        trainer.load_checkpoint(layout.checkpoint)
    result = trainer.run()
    trainer.restore_best()
    test_logits = trainer.predict_split_logits("test")
    y_test = prepared.labels[prepared.split["test"]]
    test = summarize_predictions(y_test, test_logits.argmax(1).numpy(), prepared.classes)
    metrics = summarize_run(result, test["accuracy"], params, prepared) | {"processes": world.size} | \
        work_done(prepared, trainer)
    if world.is_main:
        write_outputs(trainer, prepared, params, metrics, result, layout)
    distributed.barrier()  # the others return once the outputs exist
    return metrics


def run_lr_find(params: Params, root: Path = Path("."), progress=None) -> LrFindResult:
    """`freezeflow lr-find`: prepare (or reuse) the data, run the range test, write reports/lr_find.json."""
    validate_params(params)
    layout = Layout(Path(root))
    result = find_learning_rate(params, open_prepared(params, layout, progress), layout)
    write_json_atomic(layout.reports / "lr_find.json", result.to_dict())
    return result


def summarize_run(result: TrainResult, test_accuracy: float, params: Params, prepared: Prepared) -> dict:
    hist = result.history
    best = hist[result.best_epoch - 1] if result.best_epoch else hist[-1]
    images = sum(r.images_per_s * r.epoch_time_s for r in hist)
    return {
        "val_accuracy": best.val_accuracy,
        "val_loss": best.val_loss,
        "test_accuracy": test_accuracy,
        "epochs": len(hist),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "epoch_time_s": [round(r.epoch_time_s, 4) for r in hist],
        "train_time_s": round(result.train_time_s, 4),
        "images_per_s": round(images / max(result.train_time_s, 1e-9), 2),
        "data_wait_fraction": round(float(np.mean([r.data_wait_fraction for r in hist])), 4),
        "feature_cache": any(r.from_cache for r in hist),
        "lr": params.train.lr,
        "divergence": result.extra.get("divergence"),
        "backbone": params.train.backbone,
        "strategy": params.train.freeze.strategy,
        "dataset": prepared.name,
        "data_hash": prepared.data_hash,
        "classes": len(prepared.classes),
    }


def work_done(prepared: Prepared, trainer: Trainer) -> dict:
    """What this run computed rather than reused: decoded images, feature rows (this process's), and their time."""
    cache = trainer.cache
    return {"images_decoded": prepared.decoded, "prepare_s": prepared.seconds,
            "feature_rows_computed": cache.rows_computed if cache else 0,
            "feature_build_s": round(cache.build_seconds, 4) if cache else 0.0}


def write_outputs(trainer: Trainer, prepared: Prepared, params: Params, metrics: dict, result: TrainResult,
                  layout: Layout) -> None:
    mean, std = normalization(params.train.backbone)
    info = ModelInfo(params.train.backbone, prepared.classes, prepared.image_size, mean, std, prepared.data_hash)
    save_model(trainer.model, info, layout.models)
    dump_params(params, layout.models / "params.yaml")
    write_json_atomic(layout.reports / "metrics.json", metrics)
    history = [{k: v for k, v in asdict(r).items() if k != "lrs"} | {f"{k}": v for k, v in r.lrs.items()}
               for r in result.history]
    write_json_atomic(layout.reports / "history.json", history)  # a list of rows: what `dvc plots` reads


def main(argv: list[str] | None = None) -> int:
    """Bare-box entry point: python -m freezeflow.core.train [-S file.key=value ...] [--resume]."""
    parser = argparse.ArgumentParser(prog="python -m freezeflow.core.train", description=__doc__)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="FILE.KEY=VALUE")
    parser.add_argument("--params", default="params")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.set)
        metrics = run_training(params, Path(os.getcwd()), resume=args.resume)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        distributed.close_distributed()
    if distributed.is_main_process():
        print(json.dumps({k: metrics[k] for k in ("val_accuracy", "test_accuracy", "train_time_s", "processes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
