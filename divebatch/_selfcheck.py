"""A first-call check of the Triton kernels against the PyTorch reference, on the GPU at hand.

The kernels are proven on CPU (Triton's interpreter, exact against the reference) and compiled for
sm_80/sm_90 in CI, but what a compiler makes of them on a given GPU is only seen by running them
there: on the one GPU they have met (an H200), a shared-memory race in Triton's sm_90 pipeline put
the ghost kernel 3e-3 to 8e-2 off at large shapes while every interpreter run was exact (fixed
since, see docs/kernels.md). A per-sample norm that is silently wrong is worse than none, so every
Triton implementation registered for CUDA (``kernels.register_cuda``) runs wrapped by ``checked``:
the first time an operator sees a new kind of input (its dtypes, layout, alignment, the exact
widths and the lengths rounded up to a power of two, as the autotuner keys its configs), the
reference computes the same numbers and the kernel's must agree within ``TOLERANCE`` of the
largest; otherwise the call raises ``KernelCheckError`` naming the operator, the config and the
error, instead of returning them.

What it costs, once per kind of input: per-sample operators are checked on their first and last
sample (the reference on two samples; at seq-large's widest layer a few ms and ~0.4 GB of float32
copies), the fused weight gradient of ``instantiate_norm`` in full (a float32 product over
chunks of samples of at most ``CHUNK_BYTES``), and ``channel_norm_grads`` (whose batch statistics
couple the samples) and the recurrent scans (registered on CUDA only with ``DIVEBATCH_TRITON_SCANS=1``: the
kernels the H200 found wrong, fixed since but not rerun on a GPU) on the whole batch. The references
run at full float32 precision whatever ``torch.backends.cuda.matmul.allow_tf32`` says.
``DIVEBATCH_TRITON_SELFCHECK=0`` turns the check off; a call made while a CUDA graph is being
captured is not checked (nor counted as checked).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from typing import Callable

import torch

from . import reference

#: Largest deviation accepted, relative to the largest magnitude of the reference's output (per
#: output tensor). Race-free kernels agreed with the reference to 1e-6-4e-6 on the H200 at every
#: shape; the race gave 8.6e-4 to 8.4e-2.
TOLERANCE = 5e-4

#: For numbers that legitimately differ by more: float32 dots in plain TF32
#: (``DIVEBATCH_TRITON_FP32_DOT=tf32``, ~1e-3), an RMSNorm's x_hat rounded to a 16-bit dtype
#: (``round_x_hat``: a value within a float32 ulp of a rounding boundary rounds either way), and
#: a 16-bit recurrent scan's outputs (rounded to the input dtype at every step; its tests allow 2e-2).
LOOSE_TOLERANCE = 2e-2

#: Float32 copies of inputs the weight-gradient check makes at a time (whole samples, at least one).
CHUNK_BYTES = 256 << 20

#: The operators checked here: every one with a Triton kernel.
CHECKED_OPS = ("ghost_norm", "instantiate_norm", "conv_instantiate_norm", "conv_ghost_norm", "outer_norm",
               "embedding_norm", "affine_norm_grads", "group_norm_grads", "channel_norm_grads", "recurrent_scan",
               "recurrent_scan_backward")

_checked: set[tuple] = set()  # input kinds checked
_seen: set[tuple] = set()  # exact inputs whose kind was checked (a cheaper key to look up first)
_SEEN_MAX = 1 << 16
_inconclusive: dict[tuple, int] = {}  # kinds whose checks met non-finite numbers, and how often

#: Checks of one kind of input that met non-finite numbers (a diverged run) before it is left
#: unchecked: each costs a reference run, and such a run's numbers are lost anyway.
MAX_INCONCLUSIVE = 3


class KernelCheckError(RuntimeError):
    """A Triton kernel's numbers left the reference's on this GPU: they are refused."""


def enabled() -> bool:
    """Whether ``DIVEBATCH_TRITON_SELFCHECK`` (default ``1``) asks for the check; read at each call."""
    return os.environ.get("DIVEBATCH_TRITON_SELFCHECK", "1").strip().lower() not in ("0", "false", "off", "no")


def forget() -> None:
    """Check every kind of input again at its next call (tests; a new process starts empty too)."""
    _checked.clear()
    _seen.clear()
    _inconclusive.clear()


@functools.cache
def _kernel_settings():
    """The Triton kernels' shared launch helpers (``kernels/_common.py``): how their autotune keys
    round lengths, and their float32 dot precision. (Only reached where the kernels import.)"""
    from ._build import import_kernels

    return import_kernels()._common


def input_kind(name: str, args: tuple) -> tuple:
    """What decides which compiled kernel (and autotuned config) a call runs: per tensor its dtype
    and device, the sizes of its first two dims rounded up to a power of two (samples and lengths,
    which vary from batch to batch; the kernels' autotune keys round them alike) and the others
    exact, how Triton specialises each size and stride (1, a multiple of 16) and whether its start
    is 16-byte aligned; the other arguments as they are; and the environment switches that pick
    between an operator's kernels (``KERNEL_SWITCHES`` of ``kernels/_common.py``)."""
    rounded = _kernel_settings().tuning_size
    kind = [name, _kernel_settings().kernel_switches()]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            shape = arg.shape
            lead = tuple((rounded(n), n == 1, n % 16 == 0) for n in shape[:2])
            kind.append((arg.dtype, arg.device, lead, shape[2:], tuple((s == 1, s % 16 == 0) for s in arg.stride()),
                         arg.data_ptr() % 16 == 0))
        else:
            kind.append(tuple(arg) if isinstance(arg, list) else arg)  # (a convolution's geometry)
    return tuple(kind)


@contextlib.contextmanager
def _full_float32():
    """Reference products in full float32 (a user's TF32 setting would put them ~1e-3 off)."""
    before_matmul = torch.backends.cuda.matmul.allow_tf32
    before_cudnn = torch.backends.cudnn.allow_tf32
    before_precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before_matmul
        torch.backends.cudnn.allow_tf32 = before_cudnn
        torch.set_float32_matmul_precision(before_precision)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64 (``max |out|`` where the reference is all zeros)
    over the entries where the reference is finite; infinite where the two are not finite at the
    same entries (a kernel's NaN where the reference has a number, or the other way round)."""
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite):
        return math.inf
    out, ref = out[finite], ref[finite]
    if ref.numel() == 0:
        return 0.0
    scale = float(ref.abs().max())
    err = float((out - ref).abs().max())
    return err / scale if scale > 0 else err


def _samples(batch: int, device: torch.device) -> torch.Tensor:
    """The samples a per-sample operator is checked on: the first and the last."""
    return torch.tensor(sorted({0, batch - 1}), device=device)


def _per_sample_check(reference_fn: Callable, n_outputs: int, per_sample_args: int = 2):
    """A check for an operator whose first ``per_sample_args`` arguments and first ``n_outputs``
    outputs have the samples in dim 0 and are independent per sample."""

    def check(args: tuple, outputs: tuple) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        batch = args[0].shape[0]
        if batch == 0:
            return []
        pick = _samples(batch, args[0].device)
        picked = tuple(a.index_select(0, pick) for a in args[:per_sample_args]) + tuple(args[per_sample_args:])
        refs = reference_fn(*picked)
        refs = refs if isinstance(refs, tuple) else (refs,)
        return [(f"output {i} (samples {pick.tolist()})", outputs[i].index_select(0, pick), refs[i])
                for i in range(n_outputs)]

    return check


#: ``ghost_norm``'s check; ``instantiate_norm``'s norms are checked the same way.
_ghost_check = _per_sample_check(reference.ghost_norm, 2)


def _instantiate_check(args: tuple, outputs: tuple) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The per-sample norms on two samples (by the reference's Gram identity, which holds at most
    256 x 256 float32 tiles), and the weight gradient ``sum_b g_b^T a_b`` in full."""
    a, g, with_bias = args
    found = _ghost_check((a, g, with_bias), outputs)
    B, T, d = a.shape
    grad = torch.zeros(g.shape[-1], d, dtype=torch.float32, device=a.device)
    # (by samples: a strided view, such as a convolution's unfolded patches, is copied a chunk at a time)
    step = _samples_per_chunk(T, d + g.shape[-1])
    for start in range(0, B, step):
        chunk_a, chunk_g = a[start:start + step].float(), g[start:start + step].float()
        grad.addmm_(chunk_g.reshape(-1, chunk_g.shape[-1]).t(), chunk_a.reshape(-1, d))
    return found + [("weight gradient", outputs[2], grad)]


def _samples_per_chunk(rows: int, width: int) -> int:
    """Samples whose float32 copies of ``rows x width`` inputs take at most ``CHUNK_BYTES`` (at least 1)."""
    return max(1, CHUNK_BYTES // (4 * max(1, rows * width)))


_conv_norms_check = _per_sample_check(reference.conv_instantiate_norm, 1)


def _conv_instantiate_check(args: tuple, outputs: tuple) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The per-sample norms on two samples and the weight gradient in full, by the reference (which
    unfolds the patches) over chunks of samples whose patches take at most ``CHUNK_BYTES``."""
    x, g, *geometry = args
    found = _conv_norms_check(args, outputs)
    step = _samples_per_chunk(math.prod(g.shape[2:]), outputs[1].shape[1] + g.shape[1])
    grad = torch.zeros_like(outputs[1])
    for start in range(0, x.shape[0], step):
        grad += reference.conv_instantiate_norm(x[start:start + step], g[start:start + step], *geometry)[1]
    return found + [("weight gradient", outputs[1], grad)]


def _whole_batch_check(reference_fn: Callable, in_float32: bool = False):
    """A check on the whole batch; ``in_float32``: the reference on float32 copies of the inputs
    (for an operator whose reference computes in its inputs' dtype while the kernel carries float32)."""

    def check(args: tuple, outputs: tuple) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        if in_float32:
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        return [(f"output {i}", out, ref) for i, (out, ref) in enumerate(zip(outputs, reference_fn(*args)))]

    return check


#: How each operator is checked: ``check(args, outputs) -> [(what, kernel's, reference's)]``.
CHECKS: dict[str, Callable] = {
    "ghost_norm": _ghost_check,
    "instantiate_norm": _instantiate_check,
    "conv_instantiate_norm": _conv_instantiate_check,
    "conv_ghost_norm": _per_sample_check(reference.conv_ghost_norm, 1),
    "outer_norm": _per_sample_check(reference.outer_norm, 2),
    "embedding_norm": _per_sample_check(reference.embedding_norm, 1),
    "affine_norm_grads": _per_sample_check(reference.affine_norm_grads, 2),
    "group_norm_grads": _per_sample_check(reference.group_norm_grads, 2),
    "channel_norm_grads": _whole_batch_check(reference.channel_norm_grads),  # (batch statistics)
    # (whole batch: the reference steps every sample at once, and a check of a few samples would
    #  need their rows of every state and saved activation picked apart)
    "recurrent_scan": _whole_batch_check(reference.recurrent_scan, in_float32=True),
    "recurrent_scan_backward": _whole_batch_check(reference.recurrent_scan_backward, in_float32=True),
}


def tolerance(name: str, args: tuple) -> float:
    """``TOLERANCE``, or ``LOOSE_TOLERANCE`` where the kernel's numbers may differ more by design."""
    if name == "affine_norm_grads" and len(args) > 5 and args[5] and args[0].dtype != torch.float32:
        return LOOSE_TOLERANCE
    if name.startswith("recurrent_scan") and any(
            isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) for a in args):
        return LOOSE_TOLERANCE
    if name in ("ghost_norm", "instantiate_norm", "conv_instantiate_norm", "conv_ghost_norm", "outer_norm") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
        if _kernel_settings().FP32_DOT_PRECISION == "tf32":
            return LOOSE_TOLERANCE
    return TOLERANCE


def _capturing(args: tuple) -> bool:
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    return device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def verify(name: str, args: tuple, outputs, config: str | None = None) -> bool:
    """Compare one call's ``outputs`` with the reference's on ``args``; raise ``KernelCheckError``
    where they differ by more than ``tolerance``. Returns whether the comparison was conclusive:
    not where the reference's numbers are not all finite (inputs with infinities or NaN, e.g. a
    diverged step: compared where finite, and the kind of input is checked again next time)."""
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    with torch.no_grad(), _full_float32():
        compared = CHECKS[name](args, outs)
    limit = tolerance(name, args)
    conclusive = True
    for what, out, ref in compared:
        conclusive = conclusive and bool(torch.isfinite(ref).all())
        err = relative_error(out, ref)
        if not err <= limit:  # (NaN fails too)
            shapes = ", ".join(f"{tuple(a.shape)} {str(a.dtype).split('.')[-1]}" for a in args
                               if isinstance(a, torch.Tensor))
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
            raise KernelCheckError(
                f"divebatch: the Triton kernel of {name} disagrees with the PyTorch reference on {where} "
                f"(inputs {shapes}; {what}: relative error {err:.2e} > {limit:.0e}"
                + (f"; config {config}" if config else "") + _switches_set()
                + "). Its numbers would be wrong, so they are refused. "
                "Run with DIVEBATCH_BACKEND=reference (exact, slower) or report it with the output of "
                "bench/gpu/run_gpu_checks.sh; DIVEBATCH_TRITON_SELFCHECK=0 skips this check at your own risk.")
    return conclusive


def _switches_set() -> str:
    """The kernel switches set now (``KERNEL_SWITCHES``), as text for the error: which kernel ran."""
    settings = _kernel_settings()
    named = [f"{name}={value}" for name, value in zip(settings.KERNEL_SWITCHES, settings.kernel_switches())
             if value is not None]
    return f"; with {', '.join(named)}" if named else ""


def _last_config(kernel: Callable) -> str | None:
    """The configs the autotuned kernels of ``kernel``'s module ran with last, each after its name,
    as text (for the error; where a module holds several, such as ghost_norm's square and wide
    tiles, the kernel switches the error names say which one this call ran)."""
    module = sys.modules.get(getattr(kernel, "__module__", None) or "")
    found = [f"{name}: {value.best_config}" for name, value in (vars(module).items() if module is not None else ())
             if getattr(value, "best_config", None) is not None]
    return "; ".join(found) or None


def checked(name: str, kernel: Callable) -> Callable:
    """``kernel`` (a Triton operator's wrapper) with the first-call check of this module; an
    operator without a check is returned as it is."""
    if name not in CHECKS:
        return kernel

    @functools.wraps(kernel)
    def run(*args):
        outputs = kernel(*args)
        # (the exact inputs first: ~1 us against input_kind's ~5 at every call)
        exact = (name, _kernel_settings().kernel_switches(),
                 *((a.shape, a.stride(), a.dtype, a.device, a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                   else tuple(a) if isinstance(a, list) else a for a in args))
        if exact in _seen or not enabled() or _capturing(args):
            return outputs
        kind = input_kind(name, args)
        if kind not in _checked:
            if not verify(name, args, outputs, _last_config(kernel)):
                _inconclusive[kind] = _inconclusive.get(kind, 0) + 1
                if _inconclusive[kind] < MAX_INCONCLUSIVE:
                    return outputs  # (checked again at its next call)
            _checked.add(kind)
        if len(_seen) >= _SEEN_MAX:
            _seen.clear()
        _seen.add(exact)
        return outputs

    return run
