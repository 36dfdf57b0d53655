"""bench peers: the --tiny run of fastai and Lightning beside freezeflow writes one row per contender.

The tests of the report need the optional group `bench` (fastai, lightning) and are skipped with the
reason where it is not installed; the others run everywhere (bench.peers imports without the peers).
No timing assertions: only the shape of the report.
"""

from __future__ import annotations

import json

import pytest

from bench import harness, peers

MISSING = peers.check_ready(None)  # None, or "needs fastai and lightning: pip install ..."
needs_peers = pytest.mark.skipif(MISSING is not None, reason=f"peers suite {MISSING}")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("peers")
    assert harness.main(["peers", "--tiny", "--out", str(out)]) == 0
    (path,) = out.glob("peers-*.json")
    assert path.with_suffix(".md").read_text().startswith("# freezeflow bench: peers")
    return json.loads(path.read_text())


@needs_peers
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


@needs_peers
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


def test_check_ready_names_only_what_is_missing(monkeypatch):
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None if name == "lightning" else object())
    assert peers.check_ready(None) == "needs lightning: pip install -e '.[bench]'"
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: object())
    assert peers.check_ready(None) is None
