"""Estimators of gradient diversity and the gradient noise scale.

Notation (DESIGN.md §1): ``g_i = ∇_w ℓ_i(w)`` is the gradient of the **unscaled** per-sample
loss ``ℓ_i``. For one backward over a batch of ``B`` samples,

* ``S1 = Σ_i ||g_i||²``   (the tracker's ``stats.per_sample.sum()``),
* ``S2 = ||Σ_i g_i||²``   (the tracker's ``stats.batch_grad_sq``).

Two estimators of the same statistic:

* :class:`EpochDiversity` — the paper's epoch-pooled gradient diversity
  ``Δ̂ = S / ||A||²`` with ``S = Σ S1`` and ``A = Σ Σ_i g_i`` pooled over all measured steps
  (normally one whole epoch). ``A`` is a parameter-shaped float32 buffer on the parameters'
  device; nothing is copied to the host and nothing calls ``.item()`` until the value is read.
  With the parameters fixed, ``n·Δ̂ = B_noise + 1`` over the training set; as the paper runs
  it, the parameters drift during the epoch, ``||A||²`` shrinks (gradients from different
  points partly cancel) and ``Δ̂`` comes out inflated (×3.6 on Fashion-MNIST's MLP).
* :class:`NoiseScale` — the per-step unbiased estimates (McCandlish et al. 2018)
  ``|G|² ≈ (S2 − S1)/(B(B−1))`` and ``tr Σ ≈ (S1 − S2/B)/(B−1)``, each smoothed by an
  exponential moving average, giving ``B_noise = tr Σ / |G|²`` and the implied
  ``n·Δ = B_noise + 1`` — no dataset size needed (iterable datasets, streaming data).

**Scaling contract.** The user's loss is ``L = c · Σ_i ℓ_i`` (``"sum"``: c = 1, ``"mean"``:
c = 1/B, any positive float). Every number these estimators return is about the unscaled
``ℓ_i``. Callers pass ``S1``/``S2`` already unscaled (the tracker's stats are), and pass the
parameter gradients as they are in ``.grad`` (``= c · Σ_i g_i``) together with ``scale = c``;
with a ``GradScaler`` or gradient accumulation the extra factor goes into ``grad_scale``
(``update(stats, grad_scale=s)`` divides ``S1`` and ``S2`` by ``s²`` and the gradients by
``c·s``).

**Non-finite steps** (overflow under fp16/GradScaler, a diverging run) are skipped: their
contribution is masked with ``torch.where`` on the device — no host synchronisation — and
counted in ``skipped_steps``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from . import _fsdp
from .distributed import all_reduce_sum

__all__ = ["EpochDiversity", "NoiseScale", "noise_scale_terms"]

Number = float | torch.Tensor


def _as_tensor(x: Number | Sequence[float], device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if device is not None and t.device != device:
            t = t.to(device, non_blocking=True)
        return t.to(torch.float64) if t.dtype != torch.float64 else t
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _sum(x: Number, device: torch.device | None = None) -> torch.Tensor:
    """Sum of a per-sample ``[B]`` tensor (or pass a scalar through), as float64."""
    t = _as_tensor(x, device)
    return t.sum() if t.dim() > 0 else t


def _inv_scale_sq(grad_scale: Number, device: torch.device | None) -> torch.Tensor:
    s = _as_tensor(grad_scale, device)
    return 1.0 / (s * s)


def noise_scale_terms(s1: Number, s2: Number, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimates of ``|G|²`` and ``tr Σ`` from one batch (McCandlish et al. 2018, App. A).

    Args:
        s1: ``Σ_i ||g_i||²`` over the batch (unscaled per-sample losses).
        s2: ``||Σ_i g_i||²`` over the same batch.
        batch_size: ``B ≥ 2``.

    Returns:
        ``(g2, trace)`` as float64 tensors: ``g2 = (S2 − S1)/(B(B−1))`` estimates ``|E g|²``,
        ``trace = (S1 − S2/B)/(B−1)`` estimates ``E||g − E g||²`` (the per-sample variance).
        ``g2`` may be negative on one batch; only its average is meaningful.
    """
    if batch_size < 2:
        raise ValueError(f"the noise-scale estimates need a batch of at least 2 samples, got {batch_size}")
    s1 = _as_tensor(s1)
    s2 = _as_tensor(s2, s1.device)
    b = float(batch_size)
    g2 = (s2 - s1) / (b * (b - 1.0))
    tr = (s1 - s2 / b) / (b - 1.0)
    return g2, tr


class EpochDiversity:
    """The paper's epoch-pooled gradient diversity ``Δ̂ = S / ||A||²``.

    ``S`` sums ``Σ_i ||g_i||²`` and ``A`` sums ``Σ_i g_i`` over every measured step since the last
    :meth:`reset` (DiveBatch measures one whole epoch). With ``n`` samples measured at fixed
    parameters, ``n·Δ̂ = B_noise + 1``; :meth:`n_delta` returns ``n·Δ̂`` for the dataset size you
    give it (the quantity the DiveBatch rule multiplies by δ).

    Args:
        params: the tracked parameters, in the tracker's order (``tracker.parameters()``); ``A``
            gets one float32 buffer per parameter, on that parameter's device, allocated on the
            first update. Under FSDP2 (``fully_shard``) each rank keeps ``A`` for its shards only,
            and ``||A||²`` adds the ranks' parts with one all-reduce, so every rank must read it
            (:meth:`value`, the policy's decision) together.

    Units: ``S`` and ``||A||²`` are squared gradient norms of the unscaled per-sample loss;
    ``Δ̂`` is dimensionless (``1/n ≤ Δ̂`` when the measured samples number n, up to drift).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("EpochDiversity needs at least one parameter to accumulate A = Σ g_i over")
        self._device = self.params[0].device
        self.reset()

    # -- accumulation ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything measured so far (start a new measurement window)."""
        self._S = torch.zeros((), dtype=torch.float64, device=self._device)
        self._A: list[torch.Tensor] | None = None
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self.steps = 0
        self.samples = 0

    def observe(self, per_sample_sq: Number, grads: Sequence[torch.Tensor | None], scale: Number = 1.0,
                batch_grad_sq: Number | None = None, batch_size: int | None = None) -> None:
        """Add one optimizer step.

        Args:
            per_sample_sq: unscaled ``||g_i||²``, float ``[B]`` (or their sum as a scalar tensor).
            grads: one tensor per parameter in ``params`` order holding ``scale · Σ_i g_i`` for this
                step only (normally ``p.grad`` right after the step's backward(s)); ``None`` for a
                parameter that received no gradient.
            scale: the factor between ``grads`` and ``Σ_i g_i`` (``c``, times a GradScaler's scale);
                float or tensor.
            batch_grad_sq: optional unscaled ``||Σ_i g_i||²`` of the step; only used to detect a
                non-finite step (skipped when it, or ``Σ per_sample_sq``, is NaN/Inf).
            batch_size: number of samples in the step (default ``len(per_sample_sq)``).
        """
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} tracked parameters")
        s = _sum(per_sample_sq, self._device)
        ok = torch.isfinite(s)
        if batch_grad_sq is not None:
            ok = ok & torch.isfinite(_as_tensor(batch_grad_sq, self._device))
        inv = 1.0 / _as_tensor(scale, self._device)
        if self._A is None:
            self._A = [torch.zeros_like(_fsdp.local_part(p), dtype=torch.float32) for p in self.params]
        for a, g in zip(self._A, grads):
            if g is None:
                continue
            gi = _fsdp.local_part(g.detach())
            okd = ok if ok.device == gi.device else ok.to(gi.device)
            invd = inv.to(device=gi.device, dtype=torch.float32)
            a.add_(torch.where(okd, gi.to(torch.float32) * invd, torch.zeros((), device=gi.device)))
        self._S += torch.where(ok, s, torch.zeros_like(s))
        self._skipped += (~ok).to(torch.int64)
        self.steps += 1
        if batch_size is None:
            t = per_sample_sq
            batch_size = int(t.numel()) if isinstance(t, torch.Tensor) and t.dim() > 0 else 0
        self.samples += int(batch_size)

    def update(self, stats, grads: Sequence[torch.Tensor | None] | None = None, grad_scale: Number = 1.0) -> None:
        """Add one step from a tracker's stats (one backward per optimizer step).

        ``grads`` defaults to ``[p.grad for p in params]``; ``stats.scale`` is the tracker's ``c``;
        ``grad_scale`` is any extra factor the backward was multiplied by (a GradScaler's scale).
        """
        if grads is None:
            grads = [p.grad for p in self.params]
        inv2 = _inv_scale_sq(grad_scale, self._device)
        self.observe(_sum(stats.per_sample, self._device) * inv2, grads,
                     scale=_as_tensor(stats.scale, self._device) * _as_tensor(grad_scale, self._device),
                     batch_grad_sq=_as_tensor(stats.batch_grad_sq, self._device) * inv2,
                     batch_size=int(stats.batch_size))

    # -- reading --------------------------------------------------------------------------
    @property
    def sum_sq(self) -> torch.Tensor:
        """``S = Σ ||g_i||²`` over the measured samples (float64 tensor on the device)."""
        return self._S

    def grad_sum_sq(self) -> torch.Tensor:
        """``||A||² = ||Σ g_i||²`` over the measured samples (float64 tensor on the device)."""
        if self._A is None:
            return torch.zeros((), dtype=torch.float64, device=self._device)
        tot = torch.zeros((), dtype=torch.float64, device=self._device)
        share = None  # FSDP2: this rank's part of the sharded parameters' ||A||²
        for a, p in zip(self._A, self.params):
            sq = a.double().pow(2).sum().to(self._device)
            if _fsdp.is_dtensor(p):
                share = sq / _fsdp.copies(p) if share is None else share + sq / _fsdp.copies(p)
            else:
                tot = tot + sq
        if share is not None:
            tot = tot + all_reduce_sum(share)
        return tot

    def diversity_tensor(self) -> torch.Tensor:
        """``Δ̂ = S/||A||²`` as a float64 tensor (NaN before any step; Inf when ``A = 0``)."""
        if self.steps == 0:
            return torch.full((), math.nan, dtype=torch.float64, device=self._device)
        return self._S / self.grad_sum_sq()

    def value(self) -> float:
        """``Δ̂`` as a Python float (one host synchronisation)."""
        return float(self.diversity_tensor())

    def n_delta(self, dataset_size: int | None = None) -> float:
        """``n·Δ̂`` with ``n = dataset_size`` (default: the number of samples measured)."""
        n = self.samples if dataset_size is None else dataset_size
        return n * self.value()

    @property
    def skipped_steps(self) -> int:
        """Number of observed steps skipped as non-finite (one host synchronisation)."""
        return int(self._skipped)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume a measurement window (tensors stay on their device). Under
        FSDP2 ``A`` is gathered whole for every parameter (an all-gather: every rank calls this)."""
        return {
            "S": self._S.clone(),
            "A": None if self._A is None else [_fsdp.whole(a, p).clone() for a, p in zip(self._A, self.params)],
            "skipped": self._skipped.clone(),
            "steps": self.steps,
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (buffers moved to the parameters' devices)."""
        self._S = state["S"].to(self._device, torch.float64).clone()
        if state["A"] is None:
            self._A = None
        else:
            if len(state["A"]) != len(self.params):
                raise ValueError(f"state has {len(state['A'])} buffers for {len(self.params)} parameters")
            self._A = [_fsdp.local_slice(a.to(p.device, torch.float32), p).clone()
                       for a, p in zip(state["A"], self.params)]
        self._skipped = state["skipped"].to(self._device).clone()
        self.steps = int(state["steps"])
        self.samples = int(state["samples"])

    def __repr__(self) -> str:
        return f"EpochDiversity(params={len(self.params)}, steps={self.steps}, samples={self.samples})"


class NoiseScale:
    """EMA-smoothed per-step estimate of the gradient noise scale ``B_noise = tr Σ / |G|²``.

    Each observed step contributes the unbiased estimates of :func:`noise_scale_terms`; both are
    smoothed by an exponential moving average with per-step decay ``beta`` and Adam-style bias
    correction, and the ratio is taken at read time (a ratio of averages, never an average of
    ratios: single-step ``|G|²`` estimates are noisy and can be negative).

    ``n·Δ = B_noise + 1`` (DESIGN.md §1), so the DiveBatch rule ``m ← δ·n·Δ̂`` becomes
    ``m ← δ·(B_noise + 1)`` with no dataset size — this estimator serves iterable datasets.

    Args:
        beta: EMA decay per observed step, in [0, 1). 0 keeps only the last step.
        device: where the running sums live (default: the first observation's device).

    Units: ``g2`` and ``trace`` are squared gradient norms of the unscaled per-sample loss;
    ``b_noise`` is in samples.
    """

    def __init__(self, beta: float = 0.95, device: torch.device | str | None = None):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self._device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget all observations."""
        dev = self._device
        self._g2 = torch.zeros((), dtype=torch.float64, device=dev)
        self._tr = torch.zeros((), dtype=torch.float64, device=dev)
        self._w = torch.zeros((), dtype=torch.float64, device=dev)  # Σ weights, for bias correction
        self._skipped = torch.zeros((), dtype=torch.int64, device=dev)
        self.steps = 0
        self.samples = 0

    def _to(self, device: torch.device) -> None:
        if self._g2.device != device:
            self._g2, self._tr, self._w, self._skipped = (t.to(device) for t in (self._g2, self._tr, self._w, self._skipped))
        self._device = device

    def observe(self, s1: Number, s2: Number, batch_size: int) -> None:
        """Add one step: ``s1 = Σ_i ||g_i||²`` (a ``[B]`` tensor or its sum), ``s2 = ||Σ_i g_i||²``,
        both unscaled, over the same ``batch_size ≥ 2`` samples. Non-finite steps are skipped."""
        if batch_size < 2:
            return  # a one-sample batch carries no variance information
        s1t = _sum(s1, self._device)
        self._to(s1t.device)
        g2, tr = noise_scale_terms(s1t, _as_tensor(s2, s1t.device), batch_size)
        ok = torch.isfinite(g2) & torch.isfinite(tr)
        b = self.beta
        # masked EMA: a skipped step leaves every running sum untouched
        self._g2 = torch.where(ok, b * self._g2 + (1 - b) * g2, self._g2)
        self._tr = torch.where(ok, b * self._tr + (1 - b) * tr, self._tr)
        self._w = torch.where(ok, b * self._w + (1 - b), self._w)
        self._skipped += (~ok).to(torch.int64)
        self.steps += 1
        self.samples += int(batch_size)

    def update(self, stats, grad_scale: Number = 1.0) -> None:
        """Add one step from a tracker's stats (``per_sample``, ``batch_grad_sq``, ``batch_size``);
        ``grad_scale`` is any extra factor on the loss beyond the tracker's ``c`` (GradScaler)."""
        inv2 = _inv_scale_sq(grad_scale, None if self._device is None else self._device)
        s1 = _sum(stats.per_sample)
        inv2 = inv2.to(s1.device)
        self.observe(s1 * inv2, _as_tensor(stats.batch_grad_sq, s1.device) * inv2, int(stats.batch_size))

    # -- reading --------------------------------------------------------------------------
    def g2_tensor(self) -> torch.Tensor:
        """Bias-corrected EMA of ``|G|²`` (float64 tensor; NaN before any step)."""
        return self._g2 / self._w

    def trace_tensor(self) -> torch.Tensor:
        """Bias-corrected EMA of ``tr Σ`` (float64 tensor; NaN before any step)."""
        return self._tr / self._w

    def b_noise_tensor(self) -> torch.Tensor:
        """``B_noise = tr Σ / |G|²`` (float64 tensor). ``+Inf`` when the averaged ``|G|²`` is ≤ 0
        (the gradient is indistinguishable from noise); NaN before any step."""
        g2, tr = self._g2, self._tr
        bn = tr / g2
        return torch.where(g2 > 0, bn, torch.where(self._w > 0, torch.full_like(bn, math.inf), torch.full_like(bn, math.nan)))

    @property
    def g2(self) -> float:
        """``|G|²`` estimate as a float."""
        return float(self.g2_tensor())

    @property
    def trace(self) -> float:
        """``tr Σ`` estimate as a float."""
        return float(self.trace_tensor())

    def b_noise(self) -> float:
        """``B_noise`` in samples, as a Python float (one host synchronisation)."""
        return float(self.b_noise_tensor())

    def n_delta(self, dataset_size: int | None = None) -> float:
        """The implied ``n·Δ = B_noise + 1`` (``dataset_size`` is accepted for symmetry with
        :class:`EpochDiversity` and ignored: the identity needs no n)."""
        return self.b_noise() + 1.0

    @property
    def skipped_steps(self) -> int:
        """Number of observed steps skipped as non-finite."""
        return int(self._skipped)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Running sums and counters (tensors stay on their device)."""
        return {"beta": self.beta, "g2": self._g2.clone(), "tr": self._tr.clone(), "w": self._w.clone(),
                "skipped": self._skipped.clone(), "steps": self.steps, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.beta = float(state["beta"])
        dev = self._device if self._device is not None else state["g2"].device
        self._g2 = state["g2"].to(dev, torch.float64).clone()
        self._tr = state["tr"].to(dev, torch.float64).clone()
        self._w = state["w"].to(dev, torch.float64).clone()
        self._skipped = state["skipped"].to(dev).clone()
        self._device = dev
        self.steps = int(state["steps"])
        self.samples = int(state["samples"])

    def __repr__(self) -> str:
        return f"NoiseScale(beta={self.beta}, steps={self.steps})"
