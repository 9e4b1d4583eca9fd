"""Tied input/output embeddings (nn.Embedding weight shared with nn.Linear) against torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers.tied import tied_cross, tied_rows

from .oracle import autocast_checked, per_sample_grads, reference_norms, rel_err

RTOL = 1e-4


def token_loss(out, y):
    """Summed token cross-entropy of the sequences in ``out [B, T, V]``: the per-sample loss is a sequence's sum."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="sum")


class TiedLM(nn.Module):
    """Embedding → LayerNorm → Linear → tanh (residual) → output Linear sharing the embedding's weight.

    ``reuse_embedding`` embeds a second, shifted copy of the tokens with the same table (two
    Embedding calls); ``reuse_head`` applies the output layer twice (two Linear calls).
    """

    def __init__(self, vocab, dim, padding_idx=None, bias=True, reuse_embedding=False, reuse_head=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=bias)
        self.head.weight = self.emb.weight
        self.reuse_embedding, self.reuse_head = reuse_embedding, reuse_head

    def forward(self, tokens):
        h = self.emb(tokens)
        if self.reuse_embedding:
            h = h + 0.5 * self.emb(tokens.roll(1, dims=1))
        h = h + torch.tanh(self.mid(self.norm(h)))
        out = self.head(h)
        if self.reuse_head:
            out = out + self.head(torch.tanh(h)).flip(1)
        return out


def make_case(B=5, T=7, V=40, d=12, seed=0, model_class=None, **kwargs):
    """``(model, tokens, targets)``: a ``model_class`` (default ``TiedLM``) language model, padding in
    sample 0's first half where ``padding_idx`` is given."""
    torch.manual_seed(seed)
    model = (model_class or TiedLM)(V, d, **kwargs)
    tokens = torch.randint(0, V, (B, T))
    if kwargs.get("padding_idx") is not None:
        tokens[0, : T // 2] = kwargs["padding_idx"]
    return model, tokens, torch.randint(0, V, (B, T))


def tracked(model, tokens, targets, reduction="mean", fused=True):
    scale = {"sum": 1.0, "mean": 1.0 / tokens.shape[0]}.get(reduction, reduction)
    with GradNormTracker(model, loss_reduction=reduction, fused=fused) as tracker:
        (scale * token_loss(model(tokens), targets)).backward()
        return tracker.collect()


def assert_exact(model, tokens, targets, stats):
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert rel_err(sum(stats.per_layer.values()), per_sample) <= RTOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("reduction", ["sum", "mean", 0.37])
@pytest.mark.parametrize("padding_idx", [None, 3], ids=["no-pad", "pad"])
def test_tied_lm_matches_torch_func(fused, reduction, padding_idx):
    model, tokens, targets = make_case(padding_idx=padding_idx)
    stats = tracked(model, tokens, targets, reduction, fused)
    assert_exact(model, tokens, targets, stats)


@pytest.mark.parametrize("variant", [dict(reuse_embedding=True), dict(reuse_head=True),
                                     dict(reuse_embedding=True, reuse_head=True, padding_idx=0), dict(bias=False)],
                         ids=["two-embedding-calls", "two-head-calls", "both-twice-pad", "no-bias"])
def test_tied_lm_with_several_calls(variant):
    model, tokens, targets = make_case(**variant)
    stats = tracked(model, tokens, targets)
    assert_exact(model, tokens, targets, stats)


def test_cross_term_is_the_inner_product_of_the_two_parts():
    """The per_layer entry 'emb+head' is 2 <E_b, L_b>, the two parts taken from torch.func separately."""
    model, tokens, targets = make_case(padding_idx=2)
    stats = tracked(model, tokens, targets, "sum")
    untied = TiedLM(40, 12, padding_idx=2)
    untied.load_state_dict(model.state_dict())
    untied.head.weight = nn.Parameter(model.emb.weight.detach().clone())  # same values, two tensors
    grads = per_sample_grads(untied, token_loss, tokens, targets)
    expected = 2 * (grads["emb.weight"].double() * grads["head.weight"].double()).flatten(1).sum(1)
    assert rel_err(stats.per_layer["emb+head"], expected) <= RTOL
    assert stats.per_layer["emb+head"].abs().max() > 1e-3 * stats.per_sample.max()  # not trivially zero


@pytest.mark.parametrize("head", ["tied-linear", "table-applied"])
def test_head_on_the_last_position_only(head):
    """The output layer sees one position per sequence (T_h = 1, closed-form route) while the
    Embedding sees T tokens: the cross term pairs rows of different lengths. Also where the
    model's code applies the table itself (``PooledTableHead``), with padding."""

    class LastToken(TiedLM):
        def forward(self, tokens):
            h = self.emb(tokens)
            h = h + torch.tanh(self.mid(self.norm(h)))
            return self.head(h.mean(dim=1))

    torch.manual_seed(1)
    model, tokens = (LastToken(30, 8) if head == "tied-linear" else PooledTableHead()), torch.randint(0, 30, (6, 5))
    targets = torch.randint(0, 30, (6,))
    if head == "table-applied":
        tokens[0, :3] = 1  # its padding_idx

    def loss(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    with GradNormTracker(model, "sum") as tracker:
        loss(model(tokens), targets).backward()
        stats = tracker.collect()
    per_sample, _, batch = reference_norms(model, loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


def test_embedding_alone_in_a_backward_has_no_cross_term():
    """Only the Embedding is called: the tied weight's gradient is the embedding part alone."""
    model, tokens, _ = make_case()
    with GradNormTracker(model, "sum") as tracker:
        model.emb(tokens).square().sum().backward()
        stats = tracker.collect()
    assert set(stats.per_layer) == {"emb"}

    def loss(out, y):
        return out.square().sum()

    per_sample, _, batch = reference_norms(model.emb, loss, tokens, torch.zeros(tokens.shape[0]))
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


def test_tied_weight_is_listed_once():
    model, _, _ = make_case()
    tracker = GradNormTracker(model)
    names = [n for n, _ in tracker.named_parameters()]
    assert len(names) == len(set(map(id, tracker.parameters()))) == len(list(model.parameters()))
    assert "emb.weight" in names and "head.weight" not in names
    tracker.close()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(2, 25), st.integers(1, 10), st.booleans(), st.integers(0, 99))
def test_tied_lm_random_shapes(B, T, V, d, pad, seed):
    model, tokens, targets = make_case(B, T, V, d, seed, padding_idx=0 if pad else None)
    stats = tracked(model, tokens, targets, "mean")
    assert_exact(model, tokens, targets, stats)


def test_tied_rows_chunks_agree(monkeypatch):
    """Chunking over samples (to bound the T_h x T_e gather) does not change the rows."""
    from divebatch.layers import tied

    torch.manual_seed(2)
    a, g, idx = torch.randn(5, 6, 4), torch.randn(5, 6, 11), torch.randint(0, 11, (5, 3))
    whole = tied_rows(a, g, idx, padding_idx=None)
    monkeypatch.setattr(tied, "max_extra_bytes", lambda device_type: 4 * 6 * 3 * 2)  # two samples per chunk
    assert torch.equal(tied_rows(a, g, idx, padding_idx=None), whole)
    per_sample_lin = torch.einsum("bsv,bsd->bvd", g, a)
    expected = torch.stack([per_sample_lin[b, idx[b]] for b in range(5)])
    assert torch.allclose(whole, expected, atol=1e-5)
    e = torch.randn(5, 3, 4)
    assert torch.allclose(tied_cross(whole, e), (expected * e).sum(dim=(1, 2)), atol=1e-5)


# ---------------------------------------------------------------- what stays refused
def test_linear_tied_to_linear_is_refused_with_both_names():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(ValueError, match=r"'2\.weight' is the same tensor as '0\.weight'.*nn\.Embedding"):
        GradNormTracker(nn.Sequential(first, nn.Tanh(), second))


def test_weight_shared_three_ways_is_refused():
    emb, head, extra = nn.Embedding(10, 4), nn.Linear(4, 10), nn.Linear(4, 10)
    head.weight = extra.weight = emb.weight
    with pytest.raises(ValueError, match=r"'2\.weight' is the same tensor as '0\.weight'"):
        GradNormTracker(nn.Sequential(emb, head, extra))


class RobertaLMHead(nn.Module):
    """fairseq's RoBERTa head: handed the embedding table, it registers it as its own ``weight`` and
    applies it itself after a dense layer and a LayerNorm, with a bias of its own."""

    def __init__(self, dim, weight):
        super().__init__()
        self.dense, self.layer_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.weight = weight
        self.bias = nn.Parameter(torch.randn(weight.shape[0]))

    def forward(self, features):
        x = self.layer_norm(F.gelu(self.dense(features)))
        return F.linear(x, self.weight) + self.bias


class Scaled(nn.Module):
    """A custom module holding the table as its own weight, applied as ``x @ self.weight.t()``."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.t()


@pytest.mark.parametrize("head", ["roberta", "scaled"])
def test_table_held_as_a_modules_own_weight_and_applied_by_its_code(head):
    torch.manual_seed(5)
    emb = nn.Embedding(30, 8, padding_idx=1)
    model = nn.Sequential(emb, nn.Linear(8, 8), nn.Tanh(),
                          RobertaLMHead(8, emb.weight) if head == "roberta" else Scaled(emb.weight))
    tokens, targets = torch.randint(0, 30, (5, 6)), torch.randint(0, 30, (5, 6))
    tokens[0, :2] = 1
    stats = tracked(model, tokens, targets, "sum")
    assert_exact(model, tokens, targets, stats)
    assert stats.per_layer["0+0@3"].abs().max() > 1e-3 * stats.per_sample.max()
    # (the head's own parameters under its name; a head with none is no module of the plan)
    assert ("3" in stats.per_layer) == (head == "roberta")


def test_table_held_as_a_modules_own_weight_and_used_otherwise_is_refused():
    class Gated(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x * self.weight.sum()

    emb = nn.Embedding(10, 4)
    with pytest.raises(ValueError, match=r"same tensor.*F\.linear\(x, self\.weight\)"):
        GradNormTracker(nn.Sequential(emb, Gated(emb.weight)))


def test_forwards_without_backward_do_not_accumulate():
    """Graphs dropped without a backward (e.g. evaluation with grad enabled) leave nothing behind,
    and the next tracked step is still exact."""
    import gc

    model, tokens, targets = make_case()
    with GradNormTracker(model, "sum") as tracker:
        for _ in range(3):
            model(tokens)
        gc.collect()
        assert all(ref() is None for ref in tracker._ties[0].embedding_calls)
        model.zero_grad()
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    assert_exact(model, tokens, targets, stats)


class ScaledEmbedding(nn.Embedding):
    """Hugging Face's ``*ScaledWordEmbedding`` (Gemma, BART, ...): rows times a constant buffer."""

    def __init__(self, vocab, dim, padding_idx, embed_scale):
        super().__init__(vocab, dim, padding_idx)
        self.embed_scale = nn.Buffer(torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class ScaledPlusOne(ScaledEmbedding):
    """Another forward: not the recognised code, so the generic route (and the tie is refused)."""

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale + 1.0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_scaled_embedding_tied_to_the_head_matches_torch_func(padding_idx, fused):
    model, tokens, targets = make_case(padding_idx=padding_idx, reuse_embedding=True)
    model.emb = ScaledEmbedding(40, 12, padding_idx, embed_scale=12 ** 0.5)
    model.head.weight = model.emb.weight
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    assert routes["emb"] == "embedding"
    assert "emb+head" in stats.per_layer  # the cross term of the tie
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


def test_a_scaled_embedding_with_another_forward_is_not_taken_for_one():
    from divebatch.layers.base import rule_for
    from divebatch.layers.embedding import ScaledEmbeddingRule

    assert isinstance(rule_for(ScaledEmbedding(5, 3, None, 2.0)), ScaledEmbeddingRule)
    assert rule_for(ScaledPlusOne(5, 3, None, 2.0)) is None


class SharedTables(nn.Module):
    """A seq2seq-style sharing: ``shared``, an encoder embedding (scaled, other padding row) and a
    decoder embedding all hold one weight, which the output layer also uses."""

    def __init__(self, vocab=40, dim=12):
        super().__init__()
        self.shared = nn.Embedding(vocab, dim, padding_idx=1)
        self.encoder_embed = ScaledEmbedding(vocab, dim, padding_idx=2, embed_scale=dim ** 0.5)
        self.decoder_embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.encoder_embed.weight = self.decoder_embed.weight = self.head.weight = self.shared.weight

    def forward(self, tokens):
        memory = torch.tanh(self.mix(self.encoder_embed(tokens))).mean(dim=1, keepdim=True)
        return self.head(self.decoder_embed(tokens.roll(1, dims=1)) + memory)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_embeddings_sharing_one_weight_are_one_owner(fused):
    torch.manual_seed(0)
    model = SharedTables()
    tokens, targets = torch.randint(0, 40, (4, 7)), torch.randint(0, 40, (4, 7))
    tokens[0, :3] = 1
    tokens[1, :3] = 2
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    per_sample, per_param, batch = reference_norms(model, token_loss, tokens, targets)
    assert set(stats.per_layer) == {"shared", "mix", "head", "shared+head"}  # the embeddings under one name
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert max(stats.unaccounted.values()) <= 1e-5


def test_weight_shared_by_embeddings_and_two_linears_is_refused():
    model = SharedTables()
    extra = nn.Linear(12, 40, bias=False)
    extra.weight = model.shared.weight
    model.extra = extra
    with pytest.raises(ValueError, match=r"'extra\.weight' is the same tensor as 'shared\.weight'"):
        GradNormTracker(model)


# ---------------------------------------------------------------- the table applied by the model's own code
HEADS = ["linear", "matmul-t", "matmul-T", "matmul-mT", "transpose", "einsum", "einsum-table-first"]


class FunctionalHeadLM(nn.Module):
    """Embedding → LayerNorm → Linear → tanh (residual) → the embedding's own weight applied by this
    module's code as the output layer (OLMo's ``F.linear(x, self.wte.weight)``, x-transformers'
    ``x @ self.token_emb.weight.t()``), written as ``head`` (one of ``HEADS``). ``positions`` adds a learned position
    table held by the model itself (the generic route's recorder runs around the same forward);
    ``shared_positions`` a position Embedding looked up with ``[1, T]`` ids (its output, shared by the
    samples, is followed by the tracker's watchers' mode to the forward's end); ``twice`` applies
    the head a second time."""

    def __init__(self, vocab, dim, head="linear", padding_idx=None, positions=False, twice=False,
                 shared_positions=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(dim)
        self.mid = nn.Linear(dim, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(16, dim)) if positions else None
        self.pos_emb = nn.Embedding(16, dim) if shared_positions else None
        self.kind, self.twice = head, twice

    def logits(self, h):
        if self.kind == "linear":
            return F.linear(h, self.emb.weight)
        if self.kind == "matmul-t":
            return h @ self.emb.weight.t()
        if self.kind == "matmul-T":
            return torch.matmul(h, self.emb.weight.T)
        if self.kind == "matmul-mT":
            return h.matmul(self.emb.weight.mT)
        if self.kind == "transpose":
            return h @ self.emb.weight.transpose(0, 1)
        if self.kind == "einsum":
            return torch.einsum("btd,vd->btv", h, self.emb.weight)
        return torch.einsum("v d, ... d -> ... v", self.emb.weight, h)

    def forward(self, tokens):
        h = self.emb(tokens)
        if self.pos is not None:
            h = h + self.pos[: tokens.shape[1]]
        if self.pos_emb is not None:
            h = h + self.pos_emb(torch.arange(tokens.shape[1])[None])
        h = h + torch.tanh(self.mid(self.norm(h)))
        out = self.logits(h)
        if self.twice:
            out = out + self.logits(torch.tanh(h)).flip(1)
        return out


def functional_case(**kwargs):
    return make_case(model_class=FunctionalHeadLM, **kwargs)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_table_applied_as_the_output_layer_by_the_models_code_matches_torch_func(head, fused):
    model, tokens, targets = functional_case(head=head, padding_idx=3)
    plain = model(tokens)
    with GradNormTracker(model, loss_reduction="mean", fused=fused) as tracker:
        out = model(tokens)
        (token_loss(out, targets) / tokens.shape[0]).backward()
        stats = tracker.collect()
    assert_exact(model, tokens, targets, stats)
    # The product ran as the same op: the model's output is the untracked one's, bit for bit (an
    # einsum is summed as the matmul is, within rounding).
    assert torch.equal(out, plain) if not head.startswith("einsum") else torch.allclose(out, plain, atol=1e-6)
    assert set(stats.per_layer) == {"emb", "norm", "mid", "emb@model", "emb+emb@model"}
    assert stats.per_layer["emb+emb@model"].abs().max() > 1e-3 * stats.per_sample.max()  # the cross term is there


@pytest.mark.parametrize("variant", [dict(positions=True), dict(twice=True), dict(positions=True, twice=True, head="matmul-T"),
                                     dict(shared_positions=True), dict(shared_positions=True, positions=True, twice=True)],
                         ids=["own-positions", "head-twice", "both", "shared-positions", "all"])
def test_table_applied_by_the_models_code_with_more_around_it(variant):
    model, tokens, targets = functional_case(**variant)
    stats = tracked(model, tokens, targets, "sum")
    assert_exact(model, tokens, targets, stats)


def test_the_submodules_of_the_forward_that_applies_the_table_run_outside_its_mode():
    """The products are in the model's own code: its submodules' ops (and the tracker's hooks
    there) do not pay the torch-function mode's cost per op."""
    model, tokens, targets = functional_case(head="matmul-t")
    depths = []
    model.mid.register_forward_hook(lambda *_: depths.append(torch._C._len_torch_function_stack()))
    model(tokens)
    untracked = depths.pop()
    with GradNormTracker(model, "sum") as tracker:
        token_loss(model(tokens), targets).backward()
        assert_exact(model, tokens, targets, tracker.collect())
    assert depths and all(depth == untracked for depth in depths)


class TokenEmbedding(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, tokens):
        return self.emb(tokens)


class NestedHeadLM(nn.Module):
    """x-transformers' layout: the table two modules down (``self.token_emb.emb.weight``), applied by a
    head module holding the embedding module, on a batch tracked sequences first (``[T, B]`` tokens)."""

    class Head(nn.Module):
        def __init__(self, token_emb):
            super().__init__()
            self.token_emb = token_emb
            self.norm = nn.LayerNorm(token_emb.emb.embedding_dim)

        def forward(self, h):
            return self.norm(h) @ self.token_emb.emb.weight.t()

    def __init__(self, vocab, dim):
        super().__init__()
        self.token_emb = TokenEmbedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.to_logits = self.Head(self.token_emb)

    def forward(self, tokens):
        h = self.token_emb(tokens)
        return self.to_logits(h + torch.tanh(self.mid(h)))


@pytest.mark.parametrize("T", [4, 6], ids=["T-4", "T-equals-B"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_table_two_modules_down_applied_by_a_head_module(batch_first, T):
    torch.manual_seed(2)
    model, tokens, targets = NestedHeadLM(30, 8), torch.randint(0, 30, (6, T)), torch.randint(0, 30, (6, T))
    if batch_first:
        loss, x, y = token_loss, tokens, targets
    else:
        def loss(out, y):
            return token_loss(out.transpose(0, 1), y)
        x, y = tokens.t(), targets  # [T, B] ids: the model is sequence-first throughout
    with GradNormTracker(model, "sum", batch_first=batch_first) as tracker:
        loss(model(x), y).backward()
        stats = tracker.collect()
        assert "token_emb.emb@to_logits" in [plan.module for plan in tracker.plan()]
    per_sample, _, batch = reference_norms(model, loss, x, y, batch_dim=0 if batch_first else 1)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


class LambdaHeadLM(nn.Module):
    """x-transformers' ``TransformerWrapper`` with ``tie_embedding=True``: the output layer a lambda
    made in ``__init__`` (the forward calls ``self.to_logits(x)``)."""

    def __init__(self, vocab, dim, tie=True):
        super().__init__()
        self.token_emb = TokenEmbedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.to_logits = nn.Linear(dim, vocab, bias=False) if not tie else lambda t: t @ self.token_emb.emb.weight.t()

    def forward(self, tokens):
        h = self.token_emb(tokens)
        return self.to_logits(h + torch.tanh(self.mid(h)))


def test_table_applied_by_a_lambda_the_module_holds():
    torch.manual_seed(3)
    model, tokens, targets = LambdaHeadLM(30, 8), torch.randint(0, 30, (5, 6)), torch.randint(0, 30, (5, 6))
    stats = tracked(model, tokens, targets, "sum")
    assert_exact(model, tokens, targets, stats)
    assert "token_emb.emb@model" in stats.per_layer


class PooledTableHead(nn.Module):
    """One output per sequence: the table applied to a mean over the tokens (T_h = 1; see
    ``test_head_on_the_last_position_only``)."""

    def __init__(self, vocab=30, dim=8):
        super().__init__()
        self.wte, self.mid = nn.Embedding(vocab, dim, padding_idx=1), nn.Linear(dim, dim)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.mid(self.wte(tokens))).mean(1), self.wte.weight)


def test_table_applied_by_the_models_code_under_autocast():
    model, tokens, targets = functional_case(head="matmul-t", padding_idx=3)
    autocast_checked(model, token_loss, tokens, targets)


def test_other_uses_of_the_table_in_the_models_code_are_still_refused():
    class AlsoPenalised(FunctionalHeadLM):
        def forward(self, tokens):
            return super().forward(tokens) + 1e-2 * self.emb.weight.square().sum()

    model, tokens, targets = functional_case()
    model.__class__ = AlsoPenalised
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(RuntimeError, match=r"'emb\.weight' received a gradient that the forward calls"):
            token_loss(model(tokens), targets).backward()
            tracker.collect()


def test_the_products_mode_is_left_after_each_forward_and_at_close():
    model, tokens, targets = functional_case(head="matmul-t")
    tracker = GradNormTracker(model, "sum")
    for _ in range(2):  # the second step on the kept plan
        model.zero_grad()
        token_loss(model(tokens), targets).backward()
        assert torch._C._len_torch_function_stack() == 0
        assert_exact(model, tokens, targets, tracker.collect())
    with pytest.raises(IndexError):
        model(torch.full_like(tokens, 99))  # a forward that raises inside
    assert torch._C._len_torch_function_stack() == 0
    tracker.close()
    assert all(not owner.product_modes for owner in tracker._owners)
