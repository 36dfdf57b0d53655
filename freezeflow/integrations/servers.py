"""servers: start a team's MLflow tracking server and Prefect server (an adapter; stdlib only here,
the servers themselves are the `mlflow` and `prefect` CLIs run as child processes).

`mlflow_spec` / `prefect_spec` check the options and build the command line, its environment and
the URLs clients use; `start_server` / `wait_until_healthy` / `stop_server` run one in the
background (tests); `serve` runs one in the foreground until Ctrl-C (`freezeflow server ...`).
Every bad option is a one-line UserError naming the option and what is allowed.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from freezeflow.core.errors import UserError
from freezeflow.integrations.secrets import mask_text, mask_url

LOCALHOST = "127.0.0.1"
MLFLOW_PORT = 5000
PREFECT_PORT = 4200
# no usage analytics from servers a team runs; models are never unpickled on the server
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
              "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
MLFLOW_STORES = "postgresql[+psycopg2]://USER@HOST:PORT/DB or sqlite:///PATH"
PREFECT_DATABASES = "postgresql+asyncpg://USER@HOST:PORT/DB or sqlite+aiosqlite:///PATH"
ARTIFACT_SCHEMES = ("s3", "gs", "wasbs", "file")


@dataclass(frozen=True)
class ServerSpec:
    """What to run (`command` with `env` added to ours), where clients reach it and how to check it."""

    name: str
    command: list[str]
    env: dict[str, str]
    health_url: str
    client_env: dict[str, str]
    unset_env: tuple[str, ...] = field(default=())


# ---- checks --------------------------------------------------------------------------------------

def check_port_free(host: str, port: int, option: str = "--port") -> None:
    """Bind once to learn now, not from a server's traceback, that host:port is taken or unusable."""
    if not 1 <= port <= 65535:
        raise UserError(f"{option} {port}: not allowed; allowed: 1-65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # as the servers do: closed connections in TIME_WAIT do not count, only a listener does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror:
            raise UserError(f"--host {host}: not an address of this machine; allowed: 127.0.0.1 (this machine "
                            "only), 0.0.0.0 (every interface) or one of its IP addresses") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"{option} {port}: {host}:{port} is already in use (another server?); "
                                f"stop it or pick another with {option}") from None
            raise UserError(f"--host {host}: cannot listen on {host}:{port}: {exc.strerror}") from None


def split_db_url(url: str, option: str) -> tuple[str, str, int, str, str | None, str | None]:
    """(scheme, host, port, database, user, password) of a database URL."""
    parts = urlsplit(url)
    try:
        port = parts.port or 5432
    except ValueError:
        raise UserError(f"{option} {mask_url(url)}: the port is not a number") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not database:
        raise UserError(f"{option} {mask_url(url)}: needs a host and a database name, e.g. "
                        "postgresql+psycopg2://mlflow@db.example:5432/mlflow")
    return (parts.scheme, parts.hostname, port, database, unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None)


def check_postgres(url: str, option: str) -> None:
    """Connect once, so an unreachable server or a missing database is one line before anything starts."""
    _, host, port, database, user, password = split_db_url(url, option)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        raise UserError(f"cannot reach PostgreSQL at {host}:{port}: start it or pass "
                        f"{option} sqlite:///...") from None
    try:
        import psycopg2
    except ImportError:  # the server's own driver reports problems then
        return
    try:
        psycopg2.connect(host=host, port=port, dbname=database, user=user, password=password,
                         connect_timeout=5).close()
    except psycopg2.Error as exc:
        first = mask_text(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        raise UserError(f"{option} {mask_url(url)}: PostgreSQL at {host}:{port} refused: {first} "
                        f"(create the database with `createdb -h {host} -p {port} {database}`?)") from None


def check_sqlite_url(url: str, prefix: str, option: str) -> str:
    """An absolute sqlite URL (servers may run from any folder); make_folders creates its folder."""
    path = url.removeprefix(prefix).split("?")[0]
    if not path:
        raise UserError(f"{option} {url}: needs a file, e.g. {prefix}mlflow/mlflow.db")
    file = Path(path).expanduser().resolve()
    if file.is_dir():
        raise UserError(f"{option} {url}: {file} is a folder; allowed: a database file")
    return f"{prefix}{file}"


def check_backend_store_uri(uri: str) -> str:
    option = "--backend-store-uri"
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("postgresql", "postgresql+psycopg2"):
        check_postgres(uri, option)
        return uri
    if scheme == "sqlite" and uri.startswith("sqlite:///"):
        return check_sqlite_url(uri, "sqlite:///", option)
    raise UserError(f"{option} {mask_url(uri)}: not allowed; allowed: {MLFLOW_STORES}")


def check_artifacts(dest: str) -> str:
    """A local folder (made absolute) or an object-store URI whose client library is installed."""
    option = "--artifacts"
    scheme = dest.split("://", 1)[0] if "://" in dest else ""
    if not scheme:
        folder = Path(dest).expanduser().resolve()
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{option} {dest}: {folder} is a file; allowed: a folder or s3://BUCKET/PREFIX")
        return str(folder)
    if scheme not in ARTIFACT_SCHEMES or not dest.split("://", 1)[1].strip("/"):
        raise UserError(f"{option} {dest}: not allowed; allowed: a folder, file:///PATH or "
                        "s3://BUCKET/PREFIX (also gs://, wasbs://)")
    needs = {"s3": ("boto3", "boto3"), "gs": ("google.cloud.storage", "google-cloud-storage"),
             "wasbs": ("azure.storage.blob", "azure-storage-blob")}.get(scheme)
    if needs:
        try:
            __import__(needs[0])
        except ImportError:
            raise UserError(f"{option} {dest}: the server needs {needs[1]} for {scheme}:// artifacts: "
                            f"pip install {needs[1]}") from None
    return dest


def check_prefect_database(url: str) -> str:
    """Prefect's server talks to its database asynchronously: asyncpg or aiosqlite URLs only."""
    option = "--database"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "postgresql+asyncpg":
        try:
            import asyncpg  # noqa: F401  (a dependency of prefect; checked for a clear line)
        except ImportError:
            raise UserError(f"{option}: postgresql+asyncpg needs asyncpg: pip install asyncpg") from None
        check_postgres(url, option)
        return url
    if scheme == "sqlite+aiosqlite" and url.startswith("sqlite+aiosqlite:///"):
        return check_sqlite_url(url, "sqlite+aiosqlite:///", option)
    hint = " (Prefect needs the async driver: postgresql+asyncpg://)" if scheme.startswith("postgresql") else ""
    raise UserError(f"{option} {mask_url(url)}: not allowed{hint}; allowed: {PREFECT_DATABASES}")


def make_folders(*locations: str) -> None:
    """The folders of sqlite files and of local artifact destinations (servers do not create them)."""
    for location in locations:
        if location.startswith(("sqlite:///", "sqlite+aiosqlite:///")):
            Path(location.split(":///", 1)[1].split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
        elif "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)


# ---- command lines -------------------------------------------------------------------------------

def client_host(host: str) -> str:
    """The name clients use: this machine's hostname when the server listens on every interface."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def local_host(host: str) -> str:
    """Where this machine checks health: loopback when listening everywhere, else the address itself."""
    if host in ("0.0.0.0", ""):
        return LOCALHOST
    return "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)


def mlflow_spec(backend_store_uri: str, artifacts: str, host: str = LOCALHOST, port: int = MLFLOW_PORT,
                workers: int = 2, auth: bool = False, allowed_hosts: str | None = None) -> ServerSpec:
    """`mlflow server` on a SQL store, proxying artifacts (clients need no bucket credentials)."""
    if workers < 1:
        raise UserError(f"--workers {workers}: not allowed; allowed: 1 or more")
    check_port_free(host, port)  # first: the checks below may create folders
    store = check_backend_store_uri(backend_store_uri)
    destination = check_artifacts(artifacts)
    make_folders(store, destination)  # only now: a failed check leaves nothing behind
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--serve-artifacts",
               "--artifacts-destination", destination, "--host", host, "--port", str(port),
               "--workers", str(workers)]
    if auth:
        try:
            import flask_wtf  # noqa: F401  (mlflow's basic-auth app imports it)
        except ImportError:
            raise UserError("--auth: MLflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'") from None
        command += ["--app-name", "basic-auth"]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    return ServerSpec("mlflow", command, dict(SERVER_ENV), f"http://{local_host(host)}:{port}/health",
                      {"MLFLOW_TRACKING_URI": f"http://{client_host(host)}:{port}"},
                      unset_env=("MLFLOW_TRACKING_URI",))


def prefect_spec(host: str = LOCALHOST, port: int = PREFECT_PORT, database: str | None = None) -> ServerSpec:
    """`prefect server start`; its database is Prefect's own sqlite file unless `database` is given."""
    check_port_free(host, port)
    env = dict(SERVER_ENV)
    if database:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = check_prefect_database(database)
        make_folders(database)
    api_url = f"http://{client_host(host)}:{port}/api"
    if client_host(host) != host:  # the UI's browser code must call the API by a name others resolve
        env["PREFECT_UI_API_URL"] = api_url
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
               "--analytics-off"]
    # a client setting in the server's own environment would make it talk to another API
    return ServerSpec("prefect", command, env, f"http://{local_host(host)}:{port}/api/health",
                      {"PREFECT_API_URL": api_url}, unset_env=("PREFECT_API_URL",))


# ---- running -------------------------------------------------------------------------------------

def server_env(spec: ServerSpec) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in spec.unset_env}
    return {**env, **spec.env}


def start_server(spec: ServerSpec, log: Path | None = None) -> subprocess.Popen:
    """The server in the background, in its own process group so that stop_server also ends the
    web workers it forks. Output goes to `log` (or is inherited)."""
    out = open(log, "ab") if log else None
    try:
        return subprocess.Popen(spec.command, env=server_env(spec), stdout=out, stderr=subprocess.STDOUT if out
                                else None, start_new_session=True)
    finally:
        if out:
            out.close()  # the child holds its own descriptor


def wait_until_healthy(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll the health endpoint (MLflow: /health, Prefect: /api/health) until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if process is not None and process.poll() is not None:
            raise UserError(f"the server exited with code {process.returncode} before {url} answered "
                            "(see its output above)")
        if time.monotonic() > deadline:
            raise UserError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:  # already gone
        pass


def stop_server(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM to the server's process group; SIGKILL if it is still there after `timeout`."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait()
    signal_group(process, signal.SIGKILL)  # web workers that outlived their parent
    return process.returncode


def raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(spec: ServerSpec, timeout: float = 180.0) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM; say what clients set once it is up."""
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, raise_interrupt)  # stop the server too, not just us
    process = start_server(spec)
    try:
        wait_until_healthy(spec.health_url, timeout, process)
        exports = " ".join(f"{key}={value}" for key, value in spec.client_env.items())
        say(f"{spec.name} server ready ({spec.health_url}); on each client: export {exports}")
        say("Ctrl-C stops it")
        return process.wait()
    except KeyboardInterrupt:
        say(f"stopping the {spec.name} server")
        stop_server(process)
        return 0
    finally:
        if process.poll() is None:
            stop_server(process)
        signal.signal(signal.SIGTERM, previous)
