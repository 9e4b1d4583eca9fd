"""The Triton kernels (``divebatch._kernels``) against the PyTorch reference (``divebatch/reference.py``).

By default the kernels run under the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set below before triton or divebatch is imported); shapes are small and blocks large so the
file stays well under 3 minutes on two cores. ``DIVEBATCH_TRITON_TEST_DEVICE=cuda`` runs the
same tests natively on a GPU (bench/gpu/run_gpu_checks.sh), plus a few larger shapes.

Checks: odd shapes (T, d, p not multiples of the blocks), T = 1, B = 1, empty batch,
float32/float16/bfloat16, non-contiguous inputs (transposed, strided, sliced views; no copies);
float32 relative error <= 1e-4 against the reference and a float64 oracle; low precision
``|kernel - ref_fp32| <= 2 |ref_lowprec - ref_fp32| + atol`` (the kernel reads the rounded
inputs and must lose nothing more than the rounding did).
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("DIVEBATCH_TRITON_TEST_DEVICE", "cpu").lower()
if DEVICE == "cpu":
    # Must happen before triton (or divebatch, which imports the kernels) is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from divebatch._build import load_file_package  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = DEVICE == "cpu"


def _load_kernels():
    """``divebatch._kernels`` when it imports in the right mode, else a fresh copy of ``kernels/``."""
    try:
        from divebatch import _kernels as kernels

        if bool(kernels.INTERPRET) == INTERPRETED:
            return kernels
    except Exception:  # noqa: BLE001 - divebatch/__init__ fails: use the files
        pass
    return load_file_package("_divebatch_kernels_under_test", REPO / "kernels" / "__init__.py")


def _load_reference():
    path = REPO / "divebatch" / "reference.py"
    spec = importlib.util.spec_from_file_location("_divebatch_reference_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


K = _load_kernels()
R = _load_reference()

if INTERPRETED and not K.INTERPRET:
    pytest.skip("the kernels were imported before TRITON_INTERPRET=1 was set (set it in conftest.py or run "
                "this file alone)", allow_module_level=True)
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("DIVEBATCH_TRITON_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, seed, layout="contig", scale=1.0):
    """float32 CPU tensor of ``shape`` in a given memory layout (the values never depend on it).

    contig: plain; transposed: last two dims swapped in memory (inner stride != 1);
    strided: every other element of a wider tensor in the last dim and every other sample;
    sliced: a window with a storage offset of a larger tensor.
    """
    x = torch.randn(*shape, generator=_gen(seed)) * scale
    if layout == "contig" or x.dim() < 2:
        return x
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        big = torch.zeros(shape[0] * 2, *shape[1:-1], shape[-1] * 2)
        view = big[::2, ..., ::2]
        view.copy_(x)
        return view
    if layout == "sliced":
        big = torch.zeros(shape[0] + 1, *[s + 3 for s in shape[1:]])
        view = big[(slice(1, None), *[slice(2, 2 + s) for s in shape[1:]])]
        view.copy_(x)
        return view
    raise ValueError(layout)


def _like_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``dtype`` copy of ``x`` on the device, laid out like ``x`` (same kind of non-contiguity)."""
    if x.is_contiguous():
        return x.to(device=DEVICE, dtype=dtype)
    base = x._base if x._base is not None else x
    big = torch.zeros(base.shape, dtype=dtype, device=DEVICE).as_strided(base.size(), base.stride())
    view = big.as_strided(x.size(), x.stride(), x.storage_offset())
    view.copy_(x)
    assert view.stride() == x.stride()
    return view


def _cpu(xs):
    return [x.detach().cpu() for x in xs] if isinstance(xs, (tuple, list)) else xs.detach().cpu()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max(|ref|, tiny), elementwise; for matrices, relative to the largest entry."""
    out, ref = out.double(), ref.double()
    if ref.dim() > 1:
        return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0
    if not ref.numel():
        return 0.0
    return float(((out - ref).abs() / ref.abs().clamp_min(1e-30)).max())


def _assert_fp32(out, ref, what):
    assert out.dtype == torch.float32, f"{what}: dtype {out.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    both_zero = (ref == 0) & (out == 0)
    if bool(both_zero.all()):
        return
    err = _rel_err(out, ref)
    assert err <= 1e-4, f"{what}: relative error {err:.3g} > 1e-4\nkernel {out}\nref    {ref}"


def _assert_lowprec(out, ref32, ref_lp, what, atol_rel=1e-4):
    assert out.dtype == torch.float32 and out.shape == ref32.shape, what
    out, ref32, ref_lp = out.double(), ref32.double(), ref_lp.double()
    atol = atol_rel * float(ref32.abs().max()) if ref32.numel() else 0.0
    bound = 2 * (ref_lp - ref32).abs() + atol
    excess = (out - ref32).abs() - bound
    assert bool((excess <= 0).all()), (f"{what}: |kernel - ref32| exceeds 2|ref_lp - ref32| + atol by up to "
                                       f"{float(excess.max()):.3g}\nkernel {out}\nref32  {ref32}\nref_lp {ref_lp}")


def _oracle64(a, g, with_bias):
    """float64 per-sample weight and bias norms and the summed weight gradient (materialised)."""
    a64, g64 = a.double().cpu(), g.double().cpu()
    per_sample = torch.bmm(g64.transpose(1, 2), a64)
    bias = g64.sum(1).square().sum(1) if with_bias else torch.zeros(a.shape[0], dtype=torch.float64)
    return per_sample.square().sum((1, 2)), bias, per_sample.sum(0)


def _check(name, outs, a32, g32, lp_inputs, dtype, ref_fn, extra=()):
    """Compare the kernel outputs with the reference run on fp32 and on the rounded inputs."""
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    ref32 = ref_fn(a32, g32, *extra)
    ref32 = ref32 if isinstance(ref32, (tuple, list)) else (ref32,)
    if dtype == torch.float32:
        for i, (o, r) in enumerate(zip(_cpu(outs), ref32)):
            _assert_fp32(o, r, f"{name}[{i}] fp32")
        return
    ref_lp = ref_fn(*[x.cpu() for x in lp_inputs], *extra)
    ref_lp = ref_lp if isinstance(ref_lp, (tuple, list)) else (ref_lp,)
    for i, (o, r32, rlp) in enumerate(zip(_cpu(outs), ref32, ref_lp)):
        _assert_lowprec(o, r32, rlp, f"{name}[{i}] {dtype}")


# Shapes (B, T, d, p): the interpreter's fixed blocks are BLOCK_T=16, BLOCK_K=32 (ghost/embedding)
# and 32x32x16 (instantiate), so these cover partial tiles in every dimension, several T tiles
# (off-diagonal pairs), T = 1, B = 1 and exact multiples.
SEQ_SHAPES = [(2, 37, 45, 29), (1, 1, 7, 5), (3, 16, 32, 16), (1, 50, 70, 33), (4, 3, 1, 2)]
if DEVICE == "cuda":
    SEQ_SHAPES += [(3, 300, 200, 130), (2, 1029, 257, 511)]
LAYOUTS = ("contig", "transposed", "strided", "sliced")


def _seq_inputs(shape, layout, seed=0):
    B, T, d, p = shape
    a = _rand((B, T, d), seed, layout)
    g = _rand((B, T, p), seed + 1, "contig" if layout == "sliced" else layout, scale=0.1)
    return a, g


def _params(shapes):
    """(shape, dtype, layout): every shape in every dtype contiguous, and each layout on two shapes."""
    out = [(s, dt, "contig") for s in shapes for dt in DTYPES]
    two = (shapes[0], shapes[min(3, len(shapes) - 1)])
    out += [(s, dt, lay) for lay in LAYOUTS[1:] for s in two for dt in DTYPES]
    return out


def _id(p):
    shape, dtype, layout = p
    return f"{'x'.join(map(str, shape))}-{str(dtype).split('.')[-1]}-{layout}"


# --------------------------------------------------------------------------- ghost_norm
@pytest.mark.parametrize("case", _params(SEQ_SHAPES), ids=_id)
def test_ghost_norm(case):
    shape, dtype, layout = case
    a32, g32 = _seq_inputs(shape, layout)
    a, g = _like_layout(a32, dtype), _like_layout(g32, dtype)
    with_bias = sum(shape) % 2 == 0 or layout != "contig"
    outs = K.ghost_norm_triton(a, g, with_bias)
    assert all(o.device.type == DEVICE for o in outs)
    _check("ghost_norm", outs, a32, g32, (a, g), dtype, R.ghost_norm, (with_bias,))
    if dtype == torch.float32:
        w64, b64, _ = _oracle64(a32, g32, with_bias)
        _assert_fp32(_cpu(outs[0]), w64.float(), "ghost_norm weight vs float64")
        _assert_fp32(_cpu(outs[1]), b64.float(), "ghost_norm bias vs float64")


@pytest.mark.parametrize("with_bias", [True, False])
def test_ghost_norm_bias_flag_and_mixed_dtypes(with_bias):
    a32, g32 = _seq_inputs((2, 21, 19, 35), "contig", seed=5)
    a, g = _like_layout(a32, torch.bfloat16), _like_layout(g32, torch.float32)
    w, b = K.ghost_norm_triton(a, g, with_bias)
    ref = R.ghost_norm(a.cpu().float(), g32, with_bias)
    _assert_fp32(_cpu(w), ref[0], "ghost weight, a bf16 / g fp32")
    if with_bias:
        _assert_fp32(_cpu(b), ref[1], "ghost bias")
    else:
        assert bool((_cpu(b) == 0).all())


# --------------------------------------------------------------------------- instantiate_norm
@pytest.mark.parametrize("case", _params(SEQ_SHAPES), ids=_id)
def test_instantiate_norm(case):
    shape, dtype, layout = case
    a32, g32 = _seq_inputs(shape, layout, seed=10)
    a, g = _like_layout(a32, dtype), _like_layout(g32, dtype)
    with_bias = sum(shape) % 2 == 1 or layout != "contig"
    outs = K.instantiate_norm_triton(a, g, with_bias)
    assert outs[2].shape == (shape[3], shape[2]) and outs[2].is_contiguous()
    _check("instantiate_norm", outs, a32, g32, (a, g), dtype, R.instantiate_norm, (with_bias,))
    if dtype == torch.float32:
        w64, b64, s64 = _oracle64(a32, g32, with_bias)
        for o, r, what in zip(_cpu(outs), (w64, b64, s64), ("weight", "bias", "weight_grad_sum")):
            _assert_fp32(o, r.float(), f"instantiate_norm {what} vs float64")


@pytest.mark.parametrize("n_split", [2, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_instantiate_norm_sample_split(n_split, dtype):
    """The grid split over samples (atomic weight-gradient accumulation) gives the same results."""
    a32, g32 = _seq_inputs((5, 19, 40, 35), "strided", seed=11)
    a, g = _like_layout(a32, dtype), _like_layout(g32, dtype)
    outs = K.instantiate_norm_triton(a, g, True, _n_split_override=n_split)
    _check("instantiate_norm split", outs, a32, g32, (a, g), dtype, R.instantiate_norm, (True,))


def test_instantiate_norm_mixed_dtypes():
    a32, g32 = _seq_inputs((3, 17, 33, 18), "contig", seed=12)
    a, g = _like_layout(a32, torch.float16), _like_layout(g32, torch.float32)
    outs = K.instantiate_norm_triton(a, g, True)
    ref = R.instantiate_norm(a.cpu().float(), g32, True)
    for i, (o, r) in enumerate(zip(_cpu(outs), ref)):
        _assert_fp32(o, r, f"instantiate_norm mixed [{i}]")


def test_instantiate_matches_ghost():
    a32, g32 = _seq_inputs((2, 33, 40, 24), "contig", seed=13)
    a, g = _like_layout(a32, torch.float32), _like_layout(g32, torch.float32)
    gw, gb = _cpu(K.ghost_norm_triton(a, g, True))
    iw, ib, _ = _cpu(K.instantiate_norm_triton(a, g, True))
    _assert_fp32(iw, gw, "instantiate vs ghost weight")
    _assert_fp32(ib, gb, "instantiate vs ghost bias")


# --------------------------------------------------------------------------- outer_norm
OUTER_SHAPES = [(5, 37, 29), (1, 1, 1), (3, 300, 70), (9, 64, 128)]
if DEVICE == "cuda":
    OUTER_SHAPES += [(1000, 4096, 1000), (7, 20000, 3)]


@pytest.mark.parametrize("case", _params(OUTER_SHAPES), ids=_id)
def test_outer_norm(case):
    (B, d, p), dtype, layout = case
    a32 = _rand((B, d), 20, layout)
    g32 = _rand((B, p), 21, layout, scale=0.1)
    a, g = _like_layout(a32, dtype), _like_layout(g32, dtype)
    with_bias = (B + d) % 2 == 0 or layout != "contig"
    outs = K.outer_norm_triton(a, g, with_bias)
    _check("outer_norm", outs, a32, g32, (a, g), dtype, R.outer_norm, (with_bias,))
    if not with_bias:
        assert bool((_cpu(outs[1]) == 0).all())


# --------------------------------------------------------------------------- embedding_norm
EMB_SHAPES = [(2, 37, 29), (1, 1, 5), (3, 16, 32), (2, 50, 45)]
if DEVICE == "cuda":
    EMB_SHAPES += [(4, 700, 256)]


_EMB_CASES = [(c, pad) for c in _params(EMB_SHAPES)
              for pad in ((-1, 0, 3) if c[1] == torch.float32 and c[2] == "contig" else (3,))]


@pytest.mark.parametrize("case,padding_idx", _EMB_CASES, ids=[f"{_id(c)}-pad{p}" for c, p in _EMB_CASES])
def test_embedding_norm(case, padding_idx):
    (B, T, p), dtype, layout = case
    vocab = max(2, T // 3)  # many repeats within a sample, and across tile pairs
    idx = torch.randint(0, vocab, (B, T), generator=_gen(30 + T))
    if layout != "contig":  # indices non-contiguous too, and int32
        idx = idx.t().contiguous().t().to(torch.int32)
    g32 = _rand((B, T, p), 31, layout, scale=0.1)
    g = _like_layout(g32, dtype)
    out = K.embedding_norm_triton(idx.to(DEVICE), g, padding_idx)
    ref_fn = lambda i, x, pad: R.embedding_norm(i.long(), x, pad)  # noqa: E731
    _check("embedding_norm", out, idx, g32, (idx, g), dtype, ref_fn, (padding_idx,))


def test_embedding_norm_all_padding_and_distinct():
    g = _rand((2, 20, 9), 40).to(DEVICE)
    idx = torch.full((2, 20), 4, device=DEVICE)
    assert bool((_cpu(K.embedding_norm_triton(idx, g, 4)) == 0).all())
    distinct = torch.arange(20, device=DEVICE).repeat(2, 1)  # no pair s != t matches: sum_t ||g_t||^2
    _assert_fp32(_cpu(K.embedding_norm_triton(distinct, g, -1)), g.cpu().square().sum((1, 2)), "distinct")


# --------------------------------------------------------------------------- edge cases and errors
def test_empty_batch_and_empty_sequence():
    for B, T in ((0, 5), (3, 0)):
        a, g = torch.zeros(B, T, 6, device=DEVICE), torch.zeros(B, T, 4, device=DEVICE)
        for out, ref in zip(K.ghost_norm_triton(a, g, True), R.ghost_norm(a.cpu(), g.cpu(), True)):
            assert out.shape == ref.shape and bool((_cpu(out) == ref).all())
        for out, ref in zip(K.instantiate_norm_triton(a, g, True), R.instantiate_norm(a.cpu(), g.cpu(), True)):
            assert out.shape == ref.shape and bool((_cpu(out) == ref).all())
        idx = torch.zeros(B, T, dtype=torch.long, device=DEVICE)
        assert K.embedding_norm_triton(idx, g, -1).shape == (B,)
    w, b = K.outer_norm_triton(torch.zeros(0, 3, device=DEVICE), torch.zeros(0, 2, device=DEVICE), True)
    assert w.shape == b.shape == (0,)


def test_outer_norm_empty_feature_dims():
    for d, p in ((0, 3), (4, 0), (0, 0)):
        a, g = torch.randn(3, d, device=DEVICE), torch.randn(3, p, device=DEVICE)
        for out, ref in zip(_cpu(K.outer_norm_triton(a, g, True)), R.outer_norm(a.cpu(), g.cpu(), True)):
            assert out.shape == ref.shape
            assert bool((out[ref == 0] == 0).all())
            if bool((ref != 0).all()):
                _assert_fp32(out, ref, f"outer_norm d={d} p={p}")


def test_zero_width_bias_only():
    g32 = _rand((2, 5, 4), 50)
    a, g = torch.zeros(2, 5, 0, device=DEVICE), g32.to(DEVICE)
    for op, ref in ((K.ghost_norm_triton, R.ghost_norm), (K.instantiate_norm_triton, R.instantiate_norm)):
        outs, refs = _cpu(op(a, g, True)), ref(a.cpu(), g32, True)
        _assert_fp32(outs[1], refs[1], f"{op.__name__} bias with d = 0")
        assert bool((outs[0] == 0).all())
        outs = _cpu(op(torch.randn(2, 5, 3, device=DEVICE), torch.zeros(2, 5, 0, device=DEVICE), True))
        assert bool((outs[0] == 0).all()) and bool((outs[1] == 0).all()), f"{op.__name__} with p = 0"


@pytest.mark.parametrize("op", ["ghost_norm", "instantiate_norm"])
def test_input_errors_name_the_argument(op):
    fn = getattr(K, f"{op}_triton")
    a, g = torch.randn(2, 3, 4, device=DEVICE), torch.randn(2, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="`a`"):
        fn(a[0], g, True)
    with pytest.raises(TypeError, match="`g`"):
        fn(a, g.to(torch.float64), True)
    with pytest.raises(ValueError, match="`g`"):
        fn(a, g[:1], True)
    with pytest.raises(ValueError, match="`a`"):
        fn(torch.randn(2, 3, 4, device="meta"), torch.randn(2, 3, 5, device="meta"), True)


def test_outer_and_embedding_errors():
    with pytest.raises(ValueError, match="`a`"):
        K.outer_norm_triton(torch.randn(2, 3, 1, device=DEVICE), torch.randn(2, 3, device=DEVICE), True)
    with pytest.raises(ValueError, match="`g`"):
        K.outer_norm_triton(torch.randn(2, 3, device=DEVICE), torch.randn(3, 3, device=DEVICE), True)
    with pytest.raises(TypeError, match="`indices`"):
        K.embedding_norm_triton(torch.zeros(2, 3, device=DEVICE), torch.randn(2, 3, 4, device=DEVICE), -1)
    with pytest.raises(ValueError, match="`g`"):
        K.embedding_norm_triton(torch.zeros(2, 3, dtype=torch.long, device=DEVICE),
                                torch.randn(2, 4, 4, device=DEVICE), -1)


def test_wrappers_keep_no_reference_to_their_inputs():
    """Layer inputs and output grads are dropped once a wrapper returns: a cache or a saved argument
    would keep every step's activations alive (on a GPU, memory growing with each step)."""
    import gc
    import weakref

    a, g = torch.randn(2, 5, 6, device=DEVICE), torch.randn(2, 5, 4, device=DEVICE)
    idx = torch.randint(0, 7, (2, 5), device=DEVICE)
    a1, g1 = torch.randn(3, 6, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    K.ghost_norm_triton(a, g, True)
    K.instantiate_norm_triton(a, g, True)
    K.embedding_norm_triton(idx, g, -1)
    K.outer_norm_triton(a1, g1, True)
    refs = [weakref.ref(t) for t in (a, g, idx, a1, g1)]
    del a, g, idx, a1, g1
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert not alive, f"inputs {alive} (of a, g, indices, a1, g1) are still referenced after the calls"



def _autotune_keys(monkeypatch, kernel) -> list[tuple]:
    """Records the autotune key of every launch of ``kernel`` (as ``Autotuner.run`` forms it)."""
    keys, run = [], kernel.run

    def recording_run(*args, **kwargs):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        keys.append(tuple(named[name] for name in kernel.keys))
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", recording_run)
    return keys


@pytest.mark.parametrize("op", ["ghost_norm", "instantiate_norm", "embedding_norm"])
def test_autotune_key_rounds_lengths_and_batch_sizes(monkeypatch, op):
    """A run with variable sequence lengths, or with DiveBatch's growing batch, must not time
    every config again for each new T or B: the key holds both rounded up to a power of two."""
    module = importlib.import_module(f"{K.__name__}.{op}")
    kernel = getattr(module, f"_{op}_kernel")
    assert "T" not in kernel.keys and "B" not in kernel.keys, kernel.keys
    keys = _autotune_keys(monkeypatch, kernel)
    wrapper = getattr(K, f"{op}_triton")
    shapes = [(3, 33), (4, 40), (3, 64), (3, 65), (5, 33)]  # same key for the first three
    for i, (B, T) in enumerate(shapes):
        g = torch.randn(B, T, 4, device=DEVICE)
        if op == "embedding_norm":
            wrapper(torch.randint(0, 5, (B, T), device=DEVICE), g, -1)
        else:
            wrapper(torch.randn(B, T, 6, device=DEVICE), g, True)
    assert len(keys) == len(shapes)
    assert keys[0] == keys[1] == keys[2], keys[:3]
    assert len({keys[0], keys[3], keys[4]}) == 3, "T=65 or B=5 fell into the key of T<=64, B<=4"
    assert K._common.tuning_size(1) == 1 and K._common.tuning_size(64) == 64 and K._common.tuning_size(65) == 128

# --------------------------------------------------------------------------- registration
_SCHEMAS = {  # the schema lines of divebatch/ops.py (SCHEMAS), used on a scratch namespace
    "ghost_norm": "ghost_norm(Tensor a, Tensor g, bool with_bias) -> (Tensor, Tensor)",
    "instantiate_norm": "instantiate_norm(Tensor a, Tensor g, bool with_bias) -> (Tensor, Tensor, Tensor)",
    "outer_norm": "outer_norm(Tensor a, Tensor g, bool with_bias) -> (Tensor, Tensor)",
    "embedding_norm": "embedding_norm(Tensor indices, Tensor g, int padding_idx) -> Tensor",
}
_LIBS = []  # keep the scratch libraries alive for the whole session


def test_register_cuda_on_a_scratch_library():
    ns = f"divebatch_kernels_test_{os.getpid()}"
    lib = torch.library.Library(ns, "DEF")  # noqa: TOR901
    _LIBS.append(lib)
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
    K.register_cuda(lib)
    for name in _SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", "CUDA"), name
    if DEVICE == "cuda":
        a32, g32 = _seq_inputs((2, 40, 24, 20), "contig", seed=60)
        w, b = getattr(torch.ops, ns).ghost_norm(a32.cuda(), g32.cuda(), True)
        ref = R.ghost_norm(a32, g32, True)
        _assert_fp32(w.cpu(), ref[0], "dispatcher ghost_norm")
        _assert_fp32(b.cpu(), ref[1], "dispatcher ghost bias")


def test_ops_backend_triton(monkeypatch):
    """``DIVEBATCH_BACKEND=triton`` routes divebatch.ops to these kernels (when divebatch imports)."""
    try:
        ops = importlib.import_module("divebatch.ops")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"divebatch.ops does not import here: {exc!r}")
    if getattr(ops, "_kernels", None) is None or bool(ops._kernels.INTERPRET) != INTERPRETED:
        pytest.skip("divebatch._kernels unavailable or imported in the other interpreter mode")
    monkeypatch.setenv("DIVEBATCH_BACKEND", "triton")
    a32, g32 = _seq_inputs((2, 20, 18, 12), "transposed", seed=61)
    a, g = a32.to(DEVICE), g32.to(DEVICE)
    for name in ("ghost_norm", "instantiate_norm"):
        outs = getattr(ops, name)(a, g, True)
        for o, r in zip(_cpu(outs), getattr(R, name)(a32, g32, True)):
            _assert_fp32(o, r, f"ops.{name} via DIVEBATCH_BACKEND=triton")
