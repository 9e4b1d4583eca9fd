"""A module with parameters of its own and no rule (a ConvNeXt block's layer scale, ViT's class
token and position table) takes the generic route for *its own* parameters only; the modules
inside keep their rules. Inner modules a call does not call (their weights used directly, e.g. a
weight-normalised projection) are covered by that call's per-sample gradients instead."""

from __future__ import annotations

from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from divebatch import GradNormTracker

from .models_zoo import add_concatenated_qkv, concatenated_qkv, sample_loss
from .oracle import autocast_checked, reference_norms, rel_err, tracked_and_checked, tracked_step


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style residual block: ``x + gamma * mlp(norm(dwconv(x)))``, gamma its own parameter."""

    def __init__(self, dim=4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.down(F.gelu(self.up(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class PatchEmbedding(nn.Module):
    """ViT-style: patch convolution, a class token and a position table of its own."""

    def __init__(self, dim=6, patch=2, positions=5):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, positions, dim))

    def forward(self, x):
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos


class WeightNormed(nn.Module):
    """Uses its child's weight directly, never calling the child: ``F.linear(x, scale * proj.weight)``."""

    def __init__(self, d=5, p=3):
        super().__init__()
        self.proj = nn.Linear(d, p)
        self.scale = nn.Parameter(torch.rand(p, 1) + 0.5)

    def forward(self, x):
        return F.linear(x, self.scale * self.proj.weight, self.proj.bias)


class CallsAndReuses(nn.Module):
    """Calls its child and also uses the child's weight directly: refused."""

    def __init__(self, d=5):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.gain = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return F.linear(torch.tanh(self.proj(x)) * self.gain, self.proj.weight)


class SometimesCalled(nn.Module):
    """Calls its child only when ``use_extra`` is set."""

    def __init__(self, d=5):
        super().__init__()
        self.main = nn.Linear(d, d)
        self.extra = nn.Linear(d, d)
        self.gain = nn.Parameter(torch.rand(d) + 0.5)
        self.use_extra = False

    def forward(self, x):
        h = self.main(x) * self.gain
        return self.extra(h) if self.use_extra else h


class ScaledWeightNormed(nn.Module):
    """A layer-scale block around ``WeightNormed`` (timm's BEiT block around its attention, which
    uses its qkv Linear's weight itself): the uncalled Linear is covered by the inner call only."""

    def __init__(self, d=5):
        super().__init__()
        self.inner = WeightNormed(d, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x + self.gamma * self.inner(x)


class BiasedAttention(nn.Module):
    """A learned relative-position table gathered into ``F.scaled_dot_product_attention``'s
    ``attn_mask`` (timm's BEiT): a tensor computed from the table, broadcast over the samples."""

    def __init__(self, d=4, heads=2, T=5):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.table = nn.Parameter(torch.randn(2 * T - 1, heads))
        self.register_buffer("index", torch.arange(T)[:, None] - torch.arange(T)[None, :] + T - 1)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].permute(2, 0, 1).unsqueeze(0)  # [1, heads, T, T]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, T, d)


class AroundBiasedAttention(nn.Module):
    """Uses its child ``skip``'s weight itself, around a ``BiasedAttention``."""

    def __init__(self, d=16):
        super().__init__()
        self.attn = BiasedAttention(d)
        self.skip = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x + self.gamma * self.attn(x) + F.linear(x, self.skip.weight)


class ConcatenatedBiasAttention(BiasedAttention):
    """timm's BEiT and EVA attention: q and v biases of its own and a constant zero k bias,
    concatenated into the bias of ``F.linear`` with its ``qkv`` Linear's weight (that Linear never
    called), and the relative-position table gathered into SDPA's mask."""

    def __init__(self, d=4, heads=2, T=5):
        super().__init__(d, heads, T)
        add_concatenated_qkv(self, d)

    def forward(self, x):
        B, T, d = x.shape
        qkv = concatenated_qkv(self, x)
        q, k, v = qkv.view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].permute(2, 0, 1).unsqueeze(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, T, d)


class ReadsInnerDtype(nn.Module):
    """Reads its inner Linear's weight's dtype (as Hugging Face's DINOv2 and Data2Vec-vision
    embeddings do) before calling it: no use of the weight."""

    def __init__(self, d=5):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.gamma * self.proj(x.to(self.proj.weight.dtype))


def image_model():
    return nn.Sequential(LayerScaleBlock(), LayerScaleBlock(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def vit_model():
    return nn.Sequential(PatchEmbedding(), nn.LayerNorm(6), nn.Flatten(), nn.Linear(5 * 6, 3))


CASES = {
    "layer-scale": (image_model, lambda: torch.randn(3, 4, 4, 4)),
    "patch-embedding": (vit_model, lambda: torch.randn(3, 3, 4, 4)),
    "weight-normed": (lambda: nn.Sequential(WeightNormed(), nn.Tanh(), nn.Linear(3, 2)), lambda: torch.randn(3, 4, 5)),
    "nested-weight-normed": (lambda: nn.Sequential(ScaledWeightNormed(), ScaledWeightNormed(), nn.Linear(5, 2)),
                             lambda: torch.randn(3, 4, 5)),
    "biased-attention": (lambda: nn.Sequential(BiasedAttention(), BiasedAttention(), nn.Linear(4, 2)),
                         lambda: torch.randn(3, 5, 4)),
    "around-attention": (lambda: nn.Sequential(AroundBiasedAttention(), nn.Linear(16, 2)),
                         lambda: torch.randn(3, 5, 16)),
    "concatenated-bias-attention": (lambda: nn.Sequential(ConcatenatedBiasAttention(), nn.Linear(4, 2)),
                                    lambda: torch.randn(3, 5, 4)),
}


def loss_fn(out, y):
    return 0.5 * (out - y).square().sum()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_func(case, fused):
    torch.manual_seed(0)
    make_model, make_x = CASES[case]
    model, x = make_model(), make_x()
    y = torch.randn(*model(x).shape)
    stats, routes = tracked_step(model, loss_fn, x, y, fused)
    per_sample, _, batch = reference_norms(model, loss_fn, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5
    assert max(stats.unaccounted.values()) <= 1e-5


@pytest.mark.parametrize("case, module", [
    ("biased-attention", "0"), ("around-attention", "0"), ("around-attention", "0.attn"),
    ("concatenated-bias-attention", "0")])
def test_attention_biases_and_inner_weights_are_read_without_replay(case, module):
    """A gathered table as SDPA's mask, and an inner Linear's weight the module applies itself
    (``F.linear(x, self.skip.weight)``, BEiT's ``qkv.weight`` with a concatenated bias): products
    and broadcast uses read from their ops, no replay of the forward."""
    torch.manual_seed(0)
    make_model, make_x = CASES[case]
    model, x = make_model(), make_x()
    _, routes = tracked_step(model, loss_fn, x, torch.randn(*model(x).shape))
    assert routes[module] == "generic (computed weights)"


def test_concatenated_bias_product_under_autocast():
    """The product with a computed bias under ``torch.autocast`` (a float32 input, a bfloat16
    output grad: the per-sample products ran on both and failed with a dtype error). Against each
    sample's own backward through the same autocast forward."""
    torch.manual_seed(0)
    model = nn.Sequential(ConcatenatedBiasAttention(8), nn.Linear(8, 2))
    autocast_checked(model, lambda out, y: out.square().sum(), torch.randn(3, 5, 8), torch.zeros(3))


class _WeightGradGemms(TorchDispatchMode):
    """Counts the backward's GEMMs (``mm``/``addmm``) whose output has a given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and tuple(out.shape) == self.shape:
            self.count += 1
        return out


def test_concatenated_bias_product_takes_its_weight_gradient_from_the_per_sample_ones():
    """BEiT's and EVA's ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``: its per-sample
    weight gradients are formed anyway, so their sum is the weight's gradient and autograd's own
    weight-gradient GEMM is not run again. (With windows folded into the batch, SwinV2, the op stays
    ``F.linear``, whose autograd node the row proof reads: ``tests/test_windows.py``.)"""
    torch.manual_seed(0)
    d = 8
    model = nn.Sequential(ConcatenatedBiasAttention(d), nn.Linear(d, 2))
    plain = nn.Sequential(ConcatenatedBiasAttention(d), nn.Linear(d, 2))
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(3, 5, d), torch.randn(3, 5, 2)
    gemms = _WeightGradGemms(model[0].qkv.weight.shape)
    with gemms:
        loss_fn(plain(x), y).backward()
    assert gemms.count == 1  # autograd's, untracked
    gemms.count = 0
    with GradNormTracker(model, "sum") as tracker:
        with gemms:
            loss_fn(model(x), y).backward()
        stats = tracker.collect()
    assert gemms.count == 0
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    per_sample, _, batch = reference_norms(model, loss_fn, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


def test_inner_modules_keep_their_rules():
    torch.manual_seed(0)
    model, x = image_model(), torch.randn(3, 4, 4, 4)
    _, routes = tracked_step(model, loss_fn, x, torch.randn(3, 3))
    assert routes["0"] == routes["1"] == "generic (broadcast uses)"  # gamma only
    assert routes["0.dwconv"] != "generic (vmap vjp)" and routes["0.norm"] == "instantiate"
    assert routes["0.up"] != "generic (vmap vjp)"


def test_uncalled_inner_module_entry_matches_its_parameters():
    torch.manual_seed(0)
    model, x = nn.Sequential(WeightNormed(), nn.Tanh(), nn.Linear(3, 2)), torch.randn(3, 4, 5)
    y = torch.randn(3, 4, 2)
    stats, _ = tracked_step(model, loss_fn, x, y)
    assert "0.proj" not in stats.per_layer  # its part is in the caller's entry
    _, per_param, _ = reference_norms(model, loss_fn, x, y)
    expected = per_param["0.scale"] + per_param["0.proj.weight"] + per_param["0.proj.bias"]
    assert rel_err(stats.per_layer["0"], expected) <= 1e-5


def test_uncalled_inner_module_is_covered_by_the_innermost_call_only():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledWeightNormed(), ScaledWeightNormed(), nn.Linear(5, 2))
    x, y = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    stats, routes = tracked_step(model, loss_fn, x, y)
    _, per_param, _ = reference_norms(model, loss_fn, x, y)
    for block in ("0", "1"):
        assert rel_err(stats.per_layer[block], per_param[f"{block}.gamma"]) <= 1e-5
        expected = sum(per_param[f"{block}.inner.{name}"] for name in ("scale", "proj.weight", "proj.bias"))
        assert rel_err(stats.per_layer[f"{block}.inner"], expected) <= 1e-5
    assert routes["0"] == "generic (broadcast uses)"


def test_inner_module_called_and_its_weight_reused_is_refused():
    torch.manual_seed(0)
    model, x = CallsAndReuses(), torch.randn(3, 4, 5)
    with pytest.raises(RuntimeError, match=r"'proj\.weight'.*outside that module's forward"):
        tracked_step(model, loss_fn, x, torch.randn(3, 4, 5))


@pytest.mark.parametrize("use_extra", [False, True])
def test_inner_module_called_on_some_steps(use_extra):
    torch.manual_seed(0)
    model, x, y = SometimesCalled(), torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    model.use_extra = use_extra
    stats, routes = tracked_step(model, loss_fn, x, y)
    per_sample, _, batch = reference_norms(model, loss_fn, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5
    assert ("extra" in routes) == use_extra


class RootTokens(nn.Module):
    """timm's ViT layout: class token and position table on the model itself, blocks inside."""

    def __init__(self, dim=6, n=4):
        super().__init__()
        self.proj = nn.Linear(5, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.proj(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(torch.tanh(x))


class Signed(nn.Module):
    """Every supported op, both operand orders: x - p, p - x, p * x (p broadcast), torch.add."""

    def __init__(self, d=5):
        super().__init__()
        self.a = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(1, d))
        self.c = nn.Parameter(torch.randn(d))
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = self.lin(x - self.a)
        h = torch.tanh(self.b - h) * self.c
        return torch.add(h, self.a)  # a second use of a: the two uses add up


class LayerNormLike(nn.Module):
    """Uses its parameters inside F.layer_norm: its affine part is a broadcast product and sum."""

    def __init__(self, d=5):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class MatmulLike(nn.Module):
    """Multiplies by its weight matrix: a product with each sample's rows, read per sample
    (``layers/experts.py``); the gain is a broadcast use."""

    def __init__(self, d=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d))
        self.gain = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return (x @ self.weight) * self.gain


class EinsumLike(MatmulLike):
    """The same product through ``einsum``: read as the product it is."""

    def forward(self, x):
        return torch.einsum("bti,io->bto", x, self.weight) * self.gain


class TensordotLike(MatmulLike):
    """The same product through ``tensordot``, which the recorder does not read: replayed."""

    def forward(self, x):
        return torch.tensordot(x, self.weight, dims=([2], [0])) * self.gain


class FunctionsOfParameters(nn.Module):
    """Elementwise functions of parameters broadcast over the samples (Mamba's ``-exp(A_log)``, a
    softplus scale, a sigmoid gate, a squared gain, a log and a sqrt): each reaches its parameter
    times the function's derivative, with no replay."""

    def __init__(self, d=5):
        super().__init__()
        self.log_decay = nn.Parameter(torch.randn(d, 1) * 0.3)
        self.raw_scale = nn.Parameter(torch.randn(d))
        self.gate = nn.Parameter(torch.randn(d))
        self.gain = nn.Parameter(torch.randn(d))
        self.positive = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):  # x: [B, T, d]
        decay = -torch.exp(self.log_decay.float())  # [d, 1]
        h = x * decay[None, None, :, 0] + F.softplus(self.raw_scale, beta=2.0) * torch.tanh(x)
        h = h * torch.sigmoid(self.gate) + self.gain.square()
        return h * torch.log(self.positive) + torch.sqrt(self.positive)


class FunctionInProduct(nn.Module):
    """A function of a weight matrix in a product (``x @ tanh(W)``): not read, replayed."""

    def __init__(self, d=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d))

    def forward(self, x):
        return x @ torch.tanh(self.weight)


class HeadBiases(nn.Module):
    """Biases split into heads before they are added (DeBERTa v1's ``q_bias``): ``view`` to
    ``[1, 1, H, d/H]`` and ``permute`` of the dims of 1 keep the values' order, so the sums stay
    broadcast uses."""

    def __init__(self, d=6, heads=2):
        super().__init__()
        self.heads = heads
        self.q_bias = nn.Parameter(torch.randn(d))
        self.k_bias = nn.Parameter(torch.randn(d))

    def forward(self, x):  # x: [B, T, d] -> [B, H, T, d/H]
        B, T, d = x.shape
        x = x.view(B, T, self.heads, -1).permute(0, 2, 1, 3)
        q = self.q_bias[None, None, :].view(1, 1, self.heads, -1).permute(0, 2, 1, 3)
        k = self.k_bias.reshape(self.heads, 1, -1).unsqueeze(0).transpose(0, 2)  # [1, H, 1, d/H]
        return torch.tanh(x + q) * (x - k)


class ReorderedParameter(nn.Module):
    """A parameter whose values are reordered before a broadcast use (a square weight transposed,
    a vector indexed by a permutation): not the parameter itself, never misread as it; a tensor
    computed from it, whose per-sample gradients are taken back through the reordering."""

    def __init__(self, how, d=5):
        super().__init__()
        self.how = how
        self.weight = nn.Parameter(torch.randn(d) if how == "index" else torch.randn(d, d))
        self.register_buffer("order", torch.arange(d).flip(0))

    def forward(self, x):  # x: [B, d, d]
        if self.how == "transpose":
            return x * self.weight.transpose(0, 1)
        if self.how == "permute":
            return x * self.weight.permute(1, 0)[None]
        return x * self.weight[self.order]


class OptionalMaskToken(nn.Module):
    """DINOv2's embeddings: a class token and a position table broadcast over the samples, and a
    mask token used only when a mask is given (none here). A parameter this call does not use
    has per-sample gradients of 0: the call is still read from its uses, not replayed (a replay
    would refuse the dropout these embeddings have in training mode)."""

    def __init__(self, d=5, T=4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.mask_token = nn.Parameter(torch.randn(1, d))
        self.position = nn.Parameter(torch.randn(1, T + 1, d))

    def forward(self, x, mask=None):  # x: [B, T, d]
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token, x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position


class AddcmulAffine(nn.Module):
    """timm's ResMLP affine and ConvNeXt-V2's global response norm: ``torch.addcmul(bias, weight, x)``
    with views of the parameters, and the method form with a ``value``."""

    def __init__(self, d=5):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.bias = nn.Parameter(torch.randn(d))
        self.gain = nn.Parameter(torch.randn(d))

    def forward(self, x):  # x: [B, T, d]
        h = torch.addcmul(self.bias.view(1, 1, -1), self.weight.view(1, 1, -1), x)
        return x.addcmul(self.gain, torch.tanh(h), value=0.5)


class StandardizedConv(nn.Conv2d):
    """timm's ScaledStdConv2d (NF-ResNets, NFNets): the weight standardised per output channel by
    ``F.batch_norm`` over the weight itself, scaled by a gain, then ``F.conv2d``; grouped and strided."""

    def __init__(self, cin=4, cout=6, k=3, **kwargs):
        super().__init__(cin, cout, k, **kwargs)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class InlineWeightNorm(nn.Module):
    """A weight norm written in the forward: ``F.linear(x, g * v / ||v||, b)``."""

    def __init__(self, d=5, p=4):
        super().__init__()
        self.v = nn.Parameter(torch.randn(p, d))
        self.g = nn.Parameter(torch.rand(p, 1) + 0.5)
        self.b = nn.Parameter(torch.randn(p))

    def forward(self, x):
        return F.linear(x, self.g * self.v / self.v.norm(dim=1, keepdim=True), self.b)


class InPlaceGain(nn.Module):
    """NFNets' ``out.mul_(self.skipinit_gain)``, and ``out += self.bias``."""

    def __init__(self, d=5):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.0))  # (NFNets start it at 0)
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        out = torch.tanh(x)
        out.mul_(self.gain)
        out += self.bias
        return x + out


class FromBatchedConstant(nn.Module):
    """A tensor computed from a parameter and the input (which needs no gradient here) by an op the
    recorder cannot split (a matrix product), then returned: its gradient would reach the parameter
    unseen, so the call is replayed."""

    def __init__(self, d=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x @ self.w.exp().diag())


class ComputedTimesInput(nn.Module):
    """A tensor computed from a parameter times the input (which needs no gradient here): a
    broadcast use of the computed tensor, the input's rows the samples."""

    def __init__(self, d=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(self.w.sum() * x)


class ScaledBuffer(nn.Module):
    """A parameter times a buffer with as many rows as there are samples (3), the product then
    broadcast along the last dim of the input: the buffer's rows are not samples, so the product
    is no per-sample use, and the call is replayed."""

    def __init__(self, d=3):
        super().__init__()
        self.g = nn.Parameter(torch.tensor([1.5]))
        self.register_buffer("freqs", torch.randn(d))

    def forward(self, x):  # x: [B, T, d] with B == d
        return torch.tanh(x * (self.g * self.freqs))


class ComputedThenAssigned(nn.Module):
    """A weight computed from a parameter, then changed by item assignment before the product
    (``w[0] = 0``, or a constant's rows assigned from the parameter): ``__setitem__`` returns None,
    so it looked like no use, and the product's recipe replayed the weight without the assignment
    (110% off, refused on verified backwards only). Replayed now."""

    def __init__(self, d=5, into_constant=False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d))
        self.into_constant = into_constant

    def forward(self, x):
        if self.into_constant:
            w = torch.zeros_like(self.w)
            w[:2] = self.w[:2]
        else:
            w = self.w * 1.0
            w[0] = 0.0
        return torch.tanh(F.linear(x, w))


class FunctionInLinear(nn.Module):
    """``F.linear`` of the input with an own weight and a bias computed from a parameter, or the
    other way round: the row products recorded the own operand and left the other's use out (72%
    off, refused on verified backwards only). Read as a computed product now."""

    def __init__(self, d=5, computed="bias"):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(d, d)), nn.Parameter(torch.randn(d))
        self.computed = computed

    def forward(self, x):
        if self.computed == "bias":
            return torch.tanh(F.linear(x, self.w, torch.tanh(self.b)))
        return torch.tanh(F.linear(x, torch.tanh(self.w), self.b))


class Raising(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        h = x * self.gain
        raise RuntimeError("boom")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("make, shape, route", [
    (RootTokens, (3, 4, 5), "generic (broadcast uses)"),
    (Signed, (3, 4, 5), "generic (broadcast uses)"),
    (LayerNormLike, (3, 4, 5), "generic (broadcast uses)"),
    (MatmulLike, (3, 4, 5), "generic (row uses)"),
    (EinsumLike, (3, 4, 5), "generic (row uses)"),
    (TensordotLike, (3, 4, 5), "generic (vmap vjp)"),
    (FunctionsOfParameters, (3, 4, 5), "generic (broadcast uses)"),
    (FunctionInProduct, (3, 4, 5), "generic (vmap vjp)"),
    (HeadBiases, (3, 4, 6), "generic (broadcast uses)"),
    (partial(ReorderedParameter, "transpose"), (3, 5, 5), "generic (computed weights)"),
    (partial(ReorderedParameter, "permute"), (3, 5, 5), "generic (computed weights)"),
    (partial(ReorderedParameter, "index"), (3, 5, 5), "generic (computed weights)"),
    (OptionalMaskToken, (3, 4, 5), "generic (broadcast uses)"),
    (AddcmulAffine, (3, 4, 5), "generic (broadcast uses)"),
    (StandardizedConv, (3, 4, 5, 5), "generic (standardised weights)"),
    (partial(StandardizedConv, stride=2, groups=2, padding=1), (3, 4, 5, 5), "generic (standardised weights)"),
    (partial(StandardizedConv, padding="same", dilation=2), (3, 4, 5, 5), "generic (computed weights)"),
    (InlineWeightNorm, (3, 4, 5), "generic (computed weights)"),
    (InPlaceGain, (3, 4, 5), "generic (broadcast uses)"),
    (FromBatchedConstant, (3, 4, 5), "generic (vmap vjp)"),
    (ComputedTimesInput, (3, 4, 5), "generic (computed weights)"),
    (ScaledBuffer, (3, 4, 3), "generic (vmap vjp)"),
    (ReadsInnerDtype, (3, 4, 5), "generic (broadcast uses)"),
    (ComputedThenAssigned, (3, 4, 5), "generic (vmap vjp)"),
    (partial(ComputedThenAssigned, into_constant=True), (3, 4, 5), "generic (vmap vjp)"),
    (FunctionInLinear, (3, 4, 5), "generic (computed weights)"),
    (partial(FunctionInLinear, computed="weight"), (3, 4, 5), "generic (computed weights)"),
], ids=["root-tokens", "signed", "functional-layer-norm", "product", "einsum", "replayed", "functions-of-parameters",
        "function-in-product", "head-biases", "transposed", "permuted", "indexed", "unused-parameter", "addcmul",
        "standardized-conv", "standardized-grouped-conv", "standardized-same-padding", "inline-weight-norm", "in-place-gain",
        "from-batched-constant", "computed-times-input", "buffer-rows-not-samples",
        "reads-inner-dtype", "computed-then-assigned", "assigned-into-a-constant",
        "computed-bias-in-linear", "computed-weight-in-linear"])
def test_broadcast_uses_match_torch_func(make, shape, route, fused):
    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    y = torch.randn(*model(x).shape)
    stats, routes = tracked_step(model, loss_fn, x, y, fused)
    per_sample, per_param, batch = reference_norms(model, loss_fn, x, y)
    assert routes[""] == route
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5
    own = sum(v for name, v in per_param.items() if "." not in name)
    assert rel_err(stats.per_layer[""], own) <= 1e-5
    assert max(stats.unaccounted.values()) <= 1e-5


def test_layer_scale_and_patch_embedding_take_the_broadcast_route():
    torch.manual_seed(0)
    _, routes = tracked_step(image_model(), loss_fn, torch.randn(3, 4, 4, 4), torch.randn(3, 3))
    assert routes["0"] == routes["1"] == "generic (broadcast uses)"
    _, routes = tracked_step(vit_model(), loss_fn, torch.randn(3, 3, 4, 4), torch.randn(3, 3))
    assert routes["0"] == "generic (broadcast uses)"


def test_a_forward_that_raises_leaves_no_mode_behind():
    model = Raising()
    with GradNormTracker(model, "sum"):
        depth = torch._C._len_torch_function_stack()
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(2, 3))
        assert torch._C._len_torch_function_stack() == depth


class CatAndExpand(nn.Module):
    """One parameter used twice: by expand (a broadcast use) and inside torch.cat's list (not one)."""

    def __init__(self, d=6):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        tokens = torch.cat([self.token, self.token.expand(x.shape[0] - 1, -1, -1)], dim=0)
        return self.head(torch.cat([tokens.expand(-1, 2, -1), x], dim=1))


def test_a_use_inside_a_list_is_seen_and_replayed():
    torch.manual_seed(0)
    model, x = CatAndExpand(), torch.randn(3, 4, 6)
    y = torch.randn(*model(x).shape)
    stats, routes = tracked_step(model, loss_fn, x, y)
    per_sample, _, batch = reference_norms(model, loss_fn, x, y)
    assert routes[""] == "generic (vmap vjp)"
    assert rel_err(stats.per_sample, per_sample) <= 1e-5


class TiedInsideGeneric(nn.Module):
    """A parent with a parameter of its own that uses its tied embedding's weight directly."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, idx):
        return self.head(F.embedding(idx, self.emb.weight) * self.gain)


def test_tied_weight_used_directly_by_a_generic_parent_is_refused():
    torch.manual_seed(0)
    model, idx = TiedInsideGeneric(), torch.randint(0, 7, (3, 5))
    with GradNormTracker(model, "sum") as tracker:
        F.cross_entropy(model(idx).reshape(-1, 7), idx.reshape(-1), reduction="sum").backward()
        with pytest.raises(RuntimeError, match=r"'emb\.weight'.*do not account for"):
            tracker.collect()


class MultiOutput(nn.Module):
    """A generic-route module (own parameter, no rule) returning several tensors, some of which it
    also used to compute the others (``uses[i]``: which earlier outputs output i is computed from)."""

    def __init__(self, uses):
        super().__init__()
        self.weight, self.uses = nn.Parameter(torch.randn(6, 6) / 3), uses

    def forward(self, x):
        outs = []
        for i, used in enumerate(self.uses):
            h = torch.tanh(x @ self.weight + 0.1 * i)
            for j in used:
                h = h * torch.sigmoid(outs[j])
            outs.append(h)
        return tuple(outs)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=2, max_size=4), st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4))
def test_generic_outputs_used_inside_are_counted_once(masks, weights):
    """Any pattern of outputs computed from other outputs, each used outside with any weight
    (zero included): the per-sample norms match torch.func."""
    uses = [[j for j in range(i) if masks[i] >> j & 1] for i in range(len(masks))]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.multi = nn.Linear(4, 6), MultiOutput(uses)

        def forward(self, x):
            return sum(w * o.sum(-1) for w, o in zip(weights, self.multi(self.inp(x))))

    torch.manual_seed(0)
    tracked_and_checked(Net(), sample_loss, torch.randn(3, 4), torch.randn(3), fused=True)


def test_metadata_reads_carry_no_gradient():
    """The reads the torch-function modes pass on unseen (METADATA_READS) give no tensor a gradient
    could flow through: one that did (``w.T``, ``w.data``) would be a use of a parameter left unrecorded."""
    from divebatch.layers.base import METADATA_READS

    w = torch.randn(3, 4, requires_grad=True)
    assert torch.Tensor.dim in METADATA_READS and torch.Tensor.shape.__get__ in METADATA_READS
    assert torch.Tensor.T.__get__ not in METADATA_READS and torch.Tensor.data.__get__ not in METADATA_READS
    for read in METADATA_READS:
        if read is torch.Tensor.register_hook:
            out = read(w.view(3, 4), lambda g: g)
        else:
            out = read(w)
        assert not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_flatten(out)[0]), read
