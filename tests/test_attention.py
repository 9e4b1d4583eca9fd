"""nn.MultiheadAttention's rule (fused forward and replay) against exact per-sample gradients.

Without dropout the reference is torch.func. With dropout in training mode it is the brute-force
definition: one batched forward, then one backward per sample's loss (``autograd.grad``), so
every sample's gradient sees the forward's own dropout masks; the tracked step runs from the
same RNG seed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers import attention

from .oracle import each_sample_backward, reference_norms, rel_err, second_backward_stats

RTOL = 1e-4


class Attend(nn.Module):
    """An attention layer under test. The input packs what varies per sample: features
    ``[B, T, E]``, and for cross-attention a second sequence, plus a key-padding flag channel."""

    def __init__(self, E=8, heads=2, *, batch_first=True, cross=False, kdim=None, vdim=None, bias=True,
                 add_zero_attn=False, dropout=0.0, mask=None, padding=False, need_weights=False,
                 average_attn_weights=True):
        super().__init__()
        self.E, self.cross, self.mask, self.padding = E, cross, mask, padding
        self.need_weights, self.average = need_weights, average_attn_weights
        self.mha = nn.MultiheadAttention(E, heads, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias,
                                         add_zero_attn=add_zero_attn, dropout=dropout)
        self.kproj = nn.Linear(E, kdim or E) if cross else None
        self.vproj = nn.Linear(E, vdim or E) if cross else None

    def forward(self, packed):
        x = packed[..., : self.E]
        q = x[:, :5] if self.cross else x  # cross: 5 queries attend to all T positions
        k = self.kproj(x) if self.cross else x
        v = self.vproj(x) if self.cross else x
        kwargs = {"need_weights": self.need_weights, "average_attn_weights": self.average}
        if self.padding:
            pad = packed[..., -1] > 0.5
            kwargs["key_padding_mask"] = pad
        T, S = q.shape[1], k.shape[1]
        if self.mask == "causal":
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.bool)
            kwargs["is_causal"] = True
        elif self.mask == "float":
            kwargs["attn_mask"] = torch.linspace(-1, 1, T * S).reshape(T, S)
        if not self.mha.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, weights = self.mha(q, k, v, **kwargs)
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:  # the loss sees the weights too: their gradient must be counted
            return torch.cat([out.flatten(1), weights.flatten(1)], dim=1)
        return out.flatten(1)


def make(seed=0, B=4, T=6, E=8, **kwargs):
    torch.manual_seed(seed)
    model = Attend(E, **kwargs)
    packed = torch.randn(B, T, E + 1)
    packed[..., -1] = 0.0
    packed[0, -2:, -1] = 1.0  # sample 0 masks its last two keys
    return model, packed


def sample_losses(out):
    return 0.5 * out.float().square().flatten(1).sum(1)


def loss_fn(out, y):
    return sample_losses(out).sum()


def tracked(model, packed, fused, reduction="sum"):
    with GradNormTracker(model, reduction, fused=fused) as tracker:
        loss_fn(model(packed), None).backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    return stats, routes


CONFIGS = {
    "self": {},
    "seq-first": dict(batch_first=False),
    "cross": dict(cross=True),
    "kdim-vdim": dict(cross=True, kdim=5, vdim=3),
    "no-bias": dict(bias=False),
    "zero-attn": dict(add_zero_attn=True),
    "causal": dict(mask="causal"),
    "float-mask": dict(mask="float"),
    "key-padding": dict(padding=True),
    "padding-and-causal": dict(padding=True, mask="causal"),
    "weights-in-loss": dict(need_weights=True),
    "per-head-weights": dict(need_weights=True, average_attn_weights=False, padding=True),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "replay"])
@pytest.mark.parametrize("config", CONFIGS)
def test_attention_matches_torch_func(config, fused):
    model, packed = make(**CONFIGS[config])
    model.zero_grad()
    loss_fn(model(packed), None).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    stats, routes = tracked(model, packed, fused)
    per_sample, _, batch = reference_norms(model, loss_fn, packed, torch.zeros(packed.shape[0]))
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert routes["mha"] == ("fused attention" if fused else "attention replay")
    for name, p in model.named_parameters():  # the fused forward gives autograd's gradients
        assert rel_err(p.grad, plain[name]) <= 1e-5, name


def brute_force_norms(model, packed, seed):
    """Per-sample squared gradient norms by definition: B backward passes over one forward."""
    torch.manual_seed(seed)
    losses = sample_losses(model(packed))
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[b], params, retain_graph=True)
        rows.append(sum(g.double().square().sum() for g in grads))
    return torch.stack(rows)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "replay"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "weights"])
def test_dropout_in_training_mode_is_exact(fused, need_weights):
    model, packed = make(dropout=0.3, padding=True, need_weights=need_weights)
    model.train()
    expected = brute_force_norms(model, packed, seed=5)
    torch.manual_seed(5)
    stats, _ = tracked(model, packed, fused)
    assert rel_err(stats.per_sample, expected) <= RTOL
    torch.manual_seed(5)
    reference_out = model(packed)
    with GradNormTracker(model, "sum", fused=fused):
        torch.manual_seed(5)
        out = model(packed)  # the fused forward draws the same masks as the module's own
    assert torch.allclose(out, reference_out, atol=1e-6)


def test_replay_leaves_the_callers_random_stream_alone():
    model, packed = make(dropout=0.5)
    model.train()
    torch.manual_seed(3)
    loss_fn(model(packed), None).backward()
    after_plain = torch.rand(3)
    torch.manual_seed(3)
    with GradNormTracker(model, "sum", fused=False) as tracker:
        loss_fn(model(packed), None).backward()
        tracker.collect()
    assert torch.equal(torch.rand(3), after_plain)


def test_transformer_encoder_layer_with_default_dropout():
    """nn.TransformerEncoderLayer as people use it: dropout 0.1 everywhere, training mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Flatten(1))
    x = torch.randn(5, 7, 8)
    expected = brute_force_norms(model, x, seed=11)
    torch.manual_seed(11)
    with GradNormTracker(model, "sum") as tracker:
        loss_fn(model(x), None).backward()
        stats = tracker.collect()
    assert rel_err(stats.per_sample, expected) <= RTOL
    model.eval()
    stats, _ = tracked(model, x, fused=True)
    per_sample, _, batch = reference_norms(model, loss_fn, x, torch.zeros(5))
    assert rel_err(stats.per_sample, per_sample) <= RTOL and rel_err(stats.batch_grad_sq, batch) <= RTOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "replay"])
def test_identity_products_are_skipped_only_inside_the_call(fused, monkeypatch):
    """The identity projections never reach a real matrix product, and F.linear is whatever it
    was before (here a user's own wrapper) once the call returns."""
    model, packed = make()
    identity_products = []
    original = F.linear

    def users_linear(input, weight, bias=None):
        identity_products.append(id(weight) in attention._IDENTITY_IDS)
        return original(input, weight, bias)

    monkeypatch.setattr(F, "linear", users_linear)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss_fn(model(packed), None).backward()
        tracker.collect()
    assert F.linear is users_linear
    assert identity_products and not any(identity_products)


def test_add_bias_kv_keeps_the_generic_route():
    torch.manual_seed(0)
    model = Attend(8)
    model.mha = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    packed = torch.randn(3, 4, 9)
    packed[..., -1] = 0
    stats, routes = tracked(model, packed, fused=True)
    assert routes["mha"].startswith("generic")
    per_sample, _, _ = reference_norms(model, loss_fn, packed, torch.zeros(3))
    assert rel_err(stats.per_sample, per_sample) <= RTOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "replay"])
def test_one_module_called_for_self_and_cross_attention(fused):
    """Two calls of one module, packed (self) and separate (cross) projections: combined exactly."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.mha(x, x, x, need_weights=False)[0]
            return self.mha(h, x, x, need_weights=False)[0].flatten(1)

    torch.manual_seed(4)
    model, x = Twice(), torch.randn(3, 5, 8)
    stats, _ = tracked(model, x, fused)
    per_sample, _, batch = reference_norms(model, loss_fn, x, torch.zeros(3))
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


def test_transformer_decoder_layer_with_causal_mask_and_dropout():
    """Self-attention under a causal mask plus cross-attention to a memory sequence."""

    class Decode(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)

        def forward(self, packed):  # [B, T + S, 8]: 4 target positions, then the memory
            tgt, memory = packed[:, :4], packed[:, 4:]
            mask = nn.Transformer.generate_square_subsequent_mask(4)
            return self.layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True).flatten(1)

    torch.manual_seed(2)
    model, x = Decode(), torch.randn(4, 9, 8)
    expected = brute_force_norms(model, x, seed=13)
    torch.manual_seed(13)
    with GradNormTracker(model, "sum") as tracker:
        loss_fn(model(x), None).backward()
        assert rel_err(tracker.collect().per_sample, expected) <= RTOL
    model.eval()
    stats, routes = tracked(model, x, fused=True)
    per_sample, _, batch = reference_norms(model, loss_fn, x, torch.zeros(4))
    assert rel_err(stats.per_sample, per_sample) <= RTOL and rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert routes["layer.self_attn"] == routes["layer.multihead_attn"] == "fused attention"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_half_precision_input_under_cpu_autocast(fused):
    """Under autocast a Linear before the attention hands it a bfloat16 input: the replay of its
    projections ran outside autocast and met the float32 weights (a dtype error in the backward).
    It runs under the forward's autocast now. Against each sample's own backward through the same
    autocast forward."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)  # (bfloat16 under autocast)
            return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))

    model = Block()
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))

    def loss(out, target):
        return F.cross_entropy(out, target, reduction="sum")

    def forward(inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inputs).float()

    stats = second_backward_stats(model, loss, forward, x, y, fused=fused)
    assert rel_err(stats.per_sample, each_sample_backward(model, loss, forward, x, y)) < 2e-2
