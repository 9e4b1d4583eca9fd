"""nn.Linear (any number of leading dims): ghost, instantiate or T = 1 closed form.

Input ``[B, *, d]`` and output grad ``[B, *, p]``; all dims between the batch and the last
are flattened into T. The per-sample gradients of several calls of one module are summed by
concatenating the calls along T (``sum_k G_k^T A_k = [G_1..G_K]^T [A_1..A_K]``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import routes
from .base import LayerRule, RoutePlan, batched_input, fused_sink_grads, register
from .routes import MAX_EXTRA_BYTES, linear_route, linear_route_name
from .rows import is_time_major_view


def linear_factors(calls) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the (A, G) of every call into ``A [B, T, d]``, ``G [B, T, p]``."""
    a_parts, g_parts = [], []
    for a, grads in calls:
        g = grads[0]
        a_parts.append(a.reshape(a.shape[0], -1, a.shape[-1]))
        g_parts.append(g.reshape(g.shape[0], -1, g.shape[-1]))
    if len(calls) == 1:
        return a_parts[0], g_parts[0]
    return torch.cat(a_parts, dim=1), torch.cat(g_parts, dim=1)


def linear_norms(a: torch.Tensor, g: torch.Tensor, with_weight: bool, with_bias: bool,
                 force: str | None = None) -> torch.Tensor:
    """Per-sample squared norm [B] of a linear map's weight (and bias) gradient from A, G."""
    B, T, d = a.shape
    if not with_weight:
        if not with_bias:
            return g.new_zeros(B, dtype=torch.float32)
        return g.sum(dim=1, dtype=torch.float32).square().sum(dim=1)
    route = (linear_route(B, T, d, g.shape[-1], force).route if force
             else linear_route_name(B, T, d, g.shape[-1], a.device.type))
    if route == "outer":
        w, b = ops.outer_norm(a[:, 0], g[:, 0], with_bias)
    elif route == "ghost":
        w, b = ops.ghost_norm(a, g, with_bias)
    else:
        w, b, _ = ops.instantiate_norm(a, g, with_bias)
    return w + b if with_bias else w  # (b is zeros: on a GPU an add is a launch)


def linear_grad_sums(a: torch.Tensor, g: torch.Tensor, with_weight: bool, with_bias: bool) -> dict:
    """``{"weight": sum_b G_b^T A_b [p, d], "bias": sum_b,t G_b[t] [p]}`` in float32 (what is tracked)."""
    a2, g2 = row_matrices(a, g)
    if g2.dtype != a2.dtype:  # autocast: a float32 input with a half output grad
        g2, a2 = g2.float(), a2.float()
    sums = {}
    if with_weight:
        # In the inputs' dtype, as autograd's own weight gradient (BLAS accumulates half in float32):
        # no float32 copy of a [B*T, p] output grad, which for a vocabulary head is the largest tensor.
        sums["weight"] = g2.t().matmul(a2).float()
    if with_bias:
        sums["bias"] = g2.sum(dim=0, dtype=torch.float32)
    return sums


@register(nn.Linear)
class LinearRule(LayerRule):
    """Rule for ``nn.Linear`` and subclasses; the route is chosen per shape by ``linear_route``."""

    rows_independent = True

    def batch_size(self, module, ctx):
        return ctx.shape[0] if ctx.dim() > 1 else 1

    def capture(self, module, args, kwargs, output):
        return batched_input(args[0], "input [B, ..., in_features]")

    def norms(self, module, calls, tracked):
        a, g = linear_factors(calls)
        return linear_norms(a, g, "weight" in tracked, "bias" in tracked)

    def grad_sums(self, module, calls, tracked):
        sums = linear_grad_sums(*linear_factors(calls), "weight" in tracked, "bias" in tracked)
        if "weight" in sums and self.weight_out_in(module) is not module.weight:
            sums["weight"] = sums["weight"].t()  # stored [in, out] (Conv1D)
        return sums

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        a, g = linear_factors([(ctx, (grad,))])
        return linear_route(a.shape[0], a.shape[1], a.shape[2], g.shape[2], device_type=a.device.type)

    def can_fuse(self, module, tracked) -> bool:
        """The fused path needs the weight tracked and a plain ``nn.Linear`` forward."""
        return "weight" in tracked and type(module).forward is nn.Linear.forward

    def out_features(self, module) -> int:
        """``p``, the width of the layer's output."""
        return module.out_features

    def weight_out_in(self, module) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view), the layout ``F.linear`` takes."""
        return module.weight

    def fuse_call(self, module, x) -> bool:
        """Fuse only where it saves work: T > 1 and the fused instantiate route applies. (With
        T = 1 the closed form is nearly free and autograd's own GEMM is as good as ours.)"""
        if x.dim() < 2:
            return False
        B, d = x.shape[0], x.shape[-1]
        T = x.numel() // max(1, B * d)
        p = self.out_features(module)
        if T == 1 or linear_route_name(B, T, d, p, x.device.type) == "outer":
            return False
        return fused_linear_route_name(B, T, d, p, x.device.type) == "fused-instantiate"

    def fused_forward(self, module, args, kwargs, sink):
        return fused_linear(args[0], self.weight_out_in(module), module.bias, sink)

    def fused_grads(self, module, x, g, tracked):
        return fused_linear_grads(module, x, g, tracked)

    def fused_plan(self, module, x, tracked) -> RoutePlan:
        B = x.shape[0]
        return fused_linear_route(B, x[0].numel() // x.shape[-1], x.shape[-1], self.out_features(module),
                                  x.device.type)


@register("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(LinearRule):
    """Rule for Hugging Face's ``Conv1D`` (GPT-2's attention and MLP projections): a linear map
    with the weight stored ``[in, out]``, ``y = x @ W + b``. Its per-sample weight gradient is the
    transpose of ``nn.Linear``'s, with the same norm, so the same routes apply; the fused path runs
    ``F.linear`` on the transposed view, and autograd transposes the weight gradient back."""

    def can_fuse(self, module, tracked) -> bool:
        """Fused only for the stock ``Conv1D.forward`` (``addmm(bias, x, weight)``)."""
        forward = type(module).forward
        return ("weight" in tracked and module.bias is not None and forward.__qualname__ == "Conv1D.forward"
                and forward.__module__ == "transformers.pytorch_utils")

    def out_features(self, module) -> int:
        return module.weight.shape[1]

    def weight_out_in(self, module) -> torch.Tensor:
        return module.weight.t()


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias, sink) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through ``_FusedLinear`` (same numbers, same call).

    For a ``[B, T, d]`` input ``F.linear`` returns a view of its 2-D product. A view made *inside*
    a custom autograd function may not be modified in place (``y = fc(x); y += x`` would raise), so
    the function returns the product itself and the view is made here, outside it, as in
    ``nn.Linear``.
    """
    out = _FusedLinear.apply(x, weight, bias, sink)
    if is_time_major_view(x):  # (the product of the stored [T, B, ...] rows, see _FusedLinear)
        return out.view(x.shape[1], x.shape[0], *x.shape[2:-1], out.shape[-1]).transpose(0, 1)
    return out if out.dim() == x.dim() else out.view(*x.shape[:-1], out.shape[-1])


class _FusedLinear(torch.autograd.Function):
    """``F.linear`` whose backward also yields per-sample weight/bias norms (use ``fused_linear``).

    The weight gradient ``sum_b G_b^T A_b`` is taken from the same per-sample tiles that give the
    norms (operator ``instantiate_norm``), so autograd's own weight-gradient GEMM is replaced,
    not repeated. ``sink(x, g)`` (from the tracker) returns ``(grad_weight, grad_bias)``, or
    ``(None, None)`` when it wants the plain gradients (e.g. a module called several times).
    Returns ``F.linear``'s output, or the 2-D product it is a view of (see ``fused_linear``).

    A ``[B, T, ...]`` view of a sequence-first ``[T, B, ...]`` input (``is_time_major_view``) is
    multiplied in its stored row order, so neither it nor the output is copied: the product holds
    the ``[T, B, ...]`` rows, and its gradient and the input's stay time-major too.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sink):
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        ctx.has_bias = bias is not None
        ctx.time_major = is_time_major_view(x)
        out = F.linear(x.transpose(0, 1) if ctx.time_major else x, weight, bias)
        base = out._base
        return base if base is not None and base.numel() == out.numel() and base.is_contiguous() else out

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        if ctx.time_major:  # the product's rows are [T, B, ...]: its grad viewed as the [B, T, p] output's
            rows = g.reshape(x.shape[1], x.shape[0], *x.shape[2:-1], g.shape[-1])
            g = rows.transpose(0, 1)
            grad_x = rows.matmul(weight).transpose(0, 1) if ctx.needs_input_grad[0] else None
        else:
            g = g.reshape(*x.shape[:-1], g.shape[-1])  # the product's grad, as the [B, T, p] output's
            grad_x = g.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w, grad_b = fused_sink_grads(ctx.sink, x, g)
        if grad_w is None and ctx.needs_input_grad[1]:
            x2, g2 = row_matrices(x, g)
            grad_w = g2.t().matmul(x2)
        if grad_b is None and ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = (rows if ctx.time_major else g).reshape(-1, g.shape[-1]).sum(dim=0)
        return grad_x, grad_w, grad_b, None


def fused_linear_grads(module: nn.Linear, x: torch.Tensor, g: torch.Tensor, tracked) -> tuple:
    """``(per-sample sq [B], grad_weight, grad_bias)`` of one call, sharing work between them."""
    a = x.reshape(x.shape[0], -1, x.shape[-1])
    gg = g.reshape(g.shape[0], -1, g.shape[-1])
    sq, grad_w = linear_norms_and_weight_grad(a, gg, "bias" in tracked)
    grad_b = gg.sum(dim=(0, 1)).to(module.bias.dtype) if module.bias is not None else None
    return sq, grad_w.to(module.weight.dtype), grad_b


def linear_norms_and_weight_grad(a: torch.Tensor, g: torch.Tensor, with_bias: bool) -> tuple:
    """``(per-sample sq [B], Σ_b G_b^T A_b [p, d])`` of a linear map's weight (and bias) gradient
    from ``A [B, T, d]``, ``G [B, T, p]``, for a backward that forms the weight gradient itself: the
    fused instantiate route's per-sample tiles add up to it (``fused_linear_route``), otherwise it is
    one GEMM (in the inputs' dtype, as autograd's) beside the norms' route."""
    route = fused_linear_route_name(a.shape[0], a.shape[1], a.shape[2], g.shape[2], a.device.type)
    if route == "fused-instantiate":
        w_sq, b_sq, grad_w = ops.instantiate_norm(a, g, with_bias)
    else:
        w_sq, b_sq = (ops.outer_norm(a[:, 0], g[:, 0], with_bias) if route == "outer"
                      else ops.ghost_norm(a, g, with_bias))
        a2, g2 = row_matrices(a, g)
        grad_w = g2.t().matmul(a2)
    return (w_sq + b_sq if with_bias else w_sq), grad_w


def row_matrices(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [B, T, d]``, ``G [B, T, p]`` as ``[B*T, d]``, ``[B*T, p]`` row matrices in one shared row
    order: time-major when ``G`` is stored so (a recurrent scan's gradients), so that only ``A``,
    the narrower, may be copied."""
    if not g.is_contiguous() and g.transpose(0, 1).is_contiguous():
        a, g = a.transpose(0, 1), g.transpose(0, 1)
    return a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])


#: Cost on CPU of one per-sample gradient element in the fused instantiate route, in the ghost
#: route's flop units (``linear_route``): the C++ kernel writes each sample's ``p x d`` tile, squares
#: it and adds it to the weight gradient, three passes over memory that a rank-``T`` product with
#: few positions cannot hide. Its GEMM flops cost what autograd's weight-gradient GEMM costs, which
#: it replaces. Fitted to the 77 shapes where the hook route would take the Gram route (B = 16-64,
#: T = 2-128, d, p = 64-4096; 2 threads, timed interleaved): the model picks the faster path on 74;
#: the 3 misses cost 1.04-1.18x. Without it, T = 4 with d x p = 256 x 1024 (a ConvNeXt's last stage)
#: took 1.7 ms fused against 0.25 ms by the hooks.
FUSED_TILE_COST = 5.0


#: Extra cost on CUDA of the fused instantiate route (Triton) per flop of the weight-gradient GEMM
#: it replaces, in the ghost route's flop units (``B T^2 (d + p)``). The first H200 run
#: (``bench/results/gpu/2026-12-04-h200/bench_kernels.json``, bfloat16) measured, per shape, the
#: fused kernel's time beyond the GEMM's against the ghost kernel's; in these units that ratio was
#: 0.52 and 0.70 (seq-large up and down), 0.34 (B 16, T 128, 256 -> 1024), 2.5 (conv-layer1) and
#: 0.23 (conv-layer4). This is their geometric mean; any value in (0.31, 27) picks the faster
#: route on all five (``test_cuda_fused_route_agrees_with_the_h200_timings``).
FUSED_CUDA_EXTRA_COST = 0.6

#: Largest weight (``p x d`` entries) the fused route takes on CUDA: the largest whose weight
#: gradient the H200 run verified at full size (conv-layer4, 4608 x 512, within 3e-7). At p x d
#: = 2^26 the kernel's weight gradient deviated by 1.6e-2 (cause open, docs/kernels.md), so larger
#: layers keep autograd's GEMM and take the ghost route until a GPU run clears them.
FUSED_CUDA_MAX_WEIGHT = 4608 * 512


def fused_linear_route(B: int, T: int, d: int, p: int, device_type: str = "cpu") -> RoutePlan:
    """Route for the fused path: instantiating replaces the weight-gradient GEMM, so it costs only
    what it adds to that GEMM.

    On CPU (and on CUDA without Triton) it wins over the hook route where its per-thread ``p x d``
    buffer fits ``MAX_EXTRA_BYTES`` and, on CPU, where writing the per-sample tiles
    (``FUSED_TILE_COST`` each) costs less than the Gram route (few positions ``T`` against wide
    layers favour the Gram route; see ``linear_route``). On CUDA the Triton kernel keeps each tile
    in registers: it wins up to ``FUSED_CUDA_MAX_WEIGHT`` where ``FUSED_CUDA_EXTRA_COST`` per GEMM
    flop undercuts the ghost route; its extra memory is the float32 weight gradient."""
    plan = linear_route(B, T, d, p, device_type=device_type)
    if plan.route == "outer":
        return plan
    inst = linear_route(B, T, d, p, force="instantiate", device_type=device_type)
    if routes.triton_kernels(device_type):
        extra = FUSED_CUDA_EXTRA_COST * inst.flops
        if d * p > FUSED_CUDA_MAX_WEIGHT or extra >= plan.alternatives["ghost"]:
            return plan
        return RoutePlan("fused-instantiate", inst.shape, extra, 4.0 * p * d, plan.alternatives)
    if inst.extra_bytes > MAX_EXTRA_BYTES:
        return plan
    tiles = FUSED_TILE_COST * B * d * p
    if plan.route == "ghost" and tiles >= plan.flops:
        return plan
    return RoutePlan("fused-instantiate", inst.shape, tiles, inst.extra_bytes, plan.alternatives)


@functools.lru_cache(maxsize=4096)
def _fused_route_name(B: int, T: int, d: int, p: int, device_type: str, *model_state) -> str:
    return fused_linear_route(B, T, d, p, device_type).route


def fused_linear_route_name(B: int, T: int, d: int, p: int, device_type: str = "cpu") -> str:
    """``fused_linear_route(...).route``, memoised (asked at every call of every fusable layer);
    the key holds all the model reads besides the shape, so a changed constant or backend counts."""
    return _fused_route_name(B, T, d, p, device_type, routes.triton_kernels(device_type), torch.get_num_threads(),
                             FUSED_TILE_COST, FUSED_CUDA_EXTRA_COST, FUSED_CUDA_MAX_WEIGHT, MAX_EXTRA_BYTES,
                             routes.CUDA_MAX_EXTRA_BYTES)


