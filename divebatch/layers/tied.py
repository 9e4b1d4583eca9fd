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

The Linear may also be no module at all: code that applies the Embedding's weight itself as the
output layer (``F.linear(h, self.wte.weight)``, ``h @ self.wte.weight.t()``, ``torch.einsum("btd,vd->btv",
h, self.wte.weight)``: OLMo, x-transformers, many hand-written GPTs). ``TableProducts`` runs such a
product, while the forward of the module whose code holds it runs, as a call of an ``nn.Linear`` that
shares the weight (``output_layer``, not part of the model), which the tracker pairs with the
Embedding as above.

Scaling: like every rule, these see the grads of the scaled loss ``c * sum_i l_i``; the tracker
divides by ``c**2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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


def output_layer(weight: nn.Parameter) -> nn.Linear:
    """An ``nn.Linear`` without bias whose weight is ``weight`` (an Embedding's ``[V, d]`` table),
    outside the model: the module the tracker sees a product with the table as (``TableProducts``)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = weight
    return layer


#: Ops that may transpose a 2-D table: ``w.t()``, ``w.T``, ``w.mT``, ``w.transpose(0, 1)``, ``w.permute(1, 0)``.
_TRANSPOSES = frozenset({torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__,
                         torch.Tensor.transpose, torch.transpose, torch.Tensor.permute, torch.permute})
_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__})
_PRODUCTS = _MATMULS | {F.linear, torch.einsum}


class TableProducts(TorchFunctionMode):
    """Entered around the forward of a module whose code applies an Embedding's ``weight`` itself
    as a product's matrix: each product of rows with it, ``F.linear(x, weight)`` (no bias),
    ``x @ weight.t()`` (``.T``, ``.mT``, ``.transpose(0, 1)``; ``torch.matmul``) or ``torch.einsum``
    with the equation of a linear map (``"...d,vd->...v"``, either operand first), runs as
    ``output_layer(x)``: the same op on the same tensors (``F.linear`` without bias is
    ``matmul(x, weight.t())``; an einsum's sum is ordered as the matmul's, equal within rounding),
    whose call the tracker captures as a Linear's. Any other use of the weight runs as it is
    (its gradient, then unaccounted, is refused by the tracker's check). ``x`` must have 2 or more
    dims (a single row is no batch)."""

    def __init__(self, weight: nn.Parameter, layer: nn.Linear):
        super().__init__()
        self.weight = weight
        self.layer = layer
        self.transposed: dict[int, torch.Tensor] = {}  # id -> transposed views of the weight taken in this forward
        self.paused = 0  # submodule calls in progress, during which the mode is off the stack (the tracker's)

    def __exit__(self, *exc):
        self.transposed.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            x = self._rows(func, args, kwargs)
            return func(*args, **kwargs) if x is None else self.layer(x)
        out = func(*args, **kwargs)
        if func in _TRANSPOSES and args and args[0] is self.weight and _swaps_two_dims(func, args[1:], kwargs):
            self.transposed[id(out)] = out
        return out

    def _is_transposed(self, t) -> bool:
        return self.transposed.get(id(t)) is t

    def _rows(self, func, args, kwargs) -> torch.Tensor | None:
        """The rows ``x`` of a product ``x @ weight.t()``, or None where the op is not one."""
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args), **kwargs)
            x = bound.get("input")
            if bound.get("weight") is not self.weight or bound.get("bias") is not None:
                return None
        elif func in _MATMULS and len(args) == 2 and not kwargs:
            x = args[0]
            if not self._is_transposed(args[1]):
                return None
        elif func is torch.einsum and not kwargs:
            x = self._einsum_rows(args)
        else:
            return None
        return x if isinstance(x, torch.Tensor) and x.dim() >= 2 and x is not self.weight else None

    def _einsum_rows(self, args) -> torch.Tensor | None:
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            equation, operands = args[0], list(args[1])
        else:
            equation, operands = args[0], list(args[1:])
        if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
            return None
        inputs, output = equation.replace(" ", "").split("->")
        subscripts = inputs.split(",")
        if len(subscripts) != 2 or sum(o is self.weight for o in operands) != 1:
            return None
        w = 0 if operands[0] is self.weight else 1
        rows, table = subscripts[1 - w], subscripts[w]
        if len(table) != 2 or not table.isalpha():
            return None
        v, d = table
        # x's last index is the one summed over (d), the table's other index (v) replaces it.
        if v == d or not rows.endswith(d) or rows.count(d) != 1 or v in rows or output != rows[:-1] + v:
            return None
        return operands[1 - w]


def _swaps_two_dims(func, args, kwargs) -> bool:
    """Whether a transpose op with these arguments (after the tensor) swaps a 2-D tensor's dims."""
    if func in (torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__):
        return True
    dims = list(args) + list(kwargs.values())
    if func in (torch.Tensor.permute, torch.permute) and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if not all(isinstance(dim, int) for dim in dims) or len(dims) != 2:
        return False
    dims = [dim % 2 for dim in dims]
    return dims == [1, 0] if func in (torch.Tensor.permute, torch.permute) else dims[0] != dims[1]
