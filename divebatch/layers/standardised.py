"""Weight standardisation in closed form: per-sample squared norms of the parameters behind a
standardised convolution or ``F.linear`` weight, with no per-sample gradient formed.

A weight-standardised layer (timm's ``StdConv2d`` and ``ScaledStdConv2d``, as BiT, NF-ResNets and
NFNets use them) computes its weight per output channel ``o`` from a parameter ``θ [O, ...]`` with
``F.batch_norm`` in training mode over ``θ.reshape(1, O, K)``::

    W_o = γ_o ŵ_o + β_o,   ŵ_o = (θ_o - mean(θ_o)) / σ_o,   σ_o² = var(θ_o) + eps   (K entries each)

with an affine weight ``γ`` and shift ``β`` computed from other parameters (a learned gain times
``fan_in ** -0.5``), or none. Sample b's gradient of ``θ_o`` is batch norm's backward of its
gradient ``g = ∂W_o`` (a K-vector)::

    ∂θ_o = (γ_o / σ_o) (g - mean(g) - ŵ_o mean(g ⊙ ŵ_o))

and, as ``ŵ_o`` sums to 0 and ``||ŵ_o||² = K r_o`` with ``r_o = var / (var + eps)``::

    ||∂θ_o||² = (γ_o / σ_o)² (||g||² - S1² / K - (2 - r_o) Sx² / K),   S1 = Σ_k g_k,   Sx = ⟨g, ŵ_o⟩

while ``∂γ_o = Sx`` and ``∂β_o = S1``. With the layer's input as rows ``A_b [T, K]`` (a
convolution's unfolded patches, per group) and its output grad ``G_b [T, O]``, ``g = A_bᵀ G_b[:, o]``,
so ``S1 = Σ_t G_b[t, o] (A_b 1)[t]`` and ``Sx = Σ_t G_b[t, o] (A_b ŵ_oᵀ)[t]`` take one product the
size of the layer's forward, and ``Σ_o (γ_o / σ_o)² ||g_o||²`` is the linear routes' norm (ghost or
instantiate, ``linear_norms``) of ``A_b`` with ``G_b``'s columns scaled by ``γ_o / σ_o``. The
generic route instead forms every sample's ``[O, K]`` weight gradient and pulls it back through
``batch_norm`` under ``vmap``.

The subtraction cancels where most of a sample's ``g`` lies along ``1`` or ``ŵ_o``: the result's
relative rounding error is float32's times ``||g||² / ||∂θ||²`` (the corrections themselves are
formed in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from .base import per_sample_sq
from .conv import grouped_grad, unfold_patches
from .linear import linear_norms
from .routes import MAX_EXTRA_BYTES, linear_route_name

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


@dataclass(eq=False)
class StandardisedWeight:
    """How a product's weight was standardised (see the module docstring), as recorded in the
    forward. ``gamma_grads`` / ``beta_grads`` take the per-sample gradients ``[B, O]`` of the
    normalisation's affine weight / shift back to the parameters they were computed from
    (``{name: [B, *shape]}``); None where there is no such tensor."""

    theta: str                          # the standardised parameter's name
    eps: float
    gamma: torch.Tensor | None          # the affine weight [O] the forward used (detached)
    gamma_grads: Callable | None
    beta_grads: Callable | None
    bias: str | None                    # the product's own bias, a parameter (or None)

    def norms(self, func, x: torch.Tensor, grad: torch.Tensor, arguments: list, params: dict,
              tracked, batch_size: int) -> torch.Tensor:
        """Per-sample squared norms ``[B]`` (float32) of the ``tracked`` parameters among this
        product's, from its input ``x`` and output grad ``grad`` (rows of a sample consecutive in
        dim 0 where ``x`` has ``batch_size * n`` rows)."""
        theta = params[self.theta].detach()
        O, K = theta.shape[0], theta[0].numel()
        flat = theta.double().reshape(O, K)
        var, mean = torch.var_mean(flat, dim=1, unbiased=False)
        sigma = (var + self.eps).sqrt()
        w_hat = (flat - mean[:, None]) / sigma[:, None]
        scale = (self.gamma.detach().double() if self.gamma is not None else torch.ones_like(sigma)) / sigma
        dtype = torch.promote_types(torch.promote_types(x.dtype, grad.dtype), torch.float32)

        w_hat32, scale32 = w_hat.to(dtype), scale.to(dtype)
        theta_sq, s1, sx = [], [], []
        for a, g, groups in _rows(func, x.detach(), grad.detach(), arguments, theta.shape, batch_size, dtype):
            n, T, p = a.shape[0] // groups, a.shape[1], O // groups
            g_t = g.transpose(1, 2)  # [n * groups, p, T]: positions last, as a convolution's output grad lies
            # Where the linear routes would take the ghost route (per-sample gradients large against
            # the rows; measured: also where the closed form's product then costs as much as the
            # per-sample gradients', it is faster than writing and reading them): the closed form.
            if linear_route_name(n * groups, T, K, p) == "ghost":
                # Σ_o (γ_o / σ_o)² ||g_o||² from the linear routes, the output grad's columns scaled:
                scaled = (g_t * scale32.view(groups, p, 1).repeat(n, 1, 1)).transpose(1, 2)
                weighted = linear_norms(a, scaled, True, False).view(n, groups).sum(dim=1)
                # ŵ A_bᵀ per group (one product of the forward's size) and A_b 1.
                projected = torch.matmul(w_hat32.view(groups, p, K), a.transpose(1, 2).reshape(n, groups, K, T))
                sx.append((g_t.reshape(n, groups, p, T) * projected).sum(dim=3).reshape(n, O))
                s1.append(torch.bmm(g_t, a.sum(dim=2, keepdim=True)).reshape(n, O))
                correction = (scale.square() / K) * (s1[-1].double().square()
                                                     + (2 - var / (var + self.eps)) * sx[-1].double().square())
                # (rounding can take an exactly vanishing gradient's norm a hair below 0)
                theta_sq.append((weighted.double() - correction.sum(dim=1)).clamp_min(0))
            else:
                # Each sample's weight gradient, then batch norm's backward of it, formed outright.
                per_sample = torch.bmm(g_t, a).view(n, O, K)
                s1.append(per_sample.sum(dim=2))
                sx.append((per_sample * w_hat32).sum(dim=2))
                theta_grad = (per_sample - s1[-1].unsqueeze(2) / K - w_hat32 * (sx[-1] / K).unsqueeze(2))
                theta_sq.append(per_sample_sq(theta_grad * scale32.view(O, 1)).double())
        s1, sx = torch.cat(s1), torch.cat(sx)

        total = torch.cat(theta_sq) if self.theta in tracked else torch.zeros(batch_size, dtype=torch.float64,
                                                                               device=x.device)
        for pull, part in ((self.gamma_grads, sx), (self.beta_grads, s1)):
            if pull is not None:
                total = total + sum(per_sample_sq(t.double()) for name, t in pull(part.float()).items()
                                    if name in tracked)
        if self.bias is not None and self.bias in tracked:
            per_sample = (grad.double().reshape(batch_size, -1, O).sum(dim=1) if func is F.linear
                          else grad.double().reshape(batch_size, O, -1).sum(dim=2))
            total = total + per_sample.square().sum(dim=1)
        return total.float()


def _rows(func, x, grad, arguments, weight_shape, batch_size: int, dtype):
    """``(A [n * groups, T, K], G [n * groups, T, O / groups], groups)`` in ``dtype``, for chunks of
    samples: an ``F.linear``'s rows per sample, or a convolution's unfolded patches per sample and
    group; a chunk's patches and per-sample weight gradients stay under ``MAX_EXTRA_BYTES``."""
    O, K = weight_shape[0], math.prod(weight_shape[1:])
    if func is F.linear:
        x, grad, groups, layout = x.reshape(batch_size, -1, K), grad.reshape(batch_size, -1, O), 1, None
    else:
        dims = _CONVS[func]
        stride, padding, dilation, groups = arguments
        stride, padding, dilation = (tuple(a) if isinstance(a, (tuple, list)) else (a,) * dims
                                     for a in (stride, padding, dilation))
        if any(padding):
            x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
        layout = SimpleNamespace(kernel_size=tuple(weight_shape[2:]), stride=stride, dilation=dilation,
                                 groups=groups)
    T = grad[0].numel() // O
    step = max(1, min(batch_size, int(MAX_EXTRA_BYTES // (4 * (groups * T * K + 3 * O * K)))))
    for start in range(0, batch_size, step):
        a, g = x[start:start + step].to(dtype), grad[start:start + step].to(dtype)
        yield (a, g, 1) if layout is None else (unfold_patches(layout, a), grouped_grad(layout, g), groups)


def standardised_product(func, arguments) -> bool:
    """Whether the closed form reads this product: ``F.linear`` or a convolution with numeric
    padding (a string's is left to the generic route)."""
    if func is F.linear:
        return True
    return func in _CONVS and not isinstance(arguments[1], str)
