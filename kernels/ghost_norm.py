"""Ghost norm: per-sample ``||g_b^T a_b||_F^2`` from T x T Gram tiles, bias norm in the same pass.

    weight_sq[b] = <a_b a_b^T, g_b g_b^T> = sum_{i<=j tiles} (2 - [i==j]) * sum(Ga_ij * Gg_ij)
    bias_sq[b]   = ||sum_t g_b[t]||^2

``a [B, T, d]``, ``g [B, T, p]`` (float32/float16/bfloat16, any strides); outputs float32 ``[B]``.
``conv_ghost_norm``: ``a`` is a one-group convolution's patches, read from its input ``x`` in place
(``IMPLICIT``, see ``_patches.py``), so no unfolded copy is written; the weight only.

Grid: one program per (sample, upper-triangular tile pair (i, j), i <= j), flattened to 1-D
(``B * n_tiles * (n_tiles + 1) / 2`` programs), so a small batch with long sequences still fills
the GPU. Program (b, i, j) loops over d in BLOCK_K chunks to build the BLOCK_T x BLOCK_T tile
``Ga_ij = a_b[i-rows] a_b[j-rows]^T`` and over p for ``Gg_ij``, both in float32 registers
(``tl.dot``), multiplies them elementwise, sums, doubles off-diagonal pairs and atomically adds
the number into ``weight_sq[b]``. The Grams are never written to memory. The ``USE_TMA`` configs
(sm_90) load the chunks by Hopper's tensor memory accelerator from device-side descriptors where
``tma_ok`` allows (else by pointers, as the others).

``DIVEBATCH_TRITON_GHOST_WIDE=1`` (opt-in, untimed on a GPU): ``_ghost_norm_wide_kernel`` instead,
on 128 x 256 tiles whose two Grams pass through a per-program scratch slot (see its docstring).

Bias, same launch: the diagonal program (b, i, i) has just streamed every row of tile i of g for
its Gram; it reads them again (from L2, in a loop of its own: see the comment there) and adds
their column sums into a float32 scratch ``colsum [B, p]`` (atomics, one per row tile);
the wrapper finishes with ``colsum.square().sum(1)`` (O(B p), negligible). Summing the Gram
``Gg`` instead would be free but loses accuracy to cancellation when sum_t g_t is small.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (AUTOTUNE_KWARGS, check_a_g, config_table, dot_options, sm_count, tma_ok, tma_workspace,
                      tuning_size)
from ._patches import ConvPatches, conv_patches_of, launch_args, patch_chunk, patch_columns


def _config(block_t, block_k, warps, stages, tma=False) -> triton.Config:
    return triton.Config({"BLOCK_T": block_t, "BLOCK_K": block_k, "USE_TMA": tma}, num_warps=warps, num_stages=stages)


_F32_CONFIGS = [_config(64, 32, 8, 3), _config(64, 16, 4, 4)]  # float32 operands (tf32x3), any layout
#: The GPU configs by (operand width, layout) (see ``config_table``).
_TABLE = {
    ("16", "unit"): [_config(64, 64, 4, 3), _config(128, 32, 8, 3), _config(128, 64, 8, 3)],
    ("16", "strided"): [_config(128, 32, 8, 3), _config(64, 64, 8, 3)],
    ("32", "unit"): _F32_CONFIGS,
    ("32", "strided"): _F32_CONFIGS,
}
#: sm_90: the 16-bit tiles loaded by Hopper's tensor memory accelerator (``USE_TMA``: bulk copies by
#: descriptor where ``tma_ok`` allows, else the same config loads by pointers). Added after the
#: only GPU run, so tried only with ``DIVEBATCH_TRITON_UNVERIFIED_CONFIGS=1`` until a GPU clears them.
_SM90_TABLE = {("16", "unit"): [_config(64, 64, 4, 3, tma=True), _config(128, 64, 8, 3, tma=True),
                                _config(128, 64, 8, 4, tma=True)]}
_UNVERIFIED = tuple(_SM90_TABLE[("16", "unit")])
_CONFIGS, _TABLE_PRUNE = config_table(
    _config(16, 32, 4, 1),  # interpreter
    _TABLE,
    tensor_args=("a_ptr", "g_ptr"),
    inner_strides=("stride_ad", "stride_gp"),
    sm90_table=_SM90_TABLE,
    unverified=_UNVERIFIED,
)
#: The config of a convolution's patches read in place (IMPLICIT) with depth terms or int64 offsets
#: and 16-bit operands: the strided list's spilled there with triton 3.7 (128 x 32: 128-216 bytes,
#: 64 x 64: 24 on sm_80; none with 3.6, the GPU image's); this one fits both (204-239 registers).
_IMPLICIT_WIDE_CONFIG = _config(128, 16, 8, 3)
#: Configs outside the tables (the GPU config sweeps run them too).
_EXTRA_CONFIGS = (_IMPLICIT_WIDE_CONFIG,)
if _TABLE_PRUNE:
    _CONFIGS = [*_CONFIGS, *_EXTRA_CONFIGS]


def _prune(configs, named_args, **kwargs):
    """``config_table``'s prune, but for the implicit patches (``IMPLICIT``) of a 3-d convolution or
    with int64 offsets in 16 bits ``_IMPLICIT_WIDE_CONFIG`` alone, and in float32 the list's 64 x 16
    config alone (64 x 32 spilled 24 bytes on sm_80 with triton 3.7); 16-bit 2-d int32 builds fit
    the whole list."""
    kept = _TABLE_PRUNE["early_config_prune"](configs, named_args, **kwargs)
    if not kwargs.get("IMPLICIT"):
        return kept
    if torch.float32 in (named_args["a_ptr"].dtype, named_args["g_ptr"].dtype):
        return [_F32_CONFIGS[1]]
    if kwargs.get("DEPTH") or kwargs.get("WIDE"):
        return [_IMPLICIT_WIDE_CONFIG]
    return kept


_PRUNE = {"early_config_prune": _prune} if _TABLE_PRUNE else {}


@triton.jit
def _tile_pair(k, n_tiles):
    """Pair index k in [0, n(n+1)/2) -> tile pair (i, j), i <= j, in O(1).

    Row i of the upper triangle has n - i pairs, so rows q and n-1-q together hold n + 1:
    k = q (n + 1) + r lands in row q (j = q + r) when r < n - q, else in row n-1-q (j = r - 1).
    For odd n the middle row q = (n-1)/2 is alone and only the first branch is reached.
    """
    q = k // (n_tiles + 1)
    r = k % (n_tiles + 1)
    lower = r >= n_tiles - q
    ti = tl.where(lower, n_tiles - 1 - q, q)
    tj = tl.where(lower, r - 1, q + r)
    return ti, tj


@triton.jit
def _gram_tile(base, row_i, mask_i, row_j, mask_j, K, stride_k,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[i-rows] x[j-rows]^T over K columns in BLOCK_K chunks; float32 [BLOCK_T, BLOCK_T]."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        col = kk.to(tl.int64) * stride_k
        # Rows past T and columns past K load as 0 and add nothing to the Gram.
        x_i = tl.load(base + row_i[:, None] + col[None, :], mask=mask_i[:, None] & k_mask[None, :], other=0.0)
        x_jt = tl.load(base + col[:, None] + row_j[None, :], mask=k_mask[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            x_i = x_i.to(tl.float32)
            x_jt = x_jt.to(tl.float32)
        acc = tl.dot(x_i, x_jt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _gram_tile_tma(desc, b, first_i, first_j, K, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_gram_tile`` from a ``[B, T, K]`` tensor descriptor: rows past T and columns past K arrive
    as zeros (the descriptor's bounds), so nothing is masked."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x_i = desc.load([b, first_i, k0]).reshape(BLOCK_T, BLOCK_K)
        x_jt = tl.trans(desc.load([b, first_j, k0]).reshape(BLOCK_T, BLOCK_K))
        if UPCAST:
            x_i = x_i.to(tl.float32)
            x_jt = x_jt.to(tl.float32)
        acc = tl.dot(x_i, x_jt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _patch_gram_tile(x_base, offs_i, mask_i, offs_j, mask_j, K, XC, XD, XH, XW, OH, OW, KD, KH, KW,
                     sd, sh, sw, pd, ph, pw, dd, dh, dw, stride_xc, stride_xd, stride_xh, stride_xw,
                     PADDED: tl.constexpr, DEPTH: tl.constexpr, WIDE: tl.constexpr, CHANNELS_FASTEST: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_gram_tile`` of a convolution's patches (positions ``offs_i`` with ``offs_j``, over the
    ``K`` kernel offsets in BLOCK_K chunks) read from its input in place (``_patches.py``)."""
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        col_off, win_d, win_h, win_w = patch_columns(kk, XC, KD, KH, KW, dd, dh, dw, stride_xc, stride_xd, stride_xh,
                                                     stride_xw, DEPTH, WIDE, CHANNELS_FASTEST)
        x_i = patch_chunk(x_base, offs_i, mask_i, k_mask, col_off, win_d, win_h, win_w, XD, XH, XW, OH, OW,
                          sd, sh, sw, pd, ph, pw, stride_xd, stride_xh, stride_xw, PADDED, DEPTH, WIDE)
        x_j = patch_chunk(x_base, offs_j, mask_j, k_mask, col_off, win_d, win_h, win_w, XD, XH, XW, OH, OW,
                          sd, sh, sw, pd, ph, pw, stride_xd, stride_xh, stride_xw, PADDED, DEPTH, WIDE)
        if UPCAST:
            x_i = x_i.to(tl.float32)
            x_j = x_j.to(tl.float32)
        acc = tl.dot(x_i, tl.trans(x_j), acc, input_precision=DOT_PRECISION)
    return acc


#: The bias pass's step where each thread sums whole columns (``_column_sums_in_threads``): rows, columns.
COLUMN_SUM_ROWS, COLUMN_SUM_COLS = 8, 2048


def columns_in_threads(g: torch.Tensor) -> bool:
    """Whether the bias pass over ``g`` may lay whole columns in each thread: a 16-bit ``g`` of unit
    inner stride (no build of those spills with it; strided or float32 tiles of its size did)."""
    return g.stride(2) == 1 and g.element_size() == 2


@triton.jit
def _add_column_sums(g_base, first_row, T, stride_gt, p, stride_gp, colsum, N_ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr, IN_THREADS: tl.constexpr):
    """Atomically add the column sums of g's rows ``first_row .. first_row + N_ROWS - 1`` (those
    below ``T``) over its p columns into ``colsum [p]`` (float32): a bias's sums. The loop is not
    software-pipelined (``num_stages`` on it spilled on sm_80), so each step waits for its loads,
    and a step that sums across warps also waits for shared memory: ``IN_THREADS`` (see
    ``columns_in_threads``) takes the layout with no cross-thread sums, else two chunks a step."""
    if IN_THREADS:
        _column_sums_in_threads(g_base, first_row, T, stride_gt, p, stride_gp, colsum, N_ROWS)
    else:
        _column_sums_in_chunks(g_base, first_row, T, stride_gt, p, stride_gp, colsum, N_ROWS, BLOCK_K)


@triton.jit
def _column_sums_in_chunks(g_base, first_row, T, stride_gt, p, stride_gp, colsum, N_ROWS: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """Two [N_ROWS, BLOCK_K] chunks a step, both loads issued before either is reduced (sm_90: 8
    ``LDG.E.128`` in flight where one chunk had 4), each summed over its rows across the warps and
    added with relaxed atomics (the acq_rel default fenced each: ``MEMBAR.ALL.GPU``, a wait for the
    reply, ``CCTL.IVALL``)."""
    offs_i = first_row + tl.arange(0, N_ROWS)
    row_i, mask_i = offs_i.to(tl.int64) * stride_gt, offs_i < T
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, p, 2 * BLOCK_K):
        kk = k0 + offs_k
        kk_next = kk + BLOCK_K
        k_mask, next_mask = kk < p, kk_next < p
        y = tl.load(g_base + row_i[:, None] + (kk.to(tl.int64) * stride_gp)[None, :],
                    mask=mask_i[:, None] & k_mask[None, :], other=0.0)
        y_next = tl.load(g_base + row_i[:, None] + (kk_next.to(tl.int64) * stride_gp)[None, :],
                         mask=mask_i[:, None] & next_mask[None, :], other=0.0)
        tl.atomic_add(colsum + kk, tl.sum(y.to(tl.float32), axis=0), mask=k_mask, sem="relaxed")
        tl.atomic_add(colsum + kk_next, tl.sum(y_next.to(tl.float32), axis=0), mask=next_mask, sem="relaxed")


@triton.jit
def _column_sums_in_threads(g_base, first_row, T, stride_gt, p, stride_gp, colsum, N_ROWS: tl.constexpr,
                            ROWS: tl.constexpr = COLUMN_SUM_ROWS, COLS: tl.constexpr = COLUMN_SUM_COLS):
    """COLS columns at a time, ROWS rows a step: a [ROWS, COLS] tile of unit-stride 16-bit g is laid
    out with each thread's 8-element vector along the columns and the threads, then the warps,
    across them (2048 columns take all 8 warps' 256 lanes), so each thread holds whole columns of
    the step and sums its rows in its own registers: no shuffles, no barriers. The sums go out once
    per COLS columns, with relaxed atomics."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    for c0 in range(0, p, COLS):
        cc = c0 + cols
        c_mask = cc < p
        col_offsets = (cc.to(tl.int64) * stride_gp)[None, :]
        sums = tl.zeros((COLS,), dtype=tl.float32)
        for r0 in range(0, N_ROWS, ROWS):
            rr = first_row + r0 + rows
            y = tl.load(g_base + (rr.to(tl.int64) * stride_gt)[:, None] + col_offsets,
                        mask=(rr < T)[:, None] & c_mask[None, :], other=0.0)
            sums += tl.sum(y.to(tl.float32), axis=0)
        tl.atomic_add(colsum + cc, sums, mask=c_mask, sem="relaxed")


@triton.autotune(configs=_CONFIGS, key=["T_TUNE", "B_TUNE", "d", "p", "WITH_BIAS", "stride_ad", "stride_gp", "TMA_OK",
                                        "IMPLICIT", "PADDED", "DEPTH", "WIDE", "CHANNELS_FASTEST"],
                 prune_configs_by=_PRUNE, reset_to_zero=["weight_sq_ptr", "colsum_ptr"], **AUTOTUNE_KWARGS)
@triton.jit
def _ghost_norm_kernel(
    # inputs: a [B, T, d], g [B, T, p]
    a_ptr, g_ptr,
    # outputs, float32, zero-initialised, accumulated with atomics: weight_sq [B], colsum [B, p]
    # (WITH_BIAS off: the [B] bias norms instead, unfilled, where the kernel stores zeros)
    weight_sq_ptr, colsum_ptr,
    # sizes
    B, T, d, p,
    # strides, in elements
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    # IMPLICIT only (else unused): a_ptr is a convolution's input x [B, XC, XD, XH, XW] (batch stride
    # stride_ab) whose patches are a (see _patches.py; d = XC KD KH KW, T = OD OH OW positions)
    XC, XD, XH, XW, OH, OW, KD, KH, KW,
    conv_sd, conv_sh, conv_sw, conv_pd, conv_ph, conv_pw, conv_dd, conv_dh, conv_dw,
    stride_xc, stride_xd, stride_xh, stride_xw,
    # autotune key only (tuning_size of T and B): not read by the kernel
    T_TUNE, B_TUNE,
    # meta
    WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr, TMA_OK: tl.constexpr,
    IMPLICIT: tl.constexpr = False, PADDED: tl.constexpr = False, DEPTH: tl.constexpr = False,
    WIDE: tl.constexpr = True, CHANNELS_FASTEST: tl.constexpr = False, COLUMNS_IN_THREADS: tl.constexpr = False,
):
    n_tiles = tl.cdiv(T, BLOCK_T)
    n_pairs = n_tiles * (n_tiles + 1) // 2
    pid = tl.program_id(0)
    b = pid // n_pairs
    ti, tj = _tile_pair(pid % n_pairs, n_tiles)

    offs_i = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_i = offs_i < T
    mask_j = offs_j < T
    b64 = b.to(tl.int64)

    diagonal = ti == tj
    g_base = g_ptr + b64 * stride_gb
    row_i = offs_i.to(tl.int64) * stride_gt
    if USE_TMA and TMA_OK:
        # Hopper's tensor memory accelerator: each chunk one bulk copy by descriptor (no per-element
        # addresses in registers); rows past T and columns past d, p arrive as zeros.
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[B, T, d], strides=[stride_ab, stride_at, 1],
                                           block_shape=[1, BLOCK_T, BLOCK_K])
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[B, T, p], strides=[stride_gb, stride_gt, 1],
                                           block_shape=[1, BLOCK_T, BLOCK_K])
        gram_a = _gram_tile_tma(a_desc, b, ti * BLOCK_T, tj * BLOCK_T, d, UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_K)
        gram_g = _gram_tile_tma(g_desc, b, ti * BLOCK_T, tj * BLOCK_T, p, UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_K)
    else:
        # The Gram tiles of a over d and of g over p.
        if IMPLICIT:
            gram_a = _patch_gram_tile(a_ptr + b64 * stride_ab, offs_i, mask_i, offs_j, mask_j, d, XC, XD, XH, XW,
                                      OH, OW, KD, KH, KW, conv_sd, conv_sh, conv_sw, conv_pd, conv_ph, conv_pw,
                                      conv_dd, conv_dh, conv_dw, stride_xc, stride_xd, stride_xh, stride_xw,
                                      PADDED, DEPTH, WIDE, CHANNELS_FASTEST, UPCAST, DOT_PRECISION, BLOCK_T, BLOCK_K)
        else:
            gram_a = _gram_tile(a_ptr + b64 * stride_ab, offs_i.to(tl.int64) * stride_at, mask_i,
                                offs_j.to(tl.int64) * stride_at, mask_j, d, stride_ad, UPCAST, DOT_PRECISION,
                                BLOCK_T, BLOCK_K)
        gram_g = _gram_tile(g_base, row_i, mask_i, offs_j.to(tl.int64) * stride_gt, mask_j, p, stride_gp, UPCAST,
                            DOT_PRECISION, BLOCK_T, BLOCK_K)

    w = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)
    # An off-diagonal pair (i, j) also stands for (j, i).
    w = tl.where(diagonal, w, 2.0 * w)
    tl.atomic_add(weight_sq_ptr + b, w, sem="relaxed")
    if WITH_BIAS:
        if diagonal:
            # A pass of its own over the rows of tile i just streamed (in L2), not a sum of the tiles
            # the Gram loop feeds to tl.dot: Triton 3.7 gives a tile that feeds both an asynchronous sm_90 MMA and a
            # register reduction one shared-memory slot too few, so the pipeline's next loads
            # overwrite it while the MMA still reads it (triton-lang/triton#6691: the H200's
            # large-T deviations; the compile test checks every MMA operand's slots). Last, so that
            # the two Gram tiles are no longer held in registers.
            _add_column_sums(g_base, ti * BLOCK_T, T, stride_gt, p, stride_gp, colsum_ptr + b64 * p, BLOCK_T, BLOCK_K,
                             COLUMNS_IN_THREADS)
    elif diagonal and ti == 0:
        # No bias: colsum_ptr is the [B] bias norms, left unfilled by the wrapper (a zero fill is a
        # launch); one program a sample stores its zero.
        tl.store(colsum_ptr + b64, 0.0)


def tile_pair_grid(op: str, B: int, T: int, instead: str):
    """The launch grid of a kernel with one program per (sample, upper-triangular BLOCK_T tile
    pair); more than 2^31 programs is refused with an error naming ``op`` and what to use
    ``instead``."""
    def grid(meta):
        n = triton.cdiv(T, meta["BLOCK_T"])
        programs = B * (n * (n + 1) // 2)
        if programs >= 2**31:
            raise ValueError(f"divebatch.{op}: B={B}, T={T} needs {programs} tile-pair programs "
                             f"(> 2^31); use {instead} for such long sequences")
        return (programs,)

    return grid


def _wide_config(block_i, block_k, warps, stages, chunk=32, per_sm=1) -> triton.Config:
    return triton.Config({"BLOCK_I": block_i, "BLOCK_K": block_k, "CHUNK_J": chunk, "PROGRAMS_PER_SM": per_sm},
                         num_warps=warps, num_stages=stages)


#: The wide kernel's configs (BLOCK_I rows against 2 * BLOCK_I columns), as ``_TABLE``: off sm_90
#: 64 x 128 tiles (mma.sync holds its operands in registers), on sm_90 also the 128 x 256 ones
#: the kernel is for, one program per SM (their pipeline buffers leave room for no second).
_WIDE_F32_CONFIGS = [_wide_config(64, 16, 8, 3, per_sm=2)]
_WIDE_TABLE = {
    ("16", "unit"): [_wide_config(64, 64, 4, 3, per_sm=2)],
    ("16", "strided"): [_wide_config(64, 32, 8, 3, per_sm=2)],
    ("32", "unit"): _WIDE_F32_CONFIGS,
    ("32", "strided"): _WIDE_F32_CONFIGS,
}
_WIDE_SM90_TABLE = {("16", "unit"): [_wide_config(128, 32, 8, 4), _wide_config(128, 32, 8, 3)]}
_WIDE_CONFIGS, _WIDE_PRUNE = config_table(
    _wide_config(16, 16, 4, 1, chunk=16),  # interpreter: two reduction chunks per tile
    _WIDE_TABLE,
    tensor_args=("a_ptr", "g_ptr"),
    inner_strides=("stride_ad", "stride_gp"),
    sm90_table=_WIDE_SM90_TABLE,
)

#: Shortest sequence the wide kernel is meant for (the GPU bench times it from there): below four
#: 128-row blocks its 256-column tiles lie mostly past T or under the diagonal.
WIDE_MIN_T = 512


def wide_ghost_wanted(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether ``ghost_norm`` runs ``_ghost_norm_wide_kernel``: where ``DIVEBATCH_TRITON_GHOST_WIDE=1``
    (read at each call) and ``a``, ``g`` share a dtype (the kernel reads both through one
    pointer). Opt-in until a GPU has timed it against the square tiles (``bench/gpu/verdicts.py``
    says whether to take it by default on sm_90 from ``WIDE_MIN_T``); it is exact under the
    interpreter and compiles for sm_80 / sm_90 without spills."""
    forced = os.environ.get("DIVEBATCH_TRITON_GHOST_WIDE", "0").strip()
    if forced not in ("0", "1"):
        raise ValueError(f"DIVEBATCH_TRITON_GHOST_WIDE={forced!r} is not 0 or 1; unset it or pick one of those")
    return forced == "1" and a.dtype == g.dtype


@triton.autotune(configs=_WIDE_CONFIGS, key=["T_TUNE", "B_TUNE", "d", "p", "WITH_BIAS", "stride_ad", "stride_gp"],
                 prune_configs_by=_WIDE_PRUNE, reset_to_zero=["weight_sq_ptr", "colsum_ptr"], **AUTOTUNE_KWARGS)
@triton.jit
def _ghost_norm_wide_kernel(
    # inputs of one dtype: a [B, T, d], g [B, T, p]
    a_ptr, g_ptr,
    # outputs as _ghost_norm_kernel's; scratch: float32, 2 BLOCK_I x 2 BLOCK_I per program, never
    # read before the same program wrote it
    weight_sq_ptr, colsum_ptr, scratch_ptr,
    B, T, d, p,
    stride_ab, stride_at, stride_ad,
    stride_gb, stride_gt, stride_gp,
    # autotune key only (tuning_size of T and B): not read by the kernel
    T_TUNE, B_TUNE,
    WITH_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_J: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # (read by the wrapper's grid only)
    COLUMNS_IN_THREADS: tl.constexpr = False,
):
    """``_ghost_norm_kernel`` on BLOCK_I x 2 BLOCK_I tiles: 85 flops per operand byte at 128 x 256
    against the square tiles' 64, for the operand bandwidth from L2 that the square tiles seem to
    run against on an H200 (docs/kernels.md). The two float32 Grams of such a tile do not both fit
    in registers (128 a thread each at 8 warps), so each, once finished, is stored to this
    program's slot of ``scratch`` (2 x 128 KiB, in L2, against ~16 MB of operands a tile pair's
    dots read at seq-large), and their weighted product is summed from there in CHUNK_J-column
    slices. The grid is persistent (about one program per SM, each looping over units) so the
    scratch is a slot per program, not per unit.

    One loop over (unit, which Gram) around one software-pipelined loop over that Gram's BLOCK_K
    chunks, of ``a`` or of ``g`` through one pointer: a single MMA loop in the kernel. (The two
    Grams as two loops in sequence made ptxas keep both 128-register accumulators, 330 spill
    stores on sm_90; one flat loop over both with an in-loop reset was not pipelined.) Rows past T
    are read as row T - 1, so the loads need no per-element masks (which do not fit in registers
    beside the accumulator either); such rows' and columns' Gram entries are weighed 0.

    Units: the upper triangle of 2 BLOCK_I x 2 BLOCK_I super-tile pairs (si <= sj, ``_tile_pair``),
    each in two halves: row block ti = 2 si + h (BLOCK_I rows) against the columns of super-tile
    sj. Every entry (s, t) of the upper triangle lies in exactly one unit; it weighs 2 above the
    diagonal (it stands for its mirror too), 1 on it and 0 below (the lower half of a diagonal
    super-tile pair holds BLOCK_I x BLOCK_I entries under the diagonal: computed, weighed 0).
    """
    BLOCK_J: tl.constexpr = 2 * BLOCK_I
    n_super = tl.cdiv(T, BLOCK_J)
    n_pairs = n_super * (n_super + 1) // 2
    units = B * n_pairs * 2
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    slot = scratch_ptr + pid.to(tl.int64) * (2 * BLOCK_I * BLOCK_J)
    rows = tl.arange(0, BLOCK_I)
    cols = tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    chunk_cols = tl.arange(0, CHUNK_J)
    last = T - 1
    n_a = tl.cdiv(d, BLOCK_K)
    n_g = tl.cdiv(p, BLOCK_K)
    for step in range(0, tl.cdiv(units - pid, n_programs) * 2):
        unit = pid + (step // 2) * n_programs
        in_a = step % 2 == 0
        b64 = (unit // (2 * n_pairs)).to(tl.int64)
        si, sj = _tile_pair((unit // 2) % n_pairs, n_super)
        first_i = (2 * si + unit % 2) * BLOCK_I
        base = tl.where(in_a, a_ptr + b64 * stride_ab, g_ptr + b64 * stride_gb)
        stride_t = tl.where(in_a, stride_at, stride_gt).to(tl.int64)
        stride_k = tl.where(in_a, stride_ad, stride_gp).to(tl.int64)
        K = tl.where(in_a, d, p)
        row_i = tl.minimum(first_i + rows, last).to(tl.int64) * stride_t
        row_j = tl.minimum(sj * BLOCK_J + cols, last).to(tl.int64) * stride_t
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for kc in range(0, tl.where(in_a, n_a, n_g)):
            kk = kc * BLOCK_K + offs_k
            k_mask = kk < K
            col = kk.to(tl.int64) * stride_k
            x_i = tl.load(base + row_i[:, None] + col[None, :], mask=k_mask[None, :], other=0.0)
            x_jt = tl.load(base + col[:, None] + row_j[None, :], mask=k_mask[:, None], other=0.0)
            if UPCAST:
                x_i = x_i.to(tl.float32)
                x_jt = x_jt.to(tl.float32)
            acc = tl.dot(x_i, x_jt, acc, input_precision=DOT_PRECISION)
        # The Gram of a to the slot's first half, of g to its second.
        tl.store(slot + (tl.where(in_a, 0, BLOCK_I) + rows)[:, None] * BLOCK_J + cols[None, :], acc)
        if not in_a:  # both Grams stored: the unit's weighted sum
            tl.debug_barrier()  # (bar.sync: the CTA's stores above are seen by its loads below)
            offs_i = (first_i + rows)[:, None]
            w = tl.zeros((BLOCK_I, CHUNK_J), dtype=tl.float32)
            for c0 in tl.static_range(0, BLOCK_J, CHUNK_J):
                at = rows[:, None] * BLOCK_J + (c0 + chunk_cols)[None, :]
                product = tl.load(slot + at) * tl.load(slot + BLOCK_I * BLOCK_J + at)
                t = (sj * BLOCK_J + c0 + chunk_cols)[None, :]
                # (a row past T lies below every column < T; a column past T weighs 0)
                w += tl.where((offs_i < t) & (t < T), 2.0 * product,
                              tl.where((offs_i == t) & (t < T), product, 0.0))
            tl.atomic_add(weight_sq_ptr + b64, tl.sum(tl.sum(w, axis=1), axis=0), sem="relaxed")
        tl.debug_barrier()  # (the slot's loads and stores done before the next step's stores)

    if WITH_BIAS:
        # Column sums of g, each row block once (in its unit on the diagonal), after the Grams'
        # loop, which a nested loop would keep Triton from pipelining.
        for unit in range(pid, units, n_programs):
            si, sj = _tile_pair((unit // 2) % n_pairs, n_super)
            first_i = (2 * si + unit % 2) * BLOCK_I
            if (sj == si) & (first_i < T):
                b64 = (unit // (2 * n_pairs)).to(tl.int64)
                _add_column_sums(g_ptr + b64 * stride_gb, first_i, T, stride_gt, p, stride_gp, colsum_ptr + b64 * p,
                                 BLOCK_I, BLOCK_K, COLUMNS_IN_THREADS)
    elif pid == 0:
        # No bias: colsum_ptr is the [B] bias norms, unfilled by the wrapper.
        for b0 in range(0, B, BLOCK_K):
            tl.store(colsum_ptr + b0 + offs_k, tl.zeros((BLOCK_K,), dtype=tl.float32), mask=b0 + offs_k < B)


def _launch_wide(a, g, weight_sq, colsum, B: int, T: int, d: int, p: int, with_bias: bool, upcast: bool,
                 precision: str, programs: int | None = None) -> None:
    """``_ghost_norm_wide_kernel``'s launch: a persistent grid of ``PROGRAMS_PER_SM`` programs per
    SM (three off CUDA, under the interpreter, so the tests see several slots), or ``programs``."""
    resident = sm_count(g.device) if g.is_cuda else 3

    def grid(meta):
        n = triton.cdiv(T, 2 * meta["BLOCK_I"])
        wanted = programs if programs is not None else resident * meta["PROGRAMS_PER_SM"]
        return (max(1, min(B * n * (n + 1), wanted)),)

    # A slot per program whichever config the autotuner picks (the most any config's grid needs).
    scratch = torch.empty(max(grid(c.kwargs)[0] * 4 * c.kwargs["BLOCK_I"] ** 2
                              for c in _ghost_norm_wide_kernel.configs), dtype=torch.float32, device=g.device)
    _ghost_norm_wide_kernel[grid](
        a, g, weight_sq, colsum, scratch,
        B, T, d, p,
        a.stride(0), a.stride(1), a.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        tuning_size(T), tuning_size(B),
        WITH_BIAS=bool(with_bias), UPCAST=upcast, DOT_PRECISION=precision, COLUMNS_IN_THREADS=columns_in_threads(g),
    )


def _launch(a, g, B: int, T: int, d: int, p: int, with_bias: bool, patches: ConvPatches | None = None):
    """``(weight_sq [B], bias_sq [B])`` of one launch; ``a`` is the patches' storage: ``a`` itself,
    or with ``patches`` a convolution's input read in place (``launch_args``)."""
    a_strides, convolution, implicit = launch_args(a, patches)
    device = g.device
    # One zero fill per call (on a GPU a small layer's norms cost launches, not arithmetic): with a
    # bias the weight's sums share it with the column sums (which are not returned); without one the
    # zero bias norms are stored by the kernel (``colsum_ptr`` is then those [B]).
    launch = B > 0 and T > 0 and d > 0 and p > 0
    if with_bias:
        zeroed = torch.zeros(B * p + B, dtype=torch.float32, device=device)
        colsum, weight_sq = zeroed[:B * p].view(B, p), zeroed[B * p:]
    else:
        weight_sq = torch.zeros(B, dtype=torch.float32, device=device)
        bias_sq = colsum = (_common.unfilled if launch else torch.zeros)((B,), dtype=torch.float32, device=device)
    if B > 0 and T > 0 and d == 0 and p > 0 and with_bias:
        # No weight (an empty Gram), only a bias: one small reduction, no launch on an empty tensor.
        colsum = g.sum(dim=1, dtype=torch.float32)
    elif launch:
        # The two Grams are separate dots (a with a, g with g), so a and g may differ in dtype.
        upcast, precision = dot_options(a.dtype)
        if g.dtype == torch.float32:
            precision = dot_options(g.dtype)[1]

        if patches is None and wide_ghost_wanted(a, g):
            _launch_wide(a, g, weight_sq, colsum, B, T, d, p, with_bias, upcast, precision)
        else:
            use_tma = patches is None and tma_ok(a, g)
            with tma_workspace(device, use_tma):
                _ghost_norm_kernel[tile_pair_grid("ghost_norm", B, T, "instantiate_norm")](
                    a, g, weight_sq, colsum,
                    B, T, d, p,
                    *a_strides,
                    g.stride(0), g.stride(1), g.stride(2),
                    *convolution,
                    tuning_size(T), tuning_size(B),
                    WITH_BIAS=bool(with_bias), UPCAST=upcast, DOT_PRECISION=precision, TMA_OK=use_tma,
                    COLUMNS_IN_THREADS=columns_in_threads(g),
                    **implicit,
                )
    if with_bias:
        bias_sq = colsum.square().sum(dim=1)
    return weight_sq, bias_sq


def ghost_norm_triton(a: torch.Tensor, g: torch.Tensor, with_bias: bool):
    """``(weight_sq [B], bias_sq [B])`` float32; see the module docstring. No copies of a or g."""
    _, B, T, d, p = check_a_g("ghost_norm", a, g)
    return _launch(a, g, B, T, d, p, with_bias)


def conv_ghost_norm_triton(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation, *,
                           _wide_override=None, _channels_override=None) -> torch.Tensor:
    """Per-sample squared weight-gradient norms ``[B]`` (float32) of a one-group convolution of
    ``x [B, C, *in]`` (1-3 spatial dims, zero ``padding``) with output grad ``g [B, O, *out]``:
    ``ghost_norm`` of its patches, read from ``x`` in place (see ``divebatch.reference.conv_ghost_norm``),
    so no unfolded copy is written. ``_wide_override`` and ``_channels_override`` (tests only) force
    int64 in-sample offsets and the channel-fastest column order."""
    c = conv_patches_of("conv_ghost_norm", x, g, kernel_size, stride, padding, dilation, _wide_override,
                        _channels_override)
    return _launch(c.x, c.g_rows, c.B, c.T, c.d, c.O, False, c)[0]
