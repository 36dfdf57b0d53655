"""Freezing: per strategy and per epoch, which stages train, at what lr, with BatchNorm untouched."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from freezeflow.core.errors import ParamsError
from freezeflow.core.train.callbacks import Callback
from freezeflow.core.train.freezing import FreezePlan
from freezeflow.core.params import FreezeParams, TrainParams, load_params
from freezeflow.core.strategies import STRATEGIES
from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.layout import Layout
from freezeflow.core.train.run import build_trainer
from tests.conftest import tiny_overrides

N = 6  # resnet18: stem, stage1..4, head


def plan(strategy: str, body_lr_factor: float = 1.0, body_lr_decay: float = 1.0, **kw) -> FreezePlan:
    train = TrainParams(backbone="resnet18", freeze=FreezeParams(strategy=strategy, **kw),
                        body_lr_factor=body_lr_factor, lr_decay=body_lr_decay)
    return FreezePlan.from_params(train, N)


def rule(stage: int, factor: float, decay: float, head: int = N - 1) -> float:
    """The documented discriminative rule (freezing.py): head 1, body stage at depth d factor * decay**(d-1)."""
    return 1.0 if stage == head else factor * decay ** (head - stage - 1)


@pytest.mark.parametrize("strategy,head_epochs,expected", [
    ("none", 1, [0, 0, 0, 0]),
    ("head", 1, [5, 5, 5, 5]),
    ("until", 1, [2, 2, 2, 2]),
    ("gradual", 1, [5, 4, 3, 2]),
    ("gradual", 2, [5, 5, 4, 3]),
])
def test_frozen_count_per_epoch(strategy, head_epochs, expected):
    p = plan(strategy, until=2, head_epochs=head_epochs, every=1)
    assert [p.frozen_count(e, e / 4) for e in range(4)] == expected
    assert p.fine_tune_frozen() == expected[head_epochs]  # what the lr finder tests: past the head-only epochs


CAPABILITIES = {  # what each strategy's plan answers (freezeflow.core.strategies)
    "none": {"trains_everything"},
    "head": set(),
    "until": {"uses_cut"},
    "gradual": {"unfreezes_over_time", "changes_over_time"},
    "freezeout": {"updates_every_step", "changes_over_time"},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_the_plan_answers_its_strategys_capabilities(strategy):
    p = plan(strategy, until=2)
    flags = ("trains_everything", "uses_cut", "unfreezes_over_time", "updates_every_step", "changes_over_time")
    assert {flag for flag in flags if getattr(p, flag)} == CAPABILITIES[strategy]
    assert p.trains_body == (strategy != "head")
    assert p.capabilities is STRATEGIES[strategy]
    # what the capabilities promise, seen in the frozen counts over 4 epochs of 10 steps
    counts = [p.frozen_count(e, (e * 10 + s) / 40) for e in range(4) for s in range(10)]
    assert (counts == [0] * 40) == p.trains_everything
    assert (len(set(counts)) > 1) == p.changes_over_time
    within_epoch = any(len(set(counts[e * 10:(e + 1) * 10])) > 1 for e in range(4))
    assert within_epoch == p.updates_every_step
    assert (min(counts) < p.head) == p.trains_body


def test_the_table_lists_every_strategy_once_in_params_order():
    assert list(STRATEGIES) == ["none", "head", "until", "gradual", "freezeout"]
    assert all(name == row.name for name, row in STRATEGIES.items())


def test_gradual_every_two_epochs_and_floor_at_zero():
    p = plan("gradual", head_epochs=2, every=2)
    assert [p.frozen_count(e, 0) for e in range(14)] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0, 0]


def test_freezeout_times_follow_the_cubic_schedule():
    p = plan("freezeout", t0=0.8, scale_lr=True)  # the paper's variant (the default is unscaled)
    times = p.freeze_times()
    assert times == pytest.approx([(0.8 + 0.2 * i / 5) ** 3 for i in range(5)])
    assert all(a < b for a, b in zip(times, times[1:]))
    assert p.frozen_count(0, 0.0) == 0
    assert p.frozen_count(0, times[0]) == 1
    assert p.frozen_count(0, 0.999) == 5
    # lr: scaled by 1/t_i and cosine-annealed to zero at t_i; the head follows the global schedule
    assert p.lr_scale(0) == pytest.approx(1 / times[0])
    assert p.lr_factor(0, 0.0, 0.7) == pytest.approx(1.0)
    assert p.lr_factor(0, times[0] / 2, 0.7) == pytest.approx(0.5)
    assert p.lr_factor(0, times[0], 0.7) == pytest.approx(0.0, abs=1e-12)
    assert p.lr_factor(5, 0.3, 0.7) == 0.7


def test_gradual_discriminative_lrs():
    p = plan("gradual", body_lr_factor=0.5, lr_decay=0.5)  # the ULMFiT rule: lr * 0.5 ** depth
    assert [p.lr_scale(i) for i in range(N)] == [0.5 ** (5 - i) for i in range(N)]
    p = plan("gradual", body_lr_factor=0.1, body_lr_decay=0.9, lr_decay=0.5)  # gradual keeps its own decay
    assert [p.lr_scale(i) for i in range(N)] == pytest.approx([rule(i, 0.1, 0.5) for i in range(N)])


@pytest.mark.parametrize("strategy", ["none", "until", "freezeout"])
def test_every_strategy_uses_the_one_discriminative_rule(strategy):
    p = plan(strategy, body_lr_factor=0.1, body_lr_decay=0.5, until=2, lr_decay=0.9)
    assert [p.lr_scale(i) for i in range(N)] == pytest.approx([rule(i, 0.1, 0.5) for i in range(N)])
    assert p.lr_scale(N - 1) == 1.0 and p.lr_scale(N - 2) == pytest.approx(0.1)


def test_until_out_of_range_names_key_and_allowed_values():
    with pytest.raises(ParamsError, match=r"freeze.until: 9 is out of range .* allowed: 0..5"):
        plan("until", until=9)


class Inspector(Callback):
    """Records, after every epoch, what the freezing module promised, and during it which stages the
    training forwards ran and in which mode (forward hooks on each stage).

    A training forward is a chain of stage calls, each fed the previous one's output, that ends in the
    head with autograd on: validation (no_grad) and the feature cache's passes (no head) are not.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.rows: list[dict] = []
        self.bn_start = {name: buf.clone() for name, buf in trainer.model.named_buffers()}
        self.backward_stages: set[int] = set()
        self.chain: list[tuple[int, frozenset]] = []  # (stage, {module.training}) of the forward under way
        self.last_output = None  # kept alive, so a tensor with its data pointer is this output (or a view)
        self.forwards: list[tuple[int, list]] = []  # (frozen count then, chain) of this epoch's training forwards
        head = len(trainer.model.stages) - 1
        for i, stage in enumerate(trainer.model.stages):
            stage.register_full_backward_hook(lambda m, gi, go, i=i: self.backward_stages.add(i))
            stage.register_forward_pre_hook(lambda m, args, i=i: self.enter_stage(i, m, args[0]))
            stage.register_forward_hook(lambda m, args, out, i=i: self.leave_stage(i, out, i == head))
        self.backward_stages.clear()

    def enter_stage(self, i: int, module, x) -> None:
        fed = self.last_output is not None and x.data_ptr() == self.last_output.data_ptr() \
            and x.shape == self.last_output.shape  # not `is`: the backward hook re-wraps each output
        if not self.chain or not fed:
            self.chain = []  # a new forward starts here (at stage 0, or at the cached level)
        self.chain.append((i, frozenset(m.training for m in module.modules())))

    def leave_stage(self, i: int, output, is_head: bool) -> None:
        self.last_output = output
        if is_head:
            if torch.is_grad_enabled():
                self.forwards.append((self.trainer.frozen, self.chain))
            self.chain, self.last_output = [], None

    def on_epoch_end(self, report) -> None:
        t = self.trainer
        frozen = t.frozen
        stages = t.model.stages
        self.rows.append({
            "frozen": frozen,
            "requires_grad": [all(p.requires_grad for p in s.parameters()) for s in stages],
            "no_grad_attr": [all(p.grad is None for p in s.parameters()) for s in stages[:frozen]],
            "groups": [g["stage"] for g in t.optimizer.param_groups],
            "lrs": {g["stage"]: g["lr"] for g in t.optimizer.param_groups},
            "bn_unchanged": all(torch.equal(buf, self.bn_start[f"stages.{i}.{n}"])
                                for i in range(frozen) for n, buf in stages[i].named_buffers()),
            "forwards": self.forwards,
            "report_frozen": report.frozen_stages,
            "buffers": {name: buf.clone() for name, buf in t.model.named_buffers()},
        })
        self.forwards = []


def check_training_forwards(forwards: list) -> None:
    """Every training forward ran a contiguous run of stages up to the head; frozen stages that ran
    were in eval mode (every submodule), trainable ones in train mode."""
    assert forwards, "no training forward was seen"
    for frozen, chain in forwards:
        ran = [i for i, _ in chain]
        assert ran == list(range(ran[0], N)), f"stages ran out of order: {ran}"
        assert ran[0] <= frozen, f"trainable stage {ran[0] - 1} did not run"
        for i, modes in chain:
            expected = {False} if i < frozen else {True}
            assert modes == expected, f"stage {i} ran with training={set(modes)} while {frozen} stages were frozen"


def make_trainer(project: Path, shapes_dir: Path, **extra):
    params = load_params(project / "params", tiny_overrides(shapes_dir, **extra))
    layout = Layout(project)
    prepared = prepare_dataset(params.data, layout.prepared)
    trainer = build_trainer(params, prepared, layout, [])
    inspector = Inspector(trainer)
    trainer.callbacks.append(inspector)
    return trainer, inspector


@pytest.mark.parametrize("strategy,frozen", [("none", [0] * 4), ("head", [5] * 4), ("until", [2] * 4),
                                             ("gradual", [5, 4, 3, 2])])
@pytest.mark.parametrize("cache", ["auto", "off"])
def test_strategy_state_every_epoch(project, shapes_dir, strategy, frozen, cache):
    trainer, seen = make_trainer(project, shapes_dir, **{"train.freeze.strategy": strategy, "train.freeze.until": 2,
                                                         "train.cache_features": cache})
    trainer.run()
    assert [r["frozen"] for r in seen.rows] == frozen
    for row, k in zip(seen.rows, frozen):
        assert row["requires_grad"] == [i >= k for i in range(N)]
        assert all(row["no_grad_attr"])
        assert row["groups"] == list(reversed(range(k, N)))  # head first, then downwards, no duplicates
        check_training_forwards(row["forwards"])
        assert row["bn_unchanged"]
        assert row["report_frozen"] == k
        starts = {chain[0][0] for _, chain in row["forwards"]}  # the first stage each forward ran
        cached = cache == "auto" and strategy != "none"  # none: nothing frozen, nothing to cache
        assert starts == ({k} if cached else {0}), "with the cache the frozen prefix must not run, without it all must"
    lrs = seen.rows[-1]["lrs"]  # the documented rule (defaults: body_lr_factor 0.1, lr_decay 0.5)
    decay = trainer.params.freeze.lr_decay if strategy == "gradual" else trainer.params.lr_decay
    assert lrs == {i: pytest.approx(0.01 * rule(i, trainer.params.body_lr_factor, decay)) for i in range(frozen[-1], N)}
    assert not seen.backward_stages & set(range(min(frozen))), "backward ran through a frozen stage"


def test_freezeout_stages_leave_the_optimizer(project, shapes_dir):
    trainer, seen = make_trainer(project, shapes_dir, **{"train.freeze.strategy": "freezeout",
                                                         "train.freeze.t0": 0.5, "train.epochs": 4,
                                                         "train.freeze.scale_lr": True})
    trainer.run()
    frozen = [r["frozen"] for r in seen.rows]
    assert frozen == sorted(frozen) and frozen[-1] == N - 1 and frozen[0] < frozen[-1]
    for row in seen.rows:
        check_training_forwards(row["forwards"])  # frozen changes mid-epoch: checked per forward
    for prev, row in zip(seen.rows, seen.rows[1:]):
        assert row["groups"] == list(reversed(range(row["frozen"], N)))
        starts = {chain[0][0] for _, chain in row["forwards"]}
        assert len(starts) == 1 and starts.pop() >= prev["frozen"]  # from the cache, at the epoch's level
        # a stage trains before it freezes; from then on its BatchNorm statistics stay as they were
        for name, buf in row["buffers"].items():
            if int(name.split(".")[1]) < prev["frozen"]:
                assert torch.equal(buf, prev["buffers"][name]), name
    times = trainer.plan.freeze_times()
    step = trainer.step - 1  # lrs were last set for this step
    progress = step / trainer.total_steps
    for stage, lr in seen.rows[0]["lrs"].items():
        if stage < N - 1 and stage >= seen.rows[0]["frozen"]:
            p0 = (trainer.steps_per_epoch - 1) / trainer.total_steps
            share = rule(stage, trainer.params.body_lr_factor, trainer.params.lr_decay)
            expect = 0.01 * share / times[stage] * 0.5 * (1 + math.cos(math.pi * min(p0 / times[stage], 1)))
            assert lr == pytest.approx(expect)
    assert progress > times[-1]


def test_freezeout_unscaled_variant_keeps_the_base_lr():
    p = plan("freezeout", t0=0.8, scale_lr=False)
    assert [p.lr_scale(i) for i in range(N)] == [1.0] * N
    assert p.lr_factor(0, p.freeze_times()[0] / 2, 0.7) == pytest.approx(0.5)  # still annealed on its clock
