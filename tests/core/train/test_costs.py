"""costs: the planner's arithmetic on a fixed calibration, and a calibration that measures this machine."""

from __future__ import annotations

import pytest

from freezeflow.core.models.registry import build_backbone
from freezeflow.core.models.staged import count_stage_flops
from freezeflow.core.train.costs import Calibration, calibrate, predict_cost, predict_sweep

CAL = Calibration(forward_s_per_flop=1e-9, train_s_per_flop=3e-9, step_s=0.01, seconds=0.0)
FLOPS = [100, 200, 300, 400]  # per image, stages 0..3 (3: the head)


def test_a_cut_pays_its_prefix_once_and_trains_the_rest_every_epoch():
    cost = predict_cost(FLOPS, cut=2, batch_size=10, n_train=50, n_val=20, epochs=4, calibration=CAL)
    assert cost.feature_build_s == pytest.approx(70 * 300 * 1e-9)  # train + val through stages 0, 1
    per_epoch = 50 * 700 * 3e-9 + 20 * 700 * 1e-9 + 5 * 0.01  # train stages 2, 3; score val; 5 steps
    assert cost.epoch_s == pytest.approx(per_epoch) and cost.train_s == pytest.approx(4 * per_epoch)
    everything = predict_cost(FLOPS, cut=0, batch_size=10, n_train=50, n_val=20, epochs=4, calibration=CAL)
    assert everything.feature_build_s == 0 and everything.epoch_s > cost.epoch_s
    smaller = predict_cost(FLOPS, cut=2, batch_size=5, n_train=50, n_val=20, epochs=4, calibration=CAL)
    assert smaller.epoch_s - cost.epoch_s == pytest.approx(5 * 0.01)  # twice the steps
    fixed = predict_cost(FLOPS, cut=2, batch_size=10, n_train=50, n_val=20, epochs=4, calibration=CAL, fixed_s=0.5)
    assert fixed.trial_s == pytest.approx(cost.train_s + 0.5) and cost.trial_s == cost.train_s


def test_a_sweep_builds_each_cut_level_once():
    costs = [predict_cost(FLOPS, cut, 10, 50, 20, 2, CAL) for cut in (3, 3, 2)]
    sweep = predict_sweep(costs, n_trials=6)
    assert sweep["feature_build_s"] == pytest.approx(costs[0].feature_build_s + costs[2].feature_build_s, abs=0.01)
    assert sweep["train_s"] == pytest.approx(6 * sum(c.trial_s for c in costs) / 3, abs=0.01)
    assert predict_sweep([], 5)["total_s"] == 0.0


def test_calibration_measures_positive_speeds_and_leaves_the_model_as_it_was():
    model = build_backbone("resnet18", weights="none", num_classes=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = calibrate(model, count_stage_flops(model, 32), image_size=32, batch_size=4)
    assert cal.forward_s_per_flop > 0 and cal.train_s_per_flop > 0 and cal.step_s > 0 and cal.seconds > 0
    assert not model.training and all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # lr 0: the weights; BatchNorm's statistics aside
        if "running" not in key and "num_batches" not in key:
            assert value.equal(before[key]), key
