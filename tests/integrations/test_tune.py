"""Optuna sweeps for real: tiny studies on PNG files in tmp_path, worker processes sharing a sqlite
file or a PostgreSQL database, a CUDA OOM in one trial, the median, hyperband and ASHA pruners stopping a
bad trial, the shared frozen-feature cache and the MLflow parent/child runs. No Optuna, MLflow or
filesystem mocks (the OOM is our own trainer's epoch, monkeypatched in an in-process worker)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import FixedTrial, TrialState

from freezeflow.core.errors import ParamsError, UserError
from freezeflow.core.params import load_params
from freezeflow.integrations.secrets import mask_url
from freezeflow.integrations import tune
from freezeflow.integrations.tune import (PARENT_ATTR, batch_choices, check_space, prepare_study, run_tune,
                                          suggest_train, yaml_scalar)
from freezeflow.core.schedules import SCHEDULES
from freezeflow.core.train.callbacks import Callback
from freezeflow.integrations.tune import ReportToTrial
from tests.conftest import REPO, tiny_overrides, write_shapes_dataset

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
# 2 epochs per trial, batch sizes that fit the 18 training images, head strategy (features cached)
TUNE = {"train.epochs": 2, "tune.epochs": 2, "tune.space.batch_size.choices": "[4, 8, 16]",
        "tune.space.schedule.choices": "[constant, step, cosine]", "train.freeze.strategy": "head"}


def make_project(root: Path, **extra) -> list[str]:
    """params/ copied from the repo, 3 classes x 10 PNGs under data/shapes; returns the overrides."""
    if not (root / "params").exists():
        shutil.copytree(REPO / "params", root / "params", ignore=shutil.ignore_patterns("best.yaml"))
    data = write_shapes_dataset(root / "data" / "shapes", classes=3, per_class=10)
    return tiny_overrides(data, **{**TUNE, **extra})


def open_study(url: str, name: str = "freezeflow") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def counts(study: optuna.Study) -> dict[str, int]:
    out = {state.name: 0 for state in TrialState}
    for trial in study.get_trials():
        out[trial.state.name] += 1
    return out


def mlflow_client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root.resolve() / 'mlflow' / 'mlflow.db'}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One 6-trial study, 2 worker processes, default sqlite storage; trials one at a time (tune.fuse=1:
    fused, one worker would take the whole budget; test_fused_head_trials_... covers fusion)."""
    root = tmp_path_factory.mktemp("sweep")
    overrides = make_project(root, **{"tune.fuse": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        started = time.perf_counter()
        summary = run_tune(root, "params", overrides, workers=2, n_trials=6)
        summary["seconds"] = time.perf_counter() - started
    return root, overrides, summary


# ---- fast: the search space and helpers ----------------------------------------------------------

def test_conditional_params_follow_the_schedule(project):
    params = load_params(project / "params")
    space = params.tune.space
    step = suggest_train(FixedTrial({"batch_size": 32, "lr": 0.01, "schedule": "step", "step_size": 2,
                                     "gamma": 0.5}), space, params.train, 1000)
    assert step == {"batch_size": 32, "lr": 0.01, "schedule": "step", "step_size": 2, "gamma": 0.5}
    plateau = suggest_train(FixedTrial({"batch_size": 16, "lr": 0.01, "schedule": "plateau", "plateau_patience": 1,
                                        "plateau_factor": 0.3}), space, params.train, 1000)
    assert set(plateau) == {"batch_size", "lr", "schedule", "plateau_patience", "plateau_factor"}
    cosine = suggest_train(FixedTrial({"batch_size": 16, "lr": 0.01, "schedule": "cosine", "warmup_epochs": 0.5}),
                           space, params.train, 1000)
    assert cosine["warmup_epochs"] == 0.5 and "gamma" not in cosine


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_each_schedule_suggests_the_keys_its_table_row_reads(project, schedule):
    params = load_params(project / "params")
    space = params.tune.space
    own = {key: getattr(space.schedule, key).high for key in SCHEDULES[schedule].reads}
    values = suggest_train(FixedTrial({"batch_size": 16, "lr": 0.01, "schedule": schedule, **own}), space,
                           params.train, 1000)
    assert values == {"batch_size": 16, "lr": 0.01, "schedule": schedule, **own}
    assert all(type(values[key]) is type(getattr(params.train, key)) for key in own)  # ints stay ints


def test_the_trial_callbacks_are_trainer_callbacks():
    assert issubclass(ReportToTrial, Callback)


def test_lr_scaling_disabled_dimensions_and_batch_cap(project):
    params = load_params(project / "params", ["tune.space.lr_scaling=linear", "tune.space.base_batch_size=64",
                                              "tune.space.schedule.enabled=false", "tune.space.freeze.enabled=true",
                                              "tune.space.freeze.choices=[until]"])
    values = suggest_train(FixedTrial({"batch_size": 32, "lr": 0.01, "freeze.strategy": "until", "freeze.until": 2}),
                           params.tune.space, params.train, 1000)
    assert values == {"batch_size": 32, "lr": 0.005, "freeze.strategy": "until", "freeze.until": 2}
    assert batch_choices(params.tune.space, 40) == [16, 32]
    assert batch_choices(params.tune.space, 10) == [16]  # none fits: the smallest


def test_bad_search_space_is_a_one_line_error(project):
    with pytest.raises(ParamsError, match=r"tune.yaml: space.schedule.choices: \['cosine', 'linear'\] is not "
                                          r"allowed; allowed: constant, step"):
        load_params(project / "params", ["tune.space.schedule.choices=[cosine, linear]"])
    with pytest.raises(ParamsError, match=r"space.batch_size.choices: \[24\] is not allowed; allowed: 1, 2, 4"):
        load_params(project / "params", ["tune.space.batch_size.choices=[24]"])
    with pytest.raises(ParamsError, match=r"space.lr: low 1.0 > high 0.1"):
        load_params(project / "params", ["tune.space.lr.low=1.0"])
    with pytest.raises(ParamsError, match=r"space.schedule.gammma: unknown key; allowed: enabled, choices"):
        load_params(project / "params", ["tune.space.schedule.gammma.low=0.5"])
    params = load_params(project / "params", ["train.backbone=resnet18", "tune.space.freeze.enabled=true",
                                              "tune.space.freeze.until_high=9"])
    with pytest.raises(ParamsError, match=r"tune.yaml: space.freeze.until_high: 9 is out of range for resnet18"):
        check_space(params, project / "params")


def test_storage_urls_are_checked_and_masked(project):
    assert mask_url("postgresql+psycopg2://user:s3cret@db.example:5432/optuna") == \
        "postgresql+psycopg2://user:***@db.example:5432/optuna"
    assert mask_url("sqlite:////tmp/x/optuna.db") == "sqlite:////tmp/x/optuna.db"
    with pytest.raises(UserError, match=r"--storage: 'redis://host' is not allowed; allowed: a SQLAlchemy"):
        prepare_study(project, "params", [], storage="redis://host")
    assert yaml.safe_load(yaml_scalar(1e-05)) == 1e-05 and yaml.safe_load(yaml_scalar(0.003)) == 0.003


# ---- slow: real studies --------------------------------------------------------------------------

@pytest.mark.slow
def test_two_workers_on_sqlite_finish_the_budget_and_write_best_params(sweep):
    root, overrides, summary = sweep
    report = json.loads((root / "reports" / "tune.json").read_text())
    assert report["storage"] == f"sqlite:///{root.resolve() / 'optuna' / 'optuna.db'}"
    assert report["n_complete"] + report["n_pruned"] == 6 and report["n_running"] == 0
    assert summary["worker_exit_codes"] == [0, 0]
    study = open_study(report["storage"])
    assert counts(study)["RUNNING"] == 0 and counts(study)["COMPLETE"] + counts(study)["PRUNED"] == 6
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}  # both processes ran trials
    assert report["best_value"] == study.best_value and report["best_params"] == study.best_params
    best = yaml.safe_load((root / "params" / "best.yaml").read_text())
    assert best == study.best_trial.user_attrs["train"] and "lr" in best and "schedule" in best
    params = load_params(root / "params", [*overrides, "train.use_best=true"])
    assert params.train.lr == report["best_train"]["lr"] == study.best_params["lr"]  # lr_scaling: none
    assert params.train.batch_size == best["batch_size"] and params.train.schedule == best["schedule"]
    assert params.train.epochs == 2  # best.yaml holds tuned keys only
    assert not (root / "checkpoints" / "trials").exists()  # per-trial checkpoints are deleted


def raise_oom() -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.slow
def test_cuda_oom_prunes_that_trial_and_the_study_goes_on(project, monkeypatch):
    """Trial 1's first epoch runs out of CUDA memory; the study prunes it (reason oom) and goes on.
    One worker runs in this process (run_workers), so the monkeypatched trainer is the one used."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = make_project(project, **{"tune.pruner": "none", "tune.fuse": 1})  # the one-trial path
    build_trainer = tune.build_trainer

    def build_trainer_oom_in_trial_1(params, prepared, layout, callbacks, **kwargs):
        trainer = build_trainer(params, prepared, layout, callbacks, **kwargs)
        if layout.trial_dir.name == "1":  # TrialLayout: checkpoints/trials/<study>/<trial number>
            trainer.train_epoch = raise_oom
        return trainer

    monkeypatch.setattr(tune, "build_trainer", build_trainer_oom_in_trial_1)
    summary = run_tune(project, "params", overrides, workers=1, n_trials=3)
    assert summary["worker_exit_codes"] == [0]  # in-process: nothing was spawned
    study = open_study(f"sqlite:///{project.resolve() / 'optuna' / 'optuna.db'}")
    oom = study.trials[1]
    assert oom.state == TrialState.PRUNED and oom.user_attrs["pruned_reason"] == "oom"
    assert "lr" in oom.params and not oom.intermediate_values  # the OOM hit before epoch 1 was reported
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert summary["n_complete"] == 2 and summary["n_pruned"] == 1 and summary["n_failed"] == 0
    child = mlflow_client(project).get_run(oom.user_attrs["mlflow_run_id"])
    assert child.info.status == "KILLED" and child.data.tags["pruned_reason"] == "oom"


def tune_enqueued(root: Path, overrides: list[str], lrs: list[float], name: str) -> optuna.Study:
    """A study whose trials take `lrs` in order (lr is the only dimension), run by one worker here."""
    settings = prepare_study(root, "params", overrides, workers=1, study=name, n_trials=len(lrs))
    study = open_study(settings.storage, name)
    for lr in lrs:
        study.enqueue_trial({"lr": lr})
    run_tune(root, "params", overrides, workers=1, study=name, n_trials=len(lrs))
    return open_study(settings.storage, name)


# lr only; a lr of 1e-6 leaves the head where it started: obviously worse after epoch 1 than 0.01
PRUNER_RUN = {"tune.space.batch_size.enabled": "false", "tune.space.schedule.enabled": "false",
              "tune.space.lr.low": "1.0e-6", "train.batch_size": 4, "train.freeze.strategy": "head"}


@pytest.mark.slow
@pytest.mark.parametrize("pruner, n_good, fuse", [
    # MedianPruner: the first 5 trials (n_startup_trials) are never pruned, and it compares with complete
    # trials only: fused, all 6 run at once and none is complete yet, so it runs them one by one
    ("median", 5, 1),
    ("hyperband", 2, 8),  # tune.epochs=2: one successive-halving bracket, its rung at epoch 1
    ("asha", 2, 8),       # rung at epoch 1: of 3 trials there, only the best third (one) goes on; fused
    ("asha", 2, 1),
])
def test_pruner_stops_a_trial_with_a_bad_lr(project, monkeypatch, pruner, n_good, fuse):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = make_project(project, **PRUNER_RUN, **{"tune.pruner": pruner, "tune.fuse": fuse})
    study = tune_enqueued(project, overrides, [0.01] * n_good + [1e-6], f"prune-{pruner}")
    *good, bad = study.trials
    assert [t.state for t in good] == [TrialState.COMPLETE] * n_good
    assert [t.params["lr"] for t in study.trials] == [0.01] * n_good + [1e-6]
    assert bad.state == TrialState.PRUNED and bad.user_attrs["pruned_reason"] == pruner
    assert list(bad.intermediate_values) == [1]  # stopped after its first epoch of two
    assert (bad.user_attrs.get("fused_with") == [t.number for t in study.trials]) == (fuse > 1)
    assert bad.intermediate_values[1] < min(t.intermediate_values[1] for t in good)
    child = mlflow_client(project).get_run(bad.user_attrs["mlflow_run_id"])
    assert child.info.status == "KILLED" and child.data.tags["pruned_reason"] == pruner


@pytest.mark.slow
def test_trials_share_one_frozen_feature_cache(sweep):
    root, _, _ = sweep
    keys = [p.name for p in (root / "cache" / "features").iterdir() if not p.name.startswith(".")]
    assert len(keys) == 1 and keys[0].startswith("resnet18-L5-")  # head: every trial froze stages 0..4
    study = open_study(f"sqlite:///{root.resolve() / 'optuna' / 'optuna.db'}")
    builds = [t.user_attrs.get("feature_builds", 0) for t in study.trials]
    assert sum(builds) == 2 and sorted(builds)[-1] == 2  # one trial built train + val (trials never need test), the rest loaded


@pytest.mark.slow
def test_plan_predicts_every_configuration_and_runs_nothing(project, capsys):
    """`freezeflow tune --plan`: a line per (freezing, batch size) of the space, the sweep's bound, the JSON."""
    from freezeflow.app.steps import plan_step

    overrides = make_project(project, **{"tune.space.freeze.enabled": "true", "tune.space.freeze.until_low": 2,
                                         "tune.space.freeze.until_high": 3})
    plan = plan_step(project, "params", overrides, 4)
    out = capsys.readouterr().out
    labels = {row["freeze"] for row in plan["configurations"]}
    assert labels == {"head", "until 2", "until 3"} and "sweep of 4 trials: at most" in out
    head = [r for r in plan["configurations"] if r["freeze"] == "head"]
    assert all(r["feature_build_s"] > 0 and r["train_s"] > 0 for r in head)
    assert all(r["trial_s"] == pytest.approx(r["train_s"] + plan["trial_fixed_s"], abs=0.002) for r in head)
    until2 = next(r for r in plan["configurations"] if r["freeze"] == "until 2")
    assert until2["epoch_s"] > head[0]["epoch_s"]  # more stages train
    assert json.loads((project / "reports" / "tune_plan.json").read_text())["sweep"] == plan["sweep"]
    assert not (project / "optuna").exists() and not (project / "mlflow").exists()  # nothing ran


def test_mlflow_parent_run_with_one_child_per_trial(sweep):
    root, _, summary = sweep
    client = mlflow_client(root)
    study = open_study(f"sqlite:///{root.resolve() / 'optuna' / 'optuna.db'}")
    parent_id = study.user_attrs[PARENT_ATTR]
    assert parent_id == summary["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.metrics["plan_predicted_s"] > 0 and parent.data.metrics["plan_measured_s"] > 0
    plan = json.loads(Path(client.download_artifacts(parent_id, "reports/plan.json")).read_text())
    assert sorted(t["number"] for t in plan["outcome"]["trials"]) == sorted(t.number for t in study.trials)
    assert all(t["predicted_s"] > 0 and t["measured_s"] > 0 for t in plan["outcome"]["trials"])
    complete = [t for t in plan["outcome"]["trials"] if t["state"] == "COMPLETE"]
    assert complete and all(0 < t["fixed_s"] < t["measured_s"] for t in complete)
    assert parent.data.metrics["trial_fixed_s_median"] == plan["outcome"]["trial_fixed_s_median"]
    assert study.user_attrs["trial_fixed_s"] == plan["outcome"]["trial_fixed_s_median"]  # the next plan's
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna_study"] == "freezeflow"
    plots = {Path(a.path).name for a in client.list_artifacts(parent_id, "plots")}
    assert plots == {"optimization_history.png", "param_importances.png", "parallel_coordinate.png"}
    experiment = client.get_experiment_by_name("shapes")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == len(study.trials) == 6
    states = {t.number: t.state.name for t in study.trials}
    for child in children:
        number = int(child.data.tags["optuna_trial"])
        assert child.data.tags["optuna_state"] == states[number]
        assert child.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[states[number]]
        history = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert history == [1, 2] if states[number] == "COMPLETE" else history[:1] == [1]  # pruned: 1 or 2
        assert {"train_loss", "val_loss", "time_per_epoch_s"} <= set(child.data.metrics)
        assert child.data.params["train.epochs"] == "2" and "train.lr" in child.data.params


FUSED_TRIALS = [{"lr": 0.01, "schedule": "cosine"}, {"lr": 0.003, "schedule": "constant"},
                {"lr": 0.03, "schedule": "step", "step_size": 1, "gamma": 0.5}, {"lr": 0.001, "schedule": "cosine"}]


@pytest.mark.slow
def test_fused_head_trials_equal_the_same_trials_one_by_one(project, monkeypatch):
    """Four enqueued head trials (batch size fixed): fused (one group) and alone give the same values;
    each fused member is its own Optuna trial and its own MLflow run with per-epoch metrics."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = make_project(project, **{"tune.space.batch_size.enabled": "false", "train.batch_size": 8,
                                    "tune.pruner": "none", "tune.space.schedule.warmup_epochs.high": "0.0"})
    studies = {}
    for fuse in (4, 1):
        overrides = [*base, f"tune.fuse={fuse}"]
        name = f"fuse-{fuse}"
        settings = prepare_study(project, "params", overrides, workers=1, study=name, n_trials=len(FUSED_TRIALS))
        for values in FUSED_TRIALS:
            open_study(settings.storage, name).enqueue_trial(values)
        run_tune(project, "params", overrides, workers=1, study=name, n_trials=len(FUSED_TRIALS))
        studies[fuse] = open_study(settings.storage, name)
    fused, alone = studies[4].trials, studies[1].trials
    assert [t.params for t in fused] == [t.params for t in alone]
    assert [t.state for t in fused] == [TrialState.COMPLETE] * 4
    assert [t.value for t in fused] == pytest.approx([t.value for t in alone], abs=1e-6)
    for a, b in zip(fused, alone):
        assert a.intermediate_values == pytest.approx(b.intermediate_values, abs=1e-6)
    assert all(t.user_attrs["fused_with"] == [0, 1, 2, 3] for t in fused)
    assert not any("fused_with" in t.user_attrs for t in alone)
    client = mlflow_client(project)
    for trial in fused:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["fused_with"] == "0,1,2,3"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
        assert run.data.params["train.lr"] == str(trial.params["lr"])


START_LOCK_PROBE = """
import fcntl, sys
with open(sys.argv[1], "a") as handle:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free")
    except BlockingIOError:
        print("held")
"""


def test_start_lock_lets_one_worker_at_a_time_check_the_budget(tmp_path):
    """Held from BudgetGate's check to the trial's first line: another worker's check waits for it."""
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    lock = tune.StartLock(tmp_path / "optuna" / ".study.start.lock")
    probe = lambda: subprocess.run([sys.executable, "-c", START_LOCK_PROBE, str(lock.path)],  # noqa: E731
                                   capture_output=True, text=True, check=True).stdout.strip()
    lock.acquire()
    lock.acquire()  # held already: a no-op, not a deadlock
    assert probe() == "held"
    lock.release()
    assert probe() == "free"
    lock.release()  # released already: a no-op
    tune.StartLock(None).acquire()  # no path: nothing to share


@pytest.fixture
def postgres_url() -> str:
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user="postgres", connect_timeout=3).close()
    except psycopg2.Error as exc:
        pytest.skip(f"no PostgreSQL for {mask_url(PG_URL)}: {str(exc).strip().splitlines()[0]}")
    return PG_URL


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_a_postgres_study(project, postgres_url, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = make_project(project, **{"tune.pruner": "none", "tune.fuse": 1})  # fused, one worker takes all 4
    name = f"freezeflow-test-{uuid.uuid4().hex[:12]}"
    try:
        summary = run_tune(project, "params", overrides, workers=2, storage=postgres_url, study=name, n_trials=4)
        study = open_study(postgres_url, name)
        assert counts(study)["COMPLETE"] == 4 and counts(study)["RUNNING"] == 0
        assert summary["worker_exit_codes"] == [0, 0] and summary["storage"] == postgres_url
        assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}
        assert load_params(project / "params", [*overrides, "train.use_best=true"]).train.lr == \
            study.best_trial.user_attrs["train"]["lr"]
    finally:
        try:
            optuna.delete_study(study_name=name, storage=postgres_url)
        except KeyError:
            pass


def report_visible_devices(queue) -> None:
    import os

    queue.put(os.environ.get("CUDA_VISIBLE_DEVICES"))


def test_gpus_are_checked_and_a_worker_sees_only_its_own(monkeypatch):
    import multiprocessing
    import os

    import torch

    from freezeflow.integrations.tune import parse_gpus, visible_gpu

    assert parse_gpus(None) is None and parse_gpus("") is None
    with pytest.raises(UserError, match="--gpus: 'a,1' is not allowed; allowed: comma-separated"):
        parse_gpus("a,1")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is available"):
            parse_gpus("0")
    # pinning as start_workers does it: a worker spawned inside visible_gpu("1") sees device 1 only,
    # and this process keeps its own setting
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with visible_gpu("1"):
        child = context.Process(target=report_visible_devices, args=(queue,))
        child.start()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert queue.get(timeout=120) == "1"
    child.join(timeout=60)
    assert child.exitcode == 0


def test_gpu_numbers_map_through_an_existing_visible_devices_list():
    """Under SLURM or Kubernetes (CUDA_VISIBLE_DEVICES=4,5) --gpus 0,1 pins workers to devices 4 and 5."""
    from freezeflow.integrations.tune import physical_gpus

    assert physical_gpus(["0", "1"], None) == ["0", "1"] and physical_gpus(["1"], "") == ["1"]
    assert physical_gpus(["0", "1"], "4,5") == ["4", "5"]
    assert physical_gpus(["1"], "GPU-aaa, GPU-bbb") == ["GPU-bbb"]
    with pytest.raises(UserError, match="allowed: numbers below 2"):
        physical_gpus(["2"], "4,5")
