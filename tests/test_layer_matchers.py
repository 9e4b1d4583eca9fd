"""Which rule a module gets: by type (a subclass only if it keeps the forward) or by its forward's code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers import rule_for
from divebatch.layers.generic import GenericRule
from divebatch.layers.norm import LlamaRMSNormRule

from .oracle import reference_norms, rel_err


class CopiedRMSNorm(nn.Module):
    """A per-model copy of Hugging Face's LlamaRMSNorm, as transformers writes them."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class CastAfterScaleRMSNorm(CopiedRMSNorm):
    """Another family's variant: the weight multiplies before the cast (different code)."""

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


class Block(nn.Module):
    def __init__(self, norm_cls, dim=8):
        super().__init__()
        self.norm = norm_cls(dim)
        self.proj = nn.Linear(dim, 3)

    def forward(self, x):
        return self.proj(self.norm(x))


def loss_fn(out, y):
    return 0.5 * (out - y).square().sum()


def test_copied_forward_takes_the_rule_a_variant_the_generic_route():
    assert isinstance(rule_for(CopiedRMSNorm(4)), LlamaRMSNormRule)
    assert isinstance(rule_for(CastAfterScaleRMSNorm(4)), GenericRule) or rule_for(CastAfterScaleRMSNorm(4)) is None


@pytest.mark.parametrize("norm_cls", [CopiedRMSNorm, CastAfterScaleRMSNorm])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_rms_norm_copies_match_torch_func(norm_cls, fused):
    torch.manual_seed(0)
    model = Block(norm_cls)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x, y = torch.randn(4, 5, 8), torch.randn(4, 5, 3)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss_fn(model(x), y).backward()
        stats = tracker.collect()
        route = {plan.module: plan.route for plan in tracker.plan()}["norm"]
    per_sample, _, batch = reference_norms(model, loss_fn, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5
    assert max(stats.unaccounted.values()) <= 1e-5
    assert (route == "instantiate") == (norm_cls is CopiedRMSNorm)


def test_rms_norm_rule_in_bfloat16_uses_the_bf16_normalised_input():
    """In bf16 the forward casts x_hat back to bf16 before the weight multiplies it; the per-sample
    weight gradient is sum_t x_hat_t * g_t with that bf16 x_hat, checked here in float64."""
    torch.manual_seed(0)
    model = Block(CopiedRMSNorm).to(torch.bfloat16)
    x, y = torch.randn(4, 5, 8, dtype=torch.bfloat16), torch.randn(4, 5, 3, dtype=torch.bfloat16)
    seen = {}

    def keep_output_grad(module, args, out):
        out.register_hook(lambda g: seen.setdefault("g", g))

    model.norm.register_forward_hook(keep_output_grad)
    with GradNormTracker(model, "sum") as tracker:
        loss_fn(model(x).float(), y.float()).backward()
        tracked = tracker.collect().per_layer["norm"]
    x_hat = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).double()
    expected = (x_hat * seen["g"].double()).sum(dim=1).square().sum(dim=1)
    assert rel_err(tracked, expected) <= 1e-5


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """Hugging Face ConvNeXt's pattern: LayerNorm over channels of a [B, C, H, W] input."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PlainLinearSubclass(nn.Linear):
    """A subclass that keeps nn.Linear's forward."""


def test_subclass_keeping_the_forward_takes_the_rule_one_overriding_it_does_not():
    from divebatch.layers.linear import LinearRule
    from divebatch.layers.norm import BatchNormRule

    assert isinstance(rule_for(PlainLinearSubclass(3, 2)), LinearRule)
    assert isinstance(rule_for(nn.SyncBatchNorm(4)), BatchNormRule)
    assert rule_for(ChannelsFirstLayerNorm(4)) is None  # generic route


def test_overridden_forward_is_exact_through_the_generic_route():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ChannelsFirstLayerNorm(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(3, 3, 4, 4), torch.randn(3, 2)
    with GradNormTracker(model, "sum") as tracker:
        loss_fn(model(x), y).backward()
        stats = tracker.collect()
        route = {plan.module: plan.route for plan in tracker.plan()}["1"]
    per_sample, _, batch = reference_norms(model, loss_fn, x, y)
    assert route == "generic (broadcast uses)"  # its F.layer_norm's affine part is recorded
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5
