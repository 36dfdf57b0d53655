"""bench retrain: what a scheduled retrain on grown data costs, as a user runs it.

    python -m bench retrain --datasets textures --per-class 1300 --image-size 128 --epochs 1 --threads 2

For `head` and for `until`, in a fresh project folder each:
  1. `freezeflow ingest` a photo set (freezeflow.app.photosets), then `freezeflow pipeline -S data.dir=...`;
  2. add 30% new images to every class (the same per-class streams, longer: the old files are unchanged),
     then `freezeflow pipeline` again, which now faces a champion.
Both runs are real subprocesses (imports, Prefect's flow, MLflow logging and the registry's gate included).
Reported per run: wall time, images decoded, feature rows computed, prepare and feature-build seconds
(from reports/metrics.json), and the gate's two scores (the challenger's val accuracy and the champion
re-scored on the same val split). Goal: the second run decodes exactly the new images, computes feature
rows only for them, and its prepare + feature-build time is at most 35% of the first run's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import harness

REPO = Path(__file__).resolve().parents[1]
GROWTH = 0.3  # new images per old image, in every class
RATIO_TARGET = 0.35  # second run's prepare + feature-build time over the first run's
STRATEGIES = ("head", "until")
# what the Makefile exports: no usage analytics (Prefect's server writes them to its sqlite at start)
QUIET = {"DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DO_NOT_TRACK": "1",
         # a fresh PREFECT_HOME: the flow's temporary server creates its database first (>20 s on a busy CPU)
         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def check_ready(settings) -> str | None:
    if importlib.util.find_spec("skimage") is None:
        return "needs scikit-image (the photos the dataset is cut from): pip install scikit-image"
    for module in ("prefect", "mlflow"):
        if importlib.util.find_spec(module) is None:
            return f"needs {module}: the suite runs the whole pipeline (make install)"
    return None


def run(ctx: harness.Context, pool) -> dict:
    from freezeflow.app.photosets import class_counts, write_photoset

    s = ctx.settings
    name = s.datasets[0]
    full = ctx.work / "retrain" / "source-grown"
    grown_info = write_photoset(name, full, round(s.per_class * (1 + GROWTH)))
    old_counts = class_counts(name, s.per_class)  # per-class streams: these are the smaller set's files
    old, new = split_source(full, old_counts, ctx.work / "retrain" / "source")
    old_info = {"images": sum(old_counts.values())}
    rows = []
    for strategy in [x for x in STRATEGIES if x in s.strategies]:  # --strategies head: one of them
        project = ctx.work / "retrain" / strategy
        make_project(project, Path(s.params_dir))
        ingest(project, old, name)
        first = run_pipeline(project, name, strategy, s)
        add_images(new, project / "data" / name)
        second = run_pipeline(project, name, strategy, s)
        rows.append(compare_runs(strategy, first, second, len(list(new.rglob("*.jpg")))))
    dataset = {"name": name, "images_first": old_info["images"], "images_second": grown_info["images"],
               "added": grown_info["images"] - old_info["images"]}
    return {"dataset_grown": dataset, "rows": rows, "targets": [t for r in rows for t in r.pop("targets")]}


def split_source(full: Path, counts: dict[str, int], dest: Path) -> tuple[Path, Path]:
    """dest/old: the first counts[c] images of each class (byte-identical to the smaller set), dest/new: the rest."""
    for cls, n in counts.items():
        files = sorted((full / cls).glob("*.jpg"))
        for i, path in enumerate(files):
            target = dest / ("old" if i < n else "new") / cls / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return dest / "old", dest / "new"


def make_project(project: Path, params_dir: Path) -> None:
    shutil.rmtree(project, ignore_errors=True)
    shutil.copytree(params_dir, project / "params", ignore=shutil.ignore_patterns("best.yaml"))


def freezeflow(project: Path, *args: str, threads: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect"), "PYTHONPATH": str(REPO),
           **QUIET}
    if threads:  # --threads: torch's intra-op threads in the pipeline's process
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-c", "from freezeflow.app.cli import main; main()", *args], cwd=project,
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"freezeflow {' '.join(args)} failed in {project}:\n{proc.stderr[-3000:]}")
    return proc


def ingest(project: Path, src: Path, name: str) -> None:
    freezeflow(project, "ingest", str(src), "--name", name, "--no-track")


def add_images(src: Path, data: Path) -> None:
    """New photos dropped into the class folders, as a user's weekly batch arrives."""
    for path in sorted(src.rglob("*.jpg")):
        target = data / path.parent.name / f"new-{path.name}"
        shutil.copy2(path, target)


def run_pipeline(project: Path, name: str, strategy: str, s: harness.Settings) -> dict:
    sets = {"data.dir": f"data/{name}", "data.image_size": s.image_size, "train.epochs": s.epochs,
            "train.batch_size": s.batch_size, "train.freeze.strategy": strategy, "train.backbone": s.backbone,
            "train.weights": s.weights}
    args = [arg for key, value in sets.items() for arg in ("-S", f"{key}={value}")]
    started = time.perf_counter()
    proc = freezeflow(project, "pipeline", *args, threads=s.threads)
    wall = time.perf_counter() - started
    result = read_result(proc.stderr)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    registry, prepared = result["registry"], result["prepared"]
    decoded = prepared["decoded"] + metrics["images_decoded"]  # the flow's prepare task, then train's (a hit)
    prepare_s = round(prepared["seconds"] + metrics["prepare_s"], 3)
    harness.log(f"retrain {strategy}: {wall:.1f} s wall, decoded {decoded}, "
                f"feature rows {metrics['feature_rows_computed']}, {registry['alias']}")
    return {"wall_s": round(wall, 2), "images_decoded": decoded,
            "feature_rows_computed": metrics["feature_rows_computed"], "prepare_s": prepare_s,
            "feature_build_s": metrics["feature_build_s"], "train_time_s": metrics["train_time_s"],
            "val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
            "gate_challenger_val": registry["challenger_val_accuracy"],
            "gate_champion_val": registry["champion_val_accuracy"], "alias": registry["alias"],
            "reason": registry["reason"]}


def read_result(stderr: str) -> dict:
    """The pipeline's result: the JSON object `freezeflow pipeline` prints (indented, from a line '{')."""
    start = stderr.rindex("\n{\n") + 1 if "\n{\n" in stderr else stderr.index("{\n")
    return json.JSONDecoder().raw_decode(stderr[start:])[0]


def compare_runs(strategy: str, first: dict, second: dict, added: int) -> dict:
    work = lambda r: r["prepare_s"] + r["feature_build_s"]  # noqa: E731 - decode + frozen features
    ratio = work(second) / max(work(first), 1e-9)
    exact = second["images_decoded"] == added and second["feature_rows_computed"] == added
    targets = [{"name": f"retrain {strategy}: only the new images",
                "criterion": f"second run decodes and computes feature rows for exactly the {added} new images",
                "value": [second["images_decoded"], second["feature_rows_computed"]], "met": exact},
               {"name": f"retrain {strategy}: prepare + feature build",
                "criterion": f"second run / first run <= {RATIO_TARGET}", "value": round(ratio, 3),
                "met": ratio <= RATIO_TARGET}]
    return {"strategy": strategy, "first": first, "second": second, "added": added,
            "work_ratio": round(ratio, 3), "targets": targets}


def render(report: dict) -> list[str]:
    d = report["dataset_grown"]
    out = [f"Dataset {d['name']}: {d['images_first']} images, then {d['images_second']} (+{d['added']}, "
           f"{GROWTH:.0%} per class).", ""]
    rows = []
    for r in report["rows"]:
        for label, run_ in (("first", r["first"]), ("second", r["second"])):
            rows.append([r["strategy"], label, run_["wall_s"], run_["images_decoded"], run_["feature_rows_computed"],
                         run_["prepare_s"], run_["feature_build_s"], run_["train_time_s"], run_["gate_challenger_val"],
                         run_["gate_champion_val"] if run_["gate_champion_val"] is not None else "-", run_["alias"]])
    out += harness.render_table(["strategy", "run", "wall s", "images decoded", "feature rows computed", "prepare s",
                                 "feature build s", "train-loop s", "gate: challenger val",
                                 "gate: champion re-scored val", "alias"], rows)
    ratios = [[r["strategy"], r["work_ratio"]] for r in report["rows"]]
    return out + [""] + harness.render_table(["strategy", "second / first (prepare + feature build)"], ratios)
