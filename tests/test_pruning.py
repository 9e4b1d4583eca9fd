"""Modules pruned with ``torch.nn.utils.prune``: a forward pre-hook sets ``weight = weight_orig *
weight_mask`` before each forward, and the trained parameter is ``weight_orig``. A layer rule saw no
weight there (only the bias: 11% off, refused on verified backwards only, with a misleading message);
the generic route replays each sample through the module, pruning hook included, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

from divebatch import GradNormTracker

from .oracle import checked_step

HOOKS = ["fused", "hooks"]


def loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 8),
                         nn.ReLU(), nn.Linear(8, 3))


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 2, 5, 5, generator=gen), torch.randint(0, 3, (5,), generator=gen)


def assert_exact(tracker, model, x, y):
    return checked_step(tracker, model, loss, x, y)


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
@pytest.mark.parametrize("when", ["before", "after"])
def test_pruned_layers_are_exact(when, fused):
    model, (x, y) = make_model(), batch()
    targets = [(model[0], "weight"), (model[3], "weight"), (model[5], "bias")]

    def prune_them():
        prune.global_unstructured(targets[:2], pruning_method=prune.L1Unstructured, amount=0.5)
        prune.random_unstructured(model[5], "bias", amount=0.5)

    if when == "before":
        prune_them()
    with GradNormTracker(model, "sum", fused=fused, verify_every=0) as tracker:
        assert_exact(tracker, model, x, y)
        if when == "after":  # (registered weight_orig parameters: the tracker re-plans)
            prune_them()
        for _ in range(2):  # (the second backward is not a verified one)
            assert_exact(tracker, model, x, y)
        routes = {plan.module: plan.route for plan in tracker.plan()}
        assert all(routes[name].startswith("generic") for name in ("0", "3", "5")), routes
        for module, name in targets:  # made permanent: plain layers again
            prune.remove(module, name)
        assert_exact(tracker, model, x, y)
        assert "generic" not in tracker.plan()[0].route
