"""Embedding gradient norm: ``||sum_t onehot(idx_t) g_t||^2 = sum_{s,t: idx_s = idx_t != pad} <g_s, g_t>``.

``indices [B, T]`` (int32/int64), ``g [B, T, p]`` (float32/float16/bfloat16, any strides),
``padding_idx`` (a row that gets no gradient, or negative for none) -> float32 ``[B]``.

Grid: like the ghost norm, one program per (sample, upper-triangular T-tile pair (i, j)),
flattened to 1-D. The program first loads the two index tiles and forms the match mask
``idx_s == idx_t`` (both valid, neither the padding row); a pair without a single match returns
before touching g. Otherwise it builds the BLOCK_T x BLOCK_T Gram tile of g over p in float32
(``tl.dot``), sums it under the mask, doubles off-diagonal pairs and atomically adds into the
output.

Cost: O(T^2 p) FLOPs per sample against the PyTorch reference's O(T p) sort-and-scatter
(``torch.unique`` + ``index_add_``). The kernel wins for short sequences and many repeated
tokens per tile; for long sequences with mostly distinct tokens the tiles are skipped cheaply,
but the reference path can still be faster; measure before routing (bench/gpu/).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AUTOTUNE_KWARGS, FLOAT_DTYPES, check_device, config_table, dot_options, tuning_size
from .ghost_norm import _gram_tile, _tile_pair, tile_pair_grid

_F32_CONFIGS = [  # float32 operands (tf32x3), any layout
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
_CONFIGS, _PRUNE = config_table(
    triton.Config({"BLOCK_T": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1),  # interpreter
    {
        ("16", "unit"): [
            triton.Config({"BLOCK_T": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_T": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        ],
        ("16", "strided"): [
            triton.Config({"BLOCK_T": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        ],
        ("32", "unit"): _F32_CONFIGS,
        ("32", "strided"): _F32_CONFIGS,
    },
    tensor_args=("g_ptr",),
    inner_strides=("stride_gp",),
)


@triton.autotune(configs=_CONFIGS, key=["T_TUNE", "B_TUNE", "p", "stride_gp"], prune_configs_by=_PRUNE,
                 reset_to_zero=["out_ptr"], **AUTOTUNE_KWARGS)
@triton.jit
def _embedding_norm_kernel(
    # inputs: indices [B, T], g [B, T, p]
    idx_ptr, g_ptr,
    # output, float32 [B], zero-initialised, accumulated with atomics
    out_ptr,
    # sizes and the padding row (negative: none)
    T, p, padding_idx,
    # strides, in elements
    stride_ib, stride_it,
    stride_gb, stride_gt, stride_gp,
    # autotune key only (tuning_size of T and B): not read by the kernel
    T_TUNE, B_TUNE,
    # meta
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n_tiles = tl.cdiv(T, BLOCK_T)
    n_pairs = n_tiles * (n_tiles + 1) // 2
    pid = tl.program_id(0)
    b = pid // n_pairs
    ti, tj = _tile_pair(pid % n_pairs, n_tiles)
    b64 = b.to(tl.int64)

    offs_i = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_i = offs_i < T
    mask_j = offs_j < T
    idx_base = idx_ptr + b64 * stride_ib
    idx_i = tl.load(idx_base + offs_i.to(tl.int64) * stride_it, mask=mask_i, other=0)
    idx_j = tl.load(idx_base + offs_j.to(tl.int64) * stride_it, mask=mask_j, other=0)
    valid_i = mask_i & (idx_i != padding_idx)
    valid_j = mask_j & (idx_j != padding_idx)
    match = (idx_i[:, None] == idx_j[None, :]) & valid_i[:, None] & valid_j[None, :]
    n_match = tl.sum(tl.sum(match.to(tl.int32), axis=1), axis=0)

    if n_match > 0:
        g_base = g_ptr + b64 * stride_gb
        row_i = offs_i.to(tl.int64) * stride_gt
        row_j = offs_j.to(tl.int64) * stride_gt
        # Rows with no valid index load as 0 (they contribute nothing anyway).
        gram = _gram_tile(g_base, row_i, valid_i, row_j, valid_j, p, stride_gp,
                          UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_K)
        w = tl.sum(tl.sum(tl.where(match, gram, 0.0), axis=1), axis=0)
        w = tl.where(ti == tj, w, 2.0 * w)  # (i, j) also stands for (j, i)
        tl.atomic_add(out_ptr + b, w, sem="relaxed")


def embedding_norm_triton(indices: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Per-sample squared embedding-gradient norm, float32 ``[B]``; see the module docstring."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError("divebatch.embedding_norm: `indices` must be a 2-D [B, T] tensor, got "
                         f"{tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"divebatch.embedding_norm: `indices` must be int64 or int32, got {indices.dtype}")
    if not isinstance(g, torch.Tensor) or g.dim() != 3:
        raise ValueError("divebatch.embedding_norm: `g` must be a 3-D [B, T, p] tensor, got "
                         f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
    if g.dtype not in FLOAT_DTYPES:
        raise TypeError(f"divebatch.embedding_norm: `g` must be float32, float16 or bfloat16, got {g.dtype}")
    device = check_device("embedding_norm", indices=indices, g=g)
    B, T = indices.shape
    if g.shape[:2] != (B, T):
        raise ValueError(f"divebatch.embedding_norm: `g` must be [B, T, p] = [{B}, {T}, p] to match `indices` "
                         f"{tuple(indices.shape)}, got {tuple(g.shape)}")
    p = g.shape[2]
    out = torch.zeros(B, dtype=torch.float32, device=device)
    if B > 0 and T > 0 and p > 0:
        upcast, precision = dot_options(g.dtype)
        # A negative padding_idx means "none"; indices are non-negative, so -1 never matches.
        pad = int(padding_idx) if int(padding_idx) >= 0 else -1

        _embedding_norm_kernel[tile_pair_grid("embedding_norm", B, T, "the reference path")](
            indices, g, out,
            T, p, pad,
            indices.stride(0), indices.stride(1),
            g.stride(0), g.stride(1), g.stride(2),
            tuning_size(T), tuning_size(B),
            UPCAST=upcast, DOT_PRECISION=precision,
        )
    return out
