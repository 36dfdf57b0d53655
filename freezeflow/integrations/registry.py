"""Model registry decisions (adapter over MLflow): champion/challenger aliases per dataset."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    alias: str  # "champion" or "challenger"
    reason: str


def decide_promotion(candidate: float, champion: float | None, margin: float, force: bool = False) -> Decision:
    """Pure rule: promote when there is no champion, when forced, or when val beats it by > margin."""
    if champion is None:
        return Decision("champion", "no champion yet")
    if force:
        return Decision("champion", f"forced (champion val_accuracy {champion:.4f})")
    if candidate > champion + margin:
        return Decision("champion", f"val_accuracy {candidate:.4f} beats champion {champion:.4f} by > {margin}")
    return Decision("challenger", f"val_accuracy {candidate:.4f} does not beat champion {champion:.4f} "
                                  f"by more than {margin}")


def champion_info(name: str) -> dict | None:
    """The champion's version, run id, val_accuracy and data hash; None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    run = client.get_run(version.run_id)
    return {"version": version.version, "run_id": version.run_id,
            "val_accuracy": run.data.metrics.get("best_val_accuracy", run.data.metrics.get("val_accuracy")),
            "data_hash": run.data.tags.get("dvc_data_md5") or run.data.tags.get("data_hash")}


def promote_or_keep(run_id: str, name: str, val_accuracy: float, margin: float = 0.0,
                    force: bool = False) -> dict:
    """Register runs:/<run_id>/model under `name`; alias it champion or challenger and say why."""
    from mlflow import MlflowClient

    from freezeflow.integrations.tracking import register_model

    champion = champion_info(name)
    decision = decide_promotion(val_accuracy, champion["val_accuracy"] if champion else None, margin, force)
    version = register_model(run_id, name, decision.alias)  # the run's logged model, aliased
    MlflowClient().set_model_version_tag(name, str(version), "decision", decision.reason)
    return {"name": name, "version": str(version), "alias": decision.alias, "reason": decision.reason}
