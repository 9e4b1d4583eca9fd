"""The tracked model called more than once before a backward: row i of every call is sample i
(two augmentations of one batch: exact), and parts of one batch (views of other rows of the same
tensor) are refused, since adding them up row by row would mix different samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker

from .oracle import reference_norms, rel_err


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))


def loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


class TwoViews(nn.Module):
    """The oracle's model: sample i's loss is that of its two views."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + self.model(x.flip(-1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_two_views_of_one_batch_are_the_same_samples(fused):
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    ref, _, ref_batch = reference_norms(TwoViews(model), loss, x, y)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss(model(x) + model(x.flip(-1)), y).backward()
        stats = tracker.collect()
    assert rel_err(stats.per_sample, ref) < 1e-5
    assert rel_err(stats.batch_grad_sq, ref_batch) < 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("parts", ["chunk", "slices", "overlapping"])
def test_parts_of_one_batch_are_refused(parts, fused):
    # (Linear only, on sequences: with fused=True every call takes the fused forward)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(4, 5, 6)
    first, second = {"chunk": x.chunk(2), "slices": (x[:2], x[2:]), "overlapping": (x[:3], x[1:])}[parts]
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        out = torch.cat([model(first), model(second)]).mean(1)
        with pytest.raises(ValueError, match=r"rows 0\.\. and [12]\.\. of one tensor .*torch\.cat the parts"):
            loss(out, torch.randint(0, 3, (out.shape[0],))).backward()
            tracker.collect()


def test_forwards_that_reach_no_backward_do_not_count():
    """A validation pass with gradients on, over slices of one tensor and never backwarded, then a
    step on another slice of it: exact (only the forwards a backward reaches are its samples)."""
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    data, targets = torch.randn(12, 6, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    ref, _, _ = reference_norms(model, loss, data[8:], targets[8:])
    with GradNormTracker(model, "sum") as tracker:
        for start in (0, 4):
            model(data[start:start + 4])
        loss(model(data[8:]), targets[8:]).backward()
        assert rel_err(tracker.collect().per_sample, ref) < 1e-5


def test_parts_with_a_backward_each_are_each_a_batch():
    """Gradient accumulation over parts of one batch: each backward is its own, exact."""
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    ref, _, _ = reference_norms(model, loss, x, y)
    with GradNormTracker(model, "sum") as tracker:
        per_sample = []
        for rows in (slice(0, 2), slice(2, 4)):
            loss(model(x[rows]), y[rows]).backward()
            per_sample.append(tracker.collect().per_sample)
    assert rel_err(torch.cat(per_sample), ref) < 1e-5


class Crops(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x[:, 1:]) + self.model(x[:, :-1])


def test_a_view_of_the_same_rows_is_the_same_samples():
    """Two crops of the features (views at other offsets, the same rows) are not parts of the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    ref, _, _ = reference_norms(Crops(model), loss, x, y)
    with GradNormTracker(model, "sum") as tracker:
        loss(model(x[:, 1:]) + model(x[:, :-1]), y).backward()
        assert rel_err(tracker.collect().per_sample, ref) < 1e-5
