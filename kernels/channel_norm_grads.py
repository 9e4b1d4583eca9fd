"""Per-sample gradients of a BatchNorm's affine parameters (an InstanceNorm's with running statistics).

    x_hat[b, c, s] = (x[b, c, s] - mean[c]) / sqrt(var[c] + eps)
    weight[b, c]   = sum_s x_hat[b, c, s] * g[b, c, s]        [B, C] float32
    bias[b, c]     = sum_s g[b, c, s]                         [B, C] float32 (``WITH_BIAS``)

``x, g [B, C, S]`` (float32/float16/bfloat16, any strides; ``S`` the positions, flattened);
``mean, var [C]`` are the running statistics (eval mode) or, both None, the batch's (a BatchNorm
in training mode: the decomposition of its batch gradient), which the wrapper takes with ATen's
``batch_norm_stats`` (one pass, float32, the statistics SyncBatchNorm uses). The PyTorch path
(``layers/norm.py``) writes ``x_hat`` in float32, for the whole batch at once in training mode,
multiplies it by ``g`` in place and reduces; here nothing activation-sized is written, and
``x - mean`` is formed before the product, so no large sums are subtracted.

Grid: ``(B, cdiv(C, BLOCK_C))``; a program streams its ``BLOCK_C`` channels' positions in
``BLOCK_C x BLOCK_S`` tiles and stores one number per channel (no atomics: deterministic). The tile
is wide along whichever of C and S is contiguous in memory (positions for NCHW, channels for
channels-last), so the loads coalesce in both layouts. Not autotuned: the layout and ``S`` pick
the config (``config_for``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, centred_row_sums, check_float, check_x_g, per_channel_outputs

#: (BLOCK_C, BLOCK_S, warps): the first three for contiguous positions, by the number of positions
#: (the narrowest that holds a channel's row); then channels-last inputs; then at most 4 positions
#: (a BatchNorm1d on [B, C]), either layout.
_CONFIGS = [triton.Config({"BLOCK_C": c, "BLOCK_S": s}, num_warps=w)
            for c, s, w in ((32, 64, 4), (8, 256, 4), (2, 1024, 4), (64, 32, 4), (256, 4, 4))]
_BY_POSITIONS, _CHANNELS_LAST, _FEW_POSITIONS = _CONFIGS[:3], _CONFIGS[3], _CONFIGS[4]


def config_for(S: int, channels_contiguous: bool) -> triton.Config:
    """The config for ``S`` positions per channel, channels or positions contiguous in memory
    (under the interpreter one small tile, so tests cross both masks)."""
    if INTERPRET:
        return triton.Config({"BLOCK_C": 4, "BLOCK_S": 16}, num_warps=1)
    if S <= _FEW_POSITIONS.kwargs["BLOCK_S"]:
        return _FEW_POSITIONS
    if channels_contiguous:
        return _CHANNELS_LAST
    return next((c for c in _BY_POSITIONS if c.kwargs["BLOCK_S"] >= S), _BY_POSITIONS[-1])


@triton.jit
def _channel_norm_grads_kernel(
    # inputs: x [B, C, S], g [B, C, S]; mean, rstd = 1 / sqrt(var + eps): float32 [C] contiguous
    x_ptr, g_ptr, mean_ptr, rstd_ptr,
    # outputs, float32, contiguous [B, C]
    weight_ptr, bias_ptr,
    C, S,
    stride_xb, stride_xc, stride_xs,
    stride_gb, stride_gc, stride_gs,
    WITH_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    dot, g_sum = centred_row_sums(x_ptr + b * stride_xb + c64[:, None] * stride_xc,
                                  g_ptr + b * stride_gb + c64[:, None] * stride_gc, c_mask, mean[:, None], S,
                                  stride_xs, stride_gs, BLOCK_C, BLOCK_S)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
    tl.store(weight_ptr + b * C + c64, dot * rstd, mask=c_mask)
    if WITH_BIAS:
        tl.store(bias_ptr + b * C + c64, g_sum, mask=c_mask)


def _float32_stats(x: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None, eps: float):
    """``(mean, 1 / sqrt(var + eps))`` float32 [C], contiguous: of the running statistics given,
    else of the batch (``x`` non-empty)."""
    if mean is not None:
        return mean.to(torch.float32).contiguous(), torch.rsqrt(var.to(torch.float32) + eps).contiguous()
    if x.is_cuda:
        # As [B, C, S, 1]: a channels-last [B, C, S] view is then a channels-last 4-D tensor, which
        # ATen reduces in place (a 3-D one it might first copy to contiguous).
        return torch.batch_norm_stats(x.unsqueeze(-1), eps)
    # The interpreter's CPU tensors (ATen has no CPU batch_norm_stats): the reference's statistics.
    var, mean = torch.var_mean(x.float(), dim=(0, 2), correction=0)
    return mean, torch.rsqrt(var + eps)


def channel_norm_grads_triton(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
                              eps: float, with_bias: bool):
    """``(weight [B, C], bias [B, C])`` float32; see the module docstring. No copies of x or g."""
    op = "channel_norm_grads"
    device = check_x_g(op, x, g)
    B, C, S = x.shape
    if (mean is None) != (var is None):
        raise ValueError(f"divebatch.{op}: give both `mean` and `var` (running statistics) or neither (the "
                         f"batch's), got only {'mean' if var is None else 'var'}")
    for name, stat in (("mean", mean), ("var", var)):
        if stat is None:
            continue
        check_float(op, name, stat, 1)
        if stat.shape[0] != C:
            raise ValueError(f"divebatch.{op}: `{name}` must have one entry per channel of `x` ({C}), "
                             f"got shape {tuple(stat.shape)}")
        if stat.device != device:
            raise ValueError(f"divebatch.{op}: `{name}` must be on the device of `x` ({device}), got {stat.device}")
    launch, weight, bias = per_channel_outputs(x, with_bias)  # each entry stored by its program
    if launch:
        stats = _float32_stats(x, mean, var, eps)
        config = config_for(S, x.stride(1) == 1)
        block_c = config.kwargs["BLOCK_C"]
        _channel_norm_grads_kernel[(B, triton.cdiv(C, block_c))](
            x, g, *stats, weight, bias,
            C, S,
            x.stride(0), x.stride(1), x.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            WITH_BIAS=bool(with_bias), BLOCK_C=block_c, BLOCK_S=config.kwargs["BLOCK_S"],
            num_warps=config.num_warps,
        )
    return weight, (bias if with_bias else torch.zeros_like(weight))
