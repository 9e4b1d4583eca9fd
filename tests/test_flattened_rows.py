"""Samples and tokens flattened into a layer's rows (``[B*T, d]``): which rows belong to which
sample is read from the autograd graph (``divebatch/layers/rows.py``); the per-sample norms are
checked against torch.func, and every graph the proof cannot follow is refused, never guessed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers.rows import flattened_samples

from .models_zoo import FlattenedTokensBlock, sample_loss
from .oracle import reference_norms, rel_err, tracked_and_checked

RTOL = 1e-4


# --------------------------------------------------------------------------- the proof on graphs
def _h(*shape):
    return torch.randn(*shape, requires_grad=True) * 1.0  # a non-leaf, as a layer's output is


PROVEN = {
    "reshape": (lambda h, w: h.reshape(-1, 5), (3, 4)),
    "view": (lambda h, w: h.view(12, 5), (3, 4)),
    "flatten": (lambda h, w: h.flatten(0, 1), (3, 4)),
    "activation": (lambda h, w: torch.nn.functional.gelu(h.reshape(-1, 5)), (3, 4)),
    "dropout": (lambda h, w: torch.nn.functional.dropout(h.reshape(-1, 5), 0.5, True), (3, 4)),
    "cast": (lambda h, w: h.reshape(-1, 5).to(torch.float64), (3, 4)),
    "broadcast parameter": (lambda h, w: h.reshape(-1, 5) * w + 1.0, (3, 4)),
    "same rows twice": (lambda h, w: h.reshape(-1, 5) + h.reshape(-1, 5).relu(), (3, 4)),
    "layer norm": (lambda h, w: torch.nn.functional.layer_norm(h.reshape(-1, 5), (5,), w), (3, 4)),
    "inner dims swapped": (lambda h, w: h.transpose(1, 2).reshape(-1, 4), (3, 5)),
    "viewed again as rows": (lambda h, w: h.view(12, 5).view(12, 5).reshape(-1, 5) * 2.0, (3, 4)),
    "a per-row reduction in between": (lambda h, w: h.reshape(-1, 5) * h.reshape(-1, 5).sum(-1, keepdim=True),
                                       (3, 4)),
    "a per-row norm (F.normalize)": (lambda h, w: torch.nn.functional.normalize(h.reshape(-1, 5), dim=-1), (3, 4)),
    "negative dims": (lambda h, w: h.transpose(-2, -1).transpose(-1, -2).reshape(-1, 5), (3, 4)),
    "rotated halves (RoFormer: a stack of slices)": (lambda h, w: _rotated(h.reshape(-1, 5)[..., :4]), (3, 4)),
    "stacked along another dim": (lambda h, w: torch.stack([h.reshape(-1, 5), -h.reshape(-1, 5)], 1).reshape(-1, 5),
                                  (3, 8)),
    "shifted windows (MobileBERT: pads and a cat along another dim)": (lambda h, w: _trigram(h.reshape(-1, 5, 1)),
                                                                       (3, 4)),
    "gathered along another dim (DeBERTa's relative positions)": (
        lambda h, w: torch.gather(h.reshape(-1, 5), 1, torch.randint(0, 5, (12, 3))), (3, 4)),
    "a constant mask filled in": (lambda h, w: h.reshape(-1, 5).masked_fill(torch.rand(12, 5) > 0.5, -1.0), (3, 4)),
    "F.linear with parameters, its bias concatenated with a constant (timm's SwinV2 qkv)": (
        lambda h, w: torch.nn.functional.linear(h.reshape(-1, 5), nn.Parameter(torch.randn(10, 5)),
                                                torch.cat([w, torch.zeros(5)])), (3, 4)),
    "a matmul with a parameter": (lambda h, w: h.reshape(-1, 5) @ nn.Parameter(torch.randn(5, 2)), (3, 4)),
    "a batch norm in eval mode": (lambda h, w: torch.nn.functional.batch_norm(
        h.reshape(-1, 5), torch.zeros(5), torch.ones(5), w, None, training=False), (3, 4)),
    "merged after a batch norm in training mode (the merge's assumption)": (
        lambda h, w: torch.nn.functional.batch_norm(h, None, None, training=True).reshape(-1, 5), (3, 4)),
    "split along another dim (LeViT's keys and values)": (lambda h, w: h.reshape(-1, 5).split([2, 3], dim=1)[1],
                                                          (3, 4)),
}
REFUSED = {
    "positions first (transpose)": lambda h, w: h.transpose(0, 1).reshape(-1, 5),
    "positions first (contiguous)": lambda h, w: h.transpose(0, 1).contiguous().view(-1, 5),
    "positions first (permute)": lambda h, w: h.permute(1, 0, 2).reshape(-1, 5),
    "two row orders mixed": lambda h, w: h.reshape(-1, 5) + h.transpose(0, 1).reshape(-1, 5),
    "rows reversed": lambda h, w: h.reshape(-1, 5).flip(0),
    "rows gathered": lambda h, w: h.reshape(-1, 5)[torch.tensor([0, 2, 5])],
    "rows mixed by a matmul": lambda h, w: torch.ones(12, 12) @ h.reshape(-1, 5),
    "a reduction over the rows, kept": lambda h, w: h.reshape(-1, 5) * h.reshape(-1, 5).sum(0, keepdim=True),
    "a statistic over all rows": lambda h, w: h.reshape(-1, 5) - h.reshape(-1, 5).mean(0),
    "an input that requires grad, broadcast": lambda h, w: h.reshape(-1, 5) * h.detach()[0, 0].requires_grad_(),
    "no positions (T = 1)": lambda h, w: h[:, :1].reshape(-1, 5),
    "no graph": lambda h, w: h.detach().reshape(-1, 5),
    "rows sliced": lambda h, w: h.reshape(-1, 5)[2:],
    "stacked along the rows": lambda h, w: torch.stack([h.reshape(-1, 5), h.reshape(-1, 5)], 0).reshape(-1, 5),
    "rows joined": lambda h, w: torch.cat([h.reshape(-1, 5)[:6], h.reshape(-1, 5)[6:]], 0),
    "rows padded": lambda h, w: torch.nn.functional.pad(h.reshape(-1, 5), (0, 0, 1, 0))[1:],
    "gathered along the rows": lambda h, w: torch.gather(h.reshape(-1, 5), 0, torch.randint(0, 12, (12, 5))),
    "F.linear with a bias made of the rows": lambda h, w: torch.nn.functional.linear(
        h.reshape(-1, 5), nn.Parameter(torch.randn(5, 5)), h.reshape(-1, 5).mean(0)),
    "a matmul with a matrix made of the rows": lambda h, w: h.reshape(-1, 5) @ h.reshape(-1, 5)[:5],
    "a batch norm in training mode": lambda h, w: torch.nn.functional.batch_norm(
        h.reshape(-1, 5), None, None, w, None, training=True),
    "split along the rows": lambda h, w: h.reshape(-1, 5).split([4, 8], dim=0)[1],
}


def _trigram(x):
    """MobileBERT's embedding windows: each token beside its right and left neighbours, zero-padded."""
    pad = torch.nn.functional.pad
    return torch.cat([pad(x[:, 1:], [0, 0, 0, 1]), x, pad(x[:, :-1], [0, 0, 1, 0])], dim=2)


def _rotated(x):
    """RoFormer's ``rotate_half``: ``[-x1, x0, -x3, x2, ...]``."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape_as(x)


@pytest.mark.parametrize("name", sorted(PROVEN))
def test_merged_rows_are_proven(name):
    make, lead = PROVEN[name]
    assert flattened_samples(make(_h(3, 4, 5), nn.Parameter(torch.randn(5)))) == lead


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_rows_of_unknown_order_are_not_assigned(name):
    assert flattened_samples(REFUSED[name](_h(3, 4, 5), nn.Parameter(torch.randn(5)))) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.integers(1, 3), st.integers(1, 3))
def test_any_merge_of_leading_dims(lead, n_merged, width):
    """Merging the first ``k`` dims of ``[*lead, width]`` gives ``(B, T)``: the samples and the rows
    of each (when T > 1)."""
    k = min(n_merged + 1, len(lead))
    h = _h(*lead, width)
    rows = h.reshape(-1, *h.shape[k:])
    T = torch.Size(lead[1:k]).numel()
    expected = (lead[0], T) if len(lead[:k]) >= 2 and T > 1 else None
    assert flattened_samples(rows) == expected


_ROW_WISE_STEPS = {
    "relu": lambda r, w: torch.relu(r),
    "gelu": lambda r, w: torch.nn.functional.gelu(r),
    "dropout": lambda r, w: torch.nn.functional.dropout(r, 0.3, True),
    "scale": lambda r, w: r * 0.5,
    "parameter": lambda r, w: r * w + w,
    "residual": lambda r, w: r + torch.tanh(r),
    "layer norm": lambda r, w: torch.nn.functional.layer_norm(r, (r.shape[-1],)),
    "cast": lambda r, w: r.double().float(),
}
_ROW_MIXING_STEPS = {
    "flip": lambda r, w: r.flip(0),
    "roll": lambda r, w: r.roll(1, 0),
    "gather": lambda r, w: r[torch.arange(r.shape[0] - 1, -1, -1)],
    "centre": lambda r, w: r - r.mean(0),
}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from(["reshape", "view", "flatten", "positions first"]),
       st.lists(st.sampled_from(sorted(_ROW_WISE_STEPS)), max_size=4),
       st.one_of(st.none(), st.tuples(st.sampled_from(sorted(_ROW_MIXING_STEPS)), st.integers(0, 4))))
def test_random_row_graphs(B, T, merge, steps, mixing):
    """Random chains of row-wise ops after a merge of [B, T, d]: the rows are assigned to (B, T)
    exactly when the merge is sample-major (and T > 1) and no op moved rows; never otherwise,
    whatever B and T are (B == T included)."""
    h, w = _h(B, T, 5), nn.Parameter(torch.randn(5))
    rows = {"reshape": lambda: h.reshape(-1, 5), "view": lambda: h.view(B * T, 5), "flatten": lambda: h.flatten(0, 1),
            "positions first": lambda: h.transpose(0, 1).reshape(-1, 5)}[merge]()
    for i, name in enumerate(steps + [None]):
        if mixing is not None and min(mixing[1], len(steps)) == i:
            rows = _ROW_MIXING_STEPS[mixing[0]](rows, w)
        if name is not None:
            rows = _ROW_WISE_STEPS[name](rows, w)
    expected = (B, T) if merge != "positions first" and mixing is None and T > 1 else None
    assert flattened_samples(rows) == expected


# --------------------------------------------------------------------------- whole models
class _ThreeLinears(nn.Module):
    def __init__(self, middle=None):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 6), nn.Linear(6, 2)
        self.fc = middle if middle is not None else nn.Linear(6, 6)


class SeqFirstRows(_ThreeLinears):
    """Rows merged positions-first (``[T, B, d]`` order): not sample-major, must be refused."""

    def forward(self, x):
        h = self.inp(x)
        B, T, d = h.shape
        rows = self.fc(h.transpose(0, 1).reshape(-1, d))
        return self.out(rows.view(T, B, d).transpose(0, 1))


class InPlaceResidual(_ThreeLinears):
    """The flat output of a tracked Linear modified in place, then restored to [B, T, d]."""

    def forward(self, x):
        h = self.inp(x)
        rows = h.reshape(-1, h.shape[-1])
        y = self.fc(torch.tanh(rows))
        y += rows
        return self.out(y.view(h.shape))


class ImageRows(nn.Module):
    """A channels-last image flattened to rows over (B, H, W) before a LayerNorm + Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, 6, 3), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1)
        return self.fc(self.norm(h.reshape(-1, 6))).view(*h.shape[:3], 2)


class PointRows(nn.Module):
    """PointNet's and LeViT's layout: a BatchNorm1d on the points' (tokens') rows flattened to
    ``[B*N, C]`` (or ``[B*N, C, 1]``)."""

    def __init__(self, length_one=False):
        super().__init__()
        self.length_one = length_one
        self.inp, self.bn, self.out = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):  # [B, N, 3]
        h = self.inp(x)
        if self.length_one:
            normed = self.bn(h.reshape(-1, 6, 1))[..., 0]  # (a [B*N, C, 1] output, or an error)
        else:
            normed = self.bn(h.reshape(-1, 6))
        return self.out(torch.relu(normed).view(*h.shape[:2], 6))


class FrameRows(nn.Module):
    """A video's frames folded into the batch (``[B*T, C, H, W]``) before a BatchNorm2d."""

    def __init__(self):
        super().__init__()
        self.embed, self.bn, self.fc = nn.Linear(3, 4), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):  # [B, T, H, W, 3]
        B, T, H, W, _ = x.shape
        frames = self.embed(x).permute(0, 1, 4, 2, 3).reshape(B * T, 4, H, W)
        return self.fc(torch.tanh(self.bn(frames)).mean((2, 3)).view(B, T, 4))


def _eval_batch_norms(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.eval()
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("make, shape, bitwise", [
    (InPlaceResidual, (3, 5, 4), True), (ImageRows, (2, 3, 6, 7), True),
    (lambda: nn.Sequential(nn.Linear(4, 4), FlattenedTokensBlock(4, 8)), (3, 5, 4), True),
    # (a batch norm regrouped to [B, C, T] computes each element as before, to rounding)
    (lambda: _eval_batch_norms(PointRows()), (3, 5, 3), False), (lambda: _eval_batch_norms(FrameRows()), (3, 2, 4, 5, 3), False)],
                         ids=["in-place residual", "image rows", "pre-norm block", "point rows, batch norm",
                              "frame rows, batch norm"])
def test_flattened_models_match_torch_func(make, shape, bitwise, fused):
    """(The rows are followed from a view in the graph: a model whose input is flattened before any
    layer has no graph there, and its layers all see B*T samples.)"""
    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    with torch.no_grad():
        untracked = model(x)
    y = torch.randn_like(untracked)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        out = model(x)
        assert out.shape == untracked.shape  # same shape, same numbers
        assert torch.equal(out, untracked) if bitwise else torch.allclose(out, untracked, rtol=0, atol=1e-6)
        sample_loss(out, y).backward()
        stats = tracker.collect()
    per_sample, _, batch = reference_norms(model, sample_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


@pytest.mark.parametrize("make, shape", [(PointRows, (3, 5, 3)), (lambda: PointRows(length_one=True), (3, 5, 3)),
                                         (FrameRows, (3, 2, 4, 5, 3))], ids=["points", "points of length 1", "frames"])
def test_batch_norm_on_flattened_rows_in_training_mode_decomposes_per_sample(make, shape):
    """In training mode the statistics are over the same elements whichever way the rows are
    grouped, so the output and the running statistics are those of the untracked module, and the
    per-sample shares (each sample's rows together) add up to the batch gradient."""
    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    plain = make()
    plain.load_state_dict(model.state_dict())
    y = torch.randn(*shape[:2], 2)
    with GradNormTracker(model, "sum") as tracker:
        out = model(x)
        sample_loss(out, y).backward()
        stats = tracker.collect()
        routes = {p.module: (p.route, p.shape) for p in tracker.plan()}
    assert torch.allclose(out, plain(x), atol=1e-6)
    assert torch.allclose(model.bn.running_var, plain.bn.running_var, atol=1e-6)
    assert stats.per_sample.shape == (shape[0],) and max(stats.unaccounted.values()) <= 1e-5
    batch = sum(p.grad.double().square().sum() for p in model.parameters())
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert routes["bn"][0] == "instantiate"


@pytest.mark.parametrize("shape", [(3, 5, 4), (4, 4, 4)], ids=["T!=B", "T==B"])
def test_positions_first_rows_are_read_from_the_graph(shape):
    """Rows merged positions-first (``h.transpose(0, 1).reshape(-1, d)``: row ``r`` is sample
    ``r % B``): the graph proves each row's sample back to the earlier layer's output, and the
    layer runs on them viewed ``[B, T, d]``: exact. (Before 2026-12-06's second session the merge's
    first dim was taken for the samples: refused where T != B, and where T == B, where only the
    graph tells, refused by the batch check of the sixteen rows.)"""
    tracked_and_checked(SeqFirstRows(), sample_loss, torch.randn(*shape), torch.zeros(*shape[:2], 2))


def test_rows_in_an_order_the_graph_does_not_prove_are_refused_with_a_hint():
    """Rows merged in an order that is neither sample-major nor positions-first (here, reversed):
    refused with a hint, never guessed."""

    class ReversedRows(_ThreeLinears):
        def forward(self, x):
            h = self.inp(x)
            B, T, d = h.shape
            rows = self.fc(h.reshape(-1, d).flip(0))
            return self.out(rows.flip(0).view(B, T, d))

    model = ReversedRows()
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(ValueError, match=r"'fc' \(Linear\) saw a batch of 15 .* 15 = 3 x 5: were samples and "
                                             r"tokens flattened"):
            sample_loss(model(torch.randn(3, 5, 4)), torch.zeros(3, 5, 2)).backward()
            tracker.collect()


def test_a_statistic_of_rows_computed_from_data_is_not_taken_for_a_constant():
    """A layer's output on data that needs no gradient shows only the layer's parameters in its
    graph: ``rows.mean(0)`` of it must still count as made of the rows (it mixes the samples)."""
    layer = nn.Linear(4, 5)
    rows = layer(torch.randn(3, 4, 4)).reshape(-1, 5)
    assert flattened_samples(rows * 2.0) == (3, 4)
    assert flattened_samples(rows - rows.mean(0)) is None
    assert flattened_samples(rows - layer(torch.randn(1, 4))) is None  # data of its own, from the same layer
    assert flattened_samples(rows * (1.0 + layer.bias)) == (3, 4)


# --------------------------------------------------------------------------- generic modules on rows
class TinyExperts(nn.Module):
    """A mixture-of-experts layer as transformers 5 writes them: 3-D expert weights, rows gathered
    per expert and added back with ``index_add_``. With ``unread`` its products are ones the
    recorder does not read (``layers/experts.py``), so it is replayed one sample at a time."""

    def __init__(self, dim, hidden, n_experts, unread=False):
        super().__init__()
        self.up = nn.Parameter(torch.randn(n_experts, hidden, dim) / dim**0.5)
        self.down = nn.Parameter(torch.randn(n_experts, dim, hidden) / hidden**0.5)
        self.linear = (lambda x, w: torch.tensordot(x, w, dims=([1], [1]))) if unread else torch.nn.functional.linear

    def forward(self, rows, top_index, top_weight):
        out = torch.zeros_like(rows)
        for e in range(self.up.shape[0]):
            token, slot = torch.where(top_index == e)
            if token.numel() == 0:
                continue
            h = torch.relu(self.linear(rows[token], self.up[e]))
            h = self.linear(h, self.down[e]) * top_weight[token, slot, None]
            out.index_add_(0, token, h)
        return out


class TinyRouter(nn.Module):
    """A router returning its logits *and* the top-k scores computed from them (as Mixtral's)."""

    def __init__(self, dim, n_experts, k):
        super().__init__()
        self.weight, self.k = nn.Parameter(torch.randn(n_experts, dim)), k

    def forward(self, rows):
        logits = torch.nn.functional.linear(rows, self.weight)
        scores, index = torch.softmax(logits, dim=-1).topk(self.k, dim=-1)
        return logits, scores / scores.sum(-1, keepdim=True), index


class TinyMoE(nn.Module):
    def __init__(self, dim=6, hidden=8, n_experts=3, k=2, aux=0.0, unread=False):
        super().__init__()
        self.inp, self.out, self.aux = nn.Linear(4, dim), nn.Linear(dim, 2), aux
        self.router, self.experts = TinyRouter(dim, n_experts, k), TinyExperts(dim, hidden, n_experts, unread)

    def forward(self, x):
        h = self.inp(x)
        rows = h.view(-1, h.shape[-1])
        logits, scores, index = self.router(rows)
        y = self.experts(rows, index, scores).view(h.shape) + h
        return self.out(y) + self.aux * logits.square().sum(-1, keepdim=True).view(*h.shape[:2], 1)


class RowMixer(nn.Module):
    """A module with its own parameter that mixes the rows of different samples (centres over all
    rows): per-sample replays on each sample's rows cannot add up to its gradient."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim, dim))

    def forward(self, rows):
        return (rows - rows.mean(0)) @ self.scale


@pytest.mark.parametrize("unread", [False, True], ids=["products read", "replayed"])
@pytest.mark.parametrize("aux", [0.0, 0.1], ids=["scores only", "logits used too"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_mixture_of_experts_on_rows_matches_torch_func(fused, aux, unread):
    """Router and experts (generic route) take [B*T, d] rows: their products with their own
    weights are read per (expert, sample) group, or, for products the recorder does not know,
    each sample is replayed on its own rows. With ``aux`` the router's logits are used outside it
    as well as inside (the scores are computed from them): only the outside use may reach the
    logits' gradient."""
    torch.manual_seed(0)
    model = TinyMoE(aux=aux, unread=unread)
    routes = tracked_and_checked(model, sample_loss, torch.randn(3, 5, 4), torch.randn(3, 5, 2), fused)
    assert routes["router"] == "generic (row uses)"
    assert routes["experts"] == ("generic (vmap vjp)" if unread else "generic (row uses)")


def test_a_module_mixing_the_rows_of_samples_is_refused():
    """Its replay on each sample's rows gives other outputs than the batch's forward (refused in
    the backward; the accounting check refused it at ``collect()`` before)."""
    class Net(_ThreeLinears):
        def forward(self, x):
            h = self.inp(x)
            return self.out(self.fc(h.view(-1, 6)).view(h.shape))

    model, x = Net(RowMixer(6)), torch.randn(3, 5, 4)
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(RuntimeError, match=r"RowMixer's forward, replayed on one sample .*couples the samples"):
            sample_loss(model(x), torch.zeros(3, 5, 2)).backward()
            tracker.collect()


def test_generic_replays_hold_one_chunk_of_per_sample_gradients(monkeypatch):
    """With the memory bound below one sample's gradients, the generic route works one sample at a
    time (router, experts): the same numbers, and never more than one sample's gradients at once."""
    from divebatch.layers import generic

    seen = []
    replay = generic.GenericRule._per_sample_grads

    def counting(self, module, call, grads, params, buffers, bdim, samples=None):
        out = replay(self, module, call, grads, params, buffers, bdim, samples)
        seen.append(max(t.shape[0] for t in out.values()))
        return out

    monkeypatch.setattr(generic, "MAX_EXTRA_BYTES", 1)
    monkeypatch.setattr(generic, "max_extra_bytes", lambda device_type: 1)
    monkeypatch.setattr(generic.GenericRule, "_per_sample_grads", counting)
    torch.manual_seed(0)
    tracked_and_checked(TinyMoE(aux=0.1, unread=True), sample_loss, torch.randn(3, 5, 4), torch.randn(3, 5, 2),
                        fused=True)
    assert seen and max(seen) == 1


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_flattened_block(reentrant):
    """Activation checkpointing recomputes the block's forward in the backward pass: the rows are
    proven again there (the first, no-grad pass of the reentrant variant captures nothing)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.block, self.out = nn.Linear(4, 6), FlattenedTokensBlock(6, 10), nn.Linear(6, 2)
            self.checkpointed = True

        def forward(self, x):
            h = self.inp(x)
            return self.out(checkpoint(self.block, h, use_reentrant=reentrant) if self.checkpointed else self.block(h))

    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    with GradNormTracker(model, "sum") as tracker:
        sample_loss(model(x), y).backward()
        stats = tracker.collect()
    model.checkpointed = False  # torch.func cannot differentiate through checkpoint's saved-tensor hooks
    per_sample, _, batch = reference_norms(model, sample_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= RTOL and rel_err(stats.batch_grad_sq, batch) <= RTOL


# --------------------------------------------------------------------------- rows of samples in any order
# (their own generator: the values must not depend on which test modules were imported first)
_W = nn.Parameter(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))
_WS = nn.Parameter(torch.randn(5, 2, generator=torch.Generator().manual_seed(2)))


def _per_row_scores(r):
    """Llama 4's experts input: every row once per expert, scaled by its score for that expert."""
    scores = torch.sigmoid(r @ _WS)  # [N, 2]
    return r.repeat(2, 1) * scores.t().reshape(-1, 1)


def _top_k_kept(r):
    values, index = torch.topk(r, 2, dim=1)
    return torch.full_like(r, 0.0).scatter(1, index, values) + r


#: Ops that keep every row one sample's (moving, repeating or slicing rows): row_samples follows them.
_ROW_ORDER_STEPS = {
    "repeat": lambda r: r.repeat(2, 1),
    "per-row scores (Llama 4)": _per_row_scores,
    "interleave": lambda r: r.reshape(2, -1, 5).transpose(0, 1).reshape(-1, 5) if r.shape[0] % 2 == 0 else r,
    "top-k scatter": _top_k_kept,
    "gather rows": lambda r: r[torch.arange(r.shape[0]).flip(0).repeat(2)],
    "index_select": lambda r: r.index_select(0, (torch.arange(r.shape[0]) * 3) % r.shape[0]),
    "cat rows": lambda r: torch.cat([r, r[:1] * 2.0]),
    "split rows by sizes": lambda r: torch.cat(r.split([1, r.shape[0] - 1])[::-1]) if r.shape[0] > 1 else r,
    "slice rows": lambda r: r[1::2] if r.shape[0] > 1 else r,
    "expand a column": lambda r: r[:, :1].expand(-1, 5) * r,
    "unsqueeze": lambda r: (r.unsqueeze(1) * 2.0).reshape(r.shape),
    "softmax": lambda r: r.softmax(-1),
    # (softsign, not tanh: tanh's float32 derivative is exactly 0 past |x| ~ 9, which made a row of
    # values +-1 look as if it depended on no sample)
    "product with a parameter": lambda r: nn.functional.softsign(r @ _W),
    "layer norm": lambda r: torch.nn.functional.layer_norm(r, (5,)),
    "cast": lambda r: r.double().float(),
}
#: Ops that mix samples within a row (or might): row_samples must not name a single sample.
_SAMPLE_MIXING_STEPS = {
    "flip": lambda r: r.flip(0),
    "centre": lambda r: r - r.mean(0),
    "cumsum over rows": lambda r: r.cumsum(0),
    "softmax over rows": lambda r: r.softmax(0),
    "top-k over rows": lambda r: r + torch.topk(r, 1, dim=0).values,
    "rows times their Gram": lambda r: (r @ r.t()) @ r,
    "blocks summed": lambda r: r + r.reshape(-1, 1).roll(3, 0).reshape(r.shape),
}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4),
       st.lists(st.sampled_from(sorted(_ROW_ORDER_STEPS)), max_size=4),
       st.one_of(st.none(), st.tuples(st.sampled_from(sorted(_SAMPLE_MIXING_STEPS)), st.integers(0, 4))))
def test_row_samples_agree_with_the_jacobian(B, T, steps, mixing):
    """Random chains of row-moving ops after a sample-major merge: every row's sample from
    ``row_samples`` is the only sample its values depend on (Jacobian); with no sample-mixing op in
    the chain an answer must be given."""
    from divebatch.layers.rows import row_samples

    torch.manual_seed(0)
    h = torch.randn(B, T, 5, requires_grad=True)
    rows = (h * 1.0).reshape(-1, 5)
    for i, name in enumerate(steps + [None]):
        if mixing is not None and min(mixing[1], len(steps)) == i:
            rows = _SAMPLE_MIXING_STEPS[mixing[0]](rows)
        if name is not None:
            rows = _ROW_ORDER_STEPS[name](rows)
    found = row_samples(rows)
    if mixing is None and T > 1:  # (T = 1: no merge of positions, as for flattened_samples)
        assert found is not None, steps
    if found is None:
        return
    batch, samples = found
    assert batch == B and samples.shape == (rows.shape[0],)
    for r in range(rows.shape[0]):
        probe = torch.randn(rows.shape[1])  # (not a plain sum: a softmax row sums to 1)
        (g,) = torch.autograd.grad((rows[r] * probe).sum(), h, retain_graph=True)
        depends = set(g.abs().flatten(1).sum(1).nonzero().flatten().tolist())
        assert depends <= {int(samples[r])}, (steps, mixing, r, depends, int(samples[r]))
        if mixing is None and bool(rows[r].detach().abs().max() > 0):
            # (every op here is smooth: no dead rows, except one whose values underflowed to exactly
            # zero, e.g. a sigmoid score of a large negative logit in "per-row scores")
            assert depends == {int(samples[r])}, (steps, r)
