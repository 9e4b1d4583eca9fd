"""The README's two training-loop examples, run as written on a small model: what a new user
copies must work and give the numbers the README says it gives."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .oracle import reference_norms, rel_err

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(heading: str) -> str:
    """The first ```python block under the README's ``## heading``."""
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python example under '## {heading}' in README.md"
    return blocks[0]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def _sample_loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")  # (each sample's own loss, unscaled)


def test_per_sample_norms_example():
    model = _model()
    batches = [(torch.randn(8, 3, 4), torch.randint(0, 5, (8,))) for _ in range(3)]
    # lr 0: the weights the last batch's norms were taken at are the weights after the loop.
    namespace = {"model": model, "loader": batches, "optimizer": torch.optim.SGD(model.parameters(), lr=0.0), "F": F}
    exec(compile(_example("Per-sample norms in your own training loop"), "README.md", "exec"), namespace)
    stats, (x, y) = namespace["stats"], batches[-1]
    per_sample, _, batch = reference_norms(model, _sample_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-4
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-4
    assert math.isclose(float(stats.diversity), float(per_sample.sum() / batch), rel_tol=1e-4)
    assert set(stats.per_layer) == {"1", "3"}
    assert rel_err(sum(stats.per_layer.values()), per_sample) <= 1e-4
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # closed


def test_divebatch_example():
    model = _model()
    x = torch.randn(128 * 20, 3, 4)
    ds = TensorDataset(x, (x.flatten(1) @ torch.randn(12, 5)).argmax(1))  # (labels it can learn: |G|^2 > 0)
    epochs = 2
    namespace = {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1), "ds": ds, "epochs": epochs,
                 "DataLoader": DataLoader, "torch": torch, "F": F}
    exec(compile(_example("DiveBatch in your own training loop"), "README.md", "exec"), namespace)
    policy = namespace["policy"]
    # One decision per epoch (resize_every=1), each from measured steps, growing at most 2x to 2048.
    assert [h["epoch"] for h in policy.history] == list(range(1, epochs + 1))  # (epochs completed)
    size = 128
    for decision in policy.history:
        assert decision["old_batch_size"] == size
        assert size <= decision["new_batch_size"] <= min(2 * size, 2048)
        assert math.isfinite(decision["n_delta"]) and decision["n_delta"] > 0
        size = decision["new_batch_size"]
    assert policy.batch_size == size
