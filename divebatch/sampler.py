"""A batch sampler whose batch size follows a policy, with micro-batching, DDP sharding and exact resume.

``AdaptiveBatchSampler`` goes into ``DataLoader(dataset, batch_sampler=...)``. At the start of
every epoch it reads ``policy.batch_size`` (the *logical* batch: samples per optimizer step, summed
over all ranks when training with ``DistributedDataParallel``) and cuts that epoch's permutation
into consecutive logical batches, the *global steps*. When this rank's share of a step is larger
than ``max_micro_batch`` (a per-rank memory bound), it is split into ``k = ⌈m / max_micro_batch⌉``
micro-batches of near-equal size (sizes differ by at most one, :func:`split_sizes`); the sampler
yields the micro-batches, and :meth:`AdaptiveBatchSampler.plan` (or :meth:`iter_steps`, or
:func:`divebatch.train.group_micro_batches`) says which micro-batches form one optimizer step, so
gradients can be accumulated and the optimizer sees the logical batch the policy asked for.

Distributed training (``num_replicas = W > 1``, this process is ``rank``): every rank computes the
same permutation and the same global steps. A global step of ``B`` samples is cut into ``W``
contiguous slices of the step's part of the permutation, rank ``r`` getting
``B // W + (1 if r < B % W else 0)`` samples — the larger shares first, rank 0 first
(:func:`shard_sizes`; e.g. ``shard_sizes(10, 4) == [3, 3, 2, 2]``). Every rank's share is then
micro-batched on its own, so ranks may run different numbers of micro-batches in a step. Because
DDP needs every rank in every backward, every rank gets at least one sample in every step:

* the global batch size must be ``>= W`` (else ``ValueError`` when the epoch's batch size is read);
* the dataset must have at least ``W`` samples (or none);
* without ``drop_last``, a final short step with fewer than ``W`` samples is merged into the step
  before it, which then has ``B + tail`` samples, split by the same rule. With ``W = 1`` the tail
  always has at least one sample, so nothing is merged and the single-process plan is unchanged.

All ranks therefore have the same number of steps (``num_steps``), and together they see every
index of the epoch exactly once.

Determinism: epoch ``e``'s permutation is ``numpy.random.default_rng([seed, e]).permutation(n)``
— the same on every machine and independent of the batch sizes used before. Every index appears
exactly once per epoch (with ``drop_last`` the final short logical batch is left out).

Resume: :meth:`state_dict` records the epoch, the batch size frozen for it, how many of this
rank's micro-batches have been handed out (``position``) and how many global steps have been
handed out completely (``step``); after :meth:`load_state_dict` the next iteration yields exactly
the remaining micro-batches of that epoch. A state saved at a step boundary (e.g. by rank 0 after
an optimizer step) resumes every rank, at any ``max_micro_batch`` and even at another world size,
at the start of the next step; a state saved in the middle of a step is only valid for the rank and
world size that saved it — checkpoint at step boundaries. With a ``DataLoader`` using worker
processes the sampler runs ahead of the training loop (``prefetch_factor × num_workers`` batches):
pass the number of micro-batches actually consumed, ``state_dict(consumed=k)``.
"""

from __future__ import annotations

import numbers
from typing import Iterator, Sized

import numpy as np
from torch.utils.data import Sampler

__all__ = ["AdaptiveBatchSampler", "split_sizes", "shard_sizes", "shard_slice"]


def split_sizes(total: int, max_size: int | None) -> list[int]:
    """Sizes of the micro-batches one logical batch of ``total`` samples is split into:
    ``k = ⌈total / max_size⌉`` parts, near-equal, larger ones first (``[total]`` if it fits)."""
    if max_size is None or total <= max_size:
        return [total]
    k = -(-total // max_size)
    q, r = divmod(total, k)
    return [q + 1] * r + [q] * (k - r)


def shard_sizes(total: int, num_replicas: int) -> list[int]:
    """Samples of a global step of ``total`` samples that each of ``num_replicas`` ranks gets:
    rank ``r`` gets ``total // W + (1 if r < total % W else 0)`` (larger shares first, rank 0 first),
    e.g. ``shard_sizes(10, 4) == [3, 3, 2, 2]``. Rank ``r``'s slice of the step starts after the
    shares of ranks ``0 … r−1``."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    q, r = divmod(int(total), int(num_replicas))
    return [q + 1] * r + [q] * (num_replicas - r)


def shard_slice(total: int, num_replicas: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous slice of a global step of ``total`` samples under the remainder
    rule of :func:`shard_sizes`, e.g. ``x[shard_slice(len(x), world, rank)]`` in your own loop."""
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    sizes = shard_sizes(total, num_replicas)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


class _FixedSize:
    def __init__(self, batch_size: int):
        self.batch_size = batch_size


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose size follows ``policy.batch_size``, epoch by epoch.

    Args:
        dataset_or_len: a sized dataset, or its length n (at least ``num_replicas`` unless 0).
        policy: anything with a ``batch_size`` attribute (a :mod:`divebatch.schedule` policy), or an
            int for a fixed batch size: the *global* logical batch, samples per optimizer step
            summed over all ranks (must be ``>= num_replicas``). Read once at the start of each epoch.
        shuffle: a fresh permutation per epoch (else ``0 … n−1`` in order).
        seed: base seed; epoch ``e`` uses ``default_rng([seed, e])`` (use the same seed on all ranks).
        drop_last: leave out the final logical batch when it is shorter than the batch size.
        max_micro_batch: largest micro-batch to yield (samples, on this rank); None: never split.
        num_replicas: number of DDP ranks W sharing each step (1: single process).
        rank: this process's rank, ``0 <= rank < num_replicas``.

    Each global step of ``B`` samples is split into contiguous per-rank slices of
    :func:`shard_sizes` ``(B, W)`` samples (larger shares first); this rank's slice is micro-batched
    by :func:`split_sizes`. Without ``drop_last``, a final step shorter than ``W`` samples is merged
    into the previous step, so every rank has at least one sample in every step (see the module
    docstring).

    Iterating yields this rank's micro-batches (lists of ints); after the last one of an epoch the
    sampler moves to the next epoch by itself (or set it with :meth:`set_epoch`). ``len(sampler)``
    is the number of this rank's micro-batches in the current epoch at the current batch size;
    :attr:`batch_size` and :attr:`num_steps` are global (the same on every rank).
    """

    def __init__(self, dataset_or_len: Sized | int, policy, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, max_micro_batch: int | None = None,
                 num_replicas: int = 1, rank: int = 0):
        if isinstance(dataset_or_len, numbers.Integral) and not isinstance(dataset_or_len, bool):
            n = int(dataset_or_len)
        elif hasattr(dataset_or_len, "__len__"):
            n = len(dataset_or_len)
        else:
            raise TypeError("AdaptiveBatchSampler needs a sized dataset or its length; for an iterable dataset "
                            "read policy.batch_size yourself (the noise-scale estimator needs no length)")
        if n < 0:
            raise ValueError(f"dataset length must be >= 0, got {n}")
        if isinstance(policy, numbers.Integral) and not isinstance(policy, bool):
            policy = _FixedSize(int(policy))
        if not hasattr(policy, "batch_size"):
            raise TypeError(f"policy must have a batch_size attribute (or be an int), got {type(policy).__name__}")
        if max_micro_batch is not None and (not isinstance(max_micro_batch, numbers.Integral) or max_micro_batch < 1):
            raise ValueError(f"max_micro_batch must be a positive integer or None, got {max_micro_batch!r}")
        if not _is_int(num_replicas) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if not _is_int(rank) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an integer with 0 <= rank < num_replicas={num_replicas}, got {rank!r}")
        if 0 < n < num_replicas:
            raise ValueError(f"a dataset of {n} samples cannot give each of num_replicas={num_replicas} ranks "
                             f"at least one sample per step")
        self.n = n
        self.policy = policy
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.max_micro_batch = None if max_micro_batch is None else int(max_micro_batch)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self._pos = 0             # this rank's micro-batches handed out in the current epoch
        self._epoch_bs: int | None = None  # logical batch size frozen for the epoch in progress

    # -- the plan of an epoch -------------------------------------------------------------
    def _check_bs(self, bs: int) -> int:
        if bs < 1:
            raise ValueError(f"policy.batch_size must be >= 1, got {bs}")
        if bs < self.num_replicas:
            raise ValueError(f"the global batch size ({bs}) must be >= the world size num_replicas="
                             f"{self.num_replicas}: every rank needs at least one sample per step")
        return bs

    def _batch_size(self) -> int:
        bs = self._epoch_bs if self._epoch_bs is not None else int(self.policy.batch_size)
        return self._check_bs(bs)

    def permutation(self, epoch: int | None = None) -> np.ndarray:
        """The order of indices for ``epoch`` (default: the current one), int64 ``[n]``."""
        e = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        return np.random.default_rng([self.seed, e]).permutation(self.n).astype(np.int64)

    def _global_steps(self, bs: int, num_replicas: int | None = None) -> list[tuple[int, int]]:
        """(start, end) slices of the permutation, one per global step, for world size
        ``num_replicas`` (default: this sampler's): a final step with fewer than W samples is merged
        into the previous one."""
        w = self.num_replicas if num_replicas is None else num_replicas
        steps = []
        for start in range(0, self.n, bs):
            end = min(start + bs, self.n)
            if end - start < bs and self.drop_last:
                break
            steps.append((start, end))
        if len(steps) > 1 and steps[-1][1] - steps[-1][0] < w:
            steps[-2:] = [(steps[-2][0], steps[-1][1])]
        return steps

    def _local_steps(self, bs: int, num_replicas: int | None = None, rank: int | None = None,
                     max_micro: int | None | str = "self") -> list[tuple[int, list[tuple[int, int]]]]:
        """Per global step: (its size, the (start, end) slices of ``rank``'s micro-batches)."""
        w = self.num_replicas if num_replicas is None else num_replicas
        r = self.rank if rank is None else rank
        mmb = self.max_micro_batch if max_micro == "self" else max_micro
        out = []
        for a, b in self._global_steps(bs, w):
            shares = shard_sizes(b - a, w)
            s = a + sum(shares[:r])
            micro = []
            for m in split_sizes(shares[r], mmb):
                micro.append((s, s + m))
                s += m
            out.append((b - a, micro))
        return out

    def _steps(self, bs: int) -> list[list[tuple[int, int]]]:
        """(start, end) slices of the permutation: this rank's micro-batches, one list per step."""
        return [micro for _, micro in self._local_steps(bs)]

    def plan(self) -> list[list[int]]:
        """This rank's micro-batch sizes per logical step for the rest of the current epoch (all of
        it when the epoch has not started), e.g. ``[[512, 512], [512, 512], …, [300, 300]]``."""
        out, k = [], 0
        for micro in self._steps(self._batch_size()):
            if k >= self._pos:
                out.append([b - a for a, b in micro])
            elif k + len(micro) > self._pos:  # resumed inside a step: only its remaining micro-batches
                out.append([b - a for a, b in micro[self._pos - k:]])
            k += len(micro)
        return out

    def global_step_sizes(self) -> list[int]:
        """Samples per global step (all ranks together) for the whole current epoch."""
        return [b - a for a, b in self._global_steps(self._batch_size())]

    def local_batch_sizes(self) -> list[int]:
        """This rank's samples per step for the whole current epoch (its :func:`shard_sizes` share
        of each of :meth:`global_step_sizes`)."""
        return [sum(b - a for a, b in micro) for micro in self._steps(self._batch_size())]

    @property
    def batch_size(self) -> int:
        """The global logical batch size of the current epoch (frozen once the epoch has started)."""
        return self._batch_size()

    @property
    def num_steps(self) -> int:
        """Optimizer steps in the current epoch at its batch size (the same on every rank)."""
        return len(self._global_steps(self._batch_size()))

    def __len__(self) -> int:
        return sum(len(s) for s in self._steps(self._batch_size()))

    # -- iteration ------------------------------------------------------------------------
    def _micro(self) -> Iterator[tuple[bool, int, np.ndarray]]:
        """Yields (last micro-batch of its step?, global logical size, indices) and keeps the position."""
        bs = self._batch_size()
        self._epoch_bs = bs
        perm = self.permutation()
        steps = self._local_steps(bs)
        total = sum(len(micro) for _, micro in steps)
        if self._pos >= total:  # nothing left (an empty epoch, or a state saved at its very end)
            self._next_epoch()
            return
        k = 0
        for logical, micro in steps:
            for j, (a, b) in enumerate(micro):
                if k >= self._pos:
                    # The epoch is over once its last micro-batch is handed out, whether or not
                    # the consumer asks for more (group_micro_batches and DataLoader loops stop at
                    # the planned count): move on before yielding it.
                    if k == total - 1:
                        self._next_epoch()
                    else:
                        self._pos = k + 1
                    yield j == len(micro) - 1, logical, perm[a:b]
                k += 1

    def _next_epoch(self) -> None:
        self.epoch += 1
        self._pos = 0
        self._epoch_bs = None

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, idx in self._micro():
            yield idx.tolist()

    def iter_steps(self) -> Iterator[list[np.ndarray]]:
        """Iterate the current epoch by optimizer step: each item is the list of this rank's
        micro-batch index arrays (int64) for one logical batch. Used by :mod:`divebatch.train`."""
        cur: list[np.ndarray] = []
        for last, _, idx in self._micro():
            cur.append(idx)
            if last:
                yield cur
                cur = []
        if cur:  # resumed in the middle of a step
            yield cur

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)
        self._pos = 0
        self._epoch_bs = None

    # -- state ----------------------------------------------------------------------------
    @staticmethod
    def _locate(pos: int, counts: list[int]) -> tuple[int, int]:
        """(steps complete after ``pos`` micro-batches, micro-batches in those steps)."""
        step = done = 0
        for c in counts:
            if done + c > pos:
                break
            done += c
            step += 1
        return step, done

    def state_dict(self, consumed: int | None = None) -> dict:
        """Epoch, position (this rank's micro-batches handed out, or ``consumed`` when given), the
        global steps fully handed out (``step``), the frozen batch size and the world: enough to
        resume the epoch exactly (on any rank when saved at a step boundary)."""
        pos = self._pos if consumed is None else int(consumed)
        step = 0
        if pos > 0:
            counts = [len(micro) for micro in self._steps(self._batch_size())]
            step = self._locate(pos, counts)[0]
        return {"epoch": self.epoch, "position": pos, "epoch_batch_size": self._epoch_bs if pos > 0 else None,
                "seed": self.seed, "n": self.n, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "max_micro_batch": self.max_micro_batch, "step": step, "num_replicas": self.num_replicas,
                "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the next iteration yields the rest of that epoch.

        A state saved at a step boundary (position at the end of a step) resumes this rank at the
        start of the next step, whatever rank, world size and ``max_micro_batch`` saved it (this
        sampler keeps its own ``max_micro_batch``); a ``ValueError`` if that boundary does not exist
        at this world size (the tail merge). A state saved in the middle of a step is only valid for
        the same rank and world size (and then adopts the saved ``max_micro_batch``); elsewhere it
        raises ``ValueError``. States without ``step`` (single process) load as before."""
        if int(state["n"]) != self.n:
            raise ValueError(f"sampler state is for a dataset of {state['n']} samples, this one has {self.n}")
        w_s = int(state.get("num_replicas", 1))
        r_s = int(state.get("rank", 0))
        if w_s < 1 or not 0 <= r_s < w_s:
            raise ValueError(f"sampler state has an invalid world: rank {r_s} of num_replicas={w_s}")
        pos_s = int(state["position"])
        ebs = state["epoch_batch_size"]
        mmb_s = state["max_micro_batch"]
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.drop_last = bool(state["drop_last"])
        if pos_s > 0 and ebs is None:
            ebs = int(self.policy.batch_size)
        pos = 0
        if pos_s > 0:
            ebs = int(ebs)
            saver = self._local_steps(ebs, w_s, r_s, mmb_s)
            step, boundary_pos = self._locate(pos_s, [len(micro) for _, micro in saver])
            if "step" in state and int(state["step"]) != step:
                raise ValueError(f"sampler state is inconsistent: position {pos_s} of rank {r_s} is in step {step}, "
                                 f"but the state says {state['step']} steps were complete")
            if pos_s == boundary_pos:  # at the end of a step: valid for every rank and world size
                self._check_bs(ebs)
                offset = sum(size for size, _ in saver[:step])
                mine = self._local_steps(ebs)
                done = total = 0
                for size, micro in mine:
                    if total == offset:
                        break
                    total += size
                    done += len(micro)
                if total != offset:
                    raise ValueError(f"sampler state was saved after step {step} of {len(saver)} at "
                                     f"num_replicas={w_s}; that step boundary does not exist at num_replicas="
                                     f"{self.num_replicas} (the final short step is merged)")
                pos = done
            else:
                if (w_s, r_s) != (self.num_replicas, self.rank):
                    raise ValueError(f"sampler state was saved in the middle of step {step} by rank {r_s} of "
                                     f"num_replicas={w_s}; it cannot resume rank {self.rank} of num_replicas="
                                     f"{self.num_replicas} — checkpoint at step boundaries")
                self._check_bs(ebs)
                self.max_micro_batch = mmb_s
                pos = pos_s
        self.epoch = int(state["epoch"])
        self._pos = pos
        self._epoch_bs = ebs

    def __repr__(self) -> str:
        world = f", rank={self.rank}, num_replicas={self.num_replicas}" if self.num_replicas > 1 else ""
        return (f"AdaptiveBatchSampler(n={self.n}, batch_size={self._batch_size()}, epoch={self.epoch}, "
                f"max_micro_batch={self.max_micro_batch}, drop_last={self.drop_last}{world})")
