"""The generic route's replay (a module's forward run again on each sample, ``vmap(vjp)``) must
differentiate the function the batch's forward computed. Each sample's replayed outputs are
compared with the forward's, and a replay that gives other outputs is refused: a module that
couples the samples (a BatchNorm in training mode inside it) or changes state in its forward (a
counter buffer). Replays run on copies of the buffers: a BatchNorm's running statistics were
updated once per sample by the backward. Outputs changed in place after the module are not
compared (no false refusal); outputs and inputs holding k rows per sample (``[B*H, T, T]``) are
replayed per sample's k rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker

from .oracle import each_sample_backward, rel_err, second_backward_stats

RTOL = 1e-5


def class_loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


class NormedScan(nn.Module):
    """A module with a parameter of its own used where only a replay reads it (a cumulative sum
    over features, divided by the parameter's norm), after a BatchNorm of its own."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), norm
        self.gain, self.head = nn.Parameter(torch.rand(3) + 0.5), nn.Linear(3, 3)

    def forward(self, x):
        h = self.norm(self.conv(x)) * self.gain[:, None, None]
        return self.head(torch.cumsum(h, 1).mean((2, 3)) / torch.linalg.vector_norm(self.gain))


class Counted(nn.Module):
    """A buffer its forward increments, which scales the output: a replay sees the next count."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return torch.cumsum(x @ self.weight, 1) * self.calls / torch.linalg.vector_norm(self.weight)


def test_a_batch_norm_in_training_mode_inside_a_replayed_module_is_refused_and_left_unchanged():
    torch.manual_seed(0)
    model = NormedScan(nn.BatchNorm2d(3))
    x, y = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4,))
    with GradNormTracker(model, "sum", verify_every=0) as tracker:
        out = model(x)
        running = model.norm.running_mean.clone(), model.norm.num_batches_tracked.clone()
        with pytest.raises(RuntimeError, match=r"NormedScan's forward, replayed on one sample .*couples the samples"):
            class_loss(out, y).backward()
            tracker.collect()
    assert torch.equal(model.norm.running_mean, running[0]) and torch.equal(model.norm.num_batches_tracked, running[1])


def test_a_replay_that_cannot_run_on_one_sample_is_refused_with_the_reason():
    """BatchNorm1d in training mode refuses a batch of one outright."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.gain, self.head = nn.BatchNorm1d(6), nn.Parameter(torch.rand(6) + 0.5), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.cumsum(self.norm(x) * self.gain, 1) / torch.linalg.vector_norm(self.gain))

    torch.manual_seed(0)
    model = Flat()
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(RuntimeError, match=r"cannot be replayed on one sample at a time .*Expected more than 1 "
                                               r"value per channel.*BatchNorm in training mode"):
            class_loss(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
            tracker.collect()


def test_a_forward_that_changes_its_state_is_refused():
    torch.manual_seed(0)
    model = Counted()
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(RuntimeError, match=r"Counted's forward, replayed .*state its forward changes"):
            class_loss(model(torch.randn(4, 4)), torch.randint(0, 3, (4,))).backward()
            tracker.collect()
    assert model.calls.item() == 1  # (the replays counted on a copy)


@pytest.mark.parametrize("in_place_after", [False, True], ids=["plain", "output-scaled-in-place"])
def test_an_eval_mode_batch_norm_inside_is_replayed_exactly(in_place_after):
    """Nothing couples the samples: exact, also where code after the module scales its output in
    place (the forward's output is then not compared)."""
    torch.manual_seed(0)
    inner = NormedScan(nn.BatchNorm2d(3).eval())
    model = nn.Sequential(inner, nn.Identity()) if not in_place_after else _ScaledInPlace(inner)
    x, y = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4,))
    stats = second_backward_stats(model, class_loss, model, x, y)
    assert rel_err(stats.per_sample, each_sample_backward(model, class_loss, model, x, y)) <= RTOL


class _ScaledInPlace(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).mul_(0.5)


class HeadRowsBias(nn.Module):
    """Returns, besides its output, a ``[B*H, T, T]`` bias (a table of its own repeated per sample
    and head, merged by a view), which the next such module takes as an input (WavLM's position
    bias from layer to layer)."""

    def __init__(self, d=6, heads=2, T=5):
        super().__init__()
        self.table = nn.Parameter(torch.randn(heads, T, T) * 0.3)
        self.proj, self.heads = nn.Linear(d, d), heads

    def forward(self, h, bias=None):
        B, T, d = h.shape
        if bias is None:
            bias = self.table.unsqueeze(0).repeat(B, 1, 1, 1).view(B * self.heads, T, T)
        heads = self.proj(h).view(B, T, self.heads, -1).transpose(1, 2).reshape(B * self.heads, T, -1)
        scores = torch.softmax(heads @ heads.transpose(1, 2) * torch.sigmoid(self.table.sum()) + bias, -1)
        return (scores @ heads).view(B, self.heads, T, -1).transpose(1, 2).reshape(B, T, d), bias


class TwoBiasedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = HeadRowsBias(), HeadRowsBias(), nn.Linear(6, 3)

    def forward(self, x):
        h, bias = self.first(x)
        h, _ = self.second(torch.tanh(h), bias)
        return self.head(h.mean(1))


@pytest.mark.parametrize("batch", [3, 2])
def test_rows_per_sample_passed_between_replayed_modules_are_exact(batch):
    """The first module's ``[B*H, T, T]`` output reaches the second as an input: both replayed on
    each sample's H rows (the second failed on the sizes; the first's output grad was sliced as if
    each row were a sample's)."""
    torch.manual_seed(0)
    model = TwoBiasedLayers()
    x, y = torch.randn(batch, 5, 6), torch.randint(0, 3, (batch,))
    with GradNormTracker(model, "sum") as tracker:
        class_loss(model(x), y).backward()
        tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    assert routes["first"] == routes["second"] == "generic (vmap vjp)"
    stats = second_backward_stats(model, class_loss, model, x, y)
    assert rel_err(stats.per_sample, each_sample_backward(model, class_loss, model, x, y)) <= RTOL
