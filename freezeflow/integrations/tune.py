"""tune: Optuna sweeps over batch size, learning rate and schedule. The Optuna adapter (with MLflow).

`run_tune` (what `freezeflow tune` and the Prefect task call) prepare the
data once, create or load the study, run K worker processes on this machine and summarize:
`reports/tune.json` and `params/best.yaml` (train keys that `-S train.use_best=true` overlays).

    study    one per name in an RDB storage: `sqlite:///<root>/optuna/optuna.db` by default, any
             SQLAlchemy URL (PostgreSQL, MySQL) via --storage, FREEZEFLOW_OPTUNA_STORAGE, a file named
             by FREEZEFLOW_OPTUNA_STORAGE_FILE, or tune.storage (first given wins). Another machine
             joins with the same command plus `--study NAME --storage URL`. A password belongs in
             the variable, the file, PGPASSWORD or ~/.pgpass: `ps` shows a command line to every
             user, and params files live in git (a URL with one there warns).
    worker   loads the study by name, asks for trials until the study has n_trials COMPLETE +
             PRUNED trials. It starts no trial while running trials already fill the budget.
    trial    samples train keys from tune.yaml's `space`, builds Params with load_params (so
             every value is validated) and trains tune.epochs epochs with the core Trainer in the
             same project root: the prepared images and the frozen-feature cache are shared.
             Reports val_accuracy every epoch to the pruner; returns the best val_accuracy.
    failure  heartbeats: a trial whose worker died (SIGKILL, lost machine) turns FAIL after
             grace_period and is retried (max_retry) as a new trial with the same params.
             CUDA out of memory prunes the trial (user attr pruned_reason="oom").
    MLflow   one parent run per study (its id in the study user attr mlflow_parent_run_id), one
             child run per trial (tag mlflow.parentRunId, per-epoch metrics, tag optuna_state);
             explicit run ids only, never the fluent active-run stack. Plots go to the parent.
"""

from __future__ import annotations

import contextlib
import gc
import re
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import typing
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import torch
import yaml
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from freezeflow.core.errors import ParamsError, UserError
from freezeflow.core.params import Params, SearchSpace, TrainParams, load_params, set_nested
from freezeflow.core.schedules import SCHEDULES
from freezeflow.core.strategies import STRATEGIES
from freezeflow.core.data.prepare import Prepared
from freezeflow.core.io import write_json_atomic, write_text_atomic
from freezeflow.integrations.secrets import first_line_masked, mask_url, read_secret
from freezeflow.integrations.tracking import (MlflowCallback, ensure_experiment, log_params,
                                 log_totals, resolve_artifact_location, resolve_tracking_uri, start_tags,
                                 tag_quietly)
from freezeflow.core.train.callbacks import Callback
from freezeflow.core.train.fused import fuse_key, train_fused
from freezeflow.core.train.run import build_trainer
from freezeflow.core.data.prepare import open_prepared
from freezeflow.core.layout import Layout, dataset_name, resolve_data_params
from freezeflow.integrations.tune_plan import DEFAULT_TRIAL_FIXED_S, FIXED_ATTR, log_plan_outcome, plan_sweep

PARENT_ATTR = "mlflow_parent_run_id"
FINDER_ATTR = "lr_finder"  # study user attr: {"suggestion": lr, ...}, set once by the first prepare_study
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
POLL_S = 1.0
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
STORAGE_ENV, STORAGE_FILE_ENV = "FREEZEFLOW_OPTUNA_STORAGE", "FREEZEFLOW_OPTUNA_STORAGE_FILE"
# what PostgreSQL (libpq) and MySQL say when the login, not the network, is the problem
LOGIN_FAILED = re.compile(r"password authentication failed|no password supplied|Access denied for user", re.I)


@dataclass(frozen=True)
class TuneSettings:
    """What every worker needs (picklable: it crosses the spawn boundary)."""

    root: str
    params_dir: str
    overrides: tuple[str, ...]
    storage: str
    study_name: str
    n_trials: int
    experiment_id: str = ""
    parent_run_id: str = ""
    local_workers: int = 1
    # progress(n_trials, bar) -> an object with update(done, best, detail); a class, so it pickles by
    # name across the spawn boundary. None: TrialLines. The CLI passes its rich bar (app.progress).
    progress: Callable[..., Any] | None = None


# ---- the search space ----------------------------------------------------------------------------

def batch_choices(space: SearchSpace, n_train: int) -> list[int]:
    """Batch sizes to try: those not above the train split's size (else the smallest one)."""
    fitting = sorted(b for b in space.batch_size.choices if b <= n_train)
    return fitting or [min(space.batch_size.choices)]


def scale_lr(lr: float, batch_size: int, space: SearchSpace) -> float:
    """The sampled lr refers to base_batch_size; linear or sqrt scaling to the trial's batch size."""
    ratio = batch_size / space.base_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[space.lr_scaling]
    return min(lr * factor, 10.0)


TRAIN_TYPES = typing.get_type_hints(TrainParams)  # int keys are suggested as ints (step_size, plateau_patience)


def suggest_schedule(trial: optuna.Trial, space: SearchSpace, out: dict[str, Any]) -> None:
    """The schedule and only the params that schedule reads (conditional dimensions): the keys of
    its row in freezeflow.core.schedules.SCHEDULES, each within tune.yaml's space.schedule.KEY range."""
    schedule = out["schedule"] = trial.suggest_categorical("schedule", space.schedule.choices)
    for key in SCHEDULES[schedule].reads:
        bounds = getattr(space.schedule, key)
        suggest = trial.suggest_int if TRAIN_TYPES[key] is int else trial.suggest_float
        out[key] = suggest(key, bounds.low, bounds.high)


def lr_range(space: SearchSpace, finder: dict | None) -> tuple[float, float]:
    """low..high of the lr dimension: tune.yaml's, or centred on the study's lr finder suggestion."""
    if space.lr.around_finder and finder:
        s = finder["suggestion"]
        return max(s / space.lr.span, 1e-12), min(s * space.lr.span, 10.0)
    return space.lr.low, space.lr.high


def suggest_train(trial: optuna.Trial, space: SearchSpace, train: TrainParams, n_train: int,
                  finder: dict | None = None) -> dict[str, Any]:
    """Train keys (dotted: `freeze.until`) for one trial; disabled dimensions are left out.
    finder: the study's lr finder result ({"suggestion": lr}) when tune or train.lr=auto asked for one."""
    out: dict[str, Any] = {}
    batch = train.batch_size
    if space.batch_size.enabled:
        batch = out["batch_size"] = trial.suggest_categorical("batch_size", batch_choices(space, n_train))
    if space.lr.enabled:
        lr = trial.suggest_float("lr", *lr_range(space, finder), log=True)
        out["lr"] = scale_lr(lr, batch, space)
    elif train.lr == "auto" and finder:
        out["lr"] = finder["suggestion"]  # one range test per study, not one per trial
    if space.schedule.enabled:
        suggest_schedule(trial, space, out)
    if space.weight_decay.enabled:
        out["weight_decay"] = trial.suggest_float("weight_decay", space.weight_decay.low, space.weight_decay.high,
                                                  log=True)
    if space.body_lr_factor.enabled:
        out["body_lr_factor"] = trial.suggest_float("body_lr_factor", space.body_lr_factor.low,
                                                    space.body_lr_factor.high, log=True)
    if space.freeze.enabled:
        strategy = out["freeze.strategy"] = trial.suggest_categorical("freeze.strategy", space.freeze.choices)
        if STRATEGIES[strategy].uses_cut:
            out["freeze.until"] = trial.suggest_int("freeze.until", space.freeze.until_low, space.freeze.until_high)
    if space.optimizer.enabled:
        out["optimizer"] = trial.suggest_categorical("optimizer", space.optimizer.choices)
    return out


def yaml_scalar(value: Any) -> str:
    """A value as `-S` override text that YAML reads back exactly (1e-05 would read as a string)."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text
    return str(value)


def trial_overrides(tune_epochs: int, values: dict[str, Any], gpu_pinned: bool) -> list[str]:
    out = [f"train.epochs={tune_epochs}", "train.use_best=false"]
    out += [f"train.{key}={yaml_scalar(value)}" for key, value in values.items()]
    return out + (["train.device=cuda"] if gpu_pinned else [])


def check_space(params: Params, params_dir: Path) -> None:
    """Checks that need the backbone or two keys at once, before any trial runs."""
    tune, file = params.tune, str(params_dir / "tune.yaml")
    if tune.grace_period <= tune.heartbeat_interval:
        raise ParamsError(file, "grace_period", f"{tune.grace_period} is out of range; allowed: > "
                          f"heartbeat_interval ({tune.heartbeat_interval})")
    freeze = tune.space.freeze
    if freeze.enabled and any(STRATEGIES[name].uses_cut for name in freeze.choices):
        from freezeflow.core.models.registry import build_backbone

        stages = len(build_backbone(params.train.backbone, "none").stages)  # architecture only
        if freeze.until_high > stages - 1:
            raise ParamsError(file, "space.freeze.until_high", f"{freeze.until_high} is out of range for "
                              f"{params.train.backbone} ({stages} stages incl. head); allowed: 0..{stages - 1}")


# ---- storage, sampler, pruner --------------------------------------------------------------------

def default_storage(root: Path) -> str:
    folder = Path(root).resolve() / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def check_storage_url(url: str, source: str) -> str:
    if url.split(":", 1)[0].split("+", 1)[0] not in STORAGE_SCHEMES or "://" not in url:
        raise UserError(f"{source}: {mask_url(url)!r} is not allowed; allowed: a SQLAlchemy database URL such as "
                        "sqlite:///optuna.db or postgresql+psycopg2://user@host:5432/db (or empty for the default)")
    return url


def storage_from_env() -> tuple[str, str] | None:
    """(url, source) from FREEZEFLOW_OPTUNA_STORAGE, else from the file FREEZEFLOW_OPTUNA_STORAGE_FILE names
    (its first line); None when neither is set."""
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV], STORAGE_ENV
    if os.environ.get(STORAGE_FILE_ENV):
        return read_secret(Path(os.environ[STORAGE_FILE_ENV]), STORAGE_FILE_ENV), STORAGE_FILE_ENV
    return None


def warn_password_in(url: str, source: str) -> None:
    """A password on the command line or in a params file still works, with one line saying where it belongs."""
    if mask_url(url) != url:
        print(f"warning: {source} carries a password (a command line is visible in `ps`, params files in git); "
              f"put the URL in {STORAGE_ENV} or {STORAGE_FILE_ENV}, or the password in PGPASSWORD or ~/.pgpass",
              file=sys.stderr)


def storage_error(url: str, exc: Exception) -> str:
    """One line for a storage that cannot be opened; a refused login says where the password goes."""
    if LOGIN_FAILED.search(str(exc)):
        return (f"Optuna storage {mask_url(url)}: the database refused the login ({first_line_masked(exc)}); set "
                f"the password in PGPASSWORD or ~/.pgpass, or the whole URL in {STORAGE_ENV} or {STORAGE_FILE_ENV}")
    return (f"Optuna storage {mask_url(url)}: cannot connect ({first_line_masked(exc)}); allowed: a "
            "reachable database URL (check host, port, user and database)")


def open_storage(url: str, tune: Any, stale_callback: Any = None) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats, so that trials of dead workers fail and get retried."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # several processes share the file: wait, do not fail
    elif url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=tune.heartbeat_interval,
                                              grace_period=tune.grace_period,
                                              heartbeat_stale_trial_callback=stale_callback)
        except Exception as exc:  # noqa: BLE001 - driver errors vary; all mean "cannot use this storage"
            raise UserError(storage_error(url, exc)) from None


def make_sampler(tune: Any, offset: int = 0) -> optuna.samplers.TPESampler:
    """TPE seeded with tune.seed (+ the worker's offset: parallel workers must not sample alike);
    constant_liar: running trials count as bad, so concurrent workers spread out."""
    return optuna.samplers.TPESampler(seed=tune.seed + offset, constant_liar=True)


def make_pruner(tune: Any) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.epochs)
    if tune.pruner == "asha":  # asynchronous successive halving: rungs at epochs 1, 3, 9, ...; the top third goes on
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def count_states(study: optuna.Study) -> dict[str, int]:
    counts = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts


# ---- MLflow: a parent run per study, a child run per trial ---------------------------------------

def ensure_parent_run(client: MlflowClient, study: optuna.Study, settings: TuneSettings, params: Params) -> str:
    """The parent run named by the study's user attr when this MLflow store has it (reopened),
    else a new one; the attr is only set when empty (a parent in another machine's store stays)."""
    known = study.user_attrs.get(PARENT_ATTR)
    if known:
        try:
            run = client.get_run(known)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            if run.info.status != "RUNNING":
                client.update_run(known, status="RUNNING")
            return known
    tags = start_tags(params, Path(settings.root), False, {"optuna_study": settings.study_name,
                                                           "optuna_storage": mask_url(settings.storage),
                                                           "freezeflow_role": "tune"})
    run_id = client.create_run(settings.experiment_id, run_name=f"tune-{settings.study_name}", tags=tags).info.run_id
    log_params(client, run_id, params)
    if not known:
        study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def start_child_run(client: MlflowClient, settings: TuneSettings, trial: optuna.Trial, params: Params,
                    worker: int) -> str:
    tags = start_tags(params, Path(settings.root), False, {
        "mlflow.parentRunId": settings.parent_run_id, "optuna_study": settings.study_name,
        "optuna_trial": trial.number, "worker": worker, "freezeflow_role": "trial"})
    run_id = client.create_run(settings.experiment_id, run_name=f"{settings.study_name}-trial-{trial.number}",
                               tags=tags).info.run_id
    log_params(client, run_id, params)
    return run_id


def end_child_run(client: MlflowClient, run_id: str, state: str, reason: str | None = None) -> None:
    """Tag the Optuna state (COMPLETE/PRUNED/FAIL) and close the run FINISHED/KILLED/FAILED."""
    tag_quietly(client, run_id, "optuna_state", state)
    if reason:
        tag_quietly(client, run_id, "pruned_reason" if state == "PRUNED" else "error", reason)
    try:
        client.set_terminated(run_id, RUN_STATUS[state])
    except MlflowException:  # never hide the trial's own outcome behind a tracking hiccup
        pass


class StaleTrialHandler:
    """A trial whose worker died (heartbeat expired): close its MLflow run FAILED, then retry it."""

    def __init__(self, max_retry: int, tracking_uri: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            end_child_run(MlflowClient(self.tracking_uri), run_id, "FAIL", "worker died (heartbeat expired)")
        self.retry(study, trial)


def log_study_plots(client: MlflowClient, run_id: str, study: optuna.Study) -> list[str]:
    """Optimization history, param importances and parallel coordinates as PNGs of the parent run.
    Returns notes on plots that were skipped (param importances need 2 complete trials)."""
    import matplotlib

    matplotlib.use("Agg")  # optuna's matplotlib plots go through pyplot: never open a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    notes = []
    with tempfile.TemporaryDirectory(prefix="freezeflow-tune-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks these plots experimental
        for name, plot in (("optimization_history", plots.plot_optimization_history),
                           ("param_importances", plots.plot_param_importances),
                           ("parallel_coordinate", plots.plot_parallel_coordinate)):
            if name == "param_importances" and complete < 2:
                notes.append(f"{name} skipped: {complete} complete trial(s), needs 2")
                continue
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                notes.append(f"{name} skipped: {first_line_masked(exc)}")
                continue
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            path = Path(tmp) / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            client.log_artifact(run_id, str(path), "plots")
    return notes


# ---- one trial -----------------------------------------------------------------------------------

class ReportToTrial(Callback):
    """Trainer callback: val_accuracy to Optuna every epoch; TrialPruned when the pruner says so."""

    def __init__(self, trial: optuna.Trial, pruner: str):
        self.trial, self.pruner = trial, pruner

    def on_epoch_end(self, report) -> None:
        self.trial.report(report.val_accuracy, report.epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_reason", self.pruner)
            raise optuna.TrialPruned(f"pruned by the {self.pruner} pruner after epoch {report.epoch}")

    def on_divergence(self, message: str) -> None:
        """A diverged trial (NaN loss, val accuracy at chance) is pruned, not completed."""
        self.trial.set_user_attr("pruned_reason", "diverged")
        self.trial.set_user_attr("divergence", message)
        raise optuna.TrialPruned(message)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def warm_feature_cache(trainer: Any, root: Path) -> None:
    """Load (or build) the first epoch's frozen features before the trial's clock starts. Parallel
    trials that freeze the same prefix compute each row once: the store's lock
    (core.train.feature_store) makes the others wait, then read the rows from disk."""
    if trainer.cache is None or trainer.frozen == 0:
        return
    trainer.cache.level(trainer.frozen)


def capture(run: Callable[[], float]) -> tuple[str, Any]:
    """(state, value) of a trial run: its value, or the exception that ended it (already recorded)."""
    try:
        return "COMPLETE", run()
    except optuna.TrialPruned as exc:
        return "PRUNED", exc
    except Exception as exc:  # noqa: BLE001 - told to the study as FAIL; the trial's run recorded why
        return "FAIL", exc


class Heartbeats:
    """Heartbeats of trials this worker asked itself (fused companions): study.optimize beats only for
    the trial it runs, and a RUNNING trial without heartbeats would never fail if the worker died."""

    def __init__(self, storage: Any, trials: list[optuna.Trial]):
        enabled = storage is not None and storage.get_heartbeat_interval()
        self.storage, self.ids = storage, [t._trial_id for t in trials] if enabled else []  # noqa: SLF001
        self.stop, self.thread = threading.Event(), None

    def beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while True:
            for trial_id in self.ids:
                with contextlib.suppress(Exception):  # a missed beat is retried next interval
                    self.storage.record_heartbeat(trial_id)
            if self.stop.wait(interval):
                return

    def __enter__(self) -> "Heartbeats":
        if self.ids:
            self.thread = threading.Thread(target=self.beat, daemon=True, name="freezeflow-heartbeats")
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


@dataclass(frozen=True)
class TrialLayout(Layout):
    """The project's layout, but each trial checkpoints into its own folder (deleted afterwards)."""

    trial_dir: Path = field(default=Path("checkpoints/trials"))

    @property
    def checkpoint(self) -> Path:
        return self.trial_dir / "last.pt"


class TrialRunner:
    """The objective: one trial = a short training in the shared project root, tracked in MLflow.

    Fusion (tune.fuse > 1): a `head` trial asks the study for up to tune.fuse - 1 companions while the budget
    has room. Those that share a fuse key (core.train.fused) train as one stack, the others one by one, all
    in this objective; each is still its own Optuna trial (told here, with heartbeats while it waits or
    runs) and its own MLflow run."""

    def __init__(self, settings: TuneSettings, params: Params, prepared: Prepared, worker: int, gpu_pinned: bool,
                 lock: StartLock | None = None, progress: Any = None, storage: Any = None):
        self.settings, self.params, self.prepared = settings, params, prepared
        self.worker, self.gpu_pinned, self.lock = worker, gpu_pinned, lock
        self.progress, self.storage = progress, storage
        self.root = Path(settings.root)
        self.client = MlflowClient(resolve_tracking_uri(self.root))

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            params = self.suggest(trial)
            extra = self.ask_companions(trial, params)
        finally:
            if self.lock is not None:
                self.lock.release()  # this trial (and its companions) exist now: the next worker may check the budget
        if not extra:
            return self.run_trial(trial, params)
        leader: tuple[str, Any] = ("FAIL", RuntimeError("trial did not run"))
        with Heartbeats(self.storage, [t for t, _ in extra]):
            for group in self.pack([(trial, params), *extra]):
                outcomes = self.run_group(group) if len(group) > 1 else \
                    [capture(lambda: self.run_trial(*group[0]))]
                for (member, _), outcome in zip(group, outcomes):
                    if member is trial:
                        leader = outcome
                    else:
                        self.tell(member, outcome)
        if isinstance(leader[1], BaseException):
            raise leader[1]
        return leader[1]

    def pack(self, trials: list[tuple[optuna.Trial, Params]]) -> list[list[tuple[optuna.Trial, Params]]]:
        """Groups of trials that share a fuse key (the rest one per group), ordered by cut level so that
        each level's features are built once and then read; the leader's group last, so that
        study.optimize tells it right after it ran."""
        groups: dict[Any, list] = {}
        for index, (trial, params) in enumerate(trials):
            groups.setdefault(fuse_key(params.train) or ("alone", index), []).append((trial, params))

        def order(group: list) -> tuple:
            train = group[0][1].train
            leads = any(t is trials[0][0] for t, _ in group)
            return leads, STRATEGIES[train.freeze.strategy].uses_cut, train.freeze.until
        return sorted(groups.values(), key=order)

    def suggest(self, trial: optuna.Trial) -> Params:
        """The trial's sampled train keys (user attr `train`) and the params they make."""
        values = suggest_train(trial, self.params.tune.space, self.params.train, len(self.prepared.split["train"]),
                               trial.study.user_attrs.get(FINDER_ATTR))
        trial.set_user_attr("train", values)
        trial.set_user_attr("worker", self.worker)
        try:
            return self.trial_params(values)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {first_line_masked(exc)}")
            raise

    def ask_companions(self, trial: optuna.Trial, params: Params) -> list[tuple[optuna.Trial, Params]]:
        """Trials asked with `trial` (a `head` one): while the budget has room, up to tune.fuse in all. Those
        that share a fuse key train fused (pack); the others run one by one in this objective. A companion
        whose params cannot be built is told FAIL at once (no heartbeat would ever fail it)."""
        fuse = self.params.tune.fuse
        out: list[tuple[optuna.Trial, Params]] = []
        if fuse < 2 or fuse_key(params.train) is None:
            return out
        study = trial.study
        while len(out) < fuse - 1:
            counts = count_states(study)
            if counts["COMPLETE"] + counts["PRUNED"] + counts["RUNNING"] >= self.settings.n_trials:
                break
            companion = study.ask()
            try:
                out.append((companion, self.suggest(companion)))
            except Exception as exc:  # noqa: BLE001 - that trial's failure, recorded in its error attr
                self.tell(companion, ("FAIL", exc))
                break
        return out

    def tell(self, trial: optuna.Trial, outcome: tuple[str, Any]) -> None:
        """Tell the study a companion's outcome (study.optimize tells only the trial it asked)."""
        state, value = outcome
        if state == "COMPLETE":
            frozen = trial.study.tell(trial, value)
        else:
            frozen = trial.study.tell(trial, state=TrialState.PRUNED if state == "PRUNED" else TrialState.FAIL)
        if self.progress is not None:
            report_progress(self.progress, trial.study, frozen)

    def start_run(self, trial: optuna.Trial, params: Params) -> str:
        try:
            run_id = start_child_run(self.client, self.settings, trial, params, self.worker)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {first_line_masked(exc)}")
            raise
        trial.set_user_attr("mlflow_run_id", run_id)
        return run_id

    def run_trial(self, trial: optuna.Trial, params: Params) -> float:
        """One trial on its own: its run, its training, its outcome."""
        started = time.perf_counter()
        run_id = self.start_run(trial, params)
        state, reason = "FAIL", None
        try:
            value = self.train(trial, params, run_id)
            trial.set_user_attr("ran_s", time.perf_counter() - started)  # its own time (fused: a share)
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            state, reason = "PRUNED", trial.user_attrs.get("pruned_reason")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {first_line_masked(exc)}"
            trial.set_user_attr("error", reason)
            raise
        finally:
            end_child_run(self.client, run_id, state, reason)

    def run_group(self, group: list[tuple[optuna.Trial, Params]]) -> list[tuple[str, Any]]:
        """Train the group fused; per member (state, value): value is the best val accuracy, or the
        exception that ended it (TrialPruned, an error)."""
        numbers = [t.number for t, _ in group]
        started, runs = time.perf_counter(), []
        for trial, params in group:
            trial.set_user_attr("fused_with", numbers)
            run_id = self.start_run(trial, params)
            tag_quietly(self.client, run_id, "fused_with", ",".join(map(str, numbers)))
            runs.append((trial, params, run_id))
        callbacks = [[MlflowCallback(run_id, client=self.client), ReportToTrial(trial, self.params.tune.pruner)]
                     for trial, _, run_id in runs]
        trial_dir = self.root / "checkpoints" / "trials" / self.settings.study_name / str(numbers[0])
        trainer = None
        try:
            trainer = build_trainer(runs[0][1], self.prepared, TrialLayout(self.root, trial_dir), [],
                                    checkpoint=False)
            outcomes = [o.result if o.error is None else o.error
                        for o in train_fused(trainer, [p.train for _, p, _ in runs], callbacks)]
        except Exception as exc:  # noqa: BLE001 - the whole group's end: every member shares it
            outcomes = [exc] * len(runs)
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
        if trainer is not None and trainer.cache is not None:  # the group's builds, on its first member only
            runs[0][0].set_user_attr("feature_builds", trainer.cache.builds)
        share = (time.perf_counter() - started) / len(runs)  # each member's part of the group's wall time
        return [self.finish_member(trial, run_id, outcome, share, len(runs))
                for (trial, _, run_id), outcome in zip(runs, outcomes)]

    def finish_member(self, trial: optuna.Trial, run_id: str, outcome: Any, share_s: float,
                      members: int) -> tuple[str, Any]:
        if isinstance(outcome, BaseException) and is_oom(outcome):
            trial.set_user_attr("pruned_reason", "oom")
            outcome = optuna.TrialPruned("CUDA out of memory")
        if isinstance(outcome, optuna.TrialPruned):
            end_child_run(self.client, run_id, "PRUNED", trial.user_attrs.get("pruned_reason"))
            return "PRUNED", outcome
        if isinstance(outcome, BaseException):
            reason = f"{type(outcome).__name__}: {first_line_masked(outcome)}"
            trial.set_user_attr("error", reason)
            end_child_run(self.client, run_id, "FAIL", reason)
            return "FAIL", outcome
        trial.set_user_attr("ran_s", share_s)
        self.record_result(trial, run_id, outcome, members)
        end_child_run(self.client, run_id, "COMPLETE")
        return "COMPLETE", outcome.best_val_accuracy

    def record_result(self, trial: optuna.Trial, run_id: str, result: Any, members: int = 1) -> None:
        """members: the fused group's size; each member's train time is its share of the group's."""
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("train_time_s", result.train_time_s / members)  # the rest of ran_s is fixed cost
        log_totals(self.client, run_id, {"best_val_accuracy": result.best_val_accuracy,
                                         "train_time_s": result.train_time_s / members,
                                         "feature_builds": float(result.feature_builds)})

    def trial_params(self, values: dict[str, Any]) -> Params:
        overrides = [*self.settings.overrides, *trial_overrides(self.params.tune.epochs, values, self.gpu_pinned)]
        return resolve_data_params(load_params(self.settings.params_dir, overrides), self.root)

    def train(self, trial: optuna.Trial, params: Params, run_id: str) -> float:
        trial_dir = self.root / "checkpoints" / "trials" / self.settings.study_name / str(trial.number)
        callbacks = [MlflowCallback(run_id, client=self.client), ReportToTrial(trial, self.params.tune.pruner)]
        trainer, oom = None, False
        try:
            # checkpoint=False: a trial is never resumed (a dead worker's trial is retried afresh), so it writes none
            trainer = build_trainer(params, self.prepared, TrialLayout(self.root, trial_dir), callbacks,
                                    checkpoint=False)
            warm_feature_cache(trainer, self.root)
            result = trainer.run()
        except Exception as exc:  # noqa: BLE001 - only OOM is handled here, the rest re-raised
            if not is_oom(exc):
                raise
            oom = True  # handled below, once the exception (and the trainer in its frames) is gone
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
            if trainer is not None and trainer.cache is not None:  # what this trial computed, not loaded
                trial.set_user_attr("feature_builds", trainer.cache.builds)
        if oom:
            trainer = None
            free_memory()
            trial.set_user_attr("pruned_reason", "oom")
            raise optuna.TrialPruned("CUDA out of memory")
        self.record_result(trial, run_id, result)
        return result.best_val_accuracy


# ---- workers -------------------------------------------------------------------------------------

class BudgetGate:
    """Study callback: prints progress after each trial; stops the worker when the study has its
    n_trials COMPLETE + PRUNED trials, and waits (rather than overshoot) while running trials of
    other workers fill the budget. Too many failing trials are a UserError, not an endless loop."""

    def __init__(self, n_trials: int, first_trial: int = 0, progress: Any = None, lock: "StartLock | None" = None):
        self.n_trials, self.first_trial = n_trials, first_trial  # failures of earlier runs do not count
        self.max_failures = max(3, n_trials)
        self.progress = progress or TrialLines(n_trials)
        self.lock = lock or StartLock(None)  # None: a worker alone, nothing to share

    def has_room(self, study: optuna.Study) -> bool:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL + retry
            counts = count_states(study)
            done = counts["COMPLETE"] + counts["PRUNED"]
            if done >= self.n_trials:
                return False
            self.check_failures(study)
            if counts["WAITING"] or done + counts["RUNNING"] < self.n_trials:
                return True
            time.sleep(POLL_S)

    def check_failures(self, study: optuna.Study) -> None:
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if t.number >= self.first_trial and "error" in t.user_attrs]
        if len(failed) > self.max_failures:
            raise UserError(f"study {study.study_name}: {len(failed)} trials failed, the last with "
                            f"{failed[-1].user_attrs['error']}; fix the cause and run the same command again")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.lock.acquire()  # released by the next trial's first line (TrialRunner), or below when none follows
        report_progress(self.progress, study, trial)
        if not self.has_room(study):
            study.stop()
            self.lock.release()


class StartLock:
    """This machine's workers decide to start a trial one at a time: the lock is held from BudgetGate's
    check until the trial it allowed exists (TrialRunner releases it first thing), so two workers never
    both take the budget's last slot. Workers on other machines decide on their own: with a shared
    storage a sweep can still end one trial over there. No flock (Windows), or no path: no lock."""

    def __init__(self, path: Path | None):
        self.path, self.handle = path, None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:
            return
        if self.path is None:
            return
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a")
            fcntl.flock(self.handle, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.handle is not None:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class TrialLines:
    """Sweep progress as one line per finished trial (the default; the CLI passes a rich bar)."""

    def __init__(self, n_trials: int, bar: bool | None = None):
        self.total = max(int(n_trials), 1)

    def update(self, done: int, best: str, detail: str) -> None:
        print(format_trial_line(done, self.total, best, detail), flush=True)


def format_trial_line(done: int, total: int, best: str, detail: str) -> str:
    return f"trial {done} of {total}, best so far {best} ({detail})"


def report_progress(progress: Any, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    counts = count_states(study)
    try:
        best = f"{study.best_value:.4f}"
    except ValueError:  # no complete trial yet
        best = "none yet"
    value = f" {trial.value:.4f}" if trial.value is not None else ""
    reason = trial.user_attrs.get("pruned_reason") or trial.user_attrs.get("error") or ""
    progress.update(counts["COMPLETE"] + counts["PRUNED"], best,
                    f"#{trial.number} {trial.state.name}{value}{' ' + reason if reason else ''}")


def make_progress(settings: TuneSettings, in_worker: bool) -> Any:
    """A bar in the foreground; lines in spawned workers, whose bars would interleave on one terminal."""
    factory = settings.progress or TrialLines
    return factory(settings.n_trials, bar=False if in_worker else None)


def run_worker(settings: TuneSettings, index: int = 0, gpu: str | None = None, in_worker: bool = False) -> None:
    """One worker: loads the study by name and runs trials until the study's budget is done."""
    if gpu is not None:  # already set at spawn (visible_gpu); again for callers that run this directly
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    root = Path(settings.root)
    params = load_params(settings.params_dir, list(settings.overrides))
    prepared = open_prepared(params, Layout(root))  # a cache hit: the coordinator prepared the data
    if settings.local_workers > 1:  # GPU workers too: their input threads share this machine's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // settings.local_workers))
    storage = open_storage(settings.storage, params.tune,
                           StaleTrialHandler(params.tune.max_retry, resolve_tracking_uri(root)))
    study = optuna.load_study(study_name=settings.study_name, storage=storage, pruner=make_pruner(params.tune))
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(params.tune, index + 1000 * existing)
    lock = StartLock(root / "optuna" / f".{settings.study_name}.start.lock")
    gate = BudgetGate(settings.n_trials, existing, make_progress(settings, in_worker), lock)
    runner = TrialRunner(settings, params, prepared, index, gpu is not None, lock, gate.progress, storage)
    lock.acquire()
    try:
        if gate.has_room(study):
            study.optimize(runner, gc_after_trial=True, catch=(Exception,),
                           callbacks=[optuna.study.MaxTrialsCallback(settings.n_trials, states=DONE), gate])
    finally:
        lock.release()


def worker_main(settings: TuneSettings, index: int, gpu: str | None) -> None:
    """Process target: a worker whose user errors print one line and exit 2."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        run_worker(settings, index, gpu, in_worker=True)
    except UserError as exc:
        print(f"error: tune worker {index}: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


@contextlib.contextmanager
def visible_gpu(gpu: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES=gpu in the environment a child process is spawned with (then restored),
    so the worker's CUDA runtime only ever sees its own device."""
    if gpu is None:
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def start_workers(settings: TuneSettings, workers: int, gpus: list[str] | None = None) -> list:
    """K worker processes (spawn: no CUDA state or locks are inherited); worker i gets gpus[i % len]."""
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(workers):
        gpu = gpus[index % len(gpus)] if gpus else None
        process = context.Process(target=worker_main, args=(settings, index, gpu), name=f"freezeflow-tune-{index}")
        with visible_gpu(gpu):
            process.start()
        processes.append(process)
    return processes


def join_workers(processes: list) -> list[int]:
    """Wait for the workers; on Ctrl-C stop them too. Returns their exit codes."""
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join()
        raise
    return [process.exitcode for process in processes]


def run_workers(settings: TuneSettings, gpus: list[str] | None) -> list[int]:
    """One worker without GPU pinning runs in this process; otherwise K spawned processes."""
    if settings.local_workers == 1 and not gpus:
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            run_worker(settings)
        finally:
            optuna.logging.set_verbosity(verbosity)
        return [0]
    return join_workers(start_workers(settings, settings.local_workers, gpus))


# ---- the study -----------------------------------------------------------------------------------

def resolve_storage(option: str | None, from_params: str, folder: Path) -> str | None:
    """--storage, else the environment (storage_from_env), else tune.storage; None: the default."""
    if option:
        url, source = option, "--storage"
    else:
        url, source = storage_from_env() or (from_params, f"{folder / 'tune.yaml'}: storage")
    if not url:
        return None
    check_storage_url(url, source)
    if source not in (STORAGE_ENV, STORAGE_FILE_ENV):
        warn_password_in(url, source)
    return url


def resolve_settings(root: Path, params_dir: str | Path, overrides: list[str] | tuple, workers: int | None,
                     storage: str | None, study: str | None, n_trials: int | None) -> tuple[TuneSettings, Params]:
    root = Path(root).resolve()
    folder = Path(params_dir) if Path(params_dir).is_absolute() else root / params_dir
    params = load_params(folder, list(overrides))
    check_space(params, folder)
    for option, value in (("--workers", workers), ("--n-trials", n_trials)):
        if value is not None and value < 1:
            raise UserError(f"{option}: {value} is out of range; allowed: >= 1")
    url = resolve_storage(storage, params.tune.storage, folder) or default_storage(root)
    name = study if study is not None else params.tune.study_name
    if not name.strip():
        raise UserError("--study: empty name; allowed: any non-empty study name")
    settings = TuneSettings(str(root), str(folder), tuple(overrides), url, name, n_trials or params.tune.n_trials,
                            local_workers=workers or params.tune.workers)
    return settings, params


def prepare_study(root: Path, params_dir: str | Path = "params", overrides: list[str] | tuple = (),
                  workers: int | None = None, storage: str | None = None, study: str | None = None,
                  n_trials: int | None = None) -> TuneSettings:
    """Validate, prepare the data once, create (or load) the study and its MLflow parent run."""
    settings, params = resolve_settings(root, params_dir, overrides, workers, storage, study, n_trials)
    root = Path(settings.root)
    prepared = open_prepared(params, Layout(root))  # decode once here: workers then only read the prepared cache
    optuna_study = optuna.create_study(storage=open_storage(settings.storage, params.tune),
                                       study_name=settings.study_name, direction="maximize",
                                       sampler=make_sampler(params.tune), pruner=make_pruner(params.tune),
                                       load_if_exists=True)
    uri = resolve_tracking_uri(root)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, dataset_name(params, root), resolve_artifact_location(uri, root))
    settings = replace(settings, experiment_id=experiment_id)
    settings = replace(settings, parent_run_id=ensure_parent_run(client, optuna_study, settings, params))
    ensure_lr_finder(optuna_study, resolve_data_params(params, root), prepared, Layout(root), client,
                     settings.parent_run_id)
    return settings


def ensure_lr_finder(study: optuna.Study, params: Params, prepared: Prepared, layout: Layout,
                     client: MlflowClient, parent_run_id: str) -> None:
    """One lr range test per study, when the space is centred on it or train.lr is auto: stored as a
    study user attr (every worker, on any machine, reads the same one) and logged on the parent run."""
    wanted = (params.tune.space.lr.enabled and params.tune.space.lr.around_finder) or params.train.lr == "auto"
    if not wanted or FINDER_ATTR in study.user_attrs:
        return
    from freezeflow.integrations.tracking import log_lr_find
    from freezeflow.core.train.run import find_learning_rate

    result = find_learning_rate(params, prepared, layout)
    study.set_user_attr(FINDER_ATTR, {"suggestion": result.suggestion, "steps": len(result.lrs),
                                      "trainable_stages": result.trainable_stages})
    log_lr_find(client, parent_run_id, result)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial
        return None


def write_best_yaml(path: Path, trial: optuna.trial.FrozenTrial, study_name: str) -> None:
    """params/best.yaml: the best trial's train keys, nested (freeze: {strategy, until})."""
    tree: dict = {}
    for key, value in trial.user_attrs.get("train", {}).items():
        set_nested(tree, key.split("."), value)
    header = (f"# written by `freezeflow tune` (study {study_name}, trial {trial.number}, val_accuracy "
              f"{trial.value:.4f}); overlaid on train.yaml when train.use_best=true\n")
    write_text_atomic(path, header + yaml.safe_dump(tree, sort_keys=False))


def summarize_study(settings: TuneSettings) -> dict:
    """reports/tune.json, params/best.yaml, and the parent run's metrics, artifacts and plots."""
    root, params = Path(settings.root), load_params(settings.params_dir, list(settings.overrides))
    study = optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.storage, params.tune))
    counts, best = count_states(study), best_trial(study)
    summary = {
        "study_name": settings.study_name, "storage": mask_url(settings.storage), "n_trials": settings.n_trials,
        "best_value": best.value if best else None, "best_trial": best.number if best else None,
        "best_params": best.params if best else {}, "best_train": best.user_attrs.get("train", {}) if best else {},
        "n_complete": counts["COMPLETE"], "n_pruned": counts["PRUNED"], "n_failed": counts["FAIL"],
        "n_running": counts["RUNNING"], "mlflow_parent_run_id": settings.parent_run_id,
    }
    files = [root / "reports" / "tune.json"]
    if best:
        write_best_yaml(Path(settings.params_dir) / "best.yaml", best, settings.study_name)
        files.append(Path(settings.params_dir) / "best.yaml")
    write_json_atomic(files[0], summary)
    finish_parent_run(settings, study, summary, files)
    trials_dir = root / "checkpoints" / "trials"
    shutil.rmtree(trials_dir / settings.study_name, ignore_errors=True)  # left by dead workers
    with contextlib.suppress(OSError):
        trials_dir.rmdir()  # only when no other study's trials are running here
    return summary


def finish_parent_run(settings: TuneSettings, study: optuna.Study, summary: dict, files: list[Path]) -> None:
    client = MlflowClient(resolve_tracking_uri(Path(settings.root)))
    run_id = settings.parent_run_id
    totals = {k: float(summary[k]) for k in ("n_complete", "n_pruned", "n_failed")}
    if summary["best_value"] is not None:
        totals["best_val_accuracy"] = float(summary["best_value"])
        client.set_tag(run_id, "best_trial", str(summary["best_trial"]))
    log_totals(client, run_id, totals)
    for path in files:
        client.log_artifact(run_id, str(path), "reports")
    notes = log_study_plots(client, run_id, study)
    if notes:
        client.set_tag(run_id, "plots_note", "; ".join(notes))
    complete = summary["n_complete"] + summary["n_pruned"] >= settings.n_trials
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if complete else RunStatus.KILLED))


def parse_gpus(gpus: str | None) -> list[str] | None:
    if not gpus:
        return None
    items = [item.strip() for item in gpus.split(",")]
    if not all(item.isdigit() for item in items):
        raise UserError(f"--gpus: {gpus!r} is not allowed; allowed: comma-separated CUDA device numbers, e.g. 0,1")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if any(int(item) >= count for item in items):
        raise UserError(f"--gpus: {gpus!r} is not allowed; allowed: device numbers below {count} (the CUDA devices "
                        "visible here)" if count else f"--gpus: {gpus!r} asked for, but no CUDA device is available")
    return physical_gpus(items, os.environ.get("CUDA_VISIBLE_DEVICES"))


def physical_gpus(items: list[str], visible: str | None) -> list[str]:
    """--gpus numbers count the devices visible here; a worker's CUDA_VISIBLE_DEVICES needs the entries they
    stand for. Under SLURM or Kubernetes (CUDA_VISIBLE_DEVICES=4,5), --gpus 0,1 means devices 4 and 5."""
    entries = [entry.strip() for entry in (visible or "").split(",") if entry.strip()]
    if not entries:
        return items
    if any(int(item) >= len(entries) for item in items):
        raise UserError(f"--gpus: {','.join(items)} is not allowed; allowed: numbers below {len(entries)} "
                        f"(CUDA_VISIBLE_DEVICES={visible})")
    return [entries[int(item)] for item in items]


def sweep_plan(settings: TuneSettings) -> dict | None:
    """The sweep's predicted cost (integrations.tune_plan), printed in one line; None, with the reason
    printed, when it cannot be made (the sweep runs all the same: the plan only describes it)."""
    root = Path(settings.root)
    params = resolve_data_params(load_params(settings.params_dir, list(settings.overrides)), root)
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.storage, params.tune))
        fixed = float(study.user_attrs.get(FIXED_ATTR, DEFAULT_TRIAL_FIXED_S))  # measured by an earlier sweep
        plan = plan_sweep(params, open_prepared(params, Layout(root)), settings.n_trials, fixed)
    except Exception as exc:  # noqa: BLE001 - a calibration problem must not stop the sweep it describes
        print(f"cost plan skipped: {type(exc).__name__}: {first_line_masked(exc)}", flush=True)
        return None
    print(f"predicted: at most {plan['sweep']['total_s']:.1f} s for {settings.n_trials} trials "
          "(`freezeflow tune --plan` lists each configuration)", flush=True)
    return plan


def run_tune(root: Path | str = ".", params_dir: str | Path = "params", overrides: list[str] | tuple = (),
             workers: int | None = None, storage: str | None = None, study: str | None = None,
             gpus: str | None = None, n_trials: int | None = None, progress: Callable[..., Any] | None = None) -> dict:
    """The whole sweep: prepare, K workers until the budget is done, summary (see module doc)."""
    gpu_list = parse_gpus(gpus)
    settings = replace(prepare_study(Path(root), params_dir, overrides, workers, storage, study, n_trials),
                       progress=progress)
    print(f"study {settings.study_name} in {mask_url(settings.storage)}: {settings.n_trials} trials, "
          f"{settings.local_workers} worker(s) here", flush=True)
    plan = sweep_plan(settings)
    started = time.perf_counter()
    try:
        codes = run_workers(settings, gpu_list)
    except BaseException as exc:  # Ctrl-C, too many failed trials: close the parent run, re-raise
        client = MlflowClient(resolve_tracking_uri(Path(settings.root)))
        client.set_terminated(settings.parent_run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    measured = time.perf_counter() - started
    if plan is not None:  # before the parent run ends (summarize_study): predicted vs measured beside the results
        params = resolve_data_params(load_params(settings.params_dir, list(settings.overrides)), Path(settings.root))
        log_plan_outcome(MlflowClient(resolve_tracking_uri(Path(settings.root))), settings.parent_run_id, plan,
                         optuna.load_study(study_name=settings.study_name,
                                           storage=open_storage(settings.storage, params.tune)), params, measured)
    summary = summarize_study(settings) | {"worker_exit_codes": codes}
    if summary["n_complete"] + summary["n_pruned"] < settings.n_trials:
        raise UserError(f"study {settings.study_name}: {summary['n_complete'] + summary['n_pruned']} of "
                        f"{settings.n_trials} trials done (worker exit codes {codes}); run the same command "
                        "again to continue the study")
    return summary
