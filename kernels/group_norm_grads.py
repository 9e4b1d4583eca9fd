"""Per-sample gradients of a GroupNorm's (or InstanceNorm's: one channel a group) affine parameters.

    x_hat[b, c, s] = (x[b, c, s] - mean[b, G(c)]) / sqrt(var[b, G(c)] + eps)
    weight[b, c]   = sum_s x_hat[b, c, s] * g[b, c, s]        [B, C] float32
    bias[b, c]     = sum_s g[b, c, s]                         [B, C] float32 (``WITH_BIAS``)

``x, g [B, C, S]`` (float32/float16/bfloat16, any strides; ``S`` the positions, flattened), mean
and biased variance over the group's ``C / groups`` channels and all positions. The PyTorch path
(``layers/norm.py``) writes ``x_hat`` in float32, multiplies it by ``g`` in place and reduces;
here nothing activation-sized is written.

Grid: ``B * groups`` programs, one per (sample, group), a sample's groups consecutive: it streams the group's elements three
times in ``BLOCK_C x BLOCK_S`` tiles (``BLOCK_C`` of the group's channels at a time: a small
feature map, e.g. 16 channels of 7 x 7, is one tile instead of 16 mostly masked rows): the sum
for a first estimate of the mean; the deviations from it and their squares, for the variance and
the estimate's error, so the variance never subtracts two large numbers; then per channel
``sum_s (x - estimate) g`` and ``sum_s g``, from which ``sum_s x_hat g``. One number per channel
is stored, no atomics. Not autotuned: the group's width and the positions pick the tile
(``config_for``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, centred_row_sums, check_x_g, per_channel_outputs

#: Elements of a (channels x positions) tile: 16 float32 per thread and accumulator at 4 warps.
_TILE = 2048
#: Positions of the narrow tiles, for maps of at most that many positions (7 x 7, 8 x 8).
_NARROW_S = 64

def _warps(elements: int) -> int:
    """Warps for a tile: about 8 elements per thread, 1 to 4 warps."""
    return max(1, min(4, elements // 256))


#: (BLOCK_C, BLOCK_S): per channel block, a tile as wide as ``_TILE`` allows and a narrow one.
_CONFIGS = [triton.Config({"BLOCK_C": c, "BLOCK_S": s}, num_warps=_warps(c * s))
            for c in (1, 2, 4, 8, 16, 32) for s in sorted({_NARROW_S, _TILE // c})]


def config_for(S: int, channels_per_group: int) -> triton.Config:
    """The tile for a group of ``channels_per_group`` channels of ``S`` positions (under the
    interpreter a small one, so tests cross both masks and the channel-block loop)."""
    if INTERPRET:
        return triton.Config({"BLOCK_C": 4, "BLOCK_S": 16}, num_warps=1)
    block_c = min(triton.next_power_of_2(channels_per_group), 32)
    block_s = _NARROW_S if S <= _NARROW_S else _TILE // block_c
    return next(c for c in _CONFIGS if c.kwargs == {"BLOCK_C": block_c, "BLOCK_S": block_s})


@triton.jit
def _group_moments(x_base, first, channels_per_group, S, stride_xc, stride_xs, centre,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """``(sum (x - centre), sum (x - centre)^2)`` over one sample's group (channels ``first`` on)."""
    c_offs = tl.arange(0, BLOCK_C)
    lanes = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    sq_lanes = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for c0 in range(0, channels_per_group, BLOCK_C):
        c64 = (first + c0 + c_offs).to(tl.int64)
        c_mask = c0 + c_offs < channels_per_group
        for s0 in range(0, S, BLOCK_S):
            s = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
            mask = c_mask[:, None] & (s < S)[None, :]
            at = x_base + c64[:, None] * stride_xc + s[None, :] * stride_xs
            centred = tl.where(mask, tl.load(at, mask=mask, other=0.0).to(tl.float32) - centre, 0.0)
            lanes += centred
            sq_lanes += centred * centred
    return tl.sum(tl.sum(lanes, axis=1), axis=0), tl.sum(tl.sum(sq_lanes, axis=1), axis=0)


@triton.jit
def _group_norm_grads_kernel(
    # inputs: x [B, C, S], g [B, C, S]
    x_ptr, g_ptr,
    # outputs, float32, contiguous [B, C]
    weight_ptr, bias_ptr,
    C, S, channels_per_group, eps,
    stride_xb, stride_xc, stride_xs,
    stride_gb, stride_gc, stride_gs,
    WITH_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One sample's groups are consecutive programs, so they run side by side: on channels-last maps
    # a memory line holds every group's channels of a few positions, and the groups share it in L2.
    groups = C // channels_per_group
    pid = tl.program_id(0)
    b = (pid // groups).to(tl.int64)
    first = (pid % groups) * channels_per_group
    c_offs = tl.arange(0, BLOCK_C)
    count = tl.cast(channels_per_group * S, tl.float32)
    x_base = x_ptr + b * stride_xb
    g_base = g_ptr + b * stride_gb

    total, _ = _group_moments(x_base, first, channels_per_group, S, stride_xc, stride_xs, 0.0, BLOCK_C, BLOCK_S)
    mean = total / count
    # The deviations from that first estimate give the variance and what the estimate lacks of
    # the mean (mean_dev), so a mean far from zero against the spread loses no digits.
    dev, sq_dev = _group_moments(x_base, first, channels_per_group, S, stride_xc, stride_xs, mean, BLOCK_C, BLOCK_S)
    mean_dev = dev / count
    rstd = 1.0 / tl.sqrt_rn(sq_dev / count - mean_dev * mean_dev + eps)

    for c0 in range(0, channels_per_group, BLOCK_C):
        c64 = (first + c0 + c_offs).to(tl.int64)
        c_mask = c0 + c_offs < channels_per_group
        dot, g_sum = centred_row_sums(x_base + c64[:, None] * stride_xc, g_base + c64[:, None] * stride_gc, c_mask,
                                      mean, S, stride_xs, stride_gs, BLOCK_C, BLOCK_S)
        tl.store(weight_ptr + b * C + c64, (dot - mean_dev * g_sum) * rstd, mask=c_mask)
        if WITH_BIAS:
            tl.store(bias_ptr + b * C + c64, g_sum, mask=c_mask)


def group_norm_grads_triton(x: torch.Tensor, g: torch.Tensor, groups: int, eps: float, with_bias: bool):
    """``(weight [B, C], bias [B, C])`` float32; see the module docstring. No copies of x or g."""
    op = "group_norm_grads"
    check_x_g(op, x, g)
    B, C, S = x.shape
    if groups < 1 or C % groups:
        raise ValueError(f"divebatch.{op}: groups={groups} must divide the {C} channels")
    launch, weight, bias = per_channel_outputs(x, with_bias)  # each entry stored by its group's program
    if launch:
        config = config_for(S, C // groups)
        _group_norm_grads_kernel[(B * groups,)](
            x, g, weight, bias,
            C, S, C // groups, float(eps),
            x.stride(0), x.stride(1), x.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            WITH_BIAS=bool(with_bias), **config.kwargs, num_warps=config.num_warps,
        )
    return weight, (bias if with_bias else torch.zeros_like(weight))
