"""Data tasks: check the dataset against data.dvc, then prepare (cached on the DVC hash + data params)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from prefect import task

from freezeflow.core.params import load_params
from freezeflow.app.steps import check_data, prepare_step


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def check_data_task(root: str, params_dir: str, overrides: list[str], allow_dirty: bool = False) -> dict:
    """DVC status of the data (pulling it from the remote when missing): retried, it is I/O."""
    params = load_params(params_dir, overrides)
    return check_data(params, Path(root), allow_dirty)


def data_key(data_info: dict, params_dir: str, overrides: list[str]) -> str | None:
    """The data's DVC hash + the data params prepare reads; never a hash of tensors or files."""
    if not data_info.get("dvc_hash") or data_info.get("dirty"):
        return None
    params = load_params(params_dir, overrides)
    blob = json.dumps([data_info["dvc_hash"], asdict(params.data)], sort_keys=True)
    return "prepare-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


def prepare_cache_key(context, parameters: dict) -> str | None:
    """Skip prepare when the DVC hash and data params are unchanged. Safe even if prepared/ was
    deleted meanwhile: training prepares whatever is missing (prepare is idempotent)."""
    return data_key(parameters["data_info"], parameters["params_dir"], parameters["overrides"])


@task(cache_key_fn=prepare_cache_key, persist_result=True)
def prepare_task(root: str, params_dir: str, overrides: list[str], data_info: dict) -> dict:
    """Decode + resize once into prepared/; returns where, with how many images and classes, how many
    files this call decoded (only new contents) and how long that work took (module imports aside)."""
    prepared = prepare_step(load_params(params_dir, overrides), Path(root))
    return {"path": str(prepared.root), "images": int(len(prepared.labels)), "classes": prepared.classes,
            "decoded": prepared.decoded, "seconds": prepared.seconds}
