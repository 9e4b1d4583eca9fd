"""Recurrent scans: one direction of one ``nn.RNN``/``nn.LSTM``/``nn.GRU`` layer, stepped on the GPU.

``recurrent_scan_triton`` and ``recurrent_scan_backward_triton`` are the CUDA kernels of the
``divebatch::recurrent_scan`` / ``recurrent_scan_backward`` operators: same arguments, results
and layouts as ``divebatch.reference`` (which they are tested against), so the forward's saved
activations can be fed to either backward.

Grid: one *persistent* program per BLOCK_B samples; it runs every time step itself. A step's
hidden pre-activations ``h_{t-1} W_hh^T`` (``tl.dot``, float32 accumulation) need the whole
previous state of its rows, and the program owns those rows, so the steps need no grid-wide
synchronisation: each step writes its new state to a float32 scratch (two slots, ping-pong) and
``tl.debug_barrier()`` (``bar.sync``: the CTA's global-memory writes are visible to all its threads
after it) separates the step that writes a slot from the one that reads it. The reloads use
``cache_modifier=".cg"`` (L2, not the SM's L1).

Per step, forward: for every BLOCK_H columns of the hidden state, the gates' pre-activations
(``gi`` + bias + the dot over the previous state), the cell (gates, cell state), stores of the
output, the saved activations and the next state; a projected LSTM then projects the cell
outputs of all columns (a second phase after a barrier). Backward, per step: (a projected LSTM:
the gradient of the projected state), every gate's pre-activation gradient per column tile, a
barrier, then ``dh_{t-1} = d_gates W_hh`` as one dot over all gates. Lengths mask padded steps
as in the reference (output and gate gradients 0, states carried).

Cost model: a step reads ``W_hh`` once per program (from L2) and does ``BLOCK_B x G x P`` MACs
on one SM, so the scan runs at one SM's speed per BLOCK_B samples. Against the PyTorch
reference's ~15 launches per step this wins for small and medium hidden sizes; for large H at
small B (one program) a grid-synchronised kernel spreading the columns over SMs would do
better. ``bench/gpu/bench_kernels.py`` measures both.

Dtypes: float32, float16, bfloat16 (all tensors one dtype, as in the reference); the states are
carried in float32 and the cell is computed in float32, stores round to the input dtype. (The
reference computes 16-bit inputs in their dtype, so 16-bit results differ by that rounding.)
float64 is not stepped here: the wrapper runs the reference for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import UNTIMED_KWARGS, check_device, config_table, dot_options, scans_enabled

#: mode name -> (kernel MODE id, gates per hidden unit, activations saved per hidden unit).
_MODES = {"LSTM": (0, 4, 5), "GRU": (1, 3, 4), "RNN_TANH": (2, 1, 0), "RNN_RELU": (3, 1, 0)}

# BLOCK_B >= 16: tl.dot's smallest M. One config per layout, nothing timed: a scan is latency
# bound, and timing configs would run the whole sequence once per config. Unit inner strides:
# 8 warps, BLOCK_H = 64 and two stages (the dots' loads pipelined with cp.async) halve the
# iterations a step takes against 4 warps and 32 x 32 tiles; strided inputs (64-bit addresses
# per element) spilled in their loops with those tiles, so they get the smaller ones.
_INTERPRETER = triton.Config({"BLOCK_B": 16, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
_UNIT = [triton.Config({"BLOCK_B": 16, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2)]
_STRIDED = [triton.Config({"BLOCK_B": 16, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
_TABLE = {(width, "unit"): _UNIT for width in ("16", "32")} | {(width, "strided"): _STRIDED for width in ("16", "32")}
_CONFIGS, _PRUNE = config_table(_INTERPRETER, _TABLE, tensor_args=("gi_ptr",), inner_strides=("stride_gg",))
_BACKWARD_CONFIGS, _BACKWARD_PRUNE = config_table(
    _INTERPRETER, _TABLE, tensor_args=("gout_ptr",), inner_strides=("stride_op", "stride_yp", "stride_ch", "stride_sk"))

# A scan's launch is not repeatable: it carries its state in the two scratch slots it is handed,
# slot 0 holding h0 / c0 (the backward: grad_h_n / grad_c_n) at launch and overwritten at every
# odd step. On a GPU the layouts' two configs make the autotuner time the one its prune keeps
# (it times whenever a kernel has more than one config before pruning), launching the scan ~100
# times before the real launch, which then started from the state those runs left: the wrong
# results of every first call per autotune key on the H200 (2026-12-04), which looked like "the
# direction stepping forward in time fails" only because each test ran that direction first.
# So the scans are never timed (UNTIMED_KWARGS), and should anything time them, the autotuner
# restores the slots around each timed launch (restore_value).
_FORWARD_TUNING = dict(restore_value=["h_scr", "c_scr"], **UNTIMED_KWARGS)
_BACKWARD_TUNING = dict(restore_value=["dh_scr", "dc_scr"], **UNTIMED_KWARGS)


# ------------------------------------------------------------------ device helpers
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    """float32 tanh: an odd Taylor polynomial below |x| = 1/8 (where 1 - e^{-2|x|} would cancel;
    truncation < 2e-9 relative), else (1 - e^{-2|x|}) / (1 + e^{-2|x|}) with the sign (no overflow)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    near = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    y = tl.where(ax < 0.125, near, far)
    return tl.where(x < 0, -y, y)


@triton.jit
def _accumulate(acc, x_ptr, x_row, rmask, stride_xk, K, w_ptr, stride_wk, w_col, cmask,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc += X[rows, :K] @ W[:K, cols]``: ``X[r, k]`` at ``x_ptr + x_row[r] + k stride_xk`` (written
    earlier by this program: read through L2), ``W[k, n]`` at ``w_ptr + k stride_wk + w_col[n]``.
    X is cast to W's dtype (float32 scratch into a 16-bit dot) unless UPCAST (both to float32)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        k64 = kk.to(tl.int64)
        x = tl.load(x_ptr + x_row[:, None] + (k64 * stride_xk)[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + (k64 * stride_wk)[:, None] + w_col[None, :], mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            x = x.to(w.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _load_cols(ptr, row, col, mask):
    """A [rows, cols] tile as float32 (``ptr + row[r] + col[c]``), through L2."""
    return tl.load(ptr + row[:, None] + col[None, :], mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)


@triton.jit
def _store_cols(ptr, row, col, mask, value):
    tl.store(ptr + row[:, None] + col[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_parts(gate, H, P, gi_ptr, gi_row, gi_cols, stride_gg, w_ptr, stride_w0, b_ptr, h_ptr, h_row, rmask, cols,
                cmask, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Gate ``gate``'s input and hidden pre-activations for the tile's columns, float32."""
    m2 = rmask[:, None] & cmask[None, :]
    return (_load_cols(gi_ptr, gi_row, gi_cols + gate * H * stride_gg, m2),
            _hidden_preact(gate, H, P, w_ptr, stride_w0, b_ptr, h_ptr, h_row, rmask, cols, cmask, HAS_BIAS,
                           BLOCK_B, BLOCK_H, BLOCK_K, UPCAST, DOT_PRECISION))


@triton.jit
def _store_part(ptr, row, k, H, cols, mask, kept, value):
    """Part ``k`` (columns ``k H + cols``) of a step's row of saved activations or gate gradients:
    ``value`` where the step counts, 0 on padded steps."""
    _store_cols(ptr, row, cols + k * H, mask, tl.where(kept, value, 0.0))


@triton.jit
def _program_rows(len_ptr, B, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's samples: ``(rows, rows < B, rows as int64, their lengths)`` (lengths 0 without
    ``lengths``: not read then)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    if HAS_LENGTHS:
        steps_of = tl.load(len_ptr + rows, mask=rmask, other=0)
    else:
        steps_of = tl.zeros((BLOCK_B,), dtype=tl.int64)
    return rows, rmask, rows.to(tl.int64), steps_of


@triton.jit
def _output_grad(dh_ptr, dh_row, gout_ptr, gout_row, stride_op, cols, mask):
    """The gradient of the (projected) state a step wrote: the carried ``dh`` plus ``grad_out[t]``."""
    return _load_cols(dh_ptr, dh_row, cols, mask) + _load_cols(gout_ptr, gout_row, cols.to(tl.int64) * stride_op, mask)


@triton.jit
def _hidden_preact(gate, H, P, w_ptr, stride_w0, b_ptr, h_ptr, h_row, rmask, cols, cmask,
                   HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``h_{t-1} W_hh[gate]^T + b_hh[gate]`` for the tile's columns, float32 ``[BLOCK_B, BLOCK_H]``."""
    w_rows = (gate * H + cols).to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc = _accumulate(acc, h_ptr, h_row, rmask, 1, P, w_ptr, 1, w_rows * stride_w0, cmask,
                      BLOCK_K, UPCAST, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + gate * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


# ------------------------------------------------------------------ forward
@triton.autotune(configs=_CONFIGS, key=["H", "P", "stride_gg"], prune_configs_by=_PRUNE, **_FORWARD_TUNING)
@triton.jit
def _recurrent_scan_kernel(
    # inputs: gi [B, T, G] (any strides), w_hh [G, P], b_hh [G], w_hr [P, H] (rows of unit stride;
    # flags below say which are present), lengths [B] int64
    gi_ptr, w_ptr, b_ptr, wr_ptr, len_ptr,
    # results, contiguous: out [T, B, P], cells [T, B, H], saved [T, B, S H]
    out_ptr, cells_ptr, saved_ptr,
    # float32, the carried states in two slots (step s reads slot s % 2, writes the other; slot 0
    # holds h0 / c0 at launch, slot T % 2 the final states at exit): h [2, B, P], c [2, B, H];
    # scratch for a projected LSTM's cell outputs m [B, H]
    h_scr, c_scr, m_scr,
    B, T, H, P,
    stride_gb, stride_gt, stride_gg,
    stride_w0, stride_r0,
    MODE: tl.constexpr, REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PROJECTED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    LSTM: tl.constexpr = MODE == 0
    GRU: tl.constexpr = MODE == 1
    SAVED: tl.constexpr = 5 if MODE == 0 else (4 if MODE == 1 else 1)
    rows, rmask, rows64, steps_of = _program_rows(len_ptr, B, HAS_LENGTHS, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)

    for s in range(0, T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        cur = s % 2
        keep = rmask
        if HAS_LENGTHS:
            keep = keep & (t < steps_of)
        h_row = cur * B * P + rows64 * P  # the state this step starts from
        h_next = (1 - cur) * B * P + rows64 * P
        c_row = cur * B * H + rows64 * H
        c_next = (1 - cur) * B * H + rows64 * H
        t64 = tl.cast(t, tl.int64)  # (offsets of tensors over 2^31 elements)
        gi_row = rows64 * stride_gb + t64 * stride_gt
        out_row = (t64 * B + rows64) * P
        step_row = (t64 * B + rows64) * H
        saved_row = (t64 * B + rows64) * (SAVED * H)
        for j0 in range(0, H, BLOCK_H):
            cols = j0 + offs_h
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            kept = keep[:, None] & cmask[None, :]
            gi_cols = cols.to(tl.int64) * stride_gg
            # (gate k's input and hidden pre-activations: gi[:, t, kH + cols] and h W_hh[kH + cols]^T + b_hh)
            gi0, gh0 = _gate_parts(0, H, P, gi_ptr, gi_row, gi_cols, stride_gg, w_ptr, stride_w0, b_ptr, h_scr, h_row,
                                   rmask, cols, cmask, HAS_BIAS, BLOCK_B, BLOCK_H, BLOCK_K, UPCAST, DOT_PRECISION)
            if LSTM or GRU:
                gi1, gh1 = _gate_parts(1, H, P, gi_ptr, gi_row, gi_cols, stride_gg, w_ptr, stride_w0, b_ptr, h_scr,
                                       h_row, rmask, cols, cmask, HAS_BIAS, BLOCK_B, BLOCK_H, BLOCK_K, UPCAST,
                                       DOT_PRECISION)
                gi2, gh2 = _gate_parts(2, H, P, gi_ptr, gi_row, gi_cols, stride_gg, w_ptr, stride_w0, b_ptr, h_scr,
                                       h_row, rmask, cols, cmask, HAS_BIAS, BLOCK_B, BLOCK_H, BLOCK_K, UPCAST,
                                       DOT_PRECISION)
            if LSTM:
                gi3, gh3 = _gate_parts(3, H, P, gi_ptr, gi_row, gi_cols, stride_gg, w_ptr, stride_w0, b_ptr, h_scr,
                                       h_row, rmask, cols, cmask, HAS_BIAS, BLOCK_B, BLOCK_H, BLOCK_K, UPCAST,
                                       DOT_PRECISION)
                i, f = _sigmoid(gi0 + gh0), _sigmoid(gi1 + gh1)
                g, o = _tanh(gi2 + gh2), _sigmoid(gi3 + gh3)
                c_prev = _load_cols(c_scr, c_row, cols, m2)
                c_new = f * c_prev + i * g
                tanh_c = _tanh(c_new)
                h_new = o * tanh_c
                c_carried = tl.where(kept, c_new, c_prev)
                _store_cols(c_scr, c_next, cols, m2, c_carried)
                _store_cols(cells_ptr, step_row, cols, m2, c_carried)
                _store_part(saved_ptr, saved_row, 0, H, cols, m2, kept, i)
                _store_part(saved_ptr, saved_row, 1, H, cols, m2, kept, f)
                _store_part(saved_ptr, saved_row, 2, H, cols, m2, kept, g)
                _store_part(saved_ptr, saved_row, 3, H, cols, m2, kept, o)
                _store_part(saved_ptr, saved_row, 4, H, cols, m2, kept, tanh_c)
            elif GRU:
                r, z = _sigmoid(gi0 + gh0), _sigmoid(gi1 + gh1)
                n = _tanh(gi2 + r * gh2)
                h_new = (1.0 - z) * n + z * _load_cols(h_scr, h_row, cols, m2)
                _store_part(saved_ptr, saved_row, 0, H, cols, m2, kept, r)
                _store_part(saved_ptr, saved_row, 1, H, cols, m2, kept, z)
                _store_part(saved_ptr, saved_row, 2, H, cols, m2, kept, n)
                _store_part(saved_ptr, saved_row, 3, H, cols, m2, kept, gh2)
            elif MODE == 2:
                h_new = _tanh(gi0 + gh0)
            else:
                h_new = tl.maximum(gi0 + gh0, 0.0)
            if PROJECTED:
                _store_cols(m_scr, rows64 * H, cols, m2, h_new)
            else:
                _store_cols(out_ptr, out_row, cols, m2, tl.where(kept, h_new, 0.0))
                _store_cols(h_scr, h_next, cols, m2, tl.where(kept, h_new, _load_cols(h_scr, h_row, cols, m2)))
        if PROJECTED:  # h_t = W_hr (o * tanh c_t): needs every column's cell output first
            tl.debug_barrier()
            for j0 in range(0, P, BLOCK_H):
                cols = j0 + offs_h
                cmask = cols < P
                m2 = rmask[:, None] & cmask[None, :]
                kept = keep[:, None] & cmask[None, :]
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc = _accumulate(acc, m_scr, rows64 * H, rmask, 1, H, wr_ptr, 1,
                                  cols.to(tl.int64) * stride_r0, cmask, BLOCK_K, UPCAST, DOT_PRECISION)
                _store_cols(out_ptr, out_row, cols, m2, tl.where(kept, acc, 0.0))
                _store_cols(h_scr, h_next, cols, m2, tl.where(kept, acc, _load_cols(h_scr, h_row, cols, m2)))
        tl.debug_barrier()


# ------------------------------------------------------------------ backward
@triton.autotune(configs=_BACKWARD_CONFIGS, key=["H", "P", "stride_op", "stride_yp", "stride_ch", "stride_sk"],
                 prune_configs_by=_BACKWARD_PRUNE, **_BACKWARD_TUNING)
@triton.jit
def _recurrent_scan_backward_kernel(
    # inputs: grad_out [B, T, P] (any strides); w_hh [G, P], w_hr [P, H] (rows of unit stride),
    # h0 [B, P], c0 [B, H] (contiguous); the forward's out [B, T, P], cells [B, T, H], saved [B, T, S H] (any strides);
    # lengths [B] int64
    gout_ptr, w_ptr, h0_ptr, c0_ptr, wr_ptr, out_ptr, cells_ptr, saved_ptr, len_ptr,
    # results, contiguous: grad_gi [T, B, G], grad_gh [T, B, G] (GRU), grad_projected [T, B, P] (w_hr)
    ggi_ptr, ggh_ptr, gproj_ptr,
    # float32, the carried state gradients in two slots (slot 0 holds grad_h_n / grad_c_n at
    # launch, slot T % 2 grad_h0 / grad_c0 at exit): dh [2, B, P], dc [2, B, H]
    dh_scr, dc_scr,
    B, T, H, P,
    stride_ob, stride_ot, stride_op,
    stride_yb, stride_yt, stride_yp,
    stride_cb, stride_ct, stride_ch,
    stride_sb, stride_st, stride_sk,
    stride_w0, stride_r0,
    MODE: tl.constexpr, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, PROJECTED: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    LSTM: tl.constexpr = MODE == 0
    GRU: tl.constexpr = MODE == 1
    NG: tl.constexpr = 4 if MODE == 0 else (3 if MODE == 1 else 1)
    G = NG * H
    rows, rmask, rows64, steps_of = _program_rows(len_ptr, B, HAS_LENGTHS, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)

    for s in range(0, T):  # the forward's steps, last first
        if REVERSE:
            t = s
            prev = t + 1
        else:
            t = T - 1 - s
            prev = t - 1
        has_prev = s < T - 1  # else the step started from h0 / c0
        cur = s % 2
        keep = rmask
        prev_counted = rmask & has_prev
        if HAS_LENGTHS:
            keep = keep & (t < steps_of)
            prev_counted = prev_counted & (prev < steps_of)
        prev = tl.cast(tl.where(has_prev, prev, t), tl.int64)  # (an address inside the buffers when there is none)
        t64 = tl.cast(t, tl.int64)
        dh_row = cur * B * P + rows64 * P
        dh_next = (1 - cur) * B * P + rows64 * P
        dc_row = cur * B * H + rows64 * H
        dc_next = (1 - cur) * B * H + rows64 * H
        gout_row = rows64 * stride_ob + t64 * stride_ot
        step_row = t64 * B + rows64
        saved_row = rows64 * stride_sb + t64 * stride_st
        if PROJECTED:  # the projected state's gradient, kept for W_hr and pulled back through it below
            for j0 in range(0, P, BLOCK_H):
                cols = j0 + offs_h
                m2 = rmask[:, None] & (cols < P)[None, :]
                kept = keep[:, None] & (cols < P)[None, :]
                d_in = _output_grad(dh_scr, dh_row, gout_ptr, gout_row, stride_op, cols, m2)
                _store_cols(gproj_ptr, step_row * P, cols, m2, tl.where(kept, d_in, 0.0))
            tl.debug_barrier()
        for j0 in range(0, H, BLOCK_H):
            cols = j0 + offs_h
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            kept = keep[:, None] & cmask[None, :]
            if PROJECTED:  # d(o * tanh c) = d_h W_hr
                d_in = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                d_in = _accumulate(d_in, gproj_ptr, step_row * P, rmask, 1, P, wr_ptr, stride_r0,
                                   cols.to(tl.int64), cmask, BLOCK_K, UPCAST, DOT_PRECISION)
            else:
                d_in = _output_grad(dh_scr, dh_row, gout_ptr, gout_row, stride_op, cols, m2)
            s_cols = cols.to(tl.int64) * stride_sk
            g_row = step_row * G
            if LSTM:
                i = _load_cols(saved_ptr, saved_row, s_cols, m2)
                f = _load_cols(saved_ptr, saved_row, s_cols + H * stride_sk, m2)
                g = _load_cols(saved_ptr, saved_row, s_cols + 2 * H * stride_sk, m2)
                o = _load_cols(saved_ptr, saved_row, s_cols + 3 * H * stride_sk, m2)
                tanh_c = _load_cols(saved_ptr, saved_row, s_cols + 4 * H * stride_sk, m2)
                c_cols = cols.to(tl.int64) * stride_ch
                from_prev = prev_counted[:, None] & cmask[None, :]
                c_prev = tl.where(from_prev, _load_cols(cells_ptr, rows64 * stride_cb + prev * stride_ct, c_cols,
                                                        from_prev),
                                  _load_cols(c0_ptr, rows64 * H, cols, m2))
                dc = _load_cols(dc_scr, dc_row, cols, m2)
                d_o = d_in * tanh_c * o * (1.0 - o)
                dc_t = dc + d_in * o * (1.0 - tanh_c * tanh_c)
                d_i = dc_t * g * i * (1.0 - i)
                d_f = dc_t * c_prev * f * (1.0 - f)
                d_g = dc_t * i * (1.0 - g * g)
                _store_part(ggi_ptr, g_row, 0, H, cols, m2, kept, d_i)
                _store_part(ggi_ptr, g_row, 1, H, cols, m2, kept, d_f)
                _store_part(ggi_ptr, g_row, 2, H, cols, m2, kept, d_g)
                _store_part(ggi_ptr, g_row, 3, H, cols, m2, kept, d_o)
                _store_cols(dc_scr, dc_next, cols, m2, tl.where(kept, dc_t * f, dc))
            elif GRU:
                r = _load_cols(saved_ptr, saved_row, s_cols, m2)
                z = _load_cols(saved_ptr, saved_row, s_cols + H * stride_sk, m2)
                n = _load_cols(saved_ptr, saved_row, s_cols + 2 * H * stride_sk, m2)
                hn = _load_cols(saved_ptr, saved_row, s_cols + 3 * H * stride_sk, m2)
                from_prev = prev_counted[:, None] & cmask[None, :]
                h_prev = tl.where(from_prev, _load_cols(out_ptr, rows64 * stride_yb + prev * stride_yt,
                                                        cols.to(tl.int64) * stride_yp, from_prev),
                                  _load_cols(h0_ptr, rows64 * P, cols, m2))
                d_n = d_in * (1.0 - z) * (1.0 - n * n)
                d_z = d_in * (h_prev - n) * z * (1.0 - z)
                d_r = d_n * hn * r * (1.0 - r)
                _store_part(ggi_ptr, g_row, 0, H, cols, m2, kept, d_r)
                _store_part(ggi_ptr, g_row, 1, H, cols, m2, kept, d_z)
                _store_part(ggi_ptr, g_row, 2, H, cols, m2, kept, d_n)
                _store_part(ggh_ptr, g_row, 0, H, cols, m2, kept, d_r)
                _store_part(ggh_ptr, g_row, 1, H, cols, m2, kept, d_z)
                _store_part(ggh_ptr, g_row, 2, H, cols, m2, kept, d_n * r)
            else:
                h = _load_cols(out_ptr, rows64 * stride_yb + t64 * stride_yt, cols.to(tl.int64) * stride_yp, m2)
                if MODE == 2:
                    d = d_in * (1.0 - h * h)
                else:
                    d = tl.where(h > 0, d_in, 0.0)
                _store_part(ggi_ptr, g_row, 0, H, cols, m2, kept, d)
        tl.debug_barrier()
        for j0 in range(0, P, BLOCK_H):  # dh_{t-1} = d_gates W_hh (a GRU's with r on its n part), + d_in z
            cols = j0 + offs_h
            cmask = cols < P
            m2 = rmask[:, None] & cmask[None, :]
            kept = keep[:, None] & cmask[None, :]
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            if GRU:
                acc = _accumulate(acc, ggh_ptr, step_row * G, rmask, 1, G, w_ptr, stride_w0,
                                  cols.to(tl.int64), cmask, BLOCK_K, UPCAST, DOT_PRECISION)
                d_in = _output_grad(dh_scr, dh_row, gout_ptr, gout_row, stride_op, cols, m2)
                acc += d_in * _load_cols(saved_ptr, saved_row, (cols + H).to(tl.int64) * stride_sk, m2)
            else:
                acc = _accumulate(acc, ggi_ptr, step_row * G, rmask, 1, G, w_ptr, stride_w0,
                                  cols.to(tl.int64), cmask, BLOCK_K, UPCAST, DOT_PRECISION)
            _store_cols(dh_scr, dh_next, cols, m2, tl.where(kept, acc, _load_cols(dh_scr, dh_row, cols, m2)))
        tl.debug_barrier()


# ------------------------------------------------------------------ wrappers
def _check_scan(op: str, mode: str, gi_name: str, first: torch.Tensor, w_hh, w_hr, h0, c0,
                lengths, **optional):
    """Shared argument checks; returns ``(device, mode id, gates, saved, B, T, H, P, lengths on device)``."""
    if mode not in _MODES:
        raise ValueError(f"divebatch.{op}: mode must be one of {sorted(_MODES)}, got {mode!r}")
    mode_id, gates, saved = _MODES[mode]
    tensors = {gi_name: first, "w_hh": w_hh, "h0": h0, **{k: v for k, v in optional.items() if v is not None}}
    if c0 is not None:
        tensors["c0"] = c0
    if w_hr is not None:
        tensors["w_hr"] = w_hr
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"divebatch.{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != first.dtype:
            raise TypeError(f"divebatch.{op}: `{name}` must have the dtype of `{gi_name}` ({first.dtype}), "
                            f"got {t.dtype}")
    device = check_device(op, **tensors)
    if device.type == "cuda" and not scans_enabled():
        raise RuntimeError(
            f"divebatch.{op}: the Triton recurrent scans gave wrong results on an H200 (every scan stepping "
            "forward in time; see kernels/__init__.py UNVERIFIED_ON_GPU), so they do not run on CUDA: call "
            f"divebatch.reference.{op} (what the dispatcher runs on CUDA), or set DIVEBATCH_TRITON_SCANS=1 "
            "to run them anyway while investigating (bench/gpu/diagnose_scan.py)")
    if first.dim() != 3:
        raise ValueError(f"divebatch.{op}: `{gi_name}` must be 3-D [B, T, *], got shape {tuple(first.shape)}")
    B, T = first.shape[:2]
    G = w_hh.shape[0]
    if G % gates != 0 or w_hh.dim() != 2:
        raise ValueError(f"divebatch.{op}: `w_hh` must be [G, P] with G = {gates} x the hidden size for mode "
                         f"{mode!r}, got {tuple(w_hh.shape)}")
    H, P = G // gates, w_hh.shape[1]
    if w_hr is not None and mode != "LSTM":
        raise ValueError(f"divebatch.{op}: `w_hr` (a projection) is for an LSTM only; pass None for mode {mode!r}")
    if w_hr is not None and tuple(w_hr.shape) != (P, H):
        raise ValueError(f"divebatch.{op}: `w_hr` must be [P, H] = [{P}, {H}], got {tuple(w_hr.shape)}")
    if w_hr is None and P != H:
        raise ValueError(f"divebatch.{op}: `w_hh` must be [G, H] = [{G}, {H}] without a projection, "
                         f"got {tuple(w_hh.shape)}")
    if tuple(h0.shape) != (B, P):
        raise ValueError(f"divebatch.{op}: `h0` must be [B, P] = [{B}, {P}], got {tuple(h0.shape)}")
    if (c0 is not None) != (mode == "LSTM"):
        raise ValueError(f"divebatch.{op}: `c0` is required for an LSTM and must be None otherwise (mode {mode!r})")
    if c0 is not None and tuple(c0.shape) != (B, H):
        raise ValueError(f"divebatch.{op}: `c0` must be [B, H] = [{B}, {H}], got {tuple(c0.shape)}")
    if lengths is not None:
        if lengths.dtype != torch.int64 or lengths.dim() != 1 or lengths.shape[0] != B:
            raise ValueError(f"divebatch.{op}: `lengths` must be an int64 tensor of shape [B] = [{B}] (each "
                             f"sample's number of steps), got {lengths.dtype} {tuple(lengths.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(lengths)) if B > 0 else (0, 0)
        if lo < 0 or hi > T:
            raise ValueError(f"divebatch.{op}: `lengths` must lie in [0, T] = [0, {T}], got [{lo}, {hi}]")
        lengths = lengths.to(device)
    return device, mode_id, gates, saved, B, T, H, P, lengths


def _launch_options(dtype: torch.dtype):
    upcast, precision = dot_options(dtype)
    return dict(UPCAST=upcast, DOT_PRECISION=precision)


def _grid(B: int):
    return lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)


def _time_major(like: torch.Tensor, B: int, T: int, n: int) -> torch.Tensor:
    """An empty ``[B, T, n]`` view of a ``[T, B, n]`` buffer (the reference's ``time_major``; this
    package imports without divebatch)."""
    return like.new_empty(T, B, n).transpose(0, 1)


def recurrent_scan_triton(gi, w_hh, b_hh, h0, c0, w_hr, lengths, mode: str, reverse: bool):
    """``(out, cells, saved, h_n, c_n)`` of ``divebatch.reference.recurrent_scan`` (same layouts:
    the first three are ``[B, T, *]`` views of time-major buffers), stepped by one persistent Triton
    program per 16 samples; see the module docstring. float64 runs the reference."""
    device, mode_id, gates, n_saved, B, T, H, P, lengths = _check_scan(
        "recurrent_scan", mode, "gi", gi, w_hh, w_hr, h0, c0, lengths, b_hh=b_hh)
    if gi.dtype == torch.float64 or B == 0:
        from divebatch import reference  # (the kernels package is importable without divebatch)

        return reference.recurrent_scan(gi, w_hh, b_hh, h0, c0, w_hr, lengths, mode, reverse)
    if gi.shape[2] != gates * H:
        raise ValueError(f"divebatch.recurrent_scan: `gi` must be [B, T, G] with G = {gates * H} (the rows of "
                         f"`w_hh`), got {tuple(gi.shape)}")
    if b_hh is not None and tuple(b_hh.shape) != (gates * H,):
        raise ValueError(f"divebatch.recurrent_scan: `b_hh` must be [G] = [{gates * H}], got {tuple(b_hh.shape)}")
    lstm = mode == "LSTM"
    out = _time_major(gi, B, T, P)
    cells = _time_major(gi, B, T, H) if lstm else gi.new_empty(0)
    saved = _time_major(gi, B, T, n_saved * H)
    h_scr = torch.empty(2, B, P, dtype=torch.float32, device=device)
    h_scr[0] = h0
    c_scr = torch.empty(2, B, H, dtype=torch.float32, device=device) if lstm else h_scr
    if lstm:
        c_scr[0] = c0
    m_scr = torch.empty(B, H, dtype=torch.float32, device=device) if w_hr is not None else h_scr
    w = w_hh.contiguous()
    wr = w_hr.contiguous() if w_hr is not None else w
    _recurrent_scan_kernel[_grid(B)](
        gi, w, b_hh if b_hh is not None else w, wr, lengths if lengths is not None else h_scr,
        out, cells if lstm else out, saved if n_saved else out,
        h_scr, c_scr, m_scr,
        B, T, H, P,
        gi.stride(0), gi.stride(1), gi.stride(2),
        w.stride(0), wr.stride(0),
        MODE=mode_id, REVERSE=bool(reverse), HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None,
        PROJECTED=w_hr is not None, **_launch_options(gi.dtype),
    )
    h_n = h_scr[T % 2].to(gi.dtype)
    c_n = c_scr[T % 2].to(gi.dtype) if lstm else gi.new_empty(0)
    return out, cells, saved, h_n, c_n


def recurrent_scan_backward_triton(grad_out, grad_h_n, grad_c_n, w_hh, h0, c0, w_hr, out, cells, saved, lengths,
                                   mode: str, reverse: bool):
    """``(grad_gi, grad_gh, grad_h0, grad_c0, grad_projected)`` of
    ``divebatch.reference.recurrent_scan_backward`` (same layouts), stepped back by one persistent
    Triton program per 16 samples; see the module docstring. float64 runs the reference."""
    device, mode_id, gates, n_saved, B, T, H, P, lengths = _check_scan(
        "recurrent_scan_backward", mode, "grad_out", grad_out, w_hh, w_hr, h0, c0, lengths,
        grad_h_n=grad_h_n, grad_c_n=grad_c_n, out=out, saved=saved,
        cells=cells if mode == "LSTM" else None)
    if grad_out.dtype == torch.float64 or B == 0:
        from divebatch import reference

        return reference.recurrent_scan_backward(grad_out, grad_h_n, grad_c_n, w_hh, h0, c0, w_hr, out, cells,
                                                 saved, lengths, mode, reverse)
    lstm, gru = mode == "LSTM", mode == "GRU"
    T = out.shape[1] if out.dim() == 3 else T  # the forward's steps: a grad_out of another length is named
    expected = {"out": (out, (B, T, P)), "grad_out": (grad_out, (B, T, P)), "saved": (saved, (B, T, n_saved * H)),
                "grad_h_n": (grad_h_n, (B, P)), "grad_c_n": (grad_c_n, (B, H)),
                "cells": (cells if lstm else None, (B, T, H))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"divebatch.recurrent_scan_backward: `{name}` must have shape {list(shape)}, "
                             f"got {tuple(t.shape)}")
    if grad_c_n is not None and not lstm:
        raise ValueError(f"divebatch.recurrent_scan_backward: `grad_c_n` is for an LSTM only (mode {mode!r})")
    G = gates * H
    grad_gi = _time_major(grad_out, B, T, G)
    grad_gh = _time_major(grad_out, B, T, G) if gru else grad_out.new_empty(0)
    grad_projected = _time_major(grad_out, B, T, P) if w_hr is not None else grad_out.new_empty(0)
    dh_scr = torch.zeros(2, B, P, dtype=torch.float32, device=device)
    if grad_h_n is not None:
        dh_scr[0] = grad_h_n
    dc_scr = torch.zeros(2, B, H, dtype=torch.float32, device=device) if lstm else dh_scr
    if grad_c_n is not None:
        dc_scr[0] = grad_c_n
    w = w_hh.contiguous()
    wr = w_hr.contiguous() if w_hr is not None else w
    cells_arg = cells if lstm else out
    saved_arg = saved if n_saved else out
    _recurrent_scan_backward_kernel[_grid(B)](
        grad_out, w, h0.contiguous(), c0.contiguous() if lstm else dh_scr, wr, out, cells_arg, saved_arg,
        lengths if lengths is not None else dh_scr,
        grad_gi, grad_gh if gru else grad_gi, grad_projected if w_hr is not None else grad_gi,
        dh_scr, dc_scr,
        B, T, H, P,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        cells_arg.stride(0), cells_arg.stride(1), cells_arg.stride(2),
        saved_arg.stride(0), saved_arg.stride(1), saved_arg.stride(2),
        w.stride(0), wr.stride(0),
        MODE=mode_id, REVERSE=bool(reverse), HAS_LENGTHS=lengths is not None, PROJECTED=w_hr is not None,
        **_launch_options(grad_out.dtype),
    )
    grad_h0 = dh_scr[T % 2].to(grad_out.dtype)
    grad_c0 = dc_scr[T % 2].to(grad_out.dtype) if lstm else grad_out.new_empty(0)
    return grad_gi, grad_gh, grad_h0, grad_c0, grad_projected
