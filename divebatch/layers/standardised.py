"""Weight standardisation: per-sample squared norms of the parameters behind a standardised
convolution or ``F.linear`` weight, without ``vmap`` pull-backs through the standardisation.

A weight-standardised layer (timm's ``StdConv2d`` and ``ScaledStdConv2d``, as BiT, NF-ResNets and
NFNets use them) computes its weight per output channel ``o`` from a parameter ``θ [O, ...]`` with
``F.batch_norm`` in training mode over ``θ.reshape(1, O, K)``::

    W_o = γ_o ŵ_o + β_o,   ŵ_o = (θ_o - mean(θ_o)) / σ_o,   σ_o² = var(θ_o) + eps   (K entries each)

with an affine weight ``γ`` and shift ``β`` computed from other parameters (a learned gain times
``fan_in ** -0.5``), constants, or none. Sample b's gradient of ``θ_o`` is batch norm's backward
of its gradient ``g = ∂W_o`` (a K-vector)::

    ∂θ_o = (γ_o / σ_o) (g - mean(g) - ŵ_o mean(g ⊙ ŵ_o))

while ``∂γ_o = Sx = ⟨g, ŵ_o⟩`` and ``∂β_o = S1 = Σ_k g_k``. Two ways, chosen per layer by the
linear routes' cost model (``linear_route_name``) for its rows ``A_b [T, K]`` (a convolution's
unfolded patches, per group) and output grad ``G_b [T, O]``:

* formed (where the linear routes would instantiate): each sample's ``[O, K]`` weight gradient,
  from one grouped weight-gradient convolution (overlapping kernels) or ``G_bᵀ A_b``
  (non-overlapping ones, ``F.linear``), then the formula above on it, a bounded chunk of samples
  at a time. Their sum is the batch's weight gradient: the recorder runs such a convolution
  through ``conv._FusedConv``, whose backward takes it from there instead of computing it again
  (``generic._ConvGradsFromUse``), so tracking costs about what a plain convolution's fused route
  does.
* closed form (where they would take the ghost route: per-sample gradients large against the
  rows, as a 1x1 convolution of many channels at few positions). As ``ŵ_o`` sums to 0 and
  ``||ŵ_o||² = K r_o`` with ``r_o = var / (var + eps)``::

      ||∂θ_o||² = (γ_o / σ_o)² (||g||² - S1² / K - (2 - r_o) Sx² / K)

  where ``Σ_o (γ_o / σ_o)² ||g_o||²`` is the linear routes' norm of ``A_b`` with ``G_b``'s columns
  scaled by ``γ_o / σ_o``, ``S1 = Σ_t G_b[t, o] (A_b 1)[t]`` and ``Sx = Σ_t G_b[t, o] (A_b ŵ_oᵀ)[t]``
  (the layer's own product run again with the weight ``ŵ``: a forward's cost): no per-sample
  weight gradient at all. The
  subtraction cancels where most of a sample's ``g`` lies along ``1`` or ``ŵ_o`` (float32's
  rounding of the terms amplified by ``||g||² / ||∂θ||²``): samples whose terms exceed what is left
  ``_CANCELLATION`` times over are formed again, in float64.

The generic route (``generic.ProductUse``) instead forms every sample's weight gradient and pulls
it back through ``batch_norm`` under ``vmap``, and autograd computes the weight gradient again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from .base import per_sample_sq
from .conv import conv_weight_grads, grouped_grad, unfold_patches
from .linear import linear_norms
from .routes import linear_route_name, max_extra_bytes

# The convolutions a standardised product may be, and their spatial dims.
CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


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
        """``(per-sample squared norms [B] float32, weight gradient or None)``: the norms of the
        ``tracked`` parameters among this product's, from its input ``x`` and output grad ``grad``
        (rows of a sample consecutive in dim 0 where ``x`` has ``batch_size * n`` rows); the
        gradient of the standardised weight (the product's, summed over the samples, in the
        weight's shape) where each sample's was formed, else None."""
        theta = params[self.theta].detach()
        O, K = theta.shape[0], theta[0].numel()
        flat = theta.double().reshape(O, K)
        var, mean = torch.var_mean(flat, dim=1, unbiased=False)
        sigma = (var + self.eps).sqrt()
        w_hat = (flat - mean[:, None]) / sigma[:, None]
        scale = (self.gamma.detach().double() if self.gamma is not None else torch.ones_like(sigma)) / sigma
        dtype = torch.promote_types(torch.promote_types(x.dtype, grad.dtype), torch.float32)

        r = var / (var + self.eps)
        groups = 1 if func is F.linear else arguments[3]
        T = grad.numel() // (batch_size * O)  # rows (output positions) per sample and group
        # Where the linear routes would take the ghost route (per-sample gradients large against
        # the rows; measured: also where the closed form's product then costs as much as the
        # per-sample gradients', it is faster than writing and reading them): the closed form.
        closed = linear_route_name(batch_size * groups, T, K, O // groups, x.device.type) == "ghost"
        x, grad = x.detach(), grad.detach()
        if closed or func is F.linear or _non_overlapping(theta.shape, *conv_arguments(func, arguments)):
            chunks = _from_rows(func, x, grad, arguments, theta.shape, batch_size, dtype, closed, w_hat, scale, r)
        else:
            # Overlapping kernels: each sample's weight gradient from one grouped convolution, as
            # the convolution rule's fused route takes them (faster than unfolding the patches).
            chunks = _convolved(func, x, grad, arguments, theta.shape, batch_size, dtype, w_hat.to(dtype),
                                scale.to(dtype))
        theta_sq, s1, sx, sums = zip(*chunks)
        theta_sq, s1, sx = torch.cat(theta_sq), torch.cat(s1), torch.cat(sx)
        # (formed per-sample gradients add up to the batch's weight gradient: ``take_weight_grad``)
        weight_grad = None if any(t is None for t in sums) else sum(sums).view(theta.shape)
        total = theta_sq if self.theta in tracked else torch.zeros(batch_size, dtype=torch.float64,
                                                                               device=x.device)
        for pull, part in ((self.gamma_grads, sx), (self.beta_grads, s1)):
            if pull is not None:
                total = total + sum(per_sample_sq(t.double()) for name, t in pull(part.float()).items()
                                    if name in tracked)
        if self.bias is not None and self.bias in tracked:
            per_sample = (grad.double().reshape(batch_size, -1, O).sum(dim=1) if func is F.linear
                          else grad.double().reshape(batch_size, O, -1).sum(dim=2))
            total = total + per_sample.square().sum(dim=1)
        return total.float(), weight_grad


def _from_rows(func, x, grad, arguments, weight_shape, batch_size: int, dtype, closed: bool, w_hat, scale, r):
    """``_statistics`` of chunks of samples from their rows (``_rows``): by the closed form
    (``closed``; no weight gradient: None), or each sample's weight gradient formed outright."""
    O, K = w_hat.shape
    groups = 1 if func is F.linear else arguments[3]
    T = grad.numel() // (batch_size * O)
    sample_bytes = 4 * (groups * T * K + (2 * O * T if closed else 3 * O * K))
    for start, a, g in _rows(func, x, grad, arguments, weight_shape, batch_size, dtype, sample_bytes):
        g_t = g.transpose(1, 2)  # [n * groups, p, T]: positions last, as a convolution's output grad lies
        if not closed:
            yield _formed(a, g_t, w_hat.to(dtype), scale.to(dtype))
            continue
        samples = slice(start, start + a.shape[0] // groups)
        sx = _along_weight(func, x, grad, arguments, w_hat.to(dtype).view(weight_shape), batch_size, samples)
        sq, s1, weighted = _closed_form(a, g_t, groups, scale, r, sx)
        # Where the subtraction cancelled (most of a gradient along 1 or ŵ_o: float32's rounding
        # of the terms, amplified), those samples again, formed outright in float64.
        unsure = (weighted > _CANCELLATION * sq).nonzero().squeeze(1)
        step = max(1, int(max_extra_bytes(a.device.type) // (8 * 3 * O * K)))
        for part in unsure.split(step) if unsure.numel() else ():
            rows = (part.unsqueeze(1) * groups + torch.arange(groups, device=a.device)).reshape(-1)
            sq[part] = _formed(a[rows].double(), g_t[rows].double(), w_hat, scale)[0]
        yield sq, s1, sx, None


# The amplification of rounding (the closed form's terms against what is left of them) above
# which a sample is computed again in float64: float32's ~1e-7 becomes at most ~2e-6.
_CANCELLATION = 16.0


def _closed_form(a, g_t, groups: int, scale, r, sx) -> tuple:
    """``(||∂θ_b||² [n] float64, S1 [n, O], Σ_o (γ_o/σ_o)² ||g_o||² [n] float64)`` by the closed
    form (module docstring) from the rows, with no per-sample weight gradient formed; ``sx``:
    ``Sx [n, O]`` (``_along_weight``)."""
    n, K = a.shape[0] // groups, a.shape[2]
    O = sx.shape[1]
    p = O // groups
    # Σ_o (γ_o / σ_o)² ||g_o||² from the linear routes, the output grad's columns scaled.
    scaled = (g_t * scale.to(a.dtype).view(groups, p, 1).repeat(n, 1, 1)).transpose(1, 2)
    weighted = linear_norms(a, scaled, True, False).view(n, groups).sum(dim=1).double()
    s1 = torch.bmm(g_t, a.sum(dim=2, keepdim=True)).reshape(n, O)  # (A_b 1: each row's sum)
    correction = (scale.square() / K) * (s1.double().square() + (2 - r) * sx.double().square())
    # (rounding can take an exactly vanishing gradient's norm a hair below 0)
    return (weighted - correction.sum(dim=1)).clamp_min(0), s1, weighted


def _along_weight(func, x, grad, arguments, w_hat, batch_size: int, samples: slice) -> torch.Tensor:
    """``Sx [n, O]`` of the ``samples``: ``Σ_t G_b[t, o] (A_b ŵ_oᵀ)[t]``, the product itself run on
    their input with the weight ``ŵ`` (``w_hat``, in the weight's shape and the rows' dtype): the
    library's convolution, faster than a product of the unfolded patches at few positions."""
    O = w_hat.shape[0]
    if func is F.linear:
        rows = x.reshape(batch_size, -1, x.shape[-1])[samples].to(w_hat.dtype)
        return (grad.reshape(batch_size, -1, O)[samples].to(w_hat.dtype) * F.linear(rows, w_hat)).sum(dim=1)
    projected = func(x[samples].to(w_hat.dtype), w_hat, None, *arguments)
    return (grad[samples].to(w_hat.dtype) * projected).flatten(2).sum(dim=2)


def _formed(a, g_t, w_hat, scale) -> tuple:
    """``_statistics`` of each sample's weight gradient formed outright from its rows (``[n, O, K]``, in ``a``'s dtype) and batch norm's backward of it."""
    return _statistics(torch.bmm(g_t, a).view(-1, *w_hat.shape), w_hat, scale)


def _convolved(func, x, grad, arguments, weight_shape, batch_size: int, dtype, w_hat, scale):
    """``_statistics`` of chunks of samples whose weight gradients come from one grouped
    weight-gradient convolution each (``conv_weight_grads``), within ``routes.max_extra_bytes``."""
    O, K = w_hat.shape
    stride, padding, dilation, groups = conv_arguments(func, arguments)
    step = max(1, min(batch_size, int(max_extra_bytes(x.device.type) // (4 * (3 * O * K + x[0].numel()
                                                                           + grad[0].numel())))))
    for start in range(0, batch_size, step):
        per_sample = conv_weight_grads(x[start:start + step].to(dtype), grad[start:start + step].to(dtype),
                                       weight_shape, stride, padding, dilation, groups)
        yield _statistics(per_sample.view(-1, O, K), w_hat, scale)


def _statistics(per_sample, w_hat, scale) -> tuple:
    """``(||∂θ_b||² [n] float64, S1 [n, O], Sx [n, O], their sum [O, K])`` of per-sample weight
    gradients ``[n, O, K]``."""
    O, K = w_hat.shape
    s1 = per_sample.sum(dim=2)
    sx = (per_sample * w_hat).sum(dim=2)
    theta_grad = (per_sample - s1.unsqueeze(2) / K - w_hat * (sx / K).unsqueeze(2)) * scale.view(O, 1)
    sq = (theta_grad.reshape(theta_grad.shape[0], -1).square().sum(dim=1) if per_sample.dtype == torch.float64
          else per_sample_sq(theta_grad).double())
    return sq, s1, sx, per_sample.sum(dim=0)


def _rows(func, x, grad, arguments, weight_shape, batch_size: int, dtype, sample_bytes: int):
    """``(first sample, A [n * groups, T, K], G [n * groups, T, O / groups])`` in ``dtype``, for
    chunks of samples: an ``F.linear``'s rows per sample, or a convolution's unfolded patches per sample and
    group; ``n * sample_bytes`` (what a chunk costs the caller) stays under ``routes.max_extra_bytes``
    (``MAX_EXTRA_BYTES``; more on CUDA, where each chunk costs launches)."""
    O, K = weight_shape[0], math.prod(weight_shape[1:])
    if func is F.linear:
        x, grad, layout = x.reshape(batch_size, -1, K), grad.reshape(batch_size, -1, O), None
    else:
        stride, padding, dilation, groups = conv_arguments(func, arguments)
        if any(padding):
            x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
        layout = SimpleNamespace(kernel_size=tuple(weight_shape[2:]), stride=stride, dilation=dilation,
                                 groups=groups)
    step = max(1, min(batch_size, int(max_extra_bytes(x.device.type) // sample_bytes)))
    for start in range(0, batch_size, step):
        a, g = x[start:start + step].to(dtype), grad[start:start + step].to(dtype)
        yield (start, a, g) if layout is None else (start, unfold_patches(layout, a), grouped_grad(layout, g))


def conv_arguments(func, arguments) -> tuple:
    """A convolution's ``(stride, padding, dilation, groups)``, the first three one entry per dim."""
    dims = CONV_DIMS[func]
    stride, padding, dilation, groups = arguments
    return (*(tuple(a) if isinstance(a, (tuple, list)) else (a,) * dims for a in (stride, padding, dilation)), groups)


def _non_overlapping(weight_shape, stride, padding, dilation, groups) -> bool:
    """Windows that tile the input (a 1x1 convolution, a patch embedding): unfolding them copies the
    input once, in another order, and the rows' product runs at GEMM speed (see
    ``conv.UNFOLDED_TILE_ELEMENTS``)."""
    return (groups == 1 and tuple(stride) == tuple(weight_shape[2:]) and not any(padding)
            and all(d == 1 for d in dilation))


def standardised_product(func, arguments) -> bool:
    """Whether the closed form reads this product: ``F.linear`` or a convolution with numeric
    padding (a string's is left to the generic route)."""
    if func is F.linear:
        return True
    return func in CONV_DIMS and not isinstance(arguments[1], str)
