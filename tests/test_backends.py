"""The whole engine gives the same numbers with every backend of the divebatch operators."""

import pytest
import torch

from divebatch import GradNormTracker, ops

from .models_zoo import ZOO, sample_loss
from .oracle import rel_err

FAMILIES = ["linear_2d", "linear_3d", "conv2d", "conv1d", "embedding", "norms"]


def _stats(case, backend, monkeypatch):
    monkeypatch.setenv("DIVEBATCH_BACKEND", backend)
    torch.manual_seed(0)
    model, x, y = ZOO[case]()
    with GradNormTracker(model, "mean") as tracker:
        (sample_loss(model(x), y) / x.shape[0]).backward()
        return tracker.collect()


def _available(backend):
    if backend == "cpp" and not ops.CPP_AVAILABLE:
        pytest.skip("the C++ extension is not built here")
    if backend == "triton" and not ops.TRITON_AVAILABLE:
        pytest.skip("triton (divebatch._kernels) does not import here")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", FAMILIES)
def test_backend_matches_reference(case, backend, monkeypatch):
    _available(backend)
    expected = _stats(case, "reference", monkeypatch)
    actual = _stats(case, backend, monkeypatch)
    assert set(actual.per_layer) == set(expected.per_layer)
    for name in expected.per_layer:
        assert rel_err(actual.per_layer[name], expected.per_layer[name]) <= 1e-5, name
    assert rel_err(actual.batch_grad_sq, expected.batch_grad_sq) <= 1e-6


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("DIVEBATCH_BACKEND", "fortran")
    with pytest.raises(ValueError, match="DIVEBATCH_BACKEND"):
        ops.outer_norm(torch.ones(2, 3), torch.ones(2, 4))
