"""servers: start a team's MLflow tracking server and Prefect server (an adapter; stdlib only here,
the servers themselves are the `mlflow` and `prefect` CLIs run as child processes).

`mlflow_spec` / `prefect_spec` check the options and build the command line, its environment and
the URLs clients use; `start_server` / `wait_until_healthy` / `stop_server` run one in the
background (tests); `serve` runs one in the foreground until Ctrl-C (`freezeflow server ...`).
Every bad option is a one-line UserError naming the option and what is allowed.

Credentials, with the servers' own mechanisms: on any host but 127.0.0.1/::1/localhost (or with
--auth) MLflow runs its basic-auth app and Prefect checks PREFECT_SERVER_API_AUTH_STRING; --no-auth
is the one way to an open server on a network interface, and it warns. Secrets (the admin password,
the auth string, database URLs) reach the child through its environment, never its command line:
`ps` shows argv to every user of the machine, /proc/PID/environ only to the same user and root.
"""

from __future__ import annotations

import base64
import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from freezeflow.core.errors import UserError
from freezeflow.integrations.secrets import find_secret, mask_text, mask_url

LOCALHOST = "127.0.0.1"
MLFLOW_PORT = 5000
PREFECT_PORT = 4200
# no usage analytics from servers a team runs; models are never unpickled on the server
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
              "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
MLFLOW_STORES = "postgresql[+psycopg2]://USER@HOST:PORT/DB or sqlite:///PATH"
PREFECT_DATABASES = "postgresql+asyncpg://USER@HOST:PORT/DB or sqlite+aiosqlite:///PATH"
ARTIFACT_SCHEMES = ("s3", "gs", "wasbs", "file")
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # the hosts no other machine reaches: open by default
# where the credentials come from (first set wins); a file option, when given, wins over all of them
MLFLOW_ADMIN_PASSWORD_ENVS = ("FREEZEFLOW_MLFLOW_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD")
MLFLOW_ADMIN_USERNAME_ENVS = ("FREEZEFLOW_MLFLOW_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_USERNAME")
PREFECT_AUTH_ENVS = ("FREEZEFLOW_PREFECT_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING")
MLFLOW_LOGIN = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
PREFECT_LOGIN = "PREFECT_API_AUTH_STRING"


@dataclass(frozen=True)
class ServerSpec:
    """What to run (`command` with `env` added to ours), where clients reach it and how to check it."""

    name: str
    command: list[str]
    env: dict[str, str]
    health_url: str
    client_env: dict[str, str]
    unset_env: tuple[str, ...] = field(default=())
    login: str | None = None  # what clients set besides client_env when auth is on (names, never values)
    warning: str | None = None  # printed before the server starts (--no-auth on a network interface)
    private_dir: str | None = None  # the auth config's folder, removed when the server stops


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


def check_backend_store_uri(uri: str, option: str = "--backend-store-uri") -> str:
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


# ---- credentials ---------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Exactly the names no other machine reaches; any other address (0.0.0.0, a LAN IP, even another
    127.x address) counts as a network interface: the safe side of the rule."""
    return host.strip("[]").lower() in LOOPBACK


def auth_enabled(auth: bool | None, host: str) -> bool:
    """--auth / --no-auth as given; by default on exactly when the host is not loopback."""
    return (not is_loopback(host)) if auth is None else auth


def why_auth(auth: bool | None, host: str) -> str:
    return "--auth" if auth else f"--host {host} (a network interface: auth is on)"


def open_warning(name: str, host: str, port: int, enabled: bool) -> str | None:
    """The one line an open server on a network interface prints (only --no-auth gets there)."""
    if enabled or is_loopback(host):
        return None
    return (f"warning: --no-auth: the {name} server on {host}:{port} lets anyone who can reach it read and "
            "write, with no credentials")


def require_secret(file: Path | None, option: str, envs: tuple[str, ...], reason: str, what: str) -> str:
    """The secret from `file` or the environment, or a one-line error saying what to set."""
    found = find_secret(file, option, envs)
    if found is None:
        raise UserError(f"{reason} needs {what}: set {' or '.join(envs)}, or pass {option} PATH "
                        "(never on the command line); --no-auth runs an open server")
    return found[0]


def auth_database_for(store: str, auth_database: str | None) -> str:
    """Where the basic-auth app keeps its users (password hashes) and permissions: `auth_database`, else
    basic_auth.db beside a sqlite store, else the same PostgreSQL database as the runs (its tables -
    users, *_permissions, alembic_version_auth - share no name with MLflow's)."""
    if auth_database:
        return check_backend_store_uri(auth_database, "--auth-database")
    if store.startswith("sqlite:///"):
        return f"sqlite:///{Path(store.removeprefix('sqlite:///').split('?')[0]).with_name('basic_auth.db')}"
    return store


def write_auth_config(database_uri: str, username: str) -> Path:
    """MLflow's basic_auth.ini (read from MLFLOW_AUTH_CONFIG_PATH): the auth database and the default
    permission have no environment variable. It holds no password (that travels in
    MLFLOW_AUTH_ADMIN_PASSWORD) but may hold the auth database's URL: a private folder (0700, from
    mkdtemp), the file 0600. It must stay while the server runs: uvicorn restarts a dead worker, which
    reads it again; `serve` removes the folder when the server stops."""
    folder = Path(tempfile.mkdtemp(prefix="freezeflow-mlflow-auth-"))
    path = folder / "basic_auth.ini"
    escape = lambda value: value.replace("%", "%%")  # noqa: E731  (configparser interpolates %)
    text = ("[mlflow]\n"
            "# written by `freezeflow server mlflow`: authenticated users may read everything, and edit what\n"
            "# they create or are granted; the admin grants more through MLflow's permissions API\n"
            "default_permission = READ\n"
            f"database_uri = {escape(database_uri)}\n"
            f"admin_username = {escape(username)}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as out:
        out.write(text)
    return path


def mlflow_admin_password(password_file: Path | None, reason: str) -> str:
    """The admin password MLflow's basic-auth app creates its admin user with (at its first start; it
    keeps a salted hash, and ignores the password once the user exists)."""
    try:
        import flask_wtf  # noqa: F401  (mlflow's basic-auth app imports it)
    except ImportError:
        raise UserError(f"{reason}: MLflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'") from None
    return require_secret(password_file, "--admin-password-file", MLFLOW_ADMIN_PASSWORD_ENVS, reason,
                          "an admin password for MLflow's basic auth")


def mlflow_auth(database: str, password: str) -> tuple[dict, Path]:
    """The basic-auth app's environment (admin login, Flask secret key, config path) and its config file."""
    username = next((os.environ[n] for n in MLFLOW_ADMIN_USERNAME_ENVS if os.environ.get(n)), "admin")
    make_folders(database)
    # the CSRF key of the sign-up form; every worker must share it: one per start unless one is set
    secret_key = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32)
    config = write_auth_config(database, username)
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_USERNAME": username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key}, config


def mlflow_spec(backend_store_uri: str, artifacts: str, host: str = LOCALHOST, port: int = MLFLOW_PORT,
                workers: int = 2, auth: bool | None = None, allowed_hosts: str | None = None,
                admin_password_file: Path | None = None, auth_database: str | None = None) -> ServerSpec:
    """`mlflow server` on a SQL store, proxying artifacts (clients need no bucket credentials); with
    MLflow's basic-auth app when auth_enabled(auth, host)."""
    if workers < 1:
        raise UserError(f"--workers {workers}: not allowed; allowed: 1 or more")
    check_port_free(host, port)  # first: the checks below may create folders
    store = check_backend_store_uri(backend_store_uri)
    destination = check_artifacts(artifacts)
    enabled = auth_enabled(auth, host)
    # before any folder: a missing password leaves nothing behind
    password = mlflow_admin_password(admin_password_file, why_auth(auth, host)) if enabled else None
    auth_db = auth_database_for(store, auth_database) if enabled else None
    make_folders(store, destination)  # only now: a failed check leaves nothing behind
    # the store (it may carry a database password) through mlflow's own MLFLOW_BACKEND_STORE_URI, not argv
    env = {**SERVER_ENV, "MLFLOW_BACKEND_STORE_URI": store}
    command = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--artifacts-destination",
               destination, "--host", host, "--port", str(port), "--workers", str(workers)]
    config = None
    if password is not None and auth_db is not None:
        auth_env, config = mlflow_auth(auth_db, password)
        env.update(auth_env)
        command += ["--app-name", "basic-auth"]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    return ServerSpec("mlflow", command, env, f"http://{local_host(host)}:{port}/health",
                      {"MLFLOW_TRACKING_URI": f"http://{client_host(host)}:{port}"},
                      unset_env=("MLFLOW_TRACKING_URI", *MLFLOW_ADMIN_PASSWORD_ENVS),
                      login=f"{MLFLOW_LOGIN} (a user of this server; the admin is "
                            f"{env['MLFLOW_AUTH_ADMIN_USERNAME']})" if enabled else None,
                      warning=open_warning("MLflow", host, port, enabled),
                      private_dir=str(config.parent) if config else None)


def prefect_spec(host: str = LOCALHOST, port: int = PREFECT_PORT, database: str | None = None,
                 auth: bool | None = None, auth_string_file: Path | None = None) -> ServerSpec:
    """`prefect server start`; its database is Prefect's own sqlite file unless `database` is given; the
    API checks PREFECT_SERVER_API_AUTH_STRING (HTTP basic auth) when auth_enabled(auth, host)."""
    check_port_free(host, port)
    enabled = auth_enabled(auth, host)
    env = dict(SERVER_ENV)
    if enabled:  # Prefect's own check: every API call but GET /api/health and /api/ready needs it
        env["PREFECT_SERVER_API_AUTH_STRING"] = require_secret(
            auth_string_file, "--auth-string-file", PREFECT_AUTH_ENVS, why_auth(auth, host),
            "an API auth string for Prefect (USER:PASSWORD)")
    if database:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = check_prefect_database(database)
        make_folders(database)
    api_url = f"http://{client_host(host)}:{port}/api"
    if client_host(host) != host:  # the UI's browser code must call the API by a name others resolve
        env["PREFECT_UI_API_URL"] = api_url
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
               "--analytics-off"]
    # a client setting in the server's own environment would make it talk to another API; with auth off,
    # an auth string inherited from the shell would make the server other than what was printed
    unset = ("PREFECT_API_URL", "FREEZEFLOW_PREFECT_AUTH_STRING") + (() if enabled else
                                                                    ("PREFECT_SERVER_API_AUTH_STRING",))
    return ServerSpec("prefect", command, env, f"http://{local_host(host)}:{port}/api/health",
                      {"PREFECT_API_URL": api_url}, unset_env=unset,
                      login=f"{PREFECT_LOGIN} (the server's auth string)" if enabled else None,
                      warning=open_warning("Prefect", host, port, enabled))


# ---- clients -------------------------------------------------------------------------------------

def check_prefect_login(api_url: str, auth_string: str | None, timeout: float = 10.0) -> None:
    """One GET of admin/version, which (as every API route but health and ready) needs the auth string on
    a protected server: a refusal is one line naming PREFECT_API_AUTH_STRING before anything registers,
    not an httpx traceback. An unreachable server is left to the caller's own message."""
    request = urllib.request.Request(api_url.rstrip("/") + "/admin/version")
    if auth_string:  # what Prefect's client sends: HTTP basic auth with the string as user:password
        request.add_header("Authorization", "Basic " + base64.b64encode(auth_string.encode("utf-8")).decode("ascii"))
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            return
        where = f"the Prefect server at {mask_url(api_url)} (PREFECT_API_URL)"
        if not auth_string:
            raise UserError(f"{where} needs a login: set {PREFECT_LOGIN} to its auth string (USER:PASSWORD)") from None
        raise UserError(f"{where} refused {PREFECT_LOGIN}: set it to the server's auth string "
                        "(PREFECT_SERVER_API_AUTH_STRING there)") from None
    except (urllib.error.URLError, OSError):
        return


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


def ready_line(spec: ServerSpec) -> str:
    """What clients set: the URL, and with auth the names of the credential variables (never values)."""
    exports = " ".join(f"{key}={value}" for key, value in spec.client_env.items())
    login = f"; and set {spec.login}" if spec.login else "; no credentials (auth is off)"
    return mask_text(f"{spec.name} server ready ({spec.health_url}); on each client: export {exports}{login}")


def remove_private_files(spec: ServerSpec) -> None:
    if spec.private_dir:
        shutil.rmtree(spec.private_dir, ignore_errors=True)


def serve(spec: ServerSpec, timeout: float = 180.0) -> int:
    """Run the server in the foreground until Ctrl-C or SIGTERM; say what clients set once it is up."""
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if spec.warning:
        say(spec.warning)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)  # stop the server too, not just us
    try:
        process = start_server(spec)
    except BaseException:
        signal.signal(signal.SIGTERM, previous)
        remove_private_files(spec)
        raise
    try:
        wait_until_healthy(spec.health_url, timeout, process)
        say(ready_line(spec))
        say("Ctrl-C stops it")
        return process.wait()
    except KeyboardInterrupt:
        say(f"stopping the {spec.name} server")
        stop_server(process)
        return 0
    finally:
        if process.poll() is None:
            stop_server(process)
        remove_private_files(spec)
        signal.signal(signal.SIGTERM, previous)
