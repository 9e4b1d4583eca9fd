"""An Embedding weight tied to a Linear weight (a language model's input and output embeddings).

The tied matrix ``W [V, d]`` gets two parts of sample b's gradient: the embedding part
``E_b = sum_t onehot(idx_t) e_t^T`` (``e_t``: grad of the embedding output at position t) and
the output-layer part ``L_b = G_b^T A_b`` (``A_b [T_h, d]``: the Linear's input, ``G_b [T_h, V]``:
the grad of its output). Its squared norm is

    ||E_b + L_b||^2 = ||E_b||^2 + ||L_b||^2 + 2 <E_b, L_b>,

where the first two terms are what the Embedding and Linear rules already compute. The cross
term needs only the rows of ``L_b`` that the sample's tokens select:

    <E_b, L_b> = sum_t <e_t, L_b[idx_t]>,    L_b[idx_t] = sum_s G_b[s, idx_t] a_s,

so ``L_b`` (``V x d`` per sample) is never formed: ``tied_rows`` gathers ``G_b[:, idx_b]``
(``T_h x T_e``) and multiplies it into ``A_b``, ``B T_h T_e d`` multiply-adds, as cheap as the
ghost route. The rows are computed when the Linear's output grad arrives (the token indices are
known from the forward pass); the Embedding's output grad ``e`` is kept when it arrives, and the
two are paired when the backward ends.

Scaling: like every rule, these see the grads of the scaled loss ``c * sum_i l_i``; the tracker
divides by ``c**2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .routes import max_extra_bytes


@dataclass(eq=False)
class TiedEmbeddingLinear:
    """One weight shared by an ``nn.Embedding`` and an ``nn.Linear`` (tracker bookkeeping).

    ``embedding`` and ``linear`` are the tracker's owners of the two modules; ``key`` is the
    ``GradNormStats.per_layer`` entry that receives the cross term ``2 <E_b, L_b>`` (it can be
    negative; the entries still sum to ``per_sample``); ``embedding_calls`` are weak references to
    the Embedding's forward calls captured since the last backward, whose token indices select
    rows of ``L_b``.
    """

    embedding: object
    linear: object
    key: str
    embedding_calls: list = field(default_factory=list)


def tied_rows(a: torch.Tensor, g: torch.Tensor, indices: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """Rows of the Linear's per-sample weight gradient selected by the Embedding's tokens.

    Args:
        a: the Linear's input ``[B, T_h, d]``.
        g: the grad of the Linear's output ``[B, T_h, V]``.
        indices: the Embedding's token indices ``[B, ...]`` (flattened to ``[B, T_e]``).
        padding_idx: positions holding this index get a zero row (``nn.Embedding`` gives that row
            no gradient, so it has no cross term); None for no padding.

    Returns:
        float32 ``[B, T_e, d]``: row t of sample b is ``L_b[idx_bt] = sum_s g[b, s, idx_bt] a[b, s]``.
        Computed in sample chunks whose ``T_h x T_e`` gather fits ``routes.max_extra_bytes``
        (``DIVEBATCH_MAX_EXTRA_MB``; on CUDA ``DIVEBATCH_CUDA_MAX_EXTRA_MB``).
    """
    B, T_h, d = a.shape
    idx = indices.reshape(B, -1).long()
    T_e = idx.shape[1]
    rows = torch.empty(B, T_e, d, dtype=torch.float32, device=a.device)
    chunk = max(1, int(max_extra_bytes(a.device.type) // max(1, 4 * T_h * T_e)))
    for start in range(0, B, chunk):
        stop = min(B, start + chunk)
        picked = g[start:stop].gather(2, idx[start:stop, None, :].expand(-1, T_h, -1))  # [b, T_h, T_e]
        torch.bmm(picked.float().transpose(1, 2), a[start:stop].float(), out=rows[start:stop])
    if padding_idx is not None:
        rows.masked_fill_((idx == padding_idx)[..., None], 0.0)
    return rows


def tied_cross(rows: torch.Tensor, embedding_grad: torch.Tensor) -> torch.Tensor:
    """``<E_b, L_b>`` per sample, float32 ``[B]``, from ``tied_rows`` and the Embedding's output grad."""
    B, T_e, d = rows.shape
    e = embedding_grad.reshape(B, T_e, d).float()
    return torch.bmm(rows.reshape(B, 1, T_e * d), e.reshape(B, T_e * d, 1)).reshape(B)
