"""What a layer rule is, and the registry that maps module types to rules.

A *rule* knows, for one family of modules, how to turn what the tracker captured in the
forward pass (the layer input, ``A``) and what arrives in the backward pass (the gradient of
the layer output, ``G``) into per-sample squared gradient norms of the module's own
parameters. Rules are looked up through the class hierarchy, so subclasses of e.g.
``nn.Linear`` get the fast path without registering themselves, as long as they keep the
registered class's ``forward``: a rule reads what that forward computes, so a subclass that
overrides it (Hugging Face's channels-first ``ConvNextLayerNorm``, a quantization-aware Linear)
takes the exact generic route instead.

Scaling: rules see the gradient of the user's *scaled* loss ``L = c * sum_i l_i`` and return
norms of that gradient; the tracker divides by ``c**2`` (DESIGN §2).
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import threading

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

#: A forward call as the tracker keeps it: (what ``capture`` returned, grads of the outputs).
Call = tuple[Any, Sequence[torch.Tensor | None]]


class RuleError(RuntimeError):
    """A module that a rule cannot handle exactly; the message names it and says what to do."""


@dataclass
class RoutePlan:
    """The route a rule chose for one module at one shape, and its estimated cost.

    ``flops`` counts multiply-adds times two for the per-sample norms of this module (not the
    plain backward); ``extra_bytes`` is the largest temporary buffer the route allocates.
    """

    route: str
    shape: str
    flops: float
    extra_bytes: float
    alternatives: dict[str, float] = field(default_factory=dict)


class LayerRule:
    """Base class of per-layer rules (one subclass per layer family, registered by type).

    Subclasses set ``param_names`` (the direct parameters they understand) and implement
    ``capture`` and ``norms``; ``plan`` reports the route they would take.
    """

    #: The direct parameters of the module this rule computes norms for.
    param_names: tuple[str, ...] = ("weight", "bias")

    #: The module maps each row of its input's leading dims to the same row of its output, on its
    #: own (Linear, LayerNorm, RMSNorm): an input whose rows are samples and tokens flattened
    #: together may be given to it as ``[B, T, ...]`` instead (see ``layers/rows.py``).
    rows_independent: bool = False

    #: The module can be called on flattened rows regrouped by ``rows_view`` (a batch norm, whose
    #: statistics per channel are over the same elements either way), though it is not row-wise.
    rows_regrouped: bool = False

    def rows_view(self, x: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor | None:
        """``x`` (``[B*T, ...]``, rows proven sample-major) as this module takes samples: ``[B, T, ...]``."""
        return x.reshape(*lead, *x.shape[1:])

    def rows_unview(self, output: torch.Tensor, rows: int, n_lead: int, shape: torch.Size) -> torch.Tensor:
        """The module's output on ``rows_view``'s input (made from an input of ``shape``), back in
        the caller's ``[B*T, ...]`` rows."""
        return output.reshape(rows, *output.shape[n_lead:])

    def batch_dim(self, module: nn.Module) -> int:
        """The dimension of the captured inputs and output grads that indexes samples."""
        return 0

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Keep what ``norms`` needs from the forward pass (detached; no copies where possible)."""
        return args[0].detach()

    def batch_size(self, module: nn.Module, ctx: Any) -> int:
        """Number of samples in the captured call."""
        return ctx.shape[self.batch_dim(module)]

    def norms(self, module: nn.Module, calls: list[Call], tracked: dict[str, nn.Parameter]) -> torch.Tensor:
        """Per-sample squared norm [B] (float32) of the gradient of ``tracked`` params.

        ``calls`` holds every forward call of the module whose output received a gradient in
        this backward; per-sample gradients of several calls are *summed* before the norm.
        """
        raise NotImplementedError

    def grad_sums(self, module: nn.Module, calls: list[Call], tracked: dict[str, nn.Parameter]
                  ) -> dict[str, torch.Tensor] | None:
        """The gradient of each ``tracked`` parameter that these calls account for, summed over
        samples and calls (float32, the parameter's shape, gradient of the scaled loss), or None
        where the rule cannot form it.

        The tracker compares it with the gradient autograd delivers to the parameter (on the first
        backward and every ``verify_every``-th after): a difference means the parameter was also
        used outside its module's forward, whose per-sample part no rule sees.
        """
        return None

    def plan(self, module: nn.Module, ctx: Any, grad: torch.Tensor, tracked: dict[str, nn.Parameter]) -> RoutePlan:
        """The route this rule takes for one call of these shapes."""
        return RoutePlan("instantiate", _shape(ctx), float("nan"), float("nan"))

    def plan_calls(self, module: nn.Module, calls: list[Call], tracked: dict[str, nn.Parameter]) -> RoutePlan:
        """The route ``norms`` takes for these calls of one backward (what ``tracker.plan()``
        reports): ``plan`` of the first call, for the rules whose route does not depend on how many
        calls a backward combines; a rule whose route does overrides this."""
        ctx, grads = calls[0]
        return self.plan(module, ctx, next((g for g in grads if g is not None), None), tracked)


class PerSampleGradsRule(LayerRule):
    """A rule that forms its (small) per-sample gradients outright: ``per_sample_grads`` gives
    ``{name: [B, *param_shape]}`` (float32, summed over the calls), from which the norms and the
    summed gradient follow."""

    def per_sample_grads(self, module: nn.Module, calls: list[Call], tracked: dict[str, nn.Parameter]
                         ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def norms(self, module, calls, tracked):
        return per_sample_sq_sum(self.per_sample_grads(module, calls, tracked).values())

    def grad_sums(self, module, calls, tracked):
        return {name: t.sum(dim=0) for name, t in self.per_sample_grads(module, calls, tracked).items()}


def _metadata_reads() -> frozenset:
    getters = ("shape", "dtype", "device", "layout", "requires_grad", "grad_fn", "is_leaf", "ndim", "_version",
               "output_nr", "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_nested", "retains_grad")
    methods = ("dim", "ndimension", "numel", "nelement", "size", "stride", "storage_offset", "is_contiguous",
               "is_floating_point", "is_complex", "is_signed", "is_inference", "data_ptr", "untyped_storage",
               "element_size", "get_device", "register_hook", "__len__")
    return frozenset([getattr(torch.Tensor, name).__get__ for name in getters if hasattr(torch.Tensor, name)]
                     + [getattr(torch.Tensor, name) for name in methods if hasattr(torch.Tensor, name)])


#: Tensor attribute reads and methods whose results are no tensors (shapes, flags, pointers, a hook
#: handle): no gradient flows through them, so the torch-function modes that follow tensors pass them
#: on at once. They are most of what reaches such a mode: ~2,300 of the ~3,000 calls of a timm BEiT
#: forward (the model's ``x.shape``, and the hooks' own reads while a mode is active).
METADATA_READS = _metadata_reads()


def _shape(x: Any) -> str:
    return "x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else "?"


_REGISTRY: dict[type[nn.Module] | str, LayerRule] = {}


def register(*module_types: type[nn.Module] | str) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: use this rule for ``module_types`` and their subclasses.

    A type may also be named by its qualified name (``"transformers.pytorch_utils.Conv1D"``), so
    a rule for another library's module costs no import of that library.
    """

    def wrap(rule_cls: type[LayerRule]) -> type[LayerRule]:
        rule = rule_cls()
        for module_type in module_types:
            _REGISTRY[module_type] = rule
        return rule_cls

    return wrap


_MATCHERS: list[tuple[Callable[[nn.Module], bool], LayerRule]] = []


_CODE_FIELDS = ("co_code", "co_consts", "co_names", "co_varnames", "co_freevars", "co_argcount",
                "co_kwonlyargcount")


def same_code(function, reference) -> bool:
    """Whether ``function`` compiles to the same code as ``reference`` (instructions, constants,
    names, arguments): how matchers recognise copies of one forward that other libraries give a
    class each, without importing them or keeping a list of names."""
    code = getattr(function, "__code__", None)
    return code is not None and all(getattr(code, f) == getattr(reference.__code__, f) for f in _CODE_FIELDS)


def register_matcher(predicate: Callable[[nn.Module], bool]) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: use this rule for modules of unregistered types for which ``predicate``
    holds (e.g. the many copies of one forward that Hugging Face gives a class per model)."""

    def wrap(rule_cls: type[LayerRule]) -> type[LayerRule]:
        _MATCHERS.append((predicate, rule_cls()))
        return rule_cls

    return wrap


def rule_for(module: nn.Module) -> LayerRule | None:
    """The registered rule for ``module``'s type or its nearest registered base class, else the
    first matcher's rule whose predicate holds."""
    own = {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    for cls in type(module).__mro__:
        rule = _REGISTRY.get(cls) or _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            # A subclass with parameters the rule does not know (e.g. an added adapter) would
            # silently lose them, and one with its own forward computes something the rule does
            # not read: leave both to a matcher (which checks the forward's code) or the generic route.
            same_forward = getattr(type(module), "forward", None) is getattr(cls, "forward", None)
            if own <= set(rule.param_names) and same_forward:
                return rule
            break
    for predicate, rule in _MATCHERS:
        if predicate(module):
            return rule if own <= set(rule.param_names) else None
    return None


def registered_types() -> tuple[type[nn.Module] | str, ...]:
    """Module types (or qualified type names) with a dedicated rule; the generic route covers
    every other type."""
    return tuple(_REGISTRY)


_SUSPENDED = threading.local()


@contextlib.contextmanager
def suspend_capture():
    """Within this block, trackers ignore forward calls (rules re-running a module use it)."""
    depth = getattr(_SUSPENDED, "depth", 0)
    _SUSPENDED.depth = depth + 1
    try:
        yield
    finally:
        _SUSPENDED.depth = depth


def batched_input(x: torch.Tensor, expected: str) -> torch.Tensor:
    """``x`` detached, refused where it has no dim beyond the samples' (an unbatched input);
    ``expected`` names the input shape the layer takes, for the error."""
    if x.dim() < 2:
        raise ValueError(f"an unbatched input of shape {tuple(x.shape)} has no sample dimension; "
                         f"give the layer a batch: {expected}")
    return x.detach()


def capture_suspended() -> bool:
    """True inside ``suspend_capture()`` on this thread."""
    return getattr(_SUSPENDED, "depth", 0) > 0


def fused_sink_grads(sink, *args) -> tuple:
    """Call a fused backward's ``sink`` (which records the norms) and return its ``(grad_weight,
    grad_bias)``; ``(None, None)`` under ``create_graph=True``, where the backward must compute the
    gradients with differentiable ops instead: the sink's come from non-differentiable operators
    (``instantiate_norm``, a grouped convolution on detached inputs), and a second-order gradient
    through them would be silently missing its weight terms."""
    differentiable = torch.is_grad_enabled()  # (inside a backward: create_graph)
    with torch.no_grad():
        grads = sink(*args)
    return (None, None) if differentiable else grads


def per_sample_sq(t: torch.Tensor) -> torch.Tensor:
    """Squared norm per sample of ``t [B, ...]``, float32 [B].

    Rows whose length has a power-of-two factor of 256 to 4096 (most parameters' sizes) go through
    one batched dot product per block of that many elements, the blocks' sums added in float64,
    rather than ``square().sum()``: no temporary the size of ``t``, whose fresh allocation of a few
    MB costs its page faults on every call (2.2 ms against 0.13 ms for a ``[8, 110592]`` per-sample
    gradient inside a ViT's step on 2 cores). Each float32 dot adds at most 4096 terms."""
    rows = t.float().reshape(t.shape[0], -1)
    block = math.gcd(rows.shape[1], 4096)
    if block < 256 or rows.shape[1] == block or not rows.is_contiguous():
        return rows.square().sum(dim=1)
    head = rows.view(-1, 1, block)
    sums = torch.bmm(head, head.transpose(1, 2)).view(rows.shape[0], -1).sum(dim=1, dtype=torch.float64)
    return sums.float()


#: Per-sample gradients of at most this many elements a sample are reduced side by side.
SIDE_BY_SIDE_ELEMENTS = 4096


def per_sample_sq_sum(tensors) -> torch.Tensor:
    """``Σ_t per_sample_sq(t)`` over per-sample gradients ``[B, ...]``, float32 ``[B]``.

    The short ones (at most ``SIDE_BY_SIDE_ELEMENTS`` a sample: a norm layer's weight and bias,
    a PReLU's slopes) are put side by side and squared and summed at once: three ops for any
    number of them, where one by one costs two each and an add between (on a GPU, where a small
    model's step is bound by launches, each op is a launch)."""
    rows = [t.float().reshape(t.shape[0], -1) for t in tensors]
    short = [r for r in rows if r.shape[1] <= SIDE_BY_SIDE_ELEMENTS]
    parts = [per_sample_sq(r) for r in rows if r.shape[1] > SIDE_BY_SIDE_ELEMENTS]
    if short:
        parts.append((short[0] if len(short) == 1 else torch.cat(short, dim=1)).square().sum(dim=1))
    return functools.reduce(operator.add, parts)
