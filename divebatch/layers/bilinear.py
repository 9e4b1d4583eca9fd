"""nn.Bilinear: ``y_k = x1ᵀ W_k x2 + b_k``, a linear map of the outer product ``x1 ⊗ x2``.

Sample b's weight gradient is ``sum_t g_t ⊗ x1_t ⊗ x2_t`` (``[out, in1, in2]``), never formed: its
squared norm is ``sum_{s,t} <g_s, g_t> <x1_s, x1_t> <x2_s, x2_t>``, the elementwise product of three
``T x T`` Grams summed (``||g||² ||x1||² ||x2||²`` for one row per sample), and the bias's is
``||sum_t g_t||²``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerRule, RoutePlan, batched_input, register
from .routes import max_extra_bytes


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, ..., n]`` as ``[B, T, n]``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


@register(nn.Bilinear)
class BilinearRule(LayerRule):
    """Rule for ``nn.Bilinear`` (inputs ``[B, ..., in1]`` and ``[B, ..., in2]``, any leading dims)."""

    def capture(self, module, args, kwargs, output):
        x1, x2 = (args[0], args[1]) if len(args) > 1 else (kwargs["input1"], kwargs["input2"])
        expected = "inputs [B, ..., in1_features] and [B, ..., in2_features]"
        return batched_input(x1, expected), batched_input(x2, expected)

    def batch_size(self, module, ctx):
        return ctx[0].shape[0]

    @staticmethod
    def _factors(calls):
        """``g, x1, x2`` as ``[B, T, n]`` float32, the calls' rows joined along T."""
        parts = [[_rows(grads[0]), _rows(x1), _rows(x2)] for (x1, x2), grads in calls]
        return [torch.cat([p[i] for p in parts], dim=1).float() for i in range(3)]

    def norms(self, module, calls, tracked):
        g, x1, x2 = self._factors(calls)
        B, T = g.shape[:2]
        total = g.new_zeros(B)
        if "weight" in tracked:
            if T == 1:
                total += g[:, 0].square().sum(1) * x1[:, 0].square().sum(1) * x2[:, 0].square().sum(1)
            else:
                # three [step, T, T] Grams at a time (more on CUDA, where each chunk costs launches)
                step = max(1, int(max_extra_bytes(g.device.type)) // (12 * T * T))
                for start in range(0, B, step):
                    part = slice(start, start + step)
                    grams = [f[part] @ f[part].transpose(1, 2) for f in (g, x1, x2)]
                    total[part] += (grams[0] * grams[1] * grams[2]).sum((1, 2))
        if "bias" in tracked:
            total += g.sum(1).square().sum(1)
        return total

    def grad_sums(self, module, calls, tracked):
        g, x1, x2 = (f.reshape(-1, f.shape[-1]) for f in self._factors(calls))
        sums = {}
        if "weight" in tracked:
            sums["weight"] = torch.einsum("no,ni,nj->oij", g, x1, x2)
        if "bias" in tracked:
            sums["bias"] = g.sum(0)
        return sums

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        x1, x2 = ctx
        B, T = x1.shape[0], x1[0].numel() // x1.shape[-1]
        n = module.out_features + module.in1_features + module.in2_features
        return RoutePlan("ghost" if T > 1 else "outer", f"B={B} T={T} {module.in1_features}x{module.in2_features}"
                         f"->{module.out_features}", 2.0 * B * T * T * n, 12.0 * T * T)
