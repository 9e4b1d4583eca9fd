"""The first-call check of the Triton kernels against the reference (``divebatch._selfcheck``), run
here on the kernels under Triton's interpreter (CPU tensors): a right kernel passes and is checked
once per kind of input, a kernel whose numbers leave the reference's is refused with an error
naming what was off, and ``register_cuda`` installs the check on every operator it covers."""

from __future__ import annotations

import functools
import os
import zlib

import pytest
import torch

from divebatch import _selfcheck, ops
from divebatch._selfcheck import KernelCheckError, checked

pytestmark = pytest.mark.skipif(ops._kernels is None or not ops._kernels.INTERPRET,
                                reason="needs the Triton kernels under TRITON_INTERPRET=1")


def _inputs(name: str, dtype=torch.float32, T: int = 40, B: int = 3) -> tuple:
    """Small arguments of operator ``name``, in its schema's order; ``T`` sets the size that varies
    (the length, or for the operators without one the batch: ``T // 8`` samples)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name} {T} {B}".encode()))  # (hash() varies by process)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if name in ("ghost_norm", "instantiate_norm"):
        return rand(B, T, 24), 0.1 * rand(B, T, 20), True
    if name == "outer_norm":
        return rand(T // 8, 24), rand(T // 8, 20), True
    if name in ("conv_instantiate_norm", "conv_ghost_norm"):  # (a padded 3 x 3 convolution of T // 8 samples, 3 -> 4 channels)
        return rand(T // 8, 3, 6, 5), rand(T // 8, 4, 6, 5), [3, 3], [1, 1], [1, 1], [1, 1]
    if name == "embedding_norm":
        return torch.randint(0, 10, (B, T), generator=gen), rand(B, T, 16), 2
    if name == "affine_norm_grads":
        return rand(B, T, 32) + 1.0, rand(B, T, 32), False, 1e-5, True, False
    if name == "group_norm_grads":
        return rand(T // 8, 8, 12), rand(T // 8, 8, 12), 4, 1e-5, True
    if name == "channel_norm_grads":
        return rand(T // 8, 8, 12), rand(T // 8, 8, 12), None, None, 1e-5, True
    if name in ("recurrent_scan", "recurrent_scan_backward"):  # (an LSTM of T // 8 steps, H = 8)
        B, T, H = 3, T // 8, 8
        scan = (rand(B, T, 4 * H), 0.3 * rand(4 * H, H), rand(4 * H), rand(B, H), rand(B, H), None, None, "LSTM", False)
        if name == "recurrent_scan":
            return scan
        out, cells, saved = _kernel("recurrent_scan")(*scan)[:3]
        return rand(B, T, H), None, None, scan[1], scan[3], scan[4], None, out, cells, saved, None, "LSTM", False
    raise KeyError(name)


def _kernel(name: str):
    return getattr(ops._kernels, f"{name}_triton")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("DIVEBATCH_TRITON_SELFCHECK", raising=False)
    _selfcheck.forget()
    yield
    _selfcheck.forget()


def _counting_checks(monkeypatch) -> dict:
    """Count the reference comparisons each operator runs."""
    counts = {}
    for name, check in dict(_selfcheck.CHECKS).items():
        def counted(args, outputs, name=name, check=check):
            counts[name] = counts.get(name, 0) + 1
            return check(args, outputs)
        monkeypatch.setitem(_selfcheck.CHECKS, name, counted)
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", _selfcheck.CHECKED_OPS)
def test_right_kernels_pass_and_are_checked_once_per_kind_of_input(name, dtype, monkeypatch):
    counts = _counting_checks(monkeypatch)
    run = checked(name, _kernel(name))
    args = _inputs(name, dtype)
    outputs, plain = run(*args), _kernel(name)(*args)
    for out, want in zip(outputs if isinstance(outputs, tuple) else (outputs,),
                         plain if isinstance(plain, tuple) else (plain,)):
        assert torch.equal(out, want)  # the kernel's own numbers, untouched
    assert counts == {name: 1}
    run(*_inputs(name, dtype, T=60))  # (40, 60 -> 64; 5, 7 samples -> 8: the same compiled kernel)
    assert counts == {name: 1}
    run(*_inputs(name, dtype, T=140))
    assert counts == {name: 2}


def _scaled(kernel, output: int, factor: float, sample: int | None = None):
    """``kernel`` with one output scaled by ``factor`` (only at ``sample`` if given)."""
    @functools.wraps(kernel)  # (its module: where the check finds the kernel's config)
    def wrong(*args):
        outs = list(kernel(*args))
        if sample is None:
            outs[output] = outs[output] * factor
        else:
            outs[output] = outs[output].clone()
            outs[output][sample] *= factor
        return tuple(outs)
    return wrong


def test_a_kernel_off_by_more_than_the_tolerance_is_refused():
    args = _inputs("ghost_norm")
    # (off at the last sample only, as a race in one program would be: the last sample is checked)
    with pytest.raises(KernelCheckError, match=r"ghost_norm .*output 0 \(samples \[0, 2\]\): relative error [\d.]+e-03 >"
                       r".*; config _ghost_norm_kernel: BLOCK_T: \d+, BLOCK_K"):  # (the autotuned config that ran)
        checked("ghost_norm", _scaled(_kernel("ghost_norm"), 0, 1.002, sample=2))(*args)
    checked("ghost_norm", _scaled(_kernel("ghost_norm"), 0, 1 + 1e-5))(*args)  # float32 rounding's order: kept


def test_a_fused_weight_gradient_off_is_refused_while_its_norms_are_right():
    """The H200's pattern: the fused kernel's per-sample norms right, its weight gradient off."""
    kernel = _kernel("instantiate_norm")

    def one_tile_off(*args):
        weight_sq, bias_sq, grad = kernel(*args)
        grad = grad.clone()
        grad[:4, :4] += 1e-2 * grad.abs().max()
        return weight_sq, bias_sq, grad

    with pytest.raises(KernelCheckError, match="instantiate_norm .*weight gradient: relative error 1.00e-02"):
        checked("instantiate_norm", one_tile_off)(*_inputs("instantiate_norm", torch.bfloat16))


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 30 * (27 + 4)], ids=["whole batch", "a sample at a time"])
def test_a_convolution_weight_gradient_off_is_refused(chunk_bytes, monkeypatch):
    """``conv_instantiate_norm``'s weight gradient is checked in full against the reference (over
    chunks of samples when their unfolded patches are large): a right kernel passes, a tile off
    by 1e-2 is refused while its norms are right."""
    if chunk_bytes is not None:
        monkeypatch.setattr(_selfcheck, "CHUNK_BYTES", chunk_bytes)  # (T = 30 positions, d + p = 27 + 4)
    kernel = _kernel("conv_instantiate_norm")
    args = _inputs("conv_instantiate_norm")
    checked("conv_instantiate_norm", kernel)(*args)
    _selfcheck.forget()

    def one_tile_off(*args):
        weight_sq, grad = kernel(*args)
        grad = grad.clone()
        grad[:2, :2] += 1e-2 * grad.abs().max()
        return weight_sq, grad

    with pytest.raises(KernelCheckError, match="conv_instantiate_norm .*weight gradient: relative error 1.00e-02"):
        checked("conv_instantiate_norm", one_tile_off)(*args)


def test_the_weight_gradient_check_adds_its_row_chunks(monkeypatch):
    """The reference weight gradient is built over bounded chunks of samples: one sample at a time
    it is still the whole product (a right kernel passes, a wrong one is caught)."""
    monkeypatch.setattr(_selfcheck, "CHUNK_BYTES", 4 * 40 * 44)  # one sample of T = 40, d + p = 44
    args = _inputs("instantiate_norm")
    checked("instantiate_norm", _kernel("instantiate_norm"))(*args)
    _selfcheck.forget()
    with pytest.raises(KernelCheckError, match="weight gradient"):
        checked("instantiate_norm", _scaled(_kernel("instantiate_norm"), 2, 1.01))(*args)


def test_a_scan_wrong_after_its_first_step_is_refused():
    """The H200's scans: right at the first step, off after it (the state carried wrongly)."""
    kernel = _kernel("recurrent_scan")

    def drifting(*args):
        out, cells, saved, h_n, c_n = kernel(*args)
        out = out.clone()
        out[:, 1:] *= 1.01
        return out, cells, saved, h_n, c_n

    with pytest.raises(KernelCheckError, match=r"recurrent_scan .*output 0: relative error"):
        checked("recurrent_scan", drifting)(*_inputs("recurrent_scan"))


def test_the_check_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DIVEBATCH_TRITON_SELFCHECK", "0")
    wrong = _scaled(_kernel("outer_norm"), 1, 2.0)
    assert checked("outer_norm", wrong)(*_inputs("outer_norm"))[1].abs().sum() > 0  # (not refused)
    monkeypatch.setenv("DIVEBATCH_TRITON_SELFCHECK", "1")
    with pytest.raises(KernelCheckError, match="outer_norm"):
        checked("outer_norm", wrong)(*_inputs("outer_norm"))


def test_input_kinds_follow_the_compiled_kernel():
    a, g, bias = _inputs("ghost_norm")
    kind = _selfcheck.input_kind("ghost_norm", (a, g, bias))
    assert kind == _selfcheck.input_kind("ghost_norm", (a[:, :33], g[:, :33], bias))  # (33, 40 -> 64)
    assert kind == _selfcheck.input_kind("ghost_norm", _inputs("ghost_norm", B=4, T=56))  # (3 -> 4, 40 -> 64)
    assert kind != _selfcheck.input_kind("ghost_norm", (a[..., :23], g, bias))  # a width: exact
    assert kind != _selfcheck.input_kind("ghost_norm", (a[:, :32], g[:, :32], bias))  # (32 % 16 == 0)
    wide = torch.zeros(3, 40, 32)[..., :24]  # (a sample's stride 1280 and a row's 32: multiples of 16)
    assert kind != _selfcheck.input_kind("ghost_norm", (wide, g, bias))
    assert kind != _selfcheck.input_kind("ghost_norm", (a.to(torch.float16), g, bias))
    assert kind != _selfcheck.input_kind("ghost_norm", (a, g, False))


def test_a_switch_to_another_kernel_of_the_operator_is_checked_again(monkeypatch):
    """``DIVEBATCH_TRITON_GHOST_WIDE`` picks another kernel for the same ghost_norm inputs (another
    compilation, which the first-call check exists for): the same inputs are checked again once it
    is set, and only once."""
    counts = _counting_checks(monkeypatch)
    run = checked("ghost_norm", _kernel("ghost_norm"))
    args = _inputs("ghost_norm")
    monkeypatch.delenv("DIVEBATCH_TRITON_GHOST_WIDE", raising=False)
    run(*args)
    run(*args)
    assert counts == {"ghost_norm": 1}
    monkeypatch.setenv("DIVEBATCH_TRITON_GHOST_WIDE", "1")
    run(*args)
    run(*args)
    assert counts == {"ghost_norm": 2}
    # A disagreement names the switch and each of the module's kernels that ran with its config.
    with pytest.raises(KernelCheckError, match=r"config _ghost_norm_kernel: BLOCK_T: \d+.*; "
                       r"_ghost_norm_wide_kernel: BLOCK_I: \d+.*; with DIVEBATCH_TRITON_GHOST_WIDE=1\)"):
        checked("ghost_norm", _scaled(_kernel("ghost_norm"), 0, 1.002))(*_inputs("ghost_norm", T=140))
    wide = _selfcheck.input_kind("ghost_norm", args)
    monkeypatch.setenv("DIVEBATCH_TRITON_GHOST_WIDE", "0")
    assert _selfcheck.input_kind("ghost_norm", args) != wide


def test_references_run_in_full_float32_and_the_callers_settings_stay(monkeypatch):
    seen = []
    check = _selfcheck.CHECKS["outer_norm"]

    def recording(args, outputs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()))
        return check(args, outputs)

    monkeypatch.setitem(_selfcheck.CHECKS, "outer_norm", recording)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        checked("outer_norm", _kernel("outer_norm"))(*_inputs("outer_norm"))
        assert seen == [(False, "highest")]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == (True, "high")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])


@pytest.mark.parametrize("scans", ["0", "1"], ids=["default", "DIVEBATCH_TRITON_SCANS=1"])
def test_register_cuda_installs_the_check_on_every_kernel(scans, monkeypatch):
    monkeypatch.setenv("DIVEBATCH_TRITON_SCANS", scans)
    wrapped = []

    class Recorder:
        def impl(self, name, fn, key):
            wrapped.append((name, fn, key))

    ops._kernels.register_cuda(Recorder(), wrap=checked)
    by_name = {name: fn for name, fn, key in wrapped}
    assert {key for _, _, key in wrapped} == {"CUDA"}
    expected = set(ops._kernels.TRITON_OPS) - (set() if scans == "1" else set(ops._kernels.UNVERIFIED_ON_GPU))
    assert set(by_name) == expected and expected <= set(_selfcheck.CHECKED_OPS)
    for name, fn in by_name.items():
        assert fn is not _kernel(name) and fn.__wrapped__ is _kernel(name), name


_LIBS = []  # (scratch libraries live for the session)


def test_checked_kernels_run_through_the_dispatcher(monkeypatch):
    """As ``register_cuda`` installs them, called through ``torch.ops`` (here as the CPU kernels of
    a scratch namespace, the interpreter running them): the check sees the arguments as the
    dispatcher hands them (the schema's defaults included) and passes right kernels."""
    counts = _counting_checks(monkeypatch)
    ns = f"divebatch_selfcheck_test_{os.getpid()}"
    lib = torch.library.Library(ns, "DEF")  # noqa: TOR901
    _LIBS.append(lib)
    for name in _selfcheck.CHECKED_OPS:
        lib.define(ops.SCHEMAS[name])
        lib.impl(name, checked(name, _kernel(name)), "CPU")
    for name in _selfcheck.CHECKED_OPS:
        args = _inputs(name, torch.bfloat16)
        if name == "affine_norm_grads":
            args = args[:5]  # (round_x_hat left to the schema's default)
        getattr(torch.ops, ns).__getattr__(name)(*args)
    assert counts == {name: 1 for name in _selfcheck.CHECKED_OPS}


def test_repeated_inputs_skip_the_kind_computation(monkeypatch):
    """Every call of a checked kernel pays a lookup; the same inputs again (a training loop) find
    their exact shapes, strides and alignment seen, without working out their kind."""
    kinds = []
    input_kind = _selfcheck.input_kind
    monkeypatch.setattr(_selfcheck, "input_kind", lambda name, args: kinds.append(name) or input_kind(name, args))
    run = checked("outer_norm", _kernel("outer_norm"))
    args = _inputs("outer_norm")
    for _ in range(3):
        run(*args)
    assert kinds == ["outer_norm"]
    run(*_inputs("outer_norm", T=60))  # (new exact shapes, a kind already checked)
    assert kinds == ["outer_norm"] * 2


def test_inputs_with_nan_are_not_taken_for_a_wrong_kernel(monkeypatch):
    """A diverged step's NaN reaches kernel and reference alike: not refused, and the kind of input
    is checked again at its next (finite) call; a NaN only the kernel gives is refused."""
    counts = _counting_checks(monkeypatch)
    run = checked("ghost_norm", _kernel("ghost_norm"))
    a, g, bias = _inputs("ghost_norm")
    a_nan = a.clone()
    a_nan[0, 3, 5] = float("nan")
    w, _ = run(a_nan, g, bias)
    assert bool(torch.isnan(w[0])) and bool(torch.isfinite(w[1:]).all())  # (the NaN stays in its sample)
    run(a, g, bias)
    assert counts == {"ghost_norm": 2}  # (the first, NaN-holding call settled nothing)
    _selfcheck.forget()
    for _ in range(_selfcheck.MAX_INCONCLUSIVE + 2):  # (a diverged run: its checks stop, not its steps)
        run(a_nan, g, bias)
    assert counts == {"ghost_norm": 2 + _selfcheck.MAX_INCONCLUSIVE}
    _selfcheck.forget()

    def nan_at_last(*args):
        w, b = _kernel("ghost_norm")(*args)
        return torch.cat([w[:-1], w.new_full((1,), float("nan"))]), b

    with pytest.raises(KernelCheckError, match="relative error inf"):
        checked("ghost_norm", nan_at_last)(a, g, bias)
