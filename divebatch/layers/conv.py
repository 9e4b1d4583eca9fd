"""nn.Conv1d/2d/3d: unfold into a linear map per group, then the linear routes.

A convolution is, per sample and group, ``Y = W_g U`` with ``U [Cin/groups * prod(k), T]`` the
unfolded (im2col) input patches and ``T`` the number of output positions, so its per-sample
weight gradient is ``G^T A`` with ``A = U^T`` and ``G`` the output grad flattened over positions.
Padding of every mode ('zeros', 'reflect', 'replicate', 'circular', and the strings 'same' /
'valid') is applied exactly as the module's forward does, from
``module._reversed_padding_repeated_twice``. The unfolded buffer is built for a bounded number of
samples at a time (``routes.MAX_EXTRA_BYTES``), so it never costs a whole batch of patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerRule, RoutePlan, register
from .linear import linear_norms
from .routes import MAX_EXTRA_BYTES, linear_route


def _padded(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    pads = module._reversed_padding_repeated_twice
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def unfold_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Patches of ``x [B, Cin, *spatial]`` as ``[B * groups, T, Cin/groups * prod(kernel)]``.

    Column order matches ``module.weight.view(Cout, -1)`` within each group.
    """
    n = len(module.kernel_size)
    x = _padded(module, x)
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        # A dilated window is a contiguous window of span dil*(k-1)+1 read every dil-th element.
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    # x: [B, Cin, o_1..o_n, k_1..k_n]
    B, C = x.shape[:2]
    out_sizes = x.shape[2:2 + n]
    groups = module.groups
    x = x.reshape(B, groups, C // groups, *out_sizes, *module.kernel_size)
    channel_and_kernel = [2] + list(range(3 + n, 3 + 2 * n))
    positions = list(range(3, 3 + n))
    x = x.permute(0, 1, *positions, *channel_and_kernel)
    T = 1
    for o in out_sizes:
        T *= o
    return x.reshape(B * groups, T, -1)


def grouped_grad(module: nn.modules.conv._ConvNd, g: torch.Tensor) -> torch.Tensor:
    """Output grad ``[B, Cout, *out]`` as ``[B * groups, T, Cout/groups]``."""
    B, Cout = g.shape[:2]
    g = g.reshape(B, module.groups, Cout // module.groups, -1)
    return g.permute(0, 1, 3, 2).reshape(B * module.groups, -1, Cout // module.groups)


def _unbatched(module, x):
    if x.dim() != len(module.kernel_size) + 2:
        raise ValueError(f"{type(module).__name__} got an input of shape {tuple(x.shape)} without a batch "
                         f"dimension; divebatch needs batched input [B, C, *spatial]")


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    """Rule for ``nn.Conv{1,2,3}d`` with any stride, padding, dilation, groups, padding mode."""

    def capture(self, module, args, kwargs, output):
        x = args[0].detach()
        _unbatched(module, x)
        return x

    def _dims(self, module, x, g):
        d = module.in_channels // module.groups
        for k in module.kernel_size:
            d *= k
        return d, g[0].numel() // module.out_channels, module.out_channels // module.groups

    def chunk_size(self, module, x, g) -> int:
        """Samples per unfold chunk so the patch buffer stays under ``MAX_EXTRA_BYTES``."""
        d, T, _ = self._dims(module, x, g)
        per_sample = module.groups * T * d * 4
        return max(1, min(x.shape[0], int(MAX_EXTRA_BYTES // max(per_sample, 1))))

    def norms(self, module, calls, tracked):
        with_weight, with_bias = "weight" in tracked, "bias" in tracked
        B = calls[0][0].shape[0]
        groups = module.groups
        if not with_weight:
            total = 0
            for _, grads in calls:
                total = total + grads[0].float().reshape(B, module.out_channels, -1).sum(dim=2)
            return total.square().sum(dim=1)
        step = min(self.chunk_size(module, x, grads[0]) for x, grads in calls)
        out = []
        for start in range(0, B, step):
            stop = min(B, start + step)
            a_parts, g_parts = [], []
            for x, grads in calls:
                a_parts.append(unfold_patches(module, x[start:stop]))
                g_parts.append(grouped_grad(module, grads[0][start:stop]))
            a = a_parts[0] if len(calls) == 1 else torch.cat(a_parts, dim=1)
            g = g_parts[0] if len(calls) == 1 else torch.cat(g_parts, dim=1)
            # Per group and sample: weight norm; the bias norm is per sample over all channels,
            # and the groups' channel sets are disjoint, so group bias norms add up too.
            per_group = linear_norms(a, g, True, with_bias)
            out.append(per_group.view(stop - start, groups).sum(dim=1))
        return torch.cat(out)

    def plan(self, module, ctx, grad, tracked) -> RoutePlan:
        d, T, p = self._dims(module, ctx, grad)
        plan = linear_route(ctx.shape[0] * module.groups, T, d, p)
        plan.extra_bytes += self.chunk_size(module, ctx, grad) * module.groups * T * d * 4
        plan.shape = f"{plan.shape} (unfold chunk {self.chunk_size(module, ctx, grad)})"
        return plan
