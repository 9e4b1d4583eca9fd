"""Models the tracker refuses as it is created, before any hook is registered: TorchScript modules
(they run no Python hooks) and complex parameters (every rule squares real gradients). The
complex refusal's advice, a real ``[..., 2]`` parameter viewed as complex in the forward, is checked
to give exact norms (its product with the input was read as a broadcast use, whose per-sample
gradient takes no conjugate: 45% off; complex ops now send the call to the replay)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from divebatch import GradNormTracker

from .oracle import tracked_and_checked


@pytest.mark.parametrize("where", ["model", "submodule", "traced"])
def test_torchscript_modules_are_refused(where):
    torch.manual_seed(0)
    if where == "model":
        model, match = torch.jit.script(nn.Sequential(nn.Linear(3, 3))), "the model is a TorchScript"
    elif where == "traced":
        model, match = torch.jit.trace(nn.Linear(3, 2), torch.randn(2, 3)), "the model is a TorchScript"
    else:
        model, match = nn.Sequential(nn.Linear(3, 3), torch.jit.script(nn.Linear(3, 2))), "module '1' .* is a TorchScript"
    with pytest.raises(ValueError, match=match + ".*eager module"):
        GradNormTracker(model)
    if where == "submodule":
        for p in model[1].parameters():  # (frozen: nothing of it to track)
            p.requires_grad_(False)
        GradNormTracker(model).close()


class ComplexScale(nn.Module):
    """A complex gain per feature, held as a real ``[d, 2]`` parameter."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d, 2))

    def forward(self, x):
        return (torch.view_as_complex(self.gain) * x.to(torch.cfloat)).abs()


def test_complex_parameters_are_refused_and_the_advice_is_exact():
    model = nn.Sequential(nn.Linear(4, 4, dtype=torch.cfloat))
    with pytest.raises(ValueError, match=r"parameter '0.weight' of module '0' \(Linear\) is complex.*view_as_complex"):
        GradNormTracker(model)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), ComplexScale(4), nn.Linear(4, 2))
    tracked_and_checked(model, lambda out, y: 0.5 * (out - y).square().sum(), torch.randn(5, 3), torch.randn(5, 2))
