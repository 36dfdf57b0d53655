"""Params: frozen dataclasses from YAML; every bad value is one line naming file, key and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from freezeflow.core.errors import ParamsError
from freezeflow.core.params import Params, Range, ScheduleSpace, TrainParams, flatten, iter_docs, load_params
from freezeflow.core.schedules import SCHEDULES
from freezeflow.core.strategies import STRATEGIES

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_load_and_are_frozen():
    params = load_params(REPO / "params")
    assert isinstance(params, Params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0  # type: ignore[misc]
    assert flatten(params)["train.freeze.strategy"] in STRATEGIES


def test_overrides_are_typed_and_nested(project):
    params = load_params(project / "params", ["train.lr=0.02", "train.freeze.strategy=until",
                                              "train.freeze.until=4", "data.image_size=96", "train.augment.flip=false"])
    assert params.train.lr == 0.02 and params.train.freeze.until == 4
    assert params.data.image_size == 96 and params.train.augment.flip is False


def test_params_reference_covers_every_key():
    keys = {key for cls in (Params.__dataclass_fields__["train"].default_factory,) for key, *_ in iter_docs(cls)}
    assert {"lr", "freeze.strategy", "augment.flip", "cache_features"} <= keys


# ---- the strategy and schedule tables, the one Range type ----------------------------------------

@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_in_the_table_is_accepted(project, name):
    params = load_params(project / "params", [f"train.freeze.strategy={name}", f"tune.space.freeze.choices=[{name}]"])
    assert params.train.freeze.strategy == name and params.tune.space.freeze.choices == [name]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_in_the_table_is_accepted(project, name):
    params = load_params(project / "params", [f"train.schedule={name}", f"tune.space.schedule.choices=[{name}]"])
    assert params.train.schedule == name and params.tune.space.schedule.choices == [name]


def test_an_unknown_strategy_or_schedule_is_refused_with_the_allowed_names(project):
    strategies, schedules = ", ".join(STRATEGIES), ", ".join(SCHEDULES)
    with pytest.raises(ParamsError, match=rf"freeze.strategy: 'frozen' is not allowed; allowed: {strategies}$"):
        load_params(project / "params", ["train.freeze.strategy=frozen"])
    with pytest.raises(ParamsError, match=rf"train.yaml: schedule: 'linear' is not allowed; allowed: {schedules}$"):
        load_params(project / "params", ["train.schedule=linear"])
    with pytest.raises(ParamsError, match=rf"space.freeze.choices: \['head', 'frozen'\] is not allowed; allowed: "
                                          rf"{strategies}$"):
        load_params(project / "params", ["tune.space.freeze.choices=[head, frozen]"])


def test_every_key_a_schedule_reads_is_a_train_key_with_a_range_in_the_space():
    train_keys = {f.name for f in dataclasses.fields(TrainParams)}
    ranges = {f.name for f in dataclasses.fields(ScheduleSpace) if f.type in ("Range", Range)}
    read = {key for schedule in SCHEDULES.values() for key in schedule.reads}
    assert read <= train_keys and read == ranges
    assert {type(value).__name__ for value in vars(ScheduleSpace()).values() if dataclasses.is_dataclass(value)} == \
        {"Range"}  # one Range type, no per-key range classes


@pytest.mark.parametrize("override, message", [
    ("tune.space.schedule.step_size.low=0", r"tune.yaml: space.schedule.step_size.low: 0 is out of range; "
                                            r"allowed: >= 1$"),
    ("tune.space.schedule.step_size.low=1.5", r"space.schedule.step_size.low: 1.5 is not allowed; "
                                              r"allowed: an integer$"),
    ("tune.space.schedule.gamma.low=0", r"space.schedule.gamma.low: 0.0 is out of range; allowed: > 0.0 and <= 1.0$"),
    ("tune.space.schedule.gamma.low=0.95", r"^params/tune.yaml: space.schedule.gamma: low 0.95 > high 0.9; "
                                           r"allowed: low <= high$"),
    ("tune.space.schedule.plateau_patience.high=9", None),
    ("tune.space.schedule.warmup_epochs.middle=1", r"space.schedule.warmup_epochs.middle: unknown key; "
                                                   r"allowed: low, high$"),
    ("tune.space.schedule.gamma=3", r"space.schedule.gamma: must be a mapping of key: value$"),
])
def test_ranges_check_each_end_then_their_order(project, override, message):
    if message is None:
        space = load_params(project / "params", [override]).tune.space.schedule
        assert space.plateau_patience == Range(0, 9) and isinstance(space.plateau_patience.high, int)
        return
    with pytest.raises(ParamsError, match=message):
        load_params(project / "params", [override])
