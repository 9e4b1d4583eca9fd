"""nn.Embedding: per-sample norms from indices and output grads, never the [V, p] gradient.

The gradient of sample b is ``sum_t onehot(idx_t) g_t``: rows of equal index add up, so its
squared norm is ``sum_{s,t: idx_s = idx_t} <g_s, g_t>`` (operator ``embedding_norm``). Rows at
``padding_idx`` get no gradient, as in ``nn.Embedding``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import LayerRule, RoutePlan, register


@register(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Rule for ``nn.Embedding`` (with or without ``padding_idx``; ``sparse`` gradients too)."""

    param_names = ("weight",)

    def capture(self, module, args, kwargs, output):
        if module.scale_grad_by_freq:
            raise ValueError(
                f"{type(module).__name__} with scale_grad_by_freq=True scales each row's gradient by its "
                "frequency in the whole batch, so per-sample gradients are not defined; set "
                "scale_grad_by_freq=False or freeze the embedding to track this model")
        idx = args[0]
        if idx.dim() < 1:
            raise ValueError("an Embedding input without a batch dimension has no samples; pass [B, ...] indices")
        return idx

    @staticmethod
    def _factors(calls) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``[B, T]`` and output grads ``[B, T, p]`` of every call, joined along T."""
        idx = torch.cat([i.reshape(i.shape[0], -1) for i, _ in calls], dim=1)
        g = torch.cat([gr[0].reshape(gr[0].shape[0], -1, gr[0].shape[-1]) for _, gr in calls], dim=1)
        return idx, g

    def norms(self, module, calls, tracked):
        padding_idx = -1 if module.padding_idx is None else module.padding_idx
        return ops.embedding_norm(*self._factors(calls), padding_idx)

    def grad_sums(self, module, calls, tracked):
        idx, g = self._factors(calls)
        total = torch.zeros(module.weight.shape, dtype=torch.float32, device=g.device)
        total.index_add_(0, idx.reshape(-1), g.reshape(-1, g.shape[-1]).float())
        if module.padding_idx is not None:
            total[module.padding_idx] = 0
        return {"weight": total}

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        B = ctx.shape[0]
        T = ctx[0].numel()
        p = module.embedding_dim
        return RoutePlan("embedding", f"B={B} T={T} p={p}", 2.0 * B * T * p, 4.0 * T * p)
