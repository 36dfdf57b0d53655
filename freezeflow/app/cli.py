"""The `freezeflow` command line: a thin adapter over the core functions (typer + rich).

Every error a user can cause prints one line and exits 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from freezeflow.core.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="freezeflow: fast, repeatable CNN transfer learning (DVC + Prefect + MLflow + Optuna).")
data_app = typer.Typer(no_args_is_help=True, help="Materialize bundled datasets.")
app.add_typer(data_app, name="data")
server_app = typer.Typer(no_args_is_help=True, help="Team servers: MLflow tracking, Prefect orchestration.")
app.add_typer(server_app, name="server")
cache_app = typer.Typer(no_args_is_help=True, help="The frozen-feature cache (cache/features): list and prune it.")
app.add_typer(cache_app, name="cache")

STATE = {"debug": False}
DISK_ERRORS = {errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EPERM, errno.EFBIG}
SET_HELP = "Override a param: FILE.KEY=VALUE, e.g. -S train.lr=0.001 -S data.image_size=96 (repeatable)."
ROOT = Path(".")


def echo(msg: str) -> None:
    typer.echo(msg, err=True)


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    STATE["debug"] = debug


def load(sets: list[str] | None, params_dir: str = "params"):
    from freezeflow.core.params import load_params

    return load_params(ROOT / params_dir, sets or [])


def make_progress(label: str):
    """Progress as a rich bar on a terminal, else a line every 10% (CI logs stay readable)."""
    from freezeflow.app.progress import progress_printer

    return progress_printer(label)


@data_app.command("digits")
def data_digits(dest: Path = typer.Option(Path("data/digits"), help="Where to write the ImageFolder tree."),
                track: bool = typer.Option(True, help="`dvc add data` afterwards (updates data.dvc).")) -> None:
    """Write scikit-learn's 1,797 handwritten digits as PNGs (byte-identical everywhere).

    Example: freezeflow data digits
    """
    from freezeflow.app.sample_data import write_digits
    from freezeflow.integrations.dvc import track_data

    info = write_digits(ROOT / dest)
    echo(f"digits: {info['images']} images, {info['classes']} classes in {dest} ({info['written']} written)")
    if track and dest.parts[0] == "data":
        digest = track_data(ROOT, "data")
        if digest:
            echo(f"data.dvc: md5 {digest}")


@app.command()
def ingest(src: Path = typer.Argument(..., help="Folder with one subfolder per class."),
           name: Optional[str] = typer.Option(None, help="Dataset name (default: the folder's name)."),
           sets: Optional[List[str]] = typer.Option(None, "--set", "-S", help=SET_HELP),
           track: bool = typer.Option(True, help="`dvc add data` afterwards (updates data.dvc).")) -> None:
    """Check, clean and bring a user's ImageFolder under data/NAME (bad files to quarantine/NAME).

    Example: freezeflow ingest ~/photos/defects --name defects
    """
    from freezeflow.core.data.folders import ingest_folder
    from freezeflow.integrations.dvc import track_data
    from freezeflow.core.io import write_json_atomic

    params = load(sets).data
    name = name or src.resolve().name
    report = ingest_folder(src, ROOT / "data" / name, ROOT / "quarantine" / name, params.max_pixels,
                           params.min_side, params.imbalance_warn, make_progress(f"ingest {name}"))
    write_json_atomic(ROOT / "reports" / "ingest.json", report.to_dict())
    for item in report.rejected:
        echo(f"rejected: {src / item['file']}: {item['reason']} -> quarantine/{name}/{item['file']}")
    for cls, count in report.classes.items():
        echo(f"  {cls}: {count} images")
    for reason, count in report.rejected_by_reason.items():
        echo(f"  rejected ({reason}): {count}  -> quarantine/{name}")
    for warning in report.warnings:
        echo(f"warning: {warning}")
    if track:
        track_data(ROOT, "data")
    echo(f"ingested into data/{name}; report: reports/ingest.json; train with -S data.dir=data/{name}")


@app.command()
def prepare(sets: Optional[List[str]] = typer.Option(None, "--set", "-S", help=SET_HELP)) -> None:
    """Decode and resize every image once into the memory-mapped cache (prepared/).

    Example: freezeflow prepare -S data.image_size=96
    """
    from freezeflow.app.steps import prepare_step

    prepared = prepare_step(load(sets), ROOT, make_progress("prepare"))
    echo(f"prepared {len(prepared.labels)} images of {len(prepared.classes)} classes at "
         f"{prepared.image_size}px -> {prepared.root}")


@app.command()
def train(sets: Optional[List[str]] = typer.Option(None, "--set", "-S", help=SET_HELP),
          resume: bool = typer.Option(False, "--resume", help="Continue from checkpoints/last.pt."),
          track: bool = typer.Option(True, help="Log the run to MLflow."),
          allow_dirty_data: bool = typer.Option(False, help="Train even if data/ differs from data.dvc."),
          nproc: int = typer.Option(1, "--nproc", help="Data-parallel processes (torchrun): one per GPU, or "
                                    "CPU processes with gloo.")) -> None:
    """Fine-tune a pretrained backbone with the configured freezing; writes models/ and reports/.

    Example: freezeflow train -S train.freeze.strategy=until -S train.freeze.until=4 -S train.epochs=5
    Example: freezeflow train --nproc 4   (DistributedDataParallel on 4 GPUs; same as torchrun
             --nproc-per-node 4 -m freezeflow.app.cli train)
    """
    from freezeflow.core.train.distributed import is_main_process
    from freezeflow.app.steps import launch_training, train_step
    from freezeflow.app.progress import EpochProgress

    params = load(sets)
    if nproc != 1:
        args = [*(f"-S{s}" for s in sets or []), *(["--resume"] if resume else []),
                *([] if track else ["--no-track"]), *(["--allow-dirty-data"] if allow_dirty_data else [])]
        raise typer.Exit(launch_training(params, ROOT, nproc, args, allow_dirty_data, STATE["debug"]))
    with EpochProgress(params.train.epochs) as progress:
        metrics = train_step(params, ROOT, resume=resume, track=track, allow_dirty_data=allow_dirty_data,
                             callbacks=[progress])
    if not is_main_process():
        return
    echo(f"val_accuracy {metrics['val_accuracy']:.4f}  test_accuracy {metrics['test_accuracy']:.4f}  "
         f"train_time {metrics['train_time_s']:.1f}s  -> models/, reports/metrics.json")


@app.command("lr-find")
def lr_find(sets: Optional[List[str]] = typer.Option(None, "--set", "-S", help=SET_HELP),
            track: bool = typer.Option(True, help="Log the range test to MLflow.")) -> None:
    """Learning-rate range test on the trainable part: a suggested lr and reports/lr_find.png.

    Example: freezeflow lr-find -S train.freeze.strategy=until   (then -S train.lr=<suggestion>, or train.lr=auto)
    """
    from freezeflow.app.steps import lr_find_step

    out = lr_find_step(load(sets), ROOT, track=track)
    echo(f"suggested lr {out['suggestion']:.3g} for the head ({out['steps']} steps over "
         f"{', '.join(out['trainable_stages'])}) -> {out['plot']}, {out['report']}"
         + (f"; MLflow run {out['run_id']}" if out["run_id"] else ""))
    echo(f"train with it: -S train.lr={out['suggestion']:.3g}  (or -S train.lr=auto to run the test each time)")


@app.command()
def evaluate(model: Optional[str] = typer.Option(None, help="models:/NAME@alias, a run id, or a folder."),
             sets: Optional[List[str]] = typer.Option(None, "--set", "-S", help=SET_HELP)) -> None:
    """Score a trained model on the test split: reports/eval.json (accuracy, macro-F1, per class).

    Example: freezeflow evaluate --model models:/digits@champion
    """
    from freezeflow.app.steps import evaluate_step

    report = evaluate_step(load(sets), ROOT, model)
    echo(f"{report['split']} accuracy {report['accuracy']:.4f}  macro_f1 {report['macro_f1']:.4f} "
         "-> reports/eval.json")


@app.command()
def predict(paths: List[Path] = typer.Argument(..., help="Image files or folders."),
            model: Optional[str] = typer.Option(None, help="models:/NAME@champion, a run id, or a folder."),
            as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Print label and probability per image; a bad image gets its own error line.

    Example: freezeflow predict photo1.jpg photos/ --model models:/digits@champion --json
    """
    from freezeflow.app.steps import predict_step

    for row in predict_step(ROOT, paths, model):
        if as_json:
            typer.echo(json.dumps(row))
        elif "error" in row:
            typer.echo(f"{row['file']}\terror: {row['error']}")
        else:
            typer.echo(f"{row['file']}\t{row['label']}\t{row['probability']:.4f}")


@app.command()
def export(fmt: str = typer.Option("onnx", "--format", help="onnx (the one format)."),
           model: Optional[str] = typer.Option(None, help="models:/NAME@alias, a run id, or a folder (default: models/)."),
           out: Optional[Path] = typer.Option(None, "--out", help="File to write (default: exports/model.onnx)."),
           sets: Optional[List[str]] = typer.Option(None, "--set", "-S", help=SET_HELP)) -> None:
    """Export a trained model to ONNX (dynamic batch axis), checked against PyTorch on the val images.

    Example: freezeflow export --format onnx --model models:/digits@champion
    """
    from freezeflow.app.steps import export_step

    done = export_step(load(sets), ROOT, model, fmt, out)
    logged = (f"logged to MLflow run {done['run_id']} (onnx/, onnx_parity_max_abs_diff)" if done["run_id"] else
              "not logged to MLflow (a model folder has no run; --model models:/NAME@champion logs to its run)")
    echo(f"{done['path']}: max abs diff of probabilities vs PyTorch {done['parity']:.2e} on {done['images']} "
         f"val images; {logged}")


@app.command()
def pipeline(sets: Optional[List[str]] = typer.Option(None, "--set", "-S", help=SET_HELP),
             tune: bool = typer.Option(False, help="Run the Optuna study before training."),
             allow_dirty_data: bool = typer.Option(False, help="Train even if data/ differs from data.dvc."),
             force: bool = typer.Option(False, "--force", help="Promote the new model to champion even if it does "
                                        "not beat the champion or the class set changed.")) -> None:
    """Run the Prefect flow: check_data -> prepare -> (tune) -> train -> evaluate -> register.

    dvc.lock records the run only when it used params/*.yaml as they are: after -S overrides it is
    left alone (one line says so).

    Example: freezeflow pipeline -S train.epochs=5
    """
    # the flow's temporary Prefect server creates its database on a fresh PREFECT_HOME: Prefect's 20 s
    # default is too short for that on a small, busy machine (seen here: "Timed out ... ephemeral ... server")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.training import training_pipeline

    result = training_pipeline(params_dir=str(ROOT / "params"), overrides=list(sets or []), tune=tune,
                               allow_dirty_data=allow_dirty_data, root=str(ROOT.resolve()), force_promotion=force)
    dvc_lock = result.pop("dvc_lock", None)
    echo(json.dumps(result, indent=2))
    if dvc_lock:
        echo(dvc_lock)


@app.command()
def tune(sets: Optional[List[str]] = typer.Option(None, "--set", "-S", help=SET_HELP),
         workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes here (default: tune.workers)."),
         storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: tune.storage, else sqlite optuna/optuna.db)."),
         study: Optional[str] = typer.Option(None, "--study", help="Study name (default: tune.study_name); other machines join with --study + --storage."),
         gpus: Optional[str] = typer.Option(None, "--gpus", help="Pin worker i to CUDA device gpus[i % n], e.g. 0,1."),
         n_trials: Optional[int] = typer.Option(None, "--n-trials", help="COMPLETE+PRUNED trials (default: tune.n_trials)."),
         plan: bool = typer.Option(False, "--plan", help="Print each configuration's predicted cost and the sweep's, run nothing.")) -> None:
    """Optuna sweep over batch size, lr and schedule; writes params/best.yaml and reports/tune.json.

    Example: freezeflow tune --workers 2 --storage postgresql+psycopg2://user@db/optuna --study digits-sweep
    """
    from freezeflow.app.steps import plan_step, tune_step

    if plan:
        plan_step(ROOT, "params", list(sets or []), n_trials)
        return
    tune_step(ROOT, "params", list(sets or []), workers, storage, study, gpus, n_trials)


@app.command()
def schedule(cron: str = typer.Option("0 3 * * 1", help="Cron expression (default: Mondays 03:00)."),
             margin: float = typer.Option(0.0, help="Promote only if val_accuracy beats the champion by more."),
             force: bool = typer.Option(False, "--force", help="Retrain even if the data is unchanged."),
             pool: Optional[str] = typer.Option(None, help="Register with this Prefect work pool instead of serving here.")) -> None:
    """Serve scheduled retraining (a Prefect deployment): retrain when the data changed, promote if better.

    Example: freezeflow schedule --cron "0 3 * * 1" --margin 0.005
    """
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    from flows.retrain import serve_schedule
    from freezeflow.integrations.servers import check_prefect_login

    if PREFECT_API_URL.value():  # a server that wants PREFECT_API_AUTH_STRING: one line before anything registers
        check_prefect_login(PREFECT_API_URL.value(), PREFECT_API_AUTH_STRING.value())
    serve_schedule(cron, str(ROOT.resolve()), margin, force, pool)


@app.command()
def report(runs: Optional[List[str]] = typer.Argument(None, help="MLflow run ids (default: the latest FINISHED run)."),
           out: Path = typer.Option(Path("reports/report.html"), "--out", help="HTML file to write.")) -> None:
    """One self-contained HTML page for a run, or a side-by-side comparison of several.

    Example: freezeflow report 1a2b... 3c4d... --out reports/compare.html
    """
    from freezeflow.integrations.report import write_report
    from freezeflow.integrations.tracking import configure_tracking

    configure_tracking(ROOT)  # the project's store unless MLFLOW_TRACKING_URI is set
    path = write_report(list(runs or []), ROOT / out)
    echo(f"report -> {path}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Benchmarks side by side (suites: recipes, loader, limit, sweep, peers, gpu, quality, retrain, serve, overhead); results in bench/results/.

    Example: freezeflow bench recipes loader --repeats 3 --epochs 10   (see: python -m bench --help)
    """
    from bench.harness import main as bench_main

    code = bench_main(list(ctx.args))
    if code:
        raise typer.Exit(code)


@app.command()
def ui(port: int = typer.Option(5000), host: str = typer.Option("127.0.0.1"),
       workers: int = typer.Option(1, help="uvicorn workers (mlflow's default of 4 starts slowly on small machines).")) -> None:
    """Start the MLflow UI over the project's tracking store, on this machine only (loopback).

    Example: freezeflow ui --port 5000
    """
    from freezeflow.integrations.servers import is_loopback
    from freezeflow.integrations.tracking import resolve_tracking_uri

    if not is_loopback(host):  # `mlflow ui` has no auth: a network host would open the store to anyone
        raise UserError(f"--host {host}: `freezeflow ui` serves 127.0.0.1, ::1 or localhost only; for a team UI run "
                        "`freezeflow server mlflow --host HOST` (basic auth on), or reach this one over ssh -L")

    uri = resolve_tracking_uri(ROOT.resolve())
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", host, "--port", str(port), "--workers", str(workers)])


@cache_app.command("list")
def cache_list(as_json: bool = typer.Option(False, "--json", help="One JSON object per entry.")) -> None:
    """The cache's entries, least recently used first (what `prune` removes first).

    Example: freezeflow cache list
    """
    from freezeflow.core.layout import Layout
    from freezeflow.core.train.feature_store import list_entries

    entries = [e.to_dict() for e in list_entries(Layout(ROOT).features)]
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry))
        return
    typer.echo(f"{'entry':<44} {'kind':<9} {'level':>5} {'rows':>8} {'MB':>9}  last used")
    for e in entries:
        typer.echo(f"{e['name']:<44} {e['kind']:<9} {e.get('level', ''):>5} {e['rows']:>8} {e['size_mb']:>9.2f}  "
                   f"{e['last_used']}")
    typer.echo(f"{len(entries)} entries, {sum(e['size_mb'] for e in entries):.2f} MB in {Layout(ROOT).features}")


@cache_app.command("prune")
def cache_prune(max_gb: Optional[float] = typer.Option(None, help="Keep at most this many GB (default: train.cache.max_gb; 0: no size limit)."),
                older_than_days: Optional[float] = typer.Option(None, help="Also remove entries unused for this many days."),
                everything: bool = typer.Option(False, "--all", help="Remove every entry not in use now.")) -> None:
    """Remove least recently used entries until the cache fits; entries a training holds stay.

    Example: freezeflow cache prune --max-gb 5 --older-than-days 30
    """
    from freezeflow.core.errors import ParamsError
    from freezeflow.core.layout import Layout
    from freezeflow.core.train.feature_store import prune_entries

    if max_gb is not None and max_gb < 0:
        raise ParamsError("freezeflow cache prune", "--max-gb", f"{max_gb}; allowed: >= 0")
    limit = 0.0 if everything else (max_gb if max_gb is not None else load(None).train.cache.max_gb)
    age = None if older_than_days is None else older_than_days * 86400
    removed = prune_entries(Layout(ROOT).features, int(limit * 2**30) if everything or limit else None, age)
    freed = sum(e.size_bytes for e in removed) / 2**20
    echo(f"removed {len(removed)} entries ({freed:.2f} MB) from {Layout(ROOT).features}")


@server_app.command("mlflow")
def server_mlflow(backend_store_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_BACKEND_STORE_URI", show_envvar=True, help="postgresql+psycopg2://USER@HOST:PORT/DB or sqlite:///PATH (default: the project's mlflow/mlflow.db); a URL with a password belongs in the variable, not the command line."),
                  artifacts: str = typer.Option("mlflow/artifacts", help="Artifact folder or s3://BUCKET/PREFIX (served through the server)."),
                  host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: every one)."),
                  port: int = typer.Option(5000),
                  workers: int = typer.Option(2, help="uvicorn workers."),
                  auth: Optional[bool] = typer.Option(None, "--auth/--no-auth", help="MLflow's basic-auth app (default: on for any host but 127.0.0.1/::1/localhost; --no-auth there runs an open server and warns)."),
                  admin_password_file: Optional[Path] = typer.Option(None, help="File whose first line is the admin password (else FREEZEFLOW_MLFLOW_ADMIN_PASSWORD or MLFLOW_AUTH_ADMIN_PASSWORD; admin name: FREEZEFLOW_MLFLOW_ADMIN_USERNAME, default admin)."),
                  auth_database: Optional[str] = typer.Option(None, help="Users and permissions: sqlite:///PATH or postgresql+psycopg2://... (default: basic_auth.db beside a sqlite store, else the store's database).")) -> None:
    """Run an MLflow tracking server until Ctrl-C; prints the MLFLOW_TRACKING_URI clients set.

    Example: freezeflow server mlflow --host 0.0.0.0 --admin-password-file ~/.config/freezeflow/mlflow-admin --backend-store-uri postgresql+psycopg2://mlflow@db/mlflow --artifacts s3://bucket/mlflow
    """
    from freezeflow.integrations.servers import mlflow_spec, serve

    store = backend_store_uri or f"sqlite:///{(ROOT / 'mlflow' / 'mlflow.db').resolve()}"
    code = serve(mlflow_spec(store, artifacts, host, port, workers, auth, admin_password_file=admin_password_file,
                             auth_database=auth_database))
    if code:
        raise typer.Exit(code)


@server_app.command("prefect")
def server_prefect(host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: every one)."),
                   port: int = typer.Option(4200),
                   database: Optional[str] = typer.Option(None, envvar="PREFECT_SERVER_DATABASE_CONNECTION_URL", show_envvar=True, help="postgresql+asyncpg://USER@HOST:PORT/DB or sqlite+aiosqlite:///PATH (default: Prefect's sqlite under PREFECT_HOME); a URL with a password belongs in the variable."),
                   auth: Optional[bool] = typer.Option(None, "--auth/--no-auth", help="Require the API auth string (default: on for any host but 127.0.0.1/::1/localhost; --no-auth there runs an open server and warns)."),
                   auth_string_file: Optional[Path] = typer.Option(None, help="File whose first line is the auth string USER:PASSWORD (else FREEZEFLOW_PREFECT_AUTH_STRING or PREFECT_SERVER_API_AUTH_STRING).")) -> None:
    """Run a Prefect server until Ctrl-C; prints the PREFECT_API_URL clients and workers set.

    Example: freezeflow server prefect --host 0.0.0.0 --auth-string-file ~/.config/freezeflow/prefect-auth --database postgresql+asyncpg://prefect@db/prefect
    """
    from freezeflow.integrations.servers import prefect_spec, serve

    code = serve(prefect_spec(host, port, database, auth, auth_string_file))
    if code:
        raise typer.Exit(code)


def main() -> None:
    """Console-script entry: one line per user error, exit code 2."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        if STATE["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if STATE["debug"] or exc.errno not in DISK_ERRORS:
            raise
        typer.echo(f"error: cannot write {exc.filename or 'output'}: {exc.strerror}; earlier outputs, "
                   "checkpoints and the MLflow store are unchanged (writes are atomic)", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors come as click.exceptions.UsageError
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
