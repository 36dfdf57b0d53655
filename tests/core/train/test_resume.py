"""Resume through the public entry points: a run interrupted after epoch k and resumed (run_training
resume=True, or the bare-box `--resume` flag) writes the same model, metrics and history, bit for bit,
as the run that went straight through. test_loop.py checks the Trainer-level resume after epoch 2 for
every strategy; here the thaw/freeze moments around it (k = 1 and 3 of 4) and the written outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from freezeflow.core.io import load_trusted
from freezeflow.core.layout import Layout
from freezeflow.core.params import load_params
from tests.core.train.test_loop import StopAfter
from freezeflow.core.train.run import main, run_training
from tests.conftest import tiny_overrides

TIMINGS = ("epoch_time_s", "train_time_s", "images_per_s", "data_wait_fraction", "prepare_s", "feature_build_s",
           "images_decoded", "feature_rows_computed")  # wall clock, and work a resumed run reuses: differ by run


def overrides_for(data: Path, strategy: str) -> list[str]:
    return tiny_overrides(data, **{"train.freeze.strategy": strategy, "train.freeze.until": 2,
                                   "train.freeze.t0": 0.5, "train.schedule": "cosine", "train.lr_decay": 0.7})


def outputs(root: Path) -> tuple[dict, dict, list]:
    """(model state, metrics without timings, history without timings) as the run wrote them."""
    layout = Layout(root)
    metrics = json.loads((layout.reports / "metrics.json").read_text())
    history = json.loads((layout.reports / "history.json").read_text())
    drop = lambda row: {k: v for k, v in row.items() if k not in TIMINGS}  # noqa: E731
    return load_trusted(layout.models / "model.pt"), drop(metrics), [drop(row) for row in history]


def fresh_root(project: Path, name: str) -> Path:
    root = project.parent / name
    shutil.copytree(project / "params", root / "params")
    return root


# (epoch k of 4 to stop after, resume by the --resume flag rather than run_training(resume=True))
STOPS = {"until": [(3, True)],
         "gradual": [(1, False)],  # stopped at the first thaw (the head trained alone in epoch 1)
         "freezeout": [(1, False), (3, True)]}  # 1: a trained prefix's level is in memory, half-built


@pytest.mark.parametrize("strategy", sorted(STOPS))
def test_interrupted_then_resumed_writes_what_the_straight_run_writes(project, shapes_dir, monkeypatch, strategy):
    overrides = overrides_for(shapes_dir, strategy)
    straight = fresh_root(project, "straight")
    run_training(load_params(straight / "params", overrides), straight)
    model, metrics, history = outputs(straight)
    assert metrics["epochs"] == 4

    for k, via_flag in STOPS[strategy]:
        root = fresh_root(project, f"stopped-after-{k}")
        with pytest.raises(KeyboardInterrupt):
            run_training(load_params(root / "params", overrides), root, callbacks=[StopAfter(k)])
        assert load_trusted(Layout(root).checkpoint)["epoch"] == k
        if via_flag:  # python -m freezeflow.core.train ... --resume, in the project folder
            monkeypatch.chdir(root)
            assert main(["--params", str(root / "params"), *[a for o in overrides for a in ("-S", o)],
                         "--resume"]) == 0
        else:
            run_training(load_params(root / "params", overrides), root, resume=True)
        got_model, got_metrics, got_history = outputs(root)
        assert got_metrics == metrics, f"{strategy}, resumed after epoch {k}: metrics differ"
        assert got_history == history, f"{strategy}, resumed after epoch {k}: history differs"
        assert got_model.keys() == model.keys()
        for name, value in model.items():
            assert torch.equal(got_model[name], value), f"{strategy}, resumed after epoch {k}: {name} differs"
