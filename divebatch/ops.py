"""The ``divebatch::*`` operators: declared once here, implemented per device.

* declaration: one schema line per operator in ``SCHEMAS`` (``torch.library``);
* everywhere: the plain-PyTorch reference (``divebatch.reference``), registered as the
  ``CompositeExplicitAutograd`` kernel so any device without a dedicated kernel runs it;
* CPU: the C++ kernels of ``csrc/`` (``TORCH_LIBRARY_IMPL(divebatch, CPU, m)``), loaded from the
  ahead-of-time build ``divebatch._C`` or JIT-built on first use (see ``divebatch._build``);
* CUDA: the Triton kernels of ``kernels/`` (shipped as ``divebatch._kernels``) when triton imports,
  except the recurrent scans (wrong on an H200, see ``kernels.UNVERIFIED_ON_GPU``; opt in with
  ``DIVEBATCH_TRITON_SCANS=1``): their reference runs there, its per-step GEMMs on the GPU. The
  first call of each kernel per kind of input is checked against the reference on that GPU
  (``divebatch._selfcheck``; ``DIVEBATCH_TRITON_SELFCHECK=0`` skips it);
* Meta/fake: shape functions, so the operators trace under ``torch.compile(fullgraph=True)``.

``DIVEBATCH_BACKEND`` (``auto`` | ``reference`` | ``cpp`` | ``triton``) forces one
implementation for the Python entry points below; tests use it. All results are float32
and unscaled (DESIGN §2): the tracker applies the loss-reduction factor.
"""

from __future__ import annotations

import math
import os

import torch

from . import _selfcheck, reference

#: One schema line per operator; the only place an operator's signature is written.
SCHEMAS = {
    "ghost_norm": "ghost_norm(Tensor a, Tensor g, bool with_bias) -> (Tensor, Tensor)",
    "instantiate_norm": "instantiate_norm(Tensor a, Tensor g, bool with_bias) -> (Tensor, Tensor, Tensor)",
    "conv_instantiate_norm": "conv_instantiate_norm(Tensor x, Tensor g, int[] kernel_size, int[] stride, "
                             "int[] padding, int[] dilation) -> (Tensor, Tensor)",
    "conv_ghost_norm": "conv_ghost_norm(Tensor x, Tensor g, int[] kernel_size, int[] stride, int[] padding, "
                       "int[] dilation) -> Tensor",
    "outer_norm": "outer_norm(Tensor a, Tensor g, bool with_bias) -> (Tensor, Tensor)",
    "embedding_norm": "embedding_norm(Tensor indices, Tensor g, int padding_idx) -> Tensor",
    "affine_norm_grads": "affine_norm_grads(Tensor x, Tensor g, bool rms, float eps, bool with_bias, "
                         "bool round_x_hat=False) -> (Tensor, Tensor)",
    "group_norm_grads": "group_norm_grads(Tensor x, Tensor g, int groups, float eps, bool with_bias) -> (Tensor, Tensor)",
    "channel_norm_grads": "channel_norm_grads(Tensor x, Tensor g, Tensor? mean, Tensor? var, float eps, "
                          "bool with_bias) -> (Tensor, Tensor)",
    "recurrent_scan": "recurrent_scan(Tensor gi, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? c0, Tensor? w_hr, "
                      "Tensor? lengths, str mode, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "recurrent_scan_backward": "recurrent_scan_backward(Tensor grad_out, Tensor? grad_h_n, Tensor? grad_c_n, "
                               "Tensor w_hh, Tensor h0, Tensor? c0, Tensor? w_hr, Tensor out, Tensor cells, "
                               "Tensor saved, Tensor? lengths, str mode, bool reverse) "
                               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}

BACKENDS = ("auto", "reference", "cpp", "triton")

_lib = torch.library.Library("divebatch", "DEF")  # noqa: TOR901 - the library lives as long as the process
for _name, _schema in SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


# ---------------------------------------------------------------- fake (meta) kernels
def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.register_fake("divebatch::ghost_norm")
def _ghost_norm_fake(a, g, with_bias):
    return _per_sample(a), _per_sample(a)


@torch.library.register_fake("divebatch::instantiate_norm")
def _instantiate_norm_fake(a, g, with_bias):
    return _per_sample(a), _per_sample(a), a.new_empty((g.shape[-1], a.shape[-1]), dtype=torch.float32)


@torch.library.register_fake("divebatch::conv_instantiate_norm")
def _conv_instantiate_norm_fake(x, g, kernel_size, stride, padding, dilation):
    columns = x.shape[1] * math.prod(kernel_size)
    return _per_sample(x), x.new_empty((g.shape[1], columns), dtype=torch.float32)


@torch.library.register_fake("divebatch::conv_ghost_norm")
def _conv_ghost_norm_fake(x, g, kernel_size, stride, padding, dilation):
    return _per_sample(x)


@torch.library.register_fake("divebatch::outer_norm")
def _outer_norm_fake(a, g, with_bias):
    return _per_sample(a), _per_sample(a)


@torch.library.register_fake("divebatch::embedding_norm")
def _embedding_norm_fake(indices, g, padding_idx):
    return _per_sample(indices)


@torch.library.register_fake("divebatch::affine_norm_grads")
def _affine_norm_grads_fake(x, g, rms, eps, with_bias, round_x_hat=False):
    rows = x.new_empty((x.shape[0], x.shape[-1]), dtype=torch.float32)
    return rows, torch.empty_like(rows)


def _per_channel(x: torch.Tensor):
    channels = x.new_empty(x.shape[:2], dtype=torch.float32)
    return channels, torch.empty_like(channels)


@torch.library.register_fake("divebatch::group_norm_grads")
def _group_norm_grads_fake(x, g, groups, eps, with_bias):
    return _per_channel(x)


@torch.library.register_fake("divebatch::channel_norm_grads")
def _channel_norm_grads_fake(x, g, mean, var, eps, with_bias):
    return _per_channel(x)


@torch.library.register_fake("divebatch::recurrent_scan")
def _recurrent_scan_fake(gi, w_hh, b_hh, h0, c0, w_hr, lengths, mode, reverse):
    B, T, G = gi.shape
    H = G // reference.SCAN_GATES[mode]
    P = h0.shape[-1]
    lstm = mode == "LSTM"
    cells = reference.time_major(gi, B, T, H) if lstm else gi.new_empty((0,))
    return (reference.time_major(gi, B, T, P), cells, reference.time_major(gi, B, T, reference.SCAN_SAVED[mode] * H),
            gi.new_empty((B, P)), gi.new_empty((B, H) if lstm else (0,)))


@torch.library.register_fake("divebatch::recurrent_scan_backward")
def _recurrent_scan_backward_fake(grad_out, grad_h_n, grad_c_n, w_hh, h0, c0, w_hr, out, cells, saved, lengths, mode,
                                  reverse):
    B, T, P = out.shape
    G = w_hh.shape[0]
    H = G // reference.SCAN_GATES[mode]
    grad_gh = reference.time_major(out, B, T, G) if mode == "GRU" else out.new_empty((0,))
    grad_projected = reference.time_major(out, B, T, P) if w_hr is not None else out.new_empty((0,))
    return (reference.time_major(out, B, T, G), grad_gh, out.new_empty((B, P)),
            out.new_empty((B, H) if mode == "LSTM" else (0,)), grad_projected)


# ---------------------------------------------------------------- device kernels
from ._build import import_kernels, load_cpu_extension  # noqa: E402  (needs the schemas above)

CPP_AVAILABLE = load_cpu_extension()

try:  # Triton is optional: CPU-only installs and the interpreter work without a GPU.
    _kernels = import_kernels()
    # Each kernel's first call per kind of input is checked against the reference (see _selfcheck).
    _kernels.register_cuda(_lib, wrap=_selfcheck.checked)
    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the install
    _kernels = None
    TRITON_AVAILABLE = False


def backend() -> str:
    """The implementation forced by ``DIVEBATCH_BACKEND`` (default ``auto``: the dispatcher picks)."""
    name = os.environ.get("DIVEBATCH_BACKEND", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"DIVEBATCH_BACKEND={name!r} is not one of {BACKENDS}; unset it or pick one of those.")
    if name == "cpp" and not CPP_AVAILABLE:
        raise RuntimeError("DIVEBATCH_BACKEND=cpp but the C++ extension is not built; run "
                           "`pip install --no-build-isolation -e .` or unset DIVEBATCH_BACKEND.")
    if name == "triton" and not TRITON_AVAILABLE:
        raise RuntimeError("DIVEBATCH_BACKEND=triton but triton (or divebatch._kernels) does not import.")
    return name


#: The registered operators by name, resolved to their one overload once (called for every layer
#: in every backward: the packet's overload lookup is a few microseconds each time).
_OVERLOADS: dict = {}


def _call(name: str, *args):
    forced = backend()
    if forced == "reference":
        return getattr(reference, name)(*args)
    if forced == "triton":
        return getattr(_kernels, f"{name}_triton")(*args)
    op = _OVERLOADS.get(name)
    if op is None:
        op = _OVERLOADS[name] = getattr(torch.ops.divebatch, name).default
    return op(*args)


def ghost_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool = False):
    """Per-sample ``||g_b^T a_b||^2`` [B] and ``||sum_t g_b[t]||^2`` [B] via Grams; float32."""
    return _call("ghost_norm", a, g, with_bias)


def instantiate_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool = False):
    """Per-sample ``||g_b^T a_b||^2`` [B], bias norms [B] and ``sum_b g_b^T a_b`` [p, d]; float32."""
    return _call("instantiate_norm", a, g, with_bias)


def conv_instantiate_norm(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation):
    """``instantiate_norm`` of a one-group convolution of ``x [B, C, *in]`` (1-3 spatial dims, zero
    ``padding``) with output grad ``g [B, O, *out]``: per-sample squared weight-gradient norms [B]
    and the weight gradient ``[O, C * prod(kernel)]`` of the unscaled summed loss, float32. The
    Triton kernel reads the patches from ``x`` in place; elsewhere they are unfolded."""
    return _call("conv_instantiate_norm", x, g, *_int_lists(kernel_size, stride, padding, dilation))


def conv_ghost_norm(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """``ghost_norm`` of a one-group convolution of ``x [B, C, *in]`` (1-3 spatial dims, zero
    ``padding``) with output grad ``g [B, O, *out]``: per-sample squared weight-gradient norms [B],
    float32, from the Grams of its patches. The Triton kernel reads the patches from ``x`` in
    place; elsewhere they are unfolded."""
    return _call("conv_ghost_norm", x, g, *_int_lists(kernel_size, stride, padding, dilation))


def _int_lists(*geometry) -> list[list[int]]:
    """A convolution's kernel size, stride, padding and dilation as the ``int[]`` lists the schemas
    take (from tuples, lists or tensors of ints)."""
    return [[int(v) for v in values] for values in geometry]


def outer_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool = False):
    """T = 1: ``||a_b||^2 ||g_b||^2`` [B] and ``||g_b||^2`` [B] for ``a [B, d]``, ``g [B, p]``; float32."""
    return _call("outer_norm", a, g, with_bias)


def embedding_norm(indices: torch.Tensor, g: torch.Tensor, padding_idx: int = -1) -> torch.Tensor:
    """Per-sample squared norm [B] of an embedding gradient, ``indices [B, T]``, ``g [B, T, p]``."""
    return _call("embedding_norm", indices, g, padding_idx)


def affine_norm_grads(x: torch.Tensor, g: torch.Tensor, rms: bool, eps: float, with_bias: bool = True,
                      round_x_hat: bool = False):
    """Per-sample LayerNorm (``rms=False``) / RMSNorm (``rms=True``) weight and bias gradients
    ``[B, d]`` each, float32, for ``x, g [B, R, d]`` normalised over ``d``; ``round_x_hat``: the
    normalised input rounded to ``x``'s dtype first, as Hugging Face's Llama RMSNorm does (see
    ``divebatch.reference.affine_norm_grads``)."""
    return _call("affine_norm_grads", x, g, rms, float(eps), with_bias, round_x_hat)


def group_norm_grads(x: torch.Tensor, g: torch.Tensor, groups: int, eps: float, with_bias: bool = True):
    """Per-sample GroupNorm (InstanceNorm: ``groups = C``) weight and bias gradients ``[B, C]``
    each, float32, for ``x, g [B, C, S]`` (see ``divebatch.reference.group_norm_grads``)."""
    return _call("group_norm_grads", x, g, int(groups), float(eps), with_bias)


def channel_norm_grads(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
                       eps: float, with_bias: bool = True):
    """Per-sample BatchNorm (or running-statistics InstanceNorm) weight and bias gradients
    ``[B, C]`` each, float32, for ``x, g [B, C, S]`` normalised per channel by running statistics
    ``mean, var [C]`` or, both None, by the batch's (see ``divebatch.reference.channel_norm_grads``)."""
    return _call("channel_norm_grads", x, g, mean, var, float(eps), with_bias)


def triton_serves(device: torch.device) -> bool:
    """Whether the operators above run their Triton kernels for tensors on ``device``: forced by
    ``DIVEBATCH_BACKEND=triton`` (any device; CPU tensors through the interpreter), or on CUDA when
    the kernels are registered and no backend is forced."""
    forced = backend()
    if forced == "triton":
        return True
    return device.type == "cuda" and TRITON_AVAILABLE and forced == "auto"


def recurrent_scan(gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None, h0: torch.Tensor,
                   c0: torch.Tensor | None, mode: str, reverse: bool = False, lengths: torch.Tensor | None = None,
                   w_hr: torch.Tensor | None = None):
    """One direction of one recurrent layer from its input pre-activations ``gi [B, T, G]``:
    ``(out [B, T, P], cells, saved, h_n, c_n)`` (see ``divebatch.reference.recurrent_scan``); no
    autograd."""
    return _call("recurrent_scan", gi, w_hh, b_hh, h0, c0, w_hr, lengths, mode, reverse)


def recurrent_scan_backward(grad_out, grad_h_n, grad_c_n, w_hh, h0, c0, out, cells, saved, mode: str,
                            reverse: bool = False, lengths: torch.Tensor | None = None,
                            w_hr: torch.Tensor | None = None):
    """``(grad_gi, grad_gh, grad_h0, grad_c0, grad_projected)`` of ``recurrent_scan`` (see
    ``divebatch.reference.recurrent_scan_backward``)."""
    return _call("recurrent_scan_backward", grad_out, grad_h_n, grad_c_n, w_hh, h0, c0, w_hr, out, cells, saved,
                 lengths, mode, reverse)
