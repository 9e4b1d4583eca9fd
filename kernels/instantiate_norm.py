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

Four knobs the autotuner chooses between (configs), for speed, not results:

* ``GROUP_P``: programs are numbered in groups of GROUP_P p-tiles that walk the d-tiles together
  (the grouped order of Triton's matmul tutorial), so the programs resident at one time share
  their g and a columns in L2 instead of one p-tile meeting every d-tile;
* ``SUM_IN_OUTPUT``: the running sum over samples lives in the (zeroed) output tile, to which each
  sample's tile is added with relaxed float32 atomics, instead of a second BLOCK_P x BLOCK_D
  register accumulator. That frees a quarter to a half of the registers (the two accumulators
  held the 8-warp 128 x 128 configs at 254-255) for larger tiles or a deeper T chunk, at the
  cost of one atomic pass over the tile per sample (in L2: the tile is the program's own);
* ``FLATTEN``: the loop over samples and the T loop inside it become one loop (``tl.range(...,
  flatten=True)``), so the software pipeline is not drained and refilled at every sample: the
  next sample's first chunks load while this sample's tile is reduced (the epilogue of the
  flattened loop; 219 -> 184 registers on sm_90 at 128 x 128, which makes room for the
  128 x 256 three-stage config);
* ``USE_TMA`` (sm_90 configs): the g and a chunks are loaded by Hopper's tensor memory
  accelerator from device-side descriptors (``tl.make_tensor_descriptor``: bulk copies into
  shared memory, no per-element address in registers; 253 -> 224 registers at 128 x 256 x 32), where
  ``tma_ok`` says the inputs allow it (``TMA_OK``, in the autotune key); otherwise the same config
  loads by pointers. The descriptors need a workspace allocator, set around the launch when the
  caller has set none (``triton.set_allocator``).
Bias: the programs of the first d-tile (D = 0) also sum their g columns over T, in a loop nest of
their own after the samples' (see the comment there: on sm_90 a tile feeding both would be raced); each
p-tile adds ``||colsum_P||^2`` to ``bias_sq[b]`` (the p-tiles partition p, so the parts add up
exactly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (AUTOTUNE_KWARGS, INTERPRET, check_a_g, config_table, dot_options, sm_count, tma_ok,
                      tma_workspace, tuning_size)
from ._patches import ConvPatches, conv_patches_of, launch_args, patch_chunk, patch_columns


def _config(block_p, block_d, block_t, warps, stages, group_p=1, sum_in_output=False, flatten=False,
            tma=False) -> triton.Config:
    return triton.Config({"BLOCK_P": block_p, "BLOCK_D": block_d, "BLOCK_T": block_t, "GROUP_P": group_p,
                          "SUM_IN_OUTPUT": sum_in_output, "FLATTEN": flatten, "USE_TMA": tma},
                         num_warps=warps, num_stages=stages)


#: The GPU configs by (operand width, layout), and those for sm_90 and above (see ``config_table``).
_TABLE = {
    ("16", "unit"): [
        _config(128, 128, 32, 8, 3),
        _config(128, 128, 32, 8, 4),
        _config(128, 64, 64, 8, 3),
        _config(64, 64, 32, 4, 4),
        # The running sum in the output frees ~27-39 registers (219 -> 180 on sm_90), room for a
        # 64-deep T chunk (246-255 registers, no spill on sm_80 or sm_90). Not timed yet.
        _config(128, 128, 32, 8, 3, group_p=8, sum_in_output=True),
        _config(128, 128, 64, 8, 3, group_p=8, sum_in_output=True),
        _config(128, 128, 64, 8, 4, group_p=8, sum_in_output=True),
        # One flattened loop over (sample, T chunk): no pipeline restart per sample. Not timed yet.
        _config(128, 128, 32, 8, 3, flatten=True),
        _config(128, 128, 32, 8, 3, group_p=8, sum_in_output=True, flatten=True),
    ],
    ("16", "strided"): [
        _config(128, 64, 32, 8, 3),
        _config(64, 128, 32, 8, 3),
        _config(64, 64, 32, 4, 4),
    ],
    ("32", "unit"): [
        _config(128, 64, 32, 8, 3),
        _config(64, 64, 32, 8, 3),
        _config(64, 64, 16, 4, 4),
    ],
    ("32", "strided"): [
        _config(64, 64, 16, 8, 3),
        _config(64, 32, 16, 4, 3),
    ],
}
_SM90_TABLE = {
    # A 128 x 256 tile reads a third fewer bytes per flop than 128 x 128 (L2 -> SM traffic,
    # which the H200 timings suggest bounds both dot kernels); it fits Hopper's registers only
    # with the running sum in the output and two stages (255 registers; spills on sm_80), or three
    # with the flattened loop (253 registers, 200 KiB of shared memory); 256 x 128 fits a 64-deep
    # T chunk that way (255 registers, 208 KiB; 128 x 256 x 64 needs 272 KiB, more than the 227 an
    # H100/H200 block may have: the flattened loop's epilogue stages the tile in shared memory).
    ("16", "unit"): [_config(128, 256, 32, 8, 2, group_p=8, sum_in_output=True),
                     _config(128, 256, 32, 8, 3, group_p=8, sum_in_output=True, flatten=True),
                     _config(256, 128, 64, 8, 3, group_p=8, sum_in_output=True, flatten=True),
                     # The same tiles loaded by TMA (where the inputs allow: see tma_ok in _common).
                     _config(128, 256, 32, 8, 3, group_p=8, sum_in_output=True, flatten=True, tma=True),
                     _config(256, 128, 64, 8, 3, group_p=8, sum_in_output=True, flatten=True, tma=True),
                     _config(128, 128, 64, 8, 4, group_p=8, sum_in_output=True, flatten=True, tma=True)],
}
#: Configs added after the only GPU run (an H200, 2026-12-04): tried only with
#: ``DIVEBATCH_TRITON_UNVERIFIED_CONFIGS=1`` (see ``unverified_configs_enabled``) until a GPU run's
#: config sweep (tests/test_triton_kernels.py) and timings clear them; then empty this.
_UNVERIFIED = (*_TABLE[("16", "unit")][4:], *_SM90_TABLE[("16", "unit")])
_CONFIGS, _TABLE_PRUNE = config_table(
    _config(32, 32, 16, 4, 1, group_p=2),  # interpreter (GROUP_P 2: the CPU tests cover the grouped order)
    _TABLE,
    tensor_args=("a_ptr", "g_ptr"),
    inner_strides=("stride_ad", "stride_gp"),
    sm90_table=_SM90_TABLE,
    unverified=_UNVERIFIED,
)
#: The config of a convolution's float32 patches read in place (IMPLICIT): the float32 lists'
#: spilled 8-40 bytes on sm_80 in some of the builds (2-d / 3-d, weight / channel-fastest column
#: order) with triton 3.6 or 3.7; this two-stage one fits all of them with both (196-252 registers).
_IMPLICIT_F32_CONFIG = _config(64, 64, 16, 8, 2)
#: Configs outside the tables (the GPU config sweeps run them too).
_EXTRA_CONFIGS = (_IMPLICIT_F32_CONFIG,)
if _TABLE_PRUNE:
    _CONFIGS = [*_CONFIGS, *_EXTRA_CONFIGS]


def _prune(configs, named_args, **kwargs):
    """``config_table``'s prune, and for a convolution's patches read in place (``IMPLICIT``, whose
    address and mask arithmetic takes 15-40 registers more than the loads it replaces) only the
    first config of the strided list where the others spill: a 3-d convolution or int64 offsets
    (in the T loop with triton 3.6, the GPU image's). The 16-bit 2-d int32 builds of all three fit
    in both versions (tests/test_triton_compile.py). Float32 patches take ``_IMPLICIT_F32_CONFIG``
    alone."""
    kept = _TABLE_PRUNE["early_config_prune"](configs, named_args, **kwargs)
    if not kwargs.get("IMPLICIT"):
        return kept
    if torch.float32 in (named_args["a_ptr"].dtype, named_args["g_ptr"].dtype):
        return [_IMPLICIT_F32_CONFIG]
    return kept[:1] if kwargs.get("DEPTH") or kwargs.get("WIDE") else kept


_PRUNE = {"early_config_prune": _prune} if _TABLE_PRUNE else {}
#: Tile size (p x d entries) ``_n_split`` plans with: the 128 x 128 tile of the first 16-bit config.
_SPLIT_TILE = 128 * 128


@triton.autotune(configs=_CONFIGS, key=["T_TUNE", "B_TUNE", "d", "p", "WITH_BIAS", "ATOMIC_WGRAD", "stride_ad", "stride_gp",
                                        "TMA_OK", "IMPLICIT", "PADDED", "DEPTH", "WIDE", "CHANNELS_FASTEST"],
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
    # IMPLICIT only (else unused): a_ptr is a convolution's input x [B, XC, XD, XH, XW] (batch stride
    # stride_ab), its output is OD x OH x OW = T positions, and a_b[t, k] is the entry of the
    # zero-padded patch at t under kernel offset k = ((c KD + kd) KH + kh) KW + kw (d = XC KD KH KW;
    # CHANNELS_FASTEST: k = ((kd KH + kh) KW + kw) XC + c, stored at its weight-order column)
    XC, XD, XH, XW, OH, OW, KD, KH, KW,
    conv_sd, conv_sh, conv_sw, conv_pd, conv_ph, conv_pw, conv_dd, conv_dh, conv_dw,
    stride_xc, stride_xd, stride_xh, stride_xw,
    # autotune key only (tuning_size of T and B): not read by the kernel
    T_TUNE, B_TUNE,
    # meta
    WITH_BIAS: tl.constexpr, ATOMIC_WGRAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    GROUP_P: tl.constexpr, SUM_IN_OUTPUT: tl.constexpr, FLATTEN: tl.constexpr,
    USE_TMA: tl.constexpr, TMA_OK: tl.constexpr,
    IMPLICIT: tl.constexpr = False, PADDED: tl.constexpr = False, DEPTH: tl.constexpr = False,
    WIDE: tl.constexpr = True, CHANNELS_FASTEST: tl.constexpr = False,
):
    pid = tl.program_id(0)
    n_d_tiles = tl.cdiv(d, BLOCK_D)
    n_p_tiles = tl.cdiv(p, BLOCK_P)
    # Grouped order: the p-tile changes fastest within a group of GROUP_P p-tiles (the last group
    # may be smaller), the d-tile once per group pass; GROUP_P = 1 is plain row-major order.
    per_group = GROUP_P * n_d_tiles
    first_p = (pid // per_group) * GROUP_P
    group_size = tl.minimum(n_p_tiles - first_p, GROUP_P)
    pid_p = first_p + (pid % per_group) % group_size
    pid_d = (pid % per_group) // group_size
    split = tl.program_id(1)
    n_split = tl.num_programs(1)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < p
    mask_d = offs_d < d
    col_g = offs_p.to(tl.int64) * stride_gp  # [BLOCK_P]
    if IMPLICIT:
        # The d-tile's kernel offsets, once per program: each column's channel and window position;
        # a chunk's positions add their own part (patch_chunk).
        col_a, win_d, win_h, win_w = patch_columns(offs_d, XC, KD, KH, KW, conv_dd, conv_dh, conv_dw, stride_xc,
                                                   stride_xd, stride_xh, stride_xw, DEPTH, WIDE,
                                                   CHANNELS_FASTEST)  # [BLOCK_D]
    else:
        col_a = offs_d.to(tl.int64) * stride_ad  # [BLOCK_D]
    offs_t = tl.arange(0, BLOCK_T)
    first_d_tile = pid_d == 0

    if IMPLICIT and CHANNELS_FASTEST:
        # (column (kernel offset o, channel c) of the loop is the weight's column c * (d / XC) + o)
        out_col = (offs_d % XC) * (d // XC) + offs_d // XC
    else:
        out_col = offs_d
    out = wgrad_ptr + offs_p.to(tl.int64)[:, None] * d + out_col[None, :]
    out_mask = mask_p[:, None] & mask_d[None, :]
    if not SUM_IN_OUTPUT:
        total = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    elif not ATOMIC_WGRAD:
        # The output tile is this program's alone, and the wrapper leaves it unfilled: zeroed here,
        # the barrier ordering these stores before every thread's atomics into it below.
        tl.store(out, tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32), mask=out_mask)
        tl.debug_barrier()
    if not WITH_BIAS and pid == 0:
        # No bias: the [B] bias norms come unfilled (a zero fill is a launch); the first tile's
        # program of each split stores its samples' zeros (here, before the loops: nothing of it
        # stays live through them).
        for b in range(split, B, n_split):
            tl.store(bias_sq_ptr + b, 0.0)
    if USE_TMA and TMA_OK:
        # Hopper's tensor memory accelerator: one descriptor per operand, each chunk one bulk copy
        # into shared memory (no per-element addresses in registers); rows past T (or columns past
        # p, d) arrive as zeros, so the masks above are not needed.
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[B, T, p], strides=[stride_gb, stride_gt, 1],
                                           block_shape=[1, BLOCK_T, BLOCK_P])
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[B, T, d], strides=[stride_ab, stride_at, 1],
                                           block_shape=[1, BLOCK_T, BLOCK_D])
    for b in tl.range(split, B, n_split, flatten=FLATTEN):
        b64 = tl.cast(b, tl.int64)  # (a Python int under the interpreter, an i32 on GPU)
        a_base = a_ptr + b64 * stride_ab
        g_base = g_ptr + b64 * stride_gb
        tile = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            if USE_TMA and TMA_OK:
                g_t = tl.trans(g_desc.load([b, t0, pid_p * BLOCK_P]).reshape(BLOCK_T, BLOCK_P))
                x = a_desc.load([b, t0, pid_d * BLOCK_D]).reshape(BLOCK_T, BLOCK_D)
            else:
                tt = t0 + offs_t
                t_mask = tt < T
                tt64 = tt.to(tl.int64)
                # g chunk loaded transposed, [BLOCK_P, BLOCK_T]; masked entries are 0 and add nothing.
                g_t = tl.load(g_base + col_g[:, None] + (tt64 * stride_gt)[None, :],
                              mask=mask_p[:, None] & t_mask[None, :], other=0.0)
                if IMPLICIT:
                    x = patch_chunk(a_base, tt, t_mask, mask_d, col_a, win_d, win_h, win_w, XD, XH, XW, OH, OW,
                                     conv_sd, conv_sh, conv_sw, conv_pd, conv_ph, conv_pw,
                                     stride_xd, stride_xh, stride_xw, PADDED, DEPTH, WIDE)
                else:
                    x = tl.load(a_base + (tt64 * stride_at)[:, None] + col_a[None, :],
                                mask=t_mask[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                g_t = g_t.to(tl.float32)
                x = x.to(tl.float32)
            tile = tl.dot(g_t, x, tile, input_precision=DOT_PRECISION)
        tl.atomic_add(weight_sq_ptr + b, tl.sum(tl.sum(tile * tile, axis=1), axis=0), sem="relaxed")
        if SUM_IN_OUTPUT:
            # Only the sum is read, after the kernel: no ordering needed between these atomics.
            tl.atomic_add(out, tile, mask=out_mask, sem="relaxed")
        else:
            total += tile
    if WITH_BIAS:
        if first_d_tile:
            # Bias: a loop nest of its own over the g columns streamed above (in L2), not a sum of
            # the tiles fed to tl.dot: Triton 3.7 gives a tile that feeds both an asynchronous sm_90
            # MMA and a register reduction one shared-memory slot too few, so the pipeline's next
            # loads overwrite it while the MMA still reads it (triton-lang/triton#6691; the compile
            # test checks every MMA operand's slots). Outside the samples' loop, which stays a plain
            # nest the compiler can flatten (FLATTEN). The chunks are added element by element into
            # a tile of their shape and summed over T once a sample: a sum over a chunk's rows
            # crosses the warps (shuffles, shared memory, barriers) at every chunk. Two chunks a
            # step, both loads issued before either is added: nothing else hides their latency.
            for b in range(split, B, n_split):
                g_base = g_ptr + tl.cast(b, tl.int64) * stride_gb
                acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
                for t0 in range(0, T, 2 * BLOCK_T):
                    tt = t0 + offs_t
                    tt_next = tt + BLOCK_T
                    chunk = tl.load(g_base + (tt.to(tl.int64) * stride_gt)[:, None] + col_g[None, :],
                                    mask=(tt < T)[:, None] & mask_p[None, :], other=0.0)
                    chunk_next = tl.load(g_base + (tt_next.to(tl.int64) * stride_gt)[:, None] + col_g[None, :],
                                         mask=(tt_next < T)[:, None] & mask_p[None, :], other=0.0)
                    acc += chunk.to(tl.float32) + chunk_next.to(tl.float32)
                col_sum = tl.sum(acc, axis=0)
                tl.atomic_add(bias_sq_ptr + b, tl.sum(col_sum * col_sum, axis=0), sem="relaxed")

    if not SUM_IN_OUTPUT:
        if ATOMIC_WGRAD:
            tl.atomic_add(out, total, mask=out_mask, sem="relaxed")
        else:
            tl.store(out, total, mask=out_mask)


def _n_split(B: int, p: int, d: int, device: torch.device) -> int:
    """Sample splits so that the grid has about two programs per SM even for a small p x d."""
    if INTERPRET:
        return 1
    tiles = max(1, (p * d) // _SPLIT_TILE)
    return max(1, min(B, triton.cdiv(2 * sm_count(device), tiles)))


def _launch(a, g, B: int, T: int, d: int, p: int, with_bias: bool, n_split, patches: ConvPatches | None = None):
    """``(weight_sq [B], bias_sq [B], weight_grad_sum [p, d])`` of one launch; ``a`` is the patches'
    storage: ``a`` itself, or with ``patches`` a convolution's input read in place (``launch_args``)."""
    a_strides, convolution, implicit = launch_args(a, patches)
    device = g.device
    n_split = n_split if n_split is not None else _n_split(B, p, d, device)
    n_split = max(1, min(int(n_split), max(B, 1), 65535))  # grid axis 1 holds at most 65535
    launch = p > 0 and d > 0 and B > 0 and T > 0
    weight_sq = torch.zeros(B, dtype=torch.float32, device=device)
    # Zero fills only for what programs add into (on a GPU each is a launch): without a bias the
    # kernel stores the zero bias norms itself; the weight gradient, unless the split grid's
    # programs add into one tile, each program stores whole or zeroes first (SUM_IN_OUTPUT), so a
    # p x d memset (268 MB at 4096 x 16384, ~80 us of an H100) would be a pass for nothing.
    bias_sq = (torch.zeros if with_bias or not launch else _common.unfilled)((B,), dtype=torch.float32, device=device)
    wgrad = (_common.unfilled if launch and n_split == 1 else torch.zeros)((p, d), dtype=torch.float32,
                                                                          device=device)
    if launch:
        upcast, precision = dot_options(a.dtype, g.dtype)

        def grid(meta):
            return (triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(d, meta["BLOCK_D"]), n_split)

        use_tma = patches is None and tma_ok(a, g)
        with tma_workspace(device, use_tma):
            _instantiate_norm_kernel[grid](
                a, g, weight_sq, bias_sq, wgrad,
                B, T, d, p,
                *a_strides,
                g.stride(0), g.stride(1), g.stride(2),
                *convolution,
                tuning_size(T), tuning_size(B),
                WITH_BIAS=bool(with_bias), ATOMIC_WGRAD=n_split > 1, UPCAST=upcast, DOT_PRECISION=precision,
                TMA_OK=use_tma, **implicit,
            )
    elif with_bias and B > 0 and T > 0 and p > 0:  # d == 0: no weight, but the bias still has a gradient
        bias_sq = g.sum(dim=1, dtype=torch.float32).square().sum(dim=1)
    return weight_sq, bias_sq, wgrad


def instantiate_norm_triton(a: torch.Tensor, g: torch.Tensor, with_bias: bool, *, _n_split_override=None):
    """``(weight_sq [B], bias_sq [B], weight_grad_sum [p, d])`` float32; see the module docstring.

    ``_n_split_override`` (tests only) forces the number of sample splits of the grid.
    """
    _, B, T, d, p = check_a_g("instantiate_norm", a, g)
    return _launch(a, g, B, T, d, p, with_bias, _n_split_override)


def conv_instantiate_norm_triton(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation, *,
                                 _n_split_override=None, _wide_override=None, _channels_override=None):
    """``(weight_sq [B], weight_grad_sum [O, C * prod(kernel)])`` float32 of a one-group convolution
    of ``x [B, C, *in]`` (1-3 spatial dims, zero ``padding``) with output grad ``g [B, O, *out]``:
    ``instantiate_norm`` of its patches, read from ``x`` in place (implicit GEMM; see
    ``divebatch.reference.conv_instantiate_norm``), so no unfolded copy is written.

    ``_n_split_override``, ``_wide_override`` and ``_channels_override`` (tests only) force the sample
    splits of the grid, the int64 in-sample offsets and the channel-fastest column order."""
    c = conv_patches_of("conv_instantiate_norm", x, g, kernel_size, stride, padding, dilation, _wide_override,
                        _channels_override)
    weight_sq, _, grad = _launch(c.x, c.g_rows, c.B, c.T, c.d, c.O, False, _n_split_override, c)
    return weight_sq, grad
