"""AdaptiveBatchSampler: coverage, micro-batching, determinism, exact mid-epoch resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from divebatch.sampler import AdaptiveBatchSampler, split_sizes


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
