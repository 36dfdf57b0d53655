"""Progress reporting for the adapters: a rich bar on a terminal, plain lines otherwise (CI logs)."""

from __future__ import annotations

import sys
from typing import Callable

from freezeflow.core.train.callbacks import Callback


def progress_printer(label: str, stream=None) -> Callable[[int, int], None]:
    """Returns update(done, total). On a TTY a rich progress bar; else a line at every 10%."""
    stream = stream or sys.stderr
    if stream.isatty():
        return rich_progress(label)
    last = {"decile": -1}

    def update(done: int, total: int) -> None:
        decile = (10 * done) // max(total, 1)
        if decile != last["decile"] or done == total:
            last["decile"] = decile
            print(f"{label}: {done}/{total}", file=stream, flush=True)

    return update


def rich_progress(label: str) -> Callable[[int, int], None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), transient=False)
    state: dict = {}

    def update(done: int, total: int) -> None:
        if "task" not in state:
            bar.start()
            state["task"] = bar.add_task(label, total=total)
        bar.update(state["task"], completed=done)
        if done >= total:
            bar.stop()

    return update


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class EpochProgress(Callback):
    """Training callback: a rich bar over epochs (live loss, accuracy, images/s, ETA) on a TTY,
    else one plain line per epoch (CI logs stay readable).

    The bar starts at the first epoch's end (so it never overlaps another live display, e.g. the
    prepare step's bar) and stops at the last epoch or on `close()` (early stopping); usable as a
    context manager. After --resume the first report's epoch says how many were done before. The
    ETA is the mean seconds per epoch seen so far times the epochs left.

        with EpochProgress(params.train.epochs) as progress:
            train_step(params, root, callbacks=[progress])
    """

    def __init__(self, total_epochs: int, stream=None):
        self.total = max(int(total_epochs), 1)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.seconds: list[float] = []
        self.bar = None
        self.task = None

    # ---- callback ----------------------------------------------------------------------------
    def on_feature_progress(self, label: str, done: int, total: int) -> None:
        """Feature caching (first epoch, or when the frozen prefix changes): one bar per split."""
        if getattr(self, "_feature_label", None) != label:
            self._feature_label = label
            self._feature_update = progress_printer(label, self.stream)
        self._feature_update(done, total)

    def on_lr_found(self, result) -> None:
        print(f"lr finder: suggested lr {result.suggestion:.3g} for the head ({len(result.lrs)} steps, "
              f"trainable: {', '.join(result.trainable_stages)})", file=self.stream, flush=True)

    def on_divergence(self, message: str) -> None:
        self.close()
        print(f"warning: {message}", file=self.stream, flush=True)

    def on_epoch_end(self, report) -> None:
        self.seconds.append(float(report.epoch_time_s))
        left = max(self.total - report.epoch, 0)
        eta = left * sum(self.seconds) / len(self.seconds)
        if self.tty:
            self.update_bar(report, eta)
        else:
            print(self.line(report, eta), file=self.stream, flush=True)
        if report.epoch >= self.total:
            self.close()

    def line(self, report, eta: float) -> str:
        width = len(str(self.total))
        return (f"epoch {report.epoch:>{width}}/{self.total}  train_loss {report.train_loss:.4f}  "
                f"train_acc {report.train_accuracy:.4f}  val_loss {report.val_loss:.4f}  "
                f"val_acc {report.val_accuracy:.4f}  {report.images_per_s:.1f} img/s  "
                f"{report.epoch_time_s:.{1 if report.epoch_time_s >= 10 else 2}f}s  eta {format_seconds(eta)}")

    def update_bar(self, report, eta: float) -> None:
        fields = {"loss": f"{report.train_loss:.4f}/{report.val_loss:.4f}",
                  "acc": f"{report.train_accuracy:.3f}/{report.val_accuracy:.3f}",
                  "speed": f"{report.images_per_s:.0f}", "eta": format_seconds(eta)}
        if self.bar is None:
            self.start()
        self.bar.update(self.task, completed=min(report.epoch, self.total), **fields)

    # ---- the bar -----------------------------------------------------------------------------
    def start(self) -> None:
        """Show the bar now (only on a TTY; a no-op elsewhere or when already shown)."""
        if not self.tty or self.bar is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss t/v [cyan]{task.fields[loss]}[/]"), TextColumn("acc t/v [green]{task.fields[acc]}[/]"),
            TextColumn("{task.fields[speed]} img/s"), TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
            console=Console(file=self.stream), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("epochs", total=self.total, loss="-", acc="-", speed="-", eta="-")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SweepProgress:
    """Sweep progress: trial n of N and the best value so far. A rich bar on a terminal, else one
    line per finished trial (also with several worker processes, whose bars would interleave)."""

    def __init__(self, n_trials: int, stream=None, bar: bool | None = None):
        self.total = max(int(n_trials), 1)
        self.stream = stream or sys.stdout
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.use_bar = tty if bar is None else bar
        self.bar = None
        self.task = None

    def update(self, done: int, best: str, detail: str) -> None:
        if not self.use_bar:
            print(f"trial {done} of {self.total}, best so far {best} ({detail})", file=self.stream, flush=True)
            return
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("sweep", total=self.total)
        self.bar.update(self.task, completed=done, description=f"sweep: best so far {best} (last: {detail})")
        if done >= self.total:
            self.bar.stop()
