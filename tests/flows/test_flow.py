"""The Prefect flow and the DVC pipeline, run for real on a tiny dataset in a temporary git+DVC repo."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import BIN, run


def test_pipeline_force_reaches_the_flow_as_force_promotion(monkeypatch):
    """`freezeflow pipeline --force` promotes whatever the gate says: the flag reaches the flow."""
    import flows.training
    from typer.testing import CliRunner

    from freezeflow.app.cli import app

    calls = []
    monkeypatch.setattr(flows.training, "training_pipeline", lambda **kwargs: calls.append(kwargs) or {})
    for args, expected in ((["pipeline", "--force"], True), (["pipeline"], False)):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert calls.pop()["force_promotion"] is expected


@pytest.mark.slow
def test_dvc_repro_reruns_only_stages_that_read_a_changed_param(dvc_project):
    root, env = dvc_project
    dvc = str(BIN / "dvc")
    first = run([dvc, "repro"], root, env).stdout
    assert "Running stage 'prepare'" in first and "Running stage 'train'" in first
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0.0 <= metrics["val_accuracy"] <= 1.0
    assert "up to date" in run([dvc, "repro"], root, env).stdout.lower()  # a no-op

    train = yaml.safe_load((root / "params" / "train.yaml").read_text())
    train["lr"] = 0.02
    (root / "params" / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False))
    second = run([dvc, "repro"], root, env).stdout
    assert "Stage 'prepare' didn't change, skipping" in second
    assert "Running stage 'train'" in second and "Running stage 'evaluate'" in second

    evaluate = yaml.safe_load((root / "params" / "evaluate.yaml").read_text())
    evaluate["batch_size"] = 64
    (root / "params" / "evaluate.yaml").write_text(yaml.safe_dump(evaluate, sort_keys=False))
    third = run([dvc, "repro"], root, env).stdout
    assert "Running stage 'train'" not in third and "Running stage 'evaluate'" in third
    shown = run([dvc, "metrics", "show", "--json"], root, env).stdout
    assert "test_accuracy" in shown and "macro_f1" in shown
    diff = run([dvc, "metrics", "diff", "--all", "--json"], root, env).stdout  # workspace vs HEAD
    assert "val_accuracy" in diff
    run([dvc, "plots", "diff", "--json"], root, env)  # renders the per-epoch curves' data
    run([dvc, "exp", "run", "-S", "params/train.yaml:lr=0.005"], root, env)
    assert "0.005" in run([dvc, "exp", "show", "--json"], root, env).stdout


@pytest.mark.slow
def test_prefect_flow_runs_and_skips_prepare_for_unchanged_data(dvc_project, prefect_harness, monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.training import training_pipeline

    root, env = dvc_project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("PATH", env["PATH"])
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    states = []
    # results of this test only: another test's flow on the same data must not pre-fill the cache
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: root.parent / "prefect-results"}):
        for margin in (0.0, 1.0):  # the second run cannot beat the champion by 1.0: it stays challenger
            state = training_pipeline(root=str(root), promote_margin=margin, return_state=True)
            assert state.is_completed(), state
            states.append(state)
    first, second = (state.result() for state in states)
    assert first["registry"]["alias"] == "champion" and first["registry"]["reason"] == "no champion yet"
    assert second["registry"]["alias"] == "challenger"
    assert "does not beat champion" in second["registry"]["reason"]
    assert second["registry"]["reason"].endswith("by more than 1.0")
    assert second["metrics"]["run_id"] != first["metrics"]["run_id"]
    registry = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert str(registry.get_model_version_by_alias("shapes", "champion").version) == first["registry"]["version"]
    challenger = registry.get_model_version_by_alias("shapes", "challenger")
    assert str(challenger.version) == second["registry"]["version"]
    assert challenger.tags["decision"] == second["registry"]["reason"]
    assert second["registry"]["champion_version"] == first["registry"]["version"]
    assert challenger.tags["champion_val_accuracy"] == f"{second['registry']['champion_val_accuracy']:.6f}"
    # each run's dataset input: name, the DVC md5 of data/ (tracked here), the data folder
    dvc_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    for metrics in (first["metrics"], second["metrics"]):
        (data_input,) = registry.get_run(metrics["run_id"]).inputs.dataset_inputs
        assert (data_input.dataset.name, data_input.dataset.digest) == ("shapes", dvc_md5)
        assert json.loads(data_input.dataset.source)["uri"] == str((root / "data" / "shapes").resolve())
    with get_client(sync_client=True) as client:
        prepare_states = []
        for state in states:
            flt = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            runs = client.read_task_runs(flow_run_filter=flt)
            prepare_states += [r.state.name for r in runs if r.task_key.startswith("prepare_task")]
    assert prepare_states == ["Completed", "Cached"]
    # the flow recorded dvc.lock: dvc repro has nothing left to do
    assert "up to date" in run([str(BIN / "dvc"), "repro"], root, env).stdout.lower()
