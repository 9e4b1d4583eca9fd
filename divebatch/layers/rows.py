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
Rows of such a view are sample-major: row ``r`` belongs to sample ``r // T``. Every branch must
reach a merge of the same samples; anything else (a gather, a permutation of rows, a matmul over
the rows, an unknown op, a merge whose source had its first dim moved) gives no answer, and the
layer keeps the batch of its input's first dim (and is refused by the batch check when that
disagrees with the other layers).

Windows folded into the batch dim (Swin's ``[B * windows, N, C]``) need more than the first merge:
the walk carries the dim that holds the rows through transposes, permutes and ``unbind``/``select``
(``q, k, v = qkv.view(...).permute(2, 0, ...)``), follows views that keep or split the first dim
(a view keeps the elements' row-major order, so rows that were sample-major stay so under any view
whose first dim is a multiple of B), per-row reductions kept as size 1 (``F.normalize``'s norm),
and the attention's products (``bmm``, the SDPA kernels, a softmax over another dim). At a merge it
first tries to prove the merged tensor's own rows (the attention's ``[windows, heads]`` merge is
then the images', not the windows'), and only where the graph does not tell falls back on the
assumption below; where the walk shows the rows came from another dim (``_NOT_NATIVE``), it does
not. A merge of the batch the tracker already knows needs no such walk.
Tensors the tracker knows to be shared by all samples (the outputs its watchers follow) count, like
parameters, as carrying no sample's data.

The tracker then calls a row-wise layer (Linear, LayerNorm, RMSNorm: ``LayerRule.rows_independent``)
with the input viewed as ``[B, T, ...]`` and views the output back to ``[B*T, ...]``: the layer
computes the same numbers, and its rule sees samples.

As everywhere in divebatch, the first dim of the merged tensor is taken to be the sample dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .base import suspend_capture

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
    "ClampMinBackward0", "ClampMaxBackward0", "ClampBackward0", "ClampBackward1",
    "MaskedFillBackward0",  # (a constant mask: DeBERTa's attention scores)
})

#: Backward nodes of batch norms (row-wise in eval mode only).
_BATCH_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"})

#: Backward nodes of a view/reshape (the merge the walk looks for).
_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})

#: Backward nodes of autograd Functions that return their tensor inputs unchanged, output ``i``
#: being input ``i`` (FSDP2's ``fully_shard`` puts one on each sharded module's inputs, to learn
#: when that module's backward is over).
_PASS_THROUGH = frozenset({"RegisterPostBackwardFunctionBackward"})

#: Graph nodes of tensors shared by all samples, during one ``flattened_samples`` walk.
_SHARED: contextvars.ContextVar[tuple] = contextvars.ContextVar("divebatch_shared_nodes", default=(frozenset(), None))

#: During a ``samples_dim`` walk: the graph nodes of its terminals (tracked layers' outputs), which,
#: like lookups in a table (whose graph hides the ids), carry samples' data, never count as made of
#: parameters (``_from_parameters``); None during the other walks.
_DATA: contextvars.ContextVar[frozenset | None] = contextvars.ContextVar("divebatch_data_nodes", default=None)

#: How many nodes one walk may visit before it gives up (no answer).
_MAX_NODES = 160
#: How many backward calls one ``samples_dim`` walk may make to probe ops it does not know (``_probed``).
_MAX_PROBE_CALLS = 256


class _SamplesFirst(torch.autograd.Function):
    """``x [T, B, ...]`` as ``[B, T, ...]`` (a view), whose gradient goes back contiguous in
    ``[T, B, ...]``, as the layers before it produced theirs: an elementwise backward (GELU's) on a
    transposed gradient ran 3.4x slower here (``bench/sequence_first.py``). Free where the layer's
    input gradient is already stored time-major (the fused Linear's, see ``_FusedLinear``)."""

    @staticmethod
    def forward(ctx, x):
        return x.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(0, 1).contiguous()


#: The attribute that marks a ``sequences_first_view`` (see ``is_time_major_view``).
_TIME_MAJOR = "_divebatch_time_major"


def sequences_first_view(x: torch.Tensor) -> torch.Tensor:
    """``x [T, B, ...]`` (under ``GradNormTracker(batch_first=False)``) as the ``[B, T, ...]`` input a
    tracked row-wise layer is called on, marked so that the fused Linear computes in ``x``'s own
    row order (``is_time_major_view``)."""
    view = _SamplesFirst.apply(x) if x.requires_grad else x.transpose(0, 1)
    setattr(view, _TIME_MAJOR, True)
    return view


def is_time_major_view(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``sequences_first_view`` of a tensor stored contiguous: a row-wise product
    may then be computed on the stored ``[T, B, ...]`` rows and viewed ``[B, T, ...]``, which the
    tracker turns back into that contiguous ``[T, B, ...]`` without a copy."""
    return getattr(x, _TIME_MAJOR, False) and x.transpose(0, 1).is_contiguous()


def merged_sequence_rows(x: torch.Tensor, batch: int) -> tuple[int, int] | None:
    """``(T, B)`` where ``x``'s ``N = T * B`` rows are a ``[T, B, ...]`` tensor's leading dims merged
    (``output.view(T * B, d)`` before a decoder, in a model tracked with ``batch_first=False``): row
    ``r`` is then sample ``r % B``. Read from the autograd graph: back from ``x`` through ops that
    map each row to the same row, every other operand a parameter or a constant (an activation,
    dropout, a bias), and through FSDP2's hook on a unit's input, to the view that merged them.
    None otherwise. (``flattened_samples`` answers for batch-first models; its walk takes a
    transposed source as moved rows, as it must there.)"""
    node, shape = x.grad_fn, tuple(x.shape)
    for _ in range(_MAX_NODES):
        if node is None:
            return None
        name = type(node).__name__
        if name in _VIEWS:
            source = _view_source(node)
            if (source is not None and len(source) == len(shape) + 1 and source[2:] == shape[1:]
                    and source[1] == batch and source[0] * batch == shape[0]):
                return source[0], batch
            return None
        if name in _PASS_THROUGH and len(node.next_functions) == 1:  # (fully_shard's hook on a unit's input)
            node = node.next_functions[0][0]
            continue
        if name not in _ROW_WISE:
            return None
        carriers = [k for k, (child, _) in enumerate(node.next_functions)
                    if child is not None and type(child).__name__ != "AccumulateGrad"]
        if len(carriers) != 1:
            return None
        node, operand_shape = _operand(node, carriers[0])
        if operand_shape != shape:  # (broadcast from fewer rows, or shape unknown)
            return None
    return None


def flattened_samples(x: torch.Tensor, shared: frozenset = frozenset(),
                      batch: int | None = None) -> tuple[int, ...] | None:
    """``(B, N // B)``: the samples whose rows, sample-major, make ``x``'s ``N`` rows, or None.

    ``x`` is a layer input ``[N, *rest]``; the answer is given only where the autograd graph proves
    the rows sample-major (see the module docstring) and ``N // B > 1``. ``shared``: graph nodes of
    tensors known to be shared by all samples (outputs the tracker watches: SwinV2's position bias,
    an MLP of a constant table), which, like parameters, carry no sample's data. ``batch``: the
    batch the tracker knows, whose merges need no walk further back (see ``_walk``). Costs a walk
    over a few graph nodes; None for a tensor without ``grad_fn``.
    """
    node = x.grad_fn
    if node is None or x.dim() < 2:
        return None
    budget = [_MAX_NODES]
    token = _SHARED.set((shared, batch))
    try:
        samples = _walk(node, tuple(x.shape), budget)
    finally:
        _SHARED.reset(token)
    return (samples, x.shape[0] // samples) if samples and samples > 0 and x.shape[0] // samples > 1 else None


#: Backward nodes of batched products and attention: output row ``i`` is made of row ``i`` of
#: each operand (``torch.bmm``; ``F.scaled_dot_product_attention``'s fused kernels; its math
#: path is the same products and a softmax). Their operands are followed like a row-wise op's.
_PER_ROW = frozenset({
    "BmmBackward0", "ScaledDotProductFlashAttentionForCpuBackward0", "ScaledDotProductFlashAttentionBackward0",
    "ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0",
})
#: Ops along one dim (``_saved_dim``): within each row where that dim is not the first.
_ALONG_DIM = frozenset({"SoftmaxBackward0", "SafeSoftmaxBackward0", "LogSoftmaxBackward0"})
#: Reductions over dims (``_saved_dim``), kept as size 1 or not (``_saved_keepdim``; ``F.normalize``'s
#: norm, a mean over tokens): within each row where the rows' dim is not reduced.
_REDUCTIONS = frozenset({"LinalgVectorNormBackward0", "NormBackward1", "SumBackward1", "MeanBackward1"})


#: ``_walk``'s answer where the rows cannot be a merge's samples by assumption: they trace back to a
#: dim other than the first (a transpose moved them), or are mixed or reordered along the rows.
_NOT_NATIVE = -1


def _walk(node, shape: tuple[int, ...], budget: list[int], dim: int = 0) -> int | None:
    """The number of samples ``B`` whose rows, sample-major, make the rows (along ``dim``) of the
    tensor of ``shape`` that ``node`` produced: row ``r`` is sample ``r // (shape[dim] // B)``.
    None where the graph does not tell (then, along the first dim, that dim may be the samples'
    by the usual assumption); ``_NOT_NATIVE`` where it may not be.

    Views keep the row-major order of the elements, so sample-major rows stay sample-major under
    any view whose first dim is a multiple of ``B`` (windows folded into the batch dim, heads
    merged into it and split again by the attention's math path); permutations move the rows to
    another dim and back (q, k and v unbound from one projection), and ops that map each row to the
    same row keep them."""
    budget[0] -= 1
    unknown = None if dim == 0 else _NOT_NATIVE
    if budget[0] < 0 or node is None:
        return unknown
    name = type(node).__name__
    if name in _PASS_THROUGH:
        # (which output the walk came from is not known here: followed where there is one)
        return _walk(node.next_functions[0][0], shape, budget, dim) if len(node.next_functions) == 1 else unknown
    if name in _VIEWS:
        source = _view_source(node)
        if dim != 0 or source is None or not source or not node.next_functions:
            return unknown
        merge = any(math.prod(source[:k]) == shape[0] for k in range(2, len(source) + 1))
        # Leading dims of a [B, T, ...] tensor merged: its first dim is the samples' (as everywhere),
        # unless a permutation moved it there. Taken where the graph does not prove the merged
        # tensor's own rows, and at once for the tracker's batch (OPT's MLP rows: no walk back
        # through a model's whole residual stream to prove what the assumption gives).
        assumed = (_NOT_NATIVE if _first_dim_moved(node, len(source)) else source[0]) if merge else None
        if merge and source[0] == _SHARED.get()[1]:
            return assumed
        samples = _walk(node.next_functions[0][0], source, budget)
        if samples == _NOT_NATIVE or (samples is not None and shape[0] % samples):
            return _NOT_NATIVE
        return samples if samples is not None else assumed
    if name in ("TransposeBackward0", "PermuteBackward0", "ExpandBackward0"):
        moved = _moved_rows(node, name, shape, dim)
        if moved is None or not node.next_functions:
            return unknown
        source, source_dim = moved
        if name == "ExpandBackward0" and source[source_dim] != shape[dim]:
            return _NOT_NATIVE  # the rows broadcast from fewer
        return _walk(node.next_functions[0][0], source, budget, source_dim)
    if name in ("UnbindBackward0", "SelectBackward0"):
        # One piece along another dim (``q, k, v = qkv.permute(2, 0, ...)``): the rows one dim further
        # in the source where the piece's dim came before them.
        child, source = _operand(node, 0)
        if source is None:
            return unknown
        cut = _signed(int(node._saved_dim)) % len(source)
        source_dim = dim + 1 if cut <= dim else dim
        return _walk(child, source, budget, source_dim)
    if name in _ALONG_DIM and _signed(int(node._saved_dim)) % len(shape) == dim:
        return _NOT_NATIVE  # a softmax over the rows mixes them
    if name in _REDUCTIONS:
        # (over dims of the input: with keepdim they keep their places, without it the rest close up)
        child, source = _operand(node, 0)
        try:
            dims = node._saved_dim
            reduced = {_signed(int(d)) % len(source) for d in (dims if dims else range(len(source)))}
            kept = bool(node._saved_keepdim)
        except (AttributeError, TypeError, RuntimeError):
            return unknown
        places = list(range(len(source))) if kept else [i for i in range(len(source)) if i not in reduced]
        if dim >= len(places) or places[dim] in reduced:
            return _NOT_NATIVE  # a statistic over the rows mixes them
        return _walk(child, source, budget, places[dim])
    if name in ("SliceBackward0", "SplitWithSizesBackward0", "SplitBackward0"):
        # A slice or split along another dim (RoFormer's rotation, ``q[..., 1::2]``; LeViT's keys and
        # values split from one projection) keeps every row.
        child, source = _operand(node, 0)
        sliced = _op_dim(node, len(shape))
        if source is None or sliced is None:
            return unknown
        return _NOT_NATIVE if sliced == dim else _walk(child, source, budget, dim)
    if name == "GatherBackward0":
        # ``torch.gather`` along another dim (DeBERTa's relative positions picked per query): each
        # output row reads only the same row of the input.
        child, source = _operand(node, 0)
        along = _op_dim(node, len(shape))
        if source is None or along is None or len(source) != len(shape):
            return unknown
        return _NOT_NATIVE if along == dim or source[dim] != shape[dim] else _walk(child, source, budget, dim)
    if name == "ConstantPadNdBackward0":
        # Padding of other dims (MobileBERT's shifted token windows, ``F.pad(x[:, 1:], [0, 0, 0, 1])``).
        child, source = _operand(node, 0)
        try:
            pad = [int(p) for p in node._saved_pad]
        except (AttributeError, TypeError, RuntimeError):
            return unknown
        if source is None:
            return unknown
        padded_dims = {len(shape) - 1 - i // 2 for i, p in enumerate(pad) if p}
        return _NOT_NATIVE if dim in padded_dims else _walk(child, source, budget, dim)
    if name in ("CatBackward0", "StackBackward0"):
        # Pieces joined along, or stacked in a new dim at, another dim than the rows' (``torch.stack(
        # [-q[..., 1::2], q[..., ::2]], dim=-1)``): each piece has the same rows, one dim nearer in a
        # stack's pieces where the new dim came before them.
        along = _op_dim(node, len(shape))
        if along is None:
            return unknown
        if along == dim:
            return _NOT_NATIVE
        if name == "CatBackward0":
            return _same_samples(node, shape, budget, dim, dim, joined=along)
        return _same_samples(node, shape, budget, dim, dim - 1 if along < dim else dim, stacked=True)
    if name in _PRODUCT_NODES and dim == 0 and len(shape) == 2:
        # ``F.linear(rows, w, b)`` written in a module's own forward (timm's SwinV2 attention, its
        # qkv bias concatenated from its own biases): each output row is its input row times
        # parameters, plus a bias of parameters and constants.
        rows_at, weight_at = _PRODUCT_NODES[name]
        child, source = _operand(node, rows_at)
        weight = node.next_functions[weight_at][0]
        bias, bias_shape = _operand(node, 0) if name == "AddmmBackward0" else (None, None)
        if (child is None or source is None or weight is None or not _from_parameters(weight, budget)
                or not (bias is None or (bias_shape is not None and (len(bias_shape) == 1 or bias_shape[0] == 1)
                                         and _bias_from_parameters(bias, budget)))):
            return unknown
        return _walk(child, source, budget, 0)
    if name in _BATCH_NORMS:
        # In eval mode a per-channel affine map of each element (LeViT's BatchNorm1d on flattened
        # rows). In training mode its statistics couple the rows: nothing is proven through it (as
        # before eval mode was followed: a merge above it keeps its assumption).
        try:
            training = bool(node._saved_training)
        except (AttributeError, RuntimeError):
            return unknown
        return unknown if training else _same_samples(node, shape, budget, dim, dim)
    if name in _PER_ROW and dim != 0:
        return unknown
    if name not in _ROW_WISE and name not in _PER_ROW and name not in _ALONG_DIM and name not in _REDUCTIONS:
        return unknown
    return _same_samples(node, shape, budget, dim, dim)


def _op_dim(node, rank: int) -> int | None:
    """The dim an op worked along (its saved ``dim``), in ``[0, rank)``; None where not saved."""
    try:
        return _signed(int(node._saved_dim)) % rank
    except (AttributeError, TypeError, RuntimeError):
        return None


def _same_samples(node, shape: tuple[int, ...], budget: list[int], dim: int, operand_dim: int,
                  stacked: bool = False, joined: int | None = None) -> int | None:
    """The samples of ``node``'s rows (along ``dim``) where each operand with them (along
    ``operand_dim``) has the same (see ``_walk``); operands broadcast over them must be made of
    parameters and constants. ``stacked``: every operand is one piece of a stack (rank one less);
    ``joined``: the dim along which the operands are concatenated (their sizes there differ)."""
    unknown = None if dim == 0 else _NOT_NATIVE
    found: int | None = None
    unproven = False
    for position, (child, _) in enumerate(node.next_functions):
        if child is None:
            continue  # an operand that carries no gradient (a constant, a scalar)
        _, child_shape = _operand(node, position)
        if child_shape is None:
            return unknown
        rank = len(shape) - 1 if stacked else len(shape)
        if joined is not None and len(child_shape) != rank:
            return unknown  # (an empty piece, as ``torch.cat`` allows)
        if len(child_shape) == rank and child_shape[operand_dim] == shape[dim]:
            samples = _walk(child, child_shape, budget, operand_dim)
            if (samples is None or samples == _NOT_NATIVE) and _from_parameters(child, budget):
                continue  # parameters and constants (a per-row table, an expanded bias): no sample's data
            if budget[0] < 0:
                return unknown  # (out of budget: nothing is known, nor disproved)
            if samples == _NOT_NATIVE or (samples is not None and found is not None and samples != found):
                return _NOT_NATIVE  # rows of another order, or of other samples, in the same op
            if samples is None:
                unproven = True
                continue
            found = samples
        elif _from_parameters(child, budget):
            continue  # parameters and constants broadcast over the rows: no sample's data
        elif budget[0] < 0:
            return unknown
        else:
            return _NOT_NATIVE  # e.g. a statistic over all rows (``rows - rows.mean(0)``) mixes the samples
    return unknown if unproven else (found if found is not None else unknown)


def _operand(node, position: int):
    """``(child node, shape)`` of ``node``'s operand at ``position`` (the tensor that child made);
    ``(child, None)`` where that is not known (a source without gradient, missing metadata)."""
    child, index = node.next_functions[position] if position < len(node.next_functions) else (None, 0)
    try:
        return child, tuple(child._input_metadata[index].shape)
    except (AttributeError, IndexError, RuntimeError):
        return child, None


def _moved_rows(node, name: str, shape: tuple[int, ...], dim: int) -> tuple[tuple[int, ...], int] | None:
    """For a transpose, permute or expand node whose output has ``shape``: its input's shape, and
    the input dim that became output dim ``dim``; None where the node's saved sizes are unreadable."""
    rank = len(shape)
    try:
        if name == "ExpandBackward0":
            source = tuple(int(s) for s in node._saved_self_sym_sizes)
            return (source, dim) if len(source) == rank else None
        if name == "TransposeBackward0":
            d0, d1 = _signed(int(node._saved_dim0)) % rank, _signed(int(node._saved_dim1)) % rank
            source = list(shape)
            source[d0], source[d1] = shape[d1], shape[d0]
            return tuple(source), (d1 if dim == d0 else d0 if dim == d1 else dim)
        dims = [_signed(int(d)) % rank for d in node._saved_dims]
        source = [0] * rank
        for j, d in enumerate(dims):
            source[d] = shape[j]
        return tuple(source), dims[dim]
    except (AttributeError, TypeError, RuntimeError):
        return None


#: Nodes whose operand without gradient may be a constant: added (``1 + w``), or, where the saved
#: operand is a number, multiplied or divided (``w * 2``). Elsewhere an operand without gradient
#: is taken to be data: ``inp(x)``'s graph shows only the Linear's parameters, not ``x``.
_CONSTANT_OPERAND = frozenset({"AddBackward0", "SubBackward0", "RsubBackward1"})
_SCALAR_OPERAND = {"MulBackward0": ("_saved_self", "_saved_other"), "DivBackward0": ("_saved_self", "_saved_other")}


def _from_parameters(node, budget: list[int]) -> bool:
    """Whether the tensor ``node`` produced is made of parameters and constants alone: ``w``,
    ``w.view(1, -1)``, ``1 + w``, ``w * 2``, but not ``rows.mean(0)`` (nor ``inp(x).mean(0)``, whose
    graph hides the data ``x``, nor anything made of an input tensor that requires grad), or of
    tensors shared by all samples (``flattened_samples``' ``shared``)."""
    shared, data = _SHARED.get()[0], _DATA.get()
    stack = [node]
    while stack:
        budget[0] -= 1
        node = stack.pop()
        if budget[0] < 0:
            return False
        if node in shared:
            continue
        name = type(node).__name__
        if data is not None and (node in data or name.startswith("Embedding")):
            return False
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


def _bias_from_parameters(node, budget: list[int]) -> bool:
    """Whether a product's bias is made of parameters and constants: as ``_from_parameters``, or
    parameters concatenated with pieces that need no gradient (timm's ``cat((q_bias, zeros_k_bias,
    v_bias))``: a bias vector has no rows to hold samples' data), also cast to autocast's dtype."""
    while node is not None and type(node).__name__ in ("ToCopyBackward0", "CloneBackward0"):
        node = node.next_functions[0][0]
    if node is None:
        return False
    if type(node).__name__ != "CatBackward0":
        return _from_parameters(node, budget)
    pieces = [child for child, _ in node.next_functions if child is not None]
    return bool(pieces) and all(_from_parameters(child, budget) for child in pieces)


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
        return 0 in (_signed(int(node._saved_dim0)) % rank, _signed(int(node._saved_dim1)) % rank)
    if name == "PermuteBackward0":
        return _signed(int(node._saved_dims[0])) % rank != 0
    return False


# ------------------------------------------------------------------------------ rows of samples in any order
#: Nodes of ops along one dim (``_saved_dim``) that read and write within the same index of every
#: other dim (top-k, a scatter or gather within rows, softmax, sort, cumsum): an element comes from
#: its own row where the labels are constant along that dim.
_ALONG_DIM_NODES = frozenset({"TopkBackward0", "ScatterBackward0", "GatherBackward0", "SoftmaxBackward0",
                              "LogSoftmaxBackward0", "SortBackward0", "CumsumBackward0"})
#: Products with a weight made of parameters: (position of the rows operand, of the weight) among
#: the node's inputs (``x @ W``, ``b + x @ W``): row ``i`` of the output is made of row ``i`` of ``x``.
_PRODUCT_NODES = {"MmBackward0": (0, 1), "AddmmBackward0": (1, 2)}
_NORM_NODES = frozenset({"NativeLayerNormBackward0", "FusedRmsNormBackward0"})
#: Labels of more elements than this (a reshape that interleaves rows of large tensors) give no answer.
_MAX_LABEL_ELEMENTS = 1 << 20


def row_samples(x: torch.Tensor, batch: int | None = None) -> tuple[int, torch.Tensor] | None:
    """``(B, samples)``: the sample (of ``B``) each row of ``x [N, ...]`` is made of, int64 ``[N]``,
    or None.

    The general form of ``flattened_samples`` for rows in any order, e.g. a mixture of experts that
    runs every token through every expert (Llama 4: ``rows.repeat(E, 1) * scores.T.reshape(-1, 1)``,
    row ``e*N + n`` is token ``n``'s). It walks the graph as ``flattened_samples`` does, and also
    through repeats, transposes and permutes, expands, slices, splits and cats, gathers of rows
    (``x[index]``, ``index_select``: JetMoE's experts get ``rows[batch_index]``), reshapes of any
    kind, products with parameters (``x @ W``), and ops within rows (top-k, scatter, gather,
    softmax along a dim), with a label per element (kept as a broadcastable tensor, a singleton
    where constant). Every operand with a gradient must carry the same labels elementwise, or be
    made of parameters alone. The terminal is the same: a view merging the leading dims of a
    ``[B, T, ...]`` tensor, whose first dim is the samples. Where that finds none and ``batch`` (the
    samples the tracker's other layers saw) is given, a second walk also ends at a view that only
    drops singleton dims of a ``[batch, 1, ...]`` tensor (``T = 1``: its rows taken to be the
    samples in order, the assumption every layer's input is under). An answer needs every row to
    be one sample's.
    """
    node = x.grad_fn
    if node is None or x.dim() < 1:
        return None
    for singleton_batch in (None, batch) if batch else (None,):
        batches: set[int] = set()
        labels = _LabelWalk(batches, x.device, singleton_batch).labels(node, 0, tuple(x.shape))
        if labels is None or len(batches) != 1:
            continue
        labels = _fit(labels, x.dim())
        if any(s != 1 for s in labels.shape[1:]):
            return None  # some row holds elements of several samples
        return batches.pop(), labels.reshape(-1).expand(x.shape[0]).contiguous()
    return None


def samples_dim(x: torch.Tensor, known: dict, shared: frozenset = frozenset(),
                unfollowed: list[str] | None = None, varies: list[str] | None = None) -> int | None:
    """The dim of ``x`` along which index ``i`` is sample ``i`` (every element of that index is
    made of sample ``i``'s data alone), proven from the autograd graph, or None.

    The walk is ``row_samples``', with other terminals: the outputs of tracked layers whose sample
    dim is known (``known``: ``{(id(node), output index): (node, dim, B)}``, the tracker's record
    of this forward's calls), and no merge taken for samples by assumption. It carries each
    element's sample through transposes, permutes, views and reshapes, elementwise ops, batched
    products and attention, so that it tells a ``[T, B, d]`` tensor that a model's own code
    transposed from a layer's ``[B, T, d]`` output (fairseq's layout) from a ``[B, T, d]`` one even
    where ``T == B``. An op it does not know is probed through its own backward (``_probed``).
    ``shared``: graph nodes of tensors shared by all samples (carrying no sample's data, like
    parameters); ``unfollowed``, where given, gets the names of the graph nodes it could neither
    follow nor probe, and ``varies`` those that moved elements between samples' positions by
    index values (a gather, ``x[idx]``): this forward's, which may be the data's, so the answer
    holds for this forward alone (the tracker walks such a call again each time)."""
    found = _known_labels(x, known, shared, unfollowed, varies)
    if found is None:
        return None
    batch, labels = found
    varying = [d for d, s in enumerate(labels.shape) if s > 1]
    if len(varying) != 1 or labels.shape[varying[0]] != batch:
        return None
    order = torch.arange(batch, device=labels.device)
    return varying[0] if torch.equal(labels.reshape(-1), order) else None


def merged_rows_order(x: torch.Tensor, known: dict, shared: frozenset = frozenset(),
                      varies: list[str] | None = None) -> tuple[int, bool] | None:
    """For rows ``x [N, ...]`` of samples and positions merged together: ``(B, sample_major)`` where
    the walk of ``samples_dim`` (to this forward's tracked outputs, no merge taken for samples by
    assumption) proves row ``r`` sample ``r // (N / B)`` (sample-major: ``h.reshape(-1, d)`` of a
    ``[B, T, d]`` tensor) or sample ``r % B`` (time-major: of a ``[T, B, d]`` one, as a model that
    works on ``[T, B, d]`` inside a batch-first one flattens before its output layer); None
    otherwise. ``row_samples`` takes the first dim of a merge for the samples, which is right only
    in the first case, and where ``T == B`` no batch size tells the second from it. ``varies``: as
    ``samples_dim``'s."""
    found = _known_labels(x, known, shared, varies=varies)
    if found is None:
        return None
    batch, labels = found
    if any(s != 1 for s in labels.shape[1:]) or x.shape[0] % batch or labels.shape[0] != x.shape[0]:
        return None
    rows, samples = labels.reshape(-1), torch.arange(batch, device=labels.device)
    if torch.equal(rows, samples.repeat_interleave(x.shape[0] // batch)):
        return batch, True
    if torch.equal(rows, samples.repeat(x.shape[0] // batch)):
        return batch, False
    return None


def _known_labels(x: torch.Tensor, known: dict, shared: frozenset = frozenset(),
                  unfollowed: list[str] | None = None, varies: list[str] | None = None
                  ) -> tuple[int, torch.Tensor] | None:
    """``(B, labels)``: the sample of each element of ``x`` (int64, broadcastable to ``x``, of
    ``x.dim()`` dims), from the walk of ``samples_dim``; None where it does not prove them."""
    node = x.grad_fn
    if node is None or x.dim() < 1 or not known:
        return None
    batches: set[int] = set()
    token, data_token = _SHARED.set((shared, None)), _DATA.set(frozenset(node for node, _, _ in known.values()))
    try:
        # The walk's own tensor ops (labels, probes) are none of the model's: no torch-function mode
        # active in the forward (the watchers of shared outputs) sees them (Kimi Linear's probes
        # took 100 s under one).
        with torch._C.DisableTorchFunction():
            walk = _LabelWalk(batches, x.device, known=known)
            labels = walk.labels(node, x.output_nr, tuple(x.shape))
    finally:
        _SHARED.reset(token)
        _DATA.reset(data_token)
    if unfollowed is not None:
        unfollowed.extend(walk.unfollowed)
    if varies is not None:
        varies.extend(walk.varies)
    if labels is None or len(batches) != 1:
        return None
    return batches.pop(), _fit(labels, x.dim())


class _LabelWalk:
    """One ``row_samples`` or ``samples_dim`` walk: the samples found at its terminals
    (``batches``), a node budget, and each visited node output's labels (a graph that uses a tensor
    twice is walked once). ``known``: outputs whose samples are known (``samples_dim``), as
    ``{(id(node), output index): (node, sample dim, B)}``; where given, they are the only terminals
    (no merge is taken for samples by assumption)."""

    def __init__(self, batches: set[int], device, singleton_batch: int | None = None, known: dict | None = None):
        self.batches, self.device, self.budget = batches, device, [_MAX_NODES]
        self.singleton_batch = singleton_batch  # a [batch, 1, ...] view is a terminal too
        self.known = known
        self.probe_calls = _MAX_PROBE_CALLS
        self.probe_values: dict[tuple, torch.Tensor] = {}  # random output grads by (shape, device), drawn once
        self.unfollowed: list[str] = []  # the ops it could neither follow nor probe (for error messages)
        # Ops through which the labels moved between samples' positions by index values (a gather,
        # ``x[idx]``): this forward's indices, which may be data's (see ``samples_dim``'s ``varies``).
        self.varies: list[str] = []
        self.called = False  # (whether the last probe called the node's backward: see _probed_or_noted)
        self.seen: dict[tuple[int, int], tuple[object, torch.Tensor | None]] = {}

    def labels(self, node, index: int, shape: tuple[int, ...]):
        """The sample of each element of output ``index`` of ``node`` (of ``shape``): an int64
        tensor broadcastable to ``shape``, or None where the graph does not prove it."""
        if node is None:
            return None
        key = (id(node), index)
        if key in self.seen and self.seen[key][0] is node:
            return self.seen[key][1]
        self.budget[0] -= 1
        if self.known is not None and key in self.known and self.known[key][0] is node:
            _, dim, batch = self.known[key]
            self.batches.add(batch)
            lab = torch.arange(batch, device=self.device).view(-1, *(1,) * (len(shape) - 1 - dim))
            found = _valid(lab, shape) if dim < len(shape) and shape[dim] == batch else None
        else:
            found = _labels(self, node, index, shape) if self.budget[0] >= 0 else None
            if found is None and self.known is not None and self.budget[0] >= 0 and node.next_functions:
                # An op the walk does not know, or knows in a form it does not read (``h[:, order]``:
                # an index after a slice), or one that moves elements along the samples' dim: its
                # backward tells.
                found = _probed_or_noted(self, node, index, shape, _child_labels(self, node))
        self.seen[key] = (node, found)
        return found


def _child_labels(walk: _LabelWalk, node):
    """``child_labels(position)``: ``(shape, labels)`` of the ``position``-th input of ``node``
    (labels None where the walk does not prove them), or None where it has no node."""
    children = node.next_functions

    def child_labels(position: int):
        child, out_index = children[position]
        if child is None:
            return None
        try:
            child_shape = tuple(child._input_metadata[out_index].shape)
        except (AttributeError, IndexError, RuntimeError):
            return None
        return child_shape, walk.labels(child, out_index, child_shape)

    return child_labels


def _labels(walk: _LabelWalk, node, index: int, shape: tuple[int, ...]):
    """``_LabelWalk.labels`` for one node (see ``row_samples`` for the ops followed)."""
    budget, batches, device = walk.budget, walk.batches, walk.device
    name = type(node).__name__
    children = node.next_functions
    child_labels = _child_labels(walk, node)
    try:
        if name in _PASS_THROUGH:
            found = child_labels(index)
            return None if found is None or found[1] is None else _valid(found[1], shape)
        if name in _VIEWS:
            source = _view_source(node)
            if source is None or not children:
                return None
            lead = _merged_lead(node, shape) if source != shape and walk.known is None else None
            if lead is not None and (math.prod(lead[1:]) > 1 or lead[0] == walk.singleton_batch):
                # The terminal: rows of a [B, T, ...] merge (or of [batch, 1, ...]: the samples)
                batches.add(lead[0])
                lab = torch.arange(lead[0], device=device).repeat_interleave(math.prod(lead[1:]))
                return _valid(lab.view(-1, *(1,) * (len(shape) - 1)), shape)
            found = child_labels(0)
            return None if found is None or found[1] is None else _valid(_reshaped(found[1], source, shape), shape)
        if name == "IndexPutBackward0":
            # ``out[i0, i1, ...] = values`` (Longformer's global tokens gathered per sample into
            # ``zeros(G, B, d)``): each written row gets its value's labels, the rest keeps the base's.
            leading = _leading_indices(node._saved_indices, len(shape))
            values = child_labels(1)
            if leading is None or bool(node._saved_accumulate) or values is None or values[1] is None:
                return None
            k, rows = len(leading), _fit(values[1], len(values[0]))
            if len(values[0]) != 1 + len(shape) - k or any(n != 1 for n in rows.shape[1:]):
                return None  # (a written row that holds several samples' elements)
            rows = rows.reshape(-1).expand(len(leading[0]))
            base = children[0][0]
            if base is None or _from_parameters(base, budget):
                # A constant base holds no sample's data: where the written rows' samples are their
                # coordinates along one dim of the batch's size, the labels are those coordinates
                # everywhere (no label outside the samples'). Not otherwise.
                for d in range(k):
                    if shape[d] in batches and torch.equal(rows, leading[d].to(rows.device)):
                        return _valid(torch.arange(shape[d], device=device).view(-1, *(1,) * (len(shape) - 1 - d)),
                                      shape)
                return None
            found = child_labels(0)
            if found is None or found[1] is None or math.prod(shape[:k]) > _MAX_LABEL_ELEMENTS:
                return None
            lab = _fit(found[1], len(shape))
            if any(n != 1 for n in lab.shape[k:]):
                return None
            lab = lab.expand(*shape[:k], *lab.shape[k:]).clone()
            lab[tuple(i.to(device) for i in leading)] = rows.view(-1, *(1,) * (len(shape) - k))
            return _valid(_compressed(lab), shape)
        if name == "RepeatBackward0":
            found = child_labels(0)
            if found is None or found[1] is None:
                return None
            repeats = tuple(int(r) for r in node._saved_repeats)
            lab = _fit(found[1], len(repeats))
            return _valid(lab.repeat([r if lab.shape[i] > 1 else 1 for i, r in enumerate(repeats)]), shape)
        if name == "CatBackward0":
            dim = _signed(int(node._saved_dim)) % len(shape)
            parts = [child_labels(position) for position in range(len(children))]
            if not parts or any(part is None or part[1] is None for part in parts):
                return None  # (a piece made of parameters alone belongs to no sample)
            labs = [_fit(lab, len(shape)) for _, lab in parts]
            wide = [max(lab.shape[i] for lab in labs) if i != dim else -1 for i in range(len(shape))]
            labs = [lab.expand(*(part_shape[dim] if i == dim else n for i, n in enumerate(wide)))
                    for (part_shape, _), lab in zip(parts, labs)]
            return _valid(torch.cat(labs, dim), shape)
        if name in ("TransposeBackward0", "PermuteBackward0", "TBackward0", "ExpandBackward0", "UnsqueezeBackward0",
                    "SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0", "IndexBackward0",
                    "IndexSelectBackward0"):
            found = child_labels(0)
            if found is None or found[1] is None:
                return None
            lab = _fit(found[1], len(found[0]))
            if name in ("IndexBackward0", "IndexSelectBackward0") and _indexes_samples(node, name, lab):
                walk.varies.append(name)
            return _valid(_moved(node, name, index, found[0], lab), shape)
        if name in _PRODUCT_NODES:
            rows_at, weight_at = _PRODUCT_NODES[name]
            for position, (child, _) in enumerate(children):
                if position != rows_at and child is not None and not _from_parameters(child, budget):
                    return None
            if children[weight_at][0] is None:
                return None  # a weight without gradient: not proven constant (it may be data)
            found = child_labels(rows_at)
            if found is None or found[1] is None or _fit(found[1], 2).shape[1] != 1:
                return None
            return _valid(_fit(found[1], 2), shape)
        if name == "BmmBackward0":
            # out[n, i, j] = sum_k a[n, i, k] b[n, k, j]: the labels of a's rows and b's columns, each
            # constant along k (an operand made of parameters has none: ``x @ W`` keeps x's rows').
            return _agreed(_operand_labels(children, child_labels, budget, lambda position, rank: (2 - position,)),
                           shape)
        if name in _PER_ROW:
            # Attention over the last two dims: each output matrix is made of the same-indexed
            # matrices of the operands, whose labels must be constant within each matrix.
            return _agreed(_operand_labels(children, child_labels, budget, lambda position, rank: (rank - 2, rank - 1)),
                           shape)
        along = _signed(int(node._saved_dim)) if name in _ALONG_DIM_NODES else None
        if name not in _ROW_WISE and along is None:
            return None  # (an op the walk does not know: probed, see _LabelWalk.labels)
        labs = []
        for position, (child, _) in enumerate(children):
            if child is None:
                continue  # an operand that carries no gradient (a constant, a scalar, scatter indices)
            found = child_labels(position)
            if found is not None and found[1] is not None:
                lab = _fit(found[1], len(shape))
                if along is not None and lab.shape[along % len(shape)] != 1:
                    # The op moves elements along the samples' dim: between samples (a softmax over
                    # rows) or within each (windows gathered in another order per image), which
                    # its backward tells (probed, see _LabelWalk.labels).
                    return None
                if name in _NORM_NODES and any(s != 1 for s in lab.shape[_normalised_from(node, len(shape)):]):
                    return None  # normalised over elements of several samples
                labs.append(lab)
            elif not _from_parameters(child, budget):
                return None  # e.g. a statistic over all rows (``rows - rows.mean(0)``)
        return _agreed(labs, shape)  # (not where operands of different samples meet elementwise)
    except (AttributeError, RuntimeError, TypeError, ValueError, IndexError):
        return None  # a node without the saved fields this reads, or labels that do not fit


#: Marks a name in ``samples_dim``'s ``unfollowed``: an op whose backward was called and gave no layout.
NO_LAYOUT = " (its backward gave no layout)"


def _probed_or_noted(walk: _LabelWalk, node, index: int, shape: tuple[int, ...], child_labels) -> torch.Tensor | None:
    """``_probed`` in a ``samples_dim`` walk (to known outputs; in ``row_samples``' none), the op's
    name noted in ``walk.unfollowed`` where it gives no labels (with ``NO_LAYOUT`` where its
    operands' samples were known and its backward was called: the op itself hides them, not the
    graph before it) and in ``walk.varies`` where it moves elements by saved indices."""
    walk.called = False
    found = _probed(walk, node, index, shape, child_labels)
    if found is None:
        walk.unfollowed.append(type(node).__name__ + (NO_LAYOUT if walk.called else ""))
    elif any(hasattr(node, saved) for saved in ("_saved_index", "_saved_indices")):
        walk.varies.append(type(node).__name__)  # (a gather, sort or ``x[idx]``: by this forward's indices)
    return found


def _probed(walk: _LabelWalk, node, index: int, shape: tuple[int, ...], child_labels) -> torch.Tensor | None:
    """Labels of output ``index`` (of ``shape``) of an op the walk does not know (``torch.flip``, a
    custom autograd Function: a fused attention or norm kernel, an ``as_strided`` view, the code
    ``torch.compile`` runs between tracked layers), read from its backward: where, for one layout
    (``_layouts_along``: a dim ``d`` whose indices are the samples, or samples merged with another
    dim), the slices of the output at the indices of samples ``S`` along ``d`` depend on the
    operands' elements of samples ``S`` alone, for every ``S`` of a family that parts any two
    samples (each bit of the sample index, set and clear: ``2 ceil(log2 B)`` backward calls), and
    for no other layout, the output's samples are that layout's. Each call is the node's own
    backward on an output grad that is random on those slices and zero elsewhere; the elements of
    an operand with a nonzero grad must all carry labels in ``S``, and some must (a random output
    grad cancels on a dependence with probability zero). Every operand with a gradient must carry
    labels or be made of parameters. Not called: backwards that run a forward again or call
    autograd themselves (checkpointing) and divebatch's own Functions (a compiled node is called:
    AOTAutograd compiles its backward then, in the variant that keeps its saved tensors, or runs
    the one it has, whose writes to them are undone: ``SavedTensorsKept``). The calls run with
    capture suspended and draw from a generator of their own (the model's random state is not
    touched)."""
    name = type(node).__name__
    forward_cls = getattr(node, "_forward_cls", None)
    if ("Checkpoint" in name or walk.probe_calls <= 0
            or (forward_cls is not None and getattr(forward_cls, "__module__", "").startswith("divebatch"))):
        return None
    operands = []
    for position, (child, _) in enumerate(node.next_functions):
        if child is None:
            continue
        found = child_labels(position)
        if found is not None and found[1] is not None:
            operands.append((position, found[0], _fit(found[1], len(found[0]))))
        elif not _from_parameters(child, walk.budget):
            return None
    if not operands or len(walk.batches) != 1:
        return None
    batch = next(iter(walk.batches))
    if batch < 2:
        return None
    try:
        outputs = [(tuple(m.shape), m.dtype, m.device) for m in node._input_metadata]
    except (AttributeError, RuntimeError, TypeError):
        return None
    if index >= len(outputs) or outputs[index][0] != shape:
        return None
    bits = max(1, (batch - 1).bit_length())
    samples = torch.arange(batch)
    key = outputs[index][0], outputs[index][2]
    if key not in walk.probe_values:
        generator = torch.Generator(device=key[1]).manual_seed(0)
        walk.probe_values[key] = torch.rand(key[0], generator=generator, device=key[1]) + 0.5
    values = walk.probe_values[key]
    kept = None if callable(node) else SavedTensorsKept(node)  # (PyTorch's own backwards write none)
    walk.called = True  # (its operands' samples known: what follows is the backward's answer)
    placed = []
    for dim, along in _layouts_along(shape, batch):
        if walk.probe_calls < 2 * bits:
            return None
        separated = True
        for bit in range(bits):
            for value in (0, 1):
                chosen = ((samples >> bit) & 1) == value
                walk.probe_calls -= 1
                grads = _node_backward(node, outputs, index, dim, chosen[along], values, kept)
                if grads is None or not _within(grads, operands, chosen):
                    separated = False
                    break
            if not separated:
                break
        if separated:
            placed.append((dim, along))
    if len(placed) != 1:
        return None  # (two pass only where some elements carry no sample's data: not placed)
    dim, along = placed[0]
    return _valid(along.to(walk.device).view(-1, *(1,) * (len(shape) - 1 - dim)), shape)


def _layouts_along(shape: tuple[int, ...], batch: int):
    """The layouts ``_probed`` tries: ``(dim, sample of each index along it)`` for each dim of the
    batch's size (sample i at index i), and for a first dim of a multiple of it (samples merged
    with another dim, sample-major as ``[B * heads, ...]`` or sample-minor as ``[heads * B, ...]``;
    merges elsewhere are not tried: each layout tried costs a backward call, and inner dims of
    a multiple of B, the features', abound)."""
    for dim, n in enumerate(shape):
        if n == batch:
            yield dim, torch.arange(batch)
        elif dim == 0 and n > batch and n % batch == 0:
            yield dim, torch.arange(batch).repeat_interleave(n // batch)
            yield dim, torch.arange(batch).repeat(n // batch)


def _node_backward(node, outputs, index: int, dim: int, chosen: torch.Tensor, values: torch.Tensor,
                   kept: SavedTensorsKept | None) -> list | None:
    """The grads of ``node``'s inputs (one per ``next_functions`` entry, None where none) for an
    output grad of ``values`` (random, of output ``index``'s shape) on the slices ``chosen`` (bool,
    one per index) along ``dim`` of output ``index``, zero elsewhere (and on the other outputs); None
    where the node cannot be called so. A custom Function's backward is called inside ``kept`` (its
    saved tensors, written back after the call; None for PyTorch's own nodes)."""
    shape, dtype, device = outputs[index]
    values = values * chosen.to(device).view(-1, *(1,) * (len(shape) - 1 - dim)).to(values.dtype)
    grads = [values.to(dtype) if i == index else torch.zeros(s, dtype=t, device=v)
             for i, (s, t, v) in enumerate(outputs)]
    try:
        with torch.no_grad(), suspend_capture():
            if callable(node):  # an op of PyTorch's (a C++ node)
                out = node(*grads)
                out = [out] if isinstance(out, torch.Tensor) else list(out)
                return out if len(out) == len(node.next_functions) else None
            # A custom autograd Function: its backward returns a grad per forward argument; those
            # that need one are, in order, the entries of next_functions that hold a node.
            with kept:
                out = node.apply(*grads)
                out = kept.unaliased([out] if isinstance(out, torch.Tensor) else list(out))
            needed = [i for i, need in enumerate(node.needs_input_grad) if need]
            edges = [p for p, (child, _) in enumerate(node.next_functions) if child is not None]
            if len(needed) != len(edges) or len(out) < len(node.needs_input_grad):
                return None
            mapped = [None] * len(node.next_functions)
            for p, i in zip(edges, needed):
                mapped[p] = out[i]
            return mapped
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError, NotImplementedError):
        return None


class SavedTensorsKept(contextlib.AbstractContextManager):
    """Around each of a probe's calls of a custom Function's backward (``_node_backward``): the
    tensors its forward saved (``saved_tensors`` and tensors kept as attributes of the node, its
    ``ctx``), copied once when made, are written back after each call, so a backward that works in
    place on them does not change what the real backward pass reads. Inductor's backwards do: one
    compiled with donated buffers (``torch._functorch.config.donated_buffer``, its default) reuses
    its saved tensors' memory for its own results (``buf = saved; del saved  # reuse``), and AOTAutograd, which refuses
    to run it outside a backward pass while that setting is on, runs it where the setting is off,
    as under ``torch.compile(dynamic=True)`` with a backward compiled at the forward or taken from
    the compile cache (where, before, the probe's second call read its first's results and the
    model's gradient came out wrong). The setting is turned off for the call: its saved tensors
    are restored here, with their version counters (a Python backward's in-place write bumps them,
    and the real backward would refuse them). Grads returned in a saved tensor's memory are copied
    out first (``unaliased``). The node's attributes are put back too (a backward that pops a list
    it kept, or deletes an attribute, once), and the random state (a backward that draws random
    numbers does not move the model's stream)."""

    def __init__(self, node):
        self.node = node
        attributes = getattr(node, "__dict__", {})
        self.attributes = {name: (value, list(value) if isinstance(value, list) else None)
                           for name, value in attributes.items()}
        self.saved: list[torch.Tensor] = []
        try:
            found = list(node.saved_tensors)
        except RuntimeError:
            found = []  # (freed: the call fails as it would have)
        for value in attributes.values():
            found.extend(v for v in (value if isinstance(value, (list, tuple)) else (value,))
                         if isinstance(v, torch.Tensor))
        seen = set()
        for tensor in found:
            if tensor.layout == torch.strided and id(tensor) not in seen and tensor.numel():
                seen.add(id(tensor))
                self.saved.append(tensor)
        self.copies = [tensor.detach().clone() for tensor in self.saved]
        self.versions = tuple(tensor._version for tensor in self.saved)
        self.compiled = type(node).__name__ == "CompiledFunctionBackward"

    def __enter__(self):
        self.settings = contextlib.ExitStack()
        devices = sorted({tensor.device.index or 0 for tensor in self.saved if tensor.device.type == "cuda"})
        self.settings.enter_context(torch.random.fork_rng(devices=devices))
        if self.compiled:
            import torch._functorch.config as functorch_config
            self.settings.enter_context(functorch_config.patch(donated_buffer=False))
        return self

    def unaliased(self, out: list) -> list:
        """``out`` with each tensor in the memory of a saved tensor copied out."""
        memory = {tensor.untyped_storage().data_ptr() for tensor in self.saved}
        return [o.clone() if isinstance(o, torch.Tensor) and o.numel() and o.untyped_storage().data_ptr() in memory
                else o for o in out]

    def __exit__(self, *exc):
        self.settings.close()
        for tensor, copy in zip(self.saved, self.copies):
            tensor.data.copy_(copy)  # (``.data``: the same memory, its version not bumped)
        # A Python backward's in-place writes bumped them: the real backward checks that its saved
        # tensors are as saved, and now they are.
        torch._C._autograd._unsafe_set_version_counter(tuple(self.saved), self.versions)
        attributes = getattr(self.node, "__dict__", None)
        if attributes is not None:
            attributes.clear()
            for name, (value, items) in self.attributes.items():
                if items is not None:
                    value[:] = items
                attributes[name] = value
        return False


def _within(grads: list, operands: list, chosen: torch.Tensor) -> bool:
    """Whether the operands' elements with a nonzero grad all carry labels among the ``chosen``
    samples, and some do."""
    touched = False
    for position, source, lab in operands:
        grad = grads[position]
        if grad is None:
            continue
        if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != source:
            return False
        # Which of the labels' (few) distinct positions have a nonzero grad somewhere along the dims
        # they are constant on: the labels are never expanded to the operand (268 MB a call on Kimi
        # Linear's chunked attention).
        constant = tuple(d for d in range(lab.dim()) if lab.shape[d] == 1 and source[d] != 1)
        hit = grad != 0
        hit = hit.any(dim=constant, keepdim=True) if constant else hit
        if not bool(hit.any()):
            continue
        touched = True
        if not bool(chosen.to(lab.device)[lab.expand(hit.shape)[hit.to(lab.device)]].all()):
            return False
    return touched


def _operand_labels(children, child_labels, budget: list[int], constant) -> list[torch.Tensor] | None:
    """The labels of each operand of a product that carries a gradient, each constant along the dims
    ``constant(position, rank)`` names (those the product sums over); an operand without labels
    must be made of parameters. None where either fails."""
    labs = []
    for position, (child, _) in enumerate(children):
        if child is None:
            continue
        found = child_labels(position)
        if found is not None and found[1] is not None:
            lab = _fit(found[1], len(found[0]))
            if any(lab.shape[d] != 1 for d in constant(position, len(found[0]))):
                return None
            labs.append(lab)
        elif not _from_parameters(child, budget):
            return None
    return labs


def _agreed(labs: list[torch.Tensor] | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The labels ``labs`` (at least one) give alike once broadcast, fit to ``shape``; else None
    (operands of different samples meet)."""
    if not labs:
        return None
    expanded = torch.broadcast_tensors(*labs)
    if any(not torch.equal(expanded[0], other) for other in expanded[1:]):
        return None
    return _valid(expanded[0], shape)


def _normalised_from(node, rank: int) -> int:
    """The first dim a layer or RMS norm node normalised over (its saved ``normalized_shape``; where
    that is not saved, every dim after the first)."""
    try:
        return rank - len(node._saved_normalized_shape)
    except (AttributeError, TypeError, RuntimeError):
        return 1


def _signed(dim: int) -> int:
    """A saved dim as a Python int (negative dims come back as unsigned 64-bit integers)."""
    return dim - (1 << 64) if dim >= (1 << 63) else dim


def _fit(lab: torch.Tensor, rank: int) -> torch.Tensor:
    """``lab`` with leading singleton dims up to ``rank`` (broadcasting aligns the trailing dims)."""
    return lab.reshape((1,) * (rank - lab.dim()) + tuple(lab.shape)) if lab.dim() < rank else lab


def _valid(lab: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``lab`` if it broadcasts to ``shape`` without adding dims; else None."""
    if lab is None or lab.dim() > len(shape):
        return None
    lab = _fit(lab, len(shape))
    return lab if all(s in (1, n) for s, n in zip(lab.shape, shape)) else None


def _reshaped(lab: torch.Tensor, source: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
    """Labels of ``x.view(shape)`` from ``lab``, the labels of ``x`` (of ``source``).

    The two shapes split into groups of consecutive dims with the same number of elements (a view
    maps each group of ``source`` onto the matching group of ``shape`` in row-major order); only the
    groups along which the labels vary are materialised (``[T, B, d]`` viewed ``[T, B * heads,
    d / heads]`` costs ``B * d`` labels, not ``T * B * d``), and dims along which the result is
    constant are narrowed back to size 1."""
    lab = _fit(lab, len(source))
    if 0 in source or math.prod(source) != math.prod(shape):
        return None
    groups, i, j = [], 0, 0
    while i < len(source) or j < len(shape):
        gi, gj, ns, nt = i, j, 1, 1
        if i < len(source):
            ns, i = source[i], i + 1
        if j < len(shape):
            nt, j = shape[j], j + 1
        while ns != nt:
            if ns < nt:
                ns, i = ns * source[i], i + 1
            else:
                nt, j = nt * shape[j], j + 1
        groups.append((range(gi, i), range(gj, j)))
    varying = [any(lab.shape[d] > 1 for d in src) for src, _ in groups]
    if math.prod(math.prod(source[d] for d in src) for (src, _), v in zip(groups, varying) if v) > _MAX_LABEL_ELEMENTS:
        return None
    wide = [source[d] if v else 1 for (src, _), v in zip(groups, varying) for d in src]
    out = lab.expand(*wide).reshape([shape[d] if v else 1 for (_, dst), v in zip(groups, varying) for d in dst])
    return _compressed(out)


def _compressed(lab: torch.Tensor) -> torch.Tensor:
    """``lab`` narrowed to size 1 along each dim along which it is constant."""
    for d in range(lab.dim()):
        if lab.shape[d] > 1 and bool((lab == lab.narrow(d, 0, 1)).all()):
            lab = lab.narrow(d, 0, 1)
    return lab


def _indexes_samples(node, name: str, lab: torch.Tensor) -> bool:
    """Whether ``x[i0, ...]`` (``IndexBackward0``) or ``index_select`` picks along a dim of its
    operand's labels ``lab`` that varies (moves elements between samples' positions by its index
    values)."""
    if name == "IndexBackward0":
        leading = _leading_indices(node._saved_indices, lab.dim())
        return leading is not None and any(lab.shape[d] != 1 for d in range(len(leading)))
    return lab.shape[_signed(int(node._saved_dim)) % lab.dim()] != 1


def _leading_indices(indices, rank: int) -> list[torch.Tensor] | None:
    """The index tensors of ``x[i0, i1, ...]`` (or ``x[mask]``, as its nonzero positions) on x's
    leading dims, 1-D int64 of one length; None for other indexing (a slice before them, index
    tensors broadcast against each other)."""
    indices = list(indices)
    while indices and indices[-1] is None:
        indices.pop()
    out: list[torch.Tensor] = []
    for index in indices:
        if not isinstance(index, torch.Tensor) or index.is_floating_point():
            return None
        if index.dtype == torch.bool:
            out.extend(index.nonzero(as_tuple=True))
        elif index.dim() == 1:
            out.append(index.long())
        else:
            return None
    if not out or len(out) > rank or len({len(i) for i in out}) != 1:
        return None
    return out


def _moved(node, name: str, index: int, source: tuple[int, ...], lab: torch.Tensor) -> torch.Tensor | None:
    """Labels after a transpose, permute, expand, unsqueeze, slice or split of a tensor of ``source``."""
    rank = len(source)
    if name == "TransposeBackward0":
        return lab.transpose(_signed(int(node._saved_dim0)) % rank, _signed(int(node._saved_dim1)) % rank)
    if name == "TBackward0":
        return lab.t() if rank == 2 else lab
    if name == "PermuteBackward0":
        return lab.permute([_signed(int(d)) % rank for d in node._saved_dims])
    if name == "ExpandBackward0":
        return lab  # the new and widened dims repeat the same elements
    if name == "UnsqueezeBackward0":
        return lab.unsqueeze(_signed(int(node._saved_dim)) % (rank + 1))
    if name == "IndexBackward0":  # ``x[i0, i1, ...]``: index tensors (or a mask) on the leading dims
        leading = _leading_indices(node._saved_indices, rank)
        if leading is None:
            return None
        k = len(leading)
        if all(lab.shape[d] == 1 for d in range(k)):
            return lab.reshape(1, *lab.shape[k:])
        picked = tuple(i.to(lab.device) for i in leading)
        return lab.expand(*source[:k], *lab.shape[k:])[picked]
    dim = _signed(int(node._saved_dim)) % rank
    if lab.shape[dim] == 1:
        return lab  # slicing along a dim where the labels are constant
    if name == "SliceBackward0":
        start, end, step = (getattr(node, f"_saved_{f}") for f in ("start", "end", "step"))
        start, end = (None if v is None else _signed(int(v)) for v in (start, end))
        return lab.index_select(dim, torch.arange(source[dim], device=lab.device)[start:end:int(step)])
    if name == "IndexSelectBackward0":
        return lab.index_select(dim, node._saved_index.long().to(lab.device))
    if name == "SplitWithSizesBackward0":
        sizes = [int(s) for s in node._saved_split_sizes]
        return lab.narrow(dim, sum(sizes[:index]), sizes[index])
    size = int(node._saved_split_size)
    return lab.narrow(dim, index * size, min(size, source[dim] - index * size))


# Ops whose output row ``r`` is computed from row ``r`` of each operand that has the rows (and from
# operands broadcast over them): comparisons, integer arithmetic, casts, selections.
_ROW_BY_ROW_IDS = frozenset({
    torch.ne, torch.Tensor.ne, torch.Tensor.__ne__, torch.eq, torch.Tensor.eq, torch.Tensor.__eq__,
    torch.lt, torch.Tensor.lt, torch.Tensor.__lt__, torch.gt, torch.Tensor.gt, torch.Tensor.__gt__,
    torch.le, torch.Tensor.le, torch.Tensor.__le__, torch.ge, torch.Tensor.ge, torch.Tensor.__ge__,
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
    torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.Tensor.__and__, torch.Tensor.__or__, torch.logical_and, torch.logical_or, torch.logical_not,
    torch.Tensor.int, torch.Tensor.long, torch.Tensor.bool, torch.Tensor.to, torch.Tensor.type_as,
    torch.Tensor.type, torch.Tensor.masked_fill, torch.where, torch.clamp, torch.Tensor.clamp,
    torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.contiguous, torch.Tensor.clone, torch.clone,
})
# Factories of tensors whose rows are all the same (RoFormer's token types: ``torch.zeros(input_shape)``).
_CONSTANT_ROWS = frozenset({torch.zeros, torch.ones, torch.full, torch.zeros_like, torch.ones_like, torch.full_like})
# Ops along a dim (``dim``, their second argument): row by row where it is not the first.
_CUMULATIVE = frozenset({torch.cumsum, torch.Tensor.cumsum, torch.cumprod, torch.Tensor.cumprod,
                         torch.gather, torch.Tensor.gather})


class MergedIdsFollower(TorchFunctionMode):
    """Active during the forward of a model whose input is integer ids with more than two dims (a
    multiple-choice head's ``[B, C, T]``): follows the integer tensors computed row by row from the
    input's merged rows (``rows_of``: the input itself with its leading dims merged, the same
    memory), such as RoBERTa's position ids (``cumsum(ids.ne(pad), dim=1) * mask + pad``), so a
    lookup of them is assigned to samples as one of the merged ids is. ``rows(t)``: ``(B, N // B)``
    for such a tensor ``t`` of ``N`` rows, else None. Only ops in ``_ROW_BY_ROW_IDS`` (and cumulative
    sums and gathers along another dim) are followed; their other operands must not have the rows
    (numbers, ``[1, T]`` buffers, or those expanded over the rows: RoBERTa gathers its token types
    from one by the position ids)."""

    def __init__(self, rows_of):
        super().__init__()
        self.rows_of = rows_of
        self.followed: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        self.constant: dict[int, torch.Tensor] = {}  # integer tensors made with every row the same

    def constant_rows(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was made by a factory with every row the same (a lookup of it is one lookup
        shared by the samples, as of a ``[1, T]`` buffer expanded over the rows)."""
        return self.constant.get(id(t)) is t

    def rows(self, t: torch.Tensor) -> tuple[int, int] | None:
        entry = self.followed.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        return self.rows_of(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.is_floating_point() or out.dim() < 2:
            return out
        if func in _CONSTANT_ROWS and out.shape[0] > 1:
            self.constant[id(out)] = out
            return out
        if not (func in _ROW_BY_ROW_IDS or func in _CUMULATIVE):
            return out
        if func in _CUMULATIVE:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if not isinstance(dim, int) or dim % out.dim() == 0:
                return out
        lead = None
        for a in tree_flatten((args, kwargs))[0]:
            if not isinstance(a, torch.Tensor) or a.dim() == 0:
                continue
            if a.dim() < out.dim() or (a.dim() == out.dim() and (a.shape[0] == 1 or a.stride(0) == 0)):
                continue  # broadcast over the rows (or expanded to them): the same for every row
            rows = self.rows(a) if a.dim() == out.dim() and a.shape[0] == out.shape[0] else None
            if rows is None or (lead is not None and rows != lead):
                return out  # an operand with rows not known to be the input's
            lead = rows
        if lead is not None:
            self.followed[id(out)] = (out, lead)
        return out
