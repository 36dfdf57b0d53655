"""bench overhead: what `freezeflow train` costs around its training loop, as a user runs it.

    python -m bench overhead [--repeats 3] [--image-size 64] [--epochs 1]

In a fresh project: 1,000 photos (the textures photo set, 125 per class) ingested, then `freezeflow train`
(one epoch, `head`) as a subprocess, repeats + 1 times. The first run also creates the MLflow store, decodes
the images and builds the frozen features (`cold`); the others find all of that (`warm`: a user's next run).
Per run: wall time, train_time_s (the loop), and where the rest went, as the run records it in MLflow:
prepare_s, feature_build_s, log_reports_s (reports, the val evaluation, plots) and log_model_s (the served
pyfunc). `imports_s` is `import freezeflow.app.cli` plus what training imports (torch, mlflow), timed on its
own. Goal: warm wall - train_time_s <= 4 s (median of the warm runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import harness

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 125  # x 8 classes: 1,000 images
TARGET_S = 4.0  # warm wall - train_time_s
PHASES = ("prepare_s", "feature_build_s", "log_reports_s", "log_model_s")
QUIET = {"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def check_ready(settings) -> str | None:
    missing = [m for m in ("skimage", "mlflow") if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(missing)} (make install)" if missing else None


def freezeflow(project: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **QUIET}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from freezeflow.app.cli import main; main()", *args], cwd=project,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"freezeflow {' '.join(args)} failed in {project}:\n{proc.stderr[-3000:]}")
    return wall, proc


def time_imports() -> float:
    """Seconds a fresh interpreter takes to import the CLI and what a tracked training imports."""
    code = ("import time; t = time.perf_counter(); import freezeflow.app.cli, torch, torchvision, mlflow; "
            "print(time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def run_phases(project: Path, run_id: str) -> dict:
    from mlflow.tracking import MlflowClient

    from freezeflow.integrations.tracking import resolve_tracking_uri

    metrics = MlflowClient(resolve_tracking_uri(project)).get_run(run_id).data.metrics
    return {k: round(metrics[k], 3) for k in PHASES if k in metrics}


def train_once(project: Path, s: harness.Settings) -> dict:
    sets = {"data.dir": "data/textures", "data.image_size": s.image_size, "train.epochs": s.epochs,
            "train.freeze.strategy": "head", "train.backbone": s.backbone, "train.weights": s.weights}
    wall, _ = freezeflow(project, "train", *[a for k, v in sets.items() for a in ("-S", f"{k}={v}")])
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    row = {"wall_s": round(wall, 3), "train_time_s": metrics["train_time_s"],
           "overhead_s": round(wall - metrics["train_time_s"], 3), **run_phases(project, latest_run(project))}
    harness.log(f"overhead: wall {row['wall_s']} s, loop {row['train_time_s']} s, rest {row['overhead_s']} s")
    return row


def latest_run(project: Path) -> str:
    from mlflow.tracking import MlflowClient

    from freezeflow.integrations.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(project))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id


def run(ctx: harness.Context, pool) -> dict:
    import shutil

    from freezeflow.app.photosets import write_photoset

    s = ctx.settings
    project = ctx.work / "overhead"
    shutil.copytree(REPO / "params", project / "params", ignore=shutil.ignore_patterns("best.yaml"))
    write_photoset("textures", ctx.work / "overhead-source", PER_CLASS)
    freezeflow(project, "ingest", str(ctx.work / "overhead-source"), "--name", "textures", "--no-track")
    runs = [train_once(project, s) for _ in range(s.repeats + 1)]
    warm = runs[1:]
    median = round(statistics.median(r["overhead_s"] for r in warm), 3)
    return {"images": PER_CLASS * 8, "imports_s": round(time_imports(), 3), "cold": runs[0], "warm": warm,
            "warm_overhead_median_s": median,
            "targets": [{"name": "fixed overhead of `freezeflow train`", "criterion": f"warm wall - train_time_s "
                         f"<= {TARGET_S} s (median of {len(warm)})", "value": median, "met": median <= TARGET_S}]}


def render(report: dict) -> list[str]:
    header = ["run", "wall s", "train-loop s", "wall - loop s", *[p.removesuffix("_s") + " s" for p in PHASES]]
    rows = [[label, r["wall_s"], r["train_time_s"], r["overhead_s"], *[r.get(p, "-") for p in PHASES]]
            for label, r in [("cold", report["cold"]), *[(f"warm {i + 1}", r) for i, r in enumerate(report["warm"])]]]
    return [f"{report['images']} images; imports (CLI + torch + torchvision + mlflow, a fresh interpreter): "
            f"{report['imports_s']} s.", ""] + harness.render_table(header, rows)
