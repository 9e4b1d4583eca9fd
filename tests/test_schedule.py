"""Batch-size policies: the DiveBatch rule, AdaBatch, Fixed, lr rescaling and schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from divebatch.estimator import EpochDiversity
from divebatch.schedule import AdaBatch, CosineLR, DiveBatch, Fixed


def opt(lr=0.1):
    p = nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([p], lr=lr, momentum=0.9)


class StubEstimator:
    """Returns a scripted n·Δ̂ at each decision; records what it saw."""

    def __init__(self, values):
        self.values = list(values)
        self.seen = 0
        self.steps = 0

    def update(self, stats, grad_scale=1.0):
        self.seen += 1
        self.steps += 1

    def observe(self, s1, s2, b):
        self.seen += 1
        self.steps += 1

    def n_delta(self, n=None):
        return self.values.pop(0)

    def state_dict(self):
        return {"values": list(self.values), "seen": self.seen}

    def load_state_dict(self, s):
        self.values, self.seen = list(s["values"]), s["seen"]


class FakeTracker:
    def __init__(self):
        self.enabled = True
        self.p = nn.Parameter(torch.zeros(3))

    def parameters(self):
        yield self.p

    def collect(self):
        raise AssertionError("not used with a stub estimator")


def run_epochs(policy, epochs, steps_per_epoch=4):
    sizes = []
    for _ in range(epochs):
        sizes.append(policy.batch_size)
        for _ in range(steps_per_epoch):
            policy.observe(stats=object())
        policy.step()
    return sizes


def test_fixed():
    p = Fixed(opt(), 64)
    assert run_epochs(p, 5) == [64] * 5 and p.lr_factor == 1.0


@pytest.mark.parametrize("lr_factor", [1.0, 2.0, math.sqrt(2)])
def test_adabatch_schedule_and_lr_exact(lr_factor):
    o = opt(0.1)
    p = AdaBatch(o, 128, 2048, resize_every=3, lr_factor=lr_factor)
    sizes = run_epochs(p, 16)
    assert sizes == [128] * 3 + [256] * 3 + [512] * 3 + [1024] * 3 + [2048] * 4
    assert o.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor ** 4, rel=1e-12)
    assert p.lr_factor == pytest.approx(lr_factor ** 4, rel=1e-12)


def test_adabatch_partial_last_growth_scales_lr_by_the_fraction():
    o = opt(1.0)
    p = AdaBatch(o, 96, 256, resize_every=1, lr_factor=2.0)  # 96 → 192 → 256 (×4/3)
    assert run_epochs(p, 3) == [96, 192, 256]
    assert o.param_groups[0]["lr"] == pytest.approx(2.0 * (256 / 192), rel=1e-12)


@pytest.mark.parametrize("scaling,expected", [("none", 1.0), ("linear", 2048 / 128), ("sqrt", math.sqrt(2048 / 128))])
def test_divebatch_rule_and_lr_scaling_exact(scaling, expected):
    o = opt(0.1)
    # n·Δ̂ = 3000 → δ·n·Δ̂ = 300 → m = 300, then 50 000 → clamp to m_max
    p = DiveBatch(o, 60000, 128, 2048, delta=0.1, resize_every=2, lr_scaling=scaling,
                  estimator=StubEstimator([3000.0, 50000.0]), params=[nn.Parameter(torch.zeros(1))])
    sizes = run_epochs(p, 6)
    assert sizes == [128, 128, 300, 300, 2048, 2048]
    assert p.lr_factor == pytest.approx(expected, rel=1e-12)
    assert o.param_groups[0]["lr"] == pytest.approx(0.1 * expected, rel=1e-12)
    assert [h["new_batch_size"] for h in p.history] == [300, 2048]
    assert p.done and not p.measuring and not p.measure_now


def test_divebatch_never_shrinks_and_nan_goes_to_max():
    p = DiveBatch(opt(), 1000, 64, 1024, delta=0.1, resize_every=1,
                  estimator=StubEstimator([10.0, float("nan")]), params=[nn.Parameter(torch.zeros(1))])
    assert run_epochs(p, 3) == [64, 64, 1024]  # 0.1·10 = 1 < 64: unchanged; NaN → m_max
    p = DiveBatch(opt(), 1000, 64, 1024, delta=0.1, resize_every=1,
                  estimator=StubEstimator([float("inf")]), params=[nn.Parameter(torch.zeros(1))])
    assert run_epochs(p, 2) == [64, 1024]


def test_divebatch_growth_cap():
    p = DiveBatch(opt(), 1000, 100, 10000, delta=1.0, resize_every=1, max_growth=2.0,
                  estimator=StubEstimator([1e6, 1e6, 150.0, 150.0]), params=[nn.Parameter(torch.zeros(1))])
    assert run_epochs(p, 4) == [100, 200, 400, 400]


def test_measuring_windows_and_tracker_gating():
    tracker = FakeTracker()
    est = StubEstimator([500.0, 5000.0])
    p = DiveBatch(opt(), 1000, 10, 100, delta=0.1, resize_every=3, estimator=est, tracker=tracker)
    measured = []
    for epoch in range(7):
        measured.append(p.measuring)
        assert tracker.enabled == p.measure_now
        for _ in range(3):
            p.observe(stats=object())
        p.step()
    # the last epoch of each 3-epoch window is measured, until m = m_max
    assert measured == [False, False, True, False, False, True, False]
    assert est.seen == 6
    assert p.batch_size == 100 and tracker.enabled is False  # no overhead once at m_max


def test_measure_every_subsamples_steps():
    tracker = FakeTracker()
    est = StubEstimator([1.0])
    p = DiveBatch(opt(), None, 10, 100, delta=1.0, resize_every=1, estimator=est, tracker=tracker, measure_every=4)
    flags = []
    for _ in range(10):
        flags.append(tracker.enabled)
        p.observe(stats=object())
    assert flags == [True, False, False, False] * 2 + [True, False]
    assert est.seen == 3


def test_composes_with_chainable_lr_scheduler():
    o = opt(0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
    p = DiveBatch(o, 1000, 10, 80, delta=1.0, resize_every=2, lr_scaling="linear",
                  estimator=StubEstimator([40.0, 1e9]), params=[nn.Parameter(torch.zeros(1))])
    lrs = []
    for epoch in range(8):
        lrs.append(o.param_groups[0]["lr"])
        for _ in range(2):
            p.observe(stats=object())
        p.step()
        o.step()
        sched.step()
    cos = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(8)]
    factor = [1, 1, 4, 4, 8, 8, 8, 8]  # 10 → 40 after epoch 2, → 80 (m_max) after epoch 4
    for got, c, f in zip(lrs, cos, factor):
        assert got == pytest.approx(c * f, rel=1e-9)


def test_non_chainable_scheduler_keeps_the_rescale_through_base_lrs():
    o = opt(0.1)
    lam = torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e))
    p = AdaBatch(o, 32, 64, resize_every=1, lr_factor=2.0, lr_schedulers=[lam])
    p.step()
    o.step()
    lam.step()
    assert o.param_groups[0]["lr"] == pytest.approx(0.1 * 2.0 / 2, rel=1e-12)


def test_cosine_lr_counted_in_samples_is_batch_size_independent():
    n, epochs = 1000, 4
    final = {}
    for bs in (10, 250):
        o = opt(0.2)
        s = CosineLR(o, total=n * epochs)
        seen, lrs = 0, {}
        for e in range(epochs):
            lrs[e] = o.param_groups[0]["lr"]
            for _ in range(n // bs):
                s.step(seen)
                seen += bs
            s.step(seen)
        final[bs] = lrs
    for e in range(epochs):
        assert final[10][e] == pytest.approx(final[250][e], rel=1e-12)
    assert final[10][2] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    o = opt(0.2)
    s = CosineLR(o, total=100, warmup=10)
    s.step(5)
    assert o.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.05)) * 0.5)


def test_state_dict_round_trip():
    o = opt()
    p = DiveBatch(o, 1000, 8, 64, delta=0.1, resize_every=2, estimator="noise-scale", params=[nn.Parameter(torch.zeros(2))])
    p.observe_sums(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(5.0), 3)
    p.step()
    st = p.state_dict()
    q = DiveBatch(opt(), 1000, 8, 64, delta=0.1, resize_every=2, estimator="noise-scale", params=[nn.Parameter(torch.zeros(2))])
    q.load_state_dict(st)
    assert q.epoch == 1 and q.batch_size == 8 and q.estimator.steps == p.estimator.steps
    a = AdaBatch(o, 8, 64, resize_every=1)
    a.step()
    b = AdaBatch(o, 8, 64, resize_every=1)
    b.load_state_dict(a.state_dict())
    assert b.batch_size == 16 and b.epoch == 1


def test_epoch_estimator_end_to_end_with_sums():
    w = nn.Parameter(torch.zeros(2))
    p = DiveBatch(None, 4, 2, 64, delta=1.0, resize_every=1, params=[w])
    assert isinstance(p.estimator, EpochDiversity)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # per-sample gradients
    for blk in (g[:2], g[2:]):
        p.observe_sums((blk ** 2).sum(1), (blk.sum(0) ** 2).sum(), 2, grads=[blk.sum(0)], scale=1.0)
    p.step()
    # Δ = (1 + 1 + 2 + 2) / ||(3, 1)||² = 6/10 → n·Δ = 2.4 → δ·n·Δ = 2.4 → m stays 2
    assert p.history[-1]["n_delta"] == pytest.approx(2.4)
    assert p.batch_size == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(delta=0.0), "delta"), (dict(delta=-1.0), "delta"), (dict(delta=float("nan")), "delta"),
    (dict(lr_scaling="cubic"), "lr_scaling"), (dict(estimator="magic"), "estimator"),
    (dict(max_growth=1.0), "max_growth"), (dict(batch_size=0), "batch_size"),
    (dict(max_batch_size=64), "max_batch_size"), (dict(dataset_size=None), "dataset_size"),
    (dict(resize_every=0), "resize_every"), (dict(measure_every=3), "measure_every"),
])
def test_bad_arguments(kwargs, match):
    args = dict(optimizer=opt(), dataset_size=1000, batch_size=128, max_batch_size=2048)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        DiveBatch(**args)


def test_warns_when_a_decision_epoch_saw_no_step():
    p = DiveBatch(opt(), 100, 8, 64, resize_every=1, estimator=StubEstimator([1e9]), params=[nn.Parameter(torch.zeros(1))])
    with pytest.warns(RuntimeWarning, match="observe"):
        p.step()
    assert p.batch_size == 8


@pytest.mark.parametrize("estimator", ["noise-scale", "epoch"])
def test_observe_refuses_uncollected_gradient_accumulation(estimator):
    from divebatch.tracker import GradNormTracker

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    tracker = GradNormTracker(model, loss_reduction="sum")
    policy = DiveBatch(None, 64, 4, 64, estimator=estimator, tracker=tracker, resize_every=1)
    x = torch.randn(8, 6)
    model(x).square().sum().backward()
    policy.observe()                                   # one backward per step: fine
    assert policy.estimator.steps == 1
    model(x[:4]).square().sum().backward()
    model(x[4:]).square().sum().backward()             # two backwards, none collected in between
    with pytest.raises(ValueError, match="2 backward passes since the last collect"):
        policy.observe()
    assert policy.estimator.steps == 1
