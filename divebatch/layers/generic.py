"""The exact generic route: per-sample gradients of one module's own parameters, without a rule.

Any module that owns trainable parameters and has no dedicated rule (a user's custom module, a
Linear subclass with extra parameters, an ``nn.LSTM`` subclass with its own forward, a ViT's class token and position table on the
model itself) is handled here, for its *own* parameters: the modules inside it keep their rules,
except those a call does not call (their parameters are then covered by that call).

Three ways, chosen per call:

* broadcast uses: while the forward runs, a torch-function mode records every op that uses one of
  the module's own parameters. If each is ``expand``, ``+``, ``-`` or ``*`` broadcasting the
  parameter over the samples (dim 0), a sample's gradient is ``sum_to_size`` of that op's output
  grad (times the other factor, for ``*``) over the sample's slice: no replay at all. Views and
  dtype casts of a parameter, and a Python number added to or multiplying it (``1.0 + w``), count
  as the parameter; ``F.layer_norm``/``F.group_norm``/``F.rms_norm`` with its weight and bias are
  computed as ``norm(x) * w + b`` so that both become such uses.
* products with rows: a weight of the module applied to rows of its input (a mixture of experts'
  ``F.linear(x[idx], W[e])`` or ``torch._grouped_mm``, a router's ``F.linear(rows, self.weight)``,
  ``x @ self.weight``) is recorded with the rows and the sample each came from, followed through
  the forward from the module's first input (``experts.py``); the per-sample norms come from each
  (expert, sample) group's rows through the linear routes.
* replay: otherwise, ``vmap`` over samples of ``vjp`` of the module alone
  (``torch.func.functional_call``), from its captured inputs and output grads. This is exact
  whenever the module treats samples independently; randomness (dropout in training mode) is
  refused, by ``vmap(randomness="error")`` or a changed CPU RNG state, with a clear message, since
  the forward's mask cannot be replayed. Per-sample gradients are formed a bounded number of
  samples at a time; where an op has no batching rule, one sample at a time. Recurrent layers'
  hidden states (a recurrent layer with its own forward) carry samples in dim 1.

Every way, the tracker's accounting check (``verify_every``) compares the summed per-sample
gradients with autograd's, so a use the recorder cannot see is refused, not missed. (Which
sample a product's row belongs to is not something that sum can check: ``experts.py`` only
labels rows through ops whose effect on rows it knows.)

``SharedOutputWatcher`` (used by the tracker for any rule's module) follows an output that is one
value for all samples, e.g. a position table looked up with ``[1, T]`` ids, to the ops that
broadcast it over the batch, where its per-sample gradients can still be read.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .base import METADATA_READS, PerSampleGradsRule, RoutePlan, RuleError, per_sample_sq_sum, suspend_capture
from .conv import _FusedConv, conv_weight_grads
from .experts import _MATMULS, ExpertUses, rows_grad_sum, rows_norms, rows_per_sample
from .linear import fused_linear
from .routes import MAX_EXTRA_BYTES, max_extra_bytes
from .rows import flattened_samples
from .standardised import CONV_DIMS, StandardisedWeight, conv_arguments, standardised_product


@dataclass
class GenericCall:
    """What the generic route keeps of one forward call."""

    leaves: list            # flattened (args, kwargs); tensors detached
    spec: Any               # pytree spec of (args, kwargs)
    in_dims: list[int | None]  # the batch dimension of each leaf (None: shared by all samples)
    batch_size: int
    outputs: list[tuple[torch.Size, torch.dtype]]  # shape/dtype of each output that needs a grad
    output_index: list[int]  # their positions among the flattened outputs
    out_dims: list[int]      # the batch dimension of each of those outputs
    extra_params: tuple = ()  # names of inner modules' parameters this call accounts for (tracker)
    extra_owners: tuple = ()  # the tracker's owners of those inner modules
    direct_uses: list | None = None  # the module's own parameters' uses, when all were understood
    # A call with no batched input whose every output was computed from its parameters alone (Swin's
    # relative-position bias, a lookup in its own table): those outputs' ``ComputedUse``s, in order.
    computed_outputs: list | None = None
    # Samples and tokens flattened into rows: the merged leading sizes (B, T, ...) of the batched
    # leaves and outputs, which are kept as [B, T, ..., *rest] (see GenericRule.as_rows).
    rows: tuple[int, ...] | None = None
    # The batch of the inputs, where no output has it (batch_size is then an output's), or where the
    # first input's rows are samples' rows in another order (``input_samples``: each row's sample).
    input_batch: int | None = None
    input_samples: torch.Tensor | None = None
    # Set by GenericRule.norms: some standardised product's norms came in closed form (for plan).
    standardised: bool = False
    # (device type, dtype) of the autocast the forward ran under: a replay runs under it too, so its
    # ops get the forward's dtypes (a bfloat16 input meets float32 parameters otherwise)
    autocast: tuple | None = None
    # Its outputs that need a grad (detached) and their versions then, which each sample's replay
    # must give again (_check_replayed); None where the call is not replayed (the tracker drops them).
    expected_outputs: list | None = None
    # It was given a key/value or state cache, which its replays leave out (see GenericRule.capture).
    cache_left_out: bool = False
    # The dim of its inputs and outputs that holds the samples, where the tracker placed it (a
    # [T, B, ...] input proven so from the graph); None: the module's own (GenericRule.batch_dim).
    batch_dim: int | None = None
    # Per leaf, the rows each sample has in its batch dim: 1, or k for a [B*k, ...] tensor merged
    # from [B, k, ...] (WavLM's position bias, passed from layer to layer as [B*H, T, T]).
    in_spans: list | None = None


@dataclass(eq=False)
class DirectUse:
    """One op of a generic-route module's forward that uses one of its own parameters, broadcast
    over the samples: ``expand``, ``+``, ``-`` or ``*`` with a batched tensor (a functional
    normalisation's affine part counts as ``*`` and ``+``), or a lookup ``F.embedding(ids, w)``
    with per-sample ids (a learned position table in an ``nn.Embedding`` subclass's own forward, as
    OPT's and BART's). The gradient of its output (``sink``, set by the tracker) gives the
    parameter's per-sample gradient for this use with no replay: ``sum_to_size(sign * G_out [*
    other])`` per sample, reshaped to the parameter's shape; for a lookup, the rows of ``G_out``
    added at each sample's ids."""

    name: str
    kind: str                 # "expand", "add", "mul", "embedding" or "rows"
    sign: float               # -1 for the subtrahend of a subtraction
    other: Any                # the other factor of a product (detached tensor or number); for
                              # "embedding", (indices, padding_idx or None); for "rows", the
                              # experts.RowProduct
    out_shape: torch.Size
    param_shape: torch.Size   # the operand's shape: the parameter's, or a view of it with singleton dims
    sink: Any = None
    # For an operand that is an elementwise function of the parameter (``-exp(A_log)``, Mamba's):
    # the derivative, in the parameter's shape, that each per-sample gradient is multiplied by.
    factor: torch.Tensor | None = None
    # For an operand computed from the parameters (``param_shape`` is then its shape): the ops that
    # take its per-sample gradients back to theirs.
    computed: "ComputedUse | None" = None


_DIRECT_KINDS = {
    torch.Tensor.expand: "expand",
    torch.add: "add", torch.Tensor.add: "add", torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add",
    torch.sub: "sub", torch.Tensor.sub: "sub", torch.Tensor.__sub__: "sub", torch.Tensor.__rsub__: "rsub",
    torch.mul: "mul", torch.Tensor.mul: "mul", torch.Tensor.__mul__: "mul", torch.Tensor.__rmul__: "mul",
}

# Ops that give the same values as their input with singleton dims added or removed, or in another
# dtype (``w[:, None, None]``, ``w.view(1, -1, 1, 1)``, ``w.to(x.dtype)``): their result is
# treated as the parameter itself, with its own shape.
_ALIAS_OPS = {
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.view_as, torch.Tensor.reshape_as,
    torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.__getitem__,
    torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double,
    torch.Tensor.type_as, torch.Tensor.type,
}

# Of _ALIAS_OPS, those whose second argument only gives a shape or dtype.
_LIKE_OPS = {torch.Tensor.view_as, torch.Tensor.reshape_as, torch.Tensor.type_as}

# Of _ALIAS_OPS, those whose output may have any shape of the same numel, in the same row-major order.
_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.view_as, torch.Tensor.reshape_as}


def _keeps_order(index) -> bool:
    """Whether ``t[index]`` only adds, removes or keeps dims (``None``, ``...``, full slices,
    integers): with the numel unchanged, the values in the same order."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or (isinstance(i, int) and not isinstance(i, bool))
               or (isinstance(i, slice) and i == slice(None)) for i in items)


_PERMUTES = {torch.permute, torch.Tensor.permute, torch.transpose, torch.Tensor.transpose}


def _moves_only_singletons(func, x: torch.Tensor, dims) -> bool:
    """Whether ``permute``/``transpose`` of ``x`` keeps its dims of size > 1 in their order (heads
    moved past a dim of 1): its values then stay in the same row-major order."""
    try:
        if func in (torch.transpose, torch.Tensor.transpose):
            d0, d1 = (d % x.dim() for d in dims[:2])
            return x.shape[d0] == 1 or x.shape[d1] == 1
        order = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        kept = [d % x.dim() for d in order if x.shape[d] != 1]
    except (TypeError, ValueError, IndexError):
        return False
    return kept == sorted(kept)


def _out_of_place(func):
    """``func``, or the out-of-place op of an in-place tensor method (``div_`` -> ``div``,
    ``__itruediv__`` -> ``__truediv__``); None for an in-place op without one."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__") and name[3:-2]:
        return getattr(torch.Tensor, f"__{name[3:-2]}__", None)
    if name.endswith("_") and not name.endswith("__"):
        # ``x.relu_()``, and the functional ``torch.relu_`` that ``F.relu(x, inplace=True)`` calls
        for space in (torch.Tensor, torch, F):
            if getattr(space, name, None) is func:
                return getattr(space, name[:-1], None)
    return func


def _softplus_derivative(x, y, beta=1.0, threshold=20.0):
    return torch.where(x * beta > threshold, torch.ones_like(x), torch.sigmoid(x * beta))


def _clamp_derivative(x, y, min=None, max=None):
    """1 where ``clamp`` passed ``x`` through (its bounds included, as autograd's), else 0."""
    kept = torch.ones_like(x, dtype=torch.bool)
    if min is not None:
        kept &= x >= min
    if max is not None:
        kept &= x <= max
    return kept.to(x.dtype)


# Elementwise functions of a parameter (``A = -torch.exp(self.A_log)``): their result is treated as
# the parameter with a factor, the function's derivative at it, given by (input, output, *numbers).
_DERIVATIVES = {
    **dict.fromkeys((torch.exp, torch.Tensor.exp), lambda x, y: y),
    **dict.fromkeys((torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip), _clamp_derivative),
    **dict.fromkeys((torch.clamp_min, torch.Tensor.clamp_min), lambda x, y, min: _clamp_derivative(x, y, min=min)),
    **dict.fromkeys((torch.clamp_max, torch.Tensor.clamp_max), lambda x, y, max: _clamp_derivative(x, y, max=max)),
    **dict.fromkeys((torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid), lambda x, y: y * (1 - y)),
    **dict.fromkeys((torch.tanh, torch.Tensor.tanh, F.tanh), lambda x, y: 1 - y * y),
    **dict.fromkeys((torch.sqrt, torch.Tensor.sqrt), lambda x, y: 0.5 / y),
    **dict.fromkeys((torch.log, torch.Tensor.log), lambda x, y: 1 / x),
    **dict.fromkeys((torch.square, torch.Tensor.square), lambda x, y: 2 * x),
    F.softplus: _softplus_derivative,
}


def _bind_norm(signature_names, defaults):
    def bind(args, kwargs):
        bound = dict(defaults)
        bound.update(zip(signature_names, args))
        bound.update(kwargs)
        return bound if set(bound) <= set(signature_names) and len(args) <= len(signature_names) else None
    return bind


# Functional normalisations whose affine weight and bias are a product and a sum broadcast over the
# samples: ``norm(x) * w + b``. Each entry: how to bind its arguments, and the dimension the
# parameters align with (None: the trailing ``normalized_shape`` dims; 1: channels, as group_norm).
_layer_norm = _bind_norm(("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
_group_norm = _bind_norm(("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
_rms_norm = _bind_norm(("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})
_batch_norm = _bind_norm(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                         {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
_NORMS = {
    F.layer_norm: (_layer_norm, "normalized_shape", None), torch.layer_norm: (_layer_norm, "normalized_shape", None),
    F.group_norm: (_group_norm, "num_groups", 1), torch.group_norm: (_group_norm, "num_groups", 1),
    # timm's BatchNormAct2d (batch norm, activation and dropout in one subclass's forward). In
    # training mode the batch statistics mix the samples: the weight's and bias's "per-sample"
    # gradients are then the decomposition nn.BatchNorm's rule gives (see docs/coverage.md).
    F.batch_norm: (_batch_norm, "input", 1),
}
# Normalisations that update running statistics: run once, never probed for their dtype.
_STATEFUL_NORMS = {F.batch_norm}
# ``input + value * tensor1 * tensor2`` in one op (timm's ResMLP affine, ConvNeXt-V2's global
# response norm: ``torch.addcmul(bias, weight, x)``).
_ADDCMULS = {torch.addcmul, torch.Tensor.addcmul}
# In-place arithmetic with a parameter (NFNets' ``out.mul_(self.skipinit_gain)``).
_IN_PLACE_ARITHMETIC = {torch.Tensor.mul_, torch.Tensor.__imul__, torch.Tensor.add_, torch.Tensor.__iadd__,
                        torch.Tensor.sub_, torch.Tensor.__isub__}

if hasattr(F, "rms_norm"):
    _NORMS[F.rms_norm] = (_rms_norm, "normalized_shape", None)
if hasattr(torch, "rms_norm"):
    _NORMS[torch.rms_norm] = (_rms_norm, "normalized_shape", None)

# Products of a batched input with a weight and bias, sample by sample along dim 0: (argument
# names, defaults after the input and weight).
_CONV_ARGS = (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1))
_PRODUCT_OPS = {F.linear: (("input", "weight", "bias"), (None,)),
                F.conv1d: _CONV_ARGS, F.conv2d: _CONV_ARGS, F.conv3d: _CONV_ARGS}


class WeightRecipe:
    """The ops that computed a product's weight (and bias) from the module's parameters, to run
    again from other values of them (``recipe({name: tensor})`` -> ``(weight, bias)``). It holds the
    forward's tensors by identity, not the recorder (whose uses hold it: no reference cycle)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.leaves: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (name, parameter)
        self.steps: dict[int, tuple] = {}                       # id -> (tensor, func, args, kwargs)

    def __call__(self, values: dict) -> tuple:
        memo: dict = {}
        return (self._value(self.weight, values, memo),
                None if self.bias is None else self._value(self.bias, values, memo))

    def _known(self, a) -> bool:
        if not isinstance(a, torch.Tensor):
            return False
        leaf, step = self.leaves.get(id(a)), self.steps.get(id(a))
        return (leaf is not None and leaf[1] is a) or (step is not None and step[0] is a)

    def _value(self, t: torch.Tensor, values: dict, memo: dict):
        key = id(t)
        if key not in memo:
            leaf = self.leaves.get(key)
            if leaf is not None and leaf[1] is t:
                memo[key] = values[leaf[0]]
            else:
                _, func, args, kwargs = self.steps[key]
                flat, spec = tree_flatten((args, kwargs))
                args, kwargs = tree_unflatten([self._value(a, values, memo) if self._known(a) else a for a in flat],
                                              spec)
                memo[key] = func(*args, **kwargs)
        return memo[key]


@dataclass(eq=False)
class ProductUse:
    """A convolution or ``F.linear`` of a batched input with a weight (and bias) computed from the
    module's own parameters alone: weight standardisation (timm's ``StdConv2d`` and
    ``ScaledStdConv2d``, as NF-ResNets and BiT use them), a weight norm written inline. Sample
    ``b``'s gradients of those parameters are the vjp of that one op on sample ``b`` alone, taken
    back through the ops that computed the weight from the parameters (``replay``), vmapped over
    the samples: the module's other ops are not replayed."""

    func: Any
    x: torch.Tensor                    # the batched input (dim 0: samples), detached
    arguments: list                    # the op's positional arguments after input, weight, bias
    params: dict[str, torch.Tensor]    # the parameters the weight and bias are computed from, detached
    replay: WeightRecipe               # params -> (weight, bias)
    out_dtype: torch.dtype
    # Rows of ``x`` (dim 0) per sample, sample-major (an ``F.linear`` of windows folded into the
    # batch dim, SwinV2's qkv): set by ``usable_direct_uses``.
    group: int = 1
    # The name of a weight that is a parameter itself (not computed), where the recorder ran the op
    # through ``fused_linear``: the sums over samples of its per-sample gradients (``weight_sums``,
    # per slice of samples) become its batch gradient (``take_weight_grad``), so autograd does not
    # compute that GEMM again.
    fused_weight: str | None = None
    weight_sums: dict = field(default_factory=dict)
    # Where the weight is a standardisation of one parameter (``_standardisation``): per-sample
    # norms in closed form, where no other use shares its parameters (``GenericRule.norms``).
    standardised: StandardisedWeight | None = None
    # Run through ``conv._FusedConv`` (``_ConvGradsFromUse``): the standardised weight's gradient
    # from the closed form's per-sample ones (``weight_sums``, set by GenericRule.norms).
    fused_standardised: bool = False

    def per_sample(self, grad: torch.Tensor, samples: slice) -> dict[str, torch.Tensor]:
        """``{name: [samples, *shape]}`` float32."""
        x, g = self.x, grad
        if self.group > 1:  # (F.linear: each row on its own) each sample's rows as one
            x = x.reshape(x.shape[0] // self.group, -1, x.shape[-1])
            g = g.reshape(g.shape[0] // self.group, -1, g.shape[-1])
        # Under autocast the op ran in half precision on a float32 input (its output dtype): the
        # per-sample products run in the wider of the two, as the replay below runs without autocast.
        dtype = torch.promote_types(x.dtype, self.out_dtype)
        x, g = x[samples].to(dtype), g[samples].to(dtype)
        operands = self._operand_grads(x, g)
        if operands is None:  # (a padding given as a string): the op's own vjp, vmapped
            def one(x, g):
                def op(params):
                    weight, bias = self.replay(params)
                    return self.func(x.unsqueeze(0), weight, bias, *self.arguments)
                _, pull = vjp(op, self.params)
                return pull(g.unsqueeze(0))[0]

            grads = vmap(one)(x, g)
        else:
            # Each sample's grads of the weight and bias, taken back through the ops that computed them.
            _, pull = vjp(lambda params: tuple(t for t in self.replay(params) if t is not None), self.params)
            grads = vmap(lambda *parts: pull(parts)[0])(*operands)
        grads = {name: t.float() for name, t in grads.items()}
        if self.fused_weight is not None and self.fused_weight in grads:
            self.weight_sums[(samples.start, samples.stop)] = grads[self.fused_weight].sum(dim=0)
        return grads

    def take_weight_grad(self) -> torch.Tensor | None:
        """The batch gradient of ``fused_weight`` through this op (in its dtype), once per backward,
        where ``per_sample`` saw every sample exactly once since the last call; else None."""
        sums, self.weight_sums = self.weight_sums, {}
        if not sums or sum(stop - start for start, stop in sums) != self.x.shape[0]:
            return None
        return sum(sums.values()).to(self.replay.weight.dtype)

    def _operand_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple | None:
        """Per-sample grads of the op's weight (and bias, if any) ``[B, *shape]``."""
        with_bias = self.replay.bias is not None
        weight_shape = self.replay.weight.shape
        if self.func is F.linear:
            rows_x, rows_g = x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
            weight = torch.bmm(rows_g.transpose(1, 2), rows_x)
            return (weight, rows_g.sum(dim=1)) if with_bias else (weight,)
        n = x.dim() - 2
        stride, padding, dilation, groups = self.arguments
        if isinstance(padding, str):
            return None
        stride, padding, dilation = (tuple(a) if isinstance(a, (tuple, list)) else (a,) * n
                                     for a in (stride, padding, dilation))
        weight = conv_weight_grads(x, g, weight_shape, stride, padding, dilation, groups)
        return (weight, g.sum(dim=tuple(range(2, g.dim())))) if with_bias else (weight,)


def _bind_product(func, args, kwargs) -> dict | None:
    """``{argument name: value}`` of a call of one of ``_PRODUCT_OPS`` (defaults filled in), or
    None for another op or arguments it does not take."""
    spec = _PRODUCT_OPS.get(func)
    if spec is None:
        return None
    names, defaults = spec
    if len(args) > len(names) or set(kwargs) - set(names):
        return None
    bound = dict(zip(names[2:], defaults))
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


_RESHAPES = frozenset({torch.Tensor.reshape, torch.Tensor.reshape_as, torch.Tensor.view, torch.Tensor.view_as,
                       torch.reshape})


def _standardisation(recipe: WeightRecipe) -> StandardisedWeight | None:
    """The weight standardisation ``recipe`` is, if that is all it is (``standardised.py``):
    ``F.batch_norm`` in training mode without running statistics over one parameter ``θ``
    reshaped to ``[1, O, K]``, reshaped back to ``θ``'s shape, with an affine weight and shift
    computed from parameters other than ``θ`` (and each other's), constants, or none; the
    product's bias a parameter of its own, or none. Else None."""
    def step(t, funcs):
        entry = recipe.steps.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry if entry is not None and entry[0] is t and entry[1] in funcs else None

    def leaf(t):
        entry = recipe.leaves.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[0] if entry is not None and entry[1] is t else None

    back = step(recipe.weight, _RESHAPES)
    norm = back and step(back[2][0], {F.batch_norm})
    bound = norm and _batch_norm(norm[2], norm[3])
    if (not bound or bound["training"] is not True or bound["running_mean"] is not None
            or bound["running_var"] is not None):
        return None
    flat = step(bound["input"], _RESHAPES)
    theta_name = flat and leaf(flat[2][0])
    if not theta_name:
        return None
    theta = flat[2][0]
    if (theta.dim() < 2 or theta.dtype not in (torch.float32, torch.float64) or recipe.weight.shape != theta.shape
            or tuple(bound["input"].shape) != (1, theta.shape[0], theta[0].numel())):
        return None
    pulls, used = {}, {theta_name}
    for key in ("weight", "bias"):
        t = bound[key]
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (theta.shape[0],)):
            return None
        if t is None or not recipe._known(t):  # (none, or a constant: a frozen gain)
            pulls[key] = None
            continue
        names = _recipe_sources(recipe, t)
        if names & used:
            return None  # (θ in its own affine weight, or weight and shift sharing a parameter: cross terms)
        used |= names
        pulls[key] = _affine_pull(recipe, t, names)
    bias = None
    if recipe.bias is not None:
        bias = leaf(recipe.bias)
        if bias is None or bias in used:
            return None
    return StandardisedWeight(theta_name, float(bound["eps"]), None if bound["weight"] is None
                              else bound["weight"].detach(), pulls["weight"], pulls["bias"], bias)


def _recipe_sources(recipe: WeightRecipe, t: torch.Tensor) -> set[str]:
    """The names of the parameters ``recipe`` computes ``t`` from. (Not a closure: a recursive one
    is a reference cycle, which would keep the forward's tensors until the cycle collector runs.)"""
    entry = recipe.leaves.get(id(t))
    if entry is not None and entry[1] is t:
        return {entry[0]}
    _, _, args, kwargs = recipe.steps[id(t)]
    return set().union(*(_recipe_sources(recipe, a) for a in tree_flatten((args, kwargs))[0] if recipe._known(a)))


def _affine_pull(recipe: WeightRecipe, t: torch.Tensor, names: set[str]):
    """``[B, *t.shape]`` per-sample gradients of ``t`` -> ``{name: [B, *shape]}`` of the parameters
    ``names`` it was computed from (directly, where ``t`` is one of them)."""
    leaf = recipe.leaves.get(id(t))
    if leaf is not None and leaf[1] is t:
        return lambda grads: {leaf[0]: grads}
    part = WeightRecipe(t, None)
    part.leaves, part.steps = recipe.leaves, recipe.steps
    params = {name: p.detach() for name, p in recipe.leaves.values() if name in names}

    def pull(grads):
        _, back = vjp(lambda p: part(p)[0], params)
        return vmap(lambda g: back(g.to(t.dtype))[0])(grads)
    return pull


class _WeightGradFromUse:
    """The ``sink`` of an ``F.linear`` that a recorder runs through ``fused_linear`` (a parameter
    weight with a computed bias: timm's BEiT and EVA qkv): its backward takes the weight's batch
    gradient from the ``ProductUse``'s per-sample gradients where they were computed before it (the
    call's other uses' grads arrived first, as in the attention), else computes it as autograd does."""

    def __init__(self):
        self.use: ProductUse | None = None

    def __call__(self, x, g) -> tuple:
        return (self.use.take_weight_grad() if self.use is not None else None), None


class _ConvGradsFromUse(_WeightGradFromUse):
    """The ``sink`` of a convolution that a recorder runs through ``conv._FusedConv``, whose weight is
    a standardisation (``DirectUseRecorder._standardised_sink``): its backward takes the weight
    gradient from the per-sample ones where ``GenericRule.norms`` formed them before it (the
    bias's, then, is the output grad's sum), else computes both as autograd does."""

    def __init__(self, func, x, weight, bias, arguments):
        super().__init__()
        self.call = (func, x, weight, bias, arguments)

    def run(self) -> torch.Tensor:
        """The convolution, through ``_FusedConv`` (the same numbers), once."""
        func, x, weight, bias, arguments = self.call
        self.call = None  # (the forward's tensors are not kept past it)
        stride, padding, dilation, groups = conv_arguments(func, arguments)
        layout = SimpleNamespace(stride=stride, dilation=dilation, groups=groups)
        return _FusedConv.apply(x, weight, bias, list(padding), layout, self)

    def __call__(self, x, g) -> tuple:
        weight, _ = super().__call__(x, g)
        if weight is None:
            return None, None
        bias = g.sum(dim=(0, *range(2, g.dim()))) if self.use.replay.bias is not None else None
        return weight, bias


@dataclass(eq=False)
class ComputedUse:
    """A tensor computed from the module's parameters alone (and constants), broadcast over the
    samples by its use: a relative-position bias gathered from its table and added to the
    attention logits (``x + bias``) or given as SDPA's ``attn_mask`` (timm's BEiT and Swin), or
    ``x * t``. Its per-sample gradients are read from the use's output grad as a parameter's are
    (``DirectUse``); the parameters' are their vjp back through the ops that computed it
    (``replay``), vmapped over the samples: the module's other ops are not replayed."""

    params: dict[str, torch.Tensor]    # the parameters it is computed from, detached
    replay: WeightRecipe               # params -> (tensor, None)
    dtype: torch.dtype

    def per_sample(self, grads: torch.Tensor) -> dict[str, torch.Tensor]:
        """``grads``: ``[b, *shape]``, the tensor's per-sample gradients -> ``{name: [b, *shape]}`` float32."""
        _, pull = vjp(lambda params: self.replay(params)[0], self.params)
        return {name: t.float() for name, t in vmap(lambda g: pull(g)[0])(grads.to(self.dtype)).items()}


def _rows_gathered(source: torch.Tensor, flat_index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``source[index]`` (rows of ``source`` at an integer index) as a gather from the flattened
    tensor at ``flat_index``: the same values, and a backward that stays fast under ``vmap``
    (each sample's rows added by one ``index_add`` over a flat tensor, ~7x faster on CPU than the
    row-wise index_put of ``source[index]``'s backward for a table of few columns: timm's
    relative-position tables)."""
    return torch.index_select(source.reshape(-1), 0, flat_index).view(shape)


#: Ops that only rearrange their input's elements: applied to a gather's result, the same op on the
#: gather's index gives an index that gathers the result directly. (Not ``expand``: its index would
#: be as large as the expanded view, which costs nothing.)
_REARRANGES = _PERMUTES | _RESHAPES | {
    torch.Tensor.contiguous, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze,
    torch.Tensor.flatten, torch.flatten, torch.Tensor.t, torch.t}


def _replay_step(out, func, args, kwargs, derived: dict | None = None) -> tuple:
    """The ``(out, func, args, kwargs)`` a ``WeightRecipe`` replays for the op that gave ``out``:
    the op itself, or for a gather of rows ``t[index]`` the same gather as ``_rows_gathered``.

    A rearrangement of a gather's result (``derived``: the steps recorded so far) is folded into
    the gather: timm's relative-position bias, ``table[index].view(N, N, -1).permute(2, 0, 1)``,
    becomes one gather in the permuted order, whose backward under ``vmap`` adds each sample's
    grad into the table as it lies, without first copying it back into the gathered order (a
    ``[B, N*N, heads]`` copy per attention layer)."""
    if func in _REARRANGES and derived is not None and args and isinstance(args[0], torch.Tensor):
        entry = derived.get(id(args[0]))
        if entry is not None and entry[0] is args[0] and entry[1] is _rows_gathered:
            source, flat, _ = entry[2]
            index = func(flat.view(args[0].shape), *args[1:], **kwargs)
            if index.shape == out.shape:
                return out, _rows_gathered, (source, index.reshape(-1), out.shape), {}
    if (func is torch.Tensor.__getitem__ and len(args) == 2 and not kwargs and isinstance(args[1], torch.Tensor)
            and not args[1].is_floating_point() and args[1].dtype != torch.bool and args[0].dim() >= 2):
        source, index = args
        inner = math.prod(source.shape[1:])
        flat = ((index.reshape(-1, 1) % source.shape[0]) * inner
                + torch.arange(inner, device=index.device)).reshape(-1)
        return out, _rows_gathered, (source, flat, out.shape), {}
    return out, func, args, kwargs


_NEGATIONS = {torch.neg, torch.Tensor.neg, torch.Tensor.__neg__}
_DIVISIONS = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.true_divide, torch.Tensor.true_divide}

_HALF = (torch.float16, torch.bfloat16)


# Shared by the two torch-function modes below, each given its test ``follows`` for the tensors it
# follows (a module's parameters; a shared output and what was derived from it).
def _hits(args, follows) -> list[int]:
    """Positions of the followed tensors among an op's positional arguments."""
    return [i for i, a in enumerate(args) if follows(a)]


def _nested(args, kwargs, follows) -> bool:
    """A followed tensor among the keyword arguments or inside a list argument (``torch.cat([p, x])``)."""
    return any(follows(v) for v in kwargs.values()) or any(
        isinstance(a, (list, tuple)) and any(follows(t) for t in a) for a in args)


def _touches(args, kwargs, table: dict) -> bool:
    """Whether an op's arguments (or a list among them) may hold a tensor whose ``id`` is in
    ``table``: a cheap first test, before ``_hits`` and ``_nested`` check identities."""
    for a in args:
        if id(a) in table:
            return True
        if type(a) in (list, tuple):
            for t in a:
                if id(t) in table:
                    return True
    if kwargs:
        for v in kwargs.values():
            if id(v) in table:
                return True
    return False


def _linear_arguments(args, kwargs) -> tuple:
    """``F.linear``'s ``(input, weight, bias)``."""
    bound = dict(zip(("input", "weight", "bias"), args))
    bound.update(kwargs)
    return bound.get("input"), bound.get("weight"), bound.get("bias")


def _sdpa_arguments(args, kwargs) -> dict:
    """``F.scaled_dot_product_attention``'s query, key, value and attn_mask by name."""
    bound = dict(zip(("query", "key", "value", "attn_mask"), args))
    bound.update(kwargs)
    return bound


def _with_attn_mask(args, kwargs, mask) -> tuple[list, dict]:
    """An SDPA call's arguments with ``mask`` as its ``attn_mask``, positional or keyword as given."""
    args = list(args)
    if len(args) > 3:
        args[3] = mask
    else:
        kwargs = dict(kwargs, attn_mask=mask)
    return args, kwargs


def _use_kind(kind: str) -> str:
    """The ``DirectUse`` kind of a ``_DIRECT_KINDS`` op: a product, an expand, or a sum (``+``, ``-``)."""
    return kind if kind in ("mul", "expand") else "add"


def _carries_grad(out) -> bool:
    """Whether a gradient can flow back through an op's output (not ``p.shape``, ``p.detach()``)."""
    if isinstance(out, torch.Tensor):  # (most ops: no tree to flatten)
        return out.requires_grad
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(out)[0])


_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__


def _inside_autograd_function() -> bool:
    """Whether the op running now is inside a custom ``torch.autograd.Function``'s forward (its
    ``apply`` is on the stack): the gradient of what it computes from a parameter is that Function's
    ``backward`` (a straight-through estimator's, a custom kernel's), which no recorded op models."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _FUNCTION_APPLY:
            return True
        frame = frame.f_back
    return False


def _sign(kind: str, index: int) -> float:
    """-1 where the followed tensor, argument ``index``, is subtracted: ``x - p``, ``rsub(p, x)``."""
    return -1.0 if (kind == "sub" and index == 1) or (kind == "rsub" and index == 0) else 1.0


class DirectUseRecorder(TorchFunctionMode):
    """Active while a generic-route module's forward runs: records each op that uses one of the
    module's own parameters (``uses``), or sets ``uses`` to None at the first use it cannot turn
    into per-sample gradients (then the call is replayed with ``vmap``, as without it). Each
    recorded op's output gets a gradient hook that forwards to ``DirectUse.sink``.

    A functional normalisation given the module's parameters (``F.layer_norm``, ``F.group_norm``,
    ``F.rms_norm``, ``F.batch_norm``: Hugging Face's channels-first
    ``ConvNextLayerNorm``, timm's ``LayerNorm2d`` and ``BatchNormAct2d``) is computed as the normalisation without affine parameters, then ``* weight + bias``, in
    float32 for float16/bfloat16 inputs as the fused kernels do, so the output is the same to
    rounding and both parameters become recorded broadcast uses.

    Tensors computed from the parameters alone (and constants) are kept with the ops that gave
    them (``derived``); a convolution or ``F.linear`` of the input with such a weight is recorded
    as a ``ProductUse``; one broadcast over the samples (``x + t``, ``x * t``, SDPA's ``attn_mask``)
    as a use with a ``ComputedUse``. One that no such op took by the end of the forward sends the
    call to the replay (its gradient would reach the parameters unseen).

    A broadcast use's output is taken to have the samples (or rows of them) in dim 0 where its
    other operand is computed from the call's inputs; where that is a constant (a buffer), only
    once the output meets such a tensor (``unproven``, ``_pair``).

    ``inner`` (``{id: (name, parameter, busy)}``): the parameters of tracked modules inside this one.
    One used here while ``busy()`` is false (its module, and every tracked module between, outside
    their forwards: timm's BEiT attention applying its ``qkv`` Linear's weight itself) is followed as
    the module's own from then on (``adopted``); the tracker checks that its module was not called."""

    def __init__(self, params: dict[str, torch.Tensor], first_input: torch.Tensor | None = None,
                 inner: dict | None = None, inputs: tuple = ()):
        super().__init__()
        self.inner = inner or {}
        self.adopted: set[str] = set()
        # The call's tensor inputs, and tensors computed from them that need no gradient (a mask
        # expanded to the windows, an input reshaped): batched as the inputs are (see _batched).
        self.from_inputs = {id(t): t for t in inputs if isinstance(t, torch.Tensor)}
        # id -> output of a recorded ``+``/``*`` whose other operand is a constant with more than one
        # row (a buffer, a mask): whether its dim 0 is the samples is proven only where it meets a
        # batched tensor (see _pair); one that does not by the end of the forward sends the call to
        # the replay (a [d] buffer times a parameter, with d == B, is no per-sample use).
        self.unproven: dict[int, torch.Tensor] = {}
        # id -> (tensor, func, args, kwargs): slices and transposes of own weights the experts'
        # follower took (``W[e]``), kept to become tensors computed from the parameters (``derived``)
        # where an op other than a product with rows takes them.
        self.slices: dict[int, tuple] = {}
        # Set at exit: computed tensors no op took, and whether they alone sent the call to the replay.
        self.untaken: list[torch.Tensor] = []
        self.only_untaken = False
        # id -> (name, tensor, scale): the parameters, and tensors derived from one of them as
        # ``scale * p + constant`` (views, dtype casts, ``1.0 + p``, ``-p``, ``p / 2``), or as an
        # elementwise function of it (``-exp(p)``: ``scale`` is then the derivative, a tensor of
        # the parameter's shape).
        self.params = {id(p): (name, p, 1.0) for name, p in params.items()}
        self.shapes = {name: p.shape for name, p in params.items()}
        self.leaves = {id(p): (name, p) for name, p in params.items()}
        # id -> (tensor, func, args, kwargs): tensors computed from the parameters alone (and
        # constants), aliases of them included, each with the op that gave it, to be replayed (see
        # ProductUse). Not those whose output is a recorded use (broadcast over the samples).
        self.derived: dict[int, tuple] = {}
        # ids of those an op of theirs or a product took: one left untaken when the forward ends was
        # returned, kept for later, or computed from batched constants (``x @ w.t()``, an input
        # without grad), and its gradient would reach the parameters unseen (then: replayed).
        self.taken: set[int] = set()
        self.uses: list[DirectUse] | None = []
        # Own weights applied to rows (experts, routers, ``x @ self.weight``): only for a module
        # with a matrix or a stack of them, followed from the rows of its first input.
        self.experts = (ExpertUses(params, first_input) if first_input is not None and first_input.dim() > 0
                        and any(p.dim() >= 2 and p.shape[0] > 1 for p in params.values()) else None)
        # The tracked model's batch (set by the tracker), and the last F.linear run through
        # fused_linear as (output, sink), for ``_product`` to link to its use.
        self.batch_size: int | None = None
        self.fused_product: tuple | None = None

    def __exit__(self, *exc):
        if self.experts is not None:
            self.experts.clear()  # the labels hold the forward's tensors
        # Computed tensors no op took: returned or kept (see ``computed_outputs``), or made from batched
        # constants; their gradient would reach the parameters unseen, unless they are the outputs.
        self.untaken = [t for key, (t, *_) in self.derived.items() if key not in self.taken and self._param_name(t) is None]
        self.only_untaken = self.uses is not None and not self.unproven and bool(self.untaken)
        if self.uses is not None and (self.unproven or self.untaken):
            self.uses = None
        self.unproven.clear()
        self.from_inputs.clear()
        self.slices.clear()
        self.fused_product = None  # (an F.linear output no product took: not kept past the forward)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in METADATA_READS:  # (no use: nothing a gradient flows through, see METADATA_READS)
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        adopting = self.inner and self.uses is not None and _touches(args, kwargs, self.inner)
        if adopting and (func is F.scaled_dot_product_attention or func in _NORMS or func in _ADDCMULS
                         or func in _IN_PLACE_ARITHMETIC):
            self._adopt(args, kwargs)  # (ops taken apart below, before they run)
            adopting = False
        if self.unproven and self.uses is not None and _touches(args, kwargs, self.unproven):
            self._pair(func, args, kwargs)
        if self.uses is not None and func is F.scaled_dot_product_attention:
            out = self._attention_mask(args, kwargs)
            if out is not None:
                return out
        if self.uses is not None and func in _NORMS:
            out = self._normalisation(func, args, kwargs)
            if out is not None:
                return out
        if self.uses is not None and func in _ADDCMULS and _hits(args, self._follows):
            out = self._addcmul(args, kwargs)
            if out is not None:
                return out
        if (self.uses is not None and func in _IN_PLACE_ARITHMETIC and not kwargs and len(args) == 2
                and _hits(args, self._follows) == [1] and isinstance(args[0], torch.Tensor)):
            return self._in_place(func, args)
        sink = None
        if self.uses is not None and func is F.linear:
            sink = self._weight_grad_sink(args, kwargs)
        elif self.uses is not None and func in CONV_DIMS:
            sink = self._standardised_sink(func, args, kwargs)
        if sink is None:
            out = func(*args, **kwargs)
        else:  # the same product; its backward may take the weight gradient from the per-sample ones
            out = fused_linear(*_linear_arguments(args, kwargs), sink) if func is F.linear else sink.run()
            self.fused_product = (out, sink)
        if adopting and _carries_grad(out):  # (not ``w.dtype``, ``w.shape``)
            self._adopt(args, kwargs)
        if self.uses is None:
            return out
        if (isinstance(out, torch.Tensor) and not out.requires_grad and self.from_inputs
                and _touches(args, kwargs, self.from_inputs)):
            self.from_inputs[id(out)] = out
        experts = self.experts
        if experts is not None:
            experts.labels.observe(func, args, kwargs, out)
            if experts.labels.broken and any(use.kind == "rows" for use in self.uses):
                self.uses = None  # rows already recorded may have been moved between samples
                return out
        sliced = experts is not None and experts.touches(args, kwargs)
        if not sliced and not _touches(args, kwargs, self.params) and not (
                self.derived and _touches(args, kwargs, self.derived)):
            return out  # (most ops: a cheap look at ids before the checks of identity below)
        hits = _hits(args, self._follows)
        derived = bool(self.derived) and (bool(_hits(args, self._is_derived)) or _nested(args, kwargs, self._is_derived))
        if not hits and not sliced and not derived and not _nested(args, kwargs, self._follows):
            return out
        if not torch.is_grad_enabled():
            if _inside_autograd_function():
                self.uses = None  # replayed, through the Function's own backward
            # Else no gradient passes (spectral_norm's power iteration), not even through a view,
            # which says ``requires_grad`` when made under no_grad (``weight_mat.t()``).
            return out
        if func is torch.Tensor.__setitem__:
            # (returns None: ``w = self.weight * 1; w[0] = 0`` changed a computed weight after the op
            # that made it, which a recipe would replay without; 110% off, refused on verified backwards)
            self.uses = None
            return out
        if isinstance(out, torch.Tensor) and out.is_complex():
            self.uses = None  # (``torch.view_as_complex(p) * x``: its vjp takes conjugates no recorded use does)
            return out
        if not _carries_grad(out):
            return out  # ``w.dtype``, ``w.shape``, ``w.detach()``
        if derived:  # a tensor computed from the parameters, not one of their aliases
            if not (self._product(func, args, kwargs, out) or self._computed_use(func, args, kwargs, out)
                    or self._derive(func, args, kwargs, out)):
                self.uses = None
            return out
        if experts is not None:
            records = experts.handle(func, args, kwargs, out, self.params)
            if experts.refused:
                self.uses = None  # an own weight applied to rows of unknown samples: replayed
                return out
            if records is not None:
                if not records:  # a slice or transpose of an own weight (see _promote)
                    self.slices[id(out)] = (out, func, args, kwargs)
                for weight, product, target in records:
                    self._record_rows(weight, product, target)
                return out
            if sliced:
                # Another use of a slice of an own weight (a relative-position table gathered at its
                # index): a tensor computed from the parameters, if that use is one of those.
                if not (self._promote(args, kwargs) and (self._product(func, args, kwargs, out)
                                                         or self._computed_use(func, args, kwargs, out)
                                                         or self._derive(func, args, kwargs, out))):
                    self.uses = None
                return out
        if (((func in _ALIAS_OPS or func in _PERMUTES) and hits == [0] and self._alias(func, args, out))
                or (not kwargs and len(hits) == 1 and self._affine_alias(func, args, hits[0], out))
                or (func in _DERIVATIVES and hits == [0] and self._function_alias(func, args, kwargs, out))):
            self._derive(func, args, kwargs, out)  # (its recipe, should a product's weight come from it)
            return out
        if func is F.embedding and hits == [1] and self._lookup(args, kwargs, out):
            return out
        kind = _DIRECT_KINDS.get(func)
        binary = kind in ("add", "sub", "rsub", "mul") and len(args) == 2
        if (kind is None or kwargs or len(hits) != 1 or not isinstance(out, torch.Tensor) or not out.requires_grad
                or not (binary or kind == "expand")):
            if not self._product(func, args, kwargs, out) and not self._derive(func, args, kwargs, out):
                self.uses = None  # e.g. F.linear(x, self.weight): replayed instead
            return out
        index = hits[0]
        if binary:
            self._check_rows(args[1 - index], out)
        other = args[1 - index] if kind == "mul" else None  # only a product's gradient needs it
        self._record(args[index], _use_kind(kind), _sign(kind, index), other, out)
        return out

    def _batched(self, x, rows: int, dims: int) -> bool:
        """Whether ``x``'s dim 0 holds the samples (or their rows) of a ``rows x ...`` tensor of
        ``dims`` dims it meets: it is computed from the inputs (it needs a gradient and is not
        computed from the parameters alone, or is an input or computed from them without one), and
        has that dim."""
        return (isinstance(x, torch.Tensor) and x.dim() == dims and x.shape[0] == rows
                and (self.from_inputs.get(id(x)) is x or (x.requires_grad and not self._in_graph(x))))

    def _check_rows(self, other, out) -> None:
        """A use's output ``out`` with rows from its ``other`` operand: unproven unless that is batched."""
        if out.dim() > 0 and out.shape[0] > 1 and not self._batched(other, out.shape[0], out.dim()):
            self.unproven[id(out)] = out

    def _pair(self, func, args, kwargs) -> None:
        """An op on an unproven use's output: proven where it meets a batched tensor of its rows
        (``x + out``, ``x * out``, SDPA's ``attn_mask`` of a batched query); else the call is replayed."""
        for t in tree_flatten((args, kwargs))[0]:
            if not isinstance(t, torch.Tensor) or self.unproven.get(id(t)) is not t:
                continue
            if func is F.scaled_dot_product_attention:
                bound = _sdpa_arguments(args, kwargs)
                partner = bound.get("query") if bound.get("attn_mask") is t else None
            elif _DIRECT_KINDS.get(func) in ("add", "sub", "rsub", "mul") and len(args) == 2 and not kwargs:
                partner = args[1] if args[0] is t else args[0]
            else:
                partner = None
            if self._batched(partner, t.shape[0], t.dim()):
                del self.unproven[id(t)]
            else:
                self.uses = None
                return

    def _record(self, operand, kind, sign, other, out, operand_shape=None):
        """Record a use of ``operand`` (a parameter or a tensor derived from one) whose output is
        ``out``; ``operand_shape``: the shape it broadcasts with, if not its own."""
        if isinstance(other, torch.Tensor):
            other = other.detach()
        name, _, scale = self.params[id(operand)]
        factor = scale if isinstance(scale, torch.Tensor) else None
        self._add(DirectUse(name, kind, sign * (1.0 if factor is not None else scale), other, out.shape,
                            operand.shape if operand_shape is None else operand_shape, factor=factor), out)

    def _record_rows(self, weight, product, out) -> None:
        """Record a product of an own weight with labelled rows (``experts.RowProduct``)."""
        self._add(DirectUse(weight.name, "rows", weight.scale, product, out.shape, self.experts.shapes[weight.name]),
                  out)

    def _add(self, use: DirectUse, out: torch.Tensor) -> None:
        """Keep ``use``; ``out``'s gradient goes to its sink (set by the tracker)."""
        out.register_hook(lambda grad, use=use: use.sink(grad) if use.sink is not None else None)
        self.uses.append(use)

    def _lookup(self, args, kwargs, out) -> bool:
        """Record ``F.embedding(ids, weight, padding_idx)`` of a parameter as a use, if it is a plain
        lookup (no ``max_norm``, ``scale_grad_by_freq`` or ``sparse``: those change the gradient)."""
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args), **kwargs)
        ids, weight, padding_idx = bound.get("input"), bound["weight"], bound.get("padding_idx")
        if (not isinstance(ids, torch.Tensor) or ids.dim() < 1 or ids.is_floating_point() or weight.dim() != 2
                or bound.get("max_norm") is not None or bound.get("scale_grad_by_freq") or bound.get("sparse")
                or not isinstance(out, torch.Tensor) or not out.requires_grad):
            return False
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        self._record(weight, "embedding", 1.0, (ids, padding_idx), out)
        return True

    def _alias(self, func, args, out) -> bool:
        """Register ``out`` as the parameter ``args[0]`` itself if it holds the same values in the
        same (row-major) order: a view or reshape of any shape (``transpose_for_scores`` splits a
        bias into heads), or only singleton dims added or removed (a dtype change allowed), by an
        index of ``None``, ``...``, full slices and integers alone (not one that reorders)."""
        param = args[0]
        if (not isinstance(out, torch.Tensor) or not out.requires_grad or out.numel() != param.numel()
                or out.device != param.device):
            return False
        if func is torch.Tensor.__getitem__ and not _keeps_order(args[1]):
            return False
        if func in _PERMUTES and not _moves_only_singletons(func, param, args[1:]):
            return False
        if func not in _RESHAPES and [n for n in out.shape if n != 1] != [n for n in param.shape if n != 1]:
            return False
        name, _, scale = self.params[id(param)]
        self.params[id(out)] = (name, out, scale)
        return True

    def _affine_alias(self, func, args, index: int, out) -> bool:
        """Register ``out`` as derived from the parameter ``args[index]`` if it is ``p + c``,
        ``p - c``, ``c - p``, ``p * c``, ``p / c`` or ``-p`` with a Python number ``c`` (Gemma's
        RMSNorm scales by ``1.0 + weight``): its gradient reaches ``p`` times a constant."""
        if len(args) == 1:
            factor = -1.0 if func in _NEGATIONS else None
        else:
            c = args[1 - index]
            if isinstance(c, bool) or not isinstance(c, (int, float)):
                return False
            kind = _DIRECT_KINDS.get(func) or ("div" if func in _DIVISIONS else None)
            factor = {"add": 1.0, "sub": 1.0 if index == 0 else -1.0, "rsub": -1.0 if index == 0 else 1.0,
                      "mul": float(c), "div": 1.0 / c if index == 0 and c else None}.get(kind)
        if factor is None or not isinstance(out, torch.Tensor) or out.shape != args[index].shape:
            return False
        name, _, scale = self.params[id(args[index])]
        self.params[id(out)] = (name, out, scale * factor)
        return True

    def _function_alias(self, func, args, kwargs, out) -> bool:
        """Register ``out = f(p)`` for an elementwise ``f`` of ``_DERIVATIVES`` (numbers as its other
        arguments) as derived from the parameter: its gradient reaches ``p`` times ``f'(p)``."""
        x = args[0]
        numbers = list(args[1:]) + list(kwargs.values())
        if (any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in numbers)
                or not isinstance(out, torch.Tensor) or out.shape != x.shape or not out.requires_grad):
            return False
        name, _, scale = self.params[id(x)]
        try:
            derivative = _DERIVATIVES[func](x.detach().float(), out.detach().float(), *args[1:], **kwargs)
        except TypeError:
            return False  # an argument this derivative does not take
        self.params[id(out)] = (name, out, scale * derivative.reshape(self.shapes[name]))
        return True

    def _normalisation(self, func, args, kwargs):
        """``func`` (a functional normalisation) as ``norm(x) * weight + bias`` with the weight's
        and bias's uses recorded; None where the call is not of that form."""
        bind, shape_arg, channel_dim = _NORMS[func]
        bound = bind(args, kwargs)
        if bound is None or "input" not in bound or shape_arg not in bound:
            return None
        x, weight, bias = bound["input"], bound.get("weight"), bound.get("bias")
        own = [t for t in (weight, bias) if t is not None and self._param_name(t) is not None]
        if not own or not isinstance(x, torch.Tensor) or x.dim() < 2 or self._param_name(x) is not None:
            return None
        plain = dict(bound, weight=None)
        if "bias" in plain:
            plain["bias"] = None
        x_arg = plain.pop("input")
        device_type = x.device.type
        # The fused kernels compute in float32 and round once; a bfloat16 norm(x) multiplied
        # afterwards would round twice. Under autocast the op's own output dtype decides.
        out_dtype = x.dtype
        if torch.is_autocast_enabled(device_type) and func not in _STATEFUL_NORMS:
            out_dtype = func(x[:1], **plain).dtype
        if out_dtype in _HALF:
            if func in _STATEFUL_NORMS and any(isinstance(t, torch.Tensor) and t.dtype != torch.float32 for t in
                                               (plain.get("running_mean"), plain.get("running_var"))):
                return None  # half-precision running statistics: the float32 form cannot update them
            with torch.autocast(device_type, enabled=False):
                normed = func(x.float(), **plain)
        else:
            normed = func(x_arg, **plain)
        view = (lambda t: t) if channel_dim is None else (lambda t: t.view(1, -1, *([1] * (x.dim() - 2))))
        out = normed
        if weight is not None:
            w = view(weight)
            w = w.float() if out_dtype in _HALF else w
            out = normed * w
            if self._param_name(weight) is not None and out.requires_grad:
                self._record(weight, "mul", 1.0, normed, out, w.shape)
        if bias is not None:
            b = view(bias)
            b = b.float() if out_dtype in _HALF else b
            summed = out + b
            if self._param_name(bias) is not None and summed.requires_grad:
                self._record(bias, "add", 1.0, None, summed, b.shape)
            out = summed
        return out.to(out_dtype) if out.dtype != out_dtype else out

    def _addcmul(self, args, kwargs):
        """``torch.addcmul(b, w, x, value=v)`` as ``b + v * (w * x)``, each op taken through this
        recorder (so a parameter among them becomes a recorded broadcast use); the same to
        rounding. None where the call has other arguments."""
        if len(args) != 3 or set(kwargs) - {"value"}:
            return None
        value = kwargs.get("value", 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        product = self.__torch_function__(torch.mul, (), (args[1], args[2]))
        if value != 1:
            product = self.__torch_function__(torch.mul, (), (product, value))
        return self.__torch_function__(torch.add, (), (args[0], product))

    def _in_place(self, func, args):
        """``x.mul_(p)`` (``x *= p``, ``add_``, ``sub_``) as ``x.copy_(kept * p)`` with ``kept`` a
        copy of ``x``: the out-of-place op is a recorded use whose other factor (``kept``) the
        in-place write does not change; the same values, and ``x`` is still the one written."""
        x, param = args
        kept = self.__torch_function__(torch.Tensor.clone, (), (x,))
        result = self.__torch_function__(_out_of_place(func), (), (kept, param))
        return x.copy_(result)

    def _is_derived(self, x) -> bool:
        """A tensor computed from the parameters alone that is not one of their aliases."""
        entry = self.derived.get(id(x)) if isinstance(x, torch.Tensor) else None
        return entry is not None and entry[0] is x and self._param_name(x) is None

    def _in_graph(self, x) -> bool:
        """A parameter, one of its aliases, or a tensor computed from the parameters alone."""
        return self._param_name(x) is not None or self._is_derived(x)

    def _derive(self, func, args, kwargs, out) -> bool:
        """Keep ``out`` as computed from the parameters alone if every tensor the op takes that
        needs a gradient is (the others are constants: buffers, index tensors), and the op can be
        replayed to the same value: not random, not in place, no running statistics to update."""
        if (not isinstance(out, torch.Tensor) or not out.requires_grad or func in _RANDOM_OPS
                or func is F.dropout or _out_of_place(func) is not func or kwargs.get("out") is not None):
            return False
        if func in _STATEFUL_NORMS:
            bound = _NORMS[func][0](args, kwargs) or {}
            if bound.get("training") and (bound.get("running_mean") is not None or bound.get("running_var") is not None):
                return False  # a replay would update the running statistics again
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(t.requires_grad and not self._in_graph(t) for t in tensors):
            return False
        self.derived[id(out)] = _replay_step(out, func, args, kwargs, self.derived)
        self.taken.update(id(t) for t in tensors if self._in_graph(t))
        return True

    def _sources(self, t, recipe: "WeightRecipe") -> bool:
        """Add the parameters ``t`` is computed from, and the ops that computed it, to ``recipe``;
        False if some step has no recipe to replay."""
        leaf = self.leaves.get(id(t))
        if leaf is not None and leaf[1] is t:
            recipe.leaves[id(t)] = leaf
            return True
        entry = self.derived.get(id(t))
        if entry is None or entry[0] is not t:
            return False
        recipe.steps[id(t)] = entry
        return all(self._sources(a, recipe) for a in tree_flatten(entry[2:])[0] if self._in_graph(a))

    def _product(self, func, args, kwargs, out) -> bool:
        """Record ``F.conv2d(x, weight, bias, ...)`` or ``F.linear(x, weight, bias)`` of a batched
        input ``x`` with a weight computed from the parameters alone (and a bias that is too, or
        none) as a ``ProductUse``."""
        bound = _bind_product(func, args, kwargs)
        if bound is None or not isinstance(out, torch.Tensor) or not out.requires_grad or out.dim() < 2:
            return False
        names = _PRODUCT_OPS[func][0]
        x, weight, bias = bound.get("input"), bound.get("weight"), bound["bias"]
        if (not isinstance(x, torch.Tensor) or x.dim() < 2 or self._in_graph(x) or not isinstance(weight, torch.Tensor)
                or not self._in_graph(weight) or (bias is not None and not self._in_graph(bias))):
            return False
        ops = [t for t in tree_flatten([bound[n] for n in names[3:]])[0] if isinstance(t, torch.Tensor)]
        if ops:
            return False  # (strides and paddings are numbers)
        recipe = WeightRecipe(weight, bias)
        if not all(self._sources(t, recipe) for t in (weight, bias) if t is not None):
            return False
        if not recipe.steps and not any(name in self.adopted for name, _ in recipe.leaves.values()):
            return False  # the parameters themselves: the experts' row products, or the replay, read them

        self.taken.update(id(t) for t in (weight, bias) if t is not None)
        params = {name: p.detach() for name, p in recipe.leaves.values()}
        use = ProductUse(func, x.detach(), [bound[n] for n in names[3:]], params, recipe, out.dtype)
        if standardised_product(func, use.arguments):
            use.standardised = _standardisation(recipe)
        if self.fused_product is not None and self.fused_product[0] is out:
            leaf = recipe.leaves.get(id(weight))
            if leaf is not None and leaf[1] is weight:
                use.fused_weight = leaf[0]
                self.fused_product[1].use = use
            elif use.standardised is not None:  # (its norms give the weight gradient: GenericRule.norms)
                use.fused_standardised = True
                self.fused_product[1].use = use
            self.fused_product = None
        self._add(DirectUse(next(iter(params)), "product", 1.0, use, out.shape, x.shape), out)
        return True

    def _weight_grad_sink(self, args, kwargs) -> _WeightGradFromUse | None:
        """A sink for ``F.linear(x, w, b)`` run through ``fused_linear``, where ``w`` is one of the
        module's parameters itself (or an inner module's, to be adopted), ``b`` a tensor computed from
        its parameters without ``w``, and ``x`` has the model's samples in dim 0 (not windows folded
        into it: the row proof walks through ``F.linear``'s own autograd node there); else None."""
        x, weight, bias = _linear_arguments(args, kwargs)
        if (self.batch_size is None or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != self.batch_size
                or not isinstance(weight, torch.Tensor) or not weight.requires_grad or not isinstance(bias, torch.Tensor)
                or torch.is_autocast_enabled(x.device.type)):  # (as the fused nn.Linear: dtypes are autocast's)
            return None
        own, inner = self.leaves.get(id(weight)), self.inner.get(id(weight))
        if not ((own is not None and own[1] is weight) or (inner is not None and inner[1] is weight and not inner[2]())):
            return None
        entry = self.derived.get(id(bias))
        if entry is None or entry[0] is not bias:
            return None
        sources = WeightRecipe(bias, None)
        if not self._sources(bias, sources) or any(p is weight for _, p in sources.leaves.values()):
            return None
        return _WeightGradFromUse()

    def _standardised_sink(self, func, args, kwargs) -> "_ConvGradsFromUse | None":
        """A sink to run a convolution through (``sink.run()``) whose weight is a standardisation
        of the module's parameters (``_standardisation``) applied to the model's samples, so that
        its backward takes the weight gradient from the per-sample ones the closed form's norms
        form (``standardised.py``) where they were formed first; else None."""
        bound = _bind_product(func, args, kwargs)
        if bound is None:
            return None
        x, weight, bias = bound["input"], bound["weight"], bound["bias"]
        arguments = [bound[n] for n in _CONV_ARGS[0][3:]]
        if (self.batch_size is None or not isinstance(x, torch.Tensor) or x.dim() != CONV_DIMS[func] + 2
                or x.shape[0] != self.batch_size or self._in_graph(x) or not isinstance(weight, torch.Tensor)
                or not self._is_derived(weight) or (bias is not None and self._param_name(bias) is None)
                or torch.is_autocast_enabled(x.device.type) or not standardised_product(func, arguments)
                or any(isinstance(a, torch.Tensor) for a in tree_flatten(arguments)[0])):
            return None
        recipe = WeightRecipe(weight, bias)
        if not all(self._sources(t, recipe) for t in (weight, bias) if t is not None):
            return None
        if _standardisation(recipe) is None:
            return None
        return _ConvGradsFromUse(func, x, weight, bias, arguments)

    def _computed_use(self, func, args, kwargs, out) -> bool:
        """Record ``x + t``, ``x - t``, ``x * t`` or ``t.expand(B, ...)`` of a tensor ``t`` computed
        from the parameters alone, whose output broadcasts it over dim 0 (the samples, or rows of
        them), as a use with a ``ComputedUse``. Where ``t`` already has that dim (a constant's rows
        added to it, B=1) the output is computed from the parameters and constants still."""
        kind = _DIRECT_KINDS.get(func)
        if (kind is None or kwargs or not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] < 2
                or (kind != "expand" and len(args) != 2)):
            return False
        hits = _hits(args, self._is_derived)
        if kind == "expand":
            if hits != [0]:
                return False
        elif len(hits) != 1 or self._in_graph(args[1 - hits[0]]):
            return False
        t = args[hits[0]]
        if t.dim() > out.dim() or ((1,) * (out.dim() - t.dim()) + tuple(t.shape))[0] != 1:
            return False
        recipe = WeightRecipe(t, None)
        if not self._sources(t, recipe):
            return False
        self.taken.add(id(t))
        if kind != "expand":
            self._check_rows(args[1 - hits[0]], out)
        other = args[1 - hits[0]] if kind == "mul" else None
        if isinstance(other, torch.Tensor):
            other = other.detach()
        params = {name: p.detach() for name, p in recipe.leaves.values()}
        self._add(DirectUse(next(iter(params)), _use_kind(kind), _sign(kind, hits[0]), other, out.shape, t.shape,
                            computed=ComputedUse(params, recipe, t.dtype)), out)
        return True

    def _attention_mask(self, args, kwargs):
        """``F.scaled_dot_product_attention`` with an additive ``attn_mask`` computed from the
        parameters (or one of them), broadcast over the query's samples: the mask is expanded to
        them first, which broadcasting does anyway (the same kernel and values), so that the
        ``expand`` is the recorded use and the mask's gradient arrives per sample. None where the
        call is not of that form."""
        bound = _sdpa_arguments(args, kwargs)
        mask, query = bound.get("attn_mask"), bound.get("query")
        if (not isinstance(query, torch.Tensor) or not self._in_graph(mask) or mask.dtype == torch.bool
                or not 0 < mask.dim() <= query.dim() or query.shape[0] < 2
                or any(self._in_graph(bound.get(name)) for name in ("query", "key", "value"))):
            return None
        shape = (1,) * (query.dim() - mask.dim()) + tuple(mask.shape)
        if shape[0] != 1:
            return None
        if len(shape) != mask.dim():
            mask = self.__torch_function__(torch.Tensor.reshape, (), (mask, shape))
        expanded = self.__torch_function__(torch.Tensor.expand, (), (mask, (query.shape[0], *shape[1:])))
        args, kwargs = _with_attn_mask(args, kwargs, expanded)
        return F.scaled_dot_product_attention(*args, **kwargs)

    def _adopt(self, args, kwargs) -> None:
        """Follow the inner modules' parameters among an op's arguments as the module's own, where
        their modules are outside their forwards; give up where one already followed is used inside."""
        for t in tree_flatten((args, kwargs))[0]:
            entry = self.inner.get(id(t))
            if entry is None or entry[1] is not t:
                continue
            name, p, busy = entry
            if busy():
                if id(p) in self.leaves:
                    self.uses = None  # used here and by its own module: neither alone sees every use
            elif id(p) not in self.leaves:
                self.params[id(p)] = (name, p, 1.0)
                self.leaves[id(p)] = (name, p)
                self.shapes[name] = p.shape
                self.adopted.add(name)

    def _promote(self, args, kwargs) -> bool:
        """Make the experts' slices among an op's arguments (and those they were sliced from)
        tensors computed from the parameters; False if one is not known here."""
        pending = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                   and self.experts.weights.get(id(t), (None,))[0] is t]
        while pending:
            t = pending.pop()
            entry = self.slices.get(id(t))
            if entry is None or entry[0] is not t:
                return False
            self.derived[id(t)] = _replay_step(*entry)
            pending += [a for a in tree_flatten(entry[2:])[0] if isinstance(a, torch.Tensor)
                        and self.experts.weights.get(id(a), (None,))[0] is a and id(a) not in self.derived]
        return True

    def computed_outputs(self, outputs: list) -> list | None:
        """``ComputedUse``s of ``outputs`` (the call's outputs that need a gradient, in order) where
        the recorder gave up only because those tensors, computed from the parameters alone, were
        returned untaken; else None. Call after the recorder has exited."""
        if not self.only_untaken or len(outputs) != len(self.untaken) or not all(
                any(o is t for t in self.untaken) for o in outputs):
            return None
        uses = []
        for out in outputs:
            recipe = WeightRecipe(out, None)
            if not self._sources(out, recipe):
                return None
            uses.append(ComputedUse({name: p.detach() for name, p in recipe.leaves.values()}, recipe, out.dtype))
        return uses

    def _follows(self, x) -> bool:
        return self._param_name(x) is not None

    def _param_name(self, x) -> str | None:
        entry = self.params.get(id(x))
        return entry[0] if entry is not None and entry[1] is x else None


def usable_direct_uses(uses: list[DirectUse] | None, tracked: dict, batch_size: int,
                       rows: tuple[int, ...] | None = None,
                       input_samples: torch.Tensor | None = None) -> list[DirectUse] | None:
    """``uses`` if each broadcasts its parameter over the ``batch_size`` samples of dim 0 (so
    per-sample gradients are a reduction of its output grad), or is a product with rows of the
    module's first input, whose ``rows`` (the merged leading sizes, if samples and tokens were
    flattened) say which sample each row belongs to. With
    ``input_samples`` (the sample of each of the first input's rows, in any order) only products
    qualify; they are given that map."""
    if uses is None:
        return None
    # A tracked parameter with no recorded use was not used by this call (every op on a tensor
    # passes the recorder, which gives up at any use it cannot read): its per-sample gradients
    # are 0 (DINOv2's mask_token without a mask). The accounting check compares that with autograd.
    if input_samples is not None:
        if not all(use.kind == "rows" and use.other.n_input == input_samples.shape[0] for use in uses):
            return None
        for use in uses:
            use.other.input_samples = input_samples
        return uses
    per_sample = math.prod(rows[1:]) if rows else 1
    kinds: dict[str, set[bool]] = {}
    for use in uses:
        for name in (use.other.params if use.kind == "product" else
                     use.computed.params if use.computed is not None else (use.name,)):
            kinds.setdefault(name, set()).add(use.kind == "rows")
    if any(len(k) > 1 for k in kinds.values()):
        return None  # one parameter both in products and broadcast: not combined
    for use in uses:
        pshape, oshape = use.param_shape, use.out_shape
        if use.kind == "rows":
            if use.other.n_input != batch_size * per_sample:
                return None
            continue
        if use.kind == "product":
            n = use.other.x.shape[0]
            group = n // batch_size if n % batch_size == 0 else 0
            if (group not in (1, per_sample) or (group > 1 and use.other.func is not F.linear)
                    or not oshape or oshape[0] != n):
                return None
            use.other.group = group
            continue
        if use.kind == "embedding":
            # Per-sample ids, and [B, V, d] per-sample gradients of a bounded size (a position
            # table's); a [1, T] lookup shared by the samples is left to the replay and its watcher.
            if (batch_size < 2 or not oshape or oshape[0] != batch_size or use.other[0].shape[0] != batch_size
                    or 4 * batch_size * pshape.numel() > 8 * MAX_EXTRA_BYTES):
                return None
            continue
        pad = len(oshape) - len(pshape)
        # (over rows proven sample-major, ``per_sample`` of them each: a window attention's scale)
        if (pad < 0 or not oshape or oshape[0] not in (batch_size, batch_size * per_sample)
                or ((1,) * pad + tuple(pshape))[0] != 1):
            return None
    return uses


def _direct_per_sample(uses: list[DirectUse], grads, tracked, batch_size: int,
                       samples: slice | None = None) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` float32 per-sample gradients from the recorded uses' output grads
    (only ``samples``, if given)."""
    total: dict[str, torch.Tensor] = {}
    rows = {name: entries for name, entries in _rows_entries([(uses, grads)]).items() if name in tracked}
    for name, entries in rows.items():
        total[name] = rows_per_sample(entries, batch_size, tracked[name].shape, samples or slice(0, batch_size))
    products: dict[str, torch.Tensor] = {}  # computed for ``samples`` only
    for use, g in zip(uses, grads):
        if g is not None and use.kind == "product" and not tracked.keys().isdisjoint(use.other.params):
            for name, t in use.other.per_sample(g, samples or slice(0, batch_size)).items():
                if name in tracked:
                    products[name] = t if name not in products else products[name] + t
            continue
        if g is None or use.kind == "rows" or use.name not in tracked:
            continue
        # The sign is applied to the per-sample result, not to the (larger) output grad: each step is linear.
        contrib = g.float()
        if use.kind == "embedding":
            per_sample = _lookup_per_sample(use, contrib, batch_size)
        else:
            if use.kind == "mul":
                contrib = contrib * (use.other.float() if isinstance(use.other, torch.Tensor) else use.other)
            pad = len(use.out_shape) - len(use.param_shape)
            target = (batch_size,) + ((1,) * pad + tuple(use.param_shape))[1:]
            if contrib.shape[0] != batch_size:  # rows proven sample-major (see usable_direct_uses)
                contrib = contrib.reshape(batch_size, -1, *contrib.shape[1:]).sum(dim=1)
            per_sample = contrib.sum_to_size(target)
            if use.sign != 1.0:
                per_sample = per_sample * use.sign
            if use.computed is not None:  # the computed tensor's, taken back to the parameters'
                per_sample = per_sample.reshape(batch_size, *use.param_shape)[samples or slice(0, batch_size)]
                for name, t in use.computed.per_sample(per_sample).items():
                    if name in tracked:
                        products[name] = t if name not in products else products[name] + t
                continue
            per_sample = per_sample.reshape(batch_size, *tracked[use.name].shape)
        if use.kind == "embedding" and use.sign != 1.0:
            per_sample = per_sample * use.sign
        if use.factor is not None:
            per_sample = per_sample * use.factor
        total[use.name] = per_sample if use.name not in total else total[use.name] + per_sample
    count = batch_size if samples is None else samples.stop - samples.start
    for name, p in tracked.items():
        if name in total and samples is not None and name not in rows:
            total[name] = total[name][samples]
        if name in products:
            total[name] = products[name] if name not in total else total[name] + products[name]
        elif name not in total:
            total[name] = torch.zeros(count, *p.shape, dtype=torch.float32, device=p.device)
    return total


def _rows_entries(calls) -> dict[str, list]:
    """``{name: [(RowProduct, output grad, scale)]}`` over the recorded products of ``calls``
    (``(uses, grads)`` pairs)."""
    entries: dict[str, list] = {}
    for uses, grads in calls:
        for use, g in zip(uses, grads):
            if use.kind == "rows" and g is not None:
                entries.setdefault(use.name, []).append((use.other, g, use.sign))
    return entries


def _lookup_per_sample(use: DirectUse, grad: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[B, V, d]``: each sample's output-grad rows added at its ids (padding rows get none)."""
    ids, padding_idx = use.other
    V, d = use.param_shape
    ids = ids.reshape(batch_size, -1)
    rows = grad.reshape(batch_size, ids.shape[1], d)
    if padding_idx is not None:
        rows = rows * (ids != padding_idx).unsqueeze(-1)
    flat = (ids + V * torch.arange(batch_size, device=ids.device).unsqueeze(1)).reshape(-1)
    out = torch.zeros(batch_size * V, d, dtype=torch.float32, device=grad.device)
    return out.index_add_(0, flat, rows.reshape(-1, d)).reshape(batch_size, V, d)


def _is_cache(x) -> bool:
    """Whether ``x`` is a Hugging Face ``Cache`` (``transformers.cache_utils``: the keys and values,
    or a recurrence's states, a model keeps across calls)."""
    return any(c.__name__ == "Cache" and c.__module__ == "transformers.cache_utils" for c in type(x).__mro__)


#: PyTorch's transformer modules: every tensor inside one is laid out as its ``batch_first`` says
#: (they keep it on their attention, ``self_attn.batch_first``; ``nn.Transformer`` on itself).
TRANSFORMER_MODULES = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                       nn.TransformerDecoderLayer)


def declared_batch_first(module: nn.Module) -> bool | None:
    """The layout ``module`` declares for its inputs, PyTorch's way: its ``batch_first`` (True:
    ``[B, T, ...]``, False: ``[T, B, ...]``), where it has one. PyTorch's transformer layers and
    stacks declare theirs through their attention (``self_attn.batch_first``)."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        module = module.self_attn
    elif isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        module = module.layers[0].self_attn if len(module.layers) else None
    declared = getattr(module, "batch_first", None)
    return declared if isinstance(declared, bool) else None


class GenericRule(PerSampleGradsRule):
    """Exact per-sample gradients of an arbitrary module's own parameters.

    Where every op of the forward that uses one of them broadcasts it over the samples
    (``expand``, ``+``, ``-``, ``*`` with a batched tensor: a class token, a position table, a
    layer scale), the per-sample gradients are reductions of those ops' output grads, recorded by
    ``DirectUseRecorder`` (route "generic (broadcast uses)"). Where some are products of a weight
    with rows whose samples the recorder followed (experts, routers), their norms come from the
    products ("generic (row uses)", ``experts.rows_norms``). Where a convolution or ``F.linear``
    takes the input and a weight computed from the parameters alone (weight standardisation, a
    parametrization), each sample's vjp of that op is taken back through the weight's ops
    (``ProductUse``, "generic (computed weights)"). Otherwise the module's forward is replayed per
    sample with ``vmap(vjp(functional_call))`` ("generic (vmap vjp)").
    """

    param_names = ()

    def batch_dim(self, module: nn.Module) -> int:
        # Modules that follow PyTorch's batch_first convention put samples in dim 1 otherwise.
        return 1 if declared_batch_first(module) is False else 0

    def _leaf_dim(self, module, position: int, bdim: int) -> int:
        """The batch dimension of the ``position``-th tensor of a call's inputs or outputs (``bdim``,
        the call's). Recurrent layers keep samples in dim 1 of their hidden states (``h_0``/``c_0``,
        ``h_n``/``c_n``, every tensor after the first) even with ``batch_first=True``."""
        if isinstance(module, nn.RNNBase) and position > 0:
            return 1
        return bdim

    def capture(self, module, args, kwargs, output, batch_dim: int | None = None):
        """``batch_dim``: where the tracker placed this call's samples (dim 1 of a ``[T, B, ...]``
        input it proved so); None: the module's own layout (``batch_dim``)."""
        bdim = self.batch_dim(module) if batch_dim is None else batch_dim
        leaves, spec = tree_flatten((args, kwargs))
        # A key/value or state cache is left out of the replays: the forward has already written
        # this call's states into it (a replay would write each sample's again, into the batch's
        # cache, and fail on its sizes: Jamba's Mamba layers under the default use_cache=True).
        # A training forward starts from an empty cache, where None computes the same; one that
        # read states stored before (a continued sequence) gives other outputs replayed, which
        # _check_replayed refuses.
        caches = [i for i, x in enumerate(leaves) if _is_cache(x)]
        raw = leaves
        leaves = [None if i in caches else x.detach() if isinstance(x, torch.Tensor) else x
                  for i, x in enumerate(leaves)]
        tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        dims = {i: self._leaf_dim(module, k, bdim) for k, i in enumerate(tensors)}
        sizes = [leaves[i].shape[dims[i]] for i in tensors if leaves[i].dim() > dims[i]]
        out_leaves, _ = tree_flatten(output)
        if not sizes:
            # No input at all (Swin's relative-position bias: a lookup in its own table): an output
            # of one row, broadcast over the samples later, is shared by them (the tracker watches it).
            shared = [o for o in out_leaves if isinstance(o, torch.Tensor) and o.requires_grad]
            if not shared or any(o.dim() <= bdim or o.shape[bdim] != 1 for o in shared):
                raise RuleError(f"{type(module).__name__} got no tensor input with a batch dimension (dim {bdim}), "
                                "and its output has no batch dimension of 1 to be shared by the samples; divebatch "
                                "needs batched inputs to split the gradient per sample")
            sizes = [1]
        B = sizes[0]
        in_dims = [dims[i] if i in dims and leaves[i].dim() > dims[i] and leaves[i].shape[dims[i]] == B else None
                   for i in range(len(leaves))]
        in_spans = [1] * len(leaves)
        for i in tensors:
            if in_dims[i] is None and dims[i] == 0 and leaves[i].dim() > 0 and leaves[i].shape[0] > B > 0:
                # [B*k, ...] rows the graph shows merged from [B, k, ...]: each sample's k rows.
                lead = flattened_samples(raw[i], batch=B) if raw[i].requires_grad else None
                if lead is not None and lead[0] == B and B * lead[1] == leaves[i].shape[0]:
                    in_dims[i], in_spans[i] = 0, lead[1]
        out_tensors = [i for i, o in enumerate(out_leaves) if isinstance(o, torch.Tensor)]
        index = [i for i in out_tensors if out_leaves[i].requires_grad]
        outputs = [(out_leaves[i].shape, out_leaves[i].dtype) for i in index]
        out_dims = [self._leaf_dim(module, out_tensors.index(i), bdim) for i in index]
        out_sizes = {out_leaves[i].shape[d] for i, d in zip(index, out_dims) if out_leaves[i].dim() > d}
        input_batch = None
        if out_sizes and B not in out_sizes:
            # No output has the inputs' samples (e.g. a position table's [1, T, d] rows, broadcast over
            # the batch later): its gradient arrives summed over samples. The tracker's batch check
            # refuses that with a hint, rather than vmap failing on the sizes. (A module that flattens
            # samples and tokens inside, a router's [B*T, E] logits, may still be read from its
            # products: see the tracker's _on_forward.)
            input_batch, B = B, min(out_sizes)
        device = leaves[tensors[0]].device.type if tensors else "cpu"
        autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        # (Not where the outputs do not have the inputs' samples: such calls are refused or read otherwise.)
        expected = ([(out_leaves[i].detach(), out_leaves[i]._version) for i in index] if input_batch is None
                    else None)
        return GenericCall(leaves, spec, in_dims, B, outputs, index, out_dims, input_batch=input_batch,
                           autocast=autocast, expected_outputs=expected, cache_left_out=bool(caches),
                           in_spans=in_spans if any(k > 1 for k in in_spans) else None, batch_dim=batch_dim)

    def batch_size(self, module, ctx):
        return ctx.batch_size

    @staticmethod
    def as_rows(call: GenericCall, lead: tuple[int, ...]) -> GenericCall | None:
        """``call`` with its ``N = B*T`` rows grouped by sample, or None where that does not apply.

        For a module called on samples and tokens flattened into rows (a mixture-of-experts block's
        router and experts take ``[B*T, d]`` with ``[B*T, k]`` routing tensors): every batched
        input and every output must have the ``N`` rows in dim 0. They are kept as
        ``[B, T, ..., *rest]``, and each sample is replayed on its own ``T`` rows, as the module
        itself would be called on a batch of those rows alone. That is exact for a module that
        treats rows independently; one that mixes rows of different samples gives per-sample
        gradients whose sum differs from autograd's, which the tracker's accounting check refuses.
        """
        n = call.batch_size
        if (len(lead) < 2 or call.rows is not None or call.in_spans is not None
                or any(d not in (None, 0) for d in call.in_dims)
                or any(d != 0 or not shape or shape[0] != n for (shape, _), d in zip(call.outputs, call.out_dims))):
            return None
        leaves = [x.reshape(*lead, *x.shape[1:]) if d is not None else x for x, d in zip(call.leaves, call.in_dims)]
        return replace(call, leaves=leaves, batch_size=lead[0], rows=tuple(lead), direct_uses=None)

    def norms(self, module, calls, tracked):
        """Per-sample squared norms [B], a chunk of samples at a time: only a chunk's per-sample
        gradients (at most ``MAX_EXTRA_BYTES``) exist at once, not ``B`` copies of the parameters'
        (a mixture of experts' weights, replayed one sample at a time, would hold ``B`` of them).
        Where every call's uses were recorded and some are products with rows (experts, routers),
        those parameters' norms come from the products (``experts.rows_norms``), never from
        per-sample gradients; so do those of a standardised weight's parameters
        (``standardised.py``)."""
        standardised = []
        if len(calls) == 1:
            call, grads = calls[0]
            uses_grads = grads[len(call.outputs):]
            standardised = [(call.direct_uses[i], uses_grads[i]) for i in self._standardised(call, tracked)
                            if uses_grads[i] is not None]
        calls[0][0].standardised = False
        if standardised:
            sq = 0
            for use, g in standardised:
                part, weight_grad = use.other.standardised.norms(use.other.func, use.other.x, g, use.other.arguments,
                                                                 use.other.params, tracked, call.batch_size)
                sq = sq + part
                if weight_grad is not None and use.other.fused_standardised:
                    use.other.weight_sums[(0, call.batch_size)] = weight_grad
            covered = {name for use, _ in standardised for name in use.other.params}
            rest = {name: p for name, p in tracked.items() if name not in covered}
            sq = sq + self.norms(module, calls, rest) if rest else sq
            calls[0][0].standardised = True
            return sq
        rows = self._rows_only(calls)
        if rows is not None:
            B = calls[0][0].batch_size
            sq = sum(rows_norms(entries, B, tracked[name].shape[0] if entries[0][0].stacked else 1)
                     for name, entries in rows.items())
            rest = {name: p for name, p in tracked.items() if name not in rows}
            if rest:
                sq = sq + per_sample_sq_sum(self.per_sample_grads(module, calls, rest).values())
            return sq
        return torch.cat([per_sample_sq_sum(chunk.values())
                          for chunk in self._sample_chunks(module, calls, tracked)])

    @staticmethod
    def _standardised(call: GenericCall, tracked) -> list[int]:
        """Indices of the call's standardised products whose norms come in closed form (where the
        module is called once): every use was recorded, and no other use shares their parameters
        (some tracked), whose per-sample gradients would add before squaring."""
        uses = call.direct_uses
        if uses is None or call.extra_params:
            return []
        names = [set(use.other.params) if use.kind == "product" else
                 set(use.computed.params) if use.computed is not None else {use.name} for use in uses]
        return [i for i, use in enumerate(uses)
                if use.kind == "product" and use.other.standardised is not None and names[i] & set(tracked)
                and not any(names[i] & other for j, other in enumerate(names) if j != i)]

    @staticmethod
    def _rows_only(calls) -> dict[str, list] | None:
        """The recorded products by parameter, where every call's uses were recorded (no replay) and
        some are products; else None."""
        if any(call.direct_uses is None or call.extra_params for call, _ in calls):
            return None
        entries = _rows_entries([(call.direct_uses, list(grads[len(call.outputs):])) for call, grads in calls])
        return entries or None

    def grad_sums(self, module, calls, tracked):
        rows = self._rows_only(calls)
        if rows is not None:
            B = calls[0][0].batch_size
            total = {name: rows_grad_sum(entries, B, tracked[name].shape) for name, entries in rows.items()}
            rest = {name: p for name, p in tracked.items() if name not in rows}
            if rest:
                total.update({name: t.sum(dim=0) for name, t in self.per_sample_grads(module, calls, rest).items()})
            for name, p in tracked.items():
                total.setdefault(name, torch.zeros(p.shape, dtype=torch.float32, device=p.device))
            return total
        total: dict[str, torch.Tensor] = {}
        for chunk in self._sample_chunks(module, calls, tracked):
            for name, t in chunk.items():
                total[name] = t.sum(dim=0) if name not in total else total[name] + t.sum(dim=0)
        return total

    def _sample_chunks(self, module, calls, tracked):
        """``per_sample_grads`` for consecutive slices of the samples, bounded in memory."""
        params = list(tracked.values()) + [module.get_parameter(name) for call, _ in calls
                                           for name in call.extra_params]
        chunk = _samples_per_chunk(sum(p.numel() for p in params), params[0].device.type if params else "cpu")
        B = calls[0][0].batch_size
        for start in range(0, B, chunk):
            yield self.per_sample_grads(module, calls, tracked, slice(start, min(B, start + chunk)))

    def per_sample_grads(self, module, calls, tracked, samples: slice | None = None) -> dict[str, torch.Tensor]:
        """``{name: [B, *param_shape]}`` float32, summed over the calls (only ``samples``, if given)."""
        # Copies: a replay must not change the module's state (a BatchNorm's running statistics, a
        # counter); a replay whose outputs then differ from the forward's is refused (_check_replayed).
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        total: dict[str, torch.Tensor] = {}
        for call, grads in calls:
            if call.direct_uses is not None:
                # Every use of the module's own parameters (and of those of inner modules it did not
                # call) was read: their per-sample gradients come from those ops' output grads (no replay).
                uses_grads = list(grads[len(call.outputs):])
                params = dict(tracked, **{name: module.get_parameter(name) for name in call.extra_params})
                for name, g in _direct_per_sample(call.direct_uses, uses_grads, params, call.batch_size,
                                                  samples).items():
                    total[name] = g if name not in total else total[name] + g
                continue
            params = {name: p.detach() for name, p in tracked.items()}
            params.update({name: module.get_parameter(name).detach() for name in call.extra_params})
            grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=_device(call))
                     for g, (shape, dtype) in zip(grads[:len(call.outputs)], call.outputs)]
            bdim = self.batch_dim(module) if call.batch_dim is None else call.batch_dim
            for name, g in self._per_sample_grads(module, call, grads, params, buffers, bdim, samples).items():
                total[name] = g.float() if name not in total else total[name] + g.float()
        return total

    def _per_sample_grads(self, module, call: GenericCall, grads, params, buffers, bdim, samples=None):
        if call.computed_outputs is not None:
            # Outputs computed from the parameters alone: each sample's output grads taken back through
            # that computation (no replay of the forward).
            total = {name: torch.zeros(call.batch_size if samples is None else samples.stop - samples.start,
                                       *p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
            for use, g, (shape, _) in zip(call.computed_outputs, grads, call.outputs):
                g = g if samples is None else g[samples]
                for name, t in use.per_sample(g.reshape(g.shape[0], *shape)).items():
                    total[name] = total[name] + t
            return total
        spans_in = call.in_spans or [1] * len(call.leaves)
        batched_leaves = [x.unflatten(d, (-1, k)) if k > 1 else x
                          for x, d, k in zip(call.leaves, call.in_dims, spans_in) if d is not None]
        leaf_dims = [d for d in call.in_dims if d is not None]
        grad_shapes = [g.shape for g in grads]
        if call.rows is None:
            def one_call(x, d):  # one sample as a batch of one
                return x.unsqueeze(d)
        else:
            grads = [g.reshape(*call.rows, *g.shape[1:]) for g in grads]

            def one_call(x, d):  # one sample's rows, as the module takes them: [T, ..., *rest] -> [T*..., *rest]
                return x.flatten(0, len(call.rows) - 2)

        # The outputs each sample's replay must give again, laid out as its output grads: compared
        # after the replay (_check_replayed). Not those changed in place since the forward (code after
        # the module may scale its output in place), nor a call whose rows are other samples'.
        # (Nor a call made the B samples' after its forward: an output shared by them, given their grads.)
        expected = [e if e._version == version else None for e, version in call.expected_outputs or []]
        if (call.input_samples is not None or None in expected
                or any(e.shape != shape for e, shape in zip(expected, grad_shapes))):
            expected = []
        if call.rows is not None:
            expected = [e.reshape(*call.rows, *e.shape[1:]) for e in expected]
        # An output whose batch dim holds k rows per sample ([B*H, T, T]: WavLM's position bias, made
        # from [B, H, T, T] by a view, so sample-major): grouped [B, k, ...], each sample's replay
        # gives its k rows (the check above refuses another order). (Its rows were sliced as if they
        # were samples' before: wrong wherever its gradient was not zero.)
        spans = [shape[d] // call.batch_size
                 if call.rows is None and len(shape) > d and shape[d] != call.batch_size and shape[d] % call.batch_size == 0
                 else 1 for (shape, _), d in zip(call.outputs, call.out_dims)]
        grads = [g.unflatten(d, (-1, k)) if k > 1 else g for g, d, k in zip(grads, call.out_dims, spans)]
        expected = [e.unflatten(d, (-1, k)) if k > 1 else e for e, d, k in zip(expected, call.out_dims, spans)]

        def one_output(x, d, k):  # one sample's part of an output, as its replay gives it
            return x if k > 1 else one_call(x, d)

        if samples is not None:
            batched_leaves = [x.narrow(d, samples.start, samples.stop - samples.start)
                              for x, d in zip(batched_leaves, leaf_dims)]
            grads = [g.narrow(d, samples.start, samples.stop - samples.start) for g, d in zip(grads, call.out_dims)]
            expected = [e.narrow(d, samples.start, samples.stop - samples.start) for e, d in zip(expected, call.out_dims)]
        n_grads = len(grads)
        grads = grads + expected  # (vmapped alike: each sample's own rows)
        grad_dims = list(call.out_dims) + (list(call.out_dims) if expected else [])

        def replay_error(outs, sample_grads):
            """Per sample: (largest difference between a replayed output and the forward's, largest
            entry of the forward's), zeros where nothing is compared."""
            pairs = [(o.detach().float(), one_output(e, d, k).float())
                     for o, e, d, k in zip(outs, sample_grads[n_grads:], call.out_dims, spans)]
            zero = torch.zeros((), device=_device(call))
            return (torch.stack([(o - e).abs().amax() for o, e in pairs]).amax() if pairs else zero,
                    torch.stack([e.abs().amax() for _, e in pairs]).amax() if pairs else zero)

        def forward(p, sample_leaves):
            it = iter(sample_leaves)
            leaves = [x if d is None else next(it) if k > 1 else one_call(next(it), d)
                      for x, d, k in zip(call.leaves, call.in_dims, spans_in)]
            args, kwargs = tree_unflatten(leaves, call.spec)
            # SDPA's math kernel: under torch.func the fused CPU kernel is chosen even for an
            # attn_mask that needs a gradient (a relative-position bias: timm's BEiT), and refuses it.
            with sdpa_kernel(SDPBackend.MATH):
                out_leaves, _ = tree_flatten(functional_call(module, (p, buffers), args, kwargs))
            return [out_leaves[i] for i in call.output_index]

        def one_sample(sample_leaves, sample_grads):
            outs, pullback = vjp(partial(forward, sample_leaves=sample_leaves), params)
            found = pullback([one_output(g, d, k) for g, d, k in zip(sample_grads[:n_grads], call.out_dims, spans)])[0]
            return found, replay_error(outs, sample_grads)

        def one_sample_by_autograd(sample_leaves, sample_grads):
            live = {name: p.detach().requires_grad_() for name, p in params.items()}
            outs = forward(live, sample_leaves)
            pairs = [(o, one_output(g, d, k)) for o, g, d, k in zip(outs, sample_grads[:n_grads], call.out_dims, spans)
                     if o.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], list(live.values()), [g for _, g in pairs],
                                        allow_unused=True, materialize_grads=True) if pairs else None
            return ({name: torch.zeros_like(p) if grads is None else g
                     for (name, p), g in zip(live.items(), grads or [None] * len(live))},
                    replay_error(outs, sample_grads))

        chunk = _samples_per_chunk(sum(p.numel() for p in params.values()),
                                   next(iter(params.values())).device.type if params else "cpu")
        try:
            # A second guard beside randomness="error", for draws it may not see (ops that vmap
            # runs through its per-sample fallback): a changed CPU RNG state.
            with (torch.enable_grad(), suspend_capture(), torch.random.fork_rng(devices=[]), _parametrizations_uncached(),
                  _forward_autocast(call)):
                before = torch.get_rng_state()
                result, errors = vmap(one_sample, in_dims=(leaf_dims, grad_dims), randomness="error",
                                      chunk_size=chunk)(batched_leaves, grads)
                if not torch.equal(before, torch.get_rng_state()):
                    raise _random_forward(module)
                return _check_replayed(module, call, result, errors)
        except RuleError:
            raise
        except RuntimeError as err:
            if "randomness" in str(err):
                raise _random_forward(module) from err
            # Some backward formulas have no batching rule (GRU's and RNN's fused cells write in
            # place), and an autograd.Function without ``setup_context`` (a straight-through
            # estimator's, a custom kernel's) no torch.func transform at all: the same
            # vector-Jacobian products, one sample at a time, by autograd.
            try:
                with _forward_autocast(call):
                    return self._per_sample_grads_looped(module, call, one_sample_by_autograd, batched_leaves,
                                                         leaf_dims, grads, grad_dims)
            except RuleError:
                raise
            except Exception as looped:  # (a BatchNorm in training mode refuses a batch of one)
                raise RuleError(
                    f"{type(module).__name__}'s forward cannot be replayed on one sample at a time (the generic "
                    f"route's replay): {type(looped).__name__}: {looped}. A layer inside it that needs the whole "
                    "batch (a BatchNorm in training mode) couples the samples: put it outside the module (its own "
                    "module), call .eval() on it, or freeze this module's parameters") from looped

    @staticmethod
    def _per_sample_grads_looped(module, call, one_sample, batched_leaves, leaf_dims, grads, grad_dims):
        rows, errors = [], []
        with torch.enable_grad(), suspend_capture(), torch.random.fork_rng(devices=[]), _parametrizations_uncached():
            for b in range(grads[0].shape[grad_dims[0]]):  # the samples of this chunk
                before = torch.get_rng_state() if b == 0 else None
                row, error = one_sample([x.select(d, b) for x, d in zip(batched_leaves, leaf_dims)],
                                        [g.select(d, b) for g, d in zip(grads, grad_dims)])
                rows.append(row)
                errors.append(error)
                if before is not None and not torch.equal(before, torch.get_rng_state()):
                    raise _random_forward(module)
        result = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        return _check_replayed(module, call, result, tuple(torch.stack(e) for e in zip(*errors)))

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        numel = (sum(p.numel() for p in tracked.values())
                 + sum(module.get_parameter(name).numel() for name in getattr(ctx, "extra_params", ())))
        if ctx.direct_uses is not None and any(u.kind == "rows" for u in ctx.direct_uses):
            products = sum(u.kind == "rows" for u in ctx.direct_uses)
            return RoutePlan("generic (row uses)", f"B={ctx.batch_size} params={numel} products={products}",
                             float("nan"), float("nan"))
        if ctx.standardised:
            products = sum(u.kind == "product" for u in ctx.direct_uses)
            return RoutePlan("generic (standardised weights)", f"B={ctx.batch_size} params={numel} products={products}",
                             float("nan"), float("nan"))
        if ctx.direct_uses is not None and any(u.kind == "product" or u.computed is not None for u in ctx.direct_uses):
            products = sum(u.kind == "product" or u.computed is not None for u in ctx.direct_uses)
            return RoutePlan("generic (computed weights)", f"B={ctx.batch_size} params={numel} products={products}",
                             float("nan"), 4.0 * min(_samples_per_chunk(numel, grad.device.type), ctx.batch_size) * numel)
        if ctx.direct_uses is not None:
            return RoutePlan("generic (broadcast uses)", f"B={ctx.batch_size} params={numel} uses={len(ctx.direct_uses)}",
                             float(2 * ctx.batch_size * numel), 4.0 * ctx.batch_size * numel)
        chunk = _samples_per_chunk(numel, grad.device.type)
        if ctx.computed_outputs is not None:
            return RoutePlan("generic (computed weights)", f"B={ctx.batch_size} params={numel} outputs="
                             f"{len(ctx.computed_outputs)}", float("nan"), 4.0 * numel * min(chunk, ctx.batch_size))
        return RoutePlan("generic (vmap vjp)", f"B={ctx.batch_size} params={numel}", float("nan"),
                         4.0 * numel * min(chunk, ctx.batch_size))


def _forward_autocast(call: GenericCall):
    """The autocast the call's forward ran under (see ``GenericCall.autocast``), or none."""
    if call.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(call.autocast[0], dtype=call.autocast[1])


@contextlib.contextmanager
def _parametrizations_uncached():
    """A replay inside ``parametrize.cached()`` (a backward run in that block) must compute each
    parametrized tensor from the parameters it is given, not take the forward's from the cache
    (nor leave its own there)."""
    from torch.nn.utils import parametrize

    enabled, parametrize._cache_enabled = parametrize._cache_enabled, 0
    try:
        yield
    finally:
        parametrize._cache_enabled = enabled


def _samples_per_chunk(numel: int, device_type: str) -> int:
    """Samples whose per-sample gradients (``numel`` float32 each) fit ``routes.max_extra_bytes``
    on ``device_type`` (``MAX_EXTRA_BYTES``; more on CUDA, where each chunk costs launches); at least 1."""
    return max(1, int(max_extra_bytes(device_type) // max(1, 4 * numel)))


def _check_replayed(module, call: GenericCall, result: dict, errors: tuple) -> dict:
    """``result`` (the replay's per-sample gradients), once each sample's replayed outputs are the
    forward's (``errors``: per sample, the largest difference and the outputs' largest entry, zeros
    where nothing was compared): a replay that computed other outputs differentiated another
    function, and is refused."""
    differences, scales = errors
    scale = scales.amax().clamp_min(torch.finfo(torch.float32).tiny)
    relative = (differences.amax() / scale).item()
    low_precision = call.autocast is not None or any(dtype not in (torch.float32, torch.float64)
                                                     for _, dtype in call.outputs)
    if relative <= (5e-2 if low_precision else 1e-4):
        return result
    if call.cache_left_out:
        raise RuleError(
            f"{type(module).__name__} was given a cache (past_key_values, cache_params) that holds states from "
            "before this forward (a continued sequence, a prefix): its per-sample gradients come from replaying "
            "its forward without the cache, which gives other outputs here (largest difference "
            f"{relative:.2g} of the outputs' scale). Pass no cache to tracked training steps (use_cache=False, no "
            "past_key_values), or freeze this module's parameters")
    raise RuleError(
        f"{type(module).__name__}'s forward, replayed on one sample at a time (the generic route's replay), gives "
        f"other outputs than it gave the batch (largest difference {relative:.2g} of the outputs' scale): it "
        "couples the samples (a BatchNorm in training mode inside it, a statistic over the batch) or depends on "
        "state its forward changes (a buffer updated per call), so a sample's gradient of it is not that of its "
        "own loss. Put such a layer outside the module (its own module: a BatchNorm's norms are then its "
        "documented decomposition), call .eval() on it, or freeze this module's parameters")


def _random_forward(module) -> RuleError:
    return RuleError(
        f"{type(module).__name__} draws random numbers in its forward (dropout in training mode?), "
        "so its per-sample gradients cannot be replayed exactly; set its dropout to 0, call "
        ".eval() on it, or freeze its parameters")


def _device(call: GenericCall) -> torch.device:
    for x in call.leaves:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


GENERIC = GenericRule()


_IN_PLACE_SIGNS = {torch.Tensor.__iadd__: 1.0, torch.Tensor.add_: 1.0, torch.Tensor.__isub__: -1.0, torch.Tensor.sub_: -1.0}


# Ops that rearrange one tensor without mixing its entries with others': a shared output may pass
# through them before it is broadcast over the samples (T5 permutes its relative-position bias
# and adds a batch dim).
_SHAPE_OPS = _ALIAS_OPS | {
    torch.permute, torch.Tensor.permute, torch.transpose, torch.Tensor.transpose, torch.Tensor.contiguous,
    torch.Tensor.t, torch.t, torch.flatten, torch.Tensor.flatten, torch.Tensor.unflatten,
    # ``x.T``, ``x.mT``, ``x.H``, ``x.mH``: the getter arrives as the op (method-wrappers, equal to these)
    torch.Tensor.T.__get__, torch.Tensor.mT.__get__, torch.Tensor.H.__get__, torch.Tensor.mH.__get__,
}


# Ops that pick each entry from one tensor or another by a mask: with a [B, ...] mask they
# broadcast a shared output over the samples (see SharedOutputWatcher._selected).
_WHERES = {torch.where}
_WHERE_METHODS = {torch.Tensor.where}
_SELECTIONS = _WHERES | _WHERE_METHODS | {torch.masked_fill, torch.Tensor.masked_fill}

# Ops that draw random numbers: a replay in the vjp would draw others (dropout has its own rule).
_RANDOM_OPS = {F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu,
               torch.rrelu, torch.bernoulli, torch.Tensor.bernoulli}

# Ops that change neither the shape nor the place of any value (a row-expanded alias may pass them).
_KEEPS_LAYOUT = {torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float, torch.Tensor.half,
                 torch.Tensor.bfloat16, torch.Tensor.type_as}

_HOLE = object()  # where a recorded op took the followed tensor
# Products of ``[rows, m, k]`` by ``[rows, k, n]``, row by row (repeated copies meet their rows there).
_BATCHED_PRODUCTS = {torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_MAX_CHAIN = 16  # ops followed from the shared output to one use (then the use is not split)


class SharedOutputWatcher:
    """Follows the output of a module called once for all samples (an Embedding looked up with
    ``[1, T]`` position ids, as GPT-2 and BART do by default, or with no batch dim at all, as T5's
    relative-position bias) while the forward goes on. Ops that only rearrange it (``.to``,
    ``permute``, ``unsqueeze``, ...) are followed; each op that broadcasts it (or such a
    rearrangement with a leading dim of 1) over the B samples (``+``, ``-``, ``*`` with a
    ``[B, ...]`` tensor, ``h += p`` in place too) gets a gradient hook. Its output grad, reduced
    per sample and taken back through the rearrangements (``vmap`` of their ``vjp``), accumulates
    in ``per_sample`` [B, *output.shape] (float32).

    Autograd sums those parts over the samples before the module's own output grad, which
    therefore serves as the check: ``per_sample`` stands only if its sum over samples equals it
    (``complete``), so a use the watcher did not see or could not split falls back to the
    module's own output grad, never to a partial sum. B is read off the first op whose output has
    more than one row; the tracker's batch check compares it with the other layers'. Rows that are
    not the tracker's batch (each image's windows, Swin's ``[B * windows, ...]``) are grouped by
    the samples the graph of the tensor they meet proves them to be (``_samples``); an ``alias + c``
    with a constant of such rows (a shifted-window mask) is followed to where it meets them
    (``row_expanded``).

    It sees the forward's ops through a ``SharedOutputWatchers`` mode, which hands it those that
    touch a tensor it follows (``handle``)."""

    def __init__(self, output: torch.Tensor, batch_hint: int | None = None, shared_nodes=frozenset):
        self.shared_nodes = shared_nodes  # () -> graph nodes of every watched output (for flattened_samples)
        self.output = output
        self.batch_size: int | None = None
        # The tracker's batch so far: rows of another number (each image's windows folded into the
        # batch dim, Swin's [B * windows, N, C]) are grouped by sample where the graph proves them so.
        self.batch_hint = batch_hint
        # id -> (sign, shape of the shared alias): ``alias + c`` with a constant ``c`` of several rows
        # (Swin's shifted-window mask, [B * windows, 1, N, N]): the alias repeated over those rows,
        # whose samples are known only where they meet a tensor whose rows the graph proves.
        self.row_expanded: dict[int, tuple[float, torch.Size]] = {}
        self.passing = False  # an op of the tracker's own (expanded_over_rows): not a use
        # id -> (tensor, the shape ops from ``output`` to it: (func, args after the tensor, kwargs))
        self.aliases: dict[int, tuple[torch.Tensor, tuple]] = {id(output): (output, ())}
        self.per_sample: torch.Tensor | None = None
        # id -> (tensor, copies n, the alias's shape, chain to the alias, shape ops after the repeat,
        # the repeat's output shape): ``alias.repeat(n, 1, ...)`` with n a multiple of the batch (a
        # multiple-choice head's merged rows, DeBERTa-v2's ``repeat(B*C, 1, 1)``), whose copies are
        # given samples only where a product pairs them with rows the graph proves (``_copies_use``).
        self.copies: dict[int, tuple] = {}
        self.unknown_use = False
        self.unknown_op: str | None = None  # the first use it could not split, named in errors
        self.broadcasts = 0  # ops seen broadcasting the output over the samples
        self.unreadable_masks: list[torch.Tensor] = []  # 0-d: a dropout whose mask has entries it cannot read
        # Signs of a reentrant activation checkpoint, named in errors: its first forward runs under
        # no_grad, and its blocks recompute in the backward on detached copies of their inputs.
        self.used_without_grad = False
        self.recomputed = torch._C._current_graph_task_id() != -1  # created inside a backward
        # Under autocast the uses run in float16/bfloat16 even where the output is float32 (a
        # LayerNorm's): autograd's sum of their parts is rounded at that precision.
        self.low_precision = output.dtype in _HALF or any(map(torch.is_autocast_enabled, ("cpu", "cuda")))

    def expanded_over_rows(self, output: torch.Tensor, rows: int) -> torch.Tensor:
        """``output`` (``[1, ...]``, the watched output) expanded to ``rows`` rows that are not known
        to be the samples (a lookup of ids expanded over merged rows), followed as ``alias + c`` is."""
        self.passing = True
        try:
            out = output.expand(rows, *output.shape[1:])
        finally:
            self.passing = False
        self.aliases[id(out)] = (out, self.aliases[id(output)][1])
        self.row_expanded[id(out)] = (1.0, output.shape)
        return out

    def touches(self, args, kwargs) -> bool:
        """Whether an op's arguments may hold a tensor this watcher follows (a cheap first test)."""
        return not self.passing and (_touches(args, kwargs, self.aliases)
                                     or (bool(self.copies) and _touches(args, kwargs, self.copies)))

    def handle(self, run, func, args, kwargs):
        """An op ``func`` of the forward that ``touches`` a followed tensor: runs it by ``run(*args,
        **kwargs)`` (the op itself, or the next watcher's ``handle`` of it) and follows or hooks its output."""
        if func is F.scaled_dot_product_attention and not self.unknown_use:
            out = self._attention_mask(run, args, kwargs)
            if out is not None:
                return out
        out = run(*args, **kwargs)
        if self.copies and (_hits(args, self._is_copies) or _nested(args, kwargs, self._is_copies)):
            if not self.unknown_use and _carries_grad(out) and not self._copies_use(func, args, kwargs, out):
                self.unknown_use = True
                self.unknown_op = getattr(func, "__name__", None) or repr(func)
            return out
        hits = _hits(args, self._is_alias)
        if hits == [0, 1] and func in _LIKE_OPS:
            hits = [0]  # ``alias.view_as(alias)`` (an autograd.Function returning its input): args[1] gives a shape
        inside = _nested(args, kwargs, self._is_alias)
        if (hits or inside) and not torch.is_grad_enabled():
            self.used_without_grad = True
        if (not hits and not inside) or self.unknown_use or not _carries_grad(out):
            return out
        if func is F.dropout and hits == [0] and not inside and self._dropout(args, kwargs, out):
            return out  # (before the rearrangements: a replay of the dropout would draw another mask)
        if (len(hits) == 1 and not inside and isinstance(out, torch.Tensor) and self._still_shared(func, args, kwargs, out)
                and len(self.aliases[id(args[hits[0]])][1]) < _MAX_CHAIN and _out_of_place(func) is not None):
            template = tuple(_HOLE if i == hits[0] else a for i, a in enumerate(args))
            # (replayed out of place: ``pos /= scale`` on the alias is ``pos / scale`` in the vjp,
            # ``F.relu(pos, inplace=True)`` is ``F.relu(pos)``)
            replay_kwargs = dict(kwargs, inplace=False) if kwargs.get("inplace") else kwargs
            chain = self.aliases[id(args[hits[0]])][1] + ((_out_of_place(func), template, replay_kwargs),)
            self.aliases[id(out)] = (out, chain)
            return out
        if func is torch.Tensor.repeat and hits == [0] and not inside and self._repeat(args, kwargs, out):
            return out
        if func in _MATMULS and len(hits) == 1 and len(args) == 2 and not inside and self._product(args, hits[0], out):
            return out
        if (func is F.linear and hits == [1] and len(args) == 2 and not kwargs and not inside
                and self._rows_product(args[0], args[1], out, transposed=True)):
            return out  # ``F.linear(x, alias)``: ``x @ alias.mT``
        if func in _SELECTIONS and len(hits) == 1 and not inside and self._selected(func, args, kwargs, hits[0], out):
            return out
        if (func in (torch.Tensor.expand, torch.Tensor.expand_as) and hits == [0] and not inside
                and isinstance(out, torch.Tensor) and self._expanded(args[0], out)):
            return out
        kind = _DIRECT_KINDS.get(func)
        sign = _IN_PLACE_SIGNS.get(func)
        if kind is not None and kind != "expand" and len(hits) == 1:
            sign = _sign(kind, hits[0])
        elif sign is not None and hits != [1]:
            sign = None  # ``p += x`` changes the shared output itself
        alias = args[hits[0]] if len(hits) == 1 else None
        other = args[1 - hits[0]] if len(args) == 2 and len(hits) == 1 else None
        expanded = self.row_expanded.get(id(alias)) if alias is not None else None
        if (sign is not None and kind in ("add", "sub", "rsub") and expanded is None and not inside and not kwargs
                and isinstance(other, torch.Tensor) and not other.requires_grad and isinstance(out, torch.Tensor)
                and out.dim() == alias.dim() and alias.shape[0] == 1 and out.shape[0] > 1
                and other.shape[0] == out.shape[0] and self.batch_hint is not None and out.shape[0] != self.batch_hint):
            # ``alias + c`` with a constant of several rows that are not the samples: which sample each
            # row is for is known where it meets rows the graph proves (the attention's queries).
            self.aliases[id(out)] = (out, self.aliases[id(alias)][1])
            self.row_expanded[id(out)] = (sign, alias.shape)
            return out
        samples = None
        chain = self.aliases[id(alias)][1] if alias is not None else ()
        if (sign is not None and expanded is None and not inside and not kwargs and isinstance(other, torch.Tensor)
                and isinstance(out, torch.Tensor) and 0 < alias.dim() < out.dim() and len(chain) < _MAX_CHAIN):
            # Broadcast from fewer dims (nanoGPT's ``tok_emb + pos_emb``, [B, T, d] + [T, d]): the alias
            # counts as viewed with leading dims of 1, which that view's vjp takes back off.
            samples = self._samples(other, out.shape[0])
            if samples is not None:
                alias_shape, chain = self._with_leading_ones(alias, out.dim(), chain)
        elif (sign is not None and not inside and not kwargs and isinstance(other, torch.Tensor)
                and isinstance(out, torch.Tensor) and out.dim() > 0 and out.dim() == alias.dim()
                and alias.shape[0] in (1, out.shape[0]) and (alias.shape[0] == 1 or expanded is not None)):
            samples = self._samples(other, out.shape[0])
            alias_shape = alias.shape
        elif self.batch_size is None and isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] > 1:
            self.batch_size = out.shape[0]
        if samples is None:
            self.unknown_use = True
            self.unknown_op = getattr(func, "__name__", None) or repr(func)
            return out
        factor = other.detach() if kind == "mul" else None
        if expanded is not None:
            sign, alias_shape = sign * expanded[0], expanded[1]
        out.register_hook(partial(self._collect, sign, factor, alias_shape, chain))
        self.broadcasts += 1
        return out

    def _expanded(self, alias, out) -> bool:
        """``alias.expand(B, ...)`` or ``.expand_as(x)`` over the samples, from a leading dim of 1 or
        from fewer dims (XLM's ``position_embeddings(ids).expand_as(tensor)``, MPNet's relative bias
        ``values.expand((bsz, -1, q, k))``): row ``b`` of the expansion is sample ``b``'s, so its
        grad, summed to the alias's shape, is that sample's part."""
        chain = self.aliases[id(alias)][1]
        if not (0 < alias.dim() <= out.dim() and out.shape[0] > 1 and len(chain) < _MAX_CHAIN
                and (alias.dim() < out.dim() or alias.shape[0] == 1)) or id(alias) in self.row_expanded:
            return False
        if self._samples(None, out.shape[0]) is None:
            return False
        alias_shape, chain = self._with_leading_ones(alias, out.dim(), chain)
        out.register_hook(partial(self._collect, 1.0, None, alias_shape, chain))
        self.broadcasts += 1
        return True

    @staticmethod
    def _with_leading_ones(alias, rank: int, chain) -> tuple[torch.Size, tuple]:
        """``alias`` as broadcasting to ``rank`` dims reads it, with leading dims of 1: that shape,
        and ``chain`` with the view to it added where it adds dims (its vjp takes them back off)."""
        shape = torch.Size((1,) * (rank - alias.dim()) + tuple(alias.shape))
        return shape, (chain + ((torch.Tensor.reshape, (_HOLE, tuple(shape)), {}),) if alias.dim() < rank else chain)

    def _dropout(self, args, kwargs, out) -> bool:
        """``F.dropout`` of the alias (DeBERTa drops out its relative-position table in each layer):
        one mask for all samples, so the output is still shared. The vjp must use this forward's
        mask, not draw another: the output is followed as the alias times ``out / alias`` (the kept
        entries' ``1 / (1 - p)``, else 0), which is exact where no entry of the alias is 0 (an entry
        that is could have been kept or dropped: then the watcher's grads are not used, see
        ``complete``; checked there, so the forward does not wait for the device)."""
        bound = dict(zip(("input", "p", "training", "inplace"), args), **kwargs)
        alias = args[0]
        if out is alias:  # p = 0 or eval mode: the alias itself
            return True
        if not isinstance(out, torch.Tensor) or bound.get("inplace", False) or out.shape != alias.shape:
            return False
        if not bound.get("training", True) or bound.get("p", 0.5) == 0:
            step = (F.dropout, (_HOLE,), {"p": 0.0, "training": False})  # the identity
        else:
            kept = alias.detach()
            zero = kept == 0
            self.unreadable_masks.append(zero.any())
            step = (torch.mul, (_HOLE, torch.where(zero, 0.0, out.detach() / kept)), {})
        self.aliases[id(out)] = (out, self.aliases[id(alias)][1] + (step,))
        return True

    def _repeat(self, args, kwargs, out) -> bool:
        """``alias.repeat(B, 1, ...)``: B copies along its first dim, copy ``b`` for sample ``b``
        (DeBERTa's relative-position projections, ``[H, 2k, dh]`` repeated to meet the ``[B*H, T, dh]``
        queries). Its output grad, viewed ``[B, *alias.shape]``, is each sample's grad of the alias."""
        alias = args[0]
        repeats = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
        if (kwargs or not isinstance(out, torch.Tensor) or len(repeats) != alias.dim()
                or any(isinstance(r, bool) or not isinstance(r, int) for r in repeats)
                or repeats[0] < 2 or any(r != 1 for r in repeats[1:])):
            return False
        n, hint = repeats[0], self.batch_hint
        if hint and n != hint and n % hint == 0 and self.batch_size in (None, hint):
            self.copies[id(out)] = (out, n, alias.shape, self.aliases[id(alias)][1], (), out.shape)
            return True
        if self._samples(None, n) is None:
            return False
        out.register_hook(partial(self._collect_copies, alias.shape, self.aliases[id(alias)][1]))
        self.broadcasts += 1
        return True

    def _is_copies(self, x) -> bool:
        entry = self.copies.get(id(x)) if isinstance(x, torch.Tensor) else None
        return entry is not None and entry[0] is x

    def _copies_use(self, func, args, kwargs, out) -> bool:
        """A use of repeated copies of the alias (see ``copies``): a transpose or permute that keeps
        the first dim, followed; or a batched product (``bmm``) with a tensor of as many rows, whose
        rows the graph proves sample-major: row ``j`` of the product meets row ``j`` of the copies,
        so copy ``c`` is for the sample of the rows it meets."""
        hits = _hits(args, self._is_copies)
        if len(hits) != 1 or kwargs or not isinstance(out, torch.Tensor):
            return False
        source = args[hits[0]]
        _, n, block, chain, after, repeated = self.copies[id(source)]
        if func in _PERMUTES and hits == [0]:
            dims = args[1:]
            try:
                if func in (torch.transpose, torch.Tensor.transpose):
                    keeps = all(int(d) % source.dim() != 0 for d in dims[:2])
                else:
                    order = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
                    keeps = int(order[0]) % source.dim() == 0
            except (TypeError, ValueError, IndexError):
                return False
            if not keeps:
                return False
            step = (func, (_HOLE, *args[1:]), {})
            self.copies[id(out)] = (out, n, block, chain, after + (step,), repeated)
            return True
        other = args[1 - hits[0]] if len(args) == 2 else None
        if (func not in _BATCHED_PRODUCTS or not isinstance(other, torch.Tensor) or other.dim() != 3
                or source.dim() != 3 or other.shape[0] != source.shape[0]):
            return False
        if self._samples(other, other.shape[0]) is None or n % self.batch_size:
            return False
        out.register_hook(partial(self._collect_copies_product, hits[0], other.detach(), self.copies[id(source)]))
        self.broadcasts += 1
        return True

    def _collect_copies_product(self, position, other, entry, grad: torch.Tensor) -> None:
        _, n, block, chain, after, repeated = entry
        rows = _operand_grad(position, other, grad)  # the copies' grad
        if after:  # back through the transposes after the repeat
            _, pull = vjp(partial(self._rearrange, after), torch.zeros(repeated, dtype=rows.dtype, device=rows.device))
            rows = pull(rows)[0]
        copies = rows.reshape(n, *block)
        self._accumulate(copies.view(self.batch_size, n // self.batch_size, *block).sum(dim=1), chain,
                         batch_of_one=False)

    def _product(self, args, position: int, out) -> bool:
        """``x @ alias`` or ``alias @ x`` with ``x [B, ..., m, k]`` and the alias ``[1, ..., k, n]``
        broadcast over the samples (a Conformer's or DeBERTa's projected relative positions against
        the queries): sample ``b``'s grad of the alias is ``x[b]^T @ grad[b]`` (or ``grad[b] @ x[b]^T``)."""
        alias, other = args[position], args[1 - position]
        if position == 1 and alias.dim() == 2:
            return self._rows_product(other, alias, out)
        if (not isinstance(other, torch.Tensor) or not isinstance(out, torch.Tensor) or alias.dim() < 3
                or other.dim() != alias.dim() or alias.shape[0] != 1 or other.shape[0] < 2):
            return False
        if self._samples(None, other.shape[0]) is None:
            return False
        out.register_hook(partial(self._collect_product, position, other.detach(), alias.shape,
                                  self.aliases[id(alias)][1]))
        self.broadcasts += 1
        return True

    def _rows_product(self, x, alias, out, transposed: bool = False) -> bool:
        """``x @ alias`` with ``x [B, k]`` (a row per sample) and a ``[k, n]`` alias shared by the
        samples, no leading dim of 1 (class embeddings projected by the layers the samples go
        through: a prototype network's, scored by ``features @ prototypes.T``): sample ``b``'s grad
        of the alias is the outer product ``x[b] ⊗ grad[b]``; ``transposed``: ``x @ alias.mT``
        (``F.linear(x, alias)``), whose grad is that product's transpose."""
        if (not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or x.dim() != 2
                or alias.dim() != 2 or x.shape[0] < 2 or self._samples(None, x.shape[0]) is None):
            return False
        out.register_hook(partial(self._collect_rows_product, x.detach(), transposed, self.aliases[id(alias)][1]))
        self.broadcasts += 1
        return True

    def _collect_rows_product(self, x, transposed: bool, chain, grad: torch.Tensor) -> None:
        part = x.float().unsqueeze(-1) * grad.float().unsqueeze(-2)  # [B, k, n]
        self._accumulate(part.mT if transposed else part, chain, batch_of_one=False)

    def _selected(self, func, args, kwargs, position: int, out) -> bool:
        """``torch.where(mask, alias, x)``, ``torch.where(mask, x, alias)`` or
        ``alias.masked_fill(mask, value)`` with a ``[B, ...]`` mask (or ``x``): the alias broadcast
        over the samples, each taking it where its mask selects it (T5's position bias under a
        padding mask, ``torch.where(attention_mask, position_bias, min)`` in transformers' SDPA
        path). Sample ``b``'s grad of the alias is its output grad where the alias was selected."""
        alias = args[position]
        if kwargs or not isinstance(out, torch.Tensor):
            return False
        if func in _WHERES:
            if len(args) != 3 or position == 0:
                return False
            mask, takes_alias = args[0], position == 1
        elif func in _WHERE_METHODS:  # alias.where(mask, x) / x.where(mask, alias)
            if len(args) != 3 or position == 1:
                return False
            mask, takes_alias = args[1], position == 0
        else:  # masked_fill: the alias where the mask is False
            if len(args) != 3 or position != 0:
                return False
            mask, takes_alias = args[1], False
        if (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or out.dim() != alias.dim()
                or out.dim() == 0 or alias.shape[0] != 1 or out.shape[0] < 2):
            return False
        if self._samples(None, out.shape[0]) is None:
            return False
        selected = (mask if takes_alias else ~mask).detach()
        out.register_hook(partial(self._collect, 1.0, selected, alias.shape, self.aliases[id(alias)][1]))
        self.broadcasts += 1
        return True

    def _collect_product(self, position, other, alias_shape, chain, grad: torch.Tensor) -> None:
        self._collect(1.0, None, alias_shape, chain, _operand_grad(position, other, grad))

    def _collect_copies(self, alias_shape, chain, grad: torch.Tensor) -> None:
        self._accumulate(grad.float().reshape(self.batch_size, *alias_shape), chain, batch_of_one=False)

    def _is_alias(self, x) -> bool:
        entry = self.aliases.get(id(x)) if isinstance(x, torch.Tensor) else None
        return entry is not None and entry[0] is x

    def _still_shared(self, func, args, kwargs, out) -> bool:
        """Whether ``out`` is still one value for all samples: a rearrangement of the alias, or an
        op whose output and other tensor inputs have a leading dim of 1 (T5's ``torch.where(mask,
        bias, -inf)`` with a ``[1, 1, q, k]`` mask). Its gradient then reaches the alias by its vjp."""
        others = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and not self._is_alias(a)]
        source = next((a for a in args if self._is_alias(a)), None)
        if id(source) in self.row_expanded:
            if func in _KEEPS_LAYOUT and not others and out.shape == source.shape:
                self.row_expanded[id(out)] = self.row_expanded[id(source)]
                return True
            return False
        if func in _SHAPE_OPS and all(not (t.is_floating_point() or t.is_complex() or t.requires_grad) for t in others):
            return True  # (an index tensor picks values of the alias: SwinV2 gathers its bias table)
        if not others and func not in _RANDOM_OPS and source is not None and out.shape == source.shape:
            return True  # an elementwise function of the alias alone (``16 * torch.sigmoid(bias)``)
        if others and all(isinstance(t, nn.Parameter) for t in others):
            return True  # a function of parameters and the alias (DeBERTa's LayerNorm of its table, a Linear of it)
        return out.dim() > 0 and out.shape[0] == 1 and all(t.dim() < out.dim() or t.shape[0] == 1 for t in others)

    def _attention_mask(self, run, args, kwargs):
        """``F.scaled_dot_product_attention`` with a ``[1, ...]`` alias as its additive ``attn_mask``
        (T5's position bias): the mask is expanded to the B samples of the query, which broadcasting
        does anyway, so its gradient arrives per sample."""
        bound = _sdpa_arguments(args, kwargs)
        mask, query = bound.get("attn_mask"), bound.get("query")
        if not (self._is_alias(mask) and isinstance(query, torch.Tensor) and query.dim() == mask.dim()
                and query.shape[0] > 1 and mask.dtype != torch.bool):
            return None
        sign, shape = self.row_expanded.get(id(mask), (1.0, mask.shape))
        rows = query.shape[0]
        if (mask.shape[0] != 1 and not (id(mask) in self.row_expanded and mask.shape[0] == rows)
                or self._samples(query, rows) is None):
            return None
        # (a fresh view of a row-expanded mask: only this use's gradient reaches the hook)
        expanded = mask.expand(rows, *mask.shape[1:])
        expanded.register_hook(partial(self._collect, sign, None, shape, self.aliases[id(mask)][1]))
        self.broadcasts += 1
        args, kwargs = _with_attn_mask(args, kwargs, expanded)
        return run(*args, **kwargs)

    def _samples(self, rows_of: torch.Tensor | None, rows: int) -> int | None:
        """The samples that ``rows`` rows of a use of the alias belong to, fixing ``batch_size`` at
        the first use: ``rows`` itself, or, where they are not the tracker's batch and the graph of
        ``rows_of`` (the tensor the alias meets) proves them sample-major groups (Swin's windows),
        the samples of those groups (see ``_collect``). None where it disagrees with the first."""
        samples = rows
        if (rows > 1 and rows != self.batch_hint and isinstance(rows_of, torch.Tensor)
                and rows_of.grad_fn is not None):
            lead = flattened_samples(rows_of, self.shared_nodes(), self.batch_hint)
            if lead is not None and lead[0] * lead[1] == rows:
                samples = lead[0]
        if self.batch_size is None:
            self.batch_size = samples
        return samples if samples == self.batch_size else None

    def _collect(self, sign: float, factor, alias_shape, chain, grad: torch.Tensor) -> None:
        g = grad.float()
        if factor is not None:
            g = g * factor.float()
        part = g.sum_to_size((g.shape[0], *alias_shape[1:]))  # row r's grad of the alias
        if sign != 1.0:  # (linear: on the summed part, the smaller tensor)
            part = part * sign
        if part.shape[0] != self.batch_size:  # rows proven sample-major groups (see _samples)
            part = part.view(self.batch_size, -1, *alias_shape[1:]).sum(dim=1)  # [B, ...]: sample b's
        self._accumulate(part, chain, batch_of_one=True)

    def _accumulate(self, part: torch.Tensor, chain, batch_of_one: bool) -> None:
        """Add each sample's grad of an alias (``part [B, ...]``, without the alias's leading dim of 1
        where ``batch_of_one``), taken back through ``chain`` to the output, to ``per_sample``."""
        if chain:
            # The chain is replayed once, unbatched; only its vjp runs over the samples.
            _, pull = vjp(partial(self._rearrange, chain), self.output.detach().float())
            part = vmap(lambda g: pull(g.unsqueeze(0) if batch_of_one else g)[0])(part)
        elif batch_of_one:
            part = part.unsqueeze(1)  # the output itself, [1, ...]: sample b's grad is row b
        self.per_sample = part if self.per_sample is None else self.per_sample + part

    @staticmethod
    def _rearrange(chain, y: torch.Tensor) -> torch.Tensor:
        """The output ``y`` taken through ``chain``, the ops from the output to an alias."""
        for func, template, kwargs in chain:
            y = func(*(y if a is _HOLE else a for a in template), **kwargs)
        return y

    def failure(self) -> str:
        """Why ``complete`` was false, for an error message."""
        if self.unknown_op is not None:
            return f"it met `{self.unknown_op}`, which it cannot split per sample"
        checkpoint = ("use_reentrant=False (with transformers: model.gradient_checkpointing_enable("
                      "gradient_checkpointing_kwargs={'use_reentrant': False}), its default)")
        if self.recomputed:
            return ("it was computed again in the backward, as a reentrant activation checkpoint "
                    "(torch.utils.checkpoint with use_reentrant=True) recomputes its block, and the blocks after "
                    "it get it as a detached copy whose uses cannot be followed; checkpoint with " + checkpoint)
        if self.used_without_grad:
            return ("it was used under torch.no_grad(), as a reentrant activation checkpoint (torch.utils.checkpoint "
                    "with use_reentrant=True) runs its block before recomputing it in the backward on a detached "
                    "copy whose uses cannot be followed; checkpoint with " + checkpoint)
        if self.unreadable_masks and bool(torch.stack(self.unreadable_masks).any()):
            return "a dropout of it kept or dropped entries of 0, whose mask cannot be read"
        if self.per_sample is None:
            return "no op broadcast it over the samples before the end of the tracked model's forward"
        return ("the uses seen do not add up to its gradient (a use after the tracked model's forward, "
                "e.g. in the loss, or through more than 16 rearranging ops)")

    def complete(self, own_grad: torch.Tensor) -> bool:
        """Whether the recorded uses account for the module output's whole gradient ``own_grad``."""
        if self.per_sample is None or self.unknown_use:
            return False
        if self.unreadable_masks and bool(torch.stack(self.unreadable_masks).any()):
            return False
        total = self.per_sample.sum(dim=0)
        scale = own_grad.float().abs().max().clamp_min(1e-30)
        # Autograd sums the same parts (rounded in the grad's dtype): float32 rounding apart.
        tolerance = 1e-2 if own_grad.dtype in _HALF or self.low_precision else 1e-5
        return bool(((total - own_grad.float()).abs().max() / scale) <= tolerance)


def _operand_grad(position: int, other: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The grad (float32) of operand ``position`` of ``a @ b`` with the other operand ``other``."""
    other, grad = other.float(), grad.float()
    return other.transpose(-2, -1) @ grad if position == 1 else grad @ other.transpose(-2, -1)


class SharedOutputWatchers(TorchFunctionMode):
    """The one torch-function mode through which every ``SharedOutputWatcher`` of a forward sees
    its ops (DeBERTa has six, one per layer's relative-position table and projections).

    Each op costs one Python call here, however many watchers there are, and reaches only the
    watchers whose followed tensors it touches: a mode per watcher cost a call per op and watcher
    (DeBERTa's forward made ~4,400 such calls for ~1,000 ops). An op touching several watchers is
    handed to them as nested modes would: the latest watcher first, each running the op through
    the one before it (``handle``'s ``run``). ``watchers`` may change while the mode is entered."""

    def __init__(self):
        super().__init__()
        self.watchers: list[SharedOutputWatcher] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA_READS:
            return func(*args, **kwargs)
        run = func
        for watcher in self.watchers:
            if watcher.touches(args, kwargs):
                run = partial(_handled, watcher, run, func)
        return run(*args, **kwargs)


def _handled(watcher: SharedOutputWatcher, run, func, *args, **kwargs):
    # (``touches`` is asked again: a watcher handing the op on may have changed its arguments.)
    if watcher.touches(args, kwargs):
        return watcher.handle(run, func, args, kwargs)
    return run(*args, **kwargs)
