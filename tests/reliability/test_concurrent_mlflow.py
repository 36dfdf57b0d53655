"""Concurrent writers: 8 processes log to one MLflow store at once; nothing is lost."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import free_port

WRITER = textwrap.dedent('''
    import sys, tempfile, os
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from freezeflow.integrations.tracking import ensure_experiment
    uri, worker, artifacts = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
    client = MlflowClient(uri)
    exp = ensure_experiment(client, "concurrent", artifacts)
    run = client.create_run(exp, run_name=f"writer-{worker}")
    for step in range(100):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"note-{worker}.txt")
        open(path, "w").write(f"writer {worker}")
        client.log_artifact(run.info.run_id, path)
    client.set_terminated(run.info.run_id, "FINISHED")
''')


def run_writers(uri: str, artifacts: str = "", n: int = 8) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(i), artifacts], stderr=subprocess.PIPE,
                              text=True)
             for i in range(n)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    failed = [(p.returncode, e[-800:]) for p, e in zip(procs, errors) if p.returncode != 0]
    assert not failed, failed


def check_runs(uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 100
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == [f"note-{r.info.run_name.split('-')[1]}.txt"]


@pytest.mark.slow
def test_eight_writers_on_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    from mlflow import MlflowClient

    MlflowClient(uri).search_experiments()  # create the schema once, before the writers race
    run_writers(uri, (tmp_path / "artifacts").as_uri())
    check_runs(uri)


def fresh_postgres_db(name: str) -> str | None:
    """A new, empty database on the local server; None when no server answers."""
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres", connect_timeout=3)
    except Exception:
        return None
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"


@pytest.mark.slow
@pytest.mark.postgres
def test_eight_writers_through_an_mlflow_server_on_postgres(tmp_path):
    backend = fresh_postgres_db("freezeflow_mlflow_concurrency")
    if backend is None:
        pytest.skip("no PostgreSQL server answers on 127.0.0.1:5432 (user postgres, database test)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", backend, "--artifacts-destination", str(tmp_path / "artifacts"),
                               "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-2000:]
                time.sleep(0.5)
        run_writers(uri)
        check_runs(uri)
    finally:
        server.terminate()
        server.wait(timeout=30)
