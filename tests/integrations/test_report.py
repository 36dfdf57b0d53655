"""write_report: one self-contained HTML page from a real sqlite MLflow store (two tiny runs)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_figures_dataset
from freezeflow.core.errors import UserError
from freezeflow.core.params import load_params
from freezeflow.app.progress import EpochProgress
from freezeflow.integrations.report import write_report
from freezeflow.integrations.tracking import tracked_training, tracking_scope

PARAMS = Path(__file__).resolve().parents[2] / "params"
# a URL used as a resource: src=/href=/url(...) pointing off the page
REMOTE = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two tracked 2-epoch trainings that differ only in train.lr; yields (root, uri, [run ids])."""
    root = tmp_path_factory.mktemp("report")
    data = write_figures_dataset(root / "data" / "shapes", per_class=8)
    shutil.copytree(PARAMS, root / "params")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    (root / "store").mkdir()
    ids = []
    with pytest.MonkeyPatch.context() as mp, tracking_scope(uri):
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for lr in ("0.01", "0.003"):
            params = load_params(root / "params", [
                f"data.dir={data}", "data.image_size=32", "train.backbone=resnet18", "train.weights=none",
                "train.epochs=2", "train.batch_size=8", "train.schedule=constant", f"train.lr={lr}"])
            result = tracked_training(params, root, run_name=f"lr-{lr}", callbacks=[EpochProgress(2)])
            ids.append(result["run_id"])
    return root, uri, ids


def assert_self_contained(page: str) -> None:
    assert not REMOTE.search(page), REMOTE.search(page).group(0)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    for src in re.findall(r"""<img[^>]*\bsrc="([^"]*)\"""", page):
        assert src.startswith("data:image/png;base64,"), src[:80]


def test_single_run_report_is_self_contained(store, tmp_path):
    root, uri, ids = store
    out = write_report([ids[0]], tmp_path / "one" / "report.html", tracking_uri=uri)
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    assert "data:image/png;base64," in page and ids[0] in page and "lr-0.01" in page
    assert "val_accuracy" in page and "time_per_epoch_s" in page and "FINISHED" in page
    assert "train.freeze.strategy" in page  # a single run lists every param
    # 2 fresh figures + the 5 logged plots (learning curves, lr groups, epoch times, confusion, per class)
    assert len(re.findall(r"<img ", page)) == 7
    for name in ("learning_curves.png", "confusion_val.png"):
        assert name in page


def test_comparison_shows_the_differing_param_side_by_side(store, tmp_path):
    root, uri, ids = store
    out = write_report(ids, tmp_path / "compare.html", tracking_uri=uri)
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    differ = page.split("Params that differ", 1)[1].split("identical params", 1)[0]
    assert "train.lr" in differ and ">0.01<" in differ and ">0.003<" in differ
    assert "train.freeze.strategy" not in differ  # the same in both runs: folded away
    assert "val_accuracy" in page and "best_val_accuracy" in page and "test_accuracy" in page
    assert page.count("data:image/png;base64,") == 2 + 2 * 5


def test_default_is_the_latest_finished_run(store, tmp_path, monkeypatch):
    root, uri, ids = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    page = write_report([], tmp_path / "latest.html").read_text(encoding="utf-8")
    assert ids[1] in page and ids[0] not in page


def test_text_from_the_store_is_escaped(store, tmp_path):
    from mlflow.tracking import MlflowClient

    root, uri, ids = store
    MlflowClient(uri).set_tag(ids[1], "error", "<script>alert(1)</script>")
    page = write_report([ids[1]], tmp_path / "esc.html", tracking_uri=uri).read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_unknown_run_id_is_a_one_line_user_error(store, tmp_path):
    _, uri, _ = store
    with pytest.raises(UserError, match="0123456789abcdef0123456789abcdef") as err:
        write_report(["0123456789abcdef0123456789abcdef"], tmp_path / "x.html", tracking_uri=uri)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a run id"):
        write_report(["nope"], tmp_path / "x.html", tracking_uri=uri)


def test_epoch_progress_prints_one_plain_line_per_epoch_off_a_tty():
    import io

    from freezeflow.core.train.state import EpochReport

    stream = io.StringIO()  # isatty() is False: CI logs
    progress = EpochProgress(3, stream)
    for epoch in (2, 3):  # resumed after epoch 1
        progress.on_epoch_end(EpochReport(epoch, 0.5, 0.8, 0.6, 0.75, {"head": 0.01}, 2.0, 120.0, 0.1, 3, False))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 2/3") and "val_acc 0.7500" in lines[0]
    assert "120.0 img/s" in lines[0] and "eta 0:02" in lines[0] and lines[1].endswith("eta 0:00")


def test_sweep_progress_lines_when_not_a_terminal():
    import io

    from freezeflow.app.progress import SweepProgress

    out = io.StringIO()
    progress = SweepProgress(3, stream=out)
    progress.update(1, "none yet", "#0 PRUNED")
    progress.update(2, "0.8100", "#1 COMPLETE 0.8100")
    assert out.getvalue().splitlines() == ["trial 1 of 3, best so far none yet (#0 PRUNED)",
                                           "trial 2 of 3, best so far 0.8100 (#1 COMPLETE 0.8100)"]
