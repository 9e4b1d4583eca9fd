"""Random models built from blocks of the layers divebatch has rules for, checked against
torch.func: an embedding, 1 to 4 blocks drawn from Linear (plain, reused, on flattened rows, with
an in-place op after), a GLU, LayerNorm (also on flattened rows), RMSNorm, GroupNorm, Conv1d (groups,
dilation), PReLU, Bilinear, eval-mode BatchNorm, MultiheadAttention, TransformerEncoderLayer, GRU,
a parameter of a block's own, and a centring over features; then a head. Sequence lengths include T
equal to the batch, where rows misread as samples would still pass the batch check. The second
backward (not verified) must give each sample's own norms, fused or with hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from .oracle import each_sample_backward, reference_norms, rel_err, second_backward_stats

D = 6
BATCH = 5


class Block(nn.Module):
    """``[B, T, D] -> [B, T, D]`` through one kind of layer (``KINDS``)."""

    def __init__(self, kind: str, groups: int, bias: bool):
        super().__init__()
        self.kind = kind
        if kind in ("linear", "linear reused", "linear on rows", "linear on rows, in place"):
            self.layer = nn.Linear(D, D, bias=bias)
        elif kind == "glu":
            self.layer, self.gate = nn.Linear(D, D), nn.Linear(D, 2 * D)
        elif kind in ("layer norm", "layer norm on rows"):
            self.layer = nn.LayerNorm(D, bias=bias)
        elif kind == "rms norm":
            self.layer = nn.RMSNorm(D)
        elif kind in ("conv", "dilated conv"):
            dilated = kind == "dilated conv"
            self.layer = nn.Conv1d(D, D, 3, padding=2 if dilated else 1, dilation=2 if dilated else 1, groups=groups)
        elif kind == "group norm":
            self.layer = nn.GroupNorm(3, D)
        elif kind == "attention":
            self.layer = nn.MultiheadAttention(D, 2, batch_first=True)
        elif kind == "prelu":
            self.layer = nn.PReLU(D)
        elif kind == "bilinear":
            self.layer = nn.Bilinear(D, D, D)
        elif kind == "batch norm, eval":
            self.layer = nn.BatchNorm1d(D).eval()
        elif kind == "encoder layer":
            self.layer = nn.TransformerEncoderLayer(D, 2, 12, dropout=0.0, batch_first=True)
        elif kind == "gru":
            self.layer = nn.GRU(D, D, batch_first=True)
        elif kind == "own parameter":
            self.gain = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, h):
        kind, (B, T, _) = self.kind, h.shape
        if kind == "linear":
            return h + torch.tanh(self.layer(h))
        if kind == "linear reused":
            return self.layer(torch.tanh(self.layer(h)))
        if kind == "linear on rows":
            return self.layer(h.reshape(-1, D)).view(B, T, D)
        if kind == "linear on rows, in place":
            rows = self.layer(h.reshape(B * T, D))
            rows.mul_(0.5)
            return rows.view(B, T, D) + h
        if kind == "glu":
            return self.layer(F.glu(self.gate(h)))
        if kind in ("layer norm", "rms norm"):
            return self.layer(h)
        if kind == "layer norm on rows":
            return self.layer(h.flatten(0, 1)).unflatten(0, (B, T))
        if kind in ("conv", "dilated conv", "group norm", "prelu", "batch norm, eval"):
            return self.layer(h.transpose(1, 2)).transpose(1, 2)[:, :T]
        if kind == "attention":
            return h + self.layer(h, h, h, need_weights=False)[0]
        if kind == "bilinear":
            return self.layer(h, torch.tanh(h))
        if kind == "encoder layer":
            return self.layer(h)
        if kind == "gru":
            return self.layer(h)[0]
        if kind == "own parameter":
            return h * self.gain
        return h - h.mean(-1, keepdim=True)  # "centred over features"


KINDS = ["linear", "linear reused", "linear on rows", "linear on rows, in place", "glu", "layer norm",
         "layer norm on rows", "rms norm", "conv", "dilated conv", "group norm", "attention", "prelu", "bilinear",
         "batch norm, eval", "encoder layer", "gru", "own parameter", "centred over features"]


class Model(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.embed = nn.Embedding(11, D)
        self.blocks = nn.ModuleList([Block(*block) for block in blocks])
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def each_sample(model, ids, y) -> torch.Tensor:
    """Per-sample squared norms by torch.func, or one backward per sample where it cannot run
    (a GRU's batched call under vmap)."""
    try:
        return reference_norms(model, loss, ids, y)[0]
    except RuntimeError:
        return each_sample_backward(model, loss, model, ids, y)


BLOCK = st.tuples(st.sampled_from(KINDS), st.sampled_from([1, 2, 3]), st.booleans())


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=40, deadline=None)
@given(st.lists(BLOCK, min_size=1, max_size=4), st.sampled_from([1, 4, BATCH]), st.booleans(), st.integers(0, 2**16))
def test_random_layer_compositions_match_each_samples_backward(blocks, tokens, fused, seed):
    torch.manual_seed(seed)
    model = Model(blocks)
    ids, y = torch.randint(0, 11, (BATCH, tokens)), torch.randint(0, 3, (BATCH,))
    stats = second_backward_stats(model, loss, model, ids, y, fused=fused)
    assert rel_err(stats.per_sample, each_sample(model, ids, y)) < 1e-4


#: Under CPU autocast: a Bilinear's own forward refuses a bfloat16 input with float32 weights.
AUTOCAST_BLOCK = st.tuples(st.sampled_from([kind for kind in KINDS if kind != "bilinear"]),
                           st.sampled_from([1, 2, 3]), st.booleans())


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(AUTOCAST_BLOCK, min_size=1, max_size=3), st.sampled_from([torch.bfloat16, torch.float16]),
       st.booleans(), st.integers(0, 2**16))
def test_random_layer_compositions_under_cpu_autocast(blocks, dtype, fused, seed):
    """The same under ``torch.autocast("cpu", dtype)``, against each sample's own backward through
    the same autocast forward (2e-2: both sides round to the low precision). It found
    ``nn.RMSNorm(eps=None)`` normalising with the input type's epsilon, and the attention's replay
    run outside autocast (a bfloat16 input met float32 weights)."""
    torch.manual_seed(seed)
    model = Model(blocks)
    ids, y = torch.randint(0, 11, (BATCH, 4)), torch.randint(0, 3, (BATCH,))

    def forward(inputs):
        with torch.autocast("cpu", dtype=dtype):
            return model(inputs).float()

    stats = second_backward_stats(model, loss, forward, ids, y, fused=fused)
    assert rel_err(stats.per_sample, each_sample_backward(model, loss, forward, ids, y)) < 2e-2
