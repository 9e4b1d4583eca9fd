"""On CPU the fused routes (per-sample tiles or a per-sample convolution that replace autograd's
weight gradient) step aside where writing the per-sample gradients costs more than the hook
route's Gram products: wide layers with few positions (a CNN's deep layers, a ConvNeXt's last
stage). Either way the numbers are exact; these tests pin which route each shape takes."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from divebatch import GradNormTracker, ops
from divebatch.layers.conv import fused_conv_pays
from divebatch.layers.linear import fused_linear_route

from .models_zoo import StdConv
from .oracle import reference_norms, rel_err


@pytest.mark.parametrize("B, groups, T, d, p, fuse", [
    (64, 1, 784, 9, 32, True),          # a small CNN's first layer, 28 x 28
    (32, 1, 1024, 576, 64, True),       # 64 channels, 3 x 3 at 32 x 32
    (16, 96, 3136, 9, 1, True),         # depthwise, 56 x 56
    (128, 1, 49, 576, 64, True),        # the cnn workload's last convolution: 7.0 ms fused, 10.7 by the hooks
    (32, 1, 16, 4608, 512, False),      # 512 channels, 3 x 3 at 4 x 4: 93 ms fused against 13 ms
    (16, 1, 4, 512, 256, False),        # ConvNeXt downsampling, 2 x 2 stride 2 at 4 x 4
])
def test_conv_fuses_where_the_cost_model_measured_it_faster(B, groups, T, d, p, fuse):
    assert fused_conv_pays(B, groups, T, d, p) is fuse


@pytest.mark.parametrize("B, T, d, p, route", [
    (16, 256, 32, 128, "fused-instantiate"),
    (16, 128, 256, 1024, "fused-instantiate"),
    (16, 4, 256, 1024, "ghost"),  # 1.7 ms fused against 0.25 ms by the hooks
    (16, 2, 512, 2048, "ghost"),  # the per-thread 2048 x 512 tile exceeds the 8 MB bound
])
def test_linear_fuses_on_cpu_where_writing_tiles_pays(B, T, d, p, route):
    assert fused_linear_route(B, T, d, p, "cpu").route == route


@pytest.fixture
def triton_on_cuda(monkeypatch):
    """The route model as on a GPU machine: the Triton kernels registered, no backend forced."""
    monkeypatch.setattr(ops, "TRITON_AVAILABLE", True)
    monkeypatch.delenv("DIVEBATCH_BACKEND", raising=False)


@pytest.mark.parametrize("B, T, d, p, route", [
    (16, 256, 32, 128, "fused-instantiate"),
    (8, 4096, 1024, 1024, "fused-instantiate"),  # long sequences, a 1M weight: the GEMM's cost + 0.6
    (16, 4, 256, 1024, "ghost"),        # few positions: the Gram products cost less than 0.6 GEMM
    (16, 2, 512, 2048, "ghost"),
    (8, 2048, 4096, 16384, "ghost"),    # above FUSED_CUDA_MAX_WEIGHT (and slower there)
])
def test_linear_fuses_on_cuda_where_the_h200_model_says(triton_on_cuda, B, T, d, p, route):
    plan = fused_linear_route(B, T, d, p, "cuda")
    assert plan.route == route
    if route == "fused-instantiate":  # the float32 weight gradient, no per-thread buffer
        assert plan.extra_bytes == 4.0 * p * d


ROOT = Path(__file__).resolve().parents[1]


def _h200_kernel_timings():
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    from bench_kernels import measured_faster_route

    path = ROOT / "bench/results/gpu/2026-12-04-h200/bench_kernels.json"
    for result in json.loads(path.read_text())["results"]:
        if result.get("op") == "ghost+instantiate":
            yield pytest.param(result["B"], result["T"], result["d"], result["p"], measured_faster_route(result),
                               id=result["workload"])


@pytest.mark.parametrize("B, T, d, p, faster", list(_h200_kernel_timings()))
def test_cuda_fused_route_agrees_with_the_h200_timings(triton_on_cuda, B, T, d, p, faster):
    """The CUDA model picks, on each shape the H200 timed, the route that ran faster there."""
    assert fused_linear_route(B, T, d, p, "cuda").route == faster


def test_hook_route_memory_on_cuda_is_the_triton_kernels(triton_on_cuda, monkeypatch):
    """The hook (unfused) route on CUDA: the Triton kernels hold their tiles in registers, so the
    per-CPU-thread buffers of the C++ kernels do not bound it there; what remains is instantiate's
    float32 ``[p, d]`` sum and ghost's ``[B, p]`` column sums, under ``CUDA_MAX_EXTRA_BYTES``."""
    from divebatch.layers import routes

    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # a GPU machine's host
    shape = (16, 2048, 1024, 1024)  # long sequences: instantiate's flops are half ghost's
    cpu, cuda = routes.linear_route(*shape), routes.linear_route(*shape, device_type="cuda")
    assert cpu.route == "ghost" and cpu.alternatives["instantiate"] < cpu.alternatives["ghost"]  # 17 buffers of 4 MB
    assert cuda.route == "instantiate" and cuda.extra_bytes == 4.0 * 1024 * 1024
    assert routes.linear_route_name(*shape) == "ghost" and routes.linear_route_name(*shape, "cuda") == "instantiate"
    assert routes.linear_route(16, 2048, 2048, 2048, device_type="cuda").route == "instantiate"  # 16 MB: fits
    assert routes.linear_route_name(16, 2048, 2048, 2048, "cuda") == "instantiate"
    assert routes.linear_route(16, 2048, 2048, 2048).route == "ghost"  # (CPU: over the 8 MB bound)
    monkeypatch.setattr(routes, "CUDA_MAX_EXTRA_BYTES", 8 * 2**20)  # DIVEBATCH_CUDA_MAX_EXTRA_MB=8
    assert routes.linear_route(16, 2048, 2048, 2048, device_type="cuda").route == "ghost"
    assert routes.linear_route_name(16, 2048, 2048, 2048, "cuda") == "ghost"  # (the memo keys on the bound)
    monkeypatch.setattr(ops, "TRITON_AVAILABLE", False)  # the reference: the memory bound as on CPU
    assert routes.linear_route_name(*shape, "cuda") == "ghost"


@pytest.mark.parametrize("conv, shape, fused", [
    (nn.Conv2d(64, 64, 3, padding=1), (64, 64, 56, 56), True),    # ResNet-18 layer1 at 224 x 224
    (nn.Conv2d(512, 512, 3, padding=1), (64, 512, 7, 7), False),  # layer4: the ghost kernel by the hooks
    (nn.Conv2d(64, 256, 1), (32, 64, 56, 56), True),              # a bottleneck's 1 x 1: unfolded, fused kernel
], ids=["3x3-56", "3x3-7", "1x1-56"])
def test_convolutions_on_cuda_take_the_kernels_on_unfolded_patches(triton_on_cuda, conv, shape, fused):
    """On CUDA a convolution fuses only where its unfolded patches take the fused instantiate kernel
    (many positions, few channels); the others keep autograd's weight gradient and the hook route's
    kernels, never the grouped per-sample convolution (every per-sample gradient written, chunk by
    chunk: ~9000 ops a step for a ResNet-18 at 224 x 224)."""
    from divebatch.layers.conv import conv_fuses

    assert conv_fuses(conv, torch.Size(shape), "cuda") is fused


def _squared_error(out, target):
    return 0.5 * (out - target).square().sum()


def _step_beside_plain(model, plain, x, y):
    """Backward of ``_squared_error`` through ``plain`` (same weights, untracked) and through
    ``model`` tracked: ``(stats, {module: route})``."""
    _squared_error(plain(x), y).backward()
    with GradNormTracker(model, "sum") as tracker:
        _squared_error(model(x), y).backward()
        return tracker.collect(), {plan.module: plan.route for plan in tracker.plan()}


def _assert_exact(model, stats, x, y):
    per_sample, _, batch = reference_norms(model, _squared_error, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


class Convolutions(nn.Module):
    """Padded (the test's input channels-last), strided, dilated, reflect-padded, grouped, 1-d and 3-d
    convolutions with many positions."""

    def __init__(self):
        super().__init__()
        self.padded = nn.Conv2d(3, 16, 3, padding=1)
        self.strided = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.dilated = nn.Conv2d(16, 16, 3, dilation=2, padding=2)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.line = nn.Conv1d(16, 4, 5, padding="same")
        self.volume = nn.Conv3d(2, 3, 3, padding=(1, 0, 1), stride=(1, 2, 1))

    def forward(self, x):
        h = torch.tanh(self.strided(torch.tanh(self.padded(x))))
        h = self.grouped(torch.tanh(self.reflect(torch.tanh(self.dilated(h)))))
        v = self.volume(h.reshape(h.shape[0], 2, 8, *h.shape[2:]))
        return self.line(h.flatten(2)).square().sum(dim=(1, 2)) + v.square().sum(dim=(1, 2, 3, 4))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("implicit,layout,side", [(False, torch.channels_last, 16), (False, torch.contiguous_format, 14),
                                                  (True, torch.channels_last, 16), (True, torch.contiguous_format, 16)],
                         ids=["unfolded", "unfolded-rows", "implicit", "implicit-nchw"])
def test_cuda_routes_fuse_overlapping_convolutions_exactly(monkeypatch, backend, implicit, layout, side):
    """The routes a GPU takes, run here with the C++ operators or the Triton kernels (under the
    interpreter, on the same strided views of unfolded patches a GPU gets): every one-group
    convolution whose patches the fused instantiate kernel takes is fused through its unfolded
    (padded, strided, dilated) patches, or with ``DIVEBATCH_TRITON_IMPLICIT_CONV=1`` through
    ``conv_instantiate_norm``, which reads them from the input in place (the kernel's implicit
    GEMM under the interpreter), whose tiles give the weight gradient too, from a channels-last copy
    of an NCHW input of 16 channels (``vector_layouts``); the grouped one takes the hook route;
    on a 14 x 14 input the unfolded patches of 196, 49 and 168 positions come as contiguous rows
    (``rows_layout``); the norms and gradients are torch.func's."""
    _on_cuda_routes(monkeypatch, backend, implicit)
    model, y = Convolutions(), torch.randn(4)
    x = torch.randn(4, 3, side, side).contiguous(memory_format=layout)
    plain = Convolutions()
    plain.load_state_dict(model.state_dict())
    read = []  # (channels, channels contiguous) of each conv_instantiate_norm input
    inner = ops.conv_instantiate_norm
    monkeypatch.setattr(ops, "conv_instantiate_norm", lambda x, *args: read.append((x.shape[1], x.stride(1) == 1))
                        or inner(x, *args))
    unfolded = []  # (positions, patches in rows, output grad in rows) of each instantiate_norm call
    instantiate = ops.instantiate_norm
    monkeypatch.setattr(ops, "instantiate_norm", lambda a, g, *args: unfolded.append(
        (a.shape[1], a.stride(2) == 1, g.stride(2) == 1)) or instantiate(a, g, *args))
    stats, taken = _step_beside_plain(model, plain, x, y)
    fused = "fused-implicit-instantiate" if implicit else "fused-unfold-instantiate"
    assert taken == {"padded": fused, "strided": fused, "dilated": fused, "reflect": fused,
                     "grouped": "instantiate", "line": fused, "volume": fused}
    # (padded: 3 channels, volume: 2, as they came; every input of 16 channels channels-last)
    assert len(read) == (6 if implicit else 0) and all(contiguous for channels, contiguous in read if channels == 16)
    assert sum(channels == 16 for channels, _ in read) == (4 if implicit else 0)
    # (the fused unfolded layers and the grouped one's hooks: patches in rows exactly where T % 16 != 0,
    #  the output grad there too; elsewhere the output grad as it came, rows when channels-last)
    assert len(unfolded) == (1 if implicit else 7)
    assert all(a_rows == (positions % 16 != 0) and (g_rows or not a_rows) for positions, a_rows, g_rows in unfolded), \
        unfolded
    assert any(positions % 16 for positions, _, _ in unfolded) == (side == 14)
    _assert_exact(model, stats, x, y)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5, name


class Deepening(nn.Module):
    """Convolutions from many positions and few channels to few positions and many channels (a
    ResNet's stages in miniature: the hooks' norms take instantiate, then the Grams), zero and
    reflect padded, strided, a grouped one and one called twice; for an 8 x 8 input."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Conv2d(3, 16, 3, padding=1)
        self.strided = nn.Conv2d(16, 64, 3, stride=2, padding=1, bias=False)
        self.deep = nn.Conv2d(64, 64, 3, stride=2, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(64, 8, 1, groups=2)
        self.twice = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = torch.tanh(self.deep(torch.tanh(self.strided(torch.tanh(self.wide(x))))))
        h = self.twice(torch.tanh(self.twice(self.grouped(h))))
        return h.square().sum(dim=(1, 2, 3))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_hook_routes_read_convolution_patches_in_place_exactly(monkeypatch, backend):
    """Unfused, with ``DIVEBATCH_TRITON_IMPLICIT_CONV=1`` on the routes a GPU takes (the C++ operators
    or the Triton kernels under the interpreter here), each one-group convolution's norms come from
    ``conv_instantiate_norm`` (many positions) or ``conv_ghost_norm`` (few positions, many weights:
    a ResNet's deep layers), zero and reflect padded, strided, biased or not, with no patches
    unfolded; the grouped one unfolds; a convolution called twice a step unfolds its calls'
    patches together, and ``tracker.plan()`` says so; an NCHW input of 16 or 64 channels reaches
    the operators as a channels-last copy, one of 3 channels as it is, and the output grad of 2 x 2
    positions as a copy, those of 8 x 8 and 4 x 4 as they are (``vector_layouts``); the norms are
    torch.func's."""
    _on_cuda_routes(monkeypatch, backend, implicit=True)
    model, x, y = Deepening(), torch.randn(4, 3, 8, 8), torch.randn(4)
    calls, channels_last = collections.Counter(), collections.defaultdict(list)
    for name in ("conv_ghost_norm", "conv_instantiate_norm", "ghost_norm", "instantiate_norm"):
        monkeypatch.setattr(ops, name, _counted(calls, name, getattr(ops, name), channels_last))
    with GradNormTracker(model, "sum", fused=False) as tracker:
        _squared_error(model(x), y).backward()
        stats = tracker.collect()
        plans = {plan.module: plan for plan in tracker.plan()}
    assert {name: plan.route for name, plan in plans.items()} == {
        "wide": "implicit-instantiate", "strided": "implicit-ghost", "deep": "implicit-ghost", "grouped": "ghost",
        "twice": "instantiate"}
    # (grouped: ghost_norm on its unfolded patches; twice: its two calls' patches side by side)
    assert calls == {"conv_instantiate_norm": 1, "conv_ghost_norm": 2, "ghost_norm": 1, "instantiate_norm": 1}
    # ((input, output grad) channels-last: wide's 3 input channels and 8 x 8 positions, strided's 16
    #  channels and 4 x 4 positions, deep's 64 channels and 2 x 2 positions; as their plans say)
    assert channels_last["conv_instantiate_norm"] == [(False, False)]
    assert sorted(channels_last["conv_ghost_norm"]) == [(True, False), (True, True)]
    assert "copy of the patches' input)" in plans["strided"].shape
    assert "copy of the patches' input and output grad)" in plans["deep"].shape
    assert "copy" not in plans["wide"].shape
    _assert_exact(model, stats, x, y)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_hook_routes_unfold_rows_where_positions_would_load_element_by_element(monkeypatch, backend):
    """Unfused, on the routes a GPU takes with the implicit kernels off (the default), a
    convolution's unfolded patches and output grad reach the kernels as positions-last views where
    their positions come in multiples of 16 (8 x 8, 4 x 4: the kernels' vector loads run along
    positions) and as contiguous rows where they do not (2 x 2, the grouped layer, the layer called
    twice: runs of columns); the norms are torch.func's."""
    _on_cuda_routes(monkeypatch, backend, implicit=False)
    model, x, y = Deepening(), torch.randn(4, 3, 8, 8), torch.randn(4)
    seen = []  # (positions, patches in rows, output grad in rows) of each kernel call

    def recorded(fn):
        def run(a, g, *args):
            seen.append((a.shape[1], a.stride(2) == 1, g.stride(2) == 1))
            return fn(a, g, *args)
        return run

    for name in ("ghost_norm", "instantiate_norm"):
        monkeypatch.setattr(ops, name, recorded(getattr(ops, name)))
    with GradNormTracker(model, "sum", fused=False) as tracker:
        _squared_error(model(x), y).backward()
        stats = tracker.collect()
    # (wide 8 x 8, strided 4 x 4, deep and grouped 2 x 2, twice: two calls of 2 x 2 side by side)
    assert sorted(seen) == [(4, True, True), (4, True, True), (8, True, True), (16, False, False),
                            (64, False, False)]
    _assert_exact(model, stats, x, y)


@pytest.mark.parametrize("groups,kernel,stride,dilation,spatial", [
    (1, (3, 3), (1, 1), (1, 1), (5, 6)), (2, (3, 2), (2, 1), (1, 2), (7, 6)), (4, (3,), (2,), (1,), (11,)),
    (1, (2, 3, 2), (1, 2, 1), (1, 1, 2), (4, 6, 5))], ids=["2d", "2d-grouped-dilated", "1d-grouped", "3d"])
def test_unfolded_rows_are_the_positions_last_patches(monkeypatch, groups, kernel, stride, dilation, spatial):
    """``unfold_patches`` and ``grouped_grad`` in rows (``rows_layout``) give the same patches and
    output grad rows as the positions-last views, as contiguous buffers."""
    from divebatch.layers import conv

    module = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(kernel)](8, 4, kernel, stride, dilation=dilation,
                                                                       groups=groups)
    x = torch.randn(3, 8, *spatial)
    g = torch.randn_like(module(x))
    monkeypatch.setattr(conv, "rows_layout", lambda T, device_type: False)
    views = conv.unfold_patches(module, x), conv.grouped_grad(module, g)
    monkeypatch.setattr(conv, "rows_layout", lambda T, device_type: True)
    rows = conv.unfold_patches(module, x), conv.grouped_grad(module, g)
    for view, row in zip(views, rows):
        assert view.stride(1) == 1 and row.is_contiguous() and torch.equal(view, row)


def _on_cuda_routes(monkeypatch, backend: str, implicit: bool) -> None:
    """The routes a GPU takes, on ``backend``'s operators (``cpp``, or ``triton`` under the
    interpreter), the implicit convolution kernels on or off; the seed set."""
    from divebatch.layers import routes

    if backend == "triton" and not ops.TRITON_AVAILABLE:
        pytest.skip("triton (divebatch._kernels) does not import here")
    monkeypatch.setenv("DIVEBATCH_BACKEND", backend)
    monkeypatch.setenv("DIVEBATCH_TRITON_IMPLICIT_CONV", "1" if implicit else "0")
    monkeypatch.setattr(routes, "triton_kernels", lambda device_type: True)
    torch.manual_seed(0)


def _counted(calls: collections.Counter, name: str, fn, channels_last: dict | None = None):
    """``fn`` counting its calls in ``calls[name]`` (and, given ``channels_last``, appending whether
    its first two arguments' channels were contiguous to ``channels_last[name]``)."""
    def run(*args, **kwargs):
        calls[name] += 1
        if channels_last is not None:
            channels_last[name].append((args[0].stride(1) == 1, args[1].stride(1) == 1))
        return fn(*args, **kwargs)

    return run


@pytest.mark.parametrize("spatial", [(9,), (5, 7), (3, 4, 5)], ids=["1d", "2d", "3d"])
def test_vector_layouts_copy_what_would_load_element_by_element(monkeypatch, spatial):
    """``vector_layouts``: an NCHW input of 16 channels becomes a channels-last copy equal to it; an
    NCHW output grad too where its positions are not a multiple of 16 (these are not), but not where
    they are; a channels-last tensor, one of 8 channels (no vector loads either way) and one whose
    copy would pass the memory bound are handed on as they are."""
    from divebatch.layers import conv

    def channels_last(t):  # (for any number of spatial dims)
        return t.movedim(1, -1).contiguous().movedim(-1, 1)

    x, g = torch.randn(2, 16, *spatial), torch.randn(2, 32, *spatial)
    x_copy, g_copy = conv.vector_layouts(x, g)
    for copy, t in ((x_copy, x), (g_copy, g)):
        assert copy.stride(1) == 1 and copy.data_ptr() != t.data_ptr() and torch.equal(copy, t)
    assert all(a is b for a, b in zip(conv.vector_layouts(x_copy, g_copy), (x_copy, g_copy)))
    g16 = torch.randn(2, 32, *spatial[:-1], 16)  # (16 positions a channel, contiguous: runs of positions)
    assert conv.vector_layouts(x, g16)[1] is g16
    cl_x = channels_last(torch.randn(2, 16, *spatial))
    assert conv.vector_layouts(cl_x, g16)[0] is cl_x
    few, few_g = torch.randn(2, 8, *spatial), torch.randn(2, 8, *spatial)
    assert all(a is b for a, b in zip(conv.vector_layouts(few, few_g), (few, few_g)))
    monkeypatch.setattr(conv, "max_extra_bytes", lambda device_type: x.numel() * x.element_size() - 1)
    assert all(a is b for a, b in zip(conv.vector_layouts(x, g), (x, g)))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("implicit", [False, True], ids=["unfolded", "implicit"])
def test_cuda_routes_take_transposed_convolutions_to_the_kernels_exactly(monkeypatch, backend, implicit):
    """A transposed convolution on CUDA: the Triton kernels on its unfolded output grad, not the
    grouped per-sample convolution the CPU-fitted model picks for these shapes (the C++ operators
    or the Triton kernels under the interpreter here), or with ``DIVEBATCH_TRITON_IMPLICIT_CONV=1``
    the one-group ones' adjoint patches read from the output grad in place (``conv_ghost_norm`` /
    ``conv_instantiate_norm`` with the roles swapped; an output_padding below the stride crops
    nothing there, one past it, or a grouped layer, keeps unfolding); the norms are torch.func's."""
    from divebatch.layers import routes

    if backend == "triton" and not ops.TRITON_AVAILABLE:
        pytest.skip("triton (divebatch._kernels) does not import here")
    monkeypatch.setenv("DIVEBATCH_BACKEND", backend)
    monkeypatch.setenv("DIVEBATCH_TRITON_IMPLICIT_CONV", "1" if implicit else "0")

    def loss_fn(out, target):
        return 0.5 * (out.square().sum(dim=(1, 2, 3)) - target).square().sum()

    def step(model, x, y):
        with GradNormTracker(model, "sum") as tracker:
            loss_fn(model(x), y).backward()
            return tracker.collect(), {plan.module: plan.route for plan in tracker.plan()}

    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 16, 4, 2, 1, output_padding=1), nn.Tanh(),
                          nn.ConvTranspose2d(16, 4, 3, 1, 1, groups=2), nn.Tanh(),
                          nn.ConvTranspose2d(4, 4, 3, 1, 1, output_padding=1, dilation=2))
    x, y = torch.randn(4, 8, 8, 8), torch.randn(4)
    assert set(step(model, x, y)[1].values()) == {"per-sample conv"}  # (CPU)
    monkeypatch.setattr(routes, "triton_kernels", lambda device_type: True)
    model.zero_grad()
    calls = collections.Counter()
    for name in ("conv_ghost_norm", "conv_instantiate_norm"):
        monkeypatch.setattr(ops, name, _counted(calls, name, getattr(ops, name)))
    stats, taken = step(model, x, y)
    # (grouped, and an output_padding past the stride: unfolded either way)
    assert taken["2"] in {"ghost", "instantiate"} and taken["4"] in {"ghost", "instantiate"}
    assert taken["0"] in ({"implicit-ghost", "implicit-instantiate"} if implicit else {"ghost", "instantiate"})
    assert sum(calls.values()) == (1 if implicit else 0)
    per_sample, _, batch = reference_norms(model, loss_fn, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


def test_unfolded_patches_come_in_large_chunks_on_cuda(triton_on_cuda, monkeypatch):
    """Each chunk of unfolded patches costs its launches: on CUDA chunks take up to
    ``CUDA_MAX_EXTRA_BYTES``, on CPU (and CUDA without Triton) ``MAX_EXTRA_BYTES``."""
    from divebatch.layers import conv, routes

    patches = 3136 * 576  # ResNet-18 layer1 at 224 x 224: 7 MB of float32 patches a sample
    assert conv._unfold_chunk(64, patches, "cpu") == 1
    assert conv._unfold_chunk(64, patches, "cuda") == int(routes.CUDA_MAX_EXTRA_BYTES // (4 * patches)) > 30
    monkeypatch.setattr(ops, "TRITON_AVAILABLE", False)
    assert conv._unfold_chunk(64, patches, "cuda") == 1


class _CountOps(TorchDispatchMode):
    """Counts the aten ops run under it by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", [False, True], ids=["cpu bound", "cuda bound"])
def test_the_other_chunked_routes_take_the_cuda_bound_there(kernels, monkeypatch):
    """Tied heads' gathered rows, Bilinear's Grams, the generic route's per-sample gradients and
    mixtures of experts' padded groups come in sample chunks under ``routes.max_extra_bytes``:
    where the Triton kernels run (here ``meta`` tensors made to look so) the larger CUDA bound,
    since each chunk costs launches there. A GPT-2-sized tied head at T = 1024 gathers 4 MiB of
    float32 a sample: two samples a chunk under 8 MiB, all eight under 256 MiB."""
    from divebatch.layers import bilinear, generic, routes, tied

    monkeypatch.setattr(routes, "triton_kernels", lambda device_type: kernels and device_type == "meta")
    meta = torch.device("meta")
    a = torch.empty(8, 1024, 768, device=meta, dtype=torch.bfloat16)
    g = torch.empty(8, 1024, 50257, device=meta, dtype=torch.bfloat16)
    with _CountOps() as ops_run:
        tied.tied_rows(a, g, torch.zeros(8, 1024, dtype=torch.long, device=meta), padding_idx=None)
    assert ops_run.counts["bmm"] == (1 if kernels else 4)
    rows = torch.empty(8, 600, 32, device=meta)  # three [600, 600] float32 Grams: 4.1 MiB a sample
    with _CountOps() as ops_run:
        bilinear.BilinearRule().norms(nn.Bilinear(32, 32, 32), [((rows, rows), (rows,))], {"weight"})
    assert ops_run.counts["bmm"] == 3 * (1 if kernels else 8)
    per_sample = int(routes.max_extra_bytes("meta") // (4 * 10**6))
    assert generic._samples_per_chunk(10**6, "meta") == per_sample == (67 if kernels else 2)
    assert generic._samples_per_chunk(10**6, "cpu") == 2


def test_a_16_bit_convolution_bias_is_summed_without_a_float32_copy(monkeypatch):
    """The fused convolution's per-sample bias sums accumulate in float32 straight from a bfloat16
    output grad: no float32 copy of it is written (~50 MB at a ResNet's first layers, batch 64)."""
    from divebatch.layers import conv, routes

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ == "_to_copy":
                self.sizes.append(out.numel())
            return out

    monkeypatch.setattr(routes, "triton_kernels", lambda device_type: device_type == "meta")
    monkeypatch.setattr(ops, "triton_serves", lambda device: device.type == "meta")
    module = nn.Conv2d(16, 8, 3, padding=1).to(device="meta", dtype=torch.bfloat16)
    x = torch.empty(64, 16, 56, 56, device="meta", dtype=torch.bfloat16)
    g = torch.empty(64, 8, 56, 56, device="meta", dtype=torch.bfloat16)
    assert conv._unfolded_fused_route(module, False, 64, 56 * 56, 16 * 9, 8, "meta")
    with Copies() as copies:
        sq, grad_w, grad_b = conv.fused_conv_grads(module, (x, [1, 1]), g, {"weight", "bias"})
    assert sq.shape == (64,) and grad_b.shape == (8,) and grad_w.shape == module.weight.shape
    assert g.numel() not in copies.sizes


def test_cuda_without_triton_keeps_the_buffer_bound(monkeypatch):
    monkeypatch.setattr(ops, "TRITON_AVAILABLE", False)  # the reference materialises the tiles
    assert fused_linear_route(16, 2, 512, 2048, "cuda").route == "ghost"
    assert fused_linear_route(16, 128, 256, 1024, "cuda").route == "fused-instantiate"


class WideAndNarrow(nn.Module):
    """An early convolution (many positions) and a deep one (few positions, many channels), then
    a Linear over two wide tokens and one over many narrow ones."""

    def __init__(self):
        super().__init__()
        self.early = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.lift = nn.Conv2d(8, 64, 1)
        self.deep = nn.Conv2d(64, 64, 3, padding=1)
        self.wide = nn.Linear(64, 256)
        self.narrow = nn.Linear(8, 16)

    def forward(self, x):
        h = self.deep(torch.tanh(self.lift(self.pool(torch.tanh(self.early(x))))))  # [B, 64, 2, 2]
        wide = self.wide(h.flatten(2).transpose(1, 2)[:, :2])                        # [B, 2, 256]
        narrow = self.narrow(h.reshape(h.shape[0], 32, 8))                           # [B, 32, 16]
        return wide.sum(dim=(1, 2)) + narrow.sum(dim=(1, 2))


def test_routes_and_numbers_in_one_model():
    torch.manual_seed(0)
    model, x, y = WideAndNarrow(), torch.randn(3, 3, 16, 16), torch.randn(3)

    def loss_fn(out, target):
        return 0.5 * (out - target).square().sum()

    with GradNormTracker(model, "sum") as tracker:
        loss_fn(model(x), y).backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    assert routes["early"] == "fused-per-sample-conv"
    assert routes["deep"] == "ghost"
    assert routes["wide"] == "ghost"
    assert routes["narrow"] == "fused-instantiate"
    per_sample, _, batch = reference_norms(model, loss_fn, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


class Patches(nn.Module):
    """A non-overlapping convolution (stride = kernel: a ViT's patch embedding) with a tail of
    input the kernel does not reach, then a Linear over the patches."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv, self.head = conv, nn.LazyLinear(1)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # [B, T, Cout]
        return self.head(h).sum(dim=(1, 2))


@pytest.mark.parametrize("conv, shape, route", [
    (lambda: nn.Conv2d(16, 64, 4, 4), (3, 16, 34, 33), "fused-unfold-instantiate"),
    (lambda: nn.Conv2d(16, 64, 4, 4, bias=False), (1, 16, 32, 32), "fused-unfold-instantiate"),
    (lambda: nn.Conv1d(32, 64, 8, 8, padding="valid"), (3, 32, 260), "fused-unfold-instantiate"),
    (lambda: nn.Conv3d(4, 128, (2, 4, 4), (2, 4, 4)), (2, 4, 8, 17, 16), "fused-unfold-instantiate"),
    (lambda: nn.Conv2d(8, 16, 1), (3, 8, 12, 11), "fused-unfold-instantiate"),  # 1x1: at any size
    # Each sample's gradient below UNFOLDED_TILE_ELEMENTS: the grouped convolution; padded or
    # overlapping windows: the cost model between it and the hooks.
    (lambda: nn.Conv2d(3, 32, 4, 4), (3, 3, 16, 16), "fused-per-sample-conv"),
    (lambda: nn.Conv2d(16, 64, 4, 4, padding=1), (3, 16, 18, 17), "ghost"),
    (lambda: nn.Conv2d(16, 64, 4, 2), (3, 16, 18, 17), "fused-per-sample-conv"),
])
def test_non_overlapping_convolution_takes_the_unfolded_tile_route(conv, shape, route):
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = Patches(conv())
    model(x)  # (materialises the lazy head)
    y = torch.randn(shape[0])
    plain = Patches(conv())
    plain.load_state_dict(model.state_dict())
    stats, taken = _step_beside_plain(model, plain, x, y)
    assert taken["conv"] == route
    _assert_exact(model, stats, x, y)
    for name, p in model.conv.named_parameters():  # the weight gradient comes from the per-sample tiles
        expected = dict(plain.conv.named_parameters())[name].grad
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


class _Convs(nn.Module):
    """A 3x3 convolution (grouped per-sample route) and a 4x4 patch convolution (unfolded route)."""

    def __init__(self):
        super().__init__()
        self.conv, self.patch, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 64, 4, 4), nn.Linear(64, 2)

    def forward(self, x):
        h = self.patch(torch.tanh(self.conv(x))).flatten(2).transpose(1, 2)
        return self.head(torch.tanh(h))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])  # (the math path: SDPA's CPU kernel has no double backward)


@pytest.mark.parametrize("make, shape, fused_routes", [
    (lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), (4, 32, 8), {"fused-instantiate"}),
    (_Convs, (3, 3, 32, 32), {"fused-per-sample-conv", "fused-unfold-instantiate"}),
    (_Attention, (3, 12, 16), {"fused attention"}),
    (lambda: nn.Sequential(StdConv(3, 4, 3, padding=1), nn.Tanh(), StdConv(4, 4, 1)), (3, 3, 8, 8),
     {"generic (standardised weights)"}),
])
def test_second_order_gradients_through_fused_backwards(make, shape, fused_routes):
    """``torch.autograd.grad(..., create_graph=True)`` then a penalty on those gradients (gradient
    penalties, MAML): the fused backwards' weight gradients come from non-differentiable operators,
    so under ``create_graph`` they are formed by differentiable ops instead (the second-order
    gradients were 40-97% off). The first-order norms are still recorded."""
    torch.manual_seed(0)
    model, plain = make(), make()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(shape)

    def penalty(m):
        grads = torch.autograd.grad(m(x).square().sum(), list(m.parameters()), create_graph=True)
        return sum(g.square().sum() for g in grads)

    penalty(plain).backward()
    with GradNormTracker(model, "sum") as tracker:
        penalty(model).backward()
        routes = {plan.route for plan in tracker.plan()}
    assert fused_routes <= routes
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(), msg=name)


def test_group_norm_takes_the_cpu_kernel_from_many_positions(monkeypatch):
    """bench/norm_routes.py: the C++ group_norm_grads beat the PyTorch path at 14 x 14, not at
    7 x 7; channel_norm_grads (BatchNorm, running-statistics InstanceNorm) beat it at every size."""
    from divebatch.layers import norm

    if not ops.CPP_AVAILABLE:
        pytest.skip("the C++ extension is not built here")
    monkeypatch.delenv("DIVEBATCH_BACKEND", raising=False)
    large, small = torch.zeros(2, 256, 14, 14), torch.zeros(2, 512, 7, 7)
    cut_off = norm.GROUP_NORM_CPU_MIN_POSITIONS
    assert norm._kernel_serves(large, cpu_min_positions=cut_off)
    assert not norm._kernel_serves(small, cpu_min_positions=cut_off)
    assert norm._kernel_serves(torch.zeros(2, 197, 768), 768)  # LayerNorm rows: always
    own_stats, running = (small, None, None), (small, torch.zeros(512), torch.ones(512))
    assert not norm.InstanceNormRule().kernel_serves(own_stats)  # group_norm_grads, one channel a group
    assert norm.InstanceNormRule().kernel_serves(running)
    assert norm.BatchNormRule().kernel_serves(own_stats) and norm.BatchNormRule().kernel_serves(running)
    monkeypatch.setenv("DIVEBATCH_BACKEND", "cpp")
    assert norm._kernel_serves(small, cpu_min_positions=cut_off)


def test_memoised_route_name_follows_the_model_and_its_constants(monkeypatch):
    from divebatch.layers import linear

    shapes = [(16, 256, 32, 128), (16, 4, 256, 1024), (16, 2, 512, 2048), (8, 1, 64, 64)]
    for shape in shapes:
        for device_type in ("cpu", "cuda"):
            assert linear.fused_linear_route_name(*shape, device_type) == fused_linear_route(*shape, device_type).route
    assert linear.fused_linear_route_name(16, 4, 256, 1024, "cpu") == "ghost"
    monkeypatch.setattr(linear, "FUSED_TILE_COST", 0.0)  # a changed constant is a new key, not a stale answer
    assert linear.fused_linear_route_name(16, 4, 256, 1024, "cpu") == "fused-instantiate"


def test_a_bad_buffer_bound_in_the_environment_is_refused_at_import_by_name():
    import os
    import subprocess

    done = subprocess.run([sys.executable, "-c", "import divebatch"], capture_output=True, text=True,
                          env={**os.environ, "DIVEBATCH_CUDA_MAX_EXTRA_MB": "lots"}, cwd=ROOT)
    assert done.returncode != 0
    assert "DIVEBATCH_CUDA_MAX_EXTRA_MB='lots' is not a size in MiB" in done.stderr


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_buffer_bounds_read_from_the_environment(monkeypatch, value):
    from divebatch.layers import routes

    monkeypatch.setenv("DIVEBATCH_MAX_EXTRA_MB", value)
    with pytest.raises(ValueError, match=f"DIVEBATCH_MAX_EXTRA_MB='{value}' is not a size in MiB"):
        routes._megabytes_from_env("DIVEBATCH_MAX_EXTRA_MB", "8")
    monkeypatch.setenv("DIVEBATCH_CUDA_MAX_EXTRA_MB", "0.5")
    assert routes._megabytes_from_env("DIVEBATCH_CUDA_MAX_EXTRA_MB", "256") == 0.5 * 2**20
    monkeypatch.delenv("DIVEBATCH_CUDA_MAX_EXTRA_MB")
    assert routes._megabytes_from_env("DIVEBATCH_CUDA_MAX_EXTRA_MB", "256") == 256 * 2**20
