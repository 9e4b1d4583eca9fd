"""Layer inputs whose rows are a model's samples and tokens flattened together (``[B*T, d]``).

Some models flatten samples and positions into one dimension before a row-wise layer: OPT's MLP
(``hidden.reshape(-1, d)`` before ``final_layer_norm``, ``fc1`` and ``fc2``), mixture-of-experts
routers, hand-written MLP blocks. Such a layer's input has ``B*T`` rows, and nothing in its shape
says which sample each row belongs to. ``flattened_samples`` answers from the autograd graph that
produced the input: it walks back through row-wise, shape-preserving ops (activations, dropout,
casts, elementwise arithmetic whose other operands are the same rows or are broadcast over them,
a normalisation over the trailing dims) to the ``view``/``reshape`` that merged the leading dims of
a ``[B, T, ...]`` tensor. An operand broadcast over the rows must be made of parameters alone (a
layer scale, a bias), not of the rows themselves (``rows - rows.mean(0)`` mixes the samples).
Rows of such a view are sample-major: row ``r`` belongs to sample ``r // T``. Every branch must reach a merge of the same sizes; anything else (a gather, a
permutation of rows, a matmul, an unknown op, a merge whose source had its first dim moved) gives
no answer, and the layer keeps the batch of its input's first dim (and is refused by the batch
check when that disagrees with the other layers).

The tracker then calls a row-wise layer (Linear, LayerNorm, RMSNorm: ``LayerRule.rows_independent``)
with the input viewed as ``[B, T, ...]`` and views the output back to ``[B*T, ...]``: the layer
computes the same numbers, and its rule sees samples.

As everywhere in divebatch, the first dim of the merged tensor is taken to be the sample dim.
"""

from __future__ import annotations

import math

import torch

#: Backward nodes of ops that map each row of their input(s) to the same row of the output, with
#: the output's shape (elementwise ops, possibly broadcasting other operands, and norms over the
#: trailing dims). Their grad-carrying inputs are followed.
_ROW_WISE = frozenset({
    "ReluBackward0", "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0",
    "LeakyReluBackward0", "EluBackward0", "HardswishBackward0", "HardsigmoidBackward0", "SoftplusBackward0",
    "MishBackward0", "ErfBackward0", "ExpBackward0", "PowBackward0", "PowBackward1", "SqrtBackward0",
    "RsqrtBackward0", "NegBackward0", "AbsBackward0",
    "NativeDropoutBackward0", "CloneBackward0", "ToCopyBackward0", "AliasBackward0",
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1",
    "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1", "WhereBackward0",
    "NativeLayerNormBackward0", "FusedRmsNormBackward0",
})

#: Backward nodes of a view/reshape (the merge the walk looks for).
_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})

#: How many nodes one walk may visit before it gives up (no answer).
_MAX_NODES = 64


def flattened_samples(x: torch.Tensor) -> tuple[int, ...] | None:
    """The leading sizes ``(B, T1, ...)`` whose merge gave ``x``'s rows, or None.

    ``x`` is a layer input ``[N, *rest]`` with ``N = B * T1 * ...``; the answer is given only where
    the autograd graph proves the rows sample-major (see the module docstring) and ``T1 * ... > 1``.
    Costs a walk over a few graph nodes; None for a tensor without ``grad_fn``.
    """
    node = x.grad_fn
    if node is None or x.dim() < 2:
        return None
    budget = [_MAX_NODES]
    lead = _walk(node, tuple(x.shape), budget)
    return lead if lead and math.prod(lead[1:]) > 1 else None


def _walk(node, shape: tuple[int, ...], budget: list[int]) -> tuple[int, ...] | None:
    """Leading sizes merged into the rows of the tensor of ``shape`` that ``node`` produced."""
    budget[0] -= 1
    if budget[0] < 0 or node is None:
        return None
    name = type(node).__name__
    if name in _VIEWS:
        if _view_source(node) == shape and node.next_functions:
            # A view to the same shape (``rows.reshape(-1, d)`` of rows already [N, d], as a router
            # given the flattened rows does): the rows are its input's.
            return _walk(node.next_functions[0][0], shape, budget)
        return _merged_lead(node, shape)
    if name not in _ROW_WISE:
        return None
    found: tuple[int, ...] | None = None
    for child, index in node.next_functions:
        if child is None:
            continue  # an operand that carries no gradient (a constant, a scalar)
        try:
            child_shape = tuple(child._input_metadata[index].shape)
        except (AttributeError, IndexError, RuntimeError):
            return None
        if child_shape == shape:
            lead = _walk(child, shape, budget)
            if lead is None or (found is not None and lead != found):
                return None  # a same-shape operand whose rows are not proven to be the same rows
            found = lead
        elif (len(child_shape) < len(shape) or child_shape[0] == 1) and _from_parameters(child, budget):
            continue  # broadcast over the rows: the same value for every row, made of parameters alone
        else:
            return None  # e.g. a statistic over all rows (``rows - rows.mean(0)``) mixes the samples
    return found


#: Nodes whose operand without gradient may be a constant: added (``1 + w``), or, where the saved
#: operand is a number, multiplied or divided (``w * 2``). Elsewhere an operand without gradient
#: is taken to be data: ``inp(x)``'s graph shows only the Linear's parameters, not ``x``.
_CONSTANT_OPERAND = frozenset({"AddBackward0", "SubBackward0", "RsubBackward1"})
_SCALAR_OPERAND = {"MulBackward0": ("_saved_self", "_saved_other"), "DivBackward0": ("_saved_self", "_saved_other")}


def _from_parameters(node, budget: list[int]) -> bool:
    """Whether the tensor ``node`` produced is made of parameters and constants alone: ``w``,
    ``w.view(1, -1)``, ``1 + w``, ``w * 2``, but not ``rows.mean(0)`` (nor ``inp(x).mean(0)``, whose
    graph hides the data ``x``, nor anything made of an input tensor that requires grad)."""
    stack = [node]
    while stack:
        budget[0] -= 1
        node = stack.pop()
        if budget[0] < 0:
            return False
        name = type(node).__name__
        if name == "AccumulateGrad":
            if not isinstance(getattr(node, "variable", None), torch.nn.Parameter):
                return False
            continue
        children = []
        for position, (child, _) in enumerate(node.next_functions):
            if child is not None:
                children.append(child)
            elif name not in _CONSTANT_OPERAND and not _saved_scalar(node, name, position):
                return False
        if not children:
            return False  # a graph we cannot see into
        stack.extend(children)
    return True


def _saved_scalar(node, name: str, position: int) -> bool:
    """Whether the operand at ``position`` of a product or quotient ``node`` is a number."""
    attrs = _SCALAR_OPERAND.get(name)
    if attrs is None or position >= len(attrs):
        return False
    try:
        saved = getattr(node, attrs[position])
    except (AttributeError, RuntimeError):
        return False
    return isinstance(saved, torch.Tensor) and saved.dim() == 0


def _view_source(node) -> tuple[int, ...] | None:
    """The shape a view node's input had (``_saved_self_sym_sizes``), or None."""
    try:
        return tuple(int(s) for s in node._saved_self_sym_sizes)
    except (AttributeError, TypeError, RuntimeError):
        return None


def _merged_lead(node, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """For a view to ``shape`` from ``node._saved_self_sym_sizes``: the merged leading sizes."""
    source = _view_source(node)
    if source is None:
        return None
    rest = shape[1:]
    for k in range(2, len(source) - len(rest) + 1):
        if math.prod(source[:k]) == shape[0] and source[k:] == rest:
            return None if _first_dim_moved(node, len(source)) else source[:k]
    return None


def _first_dim_moved(view_node, rank: int) -> bool:
    """Whether the viewed tensor (of ``rank`` dims) came, through copies, from a permutation that
    moved its first dim (``x.transpose(0, 1).reshape(-1, d)`` merges positions first: its rows
    are not sample-major)."""
    node = view_node.next_functions[0][0] if view_node.next_functions else None
    while node is not None and type(node).__name__ in ("CloneBackward0", "ToCopyBackward0"):
        node = node.next_functions[0][0] if node.next_functions else None
    name = type(node).__name__ if node is not None else ""
    if name == "TBackward0":
        return True
    if name == "TransposeBackward0":
        return 0 in (int(node._saved_dim0) % rank, int(node._saved_dim1) % rank)
    if name == "PermuteBackward0":
        return int(node._saved_dims[0]) % rank != 0
    return False
