"""Data tasks: check the dataset against data.dvc, then prepare (cached on the DVC hash + data params)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from prefect import task

from freezeflow.params import load_params
from freezeflow.pipeline import check_data, prepare_step


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


def marker_path(root: str, key: str) -> Path:
    return Path(root) / "prepared" / ".prefect-keys" / key


def prepare_cache_key(context, parameters: dict) -> str | None:
    """Cache hit only while the prepared folder this key made still exists."""
    key = data_key(parameters["data_info"], parameters["params_dir"], parameters["overrides"])
    if key and marker_path(parameters["root"], key).exists():
        return key
    return None


@task(cache_key_fn=prepare_cache_key, persist_result=True)
def prepare_task(root: str, params_dir: str, overrides: list[str], data_info: dict) -> dict:
    """Decode + resize once into prepared/; returns where, with how many images and classes."""
    prepared = prepare_step(load_params(params_dir, overrides), Path(root))
    key = data_key(data_info, params_dir, overrides)
    if key:
        marker = marker_path(root, key)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(prepared.root))
    return {"path": str(prepared.root), "images": int(len(prepared.labels)), "classes": prepared.classes}
