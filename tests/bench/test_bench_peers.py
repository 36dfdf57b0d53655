"""bench peers: the --tiny run of fastai and Lightning beside freezeflow writes one row per contender.

Needs the optional group `bench` (fastai, lightning); skipped with the reason where it is not installed.
No timing assertions: only the shape of the report.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastai", reason="peers suite needs fastai: pip install -e '.[bench]'")
pytest.importorskip("lightning", reason="peers suite needs lightning: pip install -e '.[bench]'")

from bench import harness, peers  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("peers")
    assert harness.main(["peers", "--tiny", "--out", str(out)]) == 0
    (path,) = out.glob("peers-*.json")
    assert path.with_suffix(".md").read_text().startswith("# freezeflow bench: peers")
    return json.loads(path.read_text())


def test_every_contender_has_one_row_with_times_and_accuracies(report):
    names = [c["name"] for c in report["contenders"]]
    expected = list(peers.FREEZEFLOW) + list(peers.PEERS)
    assert names == [f"{name}-resnet18" for name in expected]  # --tiny: resnet18 only
    for row in report["contenders"]:
        assert row["repeats"] == 1 and row["backbone"] == "resnet18"
        assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0
        assert row["wall_s"]["median"] > 0 and row["peak_rss_mb"] > 0
        assert row["train_time_s"]["median"] >= 0  # the tiny train split is smaller than one fastai batch
        assert row["epochs_run"] == (2 if row["contender"] == "fastai-fine-tune" else 1)


def test_every_pair_has_a_comparison_and_a_boolean_target(report):
    pairs = [(c["peer"], c["freezeflow"]) for c in report["comparisons"]]
    assert pairs == list(peers.PAIRS)
    assert [(c["peer"], c["freezeflow"]) for c in report["cross_checks"]] == list(peers.CROSS_CHECKS)
    assert len(report["targets"]) == len(peers.PAIRS)
    for target in report["targets"]:
        assert {"name", "criterion", "value", "met"} <= set(target)
        assert isinstance(target["met"], bool) and target["value"] > 0
    assert report["peer_versions"]["fastai"] and report["peer_versions"]["lightning"]
    assert report["skipped"] == []


def test_check_ready_names_the_missing_group(monkeypatch):
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    assert peers.check_ready(None) == "needs fastai and lightning: pip install -e '.[bench]'"
