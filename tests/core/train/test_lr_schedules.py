"""Learning-rate schedules: pure functions of progress, with warmup; plateau reacts to val loss."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from freezeflow.core.params import TrainParams
from freezeflow.core.train.lr_schedules import PlateauState, lr_factor

P = TrainParams(epochs=10)


def test_constant_and_warmup():
    p = replace(P, schedule="constant", warmup_epochs=2.0)
    assert lr_factor(p, 1.0) == pytest.approx(0.5)
    assert lr_factor(p, 0.0) == pytest.approx(1e-3)  # never exactly zero
    assert lr_factor(p, 5.0) == 1.0


def test_step_and_exponential():
    assert [lr_factor(replace(P, schedule="step", step_size=3, gamma=0.1), e) for e in (0, 2.9, 3, 6.5)] == \
        pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(replace(P, schedule="exponential", gamma=0.5), 3.7) == pytest.approx(0.125)


def test_cosine_goes_from_one_to_zero():
    p = replace(P, schedule="cosine")
    assert lr_factor(p, 0) == pytest.approx(1.0)
    assert lr_factor(p, 5) == pytest.approx(0.5)
    assert lr_factor(p, 10) == pytest.approx(0.0, abs=1e-12)


def test_onecycle_rises_then_falls():
    p = replace(P, schedule="onecycle")
    values = [lr_factor(p, e / 10) for e in range(101)]
    peak = max(range(101), key=values.__getitem__)
    assert values[0] == pytest.approx(1 / 25) and values[peak] == pytest.approx(1.0) and peak == 30
    assert values[-1] < 1e-4


def test_plateau_cuts_after_patience():
    p = replace(P, schedule="plateau", plateau_patience=1, plateau_factor=0.5)
    state = PlateauState()
    for loss in (1.0, 0.9, 0.95, 0.95):
        state.update(loss, p)
    assert state.scale == 0.5 and lr_factor(p, 3, state.scale) == 0.5
    restored = PlateauState()
    restored.load_state_dict(state.state_dict())
    assert restored == state
    assert not math.isnan(lr_factor(p, 0, restored.scale))
