"""Team servers with credentials, for real: `freezeflow server mlflow` with MLflow's basic-auth app and
`freezeflow server prefect` with Prefect's API auth string, started on 127.0.0.1 with --auth forced on;
401s for no and wrong credentials, a training that logs and registers with the right ones, a
deployment and a worker that authenticate from the environment; no secret in any command line
(`ps`) nor in any file the commands write. The Optuna storage URL from the environment or a file,
masked everywhere (PostgreSQL). No MLflow, Prefect or database mocks."""

from __future__ import annotations

import base64
import os
import secrets
import stat
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from freezeflow.core.errors import UserError
from freezeflow.integrations.secrets import find_secret, mask_text, read_secret
from freezeflow.integrations.servers import (MLFLOW_ADMIN_PASSWORD_ENVS, MLFLOW_ADMIN_USERNAME_ENVS,
                                             PREFECT_AUTH_ENVS, mlflow_spec, prefect_spec, remove_private_files)
from tests.conftest import BIN, free_port, run, tiny_overrides, write_shapes_dataset
from tests.integrations.test_servers import postgres_admin, start_cli_server, stop_cli_server, wait_for_ready

FREEZEFLOW = str(BIN / "freezeflow")
# what a developer's shell may hold: every test starts from an environment without any of it
CREDENTIAL_ENVS = (*MLFLOW_ADMIN_PASSWORD_ENVS, *MLFLOW_ADMIN_USERNAME_ENVS, *PREFECT_AUTH_ENVS,
                   "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY", "PREFECT_API_URL", "MLFLOW_TRACKING_URI",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_CONFIG_PATH",
                   "PREFECT_SERVER_DATABASE_CONNECTION_URL", "FREEZEFLOW_OPTUNA_STORAGE",
                   "FREEZEFLOW_OPTUNA_STORAGE_FILE")


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENVS}, **extra}


@pytest.fixture
def no_credentials(monkeypatch):
    for name in CREDENTIAL_ENVS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


# ---- what the tests look at: status codes, command lines, files ------------------------------------

def http_status(url: str, login: str | None = None, method: str = "GET") -> int:
    """The status of one request, with HTTP basic auth `user:password` when given."""
    request = urllib.request.Request(url, method=method)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # a busy machine: hashing is slow
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc (what ps reads)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(entry.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def assert_not_in_command_lines(root: int, secret: str, server_words: str) -> list[int]:
    """The secret is in no argv of the server's process tree, nor anywhere in `ps` (every process, full
    width); returns the tree. `server_words` must appear in one of them (we looked at the real server)."""
    tree = process_tree(root)
    lines = [cmdline(pid) for pid in tree]
    # freezeflow and the server (MLflow also forks uvicorn workers; Prefect serves in-process)
    assert len(tree) >= 2 and any(server_words in line for line in lines), lines
    assert not [line for line in lines if secret in line]
    ps = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, timeout=30).stdout
    assert str(root) in ps and secret not in ps
    return tree


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def files_holding(secret: str, *folders: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Files under `folders` whose bytes hold the secret, as written or as a basic-auth header carries it."""
    needles = [secret.encode(), base64.b64encode(secret.encode())]
    found = []
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and not path.is_symlink() and path not in skip:
                data = path.read_bytes()
                if any(needle in data for needle in needles):
                    found.append(path)
    return found


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def run_failing(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """A command that must stop with one user error: exit 2, no traceback, the error as the last line."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last_line(proc).startswith("error: "), proc.stderr[-3000:]
    return proc


# ---- fast: options, specs, messages ---------------------------------------------------------------

def test_network_hosts_turn_auth_on_and_loopback_stays_open(tmp_path, no_credentials):
    password = "pw-" + secrets.token_urlsafe(12)
    no_credentials.setenv("FREEZEFLOW_MLFLOW_ADMIN_PASSWORD", password)
    no_credentials.setenv("FREEZEFLOW_PREFECT_AUTH_STRING", f"team:{password}")
    store = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    everywhere = mlflow_spec(store, str(tmp_path / "artifacts"), "0.0.0.0", free_port())
    try:
        assert everywhere.command[-2:] == ["--app-name", "basic-auth"] and everywhere.warning is None
        assert not [arg for arg in everywhere.command if password in arg or "sqlite" in arg]  # secrets: env only
        assert everywhere.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == password
        assert everywhere.env["MLFLOW_BACKEND_STORE_URI"] == store
        config = Path(everywhere.env["MLFLOW_AUTH_CONFIG_PATH"])
        assert stat.S_IMODE(config.stat().st_mode) == 0o600 and stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        assert password not in config.read_text()
        assert f"database_uri = sqlite:///{tmp_path}/mlflow/basic_auth.db" in config.read_text()
        assert "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in everywhere.login
        assert "FREEZEFLOW_MLFLOW_ADMIN_PASSWORD" in everywhere.unset_env  # only MLflow's own name travels
    finally:
        remove_private_files(everywhere)
    assert not config.parent.exists()

    local = mlflow_spec(store, str(tmp_path / "artifacts"), "127.0.0.1", free_port())
    assert "--app-name" not in local.command and local.login is None and local.warning is None
    assert local.private_dir is None and "MLFLOW_AUTH_ADMIN_PASSWORD" not in local.env
    open_one = mlflow_spec(store, str(tmp_path / "artifacts"), "0.0.0.0", 5999, auth=False)
    assert "--app-name" not in open_one.command
    assert open_one.warning == ("warning: --no-auth: the MLflow server on 0.0.0.0:5999 lets anyone who can "
                                "reach it read and write, with no credentials")

    prefect = prefect_spec("0.0.0.0", free_port())
    assert prefect.env["PREFECT_SERVER_API_AUTH_STRING"] == f"team:{password}" and prefect.warning is None
    assert "PREFECT_API_AUTH_STRING" in prefect.login and not [a for a in prefect.command if password in a]
    open_prefect = prefect_spec("0.0.0.0", 5998, auth=False)
    assert "PREFECT_SERVER_API_AUTH_STRING" not in open_prefect.env
    assert "PREFECT_SERVER_API_AUTH_STRING" in open_prefect.unset_env  # not inherited from the shell either
    assert open_prefect.warning.startswith("warning: --no-auth: the Prefect server on 0.0.0.0:5998 lets anyone")
    assert prefect_spec("localhost", free_port()).login is None


def run_server_cli(args: list[str], cwd: Path, env: dict) -> str:
    """`freezeflow server ...` that must refuse to start: exactly one line, exit 2; returns it."""
    proc = subprocess.run([FREEZEFLOW, "server", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip()


def test_a_network_host_without_credentials_is_a_one_line_error(tmp_path):
    env = clean_env()
    mlflow = run_server_cli(["mlflow", "--host", "0.0.0.0", "--port", str(free_port())], tmp_path, env)
    assert mlflow == ("error: --host 0.0.0.0 (a network interface: auth is on) needs an admin password for "
                      "MLflow's basic auth: set FREEZEFLOW_MLFLOW_ADMIN_PASSWORD or MLFLOW_AUTH_ADMIN_PASSWORD, "
                      "or pass --admin-password-file PATH (never on the command line); --no-auth runs an open server")
    prefect = run_server_cli(["prefect", "--host", "0.0.0.0", "--port", str(free_port())], tmp_path, env)
    assert "needs an API auth string for Prefect (USER:PASSWORD): set FREEZEFLOW_PREFECT_AUTH_STRING or " \
           "PREFECT_SERVER_API_AUTH_STRING, or pass --auth-string-file PATH" in prefect
    missing = run_server_cli(["mlflow", "--auth", "--admin-password-file", str(tmp_path / "nope")], tmp_path, env)
    assert f"--admin-password-file {tmp_path / 'nope'}: cannot read it (No such file or directory)" in missing
    empty = write_private(tmp_path / "empty", "")
    assert "its first line is empty" in run_server_cli(["prefect", "--auth", "--auth-string-file", str(empty)],
                                                       tmp_path, env)
    assert not (tmp_path / "mlflow").exists()  # nothing was created


def wait_for_line(log: Path, prefix: str, process: subprocess.Popen, timeout: float = 90) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if line.startswith(prefix)]
        if lines:
            return lines
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    pytest.fail(f"no {prefix!r} line:\n{log.read_text()[-3000:]}")


def test_no_auth_on_a_network_interface_warns(tmp_path):
    """127.0.0.2 is not one of 127.0.0.1/::1/localhost, so it counts as a network interface (the rule errs
    on the safe side), and no other machine can reach a server the test opens there."""
    for kind, name in (("mlflow", "MLflow"), ("prefect", "Prefect")):
        port, log = free_port(), tmp_path / f"{kind}.log"
        env = clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
        server = start_cli_server([kind, "--host", "127.0.0.2", "--no-auth", "--port", str(port)], tmp_path, log, env)
        try:
            assert wait_for_line(log, "warning:", server) == [
                f"warning: --no-auth: the {name} server on 127.0.0.2:{port} lets anyone who can reach it read "
                "and write, with no credentials"]
        finally:
            stop_cli_server(server, port, log)


def test_secrets_come_from_a_file_or_the_environment_and_are_masked(tmp_path, no_credentials):
    file = write_private(tmp_path / "pw", " spaced pw ")
    assert read_secret(file, "--x-file") == " spaced pw "  # the newline goes, spaces may be the password's
    no_credentials.setenv("B", "from-b")
    assert find_secret(None, "--x-file", ("A", "B")) == ("from-b", "B")
    assert find_secret(file, "--x-file", ("A", "B")) == (" spaced pw ", f"--x-file {file}")  # the file wins
    assert find_secret(None, "--x-file", ("A",)) is None
    text = ("export MLFLOW_TRACKING_PASSWORD=hunter2 PREFECT_API_AUTH_STRING='team:pw2' max_tokens=5 "
            "Authorization: Basic dGVhbTpwdzI= host=db password=pw3 at http://u:pw4@h:5000")
    assert mask_text(text) == ("export MLFLOW_TRACKING_PASSWORD=*** PREFECT_API_AUTH_STRING=*** max_tokens=5 "
                               "Authorization: Basic *** host=db password=*** at http://u:***@h:5000")


def test_mlflow_login_errors_name_what_is_missing(no_credentials):
    from freezeflow.integrations.tracking import login_error

    uri = "http://tracking:5000"
    assert login_error(uri) == ("the MLflow server at http://tracking:5000 (MLFLOW_TRACKING_URI) needs a login: "
                                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a user of that server)")
    no_credentials.setenv("MLFLOW_TRACKING_USERNAME", "ana")
    assert login_error(uri).endswith("needs a login: set MLFLOW_TRACKING_PASSWORD (a user of that server)")
    no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    assert "refused the login of MLFLOW_TRACKING_USERNAME=ana: check MLFLOW_TRACKING_PASSWORD" in login_error(uri)
    assert "wrong" not in login_error(uri) and "***" in login_error("http://ana:pw@tracking:5000")


def test_optuna_storage_comes_from_the_environment_or_a_file(project, no_credentials, capsys, tmp_path):
    from freezeflow.integrations.tune import resolve_settings, storage_error

    def storage() -> str:
        return resolve_settings(project, "params", [], None, None, None, None)[0].storage

    url = "postgresql+psycopg2://optuna:s3cret@db.example:5432/optuna"
    no_credentials.setenv("FREEZEFLOW_OPTUNA_STORAGE_FILE", str(write_private(tmp_path / "storage", url)))
    assert storage() == url
    no_credentials.setenv("FREEZEFLOW_OPTUNA_STORAGE", "sqlite:///x.db")  # the variable before the file
    assert storage() == "sqlite:///x.db" and capsys.readouterr().err == ""  # from the environment: no warning
    assert resolve_settings(project, "params", [], None, url, None, None)[0].storage == url  # --storage first
    warned = capsys.readouterr().err
    assert warned.startswith("warning: --storage carries a password") and "s3cret" not in warned
    assert "FREEZEFLOW_OPTUNA_STORAGE or FREEZEFLOW_OPTUNA_STORAGE_FILE, or the password in PGPASSWORD" in warned
    no_credentials.setenv("FREEZEFLOW_OPTUNA_STORAGE", "redis://u:pw@h")
    with pytest.raises(UserError, match=r"^FREEZEFLOW_OPTUNA_STORAGE: 'redis://u:\*\*\*@h' is not allowed"):
        storage()
    # the real PostgreSQL here trusts every login, so a refusal is libpq's text as psycopg2 raises it
    refused = RuntimeError('(psycopg2.OperationalError) connection to server at "db.example", port 5432 failed: '
                           'FATAL:  password authentication failed for user "optuna"')
    message = storage_error(url, refused)
    assert message.startswith("Optuna storage postgresql+psycopg2://optuna:***@db.example:5432/optuna: the "
                              "database refused the login (") and "s3cret" not in message
    assert message.endswith("set the password in PGPASSWORD or ~/.pgpass, or the whole URL in "
                            "FREEZEFLOW_OPTUNA_STORAGE or FREEZEFLOW_OPTUNA_STORAGE_FILE")


# ---- slow: real servers with auth on --------------------------------------------------------------

def mlflow_auth_config(tree: list[int]) -> Path:
    """The basic_auth.ini the `mlflow server` process was given (through its environment)."""
    [server] = [pid for pid in tree if " mlflow server " in cmdline(pid)]
    return Path(environ_of(server)["MLFLOW_AUTH_CONFIG_PATH"])


@pytest.mark.slow
def test_mlflow_basic_auth_on_a_real_server(project, tmp_path, no_credentials):
    from mlflow import MlflowClient

    from freezeflow.integrations.registry import register_model
    from freezeflow.integrations.tracking import resolve_tracking_uri

    password = "pw-" + secrets.token_urlsafe(12)
    password_file = write_private(tmp_path / "secrets" / "mlflow-admin", password)
    port, log, uri = free_port(), tmp_path / "mlflow-server.log", None
    server = start_cli_server(["mlflow", "--auth", "--port", str(port), "--workers", "1",
                               "--admin-password-file", str(password_file)], project, log, clean_env())
    uri = f"http://127.0.0.1:{port}"
    try:
        ready = wait_for_ready(server, log, f"{uri}/health")
        assert "and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in ready and password not in ready
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(search) == 401 and http_status(search, "admin:wrong") == 401
        assert http_status(search, f"admin:{password}") == 200
        config = mlflow_auth_config(assert_not_in_command_lines(server.pid, password, " mlflow server "))
        assert stat.S_IMODE(config.stat().st_mode) == 0o600 and stat.S_IMODE(config.parent.stat().st_mode) == 0o700

        data = write_shapes_dataset(project / "data" / "shapes", classes=3, per_class=10)
        train = [FREEZEFLOW, "train", *[a for s in tiny_overrides(data, **{"train.epochs": 2}) for a in ("-S", s)]]
        nobody = run_failing(train, project, clean_env(MLFLOW_TRACKING_URI=uri))
        assert last_line(nobody) == (f"error: the MLflow server at {uri} (MLFLOW_TRACKING_URI) needs a login: set "
                                     "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a user of that server)")
        login = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        for key, value in {**login, "MLFLOW_TRACKING_PASSWORD": "wrong"}.items():  # in-process: one start less
            no_credentials.setenv(key, value)
        with pytest.raises(UserError, match="refused the login of MLFLOW_TRACKING_USERNAME=admin: check "
                                            "MLFLOW_TRACKING_PASSWORD") as wrong:
            resolve_tracking_uri(project)
        trained = run(train, project, clean_env(**login))

        no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(uri)
        [finished] = client.search_runs([client.get_experiment_by_name("shapes").experiment_id])
        assert finished.info.status == "FINISHED" and finished.data.params["train.epochs"] == "2"
        assert register_model(finished.info.run_id, "shapes", "champion", uri) == 1
        assert client.get_model_version_by_alias("shapes", "champion").run_id == finished.info.run_id
        logged = [*finished.data.tags.values(), *finished.data.params.values()]
        assert not [value for value in logged if password in value]
        assert password not in trained.stdout + trained.stderr + nobody.stderr + str(wrong.value)
    finally:
        stop_cli_server(server, port, log)
    assert not config.parent.exists()  # the private config went with the server
    # every file the server and the training wrote: the store, the users' database (a salted hash), the
    # artifacts, models/, reports/, the server's log
    assert (project / "mlflow" / "basic_auth.db").is_file()
    assert files_holding(password, project, tmp_path, skip=(password_file,)) == []


def prefect_client(api_url: str, auth_string: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth_string}):
        return get_client(sync_client=True)


@pytest.mark.slow
def test_prefect_auth_string_on_a_real_server(project, tmp_path):
    auth = f"team:{secrets.token_urlsafe(12)}"
    port, log, pool = free_port(), tmp_path / "prefect-server.log", f"pool-{uuid.uuid4().hex[:6]}"
    server_env = clean_env(PREFECT_HOME=str(tmp_path / "server-home"), FREEZEFLOW_PREFECT_AUTH_STRING=auth)
    server = start_cli_server(["prefect", "--auth", "--port", str(port)], project, log, server_env)
    api = f"http://127.0.0.1:{port}/api"
    try:
        ready = wait_for_ready(server, log, f"{api}/health")
        assert "and set PREFECT_API_AUTH_STRING" in ready and auth not in ready
        assert http_status(f"{api}/admin/version") == 401 and http_status(f"{api}/admin/version", "team:wrong") == 401
        assert http_status(f"{api}/admin/version", auth) == 200 and http_status(f"{api}/health") == 200
        assert_not_in_command_lines(server.pid, auth, " prefect server start ")

        client_env = clean_env(PREFECT_HOME=str(tmp_path / "client-home"), PREFECT_API_URL=api)
        schedule = [FREEZEFLOW, "schedule", "--pool", pool, "--cron", "0 3 * * 1"]
        nobody = run_failing(schedule, project, client_env)
        assert last_line(nobody) == (f"error: the Prefect server at {api} (PREFECT_API_URL) needs a login: set "
                                     "PREFECT_API_AUTH_STRING to its auth string (USER:PASSWORD)")
        wrong = run_failing(schedule, project, {**client_env, "PREFECT_API_AUTH_STRING": "team:wrong"})
        assert f"at {api} (PREFECT_API_URL) refused PREFECT_API_AUTH_STRING" in last_line(wrong)
        client_env["PREFECT_API_AUTH_STRING"] = auth
        assert f"work pool {pool}" in run(schedule, project, client_env).stdout
        # a process worker on a team machine: the same variable, nothing else; it polls the pool once
        run([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"], tmp_path, client_env)
        with prefect_client(api, auth) as client:
            deployment = client.read_deployment_by_name("scheduled_retraining/freezeflow-retrain")
            assert deployment.work_pool_name == pool
            assert client.read_workers_for_work_pool(pool)  # the worker got in
    finally:
        stop_cli_server(server, port, log)
    # Prefect's sqlite database, both PREFECT_HOMEs, the project, the server's log
    assert files_holding(auth, project, tmp_path) == []


@pytest.mark.slow
@pytest.mark.postgres
def test_optuna_storage_from_a_file_is_masked_everywhere(project, tmp_path):
    """`freezeflow tune` on PostgreSQL with the URL (password included) in FREEZEFLOW_OPTUNA_STORAGE_FILE:
    the study runs, and the password is in no output, report, params file or MLflow tag. (The server here
    trusts every login, so the password is carried and masked, not checked.)"""
    from mlflow import MlflowClient

    password = "pw-" + secrets.token_urlsafe(12)
    name = f"freezeflow_auth_{uuid.uuid4().hex[:10]}"
    admin = postgres_admin()
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    url = f"postgresql+psycopg2://postgres:{password}@127.0.0.1:5432/{name}"
    storage_file = write_private(tmp_path / "secrets" / "optuna-storage", url)
    try:
        data = write_shapes_dataset(project / "data" / "shapes", classes=3, per_class=10)
        sets = tiny_overrides(data, **{"train.epochs": 1, "tune.epochs": 1, "train.freeze.strategy": "head",
                                       "tune.space.batch_size.choices": "[8]", "tune.pruner": "none"})
        tune = [FREEZEFLOW, "tune", "--n-trials", "1", "--workers", "1", *[a for s in sets for a in ("-S", s)]]
        env = clean_env(FREEZEFLOW_OPTUNA_STORAGE_FILE=str(storage_file))
        done = run(tune, project, env)
        printed = done.stdout + done.stderr
        assert f"postgres:***@127.0.0.1:5432/{name}" in printed and password not in printed
        report = (project / "reports" / "tune.json").read_text()
        assert f"postgresql+psycopg2://postgres:***@127.0.0.1:5432/{name}" in report
        client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("shapes").experiment_id])
        assert runs and all(password not in value for r in runs for value in r.data.tags.values())
        assert files_holding(password, project, tmp_path, skip=(storage_file,)) == []
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()



def test_ui_refuses_a_network_host_in_one_line(tmp_path):
    """`mlflow ui` has no auth: `freezeflow ui` never opens the store on a network interface."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from freezeflow.app.cli import main; main()", "ui", "--host",
                           "0.0.0.0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--host 0.0.0.0" in lines[0] and "freezeflow server mlflow" in lines[0], proc.stderr
