"""Progress reporting for the adapters: a rich bar on a terminal, plain lines otherwise (CI logs)."""

from __future__ import annotations

import sys
from typing import Callable


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
