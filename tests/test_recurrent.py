"""nn.LSTM / nn.GRU / nn.RNN (``divebatch/layers/recurrent.py``: the recurrence stepped by the
``recurrent_scan`` operators (padded steps of packed sequences masked, projections stepped too), as
the layer's fused forward or one batched replay, gives every step's gate gradients, then the linear
routes over time steps).
Reference: the definition (one backward per sample's loss
over one batched forward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from divebatch import GradNormTracker, reference
from divebatch.layers import RuleError

from .oracle import rel_err

RTOL = 1e-4


class Recurrent(nn.Module):
    def __init__(self, cls, batch_first, with_h0, **kwargs):
        super().__init__()
        self.rnn = cls(6, 8, num_layers=2, batch_first=batch_first, **kwargs)
        width = kwargs.get("proj_size") or 8
        self.head = nn.Linear(width * (2 if kwargs.get("bidirectional") else 1), 3)
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


def checked_route(model, x, fused: bool = True) -> str:
    """Track one backward, check the per-sample and batch norms against the definition and the
    parameters' gradients against autograd's without tracking, and return the route the recurrent
    layer ``model.rnn`` took."""
    expected, batch = brute_force(model, x)
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(per_sample_losses(model(x)).sum(), params)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        per_sample_losses(model(x)).sum().backward()
        stats = tracker.collect()
        routes = {p.module: p.route for p in tracker.plan()}
    assert rel_err(stats.per_sample, expected) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    for p, g in zip(params, plain):  # (the fused backward forms the weights' gradients itself)
        # float32 rounding of sums in another order: relative to the tensor's scale, not per entry
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6 * max(1.0, g.abs().max().item()))
    return routes["rnn"]


#: The route: the scans in place of the layer's forward (fused), or a replay through them after
#: the layer's own forward (hooks).
ROUTES = {True: "recurrent (fused scan)", False: "recurrent (batched replay)"}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_recurrent_layers_are_exact(cls, batch_first, with_h0, fused):
    torch.manual_seed(0)
    model = Recurrent(cls, batch_first, with_h0, bidirectional=cls is nn.GRU)
    assert checked_route(model, torch.randn(4, 5, 6), fused) == ROUTES[fused]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_the_reference_scans_are_exact_too(cls, fused, monkeypatch):
    """DIVEBATCH_BACKEND=reference (what runs on a device without a compiled scan) steps the
    recurrence in PyTorch ops, with the same results."""
    calls = []
    for name in ("recurrent_scan", "recurrent_scan_backward"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, original=original, name=name: calls.append(name) or original(*a))
    monkeypatch.setenv("DIVEBATCH_BACKEND", "reference")
    torch.manual_seed(0)
    model = Recurrent(cls, False, True, bidirectional=True)
    assert checked_route(model, torch.randn(4, 5, 6), fused) == ROUTES[fused]
    assert calls.count("recurrent_scan_backward") >= 4  # (2 layers x 2 directions; a replay per use)


class Packed(nn.Module):
    """Sequences of different lengths through ``pack_padded_sequence`` (unsorted lengths)."""

    def __init__(self, cls, batch_first, **kwargs):
        super().__init__()
        self.rnn = cls(6, 8, num_layers=2, batch_first=batch_first, **kwargs)
        width = kwargs.get("proj_size") or 8
        self.head = nn.Linear(width * (2 if kwargs.get("bidirectional") else 1), 3)
        self.batch_first, self.is_lstm = batch_first, cls is nn.LSTM

    def forward(self, x):  # x: [B, T, 6]; sample b has T - b % 3 steps
        lengths = torch.tensor([x.shape[1] - b % 3 for b in range(x.shape[0])])
        seq = x if self.batch_first else x.transpose(0, 1)
        packed = pack_padded_sequence(seq, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, hidden = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        h_n = hidden[0] if self.is_lstm else hidden
        return self.head(out).flatten(1).sum(1, keepdim=True) + h_n.sum(dim=(0, 2))[:, None]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_packed_sequences_are_exact(cls, batch_first, bidirectional, fused):
    """Fused: the scans run the padded batch with its padded steps masked and the output is packed
    as the input was; hooks: the layer's own forward, then the masked scans as the replay."""
    torch.manual_seed(0)
    model = Packed(cls, batch_first, bidirectional=bidirectional)
    assert checked_route(model, torch.randn(5, 6, 6), fused) == ROUTES[fused]


class SortedPacked(nn.Module):
    """``pack_sequence`` of sequences already sorted by length (no sorted_indices), with a given
    per-sample initial state."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: [B, T, 6]; sample b has T - b steps
        packed = nn.utils.rnn.pack_sequence([x[b, :x.shape[1] - b] for b in range(x.shape[0])])
        h0 = x[:, 0, :1].expand(-1, 8)[None].repeat(2, 1, 1)
        out, (h_n, _) = self.rnn(packed, (h0, torch.zeros_like(h0)))
        assert out.sorted_indices is None
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(out).flatten(1).sum(1, keepdim=True) + h_n.sum(dim=(0, 2))[:, None]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_sorted_packed_sequences_with_an_initial_state_are_exact(fused):
    torch.manual_seed(0)
    assert checked_route(SortedPacked(), torch.randn(4, 5, 6), fused) == ROUTES[fused]


class TwoCalls(nn.Module):
    """The same layer applied to two sequences (its per-sample gradients add up over the calls),
    without biases, with ReLU."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(6, 8, batch_first=True, bias=False, nonlinearity="relu")

    def forward(self, x):
        return (self.rnn(x)[0].sum(1) * self.rnn(x.flip(1) * 0.5)[1][0]).sum(1, keepdim=True)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_a_layer_called_twice_without_bias_is_exact(fused):
    torch.manual_seed(0)
    assert checked_route(TwoCalls(), torch.randn(4, 5, 6), fused) == ROUTES[fused]


class _OneNode(torch.autograd.Function):
    """Identity on (out, h_n, c_n) as one autograd node, as cuDNN's LSTM backward is on CUDA: the
    engine then calls the hook of an output the loss does not reach (c_n here) with None."""

    generate_vmap_rule = True  # (the batched replay runs the layer's forward under torch.func)

    @staticmethod
    def forward(*outputs):
        return tuple(t.clone() for t in outputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        return grads


class OneNodeLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        out, (h_n, c_n) = super().forward(x, hx)
        out, h_n, c_n = _OneNode.apply(out, h_n, c_n)
        return out, (h_n, c_n)


def test_outputs_of_one_node_that_the_loss_does_not_reach_are_exact():
    """An output whose gradient arrives as None (cuDNN's LSTM, c_n unused) counts as a zero gradient."""
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM, True, False)
    model.rnn = OneNodeLSTM(6, 8, num_layers=2, batch_first=True)
    # (a subclass with its own forward takes the generic route; the None reaches the tracker's hook all the same)
    assert checked_route(model, torch.randn(4, 5, 6), fused=False) == "generic (vmap vjp)"


@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
def test_lstm_projections_are_exact(bidirectional):
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM, True, False, proj_size=4, bidirectional=bidirectional)
    assert checked_route(model, torch.randn(3, 5, 6)) == ROUTES[True]
    assert checked_route(model, torch.randn(3, 5, 6), fused=False) == ROUTES[False]
    model = Packed(nn.LSTM, False, proj_size=4, bidirectional=bidirectional)
    assert checked_route(model, torch.randn(5, 6, 6)) == ROUTES[True]
    assert checked_route(model, torch.randn(5, 6, 6), fused=False) == ROUTES[False]


def test_an_unbatched_sequence_is_refused():
    model = nn.GRU(6, 8)
    with GradNormTracker(model, "sum"):
        with pytest.raises(ValueError, match="unbatched input"):
            model(torch.randn(5, 6))


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


def test_second_order_gradients_through_a_fused_layer_are_refused_and_exact_unfused():
    """``create_graph=True`` (a gradient penalty): the fused backward's graph has no weights, so it
    refuses, saying to use ``fused=False``, whose replay leaves the layer's own backward alone."""
    torch.manual_seed(0)
    model, plain = nn.GRU(6, 8, batch_first=True), nn.GRU(6, 8, batch_first=True)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 6)

    def penalty(m):
        grads = torch.autograd.grad(m(x)[0].square().sum(), list(m.parameters()), create_graph=True)
        return sum(g.square().sum() for g in grads)

    with GradNormTracker(model, "sum"):
        with pytest.raises(RuntimeError, match="create_graph=True.*fused=False"):
            penalty(model)
    penalty(plain).backward()
    with GradNormTracker(model, "sum", fused=False):
        penalty(model).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
