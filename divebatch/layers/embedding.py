"""nn.Embedding: per-sample norms from indices and output grads, never the [V, p] gradient.

The gradient of sample b is ``sum_t onehot(idx_t) g_t``: rows of equal index add up, so its
squared norm is ``sum_{s,t: idx_s = idx_t} <g_s, g_t>`` (operator ``embedding_norm``). Rows at
``padding_idx`` get no gradient, as in ``nn.Embedding``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .base import LayerRule, RoutePlan, register, register_matcher


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

    def lookup_grad(self, module, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of the rows looked up, from the gradient of the module's output."""
        return grad

    def _factors(self, module, calls) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``[B, T]`` and looked-up rows' grads ``[B, T, p]`` of every call, joined along T."""
        idx = torch.cat([i.reshape(i.shape[0], -1) for i, _ in calls], dim=1)
        g = torch.cat([gr[0].reshape(gr[0].shape[0], -1, gr[0].shape[-1]) for _, gr in calls], dim=1)
        return idx, self.lookup_grad(module, g)

    def norms(self, module, calls, tracked):
        padding_idx = -1 if module.padding_idx is None else module.padding_idx
        return ops.embedding_norm(*self._factors(module, calls), padding_idx)

    def grad_sums(self, module, calls, tracked):
        idx, g = self._factors(module, calls)
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


class _ScaledEmbeddingForwards(nn.Embedding):
    """The two forwards of Hugging Face's ``*ScaledWordEmbedding`` classes (Gemma 1-4, BART, mBART,
    M2M100, NLLB, Pegasus-X, XGLM, ...: 24 classes in transformers 5.24), compared by code."""

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale

    def forward_cast(self, input_ids):
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


_CODE_FIELDS = ("co_code", "co_consts", "co_names", "co_varnames", "co_freevars", "co_argcount",
                "co_kwonlyargcount")


def _same_code(function, reference) -> bool:
    code = getattr(function, "__code__", None)
    return code is not None and all(getattr(code, f) == getattr(reference.__code__, f) for f in _CODE_FIELDS)


def _is_scaled_embedding(module: nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    return (isinstance(module, nn.Embedding) and hasattr(module, "embed_scale")
            and (_same_code(forward, _ScaledEmbeddingForwards.forward)
                 or _same_code(forward, _ScaledEmbeddingForwards.forward_cast)))


@register_matcher(_is_scaled_embedding)
class ScaledEmbeddingRule(EmbeddingRule):
    """An ``nn.Embedding`` whose forward multiplies the looked-up rows by a constant ``embed_scale``
    (a number or a 0-d buffer; cast to the weight's dtype first where the forward does), matched
    by the code of its forward, not by name: the rows' gradient is the output grad times that
    constant, and the rest is ``nn.Embedding``'s rule (tied heads included)."""

    def lookup_grad(self, module, grad):
        scale = module.embed_scale
        if isinstance(scale, torch.Tensor):
            if _same_code(type(module).forward, _ScaledEmbeddingForwards.forward_cast):
                scale = scale.to(module.weight.dtype)
            scale = scale.item()
        return grad * scale
