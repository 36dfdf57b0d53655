"""training_pipeline: check_data -> prepare -> [tune] -> train -> evaluate -> register."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from freezeflow.app.steps import record_dvc_lock
from tasks.data import check_data_task, prepare_task
from tasks.train import evaluate_task, register_task, train_task


@flow(name="training_pipeline", log_prints=True)
def training_pipeline(params_dir: str = "params", overrides: list[str] | None = None, tune: bool = False,
                      allow_dirty_data: bool = False, root: str = ".", promote_margin: float = 0.0,
                      register_model: bool = True, force_promotion: bool = False) -> dict:
    """The whole pipeline on the project at `root`; returns metrics, eval and registry decision.
    `force_promotion` makes the new model champion whatever the gate says (the reason still says it)."""
    root = str(Path(root).resolve())
    overrides = list(overrides or [])
    params_dir = str(Path(root) / params_dir) if not Path(params_dir).is_absolute() else params_dir
    data_info = check_data_task(root, params_dir, overrides, allow_dirty_data)
    prepared = prepare_task(root, params_dir, overrides, data_info)
    if tune:
        from tasks.tune import tune_task

        tune_task(root, params_dir, overrides)
        overrides = [*overrides, "train.use_best=true"]
    metrics = train_task(root, params_dir, overrides, allow_dirty_data)
    evaluation = evaluate_task(root, params_dir, overrides)
    decision = None
    if register_model:
        decision = register_task(root, params_dir, overrides, metrics["run_id"], promote_margin, force_promotion)
    stages = ["prepare", *(["tune"] if tune else []), "train", "evaluate"]  # dvc.yaml's names
    dvc_lock = record_dvc_lock(Path(root), params_dir, overrides, stages, data_info)
    return {"prepared": prepared, "metrics": {k: metrics[k] for k in ("val_accuracy", "test_accuracy",
                                                                        "train_time_s", "run_id")},
            "evaluation": evaluation, "registry": decision, "dvc_lock": dvc_lock}

