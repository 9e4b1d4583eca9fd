"""A loss that couples the samples (in-batch negatives: InfoNCE, CLIP) has no per-sample loss
l_i whose gradient torch.func could take one sample at a time. What divebatch reports there, as
for BatchNorm in training mode, is each sample's share of the batch gradient: the gradient of the
whole loss through that sample's own rows, i.e. with respect to a copy of the parameters only that
sample uses. The reference below builds exactly those copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker

from .oracle import rel_err


def info_nce(z: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Two views per pair, the first half of the batch against the second (CLIP's symmetric loss)."""
    z = F.normalize(z, dim=1)
    half = z.shape[0] // 2
    logits = z[:half] @ z[half:].T / temperature
    labels = torch.arange(half)
    return F.cross_entropy(logits, labels, reduction="sum") + F.cross_entropy(logits.T, labels, reduction="sum")


def shares_reference(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """||dL/dtheta_b||^2 with theta_b a copy of every parameter that only sample b's rows use."""
    copies, h = [], x
    for layer in model:
        if isinstance(layer, nn.Linear):
            weight = layer.weight.detach().expand(x.shape[0], -1, -1).clone().requires_grad_()
            bias = layer.bias.detach().expand(x.shape[0], -1).clone().requires_grad_()
            copies += [weight, bias]
            h = torch.einsum("boi,bi->bo", weight, h) + bias
        else:
            h = layer(h)
    grads = torch.autograd.grad(info_nce(h), copies)
    return sum(g.flatten(1).double().square().sum(1) for g in grads)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_in_batch_negatives_give_each_samples_share_of_the_batch_gradient(fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(6, 5)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        info_nce(model(x)).backward()
        stats = tracker.collect()
    assert rel_err(stats.per_sample, shares_reference(model, x)) < 1e-5
    # The shares add up to the batch gradient, whose norm is read from autograd's gradient.
    batch = sum(p.grad.double().square().sum() for p in model.parameters())
    assert rel_err(stats.batch_grad_sq, batch) < 1e-5
