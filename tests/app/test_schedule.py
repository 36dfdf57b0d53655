"""Scheduled retraining: retrain only on new data (or --force); promote only when the val metric is better."""

from __future__ import annotations

import pytest

from flows.retrain import should_retrain
from freezeflow.integrations.registry import decide_promotion, describe_class_change


def test_promotion_rule():
    assert decide_promotion(0.9, None, 0.0).alias == "champion"
    assert decide_promotion(0.91, 0.90, 0.005).alias == "champion"
    keep = decide_promotion(0.902, 0.90, 0.005)
    assert keep.alias == "challenger" and "does not beat champion 0.9000" in keep.reason
    assert decide_promotion(0.5, 0.9, 0.0, force=True).alias == "champion"
    assert decide_promotion(0.91, 0.91, 0.0).alias == "challenger"  # equal on the same split: kept


def test_a_blocker_keeps_the_model_unless_forced():
    """A changed class set (or an unloadable champion) means no fair comparison: kept, whatever the scores."""
    blocker = describe_class_change(["cat", "dog"], ["cat", "dog", "fox"])
    assert blocker == "class set changed (added: fox; removed: none): no automatic promotion; --force promotes"
    assert describe_class_change(["b", "a"], ["a", "b"]) is None
    kept = decide_promotion(0.99, None, 0.0, blocker=blocker)
    assert kept.alias == "challenger" and kept.reason == blocker
    forced = decide_promotion(0.99, None, 0.0, force=True, blocker=blocker)
    assert forced.alias == "champion" and forced.reason == f"forced ({blocker})"


def test_retrain_rule():
    champion = {"version": "3", "data_hash": "abc.dir"}
    assert should_retrain("abc.dir", champion, False) == (False, "data unchanged since champion v3 (md5 abc.dir)")
    assert should_retrain("def.dir", champion, False)[0]
    assert should_retrain("abc.dir", champion, True) == (True, "forced")
    assert should_retrain("abc.dir", None, False) == (True, "no champion yet")


@pytest.mark.slow
def test_scheduled_runs_promote_or_keep_on_real_runs(dvc_project, prefect_harness, monkeypatch):
    from mlflow import MlflowClient

    from flows.retrain import scheduled_retraining

    root, env = dvc_project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("PATH", env["PATH"])
    first = scheduled_retraining(root=str(root))
    assert first["retrained"] and first["registry"]["alias"] == "champion"
    again = scheduled_retraining(root=str(root))
    assert not again["retrained"] and "data unchanged" in again["reason"]
    forced = scheduled_retraining(root=str(root), force=True, promote_margin=1.0)  # nothing beats by 1.0
    assert forced["retrained"] and forced["registry"]["alias"] == "challenger"
    assert "does not beat champion" in forced["registry"]["reason"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("shapes", "champion")
    challenger = client.get_model_version_by_alias("shapes", "challenger")
    assert str(champion.version) == first["registry"]["version"]
    assert str(challenger.version) == forced["registry"]["version"]
    tags = client.get_model_version("shapes", challenger.version).tags
    assert tags["decision"].startswith("val_accuracy") and "(re-scored on the same val split)" in tags["decision"]
    assert tags["champion_version"] == first["registry"]["version"] and tags["val_split_hash"]


@pytest.mark.slow
def test_schedule_is_a_prefect_deployment_with_a_cron(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.retrain import scheduled_retraining

    deployment = scheduled_retraining.to_deployment(name="freezeflow-retrain-test", cron="0 3 * * 1",
                                                    parameters={"root": str(tmp_path)})
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert stored.schedules[0].schedule.cron == "0 3 * * 1"
    assert stored.parameters["root"] == str(tmp_path)
