"""GradNormTracker: per-sample gradient squared norms from an ordinary backward pass.

How it works: a forward hook on every module that owns trainable parameters keeps the layer
input (a reference autograd holds anyway, no copy) and registers a tensor hook on the output;
when the output's gradient arrives in the backward pass, the module's rule
(``divebatch.layers``) turns (input, output grad) into per-sample squared norms right away, so
nothing is held longer than autograd holds it. A tensor hook on every tracked parameter sees
exactly this backward's gradient before it is accumulated into ``.grad`` and adds its squared
norm to the batch-gradient norm. A callback queued on the autograd engine closes the record at
the end of each backward.

Scaling contract (DESIGN §2): the user's loss is ``L = c * sum_i l_i`` with ``c`` given by
``loss_reduction`` ("sum": 1, "mean": 1/B, or a positive float such as 1/#tokens). Every
number reported is about the **unscaled** per-sample losses ``l_i``: ``||g_i||^2`` and
``||sum_i g_i||^2``, i.e. the hooked quantities divided by ``c**2``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import re
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field, replace
from functools import partial, wraps
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _fsdp
from ._norms import SquaredNormSum, squared_distance, squared_norm
from .layers import GENERIC, LayerRule, RoutePlan, rule_for
from .layers.attention import MultiheadAttentionRule
from .layers.recurrent import RecurrentRule
from .layers.generic import (TRANSFORMER_MODULES, DirectUseRecorder, GenericCall, SharedOutputWatcher,
                             SharedOutputWatchers, declared_batch_first, usable_direct_uses)
from .layers.rows import (NO_LAYOUT, MergedIdsFollower, flattened_samples, merged_rows_order, merged_sequence_rows, row_samples,
                          samples_dim, sequences_first_view)
from .layers.base import capture_suspended
from .layers.conv import ConvRule
from .layers.embedding import EmbeddingBagCall, EmbeddingCall, EmbeddingRule
from .layers.linear import LinearRule, linear_factors
from .layers.activation import PReLURule
from .layers.bilinear import BilinearRule
from .layers.norm import AffineNormRule, RowNormRule
from .layers.tied import TableProducts, TiedEmbeddingLinear, output_layer, tied_cross, tied_rows


@dataclass
class GradNormStats:
    """Per-sample gradient statistics of one backward pass (all float32, unscaled).

    Attributes:
        per_sample: ``[B]``, ``||g_i||^2`` summed over every tracked parameter, where ``g_i`` is
            the gradient of sample i's own loss ``l_i``.
        batch_grad_sq: scalar, ``||sum_i g_i||^2`` of this backward only (never of an
            accumulated ``.grad``); None when the tracker's ``track_batch_grad`` is off.
        per_layer: module name -> ``[B]``, the part of ``per_sample`` from that module's parameters.
            A weight tied between an Embedding and a Linear adds the entry
            ``"<embedding name>+<linear name>"``: the cross term ``2 <g_emb, g_lin>`` of the
            weight's two gradient parts (it can be negative). The entries sum to ``per_sample``.
        batch_size: B.
        scale: the factor ``c`` of ``L = c * sum_i l_i`` that was divided out.
        backwards: tracked backward passes since the previous ``collect()``; only the last one is
            in these stats (more than 1 means gradient accumulation went uncollected).
        unaccounted: on a verified backward (see ``GradNormTracker``'s ``verify_every``), module
            name -> ``||grad - accounted|| / max(||grad||, sqrt(sum_i ||g_i||^2))`` over the
            module's parameters: the part of autograd's gradient that the module's forward calls do
            not account for, relative to the larger of that gradient and the samples' own (float32
            rounding when all is well; above the tolerance ``collect()`` raises instead). None
            on backwards that were not verified.
    """

    per_sample: torch.Tensor
    batch_grad_sq: torch.Tensor | None
    per_layer: dict[str, torch.Tensor]
    batch_size: int
    scale: float
    backwards: int = 1
    unaccounted: dict[str, float] | None = None

    @property
    def diversity(self) -> torch.Tensor:
        """Gradient diversity of this batch, ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` (Yin et al.), a 0-dim tensor."""
        if self.batch_grad_sq is None:
            raise ValueError("no batch-gradient norm in these stats (the tracker's track_batch_grad was off); "
                             "divide per_sample.sum() by ||sum_i g_i||^2 taken from the gradients yourself")
        return self.per_sample.sum() / self.batch_grad_sq


@dataclass(eq=False)
class _Owner:
    """A module whose trainable parameters one rule accounts for."""

    name: str
    module: nn.Module
    rule: LayerRule
    tracked: dict[str, nn.Parameter]   # names relative to the module
    forward_calls: int = 0              # captured forward calls since the last backward ended
    ready: list = field(default_factory=list)
    fused: bool = False                 # forward replaced by the rule's fused autograd function
    plan_key: object = None             # shapes of the call whose route is in the plan
    skip_hooks: int = 0                 # fused calls whose forward hook must not capture again
    tie: TiedEmbeddingLinear | None = None  # this module's weight is shared with another module
    pre_states: list = field(default_factory=list)  # rule.before_forward results of calls in progress
    # Generic route: owners inside this module (they account for their own parameters when called;
    # a call that does not call one accounts for its parameters itself, see _on_forward).
    descendants: list = field(default_factory=list)
    # Calls of an enclosing generic owner that accounted for this owner's parameters (it was not
    # called): an owner enclosing that one then counts it as covered, not as uncalled.
    covered_calls: int = 0
    # Calls of this module's forward in progress, counted for owners inside a generic owner: while
    # one runs, an enclosing generic owner's recorder leaves this owner's parameters to it.
    in_forward: int = 0
    # Generic owners: the parameters of owners inside, ``{id: (relative name, parameter, the owners
    # from the inner one's outermost enclosing owner inside this one down to it)}`` (built once).
    inner_params: dict | None = None
    # Other modules whose calls this owner accounts for: embeddings sharing its weight.
    aliases: list = field(default_factory=list)
    # Calls in progress given a [B*T, ...] input as [B, T, ...]: (that view, B*T, len((B, T, ...)),
    # the input's shape), see _on_rows_pre_forward.
    row_views: list = field(default_factory=list)
    # Names of the tracked parameters that FSDP2's fully_shard shards: ``tracked`` holds the shards
    # (what the optimizer steps), the forward and backward use unsharded stand-ins (see _fsdp).
    sharded: tuple = ()
    # A tracked parameter to check, after each forward, is still the module's (see _on_forward).
    probe: tuple | None = None
    # Under FSDP2: the gradient hooks of a call's outputs, registered after fully_shard's own
    # (see _on_sharded_forward_end).
    deferred_hooks: list = field(default_factory=list)
    # Under FSDP2: the fully_shard modules that gather the sharded parameters (see _gathered).
    shard_units: list = field(default_factory=list)
    # Its tensors with a sequence dim are [T, B, ...]: the tracker's batch_first=False, or the
    # nearest PyTorch transformer module around it says so (see _assign_owners).
    sequences_first: bool = False
    # Replaced by a new plan (see GradNormTracker._replan): a forward still holding this owner's
    # fused call hands it to the new plan's forward.
    retired: bool = False
    # An Embedding's weight applied as a product's matrix by a module's own code (``F.linear(h,
    # self.wte.weight)``): this owner's module is an ``nn.Linear`` outside the model sharing that
    # weight (``tied.output_layer``), called for each such product while ``product_in``'s forward
    # runs (``tied.TableProducts``, one per call in progress in ``product_modes``).
    product_in: nn.Module | None = None
    product_modes: list = field(default_factory=list)


@dataclass(eq=False)
class _Plan:
    """Owners chosen for one state of the model (see GradNormTracker._plan)."""

    owners: list[_Owner]
    ties: list[TiedEmbeddingLinear]
    planned: list[tuple[str, nn.Parameter]]  # the model's parameters it was made from, frozen ones too
    verified: bool = False  # a backward with it was verified


def _state_key(named_parameters) -> tuple:
    """What a plan is made from: each parameter's name, identity and ``requires_grad`` (the plan
    that has this key keeps its parameters alive, so an id is not reused while it is kept)."""
    return tuple((name, id(p), p.requires_grad) for name, p in named_parameters)


_PLANS_KEPT = 4  # plans kept for states of the model seen before (see GradNormTracker._plan)
_ENABLED_TRACKERS: "weakref.WeakSet[GradNormTracker]" = weakref.WeakSet()  # their hooks are attached


@dataclass(eq=False)
class _Call:
    owner: _Owner
    ctx: object
    batch_size: int
    grads: list
    pending: int
    fused: bool = False
    watcher: SharedOutputWatcher | None = None  # an output shared by all samples, see _watch_shared_output
    unbatched: bool = False  # input (or table) shared by the samples, without a batch dim: see _on_table_read
    # Why its shared output could not be split per sample (unbatched calls): the batch error's hint,
    # built only if that error is raised (a batch of 1 every step takes the same path, correctly).
    refusal: Callable[[], str] | None = None
    # The rows of a tensor the tracked model's forward read as its samples, see _rows_read.
    model_rows: tuple[int, int, int] | None = None


@dataclass
class _Backward:
    """Accumulators of the backward pass in progress."""

    per_layer: dict = field(default_factory=dict)
    batch_grad_sq: SquaredNormSum = field(default_factory=SquaredNormSum)
    batch_size: int | None = None
    incomplete: list = field(default_factory=list)
    # param id -> (parameter, its value when its gradient was formed, version then): for an owner
    # whose calls are accounted only at the backward's end (see _on_param_grad)
    snapshots: dict = field(default_factory=dict)
    params_with_grad: dict = field(default_factory=dict)  # param full name -> owner
    contributed: set = field(default_factory=set)
    plans: dict = field(default_factory=dict)
    tie_rows: dict = field(default_factory=dict)   # Embedding _Call -> tied_rows of the Linear part
    model_rows: dict = field(default_factory=dict)  # (storage, stride) -> first row, see _check_model_rows
    tie_grads: dict = field(default_factory=dict)  # Embedding _Call -> grad of its output
    # Verification (see GradNormTracker's verify_every): per parameter id, the gradient the rules
    # account for, and autograd's gradient waiting for the rules' part.
    verify: bool = False
    accounted: dict = field(default_factory=dict)
    delivered: dict = field(default_factory=dict)  # param id -> (full name, owner, grad)
    unverifiable: set = field(default_factory=set)
    verified: dict = field(default_factory=dict)  # owner id -> _Verified
    # owner id -> terms summed into each parameter entry by autograd's own backward of a norm layer
    # after a CPU bfloat16 autocast forward (its rounding grows with their number: _verification_error)
    rounded_terms: dict = field(default_factory=dict)
    # Ids of the tracked parameters whose gradient hooks ran: the gradients this backward formed
    # (see GradNormTracker._drop_unformed).
    grad_ids: set = field(default_factory=set)
    # It differentiates through gradients an earlier backward made with create_graph=True (a
    # gradient penalty): always verified, and refused where autograd's gradients differ.
    second_order: bool = False


@dataclass(eq=False)
class _Verified:
    """One module's comparison on a verified backward, summed over its parameters."""

    owner: _Owner
    diff_sq: float = 0.0    # ||autograd's grad - accounted||^2
    grad_sq: float = 0.0    # ||autograd's grad||^2
    # sum_i ||g_i||^2 of the module's calls: where the samples' gradients cancel (a BatchNorm
    # followed by a per-channel op and another BatchNorm: ~1e-17), both sides of the comparison
    # are rounding of sums of terms of this size, so the difference is judged against it too.
    samples_sq: float = 0.0
    compared: bool = False  # at least one of its parameters' gradients was compared
    worst: str = ""         # the parameter with the largest difference (named in the error)
    worst_diff_sq: float = -1.0
    exact: bool = True      # every gradient float32/64 on CPU (the tight tolerance applies)

    @property
    def relative(self) -> float:
        """``sqrt(diff_sq / max(grad_sq, samples_sq))``; 0 for 0/0, inf for a difference on zeros."""
        scale = max(self.grad_sq, self.samples_sq)
        if scale > 0:
            return math.sqrt(self.diff_sq / scale)
        return 0.0 if self.diff_sq == 0 else math.inf


def _check_reduction(loss_reduction) -> None:
    if isinstance(loss_reduction, str):
        if loss_reduction in ("sum", "mean"):
            return
    elif isinstance(loss_reduction, (int, float)) and not isinstance(loss_reduction, bool):
        if math.isfinite(loss_reduction) and loss_reduction > 0:
            return
    raise ValueError(f"loss_reduction={loss_reduction!r} is not supported: pass 'sum' (L = sum_i l_i), "
                     "'mean' (L = mean_i l_i) or a positive finite float c for L = c * sum_i l_i")


def _abandons_backward_on_error(hook):
    """A backward hook that raises ends its backward, and the engine then never runs the callback
    that closes the record (``_finish_backward``): the record is dropped here, lest the next
    backward add to it."""
    @wraps(hook)
    def wrapper(self, *args):
        try:
            return hook(self, *args)
        except BaseException:
            self._abandon_backward()
            raise
    return wrapper


#: Added to the accounting error after a forward under CPU autocast to bfloat16.
_CPU_BFLOAT16_HINT = (
    " In bfloat16 on CPU (autocast, or a bfloat16 model) the gradient autograd computes can itself be this far "
    "off: PyTorch's CPU LayerNorm backward in bfloat16 rounds its weight and bias gradients by 5% over 3,000 "
    "rows and 30% over 100,000 (measured against float64 sums of the same output grads), while divebatch sums "
    "in float32. If nothing uses the parameter outside its module, run the normalisation layers in float32 "
    "(keep their parameters float32, and under autocast `with torch.autocast('cpu', enabled=False):` around "
    "them, on a float32 input).")


#: At most this many walked layouts are kept (see GradNormTracker._walked_samples_dim).
_MAX_LAYOUTS = 4096

def _output_sample_dims(owner: _Owner, ctx, n: int) -> list[int | None] | None:
    """The dim holding the samples in each of a tracked call's ``n`` output tensors (in ``_tensors``
    order), where the rule fixes it: None for dim 0 throughout (row-wise layers, embeddings and
    convolutions, whose inputs are viewed samples first: the common case); the layout a recurrent
    layer or ``nn.MultiheadAttention`` declares for its first output (an RNN's ``h_n``/``c_n``: dim 1;
    attention weights: dim 0); a generic call's own ``out_dims``; a None entry where it does not (rows
    of samples in another order). (Outputs packed in a ``PackedSequence`` are never passed here.)"""
    rule, module = owner.rule, owner.module
    if rule.rows_independent or isinstance(rule, (EmbeddingRule, ConvRule)):
        return None
    if isinstance(rule, (RecurrentRule, MultiheadAttentionRule)):
        first = 0 if getattr(module, "batch_first", False) else 1
        return [first] + [1 if isinstance(rule, RecurrentRule) else 0] * (n - 1)
    if (rule is GENERIC and isinstance(ctx, GenericCall) and ctx.input_batch is None and ctx.rows is None
            and ctx.in_spans is None and len(ctx.out_dims) == n):
        return list(ctx.out_dims)
    return [None] * n


#: ``row_views``' mark of an input given as ``[B, T, ...]`` for a ``[T, B, ...]`` one (see _sequences_first_view).
_SEQUENCES_FIRST = "sequences first"


def _has_sequence_dim(x: torch.Tensor) -> bool:
    """Under ``batch_first=False``, whether ``x`` is laid out ``[T, B, ...]``: ids of 2+ dims, floating
    tensors of 3+ dims (see GradNormTracker)."""
    return x.dim() >= (3 if x.is_floating_point() else 2)


def _rows_read(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(storage address, dim-0 stride, first row)`` of the tracked model's first input: which rows
    of which tensor a forward takes as its samples (see GradNormTracker._check_model_rows). None
    where that cannot be read (no storage of its own, meta tensors, an expanded or empty dim 0)."""
    stride = x.stride(0)
    if stride <= 0 or x.device.type == "meta":
        return None
    try:
        return x.untyped_storage().data_ptr(), stride, x.storage_offset() // stride
    except (RuntimeError, NotImplementedError):
        return None


def _sink(call_ref, on_output_grad, index: int, grad: torch.Tensor):
    """A recorded use's output grad, for its call if the call still exists."""
    call = call_ref()
    return on_output_grad(call, index, grad) if call is not None else None


class GradNormTracker:
    """Attach to a model; after ``loss.backward()``, ``collect()`` gives per-sample grad norms.

    Args:
        model: the module to track. Every trainable parameter is covered: layers with a rule
            (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, LayerNorm, GroupNorm,
            RMSNorm, BatchNorm, MultiheadAttention, Hugging Face's Conv1D and its RMSNorm
            copies of LlamaRMSNorm) use it;
            any other module that owns trainable parameters takes the exact generic route.
            Frozen parameters (``requires_grad=False``) are skipped. The plan follows the model:
            where parameters were frozen, unfrozen, added or replaced since it was made (layers
            unfrozen as fine-tuning goes on, a new head), the next forward with gradients on
            re-plans before it runs, and the first backward of a new plan is verified.
        loss_reduction: how the loss was reduced over the batch: ``"sum"`` (c = 1), ``"mean"``
            (c = 1/B) or a positive float c, for ``L = c * sum_i l_i``. Reported numbers are
            about the unscaled ``l_i`` (see the module docstring).
        enabled: start with tracking on (default) or off.
        fused: replace some layers' forward while tracking is on, so the norms come from work
            the backward does anyway: Linear and Conv take their weight gradient from the same
            per-sample work that gives the norms (instead of norms on top of autograd's own weight
            gradient); MultiheadAttention exposes its projections' gradients to hooks (instead of
            a replay in the backward). Same numbers, less time; ``False`` keeps the modules' own
            forward and backward untouched.
        track_batch_grad: compute ``||sum_i g_i||^2`` of each backward in the parameter hooks (one
            pass over the gradients). Turn off (also settable later) when it is read elsewhere,
            e.g. from the all-reduced ``.grad`` under DistributedDataParallel (or the
            reduce-scattered shards under FSDP2), where each rank's hooks only see its local
            part; ``stats.batch_grad_sq`` is then None.
        batch_first: ``True`` (default): samples along dim 0 of the model's first input and of
            every layer's input. ``False``: the model takes sequences first (``[T, B, ...]``, the
            layout of ``nn.Transformer`` and the RNNs by default): samples along dim 1 of every
            tensor that has a sequence dim, which divebatch reads from the rank, as Opacus'
            ``batch_first=False`` does: integer ids of 2+ dims and floating tensors of 3+ dims into
            a Linear, LayerNorm, RMSNorm or Embedding (each is called on its input viewed
            ``[B, T, ...]`` and its output is made ``[T, B, ...]`` and contiguous again: a copy,
            except for the fused Linear, which multiplies the rows in their stored order), and
            the model's first input. A tensor with no sequence dim (a pooled ``[B, d]`` into
            a head) keeps samples in dim 0, as do convolutions, batch and group norms and
            ``EmbeddingBag`` (always ``[B, C, ...]``); ``nn.MultiheadAttention`` and the RNNs follow
            their own ``batch_first``. Any other module with parameters given a tensor with a
            sequence dim must say where its samples are with a ``batch_first`` attribute, or it is
            refused where the autograd graph does not tell (below): its rule could not tell
            ``[T, B, d]`` from ``[B, C, L]``. Rows merged from a
            ``[T, B, ...]`` tensor (``output.view(T * B, d)`` before a decoder) are followed through
            ops that map each row to the same row (an activation, dropout, a bias); other merged
            rows are refused. With ``True`` such models are refused where T != B and would be
            misread where T == B. A model that takes ``[B, T]`` inputs and transposes to
            ``[T, B, ...]`` in its own code (fairseq's layout) is read with ``True``: a Linear,
            LayerNorm, RMSNorm or generic-route module whose input has the batch's size in dim 1 is
            placed from the autograd graph, back to earlier tracked layers' outputs
            (``layers.rows.samples_dim``); with ``False``, one whose input the graph proves
            ``[B, T, ...]`` (a sequence-first LSTM's output transposed back before a head) keeps
            samples in dim 0. The layers inside ``nn.Transformer``, ``nn.TransformerEncoder``/
            ``Decoder`` and their layers follow that module's ``batch_first`` over the tracker's
            (the nearest one around a layer wins), so the default ``batch_first=False``
            transformer transposed around inside a ``[B, T]`` model is read as ``[T, B, ...]``
            (and a ``batch_first=True`` one inside a sequence-first model as ``[B, T, ...]``).
        verify_every: on the first tracked backward and every ``verify_every``-th after it (0:
            the first only), check that each parameter's gradient is fully accounted for by its
            module's forward calls: the rules form the gradient of their calls (summed over
            samples) and it must match what autograd delivers to the parameter (relative
            difference <= 1e-3 in float32 on CPU, 2e-2 on CUDA or in float16/bfloat16/autocast).
            A parameter used outside its module too (``h @ self.embed.weight.T`` in a parent's
            forward, a penalty ``wd * p.square().sum()`` added to the loss) has a per-sample part
            no rule sees, so the norms would be wrong: ``collect()`` raises instead. A checked
            backward costs about one extra weight-gradient product per layer.

    Tracking off (``tracker.enabled = False``) removes every hook, so it costs nothing; on again
    re-attaches them. ``close()`` (or leaving a ``with`` block) removes hooks and stored tensors
    for good.

    Tied weights: an ``nn.Embedding`` weight shared with an ``nn.Linear`` weight (a language
    model's input embedding and output layer) is exact: the per-sample norm of the shared matrix
    is ``||E_b||^2 + ||L_b||^2 + 2 <E_b, L_b>``, with the cross term from the rows of the Linear's
    per-sample gradient that the sample's tokens select (``divebatch.layers.tied``). Any other
    parameter shared by two modules is refused at construction with an error naming both.

    ``torch.compile``: track the module you compiled (``GradNormTracker(model)`` beside
    ``torch.compile(model)``). The numbers are the same; each tracked module runs eagerly (a
    graph break), the code between tracked modules stays compiled.
    """

    def __init__(self, model: nn.Module, loss_reduction: str | float = "mean", *, enabled: bool = True,
                 fused: bool = True, track_batch_grad: bool = True, verify_every: int = 1000,
                 batch_first: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradNormTracker needs an nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):
            raise ValueError(_scripted("the model"))
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first={batch_first!r}: pass True (samples in dim 0) or False (sequences "
                            "first: samples in dim 1 of [T, B, ...] tensors)")
        self.model = model
        self.batch_first = batch_first
        self.loss_reduction = loss_reduction
        self.track_batch_grad = bool(track_batch_grad)
        if isinstance(verify_every, bool) or not isinstance(verify_every, int) or verify_every < 0:
            raise ValueError(f"verify_every={verify_every!r}: pass an int >= 0 (0 checks the first backward only)")
        self.verify_every = verify_every
        self._backwards_started = 0
        self._low_precision_forward = False  # an autocast forward was captured (looser verification)
        self._cpu_bfloat16_forward = False  # ... in bfloat16 on CPU: autocast or a bf16 norm (see _verification_error)
        self._fused_routes = bool(fused)
        self._plans: dict[tuple, _Plan] = {}  # see _plan
        self._plan()
        self._verify_next = False  # (the first backward is verified anyway, see verify_every)
        self._after_create_graph = False  # the last backward had create_graph=True (see _Backward.second_order)
        self._handles: list = []
        # Pre-hooks the tracked model's own module takes from the plan, run by _on_root_pre_forward
        # (first of its pre-hooks) and _on_root_pre_forward_last (last): registered once per attach, so
        # a new plan made as the model's forward starts applies to that forward too (a module's call
        # runs the pre-hooks registered when it started).
        self._root_pre_first: list[tuple[Callable, bool]] = []
        self._root_pre_last: list[tuple[Callable, bool]] = []
        self._root_handles: list = []  # of the two dispatchers
        self._registration_hooks: list[tuple[dict, int]] = []  # global ones: (their dict, id)
        self._eager_forwards: list[_EagerForward] = []  # forwards run eagerly under torch.compile
        self._tables_read_in_compiled_code: set[str] = set()  # Embeddings whose weight compiled code read
        self._backward: _Backward | None = None
        self._hooked_stand_ins: set[int] = set()  # FSDP2's unsharded parameters, see _on_unsharded
        self._last: GradNormStats | None = None
        self._uncollected = 0  # backwards closed since the last collect()
        # Where the tracked model's forward in progress reads its first input (see _rows_read).
        self._model_rows: tuple[int, int, int] | None = None
        self._last_plans: dict[str, RoutePlan] = {}
        self._error: Exception | None = None
        self._watchers: list[SharedOutputWatcher] = []  # following their outputs (see _watch_shared_output)
        # The torch-function mode they see the forward through: entered with the first, left once
        # none is left and it is the innermost mode.
        self._watching: SharedOutputWatchers | None = None
        # Embedding weights a tracked module may be called on directly (see _on_table_read).
        self._last_batch = 0  # the batch size of the last call captured that was not watched
        self._model_input_shape: tuple | None = None  # of the tracked model's last forward (_close_record)
        self._model_inputs: list[torch.Tensor] = []  # its tensor inputs, while its forward runs
        # Integer tensors computed row by row from multiple-choice ids, while the forward runs (_input_rows).
        self._ids_follower: MergedIdsFollower | None = None
        self._input_batch: int | None = None  # dim 0 of its first input (the samples, as everywhere)
        # This forward's tracked outputs whose sample dim is known, {(id(grad_fn), output_nr): (grad_fn,
        # dim, B)}, the terminals of the walks that place samples in a layer's input (_walked_samples_dim);
        # and each call's answer (the dim, or None), by (owner, call), kept for the plan (a model's
        # layout is its code's), the walk's or, where only one of dims 0 and 1 had the batch's size,
        # the shape's.
        self._sample_nodes: dict[tuple[int, int], tuple] = {}
        self._layouts: dict[tuple, object] = {}  # (and merged rows' order, keyed (owner, call, "rows"))
        # Layers of this forward whose input has the batch's size in dims 0 and 1 and whose graph did
        # not tell which holds the samples (described for an error); and, for the plan, where the model
        # was seen with samples in the dim other than the tracker's layout: both together are refused
        # at the forward's end (_refuse_undecided_layouts), as are undecided layers behind a compiled
        # backward that could not be probed (_undecided_in_compiled_code).
        self._undecided: list[str] = []
        self._undecided_in_compiled_code = False
        self._other_layout: str | None = None
        self._closed = False
        self._enabled = False
        self.enabled = enabled

    # ------------------------------------------------------------------ public API
    @property
    def loss_reduction(self) -> str | float:
        """``"sum"``, ``"mean"`` or the float ``c`` of ``L = c * sum_i l_i``, read when each backward
        ends. Set it before a backward whose scale differs, e.g. ``1 / n_tokens`` for a token-mean
        loss over batches with different numbers of (non-padding) tokens."""
        return self._loss_reduction

    @loss_reduction.setter
    def loss_reduction(self, value: str | float) -> None:
        _check_reduction(value)
        self._loss_reduction = value

    @property
    def enabled(self) -> bool:
        """Whether hooks are attached. Setting False detaches them (zero cost), True re-attaches."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if self._closed and value:
            raise RuntimeError("this GradNormTracker was closed; create a new one to track again")
        value = bool(value)
        if value and not self._enabled:
            others = [t for t in _ENABLED_TRACKERS if t.model is self.model and t is not self]
            if others:
                warnings.warn(
                    "GradNormTracker: this model already has an enabled GradNormTracker that was not closed; its hooks "
                    "still run in every step (time and memory). Close the old one (tracker.close(), or create it in "
                    "a `with` block), or keep one tracker for the whole run", stacklevel=3)
            if self._plan_outdated():  # (changed while detached, when no hook could see it)
                self._retire()
                self._plan()
            self._attach()
            _ENABLED_TRACKERS.add(self)
        elif not value and self._enabled:
            self._detach()
            _ENABLED_TRACKERS.discard(self)
        self._enabled = value

    def parameters(self) -> Iterator[nn.Parameter]:
        """The tracked (trainable) parameters, each once (a tied weight too), in a fixed order."""
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(full name, parameter)`` of the tracked parameters, each once, in a fixed order."""
        seen: set[int] = set()
        for owner in self._owners:
            for name, p in owner.tracked.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield _join(owner.name, name), p

    def collect(self) -> GradNormStats:
        """The statistics of the most recent backward pass (see ``GradNormStats``).

        Raises if no backward ran with tracking on, or if a parameter received a gradient that
        no module accounted for (e.g. a parameter a parent module used directly).
        """
        self._leave_watchers(all_of_them=True)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if self._last is None:
            raise RuntimeError("collect() was called before any backward pass with tracking on: run the "
                               "forward and loss.backward() first (and check tracker.enabled is True)")
        backwards, self._uncollected = self._uncollected, 0
        return replace(self._last, backwards=backwards)

    def plan(self) -> list[RoutePlan]:
        """Per module, the route chosen in the last backward and its estimated cost.

        Each entry is a ``RoutePlan`` with ``module`` set; ``print(tracker.format_plan())`` shows a table.
        """
        if not self._last_plans:
            raise RuntimeError("plan() needs one tracked forward and backward first: routes depend on shapes")
        rows = []
        for name, plan in self._last_plans.items():
            plan.module = name
            rows.append(plan)
        return rows

    def format_plan(self) -> str:
        """``plan()`` as a text table: module, type, route, shape, MFLOP, extra MiB."""
        plans = self.plan()
        # Columns as wide as their longest entry ("generic (computed weights)", a nested module's path).
        width = max([28] + [len(plan.module) for plan in plans])
        route = max([20] + [len(plan.route) for plan in plans])
        lines = [f"{'module':<{width}} {'route':<{route}} {'MFLOP':>10} {'extra MiB':>10}  shape"]
        for plan in plans:
            lines.append(f"{plan.module:<{width}} {plan.route:<{route}} {plan.flops / 1e6:>10.2f} "
                         f"{plan.extra_bytes / 2**20:>10.2f}  {plan.shape}")
        return "\n".join(lines)

    def close(self) -> None:
        """Remove every hook and stored tensor; the model behaves exactly as before."""
        self._detach()
        _ENABLED_TRACKERS.discard(self)
        self._enabled = False
        self._closed = True
        self._backward = None
        self._last = None
        self._retire()
        self._plans = {}

    def __enter__(self) -> "GradNormTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # A model saved whole (torch.save(model), copy.deepcopy) takes its hooks, so this tracker,
        # along: not torch's global registration dicts, which hold other trackers' closures.
        state = self.__dict__.copy()
        state["_registration_hooks"] = []
        return state

    def __del__(self):  # a forgotten tracker must not leave hooks on a model that outlives it
        try:
            self._detach()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        hooked: set[int] = set()
        for owner in self._owners:
            if owner.fused:
                owner.module.forward = partial(self._fused_call, owner)
            generic = owner.rule is GENERIC
            if generic:
                self._run_eagerly(owner.module)
                if owner.name and any(p.dim() >= 3 and p.shape[0] > 1 for p in owner.tracked.values()):
                    # Mixture-of-experts experts (a stack of matrices): their rows are assigned to samples
                    # by reading the graph from the block that calls them, which flattens the tokens
                    # (and routes them); under compile that graph would be a compiled node, so the
                    # block runs eagerly too (dynamo breaks its graph at the data-dependent routing anyway).
                    self._run_eagerly(self.model.get_submodule(owner.name.rpartition(".")[0]))
            if self._tables and owner.rule.rows_independent:
                self._add_pre_hook(owner.module, partial(self._on_table_read, owner), prepend=True, with_kwargs=True)
            if owner.sharded:
                # After fully_shard's own pre-hook (it prepends it), which swaps in the unsharded parameters.
                self._add_pre_hook(owner.module, partial(self._on_unsharded, owner))
            if owner.rule.rows_independent or owner.rule.rows_regrouped or isinstance(owner.rule, EmbeddingRule):
                # First of the pre-hooks, so every other hook and the fused forward see [B, T, ...]; under
                # FSDP2 after fully_shard's, which hands the forward new tensors for its inputs.
                self._add_pre_hook(owner.module, partial(self._on_rows_pre_forward, owner), prepend=not owner.sharded)
            if hasattr(owner.rule, "before_forward") or generic:
                # (before a pruning method's pre-hook, which computes the weight from weight_orig: the
                # generic route's recorder must see it, its replay compute it again; _weight_from_pre_hook)
                self._add_pre_hook(owner.module, partial(self._on_pre_forward, owner), with_kwargs=True,
                                   prepend=generic and _weight_from_pre_hook(owner.module))
            # always_call: a generic owner's pre-hook enters a torch-function mode that must be left
            # even when the forward raises.
            hooks = [(partial(self._on_forward, owner), dict(with_kwargs=True, always_call=generic))]
            if owner.rule.rows_independent or owner.rule.rows_regrouped or isinstance(owner.rule, EmbeddingRule):
                # After _on_forward, which hooks the [B, T, ...] output the rule's grads arrive for.
                hooks.append((partial(self._on_rows_forward, owner), dict(always_call=True)))
            # First of the module's forward hooks (prepended, in reverse, keeping their order): the rule
            # reads the module's own output, not one a hook registered before the tracker replaced (an
            # output scaled by a user's hook: its norms were off, refused on verified backwards only),
            # and such a hook sees the output the module returns (not a [B, T, ...] view of it). Under
            # FSDP2 that also puts them before fully_shard's post-forward hook, which puts the shards
            # back (a capture may read the parameters, e.g. EmbeddingBag's max mode).
            for hook, kwargs in reversed(hooks):
                self._handles.append(owner.module.register_forward_hook(hook, prepend=True, **kwargs))
            if owner.sharded:
                self._handles.append(owner.module.register_forward_hook(
                    partial(self._on_sharded_forward_end, owner), always_call=True))
            if owner.product_in is not None:
                # Eagerly under torch.compile: the mode sees nothing of a traced forward (the whole
                # model's, where the model's own forward applies the table).
                self._run_eagerly(owner.product_in)
                self._add_pre_hook(owner.product_in, partial(self._enter_table_products, owner))
                self._handles.append(owner.product_in.register_forward_hook(
                    partial(self._leave_table_products, owner), always_call=True))
                for child in owner.product_in.children():  # (first of their pre-hooks, last of their hooks)
                    self._handles.append(child.register_forward_pre_hook(partial(self._pause_table_products, owner),
                                                                         prepend=True))
                    self._handles.append(child.register_forward_hook(partial(self._resume_table_products, owner),
                                                                     always_call=True))
            for alias in owner.aliases:
                if owner.sequences_first:  # (an Embedding sharing the owner's weight: [T, B] ids as the owner's)
                    self._handles.append(alias.register_forward_pre_hook(partial(self._on_rows_pre_forward, owner),
                                                                         prepend=True))
                    self._handles.append(alias.register_forward_hook(partial(self._on_rows_forward, owner),
                                                                     always_call=True, prepend=True))
                self._handles.append(alias.register_forward_hook(partial(self._on_forward, owner), with_kwargs=True,
                                                                 prepend=True))
            for name, p in owner.tracked.items():
                if id(p) in hooked:  # a tied weight: autograd hands its summed gradient to one hook
                    continue
                hooked.add(id(p))
                self._handles.append(_first_hook(p, partial(self._on_param_grad, owner, _join(owner.name, name),
                                                            id(p))))
        # Modules that may be handed a tracked Embedding's weight (see _on_table_passed): those with
        # children (few: leaves make most calls) and owners other than row-wise layers (which take
        # _on_table_read) and the tables themselves. First of their pre-hooks.
        if self._tables:
            owners = {id(owner.module): owner for owner in self._owners}
            tables = {id(owner.module) for owner in self._tables.values()}
            for module in self.model.modules():
                owner = owners.get(id(module))
                if (id(module) not in tables and not (owner is not None and owner.rule.rows_independent)
                        and (owner is not None or next(module.children(), None) is not None)):
                    self._add_pre_hook(module, self._on_table_passed, prepend=True, with_kwargs=True)
        # The owners inside a generic owner count their calls in progress (see _Owner.in_forward):
        # registered after their other hooks, first of the pre-hooks and last of the hooks, so that
        # the whole call, hooks included, counts as in its forward.
        inside_generic = {id(inner) for owner in self._owners if owner.rule is GENERIC for inner in owner.descendants}
        for owner in self._owners:
            if id(owner) in inside_generic:
                self._handles.append(owner.module.register_forward_pre_hook(partial(_enter_forward, owner),
                                                                            prepend=True))
                self._handles.append(owner.module.register_forward_hook(partial(_leave_forward, owner),
                                                                        always_call=True))
        # Registered last, so it runs after the root's own hooks: watchers end with the tracked
        # model's forward (a mode a caller enters around the model call must find its own on top).
        self._handles.append(self.model.register_forward_hook(self._on_model_forward, always_call=True))
        if not self._root_handles:
            # First of all pre-hooks (the root may be an owner too): its rows hook reads this forward's
            # batch. Kept while a new plan replaces every other hook: a call that has started runs the
            # pre-hooks registered then, and torch reads whether one takes kwargs as it calls it.
            self._root_handles = [
                self.model.register_forward_pre_hook(self._on_root_pre_forward, with_kwargs=True, prepend=True),
                self.model.register_forward_pre_hook(self._on_root_pre_forward_last, with_kwargs=True)]
        # Parameters and modules registered on the model's modules from now on (a new head, LoRA
        # adapters, load_state_dict(assign=True)): re-planned at the next forward (see _replan).
        tracker = weakref.ref(self)  # (global hooks: they must not keep the tracker, and its model, alive)

        def on_registration(module, name, value):
            me = tracker()
            if me is not None and id(module) in me._module_ids:
                me._model_changed = True

        for register in (nn.modules.module.register_module_module_registration_hook,
                         nn.modules.module.register_module_parameter_registration_hook):
            handle = register(on_registration)
            # (removed from the global dict itself: a tracker collected with its model, in a cycle,
            # finds its handles' weak references to that dict already cleared)
            self._registration_hooks.append((handle.hooks_dict_ref(), handle.id))

    def _add_pre_hook(self, module: nn.Module, hook: Callable, *, prepend: bool = False,
                      with_kwargs: bool = False) -> None:
        """``module.register_forward_pre_hook``, except on the tracked model itself, whose pre-hooks
        from the plan are kept in lists its two dispatchers run (see ``_root_pre_first``)."""
        if module is not self.model:
            self._handles.append(module.register_forward_pre_hook(hook, prepend=prepend, with_kwargs=with_kwargs))
        elif prepend:
            self._root_pre_first.insert(0, (hook, with_kwargs))
        else:
            self._root_pre_last.append((hook, with_kwargs))

    @torch.compiler.disable
    def _on_root_pre_forward(self, module, args, kwargs):
        """First of the tracked model's pre-hooks: re-plan if its parameters changed, read its
        input, then run the plan's pre-hooks that go before the model's other ones."""
        if (_capturing()
                and (self._model_changed or [p.requires_grad for p in self._planned_params] != self._planned_flags)):
            self._replan()
        self._on_model_pre_forward(module, args, kwargs)
        return _run_pre_hooks(self._root_pre_first, module, args, kwargs)

    @torch.compiler.disable
    def _on_root_pre_forward_last(self, module, args, kwargs):
        return _run_pre_hooks(self._root_pre_last, module, args, kwargs)

    def _plan(self) -> None:
        """Choose, from the model as it is now, the module and rule that account for each trainable
        parameter (``_owners``), and note what the plan was made from (see ``_replan``). The last
        few plans are kept by what they were made from, so a loop that switches between a few
        states (an attack's steps with the model frozen, then the update) re-plans from them."""
        planned = list(self.model.named_parameters())
        key = self._plan_key = _state_key(planned)
        plan = self._plans.pop(key, None)
        # Plans made with parameters the model no longer has (a head replaced, an embedding resized)
        # would keep those alive, and match no state of it again.
        current = {id(p) for _, p in planned}
        self._plans = {k: kept for k, kept in self._plans.items()
                       if all(id(p) in current for _, p in kept.planned)}
        if plan is None:
            self._owners, self._ties = _assign_owners(self.model, self.batch_first)
            self._mark_sharded()
            for owner in self._owners:
                can_fuse = getattr(owner.rule, "can_fuse", None)
                owner.fused = bool(self._fused_routes and can_fuse is not None
                                   and can_fuse(owner.module, owner.tracked))
            plan = _Plan(self._owners, self._ties, planned)
        for owner in plan.owners:
            owner.retired = False
        self._plans[key] = plan  # (the most recent last; the key's parameters are kept alive by the plan)
        while len(self._plans) > _PLANS_KEPT:
            self._plans.pop(next(iter(self._plans)))
        self._current_plan = plan
        self._owners, self._ties = plan.owners, plan.ties
        self._tables = {id(owner.module.weight): owner for owner in self._owners
                        if isinstance(owner.rule, EmbeddingRule) and owner.tie is None and not owner.aliases
                        and owner.tracked.get("weight") is owner.module.weight}
        self._looks_up_ids = any(isinstance(owner.rule, EmbeddingRule) for owner in self._owners)
        self._planned_params = [p for _, p in planned]
        self._planned_flags = [p.requires_grad for p in self._planned_params]
        self._module_ids = {id(m) for m in self.model.modules()}
        self._state_ids = {id(t) for t in (*self.model.parameters(), *self.model.buffers())}
        self._model_changed = False
        self._n_tracked = len({id(p) for owner in self._owners for p in owner.tracked.values()})
        # The first backward of a plan is verified: a parameter frozen when the tracker was made and
        # used outside its module's forward would otherwise go unchecked once it is trained.
        self._verify_next = not plan.verified

    def _plan_outdated(self) -> bool:
        """Whether the model's parameters (which, their names, which require grad) differ from the plan's."""
        return _state_key(self.model.named_parameters()) != self._plan_key

    def _replan(self) -> None:
        """Plan again where parameters were frozen, unfrozen, added or replaced since the plan was made
        (fine-tuning that unfreezes layers as it goes, a new head): with the old plan, a parameter
        unfrozen since would be left out of the norms and a frozen one counted. Called as the model's
        forward starts, so that forward runs with the new plan: every hook is registered again, the
        model's own pre-hooks through its dispatchers. The first backward of a plan is verified (a plan
        kept from before, and verified then, is not again: see _plan)."""
        self._model_changed = False
        if not self._plan_outdated():
            return
        self._detach(keep_root_dispatchers=True)
        self._retire()
        self._plan()
        self._attach()

    def _retire(self) -> None:
        """Mark the current plan's owners replaced, and forget what they held of calls in progress."""
        for owner in self._owners:
            owner.retired = True
            owner.ready, owner.pre_states, owner.row_views, owner.deferred_hooks = [], [], [], []
            owner.forward_calls = owner.covered_calls = owner.in_forward = owner.skip_hooks = 0
        for tie in self._ties:
            tie.embedding_calls.clear()
        self._last_plans = {}
        self._layouts = {}
        self._other_layout = None

    @torch.compiler.disable
    def _on_model_pre_forward(self, module, args, kwargs):
        # The shape of the model's first tensor input, its samples' dim first (see _close_record).
        if not _capturing():
            self._input_batch = None  # (a reference's per-sample call: no forward of the tracker's)
            return None
        inputs = _tensors((args, kwargs))
        self._model_input_shape = tuple(inputs[0].shape) if inputs else None
        sequence_first = bool(inputs) and not self.batch_first and _has_sequence_dim(inputs[0])
        if sequence_first:  # ([T, B, ...]: the samples' dim first, as everywhere below)
            shape = self._model_input_shape
            self._model_input_shape = (shape[1], shape[0], *shape[2:])
        self._model_inputs = inputs  # (until the forward ends: ids merged from them, see _input_rows)
        self._sample_nodes = {}
        self._undecided, self._undecided_in_compiled_code = [], False
        self._model_rows = _rows_read(inputs[0]) if inputs and inputs[0].dim() > 0 and not sequence_first else None
        if (inputs and inputs[0].dim() > 2 and not inputs[0].is_floating_point() and self._ids_follower is None
                and self.batch_first and self._looks_up_ids and not _called_from_compiled_code()):
            # [B, C, T] ids (a multiple-choice head): the ids computed from their merged rows are
            # followed too (RoBERTa's position ids), until the forward ends. Only for an Embedding to
            # look up: a recommender's [B, features, L] bags need no torch-function mode on every op.
            self._ids_follower = MergedIdsFollower(self._merged_input_rows)
            self._ids_follower.__enter__()
        self._input_batch = self._model_input_shape[0] if inputs and inputs[0].dim() > 0 else None
        if self._input_batch:
            # This forward's batch, before its first tracked call (not the previous forward's: an
            # epoch's last, smaller batch would meet a stale size).
            self._last_batch = self._input_batch
        return None

    @torch.compiler.disable
    def _on_model_forward(self, module, args, output):
        self._leave_watchers(all_of_them=True)
        self._leave_ids_follower()
        self._model_inputs = []
        self._sample_nodes = {}
        for owner in self._owners:
            owner.row_views.clear()  # left by a forward that raised
        self._refuse_undecided_layouts()

    def _refuse_undecided_layouts(self) -> None:
        """At the end of a forward: where a layer's input had the batch's size in dims 0 and 1
        (``T == B``, and that call was not seen with ``T != B`` before), the autograd graph did not
        tell which holds its samples (it passes through an op that can be neither followed nor
        probed: checkpointed code, an op mixing samples), and either the model was seen with
        samples in the other dim than the tracker's layout (a layer placed so by the graph, an RNN
        or attention declared so) or code compiled by ``torch.compile`` hid them (the model's own
        code, which may transpose: its inputs' samples known, its backward did not run or mixed
        samples), the layer's default dim is a guess: refused, naming the layers and the attribute
        that settles each. (Where the model shows one layout throughout and the walk stopped at an
        op of its own, a fused kernel the probe cannot call, or before compiled code, the tracker's
        is kept, as for any layer.) The walks run again next time."""
        undecided, self._undecided = self._undecided, []
        in_compiled_code, self._undecided_in_compiled_code = self._undecided_in_compiled_code, False
        if not undecided or (self._other_layout is None and not in_compiled_code):
            return
        self._layouts.clear()
        tracker_dim = 0 if self.batch_first else 1
        why = (f"this model has them in the other dim than the tracker's layout elsewhere ({self._other_layout})"
               if self._other_layout is not None else
               "the code before it was compiled by torch.compile (the model's own, which may transpose), and its "
               "backward did not show it")
        raise ValueError(
            f"{'; '.join(undecided)}: the input has the batch's size ({self._last_batch}) in both dims 0 and 1, "
            "and the autograd graph back to the earlier layers' outputs does not tell which holds its samples, while "
            f"{why}: taking dim {tracker_dim}, the tracker's, could read positions as samples. Declare each such "
            "layer's layout: `module.batch_first = True` if its input is [B, T, ...], False if [T, B, ...] (a call "
            "seen with T != B before is read as it was then)")

    @torch.compiler.disable
    def _on_rows_pre_forward(self, owner: _Owner, module, args):
        """A row-wise layer (``rows_independent``) given samples and tokens flattened into its
        input's rows (OPT's ``hidden.reshape(-1, d)`` before its MLP): where the autograd graph
        proves the rows sample-major (``layers/rows.py``), the layer is called with the input
        viewed as ``[B, T, ...]``, which gives the same numbers and lets its rule see samples;
        ``_on_rows_forward`` views the output back. Otherwise the input is left as it is."""
        x = args[0] if args else None
        if (not isinstance(x, torch.Tensor) or capture_suspended() or not torch.is_grad_enabled()
                or _inside_functorch()):
            return None
        declared = getattr(module, "batch_first", None) if x.is_floating_point() else None
        if isinstance(declared, bool):  # the layer's own (see _refuse_undecided_layouts)
            if not declared:
                return self._sequences_first_view(owner, x, args)
        elif owner.sequences_first:
            if not (x.is_floating_point() and (
                    self._walked_samples_dim(owner, x, (0,)) == 0
                    # rows merged sample-major (``h.reshape(-1, d)`` of a [B, T, d] tensor): not time-major ones
                    or (not _has_sequence_dim(x) and (self._merged_rows_order(owner, x) or (0, False))[1]))):
                return self._sequences_first_view(owner, x, args)
        elif x.is_floating_point() and self._walked_samples_dim(owner, x, (1,)) == 1:
            return self._sequences_first_view(owner, x, args)
        if (self._input_batch == 1 and x.dim() > 0 and x.shape[0] > 1 and not _called_from_compiled_code()
                and (not x.is_floating_point() or (x.grad_fn is not None and not self._follows(x)))):
            # One sample: every row is its own (T5's [q, k] buckets, a window's rows); not a table's
            # weight or a tensor followed as shared by the samples (see _on_table_read).
            lead = (1, x.shape[0])
        elif x.is_floating_point():
            order = self._merged_rows_order(owner, x)
            if order is not None and not order[1]:  # time-major rows of a [T, B, ...] tensor
                return self._sequences_first_view(owner, x, args, lead=(x.shape[0] // order[0], order[0]))
            lead = (order[0], x.shape[0] // order[0]) if order is not None else self._proven_rows(x)
        elif (x.dim() >= 2 and x.shape[0] > 1 and 1 < self._last_batch != x.shape[0] and self._model_inputs
              and (x.stride(0) == 0 or (self._ids_follower is not None and self._ids_follower.constant_rows(x)))):
            # Ids expanded over rows that are not the samples (BERT's token types: a [1, T] buffer
            # expanded to a multiple-choice head's merged [B*C, T] ids; RoFormer's, made as zeros of
            # that shape): one lookup shared by the samples, expanded back afterwards. (Expanded to
            # the B samples, each row is a sample's.)
            owner.row_views.append((x[:1], x.shape[0], None, x.shape))
            return (owner.row_views[-1][0], *args[1:])
        else:
            lead = self._input_rows(x)
        if lead is None:
            return None
        view = owner.rule.rows_view(x, lead)
        if view is None:
            return None
        owner.row_views.append((view, x.shape[0], len(lead), x.shape))
        return (view, *args[1:])

    def _walked_samples_dim(self, owner: _Owner, x: torch.Tensor, candidates: tuple[int, ...]) -> int | None:
        """The dim among ``candidates`` that holds the samples of a layer's input, where the autograd
        graph proves it (``samples_dim``, back to the outputs of this forward's earlier tracked
        calls); None otherwise. In a model tracked batch first, ``(1,)``: an input ``[T, B, ...]`` of
        a model that takes ``[B, T]`` inputs and transposes in its own code (fairseq's transformer),
        which its shape cannot tell from ``[B, T, ...]`` where ``T == B`` (the layer would take time
        steps for samples) and the batch check refuses where ``T != B``; in one tracked sequences
        first, ``(0,)``: the reverse. Walked only where a candidate dim has the batch's size; each
        call's answer is kept for the plan, so a step walks the graph only on its first forward
        (the call is known by its number since the last backward: the same code's call each step).
        A call whose input had the batch's size in the tracker's dim and not in the candidate (``T !=
        B``, the sizes telling) keeps that dim too: at ``T == B`` later (a batch grown to the
        sequence length) it is read as it was then, with no walk (which compiled code may not allow:
        see _refuse_undecided_layouts)."""
        batch, shape = self._last_batch, x.shape
        if batch <= 1 or len(shape) < 3:
            return None
        key = (id(owner), owner.forward_calls)
        if all(shape[d] != batch for d in candidates):  # (the common case, a few comparisons)
            if len(candidates) == 1 and shape[1 - candidates[0]] == batch and key not in self._layouts:
                self._keep_layout(key, 1 - candidates[0])
            return None
        normalised = next(iter(owner.tracked.values())).dim() if isinstance(owner.rule, AffineNormRule) else 1
        if not self._sample_nodes or len(shape) - normalised < 2 or x.grad_fn is None:
            return None
        found = self._layouts[key] if key in self._layouts else self._walk_samples_dim(owner, x, candidates, key)
        return found if found in candidates and x.shape[found] == batch else None

    def _keep_layout(self, key: tuple, found) -> None:
        """Keep a call's layout for the plan (see _walked_samples_dim, _merged_rows_order)."""
        if len(self._layouts) >= _MAX_LAYOUTS:  # (forwards with no backward number their calls on)
            self._layouts.clear()
        self._layouts[key] = found

    def _walk_samples_dim(self, owner: _Owner, x: torch.Tensor, candidates: tuple[int, ...], key: tuple) -> int | None:
        """``samples_dim`` for ``_walked_samples_dim``'s call, kept under ``key`` unless it went through
        an op that moved samples by index values (walked again next time: the indices may be the
        data's); noting a layer left undecided where its shape cannot tell either, and the first
        layer found in the layout other than the tracker's (see _refuse_undecided_layouts)."""
        unfollowed: list[str] = []
        varies: list[str] = []
        found = samples_dim(x, self._sample_nodes, self._shared_nodes(), unfollowed, varies)
        if not varies:
            self._keep_layout(key, found)
        default = {(1,): 0, (0,): 1}.get(candidates)  # (a generic module under batch_first=False has none)
        if default is None:
            return found
        described = f"'{owner.name}' ({type(owner.module).__name__}, input {list(x.shape)})"
        if found is None and x.shape[default] == x.shape[candidates[0]] == self._last_batch:
            past = f", past {', '.join(sorted(set(unfollowed)))}" if unfollowed else ""
            self._undecided.append(f"{described}{past}")
            # (Only where the compiled code itself hid the samples, its inputs' known: a walk that failed
            # before it, as at GPT-2's positions added in compiled code, is no sign of a transpose.)
            self._undecided_in_compiled_code |= f"CompiledFunctionBackward{NO_LAYOUT}" in unfollowed
        elif found is not None and found != default and self._other_layout is None:
            self._other_layout = f"{described}, samples in dim {found} by the autograd graph"
        return found

    def _sequences_first_view(self, owner: _Owner, x: torch.Tensor, args: tuple,
                              lead: tuple[int, int] | None = None) -> tuple | None:
        """Under ``batch_first=False``: a Linear, LayerNorm, RMSNorm or Embedding given a ``[T, B, ...]``
        input is called on it viewed ``[B, T, ...]`` (the same numbers: each row is mapped on its
        own), so every other hook, the fused forward and the rule see samples first, as always;
        ``_on_rows_forward`` makes the output ``[T, B, ...]`` again. Rows merged from a ``[T, B, ...]``
        tensor (``output.view(T * B, d)`` before a decoder), where the autograd graph shows them so
        (``merged_sequence_rows``), are viewed ``[B, T, ...]`` the same way, and the output is merged
        back (``lead``, where given: ``(T, B)``, rows the caller proved time-major). A batch norm takes
        ``[B, C, ...]``; other rows are left as they are (the batch check refuses them)."""
        rule = owner.rule
        if not (rule.rows_independent or isinstance(rule, EmbeddingRule)):
            return None
        # The trailing dims each row is mapped from: a norm's normalised ones, a Linear's features, none for ids.
        normalised = (next(iter(owner.tracked.values())).dim() if isinstance(rule, AffineNormRule)
                      else int(x.is_floating_point()))
        if _has_sequence_dim(x) and lead is None:
            if x.dim() - normalised < 2:  # (a norm's two leading dims besides the normalised ones)
                return None
            view, rows = sequences_first_view(x), None
        else:
            if lead is None and rule.rows_independent and x.dim() > normalised and self._rows_may_be_flattened(x):
                lead = merged_sequence_rows(x, self._last_batch)
            if lead is None:
                return None
            view, rows = sequences_first_view(x.reshape(*lead, *x.shape[1:])), x.shape[0]
        owner.row_views.append((view, rows, _SEQUENCES_FIRST, x.shape))
        return (view, *args[1:])

    @torch.compiler.disable
    def _on_rows_forward(self, owner: _Owner, module, args, output):
        if not (owner.row_views and args and owner.row_views[-1][0] is args[0]):
            return None
        _, rows, n_lead, shape = owner.row_views.pop()
        if not isinstance(output, torch.Tensor):
            return None
        if n_lead is _SEQUENCES_FIRST:
            # Laid out as the layer's own output on [T, B, ...] (or [T*B, ...]) would be (code after it
            # may view it); no copy where the layer computed in that order (the fused Linear, see _FusedLinear).
            out = output.transpose(0, 1)
            return out.contiguous() if rows is None else out.reshape(rows, *out.shape[2:])
        if n_lead is None:  # a shared lookup of ids expanded over the rows (see _on_rows_pre_forward)
            watcher = self._watchers[-1] if self._watchers and self._watchers[-1].output is output else None
            if watcher is None:
                return output.expand(rows, *output.shape[1:])  # (not followed: refused as a batch of 1)
            return watcher.expanded_over_rows(output, rows)
        return owner.rule.rows_unview(output, rows, n_lead, shape)

    def _leave_ids_follower(self) -> None:
        if self._ids_follower is not None and self._innermost_mode() is self._ids_follower:
            self._ids_follower.__exit__(None, None, None)
            self._ids_follower = None

    def _input_rows(self, ids: torch.Tensor) -> tuple[int, int] | None:
        """``(B, N // B)`` where token ids ``[N, ...]`` are the tracked model's input ``[B, C, ...]``
        with its leading dims merged, or were computed from those row by row (``MergedIdsFollower``:
        RoBERTa's position ids). None otherwise."""
        if self._ids_follower is not None:
            return self._ids_follower.rows(ids)
        return self._merged_input_rows(ids)

    def _refuse_own_position_lookup(self, owner: _Owner, ctx, batch_size: int, recorder=None) -> None:
        """An ``nn.Embedding`` subclass whose own forward is given, or makes and looks up, 1-D ids that
        are not the model's input (Blenderbot's decoder passes ``arange(T)`` to its positions;
        BigBirdPegasus' makes it from the input's shape): its ``[T, d]`` output is broadcast over
        the batch, which is followed for an ``nn.Embedding``'s own forward only, and where T equals
        the batch its rows were taken for the samples' (5% and 0.9% off, no error). Refused."""
        if not (self._model_inputs and self._last_batch > 1 and batch_size > 1):
            return
        batched = [x for x, d in zip(ctx.leaves, ctx.in_dims) if d is not None and isinstance(x, torch.Tensor)]
        looked_up = [use.other[0] for use in (recorder.uses or []) if use.kind == "embedding"] if recorder else []

        def positions(ids):
            return ids.dim() == 1 and not ids.is_floating_point() and not self._reads_model_input(ids)

        if not ((batched and all(map(positions, batched)))
                or any(positions(ids) and ids.shape[0] == batch_size for ids in looked_up)):
            return
        raise ValueError(
            f"module '{owner.name}' ({type(owner.module).__name__}) looks up {batch_size} ids that are not the "
            "model's input in its own forward (1-D position ids such as arange(T)): nothing tells them from the "
            f"batch's {self._last_batch} samples, and its output shared by the samples is followed only where an "
            "nn.Embedding's own forward looks them up. Pass per-sample ids of shape [B, T] (e.g. "
            "position_ids=torch.arange(T).expand(B, T)) where the model takes them, or freeze the module")

    def _reads_model_input(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is (a view of) one of the tracked model's tensor inputs, by its memory."""
        try:
            address = x.untyped_storage().data_ptr()
            return any(inp.untyped_storage().data_ptr() == address for inp in self._model_inputs)
        except (RuntimeError, NotImplementedError):  # (no storage of its own)
            return True

    def _merged_input_rows(self, ids: torch.Tensor) -> tuple[int, int] | None:
        """``(B, N // B)`` where token ids ``[N, ...]`` are the tracked model's input ``[B, C, ...]``
        with its leading dims merged (a multiple-choice head's ``input_ids.view(-1, T)``): the same
        memory, contiguous, so row ``r`` is sample ``r // C``. None otherwise."""
        for inp in self._model_inputs:
            shape = tuple(inp.shape)
            if (inp.data_ptr() != ids.data_ptr() or inp.numel() != ids.numel() or not inp.is_contiguous()
                    or not ids.is_contiguous() or len(shape) < 2 or inp.dtype != ids.dtype):
                continue
            for k in range(2, len(shape) + 1):
                if math.prod(shape[:k]) == ids.shape[0] and tuple(ids.shape[1:]) == shape[k:] and shape[0] > 0:
                    return (shape[0], ids.shape[0] // shape[0]) if ids.shape[0] > shape[0] else None
        return None

    def _run_eagerly(self, module: nn.Module) -> None:
        """Run ``module``'s forward eagerly under ``torch.compile`` (see ``_EagerForward``)."""
        if not isinstance(module.__dict__.get("forward"), _EagerForward):
            self._eager_forwards.append(_EagerForward(module))
            module.forward = self._eager_forwards[-1]

    def _detach(self, keep_root_dispatchers: bool = False) -> None:
        self._leave_watchers(all_of_them=True)
        self._leave_ids_follower()
        for owner in self._owners:
            forward = owner.module.__dict__.get("forward")
            if isinstance(forward, partial) and forward.func == self._fused_call:
                del owner.module.forward
        for forward in reversed(self._eager_forwards):
            forward.restore()
        self._eager_forwards.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._root_pre_first.clear()
        self._root_pre_last.clear()
        for hooks, hook_id in self._registration_hooks:
            hooks.pop(hook_id, None)
        self._registration_hooks.clear()
        if not keep_root_dispatchers:
            for handle in self._root_handles:
                handle.remove()
            self._root_handles.clear()
        self._hooked_stand_ins.clear()

    def _mark_sharded(self) -> None:
        """Note which tracked parameters FSDP2 shards; refuse other DTensor parameters and FSDP1."""
        legacy = _fsdp.legacy_wrapped(self.model)
        if legacy is not None:
            raise ValueError(
                f"'{legacy}' is a FullyShardedDataParallel (FSDP1) wrapper: it runs the forward and backward on flat "
                "buffers that stand in for the parameters, so the per-parameter gradients divebatch reads and checks "
                "never reach them. Shard with FSDP2 instead (torch.distributed.fsdp.fully_shard, then create the "
                "GradNormTracker), or use DistributedDataParallel")
        managed = _fsdp.managed_parameters(self.model)
        units = _fsdp.innermost_units(self.model) if managed else {}
        for owner in self._owners:
            owner.sharded = tuple(name for name, p in owner.tracked.items() if id(p) in managed)
            holders = {id(owner.module.get_submodule(name.rpartition(".")[0])) for name in owner.sharded}
            owner.shard_units = list({id(units[h]): units[h] for h in holders if h in units}.values())
            other = [name for name, p in owner.tracked.items() if id(p) not in managed and _fsdp.is_dtensor(p)]
            if other:
                raise ValueError(
                    f"module '{owner.name}' ({type(owner.module).__name__}): parameter '{other[0]}' is a DTensor that "
                    "torch.distributed.fsdp.fully_shard does not manage (tensor parallelism?). Per-sample norms "
                    "need each rank's forward to use whole weights: shard the model with fully_shard only, "
                    "or freeze that parameter")
            if owner.tracked and not owner.sharded:
                owner.probe = next(iter(owner.tracked.items()))

    def _live(self, owner: _Owner) -> dict[str, nn.Parameter]:
        """The owner's tracked parameters as its forward and backward use them: under FSDP2, the
        unsharded stand-ins the module holds at that time (``owner.tracked`` keeps the shards)."""
        if not owner.sharded:
            return owner.tracked
        live = dict(owner.tracked)
        for name in owner.sharded:
            live[name] = owner.module.get_parameter(name)
        return live

    def _gathered(self, owner: _Owner):
        """Calls accounted once the backward is over (an output whose gradient never came, e.g. an
        LSTM's ``h_n`` on the replay path): fully_shard has put the shards back by then, so their parameters are
        gathered again for the rule (a collective: every rank accounts the same modules here)."""
        if owner.sharded and _fsdp.is_dtensor(owner.module.get_parameter(owner.sharded[0])):
            return _fsdp.gathered(owner.shard_units)
        return contextlib.nullcontext()

    def _on_unsharded(self, owner: _Owner, module, args):
        """FSDP2 has swapped in the unsharded parameters: hook each stand-in once (fully_shard
        reuses the same object every step), reporting under its shard's identity."""
        for name in owner.sharded:
            stand_in = module.get_parameter(name)
            if _fsdp.is_dtensor(stand_in):
                raise RuntimeError(
                    f"module '{owner.name}' ({type(module).__name__}): parameter '{name}' is still a sharded DTensor "
                    "when its forward runs, so its gradient would not reach divebatch. Call the module through "
                    "its fully_shard parent's forward (not a method of it that bypasses it), and shard with "
                    "fully_shard alone (2-D parallelism with DTensor weights is not supported)")
            if id(stand_in) not in self._hooked_stand_ins:
                self._hooked_stand_ins.add(id(stand_in))
                self._handles.append(stand_in.register_hook(
                    partial(self._on_param_grad, owner, _join(owner.name, name), id(owner.tracked[name]))))
        return None

    def _on_sharded_forward_end(self, owner: _Owner, module, args, output):
        """After fully_shard's post-forward hook: hook this call's outputs now, so that in the backward
        fully_shard's hook (registered on them just before) gathers the parameters before the rule
        reads them (tensor hooks run in the order they were registered)."""
        hooks, owner.deferred_hooks = owner.deferred_hooks, []
        for target, hook in hooks:
            target.register_hook(hook)
        return None

    # Excluded from torch.compile: dynamo breaks the graph here and runs the tracked module
    # eagerly, so the hooks see real tensors and register real gradient hooks.
    @torch.compiler.disable
    def _fused_call(self, owner: _Owner, *args, **kwargs):
        module = owner.module
        if owner.retired:  # (the tracked model's own forward, re-planned after its call had started)
            return module.forward(*args, **kwargs)
        x = args[0] if args else None
        rule = owner.rule
        if x is None and getattr(rule, "fused_kwargs", False):
            x = kwargs.get("query")
        # The tensor the checks below read: the input itself, or what stands for a structured one
        # (a PackedSequence's data, for the recurrent rule).
        probe = rule.fused_input_tensor(x) if hasattr(rule, "fused_input_tensor") else x
        if ((kwargs and not getattr(rule, "fused_kwargs", False)) or not isinstance(probe, torch.Tensor)
                or capture_suspended() or not torch.is_grad_enabled()
                or _inside_functorch() or torch.is_autocast_enabled(probe.device.type)
                or (probe is x and x.dim() > 1 and x.shape[0] == 1 and self._last_batch > 1)  # shared: see _on_forward
                or self._follows(probe)  # a shared tensor without a batch dim (see _on_table_read)
                or not rule.fuse_call(module, x)):
            # Not fusable here: the module's own forward, with the hook path capturing.
            return type(module).forward(module, *args, **kwargs)
        batch_size = rule.fused_batch_size(module, x) if hasattr(rule, "fused_batch_size") else (
            x.shape[0] if x.dim() > 1 else 1)
        if probe.dim() > 0 and (probe.shape[0] == 0 or batch_size == 0):
            raise ValueError(f"module '{owner.name}' ({type(module).__name__}) got an empty batch (0 samples); "
                             "skip empty batches before the forward pass")
        call = _Call(owner, None, batch_size, [None], 1, fused=True, model_rows=self._model_rows)
        # (the batch so far, as the hook path keeps it: a later [1, K, d] input is then known shared)
        self._last_batch = batch_size
        out = rule.fused_forward(module, args, kwargs, partial(self._fused_sink, call))
        self._record_samples(owner, out, _tensors(out), batch_size)
        owner.forward_calls += 1
        owner.skip_hooks += 1
        return out

    def _fused_sink(self, call: _Call, ctx, grad: torch.Tensor):
        """Called from a fused backward: per-sample norms and, when exact, the weight gradient."""
        if not self._enabled:
            return None, None
        step = self._current_backward()
        owner = call.owner
        call.ctx, call.grads, call.pending = ctx, [grad], 0
        if owner.forward_calls <= 1 and not owner.ready:
            sq, grad_w, grad_b = owner.rule.fused_grads(owner.module, ctx, grad, self._live(owner))
            self._account(step, owner, [call], sq)
            return grad_w, grad_b
        owner.ready.append(call)  # several calls: combined before squaring, plain gradients
        if len(owner.ready) >= owner.forward_calls:
            self._account(step, owner, owner.ready)
            owner.ready = []
        return None, None

    @torch.compiler.disable
    def _on_pre_forward(self, owner: _Owner, module, args, kwargs):
        self._leave_watchers()
        # What the rule must see before the forward runs (e.g. the RNG state for a dropout replay).
        capturing = _capturing()
        if owner.rule is GENERIC:
            # Which inner owners this call calls, and how it uses its own parameters (see _on_forward).
            recorder = None
            if capturing and parametrize._cache_enabled and parametrize.is_parametrized(module):
                # Under parametrize.cached() the parametrized tensor is computed at its first access and
                # reused: a later call (an RNN's step) or a read before the call would apply a tensor
                # whose computation no recorder saw, and its gradient would reach the originals unseen
                # (refused, 79% off in an orthogonal RNN). Each tracked call computes it again.
                for name in module.parametrizations:
                    parametrize._cache.pop((id(module), name), None)
            inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)] if capturing else []
            first = next((x for x in inputs if x.dim() > 0), None)  # (the rows the experts' products are followed from)
            # [T, B, ...] inside a model tracked batch first, or [B, T, ...] inside one tracked sequences
            # first, where the graph proves it (see _walked_samples_dim): replayed over that dim.
            samples_dim = (self._walked_samples_dim(owner, first, (0, 1) if owner.sequences_first else (1,))
                           if first is not None and first.is_floating_point() and declared_batch_first(module) is None
                           and not isinstance(module, nn.RNNBase) else None)
            if (capturing and (owner.rule.batch_dim(module) if samples_dim is None else samples_dim) == 0
                    and not isinstance(module, nn.RNNBase)
                    and _seen_by_modes(module)):
                recorder = DirectUseRecorder(self._live(owner), first, self._inner_params(owner), inputs)
                recorder.batch_size = self._input_batch
                recorder.__enter__()
            owner.pre_states.append(([inner.forward_calls + inner.covered_calls for inner in owner.descendants], recorder,
                                     _parametrization_state(module), samples_dim))
        else:
            owner.pre_states.append(owner.rule.before_forward(module, args, kwargs) if capturing else None)
        return None

    @torch.compiler.disable
    def _on_forward(self, owner: _Owner, module, args, kwargs, output):
        self._leave_watchers()
        pre_state = owner.pre_states.pop() if owner.pre_states else None
        recorder = samples_dim = None
        if owner.rule is GENERIC and pre_state is not None:
            pre_state, recorder, parametrization_state, samples_dim = pre_state
            if recorder is not None:
                self._leave_mode(recorder)
            # Where the recorder read every use (the weight computed from the parameters, then one
            # product with the input), the per-sample vjps run back through the ops it recorded, with
            # this forward's tensors: a power iteration that moved the estimate is no obstacle.
            if (parametrization_state and (recorder is None or recorder.uses is None)
                    and any(b._version != v for b, v in parametrization_state)):
                which = (f"a parametrization of its {', '.join(repr(n) for n in module.parametrizations)}"
                         if parametrize.is_parametrized(module) else "the forward pre-hook that computes its weight")
                hint = ("put the parametrization in eval mode (module.parametrizations.<name>.eval() keeps its current "
                        "estimate)" if parametrize.is_parametrized(module) else "call .eval() on the module")
                raise ValueError(
                    f"module '{owner.name}' ({type(module).__name__}): {which} changed its buffers during the "
                    "forward (e.g. spectral_norm's power iteration in training mode), and its per-sample gradients "
                    "come from replaying the forward (an op of the module's forward the tracker cannot read), which "
                    f"must compute the same tensor again: {hint}, or freeze it")
        if (owner.probe is not None and _attribute(owner.module, owner.probe[0]) is not owner.probe[1]
                and _capturing()):
            raise RuntimeError(
                f"module '{owner.name}' ({type(module).__name__}): its parameter '{owner.probe[0]}' is not the one "
                "the GradNormTracker planned for: it was swapped in without Module.register_parameter (by "
                "fully_shard, torch.func.functional_call, or an assignment to the module's _parameters), so its "
                "gradients would not reach the tracker. Create the tracker after fully_shard(...); call "
                "functional_call with tracker.enabled = False; assign parameters as attributes "
                "(module.weight = nn.Parameter(...)), which the tracker re-plans after")
        if owner.skip_hooks:
            owner.skip_hooks -= 1
            return None
        if not _capturing():
            return None
        if owner.rule is GENERIC and not owner.tracked and pre_state is not None and all(
                inner.forward_calls + inner.covered_calls != before for inner, before in zip(owner.descendants, pre_state)):
            return None  # (no parameters of its own, and it called every submodule it holds: nothing to account)
        leaves = [t for t in _tensors(output) if t.requires_grad]
        if not leaves:  # e.g. frozen layer on a no-grad input: nothing will flow back
            return None
        if owner.sequences_first and samples_dim is None:
            self._refuse_unknown_sample_dim(owner, args, kwargs)
        separated = None
        if owner.rule is GENERIC and len(leaves) > 1:
            separated = _separate_outputs(output, args, kwargs)
            if separated is not None:
                output = separated
                leaves = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        live = self._live(owner)  # (under FSDP2 the unsharded stand-ins, until fully_shard's post-forward)
        if not self._low_precision_forward and any(map(torch.is_autocast_enabled, ("cpu", "cuda"))):
            self._low_precision_forward = True
        if not self._cpu_bfloat16_forward and (
                (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
                or (isinstance(owner.rule, AffineNormRule)  # a bfloat16 model's norm, on CPU
                    and any(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in live.values()))):
            self._cpu_bfloat16_forward = True
        if hasattr(owner.rule, "before_forward"):
            ctx = owner.rule.capture(module, args, kwargs, output, pre_state)
        elif samples_dim is not None:
            ctx = owner.rule.capture(module, args, kwargs, output, batch_dim=samples_dim)
        else:
            ctx = owner.rule.capture(module, args, kwargs, output)
        if owner.descendants and pre_state is not None:
            # Inner owners this call did not call (their parameters used directly, or not at all):
            # this call's per-sample gradients cover their parameters too. Not those covered by a
            # generic owner inside this one (a block's attention using its qkv Linear's weight itself).
            uncalled = [inner for inner, before in zip(owner.descendants, pre_state)
                        if inner.forward_calls + inner.covered_calls == before]
            for inner in uncalled:
                inner.covered_calls += 1
            ctx.extra_params = tuple(_join(_relative_name(owner.name, inner.name), pname)
                                     for inner in uncalled for pname in inner.tracked)
            ctx.extra_owners = tuple(uncalled)
        if recorder is not None and recorder.adopted - set(getattr(ctx, "extra_params", ())):
            recorder.uses = None  # an inner module's parameter used here and by that module's own calls
        if (recorder is not None and recorder.uses is None and ctx.batch_size == 1 and not getattr(ctx, "extra_params", ())
                and all(d is None for d in ctx.in_dims)):
            # No batched input, every output computed from the parameters alone (Swin's bias table):
            # the outputs' per-sample grads (from their watcher) are taken back through that computation.
            ctx.computed_outputs = recorder.computed_outputs(leaves)
        if owner.rule is GENERIC and not samples_dim:
            ctx = self._generic_rows(ctx, args, kwargs)
        batch_size = owner.rule.batch_size(module, ctx)
        if isinstance(ctx, EmbeddingBagCall) and args and self._model_inputs and args[0] is self._model_inputs[0]:
            # The model's input is 1-D ids with offsets: its samples are the bags, not the ids.
            self._input_batch = batch_size
        if batch_size == 0:
            raise ValueError(f"module '{owner.name}' ({type(module).__name__}) got an empty batch (0 samples); "
                             "skip empty batches before the forward pass")
        if owner.rule is GENERIC and isinstance(module, nn.Embedding) and self.batch_first:
            self._refuse_own_position_lookup(owner, ctx, batch_size, recorder)
        samples = getattr(ctx, "input_samples", None)
        if recorder is not None and samples is not None:
            # The first input's rows are samples' rows in another order (Llama 4's experts get every
            # token once per expert): only products of those rows can use that order.
            uses = usable_direct_uses(recorder.uses, live, ctx.input_batch, input_samples=samples)
            if uses is not None:
                ctx.batch_size = batch_size = ctx.input_batch
        else:
            uses = (usable_direct_uses(recorder.uses, live, batch_size, getattr(ctx, "rows", None))
                    if recorder is not None else None)
        if uses is None and recorder is not None and samples is None and getattr(ctx, "input_batch", None):
            # Outputs flattened inside the module ([B*T, E] router logits from a [B, T, d] input):
            # where every use was read as a product of its input's rows, the call has its inputs'
            # samples (the outputs' grads are not needed).
            uses = usable_direct_uses(recorder.uses, live, ctx.input_batch)
            if uses is not None and all(use.kind == "rows" for use in uses):
                ctx.batch_size = batch_size = ctx.input_batch
            else:
                uses = None
        if uses is not None:
            ctx.direct_uses = uses  # their output grads arrive after the module's outputs'
        if owner.rule is GENERIC and (uses is not None or ctx.computed_outputs is not None):
            ctx.expected_outputs = None  # (kept for a replay's check only)
        n_grads = len(leaves) + (len(uses) if uses is not None else 0)
        call = _Call(owner, ctx, batch_size, [None] * n_grads, n_grads, model_rows=self._model_rows)
        for j, use in enumerate(uses or ()):
            # Weakly: the call holds its uses (ctx.direct_uses), and a strong sink would make a
            # cycle that keeps the uses' tensors (a product's rows, its output grad) alive until
            # Python's cycle collector runs. The call lives as long as its outputs' hooks.
            use.sink = partial(_sink, weakref.ref(call), self._on_output_grad, len(leaves) + j)
        owner.forward_calls += 1
        if owner.tie is not None and owner is owner.tie.embedding:
            # Weak: a forward whose graph is dropped without a backward must not keep its indices.
            owner.tie.embedding_calls.append(weakref.ref(call))
        expanded = self._expand_shared_compiled_output(call, output, leaves)
        if expanded is not None:
            leaves = [expanded]
        for i, t in enumerate(leaves):
            base = _own_product(t, args) if owner.rule.rows_independent and expanded is None else None
            if base is None:
                target, hook = t, partial(self._on_output_grad, call, i)
            else:
                target, hook = base, partial(self._on_base_grad, call, i, t.shape)
            if owner.sharded:
                owner.deferred_hooks.append((target, hook))
            else:
                target.register_hook(hook)
        # A row-wise layer on a tensor shared by the samples without a batch dim (a normalised table,
        # see _on_table_read; a parameter or buffer of the model: a prototype network's class
        # embeddings, projected as the samples are): each of its rows is every sample's. (Read as
        # samples, a [K, d] parameter with K equal to the batch gave wrong norms with no error.)
        call.unbatched = (n_grads == 1 and owner.rule.rows_independent and isinstance(ctx, torch.Tensor)
                          and bool(args) and (self._follows(args[0]) or self._is_model_state(args[0]))
                          and args[0].shape[0] != 1)
        if expanded is not None:
            return expanded
        if n_grads == 1 and self._last_batch != 1 and (
                call.unbatched
                or (batch_size == 1 and (isinstance(owner.rule, (EmbeddingRule, LinearRule, ConvRule))
                                         or owner.rule is GENERIC
                                         # (a LayerNorm or RMSNorm of a [1, K, d] input followed as shared:
                                         # class embeddings projected then normalised)
                                         or (isinstance(owner.rule, RowNormRule) and bool(args)
                                             and self._follows(args[0]))))
                or (isinstance(owner.rule, EmbeddingRule) and 1 < self._last_batch != batch_size)
                or (isinstance(owner.rule, EmbeddingRule) and batch_size == self._last_batch > 1 and bool(args)
                    and self._model_inputs and not self._reads_model_input(args[0]))):
            # Looked up once for all samples: [1, T] ids, or ids with no batch dim (their first dim
            # differs from the batch of the calls before it, or, where it is the batch's, ids not
            # read from the model's inputs: nanoGPT's ``wpe(arange(T))`` at T == B, whose rows were
            # taken for samples, 1.5% off with no error; T5's [T, T] buckets); the watcher gives
            # up, and the rows stay the samples', where the output is not broadcast over the batch
            # (a class embedding of labels computed in the forward); or a Linear given a [1, K, d] input
            # shared by the samples (a Conformer's relative positions), or a convolution given a
            # [1, C, H, W] one (XCiT's projected Fourier position grid).
            self._watch_shared_output(call, leaves[0])
        elif not call.unbatched:
            self._last_batch = batch_size
            self._record_samples(owner, output, leaves, batch_size, ctx)
        return separated

    def _record_samples(self, owner: _Owner, output, outputs: list, batch_size: int, ctx=None) -> None:
        """A call's output tensors ``outputs`` (of its ``output``), where their sample dim is known
        (``_output_sample_dims``): where later layers' inputs may come from (the terminals of
        ``_walked_samples_dim``'s walks). Not a ``PackedSequence``'s rows (sorted by length)."""
        if (batch_size <= 1 or not self._model_inputs
                or (isinstance(output, tuple) and output and isinstance(output[0], PackedSequence))):
            return  # (only within the tracked model's forward, whose end drops them: a submodule called
            # on its own, outside it, must not keep its graph alive)
        dims = _output_sample_dims(owner, ctx, len(outputs))
        if (dims and self._other_layout is None and dims[0] == int(self.batch_first) and outputs
                and isinstance(outputs[0], torch.Tensor) and outputs[0].dim() >= 3):
            self._other_layout = (f"'{owner.name}' ({type(owner.module).__name__}), output {list(outputs[0].shape)} "
                                  f"with samples in dim {dims[0]}")
        for i, t in enumerate(outputs):
            dim = 0 if dims is None else dims[i]
            if (dim is not None and isinstance(t, torch.Tensor) and t.dim() > max(dim, 1) and t.shape[dim] == batch_size
                    and t.grad_fn is not None):
                self._sample_nodes[(id(t.grad_fn), t.output_nr)] = (t.grad_fn, dim, batch_size)

    @staticmethod
    def _refuse_unknown_sample_dim(owner: _Owner, args: tuple, kwargs: dict) -> None:
        """Under ``batch_first=False``: a module whose rule takes samples from dim 0 whatever the
        layout (the generic route, Bilinear, PReLU), given a tensor with a sequence dim, which may
        be ``[T, B, d]`` as well as ``[B, C, L]``: refused unless the module says where its samples
        are with a ``batch_first`` attribute (the generic route reads it; the others take dim 0)."""
        module = owner.module
        if not (owner.rule is GENERIC or isinstance(owner.rule, (BilinearRule, PReLURule))):
            return
        declared = declared_batch_first(module)
        if declared is True or (declared is False and owner.rule is GENERIC):
            return
        first = next((x for x in _tensors((args, kwargs)) if x.dim() > 0), None)
        if first is None or not _has_sequence_dim(first):
            return
        fix = ("set `module.batch_first = False` if its samples are in dim 1 ([T, B, ...]), True if in dim 0"
               if owner.rule is GENERIC else
               "give it its input as [B, ...] (transpose(0, 1) around it) and set `module.batch_first = True`")
        raise ValueError(
            f"module '{owner.name}' ({type(module).__name__}) got a tensor of shape {list(first.shape)} while the "
            "tracker was created with batch_first=False (or a PyTorch transformer around it was), and "
            f"nothing says whether its samples are in dim 0 or in dim 1 (a [T, B, d] sequence or a [B, C, L] map look alike): {fix}.")

    def _expand_shared_compiled_output(self, call: _Call, output, leaves: list) -> torch.Tensor | None:
        """Under torch.compile, an ``nn.Embedding`` looked up with ids ``[1, T]`` shared by all
        samples (GPT-2's and BERT's default position ids; BART's, through an Embedding subclass with
        its own forward on the generic route) while the forward has ``B > 1`` samples: its output
        expanded to ``[B, T, d]`` (a view, the same values), to be returned in place of the
        ``[1, T, d]`` output, and its call made the B samples' (the ids expanded alike; a generic
        call replays each sample with its own output grad, its inputs without the B samples shared,
        as after a watcher, see _shared_output_grad). Its grad then arrives per sample, before
        autograd sums the expansion. (Eager code keeps the output as it is and follows it to the
        ops that broadcast it, see _watch_shared_output; compiled code cannot be followed.) A
        position table's output is added to the tokens' [B, T, d], so the expansion changes nothing
        downstream; a Linear's or convolution's output of a shared input is not expanded (DeBERTa
        computes per-head tensors of its projected relative positions whose shapes depend on that
        batch of 1). None where this does not apply."""
        B, ctx = self._last_batch, call.ctx
        lookup = isinstance(ctx, EmbeddingCall) and ctx.indices.dim() == 2 and ctx.indices.shape[0] == 1
        subclass = (call.owner.rule is GENERIC and isinstance(call.owner.module, nn.Embedding)
                    and not getattr(ctx, "direct_uses", None))  # an Embedding with its own forward (BART's)
        if not ((lookup or subclass) and call.batch_size == 1 and B and B > 1 and len(leaves) == 1
                and output is leaves[0] and output.dim() == 3 and output.shape[0] == 1
                and _called_from_compiled_code()):
            return None
        if lookup:
            ctx.indices = ctx.indices.expand(B, *ctx.indices.shape[1:])
        else:  # replayed per sample with its own output grad; inputs without the B samples shared by all
            ctx.in_dims = [d if d is not None and ctx.leaves[i].shape[d] == B else None
                           for i, d in enumerate(ctx.in_dims)]
            ctx.batch_size = B
        call.batch_size = B
        return output.expand(B, *output.shape[1:])

    @torch.compiler.disable
    def _on_table_read(self, owner: _Owner, module, args, kwargs):
        """A row-wise layer called on a tracked Embedding's whole weight (DeBERTa-v2/v3 normalise
        their relative-position table, ``LayerNorm(rel_embeddings.weight)``, without calling the
        Embedding): the layer gets the table's rows instead (``_table_rows``). Its output is shared
        by the samples and watched (see _on_forward)."""
        x = args[0] if args else None
        table = self._table_of(x)
        if table is None or table is owner or not self._may_read_tables(table) or x.dim() != 2:
            return None
        return (self._table_rows(table, x), *args[1:]), kwargs

    @torch.compiler.disable
    def _on_table_passed(self, module, args, kwargs):
        """A module handed a tracked Embedding's whole weight as an argument (DeBERTa v1 passes
        ``rel_embeddings.weight`` down its layers, whose attention drops it out, slices it and
        projects it), which it may read in any way: it gets the table's rows instead
        (``_table_rows``), followed by their watcher as any shared output."""
        tables = [t for t in map(self._table_of, (*args, *kwargs.values())) if t is not None]
        if not tables or not all([self._may_read_tables(table) for table in tables]):  # (each: see _may_read_tables)
            return None
        rows = {}  # one lookup for a table passed twice to the same call
        def swap(a):
            table = self._table_of(a)
            if table is None or a.dim() != 2:
                return a
            if id(a) not in rows:
                rows[id(a)] = self._table_rows(table, a)
            return rows[id(a)]
        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    def _table_of(self, x) -> _Owner | None:
        """The owner of the tracked Embedding whose weight ``x`` is, if any."""
        table = self._tables.get(id(x)) if isinstance(x, nn.Parameter) else None
        return table if table is not None and table.module.weight is x else None

    def _may_read_tables(self, table: _Owner) -> bool:
        if not _capturing():
            return False
        if _called_from_compiled_code():
            self._tables_read_in_compiled_code.add(table.name)  # (for the error that follows, see _finish_backward)
            return False
        return True

    def _table_rows(self, table: _Owner, weight: nn.Parameter) -> torch.Tensor:
        """A read of ``table``'s whole weight as a call of that Embedding on every index, with no
        batch dim (T5's relative positions are looked up so), whose output, a view of the weight,
        is read instead. It is shared by the samples: watched as any such output, each sample's
        grads of the table come from where the samples meet it. Where every call had one sample,
        the whole grad is that sample's."""
        rows = weight.view_as(weight)  # a node of this graph to hook (a hook on the weight would outlive the step)
        # Every row as it is: no padding row, no scale (the weight is read, not looked up).
        ctx = EmbeddingCall(torch.arange(weight.shape[0], device=weight.device), None, None)
        call = _Call(table, ctx, weight.shape[0], [None], 1, unbatched=True)
        table.forward_calls += 1
        rows.register_hook(partial(self._on_output_grad, call, 0))
        # Watched even where every call so far had one sample: the layers called on the table learn
        # from the watcher that their input is shared (_follows).
        self._watch_shared_output(call, rows)
        return rows

    def _is_model_state(self, x) -> bool:
        """Whether ``x`` is a parameter or buffer of the tracked model, or a view of one (no samples in it)."""
        return isinstance(x, torch.Tensor) and (id(x) in self._state_ids
                                                or (x._base is not None and id(x._base) in self._state_ids))

    def _follows(self, x) -> bool:
        """Whether a watcher follows ``x`` as its output or a rearrangement of it (shared by the samples)."""
        return any(watcher._is_alias(x) for watcher in self._watchers)

    def _generic_rows(self, ctx, args, kwargs):
        """A generic-route call whose first batched input is samples and tokens flattened into rows
        (proven as for a Linear, ``_on_rows_pre_forward``): its rows grouped by sample
        (``GenericRule.as_rows``). Otherwise ``ctx`` as it is."""
        # The call's own inputs (ctx keeps them detached, without the graph the proof reads).
        first = next((x for x, d in zip(tree_flatten((args, kwargs))[0], ctx.in_dims) if d is not None), None)
        lead = self._proven_rows(first) if isinstance(first, torch.Tensor) else None
        grouped = GENERIC.as_rows(ctx, lead) if lead is not None else None
        if grouped is not None:
            return grouped
        if lead is None and isinstance(first, torch.Tensor) and self._rows_may_be_flattened(first):
            # Rows of samples in another order (every token once per expert): usable only if every
            # use of the module's weights is a product of those rows (see _on_forward).
            found = row_samples(first, self._last_batch or None)
            if found is not None and found[0] != first.shape[0]:
                ctx.input_batch, ctx.input_samples = found
        return ctx

    def _merged_rows_order(self, owner: _Owner, x: torch.Tensor) -> tuple[int, bool] | None:
        """``merged_rows_order``: for a row-wise layer whose input's rows may be samples and positions
        merged, ``(B, sample_major)`` where the autograd graph proves every row one sample's back to
        this forward's earlier tracked outputs. Time-major rows (``h.reshape(-1, d)`` of a ``[T, B, d]``
        tensor in a model tracked batch first) were taken sample-major by the merge ``row_samples``
        reads, with T for the batch, and under ``batch_first=False`` sample-major rows (of a ``[B, T,
        d]`` tensor transposed back) were taken time-major by ``merged_sequence_rows``: refused where
        T != B, wrong with no error where T == B. Kept for the plan per call, as
        ``_walked_samples_dim``'s answers."""
        batch = self._last_batch
        if (batch <= 1 or not self._sample_nodes or not owner.rule.rows_independent
                or not self._rows_may_be_flattened(x) or x.shape[0] % batch):
            return None
        key = (id(owner), owner.forward_calls, "rows")
        if key in self._layouts:
            found = self._layouts[key]
        else:
            varies: list[str] = []
            found = merged_rows_order(x, self._sample_nodes, self._shared_nodes(), varies)
            if not varies:  # (rows moved by index values, which may be the data's: walked each time)
                self._keep_layout(key, found)
        return found if found is not None and found[0] == batch else None

    def _proven_rows(self, x: torch.Tensor) -> tuple[int, ...] | None:
        """``flattened_samples(x)``, where ``x``'s rows may be samples and tokens merged: not when
        they are as many as the last call's samples (the common case: one comparison, no graph
        walk), nor in code torch.compile traces (its graph holds no views to read)."""
        return (flattened_samples(x, self._shared_nodes(), self._last_batch or None)
                if self._rows_may_be_flattened(x) else None)

    def _shared_nodes(self) -> frozenset:
        """Graph nodes of the outputs the watchers follow: shared by all samples (see flattened_samples)."""
        return frozenset(alias.grad_fn for watcher in self._watchers for alias, _ in watcher.aliases.values()
                         if alias.grad_fn is not None)

    def _rows_may_be_flattened(self, x: torch.Tensor) -> bool:
        return not (x.grad_fn is None or x.dim() < 2 or x.shape[0] == self._last_batch)

    def _watch_shared_output(self, call: _Call, output: torch.Tensor) -> None:
        """An Embedding looked up once for all samples (``[1, T]`` position ids, GPT-2's and BART's
        default), or a Linear given a ``[1, K, d]`` input shared by the samples (a Conformer's
        relative position embeddings), while the forward has ``B`` samples: its output is broadcast over them later, and
        autograd sums the samples' parts before its own output grad. A watcher follows the output
        to the end of the tracked model's forward, hooking the ops that broadcast it; where they
        account for the whole output grad, the call takes the per-sample grads (an Embedding's
        indices, a Linear's input expanded to B rows; a generic-route module replays each sample with
        its own output grad). Not where every call so far had one sample (batches of 1 need none of this),
        nor under ``batch_first=False``: a watcher reads the samples of the tensors the output meets
        from their dim 0, which there may be the sequence's (the call keeps its batch of 1, refused
        by the batch check with a hint)."""
        if output.dim() < 2 or call.owner.sequences_first:
            return
        if _called_from_compiled_code():
            call.refusal = _compiled_shared_output_hint
            return
        call.watcher = SharedOutputWatcher(output, batch_hint=self._last_batch or None, shared_nodes=self._shared_nodes)
        if self._watching is None:
            self._watching = SharedOutputWatchers()
            self._watching.__enter__()
        self._watching.watchers.append(call.watcher)
        self._watchers.append(call.watcher)

    def _inner_params(self, owner: _Owner) -> dict:
        """``owner.inner_params``, built on first use (see _Owner); under FSDP2, every call, from the
        parameters the inner modules hold then (unsharded stand-ins, or shards not gathered yet)."""
        if owner.inner_params is None or any(inner.sharded for inner in owner.descendants):
            owner.inner_params = {}
            for inner in owner.descendants:
                chain = tuple(o for o in owner.descendants
                              if o.name == inner.name or inner.name.startswith(o.name + "."))
                for pname, p in self._live(inner).items():
                    owner.inner_params[id(p)] = (_join(_relative_name(owner.name, inner.name), pname), p,
                                                 partial(_any_in_forward, chain))
        return owner.inner_params

    @staticmethod
    def _innermost_mode():
        depth = torch._C._len_torch_function_stack()
        return torch._C._get_function_stack_at(depth - 1) if depth else None

    @torch.compiler.disable
    def _enter_table_products(self, owner: _Owner, module, args) -> None:
        """Before the forward of a module whose code applies an Embedding's weight as a product's
        matrix: run those products as calls of ``owner``'s layer (``tied.TableProducts``). The
        module runs eagerly under torch.compile (``_run_eagerly``); where its call is traced all the
        same (a compiled function around it), the products' gradient is refused by the backward's
        check, as any use outside the Embedding."""
        mode = None
        if _capturing() and _seen_by_modes(module):
            mode = TableProducts(owner.tracked["weight"], owner.module)
            mode.__enter__()
        owner.product_modes.append(mode)

    @torch.compiler.disable
    def _leave_table_products(self, owner: _Owner, module, args, output) -> None:
        mode = owner.product_modes.pop() if owner.product_modes else None
        if mode is not None and not mode.paused:
            self._leave_mode(mode)

    @torch.compiler.disable
    def _pause_table_products(self, owner: _Owner, module, args) -> None:
        """Before a submodule's call in the forward that ``TableProducts`` watches: the products are
        in that forward's own code (where the source showed them), so the mode is taken off the stack
        until the call returns. A torch-function mode costs every op ~1 us here, each op of the
        submodules and of the tracker's own hooks in them (the whole model's, where the model's own
        forward applies the table)."""
        mode = owner.product_modes[-1] if owner.product_modes else None
        if mode is None:
            return
        if not mode.paused:
            self._leave_mode(mode, pop_only=True)
        mode.paused += 1

    @torch.compiler.disable
    def _resume_table_products(self, owner: _Owner, module, args, output) -> None:
        mode = owner.product_modes[-1] if owner.product_modes else None
        if mode is None or not mode.paused:
            return
        mode.paused -= 1
        if not mode.paused:
            torch._C._push_on_torch_function_stack(mode)

    def _leave_mode(self, mode: DirectUseRecorder | TableProducts, pop_only: bool = False) -> None:
        """Leave a torch-function mode entered for a module's forward (a generic module's recorder,
        ``TableProducts``). Modes entered during that forward may sit above it on the stack (the
        watchers', kept to the model's forward's end; a ``TableProducts`` put back after a
        submodule's call): a mode's exit pops the innermost one, so those are taken off, the mode
        left (``pop_only``: taken off without its exit), and they are put back in their order, so
        the watchers keep following their outputs."""
        above = []
        while torch._C._len_torch_function_stack() and self._innermost_mode() is not mode:
            above.append(torch._C._pop_torch_function_stack())
        if torch._C._len_torch_function_stack():
            if pop_only:
                torch._C._pop_torch_function_stack()
            else:
                mode.__exit__(None, None, None)
        for other in reversed(above):
            torch._C._push_on_torch_function_stack(other)

    def _leave_watchers(self, all_of_them: bool = False) -> None:
        # A watcher follows its output to the end of the tracked model's forward (T5 adds its
        # position bias in every layer), or of the backward's start where a submodule was called on
        # its own. One that has seen a use it cannot split stops looking at ops at the next tracked
        # module's hook, but its aliases stay known as shared (_follows) to the forward's end.
        if all_of_them:
            self._watchers = []
        if self._watching is not None:
            self._watching.watchers = [w for w in self._watchers if not w.unknown_use]
        # Its mode is left once it is the innermost one (a generic module's recorder entered after it
        # is left by that module's forward hook; a mode the caller entered inside the model, by the caller).
        if self._watching is not None and not self._watchers and self._innermost_mode() is self._watching:
            self._watching.__exit__(None, None, None)
            self._watching = None

    def _shared_output_grad(self, call: _Call, grad: torch.Tensor) -> torch.Tensor:
        """The per-sample grads of a shared output where its watcher saw every use, else ``grad``."""
        watcher, call.watcher = call.watcher, None
        if watcher.batch_size is None or not watcher.complete(grad):
            # Refused by the batch check, with its hint (or a batch of 1 everywhere, where the whole
            # grad is the sample's).
            if call.unbatched:
                call.refusal = partial(self._unbatched_refusal, call, watcher)
                return self._one_sample(call, grad)
            if watcher.recomputed or watcher.used_without_grad:
                call.refusal = partial(self._checkpoint_refusal, watcher)
            return grad
        B, ctx, per_sample = watcher.batch_size, call.ctx, watcher.per_sample  # [B, *output.shape]
        batch_of_one = grad.shape[0] == 1 and call.batch_size == 1  # a [1, T] lookup: its row 0 is every sample's
        if isinstance(ctx, EmbeddingCall):
            if batch_of_one:
                ctx.indices = ctx.indices.expand(B, *ctx.indices.shape[1:])
            else:  # looked up with no batch dim at all (T5's [q, k] relative positions)
                ctx.indices = ctx.indices.unsqueeze(0).expand(B, *ctx.indices.shape)
        elif batch_of_one and isinstance(ctx, torch.Tensor) and isinstance(call.owner.rule, (LinearRule, ConvRule,
                                                                                             RowNormRule)):
            call.ctx = ctx.expand(B, *ctx.shape[1:])  # every sample's input (a view: no copy)
        elif batch_of_one:
            # Generic route: every sample's replay runs on the whole inputs, as the forward did (an
            # output of one row shared by the samples is no function of one sample's inputs; sliced
            # per sample, BART's decoder positions, a [T] cache position, were cut to one row where
            # T == B, refused).
            ctx.in_dims = [None] * len(ctx.in_dims)
            ctx.batch_size = B
        elif call.unbatched and isinstance(ctx, torch.Tensor):  # a row-wise layer on a shared table
            call.ctx = ctx.unsqueeze(0).expand(B, *ctx.shape)
        else:
            return grad
        call.batch_size = B
        return per_sample.squeeze(1) if batch_of_one else per_sample

    @staticmethod
    def _unbatched_refusal(call: _Call, watcher: SharedOutputWatcher) -> str:
        what = ("its weight is read whole (not looked up) by the forward, and that read"
                if isinstance(call.ctx, EmbeddingCall) else "its input")
        return (f" Here {what} is shared by the samples (it has no batch dim). Its per-sample gradients "
                "are followed only through rearranging ops, dropout, functions of it and parameters (a "
                "LayerNorm, a Linear) to ops that broadcast it over the batch (`+`, `-`, `*`, a matmul with "
                f"[B, ...] queries, `repeat(B, ...)`); {watcher.failure()}. Use it only through those ops (see "
                "docs/coverage.md).")

    @staticmethod
    def _checkpoint_refusal(watcher: SharedOutputWatcher) -> str:
        return (" Its output is shared by the samples and split per sample only where every use of it is "
                f"followed; {watcher.failure()}.")

    @staticmethod
    def _one_sample(call: _Call, grad: torch.Tensor) -> torch.Tensor:
        """An unbatched call's grad where every call had one sample: that sample's."""
        if isinstance(call.ctx, EmbeddingCall):
            call.ctx.indices = call.ctx.indices.unsqueeze(0)
        else:
            call.ctx = call.ctx.unsqueeze(0)
        call.batch_size = 1
        return grad.unsqueeze(0)

    def _current_backward(self) -> _Backward:
        if self._backward is None:
            self._leave_watchers(all_of_them=True)
            n, every = self._backwards_started, self.verify_every
            second_order = self._after_create_graph
            self._backward = _Backward(verify=n == 0 or (every > 0 and n % every == 0) or self._verify_next
                                       or second_order, second_order=second_order)
            self._verify_next = False
            # (create_graph=True: the gradients it forms are differentiable, and a later backward may
            # go through them; see _Backward.second_order)
            self._after_create_graph = torch.is_grad_enabled()
            if self._backward.verify:
                self._current_plan.verified = True
            self._backwards_started += 1
            # Runs once the engine finishes this backward: the place to close the record.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        return self._backward

    def _abandon_backward(self) -> None:
        """Forget the backward in progress and the calls waiting in it (see _abandons_backward_on_error)."""
        self._backward = None
        for owner in self._owners:
            owner.ready = []

    @_abandons_backward_on_error
    def _on_output_grad(self, call: _Call, index: int, grad: torch.Tensor):
        if not self._enabled:
            return None
        step = self._current_backward()
        # None: an output of a node with several outputs (cuDNN's LSTM: out, h_n, c_n) that the loss
        # does not reach, whose hook the engine calls with None. Kept as None, as for an output whose
        # hook never runs (the rules read a missing output grad as zero).
        if grad is not None:
            if call.watcher is not None:
                grad = self._shared_output_grad(call, grad)
            elif call.unbatched:  # not watched: every call had one sample
                grad = self._one_sample(call, grad)
            grad = grad.detach()
        call.grads[index] = grad
        call.pending -= 1
        owner = call.owner
        if call.pending > 0:
            if call.pending == len(call.grads) - 1:
                step.incomplete.append(call)
            return None
        if call in step.incomplete:
            step.incomplete.remove(call)
        if owner.forward_calls <= 1 and not owner.ready:
            self._account(step, owner, [call])
        else:
            # A module called several times: its per-sample gradient is the sum over calls,
            # so the calls are combined before squaring (never add squared norms of parts).
            owner.ready.append(call)
            if len(owner.ready) >= owner.forward_calls:
                self._account(step, owner, owner.ready)
                owner.ready = []
        return None

    def _on_base_grad(self, call: _Call, index: int, shape: torch.Size, grad: torch.Tensor):
        """The output grad of a call whose output is a reshape of its own product (see _own_product)."""
        return self._on_output_grad(call, index, grad.reshape(shape))

    @_abandons_backward_on_error
    def _on_param_grad(self, owner: _Owner, name: str, param_id: int, grad: torch.Tensor):
        if not self._enabled:
            return None
        step = self._current_backward()
        step.grad_ids.add(param_id)
        if (owner.ready or any(call.owner is owner for call in step.incomplete)) and not owner.sharded:
            # Its calls are accounted once the backward is over (an LSTM's h_n got no gradient), and a
            # rule may read the parameters then (a replay): an optimizer stepped in the backward
            # (register_post_accumulate_grad_hook, torchtune's optimizer_in_bwd) changes them as soon
            # as this gradient is accumulated. Their values as the forward used them are kept.
            param = next(p for p in owner.tracked.values() if id(p) == param_id)
            step.snapshots.setdefault(param_id, (param, param.detach().clone(), param._version))
        if step.verify:
            step.delivered[param_id] = (name, owner, grad.detach())
            if self._accounted_in_full(step, owner):
                self._verify_param(step, param_id)
        if self.track_batch_grad:
            if grad.is_sparse:
                grad = grad.coalesce().values()
            step.batch_grad_sq.add(grad.detach() if grad.requires_grad else grad)  # (create_graph=True only)
        step.params_with_grad[name] = owner
        return None

    # ------------------------------------------------------------------ verification
    @staticmethod
    def _add_accounted(step: _Backward, owner: _Owner, calls: list[_Call], live: dict) -> None:
        """Add the gradient these calls account for to each of the owner's parameters (``live``:
        its parameters as the rule reads them, see _live)."""
        sums = owner.rule.grad_sums(owner.module, [(c.ctx, c.grads) for c in calls], live)
        for name, p in owner.tracked.items():
            if sums is None or name not in sums:
                step.unverifiable.add(id(p))
        for name, part in (sums or {}).items():
            p = owner.tracked.get(name)
            p = owner.module.get_parameter(name) if p is None else p  # an inner owner's, see _on_forward
            prev = step.accounted.get(id(p))
            step.accounted[id(p)] = part if prev is None else prev + part

    @staticmethod
    def _accounted_in_full(step: _Backward, owner: _Owner) -> bool:
        """Every module sharing the owner's parameters has accounted all its calls in this backward."""
        waiting = {id(call.owner) for call in step.incomplete}
        return all(id(o) in step.contributed and not o.ready and id(o) not in waiting for o in _sharers(owner))

    def _verify_param(self, step: _Backward, param_id: int) -> None:
        """Compare autograd's gradient of one parameter with what its module's calls account for
        (squared norms of the difference and of the gradient, summed per module)."""
        name, owner, grad = step.delivered.pop(param_id)
        accounted = step.accounted.pop(param_id, None)
        if accounted is None or param_id in step.unverifiable:
            return  # not accounted at all: the end-of-backward check names it
        if grad.is_sparse:
            grad = grad.to_dense()
        diff_sq = squared_distance(grad, accounted).item()
        entry = step.verified.setdefault(id(owner), _Verified(owner))
        entry.compared = True
        entry.diff_sq += diff_sq
        entry.grad_sq += squared_norm(grad).item()
        entry.exact = entry.exact and grad.dtype in (torch.float32, torch.float64) and grad.device.type == "cpu"
        if diff_sq > entry.worst_diff_sq:
            entry.worst, entry.worst_diff_sq = name, diff_sq

    def _verification_error(self, step: _Backward) -> RuntimeError | None:
        """The error for the first module whose parameters got gradient from outside its forward.

        Compared per module, relative to the norm of the module's whole gradient: a parameter
        whose true gradient vanishes (e.g. a key projection's bias under softmax) is all rounding.
        """
        # A parameter whose gradient vanishes by construction (a bias added and subtracted, a gain
        # before a normalisation that removes it) has both sides made of rounding of much larger
        # terms: a difference below float32's rounding of the backward's largest module gradient
        # (1e-6 of it; 1e-3 after a low-precision forward) is no use outside the module.
        largest_sq = max((entry.grad_sq for entry in step.verified.values()), default=0.0)
        for entry in step.verified.values():
            rounding = 1e-6 if entry.exact and not self._low_precision_forward else 1e-3
            if entry.diff_sq <= rounding ** 2 * largest_sq:
                continue
            tol = 1e-3 if entry.exact and not self._low_precision_forward else 2e-2
            terms = step.rounded_terms.get(id(entry.owner))
            if terms:
                # PyTorch's CPU norm backward in bfloat16 rounds its parameter gradients like a
                # bfloat16 sum of ``terms`` terms: ~2^-8 sqrt(terms) at worst (measured: a quarter of
                # that for LayerNorm, 1.9% over 392 rows to 30% over 100,352).
                tol = max(tol, 2.0 ** -8 * math.sqrt(terms))
            rel, owner, name = entry.relative, entry.owner, entry.worst
            if rel > tol and step.second_order:
                return RuntimeError(
                    f"parameter '{name}' of module '{owner.name}' ({type(owner.module).__name__}) received a gradient "
                    f"that its forward calls do not account for (relative difference {rel:.2g}): this backward goes "
                    "through gradients an earlier backward formed with create_graph=True (a gradient penalty: R1, "
                    "WGAN-GP, input-gradient regularisation), whose part of each parameter's gradient flows through "
                    "the backward's own graph, where per-sample norms read from layer inputs and output grads do not "
                    "see it. Per-sample norms of such a loss are not computed: track a backward of the loss without "
                    "the penalty (backward, collect(), then the penalty's backward with tracker.enabled = False), or "
                    "turn tracking off for these steps")
            if rel > tol:
                return RuntimeError(
                    f"parameter '{name}' received a gradient that the forward calls of its module '{owner.name}' "
                    f"({type(owner.module).__name__}) do not account for (relative difference {rel:.2g} over the "
                    "module's gradient): the parameter is also used outside that module's forward, e.g. "
                    "`h @ embed.weight.T` in a parent's forward or a penalty such as `wd * p.square().sum()` added "
                    "to the loss. The per-sample part of that use is unknown, so the norms would be wrong. Route "
                    "every use through the module (for an output layer tied to an embedding: an nn.Linear whose "
                    "weight is the embedding's weight, or `F.linear(h, emb.weight)` / `h @ emb.weight.t()` / a "
                    "linear-map einsum written in a module's own forward, which are followed: not with a bias, a "
                    "cast or a cat of the weight), put weight decay in the optimizer, or freeze the parameter. (If "
                    "nothing uses it outside, the module computes something its rule does not model: please report "
                    "the module's type.)" + (_CPU_BFLOAT16_HINT if self._cpu_bfloat16_forward else ""))
        return None

    @staticmethod
    def _check_model_rows(step: _Backward, call: _Call) -> None:
        """The calls of a backward come from forwards of the tracked model that read the same rows
        as their samples: row ``i`` of every forward before a backward is sample ``i`` (two
        augmentations of one batch), so forwards on parts of one batch (``x[:2]``, then ``x[2:]``)
        would have their samples added up as if they were the same. (Parts that are not views of
        one tensor cannot be told from views of one batch.) Forwards that reach no backward (a
        validation pass with gradients on) are never accounted, so they do not count."""
        if call.model_rows is None:
            return
        address, stride, first_row = call.model_rows
        earlier = step.model_rows.setdefault((address, stride), first_row)
        if earlier != first_row:
            raise ValueError(
                f"module '{call.owner.name}' ({type(call.owner.module).__name__}): this backward reaches forwards of "
                f"the tracked model on rows {min(earlier, first_row)}.. and {max(earlier, first_row)}.. of one "
                "tensor (parts of one batch). divebatch takes row i of every forward before a backward for the same "
                "sample i (as for two augmentations of one batch), so those parts' samples would be added up as if "
                "they were the same. Call the model once on the whole batch (torch.cat the parts), or call "
                "backward() and collect() after each part.")

    def _account(self, step: _Backward, owner: _Owner, calls: list[_Call], sq: torch.Tensor | None = None) -> None:
        for call in calls:
            self._check_model_rows(step, call)
            if step.batch_size is None:
                step.batch_size = call.batch_size
            elif call.batch_size != step.batch_size:
                hint = ""
                if call.refusal is not None:
                    hint = call.refusal()
                elif 1 in (call.batch_size, step.batch_size):
                    # (with batch_first=False no watcher follows a shared output: they read samples in dim 0)
                    shape, one, example = (("[1, T]", "row", "torch.arange(T).expand(B, T)") if not owner.sequences_first else
                                           ("[T, 1]", "column", "torch.arange(T)[:, None].expand(T, B)"))
                    hint = (" A batch of 1 is usually an input shared by all samples whose output is broadcast "
                            f"over the batch later (e.g. position ids of shape {shape}): broadcasting sums the "
                            f"samples' gradients before the module sees them. Give it one {one} per sample, e.g. "
                            f"position_ids={example}.")
                elif owner.sequences_first:
                    hint = (" With batch_first=False, the samples are dim 1 of tensors with a sequence dim and dim 0 "
                            "of the others, and rows merged from a [T, B, ...] tensor (x.view(T * B, d)) are followed "
                            "only through ops that map each row to the same row (no gather, permutation or mixing "
                            "of rows): keep the leading dims into Linear/LayerNorm/Embedding layers, and see "
                            "GradNormTracker's batch_first.")
                elif (isinstance(call.ctx, torch.Tensor) and call.ctx.dim() >= 3
                      and call.ctx.shape[1] == step.batch_size and call.ctx.shape[0] == call.batch_size):
                    hint = (f" Its input, of shape {list(call.ctx.shape)}, looks sequences first ([T, B, ...]): for a "
                            "model that works on [T, B, ...] tensors and takes them as inputs, create the tracker with "
                            "batch_first=False. A model that takes [B, ...] inputs and works on [T, B, ...] inside (as "
                            "fairseq's transformer does) is read right inside PyTorch's nn.Transformer* modules (they "
                            "declare their layout) and where the autograd graph leads from the layer's input back to "
                            "earlier layers' outputs through ops divebatch follows (transposes, views, elementwise "
                            "ops, bmm, attention) or probes through their own backward (other ops and autograd "
                            "Functions that keep samples apart): here it did not; set `module.batch_first = False` "
                            "on this layer (a Linear, LayerNorm or RMSNorm; a module of its own), or transpose to "
                            "[B, T, ...] around it.")
                elif call.batch_size > step.batch_size and call.batch_size % step.batch_size == 0:
                    hint = (f" {call.batch_size} = {step.batch_size} x {call.batch_size // step.batch_size}: were "
                            "samples and tokens flattened into rows? Rows are assigned to samples only for a "
                            "Linear/LayerNorm/RMSNorm whose input comes from a view merging [B, T, ...] through "
                            "elementwise ops and such layers (not through gathers or permutations of rows); see "
                            "divebatch/layers/rows.py. Under torch.compile, where the view is made in compiled "
                            "code, divebatch reads it by calling that code's backward once more; where that did not "
                            "show it, exclude the module that flattens from compilation, e.g. "
                            "block.forward = torch.compiler.disable(block.forward).")
                raise ValueError(
                    f"module '{owner.name}' ({type(owner.module).__name__}) saw a batch of {call.batch_size} samples "
                    f"but other layers in this backward saw {step.batch_size}; per-sample gradients need one "
                    "sample dimension shared by every tracked layer (dim 0, or dim 1 for batch_first=False "
                    f"modules). Reshape so samples stay in the batch dimension, or freeze that module.{hint}")
        live = self._live(owner)
        if sq is None:
            sq = owner.rule.norms(owner.module, [(c.ctx, c.grads) for c in calls], live)
        if step.verify:
            self._add_accounted(step, owner, calls, live)
            entry = step.verified.setdefault(id(owner), _Verified(owner))
            entry.samples_sq += float(sq.float().sum())
            if self._cpu_bfloat16_forward and isinstance(owner.rule, AffineNormRule):
                entries = max((p.numel() for p in owner.tracked.values()), default=1)
                step.rounded_terms[id(owner)] = step.rounded_terms.get(id(owner), 0) + sum(
                    c.grads[0].numel() // entries for c in calls if c.grads and c.grads[0] is not None)
        prev = step.per_layer.get(owner.name)
        step.per_layer[owner.name] = sq if prev is None else prev + sq
        step.contributed.add(id(owner))
        for call in calls:  # inner owners a generic-route call accounted for (see _on_forward)
            step.contributed.update(id(inner) for inner in getattr(call.ctx, "extra_owners", ()))
        if owner.tie is not None:
            self._keep_tied_part(step, owner, calls)
        key = (len(calls), _shape_key(calls[0].ctx))
        if owner.plan_key != key:  # routes depend on shapes only: re-plan when they change
            owner.plan_key = key
            first = calls[0]
            if first.fused and len(calls) == 1:
                step.plans[owner.name] = owner.rule.fused_plan(owner.module, first.ctx, live)
            else:
                step.plans[owner.name] = owner.rule.plan_calls(owner.module, [(c.ctx, c.grads) for c in calls], live)

    @staticmethod
    def _keep_tied_part(step: _Backward, owner: _Owner, calls: list[_Call]) -> None:
        """Keep this module's half of a tied weight's cross term until the other half arrives."""
        tie = owner.tie
        if owner is tie.linear:
            emb_calls = [c for c in (ref() for ref in tie.embedding_calls) if c is not None]
            if not emb_calls:
                return  # the Embedding was not called: its part of the gradient is zero
            a, g = linear_factors([(c.ctx, c.grads) for c in calls])
            for emb_call in emb_calls:
                rows = tied_rows(a, g, emb_call.ctx.indices, emb_call.ctx.padding_idx)
                prev = step.tie_rows.get(emb_call)
                step.tie_rows[emb_call] = rows if prev is None else prev + rows
        else:
            for call in calls:
                step.tie_grads[call] = call.ctx.lookup_grad(call.grads[0])

    @staticmethod
    def _add_tied_cross_terms(step: _Backward) -> None:
        for call, rows in step.tie_rows.items():
            grad = step.tie_grads.get(call)
            if grad is None:  # that Embedding call's output got no gradient: no cross term
                continue
            key = call.owner.tie.key
            cross = 2.0 * tied_cross(rows, grad)
            prev = step.per_layer.get(key)
            step.per_layer[key] = cross if prev is None else prev + cross

    def _finish_backward(self) -> None:
        step, self._backward = self._backward, None
        if step is None:
            return
        try:
            pending: dict[int, tuple[_Owner, list]] = {}
            for call in step.incomplete:
                pending.setdefault(id(call.owner), (call.owner, []))[1].append(call)
            for owner in self._owners:
                if owner.ready:
                    pending.setdefault(id(owner), (owner, []))[1].extend(owner.ready)
                    owner.ready = []
            for owner, calls in pending.values():
                with self._gathered(owner), _as_forwarded(step, owner):
                    self._account(step, owner, calls)
            self._add_tied_cross_terms(step)
            self._drop_unformed(step)
            for param_id in list(step.delivered):
                self._verify_param(step, param_id)
            outside_use = self._verification_error(step)
            if outside_use is not None:
                raise outside_use
            missing = [name for name, owner in step.params_with_grad.items()
                       if not any(id(o) in step.contributed for o in _sharers(owner))]
            if missing:
                owner = step.params_with_grad[missing[0]]
                raise RuntimeError(
                    f"parameter '{missing[0]}' received a gradient but its module '{owner.name}' "
                    f"({type(owner.module).__name__}) was not called through its forward in this backward (a parent "
                    "module used the parameter directly?), so its per-sample gradients are unknown. Wrap the "
                    "computation in a module that owns the parameter, or freeze it"
                    + (". It was read whole in code that torch.compile traces (DeBERTa's relative-position "
                       "table), where the tracker cannot follow it (it does without compile): track the model "
                       "uncompiled, or exclude the module that reads it from compilation "
                       "(module.forward = torch.compiler.disable(module.forward))"
                       if owner.name in self._tables_read_in_compiled_code else ""))
            if not step.per_layer and not step.grad_ids:
                return  # it formed no tracked parameter's gradient (an input's only): no step to report
            self._last = self._close_record(step)
            self._uncollected += 1
            self._last_plans.update(step.plans)
        except Exception as err:  # noqa: BLE001 - re-raised at collect(), where the user looks
            self._error = err
        finally:
            for owner in self._owners:
                owner.forward_calls = owner.covered_calls = 0
            for tie in self._ties:
                tie.embedding_calls.clear()

    def _drop_unformed(self, step: _Backward) -> None:
        """Leave out the modules none of whose parameters got a gradient in this backward: a backward
        that forms only some gradients (``loss.backward(inputs=[...])``, ``torch.autograd.grad`` of
        some parameters, or of the input only: an attack's step) goes through modules whose output
        grads it needs but whose parameters' gradients it does not form. A module some of whose
        parameters got one and others not is refused (its norms are computed for its parameters
        together), except on the generic route, where a parameter without a gradient is one the call
        did not use (its part is zero)."""
        if len(step.grad_ids) == self._n_tracked:  # (every gradient formed: the usual backward)
            return
        for owner in self._owners:
            if owner.name not in step.per_layer or id(owner) not in step.contributed:
                continue
            got = [name for name, p in owner.tracked.items() if id(p) in step.grad_ids]
            if len(got) == len(owner.tracked):
                continue
            if got and owner.rule is not GENERIC:
                missing = [name for name in owner.tracked if name not in got]
                raise RuntimeError(
                    f"module '{owner.name}' ({type(owner.module).__name__}): this backward formed the gradient of "
                    f"{got} but not of {missing} (backward(inputs=...) or torch.autograd.grad with part of its "
                    "parameters). Its per-sample norms are computed for its parameters together: ask for all of a "
                    "module's parameters or none of them")
            if not got:
                step.per_layer.pop(owner.name, None)
                if owner.tie is not None:
                    step.per_layer.pop(owner.tie.key, None)

    def _close_record(self, step: _Backward) -> GradNormStats:
        B = step.batch_size
        if B is None:
            raise RuntimeError("the last backward reached no tracked layer through its outputs (is the loss "
                               "computed from the model's output, outside torch.no_grad()?)")
        shape = self._model_input_shape or ()
        merged = next((k for k in range(2, len(shape) + 1) if math.prod(shape[:k]) == B), None)
        if merged is not None and shape[0] < B:
            # Every layer saw the input's leading dims merged (a multiple-choice head: [B, C, T] ->
            # [B*C, T] before the embeddings), untraced: each row would be taken for a sample, silently.
            raise ValueError(
                f"the tracked model's input has shape {list(shape)}, but every tracked layer in this backward saw "
                f"{B} = {' x '.join(map(str, shape[:merged]))} rows: the model merges its input's leading dims into "
                "the batch before any tracked layer (as a multiple-choice head does: [B, C, T] -> [B*C, T]) in a "
                "way the tracker cannot trace to the input (merged ids that are the input's own memory, "
                "input_ids.view(-1, T), are followed; a copy, or ids computed from them, are not). Each row would "
                f"be taken for a sample: its norms would be per row, not per sample of the input, and "
                f"loss_reduction='mean' would be scaled for {B} samples. Look the merged ids up directly, or, for "
                "per-row norms, merge the dims yourself before calling the model (each row is then a sample, and "
                "the loss's reduction must count rows).")
        c = 1.0 / B if self.loss_reduction == "mean" else (1.0 if self.loss_reduction == "sum"
                                                            else float(self.loss_reduction))
        inv_c2 = 1.0 / (c * c)
        # One product for every layer (a step on a GPU is bound by launches), then views per layer.
        layers = torch.stack(list(step.per_layer.values())) * inv_c2
        per_layer = dict(zip(step.per_layer, layers.unbind(0)))
        per_sample = layers.sum(dim=0)
        if not self.track_batch_grad:
            batch_sq = None
        else:
            batch_sq = step.batch_grad_sq.total()
            batch_sq = (batch_sq if batch_sq is not None else per_sample.new_zeros(())) * inv_c2
        unaccounted = None
        if step.verify:
            unaccounted = {entry.owner.name: entry.relative for entry in step.verified.values() if entry.compared}
        return GradNormStats(per_sample, batch_sq, per_layer, B, c, unaccounted=unaccounted)


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors among the leaves of ``tree`` (a module's output, its ``(args, kwargs)``), in
    ``tree_flatten`` order; a lone tensor or a ``((x,), {})`` call skips the flattening, which for
    a small layer costs as much as the rest of its forward hook."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if (isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[1], dict) and not tree[1]
            and isinstance(tree[0], tuple) and len(tree[0]) == 1 and isinstance(tree[0][0], torch.Tensor)):
        return [tree[0][0]]
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _shape_key(ctx) -> tuple:
    key = getattr(ctx, "shape_key", None)
    if key is not None:
        return key
    if isinstance(ctx, tuple):
        tensor = ctx[0]
    else:
        leaves = getattr(ctx, "leaves", [ctx])
        if not leaves:  # a generic-route call without inputs (its samples come from a watcher)
            return (ctx.batch_size, *(tuple(shape) for shape, _ in ctx.outputs))
        tensor = leaves[0]
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else (id(ctx),)


def _separate_outputs(output, args, kwargs, budget: int = 4096):
    """``output`` with a clone in place of each tensor the forward also used to compute another
    output (a MoE router returns its logits and the top-k scores computed from them), or None
    where no output is such an intermediate.

    A gradient hook on such a tensor receives the gradient of its uses inside the module too, which
    the generic route's replay (vjp of every output) would count a second time. The clone is what
    the caller uses, so its gradient is the outside uses' alone. The module's internal graph is
    searched from the outputs back to its inputs (at most ``budget`` nodes; beyond that every
    output is cloned: always correct, only a copy more).
    """
    flat, spec = tree_flatten(output)
    outputs = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    edges = {(flat[i].grad_fn, flat[i].output_nr): i for i in outputs}
    stop = {t.grad_fn for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    used_inside: set[int] = set()
    seen, queue = set(), [flat[i].grad_fn for i in outputs]
    while queue and len(used_inside) < len(outputs):
        node = queue.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        if len(seen) > budget:
            used_inside = set(outputs)
            break
        for child, index in node.next_functions:
            if child is None:
                continue
            if (child, index) in edges:
                used_inside.add(edges[(child, index)])
            queue.append(child)
    if not used_inside:
        return None
    flat = [t.clone() if i in used_inside else t for i, t in enumerate(flat)]
    return tree_unflatten(flat, spec)


def _own_product(output: torch.Tensor, args: tuple) -> torch.Tensor | None:
    """The tensor ``output`` is a whole reshape of, where a row-wise layer made it (``F.linear``
    on a ``[B, T, d]`` input returns a view of its 2-D product); else None.

    A gradient hook on the view itself is bypassed once it, or another view of the same product
    (the ``[B*T, p]`` rows a flattened call returns), is modified in place (``y += residual``):
    autograd then sends the gradient straight to the product. A hook on the product gets it
    always, as the gradient of the value the layer returned.
    """
    with torch._C.DisableTorchFunction():  # (a watcher following ``output`` must not see these reads)
        base = output._base
        if (base is None or base.numel() != output.numel() or base.grad_fn is None or output.grad_fn is None
                or not output.grad_fn.next_functions or output.grad_fn.next_functions[0][0] is not base.grad_fn
                or any(base is a for a in args)):
            return None
        return base


def _capturing() -> bool:
    """Whether a forward now is one the tracker captures: gradients on, not a rule's own replay
    (``suspend_capture``), not under a torch.func transform."""
    return not (capture_suspended() or not torch.is_grad_enabled() or _inside_functorch())


def _seen_by_modes(module: nn.Module) -> bool:
    """Whether a torch-function mode entered at ``module``'s pre-hook sees the ops of its forward:
    run eagerly by the tracker (``_EagerForward``), or not in code torch.compile traces."""
    return isinstance(module.__dict__.get("forward"), _EagerForward) or not _called_from_compiled_code()


def _inside_functorch() -> bool:
    # Under torch.func transforms (e.g. a user's own vmap(grad)) the tensors are wrapped
    # per-sample already; capturing them would double count and break the batch dimension.
    return torch._C._functorch.peek_interpreter_stack() is not None


def _sharers(owner: _Owner) -> tuple[_Owner, ...]:
    """The owners whose calls account for ``owner``'s parameters (both modules of a tied weight)."""
    return (owner,) if owner.tie is None else (owner.tie.embedding, owner.tie.linear)


def _called_from_compiled_code() -> bool:
    """Whether a ``torch.compile``d function is on the Python stack (this hook runs eagerly at a
    graph break, but the module's forward after it is traced; a torch-function mode entered here
    would be traced into the graph, which dynamo does not support). False inside a forward the
    tracker runs eagerly (``_EagerForward``), whose code is not traced."""
    if getattr(_EagerForward.depth, "value", 0):
        return False
    try:  # a torch.compile'd module sets this private flag of dynamo's while it runs
        if torch._dynamo.eval_frame._is_in_optimized_module():
            return True
    except (AttributeError, ImportError):  # another torch version: the stack walk below still applies
        pass
    frame = sys._getframe(1)
    while frame is not None:
        # A compiled function's wrapper; "_fn" frames are torch.compiler.disable's (these hooks').
        if _DYNAMO_DIR in frame.f_code.co_filename and frame.f_code.co_name != "_fn":
            return True
        frame = frame.f_back
    return False


_DYNAMO_DIR = os.path.join("torch", "_dynamo", "")


def _compiled_shared_output_hint() -> str:
    return (" It was called under torch.compile with an input shared by all samples (T5's [q, k] "
            "relative-position buckets, a [1, K, d] input to a Linear; an nn.Embedding's [1, T] ids are "
            "expanded to the batch instead): its output is used in compiled code, where the tracker cannot "
            "follow it to the ops that broadcast it over the samples (it does without compile). Give it one "
            "row per sample, exclude the code that uses its output from compilation, or track the model "
            "uncompiled.")


class _EagerForward:
    """A module's forward, run eagerly under ``torch.compile`` (a graph break; without compile, one
    wrapper call).

    For a generic-route module: the recorder that reads how its forward uses its parameters is a
    torch-function mode, which sees nothing of a traced forward (the call would be replayed per
    sample). For the block that calls mixture-of-experts experts: the rows' samples are read from
    the autograd graph of its flattening and routing, which a compiled forward would hide. The code
    around the module stays compiled. Installed on the instance; ``restore`` puts back what was there."""

    depth = threading.local()  # eager forwards in progress on this thread (see _called_from_compiled_code)

    def __init__(self, module: nn.Module):
        self.module_ref = weakref.ref(module)
        self.own = module.__dict__.get("forward")  # an instance's own forward (e.g. a wrapper's), if any
        self.forward = module.forward

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        _EagerForward.depth.value = getattr(_EagerForward.depth, "value", 0) + 1
        try:
            return self.forward(*args, **kwargs)
        finally:
            _EagerForward.depth.value -= 1

    def restore(self) -> None:
        module = self.module_ref()
        if module is None or module.__dict__.get("forward") is not self:
            return
        if self.own is None:
            del module.forward
        else:
            module.forward = self.own




def _run_pre_hooks(hooks: list[tuple[Callable, bool]], module: nn.Module, args: tuple, kwargs: dict):
    """Run forward pre-hooks ``(hook, with_kwargs)`` in order as ``nn.Module`` would, each seeing the
    arguments the previous one returned; the final ``(args, kwargs)``, or None if none changed them."""
    changed = False
    for hook, with_kwargs in list(hooks):
        if with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
                changed = True
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
                changed = True
    return (args, kwargs) if changed else None


def _enter_forward(owner: _Owner, module, args) -> None:
    owner.in_forward += 1


def _leave_forward(owner: _Owner, module, args, output) -> None:
    owner.in_forward = max(0, owner.in_forward - 1)


def _any_in_forward(owners: tuple) -> bool:
    return any(o.in_forward for o in owners)


def _relative_name(parent: str, name: str) -> str:
    """``name`` (a module path) relative to its ancestor ``parent``."""
    return name[len(parent) + 1:] if parent else name


def _parametrization_state(module: nn.Module) -> list[tuple[torch.Tensor, int]] | None:
    """``(buffer, version)`` of each buffer of ``module``'s parametrizations (or of the module itself,
    where a pre-hook computes its weight: the hook-based ``spectral_norm``'s ``weight_u``), or None:
    a forward that changes one (a power iteration in training mode) computes a tensor that no
    replay computes again."""
    if parametrize.is_parametrized(module):
        return [(b, b._version) for b in module.parametrizations.buffers()]
    if _weight_from_pre_hook(module):
        return [(b, b._version) for b in module.buffers(recurse=False)]
    return None


@contextlib.contextmanager
def _as_forwarded(step: _Backward, owner: _Owner):
    """The owner's parameters that changed in place after their gradient was formed (an optimizer
    step in the backward) hold the values the forward used, for the rule that accounts its calls
    now; their new values are put back after."""
    changed = [(p, old) for p, old, version in (step.snapshots.get(id(p), (None,) * 3) for p in owner.tracked.values())
               if p is not None and p._version != version]
    if not changed:
        yield
        return
    new = [p.detach().clone() for p, _ in changed]
    with torch.no_grad():
        for p, old in changed:
            p.copy_(old)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), value in zip(changed, new):
                p.copy_(value)


def _first_hook(param: torch.Tensor, hook) -> "torch.utils.hooks.RemovableHandle":
    """``param.register_hook(hook)``, run before the hooks registered on ``param`` earlier: a
    user's hook that changes the gradient (``p.register_hook(lambda g: g * mask)`` to train some
    rows only, a clip) must not change what the tracker reads, since the rules' per-sample
    gradients, read from layer inputs and output grads, are the loss's own (as torch.func's and
    Opacus' are); the batch-gradient norm and the accounting check read the same. Tensor hooks have
    no ``prepend``: autograd calls them in the order of ``_backward_hooks``' underlying dict
    (insertion order; ``OrderedDict.move_to_end`` does not change it), so the dict is refilled."""
    handle = param.register_hook(hook)
    hooks = param._backward_hooks
    if isinstance(hooks, dict) and len(hooks) > 1:
        earlier = [(key, h) for key, h in hooks.items() if key != handle.id]
        hooks.clear()
        hooks[handle.id] = hook
        hooks.update(earlier)
    return handle


def _weight_from_pre_hook(module: nn.Module) -> bool:
    """Whether a forward pre-hook computes one of the module's weights from its parameters before
    each forward: ``torch.nn.utils.prune`` (``weight = weight_orig * weight_mask``), the hook-based
    ``torch.nn.utils.weight_norm`` (``weight = g * v / ||v||``, HiFi-GAN's and WaveNet's vocoders)
    and ``spectral_norm`` (``weight = weight_orig / sigma``, GAN discriminators). The weight is then
    a plain tensor and the parameters are ``weight_orig``/``weight_g``, ``weight_v``, which no layer
    rule knows (``rule_for``: the generic route); its recorder must see the hook's ops."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return any(isinstance(hook, (BasePruningMethod, WeightNorm, SpectralNorm))
               for hook in module._forward_pre_hooks.values())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _attribute(module: nn.Module, name: str):
    """``module``'s attribute at the dotted ``name`` (a parameter, or what replaced it), or None."""
    for part in name.split("."):
        module = getattr(module, part, None)
    return module


#: ``self.<name>.weight`` or ``.bias`` read as a tensor in a module's code: not assigned (``self.x.weight =``),
#: nor only asked its dtype, device or shape.
_CHILD_PARAMETER_READ = re.compile(
    r"(?<!isinstance\()self\.([A-Za-z_]\w*)\.(?:weight|bias)\b(?!\s*=(?!=))"
    r"(?!\.(?:dtype|device|shape|size|ndim|dim|numel|requires_grad|is_\w+|data_ptr|data|grad)\b)")
#: ``self.<path>.weight`` (``self.weight``: path "") as a product's matrix in a module's code
#: (``F.linear(x, self.<path>.weight``, ``@ self.<path>.weight``, ``matmul(`` or ``einsum(`` with it, or it
#: transposed: ``.t()``, ``.T``, ``.mT``, ``.transpose(``): an Embedding's table applied as the output layer
#: (see ``tied.TableProducts``). Read with ``_weight_products``.
_WEIGHT_PRODUCT = re.compile(
    r"(?:(?:linear|matmul|einsum)\(.*?,\s*|@\s*)self\.((?:[A-Za-z_]\w*\.)*)weight\b"
    r"|self\.((?:[A-Za-z_]\w*\.)*)weight\.(?:t\(\)|T\b|mT\b|transpose\()")
#: ``self.<name>.<method>(``: a submodule's own method called in place of its forward (JetMoE's attention
#: calls its experts' ``map`` and ``reduce``, which add their bias).
_CHILD_METHOD_CALL = re.compile(r"self\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\s*\(")
#: ``self.<method>(``: a method of the module's own, which its forward may compute with.
_OWN_METHOD_CALL = re.compile(r"self\.([A-Za-z_]\w*)\s*\(")


def _weight_products(source: str) -> set[str]:
    """The dotted paths (without ``.weight``; "" for the module's own) that ``_WEIGHT_PRODUCT`` finds."""
    return {(m.group(1) if m.group(1) is not None else m.group(2)).rstrip(".") for m in _WEIGHT_PRODUCT.finditer(source)}


def _method_outside_torch(cls: type, name: str):
    """The function ``name`` of ``cls`` or of its first base that defines it, unless that is
    torch's (``nn.Module``'s own methods) or not a plain function; else None."""
    for klass in cls.__mro__:
        if name in vars(klass):
            fn = vars(klass)[name]
            return fn if inspect.isfunction(fn) and not klass.__module__.startswith("torch.") else None
    return None


@functools.lru_cache(maxsize=None)
def _children_read_in_code(cls: type) -> tuple[frozenset, frozenset, frozenset]:
    """What the forward of ``cls``, and the methods of its own it calls (``self.slow_forward(...)``,
    to a few levels), do with submodules besides calling them: the names whose weight or bias they
    read, the ``(name, method)`` pairs they call, and the dotted paths whose weight they apply as a
    product's matrix (``_WEIGHT_PRODUCT``). Empty where the source is not available."""
    reads: set[str] = set()
    calls: set[tuple[str, str]] = set()
    products: set[str] = set()
    seen, todo = set(), ["forward"]
    while todo and len(seen) < 16:
        name = todo.pop()
        fn = _method_outside_torch(cls, name)
        if name in seen or fn is None:
            continue
        seen.add(name)
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        reads.update(_CHILD_PARAMETER_READ.findall(source))
        calls.update(_CHILD_METHOD_CALL.findall(source))
        products.update(_weight_products(source))
        todo.extend(m for m in _OWN_METHOD_CALL.findall(source) if m not in seen)
    return frozenset(reads), frozenset(calls), frozenset(products)


def _products_in_instance_functions(module: nn.Module) -> frozenset:
    """``_WEIGHT_PRODUCT``'s paths in the source of functions held by the module instance itself,
    which its forward calls as ``self.<name>(...)`` (x-transformers' tied output layer, made in
    ``__init__``: ``self.to_logits = lambda t: t @ self.token_emb.emb.weight.t()``, ``self`` being
    the module)."""
    paths: set[str] = set()
    for value in vars(module).values():
        if inspect.isfunction(value):
            try:
                source = inspect.getsource(value)
            except (OSError, TypeError):
                continue
            paths.update(_weight_products(source))
    return frozenset(paths)


def _product_paths(module: nn.Module) -> frozenset:
    """Where ``module``'s code applies a weight as a product's matrix (see ``_WEIGHT_PRODUCT``)."""
    return _children_read_in_code(type(module))[2] | _products_in_instance_functions(module)


def _own_method(module: nn.Module, method: str) -> bool:
    """Whether ``method`` is one of ``module``'s own (defined outside torch), other than forward."""
    return method != "forward" and _method_outside_torch(type(module), method) is not None


def _children_used_directly(module: nn.Module) -> set[str]:
    """The submodules with trainable parameters that ``module``'s forward uses other than by calling
    them: reads their weight or bias (passing it to a function), or calls a method of their own.
    Read from the source; a use it misses is refused by the backward's check."""
    reads, calls, _ = _children_read_in_code(type(module))
    children = module._modules
    # A layer with a rule whose weight is read (an Embedding's table read whole is followed as a
    # shared output instead: DeBERTa's relative positions), or a module with trainable parameters
    # of its own whose own method is called (its parameters then used in that method).
    read = {name for name in reads if isinstance(children.get(name), nn.Module)
            and any(p.requires_grad for p in children[name].parameters())
            and not isinstance(rule_for(children[name]), (type(None), EmbeddingRule))}
    called = {name for name, method in calls if isinstance(children.get(name), nn.Module)
              and any(p is not None and p.requires_grad for p in children[name]._parameters.values())
              and _own_method(children[name], method)}
    return read | called


def _assign_owners(model: nn.Module, batch_first: bool = True) -> tuple[list[_Owner], list[TiedEmbeddingLinear]]:
    """Decide which rule accounts for each trainable parameter; pair an Embedding weight tied to
    a Linear weight, refuse any other parameter shared by two modules. Each owner's layout
    (``sequences_first``) is the tracker's ``batch_first``, unless the nearest PyTorch transformer
    module around it says otherwise (an ``nn.TransformerEncoder`` built with the default
    ``batch_first=False`` inside a model that takes ``[B, T]`` inputs and transposes around it).
    (Only those: another module's ``batch_first`` says how it takes its own inputs, not how the
    layers inside it do; a model may keep its RNN's setting there and feed its head batch first.)"""
    owners: list[_Owner] = []
    visited: set[int] = set()
    layouts: list[bool] = [batch_first]  # the enclosing modules' layouts, innermost last

    def visit(module: nn.Module, name: str) -> None:
        declared = declared_batch_first(module) if isinstance(module, TRANSFORMER_MODULES) else None
        layouts.append(layouts[-1] if declared is None else declared)
        first = len(owners)
        try:
            _visit(module, name)
        finally:
            layouts.pop()
        for owner in owners[first:]:
            if owner.module is module:
                # (a module's own declaration is its rule's business: MultiheadAttention and the RNNs
                # read their batch_first themselves, the generic route reads it too)
                owner.sequences_first = not layouts[-1]

    def _visit(module: nn.Module, name: str) -> None:
        if id(module) in visited:  # the same module under two names: its calls are combined
            return
        visited.add(id(module))
        rule = rule_for(module)
        if rule is not None and getattr(rule, "owns_children", False):
            # The rule's module uses its children's parameters itself (MultiheadAttention's out_proj).
            subtree = {n: p for n, p in module.named_parameters() if p.requires_grad}
            if subtree:
                owners.append(_Owner(name, module, rule, subtree))
            visited.update(id(m) for m in module.modules())
            return
        # A parameter registered here and again on a submodule (Hugging Face's BERT head sets
        # `self.decoder.bias = self.bias`) is the submodule's: it is the one that uses it.
        below = {id(p) for child in module.children() for p in child.parameters()}
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in below}
        if parametrize.is_parametrized(module):
            # weight_norm, orthogonal, a user's parametrization: the module uses g(original), which
            # its ParametrizationList computes on each access (no batched input of its own). The
            # originals are the module's; the generic route replays its forward per sample, which
            # computes g again (the tracker refuses a g that changes state, spectral_norm's power
            # iteration in training mode: see _on_forward).
            visited.update(id(m) for m in module.parametrizations.modules())
            own.update({f"parametrizations.{n}": p for n, p in module.parametrizations.named_parameters()
                        if p.requires_grad})
            rule = None  # the generic route below
        if rule is not None:
            if own:
                owners.append(_Owner(name, module, rule, own))
        elif own and isinstance(module, nn.MultiheadAttention):  # e.g. add_bias_kv: uses out_proj directly
            subtree = {n: p for n, p in module.named_parameters() if p.requires_grad}
            owners.append(_Owner(name, module, GENERIC, subtree))
            visited.update(id(m) for m in module.modules())
            return
        elif own or (rule is None and _children_used_directly(module)):
            # Its own parameters only: the modules inside keep their rules (a ConvNeXt block's
            # layer-scale parameter must not send its convolutions and Linears to this route). Also a
            # module without parameters of its own whose code reads a submodule's weight or bias
            # (a linear-attention layer's ``causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), ...)``):
            # its calls account for the submodules they did not call, as inner owners (otherwise refused).
            generic = _Owner(name, module, GENERIC, own)
            owners.append(generic)
            first_inner = len(owners)
            for child_name, child in module.named_children():
                visit(child, _join(name, child_name))
            generic.descendants = owners[first_inner:]
            if not own:  # (only the submodules it uses directly: its calls account for nothing else)
                used = [_join(name, child) for child in _children_used_directly(module)]
                generic.descendants = [o for o in generic.descendants
                                       if any(o.name == u or o.name.startswith(u + ".") for u in used)]
            return
        for child_name, child in module.named_children():
            visit(child, _join(name, child_name))

    visit(model, "")
    for owner in owners:
        _check_trackable(owner)
    sharers: dict[int, list[tuple[_Owner, str]]] = {}
    for owner in owners:
        for pname, p in owner.tracked.items():
            sharers.setdefault(id(p), []).append((owner, pname))
    ties: list[TiedEmbeddingLinear] = []
    merged: set[int] = set()
    for group in sharers.values():
        if len(group) > 1:
            tie = _shared_embedding(group, merged)
            if tie is not None:
                ties.append(tie)
    owners = [owner for owner in owners if id(owner) not in merged]
    _add_output_products(model, owners, ties)
    for owner in owners:
        # A tied or shared embedding weight is accounted for only through its modules' own calls (the
        # cross term pairs them), so a generic caller never covers it; ties are known only now.
        owner.descendants = [inner for inner in owner.descendants
                             if inner.tie is None and not inner.aliases and id(inner) not in merged]
    return owners, ties


def _add_output_products(model: nn.Module, owners: list[_Owner], ties: list[TiedEmbeddingLinear]) -> None:
    """An Embedding whose weight a module's code applies itself as a product's matrix (its output
    layer: ``F.linear(h, self.wte.weight)``, ``h @ self.wte.weight.t()``; or the weight registered
    on the module as its own, as fairseq's RoBERTa head does, ``F.linear(x, self.weight)``, see
    ``_shared_embedding``) gets an owner for those products: an ``nn.Linear`` outside the model
    sharing the weight (``tied.output_layer``), tied to the Embedding as a tied output layer is,
    named ``<embedding>@<module>`` (``@model`` for the tracked model itself). One per Embedding,
    and none for one already tied to a Linear: any other use is refused by the backward's check."""
    embeddings = {id(owner.module.weight): owner for owner in owners
                  if isinstance(owner.rule, EmbeddingRule) and isinstance(owner.module, nn.Embedding)
                  and owner.tie is None and owner.tracked.get("weight") is owner.module.weight}
    if not embeddings:
        return
    for name, module in model.named_modules():
        for path in _product_paths(module):
            embedding = embeddings.get(id(_attribute(module, f"{path}.weight" if path else "weight")))
            if embedding is None or embedding.tie is not None:
                continue
            layer = output_layer(embedding.module.weight)
            products = _Owner(f"{embedding.name}@{name or 'model'}", layer, rule_for(layer), {"weight": layer.weight},
                              sequences_first=embedding.sequences_first, product_in=module)
            tie = TiedEmbeddingLinear(embedding, products, f"{embedding.name}+{products.name}")
            embedding.tie = products.tie = tie
            owners.append(products)
            ties.append(tie)


def _scripted(where: str) -> str:
    return (f"{where} is a TorchScript module (torch.jit.script or torch.jit.trace): it runs no Python hooks, so "
            "per-sample gradients cannot be read from it. Create the GradNormTracker on the eager module and train "
            "that one (torch.compile is supported)")


def _check_trackable(owner: _Owner) -> None:
    """Refuse, before any hook is registered, what the rules cannot compute: a TorchScript module
    (it runs no Python hooks) and complex parameters (each rule squares real gradients; a complex
    one's norm needs conjugates no rule takes)."""
    where = f"module '{owner.name}' ({type(owner.module).__name__})" if owner.name else "the model"
    if isinstance(owner.module, torch.jit.ScriptModule):
        raise ValueError(_scripted(where) + ", or freeze the scripted module's parameters")
    for name, p in owner.tracked.items():
        if p.is_complex():
            raise ValueError(
                f"parameter '{_join(owner.name, name)}' of {where} is complex ({p.dtype}): divebatch computes per-sample "
                "norms of real parameters only. Hold it as a real parameter of shape [..., 2] and take "
                "torch.view_as_complex(p) in the forward (its gradient is then real), or freeze this one")


def _shared_embedding(group: list[tuple[_Owner, str]], merged: set[int]) -> TiedEmbeddingLinear | None:
    """One weight shared by several owners: Embedding weights become one owner (the first; the
    others' modules are its ``aliases``, whose ids go into ``merged``), tied to at most one Linear
    weight (the returned tie); anything else is refused."""
    embeddings = [owner for owner, pname in group if isinstance(owner.rule, EmbeddingRule) and pname == "weight"]
    linears = [owner for owner, pname in group if type(owner.rule) is LinearRule and pname == "weight"]
    # A module holding the table as its own ``weight`` and applying it as a product in its code
    # (fairseq's RoBERTa head: ``F.linear(x, self.weight) + self.bias``): the products become the
    # output layer's calls (``_add_output_products``), its other parameters stay its own.
    products = [owner for owner, pname in group if owner.rule is GENERIC and pname == "weight"
                and "" in _product_paths(owner.module)]
    outputs = linears + products
    if not embeddings or len(outputs) > 1 or len(embeddings) + len(outputs) != len(group):
        # Name a module that cannot join (or the second Linear) and the first other one.
        allowed = {id(owner) for owner in embeddings + outputs[:1]}
        owner, pname = next(((o, n) for o, n in group[1:] if id(o) not in allowed), group[1])
        first, first_pname = next((o, n) for o, n in group if o is not owner)
        raise ValueError(
            f"parameter '{_join(owner.name, pname)}' is the same tensor as '{_join(first.name, first_pname)}' "
            "(tied weights across modules); its per-sample gradient mixes the modules' parts, which divebatch "
            "combines exactly only for nn.Embedding weights shared with each other and with at most one "
            "nn.Linear weight (a language model's input and output embeddings), or one module applying it as "
            "its own weight in a product (`F.linear(x, self.weight)`). Untie the weights, freeze them "
            "(requires_grad=False), or track a wrapper module that owns all the uses")
    primary = embeddings[0]
    for other in embeddings[1:]:
        primary.aliases.append(other.module)
        merged.add(id(other))
    for owner in products:
        del owner.tracked["weight"]  # (the Embedding's now; its products are the output layer's calls)
        if not owner.tracked and not owner.descendants:
            merged.add(id(owner))
    if not linears:
        return None
    tie = TiedEmbeddingLinear(primary, linears[0], f"{primary.name}+{linears[0].name}")
    primary.tie = linears[0].tie = tie
    return tie
