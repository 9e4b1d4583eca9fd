"""Outputs shared by all samples: a position table looked up with ``[1, T]`` ids (GPT-2's and
BART's default) or a relative-position bias looked up with ``[q, k]`` buckets (T5's), whose output
is broadcast over the batch later. Autograd sums the samples' parts before the module's own output
grad; the tracker follows the output to the broadcasting ops and takes per-sample grads there,
only where they account for the whole output grad. Exact against torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker

from .oracle import (assert_refused, reference_norms, rel_err, same_forward_norms, second_backward_stats,
                     tracked_and_checked)


def token_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="sum")


class SharedPositions(nn.Module):
    """Token embedding plus a ``[1, T]`` position lookup (called first, before any batched call);
    ``extra_use`` adds a use the tracker cannot split per sample (a sum of the positions)."""

    def __init__(self, extra_use=False, vocab=11, dim=4):
        super().__init__()
        self.positions, self.tokens = nn.Embedding(6, dim), nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.extra_use = extra_use

    def forward(self, idx):
        positions = self.positions(torch.arange(idx.shape[1], device=idx.device)[None])
        h = self.tokens(idx)
        h += positions.to(h.dtype)  # in place, through a dtype alias
        if self.extra_use:
            h = h + positions.sum()
        return self.head(torch.tanh(h))


class RelativeBias(nn.Module):
    """T5's pattern: a bias table looked up with ``[q, k]`` buckets, permuted to ``[1, H, q, k]``,
    masked by ``torch.where`` with a one-sample causal mask, and used as the additive attention
    mask of ``F.scaled_dot_product_attention`` in two layers. ``padding``: token 0 is padding, and
    each sample's ``[B, 1, 1, k]`` key mask selects the bias (``where``: transformers' SDPA path
    for T5 under an attention mask, ``torch.where(mask, bias, min)``; ``where-method``:
    ``bias.where(mask, min)``; ``masked_fill``: ``bias.masked_fill(~mask, min)``), broadcasting it
    over the samples before the attention."""

    def __init__(self, vocab=11, dim=8, heads=2, buckets=5, padding=None):
        super().__init__()
        self.heads, self.buckets, self.padding = heads, buckets, padding
        self.tokens = nn.Embedding(vocab, dim)
        self.bias = nn.Embedding(buckets, heads)
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(2)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        B, T = idx.shape
        h = self.tokens(idx)
        position = torch.arange(T, device=idx.device)
        buckets = (position[:, None] - position[None, :]).clamp(0, self.buckets - 1)  # [q, k]: distance back
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[None, None]
        bias = torch.where(causal, self.bias(buckets).permute(2, 0, 1).unsqueeze(0), -1e4)
        keep = (idx != 0)[:, None, None, :]  # [B, 1, 1, k]
        if self.padding == "where":
            bias = torch.where(keep, bias, -1e4)
        elif self.padding == "where-method":
            bias = bias.where(keep, -1e4)
        elif self.padding == "masked_fill":
            bias = bias.masked_fill(~keep, -1e4)
        for qkv in self.qkv:
            q, k, v = qkv(h).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            h = h + attended.transpose(1, 2).reshape(B, T, -1)
        return self.head(h)


class ProjectedPositions(nn.Module):
    """A Conformer's and DeBERTa's pattern: a position table looked up with ``[1, T]`` ids, projected
    by a Linear on that shared ``[1, T, d]`` input (``shared_proj``: the same Linear as the keys, also
    called on the samples, as DeBERTa's ``share_att_key``), split into heads, scaled in place, and
    met by the ``[B, H, T, dh]`` queries either by a broadcasting ``matmul`` or, repeated to
    ``[B*H, T, dh]``, by ``bmm``."""

    def __init__(self, mode, shared_proj=False, vocab=11, dim=8, heads=2):
        super().__init__()
        self.mode, self.shared_proj, self.heads = mode, shared_proj, heads
        self.tokens, self.table = nn.Embedding(vocab, dim), nn.Embedding(6, dim)
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.pos_proj = self.key if shared_proj else nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        B, T = idx.shape
        H, dh = self.heads, self.tokens.embedding_dim // self.heads
        h = self.tokens(idx)
        pos = self.pos_proj(self.table(torch.arange(T, device=idx.device)[None]))  # [1, T, d]
        pos = pos.view(1, T, H, dh).transpose(1, 2)  # [1, H, T, dh]
        pos /= dh ** 0.5
        q = self.query(h).view(B, T, H, dh).transpose(1, 2)
        k = self.key(h).view(B, T, H, dh).transpose(1, 2)
        if self.mode == "matmul":
            scores = q @ (k + pos).transpose(-1, -2)  # (k + pos: a broadcast use too)
            scores = scores + q @ pos.transpose(-1, -2)
        else:
            pos = pos.reshape(H, T, dh).repeat(B, 1, 1)  # copy b for sample b
            scores = q @ k.transpose(-1, -2) + torch.bmm(q.reshape(B * H, T, dh), pos.transpose(1, 2)).view(B, H, T, T)
        out = (scores.softmax(-1) @ k).transpose(1, 2).reshape(B, T, -1)
        return self.head(torch.tanh(h + out))


def tracked_twice(model, tokens, targets, fused):
    """The stats and routes of the second of two tracked steps (it starts from the first one's
    state); no torch-function mode may be left after them."""
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        for _ in range(2):
            token_loss(model(tokens), targets).backward()
            stats = tracker.collect()
            model.zero_grad()
        assert torch._C._len_torch_function_stack() == 0
        return stats, {plan.module: plan.route for plan in tracker.plan()}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("make, table", [
    (SharedPositions, "positions"), (RelativeBias, "bias"),
    (lambda: ProjectedPositions("matmul"), "pos_proj"), (lambda: ProjectedPositions("repeat"), "pos_proj"),
    (lambda: ProjectedPositions("matmul", shared_proj=True), "key"),
    (lambda: ProjectedPositions("repeat", shared_proj=True), "key"),
    (lambda: RelativeBias(padding="where"), "bias"), (lambda: RelativeBias(padding="where-method"), "bias"),
    (lambda: RelativeBias(padding="masked_fill"), "bias"),
], ids=["positions", "relative-bias", "projected-matmul", "projected-repeat", "shared-key-matmul", "shared-key-repeat",
        "padded-where", "padded-where-method", "padded-masked-fill"])
def test_shared_outputs_match_torch_func(make, table, fused):
    torch.manual_seed(0)
    model = make()
    tokens, targets = torch.randint(1, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    tokens[1, 3:] = tokens[2, 2:] = 0  # padded tails (token 0) where a model masks them
    stats, _ = tracked_twice(model, tokens, targets, fused)
    per_sample, per_param, batch = reference_norms(model, token_loss, tokens, targets)
    own = sum(v for name, v in per_param.items() if name.startswith(f"{table}."))
    assert rel_err(stats.per_layer[table], own) <= 1e-5
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


class NormalisedTable(nn.Module):
    """DeBERTa's relative attention (v2/v3 with ``norm_rel_ebd="layer_norm"``): the position table's
    weight is read whole (its Embedding is never called), normalised by a LayerNorm on that
    ``[2k, d]`` tensor, cut to the span, and projected by the key Linear (``share_att_key``: also
    called on the samples) on a ``[1, 2k', d]`` view, repeated to meet the ``[B*H, T, dh]`` queries
    by ``bmm``. ``unbatched``: the Linear gets the ``[2k', d]`` table itself (DeBERTa v1's
    ``pos_proj``), and the heads are met by a broadcasting ``matmul``. ``dropout``: the normalised
    table is dropped out (one mask for all samples, as DeBERTa's ``pos_dropout``)."""

    def __init__(self, unbatched=False, dropout=0.0, vocab=11, dim=8, heads=2, span=3):
        super().__init__()
        self.unbatched, self.heads, self.span = unbatched, heads, span
        self.drop = nn.Dropout(dropout)
        self.tokens, self.table = nn.Embedding(vocab, dim), nn.Embedding(2 * span + 2, dim)
        self.table_norm = nn.LayerNorm(dim)
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        B, T = idx.shape
        H, dh = self.heads, self.tokens.embedding_dim // self.heads
        h = self.tokens(idx)
        rel = self.drop(self.table_norm(self.table.weight))[: 2 * self.span]  # [2k', d], shared by the samples
        q = self.query(h).view(B, T, H, dh).transpose(1, 2)
        k = self.key(h).view(B, T, H, dh).transpose(1, 2)
        if self.unbatched:
            pos = self.key(rel).view(2 * self.span, H, dh).transpose(0, 1).unsqueeze(0)  # [1, H, 2k', dh]
            rel_scores = q @ pos.transpose(-1, -2)  # [B, H, T, 2k']
        else:
            pos = self.key(rel.unsqueeze(0)).view(1, 2 * self.span, H, dh).transpose(1, 2)
            pos = pos.reshape(H, 2 * self.span, dh).repeat(B, 1, 1)  # copy b for sample b
            rel_scores = torch.bmm(q.reshape(B * H, T, dh), pos.transpose(1, 2)).view(B, H, T, -1)
        scores = q @ k.transpose(-1, -2) + rel_scores[..., :T] / dh ** 0.5
        out = (scores.softmax(-1) @ k).transpose(1, 2).reshape(B, T, -1)
        return self.head(torch.tanh(h + out))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["repeat", "unbatched-matmul"])
@pytest.mark.parametrize("batch", [3, 1])
def test_a_table_read_whole_and_normalised_matches_torch_func(unbatched, fused, batch):
    torch.manual_seed(0)
    model = NormalisedTable(unbatched)
    tokens, targets = torch.randint(0, 11, (batch, 3)), torch.randint(0, 11, (batch, 3))
    stats, routes = tracked_twice(model, tokens, targets, fused)
    per_sample, per_param, batch_sq = reference_norms(model, token_loss, tokens, targets)
    for layer in ("table", "table_norm", "key"):
        own = sum(v for name, v in per_param.items() if name.startswith(f"{layer}."))
        assert rel_err(stats.per_layer[layer], own) <= 1e-5, layer
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch_sq) <= 1e-5
    assert routes["table"] == "embedding" and "generic" not in routes["table_norm"]


@pytest.mark.parametrize("unbatched", [False, True], ids=["repeat", "unbatched-matmul"])
def test_a_dropped_out_table_keeps_this_forwards_mask(unbatched):
    torch.manual_seed(0)
    model = NormalisedTable(unbatched, dropout=0.4)
    tokens, targets = torch.randint(0, 11, (3, 3)), torch.randint(0, 11, (3, 3))
    with GradNormTracker(model, "sum") as tracker:
        torch.manual_seed(5)
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    reference = same_forward_norms(model, token_loss, tokens, targets, 5)
    assert rel_err(stats.per_sample, reference) <= 1e-5


def test_a_dropped_out_table_with_a_zero_entry_is_refused():
    """A zero entry's mask cannot be read off the output (0 either way): not guessed."""
    torch.manual_seed(0)
    model = NormalisedTable(dropout=0.4)
    with torch.no_grad():
        model.table_norm.weight[0] = 0.0  # column 0 of the normalised table is exactly 0
    tokens, targets = torch.randint(0, 11, (3, 3)), torch.randint(0, 11, (3, 3))
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(ValueError, match=r"table.* saw a batch of 1 samples but other layers .* saw 3.*"
                                             r"dropout of it kept or dropped entries of 0"):
            token_loss(model(tokens), targets).backward()
            tracker.collect()


class LookedUpAndReadWhole(nn.Module):
    """One table both looked up per token and read whole (normalised, projected, met by the
    lookups): the two calls' per-sample gradients of the table are summed before squaring."""

    def __init__(self, vocab=7, dim=6):
        super().__init__()
        self.table, self.norm, self.key = nn.Embedding(vocab, dim), nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.head = nn.Linear(vocab, 2)

    def forward(self, idx):
        h = self.table(idx)
        pos = self.key(self.norm(self.table.weight).unsqueeze(0)).repeat(idx.shape[0], 1, 1)
        return self.head(torch.tanh(torch.bmm(h, pos.transpose(1, 2))))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_a_table_looked_up_and_read_whole_matches_torch_func(fused):
    torch.manual_seed(0)
    model = LookedUpAndReadWhole()
    idx, y = torch.randint(0, 7, (3, 5)), torch.randn(3, 5, 2)
    loss = lambda out, target: ((out - target) ** 2).sum()  # noqa: E731
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss(model(idx), y).backward()
        stats = tracker.collect()
    per_sample, per_param, batch = reference_norms(model, loss, idx, y)
    assert rel_err(stats.per_layer["table"], per_param["table.weight"]) <= 1e-5
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


def test_a_use_that_cannot_be_split_is_refused_with_the_hint():
    torch.manual_seed(0)
    model = SharedPositions(extra_use=True)
    tokens, targets = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(ValueError, match=r"positions.*batch of 1 .*position_ids=torch\.arange\(T\)\.expand\(B, T\)"):
            token_loss(model(tokens), targets).backward()
        # The refused backward's record and waiting calls are dropped: the next step stands alone.
        model.extra_use = False
        model.zero_grad()
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    assert stats.backwards == 1
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


class EinsumWithTable(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.layer = nn.Linear(dim, dim)

    def forward(self, x, rel):
        return torch.einsum("btd,kd->btk", self.layer(x), rel)


class TableInEinsum(nn.Module):
    """A table's weight handed to a layer that multiplies by it through ``einsum``, which the
    watcher does not split per sample."""

    def __init__(self, dim=6, positions=4):
        super().__init__()
        self.table, self.inner, self.head = nn.Embedding(positions, dim), EinsumWithTable(dim), nn.Linear(positions, 2)

    def forward(self, x):
        return self.head(self.inner(x, self.table.weight))


def test_a_table_read_whole_in_an_op_that_cannot_be_split_is_refused_naming_the_op():
    """Refused naming the op; the refused backward leaves nothing behind, so the next one (one
    sample: exact) is tracked on its own."""
    torch.manual_seed(0)
    model, x = TableInEinsum(), torch.randn(3, 5, 6)
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(ValueError, match=r"'table'.* batch of 1 .*weight is read whole.*met `einsum`"):
            model(x).square().sum().backward()
            tracker.collect()
        model.zero_grad()
        model(x[:1]).square().sum().backward()  # one sample: its whole gradient is that sample's
        stats = tracker.collect()
    per_sample, _, _ = reference_norms(model, lambda out, y: out.square().sum(), x[:1], torch.zeros(1))
    assert rel_err(stats.per_sample, per_sample) <= 1e-5


class GainedRoot(nn.Module):
    """A module with a parameter of its own (the generic route, whose recorder is a torch-function
    mode entered for its forward) that looks positions up with [1, T] ids inside that forward: the
    watcher entered there must outlive the recorder, and both must be gone after the backward."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(11, 4), nn.Embedding(6, 4)
        self.gain = nn.Parameter(torch.rand(4) + 0.5)
        self.head = nn.Linear(4, 11)

    def forward(self, idx):
        h = self.tokens(idx) * self.gain + self.positions(torch.arange(idx.shape[1], device=idx.device)[None])
        return self.head(torch.tanh(h))


def test_a_watcher_inside_a_generic_module_outlives_its_recorder():
    torch.manual_seed(0)
    model = GainedRoot()
    tokens, targets = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    depth = torch._C._len_torch_function_stack()
    with GradNormTracker(model, "sum") as tracker:
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
        assert torch._C._len_torch_function_stack() == depth
    per_sample, _, _ = reference_norms(model, token_loss, tokens, targets)
    assert routes[""] == "generic (broadcast uses)" and routes["positions"] == "embedding"
    assert rel_err(stats.per_sample, per_sample) <= 1e-5


def test_watchers_end_with_the_tracked_model_forward():
    """A torch-function mode the caller enters around the model call finds itself on top when it
    leaves: the watchers are gone when the tracked model's forward returns."""
    from torch.overrides import TorchFunctionMode

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = SharedPositions()
    tokens, targets = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    with GradNormTracker(model, "sum") as tracker:
        mode = Passthrough()
        with mode:
            out = model(tokens)
            assert torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) is mode
        token_loss(out, targets).backward()
        stats = tracker.collect()
    per_sample, _, _ = reference_norms(model, token_loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5


class ProjectedConstantPositions(nn.Module):
    """A Conformer's pattern without an Embedding in front: the first tracked layers are Linears on
    the samples (fused), then a Linear projects a constant ``[1, T, d]`` position table shared by
    the samples, and the projection is added to every sample."""

    def __init__(self, dim=6, T=5):
        super().__init__()
        self.inp, self.pos_proj, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.register_buffer("positions", torch.randn(1, T, dim))

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x) + self.pos_proj(self.positions)))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_a_shared_input_after_fused_layers_is_known_shared(fused):
    """The fused layers before it keep the batch size the tracker compares a ``[1, T, d]`` input
    with (it was left 0, so the projection was fused as a batch of 1 and refused)."""
    torch.manual_seed(0)
    _check_shared_projection(ProjectedConstantPositions(), torch.randn(3, 5, 6), torch.randn(3, 5, 3), "pos_proj", fused)


def _check_shared_projection(model, x, y, layer: str, fused: bool) -> None:
    """Per-sample, per-layer (``layer``, the one given the shared input) and batch norms against torch.func."""
    loss = lambda out, target: (out - target).square().sum()  # noqa: E731
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss(model(x), y).backward()
        stats = tracker.collect()
    per_sample, per_param, batch = reference_norms(model, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.per_layer[layer], per_param[f"{layer}.weight"] + per_param[f"{layer}.bias"]) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


class ProjectedPositionGrid(nn.Module):
    """XCiT's positional encoding: a convolution projects a constant ``[1, C, H, W]`` grid (no batch
    dim), and the projection meets the images repeated (``repeat(B, 1, 1, 1)``) or broadcast."""

    def __init__(self, repeat: bool, channels=4, side=4):
        super().__init__()
        self.repeat = repeat
        self.stem, self.project, self.head = nn.Conv2d(3, channels, 3, padding=1), nn.Conv2d(6, channels, 1), nn.Linear(
            channels * side * side, 2)
        self.register_buffer("grid", torch.randn(1, 6, side, side))

    def forward(self, x):
        positions = self.project(self.grid)
        if self.repeat:
            positions = positions.repeat(x.shape[0], 1, 1, 1)
        return self.head(torch.tanh(self.stem(x) + positions).flatten(1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("repeat", [True, False], ids=["repeated", "broadcast"])
def test_convolution_of_a_constant_grid(repeat, fused):
    """A convolution's input shared by the samples: each sample's part of its output grad, with the
    grid as every sample's input (it was refused as a batch of 1)."""
    torch.manual_seed(0)
    _check_shared_projection(ProjectedPositionGrid(repeat), torch.randn(3, 3, 4, 4), torch.randn(3, 2), "project", fused)


class RepeatedPerChoice(nn.Module):
    """DeBERTa-v2's pattern in a multiple-choice layout: a position table shared by the samples,
    projected, repeated once per merged row (``repeat(B*C, 1, 1)``) and multiplied row by row with
    the choices' rows (``bmm``). ``added``: the copies added to the rows instead, a use the watcher
    cannot give samples to."""

    def __init__(self, added=False, vocab=11, dim=5, T=5):
        super().__init__()
        self.added = added
        self.embed, self.table, self.proj = nn.Embedding(vocab, dim), nn.Embedding(T, dim), nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1)

    def forward(self, ids):
        B, C, T = ids.shape
        rows = self.embed(ids.view(B * C, T))
        copies = self.proj(self.table(torch.arange(T)[None])).repeat(B * C, 1, 1)
        mixed = rows + copies if self.added else torch.bmm(rows, copies.transpose(-1, -2))
        return self.score(torch.tanh(mixed).mean(1)).view(B, C)


def _choice_loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_copies_repeated_per_merged_row_get_their_rows_samples(fused):
    torch.manual_seed(0)
    model, ids, y = RepeatedPerChoice(), torch.randint(0, 11, (3, 4, 5)), torch.tensor([0, 3, 1])
    routes = tracked_and_checked(model, _choice_loss, ids, y, fused, rtol=1e-5)  # (3 norms, one per question)
    assert routes["table"] == "embedding"


def test_copies_used_other_than_in_a_product_are_refused():
    assert_refused(RepeatedPerChoice(added=True), _choice_loss, torch.randint(0, 11, (3, 4, 5)), torch.tensor([0, 3, 1]),
                   r"'(proj|table)' \((Linear|Embedding)\) saw a batch of 1 samples")


class DroppedOutPositions(nn.Module):
    """Dropout on a ``[1, T]`` position lookup before it is added to the samples (one mask for all)."""

    def __init__(self, vocab=11, dim=4):
        super().__init__()
        self.tokens, self.positions, self.head = nn.Embedding(vocab, dim), nn.Embedding(6, dim), nn.Linear(dim, vocab)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True))

    def forward(self, idx):
        positions = F.dropout(self.positions(torch.arange(idx.shape[1])[None]), 0.5, self.training)
        return self.head(torch.tanh(self.tokens(idx) + self.mlp(positions)))


def test_a_shared_output_dropped_out_and_through_an_in_place_relu_matches_the_same_forward():
    """The dropout's mask is this forward's (not a new draw in the vjp, which made the parts not add
    up and the table refused), and ``F.relu(x, inplace=True)`` is replayed out of place (it raised
    in the backward)."""
    torch.manual_seed(0)
    model = DroppedOutPositions().train()
    tokens, targets = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    with GradNormTracker(model, "sum") as tracker:
        torch.manual_seed(4)
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    assert rel_err(stats.per_sample, same_forward_norms(model, token_loss, tokens, targets, 4)) <= 1e-5


class PositionsOnRawFeatures(nn.Module):
    """A position table looked up with ``[1, T]`` ids, added to the model's input features (data
    that needs no gradient) before any other tracked layer: the first call the tracker sees."""

    def __init__(self, dim=4, T=5):
        super().__init__()
        self.positions, self.head = nn.Embedding(T, dim), nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(torch.tanh(x + self.positions(torch.arange(x.shape[1])[None])))


def test_a_shared_output_added_to_raw_input_features_first_matches_torch_func():
    torch.manual_seed(0)
    model, x, y = PositionsOnRawFeatures(), torch.randn(3, 5, 4), torch.randn(3, 5, 3)
    loss = lambda out, target: (out - target).square().sum()  # noqa: E731
    with GradNormTracker(model, "sum") as tracker:
        for _ in range(2):  # the first step has no batch size yet when the positions are looked up
            model.zero_grad()
            loss(model(x), y).backward()
            stats = tracker.collect()
            per_sample, _, batch = reference_norms(model, loss, x, y)
            assert rel_err(stats.per_sample, per_sample) <= 1e-5
            assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


@pytest.mark.parametrize("make, data", [
    (lambda: RelativeBias(padding="where"), lambda B: (torch.randint(0, 11, (B, 5)), torch.randint(0, 11, (B, 5)))),
    (PositionsOnRawFeatures, lambda B: (torch.randn(B, 5, 4), torch.randn(B, 5, 3))),
], ids=["relative-bias", "raw-features"])
def test_batch_sizes_that_change_between_steps(make, data):
    """An epoch's smaller last batch, and a batch of 1 (whose rows are all its own): each step is
    judged by its own input's batch, not the previous step's."""
    torch.manual_seed(0)
    model = make()
    loss = token_loss if isinstance(model, RelativeBias) else (lambda out, target: (out - target).square().sum())
    with GradNormTracker(model, "sum") as tracker:
        for B in (3, 2, 1, 3):
            x, y = data(B)
            model.zero_grad()
            loss(model(x), y).backward()
            stats = tracker.collect()
            assert rel_err(stats.per_sample, reference_norms(model, loss, x, y)[0]) <= 1e-5, B


class Prototypes(nn.Module):
    """A prototype network: class embeddings ``[K, d]`` (a parameter, or a buffer of fixed class
    descriptions) go through the same projection and LayerNorm as the samples, and each sample is
    scored against every class. The layers' calls on the classes have K rows that are no samples:
    read as samples, K equal to the batch gave wrong norms with no error (232% off); K otherwise
    was refused. They are now shared calls, split per sample where the scores meet the samples."""

    def __init__(self, classes: int, buffer: bool, score: str, leading_one: bool = False):
        super().__init__()
        self.proj, self.norm = nn.Linear(4, 6), nn.LayerNorm(6)
        table = torch.randn(1, classes, 4) if leading_one else torch.randn(classes, 4)
        if buffer:
            self.register_buffer("classes", table)
        else:
            self.classes = nn.Parameter(table)
        self.score = score

    def forward(self, x):
        features = self.norm(self.proj(x))
        classes = self.norm(self.proj(self.classes))
        if classes.dim() == 3:  # ([1, K, d]: a LayerNorm's call shared the same way)
            classes = classes[0]
        if self.score == "F.linear":
            return F.linear(features, classes)
        return features @ (classes.T if self.score == ".T" else classes.t())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("score", [".T", ".t()", "F.linear"])
@pytest.mark.parametrize("buffer", [False, True], ids=["parameter", "buffer"])
@pytest.mark.parametrize("classes", [3, 5, (1, 3)], ids=["K != B", "K == B", "[1, K, d]"])
def test_class_embeddings_through_the_samples_layers(classes, buffer, score, fused):
    torch.manual_seed(0)
    leading_one = isinstance(classes, tuple)
    classes = classes[1] if leading_one else classes
    model = Prototypes(classes, buffer, score, leading_one)
    x, y = torch.randn(5, 4), torch.randint(0, classes, (5,))

    def loss(out, target):
        return F.cross_entropy(out, target, reduction="sum")

    stats = second_backward_stats(model, loss, model, x, y, fused=fused)
    per_sample, _, batch = reference_norms(model, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) < 1e-5
    assert rel_err(stats.batch_grad_sq, batch) < 1e-5


class NanoGPTPositions(nn.Module):
    """nanoGPT's embeddings: ``wte(idx) + wpe(arange(T))``, the positions looked up with 1-D ids
    and their ``[T, d]`` output broadcast over the ``[B, T, d]`` tokens (no leading dim of 1);
    ``mul``: a gain of that shape instead (``h * (1 + wpe(pos))``); ``in_place``: ``h += ...``."""

    def __init__(self, how="add", vocab=11, dim=4):
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(vocab, dim), nn.Embedding(8, dim), nn.Linear(dim, vocab)
        self.how = how

    def forward(self, idx):
        pos = torch.arange(0, idx.shape[1], dtype=torch.long)  # shape (t)
        tok, pos = self.wte(idx), self.wpe(pos)
        if self.how == "add":
            h = tok + pos
        elif self.how == "in place":
            h = tok
            h += pos
        else:
            h = tok * (1 + pos)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("how", ["add", "in place", "mul"])
@pytest.mark.parametrize("T", [5, 3], ids=["T!=B", "T==B"])
def test_positions_looked_up_without_a_batch_dim_match_torch_func(T, how, fused):
    """Refused where T != B (a batch of T) and 1.5% off with no error where T == B (each position
    row taken for a sample's) before; the broadcast from fewer dims is now split per sample."""
    torch.manual_seed(0)
    model = NanoGPTPositions(how)
    tokens, targets = torch.randint(1, 11, (3, T)), torch.randint(0, 11, (3, T))
    stats, _ = tracked_twice(model, tokens, targets, fused)
    per_sample, per_param, batch = reference_norms(model, token_loss, tokens, targets)
    own = sum(v for name, v in per_param.items() if name.startswith("wpe."))
    assert rel_err(stats.per_layer["wpe"], own) <= 1e-5
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


class ComputedLabels(nn.Module):
    """A class embedding of labels computed in the forward (not the model's input): looked up with
    1-D ids of the batch's size and used as each sample's row, which the watcher gives up on."""

    def __init__(self, classes=4, dim=4):
        super().__init__()
        self.inp, self.labels, self.head = nn.Linear(3, dim), nn.Embedding(classes + 1, dim), nn.Linear(dim, 3)

    def forward(self, batch):
        x, y = batch[:, :3], batch[:, 3].long()
        y = torch.where(y > 2, torch.full_like(y, 4), y)  # (a dropped label's "null" class, as DiT's)
        return self.head(torch.tanh(self.inp(x) + self.labels(y)))


def test_a_lookup_of_computed_per_sample_ids_stays_per_sample():
    torch.manual_seed(0)
    model = ComputedLabels()
    x = torch.cat([torch.randn(4, 3), torch.tensor([[0.0], [3.0], [1.0], [0.0]])], 1)
    y = torch.randint(0, 3, (4,))
    loss = lambda out, target: F.cross_entropy(out, target, reduction="sum")  # noqa: E731
    stats = second_backward_stats(model, loss, model, x, y)
    assert rel_err(stats.per_sample, reference_norms(model, loss, x, y)[0]) <= 1e-5


class ExpandedShared(nn.Module):
    """XLM's positions, ``positions(arange(T)[None]).expand_as(h)`` added to the tokens, and MPNet's
    relative bias: ``[T, T]`` buckets looked up, permuted to ``[1, H, T, T]`` and
    ``expand((B, -1, T, T))`` before meeting the attention scores."""

    def __init__(self, vocab=11, dim=4, heads=2):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(8, dim)
        self.bias, self.head, self.heads = nn.Embedding(16, heads), nn.Linear(dim, vocab), heads

    def forward(self, idx):
        B, T = idx.shape
        h = self.tokens(idx)
        h = h + self.positions(torch.arange(T)[None]).expand_as(h)
        buckets = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).clamp(-7, 8) + 7
        bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0).expand((B, -1, T, T))
        q = h.view(B, T, self.heads, -1).transpose(1, 2)
        scores = torch.softmax(q @ q.transpose(-1, -2) + bias, -1)
        return self.head((scores @ q).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [5, 3], ids=["T!=B", "T==B"])
def test_shared_outputs_expanded_over_the_batch_match_torch_func(T, fused):
    """``expand``/``expand_as`` of a shared output over the samples was a use the watcher could not
    split: refused (XLM and MPNet, sentence-transformers' all-mpnet-base-v2)."""
    torch.manual_seed(0)
    model = ExpandedShared()
    tokens, targets = torch.randint(1, 11, (3, T)), torch.randint(0, 11, (3, T))
    stats, _ = tracked_twice(model, tokens, targets, fused)
    per_sample, per_param, batch = reference_norms(model, token_loss, tokens, targets)
    for table in ("positions", "bias"):
        own = sum(v for name, v in per_param.items() if name.startswith(f"{table}."))
        assert rel_err(stats.per_layer[table], own) <= 1e-5, table
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


class OwnPositionLookup(nn.Embedding):
    """Blenderbot's learned positions: an Embedding subclass whose own forward is handed the input's
    shape and 1-D positions ``arange(T)``, its ``[T, d]`` output added to the ``[B, T, d]`` tokens."""

    def forward(self, shape, positions=None):
        positions = torch.arange(shape[1]) if positions is None else positions
        return super().forward(positions)


class OwnPositions(nn.Module):
    def __init__(self, vocab=11, dim=4):
        super().__init__()
        self.tokens, self.positions, self.head = nn.Embedding(vocab, dim), OwnPositionLookup(8, dim), nn.Linear(dim, vocab)

    def forward(self, idx, positions=None):
        positions = torch.arange(idx.shape[1]) if positions is None else positions  # (as Blenderbot's decoder)
        return self.head(torch.tanh(self.tokens(idx) + self.positions(idx.shape, positions)))


@pytest.mark.parametrize("T", [5, 3], ids=["T!=B", "T==B"])
def test_an_embedding_subclass_looking_up_its_own_positions_is_refused(T):
    """Where T == B its rows were read as the samples' (5% off for Blenderbot, no error); per-sample
    positions ``[B, T]`` are exact."""
    torch.manual_seed(0)
    model = OwnPositions()
    tokens, targets = torch.randint(1, 11, (3, T)), torch.randint(0, 11, (3, T))
    assert_refused(model, token_loss, tokens, targets, r"'positions' \(OwnPositionLookup\) looks up .* not the model's "
                                                       r"input .*position_ids=torch.arange\(T\).expand\(B, T\)")
    per_sample = lambda idx: model(idx, torch.arange(idx.shape[1]).expand(idx.shape[0], -1))  # noqa: E731
    stats = second_backward_stats(model, token_loss, per_sample, tokens, targets)
    assert rel_err(stats.per_sample, reference_norms(model, token_loss, tokens, targets)[0]) <= 1e-5


class CachePositionLookup(nn.Embedding):
    """BART's and mBART's decoder positions: an Embedding subclass handed a slice of the batch (for
    its shape) and the 1-D ``cache_position``, which it looks up as ``[1, T]`` rows shared by the
    samples (offset by 2, as BART's)."""

    def forward(self, x, cache_length=0, position_ids=None):
        return super().forward(position_ids.unsqueeze(0) + 2)


class WithPositions(nn.Module):
    """Tokens plus a positions module of its own kind, called as ``call(positions, ids, tokens)``."""

    def __init__(self, positions: nn.Embedding, call, vocab=11, dim=4):
        super().__init__()
        self.tokens, self.positions, self.call = nn.Embedding(vocab, dim), positions, call
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        h = self.tokens(idx)
        return self.head(torch.tanh(h + self.call(self.positions, idx, h)))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("T", [5, 3], ids=["T!=B", "T==B"])
def test_a_shared_lookup_replayed_on_the_whole_inputs_matches_torch_func(T, fused):
    """The generic route replays a shared output's module once per sample, with that sample's part
    of the output grad, on the inputs it had in the forward: where T == B the ``[T]`` positions
    were sliced per sample as if they were the batch's (refused: BART at T == B)."""
    torch.manual_seed(0)
    model = WithPositions(CachePositionLookup(10, 4), lambda positions, idx, h: positions(
        h[:, :, -1], 0, torch.arange(idx.shape[1])))
    tokens, targets = torch.randint(1, 11, (3, T)), torch.randint(0, 11, (3, T))
    stats = second_backward_stats(model, token_loss, model, tokens, targets, fused=fused)
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= 1e-5
    assert rel_err(stats.batch_grad_sq, batch) <= 1e-5


class PositionsFromShape(nn.Embedding):
    """BigBirdPegasus' learned positions: handed the input ids for their shape, it makes and looks
    up ``arange(T)`` itself."""

    def forward(self, ids):
        return super().forward(torch.arange(ids.shape[1]))


@pytest.mark.parametrize("T", [5, 3], ids=["T!=B", "T==B"])
def test_an_embedding_subclass_making_its_own_positions_is_refused(T):
    """Its lookup reads only the input's shape; where T == B its rows were read as the samples'
    (BigBirdPegasus 0.9% off, no error), where T != B the batch check refused it without saying why."""
    torch.manual_seed(0)
    model = WithPositions(PositionsFromShape(8, 4), lambda positions, idx, h: positions(idx))
    tokens, targets = torch.randint(1, 11, (3, T)), torch.randint(0, 11, (3, T))
    assert_refused(model, token_loss, tokens, targets, r"'positions' \(PositionsFromShape\) looks up .* not the "
                                                       r"model's input .*position_ids=torch.arange\(T\).expand\(B, T\)")
