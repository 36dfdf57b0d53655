"""bench suite `sweep`: an Optuna sweep with pruning and the shared feature cache against both off.

    python -m bench sweep [--trials 12] [--repeats 3] [--slow-repeats 1] [--epochs 5] ...

Contenders (alternating per repeat, each in a fresh spawned process and a fresh project folder):
  sweep-on      `run_tune`: --trials trials x --epochs epochs, median pruner, shared frozen-feature cache
  sweep-off     the same study with tune.pruner=none and train.cache_features=off
  plain-head    ONE plain-recipe `head` training of the same epochs (harness.run_plain)
  plain-until2  ONE plain-recipe `until` k=2 training of the same epochs
  sweep-head    20 `head` trials, ASHA pruning + fusion (tune.fuse): at most 0.25x plain-head
  sweep-freeze  20 trials that also search the freezing (head or until k in 2..5), ASHA + fusion + cache:
                at most 1.0x plain-until2, best val accuracy within 1 point of sweep-freeze-off's
  sweep-freeze-off  the same 20 trials with pruning and fusion off (tune.pruner=none, tune.fuse=1)

Each study runs in its own scratch project: a copy of the params folder (tune writes params/best.yaml),
prepared/ symlinked to the bench's prepared data, an empty feature cache, and the Optuna study and MLflow
runs in sqlite files inside that folder. It is an adapter suite: it needs optuna and mlflow
(`pip install -e .[pipeline]`), imported only in the contender's process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import harness

TIME_RATIO_TARGET = 0.4  # sweep-on takes at most 40% of sweep-off's time...
ACCURACY_TOLERANCE = 0.01  # ...at a best val accuracy at most 1 point below
FREEZE_TRIALS = 20
RUNNER = "bench.sweep:run_study"


def check_ready(settings: harness.Settings) -> str | None:
    missing = [name for name in ("optuna", "mlflow") if importlib.util.find_spec(name) is None]
    return f"needs {' and '.join(missing)} (pip install -e .[pipeline])" if missing else None


# ---- the contenders ---------------------------------------------------------------------------------

def pin_overrides(ctx: harness.Context) -> list[str]:
    """The bench's pinned params as tune's -S overrides; the sweep length is tune.epochs, not train.epochs."""
    pinned = harness.pin_values(ctx.settings, "head", harness.pick_until_stage(ctx))
    pinned.pop("train.epochs")
    return [f"{k}={v}" for k, v in pinned.items()] + [f"tune.epochs={ctx.settings.epochs}", "tune.workers=1"]


FREEZE_RANGE = (2, 5)  # `until` k of the freeze sweep (issue 17): stem and stage1 always frozen
SWEEP_PRUNER = "tune.pruner=asha"


def pick_until_range(ctx: harness.Context) -> tuple[int, int]:
    """`until` k in 2..5, clipped to the backbone's body stages."""
    n = len(ctx.stage_names)
    return min(FREEZE_RANGE[0], n - 2), min(FREEZE_RANGE[1], n - 2)


def make_study_spec(ctx: harness.Context, name: str, trials: int, extra: list[str], repeats: int | None) -> dict:
    spec = harness.make_spec(ctx, name, "sweep", "head", repeats)
    return spec | {"runner": RUNNER, "trials": trials, "overrides": pin_overrides(ctx) + extra, "extra": extra,
                   "params_dir": str(Path(ctx.settings.params_dir).resolve())}


def list_contenders(ctx: harness.Context) -> list[dict]:
    s = ctx.settings
    slow = s.slow_repeats or None  # --slow-repeats: the two long studies (off, freeze) may repeat less
    freeze_trials = s.trials if s.tiny else FREEZE_TRIALS  # --tiny: a seconds-long smoke run
    low, high = pick_until_range(ctx)
    freeze = ["tune.space.freeze.enabled=true", f"tune.space.freeze.until_low={low}",
              f"tune.space.freeze.until_high={high}"]
    plain_until = harness.make_spec(ctx, "plain-until2", "plain", "until", slow)
    plain_until["params"] = harness.make_params(s, "until", low)
    return [make_study_spec(ctx, "sweep-on", s.trials, ["tune.pruner=median"], None),
            make_study_spec(ctx, "sweep-off", s.trials, ["tune.pruner=none", "train.cache_features=off",
                                                         "tune.fuse=1"], slow),
            harness.make_spec(ctx, "plain-head", "plain", "head"),
            plain_until,
            make_study_spec(ctx, "sweep-head", freeze_trials, [SWEEP_PRUNER], None),
            make_study_spec(ctx, "sweep-freeze", freeze_trials, [SWEEP_PRUNER] + freeze, None),
            make_study_spec(ctx, "sweep-freeze-off", freeze_trials, ["tune.pruner=none", "tune.fuse=1"] + freeze,
                            slow)]


@contextlib.contextmanager
def scratch_tracking():
    """MLflow in the scratch project: an MLFLOW_TRACKING_URI from the shell would send trials elsewhere."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def import_adapters() -> None:
    """Import what a sweep imports before the clock starts: the bench times sweeps, not Python imports
    (the plain recipe's contender, too, has torch and torchvision imported before its clock)."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib  # noqa: F401 - the study plots of summarize_study

    import freezeflow.integrations.tune  # noqa: F401


def copy_empty_mlflow_db(work: Path, root: Path) -> None:
    """A migrated, empty MLflow sqlite file for the scratch project. Creating one runs MLflow's schema
    migrations (~6 s here): a one-off cost of a project's first run, not of each sweep."""
    from mlflow.tracking import MlflowClient

    template = work / "mlflow-empty" / "mlflow.db"
    if not template.exists():  # contenders run one at a time: no race
        template.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(f"sqlite:///{template}").search_experiments()  # any call creates the tables
    (root / "mlflow").mkdir()
    shutil.copy2(template, root / "mlflow" / "mlflow.db")


def run_study(spec: dict) -> dict:
    """Worker: one whole `run_tune` (setup, trials, summary, MLflow plots) in a fresh project folder."""
    import_adapters()
    import optuna

    from freezeflow.integrations.tune import run_tune

    root = Path(tempfile.mkdtemp(prefix="sweep-", dir=spec["work"]))
    try:
        (root / "prepared").symlink_to(Path(spec["prepared"]).resolve(), target_is_directory=True)
        shutil.copytree(spec["params_dir"], root / "params")  # summarize_study writes params/best.yaml
        copy_empty_mlflow_db(Path(spec["work"]), root)
        storage = f"sqlite:///{root / 'optuna.db'}"  # not tune.yaml's storage: a study per contender run
        with scratch_tracking():
            start = time.perf_counter()
            summary = run_tune(root, "params", spec["overrides"], workers=1, storage=storage,
                               n_trials=spec["trials"])
            wall = time.perf_counter() - start
        trials = optuna.load_study(study_name=summary["study_name"], storage=storage).get_trials(deepcopy=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # unlinks the prepared symlink, never follows it
    return {"wall_s": wall, "trials_s": sum(t.duration.total_seconds() for t in trials if t.duration),
            "best_val_accuracy": summary["best_value"], "best_train": summary["best_train"],
            "n_complete": summary["n_complete"], "n_pruned": summary["n_pruned"], "n_failed": summary["n_failed"],
            "epochs_trained": sum(len(t.intermediate_values) for t in trials),
            "fused_trials": sum("fused_with" in t.user_attrs for t in trials)}


# ---- the report ---------------------------------------------------------------------------------------

def summarize_study(spec: dict, runs: list[dict]) -> dict:
    return {"name": spec["name"], "kind": "sweep", "trials": spec["trials"], "repeats": len(runs),
            "overrides": spec["extra"],
            "wall_s": harness.summarize_values([r["wall_s"] for r in runs]),
            "trials_s": harness.summarize_values([r["trials_s"] for r in runs]),
            "best_val_accuracy": round(statistics.median(r["best_val_accuracy"] for r in runs), 4),
            "best_val_accuracy_runs": [round(r["best_val_accuracy"], 4) for r in runs],
            "complete_runs": [r["n_complete"] for r in runs], "pruned_runs": [r["n_pruned"] for r in runs],
            "failed_runs": [r["n_failed"] for r in runs], "epochs_trained_runs": [r["epochs_trained"] for r in runs],
            "fused_trials_runs": [r["fused_trials"] for r in runs],
            "best_train_runs": [r["best_train"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def summarize_plain(spec: dict, runs: list[dict]) -> dict:
    row = harness.summarize_training(spec, runs)
    return row | {"kind": "plain", "trials": 1, "best_val_accuracy": row["val_accuracy"],
                  "best_val_accuracy_runs": row["val_accuracy_runs"]}


def check_targets(rows: dict[str, dict]) -> list[dict]:
    on, off, plain, until = (rows[n] for n in ("sweep-on", "sweep-off", "plain-head", "plain-until2"))
    head, freeze, freeze_off = (rows[n] for n in ("sweep-head", "sweep-freeze", "sweep-freeze-off"))
    ratio = on["wall_s"]["median"] / off["wall_s"]["median"]
    drop = off["best_val_accuracy"] - on["best_val_accuracy"]
    versus_until = freeze["wall_s"]["median"] / until["wall_s"]["median"]
    freeze_drop = freeze_off["best_val_accuracy"] - freeze["best_val_accuracy"]
    head_ratio = head["wall_s"]["median"] / plain["wall_s"]["median"]
    return [{"name": "sweep on vs off", "criterion": f"wall(on) / wall(off) <= {TIME_RATIO_TARGET} with best val "
             f"accuracy at most {ACCURACY_TOLERANCE * 100:.0f} point below off's",
             "value": round(ratio, 3), "best_val_accuracy_drop": round(drop, 4),
             "met": ratio <= TIME_RATIO_TARGET and drop <= ACCURACY_TOLERANCE + 1e-9},
            {"name": f"{freeze['trials']}-trial head/until sweep vs one plain until k=2 training",
             "criterion": "wall(sweep-freeze) / wall(plain-until2, same epochs) <= 1.0 with best val accuracy at "
                          f"most {ACCURACY_TOLERANCE * 100:.0f} point below sweep-freeze-off's",
             "value": round(versus_until, 3), "best_val_accuracy_drop": round(freeze_drop, 4),
             "met": versus_until <= 1.0 and freeze_drop <= ACCURACY_TOLERANCE + 1e-9},
            {"name": f"{head['trials']} head trials vs one plain head training",
             "criterion": "wall(sweep-head) / wall(plain-head, same epochs) <= 0.25",
             "value": round(head_ratio, 3), "met": head_ratio <= 0.25}]


def run(ctx: harness.Context, pool) -> dict:
    contenders = list_contenders(ctx)
    results = harness.run_alternating(pool, contenders, "sweep")
    rows = {c["name"]: (summarize_plain if c["kind"] == "plain" else summarize_study)(c, results[c["name"]])
            for c in contenders}
    low, high = pick_until_range(ctx)
    return {"contenders": list(rows.values()), "targets": check_targets(rows),
            "space": {"default": "batch_size, lr, schedule (params/tune.yaml)",
                      "sweep-freeze": f"also freeze.strategy in [head, until], until k in {low}..{high} (stages "
                                      f"before k frozen: training starts at {ctx.stage_names[low]} .. "
                                      f"{ctx.stage_names[high]})"}}


def render(report: dict) -> list[str]:
    rows = [[c["name"], c["trials"], c["repeats"], harness.format_span(c["wall_s"]),
             harness.format_span(c["trials_s"]) if "trials_s" in c else "-",
             c["best_val_accuracy"], "/".join(map(str, c.get("complete_runs", ["-"]))),
             "/".join(map(str, c.get("pruned_runs", ["-"]))), c["peak_rss_mb"]] for c in report["contenders"]]
    out = harness.render_table(["contender", "trials", "repeats", "wall s median [min–max]", "trials s",
                              "best val acc (median)", "complete (per repeat)", "pruned (per repeat)",
                              "peak RSS MB"], rows)
    out += ["", "plain-head and plain-until2 are one plain-recipe training each (trials = 1); wall s is run_plain's "
            "end to end and the accuracy the best epoch's val accuracy.",
            f"sweep-freeze space: {report['space']['sweep-freeze']}"]
    return out
