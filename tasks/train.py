"""Training, evaluation and registration tasks. Training is never retried (it is not I/O)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from freezeflow.core.params import load_params
from freezeflow.app.steps import evaluate_step, register_step, train_step


def flow_run_tags() -> dict:
    from prefect.runtime import flow_run

    return {"prefect_flow_run_id": str(flow_run.id)} if flow_run.id else {}


@task(retries=0, cache_policy=NO_CACHE)
def train_task(root: str, params_dir: str, overrides: list[str], allow_dirty: bool = False,
               tags: dict | None = None) -> dict:
    """Fine-tune with the configured freezing; logs the run to MLflow; returns metrics + run_id."""
    params = load_params(params_dir, overrides)
    return train_step(params, Path(root), allow_dirty_data=allow_dirty, tags={**flow_run_tags(), **(tags or {})})


@task(retries=0, cache_policy=NO_CACHE)
def evaluate_task(root: str, params_dir: str, overrides: list[str]) -> dict:
    """reports/eval.json on the test split for the model just trained."""
    report = evaluate_step(load_params(params_dir, overrides), Path(root))
    return {k: report[k] for k in ("accuracy", "macro_f1", "split")}


@task(retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=NO_CACHE)
def register_task(root: str, params_dir: str, overrides: list[str], run_id: str, margin: float = 0.0,
                  force: bool = False) -> dict:
    """Register the run's model; promote it to `champion` only if it beats the champion (re-scored on the
    run's val split) by `margin`, or when `force`."""
    return register_step(load_params(params_dir, overrides), Path(root), run_id, margin, force)
