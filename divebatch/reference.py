"""Plain-PyTorch reference implementations of every ``divebatch::*`` operator.

These are the oracle the C++ and Triton implementations are tested against, and the
implementation that runs on any device without a compiled one. They favour clarity over
speed, but still never build a whole ``B x T x T`` Gram for more than ``_TILE`` rows at once.

Shapes (per sample ``b``): ``a`` is a layer input ``[B, T, d]``, ``g`` the gradient of the
loss with respect to the layer output ``[B, T, p]``; the per-sample weight gradient of a
linear map is ``g_b^T a_b`` (``p x d``). Every result is float32, accumulated in float32
whatever the input dtype. No scaling is applied: the caller divides by ``c**2`` (DESIGN §2).
"""

from __future__ import annotations

import torch

_TILE = 256


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _bias_sq(g: torch.Tensor, with_bias: bool) -> torch.Tensor:
    if not with_bias:
        return torch.zeros(g.shape[0], dtype=torch.float32, device=g.device)
    return _f32(g).sum(dim=1).square().sum(dim=1)


def ghost_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool):
    """Per-sample ``||g_b^T a_b||_F^2`` by the Gram ("ghost norm") identity.

    ``||g_b^T a_b||^2 = <a_b a_b^T, g_b g_b^T>``, summed over ``_TILE x _TILE`` tile pairs of the
    ``T x T`` Grams so the whole Gram is never held. Returns ``(weight_sq [B], bias_sq [B])``,
    where ``bias_sq = ||sum_t g_b[t]||^2`` (zeros when ``with_bias`` is False).
    """
    a32, g32 = _f32(a), _f32(g)
    B, T, _ = a32.shape
    weight_sq = torch.zeros(B, dtype=torch.float32, device=a.device)
    for i in range(0, T, _TILE):
        ai, gi = a32[:, i:i + _TILE], g32[:, i:i + _TILE]
        for j in range(i, T, _TILE):
            aj, gj = a32[:, j:j + _TILE], g32[:, j:j + _TILE]
            block = (torch.bmm(ai, aj.transpose(1, 2)) * torch.bmm(gi, gj.transpose(1, 2))).sum(dim=(1, 2))
            # Off-diagonal tile pairs stand for themselves and their transpose.
            weight_sq += block if i == j else 2.0 * block
    return weight_sq, _bias_sq(g, with_bias)


def instantiate_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool):
    """Per-sample ``||g_b^T a_b||_F^2`` by forming each ``p x d`` per-sample gradient.

    Returns ``(weight_sq [B], bias_sq [B], weight_grad_sum [p, d])``; ``weight_grad_sum`` is
    ``sum_b g_b^T a_b``, i.e. the weight gradient of the (unscaled) summed loss.
    """
    a32, g32 = _f32(a), _f32(g)
    per_sample = torch.bmm(g32.transpose(1, 2), a32)  # [B, p, d]
    weight_sq = per_sample.square().sum(dim=(1, 2))
    return weight_sq, _bias_sq(g, with_bias), per_sample.sum(dim=0)


def outer_norm(a: torch.Tensor, g: torch.Tensor, with_bias: bool):
    """T = 1 closed form: ``||g_b a_b^T||^2 = ||a_b||^2 ||g_b||^2`` for ``a [B, d]``, ``g [B, p]``.

    Returns ``(weight_sq [B], bias_sq [B])`` with ``bias_sq = ||g_b||^2``.
    """
    g_sq = _f32(g).square().sum(dim=1)
    weight_sq = _f32(a).square().sum(dim=1) * g_sq
    bias_sq = g_sq if with_bias else torch.zeros_like(g_sq)
    return weight_sq, bias_sq


def embedding_norm(indices: torch.Tensor, g: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Per-sample squared norm of an embedding table's gradient.

    ``indices [B, T]`` (int64), ``g [B, T, p]``: ``||sum_t onehot(idx_t) g_t||^2`` =
    ``sum_{s,t: idx_s = idx_t} <g_s, g_t>``. Positions whose index equals ``padding_idx``
    (a non-negative row, or -1 for none) contribute nothing, as in ``nn.Embedding``.
    """
    B, T = indices.shape
    g32 = _f32(g).reshape(B * T, g.shape[-1])  # (T = 0: an EmbeddingBag's empty bags)
    sample = torch.arange(B, device=g.device).repeat_interleave(T)
    idx = indices.reshape(-1).long()
    keep = idx != padding_idx if padding_idx >= 0 else torch.ones_like(idx, dtype=torch.bool)
    sample, idx, g32 = sample[keep], idx[keep], g32[keep]
    # One row per distinct (sample, index) pair: the per-sample gradient's non-zero rows.
    pairs = torch.stack([sample, idx], dim=1)
    unique_pairs, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    rows = torch.zeros(unique_pairs.shape[0], g32.shape[1], dtype=torch.float32, device=g.device)
    rows.index_add_(0, inverse, g32)
    out = torch.zeros(B, dtype=torch.float32, device=g.device)
    out.index_add_(0, unique_pairs[:, 0], rows.square().sum(dim=1))
    return out
