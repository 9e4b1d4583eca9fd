"""Multi-process training with ``torch.distributed``: the few collectives divebatch adds, and a
local launcher.

How the statistics stay exact under ``DistributedDataParallel`` (DDP) with a global batch of
``B`` samples split over ``W`` ranks (rank ``r`` holds ``B_r`` of them):

* Each rank's loss is ``(W/B)·Σ_{i∈rank} ℓ_i``; DDP averages gradients over ranks, so every
  rank's ``.grad`` ends up ``(1/B)·Σ_{all i} g_i`` — the gradient of the mean loss over the
  global batch, whatever the shares ``B_r``.
* ``Σ_i ||g_i||²`` adds up over ranks: each rank's tracker gives its local sum and **one
  all-reduce of five scalars per measured step** (:func:`global_step_sums`: the sum, the
  local batch size, the loss scale, checked equal on all ranks, and FSDP2's shard norms, 0
  under DDP) makes it global.
* ``||Σ_i g_i||²`` of the global batch is read from the all-reduced ``.grad`` that DDP leaves on
  every rank (no extra communication; exact to float rounding, and correct with ``no_sync()``
  accumulation since it is read after the synchronising backward).
* Under FSDP2 (``fully_shard``) the same holds with a sharded ``.grad``: it is reduce-scattered
  with the same average over ranks, each rank squares its shard, and the shares ride in the same
  all-reduce. The tracker hooks the unsharded parameters that ``fully_shard`` swaps in for the
  forward and backward (``divebatch/_fsdp.py``); each rank's per-sample norms are of its own
  samples, as under DDP.
* Every rank then feeds identical numbers to an identical policy, so every rank makes the same
  decision; :func:`check_same_decision` verifies it at each epoch end (one tiny all-reduce per
  epoch) and fails on every rank at once if it ever does not hold.

Ranks that build different models fail in :func:`check_same_model` with an error naming the
first difference, on every rank, before DDP is constructed. Every collective is bounded by the
process group's timeout (:func:`default_timeout`), so a rank that dies turns into an error on the
others instead of a hang.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import pickle
import socket
import tempfile
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import _fsdp
from ._norms import squared_norm

__all__ = [
    "is_distributed",
    "rank_and_world",
    "default_timeout",
    "init_from_env",
    "all_reduce_sum",
    "collective_device",
    "gather_per_sample",
    "global_step_sums",
    "grad_sq_norm",
    "check_same_model",
    "check_same_decision",
    "launch",
    "free_port",
]


def is_distributed() -> bool:
    """Whether a default process group is initialised (with more than one rank or not)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def default_timeout() -> datetime.timedelta:
    """Bound on every collective: ``DIVEBATCH_DIST_TIMEOUT`` seconds (default 300)."""
    return datetime.timedelta(seconds=float(os.environ.get("DIVEBATCH_DIST_TIMEOUT", "300")))


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) if it is set and no group exists yet.

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. Returns
    ``(rank, world_size)``; ``(0, 1)`` when the environment names no world.
    """
    if is_distributed():
        return rank_and_world()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=default_timeout())
    return rank_and_world()


def collective_device() -> torch.device:
    """Where tensors for the default group's collectives must live: this process's CUDA device
    under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks (a new tensor on ``value``'s device; ``value`` itself is left
    alone). Identity without a process group. (The Trainer's per-epoch loss, FSDP2's shard norms;
    a measured step uses :func:`global_step_sums`.)"""
    if not is_distributed() or dist.get_world_size() == 1:
        return value
    out = value.detach().to(collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(value.device)


def _grad_sq_parts(params, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(Σ ||p.grad||² over whole gradients, this rank's share of Σ over sharded ones)`` in float64:
    the second is None where no gradient is a DTensor (FSDP2's shards, see ``_fsdp.sharded_sq_norm``)
    and must be summed over ranks otherwise."""
    whole, shares = [], []
    for p in params:
        if p.grad is None:
            continue
        if _fsdp.is_dtensor(p.grad):
            mesh_ranks = p.grad.device_mesh.size()
            if mesh_ranks != rank_and_world()[1]:
                raise ValueError(f"a gradient sharded over {mesh_ranks} of {rank_and_world()[1]} ranks: the norm of "
                                 "gradients sharded over a mesh that is not the whole default process group is not "
                                 "supported (shard with fully_shard over all ranks)")
            shares.append(_fsdp.sharded_sq_norm(p.grad))
        else:
            whole.append(squared_norm(p.grad.detach()).double())
    first = (whole or shares or [None])[0]
    device = device if device is not None else (first.device if first is not None else None)
    total = (torch.stack([s.to(device) for s in whole]).sum() if whole
             else torch.zeros((), dtype=torch.float64, device=device))
    share = torch.stack([s.to(device) for s in shares]).sum() if shares else None
    return total, share


def grad_sq_norm(params, device: torch.device | None = None) -> torch.Tensor:
    """``Σ_p ||p.grad||²`` over ``params`` as a float32 scalar tensor on ``device``.

    Gradients that FSDP2 (``fully_shard``) left sharded across ranks count whole: each rank
    squares its shards and one all-reduce of a scalar adds them up (so under FSDP2 every rank must
    call this together); otherwise no collective and no host sync.
    """
    total, share = _grad_sq_parts(params, device)
    if share is not None:
        total = total + all_reduce_sum(share).to(total.device)
    return total.float()


def global_step_sums(per_sample_sq: torch.Tensor, batch_size: int, params, loss_scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(Σ_i ||g_i||², ||Σ_i g_i||², B)`` over the global batch of one DDP or FSDP2 optimizer step.

    Call on every rank after the step's last (synchronising) backward.

    Args:
        per_sample_sq: this rank's unscaled ``Σ_{i∈rank} ||g_i||²`` (a ``[B_r]`` tensor or its sum).
        batch_size: this rank's samples ``B_r`` in the step (over all its micro-batches).
        params: the parameters whose ``.grad`` DDP all-reduced or FSDP2 reduce-scattered (the
            tracker's; under FSDP2 each rank holds a shard, and their squares are summed in the
            same all-reduce).
        loss_scale: ``c`` of this rank's loss ``c·Σ_{i∈rank} ℓ_i`` (times a GradScaler's scale).
            It must be the same on every rank — then ``.grad = (c/W)·Σ_i g_i`` everywhere and
            ``||Σ_i g_i||² = ||.grad||²·W²/c²`` exactly; ranks with different ``c`` (a per-rank
            mean over unequal shares) are refused, since their averaged gradient is no multiple
            of ``Σ_i g_i``.

    One all-reduce of five numbers (``Σ||g_i||²``, ``B_r``, ``c``, ``c²`` and the rank's share of
    the sharded gradients' squared norm); without a process group (or with one rank) none, and the
    result is the local one.
    """
    s1 = per_sample_sq.sum() if per_sample_sq.dim() > 0 else per_sample_sq
    s1 = s1.to(torch.float64)
    world = rank_and_world()[1]
    c = float(loss_scale)
    B = int(batch_size)
    params = list(params)
    sharded = [p for p in params if p.grad is not None and _fsdp.is_dtensor(p.grad)]
    whole = [p for p in params if p.grad is not None and not _fsdp.is_dtensor(p.grad)]
    # FSDP2's shards: each rank's share of their squared norm rides in the same all-reduce
    share = _grad_sq_parts(sharded, s1.device)[1] if sharded else None
    if world > 1:
        packed = torch.stack([s1, s1.new_tensor(float(batch_size)), s1.new_tensor(c), s1.new_tensor(c * c),
                              share.to(s1.device) if share is not None else s1.new_zeros(())])
        packed = packed.to(collective_device())
        # in flight while this rank reads its gradient: the all-reduce is latency, the norm is work
        pending = dist.all_reduce(packed, op=dist.ReduceOp.SUM, async_op=True)
    grad_sq = _grad_sq_parts(whole, s1.device)[0]
    if world > 1:
        pending.wait()
        packed = packed.to(s1.device)
        grad_sq = grad_sq + packed[4]
        s1, B = packed[0], int(round(float(packed[1])))
        c_mean = float(packed[2]) / world
        spread = float(packed[3]) / world - c_mean * c_mean
        if spread > 1e-12 * c_mean * c_mean:
            raise ValueError("the ranks scaled their losses differently (a per-rank mean over unequal batch shares?), "
                             "so the all-reduced gradient is not a multiple of the global Σ g_i and ||Σ g_i||² cannot "
                             "be recovered exactly. Scale every rank's loss by the same c, e.g. "
                             "world_size / global_batch_size (divebatch.train.accumulate_step does this)")
        c = c_mean
    if world == 1 and share is not None:
        grad_sq = grad_sq + share
    return s1, grad_sq * (world / c) ** 2, B


def gather_per_sample(per_sample: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``[B_r]`` per-sample values in rank order (``[B]`` on every rank).

    Two collectives (the lengths, then the padded values): for analysis and tests, not for the
    training step, which only needs the sum (:func:`global_step_sums`).
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return per_sample
    world = dist.get_world_size()
    n = torch.tensor([per_sample.numel()], dtype=torch.int64, device=per_sample.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=per_sample.dtype, device=per_sample.device)
    padded[: per_sample.numel()] = per_sample.reshape(-1)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _model_signature(model: nn.Module) -> list[str]:
    return [f"{name}: {tuple(p.shape)} {str(p.dtype).replace('torch.', '')}{'' if p.requires_grad else ' frozen'}"
            for name, p in model.named_parameters()]


def check_same_model(model: nn.Module, extra: dict | None = None) -> None:
    """Raise on every rank when the ranks' models (parameter names, shapes, dtypes, trainable
    flags) or ``extra`` settings differ; the message names the first difference. No-op without a
    process group. Values may differ: DDP copies rank 0's parameters at construction."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    sig = _model_signature(model)
    settings = sorted((extra or {}).items())
    digest = hashlib.sha256(repr((sig, settings)).encode()).hexdigest()
    world = dist.get_world_size()
    got: list[Any] = [None] * world
    dist.all_gather_object(got, (digest, sig, settings))
    if all(g[0] == digest for g in got):
        return
    for r, (d, other_sig, other_settings) in enumerate(got):
        if d == got[0][0]:
            continue
        if other_settings != got[0][2]:
            diff = {k: (v, dict(other_settings).get(k)) for k, v in got[0][2] if dict(other_settings).get(k) != v}
            raise RuntimeError(f"rank {r} runs with different settings than rank 0: {diff} (rank 0's value, "
                               f"rank {r}'s value); start every rank with the same arguments")
        a, b = got[0][1], other_sig
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        left = a[first] if first < len(a) else "(no more parameters)"
        right = b[first] if first < len(b) else "(no more parameters)"
        raise RuntimeError(f"the ranks' models differ: rank 0 has {len(a)} parameters, rank {r} has {len(b)}; "
                           f"first difference at parameter #{first}: rank 0 '{left}' vs rank {r} '{right}'. "
                           "Every rank must build the same model before DistributedDataParallel wraps it")


def check_same_decision(batch_size: int, lrs: Sequence[float]) -> None:
    """Raise on every rank when the ranks disagree on the batch size or learning rates (one
    all-reduce of a few numbers). Ranks fed identical all-reduced statistics never disagree;
    this turns a broken invariant into an error instead of a silent divergence."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    vals = torch.tensor([float(batch_size), *map(float, lrs)], dtype=torch.float64, device=collective_device())
    both = torch.cat([vals, -vals])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    hi, lo = both[: len(vals)], -both[len(vals):]
    if not torch.equal(hi, lo):
        raise RuntimeError(f"ranks disagree after a batch-size decision: batch size in [{lo[0]:.0f}, {hi[0]:.0f}], "
                           f"lr in [{lo[1:].tolist()}, {hi[1:].tolist()}]; every rank must observe the same "
                           "all-reduced statistics (call policy.observe_sums on every rank, every step)")


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result_path(result_dir: str, rank: int) -> str:
    return os.path.join(result_dir, f"rank{rank}.pkl")


def _launched(rank: int, fn: Callable, world_size: int, port: int, backend: str, timeout_s: float,
              threads: int | None, args: tuple, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    if threads is not None:
        torch.set_num_threads(threads)
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        # every process is local: talk over loopback even where the host name resolves to nothing usable
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        out = fn(*args)
        # a file, not a queue: a large result in a pipe would block this process while the
        # parent waits in join(); written whole, then renamed, so a file that exists is complete
        path = _result_path(result_dir, rank)
        with open(path + ".part", "wb") as f:
            pickle.dump(out, f)
        os.replace(path + ".part", path)
    finally:
        # Free what the work left in reference cycles (a DistributedDataParallel reducer and its
        # pending work) while the interpreter is whole, not during its teardown.
        gc.collect()
        dist.destroy_process_group()


def launch(fn: Callable, nproc: int, args: Sequence = (), backend: str = "gloo", timeout_s: float | None = None,
           threads: int | None = None) -> list:
    """Run ``fn(*args)`` in ``nproc`` new local processes forming one process group; return
    their return values in rank order (each must be picklable).

    ``fn`` must be importable by name (a module-level function): processes are started with
    ``spawn``. ``threads``: torch intra-op threads per process (default: cores // nproc, at least
    1). If any process raises, the others are stopped and the error (with the failing rank's
    traceback) is raised here; a process killed by a signal after every rank returned and wrote its
    result (gloo's rare abort at teardown) only warns. ``timeout_s`` bounds each collective (default
    :func:`default_timeout`).
    """
    import torch.multiprocessing as mp

    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    timeout_s = default_timeout().total_seconds() if timeout_s is None else float(timeout_s)
    with tempfile.TemporaryDirectory(prefix="divebatch-launch-") as result_dir:
        try:
            mp.start_processes(_launched, nprocs=nproc, join=True, start_method="spawn",
                               args=(fn, nproc, free_port(), backend, timeout_s, threads, tuple(args), result_dir))
        except mp.ProcessExitedException as err:
            # Killed by a signal after every rank returned and wrote its result: the crash was in
            # the process group's teardown (gloo has aborted there, rarely, with "terminate called
            # without an active exception"), the work is done. Anything earlier is an error.
            if err.signal_name is None or not all(
                    os.path.exists(_result_path(result_dir, rank)) for rank in range(nproc)):
                raise
            warnings.warn(f"launch: every rank returned, but process {err.error_index} then died with "
                          f"{err.signal_name} while shutting down; its result stands", RuntimeWarning)
        out = []
        for rank in range(nproc):
            with open(_result_path(result_dir, rank), "rb") as f:
                out.append(pickle.load(f))
    return out
