"""nn.Linear (any number of leading dims): ghost, instantiate or T = 1 closed form.

Input ``[B, *, d]`` and output grad ``[B, *, p]``; all dims between the batch and the last
are flattened into T. The per-sample gradients of several calls of one module are summed by
concatenating the calls along T (``sum_k G_k^T A_k = [G_1..G_K]^T [A_1..A_K]``).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import LayerRule, RoutePlan, register
from .routes import linear_route


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
        return g.float().sum(dim=1).square().sum(dim=1) if with_bias else g.new_zeros(B, dtype=torch.float32)
    route = linear_route(B, T, d, g.shape[-1], force).route
    if route == "outer":
        w, b = ops.outer_norm(a[:, 0], g[:, 0], with_bias)
    elif route == "ghost":
        w, b = ops.ghost_norm(a, g, with_bias)
    else:
        w, b, _ = ops.instantiate_norm(a, g, with_bias)
    return w + b


@register(nn.Linear)
class LinearRule(LayerRule):
    """Rule for ``nn.Linear`` and subclasses; the route is chosen per shape by ``linear_route``."""

    def batch_size(self, module, ctx):
        return ctx.shape[0] if ctx.dim() > 1 else 1

    def capture(self, module, args, kwargs, output):
        x = args[0].detach()
        if x.dim() < 2:
            raise ValueError(f"an unbatched input of shape {tuple(x.shape)} has no sample dimension; "
                             "give the layer a batch: input [B, ..., in_features]")
        return x

    def norms(self, module, calls, tracked):
        a, g = linear_factors(calls)
        return linear_norms(a, g, "weight" in tracked, "bias" in tracked)

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        a, g = linear_factors([(ctx, (grad,))])
        return linear_route(a.shape[0], a.shape[1], a.shape[2], g.shape[2])
