"""The exact generic route: per-sample vector-Jacobian products of one module, with torch.func.

Any module that owns trainable parameters and has no dedicated rule (``nn.MultiheadAttention``,
a user's custom module, a Linear subclass with extra parameters) is handled here: given its
captured inputs and the gradients of its outputs, ``vmap`` over samples of ``vjp`` of the
module alone (``torch.func.functional_call``) with respect to *all* trainable parameters of
its subtree yields each sample's gradient, which is then squared and summed. This is exact
whenever the module treats samples independently; randomness (dropout in training mode) is
refused by ``vmap(randomness="error")`` with a clear message, since the forward's mask cannot
be replayed. Per-sample gradients are formed a bounded number of samples at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .base import LayerRule, RoutePlan, RuleError, suspend_capture
from .routes import MAX_EXTRA_BYTES


@dataclass
class GenericCall:
    """What the generic route keeps of one forward call."""

    leaves: list            # flattened (args, kwargs); tensors detached
    spec: Any               # pytree spec of (args, kwargs)
    batched: list[bool]     # which leaves carry the batch dimension
    batch_size: int
    outputs: list[tuple[torch.Size, torch.dtype]]  # shape/dtype of each output that needs a grad
    output_index: list[int]  # their positions among the flattened outputs


class GenericRule(LayerRule):
    """Exact per-sample gradients of an arbitrary module by ``vmap(vjp(functional_call))``."""

    param_names = ()

    def batch_dim(self, module: nn.Module) -> int:
        # Modules that follow PyTorch's batch_first convention put samples in dim 1 otherwise.
        return 1 if getattr(module, "batch_first", True) is False else 0

    def capture(self, module, args, kwargs, output):
        bdim = self.batch_dim(module)
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
        sizes = [x.shape[bdim] for x in leaves if isinstance(x, torch.Tensor) and x.dim() > bdim]
        if not sizes:
            raise RuleError(f"{type(module).__name__} got no tensor input with a batch dimension "
                            f"(dim {bdim}); divebatch needs batched inputs to split the gradient per sample")
        B = sizes[0]
        batched = [isinstance(x, torch.Tensor) and x.dim() > bdim and x.shape[bdim] == B for x in leaves]
        out_leaves, _ = tree_flatten(output)
        index = [i for i, o in enumerate(out_leaves) if isinstance(o, torch.Tensor) and o.requires_grad]
        outputs = [(out_leaves[i].shape, out_leaves[i].dtype) for i in index]
        return GenericCall(leaves, spec, batched, B, outputs, index)

    def batch_size(self, module, ctx):
        return ctx.batch_size

    def norms(self, module, calls, tracked):
        bdim = self.batch_dim(module)
        params = {name: p.detach() for name, p in tracked.items()}
        buffers = dict(module.named_buffers())
        total = None
        for call, grads in calls:
            grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=_device(call))
                     for g, (shape, dtype) in zip(grads, call.outputs)]
            per_sample = self._per_sample_grads(module, call, grads, params, buffers, bdim)
            flat = torch.cat([g.float().reshape(call.batch_size, -1) for g in per_sample.values()], dim=1)
            total = flat if total is None else total + flat
        return total.square().sum(dim=1)

    def _per_sample_grads(self, module, call: GenericCall, grads, params, buffers, bdim):
        batched_leaves = [x for x, b in zip(call.leaves, call.batched) if b]

        def one_sample(sample_leaves, sample_grads):
            it = iter(sample_leaves)
            leaves = [next(it).unsqueeze(bdim) if b else x for x, b in zip(call.leaves, call.batched)]
            args, kwargs = tree_unflatten(leaves, call.spec)

            def forward(p):
                out_leaves, _ = tree_flatten(functional_call(module, (p, buffers), args, kwargs))
                return [out_leaves[i] for i in call.output_index]

            _, pullback = vjp(forward, params)
            return pullback([g.unsqueeze(bdim) for g in sample_grads])[0]

        numel = sum(p.numel() for p in params.values())
        chunk = max(1, int(MAX_EXTRA_BYTES // max(1, 4 * numel)))
        try:
            with torch.enable_grad(), suspend_capture():
                return vmap(one_sample, in_dims=(bdim, bdim), randomness="error", chunk_size=chunk)(
                    batched_leaves, grads)
        except RuntimeError as err:
            if "randomness" in str(err):
                raise RuleError(
                    f"{type(module).__name__} draws random numbers in its forward (dropout in training mode?), "
                    "so its per-sample gradients cannot be replayed exactly; set its dropout to 0, call "
                    ".eval() on it, or freeze its parameters") from err
            raise

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        numel = sum(p.numel() for p in tracked.values())
        chunk = max(1, int(MAX_EXTRA_BYTES // max(1, 4 * numel)))
        return RoutePlan("generic (vmap vjp)", f"B={ctx.batch_size} params={numel}", float("nan"),
                         4.0 * numel * min(chunk, ctx.batch_size))


def _device(call: GenericCall) -> torch.device:
    for x in call.leaves:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


GENERIC = GenericRule()
