"""Models that take sequences first (``[T, B, ...]``, ``nn.Transformer``'s and the RNNs' default
layout), tracked with ``GradNormTracker(model, batch_first=False)``: exact against torch.func
per-sample gradients over dim 1, also where T == B (which no batch-size check can tell apart);
what the tracker cannot place is refused with an error that says what to do."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers.rows import samples_dim

from .oracle import each_sample_backward, reference_norms, rel_err, second_backward_stats

RTOL = 1e-5
VOCAB = 11


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch_first=False) on ``[T, B, d]``, mean-pooled into a head."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(0))


class ReusedLinear(nn.Module):
    """One Linear called twice on ``[T, B, d]`` (its calls combined before squaring: the fused
    backward then leaves the weight gradient to the plain product, on time-major rows)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.mix(torch.tanh(self.mix(x))).mean(0))


class RecurrentLM(nn.Module):
    """PyTorch's word_language_model layout: ``[T, B]`` ids, a sequence-first LSTM, a decoder whose
    ``[T, B, V]`` output is viewed ``[T*B, V]`` (so the tracked output must stay contiguous)."""

    def __init__(self, tied=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 8)
        self.norm = nn.LayerNorm(8)
        self.decoder = nn.Linear(8, VOCAB)
        if tied:
            self.decoder.weight = self.embed.weight

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.decoder(self.norm(out)).view(-1, VOCAB)


class FlattenedDecoder(nn.Module):
    """The word-language-model example's older decoder call: the LSTM's ``[T, B, H]`` output through
    dropout, merged into ``[T*B, H]`` rows, then a LayerNorm and the decoder on those time-major rows."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 8)
        self.drop = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(8)
        self.decoder = nn.Linear(8, VOCAB)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        out = self.drop(out)
        return self.decoder(torch.relu(self.norm(out.view(out.shape[0] * out.shape[1], out.shape[2]))))


class TransformerLM(nn.Module):
    """``nn.Transformer`` (encoder and decoder, causal mask) on embedded ``[T, B]`` ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        src = self.embed(ids)
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[0])
        return self.head(self.transformer(src, src, tgt_mask=mask))


class ConvFrontEnd(nn.Module):
    """A ``[B, C, L]`` convolution (samples in dim 0, as always) feeding a sequence-first encoder."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x):
        return self.head(self.layer(self.conv(x).permute(2, 0, 1)))


class LearnedPositions(nn.Module):
    """A parameter added to ``[T, B, d]`` (generic route): its layout is declared by ``batch_first``."""

    def __init__(self, length, batch_first=None):
        super().__init__()
        self.table = nn.Parameter(torch.randn(length, 1, 8))
        if batch_first is not None:
            self.batch_first = batch_first

    def forward(self, x):
        return x + self.table[: x.shape[0]]


class PositionedLM(nn.Module):
    def __init__(self, length, batch_first=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.positions = LearnedPositions(length, batch_first)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.positions(self.embed(ids))))


def class_loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def token_loss(out, y):
    """``out``: ``[T, B, V]`` or ``[T*B, V]`` (time-major rows); ``y``: ``[B, T]`` targets."""
    return F.cross_entropy(out.reshape(-1, VOCAB), y.transpose(0, 1).reshape(-1), reduction="sum")


def make(name, T, B, gen):
    ids = torch.randint(0, VOCAB, (T, B), generator=gen)
    tokens = torch.randint(0, VOCAB, (B, T), generator=gen)
    if name == "encoder-classifier":
        labels = torch.randint(0, 3, (B,), generator=gen)
        return EncoderClassifier(), torch.randn(T, B, 8, generator=gen), labels, class_loss
    if name == "reused-linear":
        return ReusedLinear(), torch.randn(T, B, 8, generator=gen), torch.randint(0, 3, (B,), generator=gen), class_loss
    if name == "conv-front-end":
        return ConvFrontEnd(), torch.randn(B, 3, T, generator=gen), tokens, token_loss
    model = {"recurrent-lm": RecurrentLM, "recurrent-lm-tied": lambda: RecurrentLM(tied=True),
             "transformer-lm": TransformerLM, "flattened-decoder": FlattenedDecoder,
             "learned-positions": lambda: PositionedLM(T, batch_first=False)}[name]()
    return model, ids, tokens, token_loss


def check(model, x, y, loss, fused=True, batch_dim=1, batch_first=False):
    ref, _, ref_batch = reference_norms(model, loss, x, y, batch_dim=batch_dim)
    with GradNormTracker(model, "sum", fused=fused, batch_first=batch_first) as tracker:
        model.zero_grad()
        loss(model(x), y).backward()
        stats = tracker.collect()
    assert stats.per_sample.shape == ref.shape
    assert rel_err(stats.per_sample, ref) < RTOL
    assert rel_err(stats.batch_grad_sq, ref_batch) < RTOL


def check_each_sample(model, loss, x, y, *, batch_dim=0, **tracker_options):
    """One tracked backward of ``loss(model(x), y)`` against each sample's own backward (samples
    along ``batch_dim`` of ``x``, dim 0 of ``y``), for models torch.func cannot run."""
    each = (x, lambda part: model(part)) if batch_dim == 0 else (
        x.transpose(0, batch_dim), lambda part: model(part.transpose(0, batch_dim)))
    ref = each_sample_backward(model, loss, each[1], each[0], y)
    with GradNormTracker(model, "sum", **tracker_options) as tracker:
        model.zero_grad()
        loss(model(x), y).backward()
        assert rel_err(tracker.collect().per_sample, ref) < RTOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [5, 4], ids=["T!=B", "T==B"])
@pytest.mark.parametrize("name", ["encoder-classifier", "reused-linear", "recurrent-lm", "recurrent-lm-tied",
                                  "transformer-lm", "flattened-decoder", "conv-front-end", "learned-positions"])
def test_sequence_first_models_match_torch_func(name, T, fused):
    torch.manual_seed(0)
    model, x, y, loss = make(name, T, 4, torch.Generator().manual_seed(1))
    check(model, x, y, loss, fused, batch_dim=0 if name == "conv-front-end" else 1)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 6), B=st.integers(1, 5), hidden=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_sequence_first_row_layers_any_shape(T, B, hidden, seed):
    """Embedding -> Linear -> RMSNorm -> Linear on [T, B] ids, any T and B (equal or not, B = 1)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(VOCAB, 6), nn.Linear(6, hidden), nn.Tanh(), nn.RMSNorm(hidden),
                          nn.Linear(hidden, VOCAB))
    gen = torch.Generator().manual_seed(seed)
    check(model, torch.randint(0, VOCAB, (T, B), generator=gen), torch.randint(0, VOCAB, (B, T), generator=gen),
          token_loss)


class NormedInput(nn.Module):
    """A LayerNorm (its input gradient comes back through the [B, T, d] view) and a Linear; the
    strides of the gradient reaching the op before the LayerNorm are kept in ``grad_strides``."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.grad_strides = []

    def forward(self, x):
        h = torch.tanh(x)
        h.register_hook(lambda grad: self.grad_strides.append(grad.stride()))
        return self.head(self.norm(h)).sum(0)


@pytest.mark.parametrize("name", ["recurrent-lm", "reused-linear", "flattened-decoder", "normed-input"])
def test_tracked_step_is_laid_out_as_the_plain_one(name):
    """Each sequence-first layer runs on its input viewed [B, T, ...]: the model's output and the
    gradients of the parameters and of a float input must be the untracked model's (to rounding),
    and the output and the gradient reaching the op before a layer must have its strides (code
    after a layer may view its output; an elementwise backward on a transposed gradient runs
    several times slower)."""
    torch.manual_seed(0)
    if name == "normed-input":
        gen = torch.Generator().manual_seed(1)
        model, loss = NormedInput(), class_loss
        x, y = torch.randn(5, 4, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    else:
        model, x, y, loss = make(name, 5, 4, torch.Generator().manual_seed(1))
    runs = []
    for tracked in (False, True):
        model.zero_grad()
        inputs = x.clone().requires_grad_() if x.is_floating_point() else x
        with GradNormTracker(model, "sum", batch_first=False, enabled=tracked) as tracker:
            out = model(inputs)
            loss(out, y).backward()
            if tracked:
                tracker.collect()
        runs.append((out, [p.grad.clone() for p in model.parameters()], inputs.grad))
    (plain, plain_grads, plain_input_grad), (out, grads, input_grad) = runs
    assert out.stride() == plain.stride()
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, plain_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
    if plain_input_grad is not None:
        torch.testing.assert_close(input_grad, plain_input_grad, rtol=1e-5, atol=1e-6)
    if name == "normed-input":
        plain_strides, tracked_strides = model.grad_strides
        assert tracked_strides == plain_strides


def test_default_layout_refuses_a_sequence_first_model():
    """Without batch_first=False, [T, B] ids with T != B meet the LSTM's own B: refused, naming the
    mismatch (where T == B nothing could tell, which is why the option exists)."""
    model, ids, tokens, loss = make("recurrent-lm", 5, 4, torch.Generator().manual_seed(1))
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(ValueError, match="saw a batch of"):
            loss(model(ids), tokens).backward()
            tracker.collect()


class SequenceFirstAttention(nn.Module):
    """fairseq's self-attention on ``[T, B, d]``: heads split into the batch dim by views
    (``[T, B * H, d / H]``), transposed, ``bmm``, softmax, and merged back; or, ``sdpa``, permuted
    to ``[B, H, T, d / H]`` for ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int, kind: str):
        super().__init__()
        self.heads, self.kind = heads, kind
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        T, B, d = x.shape
        hd = d // self.heads
        q, k, v = self.q(x) * hd ** -0.5, self.k(x), self.v(x)
        if self.kind == "sdpa":
            q, k, v = (t.view(T, B, self.heads, hd).permute(1, 2, 0, 3) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3).reshape(T, B, d)
        else:
            q, k, v = (t.contiguous().view(T, B * self.heads, hd).transpose(0, 1) for t in (q, k, v))
            w = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
            a = torch.bmm(w, v).transpose(0, 1).contiguous().view(T, B, d)
        return self.out(a)


class LayerScale(nn.Module):
    """A gain of its own (the generic route) on ``[T, B, d]``, with no ``batch_first`` to say so."""

    def __init__(self, d: int):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, h):
        return h * self.gain


class OwnWeightAttention(SequenceFirstAttention):
    """XLNet's way: the query projection a parameter of the attention itself, applied with
    ``torch.einsum`` on ``[T, B, d]`` (the generic route replays the module per sample)."""

    def __init__(self, d: int, heads: int, kind: str):
        super().__init__(d, heads, kind)
        self.q_weight = nn.Parameter(torch.randn(d, heads, d // heads) / d ** 0.5)

    def forward(self, x):
        T, B, d = x.shape
        q = torch.einsum("tbd,dhe->tbhe", x, self.q_weight).reshape(T * B * self.heads, -1)
        return super().forward(x) + q.view(T, B, d)


class TransposedInside(nn.Module):
    """fairseq's layout: ``[B, T]`` ids, ``[T, B, d]`` in the model's own code (post-norm blocks of
    the attention above and an MLP, LayerNorm or RMSNorm; with ``scaled``, a ``LayerScale`` after
    each attention; with ``own_weights``, ``OwnWeightAttention``), ``[B, T, d]`` again for the head;
    ``attention="none"``: a projection on ``[T, B, d]``, mean-pooled over time into a classifier."""

    def __init__(self, attention: str, norm=nn.LayerNorm, layers: int = 2, scaled: bool = False,
                 own_weights: bool = False):
        super().__init__()
        self.attention = attention
        self.embed = nn.Embedding(VOCAB, 8)
        if attention == "none":
            self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 3)
            return
        attention_type = OwnWeightAttention if own_weights else SequenceFirstAttention
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            att=attention_type(8, 2, attention), norm1=norm(8), fc1=nn.Linear(8, 16), fc2=nn.Linear(16, 8),
            norm2=norm(8), scale=LayerScale(8) if scaled else nn.Identity())) for _ in range(layers))
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        h = (self.embed(ids) * 8 ** 0.5).transpose(0, 1)  # [T, B, d]
        if self.attention == "none":
            return self.head(torch.tanh(self.proj(h)).mean(0))
        for b in self.blocks:
            h = b.norm1(h + b.scale(b.att(h)))
            h = b.norm2(h + b.fc2(F.gelu(b.fc1(h))))
        return self.head(h.transpose(0, 1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [4, 5], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("attention", ["none", "bmm", "sdpa", "bmm-rms", "bmm-scaled", "sdpa-own"])
def test_batch_first_model_working_sequences_first_inside_matches_torch_func(attention, T, fused):
    """A model that takes ``[B, T]`` ids and works on ``[T, B, d]`` in its own code, tracked batch
    first: each layer's input is placed from the autograd graph (back through the model's
    transposes, views and attention products to the earlier layers' outputs), modules of the
    generic route (a layer scale, an attention with a weight of its own) included. Before, T == B
    gave norms 14% off with no error (time steps taken for samples) and T != B was refused."""
    torch.manual_seed(0)
    kind, _, variant = attention.partition("-")
    model = TransposedInside(kind, nn.RMSNorm if variant == "rms" else nn.LayerNorm, scaled=variant == "scaled",
                             own_weights=variant == "own")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, T), generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen) if attention == "none" else torch.randint(0, VOCAB, (4, T), generator=gen)
    check(model, ids, y, class_loss if attention == "none" else batch_first_token_loss, fused, batch_dim=0,
          batch_first=True)


def batch_first_token_loss(out, y):
    """``out``: ``[B, T, V]``; ``y``: ``[B, T]`` targets."""
    return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1), reduction="sum")


class EitherLayoutAttention(nn.Module):
    """Self-attention written for the layout it is given: ``[T, B, d]`` as fairseq's (heads folded
    into the batch dim, ``bmm``), ``[B, T, d]`` as most models (heads split off, ``matmul``)."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, sequences_first: bool):
        n0, n1, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if sequences_first:
            q, k, v = (t.contiguous().view(n0, n1 * self.heads, -1).transpose(0, 1) for t in (q, k, v))
            a = torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)) / 2, dim=-1), v)
            return self.out(a.transpose(0, 1).contiguous().view(n0, n1, d))
        q, k, v = (t.view(n0, n1, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.softmax(q @ k.transpose(-1, -2) / 2, dim=-1) @ v
        return self.out(a.transpose(1, 2).reshape(n0, n1, d))


class RandomLayouts(nn.Module):
    """Blocks drawn at random over ``[B, T]`` ids (or, ``sequences_first``, ``[T, B]`` ones), each on
    the layout the model is in at that point: the input's, or the other after an odd number of
    transposes (a view or a copy); ``[B, T, V]`` logits."""

    def __init__(self, blocks: list[str], sequences_first: bool = False):
        super().__init__()
        self.sequences_first, self.blocks = sequences_first, blocks
        self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)
        make = {"linear": lambda: nn.Linear(8, 8), "norm": lambda: nn.LayerNorm(8), "rms": lambda: nn.RMSNorm(8),
                "scale": lambda: LayerScale(8), "residual": lambda: nn.Linear(8, 8), "attention": EitherLayoutAttention,
                # (PyTorch's, built for each layout: the forward calls the one for the layout it is in)
                "lstm": lambda: nn.ModuleList(nn.LSTM(8, 8, batch_first=first) for first in (True, False)),
                "mha": lambda: nn.ModuleList(nn.MultiheadAttention(8, 2, batch_first=first) for first in (True, False))}
        self.layers = nn.ModuleList(make[b]() if b in make else nn.Identity() for b in blocks)

    def forward(self, ids):
        h, sequences_first = self.embed(ids), self.sequences_first
        for kind, layer in zip(self.blocks, self.layers):
            if kind in ("transpose", "transposed-copy"):
                h, sequences_first = h.transpose(0, 1), not sequences_first
                h = h.contiguous() if kind == "transposed-copy" else h
            elif kind == "attention":
                h = h + layer(h, sequences_first)
            elif kind == "lstm":
                h = layer[int(sequences_first)](h)[0]
            elif kind == "mha":
                h = h + layer[int(sequences_first)](h, h, h, need_weights=False)[0]
            elif kind == "residual":
                h = h + layer(F.gelu(h))
            else:
                h = layer(h)
        return self.head(h.transpose(0, 1) if sequences_first else h)


@settings(max_examples=25, deadline=None)
@given(blocks=st.lists(st.sampled_from(["linear", "norm", "rms", "scale", "residual", "attention", "lstm", "mha",
                                        "transpose", "transposed-copy"]), min_size=1, max_size=7),
       equal=st.booleans(), fused=st.booleans(), outside_first=st.sampled_from(["batch", "sequences"]),
       seed=st.integers(0, 2**16))
def test_random_layouts_are_exact_or_refused(blocks, equal, fused, outside_first, seed):
    """Whatever the blocks and their layouts, T == B or not, the model's input batch first (tracked
    so) or sequences first (tracked ``batch_first=False``): the norms are torch.func's, or the
    tracker refuses (never wrong with no error)."""
    from divebatch.layers.base import RuleError

    torch.manual_seed(seed)
    sequences_first = outside_first == "sequences"
    model = RandomLayouts(blocks, sequences_first)
    gen = torch.Generator().manual_seed(seed)
    T = 3 if equal else 4
    ids, y = torch.randint(0, VOCAB, (3, T), generator=gen), torch.randint(0, VOCAB, (3, T), generator=gen)
    ids = ids.t().contiguous() if sequences_first else ids
    try:
        stats = second_backward_stats(model, batch_first_token_loss, model, ids, y, fused=fused,
                                      batch_first=not sequences_first)
    except (ValueError, RuleError):
        return
    per_sample, _, batch = reference_norms(model, batch_first_token_loss, ids, y, batch_dim=int(sequences_first))
    assert rel_err(stats.per_sample, per_sample) < RTOL
    assert rel_err(stats.batch_grad_sq, batch) < RTOL


class PyTorchLayersInside(nn.Module):
    """``[B, T]`` ids, transposed to ``[T, B, d]`` for an ``nn.LSTM``, ``nn.GRU`` or
    ``nn.MultiheadAttention`` built with PyTorch's default ``batch_first=False``, then a Linear and a
    LayerNorm on its ``[T, B, d]`` output, and back to ``[B, T]`` for the head."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.embed = kind, nn.Embedding(VOCAB, 8)
        self.core = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](8, 8) if kind != "mha" else nn.MultiheadAttention(8, 2)
        self.proj, self.norm, self.head = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, VOCAB)

    def forward(self, ids):
        h = self.embed(ids).transpose(0, 1)
        h = self.core(h)[0] if self.kind != "mha" else self.core(h, h, h, need_weights=False)[0]
        return self.head(self.norm(self.proj(h)).transpose(0, 1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [3, 4], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "mha"])
def test_layers_after_a_sequence_first_pytorch_layer_match_each_samples_backward(kind, T, fused):
    """The layers after one that declares its layout (an RNN's or attention's ``batch_first``) take
    their samples from its output's layout: before, T == B gave the LSTM model norms 140% off and
    the attention's (hooks) 33% off, with no error, and T != B was refused. (The GRU's reference is
    each sample's own backward: torch.func's vmap fails on it.)"""
    torch.manual_seed(0)
    model = PyTorchLayersInside(kind)
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (3, T), generator=gen), torch.randint(0, VOCAB, (3, T), generator=gen)
    stats = second_backward_stats(model, batch_first_token_loss, model, ids, y, fused=fused)
    reference = each_sample_backward(model, batch_first_token_loss, model, ids, y)
    assert rel_err(stats.per_sample, reference) < RTOL


class BackToBatchFirst(nn.Module):
    """A sequence-first model (``[T, B]`` ids, an LSTM with PyTorch's default layout) that transposes
    back to ``[B, T, d]`` for its norm and head, as many training scripts do before the loss."""

    def __init__(self):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(VOCAB, 8), nn.LSTM(8, 8)
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, VOCAB)

    def forward(self, ids):
        return self.head(self.norm(self.rnn(self.embed(ids))[0].transpose(0, 1)))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [3, 4], ids=["T==B", "T!=B"])
def test_sequence_first_model_back_to_batch_first_before_its_head(T, fused):
    """Tracked ``batch_first=False``: the norm and head, given ``[B, T, d]``, are placed from the graph
    (samples in dim 0). Before, T == B read their inputs as ``[T, B, d]`` (wrong, no error) and
    T != B was refused."""
    torch.manual_seed(0)
    model = BackToBatchFirst()
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (T, 3), generator=gen), torch.randint(0, VOCAB, (3, T), generator=gen)
    check(model, ids, y, batch_first_token_loss, fused, batch_dim=1, batch_first=False)


class GlobalTokens(nn.Module):
    """Longformer's global attention, sequences first inside a batch-first model: the hidden states'
    global tokens (where the ids are 1), gathered per sample as ``h[(t, b)]`` and written into
    ``zeros(G, B, d)`` at ``(j, b)``, projected by a Linear of their own; every token is a key."""

    def __init__(self):
        super().__init__()
        self.embed, self.query_global, self.key = nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.embed(ids).transpose(0, 1)  # [T, B, d]
        is_global = ids == 1
        count = is_global.sum(1)
        where = is_global.nonzero(as_tuple=True)  # (b, t)
        local = (torch.arange(int(count.max())) < count.unsqueeze(-1)).nonzero(as_tuple=True)  # (b, j)
        gathered = h.new_zeros(int(count.max()), ids.shape[0], 8)
        gathered[local[::-1]] = h[where[::-1]]
        queries, keys = self.query_global(gathered), self.key(h)  # [G, B, d], [T, B, d]
        scores = torch.einsum("gbd,tbd->bgt", queries, keys).softmax(-1)
        return self.head(torch.einsum("bgt,tbd->bd", scores, keys))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [3, 5], ids=["T==B", "T!=B"])
def test_global_tokens_gathered_sequences_first_match_torch_func(T, fused):
    """The gathered global tokens' Linear is placed from the graph through the gather and the write
    into zeros (Longformer's sequence classifier, refused before at T = B and T != B alike)."""
    torch.manual_seed(0)
    model = GlobalTokens()
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(2, VOCAB, (3, T), generator=gen), torch.randint(0, 3, (3,), generator=gen)
    ids[:, 0] = 1  # (two global tokens in every sample, at different places: samples padded to the
    ids[:, 2] = 1  # most would meet the padding's bias, which Longformer masks and this model does not)
    ids[1, 2], ids[1, 1] = 5, 1
    check(model, ids, y, class_loss, fused, batch_dim=0, batch_first=True)


class UnprobedFlip(torch.autograd.Function):
    """``h`` with its last dim reversed, by a Function whose backward runs only inside a backward
    pass (it reads the engine's graph task, as checkpointing does): a graph node the layout walk
    can neither follow nor probe."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h):
        return torch.flip(h, dims=(-1,))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        if torch._C._current_graph_task_id() == -1:
            raise RuntimeError("UnprobedFlip's backward runs only inside a backward pass")
        return torch.flip(grad, dims=(-1,))


unprobed_flip = UnprobedFlip.apply


def test_sequences_first_inside_through_an_unknown_op_is_refused_with_the_layouts_named():
    """Where the graph does not tell (an op the walk can neither follow nor probe between the
    transpose and the layer), the layer keeps dim 0: with T != B the batch check refuses it, its
    hint naming the sequence-first input it saw, what is read right, and the attribute that
    declares the layer's layout (exact once set)."""

    class FlippedInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, ids):
            h = unprobed_flip(self.embed(ids).transpose(0, 1))  # [T, B, d]
            return self.head(torch.tanh(self.proj(h)).mean(0))

    model = FlippedInside()
    ids, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 3, (5,))
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(ValueError, match=r"saw a batch of 4 .*\[4, 5, 6\], looks sequences first.*"
                                             r"autograd graph leads .*here it did not; set `module.batch_first = False`"):
            F.cross_entropy(model(ids), y, reduction="sum").backward()
            tracker.collect()
    model.proj.batch_first = False  # (as the hint says: exact)
    check_each_sample(model, class_loss, ids, y)


class TransposedAround(nn.Module):
    """A model on ``[B, T, 4]`` features (or, ``sequences_first``, ``[T, B, 4]``) whose PyTorch
    transformer takes the other layout (its default ``batch_first=False``, or True): transposed
    around it, as in many training scripts."""

    def __init__(self, kind: str, sequences_first: bool = False):
        super().__init__()
        self.kind, self.inp, self.head = kind, nn.Linear(4, 8), nn.Linear(8, 3)
        inner_batch_first, self.time_dim = sequences_first, 0 if sequences_first else 1
        if kind == "encoder":
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, norm_first=True, batch_first=inner_batch_first)
            self.body = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        elif kind == "decoder":
            layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=inner_batch_first)
            self.body = nn.TransformerDecoder(layer, 1)
        else:
            self.body = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=inner_batch_first)

    def forward(self, x):
        h = self.inp(x).transpose(0, 1)
        if self.kind == "encoder":
            h = self.body(h)
        else:  # (a memory of other length: its own rows of the samples)
            memory = torch.tanh(h[:2] if h.shape[0] > 2 and self.kind == "transformer" else h)
            h = self.body(memory, h) if self.kind == "transformer" else self.body(h, memory)
        return self.head(h.transpose(0, 1).mean(self.time_dim))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [3, 5], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
def test_pytorch_transformers_in_the_other_layout_match_torch_func(kind, T, fused):
    """``nn.TransformerEncoder``/``Decoder``/``nn.Transformer`` built with the default
    ``batch_first=False`` in a model tracked batch first (the layers' inputs are ``[T, B, d]``:
    read by the layout the transformer declares, where T == B misread them 21% off with no error
    and T != B was refused)."""
    torch.manual_seed(0)
    model = TransposedAround(kind)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, T, 4, generator=gen), torch.randint(0, 3, (3,), generator=gen)
    check(model, x, y, class_loss, fused, batch_dim=0, batch_first=True)


@pytest.mark.parametrize("T", [3, 5], ids=["T==B", "T!=B"])
def test_batch_first_transformer_in_a_sequence_first_model_matches_torch_func(T):
    """The reverse: ``[T, B, 4]`` inputs (tracked ``batch_first=False``) transposed into an
    ``nn.TransformerEncoder`` built ``batch_first=True``: its layers keep samples in dim 0."""
    torch.manual_seed(0)
    model = TransposedAround("encoder", sequences_first=True)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(T, 3, 4, generator=gen), torch.randint(0, 3, (3,), generator=gen)
    check(model, x, y, class_loss, batch_dim=1)


class ScaledEncoderLayer(nn.TransformerEncoderLayer):
    """A transformer layer with a learnt scale of its output (layer scale, as in CaiT): its own
    parameter sends it to the generic route, which takes the samples from the dim its
    ``self_attn.batch_first`` names."""

    def __init__(self, d, batch_first=False):
        super().__init__(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, src, *args, **kwargs):
        return super().forward(src, *args, **kwargs) * self.scale


class WithScaledLayers(nn.Module):
    """``[B, T, 4]`` features into default (``batch_first=False``) scaled transformer layers, a
    Linear of the model's own between them, transposed around."""

    def __init__(self, stacked: bool):
        super().__init__()
        self.inp, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.body = (nn.TransformerEncoder(ScaledEncoderLayer(8), 2, enable_nested_tensor=False) if stacked
                     else ScaledEncoderLayer(8))

    def forward(self, x):
        return self.head(self.body(self.inp(x).transpose(0, 1)).transpose(0, 1).mean(1))


@pytest.mark.parametrize("stacked", [False, True], ids=["layer", "in-encoder"])
@pytest.mark.parametrize("T", [3, 5], ids=["T==B", "T!=B"])
def test_a_transformer_layer_with_parameters_of_its_own_matches_torch_func(T, stacked):
    torch.manual_seed(0)
    model = WithScaledLayers(stacked)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, T, 4, generator=gen), torch.randint(0, 3, (3,), generator=gen)
    check(model, x, y, class_loss, batch_dim=0, batch_first=True)


class Gain(nn.Module):
    """A gain of its own (the generic route), with no ``batch_first``."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, h):
        return h * self.gain


class Flip(nn.Module):
    """The features reversed, through an op the graph walk can neither follow nor probe."""

    def forward(self, h):
        return unprobed_flip(h)


@pytest.mark.parametrize("T", [3, 5], ids=["T==B", "T!=B"])
def test_module_without_layout_inside_a_transformer(T):
    """A module of the generic route (its own parameter) given a sequence inside a transformer built
    ``batch_first=False``: placed from the autograd graph (its input comes from the attention's
    output projection); where the graph does not tell (an op the walk does not follow), refused,
    naming the attribute to set, and exact once set."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, T, 4, generator=gen), torch.randint(0, 3, (3,), generator=gen)
    model = TransposedAround("encoder")
    for layer in model.body.layers:
        layer.dropout1 = Gain()  # (called on the attention's output)
    check(model, x, y, class_loss, batch_dim=0, batch_first=True)
    for layer in model.body.layers:
        layer.dropout1 = nn.Sequential(Flip(), Gain())
    with GradNormTracker(model, "sum"):
        with pytest.raises(ValueError, match=r"'body\.layers\.0\.dropout1\.1' \(Gain\).*`module\.batch_first = False`"):
            model(x)
    for layer in model.body.layers:
        layer.dropout1[1].batch_first = False
    check(model, x, y, class_loss, batch_dim=0, batch_first=True)


def test_walked_layouts_stay_bounded_over_forwards_without_a_backward(monkeypatch):
    """Forwards that no backward follows (an evaluation with gradients on) number their calls on:
    the layouts kept per call are bounded, and the next step is still exact."""
    import divebatch.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "_MAX_LAYOUTS", 3)
    torch.manual_seed(0)
    model = TransposedInside("bmm")
    ids, y = torch.randint(0, VOCAB, (4, 4)), torch.randint(0, VOCAB, (4, 4))
    with GradNormTracker(model, "sum") as tracker:
        for _ in range(4):
            model(ids)
        assert 0 < len(tracker._layouts) <= 3
    check(model, ids, y, batch_first_token_loss, batch_dim=0, batch_first=True)


class ScaleShift(torch.autograd.Function):
    """``x * k + shift``: an autograd Function of its own (as a fused kernel is), with a number among
    its arguments and a second operand made of a parameter (``shift``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, k, shift):
        return x * k + shift

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.k = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.k, None, grad.sum(tuple(range(grad.dim() - 1)))


class Gate(torch.autograd.Function):
    """``a * sigmoid(b)``: an autograd Function of two data operands."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        return a * torch.sigmoid(b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        s = torch.sigmoid(b)
        return grad * s, grad * a * s * (1 - s)


class UnknownOpsInside(nn.Module):
    """fairseq's layout (``[B, T]`` ids, ``[T, B, d]`` inside) with an op the layout walk does not
    know between the transpose and each layer: ``torch.flip`` or ``torch.roll`` over time, or an
    autograd Function of its own."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.embed, self.proj, self.gate = nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.norm, self.head = nn.LayerNorm(6), nn.Linear(6, 3)
        self.shift = nn.Parameter(torch.randn(6))

    def forward(self, ids):
        h = self.embed(ids).transpose(0, 1)  # [T, B, d]
        if self.op == "flip":
            h = torch.flip(h, dims=(0,))
        elif self.op == "roll":
            h = torch.roll(h, 1, dims=0)
        elif self.op == "function":
            h = ScaleShift.apply(h, 2.0, self.shift)
        h = torch.tanh(self.proj(h))
        if self.op == "function":
            h = Gate.apply(h, self.gate(h))
        return self.head(self.norm(h).mean(0))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [4, 5], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("op", ["flip", "roll", "function"])
def test_ops_the_walk_does_not_know_are_probed_through_their_backward(op, T, fused):
    """An op the layout walk does not know (``torch.flip``, ``torch.roll``, an autograd Function of
    the model's own, two data operands or a number and a parameter among its arguments) is probed
    through its own backward: the layers after it are placed in dim 1 and exact. Before, they kept
    dim 0: wrong with no error where T == B, refused where T != B."""
    torch.manual_seed(0)
    model = UnknownOpsInside(op)
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (4, T), generator=gen), torch.randint(0, 3, (4,), generator=gen)
    check(model, ids, y, class_loss, fused, batch_dim=0, batch_first=True)
    # The probes draw from a generator of their own: the model's random numbers are not moved.
    torch.manual_seed(2)
    expected = torch.rand(3)
    with GradNormTracker(model, "sum", fused=fused):
        torch.manual_seed(2)
        model(ids)
        assert torch.equal(torch.rand(3), expected)


class ExpSavedInPlace(torch.autograd.Function):
    """``exp(x)`` whose backward writes its result into the output it saved (``y.mul_(grad)``), as a
    fused kernel saving memory may (a backward inductor compiles with donated buffers does)."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return y.mul_(grad)


class PopsItsScale(torch.autograd.Function):
    """``2 x`` whose backward pops the scale its forward kept in a list (state used once)."""

    @staticmethod
    def forward(ctx, x):
        ctx.scales = [2.0]
        return x * 2.0

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scales.pop()


class DrawsInBackward(torch.autograd.Function):
    """``2 x`` whose backward draws a random number (as stochastic rounding does), unused here."""

    @staticmethod
    def forward(ctx, x):
        return x * 2.0

    @staticmethod
    def backward(ctx, grad):
        return grad * 2.0 + 0.0 * torch.rand(())


class StatefulBackwardInside(nn.Module):
    """fairseq's layout with a Function whose backward has side effects (``ExpSavedInPlace``,
    ``PopsItsScale``, ``DrawsInBackward``) between the ids' embedding and the transpose."""

    def __init__(self, function):
        super().__init__()
        self.function = function
        self.embed, self.proj, self.head = nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = self.function.apply(0.1 * self.embed(ids)).transpose(0, 1)  # [T, B, d]
        return self.head(torch.tanh(self.proj(h)).mean(0))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [4, 5], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("function", [ExpSavedInPlace, PopsItsScale, DrawsInBackward],
                         ids=["writes-saved", "pops-state", "draws"])
def test_probing_a_backward_with_side_effects_changes_nothing(function, T, fused):
    """The probe calls a Function's backward during the forward: one that writes into the tensors
    it saved (here its own output, which the forward goes on with), uses state it kept once, or
    draws random numbers would change the activations, what the real backward reads, or the
    model's random stream. The saved tensors (and their version counters), the node's attributes
    and the random state are put back after each call, so the layers after it are placed and
    exact, the model's gradients are those of an untracked step and its random numbers the same.
    Before, with ``ExpSavedInPlace`` the forward went on with the probes' results and the real
    backward failed on its saved tensor (T == B) or the layer was refused (T != B); with
    ``PopsItsScale`` the real backward failed; with ``DrawsInBackward`` the stream moved."""
    torch.manual_seed(0)
    model = StatefulBackwardInside(function)
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (4, T), generator=gen), torch.randint(0, 3, (4,), generator=gen)
    expected = each_sample_backward(model, class_loss, model, ids, y)
    model.zero_grad()
    class_loss(model(ids), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(2)
    model(ids)
    drawn = torch.rand(3)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        model.zero_grad()
        torch.manual_seed(2)
        out = model(ids)
        assert torch.equal(torch.rand(3), drawn)
        class_loss(out, y).backward()
        assert rel_err(tracker.collect().per_sample, expected) < RTOL
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


class IndexedSamples(nn.Module):
    """fairseq's layout with the samples taken by an index (``h[:, order]``, ``order`` an attribute:
    the same graph with other index values; None: not indexed)."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj, self.head = nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.order = None

    def forward(self, ids):
        h = self.embed(ids).transpose(0, 1)  # [T, B, d]
        h = h if self.order is None else h[:, self.order]
        return self.head(torch.tanh(self.proj(h)).mean(0))


def test_samples_taken_by_index_values_that_change_are_read_again():
    """A layer placed through ``x[idx]`` along the samples' dim holds for those index values: the
    call is walked again each forward. In order on the first step (placed in dim 1, exact),
    reversed on the second (no longer sample ``i`` at index ``i``: refused, naming the layer; kept
    from the first walk, its norms would be the reversed samples', with no error)."""
    torch.manual_seed(0)
    model = IndexedSamples()
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (4, 4), generator=gen), torch.randint(0, 3, (4,), generator=gen)
    per_sample, _, _ = reference_norms(model, class_loss, ids, y)
    model.order = torch.arange(4)
    with GradNormTracker(model, "sum") as tracker:
        class_loss(model(ids), y).backward()
        assert rel_err(tracker.collect().per_sample, per_sample) < RTOL
        model.order = model.order.flip(0)
        with pytest.raises(ValueError, match=r"'proj' \(Linear, input \[4, 4, 6\]\)"):
            class_loss(model(ids), y).backward()


class MixSamples(torch.autograd.Function):
    """``x + mean of x over dim 1``: an op that mixes the samples of a ``[T, B, d]`` tensor."""

    @staticmethod
    def forward(ctx, x):
        return x + x.mean(1, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return grad + grad.mean(1, keepdim=True)


@pytest.mark.parametrize("op", ["flip-time", "strided-merged", "flip-batch", "mix", "function"])
def test_a_probed_op_is_placed_only_where_its_backward_keeps_samples_apart(op):
    """``samples_dim`` through one op it does not know: a flip over time keeps sample ``i`` at index
    ``i`` of dim 1 (placed); so does an ``as_strided`` view of the samples merged with positions
    (``[B * T, d]``, placed sample-major, then viewed ``[B, T, d]`` and transposed); a flip over the batch moves them
    (not placed: the samples are not in order); an op that mixes samples, and one whose operand
    comes from nowhere known, are not placed."""
    B, T = 4, 4
    layer = nn.Linear(3, 3)
    out = layer(torch.randn(B, T, 3))
    known = {(id(out.grad_fn), 0): (out.grad_fn, 0, B)}
    h = out.transpose(0, 1)  # [T, B, 3]
    if op == "flip-time":
        x, expected = torch.flip(h, dims=(0,)), 1
    elif op == "strided-merged":
        merged = out.reshape(B * T, 3)
        x, expected = torch.as_strided(merged, (B * T, 3), (3, 1)).view(B, T, 3).transpose(0, 1), 1
    elif op == "flip-batch":
        x, expected = torch.flip(h, dims=(1,)), None
    elif op == "mix":
        x, expected = MixSamples.apply(h), None
    else:
        x, expected = Gate.apply(h, torch.randn(T, B, 3, requires_grad=True) * 1), None
    unfollowed = []
    assert samples_dim(x, known, unfollowed=unfollowed) == expected
    assert (unfollowed == []) == (expected is not None)


class UndecidedInside(nn.Module):
    """``[B, T]`` ids, ``[T, B, d]`` inside (``first`` placed in dim 1 by the graph), then an op that
    can be neither followed nor probed before ``second``."""

    def __init__(self):
        super().__init__()
        self.embed, self.first, self.second, self.head = (nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, 6),
                                                          nn.Linear(6, 3))

    def forward(self, ids):
        h = torch.tanh(self.first(self.embed(ids).transpose(0, 1)))
        return self.head(torch.tanh(self.second(unprobed_flip(h))).mean(0))


def test_a_layer_the_graph_cannot_place_at_t_equal_b_is_refused_where_the_model_shows_both_layouts():
    """Where T == B, the graph does not tell where a layer's samples are, and another layer of the
    model was placed in the other dim than the tracker's, taking the tracker's would be a guess:
    refused, naming the layer and the attribute that settles it; exact once it is set. A model that
    shows one layout throughout keeps it (no refusal for an op the walk cannot read)."""
    torch.manual_seed(0)
    model = UndecidedInside()
    ids, y = torch.randint(0, VOCAB, (4, 4)), torch.randint(0, 3, (4,))
    with GradNormTracker(model, "sum") as tracker:
        for _ in range(2):  # (refused again: the walks are not kept)
            with pytest.raises(ValueError, match=r"'second' \(Linear, input \[4, 4, 6\]\), past "
                                                 r"UnprobedFlipBackward.*'first' \(Linear.*dim 1.*"
                                                 r"`module.batch_first = True`"):
                model(ids)
        del tracker
    model.second.batch_first = False
    check_each_sample(model, class_loss, ids, y)

    class OneLayout(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj, self.head = nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.proj(unprobed_flip(self.embed(ids)))).mean(1))

    check_each_sample(OneLayout(), class_loss, ids, y)


class TimeMajorRows(nn.Module):
    """``[B, T]`` ids, ``[T, B, d]`` inside (a projection, or an LSTM built with the default
    ``batch_first=False``), flattened time-major (``h.reshape(-1, d)``) into the output layer and
    viewed back ``[B, T, V]`` for the loss."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed, self.dec = nn.Embedding(VOCAB, 6), nn.Linear(6, VOCAB)
        self.body = nn.LSTM(6, 6) if kind == "lstm" else nn.Linear(6, 6)

    def forward(self, ids):
        B, T = ids.shape
        h = self.embed(ids).transpose(0, 1)
        h = self.body(h)[0] if self.kind == "lstm" else torch.tanh(self.body(h))
        return self.dec(h.reshape(-1, 6)).view(T, B, VOCAB).transpose(0, 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [4, 5], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("kind", ["linear", "lstm"])
def test_time_major_rows_in_a_batch_first_model_match_each_samples_backward(kind, T, fused):
    """Rows flattened time-major from a ``[T, B, d]`` tensor (row ``r`` is sample ``r % B``) in a model
    tracked batch first: the graph proves each row's sample back to the earlier layers' outputs,
    and the layer runs on them viewed ``[B, T, d]``. Before, the merge's first dim (T) was taken for
    the samples: 47% off with no error where T == B, refused where T != B."""
    torch.manual_seed(0)
    model = TimeMajorRows(kind)
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (4, T), generator=gen), torch.randint(0, VOCAB, (4, T), generator=gen)
    check_each_sample(model, batch_first_token_loss, ids, y, fused=fused)


class SampleMajorRows(nn.Module):
    """``[T, B]`` ids (tracked ``batch_first=False``), transposed to ``[B, T, d]`` inside (a projection,
    or an LSTM built ``batch_first=True``), flattened sample-major (``h.reshape(-1, d)``) into the
    output layer: the ``[B, T, V]`` logits."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed, self.dec = nn.Embedding(VOCAB, 6), nn.Linear(6, VOCAB)
        self.body = nn.LSTM(6, 6, batch_first=True) if kind == "lstm" else nn.Linear(6, 6)

    def forward(self, ids):
        T, B = ids.shape
        h = self.embed(ids).transpose(0, 1)
        h = self.body(h)[0] if self.kind == "lstm" else torch.tanh(self.body(h))
        return self.dec(h.reshape(-1, 6)).view(B, T, VOCAB)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [4, 5], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("kind", ["linear", "lstm"])
def test_sample_major_rows_in_a_sequence_first_model_match_each_samples_backward(kind, T, fused):
    """The reverse under ``batch_first=False``: rows flattened sample-major from a ``[B, T, d]``
    tensor are read so from the graph, not taken time-major. Before: 58% (Linear) and 131% (LSTM)
    off with no error where T == B, refused where T != B."""
    torch.manual_seed(0)
    model = SampleMajorRows(kind)
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (T, 4), generator=gen), torch.randint(0, VOCAB, (4, T), generator=gen)
    check_each_sample(model, batch_first_token_loss, ids, y, batch_dim=1, fused=fused, batch_first=False)
