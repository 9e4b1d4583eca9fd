"""Weights applied to gathered rows (mixture-of-experts experts and routers): per-sample gradients
read from the products, with no replay.

A mixture-of-experts block sends each token to a few experts. Hugging Face's experts modules
(``MixtralExperts`` and the ~30 classes like it in transformers 5) keep every expert's weights in
one parameter ``[E, out, in]`` and apply them to the rows routed to each expert: eagerly, as
``F.linear(hidden[token_idx], W[e])`` or ``hidden[token_idx] @ W[e] + b[e]`` per expert, or with
``torch._grouped_mm`` on rows sorted by expert (``offs`` marks where each expert's rows end). Row
``r`` of such a product adds ``g_r x_r^T`` to the gradient of ``W[e(r)]``, and only to the
gradient of the sample ``s(r)`` that the row came from. So sample ``b``'s gradient of ``W[e]`` is
``sum over r with s(r) = b, e(r) = e of g_r x_r^T``: the linear-layer routes (``linear_norms``:
ghost or instantiate) over the rows of each (expert, sample) group, and the squared norms summed
over experts. A router's ``F.linear(rows, self.weight)`` is the same with one expert.

What must be known is ``s(r)``. ``RowLabels`` follows it through the module's forward (inside the
generic route's recorder, a torch-function mode): the module's first input has rows ``0 .. N-1``,
which the tracker has proven sample-major (``rows.flattened_samples``: row ``i`` belongs to sample
``i // T``), or whose samples it read from the graph in another order (``rows.row_samples``:
Llama 4's experts get every token once per expert, JetMoE's ``rows[batch_index]``), or which are
the samples themselves. Gathers (``x[idx]``, ``index_select``, ``repeat_interleave``) give each
picked row the label of its source row, a split of the rows (JetMoE's ``rows.split(expert_size)``)
each piece its rows' labels; row-wise ops (activations, casts, splits and cats along other dims,
reshapes that keep or split rows, elementwise arithmetic of rows with the same labels, or with
tensors that carry no gradient or are made of parameters alone) keep the labels; any other op's
output has none. Rows viewed as expert blocks ``[E, M, d]`` (Llama 4's ``bmm`` with the whole
``[E, d, o]`` weight: block ``e`` through expert ``e``) carry ``[E, M]`` labels through ops that
keep both leading dims, and back to rows. A product of an own
weight with rows that have no labels falls back to the generic route's replay, and an in-place op
that may move values between the rows of a labelled tensor's storage stops the recording.

The output grad ``g_r`` of a product's row holds only sample ``s(r)``'s loss as long as the model
keeps samples apart after the product, which every per-sample method assumes (``vmap`` too).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .linear import linear_norms
from .routes import max_extra_bytes
from .rows import _MAX_NODES, _from_parameters


@dataclass(eq=False)
class RowProduct:
    """One product of an own weight with labelled rows, as recorded in the forward.

    ``rows [n, k]`` is the factor that is not the weight (detached; a column of ones for a bias),
    ``positions [n]`` the row of the module's first input each row came from (``n_input`` rows in
    all), ``experts [n]`` the index along the weight's first dim each row used (-1: none, e.g.
    rows after ``offs[-1]`` in a grouped product; all 0 for a weight without an expert dim).
    ``grad_on_left``: the weight slice's gradient is ``g^T rows`` (True, a ``[out, in]`` layout
    such as ``F.linear``'s) or ``rows^T g`` (False, ``x @ W[e]``)."""

    rows: torch.Tensor
    positions: torch.Tensor
    experts: torch.Tensor
    grad_on_left: bool
    n_input: int
    stacked: bool  # the parameter has an expert dim (its first) that ``experts`` indexes
    grad_width: int  # the output grad as ``[n, grad_width]``: one row per row of ``rows``
    # The sample of each of the first input's rows (set by the tracker where they are in no
    # sample-major order, ``rows.row_samples``); None: row ``i`` is sample ``i // (n_input / B)``.
    input_samples: torch.Tensor | None = None


_ELEMENTWISE_UNARY = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.softplus, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.logsigmoid, F.dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg,
    torch.erf, torch.square, torch.pow, torch.clamp, torch.clip, torch.nn.functional.softsign,
    torch.Tensor.relu, torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.exp, torch.Tensor.log,
    torch.Tensor.sqrt, torch.Tensor.rsqrt, torch.Tensor.abs, torch.Tensor.neg, torch.Tensor.__neg__,
    torch.Tensor.erf, torch.Tensor.square, torch.Tensor.pow, torch.Tensor.__pow__, torch.Tensor.clamp,
    torch.Tensor.clip, torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
    torch.Tensor.double, torch.Tensor.type_as, torch.Tensor.type, torch.Tensor.contiguous, torch.Tensor.clone,
}
# Along a dim given as an argument, which must not be the rows' dim (0).
# Each: the position of its ``dim`` argument and its default (None: none, or an implicit choice).
_ALONG_DIM = {F.softmax: (1, None), F.log_softmax: (1, None), torch.softmax: (1, None),
              torch.log_softmax: (1, None), torch.Tensor.softmax: (1, None), torch.Tensor.log_softmax: (1, None),
              F.glu: (1, -1), F.normalize: (2, 1)}
_ELEMENTWISE_BINARY = {
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
    torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__,
    torch.maximum, torch.minimum, torch.where,
}
_IN_PLACE_ROW_WISE = {
    torch.Tensor.add_, torch.Tensor.__iadd__, torch.Tensor.sub_, torch.Tensor.__isub__, torch.Tensor.mul_,
    torch.Tensor.__imul__, torch.Tensor.div_, torch.Tensor.__itruediv__, torch.Tensor.clamp_,
    torch.Tensor.relu_, torch.Tensor.sigmoid_, torch.Tensor.tanh_, torch.Tensor.zero_, torch.Tensor.neg_,
}
_RESHAPES = {
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.view_as, torch.Tensor.reshape_as,
    torch.Tensor.flatten, torch.flatten, torch.Tensor.unflatten, torch.Tensor.unsqueeze, torch.unsqueeze,
    torch.Tensor.squeeze, torch.squeeze, torch.Tensor.expand, torch.Tensor.expand_as,
}
_PERMUTES = {torch.Tensor.transpose, torch.transpose, torch.Tensor.permute, torch.permute, torch.Tensor.movedim,
             torch.movedim}
_SPLITS = {torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split, torch.Tensor.unbind, torch.unbind,
           torch.Tensor.tensor_split, torch.tensor_split}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_GATHERS = {torch.Tensor.__getitem__, torch.Tensor.index_select, torch.index_select}
_REPEATS = {torch.Tensor.repeat_interleave, torch.repeat_interleave}
# Row-wise products with a weight that is not the module's own (``F.linear(rows, other.weight)``).
_FOREIGN_PRODUCTS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


def _dim_arg(args, kwargs, position: int, default=None):
    return kwargs.get("dim", args[position] if len(args) > position else default)


def _is_rows_dim(dim, rank: int) -> bool:
    return isinstance(dim, int) and rank > 0 and dim % rank == 0


class RowLabels:
    """Which row of a module's first input each row of the tensors of its forward came from.

    ``of(x)`` is a ``[x.shape[0]]`` int64 tensor or None; ``observe`` is called with every op of
    the forward (see the module docstring for what keeps labels). ``broken`` is set by an in-place
    op that may mix rows of a labelled tensor's storage."""

    def __init__(self, first: torch.Tensor):
        self._labels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._storages: set[int] = set()
        self.broken = False
        self.n_input = first.shape[0]
        self.set(first, torch.arange(first.shape[0], device=first.device))

    def of(self, x) -> torch.Tensor | None:
        entry = self._labels.get(id(x)) if isinstance(x, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is x else None

    def set(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Label ``x``'s rows (``labels [x.shape[0]]``), or for expert blocks ``[E, M, ...]`` each
        block's rows (``labels [E, M]``)."""
        if x.dim() < max(labels.dim(), 1) or tuple(x.shape[:labels.dim()]) != tuple(labels.shape):
            return
        self._labels[id(x)] = (x, labels)
        if x.numel():  # (empty tensors share no storage worth guarding)
            self._storages.add(_storage(x))

    def clear(self) -> None:
        """Drop every reference (the forward's tensors) once the module's forward is done."""
        self._labels.clear()
        self._storages.clear()

    def observe(self, func, args, kwargs, out) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        labelled = [lab for lab in map(self.of, tensors) if lab is not None]
        if self._storages and _writes_in_place(func, kwargs):
            target = kwargs.get("out") if kwargs.get("out") is not None else (args[0] if args else None)
            if isinstance(target, torch.Tensor) and _storage(target) in self._storages:
                if not (func in _IN_PLACE_ROW_WISE and self._row_wise_operands(args[1:], kwargs, self.of(target))):
                    self.broken = True
            return
        if not labelled:
            if func in _CATS and args and isinstance(args[0], (list, tuple)):
                self._cat(args, kwargs, out)
            return
        x = args[0] if args else None
        lab = self.of(x)
        if any(other.dim() > 1 for other in labelled):
            self._observe_blocks(func, args, kwargs, out, x, lab, len(tensors), labelled)
            return
        if self._row_wise(func, args, kwargs, out, x, lab, len(tensors), labelled):
            return
        if func in _GATHERS:
            if lab is not None:
                self._gather(func, x, args[1:], kwargs, lab, out)
        elif func in _REPEATS:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if (lab is not None and isinstance(repeats, int) and _is_rows_dim(_dim_arg(args, kwargs, 2), x.dim())
                    and isinstance(out, torch.Tensor)):
                self.set(out, lab.repeat_interleave(repeats))
        elif func in _RESHAPES:
            if lab is not None and isinstance(out, torch.Tensor) and out.dim() > 0 and x.dim() > 0:
                if out.shape[0] == x.shape[0]:
                    self.set(out, lab)
                elif out.shape[0] % x.shape[0] == 0 and func not in (torch.Tensor.expand, torch.Tensor.expand_as):
                    self.set(out, lab.repeat_interleave(out.shape[0] // x.shape[0]))
                elif out.dim() == x.dim() + 1 and out.shape[0] * out.shape[1] == x.shape[0] \
                        and out.shape[2:] == x.shape[1:]:
                    self.set(out, lab.view(out.shape[0], out.shape[1]))  # rows split into expert blocks
        elif func in _PERMUTES:
            if lab is not None and isinstance(out, torch.Tensor) and _keeps_first_dim(func, args, kwargs, x.dim()):
                self.set(out, lab)
        elif func in _SPLITS:
            if lab is not None and not self._split_along_later_dim(func, args, kwargs, out, x, lab) \
                    and func not in (torch.Tensor.unbind, torch.unbind):
                self._split_rows(func, x, args, kwargs, lab, out)
        elif func in _FOREIGN_PRODUCTS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if (lab is not None and len(labelled) == 1 and isinstance(weight, torch.Tensor) and weight.dim() <= 2
                    and self.of(weight) is None and _constant_or_parameters(weight)):
                self._keep(out, x, lab)

    def _observe_blocks(self, func, args, kwargs, out, x, lab, n_tensors, labelled) -> None:
        """``observe`` for tensors of expert blocks ``[E, M, ...]`` (labels ``[E, M]``, every token
        run through every expert as one batch, as Llama 4's experts): only ops that keep both
        leading dims (elementwise ops, ops and splits along a later dim), and the reshape back to
        rows. Anything else gives no labels."""
        if self._row_wise(func, args, kwargs, out, x, lab, n_tensors, labelled):
            return
        if func in _SPLITS:
            if lab is not None:
                self._split_along_later_dim(func, args, kwargs, out, x, lab)
        elif func in _RESHAPES and func not in (torch.Tensor.expand, torch.Tensor.expand_as):
            if lab is not None and isinstance(out, torch.Tensor):
                if out.dim() >= lab.dim() and out.shape[:lab.dim()] == x.shape[:lab.dim()]:
                    self.set(out, lab)
                elif out.dim() >= 1 and out.shape[0] == lab.numel() and out.shape[1:] == x.shape[lab.dim():]:
                    self.set(out, lab.reshape(-1))  # the blocks' rows merged back

    def _row_wise(self, func, args, kwargs, out, x, lab, n_tensors, labelled) -> bool:
        """Whether ``func`` is an op that leaves every row (every expert block's row, for ``[E, M]``
        labels) where it is: an elementwise op, or one along a dim after the labelled ones. Its
        output gets the labels where its operands allow."""
        if func in _ELEMENTWISE_UNARY:
            if lab is not None and len(labelled) == 1 and (func in (torch.Tensor.type_as, torch.Tensor.to)
                                                          or n_tensors == 1):
                self._keep(out, x, lab)
        elif func in _ALONG_DIM:
            dim = _dim_arg(args, kwargs, *_ALONG_DIM[func])
            if lab is not None and n_tensors == 1 and isinstance(dim, int) and dim % x.dim() >= lab.dim():
                self._keep(out, x, lab)
        elif func in _ELEMENTWISE_BINARY:
            first = labelled[0]
            if self._row_wise_operands(args, kwargs, first):
                ref = next(a for a in args if self.of(a) is first)
                self._keep(out, ref, first)
        else:
            return False
        return True

    def _split_along_later_dim(self, func, args, kwargs, out, x, lab) -> bool:
        """Pieces of a split along a dim after the labelled ones keep the labels; False for a split
        along a labelled dim."""
        dim = _dim_arg(args, kwargs, 1 if func in (torch.Tensor.unbind, torch.unbind) else 2, 0)
        if not isinstance(dim, int) or dim % x.dim() < lab.dim():
            return False
        for piece in out:
            self._keep(piece, x, lab)
        return True

    def _split_rows(self, func, x, args, kwargs, lab, out) -> None:
        """Pieces of a split along the rows (JetMoE's experts: ``rows.split(expert_size)``): the same
        split of the labels, so piece ``i`` keeps the labels of its rows."""
        how = args[1] if len(args) > 1 else kwargs.get(
            "chunks", kwargs.get("split_size_or_sections", kwargs.get("split_size", kwargs.get("sections"))))
        if isinstance(how, torch.Tensor) or not isinstance(out, (tuple, list)):
            return
        split = {torch.Tensor.chunk: torch.chunk, torch.chunk: torch.chunk, torch.Tensor.split: torch.split,
                 torch.split: torch.split, torch.Tensor.tensor_split: torch.tensor_split,
                 torch.tensor_split: torch.tensor_split}[func]
        try:
            pieces = split(lab, how, 0)
        except (RuntimeError, TypeError, ValueError):
            return
        if len(pieces) == len(out):
            for piece, piece_lab in zip(out, pieces):
                if isinstance(piece, torch.Tensor) and piece.dim() == x.dim() and piece.shape[0] == piece_lab.shape[0]:
                    self.set(piece, piece_lab)

    def _keep(self, out, x, lab) -> None:
        """Label ``out`` as ``x`` if it has ``x``'s rank and rows (a row-wise op's result)."""
        if isinstance(out, torch.Tensor) and out.dim() == x.dim() and out.shape[0] == x.shape[0]:
            self.set(out, lab)

    def _row_wise_operands(self, args, kwargs, lab) -> bool:
        """Every tensor operand has the labels ``lab`` or carries no per-row data of its own
        (no gradient, or parameters alone) and does not add leading dims."""
        if lab is None:
            return False
        for a in list(args) + list(kwargs.values()):
            if not isinstance(a, torch.Tensor):
                continue
            other = self.of(a)
            if other is not None:
                if other is not lab and not (other.shape == lab.shape and torch.equal(other, lab)):
                    return False
            elif not _constant_or_parameters(a):
                return False  # e.g. rows of their own, or a statistic over all rows (``rows.mean(0)``)
        return True

    def _gather(self, func, x, rest, kwargs, lab, out) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            return
        if func is torch.Tensor.__getitem__:
            picked = _picked_rows(rest[0] if rest else None, x.dim(), lab)
        else:
            dim = rest[0] if rest else kwargs.get("dim")
            index = rest[1] if len(rest) > 1 else kwargs.get("index")
            if not isinstance(dim, int):
                picked = None
            elif _is_rows_dim(dim, x.dim()):
                picked = lab[index] if _is_row_index(index) else None
            else:
                picked = lab
        if picked is not None and picked.shape[0] == out.shape[0]:
            self.set(out, picked)

    def _cat(self, args, kwargs, out) -> None:
        if not isinstance(out, torch.Tensor):
            return
        parts = args[0]
        labels = [self.of(t) for t in parts]
        dim = _dim_arg(args, kwargs, 1, 0)
        if any(lab is None for lab in labels):
            return
        if _is_rows_dim(dim, out.dim()):
            self.set(out, torch.cat(labels))
        elif all(lab is labels[0] or torch.equal(lab, labels[0]) for lab in labels):
            self.set(out, labels[0])


def _storage(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad"}
_IN_PLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or",
                                            "xor", "lshift", "rshift", "matmul")}


def _writes_in_place(func, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if name in _NOT_WRITES:
        return False
    return ("out" in kwargs and kwargs["out"] is not None) or name == "__setitem__" or (
        name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS


def _constant_or_parameters(t: torch.Tensor) -> bool:
    """Carries no gradient, or is made of parameters alone (a layer scale, another module's weight)."""
    if not t.requires_grad:
        return True
    if isinstance(t, torch.nn.Parameter):
        return True
    return t.grad_fn is not None and _from_parameters(t.grad_fn, [_MAX_NODES])


def _is_row_index(index) -> bool:
    return (isinstance(index, torch.Tensor) and index.dim() == 1 and not index.is_floating_point()
            and not index.is_complex())


def _picked_rows(index, rank: int, lab: torch.Tensor) -> torch.Tensor | None:
    """Labels of ``x[index]``'s rows, where ``index`` keeps or gathers ``x``'s rows; else None."""
    first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
    if any(isinstance(t, list) for t in rest):
        return None
    if isinstance(first, torch.Tensor):
        if first.dtype == torch.bool:
            if first.dim() != 1:
                return None
            first = first.nonzero().squeeze(1)
        if not _is_row_index(first):
            return None
        # Other advanced indices broadcast with the first one: the result's rows are its rows.
        if any(isinstance(t, torch.Tensor) and (t.dtype == torch.bool or t.dim() > 1
                                                 or (t.dim() == 1 and t.shape[0] not in (1, first.shape[0])))
               for t in rest):
            return None
        return lab[first]
    if any(isinstance(t, torch.Tensor) for t in rest):
        return None  # advanced indices on later dims only may move to the front
    if first == slice(None):
        return lab
    if first is Ellipsis and sum(t is not None for t in rest) < rank:
        return lab
    return None


def _keeps_first_dim(func, args, kwargs, rank: int) -> bool:
    if func in (torch.Tensor.transpose, torch.transpose):
        dims = list(args[1:3]) if len(args) >= 3 else [kwargs.get("dim0"), kwargs.get("dim1")]
        return all(isinstance(d, int) and d % rank != 0 for d in dims)
    if func in (torch.Tensor.permute, torch.permute):
        dims = kwargs.get("dims")
        if dims is None:
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        return len(dims) == rank and isinstance(dims[0], int) and dims[0] % rank == 0
    if func in (torch.Tensor.movedim, torch.movedim):
        source = args[1] if len(args) > 1 else kwargs.get("source")
        dest = args[2] if len(args) > 2 else kwargs.get("destination")
        return isinstance(source, int) and isinstance(dest, int) and source % rank != 0 and dest % rank != 0
    return False


# ------------------------------------------------------------------------------ own weights in products
@dataclass
class _Weight:
    """An own parameter as an op of the forward sees it."""

    name: str
    expert: int | torch.Tensor | None  # ``W[e]``, ``W[ids]`` (one expert per row), or the whole parameter
    transposed: bool                   # its last two dims swapped (``W[e].t()``, ``W.transpose(-2, -1)``)
    scale: float                       # a constant factor (``-W``, ``W / 2``; see DirectUseRecorder)


_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.select, torch.select}
_TRANSPOSES = {torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose, torch.Tensor.T.__get__,
               torch.Tensor.mT.__get__}
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_GROUPED = {getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)} - {None}
_BIAS_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add_,
              torch.Tensor.__iadd__}


class ExpertUses:
    """The generic route recorder's part that follows a module's own weights into products with
    labelled rows: slices ``W[e]``, ``W[ids]`` and transposes of them, then ``F.linear``,
    ``@``/``matmul``, ``torch._grouped_mm`` (with ``offs``) and bias additions. ``handle`` returns
    the ``RowProduct`` records an op makes (``[]`` for a slice), or None for an op that is not
    one of these; ``refused`` is set where an own weight meets rows with no labels."""

    def __init__(self, params: dict[str, torch.Tensor], first_input: torch.Tensor):
        self.labels = RowLabels(first_input)
        self.shapes = {name: p.shape for name, p in params.items()}
        self.weights: dict[int, tuple[torch.Tensor, _Weight]] = {}
        self.refused = False

    def clear(self) -> None:
        self.labels.clear()
        self.weights.clear()

    def weight(self, x, aliases) -> _Weight | None:
        """``x`` as an own weight: a slice or transpose recorded here, or the parameter itself
        (``aliases``: the recorder's parameters and the tensors it treats as them)."""
        if not isinstance(x, torch.Tensor):
            return None
        entry = self.weights.get(id(x))
        if entry is not None and entry[0] is x:
            return entry[1]
        alias = aliases.get(id(x))
        if (alias is not None and alias[1] is x and x.shape == self.shapes[alias[0]]
                and not isinstance(alias[2], torch.Tensor)):  # (a function of the weight: replayed)
            return _Weight(alias[0], None, False, alias[2])
        return None

    def touches(self, args, kwargs) -> bool:
        """Whether an op's arguments include a slice or transpose of an own weight."""
        if not self.weights:
            return False
        flat = list(args) + list(kwargs.values())
        flat += [t for a in flat if isinstance(a, (list, tuple)) for t in a]
        return any(isinstance(a, torch.Tensor) and id(a) in self.weights and self.weights[id(a)][0] is a
                   for a in flat)

    def handle(self, func, args, kwargs, out, aliases):
        if func in _INDEXING:
            return self._slice(func, args, kwargs, out, aliases)
        if func in _TRANSPOSES:
            return self._transpose(func, args, kwargs, out, aliases)
        if func is F.linear:
            x, weight = args[0], (args[1] if len(args) > 1 else kwargs.get("weight"))
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return self._products(x, [(self.weight(weight, aliases), weight, "linear"),
                                      (self.weight(bias, aliases), bias, "bias")], out)
        if (func in _MATMULS or func in (torch.bmm, torch.Tensor.bmm)) and len(args) == 2 and not kwargs:
            blocks = self._blocks_product(args[0], args[1], out, aliases)
            if blocks is not None:
                return blocks
        if func in _MATMULS and len(args) == 2:
            return self._products(args[0], [(self.weight(args[1], aliases), args[1], "matmul")], out)
        if func is torch.einsum:
            product = _einsum_product(args, kwargs)
            if product is None:
                return None
            x, weight, how = product
            return self._products(x, [(self.weight(weight, aliases), weight, how)], out)
        if func in _GROUPED:
            offs = args[2] if len(args) > 2 else kwargs.get("offs")
            if (args[3] if len(args) > 3 else kwargs.get("bias")) is not None:
                return None  # not seen in practice: left to the replay
            return self._products(args[0], [(self.weight(args[1], aliases), args[1], "grouped")], out, offs)
        if func in (torch.bmm, torch.Tensor.bmm) and len(args) == 2 and not kwargs:
            # ``W[ids] @ x[..., None]`` or ``x[:, None] @ W[ids]``: one expert per row.
            first, second = self.weight(args[0], aliases), self.weight(args[1], aliases)
            if first is not None and second is None and args[1].dim() == 3 and args[1].shape[-1] == 1:
                return self._products(args[1], [(first, args[0], "weight_first")], out)
            if second is not None and first is None and args[0].dim() == 3 and args[0].shape[1] == 1:
                return self._products(args[0], [(second, args[1], "rows_first")], out)
            return None
        if func in _BIAS_ADDS and len(args) == 2 and not kwargs:
            # ``rows + b`` (``b[e]``, or ``b[ids]`` with one row per row): only where it is that;
            # any other use of a whole parameter is left to the broadcast uses.
            for i in (0, 1):
                w, x = self.weight(args[i], aliases), args[1 - i]
                if (w is not None and self.labels.of(x) is not None and isinstance(out, torch.Tensor)
                        and out.shape == x.shape and args[i].dim() == 1 + isinstance(w.expert, torch.Tensor)
                        and args[i].shape[-1] == x.shape[-1]):
                    return self._products(x, [(w, args[i], "bias")], out)
        return None

    def _slice(self, func, args, kwargs, out, aliases):
        base = self.weight(args[0], aliases)
        if base is None or base.expert is not None or base.transposed or args[0].dim() < 2 or args[0].shape[0] == 1:
            return None  # (``table[0]`` of a ``[1, T, d]`` table stays a broadcast use)
        if func is torch.Tensor.__getitem__:
            index = args[1] if len(args) > 1 else None
        else:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            index = args[2] if len(args) > 2 else kwargs.get("index")
            if not isinstance(dim, int) or dim % args[0].dim() != 0:
                return None
        if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
            index = int(index)
        if isinstance(index, bool) or not (isinstance(index, int) or _is_row_index(index)):
            return None
        self.weights[id(out)] = (out, _Weight(base.name, index, False, base.scale))
        return []

    def _transpose(self, func, args, kwargs, out, aliases):
        base = self.weight(args[0], aliases)
        x = args[0]
        if base is None or not isinstance(out, torch.Tensor) or x.dim() < 2:
            return None
        if func in (torch.Tensor.transpose, torch.transpose):
            dims = sorted(d % x.dim() for d in args[1:3])
            if dims != [x.dim() - 2, x.dim() - 1]:
                return None
        elif func in (torch.Tensor.t, torch.t, torch.Tensor.T.__get__) and x.dim() != 2:
            return None
        self.weights[id(out)] = (out, _Weight(base.name, base.expert, not base.transposed, base.scale))
        return []

    def _blocks_product(self, x, weight, out, aliases):
        """``x @ W`` of expert blocks ``x [E, M, in]`` with a whole stacked own weight ``W [E, in, out]``
        (or its transpose): block ``e`` uses expert ``e`` (Llama 4's experts). None if it is not that."""
        w = self.weight(weight, aliases)
        if (w is None or w.expert is not None or not isinstance(x, torch.Tensor) or x.dim() != 3
                or weight.dim() != 3 or len(self.shapes[w.name]) != 3 or self.weight(x, aliases) is not None
                or not isinstance(out, torch.Tensor) or x.shape[0] != weight.shape[0]):
            return None
        lab = self.labels.of(x)
        if lab is None or lab.dim() != 2 or self.labels.broken:
            self.refused = True
            return []
        n_experts, per_expert = lab.shape
        product = RowProduct(x.detach().reshape(-1, x.shape[-1]), lab.reshape(-1),
                             torch.arange(n_experts, device=x.device).repeat_interleave(per_expert),
                             w.transposed, self.labels.n_input, True, out.shape[-1])
        self.labels.set(out, lab)
        return [(w, product, out)]

    def _products(self, x, weights, out, offs=None):
        """Records for ``out = x (op) w`` for each own weight among ``weights`` (weight, tensor, how)."""
        own = [(w, t, how) for w, t, how in weights if w is not None]
        if not own or any(w is None and isinstance(t, torch.Tensor) and t.requires_grad for w, t, _ in weights):
            # (an operand beside it computed from the parameters, ``F.linear(x, tanh(self.w), self.b)``,
            # ``F.linear(x, self.w, tanh(self.b))``, whose use a recorded row product would leave out:
            # 72% off, refused on verified backwards; the recorder takes the op as a computed product)
            return None
        lab = self.labels.of(x)
        if lab is None or lab.dim() != 1 or self.labels.broken or not isinstance(out, torch.Tensor) \
                or x.dim() < 2 or out.shape[0] != x.shape[0]:
            self.refused = True
            return []
        records = []
        for w, t, how in own:
            product = self._product(x, lab, w, t, how, out, offs)
            if product is None:
                self.refused = True
                return []
            records.append((w, product, out))
        self.labels.set(out, lab)
        return records

    def _product(self, x, lab, w: _Weight, t, how, out, offs) -> RowProduct | None:
        stacked = w.expert is not None or how == "grouped"
        shape = self.shapes[w.name]
        matrix = 1 if how == "bias" else 2
        per_row = isinstance(w.expert, torch.Tensor)
        if per_row != (how in ("weight_first", "rows_first") or (how == "bias" and t.dim() == 2)):
            return None
        if t.dim() != matrix + (how == "grouped" or per_row):
            return None
        if stacked and len(shape) != matrix + 1:
            return None
        if how == "bias":
            n = out.numel() // out.shape[-1]
            if out.shape[-1] != t.shape[-1] or out.numel() != x.shape[0] * (n // x.shape[0]) * out.shape[-1]:
                return None
            rows = out.new_ones(n, 1)
            grad_on_left = True
        elif per_row:
            rows = x.detach().reshape(x.shape[0], -1)
            n = rows.shape[0]
            grad_on_left = (how == "weight_first") != w.transposed
        else:
            rows = x.detach().reshape(-1, x.shape[-1])
            n = rows.shape[0]
            grad_on_left = (how == "linear") != w.transposed
        per_label = n // x.shape[0]
        positions = lab.repeat_interleave(per_label) if per_label > 1 else lab
        if how == "grouped":
            if not _is_row_index(offs) or offs.shape[0] != shape[0] or x.dim() != 2:
                return None
            experts = torch.searchsorted(offs.to(torch.int64), torch.arange(n, device=x.device), right=True)
            experts = torch.where(experts < shape[0], experts, -1)
        elif per_row:
            if w.expert.shape[0] != x.shape[0] or (how == "bias" and x.dim() != 2):
                return None
            experts = w.expert.to(torch.int64)
        else:
            experts = torch.full((n,), w.expert or 0, dtype=torch.int64, device=x.device)
        return RowProduct(rows, positions, experts, grad_on_left, self.labels.n_input, stacked, out.numel() // n)


def _einsum_product(args, kwargs):
    """``(x, w, how)`` where ``torch.einsum(equation, x, w)`` (either order) is ``x @ w`` ("matmul":
    ``"...i,io->...o"``) or ``F.linear(x, w)`` ("linear": ``"...i,oi->...o"``) for a 2-D ``w``:
    ``x``'s last index contracted with one of ``w``'s, the other one last in the output, every
    other index of ``x`` kept in place. None for any other equation."""
    if kwargs or not args or not isinstance(args[0], str):
        return None
    operands = list(args[1][0:2] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
    equation = args[0].replace(" ", "")
    if len(operands) != 2 or "->" not in equation or equation.count(",") != 1:
        return None
    inputs, result = equation.split("->")
    specs = inputs.split(",")
    for x_at in (0, 1):
        x_spec, w_spec, x, w = specs[x_at], specs[1 - x_at], operands[x_at], operands[1 - x_at]
        if (len(w_spec) != 2 or w_spec[0] == w_spec[1] or "." in w_spec or not x_spec or not result
                or not isinstance(w, torch.Tensor) or w.dim() != 2):
            continue
        contracted, kept = x_spec[-1], result[-1]
        if (x_spec[:-1] != result[:-1] or sorted(w_spec) != sorted(contracted + kept) or contracted == kept
                or contracted in result or kept in x_spec or len(set(x_spec.replace(".", ""))) != len(x_spec.replace(".", ""))):
            continue
        return x, w, ("matmul" if w_spec == contracted + kept else "linear")
    return None


# ------------------------------------------------------------------------------ norms and sums
def _groups(entries, batch_size: int, n_experts: int):
    """Concatenate every recorded product of one parameter into ``left [n, P0]``, ``right [n, P1]``
    (the slice gradient is ``left^T right``) and the group ``expert * B + sample`` of each row."""
    lefts, rights, groups = [], [], []
    for product, grad, scale in entries:
        g = grad.reshape(-1, product.grad_width)
        rows = product.rows
        if g.dtype != rows.dtype:  # autocast: a float32 input with a half output grad
            g, rows = g.float(), rows.float()
        if scale != 1.0:
            g = g * scale
        left, right = (g, rows) if product.grad_on_left else (rows, g)
        keep = product.experts >= 0
        if product.input_samples is not None:
            sample = product.input_samples[product.positions]
        else:
            sample = product.positions // (product.n_input // batch_size)
        group = product.experts * batch_size + sample
        if not bool(keep.all()):
            left, right, group = left[keep], right[keep], group[keep]
        lefts.append(left)
        rights.append(right)
        groups.append(group)
    if len(entries) == 1:
        return lefts[0], rights[0], groups[0]
    if len({t.dtype for t in lefts + rights}) > 1:
        lefts, rights = [t.float() for t in lefts], [t.float() for t in rights]
    return torch.cat(lefts), torch.cat(rights), torch.cat(groups)


#: Groups padded together differ in size by at most this factor (padding wastes little).
_BUCKET_RATIO = 0.8


def rows_norms(entries, batch_size: int, n_experts: int) -> torch.Tensor:
    """Per-sample squared norm [B] (float32) of one parameter's gradient from its recorded
    products: ``entries`` is a list of ``(RowProduct, output grad, scale)``.

    Each (expert, sample) group's gradient is ``left_g^T right_g`` over its rows. Groups of
    similar sizes (within ``_BUCKET_RATIO``) are padded with zero rows (which add nothing) into
    one ``[groups, n_max, .]`` batch for ``linear_norms``, which picks the ghost or instantiate
    route; a batch holds at most ``routes.max_extra_bytes`` of padded rows (one group at least). The
    groups' norms are summed per sample."""
    left, right, group = _groups(entries, batch_size, n_experts)
    sq = torch.zeros(batch_size, dtype=torch.float32, device=left.device)
    if group.numel() == 0:
        return sq
    n_groups = n_experts * batch_size
    group_sorted, order = torch.sort(group, stable=True)
    counts = torch.bincount(group_sorted, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(group_sorted.shape[0], device=group.device) - starts[group_sorted]
    by_size = torch.argsort(counts, descending=True)
    sizes = counts[by_size].tolist()
    row_bytes = (left.shape[1] + right.shape[1]) * left.element_size()
    bound = max_extra_bytes(left.device.type)
    buckets, first = [], 0
    while first < n_groups and sizes[first] > 0:
        width, last = sizes[first], first + 1
        while (last < n_groups and sizes[last] > 0 and sizes[last] >= _BUCKET_RATIO * width
               and (last + 1 - first) * width * row_bytes <= bound):
            last += 1
        buckets.append((first, last, width))
        first = last
    # Groups in size order (``rank``): each bucket is a run of ranks, so rows sorted by their
    # group's rank come out contiguous per bucket, bucket k's from ``offset[first]`` on.
    rank = torch.empty_like(by_size)
    rank[by_size] = torch.arange(n_groups, device=group.device)
    row_rank = rank[group_sorted]
    by_rank = torch.sort(row_rank, stable=True)[1]
    offset = [0, *itertools.accumulate(sizes)]
    for first, last, width in buckets:
        rows = by_rank[offset[first]:offset[last]]
        dest = (row_rank[rows] - first) * width + slot[rows]  # row of the padded [groups * width, .]
        picked = order[rows]
        a = right.new_zeros((last - first) * width, right.shape[1])
        a.index_copy_(0, dest, right.index_select(0, picked))
        g = left.new_zeros((last - first) * width, left.shape[1])
        g.index_copy_(0, dest, left.index_select(0, picked))
        a, g = a.view(last - first, width, -1), g.view(last - first, width, -1)
        sq.index_add_(0, by_size[first:last] % batch_size, linear_norms(a, g, True, False))
    return sq


def rows_grad_sum(entries, batch_size: int, param_shape: torch.Size) -> torch.Tensor:
    """The parameter's gradient (float32, its shape) that the recorded products account for."""
    stacked = entries[0][0].stacked
    n_experts = param_shape[0] if stacked else 1
    left, right, group = _groups(entries, batch_size, n_experts)
    expert = group // batch_size
    slices = []
    for e in range(n_experts):
        pick = (expert == e).nonzero().squeeze(1)
        slices.append(left[pick].t().float() @ right[pick].float())
    total = torch.stack(slices) if stacked else slices[0]
    return total.reshape(param_shape)


def rows_per_sample(entries, batch_size: int, param_shape: torch.Size, samples: slice) -> torch.Tensor:
    """``[len(samples), *param_shape]`` float32 per-sample gradients (for a module whose other calls
    are replayed, so per-sample gradients must be formed; a chunk of samples at a time)."""
    stacked = entries[0][0].stacked
    n_experts = param_shape[0] if stacked else 1
    left, right, group = _groups(entries, batch_size, n_experts)
    sample, expert = group % batch_size, group // batch_size
    count = samples.stop - samples.start
    matrix = (left.shape[1], right.shape[1])
    out = left.new_zeros(count, n_experts, *matrix, dtype=torch.float32)
    for b in range(count):
        for e in range(n_experts):
            pick = ((sample == samples.start + b) & (expert == e)).nonzero().squeeze(1)
            if pick.numel():
                out[b, e] = left[pick].t().float() @ right[pick].float()
    return out.reshape(count, *param_shape)
