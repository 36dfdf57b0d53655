"""tracking: the MLflow adapter for runs (registry.py holds the model registry).

`tracked_training` wraps `freezeflow.core.train.run.run_training` in an MLflow run: every resolved param,
per-epoch metrics (step = epoch), lineage tags (data hash, git commit, Prefect flow run, device,
library versions), the dataset as an MLflow dataset input (name, DVC md5 or content hash, folder, split counts),
totals, reports, plots and the model: the served pyfunc of integrations.serving (model.json and weights.npz,
no pickle; plus model.onnx, parity-checked, with serve.runtime onnx): what registry.py registers and loads back.

Where: `MLFLOW_TRACKING_URI` when set, else `sqlite:///<root>/mlflow/mlflow.db` with artifacts
in `<root>/mlflow/artifacts`. Readers of an existing store (`current_uri`) take `tracking_uri` if given,
else that env var, else a URI set with mlflow.set_tracking_uri, else the default store under the
current folder. Nothing happens at import time; mlflow's global URI is set only for the duration
of a call (`configure_tracking` sets it for good, for the CLI and flows). One process should not
run two tracked trainings against different stores in parallel threads (the global is shared).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import fields
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from freezeflow.core.train.callbacks import Callback
from freezeflow.core.train.loop import resolve_device
from freezeflow.core.train.state import EpochReport
from freezeflow.core.errors import UserError
from freezeflow.core.infer.evaluate import evaluate_model, write_eval
from freezeflow.core.models.io import load_model, save_bundle
from freezeflow.core.params import Params, ServeParams, flatten
from freezeflow.integrations.plots import (history_rows, plot_confusion, plot_epoch_times, plot_learning_curves, plot_lr_find,
                              plot_lr_groups, plot_per_class)
from freezeflow.core.data.prepare import Prepared
from freezeflow.core.data.prepare import open_prepared
from freezeflow.core.layout import Layout, dataset_name, resolve_data_params
from freezeflow.core.train.run import run_training
from freezeflow.integrations.onnx_export import export_onnx, parity_pixels
from freezeflow.integrations.secrets import first_line_masked, mask_url
from freezeflow.integrations.serving import ONNX_FILE, log_serving_model

logger = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # what MLflow's client sends as basic auth
MODEL_NAME = "model"  # artifact name of the logged model: runs:/<run_id>/model
WEIGHTS_DIR = "weights"  # models logged before the served pyfunc: weights/model.pt beside model.json
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
BATCH_LIMIT = 100  # MLflow accepts at most 100 params per log_batch call


# ---- where ---------------------------------------------------------------------------------------

def resolve_tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a sqlite file under <root>/mlflow/ (folder created); a sqlite
    store is created and migrated here, once, under a file lock (see ensure_store)."""
    if os.environ.get(ENV_URI):
        return ensure_store(os.environ[ENV_URI])
    folder = Path(root).resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return ensure_store(f"sqlite:///{folder / 'mlflow.db'}")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI; None for other stores and in-memory sqlite."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0])


@contextlib.contextmanager
def store_lock(db: Path) -> Iterator[None]:
    """An exclusive inter-process lock on `<db>.lock`, beside the database (released when the block ends
    or the process dies). Where fcntl does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


READY_STORES: set[str] = set()  # sqlite stores created or found up to date, servers that let us in: this process


def login_error(uri: str) -> str:
    """One line for a 401: which of MLflow's own client variables is missing, or that the login was refused.
    What is set is read as MLflow's client reads it: the variables, else ~/.mlflow/credentials."""
    from mlflow.utils.credentials import read_mlflow_creds

    where = f"the MLflow server at {mask_url(uri)} (MLFLOW_TRACKING_URI)"
    creds = read_mlflow_creds()
    missing = [name for name, value in zip(LOGIN_ENV, (creds.username, creds.password)) if not value]
    if missing:
        return f"{where} needs a login: set {' and '.join(missing)} (a user of that server)"
    return (f"{where} refused the login of MLFLOW_TRACKING_USERNAME={creds.username}: check "
            "MLFLOW_TRACKING_PASSWORD (the admin adds users and resets passwords)")


def check_login(uri: str) -> None:
    """One cheap request to a tracking server: a server that wants a login (MLflow's basic-auth app) is
    then one line naming what to set, before a run starts, not a traceback from its middle."""
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        if exc.get_http_status_code() == 401:
            raise UserError(login_error(uri)) from None
        raise


def ensure_store(uri: str) -> str:
    """Create and migrate a sqlite store's tables (tracking and registry) under `store_lock`, once per
    process: two processes starting on a fresh store would otherwise both create the same tables and
    one dies (`table ... already exists`, or an alembic version mismatch). A tracking server gets its
    login checked instead (check_login), also once. Returns `uri`."""
    if uri in READY_STORES:
        return uri
    if uri.startswith(("http://", "https://")):
        check_login(uri)
        READY_STORES.add(uri)
        return uri
    db = sqlite_file(uri)
    if db is None:
        return uri
    db.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(db):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tracking store: tables created, then migrated
        client.search_registered_models(max_results=1)  # the registry store on the same database
    READY_STORES.add(uri)
    return uri


def resolve_artifact_location(uri: str, root: Path) -> str | None:
    """Artifacts of new experiments: next to a sqlite file, <root>/mlflow/artifacts for other
    database URIs, the server's choice (None) for http(s) and databricks."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
        folder = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve().parent / "artifacts"
    else:
        folder = Path(root).resolve() / "mlflow" / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def configure_tracking(root: Path) -> str:
    """Point the mlflow module at this project's store for the rest of the process (CLI, flows)."""
    uri = resolve_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    return uri


@contextlib.contextmanager
def tracking_scope(uri: str) -> Iterator[None]:
    """Use `uri` for mlflow's fluent API inside the block, then restore what was there before.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; restoring both keeps one call from
    leaking its store into the next (another project root, another test).
    """
    from mlflow.tracking._tracking_service import utils as service_utils

    saved_uri = getattr(service_utils, "_tracking_uri", None)
    saved_env = os.environ.get(ENV_URI)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = saved_env


def current_uri(tracking_uri: str | None = None, root: Path = Path(".")) -> str:
    """The store to read: `tracking_uri`, else MLFLOW_TRACKING_URI, else a URI set with
    mlflow.set_tracking_uri, else the project's default store under `root`."""
    from mlflow.tracking._tracking_service import utils as service_utils

    uri = tracking_uri or os.environ.get(ENV_URI) or getattr(service_utils, "_tracking_uri", None)
    return ensure_store(uri) if uri else resolve_tracking_uri(root)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Experiment id for `name`, created (with our artifact location) when missing."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another worker
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore "
                        f"--experiment-id {found.experiment_id}`) or pick another experiment name")
    return found.experiment_id


# ---- per-epoch metrics ---------------------------------------------------------------------------

def metric_key(name: str) -> str:
    """MLflow metric name for an internal key: `lr/head` -> `lr_head`."""
    return name.replace("/", "_")


def epoch_metrics(report: EpochReport) -> dict[str, float]:
    """What one epoch logs (step = epoch)."""
    values = {
        "train_loss": report.train_loss,
        "train_accuracy": report.train_accuracy,
        "val_loss": report.val_loss,
        "val_accuracy": report.val_accuracy,
        "time_per_epoch_s": report.epoch_time_s,
        "images_per_s": report.images_per_s,
        "data_wait_fraction": report.data_wait_fraction,
        "frozen_stages": report.frozen_stages,
        "from_cache": float(report.from_cache),
    }
    values |= {metric_key(k if k.startswith("lr/") else f"lr/{k}"): v for k, v in report.lrs.items()}
    return {k: float(v) for k, v in values.items()}


class MlflowCallback(Callback):
    """Trainer callback: one `log_batch` per epoch with all of that epoch's metrics."""

    def __init__(self, run_id: str, tracking_uri: str | None = None, client: MlflowClient | None = None):
        self.run_id = run_id
        self.client = client or MlflowClient(tracking_uri)
        self.logged_epochs: set[int] = set()

    def on_epoch_end(self, report: EpochReport) -> None:
        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, report.epoch) for key, value in epoch_metrics(report).items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        self.logged_epochs.add(report.epoch)

    def on_lr_found(self, result) -> None:
        log_lr_find(self.client, self.run_id, result)

    def on_divergence(self, message: str) -> None:
        """The guard's verdict: a tag the runs table can filter on (tags.divergence), and a 0/1 metric."""
        self.client.set_tag(self.run_id, "divergence", message[:5000])
        log_totals(self.client, self.run_id, {"diverged": 1.0})


def log_lr_find(client: MlflowClient, run_id: str, result) -> None:
    """The range test on a run: the curve as metrics (step = test step), the suggestion as a param,
    the plot and the raw numbers as artifacts."""
    stamp = int(time.time() * 1000)
    metrics = [Metric("lr_find_loss", loss, stamp, i) for i, loss in enumerate(result.losses) if np.isfinite(loss)]
    metrics += [Metric("lr_find_lr", lr, stamp, i) for i, lr in enumerate(result.lrs)]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000], synchronous=True)
    client.log_param(run_id, "lr_found", f"{result.suggestion:.6g}")
    with tempfile.TemporaryDirectory(prefix="freezeflow-lr-find-") as tmp:
        (Path(tmp) / "lr_find.json").write_text(json.dumps(result.to_dict(), indent=1))
        client.log_artifact(run_id, str(Path(tmp) / "lr_find.json"), "reports")
        client.log_artifact(run_id, str(plot_lr_find(result, Path(tmp) / "lr_find.png")), "plots")


def report_from_row(row: dict) -> EpochReport:
    """Rebuild an EpochReport from a reports/history.json row (lr/<stage> keys -> lrs)."""
    names = {f.name for f in fields(EpochReport)} - {"lrs"}
    return EpochReport(**{k: row[k] for k in names}, lrs={k: v for k, v in row.items() if k.startswith("lr/")})


def backfill_epochs(callback: MlflowCallback, history: list[dict]) -> None:
    """After --resume, log the epochs trained before the interruption (the checkpoint's history)."""
    for row in history:
        if row["epoch"] not in callback.logged_epochs:
            callback.on_epoch_end(report_from_row(row))


# ---- lineage -------------------------------------------------------------------------------------

def git_commit(root: Path) -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def prefect_flow_run_id() -> str | None:
    """The enclosing Prefect flow run, if any (prefect is only consulted when already imported)."""
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        return os.environ["PREFECT__FLOW_RUN_ID"]
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run
    except ImportError:
        return None
    try:
        run_id = flow_run.id
    except Exception:  # noqa: BLE001 - only a tag: never fail a training over it
        return None
    return str(run_id) if run_id else None


def describe_device(params: Params) -> str:
    try:
        device = resolve_device(params.train.device)
    except UserError:
        return params.train.device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def start_tags(params: Params, root: Path, resume: bool, extra_tags: dict | None) -> dict[str, str]:
    commit = git_commit(root)
    tags = {
        "git_commit": commit,
        "device": describe_device(params),
        "torch_version": torch.__version__,
        "torchvision_version": installed_version("torchvision"),  # metadata: importing it costs ~2 s
        "python_version": platform.python_version(),
        "mlflow_version": mlflow.__version__,
        "backbone": params.train.backbone,
        "freeze_strategy": params.train.freeze.strategy,
        "resumed": str(bool(resume)).lower(),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if flow_run := prefect_flow_run_id():
        tags["prefect_flow_run_id"] = flow_run
    return tags | {str(k): str(v) for k, v in (extra_tags or {}).items()}


def log_params(client: MlflowClient, run_id: str, params: Params) -> None:
    """Every resolved param, flattened: `train.freeze.strategy`, `data.image_size`, ..."""
    items = [Param(key, str(value)) for key, value in flatten(params).items()]
    for start in range(0, len(items), BATCH_LIMIT):
        client.log_batch(run_id, params=items[start:start + BATCH_LIMIT], synchronous=True)


# ---- after training ------------------------------------------------------------------------------

def peak_memory() -> dict[str, float]:
    """Peak RSS of this process and peak CUDA allocation, in MB."""
    out: dict[str, float] = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        out["peak_rss_mb"] = rss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    except ImportError:  # Windows
        pass
    from freezeflow.core.train.loop import peak_cuda_mb

    if (peak := peak_cuda_mb()) is not None:
        out["cuda_peak_mb"] = peak
    return out


def total_metrics(metrics: dict) -> dict[str, float]:
    """Run totals under names that do not collide with the per-epoch series."""
    totals = {
        "train_time_s": metrics["train_time_s"],
        "test_accuracy": metrics["test_accuracy"],
        "best_val_accuracy": metrics["val_accuracy"],
        "best_val_loss": metrics["val_loss"],
        "best_epoch": metrics["best_epoch"],
        "epochs_trained": metrics["epochs"],
        "mean_images_per_s": metrics["images_per_s"],
        "mean_data_wait_fraction": metrics["data_wait_fraction"],
        "stopped_early": float(metrics["stopped_early"]),
        "feature_cache": float(metrics["feature_cache"]),
    }
    return {k: float(v) for k, v in (totals | peak_memory()).items()}


def log_totals(client: MlflowClient, run_id: str, totals: dict[str, float]) -> None:
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in totals.items()], synchronous=True)


def write_plots(history: list[dict], val_report: dict, folder: Path) -> list[Path]:
    return [
        plot_learning_curves(history, folder / "learning_curves.png"),
        plot_lr_groups(history, folder / "lr_groups.png"),
        plot_epoch_times(history, folder / "epoch_times.png"),
        plot_confusion(val_report["confusion_matrix"], val_report["classes"], folder / "confusion_val.png"),
        plot_per_class(val_report, folder / "per_class_val.png"),
    ]


def log_reports(client: MlflowClient, run_id: str, layout: Layout, prepared: Prepared,
                history: list[dict]) -> dict:
    """metrics.json, history.json, params.yaml, a val evaluation and the PNG plots."""
    for name in ("metrics.json", "history.json"):
        client.log_artifact(run_id, str(layout.reports / name), "reports")
    client.log_artifact(run_id, str(layout.models / "params.yaml"), "params")
    val_report = evaluate_model(layout.models, prepared, "val")
    with tempfile.TemporaryDirectory(prefix="freezeflow-plots-") as tmp:
        write_eval(val_report, Path(tmp) / "eval_val.json")
        client.log_artifact(run_id, str(Path(tmp) / "eval_val.json"), "reports")
        for png in write_plots(history, val_report, Path(tmp)):
            client.log_artifact(run_id, str(png), "plots")
    return val_report


# ---- the model -----------------------------------------------------------------------------------

MODEL_FORMATS = {"torch": "pyfunc-npz", "onnx": "pyfunc-onnx"}  # the run's model_format tag, per serve.runtime


def log_model_files(client: MlflowClient, run_id: str, layout: Layout, prepared: Prepared,
                    serve: ServeParams = ServeParams()) -> str:
    """The served pyfunc (integrations.serving) of models/: weights.npz + model.json, and for serve.runtime
    onnx model.onnx, exported by the code `freezeflow export` runs (parity on val images logged as
    onnx_parity_max_abs_diff; an export that misses parity fails the run with one line). Returns the model id."""
    model, info = load_model(layout.models)  # CPU, eval mode: what was saved, not the GPU copy
    pixels = parity_pixels(prepared)  # real val images: the parity check's, and the input example
    with tempfile.TemporaryDirectory(prefix="freezeflow-bundle-") as tmp:
        bundle = save_bundle(model, info, Path(tmp) / "bundle")
        parity = None
        if serve.runtime == "onnx":
            parity = export_onnx(model, info, pixels, bundle / ONNX_FILE, name=f"run {run_id} ({info.backbone})")
        model_info = log_serving_model(MODEL_NAME, bundle, serve, pixels[0], Path(tmp) / "code")
    client.set_tag(run_id, "model_format", MODEL_FORMATS[serve.runtime])
    client.set_tag(run_id, "model_id", model_info.model_id)
    if parity is not None:
        log_totals(client, run_id, {"onnx_parity_max_abs_diff": parity})
    return model_info.model_id


def log_onnx_export(run_id: str, path: Path, parity: float, tracking_uri: str | None = None) -> None:
    """`freezeflow export`'s ONNX file (artifact onnx/<name>) and its parity figure on the model's run."""
    client = MlflowClient(current_uri(tracking_uri))
    client.log_artifact(run_id, str(path), "onnx")
    log_totals(client, run_id, {"onnx_parity_max_abs_diff": parity})


# ---- the dataset -------------------------------------------------------------------------------

def split_counts(prepared: Prepared) -> dict[str, int]:
    """Images and classes of the prepared dataset, and images per split."""
    return {"images": int(len(prepared.labels)), "classes": len(prepared.classes),
            **{split: int(len(rows)) for split, rows in prepared.split.items()}}


class PreparedDataset(MetaDataset):
    """A MetaDataset (metadata only: MLflow never copies the images) with a profile, which MetaDataset lacks."""

    def __init__(self, source, name: str, digest: str, profile: dict[str, int]):
        self._profile = profile
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, int]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def dataset_of(prepared: Prepared, data_dir: Path, dvc_md5: str | None) -> PreparedDataset:
    """The run's input for the runs table's Dataset column: name = the dataset, digest = the DVC md5 when
    the data is tracked (else the content hash), source = the data folder, profile = split_counts."""
    with warnings.catch_warnings():  # a local path resolves through two equivalent registered sources
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(data_dir).resolve()))
    return PreparedDataset(source, prepared.name, dvc_md5 or prepared.data_hash, split_counts(prepared))


def log_dataset(prepared: Prepared, data_dir: Path, dvc_md5: str | None) -> None:
    """The dataset as the active run's input (context `training`), split counts also as input tags."""
    tags = {"data_hash": prepared.data_hash, **{f"{k}_images": str(v) for k, v in split_counts(prepared).items()
                                                if k in prepared.split}}
    mlflow.log_input(dataset_of(prepared, data_dir, dvc_md5), context="training", tags=tags)


def finish_run(client: MlflowClient, run_id: str, callback: MlflowCallback, metrics: dict,
               layout: Layout, params: Params, dvc_md5: str | None = None) -> dict:
    """Everything logged after a successful training; returns the val evaluation."""
    client.set_tag(run_id, "data_hash", metrics["data_hash"])
    history = history_rows(json.loads((layout.reports / "history.json").read_text()))
    backfill_epochs(callback, history)
    prepared = open_prepared(params, layout)  # the data training used: a cache hit
    log_dataset(prepared, resolve_data_params(params, layout.root).data.dir, dvc_md5)
    started = time.perf_counter()
    val_report = log_reports(client, run_id, layout, prepared, history)
    reported = time.perf_counter()
    log_totals(client, run_id, total_metrics(metrics) | {"val_macro_f1": val_report["macro_f1"],
                                                         "log_reports_s": reported - started})
    log_model_files(client, run_id, layout, prepared, params.serve)
    log_totals(client, run_id, {"log_model_s": time.perf_counter() - reported})  # the fixed overhead's parts
    return val_report


# ---- the tracked run -----------------------------------------------------------------------------

def tracked_training(params: Params, root: Path = Path("."), resume: bool = False, run_name: str | None = None,
                     extra_tags: dict | None = None, callbacks: tuple | list = (),
                     experiment: str | None = None) -> dict:
    """run_training inside an MLflow run; returns its metrics plus `run_id`.

    The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C; the exception is re-raised.
    Inside an active run (a tuning study's parent run) the run is nested under it.
    """
    root = Path(root)
    uri = resolve_tracking_uri(root)
    client = MlflowClient(uri)
    name = experiment or dataset_name(params, root)
    experiment_id = ensure_experiment(client, name, resolve_artifact_location(uri, root))
    tags = start_tags(params, root, resume, extra_tags)
    with tracking_scope(uri):
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags,
                               nested=mlflow.active_run() is not None)
        run_id = run.info.run_id
        try:
            log_params(client, run_id, params)
            callback = MlflowCallback(run_id, client=client)
            metrics = run_training(params, root, resume, callbacks=[callback, *callbacks])
            finish_run(client, run_id, callback, metrics, Layout(root), params,
                       (extra_tags or {}).get("dvc_data_md5"))
        except KeyboardInterrupt:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
        except BaseException as exc:
            tag_quietly(client, run_id, "error", f"{type(exc).__name__}: {first_line_masked(exc)}")
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
            raise
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    return metrics | {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": mask_url(uri)}


def tracked_lr_find(params: Params, root: Path, result) -> str:
    """A finished MLflow run (run name lr-find, tag run_kind=lr_find) holding the params and the range test."""
    root = Path(root)
    uri = resolve_tracking_uri(root)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, dataset_name(params, root), resolve_artifact_location(uri, root))
    tags = start_tags(params, root, False, {"run_kind": "lr_find"})
    run = client.create_run(experiment_id, run_name="lr-find", tags=tags)
    try:
        log_params(client, run.info.run_id, params)
        log_lr_find(client, run.info.run_id, result)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def tag_quietly(client: MlflowClient, run_id: str, key: str, value: str) -> None:
    """Best effort: a failing store must not hide the exception being reported."""
    try:
        client.set_tag(run_id, key, value[:5000])
    except Exception:  # noqa: BLE001
        logger.debug("could not set tag %s on run %s", key, run_id, exc_info=True)

