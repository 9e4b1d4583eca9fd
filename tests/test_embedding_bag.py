"""nn.EmbeddingBag: each bag is a sample; its norms against torch.func in every input layout.

The bags' layouts (1-D ids with offsets, ``include_last_offset``, nested) have no batch dim to
``vmap`` over, so the reference is ``torch.func.jacrev`` of the vector of per-bag losses: each
row is one bag's own gradient.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev

from divebatch import GradNormTracker

from .models_zoo import ZOO, sample_loss
from .oracle import autocast_checked, reference_norms, rel_err, same_forward_norms, tracked_and_checked

RTOL = 1e-4
LAYOUTS = ["2d", "offsets", "offsets-last", "nested"]


class Bags(nn.Module):
    """An EmbeddingBag and a head, called on ``(ids, offsets, per_sample_weights)``; ``calls=2``
    pools a second, hashed set of the same bags through the same table."""

    def __init__(self, mode, padding_idx, sparse, calls, vocab=7, dim=3):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode=mode, padding_idx=padding_idx, sparse=sparse,
                                   include_last_offset=False)
        self.head = nn.Linear(dim, 2)
        self.calls, self.vocab = calls, vocab

    def forward(self, ids, offsets=None, weights=None):
        pooled = self.bag(ids, offsets, weights)
        if self.calls == 2:
            pooled = pooled * self.bag((ids * 3 + 1) % self.vocab, offsets, weights)
        return self.head(torch.tanh(pooled))


def make_bags(layout, sizes, vocab, pad_fraction, weighted, generator):
    """``(args for Bags.forward, the module's include_last_offset)``: one bag per entry of ``sizes``."""
    ids = [torch.randint(0, vocab, (n,), generator=generator) for n in sizes]
    ids = [torch.where(torch.rand(n, generator=generator) < pad_fraction, 0, i) for n, i in zip(sizes, ids)]
    weights = [torch.rand(n, generator=generator) + 0.5 for n in sizes] if weighted else None
    if layout == "2d":
        return (torch.stack(ids), None, torch.stack(weights) if weighted else None), False
    if layout == "nested":
        nested = torch.nested.nested_tensor(ids, layout=torch.jagged)
        weights = torch.nested.nested_tensor_from_jagged(torch.cat(weights), nested.offsets()) if weighted else None
        return (nested, None, weights), False
    flat = torch.cat(ids)
    offsets = torch.tensor([0] + list(sizes)).cumsum(0)
    offsets = offsets if layout == "offsets-last" else offsets[:-1]
    return (flat, offsets, torch.cat(weights) if weighted else None), layout == "offsets-last"


def per_bag_reference(model, args, y):
    """``(per-bag squared norms [B], squared norm of their sum)``, float64, from torch.func (on
    dense gradients, and nested bags given as the same ids and offsets, which jacrev takes)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids, offsets, weights = args
    saved = model.bag.sparse, model.bag.include_last_offset
    include_last = model.bag.include_last_offset
    if ids.is_nested:
        ids, offsets, include_last = ids.values(), ids.offsets(), True
        weights = weights.values() if weights is not None else None

    def losses(p):
        return 0.5 * (functional_call(model, p, (ids, offsets, weights)) - y).square().sum(1)

    model.bag.sparse, model.bag.include_last_offset = False, include_last
    try:
        jac = jacrev(losses)(params)  # {name: [B, *shape]}: row b is bag b's gradient
    finally:
        model.bag.sparse, model.bag.include_last_offset = saved
    rows = torch.cat([g.double().reshape(y.shape[0], -1) for g in jac.values()], dim=1)
    return rows.square().sum(1), rows.sum(0).square().sum()


bag_config = st.fixed_dictionaries({
    "mode": st.sampled_from(["sum", "mean", "max"]),
    "layout": st.sampled_from(LAYOUTS),
    "padding_idx": st.sampled_from([None, 0]),
    "weighted": st.booleans(),
    "sparse": st.booleans(),
    "calls": st.sampled_from([1, 2]),
    "sizes": st.lists(st.integers(0, 6), min_size=1, max_size=5),
    "pad_fraction": st.sampled_from([0.0, 0.4]),
    "int32_ids": st.booleans(),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=60, deadline=None)
@given(bag_config)
def test_embedding_bag_norms_match_torch_func(cfg):
    """Every mode, layout, padding, weighting, sparse gradients, empty bags, int32 ids and a table called twice:
    per-bag and batch norms as torch.func's, every gradient accounted for, on the bag route."""
    mode, layout = cfg["mode"], cfg["layout"]
    weighted = cfg["weighted"] and mode == "sum"  # per_sample_weights exist only for sum
    sparse = cfg["sparse"] and mode != "max"
    sizes = cfg["sizes"]
    if layout in ("2d", "nested"):  # rectangular; nested tensors of empty components are not supported
        sizes = [max(1, sizes[0])] * len(sizes) if layout == "2d" else [max(1, n) for n in sizes]
    gen = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = Bags(mode, cfg["padding_idx"], sparse, cfg["calls"])
    args, include_last = make_bags(layout, sizes, model.vocab, cfg["pad_fraction"], weighted, gen)
    if cfg["int32_ids"] and layout != "nested":
        args = tuple(a.int() if a is not None and not a.is_floating_point() else a for a in args)
    model.bag.include_last_offset = include_last
    y = torch.randn(len(sizes), 2, generator=gen)

    with GradNormTracker(model, "sum", verify_every=1) as tracker:
        (0.5 * (model(*args) - y).square().sum()).backward()
        stats = tracker.collect()
        route = {plan.module: plan.route for plan in tracker.plan()}["bag"]
    per_bag, batch = per_bag_reference(model, args, y)
    assert route == "embedding-bag"
    assert rel_err(stats.per_sample, per_bag) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert stats.unaccounted["bag"] <= 1e-5


def test_bag_of_padding_only_has_zero_norm():
    """A bag whose entries are all ``padding_idx`` pools nothing: its table gradient is zero (the
    head's is not), in every mode."""
    for mode in ("sum", "mean", "max"):
        torch.manual_seed(0)
        model = Bags(mode, 0, sparse=False, calls=1)
        ids = torch.tensor([[0, 0, 0], [1, 2, 0], [3, 3, 5]])
        with GradNormTracker(model, "sum") as tracker:
            model(ids).square().sum().backward()
            stats = tracker.collect()
        assert stats.per_layer["bag"][0].item() == 0.0, mode
        assert (stats.per_layer["bag"][1:] > 0).all(), mode


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_table(dtype):
    """A float16/bfloat16 table: float32 norms within the rounding of the low-precision backward."""
    torch.manual_seed(0)
    model = Bags("sum", None, sparse=False, calls=1).to(dtype)
    gen = torch.Generator().manual_seed(1)
    args, _ = make_bags("2d", [5] * 4, model.vocab, 0.0, True, gen)
    args = (args[0], None, args[2].to(dtype))
    y = torch.randn(4, 2, generator=gen)
    with GradNormTracker(model, "sum") as tracker:
        (0.5 * (model(*args).float() - y).square().sum()).backward()
        stats = tracker.collect()
    per_bag, batch = per_bag_reference(model.double(), (args[0], None, args[2].double()), y.double())
    assert stats.per_sample.dtype == torch.float32
    assert rel_err(stats.per_sample, per_bag) <= 3e-2
    assert rel_err(stats.batch_grad_sq, batch) <= 3e-2


def test_large_table_needs_no_per_sample_table():
    """A 10⁶-row table: the bag route's cost follows the bags, not the table (the replayed generic
    route formed each sample's [V, p] gradient, 256 MB here); norms checked for the bags' rows."""
    V, p, B = 1_000_000, 64, 8
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(V, p, mode="sum")
    ids = torch.randint(0, V, (B, 20))
    ids[:, 1] = ids[:, 0]  # repeated rows in a bag add up before the norm
    g = torch.randn(B, p)
    with GradNormTracker(bag, "sum") as tracker:
        (bag(ids) * g).sum().backward()
        stats = tracker.collect()
        plan = tracker.plan()[0]
    counts = torch.stack([torch.bincount(row, minlength=V).double() for row in ids])  # c_b: [B, V]
    expected = counts.square().sum(1) * g.double().square().sum(1)
    assert plan.route == "embedding-bag" and plan.extra_bytes < V * p
    assert rel_err(stats.per_sample, expected) <= RTOL
    assert rel_err(stats.batch_grad_sq, (counts.T @ g.double()).square().sum()) <= RTOL


def test_scale_grad_by_freq_is_refused():
    bag = nn.EmbeddingBag(5, 3, scale_grad_by_freq=True)
    with GradNormTracker(bag, "sum"):
        with pytest.raises(ValueError, match="scale_grad_by_freq"):
            bag(torch.tensor([[1, 2], [3, 4]]))


def test_offsets_without_ids_layout_is_refused():
    """1-D ids without offsets have no bags; F.embedding_bag itself refuses them, before the rule."""
    bag = nn.EmbeddingBag(5, 3)
    with GradNormTracker(bag, "sum"):
        with pytest.raises(ValueError, match="offsets"):
            bag(torch.tensor([1, 2, 3]))


def test_ids_with_offsets_as_the_model_input_count_bags_as_samples():
    """The model's first input is 1-D ids: its samples are the bags (one id in two bags here, whose
    ids' dim 0 of 1 would otherwise read as a batch of one sample with two rows at the head)."""
    torch.manual_seed(0)
    model = Bags("sum", None, sparse=False, calls=1)
    args = (torch.tensor([4]), torch.tensor([0, 0]), None)  # bag 0 empty, bag 1 = [4]
    y = torch.randn(2, 2)
    with GradNormTracker(model, "sum") as tracker:
        (0.5 * (model(*args) - y).square().sum()).backward()
        stats = tracker.collect()
    per_bag, batch = per_bag_reference(model, args, y)
    assert stats.per_sample.shape == (2,)
    assert rel_err(stats.per_sample, per_bag) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


def test_compiled_model_with_bags():
    """Under torch.compile each bag call is a graph break whose hooks see real tensors: exact."""
    model, x, y = ZOO["embedding_bags"]()
    routes = tracked_and_checked(model, sample_loss, x, y, forward=torch.compile(model, backend="aot_eager"))
    assert routes["mean_bag"] == routes["max_bag"] == "embedding-bag"


def test_bags_under_cpu_autocast():
    """Bags pooled under CPU autocast to bfloat16: within its rounding of each bag's own backward."""
    model, x, y = ZOO["embedding_bags"]()
    autocast_checked(model, sample_loss, x, y)


def test_bags_of_features_run_without_a_torch_function_mode():
    """``[B, features, L]`` ids into EmbeddingBags only: the multiple-choice ids follower (a
    torch-function mode on every op, for Embedding lookups of merged rows) stays out of the forward."""
    seen = []

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = nn.ModuleList(nn.EmbeddingBag(9, 3) for _ in range(2))

        def forward(self, ids):
            seen.append(torch._C._len_torch_function_stack())
            return torch.cat([table(ids[:, f]) for f, table in enumerate(self.tables)], dim=1)

    model = Features()
    ids = torch.randint(0, 9, (4, 2, 5))
    with GradNormTracker(model, "sum") as tracker:
        model(ids).square().sum().backward()
        stats = tracker.collect()
    assert seen == [0]
    per_bag, _, _ = reference_norms(model, lambda out, y: out.square().sum(), ids, torch.zeros(4))
    assert rel_err(stats.per_sample, per_bag) <= RTOL


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_max_norm_table(mode):
    """``max_norm`` renormalises looked-up rows in place in the forward (not differentiated): the norms
    are each bag's own backward over that forward (torch.func's vmap cannot run the in-place renorm)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(12, 4, mode=mode, max_norm=0.5), nn.Linear(4, 2))
    ids = torch.randint(0, 12, (5, 6))
    y = torch.randn(5, 2)
    with GradNormTracker(model, "sum") as tracker:
        sample_loss(model(ids), y).backward()
        stats = tracker.collect()
    expected = same_forward_norms(model, sample_loss, ids, y, seed=0)
    assert rel_err(stats.per_sample, expected) <= RTOL
    assert stats.unaccounted["0"] <= 1e-5
