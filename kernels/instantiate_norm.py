"""Instantiate route fused with the weight gradient.

    tile_b          = g_b[:, P]^T a_b[:, D]          (P: a p-tile, D: a d-tile; reduced over T)
    weight_sq[b]   += ||tile_b||^2                  (atomic, float32)
    weight_grad_sum[P, D] = sum_b tile_b            (kept in registers, stored once)
    bias_sq[b]      = ||sum_t g_b[t]||^2

``a [B, T, d]``, ``g [B, T, p]`` (float32/float16/bfloat16, any strides) -> ``weight_sq [B]``,
``bias_sq [B]``, ``weight_grad_sum [p, d]``, all float32. The per-sample gradient exists only as
one BLOCK_P x BLOCK_D register tile at a time; ``||weight_grad_sum||^2`` (the batch-gradient
norm) is left to the caller.

Grid: ``(n_p_tiles * n_d_tiles, n_split)``. Program (P, D, s) loops over samples
``b = s, s + n_split, ...``; for each it reduces over T in BLOCK_T chunks with ``tl.dot``
(float32 accumulator). When the tile grid alone would leave the GPU idle (small p*d, e.g. the
layers of a small model) the samples are split over ``n_split`` programs and the weight gradient
is accumulated with float32 atomics instead of a plain store (``ATOMIC_WGRAD``).
Bias: the programs of the first d-tile (D = 0) also sum their g chunks over T; each p-tile adds
``||colsum_P||^2`` to ``bias_sq[b]`` (the p-tiles partition p, so the parts add up exactly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (AUTOTUNE_KWARGS, INTERPRET, check_a_g, config_table, dot_options,
                      sm_count, tuning_size)

_CONFIGS, _PRUNE = config_table(
    triton.Config({"BLOCK_P": 32, "BLOCK_D": 32, "BLOCK_T": 16}, num_warps=4, num_stages=1),  # interpreter
    {
        ("16", "unit"): [
            triton.Config({"BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_T": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_T": 32}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_P": 128, "BLOCK_D": 64, "BLOCK_T": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_T": 32}, num_warps=4, num_stages=4),
        ],
        ("16", "strided"): [
            triton.Config({"BLOCK_P": 128, "BLOCK_D": 64, "BLOCK_T": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 64, "BLOCK_D": 128, "BLOCK_T": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_T": 32}, num_warps=4, num_stages=4),
        ],
        ("32", "unit"): [
            triton.Config({"BLOCK_P": 128, "BLOCK_D": 64, "BLOCK_T": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_T": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_T": 16}, num_warps=4, num_stages=4),
        ],
        ("32", "strided"): [
            triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_T": 16}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_P": 64, "BLOCK_D": 32, "BLOCK_T": 16}, num_warps=4, num_stages=3),
        ],
    },
    tensor_args=("a_ptr", "g_ptr"),
    inner_strides=("stride_ad", "stride_gp"),
)
_LARGEST_TILE = max(c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_D"] for c in _CONFIGS)


@triton.autotune(configs=_CONFIGS, key=["T_TUNE", "B_TUNE", "d", "p", "WITH_BIAS", "ATOMIC_WGRAD", "stride_ad", "stride_gp"],
                 prune_configs_by=_PRUNE, reset_to_zero=["weight_sq_ptr", "bias_sq_ptr", "wgrad_ptr"],
                 **AUTOTUNE_KWARGS)
@triton.jit
def _instantiate_norm_kernel(
    # inputs: a [B, T, d], g [B, T, p]
    a_ptr, g_ptr,
    # outputs, float32, zero-initialised: weight_sq [B], bias_sq [B] (atomics), wgrad [p, d] contiguous
    weight_sq_ptr, bias_sq_ptr, wgrad_ptr,
    # sizes
    B, T, d, p,
    # strides, in elements
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    # autotune key only (tuning_size of T and B): not read by the kernel
    T_TUNE, B_TUNE,
    # meta
    WITH_BIAS: tl.constexpr, ATOMIC_WGRAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    n_d_tiles = tl.cdiv(d, BLOCK_D)
    pid_p = pid // n_d_tiles
    pid_d = pid % n_d_tiles
    split = tl.program_id(1)
    n_split = tl.num_programs(1)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < p
    mask_d = offs_d < d
    col_g = offs_p.to(tl.int64) * stride_gp  # [BLOCK_P]
    col_a = offs_d.to(tl.int64) * stride_ad  # [BLOCK_D]
    offs_t = tl.arange(0, BLOCK_T)
    first_d_tile = pid_d == 0

    total = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for b in range(split, B, n_split):
        b64 = tl.cast(b, tl.int64)  # (a Python int under the interpreter, an i32 on GPU)
        a_base = a_ptr + b64 * stride_ab
        g_base = g_ptr + b64 * stride_gb
        tile = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        col_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + offs_t
            t_mask = tt < T
            tt64 = tt.to(tl.int64)
            # g chunk loaded transposed, [BLOCK_P, BLOCK_T]; masked entries are 0 and add nothing.
            g_t = tl.load(g_base + col_g[:, None] + (tt64 * stride_gt)[None, :],
                          mask=mask_p[:, None] & t_mask[None, :], other=0.0)
            x = tl.load(a_base + (tt64 * stride_at)[:, None] + col_a[None, :],
                        mask=t_mask[:, None] & mask_d[None, :], other=0.0)
            if WITH_BIAS:
                if first_d_tile:
                    col_sum += tl.sum(g_t.to(tl.float32), axis=1)
            if UPCAST:
                g_t = g_t.to(tl.float32)
                x = x.to(tl.float32)
            tile = tl.dot(g_t, x, tile, input_precision=DOT_PRECISION)
        tl.atomic_add(weight_sq_ptr + b, tl.sum(tl.sum(tile * tile, axis=1), axis=0))
        if WITH_BIAS:
            if first_d_tile:
                tl.atomic_add(bias_sq_ptr + b, tl.sum(col_sum * col_sum, axis=0))
        total += tile

    out = wgrad_ptr + offs_p.to(tl.int64)[:, None] * d + offs_d[None, :]
    out_mask = mask_p[:, None] & mask_d[None, :]
    if ATOMIC_WGRAD:
        tl.atomic_add(out, total, mask=out_mask)
    else:
        tl.store(out, total, mask=out_mask)


def _n_split(B: int, p: int, d: int, device: torch.device) -> int:
    """Sample splits so that the grid has about two programs per SM even for a small p x d."""
    if INTERPRET:
        return 1
    tiles = max(1, (p * d) // _LARGEST_TILE)
    return max(1, min(B, triton.cdiv(2 * sm_count(device), tiles)))


def instantiate_norm_triton(a: torch.Tensor, g: torch.Tensor, with_bias: bool, *, _n_split_override=None):
    """``(weight_sq [B], bias_sq [B], weight_grad_sum [p, d])`` float32; see the module docstring.

    ``_n_split_override`` (tests only) forces the number of sample splits of the grid.
    """
    device, B, T, d, p = check_a_g("instantiate_norm", a, g)
    weight_sq = torch.zeros(B, dtype=torch.float32, device=device)
    bias_sq = torch.zeros(B, dtype=torch.float32, device=device)
    n_split = _n_split_override if _n_split_override is not None else _n_split(B, p, d, device)
    n_split = max(1, min(int(n_split), max(B, 1), 65535))  # grid axis 1 holds at most 65535
    wgrad = (torch.zeros if (n_split > 1 or B == 0 or T == 0) else torch.empty)(
        (p, d), dtype=torch.float32, device=device)
    if p > 0 and d > 0 and B > 0 and T > 0:
        upcast, precision = dot_options(a.dtype, g.dtype)

        def grid(meta):
            return (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(d, meta["BLOCK_D"]), n_split)

        _instantiate_norm_kernel[grid](
            a, g, weight_sq, bias_sq, wgrad,
            B, T, d, p,
            a.stride(0), a.stride(1), a.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            tuning_size(T), tuning_size(B),
            WITH_BIAS=bool(with_bias), ATOMIC_WGRAD=n_split > 1, UPCAST=upcast, DOT_PRECISION=precision,
        )
    elif with_bias and B > 0 and T > 0 and p > 0:  # d == 0: no weight, but the bias still has a gradient
        bias_sq = g.sum(dim=1, dtype=torch.float32).square().sum(dim=1)
    return weight_sq, bias_sq, wgrad
