"""Functions run inside the processes that tests/test_distributed.py starts with
``divebatch.distributed.launch`` (module level, so ``spawn`` can import them by name)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from divebatch.data import load_digits
from divebatch.distributed import gather_per_sample, global_step_sums
from divebatch.sampler import shard_slice
from divebatch.tracker import GradNormTracker
from divebatch.train import TrainConfig, Trainer, accumulate_step


def norms_model(seed: int = 0, hidden: int = 12) -> nn.Module:
    """Conv, norm and linear layers: the families whose per-sample norms must add up across ranks."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, 10))


def norms_worker(x: torch.Tensor, y: torch.Tensor, micro: int) -> dict:
    """This rank's share of the global batch (x, y) by the sampler's remainder rule, split into
    ``micro`` micro-batches; returns the global statistics every rank computed."""
    mine = shard_slice(len(y), dist.get_world_size(), dist.get_rank())
    xs, ys = x[mine], y[mine]
    model = norms_model()
    tracker = GradNormTracker(model, loss_reduction="sum")
    ddp = nn.parallel.DistributedDataParallel(model)
    chunks = [(a, b) for a, b in zip(xs.tensor_split(micro), ys.tensor_split(micro)) if len(b)]
    res = accumulate_step(ddp, chunks, tracker=tracker, measure=True, global_batch_size=len(y))
    out = {"s1": float(res.per_sample_sq), "s2": float(res.batch_grad_sq),
           "grads": [p.grad.detach().clone() for p in model.parameters()]}
    if micro == 1:  # the per-sample vector itself, gathered in rank order
        out["per_sample"] = gather_per_sample(tracker.collect().per_sample)
    return out


def train_worker(cfg_kwargs: dict, run_dir: str | None, resume: bool = False, die_at_step: int | None = None,
                 hidden_by_rank: dict | None = None) -> dict:
    """Train on digits with ``Trainer``; return the records and, per epoch, the indices this rank
    trained on. ``die_at_step``: the process exits hard (like a kill) after that many optimizer
    steps. ``hidden_by_rank``: give rank r an MLP of that width (to make the models differ)."""
    rank = dist.get_rank()
    data = load_digits()
    model = None
    if hidden_by_rank is not None:
        torch.manual_seed(0)
        h = hidden_by_rank[rank]
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10))
    tr = Trainer(TrainConfig(**cfg_kwargs), data, model=model, run_dir=run_dir)
    if resume:
        tr.resume()
    seen: dict[int, list[int]] = {}
    take = tr._step_batches

    def recording(idx_list):
        seen.setdefault(tr.epoch, []).extend(int(i) for idx in idx_list for i in idx)
        return take(idx_list)

    tr._step_batches = recording
    if die_at_step is not None:
        step = tr.optimizer.step

        def step_then_maybe_die(*a, **k):
            out = step(*a, **k)
            if tr.steps + 1 >= die_at_step:  # tr.steps counts this step right after optimizer.step()
                os._exit(3)
            return out

        tr.optimizer.step = step_then_maybe_die
    summary = tr.fit(plots=False)
    lrs = [g["lr"] for g in tr.optimizer.param_groups]
    return {"records": tr.records, "seen": seen, "summary_epochs": summary["epochs"], "final_lrs": lrs,
            "params": [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()  # (FSDP2: whole)
                       for p in tr.model.parameters()]}


def observe_worker(x: torch.Tensor, y: torch.Tensor, estimator: str, sharded: bool = False) -> dict:
    """A user's own DDP loop (``sharded``: FSDP2's ``fully_shard`` instead): per-rank mean loss,
    ``loss.backward()``, ``policy.observe()``. Returns what the policy's estimator accumulated
    (or the error it raised); sharded, the epoch estimator's ``||A||²`` instead of its shards of A."""
    import torch.nn.functional as F

    from divebatch.schedule import DiveBatch

    mine = shard_slice(len(y), dist.get_world_size(), dist.get_rank())
    xs, ys = x[mine], y[mine]
    model = norms_model()
    if sharded:
        model = wrapped = _fully_shard_children(model)
    tracker = GradNormTracker(model, loss_reduction="mean")
    if not sharded:
        wrapped = nn.parallel.DistributedDataParallel(model)
    policy = DiveBatch(None, len(y), 4, 64, estimator=estimator, tracker=tracker, measure_every=1, resize_every=1)
    F.cross_entropy(wrapped(xs), ys).backward()
    try:
        policy.observe()
    except ValueError as e:
        return {"error": str(e)}
    state = policy.estimator.state_dict()
    if sharded and "A" in state:
        state["A"] = policy.estimator.grad_sum_sq()  # (every rank together: an all-reduce)
    return {"state": state}


def user_loop_worker(epochs: int) -> dict:
    """The DDP loop of docs/training.md ("In your own DDP loop"), verbatim but for the data and
    the bookkeeping returned to the test."""
    from torch.utils.data import DataLoader

    from divebatch import DEFAULT_POLICY, AdaptiveBatchSampler, DiveBatch
    from divebatch.train import accumulate_step, group_micro_batches

    data = load_digits()
    ds = torch.utils.data.TensorDataset(torch.arange(data.n_train), data.y_train)  # indices stand in for images
    x_all = data.x_train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # --- the documented loop
    rank, world = dist.get_rank(), dist.get_world_size()
    tracker = GradNormTracker(model, loss_reduction="sum")       # accumulate_step sets c itself
    ddp = nn.parallel.DistributedDataParallel(model)
    policy = DiveBatch(opt, len(ds), 32, 512, tracker=tracker, **dict(DEFAULT_POLICY, measure_every=2))
    sampler = AdaptiveBatchSampler(ds, policy, seed=0, num_replicas=world, rank=rank, max_micro_batch=24)
    loader = DataLoader(ds, batch_sampler=sampler)
    seen, sizes_log = {}, []
    for epoch in range(epochs):
        sizes = sampler.global_step_sizes()          # global batch of every step, the same on all ranks
        sizes_log.append(sampler.batch_size)
        for k, micro in enumerate(group_micro_batches(loader, sampler)):
            seen.setdefault(epoch, []).extend(int(i) for idx, _ in micro for i in idx)
            micro = [(x_all[idx], y) for idx, y in micro]
            opt.zero_grad()
            res = accumulate_step(ddp, micro, tracker=tracker, measure=policy.measure_now,
                                  global_batch_size=sizes[k])
            policy.observe_sums(res.per_sample_sq, res.batch_grad_sq, res.batch_size, scale=res.scale)
            opt.step()
        policy.step()
    # ---
    return {"seen": seen, "batch_sizes": sizes_log, "lr": opt.param_groups[0]["lr"],
            "decisions": policy.history}


def aborting_worker(when: str) -> int:
    """Return this rank's number, with rank 1 dying by SIGABRT ``"before"`` returning, or
    ``"after"`` (at process exit, after ``launch`` has written its result: as a crash in the
    process group's teardown)."""
    import multiprocessing.util

    if dist.get_rank() == 1:
        if when == "before":
            os.abort()
        multiprocessing.util.Finalize(None, os.abort, exitpriority=0)
    return dist.get_rank()


def _fully_shard_children(model: nn.Module, bf16: bool = False, replicate: bool = False, units=None) -> nn.Module:
    """FSDP2 over all ranks as a user would apply it: each of ``units`` (default: each child with
    parameters and a forward of its own; ``fully_shard`` refuses bare containers), then the model.
    ``bf16``: forward and backward with bfloat16 copies of the parameters, gradients reduced in
    float32 (``MixedPrecisionPolicy``). ``replicate``: HSDP on a 2-D mesh, every rank a replica
    (``(world, 1)``: the parameters' placements are Replicate, Shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from divebatch._fsdp import shard_children

    mesh = (init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard")) if replicate
            else init_device_mesh("cpu", (dist.get_world_size(),)))
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    return shard_children(model, mesh=mesh, units=units, **kwargs)


def fsdp_norms_worker(x: torch.Tensor, y: torch.Tensor, micro: int, replicate: bool = False) -> dict:
    """``norms_worker`` under FSDP2 instead of DDP: the tracker on the sharded model, the global
    statistics from ``accumulate_step``, and the gradient each rank's shards add up to."""
    mine = shard_slice(len(y), dist.get_world_size(), dist.get_rank())
    model = _fully_shard_children(norms_model(), replicate=replicate)
    tracker = GradNormTracker(model, loss_reduction="sum")
    chunks = [(a, b) for a, b in zip(x[mine].tensor_split(micro), y[mine].tensor_split(micro)) if len(b)]
    res = accumulate_step(model, chunks, tracker=tracker, measure=True, global_batch_size=len(y))
    out = {"s1": float(res.per_sample_sq), "s2": float(res.batch_grad_sq),
           "grads": [p.grad.full_tensor().detach().clone() for p in model.parameters()],
           "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters())}
    if micro == 1:
        stats = tracker.collect()
        out["per_sample"] = gather_per_sample(stats.per_sample)
        out["verified"] = sorted(stats.unaccounted or {})
    return out


def fsdp_zoo_worker(names: list[str], bf16: bool = False) -> dict:
    """Each of ``tests.models_zoo``'s ``names`` under FSDP2 (its children units, then the model):
    per zoo entry, the per-sample norms of all ranks' samples in rank order, and the modules whose
    gradients the verification compared (``stats.unaccounted``); or the error."""
    from .models_zoo import ZOO, sample_loss

    out = {}
    for name in names:
        torch.manual_seed(0)
        model, x, y = ZOO[name]()
        mine = shard_slice(len(y), dist.get_world_size(), dist.get_rank())
        model = _fully_shard_children(model, bf16)
        tracker = GradNormTracker(model, loss_reduction="sum", verify_every=1)
        try:
            sample_loss(model(x[mine]), y[mine]).backward()
            stats = tracker.collect()
            # (every rank's loss is its own samples' sum, c = 1: the shards hold (1/W) Σ_i g_i)
            _, batch_grad_sq, _ = global_step_sums(stats.per_sample, stats.batch_size, tracker.parameters(), 1.0)
            out[name] = {"per_sample": gather_per_sample(stats.per_sample), "verified": sorted(stats.unaccounted or {}),
                         "batch_grad_sq": float(batch_grad_sq)}
        except Exception as err:  # noqa: BLE001 - reported to the test, which names the model
            out[name] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            tracker.close()
    return out


def fsdp_sequence_first_worker(names: list[str]) -> dict:
    """Models of ``tests.test_sequence_first`` that take ``[T, B]`` ids, under FSDP2 and tracked with
    ``batch_first=False``: each rank gets its share of the samples (columns of the ids); per model,
    all ranks' per-sample norms in rank order and ``||sum_i g_i||^2`` from the shards, or the error."""
    from .test_sequence_first import make

    out = {}
    for name in names:
        torch.manual_seed(0)
        model, ids, tokens, loss = make(name, 5, 5, torch.Generator().manual_seed(1))
        mine = shard_slice(len(tokens), dist.get_world_size(), dist.get_rank())
        model = _fully_shard_children(model)
        tracker = GradNormTracker(model, loss_reduction="sum", batch_first=False, verify_every=1)
        try:
            loss(model(ids[:, mine]), tokens[mine]).backward()
            stats = tracker.collect()
            _, batch_grad_sq, _ = global_step_sums(stats.per_sample, stats.batch_size, tracker.parameters(), 1.0)
            out[name] = {"per_sample": gather_per_sample(stats.per_sample), "batch_grad_sq": float(batch_grad_sq)}
        except Exception as err:  # noqa: BLE001 - reported to the test, which names the model
            out[name] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            tracker.close()
    return out


def fsdp_tracker_first_worker() -> str:
    """A tracker created *before* ``fully_shard`` (which replaces the parameters): the error."""
    model = norms_model()
    tracker = GradNormTracker(model, loss_reduction="sum")
    model = _fully_shard_children(model)
    try:
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        tracker.collect()
    except RuntimeError as err:
        return str(err)
    return "no error"


def fsdp1_worker() -> str:
    """A tracker on a model wrapped in the older ``FullyShardedDataParallel`` (FSDP1): the error."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(norms_model(), use_orig_params=True, device_id=torch.device("cpu"))
    try:
        GradNormTracker(model, loss_reduction="sum")
    except ValueError as err:
        return str(err)
    return "no error"


def fsdp_gpt2_worker(x: torch.Tensor, y: torch.Tensor, mode: str = "eager") -> dict:
    """A tiny Hugging Face GPT-2 (its head tied to the token embedding, ``Conv1D`` layers) with a
    ``fully_shard`` unit per transformer block, as large models are sharded: two tracked steps;
    the second's per-sample norms of all ranks' samples, and the modules the check compared.
    ``mode``: ``"compiled"`` runs ``torch.compile(model, backend="aot_eager")``; ``"checkpointed"``
    recomputes each block in the backward (non-reentrant activation checkpointing)."""
    from .test_transformers import GPT2Logits, token_loss

    torch.manual_seed(0)
    model = GPT2Logits()
    model = _fully_shard_children(model, units=list(model.lm.transformer.h))
    tracker = GradNormTracker(model, loss_reduction="sum", verify_every=1)
    mine = shard_slice(len(y), dist.get_world_size(), dist.get_rank())
    if mode == "checkpointed":
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    run = torch.compile(model, backend="aot_eager") if mode == "compiled" else model
    for _ in range(2):  # (the second step: the stand-ins hooked in the first are reused)
        model.zero_grad()
        token_loss(run(x[mine]), y[mine]).backward()
        stats = tracker.collect()
    return {"per_sample": gather_per_sample(stats.per_sample), "verified": sorted(stats.unaccounted or {})}


def sync_batch_norm_worker(x: torch.Tensor, g: torch.Tensor) -> dict:
    """This rank's share of ``x, g [B, C, H, W]`` through the BatchNorm rule of an nn.SyncBatchNorm
    in training mode (its rule only: SyncBatchNorm's own forward needs a GPU): the statistics it
    gathers and this rank's per-sample weight and bias gradients."""
    from divebatch.layers.norm import BatchNormRule

    mine = shard_slice(len(x), dist.get_world_size(), dist.get_rank())
    module, rule = nn.SyncBatchNorm(x.shape[1]).train(), BatchNormRule()
    ctx = rule.capture(module, (x[mine],), {}, None)
    grads = rule.per_sample_grads(module, [(ctx, (g[mine],))], {"weight", "bias"})
    return {"mean": ctx[1], "var": ctx[2], **grads}


#: Trainable-parameter changes between the steps of ``fsdp_freeze_worker`` (names frozen per step).
FROZEN_PER_STEP = [(), ("4.weight",), ("0.weight", "0.bias"), ()]


def fsdp_freeze_worker(x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """The tracker made once on a sharded ``norms_model``; before each step, the parameters in
    ``FROZEN_PER_STEP`` frozen (on the sharded parameters, as a user would) and the others trained.
    Per step: all ranks' per-sample norms and ``||sum_i g_i||^2``, or the error."""
    mine = shard_slice(len(y), dist.get_world_size(), dist.get_rank())
    model = _fully_shard_children(norms_model())
    tracker = GradNormTracker(model, loss_reduction="sum", verify_every=1)
    out = []
    for frozen in FROZEN_PER_STEP:
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        model.zero_grad()
        try:
            nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum").backward()
            stats = tracker.collect()
            _, batch_grad_sq, _ = global_step_sums(stats.per_sample, stats.batch_size, tracker.parameters(), 1.0)
            out.append({"per_sample": gather_per_sample(stats.per_sample), "batch_grad_sq": float(batch_grad_sq)})
        except Exception as err:  # noqa: BLE001 - reported to the test, which names the step
            out.append({"error": f"{type(err).__name__}: {err}"})
    tracker.close()
    return out
