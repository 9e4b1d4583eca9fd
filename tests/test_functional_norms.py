"""Generic-route modules that normalise with functional ops or views of their own parameters
(Hugging Face's channels-first ``ConvNextLayerNorm``, timm's ``LayerNorm2d`` and
``BatchNormAct2d``, ``F.group_norm`` with a module's own weight, ``w[:, None, None] * x``) take the broadcast-uses route: the
recorder computes ``norm(x) * weight + bias`` itself and records the product and the sum, so
nothing is replayed. Exact against torch.func; the forward's values are unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker

from .oracle import reference_norms, rel_err


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """Hugging Face ConvNeXt's pattern: nn.LayerNorm's forward over the channels of [B, C, H, W]."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Affine(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))


class KeywordLayerNorm(_Affine):
    """timm's LayerNorm2d, keyword arguments."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, (x.shape[-1],), weight=self.weight, bias=self.bias, eps=1e-6).permute(0, 3, 1, 2)


class FunctionalGroupNorm(_Affine):
    def forward(self, x):
        return F.group_norm(x, 2, self.weight, self.bias)


class FunctionalRMSNorm(_Affine):
    """Weight only; the bias is added as a view (``[:, None, None]``) after the norm."""

    def forward(self, x):
        h = F.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, eps=1e-6).permute(0, 3, 1, 2)
        return h + self.bias[:, None, None]


class HandWrittenChannelsFirst(_Affine):
    """The older ConvNeXt code: statistics by hand, then views and a dtype cast of the parameters,
    and a read of the weight's dtype (no gradient flows through that)."""

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = ((x - u) / torch.sqrt(s + 1e-6)).to(self.weight.dtype)
        return self.weight[:, None, None] * x + self.bias.view(1, -1, 1, 1).to(x.dtype)


class OnePlusWeight(nn.Module):
    """Gemma's RMSNorm pattern on channels: ``x_hat * (1.0 + w.float())``, then ``- b / 2`` and
    ``-(-s) * 0.5``: constants added to, or multiplying, a parameter before its broadcast use."""

    def __init__(self, c=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c) * 0.1)
        self.bias = nn.Parameter(torch.randn(c))
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
        h = h * (1.0 + self.weight.float())[:, None, None]
        h = h - (self.bias / 2).view(1, -1, 1, 1)
        return torch.tanh(h) * (-(-self.scale) * 0.5)[:, None, None]


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: ``F.batch_norm`` with its own weight and bias, then an activation,
    in a subclass's own forward (so no BatchNorm rule: the generic route)."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                   self.momentum, self.eps))


def conv_model(norm):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.GELU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))


NORMS = {
    "channels-first-layer-norm": lambda: ChannelsFirstLayerNorm(4),
    "keyword-layer-norm": KeywordLayerNorm,
    "group-norm": FunctionalGroupNorm,
    "rms-norm": FunctionalRMSNorm,
    "hand-written": HandWrittenChannelsFirst,
    "one-plus-weight": OnePlusWeight,
    "batch-norm-act": lambda: BatchNormAct(4).eval(),  # (in eval mode a sample's gradient is defined)
}


def loss_fn(out, y):
    return 0.5 * (out - y).square().sum()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_matches_torch_func_without_replay(norm, fused):
    torch.manual_seed(0)
    model = conv_model(NORMS[norm]())
    with torch.no_grad():
        model[1].bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(3, 3, 5, 5), torch.randn(3, 2)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss_fn(model(x), y).backward()
        stats = tracker.collect()
        route = {plan.module: plan.route for plan in tracker.plan()}["1"]
    per_sample, per_param, batch = reference_norms(model, loss_fn, x, y)
    assert route == "generic (broadcast uses)"
    assert rel_err(stats.per_layer["1"], sum(v for k, v in per_param.items() if k.startswith("1."))) <= 1e-5
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5
    assert max(stats.unaccounted.values()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["channels-first-layer-norm", "group-norm", "rms-norm", "batch-norm-act"])
def test_forward_values_are_unchanged(norm, dtype):
    """The recorded form computes in float32 for half-precision inputs, as the fused kernels do,
    so the output matches the untracked module's (rounded once, not twice)."""
    torch.manual_seed(0)
    module = NORMS[norm]().to(dtype)
    x = torch.randn(4, 4, 6, 6, dtype=dtype)
    expected = module(x)
    with GradNormTracker(nn.Sequential(module), "sum"):
        actual = module(x)
    assert actual.dtype == expected.dtype
    tol = 1e-6 if dtype == torch.float32 else 0.0
    assert (actual.float() - expected.float()).abs().max().item() <= tol * expected.abs().max().item()


def test_batch_norm_subclass_in_training_mode_matches_the_batch_norm_rule():
    """In training mode the batch statistics mix the samples; the recorded form gives the same
    decomposition as nn.BatchNorm2d's own rule, and the running statistics move once, as untracked."""
    torch.manual_seed(0)
    model = conv_model(BatchNormAct(4))
    plain = conv_model(nn.BatchNorm2d(4))
    plain.load_state_dict(model.state_dict())
    untracked = conv_model(BatchNormAct(4))
    untracked.load_state_dict(model.state_dict())
    plain[2] = nn.Sequential(nn.ReLU(), nn.GELU())  # BatchNormAct's ReLU, then the GELU
    x, y = torch.randn(3, 3, 5, 5), torch.randn(3, 2)
    untracked(x)
    results = []
    for net in (model, plain):
        with GradNormTracker(net, "sum") as tracker:
            loss_fn(net(x), y).backward()
            results.append((tracker.collect(), {plan.module: plan.route for plan in tracker.plan()}["1"]))
    (stats, route), (expected, _) = results
    assert route == "generic (broadcast uses)"
    assert rel_err(stats.per_sample, expected.per_sample) <= 1e-5
    assert rel_err(stats.per_layer["1"], expected.per_layer["1"]) <= 1e-5
    assert torch.allclose(model[1].running_mean, untracked[1].running_mean)
    assert torch.allclose(model[1].running_var, untracked[1].running_var)
    assert model[1].num_batches_tracked == untracked[1].num_batches_tracked


@pytest.mark.parametrize("norm", ["channels-first-layer-norm", "batch-norm-act"])
def test_autocast_output_dtype_is_unchanged(norm):
    torch.manual_seed(0)
    model = conv_model(NORMS[norm]())
    x, y = torch.randn(3, 3, 5, 5), torch.randn(3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model[:2](x)
    with GradNormTracker(model, "sum") as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model[:2](x)
            loss_fn(model[2:](actual).float(), y).backward()
        stats = tracker.collect()
        route = {plan.module: plan.route for plan in tracker.plan()}["1"]
    per_sample, _, _ = reference_norms(model, loss_fn, x, y)
    assert actual.dtype == expected.dtype
    assert torch.allclose(actual.float(), expected.float(), atol=1e-2)
    assert route == "generic (broadcast uses)"
    assert rel_err(stats.per_sample, per_sample) <= 5e-2  # bfloat16 forward against a float32 reference


class NormOfAParameter(nn.Module):
    """Normalises a parameter (not a batched input): not a broadcast use, replayed."""

    def __init__(self, c=4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(c, c))

    def forward(self, x):
        return x @ F.layer_norm(self.table, (4,))


def test_a_norm_of_a_parameter_is_replayed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), NormOfAParameter())
    x, y = torch.randn(3, 5, 3), torch.randn(3, 5, 4)
    with GradNormTracker(model, "sum") as tracker:
        loss_fn(model(x), y).backward()
        stats = tracker.collect()
        route = {plan.module: plan.route for plan in tracker.plan()}["1"]
    per_sample, _, _ = reference_norms(model, loss_fn, x, y)
    assert route == "generic (vmap vjp)"
    assert rel_err(stats.per_sample, per_sample) <= 1e-5


# --------------------------------------------------------------------------- lookups in an own forward
class LearnedPositions(nn.Embedding):
    """OPT's/BART's learned positions: an nn.Embedding subclass whose forward makes the ids (one
    row per sample, from the attention mask, offset by 2) and calls nn.Embedding's forward."""

    def __init__(self, n, d, per_sample=True, **kwargs):
        super().__init__(n + 2, d, **kwargs)
        self.per_sample = per_sample

    def forward(self, mask):
        if not self.per_sample:  # [1, T]: one row for all samples (broadcast by the caller's +)
            return super().forward(torch.arange(mask.shape[1]).unsqueeze(0) + 2)
        return super().forward((torch.cumsum(mask, dim=1) * mask - 1).long() + 2)


class PositionsModel(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(11, 6), LearnedPositions(7, 6, **kwargs)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.tokens(ids) + self.positions((ids != 0).long()))


def _token_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


@pytest.mark.parametrize("kwargs, route", [
    ({}, "generic (broadcast uses)"),
    ({"padding_idx": 1}, "generic (broadcast uses)"),       # mask 0 -> id 1: padded rows get no gradient
    ({"per_sample": False}, "generic (vmap vjp)"),          # [1, T] ids shared by the samples: the watcher's
], ids=["per-sample ids", "padding", "shared ids"])
def test_lookups_in_an_embedding_subclass_forward(kwargs, route):
    torch.manual_seed(0)
    model = PositionsModel(**kwargs)
    ids = torch.randint(0, 11, (3, 7))
    ids[0, 5:] = 0  # padding at the end of one sample
    y = torch.randint(0, 3, (3, 7))
    with GradNormTracker(model, "sum") as tracker:
        _token_loss(model(ids), y).backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    per_sample, _, batch = reference_norms(model, _token_loss, ids, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5 and rel_err(stats.batch_grad_sq, batch) <= 1e-5
    assert routes["positions"] == route
