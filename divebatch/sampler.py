"""A batch sampler whose batch size follows a policy, with micro-batching and exact resume.

``AdaptiveBatchSampler`` goes into ``DataLoader(dataset, batch_sampler=...)``. At the start of
every epoch it reads ``policy.batch_size`` (the *logical* batch: samples per optimizer step) and
cuts that epoch's permutation into consecutive logical batches. When a logical batch is larger
than ``max_micro_batch`` (a memory bound), it is split into ``k = ⌈m / max_micro_batch⌉``
micro-batches of near-equal size (sizes differ by at most one); the sampler yields the
micro-batches, and :meth:`AdaptiveBatchSampler.plan` (or :meth:`iter_steps`, or
:func:`divebatch.train.group_micro_batches`) says which micro-batches form one optimizer step, so
gradients can be accumulated and the optimizer sees the logical batch the policy asked for.

Determinism: epoch ``e``'s permutation is ``numpy.random.default_rng([seed, e]).permutation(n)``
— the same on every machine and independent of the batch sizes used before. Every index appears
exactly once per epoch (with ``drop_last`` the final short logical batch is left out).

Resume: :meth:`state_dict` records the epoch, the batch size frozen for it and how many
micro-batches have been handed out; after :meth:`load_state_dict` the next iteration yields
exactly the remaining micro-batches of that epoch. With a ``DataLoader`` using worker processes
the sampler runs ahead of the training loop (``prefetch_factor × num_workers`` batches): pass the
number of micro-batches actually consumed, ``state_dict(consumed=k)``.
"""

from __future__ import annotations

import numbers
from typing import Iterator, Sized

import numpy as np
from torch.utils.data import Sampler

__all__ = ["AdaptiveBatchSampler", "split_sizes"]


def split_sizes(total: int, max_size: int | None) -> list[int]:
    """Sizes of the micro-batches one logical batch of ``total`` samples is split into:
    ``k = ⌈total / max_size⌉`` parts, near-equal, larger ones first (``[total]`` if it fits)."""
    if max_size is None or total <= max_size:
        return [total]
    k = -(-total // max_size)
    q, r = divmod(total, k)
    return [q + 1] * r + [q] * (k - r)


class _FixedSize:
    def __init__(self, batch_size: int):
        self.batch_size = batch_size


class AdaptiveBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose size follows ``policy.batch_size``, epoch by epoch.

    Args:
        dataset_or_len: a sized dataset, or its length n.
        policy: anything with a ``batch_size`` attribute (a :mod:`divebatch.schedule` policy), or an
            int for a fixed batch size. Read once at the start of each epoch.
        shuffle: a fresh permutation per epoch (else ``0 … n−1`` in order).
        seed: base seed; epoch ``e`` uses ``default_rng([seed, e])``.
        drop_last: leave out the final logical batch when it is shorter than the batch size.
        max_micro_batch: largest micro-batch to yield (samples); None: never split.

    Iterating yields micro-batches (lists of ints); after the last one of an epoch the sampler
    moves to the next epoch by itself (or set it with :meth:`set_epoch`). ``len(sampler)`` is the
    number of micro-batches in the current epoch at the current batch size.
    """

    def __init__(self, dataset_or_len: Sized | int, policy, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, max_micro_batch: int | None = None):
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
        self.n = n
        self.policy = policy
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.max_micro_batch = None if max_micro_batch is None else int(max_micro_batch)
        self.epoch = 0
        self._pos = 0             # micro-batches handed out in the current epoch
        self._epoch_bs: int | None = None  # logical batch size frozen for the epoch in progress

    # -- the plan of an epoch -------------------------------------------------------------
    def _batch_size(self) -> int:
        bs = self._epoch_bs if self._epoch_bs is not None else int(self.policy.batch_size)
        if bs < 1:
            raise ValueError(f"policy.batch_size must be >= 1, got {bs}")
        return bs

    def permutation(self, epoch: int | None = None) -> np.ndarray:
        """The order of indices for ``epoch`` (default: the current one), int64 ``[n]``."""
        e = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        return np.random.default_rng([self.seed, e]).permutation(self.n).astype(np.int64)

    def _steps(self, bs: int) -> list[list[tuple[int, int]]]:
        """(start, end) slices of the permutation: one list of micro-batches per logical step."""
        steps = []
        for start in range(0, self.n, bs):
            size = min(bs, self.n - start)
            if size < bs and self.drop_last:
                break
            micro, s = [], start
            for m in split_sizes(size, self.max_micro_batch):
                micro.append((s, s + m))
                s += m
            steps.append(micro)
        return steps

    def plan(self) -> list[list[int]]:
        """Micro-batch sizes per logical step for the rest of the current epoch (all of it when the
        epoch has not started), e.g. ``[[512, 512], [512, 512], …, [300, 300]]``."""
        out, k = [], 0
        for micro in self._steps(self._batch_size()):
            if k >= self._pos:
                out.append([b - a for a, b in micro])
            elif k + len(micro) > self._pos:  # resumed inside a step: only its remaining micro-batches
                out.append([b - a for a, b in micro[self._pos - k:]])
            k += len(micro)
        return out

    @property
    def batch_size(self) -> int:
        """The logical batch size of the current epoch (frozen once the epoch has started)."""
        return self._batch_size()

    @property
    def num_steps(self) -> int:
        """Optimizer steps in the current epoch at its batch size."""
        return len(self._steps(self._batch_size()))

    def __len__(self) -> int:
        return sum(len(s) for s in self._steps(self._batch_size()))

    # -- iteration ------------------------------------------------------------------------
    def _micro(self) -> Iterator[tuple[bool, int, np.ndarray]]:
        """Yields (last micro-batch of its step?, logical size, indices) and keeps the position."""
        bs = self._batch_size()
        self._epoch_bs = bs
        perm = self.permutation()
        steps = self._steps(bs)
        k = 0
        for micro in steps:
            logical = micro[-1][1] - micro[0][0]
            for j, (a, b) in enumerate(micro):
                if k >= self._pos:
                    self._pos = k + 1
                    yield j == len(micro) - 1, logical, perm[a:b]
                k += 1
        self.epoch += 1
        self._pos = 0
        self._epoch_bs = None

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, idx in self._micro():
            yield idx.tolist()

    def iter_steps(self) -> Iterator[list[np.ndarray]]:
        """Iterate the current epoch by optimizer step: each item is the list of micro-batch index
        arrays (int64) that make up one logical batch. Used by :mod:`divebatch.train`."""
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
    def state_dict(self, consumed: int | None = None) -> dict:
        """Epoch, position (micro-batches handed out, or ``consumed`` when given) and the frozen
        batch size: enough to resume the epoch exactly."""
        pos = self._pos if consumed is None else int(consumed)
        return {"epoch": self.epoch, "position": pos, "epoch_batch_size": self._epoch_bs if pos > 0 else None,
                "seed": self.seed, "n": self.n, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "max_micro_batch": self.max_micro_batch}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the next iteration yields the rest of that epoch."""
        if int(state["n"]) != self.n:
            raise ValueError(f"sampler state is for a dataset of {state['n']} samples, this one has {self.n}")
        self.epoch = int(state["epoch"])
        self._pos = int(state["position"])
        self._epoch_bs = state["epoch_batch_size"]
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.drop_last = bool(state["drop_last"])
        self.max_micro_batch = state["max_micro_batch"]
        if self._pos > 0 and self._epoch_bs is None:
            self._epoch_bs = int(self.policy.batch_size)

    def __repr__(self) -> str:
        return (f"AdaptiveBatchSampler(n={self.n}, batch_size={self._batch_size()}, epoch={self.epoch}, "
                f"max_micro_batch={self.max_micro_batch}, drop_last={self.drop_last})")
