"""scheduled_retraining: retrain only when the data changed since the champion; promote only if better."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.training import training_pipeline
from tasks.data import check_data_task


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def champion_task(root: str, name: str) -> dict | None:
    """The registered champion of dataset `name` (version, run, val metric, data hash), if any."""
    from freezeflow.integrations.registry import champion_info
    from freezeflow.integrations.tracking import resolve_tracking_uri

    return champion_info(name, resolve_tracking_uri(Path(root)))


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
    from freezeflow.core.params import load_params

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
        register_with_pool(name, cron, parameters, pool)
        print(f"deployment {name} registered with work pool {pool}: run `prefect worker start --pool {pool}`")
        return
    scheduled_retraining.serve(name=name, cron=cron, parameters=parameters)


def api_url_for_pool() -> str:
    """A work pool lives on a Prefect server: the ephemeral in-process API would forget it on exit."""
    from prefect.settings import PREFECT_API_URL

    from freezeflow.core.errors import UserError

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError("--pool needs a Prefect server: set PREFECT_API_URL=http://HOST:4200/api "
                        "(start one with `freezeflow server prefect`)")
    return url


def ensure_work_pool(pool: str) -> None:
    """Create `pool` as a process pool when missing, so one command sets up a team's schedule."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))


def register_with_pool(name: str, cron: str, parameters: dict, pool: str):
    """The deployment names the flow by module (`flows.retrain`), not by a path relative to this folder,
    so a worker on any machine with freezeflow installed finds it; it runs in the project folder."""
    import httpx
    from prefect.deployments.runner import EntrypointType

    from freezeflow.core.errors import UserError

    url = api_url_for_pool()
    try:
        ensure_work_pool(pool)
        deployment = scheduled_retraining.to_deployment(
            name=name, cron=cron, parameters=parameters, work_pool_name=pool,
            entrypoint_type=EntrypointType.MODULE_PATH, job_variables={"working_dir": parameters["root"]})
        return deployment.apply()
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the Prefect server at {url} (PREFECT_API_URL): {exc}; "
                        "start it with `freezeflow server prefect`") from None
