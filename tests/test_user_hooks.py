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


class ComputedWeight(nn.Module):
    """A weight computed from the parameter in the forward (read back through that computation)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) * 0.3)

    def forward(self, x):
        return F.linear(x, torch.tanh(self.weight))


class Replayed(nn.Module):
    """A parameter used by an op the generic route replays per sample (``einsum``)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) * 0.3)

    def forward(self, x):
        return torch.einsum("bi,ij->bj", torch.sin(x), self.weight)


def _step_in_the_backward(model, lr=0.5) -> None:
    """An SGD step of each parameter as soon as its gradient is accumulated (optimizer in backward)."""
    optimizers = {p: torch.optim.SGD([p], lr=lr) for p in model.parameters()}

    def step(p):
        optimizers[p].step()
        optimizers[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step)


@pytest.mark.parametrize("middle", [ComputedWeight, Replayed], ids=["computed weight", "replayed"])
def test_optimizer_step_in_the_backward(middle):
    """The optimizer stepped inside the backward (``register_post_accumulate_grad_hook``, as
    torchtune's ``optimizer_in_bwd`` saves memory): each parameter changes as soon as its gradient
    is formed, while other modules' norms are still to come; those that read parameters (a computed
    weight's recipe, a replay) must read the forward's values. Against torch.func on the model as
    the forward saw it."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), middle(8), nn.Tanh(), nn.Linear(8, 3))
    as_forwarded = copy.deepcopy(model)
    _step_in_the_backward(model)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with GradNormTracker(model, "sum") as tracker:
        loss(model(x), y).backward()
        stats = tracker.collect()
    assert not torch.equal(model[2].weight, as_forwarded[2].weight)  # (the steps were taken)
    per_sample, _, batch = reference_norms(as_forwarded, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) < 1e-5
    assert rel_err(stats.batch_grad_sq, batch) < 1e-5


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_optimizer_step_in_the_backward_before_a_recurrent_layers_norms(kind, fused):
    """``out, _ = lstm(x)``: the final state gets no gradient, so the layer's call is accounted once
    the backward is over, and the replay (``fused=False``) reads the weights then, after the
    optimizer has stepped them in the backward (41% off, refused on verified backwards only). The
    weights as the forward used them are put in for that, and the new ones back after."""
    import copy

    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, kind)(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    model = Tagger()
    as_forwarded = copy.deepcopy(model)
    _step_in_the_backward(model)
    x, y = torch.randn(5, 3, 4), torch.randint(0, 3, (5,))
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss(model(x), y).backward()
        stats = tracker.collect()
    stepped = copy.deepcopy(as_forwarded)
    torch.optim.SGD(stepped.parameters(), lr=0.5).zero_grad()
    loss(stepped(x), y).backward()
    torch.optim.SGD(stepped.parameters(), lr=0.5).step()
    for p, q in zip(model.parameters(), stepped.parameters()):  # (the new values were put back)
        torch.testing.assert_close(p, q)
    per_sample = []
    for b in range(5):  # (each sample's backward: torch.func cannot vmap a batched RNN call here)
        one = copy.deepcopy(as_forwarded)
        loss(one(x[b:b + 1]), y[b:b + 1]).backward()
        per_sample.append(sum(p.grad.double().square().sum() for p in one.parameters()))
    assert rel_err(stats.per_sample, torch.stack(per_sample)) < 1e-5
