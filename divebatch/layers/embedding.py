"""nn.Embedding and nn.EmbeddingBag: per-sample norms from indices and output grads, never the [V, p] gradient.

The gradient of sample b is ``sum_t onehot(idx_t) g_t``: rows of equal index add up, so its
squared norm is ``sum_{s,t: idx_s = idx_t} <g_s, g_t>`` (operator ``embedding_norm``). Rows at
``padding_idx`` get no gradient, as in ``nn.Embedding``.

An ``nn.EmbeddingBag`` reduces each bag of rows to one output row, so its samples are its bags and
bag ``b``'s gradient is rank one, ``c_b g_bᵀ`` (sum, mean): its squared norm ``||c_b||² ||g_b||²``
needs only the entries' indices and the output grads (see ``EmbeddingBagRule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from .base import LayerRule, RoutePlan, register, register_matcher, same_code
from .routes import max_extra_bytes


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


def _refuse_scale_grad_by_freq(module: nn.Module) -> None:
    if module.scale_grad_by_freq:
        raise ValueError(
            f"{type(module).__name__} with scale_grad_by_freq=True scales each row's gradient by its "
            "frequency in the whole batch, so per-sample gradients are not defined; set "
            "scale_grad_by_freq=False or freeze the embedding to track this model")


@register(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Rule for ``nn.Embedding`` (with or without ``padding_idx``; ``sparse`` gradients too).

    Embedding modules that share one weight (a seq2seq model's ``shared``, encoder and decoder
    embeddings) are one owner for the tracker: their calls are combined like the calls of one
    module, each with its own ``padding_idx`` and scale."""

    param_names = ("weight",)

    def capture(self, module, args, kwargs, output):
        _refuse_scale_grad_by_freq(module)
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
        if len(calls) > 1:  # (one call: its own tensors, not a copy of its output grad)
            idx, g = [torch.cat(idx, dim=1)], [torch.cat(g, dim=1)]
        return idx[0], g[0], -1 if padding_idx is None else padding_idx

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


@dataclass
class EmbeddingBagCall:
    """What one forward call of an ``nn.EmbeddingBag`` leaves for its rule: its bags' entries as
    ``[B, L]`` (1-D ids with offsets and nested inputs padded to the longest bag), and what each
    entry's row is multiplied by in its bag's output (computed in the backward, ``scales``). A bag is
    a sample: output row ``b`` is bag ``b``'s."""

    indices: torch.Tensor  # [B, L] int64: the row each entry looks up
    weights: torch.Tensor | None  # [B, L] per_sample_weights (sum mode), or None
    filled: torch.Tensor | None  # [B, L] bool: the entries that exist (padded layouts), or None: all
    mode: str
    padding_idx: int | None
    max_indices: torch.Tensor | None = None  # max mode: [B, p] the row each output entry was taken from
    nonempty: torch.Tensor | None = None  # max mode: [B] bool, the bags with an entry other than padding

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    def scales(self) -> torch.Tensor:
        """``[B, L]`` float32: an entry's row times this is its share of its bag's output (sum: its
        per_sample_weight or 1; mean: 1 / the bag's entries other than padding; 0 at ``padding_idx``
        and where no entry is)."""
        kept = torch.ones(self.indices.shape, dtype=torch.bool, device=self.indices.device)
        if self.filled is not None:
            kept &= self.filled
        if self.padding_idx is not None:
            kept &= self.indices != self.padding_idx
        if self.mode == "mean":
            return kept / kept.sum(1, keepdim=True).clamp_min(1)
        return kept * self.weights.float() if self.weights is not None else kept.float()


def _bag_entries(module: nn.EmbeddingBag, args: tuple, kwargs: dict):
    """``(ids, offsets, include_last_offset, per_sample_weights)`` of one call, detached: ``[B, L]`` ids
    with offsets None, or 1-D ids with offsets, as ``F.embedding_bag`` reads its arguments (nested
    inputs as their values and offsets)."""
    names = ("input", "offsets", "per_sample_weights")
    given = dict(zip(names, args))
    given.update({k: v for k, v in kwargs.items() if k in names})
    inp, offsets, weights = given.get("input"), given.get("offsets"), given.get("per_sample_weights")
    include_last = module.include_last_offset
    if not isinstance(inp, torch.Tensor):
        raise ValueError(f"{type(module).__name__} got no tensor input; pass the bags' indices")
    if inp.is_nested:
        inp, offsets, include_last = inp.values(), inp.offsets(), True
        weights = weights.values() if weights is not None else None
    elif inp.dim() == 2:
        offsets, include_last = None, False
    elif inp.dim() != 1 or not isinstance(offsets, torch.Tensor):
        raise ValueError(f"{type(module).__name__} needs [B, L] indices, or 1-D indices with offsets [B] "
                         f"(one bag per sample); got input of shape {tuple(inp.shape)}")
    detached = [t.detach() if t is not None else None for t in (inp, offsets, weights)]
    return detached[0], detached[1], include_last, detached[2]


def _padded_bags(flat: torch.Tensor, offsets: torch.Tensor, include_last: bool, weights: torch.Tensor | None):
    """1-D ids with offsets as ``([B, L] ids, [B, L] weights or None, [B, L] bool: entries that exist)``."""
    B = offsets.numel() - 1 if include_last else offsets.numel()
    end = offsets[B:B + 1] if include_last else offsets.new_tensor([flat.numel()])
    starts = offsets[:B]
    counts = (torch.cat([offsets[1:B], end]) - starts).clamp_min(0)
    L = int(counts.max()) if B else 0
    pos = torch.arange(L, device=flat.device)
    filled = pos < counts[:, None]
    where = (starts[:, None] + pos).clamp_max(max(flat.numel() - 1, 0))
    ids = flat[where].masked_fill(~filled, 0) if flat.numel() else flat.new_zeros(B, L)
    if weights is not None:
        weights = weights[where].masked_fill(~filled, 0) if flat.numel() else weights.new_zeros(B, L)
    return ids, weights, filled


@register(nn.EmbeddingBag)
class EmbeddingBagRule(LayerRule):
    """Rule for ``nn.EmbeddingBag`` (modes sum, mean and max; ``per_sample_weights``,
    ``padding_idx``, offsets with or without ``include_last_offset``, 2-D and nested inputs,
    ``sparse`` gradients): each bag is a sample, whose gradient is never formed.

    Sum and mean: bag ``b``'s gradient is ``c_b g_bᵀ``, with ``g_b`` its output grad and ``c_b`` the
    vector over rows of its entries' scales added per row, so its squared norm is
    ``||c_b||² ||g_b||²``; ``||c_b||²`` is the operator ``embedding_norm`` of the entries' indices with
    their scales as one-column rows (entries of one row add up). Over several calls, the rows of
    the bag's gradient are each entry's scale times its call's ``g_b``, given to ``embedding_norm``
    whole. Work of the size of the bags' entries and the forward's output, whatever the table's
    size. Max: each output entry ``(b, j)`` sends ``g_b[j]`` to one row, so the norm is ``||g_b||²``
    for a bag with entries (over several calls, products of output entries taken from the same row)."""

    param_names = ("weight",)

    def capture(self, module, args, kwargs, output):
        _refuse_scale_grad_by_freq(module)
        ids, offsets, include_last, weights = _bag_entries(module, args, kwargs)
        filled = None
        if offsets is not None:
            ids, weights, filled = _padded_bags(ids, offsets, include_last, weights)
        call = EmbeddingBagCall(ids, weights, filled, module.mode, module.padding_idx)
        if module.mode == "max":
            with torch.no_grad():  # which entry each output entry was taken from: PyTorch's own choice
                flat = ids.reshape(-1) if filled is None else ids[filled]
                starts = torch.arange(0, ids.numel(), max(ids.shape[1], 1), device=ids.device) if filled is None \
                    else (filled.sum(1).cumsum(0) - filled.sum(1))
                _, _, bag_size, call.max_indices = torch.embedding_bag(
                    module.weight, flat, starts[:call.batch_size], False, 2, False, None, False, module.padding_idx)
            call.nonempty = bag_size > 0
        return call

    def batch_size(self, module, ctx):
        return ctx.batch_size

    def norms(self, module, calls, tracked):
        grads = [grads[0].float() for _, grads in calls]  # [B, p] per call
        ctxs = [ctx for ctx, _ in calls]
        B = ctxs[0].batch_size
        total = grads[0].new_zeros(B)
        if ctxs[0].mode == "max":
            pairs = [(k, m) for k in range(len(calls)) for m in range(k, len(calls))]  # off-diagonal: twice
            for k, m in pairs:
                same = (ctxs[k].max_indices == ctxs[m].max_indices) & (ctxs[k].nonempty & ctxs[m].nonempty)[:, None]
                total += (2 - (k == m)) * (grads[k] * grads[m] * same).sum(1)
            return total
        if len(calls) == 1:  # ||c_b||² from the entries' scales as one-column rows, times ||g_b||²
            ctx = ctxs[0]
            return ops.embedding_norm(ctx.indices, ctx.scales()[..., None], -1) * grads[0].square().sum(1)
        # Several calls: each entry's row of the bag's gradient is its scale times its call's g_b, and
        # entries of the same row add up, as an Embedding's rows (chunks of bags, bounded memory).
        ids = torch.cat([ctx.indices for ctx in ctxs], dim=1)
        scales = torch.cat([ctx.scales() for ctx in ctxs], dim=1)
        step = max(1, int(max_extra_bytes(ids.device.type)) // (4 * max(ids.shape[1] * grads[0].shape[1], 1)))
        for start in range(0, B, step):
            part = slice(start, start + step)
            rows = torch.cat([gk[part, None, :].expand(-1, ctx.indices.shape[1], -1) for ctx, gk in zip(ctxs, grads)],
                             dim=1) * scales[part, :, None]
            total[part] = ops.embedding_norm(ids[part], rows, -1)
        return total

    def grad_sums(self, module, calls, tracked):
        total = torch.zeros(module.weight.shape, dtype=torch.float32, device=module.weight.device)
        p = total.shape[1]
        for ctx, grads in calls:
            g = grads[0].float()
            if ctx.max_indices is not None:
                cols = torch.arange(p, device=g.device)
                keep = ctx.nonempty[:, None].expand_as(g)
                total.view(-1).index_add_(0, (ctx.max_indices * p + cols)[keep], g[keep])
                continue
            scales = ctx.scales()
            step = max(1, int(max_extra_bytes(g.device.type)) // (4 * p * max(ctx.indices.shape[1], 1)))  # bags' rows
            for start in range(0, ctx.batch_size, step):
                part = slice(start, start + step)
                rows = g[part, None, :] * scales[part, :, None]
                total.index_add_(0, ctx.indices[part].reshape(-1), rows.reshape(-1, p))
        return {"weight": total}

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        B, L = ctx.indices.shape
        p = module.embedding_dim
        return RoutePlan("embedding-bag", f"B={B} L={L} p={p}", 2.0 * B * p + 2.0 * B * L * math.log2(max(L, 2)),
                         8.0 * B * L)
