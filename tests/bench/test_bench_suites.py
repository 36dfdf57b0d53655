"""bench suites `sweep`, `freezeout` and `gpu` run end to end with --tiny and write a report of the right shape.

No timing assertions: times on a shared CI machine say nothing. The gpu suite runs its code on the CPU
(--device cpu), which exists for this test only; without CUDA and without --device cpu it is skipped.
"""

from __future__ import annotations

import json

import pytest

from bench import harness


def read_report(out, suite: str) -> dict:
    paths = sorted(out.glob(f"{suite}-*.json"))
    assert len(paths) == 1
    report = json.loads(paths[0].read_text())
    assert paths[0].with_suffix(".md").read_text().startswith(f"# freezeflow bench: {suite}")
    assert report["suite"] == suite and report["settings"]["tiny"] is True
    assert all({"name", "criterion", "value", "met"} <= set(t) for t in report["targets"])
    assert all(isinstance(t["met"], bool) for t in report["targets"])
    return report


def test_sweep_suite_runs_every_study_and_the_plain_training(tmp_path):
    pytest.importorskip("optuna")
    pytest.importorskip("mlflow")
    assert harness.main(["sweep", "--tiny", "--trials", "2", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = read_report(tmp_path, "sweep")
    rows = {c["name"]: c for c in report["contenders"]}
    assert list(rows) == ["sweep-on", "sweep-off", "plain-head", "plain-until2", "sweep-head", "sweep-freeze",
                          "sweep-freeze-off"]
    for row in rows.values():
        assert row["repeats"] == 1 and row["wall_s"]["median"] > 0
        assert 0.0 <= row["best_val_accuracy"] <= 1.0
    for name in ("sweep-on", "sweep-off", "sweep-head", "sweep-freeze", "sweep-freeze-off"):
        assert rows[name]["trials"] == 2  # --tiny: the 20-trial studies run --trials trials
        assert rows[name]["complete_runs"][0] + rows[name]["pruned_runs"][0] == 2
        assert rows[name]["failed_runs"] == [0]
    assert "tune.pruner=none" in rows["sweep-off"]["overrides"]
    assert {"tune.pruner=none", "tune.fuse=1"} <= set(rows["sweep-freeze-off"]["overrides"])
    assert "tune.space.freeze.enabled=true" in rows["sweep-freeze"]["overrides"]
    assert rows["sweep-head"]["fused_trials_runs"][0] >= 0
    assert [t["name"] for t in report["targets"]] == ["sweep on vs off", "2-trial head/until sweep vs one plain until "
                                                      "k=2 training", "2 head trials vs one plain head training"]


def test_freezeout_suite_compares_each_schedule_with_none(tmp_path):
    assert harness.main(["freezeout", "--tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = read_report(tmp_path, "freezeout")
    assert [c["name"] for c in report["contenders"]] == ["none", "freezeout-t0-0.8", "freezeout-t0-0.5"]
    assert [c["t0"] for c in report["contenders"]] == [None, 0.8, 0.5]
    assert all(c["wall_s"]["median"] > 0 and 0 <= c["val_accuracy"] <= 1 for c in report["contenders"])
    assert [t["name"] for t in report["targets"]] == ["freezeout-t0-0.8 vs none", "freezeout-t0-0.5 vs none"]


def test_gpu_suite_runs_its_code_on_the_cpu(tmp_path):
    assert harness.main(["gpu", "--tiny", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = read_report(tmp_path, "gpu")
    rows = {c["name"]: c for c in report["contenders"]}
    assert list(rows) == ["bare-step", "freezeflow-loop", "plain-head", "freezeflow-head"]
    for name in ("bare-step", "freezeflow-loop"):
        assert rows[name]["images_per_s"]["median"] > 0 and rows[name]["amp"] == "off"  # no AMP on a CPU
    assert len(rows["freezeflow-loop"]["epoch_images_per_s_runs"][0]) == 3  # the first epoch is left out
    for name in ("plain-head", "freezeflow-head"):
        assert rows[name]["wall_s"]["median"] > 0 and 0.0 <= rows[name]["val_accuracy"] <= 1.0
    assert report["gpu_settings"]["device"] == "cpu"
    assert [t["name"] for t in report["targets"]] == ["training loop vs bare step"]
    assert report["targets"][0]["value"] > 0


def test_gpu_suite_without_cuda_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert harness.main(["gpu", "--tiny", "--out", str(tmp_path)]) == 0
    assert "skipped suite gpu: no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_retrain_suite_runs_the_pipeline_twice_and_the_second_run_reuses_the_first(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("prefect")
    assert harness.main(["retrain", "--tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = read_report(tmp_path, "retrain")
    grown = report["dataset_grown"]
    assert grown["added"] == grown["images_second"] - grown["images_first"] > 0
    assert [r["strategy"] for r in report["rows"]] == ["head", "until"]
    for row in report["rows"]:
        first, second = row["first"], row["second"]
        assert first["images_decoded"] == first["feature_rows_computed"] == grown["images_first"]
        assert second["images_decoded"] == second["feature_rows_computed"] == row["added"] == grown["added"]
        assert first["gate_champion_val"] is None and first["alias"] == "champion"  # nothing to beat yet
        assert 0.0 <= second["gate_champion_val"] <= 1.0  # the champion re-scored on the new val split
    assert len(report["targets"]) == 4
