"""Verification: every parameter's gradient must be accounted for by its module's forward calls.

A parameter used outside its module's forward (a parent's ``h @ embed.weight.T``, a penalty
added to the loss) gets a gradient part whose per-sample split no rule sees; without the check
the norms would be silently wrong. Each rule's ``grad_sums`` forms the gradient its calls
account for; the tracker compares it with autograd's on verified backwards.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker

from .models_zoo import ZOO, sample_loss
from .oracle import autocast_checked, reference_norms, rel_err


class ChildWeightReused(nn.Module):
    """Calls ``lin`` and also uses ``lin.weight`` directly: the direct use is outside ``lin``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.out(F.linear(torch.tanh(h), self.lin.weight))


class FunctionalTiedHead(nn.Module):
    """A language model whose output layer is ``h @ embed.weight.T`` (no module for the head)."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, idx):
        return torch.tanh(self.mix(self.embed(idx))) @ self.embed.weight.t()


class AliasedBiasHead(nn.Module):
    """Hugging Face BERT's head pattern: the bias registered on the parent and on its decoder."""

    def __init__(self, dim=6, out=5, use_bias_directly=False):
        super().__init__()
        self.decoder = nn.Linear(dim, out)
        self.bias = nn.Parameter(torch.randn(out))
        self.decoder.bias = self.bias
        self.use_bias_directly = use_bias_directly

    def forward(self, x):
        y = self.decoder(x)
        return y + self.bias if self.use_bias_directly else y


def token_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def tracked_collect(model, x, y, loss_fn, **kwargs):
    with GradNormTracker(model, "sum", **kwargs) as tracker:
        loss_fn(model(x), y).backward()
        return tracker.collect()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_child_weight_used_by_parent_is_refused(fused):
    torch.manual_seed(0)
    model, x, y = ChildWeightReused(), torch.randn(4, 5, 6), torch.randint(0, 3, (4, 5))
    with pytest.raises(RuntimeError, match=r"'lin\.weight'.*outside that module's forward"):
        tracked_collect(model, x, y, token_loss, fused=fused)


class FunctionalTiedHeadWithBias(FunctionalTiedHead):
    """The same with a bias in the head's ``F.linear`` (a form the tracker does not follow)."""

    def __init__(self, vocab=11, dim=6):
        super().__init__(vocab, dim)
        self.out_bias = nn.Parameter(torch.randn(vocab))

    def forward(self, idx):
        return F.linear(torch.tanh(self.mix(self.embed(idx))), self.embed.weight, self.out_bias)


def test_functional_tied_head_is_followed_and_one_with_a_bias_is_refused():
    """``h @ embed.weight.T`` in the model's forward is read as a Linear tied to the Embedding
    (divebatch.layers.tied.TableProducts; refused before 2026-12-06); ``F.linear`` with a bias is
    not followed: its use of the table is refused by the check, with the forms that are."""
    torch.manual_seed(0)
    model, x, y = FunctionalTiedHead(), torch.randint(0, 11, (3, 7)), torch.randint(0, 11, (3, 7))
    stats = tracked_collect(model, x, y, token_loss)
    per_sample, _, batch = reference_norms(model, token_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-4 and rel_err(stats.batch_grad_sq, batch) <= 1e-4
    with pytest.raises(RuntimeError, match=r"'embed\.weight'.*nn\.Linear whose weight is the embedding's.*not with a bias"):
        tracked_collect(FunctionalTiedHeadWithBias(), x, y, token_loss)


def test_penalty_in_the_loss_is_refused():
    model, x, y = ZOO["linear_3d"]()

    def penalised(out, y):
        return sample_loss(out, y) + 0.5 * sum(p.square().sum() for p in model.parameters())

    with pytest.raises(RuntimeError, match="weight decay in the optimizer"):
        tracked_collect(model, x, y, penalised)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "cpu-autocast-bfloat16"])
def test_refusal_under_cpu_bfloat16_autocast_says_autograd_may_be_the_one_off(autocast):
    """PyTorch's CPU LayerNorm backward in bfloat16 rounds its parameter gradients by several percent,
    which the accounting check cannot tell from an outside use: after such a forward, the refusal
    says so and how to run the norms in float32."""
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    x = torch.randn(3, 5, 8)
    with GradNormTracker(model, "sum") as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        (out.float().square().sum() + model[1].weight.square().sum()).backward()  # an outside use
        with pytest.raises(RuntimeError, match="weight decay in the optimizer") as refusal:
            tracker.collect()
    assert ("CPU LayerNorm backward in bfloat16" in str(refusal.value)) is autocast


def test_layer_norm_under_cpu_bfloat16_autocast_is_judged_by_its_rounding():
    """Over 3,136 rows PyTorch's CPU LayerNorm backward in bfloat16 rounds the LayerNorm's parameter
    gradients by ~10% of their norm; the check allows a bfloat16 sum's rounding over that many terms
    (2^-8 sqrt(rows)) for such a layer instead of refusing it as an outside use, and the norms
    match each sample's own backward through the same autocast forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 4))
    autocast_checked(model, lambda out, y: out.square().sum(), torch.randn(8, 392, 16) * 3, torch.zeros(8), samples=2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_layer_norm_of_a_bfloat16_model_on_cpu_is_judged_by_its_rounding(fused):
    """The same for a model in bfloat16 (no autocast): its CPU LayerNorm backward rounds alike, and
    it was refused as an outside use; the norms match each sample's own backward in bfloat16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 4)).to(torch.bfloat16)
    x = (torch.randn(8, 392, 16) * 3).to(torch.bfloat16)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        model(x).float().square().sum().backward()
        per_sample = tracker.collect().per_sample
    expected = []
    for i in range(2):
        model.zero_grad()
        model(x[i:i + 1]).float().square().sum().backward()
        expected.append(sum(p.grad.double().square().sum() for p in model.parameters()))
    assert rel_err(per_sample[:2], torch.stack(expected)) <= 2e-2


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("case", sorted(ZOO))
def test_zoo_gradients_fully_accounted(case, fused):
    """What each rule says its calls account for equals autograd's gradient, module by module."""
    model, x, y = ZOO[case]()
    stats = tracked_collect(model, x, y, sample_loss, fused=fused)
    # (not the tie's cross-term entry, which has no module, nor an Embedding's weight applied by the
    # model's code, 'wte@model', which is the Embedding's parameter, compared under its name)
    assert stats.unaccounted is not None and set(stats.unaccounted) == {
        name for name in stats.per_layer if "+" not in name and "@" not in name}
    for name, rel in stats.unaccounted.items():
        assert rel <= 1e-5, name


def test_verify_every_schedule():
    model, x, y = ZOO["linear_3d"]()
    verified = {}
    for every in (0, 1, 3):
        with GradNormTracker(model, "sum", verify_every=every) as tracker:
            flags = []
            for _ in range(7):
                model.zero_grad()
                sample_loss(model(x), y).backward()
                flags.append(tracker.collect().unaccounted is not None)
        verified[every] = [i for i, flag in enumerate(flags) if flag]
    assert verified == {0: [0], 1: list(range(7)), 3: [0, 3, 6]}


def test_outside_use_that_starts_later_is_caught_at_the_next_verified_backward():
    torch.manual_seed(0)
    model, x, y = ChildWeightReused(), torch.randn(4, 5, 6), torch.randint(0, 3, (4, 5))
    plain = nn.Sequential(model.lin, model.out)  # the same modules without the direct use
    with GradNormTracker(model, "sum", verify_every=2) as tracker:
        token_loss(plain(x), y).backward()        # backward 0: verified, clean
        assert tracker.collect().unaccounted is not None
        token_loss(model(x), y).backward()        # backward 1: not verified
        assert tracker.collect().unaccounted is None
        token_loss(model(x), y).backward()        # backward 2: verified, caught
        with pytest.raises(RuntimeError, match="outside that module's forward"):
            tracker.collect()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "often"])
def test_bad_verify_every_is_refused(bad):
    with pytest.raises(ValueError, match="verify_every"):
        GradNormTracker(nn.Linear(2, 2), verify_every=bad)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_bias_registered_on_parent_and_child_is_the_childs(fused):
    torch.manual_seed(0)
    model, x, y = AliasedBiasHead(), torch.randn(3, 4, 6), torch.randint(0, 5, (3, 4))
    stats = tracked_collect(model, x, y, token_loss, fused=fused)
    per_sample, _, batch = reference_norms(model, token_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5
    assert set(stats.per_layer) == {"decoder"}


def test_aliased_bias_also_used_by_the_parent_is_refused():
    torch.manual_seed(0)
    model, x, y = AliasedBiasHead(use_bias_directly=True), torch.randn(3, 4, 6), torch.randint(0, 5, (3, 4))
    with pytest.raises(RuntimeError, match=r"'decoder\.bias'.*outside that module's forward"):
        tracked_collect(model, x, y, token_loss)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_a_gradient_that_cancels_over_the_samples_is_not_taken_for_an_outside_use(fused):
    """A BatchNorm followed by another one in training mode (EfficientNet's expansion BatchNorm
    at 1x1 resolution before a depthwise convolution and its BatchNorm): the second normalises
    away any per-channel shift, so the first one's bias gradient is rounding (~1e-17), while
    each sample's share of it is not. Judged against that gradient alone the rounding looked like
    an outside use; it is judged against the samples' shares too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        sample_loss(model(x), y).backward()
        stats = tracker.collect()
    bias_grad = model[1].bias.grad.norm()
    assert bias_grad < 1e-6 * stats.per_layer["1"].sum().sqrt()  # the regime under test
    assert stats.unaccounted["1"] <= 1e-5
    batch = sum(p.grad.double().square().sum() for p in model.parameters())
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-4


class AddedAndTaken(nn.Module):
    """``x + v - v``: the parameter's gradient and each sample's vanish by construction, and both
    sides of the comparison are rounding of the output grads' sums."""

    def __init__(self, d):
        super().__init__()
        self.v = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return (x + self.v) + (-self.v)


class CentredGain(nn.Module):
    """Tokens centred over the sequence, times a gain, then averaged over it: the gain's gradient
    is the gain times the mean of centred values, zero by construction."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, h):
        return ((h - h.mean(1, keepdim=True)) * self.gain).mean(1)


def _vanishing_model(kind):
    torch.manual_seed(0)
    if kind == "added and taken":
        model = nn.Sequential(nn.Linear(3, 4), AddedAndTaken(4), nn.Linear(4, 3))
        return model, torch.randn(5, 3), torch.randint(0, 3, (5,))
    model = nn.Sequential(nn.Embedding(11, 6), CentredGain(6), nn.Linear(6, 3))
    return model, torch.randint(0, 11, (5, 4)), torch.randint(0, 3, (5,))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("kind", ["added and taken", "centred gain"])
def test_a_gradient_that_vanishes_by_construction_is_not_taken_for_an_outside_use(kind, fused):
    """Both sides are rounding (1e-8 against 0, a relative difference of inf; 12% for the gain):
    below float32's rounding of the backward's largest module gradient, no outside use is
    claimed. A penalty of 1e-4 on that parameter is still refused."""
    model, x, y = _vanishing_model(kind)

    def loss(out, target):
        return F.cross_entropy(out, target, reduction="sum")

    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss(model(x), y).backward()
        stats = tracker.collect()
    per_sample, _, _ = reference_norms(model, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    parameter = model[1].v if kind == "added and taken" else model[1].gain

    def penalised(out, target):
        return loss(out, target) + 1e-4 * parameter.square().sum()

    with GradNormTracker(model, "sum", fused=fused) as tracker:
        with pytest.raises(RuntimeError, match="weight decay in the optimizer"):
            penalised(model(x), y).backward()
            tracker.collect()
