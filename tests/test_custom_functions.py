"""Custom ``torch.autograd.Function``s inside a model: a straight-through estimator (BinaryConnect,
binarised and quantised layers), a custom kernel, gradient reversal (DANN). The gradient of what a
Function computes from a parameter is its ``backward``, which no op the generic route records
models: such a call is replayed through the Function (``vmap`` where it supports torch.func,
``setup_context`` and ``generate_vmap_rule``; else one sample at a time by autograd). It used to be
read as no use at all (its forward's ops run under no_grad): refused as a parameter used outside its
module's forward. Checked against each sample's own backward (torch.func where the Function allows
it, else autograd: ``oracle.per_sample_grads``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .oracle import each_sample_backward, rel_err, second_backward_stats, tracked_and_checked


class SignSTE(torch.autograd.Function):
    """sign(w) forward; the gradient passed straight through where |w| <= 1 (BinaryConnect)."""

    @staticmethod
    def forward(ctx, w):  # (the older style: no setup_context, so no torch.func transform)
        ctx.save_for_backward(w)
        return torch.sign(w)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


class SignSTEFunc(torch.autograd.Function):
    """The same, written for torch.func (``setup_context``, a generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w):
        return torch.sign(w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


class BinaryLinear(nn.Linear):
    def __init__(self, *args, function=SignSTE, **kwargs):
        super().__init__(*args, **kwargs)
        self.function = function
        with torch.no_grad():
            self.weight.mul_(4)  # (some weights beyond 1, where the estimator passes nothing)

    def forward(self, x):
        return F.linear(x, self.function.apply(self.weight), self.bias)


class HalfGradScale(torch.autograd.Function):
    """``x * w`` whose backward to ``w`` is half the true one: the Function's backward, not the
    forward's math, is what autograd applies."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, (grad * x).sum_to_size(w.shape) * 0.5


class Scaled(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return HalfGradScale.apply(x, self.scale) + self.shift  # (the shift: a recorded use beside it)


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -0.3 * grad


def loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("function", [SignSTE, SignSTEFunc], ids=["autograd", "torch.func"])
def test_straight_through_binarised_layers(function, fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Hardtanh(), BinaryLinear(8, 8, function=function), nn.Hardtanh(),
                          BinaryLinear(8, 3, function=function))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    routes = tracked_and_checked(model, loss, x, y, fused=fused)
    assert routes["2"] == routes["4"] == "generic (vmap vjp)"


def test_a_function_whose_backward_is_not_its_forward_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Scaled(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    stats = second_backward_stats(model, loss, model, x, y)
    # (each sample's backward through the Function: torch.func cannot run it)
    assert rel_err(stats.per_sample, each_sample_backward(model, loss, model, x, y)) < 1e-5


def test_gradient_reversal_between_tracked_layers():
    """DANN: a domain head behind a gradient reversal; the feature layers' output grads are the
    reversed ones, which the rules read as they are."""
    torch.manual_seed(0)

    class DomainAdversarial(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
            self.domain = nn.Linear(8, 3)

        def forward(self, x):
            return self.domain(GradReverse.apply(self.features(x)))

    tracked_and_checked(DomainAdversarial(), loss, torch.randn(5, 6), torch.randint(0, 3, (5,)), rtol=1e-5)
