"""Squared norms of whole gradients (the batch-gradient norm's last step): float32-exact in any layout."""

from __future__ import annotations

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from divebatch import GradNormTracker, _norms
from divebatch._norms import SquaredNormSum, squared_distance, squared_norm
from divebatch.distributed import grad_sq_norm

LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(0, 1),
    "strided slice": lambda t: t[:, ::2],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_squared_norm_is_float32_exact_in_every_layout(layout):
    g = torch.Generator().manual_seed(0)
    t = LAYOUTS[layout](torch.randn(256, 64, 8, 8, generator=g))  # 1M elements: where float32 sums drift
    ref = t.double().square().sum()
    got = squared_norm(t)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.double() - ref) / ref <= 5e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_squared_norm_of_other_dtypes_is_float32(dtype):
    t = torch.randn(1000, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = squared_norm(t)
    assert got.dtype == torch.float32
    assert abs(got.double() - t.double().square().sum()) / t.double().square().sum() <= 1e-6


def test_grad_sq_norm_sums_every_parameter_with_a_gradient():
    lin = torch.nn.Linear(300, 200)
    frozen = torch.nn.Parameter(torch.ones(3))  # no .grad: skipped
    lin(torch.randn(4, 300)).square().sum().backward()
    ref = sum(p.grad.double().square().sum() for p in lin.parameters())
    got = grad_sq_norm([*lin.parameters(), frozen])
    assert abs(got.double() - ref) / ref <= 1e-6
    assert grad_sq_norm([frozen]).item() == 0.0


@pytest.mark.parametrize("bf16_values", [False, True], ids=["float32-values", "bfloat16-values"])
def test_squared_norm_of_a_large_tensor_stays_accurate(bf16_values):
    """An embedding-table-sized gradient (8M elements): one BLAS dot drifts by up to 1e-4 at such
    sizes on some CPUs; the blocked sum must stay at float32 rounding."""
    t = torch.randn(8_000_000, generator=torch.Generator().manual_seed(2))
    if bf16_values:
        t = t.bfloat16().float()
    ref = t.double().square().sum()
    assert abs(squared_norm(t).double() - ref) / ref <= 1e-6
    assert abs(squared_norm(t.bfloat16()).double() - t.bfloat16().double().square().sum()) / ref <= 1e-6


@pytest.mark.parametrize("shape, make", [
    ((3, 12288), lambda t: t),                    # blocks of 4096
    ((2, 110592), lambda t: t),                   # blocks of 4096 (a [576, 192] weight per sample)
    ((4, 768), lambda t: t),                      # one block per row: summed directly
    ((5, 1000), lambda t: t),                     # no power-of-two block
    ((4, 64, 48), lambda t: t.transpose(1, 2)),   # a non-contiguous per-sample gradient
    ((3, 8192), lambda t: t.half()),              # float16: squared in float32
])
def test_per_sample_sq_is_each_rows_squared_norm(shape, make):
    from divebatch.layers.base import per_sample_sq

    g = torch.Generator().manual_seed(0)
    # Rows of very different scales, so a sum that mixed rows or dropped a block would show.
    t = make(torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[0]).view(-1, *[1] * (len(shape) - 1)))
    ref = t.double().reshape(shape[0], -1).square().sum(dim=1)
    got = per_sample_sq(t)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    assert ((got.double() - ref).abs() / ref).max() <= 1e-6


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("one_launch", [False, True], ids=["blocked (CPU)", "one reduction each (CUDA)"])
def test_squared_norm_sum_adds_every_tensor(one_launch, monkeypatch):
    """Both strategies give sum ||t||^2 over tensors of mixed sizes and dtypes; the CUDA one (forced
    here on CPU) dispatches one op per tensor, the launch-bound case it is for."""
    monkeypatch.setattr(_norms, "_one_launch_per_tensor", lambda t: one_launch)
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(7, generator=g), torch.randn(64, 33, generator=g).t(),
               torch.randn(3000, generator=g).to(torch.bfloat16), torch.randn(5, 5, generator=g).double()]
    if not one_launch:  # more block sums than the CPU path keeps (a CPU float32 vector_norm would drift here)
        tensors.append(torch.randn(5000, 1024, generator=g))
    acc = SquaredNormSum()
    assert acc.total() is None
    counter = _CountOps()
    with counter:
        for t in tensors:
            acc.add(t)
    if one_launch:  # (the float64 tensor's norm is cast to float32: one more)
        assert counter.ops == len(tensors) + 1
    small = torch.randn(1024, generator=g)  # a bias: at most _BLOCK elements, one dot on CPU too
    counter = _CountOps()
    with counter:
        acc.add(small)
    assert counter.ops <= 2  # (a view, the reduction)
    tensors.append(small)
    ref = sum(t.double().square().sum() for t in tensors)
    got = acc.total()
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.double() - ref) / ref <= 1e-6
    assert acc.total() is got or float(acc.total()) == float(got)  # reading twice gives the same sum


def test_tracked_batch_gradient_norm_is_the_same_either_way(monkeypatch):
    """The tracker's batch-gradient norm through the one-reduction-per-tensor path matches the
    blocked path and the definition."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    results = []
    for one_launch in (False, True):
        monkeypatch.setattr(_norms, "_one_launch_per_tensor", lambda t, v=one_launch: v)
        model.zero_grad(set_to_none=True)
        with GradNormTracker(model, "sum") as tracker:
            (model(x) - y).square().sum().backward()
            results.append(tracker.collect().batch_grad_sq)
    ref = sum(p.grad.double().square().sum() for p in model.parameters())
    for got in results:
        assert abs(got.double() - ref) / ref <= 1e-6


class _LargestOutput(TorchDispatchMode):
    """The most elements any op's tensor output held."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and func.overloadpacket not in _VIEWS:
                self.largest = max(self.largest, t.numel())
        return out


_VIEWS = {torch.ops.aten.view, torch.ops.aten.split, torch.ops.aten.split_with_sizes, torch.ops.aten.slice,
          torch.ops.aten.select, torch.ops.aten.transpose, torch.ops.aten.permute, torch.ops.aten.t,
          torch.ops.aten.unsqueeze, torch.ops.aten.squeeze, torch.ops.aten._unsafe_view, torch.ops.aten.expand,
          torch.ops.aten.as_strided, torch.ops.aten.detach, torch.ops.aten.alias}


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_distance_is_exact_without_a_full_size_temporary(dtype, layout, monkeypatch):
    """The tracker's check of a whole gradient against what the rules account for: exact as
    squared_norm, and never a temporary the size of the gradient (a float32 copy of an LLM head's
    gradient would be the verified step's peak)."""
    monkeypatch.setattr(_norms, "_CHUNK", 1 << 12)
    g = torch.Generator().manual_seed(3)
    t, ref = torch.randn(300, 70, generator=g).to(dtype), torch.randn(300, 70, generator=g)
    if layout == "transposed":
        t, ref = t.t(), ref.t()
    exact = (t.double() - ref.double()).square().sum()
    with _LargestOutput() as seen:
        got = squared_distance(t, ref)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.double() - exact) / exact <= 1e-6
    assert seen.largest <= 1 << 12, f"a temporary of {seen.largest} elements (gradient: {t.numel()})"


class _Launches(TorchDispatchMode):
    """Ops other than views (what a GPU would launch)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_short_per_sample_gradients_are_reduced_side_by_side():
    """A norm layer's weight and bias rows (and any other short per-sample gradients) are squared
    and summed in one reduction: three launches for any number of them; long ones as
    ``per_sample_sq``; the sum exact to float32 rounding."""
    from divebatch.layers.base import per_sample_sq_sum

    g = torch.Generator().manual_seed(4)
    short = [torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g), torch.randn(5, 3, 4, generator=g)]
    long = torch.randn(5, 3, 4096, generator=g)
    for tensors in (short, [*short, long]):
        exact = sum(t.double().reshape(5, -1).square().sum(dim=1) for t in tensors)
        got = per_sample_sq_sum(tensors)
        assert got.dtype == torch.float32 and got.shape == (5,)
        assert ((got.double() - exact).abs() / exact).max() <= 1e-6
    with _Launches() as launches:
        per_sample_sq_sum(short)
    assert len(launches.names) <= 3, launches.names  # one by one: 2 each and 2 adds
