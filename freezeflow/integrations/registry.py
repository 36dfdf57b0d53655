"""registry: the MLflow model registry (an adapter). Everything about registered models lives here;
tracking.py logs the runs whose models get registered.

    aliases    `champion` (the model in use) and `challenger` (registered, not promoted) per dataset;
               `decide_promotion` is the pure rule, `promote_or_keep` applies it to a finished run:
               the champion is re-scored on the run's val split by core.infer.evaluate (`run_gate`),
               and both scores, the split's hash and the reason (tag `decision`) are logged on the
               run (gate_*) and on the new version.
    register   `register_model` makes a run's logged model a new version of a registered model.
    load       `load_registered` reads `models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/ID/model`,
               a bare run id or a local folder; weights come from the served bundle's weights.npz
               (allow_pickle=False) or, for older models, weights-only unpickling: loading never runs
               code a file holds. `run_id_of` names the run that logged a model.

The store: `tracking_uri` when given, else MLFLOW_TRACKING_URI, else a URI set with
mlflow.set_tracking_uri, else the default store under the current folder (tracking.current_uri).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlflow
import torch
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from freezeflow.core.data.folders import combine_digests
from freezeflow.core.data.prepare import Prepared
from freezeflow.core.errors import UserError
from freezeflow.core.infer.evaluate import evaluate_model
from freezeflow.core.models.io import WEIGHTS_NPZ, ModelInfo, load_bundle, load_model
from freezeflow.integrations.secrets import first_line_masked, mask_url
from freezeflow.integrations.tracking import MODEL_NAME, RUN_ID, WEIGHTS_DIR, current_uri, tracking_scope

ALIASES = ("champion", "challenger")


# ---- promotion -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    alias: str  # "champion" or "challenger"
    reason: str


def decide_promotion(candidate: float, champion: float | None, margin: float, force: bool = False,
                     blocker: str | None = None) -> Decision:
    """Pure rule: promote when there is no champion, when forced, or when val beats it by > margin.

    `champion` is the champion's score on the candidate's val split; `blocker` says why no fair
    comparison exists (class set changed, champion not loadable): then only `force` promotes."""
    if champion is None and blocker is None:
        return Decision("champion", "no champion yet")
    if blocker is not None:
        unforced = Decision("challenger", blocker)
    elif candidate > champion + margin:
        unforced = Decision("champion", f"val_accuracy {candidate:.4f} beats champion {champion:.4f} "
                                        f"(re-scored on the same val split) by > {margin}")
    else:
        unforced = Decision("challenger", f"val_accuracy {candidate:.4f} does not beat champion {champion:.4f} "
                                          f"(re-scored on the same val split) by more than {margin}")
    return Decision("champion", f"forced ({unforced.reason})") if force else unforced


def describe_class_change(old: list[str], new: list[str]) -> str | None:
    """The blocker for a changed class set, naming the added and removed classes; None when unchanged."""
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if not added and not removed:
        return None
    return (f"class set changed (added: {', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}): "
            "no automatic promotion; --force promotes")


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


# ---- the champion gate: both models scored by the same code on the challenger's val split ----------

@dataclass(frozen=True)
class Scores:
    """One model's accuracy on the gate's splits: val decides, test is only reported."""
    val_accuracy: float
    test_accuracy: float


@dataclass(frozen=True)
class Gate:
    """What a promotion decision rests on."""
    challenger: Scores
    val_split_hash: str
    champion_version: str | None = None  # None: no champion yet
    champion: Scores | None = None  # fresh scores on the challenger's data; None when not scored
    blocker: str | None = None  # why the champion was not compared (see decide_promotion)


def val_split_hash(prepared: Prepared) -> str:
    """md5 over the sorted (relative path, md5 of bytes) of the val split's files, from prepare's manifest
    (which records each file's content hash): two scores with the same hash were measured on the same images."""
    manifest = json.loads((prepared.root / "manifest.json").read_text())
    names = [manifest["files"][i] for i in prepared.split["val"]]
    digests = manifest.get("digests")
    if digests is None:  # a manifest of an older prepare: names and the dataset's content hash
        return hashlib.md5("\n".join([prepared.data_hash, *sorted(names)]).encode()).hexdigest()
    return combine_digests(sorted((manifest["files"][i], digests[i]) for i in prepared.split["val"]))


def score_model(loaded: tuple[torch.nn.Module, ModelInfo], prepared: Prepared,
                prepared_at: Callable[[int], Prepared] | None = None) -> Scores:
    """Val and test accuracy by core.infer.evaluate; a model of another image size is scored on the same
    files prepared at its size (`prepared_at(size)`) when given."""
    info = loaded[1]
    if info.image_size != prepared.image_size and prepared_at is not None:
        prepared = prepared_at(info.image_size)
    val, test = (evaluate_model(loaded, prepared, split) for split in ("val", "test"))
    return Scores(float(val["accuracy"]), float(test["accuracy"]))


def champion_version(name: str, uri: str) -> str | None:
    try:
        return str(MlflowClient(uri).get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def run_gate(run_id: str, name: str, prepared: Prepared, uri: str,
             prepared_at: Callable[[int], Prepared] | None = None) -> Gate:
    """Score the run's model and the current champion (by version: it cannot move meanwhile) on `prepared`."""
    challenger = score_model(load_registered(f"runs:/{run_id}/{MODEL_NAME}", uri), prepared, prepared_at)
    gate = Gate(challenger, val_split_hash(prepared), champion_version(name, uri))
    if gate.champion_version is None:
        return gate
    try:
        model, info = load_registered(f"models:/{name}/{gate.champion_version}", uri)
    except (UserError, OSError, MlflowException) as exc:  # e.g. its artifact folder was deleted
        message = first_line_masked(exc).split("; allowed:")[0]  # what went wrong, not what loading allows
        return replace(gate, blocker=f"champion v{gate.champion_version} cannot be re-scored ({message}); "
                                     "the new model stays challenger")
    if changed := describe_class_change(list(info.classes), list(prepared.classes)):
        return replace(gate, blocker=changed)
    try:
        return replace(gate, champion=score_model((model, info), prepared, prepared_at))
    except UserError as exc:  # e.g. another image size and no way to prepare the data at it
        return replace(gate, blocker=f"champion v{gate.champion_version} cannot be scored on this data "
                                     f"({first_line_masked(exc)})")


def log_gate(client: MlflowClient, run_id: str, name: str, version: str, gate: Gate, decision: Decision) -> None:
    """Both scores, the val split's hash and the reason: on the challenger's run (metrics gate_*, tags
    gate_*) and on the new model version (tags)."""
    scores = {"challenger_val_accuracy": gate.challenger.val_accuracy,
              "challenger_test_accuracy": gate.challenger.test_accuracy}
    if gate.champion is not None:
        scores |= {"champion_val_accuracy": gate.champion.val_accuracy,
                   "champion_test_accuracy": gate.champion.test_accuracy}
    tags = {"decision": decision.reason, "alias": decision.alias, "val_split_hash": gate.val_split_hash,
            "champion_version": gate.champion_version or "none"}
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"gate_{k}", v, stamp, 0) for k, v in scores.items()],
                     tags=[RunTag(f"gate_{k}", v[:5000]) for k, v in tags.items()], synchronous=True)
    for key, value in {**tags, **{k: f"{v:.6f}" for k, v in scores.items()}}.items():
        client.set_model_version_tag(name, version, key, value[:5000])


def promote_or_keep(run_id: str, name: str, prepared: Prepared, margin: float = 0.0, force: bool = False,
                    tracking_uri: str | None = None, prepared_at: Callable[[int], Prepared] | None = None) -> dict:
    """Register runs:/<run_id>/model under `name`; alias it champion or challenger and say why.

    The champion is re-scored on `prepared` (the run's data) by the code that scores the run's model, so
    the comparison is on one val split; the test split is logged, never decides."""
    uri = current_uri(tracking_uri)
    gate = run_gate(run_id, name, prepared, uri, prepared_at)
    champion = gate.champion.val_accuracy if gate.champion else None
    decision = decide_promotion(gate.challenger.val_accuracy, champion, margin, force, gate.blocker)
    version = str(register_model(run_id, name, decision.alias, uri))  # the run's logged model, aliased
    log_gate(MlflowClient(uri), run_id, name, version, gate, decision)
    return {"name": name, "version": version, "alias": decision.alias, "reason": decision.reason,
            "val_split_hash": gate.val_split_hash, "challenger_val_accuracy": gate.challenger.val_accuracy,
            "champion_version": gate.champion_version, "champion_val_accuracy": champion,
            "champion_test_accuracy": gate.champion.test_accuracy if gate.champion else None}


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
        if (bundle := download_bundle(mlflow_uri, store, Path(tmp) / "bundle")) is not None:
            return load_bundle(bundle)
        try:
            with tracking_scope(store):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mlflow_uri, dst_path=tmp,
                                                                 tracking_uri=store))
        except MlflowException as exc:
            raise UserError(f"{uri}: not found in the MLflow store {mask_url(store)} ({first_line_masked(exc)}); "
                            "allowed: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model, a run id or a "
                            "folder with model.json") from None
        return load_downloaded(local, str(uri))


def download_bundle(mlflow_uri: str, store: str, dest: Path) -> Path | None:
    """The served pyfunc's artifacts/ folder alone (model.json, weights.npz: not its code copy); None when the
    model has none (logged before it, or not found: the full download then says which)."""
    dest.mkdir(parents=True)
    try:
        with tracking_scope(store):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{mlflow_uri}/artifacts", dst_path=str(dest),
                                                             tracking_uri=store))
    except (MlflowException, OSError):
        return None
    return local if (local / "model.json").exists() and (local / WEIGHTS_NPZ).exists() else None


def load_downloaded(local: Path, uri: str) -> tuple[torch.nn.Module, ModelInfo]:
    """Rebuild from a downloaded MLflow model: the served pyfunc's artifacts/model.json + weights.npz
    (core.models.io.load_bundle, no pickle), or, for a model logged before it, model.json + weights/model.pt
    (modelio.load_model, weights-only unpickling)."""
    bundle = local / "artifacts"
    if (bundle / "model.json").exists() and (bundle / WEIGHTS_NPZ).exists():
        return load_bundle(bundle)
    weights = local / WEIGHTS_DIR
    if not (local / "model.json").exists() or not (weights / "model.pt").exists():
        raise UserError(f"{uri}: no artifacts/model.json and artifacts/{WEIGHTS_NPZ} in this MLflow model; allowed: "
                        "models logged by freezeflow's tracked_training")
    shutil.copy(local / "model.json", weights / "model.json")
    return load_model(weights)


def run_id_of(uri: str, tracking_uri: str | None = None) -> str | None:
    """The MLflow run that logged the model `uri` names (models:/NAME@alias, models:/NAME/VERSION, runs:/ID/...,
    a run id); None for a local folder. UserError when the store does not know it."""
    mlflow_uri = model_uri_of(str(uri))
    if mlflow_uri is None:
        return None
    if mlflow_uri.startswith("runs:/"):
        return mlflow_uri.removeprefix("runs:/").split("/")[0]
    name, _, rest = mlflow_uri.removeprefix("models:/").partition("/")
    name, alias = name.split("@", 1) if "@" in name else (name, None)
    store = current_uri(tracking_uri)
    client = MlflowClient(store)
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, rest)
    except MlflowException as exc:
        raise UserError(f"{uri}: not found in the MLflow store {mask_url(store)} ({first_line_masked(exc)}); "
                        "allowed: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN_ID/model or a run id") from None
    return version.run_id
