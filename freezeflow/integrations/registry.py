"""registry: the MLflow model registry (an adapter). Everything about registered models lives here;
tracking.py logs the runs whose models get registered.

    aliases    `champion` (the model in use) and `challenger` (registered, not promoted) per dataset;
               `decide_promotion` is the pure rule, `promote_or_keep` applies it to a finished run
               and tags the new version with the reason (tag `decision`).
    register   `register_model` makes a run's logged model a new version of a registered model.
    load       `load_registered` reads `models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/ID/model`,
               a bare run id or a local folder; weights are read weights-only, so loading never
               unpickles anything that could run code.

The store: `tracking_uri` when given, else MLFLOW_TRACKING_URI, else a URI set with
mlflow.set_tracking_uri, else the default store under the current folder (tracking.current_uri).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from freezeflow.core.errors import UserError
from freezeflow.core.models.io import ModelInfo, load_model
from freezeflow.integrations.secrets import first_line_masked, mask_url
from freezeflow.integrations.tracking import MODEL_NAME, RUN_ID, WEIGHTS_DIR, current_uri, tracking_scope

ALIASES = ("champion", "challenger")


# ---- promotion -----------------------------------------------------------------------------------

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


def champion_info(name: str, tracking_uri: str | None = None) -> dict | None:
    """The champion's version, run id, val_accuracy and data hash; None when there is none."""
    client = MlflowClient(current_uri(tracking_uri))
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    run = client.get_run(version.run_id)
    return {"version": version.version, "run_id": version.run_id,
            "val_accuracy": run.data.metrics.get("best_val_accuracy", run.data.metrics.get("val_accuracy")),
            "data_hash": run.data.tags.get("dvc_data_md5") or run.data.tags.get("data_hash")}


def promote_or_keep(run_id: str, name: str, val_accuracy: float, margin: float = 0.0, force: bool = False,
                    tracking_uri: str | None = None) -> dict:
    """Register runs:/<run_id>/model under `name`; alias it champion or challenger and say why."""
    uri = current_uri(tracking_uri)
    champion = champion_info(name, uri)
    decision = decide_promotion(val_accuracy, champion["val_accuracy"] if champion else None, margin, force)
    version = register_model(run_id, name, decision.alias, uri)  # the run's logged model, aliased
    MlflowClient(uri).set_model_version_tag(name, str(version), "decision", decision.reason)
    return {"name": name, "version": str(version), "alias": decision.alias, "reason": decision.reason}


# ---- registering ---------------------------------------------------------------------------------

def register_model(run_id: str, name: str, alias: str | None = None, tracking_uri: str | None = None) -> int:
    """Register runs:/<run_id>/model as a new version of `name`; point `alias` at it. Returns the version."""
    if alias is not None and alias not in ALIASES:
        raise UserError(f"--alias: {alias!r} is not allowed; allowed: {', '.join(ALIASES)}")
    uri = current_uri(tracking_uri)
    client = MlflowClient(uri)
    source = f"runs:/{run_id}/{MODEL_NAME}"
    with tracking_scope(uri):
        try:
            model_id = client.get_run(run_id).data.tags.get("model_id")
            version = mlflow.register_model(f"models:/{model_id}" if model_id else source, name)
        except MlflowException as exc:
            raise UserError(f"{source}: cannot register in {mask_url(uri)} ({first_line_masked(exc)}); allowed: the id "
                            "of a finished run logged by tracked_training") from None
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


# ---- loading -------------------------------------------------------------------------------------

def model_uri_of(uri: str) -> str | None:
    """MLflow URI for `uri`, or None when it names a local folder."""
    if uri.startswith(("models:/", "runs:/")):
        return uri
    if RUN_ID.match(uri) and not Path(uri).exists():
        return f"runs:/{uri}/{MODEL_NAME}"
    return None


def load_registered(uri: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, ModelInfo]:
    """Model + info from `models:/NAME@alias`, `models:/NAME/<version>`, `runs:/ID/model`, a bare run
    id, or a local folder holding model.json. Weights are read weights-only (no code can run)."""
    mlflow_uri = model_uri_of(str(uri))
    if mlflow_uri is None:
        return load_model(Path(uri))
    store = current_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="freezeflow-model-") as tmp:
        try:
            with tracking_scope(store):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mlflow_uri, dst_path=tmp,
                                                                 tracking_uri=store))
        except MlflowException as exc:
            raise UserError(f"{uri}: not found in the MLflow store {mask_url(store)} ({first_line_masked(exc)}); "
                            "allowed: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model, a run id or a "
                            "folder with model.json") from None
        return load_downloaded(local, str(uri))


def load_downloaded(local: Path, uri: str) -> tuple[torch.nn.Module, ModelInfo]:
    """Rebuild from the downloaded model.json + weights/model.pt via modelio.load_model."""
    weights = local / WEIGHTS_DIR
    if not (local / "model.json").exists() or not (weights / "model.pt").exists():
        raise UserError(f"{uri}: no model.json and weights/model.pt in this MLflow model; allowed: models "
                        "logged by freezeflow's tracked_training")
    shutil.copy(local / "model.json", weights / "model.json")
    return load_model(weights)
