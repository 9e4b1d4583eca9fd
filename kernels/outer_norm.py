"""T = 1 closed form: ``||g_b a_b^T||_F^2 = ||a_b||^2 ||g_b||^2`` and ``||g_b||^2``, one pass.

``a [B, d]``, ``g [B, p]`` (float32/float16/bfloat16, any strides) -> ``weight_sq [B]``,
``bias_sq [B]`` (``||g_b||^2``, zeros without bias), float32.

Grid: one program per BLOCK_B rows (samples). Each program streams its rows of a and then of g
in BLOCK_N-wide chunks, accumulates the squares in a float32 [BLOCK_B, BLOCK_N] register tile
(reduced once at the end, so the sum is blocked rather than sequential), and stores both
results directly: no atomics, no scratch, deterministic. Memory bound: every element of a and
g is read exactly once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AUTOTUNE_KWARGS, check_device, check_float, configs

_CONFIGS = configs(
    triton.Config({"BLOCK_B": 4, "BLOCK_N": 64}, num_warps=4, num_stages=1),
    [
        triton.Config({"BLOCK_B": 1, "BLOCK_N": 2048}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_B": 4, "BLOCK_N": 512}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_B": 16, "BLOCK_N": 128}, num_warps=4, num_stages=2),
    ],
)


@triton.jit
def _row_sq(base, rows64, row_mask, stride_r, N, stride_n, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_n x[r, n]^2 for BLOCK_B rows, float32 [BLOCK_B]."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    row = rows64 * stride_r
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + offs_n
        x = tl.load(base + row[:, None] + (nn.to(tl.int64) * stride_n)[None, :],
                    mask=row_mask[:, None] & (nn < N)[None, :], other=0.0).to(tl.float32)
        acc += x * x
    return tl.sum(acc, axis=1)


@triton.autotune(configs=_CONFIGS, key=["d", "p"], **AUTOTUNE_KWARGS)
@triton.jit
def _outer_norm_kernel(
    # inputs: a [B, d], g [B, p]
    a_ptr, g_ptr,
    # outputs, float32 [B], fully written
    weight_sq_ptr, bias_sq_ptr,
    # sizes
    B, d, p,
    # strides, in elements
    stride_ab, stride_ad, stride_gb, stride_gp,
    # meta
    WITH_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    a_sq = _row_sq(a_ptr, rows64, row_mask, stride_ab, d, stride_ad, BLOCK_B, BLOCK_N)
    g_sq = _row_sq(g_ptr, rows64, row_mask, stride_gb, p, stride_gp, BLOCK_B, BLOCK_N)
    tl.store(weight_sq_ptr + rows, a_sq * g_sq, mask=row_mask)
    if WITH_BIAS:
        tl.store(bias_sq_ptr + rows, g_sq, mask=row_mask)
    else:
        tl.store(bias_sq_ptr + rows, tl.zeros_like(g_sq), mask=row_mask)


def outer_norm_triton(a: torch.Tensor, g: torch.Tensor, with_bias: bool):
    """``(weight_sq [B], bias_sq [B])`` float32; see the module docstring. No copies of a or g."""
    check_float("outer_norm", "a", a, 2)
    check_float("outer_norm", "g", g, 2)
    device = check_device("outer_norm", a=a, g=g)
    B, d = a.shape
    if g.shape[0] != B:
        raise ValueError(f"divebatch.outer_norm: `g` must be [B, p] with B = {B} to match `a` "
                         f"{tuple(a.shape)}, got {tuple(g.shape)}")
    p = g.shape[1]
    weight_sq = torch.empty(B, dtype=torch.float32, device=device)
    bias_sq = torch.empty(B, dtype=torch.float32, device=device)
    if B > 0 and (d == 0 or p == 0):  # an empty side: no launch on an empty tensor
        g_sq = g.square().sum(dim=1, dtype=torch.float32)
        weight_sq = a.square().sum(dim=1, dtype=torch.float32) * g_sq
        bias_sq = g_sq if with_bias else torch.zeros_like(g_sq)
    elif B > 0:
        _outer_norm_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)](
            a, g, weight_sq, bias_sq,
            B, d, p,
            a.stride(0), a.stride(1), g.stride(0), g.stride(1),
            WITH_BIAS=bool(with_bias),
        )
    return weight_sq, bias_sq
