"""Plain-PyTorch reference implementations of every ``divebatch::*`` operator.

These are the oracle the C++ and Triton implementations are tested against, and the
implementation that runs on any device without a compiled one. They favour clarity over
speed, but still never build a whole ``B x T x T`` Gram for more than ``_TILE`` rows at once.

Shapes (per sample ``b``): ``a`` is a layer input ``[B, T, d]``, ``g`` the gradient of the
loss with respect to the layer output ``[B, T, p]``; the per-sample weight gradient of a
linear map is ``g_b^T a_b`` (``p x d``). Every result is float32, accumulated in float32
whatever the input dtype. No scaling is applied: the caller divides by ``c**2`` (DESIGN §2).
"""

from __future__ import annotations

import math

import torch

_TILE = 256


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _bias_sq(g: torch.Tensor, with_bias: bool) -> torch.Tensor:
    if not with_bias:
        return torch.zeros(g.shape[0], dtype=torch.float32, device=g.device)
    return _f32(g).sum(dim=1).square().sum(dim=1)


def ghost_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool):
    """Per-sample ``||g_b^T a_b||_F^2`` by the Gram ("ghost norm") identity.

    ``||g_b^T a_b||^2 = <a_b a_b^T, g_b g_b^T>``, summed over ``_TILE x _TILE`` tile pairs of the
    ``T x T`` Grams so the whole Gram is never held. Returns ``(weight_sq [B], bias_sq [B])``,
    where ``bias_sq = ||sum_t g_b[t]||^2`` (zeros when ``with_bias`` is False).
    """
    a32, g32 = _f32(a), _f32(g)
    B, T, _ = a32.shape
    weight_sq = torch.zeros(B, dtype=torch.float32, device=a.device)
    for i in range(0, T, _TILE):
        ai, gi = a32[:, i:i + _TILE], g32[:, i:i + _TILE]
        for j in range(i, T, _TILE):
            aj, gj = a32[:, j:j + _TILE], g32[:, j:j + _TILE]
            block = (torch.bmm(ai, aj.transpose(1, 2)) * torch.bmm(gi, gj.transpose(1, 2))).sum(dim=(1, 2))
            # Off-diagonal tile pairs stand for themselves and their transpose.
            weight_sq += block if i == j else 2.0 * block
    return weight_sq, _bias_sq(g, with_bias)


def instantiate_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool):
    """Per-sample ``||g_b^T a_b||_F^2`` by forming each ``p x d`` per-sample gradient.

    Returns ``(weight_sq [B], bias_sq [B], weight_grad_sum [p, d])``; ``weight_grad_sum`` is
    ``sum_b g_b^T a_b``, i.e. the weight gradient of the (unscaled) summed loss.
    """
    a32, g32 = _f32(a), _f32(g)
    per_sample = torch.bmm(g32.transpose(1, 2), a32)  # [B, p, d]
    weight_sq = per_sample.square().sum(dim=(1, 2))
    return weight_sq, _bias_sq(g, with_bias), per_sample.sum(dim=0)


def conv_output_sizes(op: str, x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding,
                      dilation) -> list[int]:
    """The output sizes of a one-group convolution of ``x [B, C, *in]`` (1-3 spatial dims) with
    ``kernel_size``, ``stride``, ``padding`` (zeros, both sides) and ``dilation`` (one int per
    spatial dim each), checked against its output grad ``g [B, O, *out]``; a ValueError names
    what does not fit."""
    n = x.dim() - 2
    if not 1 <= n <= 3 or g.dim() != x.dim():
        raise ValueError(f"divebatch.{op}: `x` must be [B, C, *spatial] with 1-3 spatial dims and `g` "
                         f"[B, O, *out] of as many dims, got {tuple(x.shape)} and {tuple(g.shape)}")
    geometry = {"kernel_size": kernel_size, "stride": stride, "padding": padding, "dilation": dilation}
    for name, values in geometry.items():
        if len(values) != n:
            raise ValueError(f"divebatch.{op}: `{name}` needs one entry per spatial dim ({n}), got {list(values)}")
    lowest = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}
    for name, values in geometry.items():
        if any(int(v) < lowest[name] for v in values):
            raise ValueError(f"divebatch.{op}: `{name}` entries must be >= {lowest[name]}, got {list(values)}")
    out = [(size + 2 * pad - dil * (k - 1) - 1) // s + 1
           for size, k, s, pad, dil in zip(x.shape[2:], kernel_size, stride, padding, dilation)]
    if g.shape[0] != x.shape[0] or list(g.shape[2:]) != out:
        raise ValueError(f"divebatch.{op}: `g` must be [B, O, *out] = [{x.shape[0]}, O, {', '.join(map(str, out))}] "
                         f"for `x` {tuple(x.shape)} and this geometry, got {tuple(g.shape)}")
    return out


def zero_padded(x: torch.Tensor, padding) -> torch.Tensor:
    """``x [B, C, *spatial]`` with ``padding[i]`` zeros on both sides of spatial dim ``i`` (``x``
    itself where there is none)."""
    return torch.nn.functional.pad(x, [int(p) for p in reversed(padding) for _ in (0, 1)]) if any(padding) else x


def conv_patches(x: torch.Tensor, kernel_size, stride, dilation) -> torch.Tensor:
    """The patches of an (already padded) input ``x [B, C, *spatial]`` as ``[B, C * prod(kernel),
    T]``, positions last (what im2col writes fastest), columns in ``weight.view(O, -1)``'s order;
    the one copy is the final reshape."""
    return windows_as_patches(conv_windows(x, kernel_size, stride, dilation), len(kernel_size))


def windows_as_patches(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``conv_windows``' view of ``n`` spatial dims as the patches ``[B, C * prod(kernel), T]``,
    positions last (the one copy)."""
    # [B, C, o_1..o_n, k_1..k_n] -> [B, C, k_1..k_n, o_1..o_n], positions last.
    x = windows.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return x.reshape(x.shape[0], x.shape[1] * math.prod(x.shape[2:2 + n]), math.prod(x.shape[2 + n:]))


def conv_windows(x: torch.Tensor, kernel_size, stride, dilation) -> torch.Tensor:
    """The windows of an (already padded) input ``x [B, C, *spatial]`` as a view ``[B, C, o_1..o_n,
    k_1..k_n]`` (output positions, then kernel offsets), nothing copied."""
    for i, (k, s, dil) in enumerate(zip(kernel_size, stride, dilation)):
        # A dilated window is a contiguous window of span dil*(k-1)+1 read every dil-th element.
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    return x


def conv_instantiate_norm(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation):
    """``instantiate_norm`` of a one-group convolution read from its input: the per-sample
    ``||g_b^T a_b||^2`` [B] and ``sum_b g_b^T a_b`` [O, C * prod(kernel)] (the weight gradient of
    the unscaled summed loss, ``weight.view(O, -1)``'s layout), float32, where ``a_b [T, C *
    prod(kernel)]`` are the zero-padded patches of ``x [B, C, *in]`` and ``g [B, O, *out]`` is the
    output grad. Here the patches are unfolded; the Triton kernel reads them from ``x`` in place."""
    weight_sq, _, grad = instantiate_norm(*_conv_rows("conv_instantiate_norm", x, g, kernel_size, stride, padding,
                                                      dilation), False)
    return weight_sq, grad


def _conv_rows(op: str, x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation):
    """``(a [B, T, C * prod(kernel)], g [B, T, O])``: a convolution's zero-padded patches, unfolded,
    and its output grad as rows, after ``conv_output_sizes``' checks (errors name ``op``)."""
    conv_output_sizes(op, x, g, kernel_size, stride, padding, dilation)
    a = conv_patches(zero_padded(x, padding), kernel_size, stride, dilation).transpose(1, 2)
    return a, g.reshape(*g.shape[:2], a.shape[1]).transpose(1, 2)


def conv_ghost_norm(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """``ghost_norm`` of a one-group convolution read from its input: the per-sample
    ``||g_b^T a_b||^2`` [B], float32, where ``a_b [T, C * prod(kernel)]`` are the zero-padded patches
    of ``x [B, C, *in]`` and ``g [B, O, *out]`` is the output grad. Here the patches are unfolded;
    the Triton kernel reads them from ``x`` in place."""
    return ghost_norm(*_conv_rows("conv_ghost_norm", x, g, kernel_size, stride, padding, dilation), False)[0]


def outer_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool):
    """T = 1 closed form: ``||g_b a_b^T||^2 = ||a_b||^2 ||g_b||^2`` for ``a [B, d]``, ``g [B, p]``.

    Returns ``(weight_sq [B], bias_sq [B])`` with ``bias_sq = ||g_b||^2``.
    """
    g_sq = _f32(g).square().sum(dim=1)
    weight_sq = _f32(a).square().sum(dim=1) * g_sq
    bias_sq = g_sq if with_bias else torch.zeros_like(g_sq)
    return weight_sq, bias_sq


def embedding_norm(indices: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Per-sample squared norm of an embedding table's gradient.

    ``indices [B, T]`` (int64), ``g [B, T, p]``: ``||sum_t onehot(idx_t) g_t||^2`` =
    ``sum_{s,t: idx_s = idx_t} <g_s, g_t>``. Positions whose index equals ``padding_idx``
    (a non-negative row, or -1 for none) contribute nothing, as in ``nn.Embedding``.
    """
    B, T = indices.shape
    g32 = _f32(g).reshape(B * T, g.shape[-1])  # (T = 0: an EmbeddingBag's empty bags)
    sample = torch.arange(B, device=g.device).repeat_interleave(T)
    idx = indices.reshape(-1).long()
    keep = idx != padding_idx if padding_idx >= 0 else torch.ones_like(idx, dtype=torch.bool)
    sample, idx, g32 = sample[keep], idx[keep], g32[keep]
    # One row per distinct (sample, index) pair: the per-sample gradient's non-zero rows.
    pairs = torch.stack([sample, idx], dim=1)
    unique_pairs, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    rows = torch.zeros(unique_pairs.shape[0], g32.shape[1], dtype=torch.float32, device=g.device)
    rows.index_add_(0, inverse, g32)
    out = torch.zeros(B, dtype=torch.float32, device=g.device)
    out.index_add_(0, unique_pairs[:, 0], rows.square().sum(dim=1))
    return out


# ---------------------------------------------------------------- norm layers
def affine_norm_grads(x: torch.Tensor, g: torch.Tensor, rms: bool, eps: float, with_bias: bool,
                      round_x_hat: bool = False):
    """Per-sample gradients of a LayerNorm's (``rms=False``) or RMSNorm's (``rms=True``) affine
    parameters, normalising over the last dim of ``x [B, R, d]`` with output grad ``g [B, R, d]``.

    ``x_hat`` is ``x`` normalised in float32 (mean and biased variance, or root mean square, over
    ``d``, plus ``eps``), rounded to ``x``'s dtype when ``round_x_hat`` (Hugging Face's Llama
    RMSNorm casts it back before the weight multiplies it). Returns ``(weight [B, d] = sum_r x_hat[b, r] * g[b, r],
    bias [B, d] = sum_r g[b, r])``, both float32; ``bias`` is zeros when ``with_bias`` is False.
    """
    d = x.shape[-1]
    x32 = _f32(x)
    x_hat = (torch.nn.functional.rms_norm(x32, (d,), None, eps) if rms
             else torch.nn.functional.layer_norm(x32, (d,), None, None, eps))
    if round_x_hat and x.dtype != torch.float32:
        x_hat = x_hat.to(x.dtype).float()
    weight = x_hat.mul_(_f32(g)).sum(dim=1)
    bias = _f32(g).sum(dim=1) if with_bias else torch.zeros_like(weight)
    return weight, bias


def group_norm_grads(x: torch.Tensor, g: torch.Tensor, groups: int, eps: float, with_bias: bool):
    """Per-sample gradients of a GroupNorm's affine parameters (an InstanceNorm's with
    ``groups = C``) for ``x, g [B, C, S]`` (``S``: the positions, flattened): ``x_hat`` is ``x``
    normalised in float32 by the mean and biased variance of each sample's group of ``C / groups``
    channels over all positions, plus ``eps``. Returns ``(weight [B, C] = sum_s x_hat * g,
    bias [B, C] = sum_s g)``, float32; ``bias`` is zeros when ``with_bias`` is False.
    """
    B, C = x.shape[:2]
    # (by hand: F.group_norm refuses a group of one value, whose x_hat is simply 0)
    grouped = _f32(x).reshape(B, groups, math.prod(x.shape[1:]) // max(groups, 1))
    centred = grouped - grouped.mean(dim=2, keepdim=True)
    x_hat = (centred * torch.rsqrt(centred.square().mean(dim=2, keepdim=True) + eps)).reshape(x.shape)
    weight = x_hat.mul_(_f32(g)).sum(dim=2)
    bias = _f32(g).sum(dim=2) if with_bias else torch.zeros_like(weight)
    return weight, bias


def channel_norm_grads(x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None,
                       eps: float, with_bias: bool):
    """Per-sample gradients of a BatchNorm's affine parameters (an InstanceNorm's with running
    statistics) for ``x, g [B, C, S]`` (``S``: the positions, flattened), normalised per channel as
    ``F.batch_norm`` does: ``x_hat = (x - mean[c]) / sqrt(var[c] + eps)`` in float32, with ``mean,
    var [C]`` the running statistics (eval mode) or, both None, the batch's: over all samples and
    positions, biased variance (training mode; then the per-sample numbers are the decomposition of
    the batch gradient, see ``divebatch.layers.norm``). Returns ``(weight [B, C] = sum_s x_hat * g,
    bias [B, C] = sum_s g)``, float32; ``bias`` is zeros when ``with_bias`` is False.
    """
    if (mean is None) != (var is None):
        raise ValueError("divebatch.channel_norm_grads: give both `mean` and `var` (running statistics) or "
                         f"neither (the batch's), got only {'mean' if var is None else 'var'}")
    if x.numel() == 0:  # (empty sums; the batch's statistics over no values would be NaN, with a warning)
        weight = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
        return weight, torch.zeros_like(weight)
    x32 = _f32(x)
    if mean is None:
        var, mean = torch.var_mean(x32, dim=(0, 2), correction=0)
    x_hat = (x32 - _f32(mean)[:, None]).mul_(torch.rsqrt(_f32(var) + eps)[:, None])
    weight = x_hat.mul_(_f32(g)).sum(dim=2)
    bias = _f32(g).sum(dim=2) if with_bias else torch.zeros_like(weight)
    return weight, bias


# ---------------------------------------------------------------- recurrent scans
#: Activations kept per step for the backward, in multiples of the hidden size H: an LSTM's
#: gates i, f, g, o and tanh(c_t); a GRU's r, z, n and W_hn h + b_hn; nothing for nn.RNN (its
#: output is the activation).
SCAN_SAVED = {"LSTM": 5, "GRU": 4, "RNN_TANH": 0, "RNN_RELU": 0}
#: Pre-activations per hidden unit: G = SCAN_GATES[mode] * H.
SCAN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def time_major(like: torch.Tensor, B: int, T: int, n: int) -> torch.Tensor:
    """An empty ``[B, T, n]`` view of a ``[T, B, n]`` buffer: the scans' results are time-major,
    so that each step's slice is contiguous (the C++ kernel's layout, which the fakes declare)."""
    return like.new_empty(T, B, n).transpose(0, 1)


def _scan_steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _counted(lengths, B: int, T: int, device):
    """``[B, T]`` bool: which steps count, or None without ``lengths`` (all do)."""
    steps = torch.arange(T, device=device)
    return None if lengths is None else steps[None, :] < lengths.to(device)[:, None]


def recurrent_scan(gi, w_hh, b_hh, h0, c0, w_hr, lengths, mode: str, reverse: bool):
    """One direction of one layer of ``nn.RNN``/``nn.LSTM``/``nn.GRU``, given its input projection.

    ``gi [B, T, G]`` is ``x W_ih^T + b_ih`` for every step (``G`` = 4H for an LSTM, 3H for a GRU,
    H for an RNN), ``w_hh [G, P]``, ``b_hh [G]`` or None, ``h0 [B, P]``, ``c0 [B, H]`` (LSTM only,
    else None), ``w_hr [P, H]`` an LSTM's projection (``h = W_hr (o * tanh c)``; None: P = H);
    ``lengths [B]`` (int64) or None: sample ``b``'s steps ``t >= lengths[b]`` are
    padding, as in a ``PackedSequence``: its output there is 0 and its state is carried unchanged
    (so a reversed direction starts at the sample's own last step). ``mode`` is the module's
    ``mode`` ("LSTM", "GRU", "RNN_TANH", "RNN_RELU") and ``reverse`` runs the steps from ``T - 1``
    down (a bidirectional layer's second direction). PyTorch's gate order and formulas. Returns
    ``(out [B, T, P], cells [B, T, H], saved [B, T, k H], h_n [B, P], c_n [B, H])``, the first
    three views of time-major buffers: the hidden state after every step, an LSTM's cell state
    after every step (an empty tensor otherwise), the activations ``recurrent_scan_backward`` needs
    (``SCAN_SAVED``; 0 on padded steps), and the final states (``c_n`` empty except for an LSTM).
    Computed in ``gi``'s dtype; nothing is scaled.
    """
    B, T, G = gi.shape
    H, P = G // SCAN_GATES[mode], h0.shape[-1]
    out, saved = time_major(gi, B, T, P), time_major(gi, B, T, SCAN_SAVED[mode] * H)
    cells = time_major(gi, B, T, H) if mode == "LSTM" else gi.new_empty(0)
    counted = _counted(lengths, B, T, gi.device)
    h, c = h0, c0
    for t in _scan_steps(T, reverse):
        gh = h @ w_hh.t() if b_hh is None else torch.addmm(b_hh, h, w_hh.t())
        c_new = None
        if mode == "LSTM":
            pre = gi[:, t] + gh
            i, f, o = torch.sigmoid(pre[:, :H]), torch.sigmoid(pre[:, H:2 * H]), torch.sigmoid(pre[:, 3 * H:])
            g = torch.tanh(pre[:, 2 * H:3 * H])
            c_new = f * c + i * g
            tanh_c = torch.tanh(c_new)
            h_new = o * tanh_c if w_hr is None else (o * tanh_c) @ w_hr.t()
            kept = torch.cat([i, f, g, o, tanh_c], dim=1)
        elif mode == "GRU":
            r = torch.sigmoid(gi[:, t, :H] + gh[:, :H])
            z = torch.sigmoid(gi[:, t, H:2 * H] + gh[:, H:2 * H])
            n = torch.tanh(gi[:, t, 2 * H:] + r * gh[:, 2 * H:])
            h_new = (1 - z) * n + z * h
            kept = torch.cat([r, z, n, gh[:, 2 * H:]], dim=1)
        else:
            h_new = torch.tanh(gi[:, t] + gh) if mode == "RNN_TANH" else torch.relu(gi[:, t] + gh)
            kept = None
        if counted is not None:  # a padded step: output 0, state carried
            keep = counted[:, t, None]
            out[:, t] = torch.where(keep, h_new, 0)
            h_new = torch.where(keep, h_new, h)
            c_new = torch.where(keep, c_new, c) if c_new is not None else None
            kept = torch.where(keep, kept, 0) if kept is not None else None
        else:
            out[:, t] = h_new
        if kept is not None:
            saved[:, t] = kept
        if c_new is not None:
            cells[:, t] = c_new
        h, c = h_new, c_new
    return out, cells, saved, h, c if mode == "LSTM" else gi.new_empty(0)


def recurrent_scan_backward(grad_out, grad_h_n, grad_c_n, w_hh, h0, c0, w_hr, out, cells, saved, lengths,
                            mode: str, reverse: bool):
    """The gradients of ``recurrent_scan`` from those of its outputs.

    ``grad_out [B, T, H]`` is the gradient of ``out``, ``grad_h_n``/``grad_c_n [B, H]`` those of
    the final states (None: zero); the rest is the forward's inputs and results. Returns
    ``(grad_gi [B, T, G], grad_gh, grad_h0 [B, P], grad_c0, grad_projected)``: the gradients of the input
    pre-activations ``gi`` and of the hidden ones ``gh = h_{t-1} W_hh^T + b_hh`` at every step
    (0 on padded steps; equal to ``grad_gi`` except for a GRU, whose ``r`` multiplies ``gh``'s n
    part; so ``grad_gh`` is returned for a GRU only, an empty tensor otherwise), and of the initial
    states (``grad_c0`` empty except for an LSTM), and with ``w_hr`` the gradient of every step's
    projected ``h`` (empty otherwise). A weight's gradient is ``grad^T A`` summed over steps and
    samples: ``A`` is the layer input for ``W_ih``, the state each step started from for ``W_hh``,
    and ``o * tanh c`` for ``W_hr`` (with ``grad_projected``).
    """
    B, T, P = out.shape
    G = w_hh.shape[0]
    H = G // SCAN_GATES[mode]
    grad_projected = time_major(out, B, T, P) if w_hr is not None else out.new_empty(0)
    grad_gi = time_major(out, B, T, G)
    grad_gh = time_major(out, B, T, G) if mode == "GRU" else out.new_empty(0)
    dh = grad_h_n.clone() if grad_h_n is not None else out.new_zeros(B, P)
    dc = None
    if mode == "LSTM":
        dc = grad_c_n.clone() if grad_c_n is not None else out.new_zeros(B, H)
    counted = _counted(lengths, B, T, out.device)
    for t in _scan_steps(T, not reverse):
        prev = t + 1 if reverse else t - 1
        keep = None if counted is None else counted[:, t, None]
        # The state step t started from: the previous step's where that one counted, else the initial.
        if 0 <= prev < T:
            from_prev = None if counted is None else counted[:, prev, None]
            h_prev = out[:, prev] if from_prev is None else torch.where(from_prev, out[:, prev], h0)
            c_prev = None
            if mode == "LSTM":
                c_prev = cells[:, prev] if from_prev is None else torch.where(from_prev, cells[:, prev], c0)
        else:
            h_prev, c_prev = h0, c0
        d_in = dh + grad_out[:, t]
        if w_hr is not None:  # the projected h's gradient, then the cell output's through W_hr
            grad_projected[:, t] = d_in if keep is None else torch.where(keep, d_in, 0)
            d_in = d_in @ w_hr
        if mode == "LSTM":
            i, f, g, o, tanh_c = saved[:, t].split(H, dim=1)
            d_o = d_in * tanh_c * o * (1 - o)
            dc_t = dc + d_in * o * (1 - tanh_c * tanh_c)
            d_i = dc_t * g * i * (1 - i)
            d_f = dc_t * c_prev * f * (1 - f)
            d_g = dc_t * i * (1 - g * g)
            d_gates = torch.cat([d_i, d_f, d_g, d_o], dim=1)
            dc_new, dh_new = dc_t * f, d_gates @ w_hh
        elif mode == "GRU":
            r, z, n, hn = saved[:, t].split(H, dim=1)
            d_n = d_in * (1 - z) * (1 - n * n)
            d_z = d_in * (h_prev - n) * z * (1 - z)
            d_r = d_n * hn * r * (1 - r)
            d_gates = torch.cat([d_r, d_z, d_n], dim=1)
            d_hidden = torch.cat([d_r, d_z, d_n * r], dim=1)
            dh_new = d_in * z + d_hidden @ w_hh
        else:
            h = out[:, t]
            d_gates = d_in * (1 - h * h) if mode == "RNN_TANH" else d_in * (h > 0)
            dh_new = d_gates @ w_hh
        if keep is not None:  # a padded step: no gradient to its gates, the carried ones pass
            d_gates = torch.where(keep, d_gates, 0)
            dh_new = torch.where(keep, dh_new, dh)
            if mode == "LSTM":
                dc_new = torch.where(keep, dc_new, dc)
            if mode == "GRU":
                d_hidden = torch.where(keep, d_hidden, 0)
        grad_gi[:, t] = d_gates
        if mode == "GRU":
            grad_gh[:, t] = d_hidden
        dh = dh_new
        if mode == "LSTM":
            dc = dc_new
    return grad_gi, grad_gh, dh, dc if dc is not None else out.new_empty(0), grad_projected
