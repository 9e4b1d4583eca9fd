"""AdaptiveBatchSampler: coverage, micro-batching, determinism, exact mid-epoch resume, DDP sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from divebatch.sampler import AdaptiveBatchSampler, shard_sizes, shard_slice, split_sizes


class Policy:
    def __init__(self, batch_size):
        self.batch_size = batch_size


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), sizes=st.lists(st.integers(1, 400), min_size=1, max_size=5),
       drop_last=st.booleans(), micro=st.one_of(st.none(), st.integers(1, 64)), seed=st.integers(0, 2**31))
def test_every_index_once_per_epoch_for_any_batch_sizes(n, sizes, drop_last, micro, seed):
    pol = Policy(sizes[0])
    s = AdaptiveBatchSampler(n, pol, seed=seed, drop_last=drop_last, max_micro_batch=micro)
    for bs in sizes:
        pol.batch_size = bs
        plan = s.plan()
        batches = list(s)
        assert len(batches) == sum(len(p) for p in plan)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))                       # never twice
        expected = (n // bs) * bs if drop_last else n
        assert len(flat) == expected and set(flat) <= set(range(n))
        if not drop_last:
            assert sorted(flat) == list(range(n))                # every index exactly once
        # micro-batches respect the memory bound and regroup into logical batches of size bs
        assert all(len(b) >= 1 for b in batches)
        if micro is not None:
            assert all(len(b) <= micro for b in batches)
        k = 0
        for step_sizes in plan:
            got = [len(b) for b in batches[k:k + len(step_sizes)]]
            assert got == step_sizes
            k += len(step_sizes)
            assert sum(step_sizes) == bs or (not drop_last and k == len(batches) and sum(step_sizes) < bs)
    assert s.epoch == len(sizes)


def test_split_sizes():
    assert split_sizes(10, None) == [10]
    assert split_sizes(10, 10) == [10]
    assert split_sizes(10, 4) == [4, 3, 3]
    assert split_sizes(2048, 512) == [512] * 4


def test_deterministic_from_seed_and_epoch_independent_of_history():
    a = AdaptiveBatchSampler(100, Policy(7), seed=3)
    b = AdaptiveBatchSampler(100, Policy(50), seed=3)
    list(a), list(b)  # epoch 0 with different batch sizes
    ea = [i for x in a for i in x]
    eb = [i for x in b for i in x]
    assert ea == eb  # epoch 1's order depends on (seed, epoch) only
    c = AdaptiveBatchSampler(100, Policy(7), seed=4)
    assert [i for x in c for i in x] != [i for x in AdaptiveBatchSampler(100, Policy(7), seed=3) for i in x]
    assert list(AdaptiveBatchSampler(5, Policy(2), shuffle=False)) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("micro", [None, 3])
@pytest.mark.parametrize("stop", [0, 1, 5, 9])
def test_mid_epoch_state_dict_resumes_the_same_remaining_batches(micro, stop):
    pol = Policy(8)
    s = AdaptiveBatchSampler(90, pol, seed=11, max_micro_batch=micro)
    list(s)               # finish epoch 0
    pol.batch_size = 10   # epoch 1 runs at 10
    it = iter(s)
    head = [next(it) for _ in range(stop)]
    state = s.state_dict()
    rest_original = list(it)
    pol2 = Policy(999)    # the policy may have moved on: the frozen epoch batch size wins
    r = AdaptiveBatchSampler(90, pol2, seed=0, max_micro_batch=micro)
    r.load_state_dict(state)
    rest = list(r)
    if len(head) == len(_epoch(90, 10, 11, 1, micro)):
        # the epoch ends with its last micro-batch: the state is already the next epoch's start
        assert state["epoch"] == 2 and state["position"] == 0 and rest_original == []
        assert rest == _epoch(90, 999, 11, 2, micro)
        assert r.epoch == 3
        return
    if stop == 0:
        assert state["position"] == 0
        assert rest == [b for b in _epoch(90, 999, 11, 1, micro)]
    else:
        assert rest == rest_original
        assert head + rest == _epoch(90, 10, 11, 1, micro)
    assert r.epoch == 2


def _epoch(n, bs, seed, epoch, micro):
    s = AdaptiveBatchSampler(n, Policy(bs), seed=seed, max_micro_batch=micro)
    s.set_epoch(epoch)
    return list(s)


def test_state_dict_with_consumed_count_for_prefetching_loaders():
    s = AdaptiveBatchSampler(40, Policy(4), seed=1)
    it = iter(s)
    got = [next(it) for _ in range(6)]   # a loader prefetched 6, the loop consumed 4
    state = s.state_dict(consumed=4)
    r = AdaptiveBatchSampler(40, Policy(4), seed=1)
    r.load_state_dict(state)
    assert list(r)[:2] == got[4:6]


def test_works_as_dataloader_batch_sampler_and_policy_changes_apply_next_epoch():
    ds = TensorDataset(torch.arange(50).float(), torch.arange(50))
    pol = Policy(8)
    s = AdaptiveBatchSampler(ds, pol, seed=0)
    loader = DataLoader(ds, batch_sampler=s)
    assert len(loader) == 7
    sizes0 = [len(y) for _, y in loader]
    pol.batch_size = 25
    sizes1 = [len(y) for _, y in loader]
    assert sizes0 == [8] * 6 + [2] and sizes1 == [25, 25]
    assert len(loader) == 2


def test_iter_steps_groups_micro_batches():
    s = AdaptiveBatchSampler(10, Policy(4), shuffle=False, max_micro_batch=3)
    steps = [[a.tolist() for a in step] for step in s.iter_steps()]
    assert steps == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9]]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_micro_batch"):
        AdaptiveBatchSampler(10, Policy(4), max_micro_batch=0)
    with pytest.raises(TypeError, match="batch_size"):
        AdaptiveBatchSampler(10, object())
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        len(AdaptiveBatchSampler(10, Policy(0)))
    s = AdaptiveBatchSampler(10, 4)
    with pytest.raises(ValueError, match="dataset of 10"):
        AdaptiveBatchSampler(11, 4).load_state_dict(s.state_dict())


# -- distributed (num_replicas > 1) ----------------------------------------------------------


def _old_epoch(n, bs, seed, epoch, drop_last, micro):
    """The single-process plan as it was before ranks existed: consecutive slices of ``bs`` of the
    epoch's permutation, each split by ``split_sizes``."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out = []
    for start in range(0, n, bs):
        size = min(bs, n - start)
        if size < bs and drop_last:
            break
        s = start
        for m in split_sizes(size, micro):
            out.append(perm[s:s + m].tolist())
            s += m
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 200), sizes=st.lists(st.integers(1, 250), min_size=1, max_size=3),
       drop_last=st.booleans(), micro=st.one_of(st.none(), st.integers(1, 32)), seed=st.integers(0, 2**31))
def test_single_process_plan_is_unchanged(n, sizes, drop_last, micro, seed):
    pol = Policy(sizes[0])
    a = AdaptiveBatchSampler(n, pol, seed=seed, drop_last=drop_last, max_micro_batch=micro)
    b = AdaptiveBatchSampler(n, pol, seed=seed, drop_last=drop_last, max_micro_batch=micro, num_replicas=1, rank=0)
    for e, bs in enumerate(sizes):
        pol.batch_size = bs
        want = _old_epoch(n, bs, seed, e, drop_last, micro)
        assert len(a) == len(b) == len(want)
        assert a.global_step_sizes() == a.local_batch_sizes()
        assert list(a) == want
        assert list(b) == want


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), world=st.integers(1, 4), sizes=st.lists(st.integers(1, 250), min_size=1, max_size=3),
       drop_last=st.booleans(), micro=st.one_of(st.none(), st.integers(1, 16)), seed=st.integers(0, 2**31))
def test_ranks_partition_every_epoch(n, world, sizes, drop_last, micro, seed):
    if 0 < n < world:
        with pytest.raises(ValueError, match=f"dataset of {n} samples"):
            AdaptiveBatchSampler(n, Policy(sizes[0]), num_replicas=world, rank=0)
        return
    sizes = [max(bs, world) for bs in sizes]
    pol = Policy(sizes[0])
    ranks = [AdaptiveBatchSampler(n, pol, seed=seed, drop_last=drop_last, max_micro_batch=micro,
                                  num_replicas=world, rank=r) for r in range(world)]
    for e, bs in enumerate(sizes):
        pol.batch_size = bs
        perm = ranks[0].permutation().tolist()
        glob = ranks[0].global_step_sizes()
        assert all(s.num_steps == len(glob) and s.global_step_sizes() == glob for s in ranks)
        assert all(s.batch_size == bs for s in ranks)
        # global steps: full batches, then (without drop_last) a tail of >= world samples or a merged step
        if drop_last:
            assert glob == [bs] * (n // bs)
        else:
            assert sum(glob) == n and all(g == bs for g in glob[:-1])
            if glob:
                assert world <= glob[-1] < bs + world
        plans = [s.plan() for s in ranks]
        local = [s.local_batch_sizes() for s in ranks]
        lens = [len(s) for s in ranks]
        steps = [[[m.tolist() for m in step] for step in s.iter_steps()] for s in ranks]
        assert all(s.epoch == e + 1 for s in ranks)
        off = 0
        for k, g in enumerate(glob):
            shares = [local[r][k] for r in range(world)]
            assert shares == shard_sizes(g, world)                 # larger shares first, sum = g
            assert sum(shares) == g and min(shares) >= 1 and max(shares) - min(shares) <= 1
            got = []
            for r in range(world):
                micro_k = steps[r][k]
                assert [len(m) for m in micro_k] == plans[r][k] == split_sizes(shares[r], micro)
                assert sum(len(m) for m in micro_k) == shares[r]
                if micro is not None:
                    assert all(len(m) <= micro for m in micro_k)
                got += [i for m in micro_k for i in m]
            assert got == perm[off:off + g]                       # contiguous rank slices, rank 0 first
            off += g
        assert all(len(steps[r]) == len(glob) and lens[r] == sum(len(p) for p in plans[r]) for r in range(world))
        flat = [i for r in range(world) for step in steps[r] for m in step for i in m]
        assert len(flat) == len(set(flat))                        # never twice
        if drop_last:
            assert len(flat) == (n // bs) * bs
        else:
            assert sorted(flat) == list(range(n))                 # every index exactly once


def test_shard_sizes():
    assert shard_sizes(10, 4) == [3, 3, 2, 2]
    assert shard_sizes(8, 4) == [2, 2, 2, 2]
    assert shard_sizes(7, 1) == [7]
    assert shard_sizes(5, 3) == [2, 2, 1]
    assert shard_sizes(0, 2) == [0, 0]
    with pytest.raises(ValueError, match="num_replicas must be >= 1, got 0"):
        shard_sizes(4, 0)


@pytest.mark.parametrize("total,world", [(10, 4), (7, 2), (3, 3), (1, 1)])
def test_shard_slices_tile_the_step_in_rank_order(total, world):
    slices = [shard_slice(total, world, r) for r in range(world)]
    assert [s.stop - s.start for s in slices] == shard_sizes(total, world)
    assert [i for s in slices for i in range(total)[s]] == list(range(total))
    with pytest.raises(ValueError, match=f"rank must be in \\[0, {world}\\), got {world}"):
        shard_slice(total, world, world)


def test_short_final_step_is_merged_into_the_previous_one():
    r0 = AdaptiveBatchSampler(9, Policy(4), shuffle=False, num_replicas=2, rank=0)
    r1 = AdaptiveBatchSampler(9, Policy(4), shuffle=False, num_replicas=2, rank=1)
    assert r0.num_steps == r1.num_steps == 2
    assert r0.global_step_sizes() == [4, 5]
    assert r0.local_batch_sizes() == [2, 3] and r1.local_batch_sizes() == [2, 2]
    assert [[m.tolist() for m in st_] for st_ in r0.iter_steps()] == [[[0, 1]], [[4, 5, 6]]]
    assert [[m.tolist() for m in st_] for st_ in r1.iter_steps()] == [[[2, 3]], [[7, 8]]]
    # a tail of at least world size samples stays a step of its own; drop_last drops it
    assert AdaptiveBatchSampler(10, 4, num_replicas=2).global_step_sizes() == [4, 4, 2]
    assert AdaptiveBatchSampler(10, 4, num_replicas=3, rank=2).global_step_sizes() == [4, 6]
    assert AdaptiveBatchSampler(9, 4, num_replicas=2, drop_last=True).global_step_sizes() == [4, 4]
    # single process: never merged
    assert AdaptiveBatchSampler(9, 4).global_step_sizes() == [4, 4, 1]
    # micro-batching of the merged share on rank 0
    r0m = AdaptiveBatchSampler(9, Policy(4), shuffle=False, num_replicas=2, rank=0, max_micro_batch=2)
    assert r0m.plan() == [[2], [2, 1]] and list(r0m) == [[0, 1], [4, 5], [6]]


def test_distributed_bad_arguments():
    with pytest.raises(ValueError, match=r"global batch size \(2\).*num_replicas=3"):
        len(AdaptiveBatchSampler(10, Policy(2), num_replicas=3, rank=1))
    pol = Policy(4)
    s = AdaptiveBatchSampler(10, pol, num_replicas=4, rank=3)
    assert s.global_step_sizes() == [4, 6] and s.local_batch_sizes() == [1, 1]  # tail 2 < 4 ranks: merged
    pol.batch_size = 3
    with pytest.raises(ValueError, match=r"global batch size \(3\).*num_replicas=4"):
        list(s)
    with pytest.raises(ValueError, match="dataset of 3 samples.*num_replicas=4"):
        AdaptiveBatchSampler(3, 4, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="num_replicas must be a positive integer, got 0"):
        AdaptiveBatchSampler(10, 4, num_replicas=0)
    with pytest.raises(ValueError, match="got 2"):
        AdaptiveBatchSampler(10, 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="got -1"):
        AdaptiveBatchSampler(10, 4, num_replicas=2, rank=-1)
    empty = AdaptiveBatchSampler(0, 4, num_replicas=4, rank=2)
    assert len(empty) == 0 and empty.num_steps == 0 and list(empty) == []


def _rest_after_steps(n, bs, seed, epoch, world, rank, micro, steps):
    """This rank's micro-batches of ``epoch`` after its first ``steps`` optimizer steps, uninterrupted."""
    s = AdaptiveBatchSampler(n, Policy(bs), seed=seed, max_micro_batch=micro, num_replicas=world, rank=rank)
    s.set_epoch(epoch)
    return [m.tolist() for step in list(s.iter_steps())[steps:] for m in step]


def _rank0_state_after_steps(n, bs, seed, world, micro, steps):
    """Rank 0 finishes epoch 0, then saves its state after ``steps`` steps of epoch 1."""
    pol = Policy(bs)
    s0 = AdaptiveBatchSampler(n, pol, seed=seed, max_micro_batch=micro, num_replicas=world, rank=0)
    list(s0)
    it = s0.iter_steps()
    for _ in range(steps):
        next(it)
    return s0.state_dict()


@pytest.mark.parametrize("stop", [1, 5, 11])
def test_rank0_state_at_a_step_boundary_resumes_every_rank(stop):
    n, bs, seed = 103, 10, 7          # at world size 2: 10 steps of 10 and a tail of 3 (not merged)
    state = _rank0_state_after_steps(n, bs, seed, 2, 3, stop)
    if stop == 11:  # the last step: the epoch is over and the state is the next one's start
        assert state["step"] == 0 and state["position"] == 0 and state["epoch"] == 2
        return
    assert state["step"] == stop and state["num_replicas"] == 2 and state["epoch"] == 1
    for rank in range(2):
        for micro in (3, 2, None):    # each rank keeps its own memory bound
            r = AdaptiveBatchSampler(n, Policy(999), seed=0, max_micro_batch=micro, num_replicas=2, rank=rank)
            r.load_state_dict(state)
            assert r.batch_size == bs and r.num_steps == 11 and r.max_micro_batch == micro
            assert len(r.plan()) == 11 - stop
            rest = list(r)
            assert rest == _rest_after_steps(n, bs, seed, 1, 2, rank, micro, stop)
            assert r.epoch == 2
    # another world size at the same boundary: the global plan up to there is the same
    if stop < 11:
        r = AdaptiveBatchSampler(n, Policy(999), num_replicas=3, rank=2, max_micro_batch=2)
        r.load_state_dict(state)
        assert list(r) == _rest_after_steps(n, bs, seed, 1, 3, 2, 2, stop)


def test_step_boundary_that_the_tail_merge_removes_raises():
    n, bs, seed = 101, 10, 2          # single process: 10 steps of 10 and a step of 1
    state = _rank0_state_after_steps(n, bs, seed, 1, None, 10)
    assert state["step"] == 10 and state["num_replicas"] == 1
    r = AdaptiveBatchSampler(n, Policy(bs), num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="after step 10 .*does not exist at num_replicas=2"):
        r.load_state_dict(state)
    state5 = _rank0_state_after_steps(n, bs, seed, 1, None, 5)
    r.load_state_dict(state5)         # an earlier boundary is fine: the rest ends with a merged step of 11
    assert r.local_batch_sizes()[-1] == 5 and r.plan() == [[5]] * 4 + [[5]]
    assert list(r) == _rest_after_steps(n, bs, seed, 1, 2, 1, None, 5)


def test_consumed_count_gives_the_step_of_the_consumed_micro_batches():
    n, bs, seed = 60, 8, 4            # world 2, micro 3: each share of 4 is [2, 2]
    s0 = AdaptiveBatchSampler(n, Policy(bs), seed=seed, max_micro_batch=3, num_replicas=2, rank=0)
    it = iter(s0)
    for _ in range(9):                # a loader ran ahead; the loop consumed 6 micro-batches = 3 steps
        next(it)
    assert s0.state_dict()["step"] == 4
    state = s0.state_dict(consumed=6)
    assert state["step"] == 3 and state["position"] == 6
    r1 = AdaptiveBatchSampler(n, Policy(bs), num_replicas=2, rank=1)
    r1.load_state_dict(state)
    assert list(r1) == _rest_after_steps(n, bs, seed, 0, 2, 1, None, 3)
    assert s0.state_dict(consumed=7)["step"] == 3  # inside step 4


def test_mid_step_state_only_resumes_the_rank_and_world_that_saved_it():
    n, bs, seed = 50, 10, 1           # world 2, micro 3: each share of 5 is [3, 2]
    for saver in (0, 1):
        s = AdaptiveBatchSampler(n, Policy(bs), seed=seed, max_micro_batch=3, num_replicas=2, rank=saver)
        it = iter(s)
        head = [next(it) for _ in range(3)]  # step 0 and the first micro-batch of step 1
        state = s.state_dict()
        assert state["step"] == 1 and state["position"] == 3 and state["rank"] == saver
        other = AdaptiveBatchSampler(n, Policy(bs), num_replicas=2, rank=1 - saver, max_micro_batch=3)
        with pytest.raises(ValueError, match="middle of step 1.*checkpoint at step boundaries"):
            other.load_state_dict(state)
        bigger = AdaptiveBatchSampler(n, Policy(bs), num_replicas=3, rank=saver, max_micro_batch=3)
        with pytest.raises(ValueError, match="checkpoint at step boundaries"):
            bigger.load_state_dict(state)
        same = AdaptiveBatchSampler(n, Policy(bs), num_replicas=2, rank=saver, max_micro_batch=None)
        same.load_state_dict(state)   # adopts the saved max_micro_batch to finish the step
        assert same.max_micro_batch == 3
        assert head + list(same) == _rest_after_steps(n, bs, seed, 0, 2, saver, 3, 0)


@pytest.mark.parametrize("stop", [3, 4])
def test_old_state_dicts_without_step_load_as_before(stop):
    s = AdaptiveBatchSampler(40, Policy(6), seed=5, max_micro_batch=4)
    it = iter(s)
    head = [next(it) for _ in range(stop)]   # 2 micro-batches per step: 3 is mid-step, 4 a boundary
    state = s.state_dict()
    assert state["step"] == stop // 2
    old = {k: v for k, v in state.items() if k not in ("step", "num_replicas", "rank")}
    r = AdaptiveBatchSampler(40, Policy(999), seed=0, max_micro_batch=4)
    r.load_state_dict(old)
    assert head + list(r) == _old_epoch(40, 6, 5, 0, False, 4)
    if stop == 3:                     # mid-step position of a single process is not valid for rank 1
        with pytest.raises(ValueError, match="checkpoint at step boundaries"):
            AdaptiveBatchSampler(40, Policy(6), num_replicas=2, rank=1).load_state_dict(old)
    else:
        r1 = AdaptiveBatchSampler(40, Policy(6), num_replicas=2, rank=1)
        r1.load_state_dict(old)
        assert list(r1) == _rest_after_steps(40, 6, 5, 0, 2, 1, None, 2)
