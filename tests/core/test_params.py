"""Params: frozen dataclasses from YAML; every bad value is one line naming file, key and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from freezeflow.core.params import Params, flatten, iter_docs, load_params

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_load_and_are_frozen():
    params = load_params(REPO / "params")
    assert isinstance(params, Params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0  # type: ignore[misc]
    assert flatten(params)["train.freeze.strategy"] in ("head", "none", "until", "gradual", "freezeout")


def test_overrides_are_typed_and_nested(project):
    params = load_params(project / "params", ["train.lr=0.02", "train.freeze.strategy=until",
                                              "train.freeze.until=4", "data.image_size=96", "train.augment.flip=false"])
    assert params.train.lr == 0.02 and params.train.freeze.until == 4
    assert params.data.image_size == 96 and params.train.augment.flip is False


def test_params_reference_covers_every_key():
    keys = {key for cls in (Params.__dataclass_fields__["train"].default_factory,) for key, *_ in iter_docs(cls)}
    assert {"lr", "freeze.strategy", "augment.flip", "cache_features"} <= keys
