"""nn.MultiheadAttention: per-token grads of its projections, then the linear routes.

Attention mixes positions but never samples, so every parameter's per-sample gradient is a
sum over that sample's tokens of (input) x (grad of the projection output):

* input projection (rows q | k | v of ``in_proj_weight``, or ``q/k/v_proj_weight``):
  ``G_q^T Q_in``, ``G_k^T K_in``, ``G_v^T V_in``, disjoint row blocks, so their squared norms add;
* output projection: ``G_out^T C`` with ``C`` the heads' concatenated context.

``G_q, G_k, G_v`` and ``C`` live inside ``F.multi_head_attention_forward``. Both paths below run
that same function on already projected ``q, k, v`` with identity projection weights, so every
mask, scaling, dropout and ``add_zero_attn`` rule of the real module applies unchanged and its
output is ``C`` exactly. (While it runs, products with those identity matrices are skipped, see
``_identity_products_skipped``.)

* Fused (default): the module's forward is replaced while tracking is on by in-projection →
  that function → out-projection, with gradient hooks on ``q, k, v`` and the output; the
  backward delivers ``G_q, G_k, G_v, G_out`` as it runs. No extra attention work at all.
* Hooks (``fused=False``): the function is called once more for the whole batch in the backward
  and one ``autograd.grad`` from ``G_out W_out`` gives ``G_q, G_k, G_v``; dropout in training mode
  is replayed from the RNG state saved just before the forward (as ``torch.utils.checkpoint`` does).

No per-sample gradient is formed. Modules with ``add_bias_kv`` keep the generic route (their
``bias_k``/``bias_v`` per-sample gradients are not projections).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerRule, RoutePlan, RuleError, register, suspend_capture
from .. import ops
from .linear import fused_linear, fused_linear_route_name, linear_grad_sums, linear_norms

_FORWARD_PARAMS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]
_FORWARD_DEFAULTS = {name: p.default for name, p in inspect.signature(nn.MultiheadAttention.forward).parameters.items()
                     if p.default is not inspect.Parameter.empty}


@dataclass
class AttentionCall:
    """One captured forward call, inputs in the ``[T, B, E]`` layout of the functional form."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    options: dict          # key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
    batch_first: bool
    self_attention: bool     # query, key and value were one tensor
    rng_state: tuple | None  # (cpu state, cuda device, cuda state) before the forward, when it drew
    # (device type, dtype) of the autocast the forward ran under, which the replay runs under too
    # (its products then have the forward's dtypes: a bfloat16 query meets float32 weights otherwise)
    autocast: tuple | None = None

    @property
    def shape_key(self) -> tuple:
        return tuple(self.query.shape), tuple(self.key.shape)


@dataclass
class FusedAttentionCall:
    """One call through the fused forward: the projection inputs and the context, ``[B, T, *]``."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    context: torch.Tensor
    self_attention: bool
    #: ``{projection: (weight sq [B], bias sq [B])}`` from projections run through ``fused_linear``.
    projection_norms: dict = field(default_factory=dict)

    def projection_input(self, name: str) -> torch.Tensor:
        """The input ``[B, T, *]`` of projection ``"q"``, ``"k"``, ``"v"``, ``"qkv"`` or ``"out"``."""
        return {"q": self.query, "qkv": self.query, "k": self.key, "v": self.value, "out": self.context}[name]

    @property
    def shape_key(self) -> tuple:
        return tuple(self.query.shape), tuple(self.key.shape)


def _bind(args: tuple, kwargs: dict) -> dict:
    bound = dict(_FORWARD_DEFAULTS)
    bound.update(zip(_FORWARD_PARAMS, args))
    bound.update(kwargs)
    return bound


def _draws_random(module: nn.MultiheadAttention) -> bool:
    return module.training and module.dropout > 0


@register(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    """Rule for ``nn.MultiheadAttention`` (self- or cross-attention, any masks, ``kdim``/``vdim``,
    ``add_zero_attn``, dropout in training mode, either ``batch_first``)."""

    param_names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    #: ``out_proj`` is used by the attention function, never through its own forward: this rule
    #: accounts for its parameters too.
    owns_children = True

    def batch_dim(self, module):
        return 0 if module.batch_first else 1

    def before_forward(self, module, args, kwargs):
        """The RNG state a dropout replay needs, taken before the forward draws (else None)."""
        if not _draws_random(module):
            return None
        device = _bind(args, kwargs)["query"].device
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return torch.get_rng_state(), device, cuda

    def capture(self, module, args, kwargs, output, pre_state=None):
        bound = _bind(args, kwargs)
        query, key, value = (bound[n] for n in ("query", "key", "value"))
        self_attention = query is key and key is value
        if query.dim() != 3:
            raise RuleError(f"{type(module).__name__} got an unbatched query of shape {tuple(query.shape)}; "
                            "per-sample gradients need batched input")
        if _draws_random(module) and pre_state is None:
            raise RuleError(f"{type(module).__name__} drew dropout masks, but the random state before its forward "
                            "was not recorded (tracking switched on during the forward?), so they cannot be "
                            "replayed; run the forward again with tracking on")
        if module.batch_first:  # the functional form takes [T, B, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        options = {n: v.detach() if isinstance(v, torch.Tensor) else v for n, v in _options(bound).items()}
        device = query.device.type
        autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        return AttentionCall(query.detach(), key.detach(), value.detach(), options, module.batch_first,
                             self_attention, pre_state, autocast)

    def batch_size(self, module, ctx):
        return ctx.query.shape[1]

    # ------------------------------------------------------------------ fused path
    #: The fused forward takes the module's keyword arguments (masks, need_weights, ...).
    fused_kwargs = True

    def can_fuse(self, module, tracked) -> bool:
        """The stock ``nn.MultiheadAttention.forward`` only."""
        return type(module).forward is nn.MultiheadAttention.forward

    def fuse_call(self, module, x) -> bool:
        return x.dim() == 3

    def fused_batch_size(self, module, x) -> int:
        return x.shape[0] if module.batch_first else x.shape[1]

    def fused_forward(self, module, args, kwargs, sink):
        """The module's forward as in-projection → attention function → out-projection, with
        gradient hooks that hand ``{"out": G_out, "q"/"k"/"v": ...}`` (or ``"qkv"`` for the packed
        self-attention projection) to ``sink`` once all have arrived."""
        bound = _bind(args, kwargs)
        query, key, value = (bound[n] for n in ("query", "key", "value"))
        self_attention = query is key and key is value
        if module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        grads: dict[str, torch.Tensor] = {}
        fused: set[str] = set()  # projections run through fused_linear: their sink reports the grad

        def arrived(name, grad):
            grads[name] = grad.detach()
            if all(n in grads for n in needed):
                full = {n: _bte(grads[n] if n in grads else torch.zeros(shape, dtype=dtype, device=device))
                        for n, (shape, dtype, device) in shapes.items()}
                sink(call, full)
            return None

        def project(name, x, weight, bias):
            """``F.linear(x, weight, bias)``; fused (weight gradient from per-sample tiles whose norms
            are kept for the call) where the fused-instantiate route applies."""
            if not (weight.requires_grad and _fused_instantiate(x, weight)):
                return F.linear(x, weight, bias)
            fused.add(name)
            with_bias = bias is not None and bias.requires_grad

            def projection_sink(x, g):
                w_sq, b_sq, grad_w = ops.instantiate_norm(_bte(x), _bte(g), with_bias)
                call.projection_norms[name] = (w_sq, b_sq)
                grad_b = g.sum(dim=(0, 1)) if with_bias else None
                arrived(name, g)
                return grad_w.to(weight.dtype), grad_b

            return fused_linear(x, weight, bias, projection_sink)

        if self_attention and module._qkv_same_embed_dim:  # one product for q, k and v
            packed = project("qkv", query, module.in_proj_weight, module.in_proj_bias)
            q, k, v = packed.chunk(3, dim=-1)
        else:
            packed, (q, k, v) = _project(module, query, key, value, self_attention)
        context, weights = _attend(module, q, k, v, _options(bound))
        out = project("out", context, module.out_proj.weight, module.out_proj.bias)
        call = FusedAttentionCall(_bte(query), _bte(key), _bte(value), _bte(context), self_attention)
        if packed is not None and packed.requires_grad:
            # The packed projection's grad is [G_q | G_k | G_v] already: no concatenation later.
            hooked = {"out": out, "qkv": packed}
        else:
            hooked = {"out": out, "q": q, "k": k, "v": v}
        # The output's grad arrives first (if the output is used at all); the call is complete once
        # the projections have theirs (or the output, when none of them needs a gradient).
        needed = [n for n, t in hooked.items() if n != "out" and t.requires_grad] or ["out"]
        shapes = {n: (t.shape, t.dtype, t.device) for n, t in hooked.items()}
        for name, t in hooked.items():
            if t.requires_grad and name not in fused:
                t.register_hook(lambda grad, name=name: arrived(name, grad))
        if module.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def fused_grads(self, module, ctx, grads, tracked):
        """Norms only: the parameters' gradients come from autograd (or from the fused projections,
        whose per-sample norms are reused here)."""
        total = None
        for name, g in grads.items():
            weight, bias = _projection_params(module, name)
            if name in ctx.projection_norms:
                w_sq, b_sq = ctx.projection_norms[name]
                part = (w_sq if weight in tracked else 0.0) + (b_sq if bias in tracked else 0.0)
            else:
                part = linear_norms(ctx.projection_input(name), g, weight in tracked, bias in tracked)
            total = part if total is None else total + part
        return total, None, None

    def fused_plan(self, module, ctx, tracked) -> RoutePlan:
        B, T, E = ctx.query.shape
        return RoutePlan("fused attention", f"B={B} T={T} S={ctx.key.shape[1]} E={E} heads={module.num_heads}",
                         2.0 * B * E * (T + ctx.key.shape[1]) * min(T, E), 0.0)

    def _joined_factors(self, module, calls) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{projection: (A, G)}`` as ``[B, T, *]`` over every call: ``"out"`` and either ``"qkv"``
        (the packed self-attention projection) or ``"q"``, ``"k"``, ``"v"``."""
        # Several calls: their per-sample gradients add, so each block's (A, G) pairs are
        # concatenated along the tokens before squaring (as for a Linear called twice).
        parts: dict[str, list] = {}
        for ctx, grads in calls:
            if isinstance(ctx, FusedAttentionCall):
                factors = {name: (ctx.projection_input(name), g) for name, g in grads[0].items()}
            else:
                factors = self._projection_factors(module, ctx, grads)
            for name, pair in factors.items():
                parts.setdefault(name, []).append(pair)
        if "qkv" in parts and any(name in parts for name in "qkv"):  # packed and separate calls mixed
            for a, g in parts.pop("qkv"):
                for name, g_part in zip("qkv", g.chunk(3, dim=-1)):
                    parts.setdefault(name, []).append((a, g_part))
        return {name: p[0] if len(p) == 1 else (torch.cat([a for a, _ in p], dim=1), torch.cat([g for _, g in p], dim=1))
                for name, p in parts.items()}

    def norms(self, module, calls, tracked):
        # The packed "qkv" block has one input and one [B, T, 3E] output grad: the input's Gram
        # (ghost route) or tile (instantiate) is formed once, not three times.
        total = None
        for name, (a, g) in self._joined_factors(module, calls).items():
            weight, bias = _projection_params(module, name)
            part = linear_norms(a, g, weight in tracked, bias in tracked)
            total = part if total is None else total + part
        return total

    def grad_sums(self, module, calls, tracked):
        joined = self._joined_factors(module, calls)
        out = linear_grad_sums(*joined["out"], True, module.out_proj.bias is not None)
        sums = {f"out_proj.{name}": t for name, t in out.items()}
        if "qkv" in joined:
            sums["in_proj_weight"], sums["in_proj_bias"] = linear_grad_sums(*joined["qkv"], True, True).values()
        else:
            blocks = [linear_grad_sums(*joined[name], True, True) for name in "qkv"]
            if module._qkv_same_embed_dim:
                sums["in_proj_weight"] = torch.cat([b["weight"] for b in blocks])
            else:
                sums.update({f"{name}_proj_weight": b["weight"] for name, b in zip("qkv", blocks)})
            sums["in_proj_bias"] = torch.cat([b["bias"] for b in blocks])
        return {name: t for name, t in sums.items() if name in tracked}

    def _projection_factors(self, module, ctx: AttentionCall, grads):
        """``{name: (A, G)}`` as ``[B, T, *]`` for the input projections (``"qkv"`` packed, or
        ``"q"``, ``"k"``, ``"v"``) and the output projection (``"out"``)."""
        E = module.embed_dim
        autocast = (torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1]) if ctx.autocast is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            packed, projected = _project(module, ctx.query, ctx.key, ctx.value, ctx.self_attention)
        if packed is not None:
            leaves = [packed.requires_grad_()]
            with torch.enable_grad():
                projected = packed.chunk(3, dim=-1)
        else:
            leaves = projected = [t.requires_grad_() for t in projected]
        g_out = grads[0]
        if g_out is None:
            g_out = torch.zeros(ctx.query.shape[:2] + (E,), dtype=ctx.query.dtype, device=ctx.query.device)
        elif ctx.batch_first:
            g_out = g_out.transpose(0, 1)
        with torch.enable_grad(), suspend_capture(), _replayed_rng(ctx.rng_state), autocast:
            context, weights = _attend(module, *projected, ctx.options)
        outputs, out_grads = [context], [g_out.matmul(module.out_proj.weight.detach().to(g_out.dtype))]
        if weights is not None and len(grads) > 1 and grads[1] is not None:
            outputs.append(weights)
            out_grads.append(grads[1])
        leaf_grads = torch.autograd.grad(outputs, leaves, out_grads, allow_unused=True, materialize_grads=True)
        factors = {"out": (_bte(context), _bte(g_out))}
        if packed is not None:
            factors["qkv"] = (_bte(ctx.query), _bte(leaf_grads[0]))
        else:
            for name, x, g in zip("qkv", (ctx.query, ctx.key, ctx.value), leaf_grads):
                factors[name] = (_bte(x), _bte(g))
        return factors

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        T, B, E = ctx.query.shape
        S = ctx.key.shape[0]
        flops = 2.0 * B * E * (4 * E * (T + S) + 2 * T * S)  # identity products + attention, fwd and bwd
        return RoutePlan("attention replay", f"B={B} T={T} S={S} E={E} heads={module.num_heads}", flops,
                         4.0 * B * module.num_heads * T * S)


def _projection_params(module, name: str) -> tuple[str, str]:
    """The (weight, bias) parameter names of one projection: ``"out"``, ``"qkv"`` or ``"q"/"k"/"v"``."""
    if name == "out":
        return "out_proj.weight", "out_proj.bias"
    if name == "qkv" or module._qkv_same_embed_dim:
        return "in_proj_weight", "in_proj_bias"
    return f"{name}_proj_weight", "in_proj_bias"


def _fused_instantiate(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused-instantiate route applies to a projection of ``x [T, B, d]``."""
    T, B, d = x.shape
    return fused_linear_route_name(B, T, d, weight.shape[0], x.device.type) == "fused-instantiate"


def _options(bound: dict) -> dict:
    """The call's keyword options that ``F.multi_head_attention_forward`` takes as they are."""
    return {n: bound[n] for n in ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")}


def _bte(t: torch.Tensor) -> torch.Tensor:
    """``[T, B, *]`` (the functional layout) as a detached ``[B, T, *]`` view."""
    return t.detach().transpose(0, 1)


def _attend(module, q, k, v, options):
    """``(context, weights)``: the module's attention on projected ``q, k, v`` (``[T, B, E]``), through
    ``F.multi_head_attention_forward`` with identity projections (whose products are skipped)."""
    E = module.embed_dim
    eye = _identity(E, q.dtype, q.device)
    with _identity_products_skipped():
        return F.multi_head_attention_forward(
            q, k, v, E, module.num_heads, None, None, None, None, module.add_zero_attn, module.dropout,
            eye, None, training=module.training, use_separate_proj_weight=True,
            q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye, **options)


def _project(module, query, key, value, self_attention):
    """``(packed or None, [q, k, v])``: the in-projection as ``F.multi_head_attention_forward`` does
    it (``[T, B, *]`` layout); self-attention makes one ``[T, B, 3E]`` product, ``packed``."""
    if self_attention and module._qkv_same_embed_dim:  # one product for q, k and v
        packed = F.linear(query, module.in_proj_weight, module.in_proj_bias)
        return packed, packed.chunk(3, dim=-1)
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
    return None, [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]


# Identity matrices handed to F.multi_head_attention_forward as projection weights. While
# ``_identity_products_skipped`` is active, F.linear returns its input for them instead of
# multiplying (an exact no-op either way: x @ I == x), which saves four E x E products per
# token in the forward and their backward. Should torch stop calling F.linear there, the
# products simply run: slower, same numbers.
_IDENTITIES: dict[tuple, torch.Tensor] = {}
_IDENTITY_IDS: set[int] = set()
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = 0
_SAVED_LINEAR = F.linear  # what F.linear was when the skipping began


def _identity(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    eye = _IDENTITIES.get(key)
    if eye is None:
        eye = _IDENTITIES[key] = torch.eye(n, dtype=dtype, device=device)
        _IDENTITY_IDS.add(id(eye))
    return eye


def _linear_skipping_identity(input, weight, bias=None):
    if bias is None and id(weight) in _IDENTITY_IDS:
        return input.contiguous()
    return _SAVED_LINEAR(input, weight, bias)


@contextlib.contextmanager
def _identity_products_skipped():
    global _PATCH_DEPTH, _SAVED_LINEAR
    with _PATCH_LOCK:
        if _PATCH_DEPTH == 0:
            _SAVED_LINEAR, F.linear = F.linear, _linear_skipping_identity
        _PATCH_DEPTH += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_DEPTH -= 1
            if _PATCH_DEPTH == 0:
                F.linear = _SAVED_LINEAR


@contextlib.contextmanager
def _replayed_rng(state):
    """Within the block, the RNG state saved before the forward (if any); after it, the caller's."""
    if state is None:
        yield
        return
    cpu, device, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
