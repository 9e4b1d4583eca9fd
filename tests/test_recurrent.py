"""nn.LSTM / nn.GRU / nn.RNN on the generic route: hidden states keep samples in dim 1, and GRU's
and RNN's backward has no batching rule, so their per-sample gradients are taken one sample at
a time. Reference: the definition (one backward per sample's loss over one batched forward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers import RuleError

from .oracle import rel_err

RTOL = 1e-4


class Recurrent(nn.Module):
    def __init__(self, cls, batch_first, with_h0, **kwargs):
        super().__init__()
        self.rnn = cls(6, 8, num_layers=2, batch_first=batch_first, **kwargs)
        self.head = nn.Linear(8 * (2 if kwargs.get("bidirectional") else 1), 3)
        self.batch_first, self.with_h0, self.is_lstm = batch_first, with_h0, cls is nn.LSTM

    def forward(self, x):  # x: [B, T, 6]
        seq = x if self.batch_first else x.transpose(0, 1)
        args = ()
        if self.with_h0:  # a per-sample initial state from the input itself: [layers*dirs, B, 8]
            h0 = x[:, :1, :].repeat(1, 1, 2)[..., :8].transpose(0, 1).repeat(self.rnn.num_layers *
                                                                               (2 if self.rnn.bidirectional else 1), 1, 1)
            args = ((h0, torch.zeros_like(h0)),) if self.is_lstm else (h0,)
        out, hidden = self.rnn(seq, *args)
        if not self.batch_first:
            out = out.transpose(0, 1)
        h_n = hidden[0] if self.is_lstm else hidden
        return self.head(out).flatten(1).sum(1, keepdim=True) + h_n.sum(dim=(0, 2))[:, None]


def per_sample_losses(out):
    return out.square().flatten(1).sum(1)


def brute_force(model, x):
    losses = per_sample_losses(model(x))
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [sum(g.double().square().sum() for g in torch.autograd.grad(losses[b], params, retain_graph=True))
            for b in range(x.shape[0])]
    total = torch.autograd.grad(losses.sum(), params)
    return torch.stack(rows), sum(g.double().square().sum() for g in total)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_recurrent_layers_are_exact(cls, batch_first, with_h0):
    torch.manual_seed(0)
    model = Recurrent(cls, batch_first, with_h0, bidirectional=cls is nn.GRU)
    x = torch.randn(4, 5, 6)
    expected, batch = brute_force(model, x)
    with GradNormTracker(model, "sum") as tracker:
        per_sample_losses(model(x)).sum().backward()
        stats = tracker.collect()
    assert rel_err(stats.per_sample, expected) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_dropout_between_recurrent_layers_is_refused(cls):
    torch.manual_seed(0)
    model = Recurrent(cls, True, False, dropout=0.5).train()
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(RuleError, match="random numbers"):
            # Raised in the backward, or at collect() when the call completes at the backward's end
            # (an unused output: LSTM's c_n).
            per_sample_losses(model(torch.randn(3, 4, 6))).sum().backward()
            tracker.collect()
