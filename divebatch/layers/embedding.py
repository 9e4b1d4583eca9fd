"""nn.Embedding: per-sample norms from indices and output grads, never the [V, p] gradient.

The gradient of sample b is ``sum_t onehot(idx_t) g_t``: rows of equal index add up, so its
squared norm is ``sum_{s,t: idx_s = idx_t} <g_s, g_t>`` (operator ``embedding_norm``). Rows at
``padding_idx`` get no gradient, as in ``nn.Embedding``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from .base import LayerRule, RoutePlan, register, register_matcher, same_code


@dataclass
class EmbeddingCall:
    """What one forward call of an embedding module leaves for its rule: the indices, and how the
    module turns the looked-up rows into its output (several modules may share one weight, e.g. a
    seq2seq model's encoder and decoder embeddings, each with its own ``padding_idx`` and scale)."""

    indices: torch.Tensor
    padding_idx: int | None
    scale: float | None = None  # the output is the rows times this constant (scaled embeddings)

    @property
    def shape(self) -> torch.Size:
        return self.indices.shape

    def lookup_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of the rows looked up, from the gradient of the module's output."""
        return grad if self.scale is None else grad * self.scale


@register(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Rule for ``nn.Embedding`` (with or without ``padding_idx``; ``sparse`` gradients too).

    Embedding modules that share one weight (a seq2seq model's ``shared``, encoder and decoder
    embeddings) are one owner for the tracker: their calls are combined like the calls of one
    module, each with its own ``padding_idx`` and scale."""

    param_names = ("weight",)

    def capture(self, module, args, kwargs, output):
        if module.scale_grad_by_freq:
            raise ValueError(
                f"{type(module).__name__} with scale_grad_by_freq=True scales each row's gradient by its "
                "frequency in the whole batch, so per-sample gradients are not defined; set "
                "scale_grad_by_freq=False or freeze the embedding to track this model")
        idx = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(idx, torch.Tensor) or idx.dim() < 1:
            raise ValueError("an Embedding input without a batch dimension has no samples; pass [B, ...] indices")
        return EmbeddingCall(idx, module.padding_idx, embed_scale(module))

    @staticmethod
    def _factors(calls) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Indices ``[B, T]`` and looked-up rows' grads ``[B, T, p]`` of every call, joined along T,
        and the padding index for ``embedding_norm`` (-1 for none)."""
        pads = {ctx.padding_idx for ctx, _ in calls}
        idx, g = [], []
        for ctx, grads in calls:
            i = ctx.indices.reshape(ctx.indices.shape[0], -1)
            rows = ctx.lookup_grad(grads[0].reshape(grads[0].shape[0], -1, grads[0].shape[-1]))
            if len(pads) > 1 and ctx.padding_idx is not None:
                # Modules with different padding rows: zero grads contribute nothing to the norm.
                rows = rows.masked_fill((i == ctx.padding_idx)[..., None], 0.0)
            idx.append(i)
            g.append(rows)
        padding_idx = next(iter(pads)) if len(pads) == 1 else None
        return torch.cat(idx, dim=1), torch.cat(g, dim=1), -1 if padding_idx is None else padding_idx

    def norms(self, module, calls, tracked):
        return ops.embedding_norm(*self._factors(calls))

    def grad_sums(self, module, calls, tracked):
        idx, g, padding_idx = self._factors(calls)
        total = torch.zeros(module.weight.shape, dtype=torch.float32, device=g.device)
        total.index_add_(0, idx.reshape(-1), g.reshape(-1, g.shape[-1]).float())
        if padding_idx >= 0:
            total[padding_idx] = 0
        return {"weight": total}

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        B = ctx.shape[0]
        T = ctx.indices[0].numel()
        p = module.embedding_dim
        return RoutePlan("embedding", f"B={B} T={T} p={p}", 2.0 * B * T * p, 4.0 * T * p)


class _ScaledEmbeddingForwards(nn.Embedding):
    """The two forwards of Hugging Face's ``*ScaledWordEmbedding`` classes (Gemma 1-4, BART, mBART,
    M2M100, NLLB, Pegasus-X, XGLM, ...: 24 classes in transformers 5.24), compared by code."""

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale

    def forward_cast(self, input_ids):
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


def _is_scaled_embedding(module: nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    return (isinstance(module, nn.Embedding) and hasattr(module, "embed_scale")
            and (same_code(forward, _ScaledEmbeddingForwards.forward)
                 or same_code(forward, _ScaledEmbeddingForwards.forward_cast)))


def embed_scale(module: nn.Module) -> float | None:
    """The constant a scaled embedding's forward multiplies the rows by (rounded to the weight's
    dtype where its forward casts it), or None for a plain ``nn.Embedding``."""
    if not _is_scaled_embedding(module):
        return None
    scale = module.embed_scale
    if isinstance(scale, torch.Tensor):
        if same_code(type(module).forward, _ScaledEmbeddingForwards.forward_cast):
            scale = scale.to(module.weight.dtype)
        scale = scale.item()
    return float(scale)


@register_matcher(_is_scaled_embedding)
class ScaledEmbeddingRule(EmbeddingRule):
    """An ``nn.Embedding`` whose forward multiplies the looked-up rows by a constant ``embed_scale``
    (a number or a 0-d buffer; cast to the weight's dtype first where the forward does), matched
    by the code of its forward, not by name: the rows' gradient is the output grad times that
    constant (``EmbeddingCall.scale``), and the rest is ``nn.Embedding``'s rule (tied heads and
    weights shared with other embeddings included)."""
