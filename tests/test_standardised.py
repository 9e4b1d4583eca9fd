"""Weight-standardised convolutions and linear maps in closed form (``divebatch/layers/standardised.py``):
per-sample norms of the parameters behind the standardised weight, against torch.func, in both of
its branches (each sample's weight gradient formed and projected; the closed form over the linear
routes' norm), and the cases it must leave to the generic route."""

from __future__ import annotations

import copy

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import divebatch.layers.standardised as standardised
from divebatch import GradNormTracker

from .models_zoo import StdConv
from .oracle import reference_norms, rel_err, tracked_step

CLOSED = "generic (standardised weights)"
GENERIC = "generic (computed weights)"


class StdLinear(nn.Linear):
    """A weight-standardised ``F.linear`` with a learned gain and shift of the standardised weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_features) + 0.5)
        self.shift = nn.Parameter(0.1 * torch.randn(self.out_features))

    def forward(self, x):
        weight = F.batch_norm(self.weight.view(1, self.out_features, -1), None, None, self.gain, self.shift,
                              True, 0.0, 1e-5).view_as(self.weight)
        return F.linear(x, weight, self.bias)


class SharedGain(StdConv):
    """The gain also scales the output: its per-sample gradients from two uses add before squaring,
    so the closed form (one use's) does not apply."""

    def forward(self, x):
        return super().forward(x) * self.gain.mean()


def loss_fn(out, y):
    return 0.5 * (out - y).square().sum()


def check(model, x, fused=True, rtol=1e-5, float64_reference=False):
    """Track one backward; per-sample, per-module and batch norms against torch.func (on a float64
    copy of the model, with ``float64_reference``). The routes."""
    y = torch.randn_like(model(x))
    stats, routes = tracked_step(model, loss_fn, x, y, fused)
    reference = (copy.deepcopy(model).double(), x.double(), y.double()) if float64_reference else (model, x, y)
    per_sample, per_param, batch = reference_norms(reference[0], loss_fn, *reference[1:])
    assert rel_err(stats.per_sample, per_sample) <= rtol
    assert rel_err(stats.batch_grad_sq, batch) <= rtol
    for name in routes:
        own = sum(v for n, v in per_param.items() if n.rpartition(".")[0] == name)
        assert rel_err(stats.per_layer[name], own) <= rtol, name
    assert max(stats.unaccounted.values()) <= 1e-5
    return routes


@pytest.fixture(params=["instantiate", "ghost"])
def branch(request, monkeypatch):
    """Force one branch: each sample's weight gradient formed and projected, or the closed form."""
    monkeypatch.setattr(standardised, "linear_route_name", lambda *shape: request.param)
    return request.param


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("make", [
    lambda: StdConv(4, 6, 3, padding=1),
    lambda: StdConv(4, 6, 3, stride=2, groups=2, padding=(1, 0), dilation=(1, 2)),
    lambda: StdConv(4, 6, 1, gain=False, bias=False),
    lambda: StdConv(4, 6, (2, 3), eps=1e-2),  # (a large eps: r_o = var / (var + eps) well below 1)
    lambda: StdLinear(5, 4),
], ids=["scaled", "grouped-strided-dilated", "unscaled-1x1-no-bias", "large-eps", "linear-gain-and-shift"])
def test_closed_form_matches_torch_func(make, fused, branch):
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.Tanh())
    x = torch.randn(3, 5) if isinstance(model[0], StdLinear) else torch.randn(3, 4, 6, 7)
    assert check(model, x, fused)["0"] == CLOSED


@settings(max_examples=25, deadline=None)
@given(cin=st.integers(2, 4), per_group=st.integers(1, 3), groups=st.integers(1, 2), k=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 1), batch=st.integers(1, 4), gain=st.booleans(),
       bias=st.booleans(), ghost=st.booleans())
def test_closed_form_on_drawn_convolutions(cin, per_group, groups, k, stride, padding, batch, gain, bias, ghost):
    # (Two entries per channel standardise to ±1 whatever θ is: the gradient is 0 up to eps, and
    # every float32 computation of it, torch.func's too, is rounding.)
    assume(cin * k * k >= 3)
    torch.manual_seed(cin + 7 * k)
    model = StdConv(cin * groups, per_group * groups, k, stride=stride, padding=padding, groups=groups,
                    gain=gain, bias=bias)
    route = "ghost" if ghost else "instantiate"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(standardised, "linear_route_name", lambda *shape: route)
        assert check(model, torch.randn(batch, cin * groups, 5, 4))[""] == CLOSED


@pytest.mark.parametrize("frozen", ["weight", "gain", "bias"])
def test_frozen_parameters_are_left_out(frozen, branch):
    torch.manual_seed(0)
    model = StdConv(3, 4, 3, padding=1)
    getattr(model, frozen).requires_grad_(False)
    route = check(model, torch.randn(3, 3, 5, 5))[""]
    # (A frozen standardised weight or bias is a constant to the recorder: the convolution is then
    # no product it reads, and the generic route replays it, exactly.)
    assert route == (CLOSED if frozen == "gain" else "generic (vmap vjp)")


def test_norms_without_cancellation_where_patches_are_nearly_constant(branch):
    """Inputs that vary little within a patch put most of each sample's weight gradient along the
    direction standardisation removes (``1``): the closed form subtracts nearly equal numbers, and
    the result is still float32-exact against float64."""
    torch.manual_seed(0)
    model = StdConv(2, 4, 3, padding=0)
    x = 3.0 + 1e-2 * torch.randn(4, 2, 8, 8)
    assert check(model, x, rtol=1e-4, float64_reference=True)[""] == CLOSED


def test_a_parameter_with_another_use_takes_the_generic_route():
    torch.manual_seed(0)
    assert check(SharedGain(3, 4, 3), torch.randn(3, 3, 5, 5))[""] == GENERIC


def test_a_module_called_twice_takes_the_generic_route():
    torch.manual_seed(0)
    conv = StdConv(3, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), conv)
    assert check(model, torch.randn(3, 3, 5, 5))["0"] == GENERIC


def test_a_string_padding_takes_the_generic_route():
    torch.manual_seed(0)
    assert check(StdConv(3, 4, 3, padding="same"), torch.randn(3, 3, 5, 5))[""] == GENERIC


def test_the_closed_form_forms_no_per_sample_weight_gradient(monkeypatch):
    """The ghost branch of a 1x1 convolution of many channels at few positions: no tensor of
    ``B x out x in`` elements is made (the generic route forms one per chunk of samples)."""
    torch.manual_seed(0)
    model = StdConv(64, 96, 1, bias=False)
    x = torch.randn(8, 64, 2, 2)
    y = torch.randn(8, 96, 2, 2)
    largest = []

    class Sizes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):  # (the memory behind it: views and expansions share it)
                largest.append(out.untyped_storage().nbytes() // out.element_size())
            return out

    with GradNormTracker(model, "sum", verify_every=0) as tracker:
        loss_fn(model(x), y).backward()  # (the first backward is verified through the generic route)
        model.zero_grad()
        with Sizes():
            loss_fn(model(x), y).backward()
            stats = tracker.collect()
    per_sample, _, _ = reference_norms(model, loss_fn, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert max(largest) < 8 * 96 * 64


def test_norms_where_the_gradient_lies_along_the_weight(branch):
    """A sample whose weight gradient lies almost wholly along ``ŵ`` (here 99.8% of its squared
    norm), which standardisation removes: the closed form's float32 terms cancel (an error of
    8e-5 without the fallback), so the samples it cannot read to float32 are formed in float64."""
    torch.manual_seed(10)
    model = StdConv(3, 1, 1, gain=False, bias=False)
    x = torch.randn(1, 3, 5, 4)
    y = torch.randn_like(model(x))
    stats, _ = tracked_step(model, loss_fn, x, y)
    per_sample, _, _ = reference_norms(copy.deepcopy(model).double(), loss_fn, x.double(), y.double())
    assert rel_err(stats.per_sample, per_sample) <= 1e-5


@pytest.mark.parametrize("make, x_shape", [
    (lambda: StdConv(3, 4, 3, padding=1), (3, 3, 6, 6)),
    (lambda: StdConv(4, 6, 3, stride=2, groups=2), (3, 4, 7, 7)),
    (lambda: StdConv(3, 4, 1, bias=False), (3, 3, 4, 4)),
], ids=["padded", "grouped-strided", "1x1-no-bias"])
def test_weight_gradient_comes_from_the_per_sample_ones(make, x_shape, branch):
    """The convolution's backward takes the standardised weight's gradient from the per-sample
    gradients the norms formed (no weight-gradient convolution of autograd's), the same gradients
    as an untracked step; in the closed form's branch nothing is formed, and autograd's is run."""
    torch.manual_seed(0)
    model, x = make(), torch.randn(*x_shape)
    y = torch.randn_like(model(x))
    loss_fn(model(x), y).backward()
    untracked = {name: p.grad.clone() for name, p in model.named_parameters()}
    weight_grads = []

    class WeightGradients(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default and args[-1][1]:
                weight_grads.append(args[2].shape[0])  # (the per-sample ones: B x out channels)
            return func(*args, **(kwargs or {}))

    with GradNormTracker(model, "sum", verify_every=0) as tracker:
        for step in range(2):  # (the first backward is verified; the second is counted)
            model.zero_grad()
            weight_grads.clear()
            with WeightGradients():
                loss_fn(model(x), y).backward()
            tracker.collect()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, untracked[name]) <= 1e-5, name
    autograds = weight_grads.count(model.out_channels)
    assert autograds == (1 if branch == "ghost" else 0)
