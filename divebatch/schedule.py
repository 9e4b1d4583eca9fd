"""Batch-size policies shaped like ``torch.optim.lr_scheduler``: :class:`DiveBatch`,
:class:`AdaBatch`, :class:`Fixed`, and a sample-counted :class:`CosineLR`.

A policy holds the current logical batch size in ``policy.batch_size``; an
:class:`~divebatch.sampler.AdaptiveBatchSampler` reads it at the start of every epoch. Call
``policy.observe()`` once per optimizer step (after ``backward()``, before ``optimizer.step()``)
and ``policy.step()`` once per epoch, after the epoch's last optimizer step::

    for epoch in range(epochs):
        for x, y in loader:                 # DataLoader(ds, batch_sampler=AdaptiveBatchSampler(ds, policy))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            policy.observe()                # reads the tracker only on measured steps
            opt.step()
        policy.step()                       # may grow policy.batch_size for the next epoch
        lr_sched.step()                     # an epoch-counted LR schedule: see below

**Learning rate.** When a policy rescales the learning rate it *multiplies* every param group's
``lr`` (and the ``base_lrs`` of the schedulers passed as ``lr_schedulers=``), so it composes with
any chainable ``torch.optim.lr_scheduler`` (``CosineAnnealingLR``, ``StepLR``, ``ExponentialLR``,
``MultiStepLR`` compute the next lr from the current one). Schedulers that recompute the lr from
``base_lrs`` (``LambdaLR``, ``OneCycleLR``, :class:`CosineLR`) keep the rescale only when passed in
``lr_schedulers``. ``policy.lr_factor`` is the product of all rescales so far.

**Count schedules in samples or epochs, never in optimizer steps**: a larger batch makes fewer
steps per epoch, so a schedule over ``T`` steps would stretch as the batch grows. Either step an
epoch-based scheduler once per epoch (``CosineAnnealingLR(opt, T_max=epochs)``) or step a
:class:`CosineLR` with the number of samples seen (``sched.step(samples_seen)``).

**Scaling contract** (DESIGN.md §2): the estimators behind :class:`DiveBatch` work on the
unscaled per-sample loss ``ℓ_i`` whatever the reduction of the user's loss ``L = c·Σ ℓ_i``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Iterable, Sequence

import torch

from .distributed import global_step_sums, rank_and_world
from .estimator import EpochDiversity, NoiseScale

__all__ = ["BatchSizePolicy", "Fixed", "AdaBatch", "DiveBatch", "CosineLR", "LR_SCALINGS", "ESTIMATORS",
           "DEFAULT_POLICY", "PAPER_POLICY"]

#: Learning-rate rescaling rules of :class:`DiveBatch` when the batch grows from m to m'.
LR_SCALINGS = ("none", "linear", "sqrt")
#: Estimators accepted by :class:`DiveBatch`.
ESTIMATORS = ("epoch", "noise-scale")


def _batch_norm_in_training(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm module that normalises by its batch's statistics now."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
               for m in model.modules())


#: divebatch's default policy, as keyword arguments of :class:`DiveBatch` (docs/training.md explains
#: the choice and the measurements): the noise-scale estimator on one optimizer step in 16, after every
#: epoch ``m ← min(max(B_noise + 1, m), 2m, m_max)`` (δ = 1: grow to the measured critical batch, at
#: most ×2 per decision), lr unchanged. Use as ``DiveBatch(opt, n, m0, m_max, tracker=t, **DEFAULT_POLICY)``.
DEFAULT_POLICY = dict(estimator="noise-scale", delta=1.0, lr_scaling="none", max_growth=2.0, measure_every=16,
                      measure_epochs=1, resize_every=1, ema_beta=0.9)

#: The paper's rule as the authors ran it (their code's logic): one whole measured epoch per window,
#: epoch-pooled Δ̂, δ = 0.1, no growth cap, lr unchanged (pass ``resize_every`` yourself: 20 in the
#: paper, 3 in divebatch's 30-epoch benchmark).
PAPER_POLICY = dict(estimator="epoch", delta=0.1, lr_scaling="none", max_growth=None, measure_every=1,
                    measure_epochs=1)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral)
                                       or (isinstance(value, float) and value.is_integer())):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _scale_group_lr(group: dict, factor: float) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr.mul_(factor)
    else:
        group["lr"] = lr * factor


class CosineLR:
    """Cosine learning-rate decay counted in any unit of progress (samples, epochs, tokens).

    ``lr(t) = eta_min + (base_lr − eta_min) · ½(1 + cos(π · min(t, total)/total))``, with an
    optional linear warm-up over the first ``warmup`` units. Call :meth:`step` with the progress
    so far (e.g. the number of training samples seen); unlike a step-counted scheduler the decay
    does not stretch when the batch size grows. Pass it to a policy's ``lr_schedulers`` so batch
    rescales of the lr survive (they multiply ``base_lrs``).

    Args:
        optimizer: its param groups' current ``lr`` become ``base_lrs``.
        total: progress at which the lr reaches ``eta_min`` (same unit as :meth:`step`'s argument).
        eta_min: final lr (absolute, same for all groups).
        warmup: progress over which the lr rises linearly from 0 (0: none).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total: float, eta_min: float = 0.0, warmup: float = 0.0):
        if not total > 0:
            raise ValueError(f"CosineLR total must be > 0, got {total}")
        if warmup < 0 or warmup >= total:
            raise ValueError(f"CosineLR warmup must be in [0, total), got {warmup}")
        self.optimizer = optimizer
        self.total = float(total)
        self.eta_min = float(eta_min)
        self.warmup = float(warmup)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.progress = 0.0
        self.step(0.0)

    def factor(self, progress: float) -> float:
        """The cosine factor in [0, 1] at ``progress`` (warm-up included)."""
        t = min(max(float(progress), 0.0), self.total)
        f = 0.5 * (1.0 + math.cos(math.pi * t / self.total))
        if self.warmup > 0 and t < self.warmup:
            f *= t / self.warmup
        return f

    def step(self, progress: float) -> None:
        """Set every group's lr for ``progress`` units done."""
        self.progress = float(progress)
        f = self.factor(progress)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            lr = self.eta_min + (base - self.eta_min) * f
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def get_last_lr(self) -> list[float]:
        """The lrs set by the last :meth:`step`."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"total": self.total, "eta_min": self.eta_min, "warmup": self.warmup,
                "base_lrs": list(self.base_lrs), "progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.eta_min, self.warmup = state["total"], state["eta_min"], state["warmup"]
        self.base_lrs = list(state["base_lrs"])
        self.step(state["progress"])


class BatchSizePolicy:
    """Base class: a logical batch size that may change at epoch boundaries.

    Attributes:
        batch_size: the logical batch size (samples per optimizer step) for the current epoch.
        max_batch_size: upper bound m_max.
        epoch: number of completed epochs (calls to :meth:`step`).
        lr_factor: product of every learning-rate rescale applied so far.
        history: one dict per :meth:`step` call that changed something (epoch, old/new batch size,
            lr factor, and the estimate the decision used).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, batch_size: int, max_batch_size: int | None = None,
                 lr_schedulers: Sequence = ()):
        self.optimizer = optimizer
        self.batch_size = _check_int("batch_size", batch_size)
        if max_batch_size is None:
            max_batch_size = self.batch_size
        self.max_batch_size = _check_int("max_batch_size", max_batch_size)
        if self.max_batch_size < self.batch_size:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be >= the initial batch_size "
                             f"({self.batch_size})")
        self.initial_batch_size = self.batch_size
        self.lr_schedulers = list(lr_schedulers)
        self.epoch = 0
        self.lr_factor = 1.0
        self.history: list[dict] = []
        self.last_decision: dict | None = None

    # -- what the training loop calls -----------------------------------------------------
    @property
    def measuring(self) -> bool:
        """Whether the current epoch is measured (per-sample norms needed). False here."""
        return False

    @property
    def measure_now(self) -> bool:
        """Whether the next optimizer step should be measured (enable the tracker for it)."""
        return False

    def observe(self, stats=None, grads=None, grad_scale=1.0) -> None:
        """Per optimizer step, after backward and before ``optimizer.step()``. No-op here."""

    def observe_sums(self, per_sample_sq, batch_grad_sq, batch_size: int, grads=None, scale=1.0) -> None:
        """Low-level :meth:`observe` (unscaled ``Σ||g_i||²`` and ``||Σ g_i||²`` of one step). No-op here."""

    def step(self) -> int:
        """End of an epoch: maybe change the batch size; returns the batch size for the next epoch."""
        self.epoch += 1
        return self.batch_size

    # -- helpers --------------------------------------------------------------------------
    def _rescale_lr(self, factor: float) -> None:
        if factor == 1.0:
            return
        self.lr_factor *= factor
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                _scale_group_lr(g, factor)
        for s in self.lr_schedulers:
            if hasattr(s, "base_lrs"):
                s.base_lrs = [b * factor for b in s.base_lrs]

    def _record(self, old: int, new: int, lr_mult: float, **extra) -> None:
        d = {"epoch": self.epoch, "old_batch_size": old, "new_batch_size": new, "lr_multiplier": lr_mult,
             "lr_factor": self.lr_factor, **extra}
        self.last_decision = d
        self.history.append(d)

    def state_dict(self) -> dict:
        """Batch size, epoch, lr factor, history (the optimizer and lr schedulers save their own)."""
        return {"batch_size": self.batch_size, "max_batch_size": self.max_batch_size, "epoch": self.epoch,
                "lr_factor": self.lr_factor, "history": [dict(h) for h in self.history],
                "initial_batch_size": self.initial_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`. The optimizer's lr is restored by its own state_dict."""
        self.batch_size = int(state["batch_size"])
        self.max_batch_size = int(state["max_batch_size"])
        self.epoch = int(state["epoch"])
        self.lr_factor = float(state["lr_factor"])
        self.history = [dict(h) for h in state["history"]]
        self.initial_batch_size = int(state.get("initial_batch_size", self.batch_size))
        self.last_decision = self.history[-1] if self.history else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, max_batch_size={self.max_batch_size}, epoch={self.epoch})"


class Fixed(BatchSizePolicy):
    """Constant batch size (plain mini-batch SGD), for baselines and uniform code paths.

    Args:
        optimizer: accepted for symmetry; never touched.
        batch_size: samples per optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, batch_size: int):
        super().__init__(optimizer, batch_size, batch_size)


class AdaBatch(BatchSizePolicy):
    """AdaBatch (Devarakonda et al., 2017): multiply the batch by ``factor`` every ``resize_every``
    epochs, up to ``max_batch_size``.

    After epochs ``resize_every, 2·resize_every, …`` the batch becomes ``min(factor·m, m_max)`` and
    the lr is multiplied by ``lr_factor ** log_factor(m_new/m_old)`` — exactly ``lr_factor`` per
    full growth step (1.0: lr untouched, the default; 2.0 with factor 2: linear scaling).

    Args:
        optimizer: whose param groups' lr are rescaled (may be None when lr_factor is 1).
        batch_size: initial batch size m0 (samples).
        max_batch_size: m_max (samples).
        resize_every: epochs between growth steps (≥ 1).
        factor: growth factor per step (> 1; 2 = doubling).
        lr_factor: lr multiplier per full growth step (> 0).
        lr_schedulers: schedulers whose ``base_lrs`` must follow the rescale (LambdaLR, CosineLR).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, batch_size: int, max_batch_size: int,
                 resize_every: int = 20, factor: float = 2.0, lr_factor: float = 1.0, lr_schedulers: Sequence = ()):
        super().__init__(optimizer, batch_size, max_batch_size, lr_schedulers)
        self.resize_every = _check_int("resize_every", resize_every)
        if not factor > 1.0:
            raise ValueError(f"AdaBatch factor must be > 1, got {factor}")
        if not lr_factor > 0.0:
            raise ValueError(f"AdaBatch lr_factor must be > 0, got {lr_factor}")
        self.factor = float(factor)
        self.lr_factor_per_step = float(lr_factor)

    def step(self) -> int:
        """End of an epoch: grow the batch when ``epoch % resize_every == 0`` (epochs counted from 1)."""
        self.epoch += 1
        if self.epoch % self.resize_every == 0 and self.batch_size < self.max_batch_size:
            old = self.batch_size
            new = min(int(old * self.factor), self.max_batch_size)
            mult = self.lr_factor_per_step ** (math.log(new / old) / math.log(self.factor))
            self.batch_size = new
            self._rescale_lr(mult)
            self._record(old, new, mult)
        return self.batch_size


class DiveBatch(BatchSizePolicy):
    """DiveBatch: grow the batch with the gradient diversity (Chen, Wang, Sundaram 2025).

    At the end of every ``resize_every``-th epoch, while ``m < m_max``::

        m ← min(max(δ · n·Δ̂, m), m_max)         NaN/Inf estimate → m_max; never shrinks

    with ``n·Δ̂`` from the chosen estimator:

    * ``estimator="epoch"`` (the paper): the last epoch of each window is measured whole;
      ``Δ̂ = Σ||g_i||² / ||Σ g_i||²`` pooled over that epoch (:class:`EpochDiversity`), times
      ``n = dataset_size``.
    * ``estimator="noise-scale"``: ``n·Δ̂ = B_noise + 1`` from the EMA of per-step unbiased
      estimates (:class:`NoiseScale`); needs no ``dataset_size``. Only every
      ``measure_every``-th step of the measured epochs is measured, so the cost can be made as
      small as wanted.

    Optional ``max_growth`` caps one decision at ``m·max_growth`` (the paper has no cap and on
    Fashion-MNIST jumps 128 → 2048 at the first decision). Once ``m = m_max`` nothing is measured
    any more and, when a ``tracker`` is attached, it is switched off (zero overhead).

    Args:
        optimizer: whose param groups' lr are rescaled per ``lr_scaling``.
        dataset_size: n, training samples per epoch (required for ``estimator="epoch"``).
        batch_size: initial batch size m0 (samples).
        max_batch_size: m_max (samples).
        delta: δ > 0 (the paper: 0.1 for CIFAR-10, 0.01 for CIFAR-100 / Tiny-ImageNet).
        resize_every: epochs per decision window (the paper: 20 of 200 epochs).
        lr_scaling: ``"none"`` (the paper's default), ``"linear"`` (lr × m'/m) or ``"sqrt"``.
        estimator: ``"epoch"``, ``"noise-scale"``, or an estimator instance.
        tracker: a :class:`divebatch.tracker.GradNormTracker`; the policy switches its ``enabled``
            flag so only measured steps pay for per-sample norms, and reads it in :meth:`observe`.
        params: the parameters ``Σ g_i`` is accumulated over (default: ``tracker.parameters()``,
            else every trainable parameter of the optimizer).
        max_growth: cap on ``m'/m`` per decision (None or ``math.inf``: uncapped, as the paper).
        measure_every: measure one optimizer step in ``measure_every`` (noise-scale only; the
            epoch estimator needs every step of its epoch).
        measure_epochs: how many epochs at the end of each window are measured (1: the paper).
        ema_beta: EMA decay per measured step of the noise-scale estimator.
        lr_schedulers: schedulers whose ``base_lrs`` must follow the rescale (LambdaLR, CosineLR).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, dataset_size: int | None, batch_size: int,
                 max_batch_size: int, delta: float = 0.1, resize_every: int = 20, lr_scaling: str = "none",
                 estimator="epoch", tracker=None, params: Iterable[torch.nn.Parameter] | None = None,
                 max_growth: float | None = None, measure_every: int = 1, measure_epochs: int = 1,
                 ema_beta: float = 0.95, lr_schedulers: Sequence = ()):
        super().__init__(optimizer, batch_size, max_batch_size, lr_schedulers)
        if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
            raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {lr_scaling!r}")
        if max_growth is not None and not max_growth > 1.0:
            raise ValueError(f"max_growth must be > 1 (None or math.inf: no cap), got {max_growth}")
        if max_growth is not None and math.isinf(max_growth):
            max_growth = None
        self.delta = float(delta)
        self.resize_every = _check_int("resize_every", resize_every)
        self.measure_epochs = _check_int("measure_epochs", measure_epochs)
        if self.measure_epochs > self.resize_every:
            raise ValueError(f"measure_epochs ({self.measure_epochs}) cannot exceed resize_every ({self.resize_every})")
        self.measure_every = _check_int("measure_every", measure_every)
        self.lr_scaling = lr_scaling
        self.max_growth = None if max_growth is None else float(max_growth)
        self.tracker = tracker
        if params is None:
            if tracker is not None:
                params = tracker.parameters()
            elif optimizer is not None:
                params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.params = list(params) if params is not None else []

        if isinstance(estimator, str):
            if estimator not in ESTIMATORS:
                raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
            self.estimator_name = estimator
            if estimator == "epoch":
                if not self.params:
                    raise ValueError("the epoch estimator needs the parameters: pass tracker=, params= or optimizer=")
                est = EpochDiversity(self.params)
            else:
                dev = self.params[0].device if self.params else None
                est = NoiseScale(beta=ema_beta, device=dev)
        else:
            est = estimator
            self.estimator_name = "epoch" if isinstance(est, EpochDiversity) else "noise-scale"
        self.estimator = est
        model = getattr(tracker, "model", None)  # (a GradNormTracker's; any object with .enabled may stand in)
        if self.estimator_name == "noise-scale" and model is not None and _batch_norm_in_training(model):
            warnings.warn(
                "the tracked model has BatchNorm in training mode: its per-sample numbers are a decomposition of the "
                "batch gradient whose shares are anti-correlated by construction (BatchNorm's backward centres the "
                "output grads over the batch), so the noise-scale estimate can read the gradient as pure noise "
                "(B_noise = inf) and grow the batch at its limit rate; the paper's epoch estimator "
                "(estimator='epoch', --policy paper) stays finite there. See the README's limits.", stacklevel=2)
        if self.estimator_name == "epoch":
            if self.measure_every != 1:
                raise ValueError("the epoch estimator measures every step of its epoch: measure_every must be 1")
            if dataset_size is None:
                raise ValueError("dataset_size (n, samples per epoch) is required with estimator='epoch'; "
                                 "use estimator='noise-scale' for data of unknown size")
        self.dataset_size = None if dataset_size is None else _check_int("dataset_size", dataset_size)
        self._step_in_epoch = 0
        self._observed_in_window = 0
        self._sync_tracker()

    # -- measurement gating ---------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once ``batch_size == max_batch_size``: nothing is measured any more."""
        return self.batch_size >= self.max_batch_size

    @property
    def measuring(self) -> bool:
        """Whether the current epoch is one of the measured epochs at the end of a window."""
        if self.done:
            return False
        pos = self.epoch % self.resize_every  # 0-based position of the current epoch in its window
        return pos >= self.resize_every - self.measure_epochs

    @property
    def measure_now(self) -> bool:
        """Whether the next optimizer step is measured (the tracker is enabled for it)."""
        return self.measuring and self._step_in_epoch % self.measure_every == 0

    def _sync_tracker(self) -> None:
        if self.tracker is not None:
            self.tracker.enabled = self.measure_now

    # -- per step -------------------------------------------------------------------------
    def observe(self, stats=None, grads=None, grad_scale=1.0) -> None:
        """Call once per optimizer step, after ``backward()`` and before ``optimizer.step()``.

        On measured steps, reads ``stats`` (default: ``tracker.collect()``) and the parameters'
        ``.grad`` (or ``grads``, in ``params`` order), and feeds the estimator; otherwise only
        counts the step. ``grad_scale``: any factor the loss was multiplied by beyond the tracker's
        ``c`` (e.g. ``scaler.get_scale()`` with a CUDA GradScaler, read only on measured steps).

        Under DistributedDataParallel (a process group with several ranks) call it on every rank:
        the global batch's ``Σ||g_i||²`` and ``||Σ g_i||²`` are formed with one all-reduce of a few
        scalars and the all-reduced ``.grad`` (:func:`divebatch.distributed.global_step_sums`),
        so every rank feeds its estimator the same numbers. Every rank's loss must use the same
        ``c`` (the tracker's ``loss_reduction``): e.g. ``world_size / global_batch_size``.
        """
        if self.measure_now:
            if stats is None:
                if self.tracker is None:
                    raise RuntimeError("DiveBatch.observe() needs stats= or a tracker= given to the policy")
                stats = self.tracker.collect()
            if getattr(stats, "backwards", 1) > 1:
                raise ValueError(f"{stats.backwards} backward passes since the last collect(): observe() reads one "
                                 "backward per optimizer step, so with gradient accumulation it would mix the last "
                                 "micro-batch's norms with the accumulated gradient. Use "
                                 "divebatch.train.accumulate_step(..., measure=True) and policy.observe_sums(...). "
                                 "(An input's gradient taken with loss.backward(), as an adversarial attack's step, "
                                 "is a backward too: take it with torch.autograd.grad(loss, x), which forms no "
                                 "parameter's gradient and is not counted)")
            world = rank_and_world()[1]
            if world > 1:  # DDP: the global batch's sums (one small all-reduce), as observe_sums takes them
                loss_scale = float(stats.scale) * float(grad_scale)
                s1, s2, B = global_step_sums(stats.per_sample, stats.batch_size, self.params, loss_scale)
                self.observe_sums(s1, s2, B, grads=grads, scale=loss_scale / world)
                return
            if isinstance(self.estimator, EpochDiversity):
                self.estimator.update(stats, grads=grads, grad_scale=grad_scale)
            else:
                self.estimator.update(stats, grad_scale=grad_scale)
            self._observed_in_window += 1
        self._advance()

    def observe_sums(self, per_sample_sq, batch_grad_sq, batch_size: int, grads=None, scale=1.0) -> None:
        """Low-level :meth:`observe` for one optimizer step made of several backwards (micro-batches).

        Args:
            per_sample_sq: unscaled ``Σ_i ||g_i||²`` over the whole logical batch (tensor or ``[B]``).
            batch_grad_sq: unscaled ``||Σ_i g_i||²`` over the whole logical batch.
            batch_size: samples in the logical batch.
            grads: ``scale · Σ_i g_i`` per parameter (default ``p.grad``), epoch estimator only.
            scale: factor between ``grads`` and ``Σ_i g_i``.
        """
        if self.measure_now:
            if isinstance(self.estimator, EpochDiversity):
                if grads is None:
                    grads = [p.grad for p in self.params]
                self.estimator.observe(per_sample_sq, grads, scale=scale, batch_grad_sq=batch_grad_sq,
                                       batch_size=batch_size)
            else:
                self.estimator.observe(per_sample_sq, batch_grad_sq, batch_size)
            self._observed_in_window += 1
        self._advance()

    def _advance(self) -> None:
        self._step_in_epoch += 1
        self._sync_tracker()

    # -- per epoch ------------------------------------------------------------------------
    def current_estimate(self) -> float:
        """``n·Δ̂`` from the estimator now (``B_noise + 1`` for the noise-scale estimator); NaN
        before any measurement. One host synchronisation."""
        if isinstance(self.estimator, EpochDiversity):
            return self.estimator.n_delta(self.dataset_size)
        return self.estimator.n_delta()

    def step(self) -> int:
        """End of an epoch: at the end of a window apply the rule; returns the next batch size."""
        was_decision = self.measuring and (self.epoch % self.resize_every == self.resize_every - 1)
        self.epoch += 1
        self._step_in_epoch = 0
        if was_decision:
            if self._observed_in_window == 0:
                warnings.warn("DiveBatch: a decision epoch ended with no observed step (call policy.observe() "
                              "after every backward); keeping the batch size", RuntimeWarning, stacklevel=2)
            else:
                self._decide()
            self._observed_in_window = 0
        self._sync_tracker()
        return self.batch_size

    def _decide(self) -> None:
        nd = self.current_estimate()
        old = self.batch_size
        target = self.delta * nd
        if not math.isfinite(target):
            new = self.max_batch_size
        else:
            new = int(min(max(target, old), self.max_batch_size))
        if self.max_growth is not None:
            new = min(new, max(old, int(old * self.max_growth)))
        new = max(new, old)
        extra = {"n_delta": nd, "target": target}
        if isinstance(self.estimator, NoiseScale):
            extra["b_noise"] = nd - 1.0
        elif isinstance(self.estimator, EpochDiversity):
            extra["diversity"] = self.estimator.value()
        if isinstance(self.estimator, EpochDiversity):
            self.estimator.reset()  # the paper pools one epoch per decision
        mult = 1.0
        if new != old:
            if self.lr_scaling == "linear":
                mult = new / old
            elif self.lr_scaling == "sqrt":
                mult = math.sqrt(new / old)
            self.batch_size = new
            self._rescale_lr(mult)
        self._record(old, new, mult, **extra)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Policy state plus the estimator's (its tensors stay on their device)."""
        s = super().state_dict()
        s.update({"step_in_epoch": self._step_in_epoch, "observed_in_window": self._observed_in_window,
                  "estimator": self.estimator.state_dict(), "delta": self.delta})
        return s

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; re-syncs the tracker's ``enabled`` flag."""
        super().load_state_dict(state)
        self._step_in_epoch = int(state["step_in_epoch"])
        self._observed_in_window = int(state["observed_in_window"])
        self.estimator.load_state_dict(state["estimator"])
        self._sync_tracker()
