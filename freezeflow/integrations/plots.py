"""plots: PNG figures of a training run from reports/history.json rows and a confusion matrix.

matplotlib is imported inside the functions (the core stays importable without it) and only its
object-oriented Agg canvas is used: no pyplot, no global backend switch, safe in threads and
on machines without a display. Every PNG is written to a temp file and renamed into place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from freezeflow.core.io import open_atomic


def new_figure(width: float = 7.0, height: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with open_atomic(path) as handle:
        fig.savefig(handle, format="png")
    return path


def history_rows(history: Any) -> list[dict]:
    """Accept the rows themselves (what history.json holds) or a {"history": rows} mapping."""
    rows = history.get("history", []) if isinstance(history, dict) else history
    return list(rows or [])


def column(rows: list[dict], key: str) -> list[float]:
    """Values of `key` per epoch, NaN where an epoch has none (a gap in the line)."""
    return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]


def epochs_of(rows: list[dict]) -> list[int]:
    return [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]


def plot_learning_curves(history: Any, path: Path) -> Path:
    """Loss (left) and accuracy (right) per epoch, train and validation."""
    rows = history_rows(history)
    epochs = epochs_of(rows)
    fig = new_figure(10.0, 4.0)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.plot(epochs, column(rows, f"train_{metric}"), marker="o", label="train")
        ax.plot(epochs, column(rows, f"val_{metric}"), marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    acc_ax.set_ylim(-0.02, 1.02)
    fig.suptitle("learning curves")
    return save_figure(fig, path)


def plot_confusion(cm: Any, classes: list[str], path: Path) -> Path:
    """Counts per (true, predicted) class, with each cell's number written in it."""
    counts = np.asarray(cm, dtype=np.int64)
    side = max(4.0, 0.5 * len(classes) + 2.5)
    fig = new_figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    if len(classes) <= 30:
        for (i, j), value in np.ndenumerate(counts):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if value > threshold else "black")
    ax.set_title(f"confusion matrix (n={int(counts.sum())})")
    return save_figure(fig, path)


def lr_keys(rows: list[dict]) -> list[str]:
    """Every `lr/<stage>` key seen in any epoch, in first-seen order (head first)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k.startswith("lr/") and k not in keys]
    return keys


def plot_lr_groups(history: Any, path: Path) -> Path:
    """Learning rate per stage group and epoch; a gap means the stage was frozen that epoch."""
    rows = history_rows(history)
    epochs = epochs_of(rows)
    fig = new_figure(8.0, 4.5)
    ax = fig.subplots()
    keys = lr_keys(rows)
    for key in keys:
        ax.plot(epochs, column(rows, key), marker="o", label=key.removeprefix("lr/"))
    values = [v for key in keys for v in column(rows, key) if v == v]
    if values and min(values) > 0:
        ax.set_yscale("log")
    if any("frozen_stages" in r for r in rows):
        frozen_ax = ax.twinx()
        frozen_ax.step(epochs, column(rows, "frozen_stages"), where="mid", color="gray", linestyle="--",
                       label="frozen stages")
        frozen_ax.set_ylabel("frozen stages")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate (end of epoch)")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8, loc="best")
    ax.set_title("learning rate per stage group (gaps = frozen)")
    return save_figure(fig, path)


def plot_epoch_times(history: Any, path: Path) -> Path:
    """Seconds per epoch (bars, cached-feature epochs hatched) and the share spent waiting on data."""
    rows = history_rows(history)
    epochs = epochs_of(rows)
    fig = new_figure(8.0, 4.5)
    ax = fig.subplots()
    hatches = ["//" if r.get("from_cache") else "" for r in rows]
    bars = ax.bar(epochs, column(rows, "epoch_time_s"), color="tab:blue", alpha=0.8)
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds (hatched: from feature cache)")
    wait_ax = ax.twinx()
    wait_ax.plot(epochs, column(rows, "data_wait_fraction"), color="tab:red", marker="o", label="data wait")
    wait_ax.set_ylim(0, 1)
    wait_ax.set_ylabel("fraction of epoch waiting for data")
    wait_ax.legend(loc="upper right")
    ax.set_title("time per epoch")
    return save_figure(fig, path)


def plot_per_class(report: dict, path: Path) -> Path:
    """Precision and recall of every class side by side (from an evaluate report's `per_class`)."""
    classes = list(report["per_class"])
    precision = [report["per_class"][c]["precision"] for c in classes]
    recall = [report["per_class"][c]["recall"] for c in classes]
    fig = new_figure(max(6.0, 0.6 * len(classes) + 2), 4.5)
    ax = fig.subplots()
    xs = list(range(len(classes)))
    ax.bar([x - 0.2 for x in xs], precision, width=0.4, label="precision", color="tab:blue")
    ax.bar([x + 0.2 for x in xs], recall, width=0.4, label="recall", color="tab:orange")
    ax.set_xticks(xs)
    ax.set_xticklabels(classes, rotation=45 if len(classes) > 8 else 0, ha="right" if len(classes) > 8 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"per-class precision / recall ({report.get('split', 'val')})")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_lr_find(result: Any, path: Path) -> Path:
    """The lr range test: loss (raw and smoothed) against the head's lr, log x, the suggestion marked.
    `result` is an LrFindResult or its to_dict()."""
    data = result if isinstance(result, dict) else result.to_dict()
    fig = new_figure()
    ax = fig.subplots()
    ax.plot(data["lrs"], data["losses"], alpha=0.35, label="loss")
    ax.plot(data["lrs"], data["smoothed"], label="smoothed loss")
    ax.axvline(data["suggestion"], color="tab:red", linestyle="--", label=f"suggested lr {data['suggestion']:.2g}")
    finite = [v for v in data["smoothed"] if math.isfinite(v)]
    if finite:  # the blow-up at the end would flatten the part that matters
        low, high = min(finite), max(finite[: max(len(finite) * 9 // 10, 1)])
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate of the head (body stages at their discriminative share)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test ({', '.join(data['trainable_stages'][:4])}"
                 f"{' ...' if len(data['trainable_stages']) > 4 else ''})")
    ax.legend()
    return save_figure(fig, path)
