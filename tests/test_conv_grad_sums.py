"""``LayerRule.grad_sums`` of ``ConvRule`` and ``ConvTransposeRule`` against autograd's parameter grads.

The sums must equal the gradient autograd delivers to ``weight`` / ``bias`` when the module's own
calls are its only use: for every padding mode (the hook path's raw input and the fused path's
``(input, zero_padding)``), stride, dilation, groups, output_padding / ``output_size=``, and a
module called twice.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers import conv, rule_for

from .oracle import rel_err

RTOL = 1e-5
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}

# (dims, in, out, kernel, keyword arguments, input spatial shape)
CONV_CONFIGS = {
    "1d-plain": (1, 3, 4, 3, {}, (9,)),
    "1d-stride-dilation-reflect": (1, 4, 6, 3, dict(stride=2, dilation=2, padding=2, padding_mode="reflect"), (11,)),
    "1d-same-even-kernel": (1, 2, 3, 4, dict(padding="same"), (8,)),
    "1d-same-even-kernel-reflect": (1, 2, 3, 4, dict(padding="same", padding_mode="reflect"), (8,)),
    "2d-stride-pad-groups": (2, 4, 6, 3, dict(stride=2, padding=1, groups=2), (7, 6)),
    "2d-depthwise-circular": (2, 4, 8, 3, dict(padding=1, groups=4, padding_mode="circular"), (5, 6)),
    "2d-same-even-replicate-nobias": (2, 3, 4, (2, 4), dict(padding="same", padding_mode="replicate", dilation=(1, 2),
                                                            bias=False), (6, 7)),
    "2d-valid-rect-stride": (2, 3, 2, (3, 2), dict(stride=(2, 3), padding="valid"), (8, 9)),
    "3d-stride-dilation-groups": (3, 4, 4, 2, dict(stride=(1, 2, 1), dilation=(2, 1, 1), padding=1, groups=2),
                                  (5, 4, 4)),
    "3d-reflect": (3, 2, 3, 3, dict(padding=1, padding_mode="reflect"), (4, 5, 3)),
    "3d-same-even": (3, 2, 2, (2, 3, 2), dict(padding="same"), (3, 4, 5)),
}

TRANSPOSE_CONFIGS = {
    "1d-plain": (1, 3, 5, 3, {}, (9,)),
    "1d-stride-pad-outpad": (1, 4, 6, 4, dict(stride=3, padding=2, output_padding=2), (7,)),
    "1d-outpad-above-stride": (1, 2, 3, 3, dict(stride=1, dilation=3, output_padding=2), (5,)),
    "1d-groups-nobias": (1, 4, 6, 3, dict(stride=2, groups=2, bias=False), (6,)),
    "2d-stride-pad-outpad": (2, 4, 3, 3, dict(stride=2, padding=1, output_padding=1), (5, 4)),
    "2d-dilation-rect": (2, 3, 4, (2, 3), dict(stride=(1, 2), padding=(1, 0), dilation=(2, 1)), (4, 5)),
    "2d-depthwise-outpad": (2, 4, 4, 3, dict(stride=2, padding=1, output_padding=(1, 0), groups=4), (5, 3)),
    "2d-groups-multiplier": (2, 4, 6, 2, dict(stride=2, groups=2), (3, 4)),
    "3d-stride-outpad-groups": (3, 4, 2, 2, dict(stride=2, padding=1, output_padding=(1, 0, 1), groups=2),
                                (3, 4, 3)),
}


def tracked_params(module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def autograd_grads(module, inputs, call=None):
    """Output grads of each call and the parameter grads of a random linear loss of the outputs."""
    call = call or (lambda m, x: m(x))
    outs = [call(module, x) for x in inputs]
    weights = [torch.randn_like(out) for out in outs]
    loss = sum((w * out.tanh()).sum() for w, out in zip(weights, outs))
    tracked = tracked_params(module)
    grads = torch.autograd.grad(loss, [*outs, *tracked.values()])
    return list(grads[:len(outs)]), dict(zip(tracked, grads[len(outs):]))


def assert_sums_equal(sums, expected):
    assert set(sums) == set(expected)
    for name, value in sums.items():
        assert value.dtype == torch.float32 and value.shape == expected[name].shape, name
        assert rel_err(value, expected[name]) <= RTOL, (name, rel_err(value, expected[name]))


def hook_calls(rule, module, inputs, out_grads):
    """The calls as the hook path keeps them: ``rule.capture`` of each input, and its output grad."""
    calls = []
    for x, g in zip(inputs, out_grads):
        with torch.no_grad():
            out = module(x)
        calls.append((rule.capture(module, (x,), {}, out), [g]))
    return calls


def make_conv(dims, cin, cout, kernel, kwargs, spatial, batch=3):
    module = CONV[dims](cin, cout, kernel, **kwargs)
    inputs = [torch.randn(batch, cin, *spatial), torch.randn(batch, cin, *spatial)]
    return module, inputs


@pytest.mark.parametrize("n_calls", [1, 2], ids=["once", "twice"])
@pytest.mark.parametrize("case", sorted(CONV_CONFIGS))
def test_conv_grad_sums_hook_ctx(case, n_calls):
    module, inputs = make_conv(*CONV_CONFIGS[case])
    inputs = inputs[:n_calls]
    rule = rule_for(module)
    assert isinstance(rule, conv.ConvRule)
    out_grads, expected = autograd_grads(module, inputs)
    sums = rule.grad_sums(module, hook_calls(rule, module, inputs, out_grads), tracked_params(module))
    assert_sums_equal(sums, expected)


def fused_ctx(module, x):
    """The ``(input, zero_padding)`` that ``ConvRule.fused_forward`` hands ``_FusedConv``."""
    padding = conv._symmetric_padding(module)
    if padding is None:  # 'same' with an even kernel, or a non-zero padding mode: padded up front
        return conv._padded(module, x), [0] * len(module.kernel_size)
    return x, padding


@pytest.mark.parametrize("n_calls", [1, 2], ids=["once", "twice"])
@pytest.mark.parametrize("case", sorted(CONV_CONFIGS))
def test_conv_grad_sums_fused_ctx(case, n_calls):
    module, inputs = make_conv(*CONV_CONFIGS[case])
    inputs = inputs[:n_calls]
    out_grads, expected = autograd_grads(module, inputs)
    calls = [(fused_ctx(module, x), [g]) for x, g in zip(inputs, out_grads)]
    assert all(isinstance(ctx, tuple) for ctx, _ in calls)
    sums = conv.ConvRule().grad_sums(module, calls, tracked_params(module))
    assert_sums_equal(sums, expected)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_conv_grad_sums_only_tracked(frozen):
    module, inputs = make_conv(*CONV_CONFIGS["2d-stride-pad-groups"])
    getattr(module, frozen).requires_grad_(False)
    out_grads, expected = autograd_grads(module, inputs)
    rule = rule_for(module)
    sums = rule.grad_sums(module, hook_calls(rule, module, inputs, out_grads), tracked_params(module))
    assert set(sums) == {"weight", "bias"} - {frozen}
    assert_sums_equal(sums, expected)


class Twice(nn.Module):
    """A convolution called once, two called twice, and a ConvTranspose2d called twice (once with
    ``output_size=``)."""

    def __init__(self):
        super().__init__()
        self.once = nn.Conv2d(3, 3, 2, padding="same")
        self.conv = nn.Conv2d(3, 4, 4, padding="same", padding_mode="reflect")
        self.plain = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, groups=2)

    def forward(self, x):
        x = torch.tanh(self.once(x))
        h = self.conv(x) + self.conv(x.flip(3))
        h = self.plain(torch.tanh(h))
        h = torch.tanh(self.plain(h)).repeat(1, 1, 2, 2) + h
        a = self.up(h, output_size=(2 * h.shape[2], 2 * h.shape[3] - 1))
        b = self.up(torch.sin(h))
        return a.square().sum(dim=(1, 2, 3)) + b.sum(dim=(1, 2, 3))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_calls_as_the_tracker_keeps_them(fused, monkeypatch):
    """The calls the tracker hands the rules (raw inputs, or ``(input, padding)`` from the fused
    path), recorded in a real backward, give plain autograd's parameter gradients."""
    model = Twice()
    plain = copy.deepcopy(model)
    x = torch.randn(3, 3, 8, 8)
    plain(x).sum().backward()

    seen: dict[int, list] = {}
    conv_norms, conv_fused_grads, transpose_norms = (conv.ConvRule.norms, conv.ConvRule.fused_grads,
                                                     conv.ConvTransposeRule.norms)

    def norms(self, module, calls, tracked):
        seen.setdefault(id(module), []).extend(calls)
        return conv_norms(self, module, calls, tracked)

    def fused_grads(self, module, ctx, g, tracked):
        seen.setdefault(id(module), []).append((ctx, [g]))
        return conv_fused_grads(self, module, ctx, g, tracked)

    def t_norms(self, module, calls, tracked):
        seen.setdefault(id(module), []).extend(calls)
        return transpose_norms(self, module, calls, tracked)

    monkeypatch.setattr(conv.ConvRule, "norms", norms)
    monkeypatch.setattr(conv.ConvRule, "fused_grads", fused_grads)
    monkeypatch.setattr(conv.ConvTransposeRule, "norms", t_norms)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        model(x).sum().backward()
        tracker.collect()

    for name, n_calls in [("once", 1), ("conv", 2), ("plain", 2), ("up", 2)]:
        module = getattr(model, name)
        calls = seen[id(module)]
        assert len(calls) == n_calls, name
        if fused and name != "up":
            assert all(isinstance(ctx, tuple) for ctx, _ in calls), name
        sums = rule_for(module).grad_sums(module, calls, tracked_params(module))
        expected = {k: p.grad for k, p in getattr(plain, name).named_parameters(recurse=False)}
        assert_sums_equal(sums, expected)


def make_transpose(dims, cin, cout, kernel, kwargs, spatial, batch=3):
    module = TRANSPOSE[dims](cin, cout, kernel, **kwargs)
    inputs = [torch.randn(batch, cin, *spatial), torch.randn(batch, cin, *[max(1, n - 1) for n in spatial])]
    return module, inputs


@pytest.mark.parametrize("n_calls", [1, 2], ids=["once", "twice"])
@pytest.mark.parametrize("case", sorted(TRANSPOSE_CONFIGS))
def test_conv_transpose_grad_sums(case, n_calls):
    module, inputs = make_transpose(*TRANSPOSE_CONFIGS[case])
    inputs = inputs[:n_calls]
    rule = rule_for(module)
    assert isinstance(rule, conv.ConvTransposeRule)
    out_grads, expected = autograd_grads(module, inputs)
    sums = rule.grad_sums(module, hook_calls(rule, module, inputs, out_grads), tracked_params(module))
    assert_sums_equal(sums, expected)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_transpose_grad_sums_with_output_size(dims):
    module = TRANSPOSE[dims](2, 4, 3, stride=3, padding=1, groups=2)
    inputs = [torch.randn(2, 2, *[4, 3][:dims]), torch.randn(2, 2, *[3, 5][:dims])]

    def call(m, x):  # the largest output torch allows: output_padding = stride - 1
        return m(x, output_size=[3 * n for n in x.shape[2:]])

    out_grads, expected = autograd_grads(module, inputs, call)
    assert [tuple(g.shape[2:]) for g in out_grads] == [tuple(3 * n for n in x.shape[2:]) for x in inputs]
    calls = [(x, [g]) for x, g in zip(inputs, out_grads)]
    assert_sums_equal(rule_for(module).grad_sums(module, calls, tracked_params(module)), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transpose"])
def test_low_precision_calls_are_summed_in_float32(dtype, transposed):
    """Half-precision inputs and grads: float32 sums, equal to float32 autograd on the same values."""
    module = (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2) if transposed
              else nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"))
    x = torch.randn(3, 4, 5, 6).to(dtype)
    with torch.no_grad():
        g = torch.randn_like(module(x.float())).to(dtype)
    out = module(x.float())
    expected = dict(zip(["weight", "bias"], torch.autograd.grad(out, [module.weight, module.bias], g.float())))
    half = copy.deepcopy(module).to(dtype)
    rule = rule_for(half)
    sums = rule.grad_sums(half, [(rule.capture(half, (x,), {}, None), [g])], tracked_params(half))
    assert_sums_equal(sums, expected)


def test_autocast_style_mixed_dtypes():
    """A float32 input with a bfloat16 output grad (what autocast hands a module) is summed too."""
    module = nn.ConvTranspose1d(3, 4, 3, stride=2)
    x = torch.randn(2, 3, 7)
    with torch.no_grad():
        g = torch.randn_like(module(x)).bfloat16()
    expected = dict(zip(["weight", "bias"], torch.autograd.grad(module(x), [module.weight, module.bias],
                                                                g.float())))
    sums = rule_for(module).grad_sums(module, [(x, [g])], tracked_params(module))
    assert_sums_equal(sums, expected)
    padded = F.pad(x, (1, 1))
    conv_module = nn.Conv1d(3, 4, 3)
    with torch.no_grad():
        g = torch.randn_like(conv_module(padded)).bfloat16()
    expected = dict(zip(["weight", "bias"], torch.autograd.grad(conv_module(padded), [conv_module.weight,
                                                                                      conv_module.bias], g.float())))
    sums = conv.ConvRule().grad_sums(conv_module, [((padded, [0]), [g])], tracked_params(conv_module))
    assert_sums_equal(sums, expected)
