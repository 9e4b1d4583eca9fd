"""The C++ CPU kernels of the ``divebatch::*`` operators (csrc/).

Each operator, called through the dispatcher on CPU tensors (``torch.ops.divebatch.*``), is
checked against ``divebatch.reference`` and against a float64 oracle built from explicit
per-sample gradients, on odd shapes, strided views and low-precision inputs; plus
``torch.library.opcheck``, ``torch.compile(fullgraph=True)``, input validation and the
fallback when no extension can be loaded. The C++-only tests (tests/cpp, ctest) are run by
``tests/cpp/run_ctest.sh``, not from here: they need their own CMake build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from divebatch import _build, ops, reference

from .oracle import conv_weight_oracle

requires_cpp = pytest.mark.skipif(
    not ops.CPP_AVAILABLE,
    reason="divebatch C++ extension not loaded (no compiler, or DIVEBATCH_NO_JIT=1); build it with "
           "`pip install --no-build-isolation -e .`",
)

D = torch.ops.divebatch
OPS = ("ghost_norm", "instantiate_norm", "conv_instantiate_norm", "conv_ghost_norm", "outer_norm", "embedding_norm",
       "affine_norm_grads", "group_norm_grads", "channel_norm_grads")
ROOT = Path(__file__).resolve().parent.parent

# (B, T, d, p): T = 1; B = 1; T odd and crossing the 256-row Gram tile; B = 1 with T crossing
# the smaller tiles used when the batch alone cannot keep the threads busy; many short samples,
# all in one batched GEMM call (a small call: below the C++ kSmallCallWork) or several per call in
# several calls; an empty batch.
SHAPES = [
    (3, 7, 5, 4),
    (4, 1, 6, 3),
    (1, 9, 4, 5),
    (2, 257, 9, 6),
    (1, 301, 12, 10),
    (5, 130, 7, 33),
    (300, 6, 5, 4),
    (600, 6, 8, 8),
    (0, 5, 3, 2),
]
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def make(shape, layout: str, dtype=torch.float32) -> torch.Tensor:
    """A random [B, T, n] tensor stored in the given memory layout."""
    B, T, n = shape
    if layout == "contiguous":
        x = torch.randn(B, T, n)
    elif layout == "transposed":  # [B, n, T] storage: the last dim is not the contiguous one
        x = torch.randn(B, n, T).transpose(1, 2)
    elif layout == "sliced":  # every other position, inner columns: no dim is dense
        x = torch.randn(B, 2 * T, n + 3)[:, ::2, 1:n + 1]
    elif layout == "expanded":  # stride 0 over the batch
        x = torch.randn(1, T, n).expand(B, T, n)
    else:
        raise ValueError(layout)
    return x.to(dtype)


def oracle_linear(a: torch.Tensor, g: torch.Tensor):
    """float64 (weight_sq [B], bias_sq [B], weight_grad_sum [p, d]) from explicit per-sample grads."""
    per_sample = torch.bmm(g.double().transpose(1, 2), a.double())  # [B, p, d]
    return per_sample.square().sum((1, 2)), g.double().sum(1).square().sum(1), per_sample.sum(0)


def oracle_embedding(indices: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """float64 per-sample squared norm of the embedding gradient, one dense table per sample."""
    B, T, p = g.shape
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        idx = indices[b].long()
        rows = idx - idx.min() if T else idx
        table = torch.zeros(int(rows.max()) + 1 if T else 0, p, dtype=torch.float64)
        keep = idx != padding_idx if padding_idx >= 0 else torch.ones_like(idx, dtype=torch.bool)
        table.index_add_(0, rows[keep], g[b].double()[keep])
        out[b] = table.square().sum()
    return out


def random_indices(B: int, T: int, vocab: int, dtype=torch.long) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), dtype=dtype)


@requires_cpp
def test_cpu_kernels_registered():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"divebatch::{name}", "CPU"), name


@requires_cpp
def test_build_is_parallel():
    info = _build.extension().build_info()
    assert "OpenMP" in info and "no OpenMP" not in info, info
    assert _build.extension().num_threads() == torch.get_num_threads()


# ---------------------------------------------------------------- float32 against reference and oracle
@requires_cpp
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_d{}_p{}".format(*s))
def test_ghost_and_instantiate_float32(shape, layout):
    B, T, d, p = shape
    a, g = make((B, T, d), layout), make((B, T, p), layout)
    want_w, want_b, want_sum = oracle_linear(a, g)
    ref = reference.instantiate_norm(a, g, True)

    w, b = D.ghost_norm(a, g, True)
    assert w.dtype == b.dtype == torch.float32 and w.shape == b.shape == (B,)
    assert rel_err(w, want_w) <= 1e-4 and rel_err(b, want_b) <= 1e-4
    assert rel_err(w, reference.ghost_norm(a, g, True)[0]) <= 1e-4

    wi, bi, s = D.instantiate_norm(a, g, True)
    assert s.dtype == torch.float32 and s.shape == (p, d)
    assert rel_err(wi, want_w) <= 1e-4 and rel_err(bi, want_b) <= 1e-4 and rel_err(s, want_sum) <= 1e-4
    for got, exp in zip((wi, bi, s), ref):
        assert rel_err(got, exp) <= 1e-4

    # without bias the second output is zeros, the first unchanged
    w0, b0 = D.ghost_norm(a, g, False)
    assert torch.equal(b0, torch.zeros(B)) and torch.equal(w0, w)
    assert torch.equal(D.instantiate_norm(a, g, False)[1], torch.zeros(B))


@requires_cpp
@pytest.mark.parametrize("layout", ("contiguous", "transposed", "sliced"))
@pytest.mark.parametrize("B,d,p", [(6, 5, 4), (1, 33, 2), (0, 3, 2), (200, 17, 9)])
def test_outer_norm_float32(B, d, p, layout):
    a = make((B, 1, d), layout)[:, 0]
    g = make((B, 1, p), layout)[:, 0]
    want_w, want_b, _ = oracle_linear(a[:, None], g[:, None])
    w, b = D.outer_norm(a, g, True)
    assert w.dtype == torch.float32 and w.shape == (B,)
    assert rel_err(w, want_w) <= 1e-4 and rel_err(b, want_b) <= 1e-4
    for got, exp in zip((w, b), reference.outer_norm(a, g, True)):
        assert rel_err(got, exp) <= 1e-4
    assert torch.equal(D.outer_norm(a, g, False)[1], torch.zeros(B))


@requires_cpp
@pytest.mark.parametrize("padding_idx", [-1, 0, 3])
@pytest.mark.parametrize("layout", ("contiguous", "transposed", "sliced"))
@pytest.mark.parametrize("B,T,p,vocab", [(4, 17, 5, 6), (1, 1, 3, 4), (3, 200, 8, 1000), (2, 64, 7, 2), (0, 4, 3, 2)])
def test_embedding_norm_float32(B, T, p, vocab, layout, padding_idx):
    g = make((B, T, p), layout)
    idx = random_indices(B, T, vocab)
    if layout == "transposed":  # strided indices too
        idx = idx.t().contiguous().t()
    got = D.embedding_norm(idx, g, padding_idx)
    assert got.dtype == torch.float32 and got.shape == (B,)
    assert rel_err(got, oracle_embedding(idx, g, padding_idx)) <= 1e-4
    if B:
        assert rel_err(got, reference.embedding_norm(idx, g, padding_idx)) <= 1e-4


def test_embedding_norm_of_no_positions_is_zero():
    """T = 0 (an EmbeddingBag's batch of empty bags): zeros from the reference and the dispatched kernel."""
    idx, g = torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0, 2)
    for got in (reference.embedding_norm(idx, g, -1), D.embedding_norm(idx, g, -1)):
        assert got.dtype == torch.float32 and torch.equal(got, torch.zeros(3))


@requires_cpp
def test_embedding_norm_int32_indices_and_padding_only():
    g = torch.randn(3, 10, 4)
    idx = random_indices(3, 10, 5)
    assert torch.equal(D.embedding_norm(idx.int(), g, 2), D.embedding_norm(idx, g, 2))
    # a sample made only of padding has no gradient
    idx[1] = 2
    assert D.embedding_norm(idx, g, 2)[1].item() == 0.0


# ---------------------------------------------------------------- low precision
def _lowprec_ok(cpp: torch.Tensor, ref_low: torch.Tensor, ref32: torch.Tensor) -> bool:
    """|cpp - ref_fp32| <= 2 |ref_lowprec - ref_fp32| + atol, elementwise (STYLE §8)."""
    atol = 1e-4 * ref32.abs().max().clamp_min(1e-30)
    return bool(((cpp - ref32).abs() <= 2 * (ref_low - ref32).abs() + atol).all())


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ("contiguous", "transposed"))
@pytest.mark.parametrize("shape", [(3, 67, 8, 6), (1, 260, 5, 7), (4, 1, 9, 3)], ids=str)
def test_linear_ops_low_precision(shape, layout, dtype):
    B, T, d, p = shape
    a32, g32 = make((B, T, d), layout), make((B, T, p), layout)
    a, g = a32.to(dtype), g32.to(dtype)
    for name in ("ghost_norm", "instantiate_norm"):
        cpp = getattr(D, name)(a, g, True)
        ref_low = getattr(reference, name)(a, g, True)
        ref32 = getattr(reference, name)(a32, g32, True)
        for got, low, full in zip(cpp, ref_low, ref32):
            assert got.dtype == torch.float32
            assert _lowprec_ok(got, low, full), name
            # the kernel upcasts before any arithmetic: on the rounded values it matches fp32
            assert rel_err(got, low) <= 1e-4, name
    a1, g1, a1_32, g1_32 = a[:, 0], g[:, 0], a32[:, 0], g32[:, 0]
    for got, low, full in zip(D.outer_norm(a1, g1, True), reference.outer_norm(a1, g1, True),
                              reference.outer_norm(a1_32, g1_32, True)):
        assert _lowprec_ok(got, low, full) and rel_err(got, low) <= 1e-4


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_embedding_norm_low_precision(dtype):
    g32 = torch.randn(3, 50, 6)
    idx = random_indices(3, 50, 7)
    cpp = D.embedding_norm(idx, g32.to(dtype), 1)
    assert cpp.dtype == torch.float32
    assert _lowprec_ok(cpp, reference.embedding_norm(idx, g32.to(dtype), 1), reference.embedding_norm(idx, g32, 1))
    assert rel_err(cpp, oracle_embedding(idx, g32.to(dtype), 1)) <= 1e-4


# ---------------------------------------------------------------- random shapes
@requires_cpp
@settings(max_examples=25, deadline=None)
@given(B=st.integers(0, 4), T=st.integers(1, 300), d=st.integers(1, 12), p=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1))
def test_linear_ops_random_shapes(B, T, d, p, seed):
    gen = torch.Generator().manual_seed(seed)
    a, g = torch.randn(B, T, d, generator=gen), torch.randn(B, T, p, generator=gen)
    want_w, want_b, want_sum = oracle_linear(a, g)
    w, b = D.ghost_norm(a, g, True)
    wi, bi, s = D.instantiate_norm(a, g, True)
    if B == 0:
        assert w.shape == wi.shape == (0,) and not s.any()
        return
    # With tiny d, p the squared norm can nearly cancel (d = p = 1: (sum_t a_t g_t)^2 ~ 0), and
    # no float32 method is then accurate relative to the result, only relative to the sum of
    # |terms|, bounded by (sum_t ||a_t|| ||g_t||)^2: allow ~16 ulp of that.
    terms = (a.double().norm(dim=2) * g.double().norm(dim=2)).sum(1).square()
    for got in (w, wi):
        assert ((got - want_w).abs() <= 1e-4 * want_w.abs().max() + 1e-6 * terms).all()
    assert max(rel_err(b, want_b), rel_err(bi, want_b)) <= 1e-4
    assert ((s - want_sum).abs() <= 1e-4 * want_sum.abs().max() + 1e-6 * terms.sum().sqrt()).all()


@requires_cpp
@settings(max_examples=25, deadline=None)
@given(B=st.integers(0, 4), T=st.integers(1, 80), p=st.integers(1, 9), vocab=st.integers(1, 20),
       padding_idx=st.integers(-1, 5), seed=st.integers(0, 2**31 - 1))
def test_embedding_norm_random_shapes(B, T, p, vocab, padding_idx, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(B, T, p, generator=gen)
    idx = torch.randint(0, vocab, (B, T), generator=gen)
    assert rel_err(D.embedding_norm(idx, g, padding_idx), oracle_embedding(idx, g, padding_idx)) <= 1e-4


# ---------------------------------------------------------------- affine_norm_grads
def oracle_affine_norm(x: torch.Tensor, g: torch.Tensor, rms: bool, eps: float):
    """float64: the normalised rows by F.layer_norm / F.rms_norm, then the per-sample sums."""
    x64, g64 = x.double(), g.double()
    d = x.shape[-1]
    x_hat = (torch.nn.functional.rms_norm(x64, (d,), None, eps) if rms
             else torch.nn.functional.layer_norm(x64, (d,), None, None, eps))
    return (x_hat * g64).sum(dim=1), g64.sum(dim=1)


# (B, R, d): one row of one element; rows wider than the SIMD lanes; more rows than threads with
# B = 1 (the row blocks); many samples; an empty batch; no rows.
NORM_SHAPES = [(3, 7, 5), (1, 1, 1), (2, 9, 67), (1, 301, 12), (40, 3, 33), (0, 4, 3), (2, 0, 3)]


@requires_cpp
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "B{}_R{}_d{}".format(*s))
def test_affine_norm_grads_float32(shape, layout, rms):
    x = make(shape, layout) * 3 + 5  # a mean large against the spread: the two-pass statistics
    g = make(shape, "contiguous" if layout == "expanded" else layout)
    weight, bias = D.affine_norm_grads(x, g, rms, 1e-5, True)
    want_w, want_b = oracle_affine_norm(x, g, rms, 1e-5)
    assert weight.dtype == bias.dtype == torch.float32 and weight.shape == bias.shape == (shape[0], shape[2])
    assert rel_err(weight, want_w) <= 1e-5 and rel_err(bias, want_b) <= 1e-5
    ref_w, ref_b = reference.affine_norm_grads(x, g, rms, 1e-5, True)
    assert rel_err(weight, ref_w) <= 1e-5 and rel_err(bias, ref_b) <= 1e-5
    assert bool((D.affine_norm_grads(x, g, rms, 1e-5, False)[1] == 0).all())


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_affine_norm_grads_low_precision(dtype):
    """16-bit inputs are read as they are (no rounding beyond theirs) and computed in float32."""
    x, g = make((3, 50, 24), "contiguous", dtype), make((3, 50, 24), "transposed", dtype)
    for rms in (False, True):
        weight, bias = D.affine_norm_grads(x, g, rms, 1e-6, True)
        want_w, want_b = oracle_affine_norm(x, g, rms, 1e-6)
        assert rel_err(weight, want_w) <= 1e-5 and rel_err(bias, want_b) <= 1e-5


def llama_rms_oracle(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: x_hat in float32, cast back to x's dtype, times the weight."""
    h = x.float()
    x_hat = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (x_hat.double() * g.double()).sum(dim=1)


def share_matching(out: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> float:
    """The share of entries within ``rtol`` (of the largest) of ``want``."""
    return float(((out.double() - want).abs() <= rtol * want.abs().max()).double().mean())


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_affine_norm_grads_rounds_x_hat_like_llama(dtype):
    """Rounded, nearly every entry matches Llama's own computation; the rare exception is an x_hat
    within one float32 ulp of a rounding boundary of ``dtype``, which two float32 computations of
    the root mean square may round either way. Unrounded, few entries match."""
    x, g = make((3, 40, 48), "contiguous", dtype), make((3, 40, 48), "contiguous", dtype)
    want = llama_rms_oracle(x, g, 1e-6)
    assert share_matching(D.affine_norm_grads(x, g, True, 1e-6, False, True)[0], want) >= 0.97
    assert share_matching(D.affine_norm_grads(x, g, True, 1e-6, False)[0], want) < 0.5
    assert torch.equal(D.affine_norm_grads(x.float(), g, True, 1e-6, False, True)[0],
                       D.affine_norm_grads(x.float(), g, True, 1e-6, False)[0])  # float32: nothing to round


# ---------------------------------------------------------------- group_norm_grads
def oracle_group_norm(x: torch.Tensor, g: torch.Tensor, groups: int, eps: float):
    """float64, by hand: each sample's group normalised by its own mean and biased variance."""
    B, C, S = x.shape
    grouped = x.double().reshape(B, groups, C // groups * S)
    centred = grouped - grouped.mean(dim=2, keepdim=True)
    x_hat = (centred / torch.sqrt(centred.square().mean(dim=2, keepdim=True) + eps)).reshape(B, C, S)
    return (x_hat * g.double()).sum(dim=2), g.double().sum(dim=2)


# (B, C, S, groups): one position; one channel a group (InstanceNorm); one group (all channels);
# many positions; an empty batch.
GROUP_SHAPES = [(3, 8, 37, 2), (2, 4, 1, 2), (2, 6, 70, 6), (1, 6, 300, 1), (4, 32, 49, 8), (0, 4, 3, 2)]


@requires_cpp
@pytest.mark.parametrize("layout", ("contiguous", "transposed", "sliced"))
@pytest.mark.parametrize("shape", GROUP_SHAPES, ids=lambda s: "B{}_C{}_S{}_G{}".format(*s))
def test_group_norm_grads_float32(shape, layout):
    B, C, S, groups = shape
    x = make((B, C, S), layout) * 3 + 5
    g = make((B, C, S), layout)
    weight, bias = D.group_norm_grads(x, g, groups, 1e-5, True)
    want_w, want_b = oracle_group_norm(x, g, groups, 1e-5)
    assert weight.dtype == bias.dtype == torch.float32 and weight.shape == bias.shape == (B, C)
    assert rel_err(weight, want_w) <= 1e-5 and rel_err(bias, want_b) <= 1e-5
    ref_w, ref_b = reference.group_norm_grads(x, g, groups, 1e-5, True)
    assert rel_err(weight, ref_w) <= 1e-5 and rel_err(bias, ref_b) <= 1e-5
    assert bool((D.group_norm_grads(x, g, groups, 1e-5, False)[1] == 0).all())


@requires_cpp
@pytest.mark.parametrize("layout", ("contiguous", "transposed"))  # (transposed: channels-last lanes)
@pytest.mark.parametrize("op", ("group_norm_grads", "channel_norm_grads"))
def test_norm_statistics_keep_their_digits_far_from_zero(op, layout):
    """Inputs whose mean is 80 times their spread: the float32 lane sums of a mean lose digits
    there; both ops correct the estimate from the deviations (the corrected two-pass algorithm)
    and stay at float32 accuracy against a float64 oracle."""
    torch.manual_seed(0)
    x, g = make((3, 6, 2000), layout) * 0.5 + 40, make((3, 6, 2000), layout)
    if op == "group_norm_grads":
        weight, _ = D.group_norm_grads(x, g, 3, 1e-5, False)
        want, _ = oracle_group_norm(x, g, 3, 1e-5)
    else:
        weight, _ = D.channel_norm_grads(x, g, None, None, 1e-5, False)
        want, _ = oracle_channel_norm(x, g, None, None, 1e-5)
    assert rel_err(weight, want) <= 1e-6


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_grads_low_precision(dtype):
    x, g = make((3, 8, 50), "contiguous", dtype), make((3, 8, 50), "transposed", dtype)
    weight, bias = D.group_norm_grads(x, g, 4, 1e-6, True)
    want_w, want_b = oracle_group_norm(x, g, 4, 1e-6)
    assert rel_err(weight, want_w) <= 1e-5 and rel_err(bias, want_b) <= 1e-5


# ---------------------------------------------------------------- channel_norm_grads
def oracle_channel_norm(x: torch.Tensor, g: torch.Tensor, mean, var, eps: float):
    """float64, by hand: each channel normalised by the given statistics or, both None, by the
    mean and biased variance over the whole batch and all positions."""
    x64 = x.double()
    if mean is None:
        mean = x64.mean(dim=(0, 2))
        var = (x64 - mean[:, None]).square().mean(dim=(0, 2))
    x_hat = (x64 - mean.double()[:, None]) / torch.sqrt(var.double()[:, None] + eps)
    return (x_hat * g.double()).sum(dim=2), g.double().sum(dim=2)


def channel_stats(C: int, dtype=torch.float32):
    """Running statistics as a BatchNorm holds them: means off zero, variances well off one."""
    return (torch.randn(C) * 2 + 4).to(dtype), (torch.rand(C) * 8 + 0.5).to(dtype)


# (B, C, S): one position (BatchNorm1d on [B, C]); one channel; positions crossing the
# channels-last loop's 128-position chunk and the row loop's 1024-element chunk; many samples
# of one position; an empty batch.
CHANNEL_SHAPES = [(3, 8, 37), (5, 6, 1), (4, 1, 50), (2, 5, 300), (2, 3, 1100), (64, 16, 1), (0, 4, 3)]


@requires_cpp
@pytest.mark.parametrize("stats", ("batch", "running"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES, ids=lambda s: "B{}_C{}_S{}".format(*s))
@pytest.mark.filterwarnings("error::UserWarning")  # (an empty batch's statistics are not taken: no NaN, no warning)
def test_channel_norm_grads_float32(shape, layout, stats):
    B, C, S = shape
    # Offset far from zero against the spread: a sum of x * g less mean * sum g would lose digits.
    x = make((B, C, S), layout) * 0.5 + 40
    g = make((B, C, S), layout)
    mean, var = channel_stats(C) if stats == "running" else (None, None)
    weight, bias = D.channel_norm_grads(x, g, mean, var, 1e-5, True)
    want_w, want_b = oracle_channel_norm(x, g, mean, var, 1e-5)
    assert weight.dtype == bias.dtype == torch.float32 and weight.shape == bias.shape == (B, C)
    assert rel_err(weight, want_w) <= 1e-5 and rel_err(bias, want_b) <= 1e-5
    ref_w, ref_b = reference.channel_norm_grads(x, g, mean, var, 1e-5, True)
    assert rel_err(weight, ref_w) <= 1e-5 and rel_err(bias, ref_b) <= 1e-5
    assert bool((D.channel_norm_grads(x, g, mean, var, 1e-5, False)[1] == 0).all())


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_norm_grads_low_precision(dtype):
    x, g = make((3, 8, 50), "contiguous", dtype), make((3, 8, 50), "transposed", dtype)
    for mean, var in ((None, None), channel_stats(8, torch.float64), channel_stats(8, dtype)):
        weight, bias = D.channel_norm_grads(x, g, mean, var, 1e-6, True)
        want_w, want_b = oracle_channel_norm(x, g, mean, var, 1e-6)
        assert rel_err(weight, want_w) <= 1e-5 and rel_err(bias, want_b) <= 1e-5


@requires_cpp
def test_channel_norm_grads_in_training_mode_decompose_batch_norms_gradient():
    """With the batch's statistics the per-sample sums are BatchNorm's own decomposition: they add
    up to the weight and bias gradients autograd gives the layer in training mode."""
    module = torch.nn.BatchNorm2d(6)
    x = torch.randn(5, 6, 7, 3) * 2 + 1
    out = module(x)
    g = torch.randn_like(out)
    out.backward(g)
    weight, bias = D.channel_norm_grads(x.reshape(5, 6, -1), g.reshape(5, 6, -1), None, None, module.eps, True)
    torch.testing.assert_close(weight.sum(0), module.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.sum(0), module.bias.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- threads and determinism
@requires_cpp
def test_results_deterministic_and_thread_count_independent():
    a, g = torch.randn(3, 300, 16), torch.randn(3, 300, 80)  # B < 2 x threads: the split paths
    x = torch.randn(1, 300, 80)  # B = 1: the norm rows split into blocks
    cl = torch.randn(3, 80, 16).transpose(1, 2)  # channels-last: the batch statistics summed per sample

    def results():
        return (D.ghost_norm(a, g, True) + D.instantiate_norm(a, g, True)
                + D.affine_norm_grads(x, g[:1], False, 1e-5, True)
                + D.channel_norm_grads(a, a, None, None, 1e-5, True) + D.channel_norm_grads(cl, cl, None, None, 1e-5, True))

    first, again = results(), results()
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = results()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(first[-4:], serial[-4:]))  # channel_norm_grads: fixed order
    assert all(rel_err(x, y) <= 1e-5 for x, y in zip(first, serial))


@requires_cpp
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, out_channels", [
    ((3, 4, 9, 7), (3, 3), (1, 1), (1, 1), (1, 1), 5),
    ((2, 3, 11, 10), (3, 2), (2, 1), (2, 1), (1, 2), 6),
    ((2, 5, 13), (3,), (2,), (1,), (2,), 4),
    ((2, 2, 5, 6, 4), (2, 3, 2), (1, 2, 1), (1, 0, 1), (2, 1, 1), 3),
    ((0, 3, 6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 2),
], ids=["padded", "strided-dilated", "1d", "3d", "no samples"])
def test_conv_operators_are_exact(shape, kernel, stride, padding, dilation, out_channels):
    """The C++ kernels (and the references) of ``conv_instantiate_norm`` and ``conv_ghost_norm``
    against torch.func's per-sample convolution weight gradients, on a channels-last input where it
    has one."""
    x = torch.randn(shape)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(shape[2:], kernel, stride, padding, dilation)]
    g = torch.randn(shape[0], out_channels, *out)
    want = conv_weight_oracle(x, g, kernel, stride, padding, dilation)
    for got in (D.conv_instantiate_norm(x, g, kernel, stride, padding, dilation),
                reference.conv_instantiate_norm(x, g, kernel, stride, padding, dilation)):
        assert got[0].dtype == got[1].dtype == torch.float32 and got[1].shape == want[1].shape
        assert rel_err(got[0], want[0].float()) <= 1e-5 and rel_err(got[1], want[1].float()) <= 1e-5
    for got in (D.conv_ghost_norm(x, g, kernel, stride, padding, dilation),
                reference.conv_ghost_norm(x, g, kernel, stride, padding, dilation)):
        assert got.dtype == torch.float32 and got.shape == (shape[0],)
        assert rel_err(got, want[0].float()) <= 1e-5


#: Run in a fresh process with glibc's mmap threshold fixed (each large buffer its own mapping,
#: returned when freed), so the peak RSS a call adds is the most memory it held at once (MiB).
_CONV_PEAK_PROBE = """
import resource, torch
from divebatch import ops, reference
torch.manual_seed(0)
x, g = torch.randn(64, 64, 16, 16), torch.randn(64, 8, 16, 16)
geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
op = getattr(ops, "conv_{name}_norm")
op(x[:2], g[:2], *geometry)  # (threads and BLAS buffers first)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
got = op(x, g, *geometry)
added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
want = getattr(reference, "conv_{name}_norm")(x, g, *geometry)
got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
print(added, float(((got - want).abs() / want.abs()).max()))
"""


@requires_cpp
@pytest.mark.parametrize("name", ["instantiate", "ghost"])
def test_conv_operators_unfold_a_bounded_chunk_of_samples(name):
    """The C++ convolution operators unfold at most ``DIVEBATCH_MAX_EXTRA_MB`` (8 MiB by default) of
    patches at a time: a batch whose patches take 36 MiB raises the peak memory of a call by less
    than 24 MiB (patches, padded input and per-thread scratch; unfolded whole, 36 MiB and more),
    and the chunks' norms are the reference's."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    env.pop("DIVEBATCH_MAX_EXTRA_MB", None)
    done = subprocess.run([sys.executable, "-c", _CONV_PEAK_PROBE.format(name=name)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    added_mib, err = map(float, done.stdout.split())
    assert added_mib < 24 and err <= 1e-5


@requires_cpp
def test_inputs_requiring_grad():
    # The kernels run below autograd, but their worker threads do not inherit that state: they
    # must work on detached views (no graph, no error) and give the same numbers.
    a, g = torch.randn(2, 300, 3, requires_grad=True), torch.randn(2, 300, 4, requires_grad=True)
    want_w, _, want_sum = oracle_linear(a.detach(), g.detach())
    assert rel_err(D.ghost_norm(a, g, False)[0].detach(), want_w) <= 1e-4
    wi, _, s = D.instantiate_norm(a, g, False)
    assert rel_err(wi.detach(), want_w) <= 1e-4 and rel_err(s.detach(), want_sum) <= 1e-4
    assert a.grad is None and g.grad is None


# ---------------------------------------------------------------- dispatcher integration
def _samples():
    a, g = torch.randn(3, 7, 5), torch.randn(3, 7, 4)
    at, gt = torch.randn(2, 4, 9).transpose(1, 2), torch.randn(2, 6, 9).transpose(1, 2)
    return {
        "ghost_norm": [(a, g, True), (at, gt.half(), False)],
        "instantiate_norm": [(a, g, True), (at, gt, False)],
        "conv_instantiate_norm": [(torch.randn(2, 3, 6, 5), torch.randn(2, 4, 6, 5), [3, 3], [1, 1], [1, 1], [1, 1]),
                                  (torch.randn(2, 9, 3).transpose(1, 2).bfloat16(), torch.randn(2, 4, 5), [2], [2],
                                   [1], [1])],
        "conv_ghost_norm": [(torch.randn(2, 3, 6, 5), torch.randn(2, 4, 3, 5), [3, 3], [2, 1], [1, 1], [1, 1]),
                            (torch.randn(2, 9, 3).transpose(1, 2).half(), torch.randn(2, 4, 5), [2], [2], [1], [1])],
        "outer_norm": [(a[:, 0], g[:, 0], True), (at[:, 0].bfloat16(), gt[:, 0], False)],
        "embedding_norm": [(random_indices(3, 7, 4), g, 1), (random_indices(2, 9, 3).int(), gt, -1)],
        "affine_norm_grads": [(a, torch.randn(3, 7, 5), False, 1e-5, True), (at, gt[..., :4].bfloat16(), True, 1e-6, False),
                              (at.bfloat16(), gt[..., :4], True, 1e-6, False, True)],
        "group_norm_grads": [(a, torch.randn(3, 7, 5), 7, 1e-5, True), (at, gt[..., :4].half(), 3, 1e-6, False)],
        "channel_norm_grads": [(a, torch.randn(3, 7, 5), None, None, 1e-5, True),
                               (at, gt[..., :4].half(), *channel_stats(9), 1e-6, False)],
    }


@requires_cpp
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    for args in _samples()[name]:
        torch.library.opcheck(getattr(D, name).default, args)


@requires_cpp
def test_torch_compile_fullgraph_matches_eager():
    def f(a, g, idx):
        w, b = D.ghost_norm(a, g, True)
        wi, _, s = D.instantiate_norm(a, g, False)
        wo, bo = D.outer_norm(a[:, 0], g[:, 0], True)
        e = D.embedding_norm(idx, g, 0)
        nw, nb = D.affine_norm_grads(g, g, False, 1e-5, True)
        cw, cb = D.channel_norm_grads(a, a, None, None, 1e-5, True)
        return w + 2 * b - wi + wo * bo + e + nw.sum(1) * nb.sum(1) + cw.sum(1) - cb.sum(1), s * 3

    a, g, idx = torch.randn(3, 9, 5), torch.randn(3, 9, 4), random_indices(3, 9, 4)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(a, g, idx), f(a, g, idx)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- input validation
BAD_INPUTS = [
    ("ghost_norm", (torch.randn(4, 5, 3), torch.randn(3, 5, 2), False), r"g must have the same batch size B"),
    ("ghost_norm", (torch.randn(4, 5, 3), torch.randn(4, 6, 2), False), r"g must have the same number of positions T"),
    ("ghost_norm", (torch.randn(4, 3), torch.randn(4, 5, 2), True), r"a must be 3-D"),
    ("ghost_norm", (torch.randn(4, 5, 3), torch.ones(4, 5, 2, dtype=torch.long), True), r"g must be a floating-point"),
    ("instantiate_norm", (torch.randn(4, 5, 3), torch.randn(4, 5), False), r"g must be 3-D"),
    ("instantiate_norm", (torch.randn(2, 5, 3), torch.randn(4, 5, 2), False), r"g must have the same batch size B"),
    ("conv_instantiate_norm", (torch.randn(2, 3, 8, 8), torch.randn(2, 4, 7, 8), [3, 3], [1, 1], [1, 1], [1, 1]),
     r"g must have 8 output positions in spatial dim 0"),
    ("conv_instantiate_norm", (torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), [3, 3, 3], [1, 1], [1, 1], [1, 1]),
     r"kernel_size needs one entry per spatial dim \(2\)"),
    ("conv_instantiate_norm", (torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), [3, 3], [1, 1], [-1, 1], [1, 1]),
     r"padding entries must be >= 0"),
    ("conv_instantiate_norm", (torch.randn(2, 3, 8, 8), torch.randn(3, 4, 8, 8), [3, 3], [1, 1], [1, 1], [1, 1]),
     r"g must have the same batch size B"),
    ("conv_instantiate_norm", (torch.randn(2, 8), torch.randn(2, 8), [1], [1], [0], [1]),
     r"1-3 spatial dims"),
    ("conv_ghost_norm", (torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 7), [3, 3], [1, 1], [1, 1], [1, 1]),
     r"conv_ghost_norm: g must have 8 output positions in spatial dim 1"),
    ("conv_ghost_norm", (torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), [3, 3], [1, 1], [1, 1], [0, 1]),
     r"conv_ghost_norm: dilation entries must be >= 1"),
    ("conv_ghost_norm", (torch.randn(2, 3, 8, 8).int(), torch.randn(2, 4, 8, 8), [3, 3], [1, 1], [1, 1], [1, 1]),
     r"conv_ghost_norm: x must be a floating-point"),
    ("outer_norm", (torch.randn(4, 1, 3), torch.randn(4, 2), False), r"a must be 2-D"),
    ("outer_norm", (torch.randn(4, 3), torch.randn(5, 2), False), r"g must have the same batch size B"),
    ("embedding_norm", (torch.zeros(4, 5), torch.randn(4, 5, 2), -1), r"indices must be an integer"),
    ("embedding_norm", (torch.zeros(4, 5, dtype=torch.long), torch.randn(4, 6, 2), -1),
     r"g must have the same number of positions T"),
    ("embedding_norm", (torch.zeros(3, 5, dtype=torch.long), torch.randn(4, 5, 2), -1),
     r"g must have the same batch size B"),
    ("embedding_norm", (torch.zeros(4, 5, 1, dtype=torch.long), torch.randn(4, 5, 2), -1), r"indices must be 2-D"),
    ("affine_norm_grads", (torch.randn(4, 5, 3), torch.randn(4, 5, 2), False, 1e-5, True), r"g must have the same width d"),
    ("affine_norm_grads", (torch.randn(4, 5, 3), torch.randn(4, 6, 3), False, 1e-5, True), r"g must have the same rows R"),
    ("affine_norm_grads", (torch.randn(4, 3), torch.randn(4, 3), False, 1e-5, True), r"x must be 3-D"),
    ("affine_norm_grads", (torch.randn(4, 5, 3), torch.ones(4, 5, 3, dtype=torch.long), True, 1e-5, True),
     r"g must be a floating-point"),
    ("group_norm_grads", (torch.randn(4, 6, 3), torch.randn(4, 6, 3), 4, 1e-5, True), r"groups=4 must divide the 6"),
    ("group_norm_grads", (torch.randn(4, 6, 3), torch.randn(4, 6, 2), 3, 1e-5, True), r"g must have the same positions S"),
    ("channel_norm_grads", (torch.randn(4, 6, 3), torch.randn(4, 5, 3), None, None, 1e-5, True),
     r"g must have the same channels C"),
    ("channel_norm_grads", (torch.randn(4, 6, 3), torch.randn(4, 6, 3), torch.zeros(6), None, 1e-5, True),
     r"give both mean and var .* got only mean"),
    ("channel_norm_grads", (torch.randn(4, 6, 3), torch.randn(4, 6, 3), torch.zeros(6), torch.ones(5), 1e-5, True),
     r"var must be 1-D with one entry per channel of x \(6\)"),
    ("channel_norm_grads", (torch.randn(4, 6, 3), torch.randn(4, 6, 3), torch.zeros(6, dtype=torch.long), torch.ones(6),
                            1e-5, True), r"mean must be a floating-point"),
]


@requires_cpp
@pytest.mark.parametrize("name,args,message", BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_name_the_argument(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(D, name)(*args)


# ---------------------------------------------------------------- fallback without the extension
def test_no_extension_falls_back_to_reference_with_one_warning():
    # A fresh interpreter where divebatch._C cannot be imported and the JIT build is disabled.
    code = (
        "import sys, warnings\n"
        "sys.modules['divebatch._C'] = None\n"  # makes `from . import _C` raise ImportError
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import torch\n"
        "    from divebatch import _build, ops\n"
        "mine = [w for w in caught if issubclass(w.category, _build.CppExtensionWarning)]\n"
        "assert len(mine) == 1, [str(w.message) for w in caught]\n"
        "assert 'reference' in str(mine[0].message) and 'DIVEBATCH_NO_JIT' in str(mine[0].message)\n"
        "assert ops.CPP_AVAILABLE is False\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('divebatch::ghost_norm', 'CPU')\n"
        "a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)\n"
        "torch.testing.assert_close(torch.ops.divebatch.ghost_norm(a, g, True)[0],\n"
        "                           torch.bmm(g.transpose(1, 2), a).square().sum((1, 2)))\n"
    )
    env = {**os.environ, "DIVEBATCH_NO_JIT": "1", "DIVEBATCH_BACKEND": "auto"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_build_for_another_python_is_named(tmp_path):
    """A tree built under one Python and run under another (the GPU machine's 3.12 with this
    machine's 3.11 build) gets only "cannot import name '_C'" from Python; the warning names the
    file and the cause instead."""
    import importlib.machinery

    ours = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
    other = "_C.cpython-27-x86_64-linux-gnu.so" if "cpython-27" not in ours else "_C.cpython-399-x86_64-linux-gnu.so"
    (tmp_path / other).write_bytes(b"")
    (tmp_path / "_C.py").write_text("")  # (not a build)
    assert _build.foreign_builds(tmp_path) == [other]
    (tmp_path / other).rename(tmp_path / ours)
    assert _build.foreign_builds(tmp_path) == []
