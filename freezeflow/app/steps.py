"""The pipeline's steps as plain functions: the CLI, the DVC stages and the Prefect tasks all call these.

This is an adapter layer (it may use DVC and MLflow); the core it calls stays framework-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from freezeflow.core.errors import UserError
from freezeflow.core.params import Params
from freezeflow.core.layout import Layout, resolve_data_params


def check_data(params: Params, root: Path, allow_dirty: bool = False) -> dict:
    """Refuse data that differs from data.dvc (unless allowed); pull it when it is missing."""
    from freezeflow.integrations.dvc import data_status, is_dvc_repo, pull_data, read_dvc_hash

    data_dir = (root / params.data.dir).resolve()
    dvc_file = root / "data.dvc"
    inside = (root / "data").resolve() in (data_dir, *data_dir.parents)
    if not (is_dvc_repo(root) and dvc_file.exists() and inside):
        return {"tracked": False, "dvc_hash": None}
    if not data_dir.exists():
        pull_data(root)
    status = data_status(root)
    if status and not allow_dirty:
        raise UserError(f"{params.data.dir}: data differs from data.dvc ({describe_status(status)}); run "
                        "`dvc add data` to version the change, `dvc checkout` to restore, or pass --allow-dirty-data")
    return {"tracked": True, "dvc_hash": read_dvc_hash(dvc_file), "dirty": bool(status)}


def describe_status(status: dict) -> str:
    for entries in status.values():
        for entry in entries:
            if isinstance(entry, dict):
                for kind, change in entry.items():
                    return f"{kind}: {change}"
    return "modified"


def record_dvc_lock(root: Path, params_dir: str | Path, overrides: list[str], stages: list[str],
                    data_info: dict | None = None) -> str | None:
    """After the pipeline flow: `dvc commit` the stages it ran, plus the frozen ones (as `dvc repro`
    does), so that `dvc repro` is then a no-op; but only when the run used what dvc.yaml reads:
    params/*.yaml as they are (no -S override that changes a value) and data/ as it was at the start.
    Otherwise dvc.lock is left alone. Returns the one line to print (None outside a DVC project)."""
    from freezeflow.integrations.dvc import commit_stages, frozen_stages, is_dvc_repo

    root = Path(root)
    if not (is_dvc_repo(root) and (root / "dvc.yaml").exists()):
        return None
    reason = lock_mismatch(root, Path(params_dir), list(overrides), data_info)
    if reason:
        return f"dvc.lock not updated: {reason}"
    frozen = [name for name in frozen_stages(root) if name not in stages]
    commit_stages(root, [*stages, *frozen])
    return f"dvc.lock updated: {', '.join(stages)}" + (f" (and frozen {', '.join(frozen)})" if frozen else "")


def lock_mismatch(root: Path, params_dir: Path, overrides: list[str], data_info: dict | None) -> str | None:
    """Why dvc.lock must not record this run, or None: what it ran with is what dvc.yaml reads now."""
    from freezeflow.core.params import load_params

    if params_dir.resolve() != (root / "params").resolve():
        return f"run with params from {params_dir}, while dvc.yaml reads {root / 'params'}"
    ran_with = load_params(params_dir, overrides)
    if overrides and ran_with != load_params(params_dir):
        return (f"run with -S overrides ({' '.join(overrides)}); params/*.yaml stay the source of truth: "
                "write the values there and run `freezeflow pipeline` (or `dvc repro`) to record a run")
    if data_info is not None and check_data(ran_with, root, allow_dirty=True) != data_info:
        return f"{ran_with.data.dir} changed during the run (data.dvc status differs); run it again"
    return None


def prepare_step(params: Params, root: Path, progress: Callable | None = None):
    from freezeflow.core.data.prepare import open_prepared

    return open_prepared(params, Layout(root), progress)


def train_step(params: Params, root: Path, resume: bool = False, track: bool = True,
               allow_dirty_data: bool = False, run_name: str | None = None, tags: dict | None = None,
               callbacks: list | None = None) -> dict:
    """check data -> train (prepares first if needed) -> metrics; logged to MLflow when `track`.

    Under torchrun every rank runs this; rank 0 alone checks the data and logs to MLflow."""
    from freezeflow.core.train.distributed import is_main_process

    main = is_main_process()
    data_info = check_data(params, root, allow_dirty_data) if main else {}
    params = resolve_data_params(params, root)
    if not track or not main:
        from freezeflow.core.train.run import run_training

        return run_training(params, root, resume=resume, callbacks=callbacks)
    from freezeflow.integrations.tracking import tracked_training

    extra = dict(tags or {})
    if data_info.get("dvc_hash"):
        extra["dvc_data_md5"] = data_info["dvc_hash"]
    return tracked_training(params, root, resume=resume, run_name=run_name, extra_tags=extra,
                            callbacks=callbacks or [])


def lr_find_step(params: Params, root: Path, track: bool = True) -> dict:
    """`freezeflow lr-find`: the range test (core), its plot, and an MLflow run holding both."""
    from freezeflow.integrations.plots import plot_lr_find
    from freezeflow.core.train.run import run_lr_find

    params = resolve_data_params(params, root)
    result = run_lr_find(params, root)
    plot = plot_lr_find(result, root / "reports" / "lr_find.png")
    out = {"suggestion": result.suggestion, "plot": str(plot), "report": str(root / "reports" / "lr_find.json"),
           "steps": len(result.lrs), "trainable_stages": result.trainable_stages, "run_id": None}
    if track:
        from freezeflow.integrations.tracking import tracked_lr_find

        out["run_id"] = tracked_lr_find(params, root, result)
    return out


def launch_training(params: Params, root: Path, nproc: int, args: list[str], allow_dirty_data: bool = False,
                    debug: bool = False) -> int:
    """`freezeflow train --nproc N`: check once here (one clear error), then torchrun N ranks of
    `freezeflow train` with the same arguments. Returns torchrun's exit code."""
    import subprocess

    from freezeflow.core.train.distributed import build_launch_command, check_batch_size, World
    from freezeflow.core.train.run import validate_params

    validate_params(params)
    check_batch_size(params.train.batch_size, World(size=nproc))
    check_data(params, root, allow_dirty_data)
    command = build_launch_command(nproc, "freezeflow.app.cli", [*(["--debug"] if debug else []), "train", *args])
    return subprocess.run(command, cwd=root).returncode


def evaluate_step(params: Params, root: Path, model_uri: str | None = None) -> dict:
    from freezeflow.core.infer.evaluate import evaluate_model, write_eval

    prepared = prepare_step(params, root)
    if model_uri:
        from freezeflow.integrations.registry import load_registered

        model, info = load_registered(model_uri)
        report = evaluate_model((model, info), prepared, params.evaluate.split, params.evaluate.batch_size)
    else:
        report = evaluate_model(root / "models", prepared, params.evaluate.split, params.evaluate.batch_size)
    write_eval(report, root / "reports" / "eval.json")
    return report


def register_step(params: Params, root: Path, run_id: str, margin: float = 0.0, force: bool = False) -> dict:
    """Register the run's model; promote it only if it beats the champion, both scored on the run's val split."""
    from dataclasses import replace

    from freezeflow.core.layout import dataset_name
    from freezeflow.integrations.registry import promote_or_keep
    from freezeflow.integrations.tracking import resolve_tracking_uri

    params = resolve_data_params(params, root)
    prepared = prepare_step(params, root)  # the data the run trained on: a cache hit

    def prepared_at(size: int):  # the same files at a champion's other image size (same split: seed, labels)
        return prepare_step(replace(params, data=replace(params.data, image_size=size)), root)

    return promote_or_keep(run_id, dataset_name(params, root), prepared, margin, force, resolve_tracking_uri(root),
                           prepared_at)


def load_step_model(root: Path, model_uri: str | None = None):
    """(model, info) of `--model URI` (the registry's load_registered), else of the project's models/ folder."""
    if model_uri:
        from freezeflow.integrations.registry import load_registered

        return load_registered(model_uri)
    from freezeflow.core.models.io import load_model

    return load_model(Layout(root).models)


def predict_step(root: Path, paths: list[Path], model_uri: str | None = None) -> list[dict]:
    from freezeflow.core.infer.predict import predict_files

    model, info = load_step_model(root, model_uri)
    return predict_files(model, info, [Path(p) for p in paths])


EXPORT_FORMATS = ("onnx",)


def export_step(params: Params, root: Path, model_uri: str | None = None, fmt: str = "onnx",
                out: Path | None = None) -> dict:
    """`freezeflow export --format onnx`: the model (`--model URI`, else models/) as an ONNX file with a dynamic
    batch axis, checked against PyTorch on the prepared val images at the model's size (integrations.onnx_export,
    the code training runs for serve.runtime onnx); with a URI, the file and the parity figure go to the run
    that logged the model. UserError (one line) when it cannot export or misses parity."""
    if fmt not in EXPORT_FORMATS:  # before the imports below (torch, onnx): a typo answers at once
        raise UserError(f"--format: {fmt!r} is not allowed; allowed: {', '.join(EXPORT_FORMATS)}")
    from dataclasses import replace

    from freezeflow.integrations.onnx_export import export_onnx, parity_pixels

    model, info = load_step_model(root, model_uri)
    params = resolve_data_params(params, root)
    prepared = prepare_step(replace(params, data=replace(params.data, image_size=info.image_size)), root)
    pixels = parity_pixels(prepared)
    path = Path(root) / out if out else Layout(root).exports / "model.onnx"
    parity = export_onnx(model, info, pixels, path, name=f"{model_uri or Layout(root).models} ({info.backbone})")
    run_id = None
    if model_uri:
        from freezeflow.integrations.registry import run_id_of
        from freezeflow.integrations.tracking import log_onnx_export

        run_id = run_id_of(model_uri)
        log_onnx_export(run_id, path, parity)
    return {"path": str(path), "parity": parity, "images": int(len(pixels)), "run_id": run_id}


def plan_step(root: Path, params_dir: str, overrides: list[str], n_trials: int | None) -> dict:
    """`freezeflow tune --plan`: each configuration's predicted cost and the sweep's, printed and written to
    reports/tune_plan.json; nothing trains (the data is prepared, or found prepared, for its split sizes)."""
    from freezeflow.core.io import write_json_atomic
    from freezeflow.core.params import load_params
    from freezeflow.integrations.tune_plan import format_plan, plan_sweep

    params = resolve_data_params(load_params(root / params_dir, overrides), root)
    plan = plan_sweep(params, prepare_step(params, root), n_trials or params.tune.n_trials)
    print("\n".join(format_plan(plan)), flush=True)
    write_json_atomic(root / "reports" / "tune_plan.json", plan)
    return plan


def tune_step(root: Path, params_dir: str, overrides: list[str], workers: int | None, storage: str | None,
              study: str | None, gpus: str | None, n_trials: int | None) -> dict:
    """`freezeflow tune`: run_tune with the terminal's progress bar, then one summary line."""
    from freezeflow.app.progress import SweepProgress
    from freezeflow.integrations.tune import run_tune

    summary = run_tune(root, params_dir, overrides, workers, storage, study, gpus, n_trials, progress=SweepProgress)
    if summary["best_value"] is None:
        print(f"study {summary['study_name']}: no complete trial; params/best.yaml unchanged", flush=True)
    else:
        print(f"best val_accuracy {summary['best_value']:.4f} (trial #{summary['best_trial']}) "
              f"{summary['best_train']} -> params/best.yaml, reports/tune.json", flush=True)
    return summary
