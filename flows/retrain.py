"""scheduled_retraining: retrain only when the data changed since the champion; promote only if better."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.training import training_pipeline
from tasks.data import check_data_task


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def champion_task(root: str, name: str) -> dict | None:
    """The registered champion of dataset `name` (version, run, val metric, data hash), if any."""
    import mlflow

    from freezeflow.registry import champion_info
    from freezeflow.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(Path(root)))
    return champion_info(name)


def should_retrain(data_hash: str | None, champion: dict | None, force: bool) -> tuple[bool, str]:
    """Pure rule: retrain when forced, when there is no champion, or when the data hash moved."""
    if force:
        return True, "forced"
    if champion is None:
        return True, "no champion yet"
    if data_hash and champion.get("data_hash") == data_hash:
        return False, f"data unchanged since champion v{champion['version']} (md5 {data_hash})"
    return True, f"data changed: {champion.get('data_hash')} -> {data_hash}"


@flow(name="scheduled_retraining", log_prints=True)
def scheduled_retraining(root: str = ".", params_dir: str = "params", overrides: list[str] | None = None,
                         promote_margin: float = 0.0, force: bool = False) -> dict:
    """Check data -> compare with the champion's data hash -> maybe train -> promote or keep."""
    from freezeflow.params import load_params

    root = str(Path(root).resolve())
    overrides = list(overrides or [])
    params_path = str(Path(root) / params_dir)
    data_info = check_data_task(root, params_path, overrides)
    name = Path(load_params(params_path, overrides).data.dir).name
    champion = champion_task(root, name)
    retrain, reason = should_retrain(data_info.get("dvc_hash"), champion, force)
    print(f"retrain: {retrain} ({reason})")
    if not retrain:
        return {"retrained": False, "reason": reason, "champion": champion}
    result = training_pipeline(params_dir=params_path, overrides=overrides, root=root,
                               promote_margin=promote_margin)
    return {"retrained": True, "reason": reason, **result}


def serve_schedule(cron: str, root: str, promote_margin: float, force: bool, pool: str | None = None,
                   name: str = "freezeflow-retrain") -> None:
    """Serve the flow on a cron schedule here, or register it with a work pool for remote workers."""
    parameters = {"root": root, "promote_margin": promote_margin, "force": force}
    if pool:
        deployment = scheduled_retraining.to_deployment(name=name, cron=cron, parameters=parameters,
                                                        work_pool_name=pool)
        deployment.apply()
        print(f"deployment {name} registered with work pool {pool}: run `prefect worker start --pool {pool}`")
        return
    scheduled_retraining.serve(name=name, cron=cron, parameters=parameters)
