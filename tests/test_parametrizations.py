"""Parametrized tensors (``torch.nn.utils.parametrize``: weight_norm, orthogonal, a user's own): the
module uses ``g(original)``, computed by its ParametrizationList on each access. The originals are
the module's parameters on the generic route, read from the product of the input with the
computed weight (each sample's vjp of that op, taken back through the parametrization: route
"generic (computed weights)", no replay of the module's forward); a parametrization that changes
its buffers in the forward (spectral_norm's power iteration in training mode) is refused, since no
replay computes that tensor again. Checked against torch.func.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from divebatch import GradNormTracker

from .models_zoo import sample_loss
from .oracle import tracked_and_checked


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


def test_spectral_norm_in_training_mode_is_refused():
    """Its power iteration updates ``_u``/``_v`` in every training-mode forward: a replay would
    compute another weight (and advance the estimate again). Refused at the forward, by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), parametrizations.spectral_norm(nn.Linear(4, 5)), nn.Linear(5, 2))
    with GradNormTracker(model, "sum"):
        with pytest.raises(ValueError, match=r"module '1' .*changed its buffers.*eval mode"):
            model(torch.randn(4, 3))


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
