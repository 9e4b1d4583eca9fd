"""Backwards that form only some gradients: ``loss.backward(inputs=[...])`` (only those parameters),
``torch.autograd.grad`` with respect to parameters or to the input only (an attack's step), and a
loss with a gradient penalty through the model (R1, WGAN-GP), whose second-order part per-sample
norms cannot see. Before, the norms counted every module the backward went through (228% off for
``inputs=[one weight]``; now refused), an input-gradient step counted as a backward, and the penalty's loss 2.8%
off with no error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from divebatch import DiveBatch, GradNormTracker

from .oracle import reference_norms, rel_err

from .test_replan import HOOKS, batch, loss
from .test_replan import make_mlp as make_model


def reference_over(names, x, y):
    """torch.func's norms over the named parameters only (the others frozen in a copy)."""
    model = make_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    per_sample, _, batch_sq = reference_norms(model, loss, x, y)
    return per_sample, batch_sq


def assert_norms_over(stats, names, x, y):
    per_sample, batch_sq = reference_over(names, x, y)
    assert rel_err(stats.per_sample, per_sample) < 1e-5
    assert rel_err(stats.batch_grad_sq, batch_sq) < 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
@pytest.mark.parametrize("modules", [(4,), (2,), (0, 3, 4)])
def test_backward_with_inputs_counts_only_those_modules(modules, fused):
    model, (x, y) = make_model(), batch()
    names = {f"{m}.{p}" for m in modules for p in ("weight", "bias")}
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss(model(x), y).backward(inputs=[p for m in modules for p in model[m].parameters()])
        stats = tracker.collect()
        assert_norms_over(stats, names, x, y)
        assert set(stats.per_layer) == {str(m) for m in modules}
        model.zero_grad()
        loss(model(x), y).backward()  # (and the next, whole backward counts everything again)
        assert_norms_over(tracker.collect(), {n for n, _ in model.named_parameters()}, x, y)


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
def test_autograd_grad_of_whole_modules(fused):
    model, (x, y) = make_model(), batch()
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        torch.autograd.grad(loss(model(x), y), list(model[2].parameters()) + list(model[4].parameters()))
        stats = tracker.collect()
    assert set(stats.per_layer) == {"2", "4"}
    assert_norms_over(stats, {"2.weight", "2.bias", "4.weight", "4.bias"}, x, y)


@pytest.mark.parametrize("partial", ["backward", "autograd.grad"])
def test_part_of_a_modules_parameters_is_refused(partial):
    model, (x, y) = make_model(), batch()
    with GradNormTracker(model, "sum") as tracker:
        if partial == "backward":
            loss(model(x), y).backward(inputs=[model[2].weight, *model[4].parameters()])
        else:
            torch.autograd.grad(loss(model(x), y), [model[2].weight, *model[4].parameters()])
        with pytest.raises(RuntimeError, match=r"module '2' \(Linear\).*\['weight'\] but not of \['bias'\]"):
            tracker.collect()


class ScaledHead(nn.Module):
    """A generic-route module whose second parameter is used only when asked for."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.shift = nn.Parameter(torch.tensor(0.25))
        self.use_shift = False

    def forward(self, x):
        return x * self.scale + (self.shift if self.use_shift else 0)


def test_a_parameter_the_call_did_not_use_is_not_a_partial_request():
    torch.manual_seed(0)
    model, (x, y) = nn.Sequential(nn.Linear(6, 3), ScaledHead()), batch()
    with GradNormTracker(model, "sum") as tracker:
        loss(model(x), y).backward()
        stats = tracker.collect()
    per_sample, _, batch_sq = reference_norms(model, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) < 1e-5
    assert rel_err(stats.batch_grad_sq, batch_sq) < 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
def test_an_input_gradient_is_not_a_backward(fused):
    """An attack's step (``torch.autograd.grad(loss, x)``) forms no parameter's gradient: not counted,
    so the update's backward is the one step collect() and a DiveBatch policy see."""
    model, (x, y) = make_model(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        policy = DiveBatch(opt, 100, 4, 16, tracker=tracker, estimator="noise-scale", resize_every=1)
        assert tracker.enabled  # (every step measured)
        attacked = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(loss(model(attacked), y), attacked)
        with pytest.raises(RuntimeError, match="before any backward"):
            tracker.collect()
        adversarial = (x + 0.1 * grad_x.sign()).detach()
        torch.autograd.grad(loss(model(attacked), y), attacked)
        opt.zero_grad()
        loss(model(adversarial), y).backward()
        stats = tracker.collect()
        assert stats.backwards == 1
        assert_norms_over(stats, {n for n, _ in model.named_parameters()}, adversarial, y)
        torch.autograd.grad(loss(model(attacked), y), attacked)
        loss(model(adversarial), y).backward()
        policy.observe()  # (would refuse two backwards)


def r1_step(model, x, y):
    """A loss with a gradient penalty on the input (R1 / WGAN-GP style), one backward."""
    x = x.clone().requires_grad_()
    out = model(x)
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return loss(out, y) + 0.1 * grad_x.square().sum()


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
def test_a_gradient_penalty_through_the_model_is_refused(fused):
    """Its part of each parameter's gradient flows through the backward's own graph: refused on
    every such backward (each is verified), however rarely backwards are verified otherwise."""
    model, (x, y) = make_model(), batch()
    with GradNormTracker(model, "sum", fused=fused, verify_every=0) as tracker:
        loss(model(x), y).backward()
        tracker.collect()  # (the first backward, verified, is a plain one)
        for _ in range(2):
            r1_step(model, x, y).backward()
            with pytest.raises(RuntimeError, match="create_graph=True .*gradient penalty"):
                tracker.collect()
        model.zero_grad()
        loss(model(x), y).backward()  # (a plain step after it is tracked again)
        assert_norms_over(tracker.collect(), {n for n, _ in model.named_parameters()}, x, y)


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
def test_the_penalty_backward_with_tracking_off(fused):
    """What the refusal says to do: the loss's backward tracked, the penalty's not; the gradients
    are a plain step's."""
    model, plain, (x, y) = make_model(), make_model(), batch()
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        for m in (model, plain):
            inputs = x.clone().requires_grad_()
            out = m(inputs)
            loss(out, y).backward(retain_graph=True)
            if m is model:
                stats = tracker.collect()
                tracker.enabled = False
            (grad_x,) = torch.autograd.grad(out.sum(), inputs, create_graph=True)
            (0.1 * grad_x.square().sum()).backward()
        tracker.enabled = True
    assert_norms_over(stats, {n for n, _ in model.named_parameters()}, x, y)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
