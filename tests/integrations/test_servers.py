"""Team servers for real: `freezeflow server mlflow` on PostgreSQL with a training logging to it,
`freezeflow server prefect` running a flow, a deployment in a work pool and a process worker, and
one-line errors for bad options. No MLflow or Prefect mocks: real servers on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from freezeflow.core.errors import UserError
from freezeflow.integrations.servers import check_port_free, mlflow_spec, prefect_spec, wait_until_healthy
from tests.conftest import BIN, free_port, run, tiny_overrides, write_shapes_dataset

FREEZEFLOW = str(BIN / "freezeflow")
PG = {"host": "127.0.0.1", "port": 5432, "dbname": "test", "user": "postgres"}


def postgres_admin():
    """An autocommit connection to the local server, or a skip saying why there is none."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        conn = psycopg2.connect(**PG, connect_timeout=3)
    except psycopg2.Error as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 (user postgres, database test): "
                    f"{str(exc).strip().splitlines()[0]}")
    conn.autocommit = True
    return conn


@pytest.fixture
def postgres_db():
    """A fresh database for one test, dropped afterwards."""
    name = f"freezeflow_servers_{uuid.uuid4().hex[:10]}"
    conn = postgres_admin()
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


def start_cli_server(args: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`freezeflow server ...` as a user runs it, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([FREEZEFLOW, "server", *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def wait_for_ready(process: subprocess.Popen, log: Path, health_url: str) -> str:
    """Wait until the server answers and freezeflow printed its ready line; returns that line."""
    try:
        wait_until_healthy(health_url, 180, process)
        deadline = time.monotonic() + 30
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    except UserError:
        pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
    return next(line for line in log.read_text().splitlines() if "server ready" in line)


def stop_cli_server(process: subprocess.Popen, port: int, log: Path) -> None:
    """Ctrl-C (SIGINT) to freezeflow: it stops the server, exits 0 and frees the port."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    check_port_free("127.0.0.1", port)  # nothing left listening


@pytest.mark.slow
@pytest.mark.postgres
def test_training_logs_to_an_mlflow_server_on_postgres(project, postgres_db, tmp_path):
    from mlflow import MlflowClient

    from freezeflow.integrations.tracking import tracking_scope

    port, artifacts, log = free_port(), tmp_path / "artifacts", tmp_path / "mlflow-server.log"
    server = start_cli_server(["mlflow", "--backend-store-uri", postgres_db, "--artifacts", str(artifacts),
                               "--port", str(port)], project, log)
    uri = f"http://127.0.0.1:{port}"
    try:
        assert f"MLFLOW_TRACKING_URI={uri}" in wait_for_ready(server, log, f"{uri}/health")
        data = write_shapes_dataset(project / "data" / "shapes", classes=3, per_class=10)
        sets = [a for s in tiny_overrides(data, **{"train.epochs": 2}) for a in ("-S", s)]
        run([FREEZEFLOW, "train", *sets], project, {**os.environ, "MLFLOW_TRACKING_URI": uri})

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("shapes")
        [finished] = client.search_runs([experiment.experiment_id])
        run_id = finished.info.run_id
        assert finished.info.status == "FINISHED" and finished.data.params["train.epochs"] == "2"
        for key in ("val_accuracy", "train_loss", "time_per_epoch_s"):  # one point per epoch
            assert len(client.get_metric_history(run_id, key)) == 2, key
        # runs:/ model URIs resolve through mlflow's global URI, not the client's: point it at the server
        with tracking_scope(uri):
            assert {"model/MLmodel", "model/artifacts"} <= \
                {a.path for a in client.list_artifacts(run_id, "model")}
        # proxied artifacts: the files sit in the server's folder (the run's plots under its id, the
        # logged model under its model id), not in the project
        model_id = finished.data.tags["model_id"]
        files = sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*") if p.is_file())
        assert any(model_id in f and f.endswith("MLmodel") for f in files), files
        assert any(run_id in f and f.endswith("learning_curves.png") for f in files), files
        assert not (project / "mlflow").exists()  # nothing fell back to the local store
    finally:
        stop_cli_server(server, port, log)


def prefect_client(api_url: str):
    """A sync Prefect client for `api_url` (not the session's test harness)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return get_client(sync_client=True)


@pytest.mark.slow
def test_flow_schedule_and_worker_through_a_prefect_server(dvc_project, tmp_path):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    root, env = dvc_project
    port, log, pool = free_port(), tmp_path / "prefect-server.log", f"pool-{uuid.uuid4().hex[:6]}"
    env = {**env, "PREFECT_HOME": str(tmp_path / "prefect-home")}  # the server's sqlite and settings
    server = start_cli_server(["prefect", "--port", str(port)], root, log, env)
    api = f"http://127.0.0.1:{port}/api"
    try:
        assert f"PREFECT_API_URL={api}" in wait_for_ready(server, log, f"{api}/health")
        client_env = {**env, "PREFECT_API_URL": api}
        run([FREEZEFLOW, "pipeline"], root, client_env)  # the training flow, orchestrated by the server
        with prefect_client(api) as client:
            [flow_run] = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["training_pipeline"])))
            assert flow_run.state.is_completed(), flow_run.state

        printed = run([FREEZEFLOW, "schedule", "--pool", pool, "--cron", "0 3 * * 1"], root, client_env).stdout
        assert f"work pool {pool}" in printed
        with prefect_client(api) as client:
            deployment = client.read_deployment_by_name("scheduled_retraining/freezeflow-retrain")
            assert deployment.work_pool_name == pool and client.read_work_pool(pool).type == "process"
            assert deployment.schedules[0].schedule.cron == "0 3 * * 1"
            assert deployment.entrypoint == "flows.retrain.scheduled_retraining"  # found on any machine
            queued = client.create_flow_run_from_deployment(deployment.id)
        # a process worker, as on any team machine: picks the run up, runs it, exits
        run([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"], tmp_path, client_env)
        with prefect_client(api) as client:
            done = client.read_flow_run(queued.id)
        assert done.state.is_completed(), done.state  # data unchanged since the champion: no retraining
    finally:
        stop_cli_server(server, port, log)


# ---- bad options: one line, exit 2, nothing started -----------------------------------------------

def run_server_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([FREEZEFLOW, "server", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_bad_server_options_are_one_line_errors(tmp_path):
    dead = free_port()  # nothing listens there
    unreachable = run_server_cli(["mlflow", "--backend-store-uri",
                                  f"postgresql+psycopg2://postgres@127.0.0.1:{dead}/mlflow"], tmp_path).stderr
    assert f"cannot reach PostgreSQL at 127.0.0.1:{dead}: start it or pass --backend-store-uri sqlite:///" \
        in unreachable
    assert "allowed: postgresql" in run_server_cli(["mlflow", "--backend-store-uri", "mysql://u@h/db"], tmp_path).stderr
    bad_artifacts = run_server_cli(["mlflow", "--artifacts", "ftp://host/x"], tmp_path).stderr
    assert "--artifacts ftp://host/x: not allowed; allowed: a folder" in bad_artifacts
    (tmp_path / "a-file").write_text("x")
    assert "is a file" in run_server_cli(["mlflow", "--artifacts", str(tmp_path / "a-file")], tmp_path).stderr
    sync_driver = run_server_cli(["prefect", "--database", "postgresql+psycopg2://u@127.0.0.1/db"], tmp_path).stderr
    assert "postgresql+asyncpg://" in sync_driver
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for kind in ("mlflow", "prefect"):
            busy = run_server_cli([kind, "--port", str(port)], tmp_path).stderr
            assert f"--port {port}: 127.0.0.1:{port} is already in use" in busy
    assert not (tmp_path / "mlflow").exists()  # failed checks leave no folders behind


def test_server_commands_and_client_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEZEFLOW_PREFECT_AUTH_STRING", "team:pw")  # 0.0.0.0 turns auth on (test_server_auth.py)
    spec = mlflow_spec(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"), port=free_port(), workers=3)
    assert spec.command[1:4] == ["-m", "mlflow", "server"] and "--serve-artifacts" in spec.command
    assert spec.command[spec.command.index("--workers") + 1] == "3"
    assert spec.client_env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert spec.env["MLFLOW_DISABLE_TELEMETRY"] == "true" and "MLFLOW_TRACKING_URI" in spec.unset_env
    everywhere = prefect_spec("0.0.0.0", free_port())
    assert everywhere.health_url.startswith("http://127.0.0.1:")  # checked locally, used by name
    assert everywhere.client_env["PREFECT_API_URL"] == everywhere.env["PREFECT_UI_API_URL"]
    assert socket.gethostname() in everywhere.client_env["PREFECT_API_URL"]
    assert everywhere.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    database = f"sqlite+aiosqlite:///{tmp_path}/prefect/prefect.db"
    assert prefect_spec(port=free_port(), database=database).env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == database
    assert (tmp_path / "prefect").is_dir() and (tmp_path / "artifacts").is_dir()
