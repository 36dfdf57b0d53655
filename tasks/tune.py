"""The tuning task: a thin adapter over freezeflow.integrations.tune (the same core `freezeflow tune` calls)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from freezeflow.integrations.tune import run_tune


@task(retries=0, cache_policy=NO_CACHE)
def tune_task(root: str, params_dir: str, overrides: list[str]) -> dict:
    """Run the Optuna study (tune.workers processes) until its budget is done; writes params/best.yaml
    and reports/tune.json; returns the summary. Never retried: a rerun continues the same study."""
    return run_tune(Path(root), params_dir, list(overrides))
