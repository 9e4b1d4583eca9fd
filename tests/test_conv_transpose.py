"""nn.ConvTranspose1d/2d/3d (``layers.conv.ConvTransposeRule``) against torch.func per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers import RuleError, base, conv, routes, rule_for

from .oracle import reference_norms, rel_err
from .test_tracker import assert_matches_oracle, tracked_step

RTOL = 1e-5
CLASSES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}

# (dims, in, out, kernel, keyword arguments, input spatial shape)
CONFIGS = {
    "1d-plain": (1, 3, 5, 3, {}, (9,)),
    "1d-stride-pad-outpad": (1, 4, 6, 4, dict(stride=3, padding=2, output_padding=2), (7,)),
    "1d-outpad-above-stride": (1, 2, 3, 3, dict(stride=1, dilation=3, output_padding=2), (5,)),  # op < dilation
    "1d-groups2-nobias": (1, 4, 6, 3, dict(stride=2, groups=2, bias=False), (6,)),
    "2d-stride-pad": (2, 4, 3, 3, dict(stride=2, padding=1, output_padding=1), (5, 4)),
    "2d-dilation-rect": (2, 3, 4, (2, 3), dict(stride=(1, 2), padding=(1, 0), dilation=(2, 1)), (4, 5)),
    "2d-depthwise": (2, 4, 4, 3, dict(stride=2, padding=1, groups=4), (5, 3)),
    "2d-depthwise-multiplier": (2, 3, 6, 2, dict(stride=2, groups=3, bias=False), (3, 4)),
    "2d-kernel1": (2, 5, 2, 1, {}, (3, 3)),
    "2d-point-input": (2, 8, 3, 4, {}, (1, 1)),  # one input position: the T = 1 closed form
    "3d-stride-outpad": (3, 2, 4, 2, dict(stride=2, padding=1, output_padding=(1, 0, 1)), (3, 4, 3)),
    "3d-groups-dilation": (3, 4, 2, (2, 1, 2), dict(groups=2, dilation=(1, 1, 2), padding=(0, 0, 1)), (2, 3, 4)),
}


def make(dims, cin, cout, kernel, kwargs, spatial, batch):
    module = CLASSES[dims](cin, cout, kernel, **kwargs)
    x = torch.randn(batch, cin, *spatial)
    with torch.no_grad():
        y = torch.randn_like(module(x))
    return module, x, y


ROUTES = ["unfolded", conv.PER_SAMPLE_CONV]


@pytest.fixture(params=ROUTES + [None], ids=["unfolded", "per-sample-conv", "cost-model"])
def route(request, monkeypatch):
    """Each weight route forced, and the cost model's choice."""
    monkeypatch.setattr(conv.ConvTransposeRule, "force_route", request.param)
    return request.param


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_conv_transpose_matches_torch_func(case, batch, route):
    module, x, y = make(*CONFIGS[case], batch)
    assert isinstance(rule_for(module), conv.ConvTransposeRule)
    assert_matches_oracle(module, x, y, tracked_step(module, x, y, "sum"), rtol=RTOL)


@pytest.mark.parametrize("case", ["1d-stride-pad-outpad", "2d-depthwise-multiplier", "3d-groups-dilation"])
def test_both_routes_agree(case):
    """The two weight routes on the same calls (two calls of different input sizes, summed)."""
    module, x, y = make(*CONFIGS[case], 4)
    rule = conv.ConvTransposeRule()
    x2 = torch.randn(4, x.shape[1], *[n + 1 for n in x.shape[2:]])
    with torch.no_grad():
        calls = [(x, [torch.randn_like(module(x))]), (x2, [torch.randn_like(module(x2))])]
    a, b = rule.per_sample_conv_norms(module, calls), rule.unfolded_norms(module, calls)
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (4,)
    assert (a - b).abs().max() <= RTOL * b.abs().max()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("reduction", ["mean", 0.37])
def test_in_a_model_with_loss_scaling(reduction, fused, route):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1))
    x = torch.randn(4, 2, 7, 5)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    assert_matches_oracle(model, x, y, tracked_step(model, x, y, reduction, fused), rtol=RTOL)


def test_frozen_weight_with_bias_tracked():
    module, x, y = make(2, 4, 6, 3, dict(stride=2, padding=1, groups=2), (4, 5), 3)
    module.weight.requires_grad_(False)
    stats = tracked_step(module, x, y, "sum")
    assert set(stats.per_layer) == {""}
    assert_matches_oracle(module, x, y, stats, rtol=RTOL)


def test_frozen_bias_weight_tracked():
    module, x, y = make(1, 3, 4, 3, dict(stride=2), (6,), 3)
    module.bias.requires_grad_(False)
    assert_matches_oracle(module, x, y, tracked_step(module, x, y, "sum"), rtol=RTOL)


class Twice(nn.Module):
    """One ConvTranspose2d called on two inputs of different sizes, one with ``output_size=``."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1, groups=3)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        a = self.up(x, output_size=(2 * x.shape[2], 2 * x.shape[3] - 1))  # output_padding (1, 0)
        b = self.up(torch.tanh(x[:, :, :3, :2]))
        return self.head(a).sum(dim=(2, 3)) + self.head(b).sum(dim=(2, 3))


def test_module_called_twice_in_one_forward(route):
    model = Twice()
    x = torch.randn(3, 3, 5, 4)
    y = torch.randn(3, 2)
    assert_matches_oracle(model, x, y, tracked_step(model, x, y, "sum"), rtol=RTOL)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_forward_with_output_size(dims, route):
    cls = CLASSES[dims]

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = cls(2, 3, 3, stride=3, padding=1, dilation=1)

        def forward(self, x):  # the largest output torch allows: output_padding = stride - 1
            return self.up(x, output_size=[3 * n for n in x.shape[2:]])

    model = Up()
    x = torch.randn(2, 2, *[4, 3, 2][:dims])
    with torch.no_grad():
        y = torch.randn_like(model(x))
    assert y.shape[2:] == tuple(3 * n for n in x.shape[2:])
    assert_matches_oracle(model, x, y, tracked_step(model, x, y, "sum"), rtol=RTOL)


def _limit_buffers(monkeypatch, max_bytes: float) -> None:
    """DIVEBATCH_MAX_EXTRA_MB as read at import: the route model's bound (conv) and the chunks' (routes)."""
    monkeypatch.setattr(conv, "MAX_EXTRA_BYTES", max_bytes)
    monkeypatch.setattr(routes, "MAX_EXTRA_BYTES", max_bytes)


@pytest.mark.parametrize("forced", ROUTES)
def test_chunks_of_one_sample(monkeypatch, forced):
    """A buffer limit below one sample's patches: one sample per chunk, the same numbers."""
    _limit_buffers(monkeypatch, 1.0)
    monkeypatch.setattr(conv.ConvTransposeRule, "force_route", forced)
    module, x, y = make(2, 4, 6, 3, dict(stride=2, padding=1, groups=2), (5, 4), 4)
    assert conv.ConvTransposeRule().chunk_size(module, x, y) == 1
    assert conv.ConvTransposeRule().conv_chunk_size(module, x, y) == 1
    assert_matches_oracle(module, x, y, tracked_step(module, x, y, "sum"), rtol=RTOL)


def test_per_sample_conv_chunks_of_several_samples(monkeypatch):
    """Chunks of 2 samples for a batch of 5 (the last chunk shorter), the module called twice."""
    monkeypatch.setattr(conv.ConvTransposeRule, "force_route", conv.PER_SAMPLE_CONV)
    model = Twice()
    x = torch.randn(5, 3, 5, 4)
    per_sample = 4 * (model.up.weight.numel() + x[0].numel() + 3 * 10 * 7)
    _limit_buffers(monkeypatch, 2.5 * per_sample)
    assert conv.ConvTransposeRule().conv_chunk_size(model.up, x, torch.empty(5, 3, 10, 7)) == 2
    y = torch.randn(5, 2)
    assert_matches_oracle(model, x, y, tracked_step(model, x, y, "sum"), rtol=RTOL)


# The shapes timed when the per-sample conv route was added (see the commit), and the route that
# measured faster on CPU: per-sample conv where the unfolded route would instantiate, ghost where
# few positions meet many channels.
MEASURED = [
    (nn.ConvTranspose2d, (64, 32, 4, 2, 1), 32, (16, 16), conv.PER_SAMPLE_CONV),
    (nn.ConvTranspose1d, (64, 32, 4, 2, 1), 32, (128,), conv.PER_SAMPLE_CONV),
    (nn.ConvTranspose2d, (256, 128, 2, 2), 64, (4, 4), "ghost"),
    (nn.ConvTranspose2d, (128, 64, 4, 2, 1), 64, (16, 16), conv.PER_SAMPLE_CONV),
    (nn.ConvTranspose2d, (512, 256, 4, 2, 1), 32, (4, 4), "ghost"),
]


@pytest.mark.parametrize("cls,args,batch,spatial,expected", MEASURED)
def test_cost_model_picks_the_measured_faster_route(cls, args, batch, spatial, expected):
    module = cls(*args)
    x = torch.empty(batch, args[0], *spatial)
    with torch.no_grad():
        g = torch.empty_like(module(x))
    plan = conv.ConvTransposeRule().plan(module, x, g, dict(module.named_parameters()))
    assert plan.route == expected, plan
    assert conv.PER_SAMPLE_CONV in plan.alternatives or plan.route != conv.PER_SAMPLE_CONV
    assert plan.flops > 0 and plan.extra_bytes > 0


def test_per_sample_gradient_above_the_buffer_limit_takes_the_unfolded_route(monkeypatch):
    module, x, y = make(2, 4, 6, 3, dict(stride=2, padding=1), (5, 4), 2)
    with torch.no_grad():
        g = torch.randn_like(module(x))
    rule = conv.ConvTransposeRule()
    assert rule.plan(module, x, g, {"weight": module.weight}).route == conv.PER_SAMPLE_CONV
    _limit_buffers(monkeypatch, 4.0 * module.weight.numel())  # less than one sample's
    plan = rule.plan(module, x, g, {"weight": module.weight})
    assert plan.route in {"ghost", "instantiate"} and conv.PER_SAMPLE_CONV not in plan.alternatives


def test_force_route_is_checked(monkeypatch):
    monkeypatch.setattr(conv.ConvTransposeRule, "force_route", "vmap")
    module, x, y = make(1, 2, 3, 3, {}, (5,), 2)
    with pytest.raises(ValueError, match="force_route"):
        tracked_step(module, x, y, "sum")


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_low_precision(dtype, rtol, route):
    module, x, y = make(2, 4, 3, 3, dict(stride=2, padding=1), (5, 4), 3)
    module, x = module.to(dtype), x.to(dtype)
    stats = tracked_step(module, x, y, "mean")
    assert stats.per_sample.dtype == torch.float32
    assert_matches_oracle(module, x, y, stats, rtol=rtol)


def test_plan_reports_the_transposed_conv_route_not_the_generic_one(monkeypatch):
    model = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(2),
                          nn.ConvTranspose1d(3, 2, 2))
    x = torch.randn(2, 4, 3, 3)

    def routes():
        with GradNormTracker(model, "sum") as tracker:
            model(x).square().sum().backward()
            return {p.module: p for p in tracker.plan()}

    plans = routes()
    assert set(plans) == {"0", "3"}
    for plan in plans.values():
        assert plan.route in {"outer", "ghost", "instantiate", conv.PER_SAMPLE_CONV}, plan.route
        assert "transposed conv" in plan.shape
        assert plan.flops > 0 and plan.extra_bytes > 0
    # Without the rule these modules take the generic route (what the rule replaces).
    for cls in CLASSES.values():
        monkeypatch.delitem(base._REGISTRY, cls)
    assert rule_for(model[0]) is None
    assert {p.route for p in routes().values()} == {"generic (vmap vjp)"}


def test_unbatched_input_is_refused():
    module = nn.ConvTranspose2d(2, 3, 3)
    with GradNormTracker(module):
        with pytest.raises(ValueError, match="without a batch dimension"):
            module(torch.randn(2, 5, 5))


def test_subclass_with_its_own_forward_takes_the_generic_route():
    class Cropped(nn.ConvTranspose1d):  # a forward whose output the module's settings cannot give
        def forward(self, x):
            return super().forward(x)[..., 1:]

    torch.manual_seed(0)
    module, x = Cropped(2, 3, 3, stride=2), torch.randn(3, 2, 5)
    assert rule_for(module) is None
    with GradNormTracker(module, "sum") as tracker:
        module(x).square().sum().backward()
        stats = tracker.collect()
    per_sample, _, _ = reference_norms(module, lambda out, y: out.square().sum(), x, torch.zeros(3))
    assert rel_err(stats.per_sample, per_sample) <= 1e-5


def test_output_the_settings_cannot_give_is_refused_clearly():
    module = nn.ConvTranspose1d(2, 3, 3, stride=2)
    rule = rule_for(module)
    with pytest.raises(RuleError, match="stride/padding/dilation cannot give"):
        rule.output_padding(module, (5,), torch.zeros(2, 3, 10))



transpose_config = st.fixed_dictionaries({
    "dims": st.sampled_from([1, 2, 3]),
    "groups": st.sampled_from([1, 2, 4]),
    "out_per_group": st.integers(1, 2),
    "kernel": st.integers(1, 3),
    "stride": st.integers(1, 3),
    "dilation": st.integers(1, 2),
    "padding": st.integers(0, 2),
    "output_padding": st.integers(0, 2),
    "bias": st.booleans(),
    "batch": st.integers(1, 3),
    "size": st.integers(1, 4),
})


@settings(max_examples=30, deadline=None)
@given(transpose_config, st.sampled_from(ROUTES))
def test_random_transposed_convolutions_match_torch_func(cfg, forced):
    conv.ConvTransposeRule.force_route = forced  # hypothesis and function-scoped fixtures do not mix
    try:
        _random_case(cfg)
    finally:
        conv.ConvTransposeRule.force_route = None


def _random_case(cfg):
    dims, stride, dilation, kernel = cfg["dims"], cfg["stride"], cfg["dilation"], cfg["kernel"]
    output_padding = min(cfg["output_padding"], max(stride, dilation) - 1)  # torch's limit
    padding = min(cfg["padding"], (dilation * (kernel - 1) + output_padding) // 2)  # keep the output non-empty
    module = CLASSES[dims](4, cfg["groups"] * cfg["out_per_group"], kernel, stride=stride, padding=padding,
                           output_padding=output_padding, dilation=dilation, groups=cfg["groups"], bias=cfg["bias"])
    x = torch.randn(cfg["batch"], 4, *([cfg["size"]] * dims))
    with torch.no_grad():
        y = torch.randn_like(module(x))
    assert_matches_oracle(module, x, y, tracked_step(module, x, y, "sum"), rtol=RTOL)
