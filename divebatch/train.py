"""Batteries-included training with an adaptive batch size: :class:`Trainer` and :func:`train`.

What one optimizer step does (:func:`accumulate_step`): the logical batch of ``B`` samples comes
as one or more micro-batches; each micro-batch's loss is ``(1/B)·Σ_{i∈micro} ℓ_i`` so that the
accumulated ``.grad`` equals the gradient of the mean loss over the logical batch — the same
step a single full batch would make (to float rounding). On measured steps the tracker's ``c``
is set to ``1/B`` (times a GradScaler's scale), so its per-sample norms are those of the
unscaled ``ℓ_i`` (DESIGN.md §2); ``Σ||g_i||²`` adds up over micro-batches and ``||Σ g_i||²`` of
the logical batch is read from the accumulated ``.grad`` when there are several micro-batches.

The learning rate follows a cosine counted in **samples** (``CosineLR``), so growing the batch
does not stretch or shrink the schedule; a policy's lr rescale multiplies its ``base_lrs``.

Policies by name (:func:`make_policy`):

* ``"sgd"`` — :class:`~divebatch.schedule.Fixed` at ``batch_size``.
* ``"adabatch"`` — double every ``resize_every`` epochs up to ``max_batch_size``.
* ``"paper"`` — DiveBatch as the authors ran it: epoch-pooled Δ̂ over one whole measured
  epoch per window, ``m ← min(max(δ·n·Δ̂, m), m_max)``, δ = 0.1, no growth cap, lr unchanged.
* ``"divebatch"`` — divebatch's default policy (see :data:`DEFAULT_POLICY` and
  docs/training.md for the design and the measurements behind it).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _fsdp
from .data import DataBundle
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import (all_reduce_sum, check_same_decision, check_same_model, global_step_sums,
                          rank_and_world)
from .models import build_model
from .sampler import AdaptiveBatchSampler
from .schedule import DEFAULT_POLICY, PAPER_POLICY, AdaBatch, BatchSizePolicy, CosineLR, DiveBatch, Fixed

__all__ = [
    "POLICIES",
    "DEFAULT_POLICY",
    "PAPER_POLICY",
    "TrainConfig",
    "Trainer",
    "train",
    "make_policy",
    "accumulate_step",
    "CHECKPOINT_FORMAT",
    "group_micro_batches",
    "per_sample_loss",
    "evaluate",
    "time_to_accuracy",
]

#: Policy names understood by :func:`make_policy`, the Trainer and the command line.
POLICIES = ("sgd", "adabatch", "paper", "divebatch")

# ---------------------------------------------------------------------------------------------
# one optimizer step
# ---------------------------------------------------------------------------------------------
def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``ℓ_i`` (float32 ``[B]``): logistic loss for one logit per sample,
    softmax cross-entropy otherwise."""
    if output.dim() == 2 and output.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(output[:, 0].float(), target.float(), reduction="none")
    return F.cross_entropy(output.float(), target, reduction="none")


def _correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if output.dim() == 2 and output.shape[1] == 1:
        return ((output[:, 0] > 0).long() == target).sum()
    return (output.argmax(dim=1) == target).sum()


@dataclass
class StepResult:
    """What :func:`accumulate_step` returns (tensors, no host synchronisation).

    Attributes:
        loss_sum: ``Σ_i ℓ_i`` over the logical batch (float32 scalar tensor).
        batch_size: B, samples in the logical batch.
        per_sample_sq: unscaled ``Σ_i ||g_i||²`` (None when not measured).
        batch_grad_sq: unscaled ``||Σ_i g_i||²`` (None when not measured).
        scale: the factor between ``.grad`` and ``Σ_i g_i`` (``GradScaler scale / B``).
    """

    loss_sum: torch.Tensor
    batch_size: int
    per_sample_sq: torch.Tensor | None = None
    batch_grad_sq: torch.Tensor | None = None
    scale: float = 1.0


def accumulate_step(model: nn.Module, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_sample_loss,
                    tracker=None, measure: bool = False, scaler=None,
                    autocast: Callable[[], object] | None = None, global_batch_size: int | None = None) -> StepResult:
    """Forward and backward one logical batch given as micro-batches; ``.grad`` ends up as the
    gradient of the *mean* loss over the logical batch (times the GradScaler's scale, if any).

    Call ``optimizer.zero_grad()`` before and ``optimizer.step()`` (or ``scaler.step``) after.

    Under ``DistributedDataParallel`` (``model`` is the DDP wrapper), or FSDP2 (``model`` was
    passed to ``fully_shard``, and its submodules as you choose), the logical batch is the
    *global* one, spread over the ranks: pass its size as ``global_batch_size``. Each rank's loss
    is then ``(W/B)·Σ ℓ_i`` so that the average over ``W`` ranks is the global mean; micro-
    batches before the last run without gradient sync (``no_sync()``; FSDP2:
    ``set_requires_gradient_sync(False)``), so there is one gradient reduction per step; on
    measured steps ``Σ||g_i||²`` is summed over ranks with one small all-reduce and ``||Σ g_i||²``
    is read from the reduced ``.grad`` (see :mod:`divebatch.distributed`).

    Args:
        model: the model, its DDP wrapper, or the model after ``fully_shard``.
        micro_batches: ``[(x, y), …]`` — together this rank's part of one logical batch.
        loss_fn: ``(output, target) → [b]`` per-sample losses (reduction none).
        tracker: a ``GradNormTracker`` on the (unwrapped) model, enabled on measured steps; its
            ``loss_reduction`` is set before each backward so its stats are unscaled.
        measure: read the tracker after each backward and return ``Σ||g_i||²`` and ``||Σ g_i||²``
            of the whole (global) logical batch.
        scaler: a ``torch.amp.GradScaler`` or None.
        autocast: a zero-argument callable returning a context manager (e.g.
            ``lambda: torch.autocast("cpu", torch.bfloat16)``) or None.
        global_batch_size: samples in the logical batch over all ranks (required under DDP with
            more than one rank; default: the samples in ``micro_batches``).
    """
    B_local = sum(int(y.shape[0]) for _, y in micro_batches)
    if B_local == 0:
        raise ValueError("accumulate_step got an empty logical batch")
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    sharded = _fsdp.is_fully_sharded(model)
    world = rank_and_world()[1] if ddp or sharded else 1
    if global_batch_size is None:
        if world > 1:
            raise ValueError(f"under {'fully_shard' if sharded else 'DistributedDataParallel'} pass global_batch_size= "
                             "(samples in the logical batch over all ranks); the local batch alone cannot give the "
                             "mean over the global batch")
        global_batch_size = B_local
    B = int(global_batch_size)
    if B < B_local:
        raise ValueError(f"global_batch_size ({B}) is smaller than this rank's {B_local} samples")
    gscale = float(scaler.get_scale()) if (scaler is not None and scaler.is_enabled() and measure) else 1.0
    c = world / B
    if measure:
        if tracker is None:
            raise ValueError("measure=True needs a tracker")
        tracker.loss_reduction = c * gscale
        # with several backwards or ranks ||Σ g_i||² comes from the final .grad: skip the hooks' pass
        tracker.track_batch_grad = len(micro_batches) == 1 and world == 1
    ctx = autocast if autocast is not None else nullcontext
    loss_sum = torch.zeros((), dtype=torch.float32, device=micro_batches[0][1].device)
    s1 = None
    s2 = None
    last = len(micro_batches) - 1
    for j, (x, y) in enumerate(micro_batches):
        deferred_sync = ((model.no_sync() if ddp else _fsdp.no_gradient_sync(model)) if (ddp or sharded) and j < last
                         else nullcontext())
        with deferred_sync:
            with ctx():
                out = model(x)
                losses = loss_fn(out, y)
            loss = losses.sum() * c
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum = loss_sum + losses.detach().sum()
        if measure:
            st = tracker.collect()
            ps = st.per_sample.sum()
            s1 = ps if s1 is None else s1 + ps
            s2 = st.batch_grad_sq
    res = StepResult(loss_sum, B, scale=gscale / B)  # .grad = gscale · (1/B) Σ_i g_i, on every rank
    if measure:
        if len(micro_batches) > 1 or world > 1:  # ||Σ g_i||² of the whole batch, from the final .grad
            s1, s2, _ = global_step_sums(s1, B_local, tracker.parameters(), c * gscale)
            s1 = s1.float()
            s2 = s2.float()
        res.per_sample_sq, res.batch_grad_sq = s1, s2
    return res


def group_micro_batches(loader: Iterable, sampler: AdaptiveBatchSampler) -> Iterator[list]:
    """Group what a ``DataLoader(batch_sampler=sampler)`` yields into optimizer steps.

    Reads ``sampler.plan()`` before the epoch starts and yields, per logical step, the list of
    micro-batches the loader produced for it (feed it to :func:`accumulate_step`)::

        for micro in group_micro_batches(loader, sampler):
            opt.zero_grad(); accumulate_step(model, micro); opt.step()
    """
    plan = sampler.plan()
    it = iter(loader)
    for sizes in plan:
        group = []
        for _ in sizes:
            try:
                group.append(next(it))
            except StopIteration:
                return
        yield group


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8192,
             loss_fn: Callable = per_sample_loss, autocast: Callable[[], object] | None = None) -> tuple[float, float]:
    """(mean loss, accuracy in [0, 1]) of ``model`` on ``(x, y)``, in eval mode, no grad."""
    was_training = model.training
    model.eval()
    ctx = autocast if autocast is not None else nullcontext
    tot_loss = torch.zeros((), dtype=torch.float64, device=y.device)
    tot_correct = torch.zeros((), dtype=torch.int64, device=y.device)
    for s in range(0, int(y.shape[0]), batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        with ctx():
            out = model(xb)
        tot_loss += loss_fn(out, yb).double().sum()
        tot_correct += _correct(out, yb)
    model.train(was_training)
    n = max(int(y.shape[0]), 1)
    return float(tot_loss) / n, float(tot_correct) / n


# ---------------------------------------------------------------------------------------------
# policies by name
# ---------------------------------------------------------------------------------------------
def make_policy(name: str, optimizer: torch.optim.Optimizer, dataset_size: int, batch_size: int,
                max_batch_size: int, resize_every: int = 3, tracker=None, lr_schedulers: Sequence = (),
                adabatch_lr_factor: float = 1.0, **overrides) -> BatchSizePolicy:
    """Build a policy by name (see :data:`POLICIES`).

    ``overrides`` replace the named policy's DiveBatch settings (``delta``, ``estimator``,
    ``lr_scaling``, ``max_growth``, ``measure_every``, ``measure_epochs``, ``ema_beta``,
    ``resize_every``); None values are ignored.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name == "sgd":
        return Fixed(optimizer, batch_size)
    if name == "adabatch":
        return AdaBatch(optimizer, batch_size, max_batch_size, resize_every=overrides.get("resize_every", resize_every),
                        lr_factor=adabatch_lr_factor, lr_schedulers=lr_schedulers)
    if name in ("paper", "divebatch"):
        cfg = dict(PAPER_POLICY, resize_every=resize_every) if name == "paper" else dict(DEFAULT_POLICY)
        cfg.update(overrides)
        return DiveBatch(optimizer, dataset_size, batch_size, max_batch_size, tracker=tracker,
                         lr_schedulers=lr_schedulers, **cfg)
    raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings of one training run (units in the field comments).

    ``batch_size`` is the initial logical batch m0 (samples per optimizer step) and
    ``max_batch_size`` m_max; ``lr`` is the peak learning rate of the sample-counted cosine;
    ``resize_every`` is in epochs; ``max_micro_batch`` bounds the samples per forward/backward.
    DiveBatch settings left None take the named policy's values (:data:`DEFAULT_POLICY`,
    :data:`PAPER_POLICY`).
    """

    policy: str = "divebatch"
    epochs: int = 30
    batch_size: int = 128
    max_batch_size: int = 2048
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    resize_every: int = 3
    delta: float | None = None
    estimator: str | None = None
    lr_scaling: str | None = None
    max_growth: float | None = None
    measure_every: int | None = None
    measure_epochs: int | None = None
    ema_beta: float | None = None
    adabatch_lr_factor: float = 1.0
    max_micro_batch: int | None = None
    seed: int = 0
    model: str | None = None
    device: str = "cpu"
    amp: str | None = None          # None | "bf16" | "fp16"
    eval_batch_size: int = 8192
    name: str | None = None
    checkpoint: bool = True         # write run_dir/checkpoint.pt at every epoch end
    checkpoint_every: int | None = None  # and every N optimizer steps (None: epoch ends only)
    # Several processes: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2: each child of the model
    # with parameters a fully_shard unit, then the model; its checkpoints hold whole tensors).
    sharding: str = "ddp"

    def validate(self) -> None:
        """Raise ValueError with one clear line for a bad setting."""
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        for k in ("epochs", "batch_size", "max_batch_size", "resize_every", "eval_batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k.replace('_', '-')} must be a positive integer, got {v}")
        if self.max_batch_size < self.batch_size:
            raise ValueError(f"max-batch-size ({self.max_batch_size}) must be >= batch-size ({self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.delta is not None and not (self.delta > 0 and math.isfinite(self.delta)):
            raise ValueError(f"delta must be > 0, got {self.delta}")
        if self.max_growth is not None and not self.max_growth > 1:
            raise ValueError(f"max-growth must be > 1, got {self.max_growth}")
        if self.max_micro_batch is not None and self.max_micro_batch < 1:
            raise ValueError(f"max-micro-batch must be a positive integer, got {self.max_micro_batch}")
        if self.measure_every is not None and self.measure_every < 1:
            raise ValueError(f"measure-every must be a positive integer, got {self.measure_every}")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 1):
            raise ValueError(f"checkpoint-every must be a positive integer (optimizer steps), got {self.checkpoint_every}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be bf16 or fp16, got {self.amp}")
        if self.sharding not in ("ddp", "fsdp"):
            raise ValueError(f"sharding must be ddp or fsdp, got {self.sharding!r}")

    @property
    def label(self) -> str:
        """A short run name, e.g. ``sgd-128``, ``divebatch``."""
        if self.name:
            return self.name
        if self.policy == "sgd":
            return f"sgd-{self.batch_size}"
        return self.policy


#: Settings that may differ between a run and its resumption: they do not change the trajectory.
_RESUMABLE_CHANGES = ("device", "eval_batch_size", "name", "checkpoint", "checkpoint_every")
#: Version of the checkpoint layout written by :meth:`Trainer.state_dict`.
CHECKPOINT_FORMAT = 1


def _trajectory_settings(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_CHANGES}


def _rank_device(device: str, world_size: int) -> torch.device:
    """The device of this process: ``cuda`` means ``cuda:LOCAL_RANK`` when several processes run."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and world_size > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def _policy_overrides(cfg: TrainConfig) -> dict:
    return dict(delta=cfg.delta, estimator=cfg.estimator, lr_scaling=cfg.lr_scaling, max_growth=cfg.max_growth,
                measure_every=cfg.measure_every, measure_epochs=cfg.measure_epochs, ema_beta=cfg.ema_beta)


class Trainer:
    """Train a model with an adaptive batch size, epoch by epoch, logging metrics.

    ``Trainer(cfg, data).fit()`` runs ``cfg.epochs`` epochs of SGD (momentum, weight decay) with a
    sample-counted cosine lr, the batch size following ``cfg.policy``, evaluating test accuracy
    after every epoch. ``run_epoch()`` runs one epoch (``divebatch compare`` interleaves several
    trainers epoch by epoch so that machine noise hits them alike).

    Wall time (``train_time`` in the records, seconds) counts training only — forward, backward,
    measuring, optimizer and policy — not evaluation or checkpointing.

    **Several processes.** When a ``torch.distributed`` process group is initialised (torchrun,
    ``divebatch train --nproc N``, :func:`divebatch.distributed.launch`), the Trainer wraps the
    model in ``DistributedDataParallel`` (or, with ``cfg.sharding="fsdp"``, shards it with FSDP2:
    each child with parameters a ``fully_shard`` unit, then the model), each rank trains on its share of every global batch
    (``cfg.batch_size`` and the policy's sizes are global; see :mod:`divebatch.sampler` for the
    split), the statistics are global (:mod:`divebatch.distributed`), and only rank 0 writes the
    run folder and logs. Records are identical on every rank (losses are all-reduced per epoch).

    **Checkpoints.** With a ``run_dir``, ``checkpoint.pt`` there is replaced atomically at every
    epoch end and every ``cfg.checkpoint_every`` optimizer steps: model, optimizer, lr schedule,
    policy and estimator, sampler position, GradScaler, every rank's RNG state, counters and
    records. :meth:`resume` continues such a run exactly where the checkpoint was taken — same
    batch sizes, learning rates and (on the same machine and world size) the same numbers.

    Args:
        cfg: the settings (:class:`TrainConfig`).
        data: the dataset (:class:`~divebatch.data.DataBundle`), moved to ``cfg.device``.
        model: a model to train (default: :func:`~divebatch.models.build_model` for the data).
        run_dir: where to write ``metrics.jsonl``, ``summary.json``, plots and ``checkpoint.pt``
            (None: nowhere).
        progress: show a tqdm progress bar per epoch (rank 0 only).
        log: called with one line per epoch (default ``tqdm.write``; None: silent; rank 0 only).
    """

    def __init__(self, cfg: TrainConfig, data: DataBundle, model: nn.Module | None = None,
                 run_dir: str | os.PathLike | None = None, progress: bool = False, log: Callable | None = None):
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world_size = rank_and_world()
        self.device = _rank_device(cfg.device, self.world_size)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.data = data
        self.x_train = data.x_train.to(self.device)
        self.y_train = data.y_train.to(self.device)
        self.x_test = data.x_test.to(self.device)
        self.y_test = data.y_test.to(self.device)
        self.n = data.n_train
        self.model = (model if model is not None else
                      build_model(cfg.model, data.input_shape, data.num_classes, data.task, seed=cfg.seed)).to(self.device)
        self.train_model: nn.Module = self.model
        self.sharded = self.world_size > 1 and cfg.sharding == "fsdp"
        if self.world_size > 1:
            check_same_model(self.model, extra=_trajectory_settings(cfg))
            if self.sharded:  # before the optimizer and the tracker, which must see the shards
                self.model = self.train_model = _fsdp.shard_children(self.model, self.device)
            else:
                self.train_model = nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.total_samples = cfg.epochs * self.n
        self.lr_schedule = CosineLR(self.optimizer, total=self.total_samples)
        self.tracker = None
        if cfg.policy in ("paper", "divebatch"):
            from .tracker import GradNormTracker
            self.tracker = GradNormTracker(self.model, loss_reduction="sum", enabled=False)
        self.policy = make_policy(cfg.policy, self.optimizer, self.n, cfg.batch_size, cfg.max_batch_size,
                                  resize_every=cfg.resize_every, tracker=self.tracker,
                                  lr_schedulers=[self.lr_schedule], adabatch_lr_factor=cfg.adabatch_lr_factor,
                                  **_policy_overrides(cfg))
        self.sampler = AdaptiveBatchSampler(self.n, self.policy, shuffle=True, seed=cfg.seed,
                                            max_micro_batch=cfg.max_micro_batch, num_replicas=self.world_size,
                                            rank=self.rank)
        self.scaler = None
        self.autocast = None
        if cfg.amp is not None:
            dt = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
            self.autocast = lambda: torch.autocast(self.device.type, dtype=dt)
            if cfg.amp == "fp16":
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.log = log if self.is_main else None
        self.epoch = 0
        self.samples_seen = 0
        self.steps = 0
        self.train_time = 0.0
        self.records: list[dict] = []
        self._partial: dict | None = None   # accumulators of an epoch in progress (for checkpoints)
        self._metrics_file = None
        if self.run_dir is not None and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "w")

    @property
    def checkpoint_path(self) -> Path | None:
        """``run_dir/checkpoint.pt`` (None without a run folder or with ``cfg.checkpoint`` off)."""
        if self.run_dir is None or not self.cfg.checkpoint:
            return None
        return self.run_dir / "checkpoint.pt"

    # -- one epoch ------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step_batches(self, idx_list: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        micro = []
        for idx in idx_list:
            it = torch.from_numpy(idx).to(self.device, non_blocking=True)
            micro.append((self.x_train.index_select(0, it), self.y_train.index_select(0, it)))
        return micro

    def run_epoch(self) -> dict:
        """Train one epoch (or the rest of one, after :meth:`resume`), evaluate, log, checkpoint;
        returns the epoch's record (also appended to ``records``)."""
        from tqdm.auto import tqdm

        cfg, pol = self.cfg, self.policy
        bs = self.sampler.batch_size
        step_sizes = self.sampler.global_step_sizes()
        part = self._partial or {"lr_start": float(self.optimizer.param_groups[0]["lr"]), "loss_sum": 0.0,
                                 "measured": 0, "elapsed": 0.0, "step": 0}
        self._partial = part
        n_steps = len(step_sizes)
        bar = tqdm(total=n_steps, initial=part["step"], desc=f"{cfg.label} epoch {self.epoch + 1}/{cfg.epochs}",
                   leave=False, disable=not self.progress, unit="step", mininterval=0.5)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        every = cfg.checkpoint_every if self.checkpoint_path is not None else None
        self._sync()
        t0 = time.perf_counter()
        for idx_list in self.sampler.iter_steps():
            micro = self._step_batches(idx_list)
            self.lr_schedule.step(self.samples_seen)
            self.optimizer.zero_grad(set_to_none=True)
            measure = pol.measure_now
            res = accumulate_step(self.train_model, micro, per_sample_loss, tracker=self.tracker, measure=measure,
                                  scaler=self.scaler, autocast=self.autocast,
                                  global_batch_size=step_sizes[part["step"]])
            if measure:
                pol.observe_sums(res.per_sample_sq, res.batch_grad_sq, res.batch_size, scale=res.scale)
                part["measured"] += 1
            else:
                pol.observe_sums(None, None, res.batch_size)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            loss_sum += res.loss_sum
            self.samples_seen += res.batch_size
            self.steps += 1
            part["step"] += 1
            bar.update(1)
            if every is not None and self.steps % every == 0 and part["step"] < n_steps:
                self._sync()
                t1 = time.perf_counter()
                part["elapsed"] += t1 - t0
                part["loss_sum"] += float(all_reduce_sum(loss_sum))  # global: every rank resumes from rank 0's file
                loss_sum.zero_()
                self.save_checkpoint()
                t0 = time.perf_counter()
        new_bs = pol.step()
        self._sync()
        epoch_time = part["elapsed"] + time.perf_counter() - t0
        bar.close()
        check_same_decision(new_bs, [g["lr"] for g in self.optimizer.param_groups])
        epoch_loss = float(all_reduce_sum(loss_sum)) + part["loss_sum"]
        self._partial = None
        self.train_time += epoch_time
        self.epoch += 1

        t1 = time.perf_counter()
        test_loss, test_acc = evaluate(self.model, self.x_test, self.y_test, cfg.eval_batch_size,
                                       autocast=self.autocast)
        eval_time = time.perf_counter() - t1
        samples = sum(step_sizes)
        dec = pol.last_decision if (pol.last_decision and pol.last_decision["epoch"] == self.epoch) else None
        rec = {
            "epoch": self.epoch,
            "batch_size": bs,
            "next_batch_size": new_bs,
            "lr": part["lr_start"],
            "lr_end": float(self.optimizer.param_groups[0]["lr"]),
            "lr_factor": pol.lr_factor,
            "steps": n_steps,
            "total_steps": self.steps,
            "samples_seen": self.samples_seen,
            "train_loss": float(epoch_loss) / max(samples, 1),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "epoch_time": epoch_time,
            "train_time": self.train_time,
            "eval_time": eval_time,
            "samples_per_s": samples / epoch_time if epoch_time > 0 else float("nan"),
            "measured_steps": part["measured"],
            "n_delta": None,
            "b_noise": None,
            "diversity": None,
            "world_size": self.world_size,
        }
        if dec is not None:
            rec["n_delta"] = dec.get("n_delta")
            rec["b_noise"] = dec.get("b_noise")
            rec["diversity"] = dec.get("diversity")
        elif isinstance(pol, DiveBatch) and pol.estimator_name == "noise-scale" and pol.estimator.steps > 0:
            rec["b_noise"] = pol.estimator.b_noise()
            rec["n_delta"] = rec["b_noise"] + 1.0
        self.records.append(rec)
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(_jsonable(rec)) + "\n")
            self._metrics_file.flush()
        if self.log is not None:
            self.log(format_record(rec, cfg))
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        return rec

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs (see the class docstring). Under several processes this
        gathers every rank's RNG state (a collective: call it on every rank at the same step)."""
        rng = rng_state()
        rngs = [rng]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.cfg),
            "world_size": self.world_size,
            **self._model_and_optimizer_state(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
            "trainer": {"epoch": self.epoch, "samples_seen": self.samples_seen, "steps": self.steps,
                        "train_time": self.train_time, "partial": dict(self._partial) if self._partial else None,
                        "records": _jsonable(self.records)},
        }

    def _model_and_optimizer_state(self) -> dict:
        """Their state dicts; under FSDP2 with whole tensors, gathered from the shards (a collective)."""
        if not self.sharded:
            return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"model": model, "optimizer": optimizer}

    def _load_model_and_optimizer_state(self, model: dict, optimizer: dict) -> None:
        if not self.sharded:
            self.model.load_state_dict(model)
            self.optimizer.load_state_dict(optimizer)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        # (every rank read the whole checkpoint: each keeps its shards of it)
        set_state_dict(self.model, self.optimizer, model_state_dict=model, optim_state_dict=optimizer,
                       options=StateDictOptions(full_state_dict=True))

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write :meth:`state_dict` atomically to ``path`` (default :attr:`checkpoint_path`); only
        rank 0 writes, every rank must call it. Returns the path written (None on other ranks)."""
        state = self.state_dict()
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: give the Trainer a run_dir (and cfg.checkpoint=True) or pass path=")
        if not self.is_main:
            return None
        return save_checkpoint(state, path)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`run_epoch` continues the epoch in progress."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}; it was "
                                  "written by another divebatch version")
        mine, theirs = _trajectory_settings(self.cfg), _trajectory_settings(TrainConfig(**state["config"]))
        diff = {k: (theirs[k], v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"the checkpoint is of a run with other settings ({detail}); resume with the "
                                  "settings it was started with (see config.json in its run folder)")
        self._load_model_and_optimizer_state(state["model"], state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.policy.load_state_dict(state["policy"])
        self.sampler.load_state_dict(state["sampler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        t = state["trainer"]
        self.epoch, self.samples_seen, self.steps = int(t["epoch"]), int(t["samples_seen"]), int(t["steps"])
        self.train_time = float(t["train_time"])
        self._partial = dict(t["partial"]) if t["partial"] else None
        self.records = [dict(r) for r in t["records"]]
        rngs = state["rng"]
        if len(rngs) != self.world_size:
            warnings.warn(f"the checkpoint was taken with {len(rngs)} processes and this run has {self.world_size}: "
                          "batch sizes and data order continue exactly, but random draws (dropout) and float "
                          "rounding will not repeat the original run", RuntimeWarning, stacklevel=2)
        set_rng_state(rngs[min(self.rank, len(rngs) - 1)])
        if self._metrics_file is not None:  # the metrics file restarts from the checkpoint's records
            self._metrics_file.seek(0)
            self._metrics_file.truncate()
            for rec in self.records:
                self._metrics_file.write(json.dumps(rec) + "\n")
            self._metrics_file.flush()

    def resume(self, path: str | os.PathLike | None = None) -> "Trainer":
        """Load a checkpoint (default :attr:`checkpoint_path`) written by a run with the same
        settings; the next :meth:`fit` or :meth:`run_epoch` continues it. Returns ``self``."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("resume() needs a path, or a Trainer with a run_dir holding checkpoint.pt")
        # CPU first: RNG states must stay CPU tensors; model, optimizer and estimator states are
        # copied to their parameters' devices by their own load_state_dict
        self.load_state_dict(load_checkpoint(path, map_location="cpu"))
        return self

    # -- whole run ------------------------------------------------------------------------
    def fit(self, plots: bool = True) -> dict:
        """Run the remaining epochs; write summary (and plots when ``run_dir`` is set); return the summary."""
        while self.epoch < self.cfg.epochs:
            self.run_epoch()
        return self.finish(plots=plots)

    def summary(self) -> dict:
        """Final accuracy, the paper's metric for this run, totals and the batch-size history."""
        recs = self.records
        accs = [r["test_acc"] for r in recs]
        final = accs[-1] if accs else float("nan")
        within = time_to_accuracy(recs, final - 0.01) if recs else None
        return {
            "label": self.cfg.label,
            "config": asdict(self.cfg),
            "dataset": self.data.name,
            "n_train": self.n,
            "model": self.cfg.model or ("logistic" if self.data.task == "binary" else "mlp"),
            "final_test_acc": final,
            "best_test_acc": max(accs) if accs else float("nan"),
            "train_time": self.train_time,
            "total_steps": self.steps,
            "epochs": self.epoch,
            "to_within_1pt_of_final": within,
            "batch_sizes": [r["batch_size"] for r in recs],
            "decisions": list(getattr(self.policy, "history", [])),
        }

    def finish(self, plots: bool = True) -> dict:
        """Write ``summary.json`` and plots to ``run_dir``; close the tracker; return the summary."""
        s = self.summary()
        if self.run_dir is not None and self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(_jsonable(s), indent=2) + "\n")
            if self._metrics_file is not None:
                self._metrics_file.close()
                self._metrics_file = None
            if plots:
                from .report import plot_run
                plot_run(self.records, self.run_dir, title=f"{self.cfg.label} on {self.data.name}")
        if self.tracker is not None:
            self.tracker.close()
        return s


def format_record(rec: dict, cfg: TrainConfig) -> str:
    """One line per epoch: epoch, batch size, lr, Δ̂/B_noise, loss, test accuracy, seconds."""
    stat = ""
    if rec.get("b_noise") is not None:
        stat = f" | B_noise {rec['b_noise']:9.4g}"
    elif rec.get("n_delta") is not None:
        stat = f" | n·Δ̂ {rec['n_delta']:9.4g}"
    bs = f"{rec['batch_size']}" + (f"→{rec['next_batch_size']}" if rec["next_batch_size"] != rec["batch_size"] else "")
    return (f"{cfg.label:>10} epoch {rec['epoch']:3d}/{cfg.epochs} | bs {bs:>9} | lr {rec['lr']:.4f}{stat} | "
            f"loss {rec['train_loss']:.4f} | test acc {100 * rec['test_acc']:6.2f}% | {rec['epoch_time']:6.2f} s")


def time_to_accuracy(records: Sequence[dict], target: float) -> dict | None:
    """First epoch whose test accuracy is ≥ ``target`` (a fraction): its epoch, cumulative train
    time (s), optimizer steps and samples; None if never reached."""
    for r in records:
        if r["test_acc"] >= target - 1e-12:
            return {"epoch": r["epoch"], "time": r["train_time"], "steps": r["total_steps"],
                    "samples": r["samples_seen"], "target": target}
    return None


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    if isinstance(x, torch.Tensor):
        return _jsonable(x.item() if x.numel() == 1 else x.tolist())
    return x


def train(data: DataBundle, policy: str = "divebatch", run_dir: str | os.PathLike | None = None,
          progress: bool = False, log: Callable | None = None, model: nn.Module | None = None, **settings) -> dict:
    """Train with the named policy and return the summary (see :class:`Trainer`).

    ``settings`` are :class:`TrainConfig` fields (epochs, batch_size, max_batch_size, lr, …).
    Example: ``train(load_dataset("digits"), "divebatch", epochs=5, batch_size=32, max_batch_size=512)``.
    """
    cfg = TrainConfig(policy=policy, **settings)
    trainer = Trainer(cfg, data, model=model, run_dir=run_dir, progress=progress, log=log)
    summary = trainer.fit()
    summary["records"] = trainer.records
    return summary


# ---------------------------------------------------------------------------------------------
# side-by-side comparison (`divebatch compare`)
# ---------------------------------------------------------------------------------------------
def compare_configs(epochs: int = 30, batch_size: int = 128, max_batch_size: int = 2048, resize_every: int = 3,
                    delta: float = 0.1, policies: Sequence[str] | None = None, **common) -> list[TrainConfig]:
    """The runs of ``divebatch compare``: SGD at ``batch_size``, SGD at ``max_batch_size``, AdaBatch,
    the paper's DiveBatch (δ = ``delta``) and divebatch's default policy, with the same settings.

    ``policies`` selects a subset of the labels ``sgd-small``, ``sgd-max``, ``adabatch``, ``paper``,
    ``divebatch`` (the small-batch SGD run is always included: it is the reference).
    """
    base = dict(epochs=epochs, batch_size=batch_size, max_batch_size=max_batch_size, resize_every=resize_every,
                **common)
    cfgs = {
        "sgd-small": TrainConfig(policy="sgd", **base),
        "sgd-max": TrainConfig(policy="sgd", **dict(base, batch_size=max_batch_size)),
        "adabatch": TrainConfig(policy="adabatch", **base),
        "paper": TrainConfig(policy="paper", delta=delta, **base),
        "divebatch": TrainConfig(policy="divebatch", **base),
    }
    wanted = list(cfgs) if policies is None else ["sgd-small"] + [p for p in policies if p != "sgd-small"]
    for p in wanted:
        if p not in cfgs:
            raise ValueError(f"unknown compare policy {p!r}: choose from {', '.join(cfgs)}")
    return [cfgs[p] for p in wanted]


def _throughput_and_overhead(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    """samples/s per batch size over unmeasured epochs, and measured/unmeasured epoch-time ratios
    at the same batch size, using unmeasured epochs within ±3 epochs (side by side in time)."""
    tp: dict[int, list[float]] = {}
    unmeasured: list[tuple[int, int, float]] = []
    for recs in runs.values():
        for r in recs:
            if r["measured_steps"] == 0:
                tp.setdefault(r["batch_size"], []).append(r["samples_per_s"])
                unmeasured.append((r["epoch"], r["batch_size"], r["epoch_time"]))
    over: dict[str, list[float]] = {}
    for label, recs in runs.items():
        for r in recs:
            if r["measured_steps"] > 0:
                ref = [t for e, b, t in unmeasured if b == r["batch_size"] and abs(e - r["epoch"]) <= 3]
                if ref:
                    import statistics
                    over.setdefault(label, []).append(r["epoch_time"] / statistics.median(ref))
    return tp, over


def probe_throughput(data: DataBundle, batch_sizes: Sequence[int] = (128, 256, 512, 1024, 2048), reps: int = 7,
                     model: str | None = None, device: str = "cpu", seed: int = 0,
                     methods: Sequence[str] = ("plain", "divebatch", "paper"), block_samples: int = 8192) -> dict:
    """Samples/s against batch size, and the cost of measuring, side by side on this machine.

    For each batch size, blocks of optimizer steps (≥ ``block_samples``, a multiple of 16 steps) are
    timed round-robin for: ``plain`` (no measuring), ``divebatch`` (the default policy's measuring:
    one step in ``measure_every``) and ``paper`` (every step measured, the epoch estimator), ``reps``
    times each; medians are reported. The batch size is pinned (δ tiny) so only the measuring
    differs. Returns ``{"samples_per_s": {bs: {method: …}}, "ratio": {bs: {method: median time /
    plain median time}}}``.
    """
    import statistics

    out: dict = {"samples_per_s": {}, "ratio": {}, "reps": reps}
    me = DEFAULT_POLICY["measure_every"]
    for bs in batch_sizes:
        trs = {}
        for m in methods:
            if m == "plain":
                cfg = TrainConfig(policy="sgd", epochs=1000, batch_size=bs, model=model, device=device, seed=seed)
            else:
                cfg = TrainConfig(policy=m, epochs=1000, batch_size=bs, max_batch_size=bs * 2, resize_every=1,
                                  delta=1e-12, model=model, device=device, seed=seed)
            trs[m] = Trainer(cfg, data)
        iters = {m: tr.sampler.iter_steps() for m, tr in trs.items()}
        steps = max(me, me * -(-block_samples // (me * bs)))

        def block(m: str) -> float:
            tr, pol = trs[m], trs[m].policy
            tr._sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                try:
                    idx = next(iters[m])
                except StopIteration:
                    iters[m] = tr.sampler.iter_steps()
                    idx = next(iters[m])
                it = torch.from_numpy(idx[0]).to(tr.device)
                micro = [(tr.x_train.index_select(0, it), tr.y_train.index_select(0, it))]
                tr.optimizer.zero_grad(set_to_none=True)
                meas = pol.measure_now
                res = accumulate_step(tr.model, micro, per_sample_loss, tracker=tr.tracker, measure=meas)
                if meas:
                    pol.observe_sums(res.per_sample_sq, res.batch_grad_sq, res.batch_size, scale=res.scale)
                else:
                    pol.observe_sums(None, None, res.batch_size)
                tr.optimizer.step()
            tr._sync()
            return time.perf_counter() - t0

        for m in methods:  # warm-up
            block(m)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(reps):
            for m in methods:
                times[m].append(block(m))
        med = {m: statistics.median(v) for m, v in times.items()}
        out["samples_per_s"][bs] = {m: steps * bs / t for m, t in med.items()}
        out["ratio"][bs] = {m: t / med[methods[0]] for m, t in med.items()}
        for tr in trs.values():
            if tr.tracker is not None:
                tr.tracker.close()
    return out


def compare(data: DataBundle, seeds: Sequence[int] = (0,), out_dir: str | os.PathLike | None = None,
            progress: bool = False, log: Callable | None = None, policies: Sequence[str] | None = None,
            probe_reps: int = 7, **settings) -> dict:
    """Run the policies of :func:`compare_configs` side by side on ``data`` for each seed.

    The runs of one seed advance in lockstep, one epoch each in turn (the order rotates every
    epoch), so drift in machine load hits them alike. Returns (and writes to ``out_dir`` as
    ``results.json``, ``table.md``, ``compare.png`` / ``compare_seed<k>.png`` and one folder per
    run) the per-seed metrics of :func:`divebatch.report.compare_metrics`, an aggregate table, the
    samples/s per batch size and the measured-epoch overhead (from the training epochs, and with
    ``probe_reps > 0`` from :func:`probe_throughput`, which times measured and plain steps side by side).
    """
    from .report import aggregate_table, compare_metrics, compare_table, plot_compare, throughput_table

    out = Path(out_dir) if out_dir is not None else None
    results: dict = {"dataset": data.name, "n_train": data.n_train, "seeds": list(seeds), "settings": dict(settings),
                     "per_seed": {}, "records": {}}
    all_runs: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    for seed in seeds:
        cfgs = compare_configs(seed=seed, policies=policies, **settings)
        for c in cfgs:  # a comparison is rerun whole, not resumed: no checkpoints
            c.checkpoint = False
        labels = [c.label for c in cfgs]
        trainers = [Trainer(c, data, run_dir=(out / f"seed{seed}" / c.label) if out else None, progress=progress,
                            log=log) for c in cfgs]
        epochs = cfgs[0].epochs
        for e in range(epochs):
            k = e % len(trainers)
            for tr in trainers[k:] + trainers[:k]:
                tr.run_epoch()
        for tr in trainers:
            tr.finish(plots=out is not None)
        runs = {tr.cfg.label: tr.records for tr in trainers}
        sgd_label, ada_label = labels[0], ("adabatch" if "adabatch" in labels else None)
        m = compare_metrics(runs, sgd_label, ada_label)
        results["per_seed"][seed] = m
        results["records"][seed] = runs
        for label, recs in runs.items():
            all_runs[f"{label}@{seed}"] = recs
        if out is not None:
            plot_compare(runs, out / ("compare.png" if seed == seeds[0] else f"compare_seed{seed}.png"),
                         title=f"{data.name}, seed {seed}", common_target=m["common_target"])
        if log is not None:
            log(f"\nseed {seed}\n" + compare_table(m))
    tp, over = _throughput_and_overhead(all_runs)
    over_by_policy: dict[str, list[float]] = {}
    for k, v in over.items():
        over_by_policy.setdefault(k.split("@")[0], []).extend(v)
    results["throughput"] = {str(b): v for b, v in sorted(tp.items())}
    results["measured_epoch_overhead"] = over_by_policy
    if probe_reps > 0:
        bss = sorted({settings.get("batch_size", 128) * 2 ** k for k in range(8)
                      if settings.get("batch_size", 128) * 2 ** k <= settings.get("max_batch_size", 2048)})
        if log is not None:
            log(f"probing samples/s and the cost of measuring at batch sizes {bss} ...")
        results["probe"] = probe_throughput(data, bss, reps=probe_reps, model=settings.get("model"),
                                            device=settings.get("device", "cpu"))
    results["wall_seconds"] = time.perf_counter() - t_start
    table = aggregate_table(results["per_seed"])
    tp_table = throughput_table(tp, over_by_policy, results.get("probe"))
    results["table"] = table
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1) + "\n")
        per_seed_md = "\n\n".join(f"### seed {s}\n\n" + compare_table(m) for s, m in results["per_seed"].items())
        (out / "table.md").write_text(
            f"# divebatch compare on {data.name} (n = {data.n_train})\n\n"
            f"Settings: {json.dumps(_jsonable(settings))}; total wall {results['wall_seconds']:.0f} s.\n\n"
            f"## Aggregate\n\n{table}\n\n## Per seed\n\n{per_seed_md}\n\n"
            f"## Throughput and measuring cost on this machine\n\n{tp_table}\n")
    if log is not None:
        log("\n" + table + "\n\n" + tp_table)
    return results
