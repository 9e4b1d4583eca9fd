"""A convolution's patches read from its input in place (implicit GEMM), for the dot kernels.

The patches of a one-group convolution of ``x [B, C, *in]`` are ``a_b [T, d]``: row ``t`` an output
position, column ``k = ((c KD + kd) KH + kh) KW + kw`` a kernel offset (``weight.view(O, -1)``'s
order, ``d = C KD KH KW``), the entry ``x_b[c, t's window corner + k's window offset]`` or 0 inside
the zero padding. ``conv_instantiate_norm`` and ``conv_ghost_norm`` load ``[rows, columns]`` chunks of
them straight from ``x`` (``patch_columns`` once per column set, ``patch_chunk`` per chunk), so no
unfolded ``[B, T, d]`` copy is written. 1-d and 2-d convolutions run as 3-d ones with unit leading
dims; ``DEPTH`` leaves the depth terms out where they are constant (registers the 2-d loads need).
A channels-last input (channels in multiples of 8) numbers its columns channel-fastest instead
(``CHANNELS_FASTEST``), so each row of a chunk is a contiguous run of channels: 16-byte vector loads
the software pipeline copies asynchronously, where the weight's order gathers single elements
(no ``cp.async`` for 16-bit ones: tests/test_triton_compile.py). The norms do not depend on the
column order; ``conv_instantiate_norm`` stores its weight gradient at the weight's columns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float


@triton.jit
def offsets(v, WIDE: tl.constexpr):
    """``v`` as the type of in-sample offsets: int64 where a sample's may pass 2^31 (``WIDE``),
    else int32 (half the registers per element)."""
    if WIDE:
        out = v.to(tl.int64)
    else:
        out = v
    return out


@triton.jit
def patch_columns(kk, XC, KD, KH, KW, dil_d, dil_h, dil_w, stride_xc, stride_xd, stride_xh, stride_xw,
                  DEPTH: tl.constexpr, WIDE: tl.constexpr, CHANNELS_FASTEST: tl.constexpr):
    """Columns ``kk`` (kernel offsets) of the patches: ``(col_off, win_d, win_h, win_w)``, the part
    of each column's address that does not depend on the position (channel and window offset) and
    its window offsets per dim (for the padding masks; ``win_d`` is ``win_h`` where not ``DEPTH``).

    Columns are numbered in the weight's order, ``k = ((c KD + kd) KH + kh) KW + kw``, or with
    ``CHANNELS_FASTEST`` in a channels-last input's, ``k = ((kd KH + kh) KW + kw) C + c``: there
    consecutive columns are consecutive channels, contiguous in memory, so (with ``XC`` and the
    strides divisible by 8) a chunk's rows load as 16-byte vectors, which the software pipeline
    copies asynchronously (``cp.async``); gathered one element at a time they are not pipelined."""
    if CHANNELS_FASTEST:
        channel = kk % XC
        rest = kk // XC
        win_w = (rest % KW) * dil_w
        rest = rest // KW
        if DEPTH:
            win_h = (rest % KH) * dil_h
            win_d = (rest // KH) * dil_d
        else:  # (rest < KH)
            win_h = rest * dil_h
            win_d = win_h  # (unread: no depth terms)
    else:
        k_w = kk % KW
        rest = kk // KW
        win_h = (rest % KH) * dil_h
        win_w = k_w * dil_w
        rest = rest // KH
        if DEPTH:
            win_d = (rest % KD) * dil_d
            rest = rest // KD
        else:
            win_d = win_h  # (unread: no depth terms)
        channel = rest
    col_off = (offsets(channel, WIDE) * stride_xc + offsets(win_h, WIDE) * stride_xh
               + offsets(win_w, WIDE) * stride_xw)
    if DEPTH:
        col_off += offsets(win_d, WIDE) * stride_xd
    return col_off, win_d, win_h, win_w


@triton.jit
def patch_chunk(x_base, tt, t_mask, col_mask, col_off, win_d, win_h, win_w, XD, XH, XW, OH, OW,
                sd, sh, sw, pd, ph, pw, stride_xd, stride_xh, stride_xw,
                PADDED: tl.constexpr, DEPTH: tl.constexpr, WIDE: tl.constexpr):
    """A ``[len(tt), len(col_off)]`` chunk of a convolution's patches read from its input ``x`` in
    place: rows are the positions ``tt``, columns those ``patch_columns`` described; entries in the
    zero padding (``PADDED``) or outside ``t_mask`` and ``col_mask`` are 0."""
    ow = tt % OW
    rest = tt // OW
    # Each position's window corner in the unpadded input (negative inside the padding).
    if DEPTH:
        at_d = (rest // OH) * sd - pd
        at_h = (rest % OH) * sh - ph
    else:  # (one output plane: rest < OH)
        at_h = rest * sh - ph
    at_w = ow * sw - pw
    row = offsets(at_h, WIDE) * stride_xh + offsets(at_w, WIDE) * stride_xw
    if DEPTH:
        row += offsets(at_d, WIDE) * stride_xd
    mask = t_mask[:, None] & col_mask[None, :]
    if PADDED:
        # One unsigned comparison per dim: an index inside the left padding is negative, i.e. huge
        # (with signed pairs the 128 x 64 bfloat16 config spilled 48 bytes on sm_80).
        inside_h = (at_h[:, None] + win_h[None, :]).to(tl.uint32) < XH
        inside_w = (at_w[:, None] + win_w[None, :]).to(tl.uint32) < XW
        mask = mask & inside_h & inside_w
        if DEPTH:
            mask = mask & ((at_d[:, None] + win_d[None, :]).to(tl.uint32) < XD)
    return tl.load(x_base + row[:, None] + col_off[None, :], mask=mask, other=0.0)


class ConvPatches(NamedTuple):
    """What a kernel needs to read a convolution's patches in place (see ``conv_patches_of``)."""

    x: torch.Tensor  # the input as [B, C, XD, XH, XW] (a view)
    g_rows: torch.Tensor  # the output grad as [B, T, O] (a view for contiguous and channels-last grads)
    B: int
    T: int
    d: int
    O: int
    #: The kernels' geometry arguments: XC, XD, XH, XW, OH, OW, KD, KH, KW, the strides, paddings
    #: and dilations per dim (d, h, w), then x's strides of C, D, H, W.
    geometry: tuple
    padded: bool
    depth: bool
    wide: bool
    #: Columns numbered channel-fastest (``patch_columns``): a channels-last input whose channels
    #: come in multiples of 8.
    channels_fastest: bool


#: The geometry arguments of a call on materialised patches (unused there).
NO_CONVOLUTION = (1,) * 22


def launch_args(a: torch.Tensor, patches: ConvPatches | None) -> tuple[tuple, tuple, dict]:
    """``(a_strides, geometry, constexprs)`` of a dot kernel's launch on ``a``: materialised patches
    (``patches`` None: ``a``'s own strides, no geometry, ``IMPLICIT`` off), or a convolution's input
    read in place (its batch stride, and 0 for positions and columns, which are gathered: the
    autotune key's inner stride then never reads as unit; the geometry; ``IMPLICIT`` and its flags).
    Every constexpr of the autotune key is passed either way, not left to its default."""
    if patches is None:
        return a.stride(), NO_CONVOLUTION, {"IMPLICIT": False, "PADDED": False, "DEPTH": False, "WIDE": True,
                                            "CHANNELS_FASTEST": False}
    return ((patches.x.stride(0), 0, 0), patches.geometry,
            {"IMPLICIT": True, "PADDED": patches.padded, "DEPTH": patches.depth, "WIDE": patches.wide,
             "CHANNELS_FASTEST": patches.channels_fastest})


def conv_patches_of(op: str, x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation,
                    wide_override=None, channels_override=None) -> ConvPatches:
    """Checks a one-group convolution's ``x [B, C, *in]`` (1-3 spatial dims), output grad
    ``g [B, O, *out]`` and geometry (errors name ``divebatch.<op>``) and returns the views and
    arguments its kernels read the patches by. In-sample offsets are int32 unless one (padding and
    a chunk's overrun included) could pass 2^31 (``wide``); columns are numbered channel-fastest
    where ``x`` is channels-last with channels in multiples of 8 (``channels_fastest``). The
    overrides force either (tests only)."""
    from divebatch.reference import conv_output_sizes  # (the kernels package imports without divebatch)

    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"divebatch.{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    out = conv_output_sizes(op, x, g, kernel_size, stride, padding, dilation)  # (dims and geometry)
    check_float(op, "x", x, x.dim())
    check_float(op, "g", g, g.dim())
    check_device(op, x=x, g=g)
    missing = 3 - len(out)  # (1-d and 2-d convolutions as 3-d ones with unit leading dims)
    x3 = x.view(*x.shape[:2], *([1] * missing), *x.shape[2:])
    kernel, strides, dilations = ([1] * missing + [int(v) for v in values]
                                  for values in (kernel_size, stride, dilation))
    pads = [0] * missing + [int(v) for v in padding]
    B, C, O = x.shape[0], x.shape[1], g.shape[1]
    T = math.prod(out)
    geometry = (C, *x3.shape[2:], *([1] * missing + out)[1:], *kernel, *strides, *pads, *dilations, *x3.stride()[1:])
    reach = sum((size + 2 * pad + k * dil) * abs(step) for size, pad, k, dil, step
                in zip(x3.shape[1:], [0, *pads], [1, *kernel], [1, *dilations], x3.stride()[1:]))
    return ConvPatches(x3, g.reshape(B, O, T).transpose(1, 2), B, T, C * math.prod(kernel), O, geometry,
                       padded=any(pads), depth=missing == 0,
                       wide=reach >= 2**31 if wide_override is None else bool(wide_override),
                       channels_fastest=x.stride(1) == 1 and C % 8 == 0 if channels_override is None
                       else bool(channels_override))
