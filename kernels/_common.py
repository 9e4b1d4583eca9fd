"""Shared launch helpers of the Triton kernels (no ``@triton.jit`` code here).

* ``INTERPRET``: read once at import from ``TRITON_INTERPRET``. Under the interpreter every
  kernel gets exactly one fixed config (``@triton.autotune`` would otherwise try to time
  configs) and loaded 16-bit tiles are cast to float32 before ``tl.dot`` (the interpreter's
  bfloat16 ``tl.dot`` is wrong). Importing this module never queries CUDA.
* input checks with errors that name the operator and the argument.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: ``DIVEBATCH_TRITON_AUTOTUNE=0``: try only the first config of the list that fits the inputs
#: (fast start, e.g. for the GPU test run where every new shape would otherwise be autotuned).
AUTOTUNE = os.environ.get("DIVEBATCH_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")



def tuning_size(n: int) -> int:
    """``n`` rounded up to a power of two: the autotune key's stand-in for a length or batch size.

    Keying the autotuner on the exact ``T`` (or ``B``) would time every config again for each new
    sequence length of a variable-length run, and for each batch size DiveBatch picks. The best
    tile shape changes with the order of magnitude, not with every length, so the kernels take
    ``tuning_size(T)`` / ``tuning_size(B)`` as key-only arguments (unused in their bodies): at
    most log2(max length) tunings per layer shape.
    """
    return 1 << max(int(n) - 1, 0).bit_length()


def _skip_bench(kernel_call, quantiles=(0.5, 0.2, 0.8), **kwargs):
    """The autotuner's benchmark when AUTOTUNE is off: nothing is timed (one config is left anyway)."""
    return [0.0] * len(quantiles)


#: Extra ``triton.autotune`` arguments: with autotuning off the single pruned config is not timed.
AUTOTUNE_KWARGS = {} if AUTOTUNE else {"do_bench": _skip_bench}

#: ``triton.autotune`` arguments of a kernel that must never be timed, whatever ``AUTOTUNE`` says:
#: one whose launch is not repeatable because it updates state it was handed (the recurrent scans).
#: The autotuner times a kernel whenever it has more than one config *before* pruning, even if the
#: prune leaves one, by launching it ~100 times ahead of the real launch.
UNTIMED_KWARGS = {"do_bench": _skip_bench}

#: ``tl.dot`` input precision for float32 operands on GPU. ``tf32x3`` (three TF32 products,
#: the lost low bits recovered) keeps ~fp32 accuracy (rel. err ~1e-6) on tensor cores;
#: ``ieee`` is exact fp32 FMA (slower), ``tf32`` is fastest (rel. err ~1e-3).
FP32_DOT_PRECISION = os.environ.get("DIVEBATCH_TRITON_FP32_DOT", "tf32x3")
if FP32_DOT_PRECISION not in ("tf32", "tf32x3", "ieee"):
    raise ValueError(f"DIVEBATCH_TRITON_FP32_DOT={FP32_DOT_PRECISION!r} is not one of tf32, tf32x3, ieee")


try:  # the context variable behind triton.set_allocator (private; without it no USE_TMA config loads by TMA)
    from triton.runtime._allocation import NullAllocator as _NullAllocator
    from triton.runtime._allocation import _allocator as _ALLOCATOR
except ImportError:  # another triton
    _NullAllocator, _ALLOCATOR = None, None


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether a kernel's ``USE_TMA`` configs may load these ``[B, T, n]`` tensors by device-side
    descriptor (``TMA_OK``): unit inner strides, the other strides positive (not expanded) and,
    like the base addresses, multiples of 16 bytes (TMA's rules), and triton's allocator hook for
    the descriptors' workspace."""
    if _ALLOCATOR is None:
        return False
    return all(x.stride(2) == 1 and x.data_ptr() % 16 == 0
               and all(x.stride(i) > 0 and x.stride(i) * x.element_size() % 16 == 0 for i in (0, 1))
               for x in tensors)


@contextlib.contextmanager
def tma_workspace(device: torch.device, wanted: bool = True):
    """Around a launch that may build TMA descriptors: a torch allocator for their workspace, set
    only where the caller has set none with ``triton.set_allocator`` (theirs stays in place), and
    only for this call (a context variable, reset after)."""
    if not wanted or _ALLOCATOR is None or not isinstance(_ALLOCATOR.get(), _NullAllocator):
        yield
        return
    token = _ALLOCATOR.set(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    try:
        yield
    finally:
        _ALLOCATOR.reset(token)


#: Environment variables that pick between the kernels of one operator, read at each call (the
#: first-call check keys its kinds of input on them too: another kernel is another compilation).
KERNEL_SWITCHES = ("DIVEBATCH_TRITON_GHOST_WIDE",)


def kernel_switches() -> tuple:
    """The values of ``KERNEL_SWITCHES`` now (unset: None)."""
    return tuple(os.environ.get(name) for name in KERNEL_SWITCHES)


def unverified_configs_enabled() -> bool:
    """Whether ``DIVEBATCH_TRITON_UNVERIFIED_CONFIGS=1`` lets the autotuner try the configs a kernel
    lists as not yet run on a GPU (``config_table``'s ``unverified``); read at each prune, so the
    GPU check and tests can set it. Their logic is exact under the interpreter, but what the
    compiler makes of them (pipelining, flattened loops, atomics) only a GPU run shows, and the
    fused route hands its weight gradient to autograd as the gradient itself."""
    return os.environ.get("DIVEBATCH_TRITON_UNVERIFIED_CONFIGS", "0").strip() == "1"


def scans_enabled() -> bool:
    """Whether ``DIVEBATCH_TRITON_SCANS=1`` opts in to the recurrent scan kernels on CUDA (see
    ``UNVERIFIED_ON_GPU`` in this package's ``__init__``); read at each call, so tests can set it."""
    return os.environ.get("DIVEBATCH_TRITON_SCANS", "0").strip() == "1"


def configs(interpret: triton.Config, gpu: list[triton.Config]) -> list[triton.Config]:
    """The autotune list: ``gpu`` on a GPU, the single ``interpret`` config under the interpreter."""
    if INTERPRET:
        return [interpret]
    return list(gpu) if AUTOTUNE else list(gpu[:1])


def gpu_configs(table: dict[tuple[str, str], list[triton.Config]],
                sm90_table: dict[tuple[str, str], list[triton.Config]] | None = None) -> list[triton.Config]:
    """Every distinct config of ``config_table``'s tables, in order: what a GPU may run (the tests run
    each under the interpreter too, where ``config_table`` keeps only the interpreter's)."""
    found: list[triton.Config] = []
    for listed in (table, sm90_table or {}):
        for configs in listed.values():
            found += [c for c in configs if all(c is not seen for seen in found)]
    return found


def config_table(interpret: triton.Config, table: dict[tuple[str, str], list[triton.Config]],
                 tensor_args: tuple[str, ...], inner_strides: tuple[str, ...],
                 sm90_table: dict[tuple[str, str], list[triton.Config]] | None = None,
                 unverified: tuple[triton.Config, ...] = ()):
    """Autotune configs by operand width and layout, and the ``early_config_prune`` picking one list.

    ``table`` maps ``(width, layout)`` to configs: width ``"16"`` (float16/bfloat16 operands) or
    ``"32"`` (any float32 operand, or mixed dtypes upcast to float32 in registers: ``tf32x3`` runs
    three MMAs plus the hi/lo split and needs about twice the registers); layout ``"unit"`` (every
    ``inner_strides`` argument is 1, so loads vectorise) or ``"strided"`` (some inner stride is
    not 1: one 64-bit address per element, so smaller tiles). Every list was chosen so that
    nothing spills on sm_80 and sm_90 (tests/test_triton_compile.py checks). The inner strides
    belong in the autotune key so the two layouts are tuned apart. ``sm90_table`` adds configs
    tried only on compute capability 9.0 and above (Hopper's register file and warpgroup MMA hold
    tiles that spill on sm_80). ``unverified`` names configs of the tables that have not run on a
    GPU yet: the prune leaves them out unless ``unverified_configs_enabled()`` (the first config of
    each list must be a verified one). Returns ``(configs, prune)``; under the interpreter
    ``([interpret], {})``. ``configs_for`` shows what the prune keeps for given inputs and arch.
    """
    if INTERPRET:
        return [interpret], {}
    all_configs = gpu_configs(table, sm90_table)
    ids = {key: {id(c) for c in configs} for key, configs in table.items()}
    sm90_ids = {key: {id(c) for c in configs} for key, configs in (sm90_table or {}).items()}
    unverified_ids = {id(c) for c in unverified}
    for configs in table.values():
        if configs and id(configs[0]) in unverified_ids:
            raise ValueError("config_table: the first config of a list is the fallback and must have run on a GPU")

    def prune(configs, named_args, divebatch_arch=None, **kwargs):
        dtypes = {named_args[name].dtype for name in tensor_args}
        width = "32" if torch.float32 in dtypes or len(dtypes) > 1 else "16"
        layout = "unit" if all(named_args[name] == 1 for name in inner_strides) else "strided"
        arch = divebatch_arch if divebatch_arch is not None else cuda_arch(named_args[tensor_args[0]].device)
        wanted = ids[(width, layout)] | (sm90_ids.get((width, layout), set()) if arch >= 90 else set())
        kept = [c for c in configs if id(c) in wanted] or list(configs)
        if not unverified_configs_enabled():
            kept = [c for c in kept if id(c) not in unverified_ids] or kept
        return kept if AUTOTUNE else kept[:1]

    return all_configs, {"early_config_prune": prune}


def configs_for(configs: list[triton.Config], prune: dict, named_args: dict, arch: int = 80,
                **constexprs) -> list[triton.Config]:
    """The configs the autotuner would try for ``named_args`` (and the launch's ``constexprs``, which
    reach the prune as keywords) on compute capability ``arch`` (e.g. 80, 90; used by the compile test)."""
    if not prune:
        return list(configs)
    return prune["early_config_prune"](configs, named_args, divebatch_arch=arch, **constexprs)


def dot_options(*dtypes: torch.dtype) -> tuple[bool, str]:
    """``(UPCAST, DOT_PRECISION)`` for ``tl.dot`` between tiles of ``dtypes``.

    UPCAST casts loaded tiles to float32 inside the kernel (registers only, never a copy in
    memory): always under the interpreter, and on GPU when the two operands of one dot differ
    in dtype. float32 operands use ``FP32_DOT_PRECISION``; 16-bit operands run on tensor
    cores with float32 accumulation whatever the string says.
    """
    if INTERPRET:
        return True, "ieee"
    upcast = len(set(dtypes)) > 1
    fp32 = upcast or torch.float32 in dtypes
    return upcast, (FP32_DOT_PRECISION if fp32 else "tf32")


def check_float(op: str, name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"divebatch.{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"divebatch.{op}: `{name}` must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"divebatch.{op}: `{name}` must be float32, float16 or bfloat16, got {x.dtype}")


def check_x_g(op: str, x: torch.Tensor, g: torch.Tensor) -> torch.device:
    """Checks shared by the norm ops: ``x`` and ``g`` floating-point 3-D tensors of one shape, on
    one device (returned)."""
    check_float(op, "x", x, 3)
    check_float(op, "g", g, 3)
    device = check_device(op, x=x, g=g)
    if g.shape != x.shape:
        raise ValueError(f"divebatch.{op}: `g` must have the shape of `x` {tuple(x.shape)}, got {tuple(g.shape)}")
    return device


def check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"`{n}` on {d}" for n, d in devices.items())
            raise ValueError(f"divebatch.{op}: tensors must share one device, got {listing}")
    if first.type != "cuda" and not (INTERPRET and first.type == "cpu"):
        name = next(iter(devices))
        raise ValueError(f"divebatch.{op}: the Triton kernel needs CUDA tensors (or CPU tensors with "
                         f"TRITON_INTERPRET=1 set before import); `{name}` is on {first}")
    return first


def check_a_g(op: str, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.device, int, int, int, int]:
    """Checks shared by the ops taking a layer input ``a [B, T, d]`` and output grad ``g [B, T, p]``.

    Returns ``(device, B, T, d, p)``.
    """
    check_float(op, "a", a, 3)
    check_float(op, "g", g, 3)
    device = check_device(op, a=a, g=g)
    B, T, d = a.shape
    if g.shape[:2] != (B, T):
        raise ValueError(f"divebatch.{op}: `g` must be [B, T, p] = [{B}, {T}, p] to match `a` "
                         f"{tuple(a.shape)}, got {tuple(g.shape)}")
    return device, B, T, d, g.shape[2]


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def cuda_arch(device: torch.device) -> int:
    """Compute capability of ``device`` as ``10 * major + minor`` (90 for an H100/H200); 0 off CUDA."""
    if device.type != "cuda":
        return 0
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried at call time only); 1 off CUDA."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def unfilled(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new output that its kernel writes whole: no zero fill (on a GPU a launch). The kernel
    tests make it NaN-filled instead, so that an entry a kernel leaves unwritten shows. Outputs
    of one operator never share a buffer: torch.library requires the outputs of a custom operator
    not to alias one another (torch.compile warns, and later releases refuse)."""
    return torch.empty(shape, dtype=dtype, device=device)


def per_channel_outputs(x: torch.Tensor, with_bias: bool) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """``(launch, weight, bias)`` for the per-channel norm kernels of ``x [B, C, S]``: whether there
    is anything to launch, and float32 ``[B, C]`` outputs, left unfilled where a launch stores
    every entry (zeros otherwise); without bias a ``[1, 1]`` stand-in the kernel never writes."""
    B, C, S = x.shape
    launch = B > 0 and C > 0 and S > 0
    alloc = torch.empty if launch else torch.zeros
    weight = alloc((B, C), dtype=torch.float32, device=x.device)
    bias = alloc((B, C) if with_bias else (1, 1), dtype=torch.float32, device=x.device)
    return launch, weight, bias


@triton.jit
def centred_row_sums(x_rows, g_rows, c_mask, centre, S, stride_xs, stride_gs,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """For ``BLOCK_C`` rows of ``S`` positions (row pointers ``x_rows``, ``g_rows`` ``[BLOCK_C, 1]``,
    rows past ``c_mask`` skipped): ``(sum_s (x - centre) g, sum_s g)`` per row in float32,
    accumulated in ``BLOCK_C x BLOCK_S`` lanes; ``centre`` a scalar or ``[BLOCK_C, 1]``. The norm
    kernels' last pass, which turns these into ``sum_s x_hat g`` and the bias sums."""
    acc_w = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
        mask = c_mask[:, None] & (s < S)[None, :]
        v = tl.load(x_rows + s[None, :] * stride_xs, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(g_rows + s[None, :] * stride_gs, mask=mask, other=0.0).to(tl.float32)
        acc_w += (v - centre) * gv  # masked entries load g = 0: they add nothing
        acc_g += gv
    return tl.sum(acc_w, axis=1), tl.sum(acc_g, axis=1)
