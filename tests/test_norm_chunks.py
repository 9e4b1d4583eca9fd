"""Without a compiled norm kernel (``affine_norm_grads``, ``group_norm_grads``, ``channel_norm_grads``)
the normalisation rules form ``x_hat * G`` a few samples at a time (a bounded temporary):
slicing must give the same per-sample gradients as the whole batch at once, and BatchNorm in
training mode, whose statistics couple the samples, must not be sliced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers import norm

from .models_zoo import ZOO, sample_loss
from .oracle import reference_norms, rel_err


def tracked_norms(model, x, y):
    with GradNormTracker(model, "sum") as tracker:
        sample_loss(model(x), y).backward()
        stats = tracker.collect()
    model.zero_grad()
    return stats


@pytest.mark.parametrize("case", ["norms", "conv_norms_eval", "batchnorm1d_eval", "batchnorm3d_eval"])
def test_one_sample_slices_match_torch_func(case, monkeypatch):
    torch.manual_seed(0)
    model, x, y = ZOO[case]()
    monkeypatch.setattr(norm, "_CHUNK_BYTES", 1)  # one sample per slice
    monkeypatch.setattr(norm, "_kernel_serves", lambda *args, **kwargs: False)  # not the C++ ops either
    stats = tracked_norms(model, x, y)
    per_sample, _, batch = reference_norms(model, sample_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


def test_batchnorm_in_training_mode_is_not_sliced(monkeypatch):
    """The chunked path normalises the whole batch at once, however small the slices may be, and
    gives the numbers of ``ops.channel_norm_grads`` (which takes this layer where it serves)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x, y = torch.randn(5, 2, 6, 6), torch.randn(5, 2)
    kernel = tracked_norms(model, x, y).per_layer["1"]
    monkeypatch.setattr(norm, "_kernel_serves", lambda *args, **kwargs: False)
    whole = tracked_norms(model, x, y).per_layer["1"]
    monkeypatch.setattr(norm, "_CHUNK_BYTES", 1)
    sliced = tracked_norms(model, x, y).per_layer["1"]
    assert rel_err(sliced, whole) <= 1e-6
    assert rel_err(kernel, whole) <= 1e-5
