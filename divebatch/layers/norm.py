"""LayerNorm, RMSNorm, GroupNorm, BatchNorm and InstanceNorm{1,2,3}d: instantiate the (small) per-sample grads.

With ``x_hat`` the normalised input and ``G`` the output grad, an affine normalisation layer's
per-sample gradients are ``sum (x_hat * G)`` (weight) and ``sum G`` (bias), summed over every
position that shares a parameter: both have only ``C`` (or ``normalized_shape``) entries per
sample, so they are formed outright in float32. ``x_hat`` is recomputed from the captured input
in the backward pass rather than stored.

BatchNorm in training mode normalises with statistics of the whole batch, so a sample's true
gradient is not defined on its own (the batch statistics couple every sample). divebatch reports
the *decomposition* of the batch gradient given by the layer input and output grad: sample b's
share is ``sum (x_hat_b * G_b)`` with ``x_hat`` normalised by the batch statistics, and these
shares add up exactly to the batch gradient. In eval mode (running statistics) BatchNorm is a
per-sample map and the numbers are exact per-sample gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .base import PerSampleGradsRule, RoutePlan, register, register_matcher, same_code


#: Samples per slice of ``x_hat * G`` are chosen so the slice stays under this many bytes.
_CHUNK_BYTES = 4 * 2**20


class AffineNormRule(PerSampleGradsRule):
    """Shared sum-and-square logic; subclasses say how to normalise and which dims share a param."""

    def normalized(self, module, ctx) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, module, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the positions that share one parameter entry: [B, *param_shape]."""
        raise NotImplementedError

    def rows(self, module, ctx, start: int, stop: int):
        """The part of ``ctx`` that ``normalized`` needs for samples ``start:stop``, or None where
        the normalisation couples the samples (then the whole batch is normalised at once)."""
        return ctx[start:stop]

    def per_sample_grads(self, module, calls, tracked) -> dict[str, torch.Tensor]:
        """``{name: [B, *param_shape]}`` float32, summed over the calls.

        ``x_hat * G`` is formed a few samples at a time, in place in the recomputed ``x_hat``: one
        temporary of at most ``_CHUNK_BYTES`` instead of two of the activation's size (the first
        GroupNorm of a ResNet-18 at 112x112, batch 16: 4 MB instead of 2 x 12.8 MB)."""
        total: dict[str, torch.Tensor] = {}
        for ctx, grads in calls:
            g = grads[0]
            parts = {}
            if "weight" in tracked:
                B = g.shape[0]
                step = max(1, min(B, int(_CHUNK_BYTES // max(1, 4 * g[0].numel()))))
                if step < B and self.rows(module, ctx, 0, step) is None:
                    step = B
                pieces = []
                for start in range(0, B, step):
                    part = ctx if step == B else self.rows(module, ctx, start, start + step)
                    # normalized() returns a fresh tensor, so it may be overwritten.
                    x_hat = self.normalized(module, part).float()
                    pieces.append(self.reduce(module, x_hat.mul_(g[start:start + step])))
                parts["weight"] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            if "bias" in tracked:
                parts["bias"] = self.reduce(module, g.float())
            for name, part in parts.items():
                total[name] = part if name not in total else total[name] + part
        return total

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        x = ctx[0] if isinstance(ctx, tuple) else ctx
        return RoutePlan("instantiate", "x".join(map(str, x.shape)), 4.0 * x.numel(), 4.0 * x.numel())


#: On CPU, ``group_norm_grads`` (C++) beat the chunked PyTorch path from about a hundred positions
#: per channel (``bench/norm_routes.py``, 2 threads: GroupNorm(32, C) 0.89x at 7 x 7, 1.2x at
#: 14 x 14, 1.9-2.2x at 56 x 56; InstanceNorm 3.3x at 14 x 14), so smaller maps keep that path there.
GROUP_NORM_CPU_MIN_POSITIONS = 100


def _kernel_serves(x: torch.Tensor, d: int | None = None, cpu_min_positions: int = 0) -> bool:
    """Whether ``ops.affine_norm_grads`` (given the row width ``d``), ``ops.group_norm_grads`` or
    ``ops.channel_norm_grads`` (``d`` None) runs a compiled kernel for ``x`` where it pays: C++ on
    CPU (from ``cpu_min_positions`` positions per channel), Triton where it serves (rows up to its
    ``MAX_D``). Elsewhere the op would be its reference, which holds all of ``x_hat`` at once;
    ``AffineNormRule``'s chunked path gives the same numbers in less memory."""
    forced = ops.backend()
    if forced == "reference":
        return False
    if ops.triton_serves(x.device):
        return d is None or d <= ops._kernels.affine_norm_grads.MAX_D
    if d is None and math.prod(x.shape[2:]) < cpu_min_positions and forced != "cpp":
        return False
    return x.device.type == "cpu" and ops.CPP_AVAILABLE


def _per_channel_grads(op, x: torch.Tensor, g: torch.Tensor, tracked, *args) -> dict[str, torch.Tensor]:
    """``{name: [B, C]}`` of one call by ``op`` (``ops.group_norm_grads`` or
    ``ops.channel_norm_grads``, given ``args`` between ``g`` and ``with_bias``), positions flattened."""
    B, C = x.shape[:2]
    weight, bias = op(x.reshape(B, C, -1), g.reshape(B, C, -1), *args, "bias" in tracked)
    return {name: part for name, part in (("weight", weight), ("bias", bias)) if name in tracked}


def _group_norm_grads(x: torch.Tensor, g: torch.Tensor, groups: int, eps: float, tracked) -> dict[str, torch.Tensor]:
    """``{name: [B, C]}`` of a group-normalised call by ``ops.group_norm_grads``."""
    return _per_channel_grads(ops.group_norm_grads, x, g, tracked, groups, eps)


def _sum_calls(parts) -> dict[str, torch.Tensor]:
    """The per-sample gradients of several calls of one module, added per parameter."""
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = value if name not in total else total[name] + value
    return total


class RowNormRule(AffineNormRule):
    """A norm over the trailing ``normalized_shape`` dims with one affine entry per normalised
    element (LayerNorm, RMSNorm): where a compiled kernel serves, the per-sample sums come from
    ``ops.affine_norm_grads`` in one pass over the input and output grad, ``x_hat`` never written
    (CPU, 2 threads, five runs of ``bench/norm_routes.py``: LayerNorms 1.2-1.6x as fast as the
    PyTorch path in float32, 2.0-6.5x in bfloat16; a 2048-wide float32 RMSNorm, memory-bound
    either way, 0.9-2.5x; bench/results/norm_routes.md)."""

    rows_independent = True
    rms = False
    #: x_hat rounded to the input's dtype before the weight multiplies it (Llama's RMSNorm).
    round_x_hat = False

    def eps(self, module, x: torch.Tensor) -> float:
        return module.eps

    def normalized_shape(self, module) -> tuple[int, ...]:
        return tuple(module.normalized_shape)

    def reduce(self, module, t):
        return t.reshape(t.shape[0], -1, *self.normalized_shape(module)).sum(dim=1)

    def per_sample_grads(self, module, calls, tracked) -> dict[str, torch.Tensor]:
        shape = self.normalized_shape(module)
        d = math.prod(shape)
        if not all(_kernel_serves(ctx, d) for ctx, _ in calls):
            return super().per_sample_grads(module, calls, tracked)

        def call_grads(x, g):
            B = x.shape[0]
            weight, bias = ops.affine_norm_grads(x.reshape(B, -1, d), g.reshape(B, -1, d), self.rms,
                                                 self.eps(module, x), "bias" in tracked, self.round_x_hat)
            return {name: part.reshape(B, *shape) for name, part in (("weight", weight), ("bias", bias))
                    if name in tracked}

        return _sum_calls(call_grads(x, grads[0]) for x, grads in calls)


@register(nn.LayerNorm)
class LayerNormRule(RowNormRule):
    """``nn.LayerNorm``: per-sample grads summed over all non-normalised, non-batch dims."""

    def normalized(self, module, x):
        return F.layer_norm(x.float(), module.normalized_shape, None, None, module.eps)


@register(nn.RMSNorm)
class RMSNormRule(RowNormRule):
    """``nn.RMSNorm`` (weight only)."""

    param_names = ("weight",)
    rms = True

    def eps(self, module, x):
        # eps=None: PyTorch's default is the machine epsilon of the type it computes in (float32 for
        # float16/bfloat16 inputs), not of the input's type: bfloat16's, 2^-7, changed the normalised
        # input of small activations by up to 98% (4.6% off in a model's norms under autocast).
        return module.eps if module.eps is not None else torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps

    def normalized(self, module, x):
        return F.rms_norm(x.float(), module.normalized_shape, None, self.eps(module, x))


@register(nn.GroupNorm)
class GroupNormRule(AffineNormRule):
    """``nn.GroupNorm``: per-channel parameters, summed over spatial positions."""

    def normalized(self, module, x):
        return F.group_norm(x.float(), module.num_groups, None, None, module.eps)

    def per_sample_grads(self, module, calls, tracked) -> dict[str, torch.Tensor]:
        """By ``ops.group_norm_grads`` where a compiled kernel serves (one pass, ``x_hat`` never written)."""
        if not all(_kernel_serves(x, cpu_min_positions=GROUP_NORM_CPU_MIN_POSITIONS) for x, _ in calls):
            return super().per_sample_grads(module, calls, tracked)
        return _sum_calls(_group_norm_grads(x, grads[0], module.num_groups, module.eps, tracked) for x, grads in calls)

    def reduce(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)


class RunningStatsNormRule(AffineNormRule):
    """A norm with per-channel parameters that normalises by statistics of its input, or by running
    ones (eval mode): ``ctx`` is ``(x, mean, var)``, ``mean`` None for the input's own statistics."""

    @staticmethod
    def stats_ctx(module, x, input_stats: bool):
        if input_stats:
            return x, None, None
        # Running statistics: remember the ones the forward used (a later train step changes them).
        return x, module.running_mean.detach().clone(), module.running_var.detach().clone()

    def batch_size(self, module, ctx):
        return ctx[0].shape[0]

    def reduce(self, module, t):
        return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)

    def input_stats_grads(self, module, x, g, tracked) -> dict[str, torch.Tensor]:
        """A call normalised by statistics of its input, by a compiled kernel."""
        raise NotImplementedError

    def kernel_serves(self, ctx) -> bool:
        """Whether a compiled kernel takes this call (``ops.channel_norm_grads`` beat the PyTorch
        path on CPU at every size measured, ``bench/results/norm_routes.md``)."""
        return _kernel_serves(ctx[0])

    def per_sample_grads(self, module, calls, tracked) -> dict[str, torch.Tensor]:
        """Where a compiled kernel serves: by ``ops.channel_norm_grads`` for running statistics,
        by ``input_stats_grads`` for the input's own; ``x_hat`` is never written."""
        if not all(self.kernel_serves(ctx) for ctx, _ in calls):
            return super().per_sample_grads(module, calls, tracked)

        def call_grads(ctx, g):
            x, mean, var = ctx
            if mean is None:
                return self.input_stats_grads(module, x, g, tracked)
            return _per_channel_grads(ops.channel_norm_grads, x, g, tracked, mean, var, module.eps)

        return _sum_calls(call_grads(ctx, grads[0]) for ctx, grads in calls)


def _syncs_statistics(module: nn.SyncBatchNorm) -> bool:
    """Whether a SyncBatchNorm's forward normalises by statistics gathered over its process group
    (training mode, more than one process), as ``nn.SyncBatchNorm.forward`` decides."""
    import torch.distributed as dist

    if not (module.training and dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(module.process_group or dist.group.WORLD) > 1


def _global_batch_stats(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 per-channel mean and biased variance of ``x [B, C, ...]`` over every rank's batch and
    positions: each rank's count, mean and sum of squared deviations gathered, combined in float64
    (Chan et al.'s pairwise formula, so no rank's sums are subtracted from another's)."""
    import torch.distributed as dist

    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    var, mean = torch.var_mean(x3 if x3.dtype in (torch.float32, torch.float64) else x3.float(), dim=(0, 2),
                               correction=0)
    count = float(x3.shape[0] * x3.shape[2])
    var, mean = (var.double(), mean.double()) if count else (torch.zeros_like(var, dtype=torch.float64),) * 2
    local = torch.cat([mean.new_tensor([count]), mean, var * count])  # [1 + 2C] float64
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    parts = torch.stack(gathered)
    counts, means, sq_devs = parts[:, :1], parts[:, 1:1 + x3.shape[1]], parts[:, 1 + x3.shape[1]:]
    total = counts.sum()
    if total == 0:
        raise ValueError(f"SyncBatchNorm got no values on any rank (input {tuple(x.shape)}): no statistics to "
                         "normalise by")
    global_mean = (counts * means).sum(0) / total
    sq_dev = (sq_devs + counts * (means - global_mean).square()).sum(0)
    return global_mean.float(), (sq_dev / total).float()


@register(nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)  # SyncBatchNorm has its own forward
class BatchNormRule(RunningStatsNormRule):
    """``nn.BatchNorm{1,2,3}d`` (and SyncBatchNorm): the decomposition of the batch gradient.

    See the module docstring for what a per-sample number means in training mode. A SyncBatchNorm
    synchronising over several processes normalises by the statistics of every rank's batch: they
    are gathered when the forward is captured (a collective on every rank) and used as given
    statistics, so each rank's shares are those of the global batch's decomposition.
    """

    rows_regrouped = True

    def rows_view(self, x, lead):
        """``[B*T, C, *S]`` rows (LeViT's and PointNet-style ``BatchNorm1d`` on flattened tokens, a
        ``BatchNorm2d`` on frames folded into the batch) as ``[B, C, T*S0, *S[1:]]`` (``[B, C, T]``
        for 2-D rows): the same elements per channel, so the same statistics and running-statistics
        update, and each sample's positions are its rows'."""
        if len(lead) != 2 or x.dim() < 2:
            return None
        B, T = lead
        moved = x.reshape(B, T, *x.shape[1:]).movedim(1, 2)  # [B, C, T, *S]
        return moved.reshape(B, x.shape[1], T * x.shape[2], *x.shape[3:]) if x.dim() > 2 else moved

    def rows_unview(self, output, rows, n_lead, shape):
        B, C = output.shape[:2]
        return output.reshape(B, C, rows // B, *shape[2:]).movedim(2, 1).reshape(rows, C, *shape[2:])

    def capture(self, module, args, kwargs, output):
        x = args[0].detach()
        if isinstance(module, nn.SyncBatchNorm) and _syncs_statistics(module):
            # Normalised by the statistics of every rank's batch: gather them now, as the forward
            # did (each rank makes this collective in the same order), and use them as given ones.
            return (x, *_global_batch_stats(x, module.process_group))
        return self.stats_ctx(module, x, module.training or module.running_mean is None)

    def rows(self, module, ctx, start, stop):
        x, mean, var = ctx
        return None if mean is None else (x[start:stop], mean, var)  # batch statistics couple samples

    def normalized(self, module, ctx):
        x, mean, var = ctx
        return F.batch_norm(x.float(), None if mean is None else mean.float(), None if var is None else var.float(),
                            None, None, mean is None, 0.0, module.eps)

    def input_stats_grads(self, module, x, g, tracked):
        """Training mode: normalised by the batch's statistics, by ``ops.channel_norm_grads``."""
        return _per_channel_grads(ops.channel_norm_grads, x, g, tracked, None, None, module.eps)


@register(nn.modules.instancenorm._InstanceNorm)
class InstanceNormRule(RunningStatsNormRule):
    """``nn.InstanceNorm{1,2,3}d`` with ``affine=True``: per-channel parameters, summed over spatial
    positions. Each sample is normalised by its own statistics (or, with ``track_running_stats``
    in eval mode, by the running ones), so the per-sample gradients are exact, unlike BatchNorm's."""

    def capture(self, module, args, kwargs, output):
        x = args[0].detach()
        if x.dim() == module._get_no_batch_dim():
            raise ValueError(f"{type(module).__name__} got an input of shape {tuple(x.shape)} without a batch "
                             "dim, so it has no samples; give it [B, C, ...] inputs")
        return self.stats_ctx(module, x, module.training or not module.track_running_stats)

    def rows(self, module, ctx, start, stop):
        x, mean, var = ctx
        return x[start:stop], mean, var

    def normalized(self, module, ctx):
        x, mean, var = ctx
        return F.instance_norm(x.float(), None if mean is None else mean.float(),
                               None if var is None else var.float(), None, None, mean is None, 0.0, module.eps)

    def input_stats_grads(self, module, x, g, tracked):
        """Normalised by each sample's own statistics: a GroupNorm of one channel a group."""
        return _group_norm_grads(x, g, x.shape[1], module.eps, tracked)

    def kernel_serves(self, ctx):
        """Own statistics go to ``ops.group_norm_grads``, with GroupNorm's size cut-off on CPU."""
        return _kernel_serves(ctx[0], cpu_min_positions=GROUP_NORM_CPU_MIN_POSITIONS if ctx[1] is None else 0)


def _llama_rms_norm_forward(self, hidden_states):
    # Hugging Face's LlamaRMSNorm.forward, token for token: the rule below applies to a module
    # only if its forward compiles to this same code.
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _is_llama_rms_norm(module: nn.Module) -> bool:
    """A module whose forward is bytecode-identical to Hugging Face's LlamaRMSNorm.forward, with a
    1-D ``weight`` parameter and a numeric ``variance_epsilon``."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), (int, float))
            and same_code(getattr(type(module), "forward", None), _llama_rms_norm_forward))


@register_matcher(_is_llama_rms_norm)
class LlamaRMSNormRule(RowNormRule):
    """Hugging Face's RMSNorm classes that share ``LlamaRMSNorm``'s forward (Llama, Mistral, Qwen2/3
    and most others: 140 of the 204 RMSNorm classes in transformers 5.24), matched by the code of
    their forward rather than by name, so no import of ``transformers`` and no list to keep up;
    a class whose forward differs in any way takes the generic route. The forward computes
    ``x_hat = x * rsqrt(mean(x^2) + eps)`` in float32, casts it back to the input's dtype and
    multiplies by the weight, so the weight's per-sample gradient is ``sum_t x_hat_t * g_t``."""

    param_names = ("weight",)
    rms = True
    round_x_hat = True

    def eps(self, module, x):
        return module.variance_epsilon

    def normalized_shape(self, module):
        return tuple(module.weight.shape)

    def normalized(self, module, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return h.to(x.dtype)
