"""Per-sample gradients of a GroupNorm's (or InstanceNorm's: one channel a group) affine parameters.

    x_hat[b, c, s] = (x[b, c, s] - mean[b, G(c)]) / sqrt(var[b, G(c)] + eps)
    weight[b, c]   = sum_s x_hat[b, c, s] * g[b, c, s]        [B, C] float32
    bias[b, c]     = sum_s g[b, c, s]                         [B, C] float32 (``WITH_BIAS``)

``x, g [B, C, S]`` (float32/float16/bfloat16, any strides; ``S`` the positions, flattened), mean
and biased variance over the group's ``C / groups`` channels and all positions. The PyTorch path
(``layers/norm.py``) writes ``x_hat`` in float32, multiplies it by ``g`` in place and reduces;
here nothing activation-sized is written.

Grid: ``(B, groups)``, one program per (sample, group): it streams the group's elements three
times in BLOCK_S chunks (the sum for a first estimate of the mean; the deviations from it and
their squares, for the variance and the estimate's error, so the variance never subtracts two
large numbers; then per channel ``sum_s (x - estimate) g`` and ``sum_s g``, from which ``sum_s
x_hat g``), holding only BLOCK_S float32 lanes. Not autotuned: BLOCK_S follows the number of positions (``config_for``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_x_g, per_channel_outputs

#: (BLOCK_S, warps) by the number of positions S: the narrowest that holds a channel's positions.
_CONFIGS = [triton.Config({"BLOCK_S": width}, num_warps=warps) for width, warps in ((256, 2), (1024, 4))]


def config_for(S: int) -> triton.Config:
    """The config that streams ``S`` positions per channel (under the interpreter, 32 lanes)."""
    if INTERPRET:
        return triton.Config({"BLOCK_S": 32}, num_warps=1)
    return next((c for c in _CONFIGS if c.kwargs["BLOCK_S"] >= S), _CONFIGS[-1])


@triton.jit
def _group_norm_grads_kernel(
    # inputs: x [B, C, S], g [B, C, S]
    x_ptr, g_ptr,
    # outputs, float32, contiguous [B, C]
    weight_ptr, bias_ptr,
    C, S, channels_per_group, eps,
    stride_xb, stride_xc, stride_xs,
    stride_gb, stride_gc, stride_gs,
    WITH_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * channels_per_group
    last = first + channels_per_group
    offs = tl.arange(0, BLOCK_S)
    count = tl.cast(channels_per_group * S, tl.float32)
    x_base = x_ptr + b * stride_xb
    g_base = g_ptr + b * stride_gb

    lanes = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for c in range(first, last):
        row = x_base + tl.cast(c, tl.int64) * stride_xc
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs
            lanes += tl.load(row + s.to(tl.int64) * stride_xs, mask=s < S, other=0.0).to(tl.float32)
    mean = tl.sum(lanes, axis=0) / count

    # The deviations from that first estimate give the variance and what the estimate lacks of
    # the mean (mean_dev), so a mean far from zero against the spread loses no digits.
    lanes = tl.zeros((BLOCK_S,), dtype=tl.float32)
    dev_lanes = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for c in range(first, last):
        row = x_base + tl.cast(c, tl.int64) * stride_xc
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs
            mask = s < S
            v = tl.load(row + s.to(tl.int64) * stride_xs, mask=mask, other=0.0).to(tl.float32)
            centred = tl.where(mask, v - mean, 0.0)
            lanes += centred * centred
            dev_lanes += centred
    mean_dev = tl.sum(dev_lanes, axis=0) / count
    rstd = 1.0 / tl.sqrt_rn(tl.sum(lanes, axis=0) / count - mean_dev * mean_dev + eps)

    for c in range(first, last):
        c64 = tl.cast(c, tl.int64)
        row = x_base + c64 * stride_xc
        grow = g_base + c64 * stride_gc
        acc_w = tl.zeros((BLOCK_S,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + offs
            mask = s < S
            s64 = s.to(tl.int64)
            v = tl.load(row + s64 * stride_xs, mask=mask, other=0.0).to(tl.float32)
            gv = tl.load(grow + s64 * stride_gs, mask=mask, other=0.0).to(tl.float32)
            acc_w += (v - mean) * gv  # masked entries load g = 0
            acc_b += gv
        g_sum = tl.sum(acc_b, axis=0)
        tl.store(weight_ptr + b * C + c64, (tl.sum(acc_w, axis=0) - mean_dev * g_sum) * rstd)
        if WITH_BIAS:
            tl.store(bias_ptr + b * C + c64, g_sum)


def group_norm_grads_triton(x: torch.Tensor, g: torch.Tensor, groups: int, eps: float, with_bias: bool):
    """``(weight [B, C], bias [B, C])`` float32; see the module docstring. No copies of x or g."""
    op = "group_norm_grads"
    check_x_g(op, x, g)
    B, C, S = x.shape
    if groups < 1 or C % groups:
        raise ValueError(f"divebatch.{op}: groups={groups} must divide the {C} channels")
    launch, weight, bias = per_channel_outputs(x, with_bias)  # each entry stored by its group's program
    if launch:
        config = config_for(S)
        _group_norm_grads_kernel[(B, groups)](
            x, g, weight, bias,
            C, S, C // groups, float(eps),
            x.stride(0), x.stride(1), x.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            WITH_BIAS=bool(with_bias), BLOCK_S=config.kwargs["BLOCK_S"], num_warps=config.num_warps,
        )
    return weight, (bias if with_bias else torch.zeros_like(weight))
