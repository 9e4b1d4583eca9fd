"""nn.PReLU: a learned slope per channel (or one for all), applied elementwise.

``y = x`` where ``x >= 0``, ``y = w_c x`` elsewhere, so sample b's gradient of ``w_c`` is the sum of
``g x`` over its negative inputs of channel ``c`` (every position of the sample for one shared
slope). That is ``C`` numbers per sample, formed outright in float32.
"""

from __future__ import annotations

from torch import nn

from .base import PerSampleGradsRule, RoutePlan, batched_input, register


@register(nn.PReLU)
class PReLURule(PerSampleGradsRule):
    """Rule for ``nn.PReLU`` (``num_parameters`` 1 or the channels, dim 1 of a ``[B, C, ...]`` input)."""

    param_names = ("weight",)

    def capture(self, module, args, kwargs, output):
        return batched_input(args[0], "input [B, C, ...]")

    def per_sample_grads(self, module, calls, tracked):
        total = None
        for x, grads in calls:
            contrib = (grads[0].float() * x.float()).masked_fill_(x >= 0, 0.0)
            if module.num_parameters == 1:
                part = contrib.reshape(x.shape[0], -1).sum(1, keepdim=True)
            else:
                part = contrib.reshape(x.shape[0], x.shape[1], -1).sum(2)
            total = part if total is None else total + part
        return {"weight": total}

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        return RoutePlan("instantiate", "x".join(map(str, ctx.shape)), 3.0 * ctx.numel(), 4.0 * ctx.numel())
