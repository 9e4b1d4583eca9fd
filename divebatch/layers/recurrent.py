"""nn.RNN, nn.LSTM and nn.GRU: per-sample norms from every step's pre-activation gradients.

A recurrent layer applies its weights to every time step: ``gi_t = W_ih x_t + b_ih`` and
``gh_t = W_hh h_{t-1} + b_hh``, then a cell (tanh/ReLU for ``nn.RNN``; the LSTM and GRU gates)
combines them. Sample ``b``'s gradient of ``W_ih`` is therefore ``sum_t dgi_t x_t^T`` and of
``W_hh`` ``sum_t dgh_t h_{t-1}^T``: the ``nn.Linear`` routes over time steps (ghost or
instantiate, ``linear_norms``), with the biases' ``sum_t dgi_t`` and ``sum_t dgh_t``.

The layer's own forward is a fused kernel whose gate gradients autograd never exposes. With the
tracker's ``fused=True`` (the default) and float32 inputs, the layer's forward is replaced by the
recurrence stepped by the ``divebatch::recurrent_scan`` operator, one direction of one layer at a
time (``_ScannedRecurrence``; C++ on CPU: a step is one GEMM and one vectorised loop over the
cell, no Python and no autograd node per step). Its backward steps back with
``recurrent_scan_backward``, which returns every step's pre-activation gradients, and forms the
weights' gradients as one product each, so nothing is replayed. A ``PackedSequence`` runs padded to
its longest sequence, its padded steps masked (a sample's state passes through them unchanged),
and comes out packed as it came. Outputs equal the native kernel's to float32 rounding; a
backward with ``create_graph=True`` through the fused forward is refused (``fused=False``
instead). ``bench/recurrent_routes.py`` measures the routes.

Otherwise (``fused=False``, other dtypes, autocast) the layer runs its own forward; once its
output grads arrive (the output sequence, ``h_n`` and, for an LSTM, ``c_n``), the rule replays the
recurrence once for the whole batch from the captured input and initial state through the same
two operators: about the cost of the layer's forward and backward again, against one replay *per
sample* on the generic route before (``vmap`` has no batching rule for GRU's and RNN's fused
backward). Any number of layers, bidirectional, ``batch_first`` or not, a given ``h_0``/``c_0``.

An LSTM with projections (``proj_size > 0``: ``h_t = W_hr (o_t * tanh(c_t))``; the scans project
each step) adds the factor pair of ``W_hr``: the unprojected output ``o_t * tanh(c_t)`` and the
gradient of the projected state. Inter-layer dropout in training mode draws masks inside the fused
kernel that no replay can repeat: refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import ops
from .base import LayerRule, RoutePlan, RuleError, register
from .linear import linear_grad_sums, linear_norms, linear_norms_and_weight_grad
from .routes import linear_route

_MAX_LAYERS = 16


def _projection(layer: int, reverse: bool) -> str:
    """An LSTM's projection weight (``proj_size > 0``): ``h_t = W_hr (o_t * tanh(c_t))``."""
    return f"weight_hr_l{layer}" + ("_reverse" if reverse else "")


def _names(layer: int, reverse: bool) -> tuple[str, str, str, str]:
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    return tuple(f"{kind}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


@dataclass
class RecurrentCall:
    """What the rule keeps of one forward call (detached, batch first)."""

    x: torch.Tensor                  # [B, T, input_size], zero after each sample's length
    lengths: torch.Tensor | None     # [B] for a PackedSequence input, else None
    h0: torch.Tensor | None          # [layers * directions, B, H]
    c0: torch.Tensor | None          # LSTM only
    outputs: tuple[str, ...]         # which outputs' grads arrive, in order: "out", "h", "c"
    packed: PackedSequence | None    # the output's packing, to unpack its grad


@register(nn.RNN, nn.LSTM, nn.GRU)
class RecurrentRule(LayerRule):
    """Rule for ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` (one batched replay of the recurrence)."""

    param_names = tuple(name for layer in range(_MAX_LAYERS) for reverse in (False, True)
                        for name in _names(layer, reverse) + (_projection(layer, reverse),))

    def batch_dim(self, module):
        return 0 if module.batch_first else 1

    def capture(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise RuleError(
                f"{type(module).__name__} draws random numbers in its forward (dropout={module.dropout} between "
                "layers in training mode), which no replay can repeat; set dropout=0 (and apply dropout between "
                "separate layers yourself), call .eval() on it, or freeze it")
        lengths, packed = None, None
        if isinstance(x, PackedSequence):
            padded, lengths = pad_packed_sequence(x, batch_first=True)
            seq = padded.detach()
            lengths = lengths.to(seq.device)
            packed = output[0]
        else:
            if x.dim() != 3:
                raise ValueError(f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}; "
                                 "give it a batch: [B, T, input_size] (batch_first) or [T, B, input_size]")
            seq = (x if module.batch_first else x.transpose(0, 1)).detach()
        h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
        out, hidden = output
        h_n, c_n = hidden if isinstance(hidden, tuple) else (hidden, None)
        out_data = out.data if isinstance(out, PackedSequence) else out
        outputs = tuple(name for name, t in (("out", out_data), ("h", h_n), ("c", c_n))
                        if t is not None and t.requires_grad)
        return RecurrentCall(seq, lengths, None if h0 is None else h0.detach(), None if c0 is None else c0.detach(),
                             outputs, packed)

    def batch_size(self, module, ctx):
        return ctx.x.shape[0]

    def norms(self, module, calls, tracked):
        sq = None
        for names, a, g in self._factors(module, calls):
            w, b = names
            if w in tracked or b in tracked:
                part = linear_norms(a, g, w in tracked, b in tracked)
                sq = part if sq is None else sq + part
        return sq if sq is not None else torch.zeros(calls[0][0].x.shape[0], device=calls[0][0].x.device)

    def grad_sums(self, module, calls, tracked):
        return _weight_grads(self._factors(module, calls), tracked)

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        if isinstance(ctx, FusedRecurrentCall):  # (fused calls of a layer called several times)
            return self.fused_plan(module, ctx, tracked)
        B, T, _ = ctx.x.shape
        inner = linear_route(B, T, module.hidden_size, module.hidden_size * _gates(module))
        return RoutePlan("recurrent (batched replay)", f"B={B} T={T} H={module.hidden_size} "
                         f"layers={module.num_layers} ({inner.route} per weight)", float("nan"), float("nan"))

    # ------------------------------------------------------------------ fused path
    def can_fuse(self, module, tracked) -> bool:
        """The stock ``nn.RNN``/``nn.LSTM``/``nn.GRU`` forward only."""
        return type(module).forward in (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)

    def fuse_call(self, module, x) -> bool:
        """A float32 ``[B, T, in]`` (or ``[T, B, in]``) input, or a PackedSequence of float32 data,
        to a float32 layer, without dropout between layers in training mode."""
        data = self.fused_input_tensor(x)
        return ((isinstance(x, PackedSequence) or data.dim() == 3) and data.dtype == torch.float32
                and all(p.dtype == torch.float32 for p in module.parameters())
                and not (module.training and module.dropout > 0 and module.num_layers > 1))

    def fused_input_tensor(self, x):
        """What the tracker's checks read of the input: a PackedSequence's data, else the input."""
        return x.data if isinstance(x, PackedSequence) else x

    def fused_batch_size(self, module, x) -> int:
        if isinstance(x, PackedSequence):
            return int(x.batch_sizes[0])
        return x.shape[0] if module.batch_first else x.shape[1]

    def fused_forward(self, module, args, kwargs, sink):
        """The layer's forward as the recurrence stepped by the scan operators (``_ScannedRecurrence``),
        in place of the native kernel: its backward gives the pre-activations' gradients, hands them to ``sink`` for
        the norms and forms the weights' gradients as one product each, so nothing is replayed. A
        PackedSequence runs padded, its padded steps masked, and comes out packed as the input was.
        Outputs equal the native kernel's to float32 rounding."""
        x = args[0]
        hx = args[1] if len(args) > 1 else None
        h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
        names = [name for name, _ in module.named_parameters()]
        params = [p for _, p in module.named_parameters()]
        lengths = None
        if isinstance(x, PackedSequence):
            seq, lengths = pad_packed_sequence(x, batch_first=True)  # (the samples in their own order)
        else:
            seq = x if module.batch_first else x.transpose(0, 1)
        out, h_n, c_n = _ScannedRecurrence.apply(module, names, sink, seq, h0, c0, lengths, *params)
        if lengths is not None:
            out = _packed_like(out, x, lengths)
        elif not module.batch_first:
            out = out.transpose(0, 1)
        return out, ((h_n, c_n) if module.mode == "LSTM" else h_n)

    def fused_grads(self, module, ctx, factors, tracked):
        """The norms and ``{name: gradient}`` of the tracked weights whose norms' route formed it
        (the fused instantiate route's tiles sum to it); the fused backward forms the rest."""
        sq, grads = None, {}
        for (w, b), a, g in factors:
            if w in tracked:
                part, grads[w] = linear_norms_and_weight_grad(a, g, b in tracked)
            elif b in tracked:
                part = linear_norms(a, g, False, True)
            else:
                continue
            sq = part if sq is None else sq + part
        return (sq if sq is not None else torch.zeros(ctx.x.shape[0], device=ctx.x.device)), grads, None

    def fused_plan(self, module, ctx, tracked) -> RoutePlan:
        B, T, _ = ctx.x.shape
        inner = linear_route(B, T, module.hidden_size, module.hidden_size * _gates(module))
        return RoutePlan("recurrent (fused scan)", f"B={B} T={T} H={module.hidden_size} "
                         f"layers={module.num_layers} ({inner.route} per weight)", float("nan"), float("nan"))

    def _factors(self, module, calls):
        """``((weight name, bias name), A [B, T', k], G [B, T', gates])`` per weight, the calls'
        time steps concatenated (several calls: their per-sample gradients add up)."""
        parts: dict[tuple[str, str], list] = {}
        for ctx, grads in calls:
            factors = grads[0] if isinstance(ctx, FusedRecurrentCall) else _replay(module, ctx, grads)
            for names, a, g in factors:
                parts.setdefault(names, []).append((a, g))
        for names, pairs in parts.items():
            if len(pairs) == 1:
                yield names, pairs[0][0], pairs[0][1]
            else:
                yield names, torch.cat([a for a, _ in pairs], 1), torch.cat([g for _, g in pairs], 1)


@dataclass
class FusedRecurrentCall:
    """A fused call (``RecurrentRule.fused_forward``): its batch-first input, for the plan; its
    factors arrive with the gradients."""

    x: torch.Tensor


class _ScannedRecurrence(torch.autograd.Function):
    """``(out, h_n, c_n)`` of the layer stepped by ``divebatch::recurrent_scan`` (C++ on CPU), one
    direction of one layer at a time; the backward steps back with ``recurrent_scan_backward``,
    hands the weights' factors to the tracker's sink and returns the weights' gradients as one
    product each. Once differentiable: the scans' backward is no graph, so a backward with
    ``create_graph=True`` is refused."""

    @staticmethod
    def forward(ctx, module, names, sink, x, h0, c0, lengths, *params):
        weights = dict(zip(names, (p.detach() for p in params)))
        out, h_n, c_n, scans = _scan_forward(module, weights, x.detach(), _detached(h0), _detached(c0), lengths)
        ctx.state = (weights, scans)
        ctx.wants = tuple(t is not None and t.requires_grad for t in (x, h0, c0))
        ctx.names, ctx.sink, ctx.call = names, sink, FusedRecurrentCall(x.detach())
        ctx.set_materialize_grads(False)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, g_out, g_h, g_c):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "a backward with create_graph=True (a gradient penalty, second-order gradients) through an "
                "nn.RNN/LSTM/GRU whose forward the tracker fused: its gradients come from divebatch's scan "
                "kernels, which record no graph, so their own gradients would be wrong. Create the "
                "GradNormTracker with fused=False for such steps (the layer then runs its own forward and is "
                "replayed for the norms)")
        weights, scans = ctx.state
        del ctx.state  # (used once)
        factors, x_g, h0_g, c0_g = _scan_backward(ctx.call.x.shape, weights, scans, g_out, g_h, g_c, ctx.wants)
        return (None, None, None, x_g, h0_g, c0_g, None, *_sink_and_weight_grads(ctx, factors))


def _sink_and_weight_grads(ctx, factors) -> list:
    """Hand ``factors`` to the tracker's sink; the gradients of ``ctx.names`` in order: those the
    norms' route formed (returned by the sink) and the rest from the factors."""
    formed = ctx.sink(ctx.call, factors)[0] or {}
    by_name = _weight_grads(factors, [name for name in ctx.names if name not in formed])
    by_name.update(formed)
    return [by_name.get(name) for name in ctx.names]


@dataclass
class _Scan:
    """One direction of one layer as ``recurrent_scan`` ran it: what its backward needs."""

    mode: str                         # the module's mode: "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    names: tuple[str, str, str, str]  # weight_ih, weight_hh, bias_ih, bias_hh
    index: int                        # layer * directions + direction: its row of h_0 / h_n
    reverse: bool
    layer_input: torch.Tensor         # [B, T, in]
    h0: torch.Tensor                  # [B, P] (P: an LSTM's proj_size, else H)
    c0: torch.Tensor | None
    results: tuple                    # (out, cells, saved) of recurrent_scan
    lengths: torch.Tensor | None      # [B] steps per sample (a PackedSequence's), or None: all
    w_hr: torch.Tensor | None         # an LSTM's projection [P, H], or None


def _packed_like(out: torch.Tensor, like: PackedSequence, lengths: torch.Tensor) -> PackedSequence:
    """The padded batch-first ``out`` packed with ``like``'s layout (its batch sizes and sample
    order, whatever made it), differentiably."""
    if like.sorted_indices is not None:
        out, lengths = out.index_select(0, like.sorted_indices), lengths[like.sorted_indices.cpu()]
    data = pack_padded_sequence(out, lengths, batch_first=True, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _scan_forward(module, weights: dict, x: torch.Tensor, h0, c0, lengths=None):
    """The layer's forward on ``x [B, T, in]`` (float32, batch first; with ``lengths [B]``, sample
    b's steps from ``lengths[b]`` on are padding) through ``recurrent_scan``: ``(out [B, T, D*H],
    h_n, c_n, scans)`` (``D*P`` wide with a projection), no autograd graph."""
    B, T, _ = x.shape
    H, D = module.hidden_size, 2 if module.bidirectional else 1
    P = getattr(module, "proj_size", 0) or H  # the width of h (an LSTM's projection, else H)
    lstm = module.mode == "LSTM"
    layer_input, scans, finals_h, finals_c = x, [], [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            names = _names(layer, d == 1)
            w_ih, w_hh, b_ih, b_hh = names
            index = layer * D + d
            h_init = h0[index] if h0 is not None else x.new_zeros(B, P)
            c_init = (c0[index] if c0 is not None else x.new_zeros(B, H)) if lstm else None
            gi = F.linear(layer_input, weights[w_ih], weights.get(b_ih))
            w_hr = weights.get(_projection(layer, d == 1))
            out, cells, saved, h_n, c_n = ops.recurrent_scan(gi, weights[w_hh], weights.get(b_hh), h_init, c_init,
                                                             module.mode, d == 1, lengths, w_hr)
            scans.append(_Scan(module.mode, names, index, d == 1, layer_input, h_init, c_init, (out, cells, saved),
                               lengths, w_hr))
            finals_h.append(h_n)
            finals_c.append(c_n)
            outs.append(out)
        layer_input = torch.cat(outs, -1) if D > 1 else outs[0]
    c_n = torch.stack(finals_c) if lstm else None
    return layer_input, torch.stack(finals_h), c_n, scans


def _scan_backward(x_shape, weights: dict, scans: list, g_out, g_h, g_c, wants=(False, False, False)):
    """Step ``scans`` back from the outputs' grads (None: zero): ``(factors, x_g, h0_g, c0_g)``,
    ``factors`` as ``((weight name, bias name or None), A, G)`` per weight, and the input and
    initial states' grads where ``wants``."""
    B, T, _ = x_shape
    D = 1 + max(scan.reverse for scan in scans)
    P = scans[0].h0.shape[-1]  # the width of h
    above = g_out  # the gradient of the current layer's output [B, T, D*P]
    factors, h0_g, c0_g = [], [None] * len(scans), [None] * len(scans)
    x_g = None
    for layer in reversed(range(len(scans) // D)):
        below = None
        for scan in scans[layer * D:(layer + 1) * D]:
            w_ih, w_hh, b_ih, b_hh = scan.names
            out, cells, saved = scan.results
            g_d = above if above is None or D == 1 else above[..., int(scan.reverse) * P:(int(scan.reverse) + 1) * P]
            grad_gi, grad_gh, h0_g[scan.index], c0_g[scan.index], grad_projected = ops.recurrent_scan_backward(
                g_d if g_d is not None else out.new_zeros(B, T, P),
                None if g_h is None else g_h[scan.index], None if g_c is None else g_c[scan.index],
                weights[w_hh], scan.h0, scan.c0, out, cells, saved, scan.mode, scan.reverse, scan.lengths, scan.w_hr)
            if grad_gh.numel() == 0:  # (LSTM, RNN: the two pre-activations' gradients are one)
                grad_gh = grad_gi
            factors.append(((w_ih, b_ih), scan.layer_input, grad_gi))
            factors.append(((w_hh, b_hh), _previous_states(out, scan.h0, scan.reverse, scan.lengths), grad_gh))
            if scan.w_hr is not None:  # W_hr's input: the cell's output o * tanh(c), from what was kept
                hidden = scan.w_hr.shape[1]
                cell_out = saved[..., 3 * hidden:4 * hidden] * saved[..., 4 * hidden:]
                factors.append(((_projection(layer, scan.reverse), None), cell_out, grad_projected))
            if layer > 0 or wants[0]:
                part = _rows_times(grad_gi, weights[w_ih])
                below = part if below is None else below + part
        above = below
        if layer == 0:
            x_g = below
    h0_g = torch.stack(h0_g) if wants[1] else None
    c0_g = torch.stack(c0_g) if wants[2] else None
    return factors, x_g, h0_g, c0_g


def _previous_states(out: torch.Tensor, h0: torch.Tensor, reverse: bool, lengths=None) -> torch.Tensor:
    """``[B, T, H]``: the hidden state each step started from (W_hh's input): the previous step's
    output, or ``h0`` where there is none or it was padding (a reversed direction starts at each
    sample's own last step)."""
    shifted = torch.cat([out[:, 1:], h0[:, None]], 1) if reverse else torch.cat([h0[:, None], out[:, :-1]], 1)
    if lengths is None:
        return shifted
    T = out.shape[1]
    previous = torch.arange(T, device=out.device) + (1 if reverse else -1)
    counted = previous[None, :] < lengths.to(out.device)[:, None]  # (a step without a previous one reads h0 either way)
    return torch.where(counted[..., None], shifted, h0[:, None])


def _rows_times(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``g [B, T, G] @ w [G, k]`` as one GEMM over the rows in their stored order (the scans'
    results are time-major views), without a copy of ``g``."""
    if g.transpose(0, 1).is_contiguous():
        return (g.transpose(0, 1) @ w).transpose(0, 1)
    return g @ w


def _weight_grads(factors, wanted) -> dict[str, torch.Tensor]:
    """``{name: gradient}`` of the weights and biases among ``wanted`` from their factors
    ``((weight name, bias name), A, G)``: ``Σ G^T A`` over samples and steps, and ``Σ G``."""
    grads = {}
    for (w, b), a, g in factors:
        sums = linear_grad_sums(a, g, w in wanted, b is not None and b in wanted)
        grads.update({name: sums[kind] for name, kind in ((w, "weight"), (b, "bias")) if kind in sums})
    return grads


def _gates(module) -> int:
    return {"LSTM": 4, "GRU": 3}.get(module.mode, 1)


def _replay(module, ctx: RecurrentCall, grads):
    """The recurrence replayed from a captured call through the scans and stepped back from its
    outputs' grads: ``((weight name, bias name), A, G)`` per weight."""
    T = ctx.x.shape[1]
    grads = {name: g for name, g in zip(ctx.outputs, grads) if g is not None}  # (unused outputs: none)
    h0 = None if ctx.h0 is None else ctx.h0.float()
    c0 = None if ctx.c0 is None else ctx.c0.float()
    x = ctx.x.float().detach()
    if "out" in grads:  # batch first and padded, as x
        if ctx.packed is not None:
            grads["out"] = pad_packed_sequence(ctx.packed._replace(data=grads["out"]), batch_first=True,
                                               total_length=T)[0]
        elif not module.batch_first:
            grads["out"] = grads["out"].transpose(0, 1)
    weights = {name: p.detach().float() for name, p in module.named_parameters()}
    scans = _scan_forward(module, weights, x, h0, c0, ctx.lengths)[3]
    return _scan_backward(x.shape, weights, scans, *(_float(grads.get(k)) for k in ("out", "h", "c")))[0]


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
