"""report: one self-contained HTML page for one MLflow run, or a side-by-side comparison of several.

An adapter (it reads the MLflow store). The page needs nothing but itself: inline CSS, no
scripts, every image a base64 `data:` URI. It holds a header per run (name, id, status, start,
duration), the params that differ between the runs (every param for a single run), grouped by
their first dotted part, a table of final/best metrics, per-epoch curves drawn fresh from the
metric histories (all runs on the same axes), and each run's logged `plots/*.png`.
Every piece of text from the store goes through html.escape.

    write_report(["<run id>", "<run id>"], Path("reports/compare.html"))
    write_report([])  # the latest FINISHED run of `digits` (else of the most recent experiment)
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from freezeflow.core.errors import UserError
from freezeflow.integrations.secrets import first_line_masked, mask_url
from freezeflow.integrations.tracking import RUN_ID, current_uri
from freezeflow.core.io import write_text_atomic

DEFAULT_OUT = Path("reports") / "report.html"
DEFAULT_EXPERIMENT = "digits"
PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
CURVE_KEYS = ("val_accuracy", "train_accuracy", "train_loss", "val_loss", "time_per_epoch_s")
HIGHER_IS_BETTER = {"val_accuracy", "best_val_accuracy", "test_accuracy", "val_macro_f1", "mean_images_per_s"}
LOWER_IS_BETTER = {"train_time_s", "time_per_epoch_median_s", "best_val_loss", "peak_rss_mb"}
# (label, how it is computed) rows of the metrics table, in order
METRIC_ROWS = (
    ("val_accuracy", "final val_accuracy (last epoch)"),
    ("best_val_accuracy", "best val_accuracy"),
    ("best_epoch", "best epoch"),
    ("test_accuracy", "test_accuracy (best epoch's model)"),
    ("val_macro_f1", "val macro-F1"),
    ("best_val_loss", "best val_loss"),
    ("train_time_s", "train_time_s"),
    ("time_per_epoch_median_s", "time per epoch, median (s)"),
    ("epochs_trained", "epochs trained"),
    ("mean_images_per_s", "images/s (mean)"),
    ("peak_rss_mb", "peak RSS (MB)"),
)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")


@dataclass
class RunData:
    run: Run
    experiment: str
    label: str = ""
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    plots: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run.data.tags.get("mlflow.runName") or self.run_id[:8]

    def metric(self, key: str) -> float | None:
        if key == "time_per_epoch_median_s":
            values = [v for _, v in self.histories.get("time_per_epoch_s", [])]
            return statistics.median(values) if values else None
        if key == "val_accuracy" and self.histories.get("val_accuracy"):
            return self.histories["val_accuracy"][-1][1]
        return self.run.data.metrics.get(key)


# ---- reading the store ---------------------------------------------------------------------------

def write_report(run_ids: list[str] | tuple[str, ...] | None = None, out: Path = DEFAULT_OUT,
                 tracking_uri: str | None = None) -> Path:
    """Write the HTML report for `run_ids` (none: the latest FINISHED run) to `out`; returns `out`."""
    uri = current_uri(tracking_uri)
    client = MlflowClient(uri)
    ids = list(dict.fromkeys(run_ids or [])) or [latest_finished_run(client, uri)]
    runs = [load_run(client, run_id, uri) for run_id in ids]
    label_runs(runs)
    page = render_page(runs, uri)
    out = Path(out)
    write_text_atomic(out, page)
    return out


def latest_finished_run(client: MlflowClient, uri: str) -> str:
    """The newest FINISHED training run of `digits`, else of any experiment (the most recent one)."""
    digits = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    scopes = []
    if digits is not None and digits.lifecycle_stage == "active":
        scopes.append([digits.experiment_id])
    everything = [e.experiment_id for e in client.search_experiments()]
    if everything:
        scopes.append(everything)
    for experiment_ids in scopes:
        for where in ("attributes.status = 'FINISHED' and metrics.val_accuracy >= 0", "attributes.status = 'FINISHED'"):
            found = client.search_runs(experiment_ids, where, max_results=1, order_by=["attributes.start_time DESC"])
            if found:
                return found[0].info.run_id
    raise UserError(f"no FINISHED run in the MLflow store {mask_url(uri)}; train first (`freezeflow train`) "
                    "or name run ids")


def load_run(client: MlflowClient, run_id: str, uri: str) -> RunData:
    if not RUN_ID.match(run_id):
        raise UserError(f"{run_id!r}: not a run id; allowed: the 32-hex-digit id of a run in {mask_url(uri)}")
    try:
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id).name
    except MlflowException as exc:
        raise UserError(f"run {run_id}: not found in the MLflow store {mask_url(uri)} ({first_line_masked(exc)})") from None
    data = RunData(run, experiment)
    for key in CURVE_KEYS:
        if key in run.data.metrics:
            history = client.get_metric_history(run_id, key)
            data.histories[key] = sorted({m.step: m.value for m in history}.items())
    data.plots = download_plots(client, run_id)
    return data


@contextlib.contextmanager
def no_download_bars() -> Iterator[None]:
    """mlflow draws a tqdm bar per downloaded artifact; a report downloads many small PNGs."""
    saved = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = saved


def download_plots(client: MlflowClient, run_id: str) -> dict[str, bytes]:
    """The run's logged plots/*.png, as bytes (downloaded to a temp folder that is then removed)."""
    try:
        pngs = [a.path for a in client.list_artifacts(run_id, "plots") if a.path.lower().endswith(".png")]
    except (MlflowException, OSError):
        return {}
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="freezeflow-report-") as tmp, no_download_bars():
        for path in sorted(pngs):
            try:
                local = Path(client.download_artifacts(run_id, path, tmp))
            except (MlflowException, OSError):
                continue
            out[Path(path).name] = local.read_bytes()
    return out


def label_runs(runs: list[RunData]) -> None:
    """Run names as labels; a short id is added where two runs share a name."""
    names = [r.name for r in runs]
    for r in runs:
        r.label = r.name if names.count(r.name) == 1 else f"{r.name} ({r.run_id[:8]})"


# ---- figures -------------------------------------------------------------------------------------

def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_series(ax: Any, runs: list[RunData], key: str, linestyle: str = "-", suffix: str = "") -> bool:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    drawn = False
    for i, r in enumerate(runs):
        points = r.histories.get(key)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", linestyle=linestyle, color=COLORS[i % len(COLORS)],
                    label=f"{r.label}{suffix}")
            drawn = True
    return drawn


def curves_figure(runs: list[RunData]) -> bytes | None:
    """val_accuracy (left) and train/val loss (right) of every run on shared axes."""
    from freezeflow.integrations.plots import new_figure

    if not any(r.histories for r in runs):
        return None
    fig = new_figure(11.0, 4.2)
    acc_ax, loss_ax = fig.subplots(1, 2)
    plot_series(acc_ax, runs, "val_accuracy")
    acc_ax.set_title("val_accuracy")
    acc_ax.set_ylim(-0.02, 1.02)
    plot_series(loss_ax, runs, "train_loss", "--", " train")
    plot_series(loss_ax, runs, "val_loss", "-", " val")
    loss_ax.set_title("loss (dashed: train, solid: val)")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return figure_png(fig)


def epoch_time_figure(runs: list[RunData]) -> bytes | None:
    from freezeflow.integrations.plots import new_figure

    if not any(r.histories.get("time_per_epoch_s") for r in runs):
        return None
    fig = new_figure(8.0, 3.6)
    ax = fig.subplots()
    plot_series(ax, runs, "time_per_epoch_s")
    ax.set_title("time_per_epoch_s")
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


# ---- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:1.5em;margin:0 0 4px}h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:1em;margin:14px 0 6px}.muted{color:#666;font-size:.9em}
.runs{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-left:6px solid var(--c);border-radius:6px;padding:10px 14px}
.card dl{display:grid;grid-template-columns:auto 1fr;gap:2px 10px;margin:6px 0 0;font-size:.9em}
.card dt{color:#666}.card dd{margin:0;word-break:break-all}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin-bottom:8px}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f0f0f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.group td{background:#f7f7fa;font-weight:600}td.best{font-weight:700;background:#eaf6ea}
.scroll{overflow-x:auto}img{max-width:100%;height:auto;background:#fff;border:1px solid #ddd}
.plots{display:grid;gap:12px;align-items:start}figure{margin:0}figcaption{font-size:.85em;color:#666}
.status-FINISHED{color:#1a7f37}.status-FAILED,.status-KILLED{color:#cf222e}.status-RUNNING{color:#9a6700}
details summary{cursor:pointer;margin:8px 0}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_duration(start: int | None, end: int | None, status: str) -> str:
    if not start or not end:
        return "running" if status == "RUNNING" else "-"
    seconds = max(0, (end - start) // 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"


def run_card(r: RunData, color: str) -> str:
    info, tags = r.run.info, r.run.data.tags
    rows = [("run id", info.run_id), ("experiment", r.experiment),
            ("status", info.status), ("start", format_time(info.start_time)),
            ("duration", format_duration(info.start_time, info.end_time, info.status))]
    for key in ("backbone", "freeze_strategy", "device", "git_commit", "data_hash", "error"):
        if tags.get(key):
            rows.append((key, tags[key][:80] if key != "error" else tags[key][:300]))
    body = "".join(f"<dt>{esc(k)}</dt><dd{status_class(v) if k == 'status' else ''}>{esc(v)}</dd>"
                   for k, v in rows)
    return f'<div class="card" style="--c:{color}"><h3>{esc(r.label)}</h3><dl>{body}</dl></div>'


def status_class(status: str) -> str:
    return f' class="status-{esc(status)}"'


def group_of(key: str) -> str:
    return key.split(".", 1)[0] if "." in key else "other"


def params_section(runs: list[RunData]) -> str:
    keys = sorted({k for r in runs for k in r.run.data.params})
    values = {k: [r.run.data.params.get(k) for r in runs] for k in keys}
    if len(runs) == 1:
        shown, same, title = keys, [], "Params"
    else:
        shown = [k for k in keys if len(set(values[k])) > 1]
        same = [k for k in keys if k not in shown]
        title = "Params that differ"
    html_ = [f"<h2>{esc(title)}</h2>"]
    if shown:
        html_.append(params_table(runs, shown, values))
    else:
        html_.append('<p class="muted">All params are identical.</p>')
    if same:
        html_.append(f"<details><summary>{len(same)} identical params</summary>"
                     f"{params_table(runs[:1], same, values, header=('param', 'value (every run)'))}</details>")
    return "".join(html_)


def params_table(runs: list[RunData], keys: list[str], values: dict[str, list], header: tuple | None = None) -> str:
    head = header or ("param", *(r.label for r in runs))
    rows, group = [], None
    for key in keys:
        if group_of(key) != group:
            group = group_of(key)
            rows.append(f'<tr class="group"><td colspan="{len(head)}">{esc(group)}</td></tr>')
        cells = "".join(f"<td>{esc('-' if v is None else v)}</td>" for v in values[key][:len(head) - 1])
        rows.append(f"<tr><td>{esc(key)}</td>{cells}</tr>")
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def metrics_section(runs: list[RunData]) -> str:
    rows = []
    for key, label in METRIC_ROWS:
        vals = [r.metric(key) for r in runs]
        present = [v for v in vals if v is not None and not math.isnan(v)]
        if not present:
            continue
        best = None
        if len(runs) > 1 and len(set(present)) > 1:
            best = max(present) if key in HIGHER_IS_BETTER else min(present) if key in LOWER_IS_BETTER else None
        cells = "".join(
            f'<td class="num{" best" if best is not None and v == best else ""}">{esc(format_number(v))}</td>'
            for v in vals)
        rows.append(f'<tr><td title="{esc(key)}">{esc(label)} <span class="muted">{esc(key)}</span></td>{cells}</tr>')
    th = "".join(f"<th>{esc(r.label)}</th>" for r in runs)
    note = '<p class="muted">Bold green: the best value among the runs.</p>' if len(runs) > 1 else ""
    return (f'<h2>Metrics</h2><div class="scroll"><table><thead><tr><th>metric</th>{th}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>{note}')


def image(png: bytes, alt: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{png_data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'


def curves_section(runs: list[RunData]) -> str:
    parts = []
    for png, alt in ((curves_figure(runs), "val_accuracy and loss per epoch"),
                     (epoch_time_figure(runs), "time_per_epoch_s per epoch")):
        if png:
            parts.append(image(png, alt))
    if not parts:
        return '<h2>Per-epoch curves</h2><p class="muted">No per-epoch metrics logged.</p>'
    return f'<h2>Per-epoch curves</h2><div class="plots">{"".join(parts)}</div>'


def logged_plots_section(runs: list[RunData]) -> str:
    """One row per plot file, one column per run: the same figure of every run side by side."""
    names = sorted({n for r in runs for n in r.plots})
    if not names:
        return '<h2>Logged plots</h2><p class="muted">No plots/*.png artifacts logged.</p>'
    columns = f"repeat({len(runs)},minmax(0,1fr))"
    parts = ["<h2>Logged plots</h2>"]
    for name in names:
        cells = "".join(image(r.plots[name], f"{r.label}: {name}", r.label) if name in r.plots
                        else f'<p class="muted">{esc(r.label)}: not logged</p>' for r in runs)
        parts.append(f'<h3>{esc(name)}</h3><div class="plots" style="grid-template-columns:{columns}">{cells}</div>')
    return "".join(parts)


def render_page(runs: list[RunData], uri: str) -> str:
    title = (f"freezeflow run {runs[0].label}" if len(runs) == 1
             else f"freezeflow: {len(runs)} runs compared")
    cards = "".join(run_card(r, COLORS[i % len(COLORS)]) for i, r in enumerate(runs))
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"muted\">MLflow store: {esc(mask_url(uri))} &middot; written {esc(made)}</p>"
        f"<h2>Runs</h2><div class=\"runs\">{cards}</div>"
        f"{params_section(runs)}{metrics_section(runs)}{curves_section(runs)}{logged_plots_section(runs)}"
        "</body></html>\n"
    )
