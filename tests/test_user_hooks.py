"""The model's own forward hooks beside the tracker's. A hook that replaces a module's output
(activation steering, noise injection) and was registered before the tracker made the rule read the
replaced output: the norms were off, refused only on verified backwards. The tracker's hooks now
come first, whenever they are registered (a re-plan registers them again)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker

from .oracle import reference_norms, rel_err


def loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def steer(module, args, output):
    return output * 2 + 0.1


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("tokens", [False, True], ids=["rows", "tokens"])
def test_a_hook_that_replaces_the_output(tokens, fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    x = torch.randn(5, 4, 6) if tokens else torch.randn(5, 6)
    y = torch.randint(0, 3, (5,))
    forward = (lambda m, inputs: m(inputs).mean(1)) if tokens else (lambda m, inputs: m(inputs))

    class Pooled(nn.Module):  # (the oracle's model: the same forward, pooled over tokens)
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return forward(self.net, inputs)

    model[2].register_forward_hook(steer)  # (before the tracker)
    with GradNormTracker(model, "sum", fused=fused, verify_every=0) as tracker:
        model[3].register_forward_hook(steer)  # (after it)
        ref, _, ref_batch = reference_norms(Pooled(), loss, x, y)
        for step in range(2):  # (the second backward is not verified)
            model.zero_grad()
            loss(forward(model, x), y).backward()
            stats = tracker.collect()
            assert rel_err(stats.per_sample, ref) < 1e-5, step
            assert rel_err(stats.batch_grad_sq, ref_batch) < 1e-5, step
        model[0].weight.requires_grad_(False)  # (a re-plan registers the tracker's hooks again: still first)
        model.zero_grad()
        loss(forward(model, x), y).backward()
        stats = tracker.collect()
        ref, _, ref_batch = reference_norms(Pooled(), loss, x, y)
        assert rel_err(stats.per_sample, ref) < 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_gradient_hooks_on_parameters(fused):
    """A hook on a parameter that changes its gradient (train some rows only, as when new tokens are
    added to a vocabulary; a clip) changes what the optimizer gets, not the loss's per-sample
    gradients: the tracker reads the gradient before such hooks, whether they were registered before
    or after it, so the norms are torch.func's and the accounting check passes (a hook registered
    before the tracker used to make it read the masked gradient: refused as a use outside the forward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(24, 8), nn.Tanh(), nn.Linear(8, 3))
    ids, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,))
    rows = torch.zeros(10, 1)
    rows[7:] = 1.0  # (only the new tokens' rows train)
    model[0].weight.register_hook(lambda g: g * rows)
    with GradNormTracker(model, "sum", fused=fused, verify_every=1) as tracker:
        model[2].weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
        ref, _, ref_batch = reference_norms(model, loss, ids, y)
        for _ in range(2):
            model.zero_grad()
            loss(model(ids), y).backward()
            stats = tracker.collect()
            assert rel_err(stats.per_sample, ref) < 1e-5
            assert rel_err(stats.batch_grad_sq, ref_batch) < 1e-5
        assert model[0].weight.grad[:7].abs().max() == 0 and model[2].weight.grad.abs().max() <= 1e-3
        model[4].bias.requires_grad_(False)  # (a re-plan registers the tracker's hooks again: still first)
        model.zero_grad()
        loss(model(ids), y).backward()
        ref, _, ref_batch = reference_norms(model, loss, ids, y)
        assert rel_err(tracker.collect().per_sample, ref) < 1e-5
