"""Estimators: epoch-pooled diversity and the per-step noise scale, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from divebatch.estimator import EpochDiversity, NoiseScale, noise_scale_terms

try:  # the per-sample-norm engine; integration tests skip until it imports
    from divebatch.tracker import GradNormTracker
except Exception:  # noqa: BLE001
    GradNormTracker = None

needs_tracker = pytest.mark.skipif(GradNormTracker is None, reason="divebatch.tracker does not import yet")


# ------------------------------------------------------------------ a problem with known per-sample gradients
def least_squares(n=512, d=6, seed=0, dtype=torch.float64):
    """ℓ_i(w) = ½(x_i·w − y_i)², so g_i = (x_i·w − y_i)·x_i in closed form."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w_true = torch.randn(d, generator=g, dtype=dtype)
    y = x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=dtype)
    w = w_true + 0.3 * torch.randn(d, generator=g, dtype=dtype)  # a fixed point away from the optimum
    return x, y, w


def closed_form(x, y, w):
    r = x @ w - y
    gi = r[:, None] * x                      # [n, d] per-sample gradients
    s = (gi * gi).sum()
    gsum = gi.sum(0)
    return gi, float(s), float(gsum @ gsum)


def vmap_per_sample_sq(model, x, y, loss_fn):
    """||g_i||² of the unscaled per-sample loss with torch.func (the oracle)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None]).sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.flatten(1).pow(2).sum(1) for g in grads.values())


def test_identity_n_delta_equals_b_noise_plus_one():
    x, y, w = least_squares()
    gi, s, a2 = closed_form(x, y, w)
    n = x.shape[0]
    delta = s / a2
    gbar = gi.mean(0)
    trace_pop = ((gi - gbar) ** 2).sum(1).mean()
    b_noise = float(trace_pop / (gbar @ gbar))
    assert n * delta == pytest.approx(b_noise + 1, rel=1e-10)


def test_epoch_diversity_matches_hand_computation_synthetic_numbers():
    x, y, w = least_squares()
    gi, s, a2 = closed_form(x, y, w)
    p = nn.Parameter(torch.zeros(x.shape[1]))
    est = EpochDiversity([p])
    c = 1.0 / 64  # the user's loss is a mean over batches of 64: .grad = c·Σ g_i
    for start in range(0, x.shape[0], 64):
        blk = gi[start:start + 64]
        est.observe((blk * blk).sum(1).float(), [(c * blk.sum(0)).float()], scale=c)
    assert est.steps == 8 and est.samples == 512
    assert est.value() == pytest.approx(s / a2, rel=1e-5)
    assert est.n_delta(512) == pytest.approx(512 * s / a2, rel=1e-5)
    assert est.n_delta() == pytest.approx(512 * s / a2, rel=1e-5)


def test_noise_scale_terms_unbiased_formulas():
    x, y, w = least_squares(n=8)
    gi, s1, s2 = closed_form(x, y, w)
    g2, tr = noise_scale_terms(s1, s2, 8)
    # with the batch = the population, |G|² estimate is the U-statistic mean_{i≠j} <g_i, g_j>
    gram = gi @ gi.T
    off = (gram.sum() - gram.diagonal().sum()) / (8 * 7)
    assert float(g2) == pytest.approx(float(off), rel=1e-9)
    assert float(tr) == pytest.approx(float(((gi - gi.mean(0)) ** 2).sum() / 7), rel=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        noise_scale_terms(1.0, 1.0, 1)


def test_both_estimators_agree_at_fixed_w_within_sampling_error():
    x, y, w = least_squares(n=4096, d=6, seed=1)
    gi, s, a2 = closed_form(x, y, w)
    n = x.shape[0]
    exact = n * s / a2
    p = nn.Parameter(torch.zeros(6))
    ep = EpochDiversity([p])
    ns = NoiseScale(beta=0.995)
    gen = torch.Generator().manual_seed(0)
    B = 64
    for epoch in range(6):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, B):
            blk = gi[perm[start:start + B]]
            ps = (blk * blk).sum(1)
            tot = blk.sum(0)
            if epoch == 0:
                ep.observe(ps.float(), [tot.float()], scale=1.0)
            ns.observe(ps, tot @ tot, B)
    assert ep.n_delta(n) == pytest.approx(exact, rel=1e-5)  # fixed w: the epoch estimate is exact
    # the noise-scale estimate is a ratio of averages of ~380 noisy batches: agree within 15%
    assert ns.n_delta() == pytest.approx(exact, rel=0.15)
    assert ns.b_noise() + 1 == pytest.approx(ns.n_delta())
    assert exact > 1.5  # the test is not trivial: noise matters at this w


def test_non_finite_steps_are_skipped():
    p = nn.Parameter(torch.zeros(3))
    est = EpochDiversity([p])
    est.observe(torch.tensor([1.0, 2.0]), [torch.tensor([1.0, 0.0, 0.0])])
    before = (float(est.sum_sq), float(est.grad_sum_sq()))
    est.observe(torch.tensor([float("nan"), 2.0]), [torch.tensor([5.0, 5.0, 5.0])])
    est.observe(torch.tensor([1.0, 2.0]), [torch.tensor([float("inf"), 0.0, 0.0])],
                batch_grad_sq=torch.tensor(float("inf")))
    assert (float(est.sum_sq), float(est.grad_sum_sq())) == before
    assert est.skipped_steps == 2

    ns = NoiseScale(beta=0.5)
    ns.observe(torch.tensor([3.0, 3.0]), torch.tensor(4.0), 2)
    b0 = ns.b_noise()
    ns.observe(torch.tensor([float("inf"), 3.0]), torch.tensor(4.0), 2)
    ns.observe(torch.tensor([3.0, 3.0]), torch.tensor(float("nan")), 2)
    assert ns.b_noise() == b0 and ns.skipped_steps == 2


def test_noise_scale_before_any_step_and_degenerate_gradient():
    ns = NoiseScale()
    assert math.isnan(ns.b_noise())
    # identical per-sample gradients: no noise, B_noise = 0
    g = torch.tensor([1.0, 2.0])
    ns.observe(torch.full((4,), float(g @ g)), float((4 * g) @ (4 * g)), 4)
    assert ns.b_noise() == pytest.approx(0.0, abs=1e-12)
    # pure noise (gradients cancel): |G|² ≤ 0 → B_noise = +inf (the rule then jumps to m_max)
    ns2 = NoiseScale()
    ns2.observe(torch.tensor([1.0, 1.0]), 0.0, 2)
    assert ns2.b_noise() == math.inf


def test_state_dict_round_trip():
    p = nn.Parameter(torch.zeros(2, 2))
    est = EpochDiversity([p])
    est.observe(torch.tensor([1.0, 3.0]), [torch.ones(2, 2)], scale=0.5)
    st = est.state_dict()
    est2 = EpochDiversity([p])
    est2.load_state_dict(st)
    assert est2.value() == est.value() and est2.steps == 1 and est2.samples == 2
    est.observe(torch.tensor([1.0]), [torch.ones(2, 2)])
    assert est2.value() != est.value()  # a copy, not shared buffers

    ns = NoiseScale(beta=0.9)
    ns.observe(torch.tensor([2.0, 3.0, 4.0]), 20.0, 3)
    ns2 = NoiseScale()
    ns2.load_state_dict(ns.state_dict())
    assert ns2.b_noise() == ns.b_noise() and ns2.beta == 0.9


def test_accumulation_stays_on_device_without_host_copies():
    p = nn.Parameter(torch.zeros(4))
    est = EpochDiversity([p])
    est.observe(torch.ones(3), [torch.ones(4)])
    assert est.sum_sq.device == p.device and isinstance(est.sum_sq, torch.Tensor)
    assert est._A[0].shape == p.shape and est._A[0].dtype == torch.float32


# ------------------------------------------------------------------ with the real per-sample-norm engine
def _ls_model(w):
    m = nn.Linear(w.shape[0], 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(w[None].float())
    return m


def _ls_loss(out, y):
    return 0.5 * (out[:, 0] - y) ** 2


@needs_tracker
@pytest.mark.parametrize("reduction", ["sum", "mean", 0.01])
def test_tracker_epoch_diversity_least_squares_closed_form(reduction):
    x, y, w = least_squares(n=256)
    x, y, w = x.float(), y.float(), w.float()
    gi, s, a2 = closed_form(x.double(), y.double(), w.double())
    model = _ls_model(w)
    with GradNormTracker(model, loss_reduction=reduction) as tracker:
        est = EpochDiversity(tracker.parameters())
        for start in range(0, 256, 32):
            xb, yb = x[start:start + 32], y[start:start + 32]
            c = 1.0 if reduction == "sum" else (1.0 / 32 if reduction == "mean" else reduction)
            model.zero_grad()
            (c * _ls_loss(model(xb), yb).sum()).backward()
            st = tracker.collect()
            # per-sample norms against the closed form and against torch.func
            ref = (gi[start:start + 32] ** 2).sum(1)
            torch.testing.assert_close(st.per_sample.double(), ref, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st.per_sample, vmap_per_sample_sq(model, xb, yb, _ls_loss),
                                       rtol=1e-4, atol=1e-6)
            est.update(st)
    assert est.n_delta(256) == pytest.approx(256 * s / a2, rel=1e-4)


@needs_tracker
def test_tracker_noise_scale_grad_scale_is_divided_out():
    x, y, w = (t.float() for t in least_squares(n=64))
    model = _ls_model(w)
    with GradNormTracker(model, loss_reduction="mean") as tracker:
        ests = []
        for gscale in (1.0, 1024.0):
            ns = NoiseScale(beta=0.0)
            ep = EpochDiversity(tracker.parameters())
            model.zero_grad()
            (gscale * _ls_loss(model(x), y).mean()).backward()   # a GradScaler multiplies the loss
            st = tracker.collect()
            ns.update(st, grad_scale=gscale)
            ep.update(st, grad_scale=gscale)
            ests.append((ns.b_noise(), ep.value()))
    assert ests[1][0] == pytest.approx(ests[0][0], rel=1e-5)
    assert ests[1][1] == pytest.approx(ests[0][1], rel=1e-5)
