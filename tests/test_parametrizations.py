"""Parametrized tensors (``torch.nn.utils.parametrize``: weight_norm, orthogonal, a user's own): the
module uses ``g(original)``, computed by its ParametrizationList on each access. The originals are
the module's parameters on the generic route, read from the product of the input with the
computed weight (each sample's vjp of that op, taken back through the parametrization: route
"generic (computed weights)", no replay of the module's forward); a parametrization that changes
its buffers in the forward (spectral_norm's power iteration in training mode) is exact where the
call is read that way, and refused where it must be replayed, since no replay computes that tensor
again. The older hook-based ``torch.nn.utils.weight_norm`` and ``spectral_norm`` (a forward pre-hook
computes the weight) take the same route. Checked against torch.func.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from divebatch import GradNormTracker

from .models_zoo import sample_loss
from .oracle import reference_norms, rel_err, tracked_and_checked


class Positive(nn.Module):
    """A user's parametrization with a learnable parameter of its own: ``scale * softplus(W)``."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, w):
        return self.scale * nn.functional.softplus(w)


def _positive(module):
    parametrize.register_parametrization(module, "weight", Positive())
    return module


PARAMETRIZED = {
    "weight_norm": lambda: parametrizations.weight_norm(nn.Linear(4, 5)),
    "weight_norm, dim 1": lambda: parametrizations.weight_norm(nn.Linear(4, 5), dim=1),
    "orthogonal": lambda: parametrizations.orthogonal(nn.Linear(5, 5)),
    "user's, with a parameter": lambda: _positive(nn.Linear(4, 5)),
    "two tensors": lambda: parametrizations.weight_norm(_positive(nn.Linear(4, 5)), name="bias", dim=0),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("tokens", [None, 6], ids=["samples", "samples and tokens"])
@pytest.mark.parametrize("name", sorted(PARAMETRIZED))
def test_parametrized_linear_matches_torch_func(name, tokens, fused):
    torch.manual_seed(0)
    layer = PARAMETRIZED[name]()
    model = nn.Sequential(nn.Linear(3, layer.in_features), layer, nn.Linear(layer.out_features, 2))
    shape = (4,) if tokens is None else (4, tokens)
    routes = tracked_and_checked(model, sample_loss, torch.randn(*shape, 3), torch.randn(*shape, 2), fused=fused)
    assert routes["1"] == "generic (computed weights)"


def test_weight_norm_convolution_as_wav2vec2_positions():
    """wav2vec2/HuBERT's positional convolution: a grouped Conv1d with ``weight_norm(dim=2)``."""
    torch.manual_seed(0)
    conv = parametrizations.weight_norm(nn.Conv1d(4, 4, 5, padding=2, groups=2), name="weight", dim=2)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), conv, nn.Conv1d(4, 2, 1))
    routes = tracked_and_checked(model, sample_loss, torch.randn(3, 2, 7), torch.randn(3, 2, 7), fused=True)
    assert routes["1"] == "generic (computed weights)"


SPECTRAL_NORMS = {
    "parametrization": lambda layer: parametrizations.spectral_norm(layer),
    "hook": lambda layer: nn.utils.spectral_norm(layer),  # (the older, hook-based one: weight_orig, weight_u)
}


def _estimate(layer) -> torch.Tensor:
    return layer.parametrizations.weight[0]._u if parametrize.is_parametrized(layer) else layer.weight_u


@pytest.mark.parametrize("style", sorted(SPECTRAL_NORMS))
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_spectral_norm_in_training_mode_is_exact(conv, style):
    """A GAN discriminator's layers: the power iteration updates the estimate ``u`` in every
    training-mode forward. The weight is read from the ops after it (``weight / sigma``, with this
    forward's ``u`` and ``v``), so no replay computes another one: the norms are those of the weight
    this forward used (torch.func in eval mode after it, which uses the same estimate), and the
    estimate moves once per forward, as without the tracker. (A convolution's power iteration
    transposes a view of its weight under no_grad, which says it requires grad: it used to send the
    call to a replay, 26% off, refused on verified backwards only.)"""
    torch.manual_seed(0)
    first = nn.Conv2d(3, 4, 3, stride=2) if conv else nn.Linear(6, 4)
    model = nn.Sequential(SPECTRAL_NORMS[style](first), nn.LeakyReLU(0.2), nn.Flatten(),
                          SPECTRAL_NORMS[style](nn.Linear(36 if conv else 4, 2)))
    x = torch.randn(5, 3, 7, 7) if conv else torch.randn(5, 6)
    y = torch.randn(5, 2)
    untracked = copy.deepcopy(model)
    with GradNormTracker(model, "sum", verify_every=1) as tracker:
        for _ in range(2):
            model.zero_grad()
            sample_loss(model(x), y).backward()
            untracked(x)
            stats = tracker.collect()
            assert torch.equal(_estimate(model[0]), _estimate(untracked[0]))
            model.eval()
            per_sample, _, batch = reference_norms(model, sample_loss, x, y)
            model.train()
            assert rel_err(stats.per_sample, per_sample) < 1e-5
            assert rel_err(stats.batch_grad_sq, batch) < 1e-5
        assert {plan.route for plan in tracker.plan()} == {"generic (computed weights)"}


class EinsumLayer(nn.Module):
    """A weight applied by an op the recorder does not read (``einsum``): its call is replayed."""

    def __init__(self, out_features=4, in_features=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))

    def forward(self, x):
        return torch.einsum("bi,oi->bo", x, self.weight)


@pytest.mark.parametrize("style", sorted(SPECTRAL_NORMS))
def test_spectral_norm_in_training_mode_is_refused_where_replayed(style):
    """Where the call must be replayed, the replay would run the power iteration again (another
    weight, the estimate moved twice): refused at the forward, by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), SPECTRAL_NORMS[style](EinsumLayer()), nn.Linear(4, 2))
    with GradNormTracker(model, "sum"):
        with pytest.raises(ValueError, match=r"module '1' .*changed its buffers.*replaying.*eval"):
            model(torch.randn(4, 3))
    model.eval()
    tracked_and_checked(model, sample_loss, torch.randn(4, 3), torch.randn(4, 2))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_hook_based_weight_norm(conv):
    """``torch.nn.utils.weight_norm`` (deprecated, still in HiFi-GAN's and WaveNet's vocoders): a
    forward pre-hook sets ``weight = g * v / ||v||``; the parameters are ``weight_g``, ``weight_v``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layer = nn.utils.weight_norm(nn.Conv1d(3, 4, 3, padding=1) if conv else nn.Linear(3, 4))
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(5, 3, 6) if conv else torch.randn(5, 3)
    model(x)
    routes = tracked_and_checked(model, sample_loss, x, torch.randn(5, 2))
    assert routes["0"] == "generic (computed weights)"


def test_spectral_norm_in_eval_mode_is_exact_and_keeps_its_estimate():
    torch.manual_seed(0)
    layer = parametrizations.spectral_norm(nn.Linear(4, 5))
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(5, 2))
    model(torch.randn(4, 3))  # one power-iteration step in training mode, then freeze the estimate
    layer.parametrizations.weight.eval()
    u = layer.parametrizations.weight[0]._u.clone()
    routes = tracked_and_checked(model, sample_loss, torch.randn(4, 3), torch.randn(4, 2), fused=True)
    assert routes["1"] == "generic (computed weights)"
    assert torch.equal(layer.parametrizations.weight[0]._u, u)


def test_tracking_leaves_the_parametrized_forward_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), PARAMETRIZED["weight_norm"](), nn.Linear(5, 2))
    x = torch.randn(4, 3)
    expected = model(x)
    with GradNormTracker(model, "sum"):
        out = model(x)
        sample_loss(out, torch.zeros_like(out)).backward()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_eager_quantization_aware_training(conv):
    """``torch.ao.quantization.prepare_qat``: each layer applies a fake-quantised weight (a
    straight-through estimator inside a fused op) and fake-quantises its output in a forward hook.
    The weight is read from the op after it ("computed weights"). With the observers on, the
    quantisation parameters come from this batch, as a BatchNorm's statistics do: the reference
    is each sample's own backward with the observers off afterwards (the parameters this forward
    used)."""
    import torch.ao.quantization as quantization

    torch.manual_seed(0)
    layers = ([nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)] if conv
              else [nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)])
    model = nn.Sequential(quantization.QuantStub(), *layers, quantization.DeQuantStub())
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization.prepare_qat(model, inplace=True)
    x = torch.randn(5, 2, 5, 5) if conv else torch.randn(5, 6)
    y = torch.randn(5, 3)
    with GradNormTracker(model, "sum") as tracker:
        for _ in range(2):
            model.apply(quantization.enable_observer)
            model.zero_grad()
            sample_loss(model(x), y).backward()
            stats = tracker.collect()
            model.apply(quantization.disable_observer)
            tracker.enabled = False
            per_sample = []
            for b in range(5):
                model.zero_grad()
                sample_loss(model(x[b:b + 1]), y[b:b + 1]).backward()
                per_sample.append(sum(p.grad.double().square().sum() for p in model.parameters()))
            assert rel_err(stats.per_sample, torch.stack(per_sample)) < 1e-5
            tracker.enabled = True
        assert {plan.route for plan in tracker.plan()} == {"generic (computed weights)"}


class OrthogonalRNN(nn.Module):
    """An orthogonal recurrence stepped in Python, run under ``parametrize.cached()`` (as the
    parametrize tutorial advises, so the matrix exponential runs once per forward)."""

    def __init__(self, recurrence: nn.Module, peek: bool):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.rec = parametrizations.orthogonal(recurrence)
        self.out = nn.Linear(6, 3)
        self.peek = peek

    def forward(self, x):
        h = torch.zeros(x.shape[0], 6)
        if self.peek:  # (the parametrized weight read, and cached, before any call of its module)
            h = h + 0 * self.rec.weight.sum()
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.out(h)


@pytest.mark.parametrize("backward_cached", [False, True], ids=["backward after", "backward inside"])
@pytest.mark.parametrize("case", ["linear", "read first", "replayed"])
def test_parametrizations_cached_over_a_recurrence(case, backward_cached):
    """Under ``parametrize.cached()`` the weight is computed once and reused by every step: the
    steps after the first (or all, where it was read before the first) applied a tensor whose
    computation no recorder saw (refused, 79% off). Each tracked call computes it again; a replay
    (a module the recorder cannot read) runs with the cache off, even inside the block."""
    torch.manual_seed(0)
    model = OrthogonalRNN(EinsumLayer(6, 6) if case == "replayed" else nn.Linear(6, 6), peek=case == "read first")
    x, y = torch.randn(5, 3, 4), torch.randint(0, 3, (5,))

    def loss(out, target):
        return nn.functional.cross_entropy(out, target, reduction="sum")

    with GradNormTracker(model, "sum", verify_every=1) as tracker:
        for _ in range(2):
            model.zero_grad()
            with parametrize.cached():
                out = model(x)
                if backward_cached:
                    loss(out, y).backward()
            if not backward_cached:
                loss(out, y).backward()
            stats = tracker.collect()
        route = {plan.module: plan.route for plan in tracker.plan()}["rec"]
    per_sample, _, batch = reference_norms(model, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) < 1e-5
    assert rel_err(stats.batch_grad_sq, batch) < 1e-5
    assert route == ("generic (vmap vjp)" if case == "replayed" else "generic (computed weights)")
