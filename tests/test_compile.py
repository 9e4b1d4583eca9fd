"""GradNormTracker on a model run through torch.compile: the same exact numbers as eager.

The tracker's forward-side hooks are excluded from compilation (``torch.compiler.disable``):
dynamo breaks the graph at each tracked module and runs that module eagerly with its hooks, the
code between tracked modules stays compiled, and the backward hooks see real gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

from divebatch import GradNormTracker

from .models_zoo import ZOO, sample_loss
from .oracle import reference_norms, rel_err, tracked_and_checked
from .test_tied import NestedHeadLM, functional_case, make_case, token_loss

RTOL = 1e-4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_tied_lm_compiled_with_inductor_before_the_tracker_exists():
    """Compiled and run once untracked (graphs cached without hooks), then tracked, then not."""
    model, tokens, targets = make_case(padding_idx=1)
    compiled = torch.compile(model)
    token_loss(compiled(tokens), targets).backward()
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    tracker = GradNormTracker(model, "sum")
    for _ in range(2):  # the second step reuses the graphs compiled with the hooks in place
        token_loss(compiled(tokens), targets).backward()
        stats = tracker.collect()
        assert rel_err(stats.per_sample, per_sample) <= RTOL
        assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    tracker.enabled = False  # hooks removed: the compiled model must not call them any more
    token_loss(compiled(tokens), targets).backward()
    assert tracker.collect().backwards == 0
    tracker.close()


@pytest.mark.parametrize("case", ["conv2d", "norms", "custom_module", "reused_module", "attention_batch_first"])
def test_zoo_compiled_matches_torch_func(case):
    model, x, y = ZOO[case]()
    compiled = torch.compile(model, backend="aot_eager")
    with GradNormTracker(model, "mean") as tracker:
        (sample_loss(compiled(x), y) / x.shape[0]).backward()
        stats = tracker.collect()
    per_sample, _, batch = reference_norms(model, sample_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL


class TokenAndScale(torch.nn.Module):
    """Parameters of a parent used in its own forward (a class token and a layer scale, as a ViT's),
    around child layers with rules of their own: the generic route, read from a recorded forward."""

    def __init__(self, dim=8, classes=3):
        super().__init__()
        self.token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.scale = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.mlp = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.scale * torch.relu(self.mlp(x))
        return self.head(x[:, 0])


@pytest.mark.parametrize("how", ["compile, then track", "track, then compile", "Module.compile"])
def test_generic_route_compiled_reads_the_forward_instead_of_replaying(how):
    """A generic-route module runs its forward eagerly under compile, so its parameters' uses are
    read as in eager mode (route "generic (broadcast uses)"), not replayed per sample."""
    torch.manual_seed(0)
    model, x, y = TokenAndScale(), torch.randn(5, 4, 8), torch.randn(5, 3)
    compiled = torch.compile(model, backend="aot_eager") if how == "compile, then track" else None
    tracker = GradNormTracker(model, "mean")
    if how == "track, then compile":
        compiled = torch.compile(model, backend="aot_eager")
    elif how == "Module.compile":
        model.compile(backend="aot_eager")  # (compiles the module's own call in place)
        compiled = model
    for _ in range(2):
        (sample_loss(compiled(x), y) / x.shape[0]).backward()
        stats = tracker.collect()
    per_sample, _, batch = reference_norms(model, sample_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    routes = {plan.module: plan.route for plan in tracker.plan()}
    assert routes[""] == "generic (broadcast uses)", routes
    tracker.close()
    assert "forward" not in model.__dict__  # the instance is as it was


def test_close_puts_back_an_instance_forward():
    """A forward set on the instance (as accelerate's hooks do) is what the tracked call runs, and
    is put back by close()."""
    torch.manual_seed(0)
    model, x, y = TokenAndScale(), torch.randn(5, 4, 8), torch.randn(5, 3)
    plain_forward = model.forward
    calls = []

    def own_forward(*args, **kwargs):
        calls.append(1)
        return plain_forward(*args, **kwargs)

    model.forward = own_forward
    with GradNormTracker(model, "mean") as tracker:
        (sample_loss(model(x), y) / x.shape[0]).backward()
        stats = tracker.collect()
    assert calls == [1]
    assert model.__dict__["forward"] is own_forward
    per_sample, _, _ = reference_norms(model, sample_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= RTOL


class OffsetPositions(torch.nn.Embedding):
    """An Embedding with its own forward (BART's learned positions: the ids shifted by 2), which
    takes the generic route."""

    def forward(self, position_ids):
        return super().forward(position_ids + 2)


class LearnedPositions(torch.nn.Module):
    """Token and learned position embeddings (GPT-2's layout), positions ``[1, T]`` unless given;
    ``subclass``: the positions' Embedding has its own forward (BART's); with ``relative``, a
    Linear of a ``[1, T, 8]`` input shared by the samples (a Conformer's relative positions) added too."""

    def __init__(self, relative=False, subclass=False):
        super().__init__()
        self.tokens = torch.nn.Embedding(11, 8)
        self.positions = OffsetPositions(8, 8) if subclass else torch.nn.Embedding(6, 8)
        self.relative = torch.nn.Linear(8, 8) if relative else None
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.tokens(ids) + self.positions(position_ids)
        if self.relative is not None:
            h = h + self.relative(torch.linspace(-1, 1, ids.shape[1] * 8).view(1, ids.shape[1], 8))
        return self.head(h).sum(1)


@pytest.mark.parametrize("positions", ["shared", "per sample", "shared, own forward"])
def test_shared_position_ids_under_compile(positions):
    """``[1, T]`` position ids (GPT-2's, BERT's default; BART's, through an Embedding with its own
    forward) under torch.compile: the compiled code cannot be followed to the broadcast over the
    samples (eager code is, without changing the output), so the lookup's output is returned expanded
    to ``[B, T, d]`` (a view, the same values) and its grads arrive per sample: exact, with the
    model's output and gradients unchanged."""
    torch.manual_seed(0)
    model = LearnedPositions(subclass=positions.endswith("own forward"))
    ids, y = torch.randint(0, 11, (4, 5)), torch.randn(4, 3)
    given = torch.arange(5).expand(4, 5) if positions == "per sample" else None
    compiled = torch.compile(model, backend="aot_eager")
    expected_out = model(ids, given)
    with GradNormTracker(model, "sum") as tracker:
        out = compiled(ids, given)
        sample_loss(out, y).backward()
        stats = tracker.collect()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert torch.equal(out, expected_out)
    model.zero_grad()
    sample_loss(model(ids, given), y).backward()
    for name, p in model.named_parameters():  # autograd's gradients are those of the untracked model
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-6), name
    per_sample, _, batch = reference_norms(model, sample_loss, ids, y)  # (one sample: [1, T] ids are its own)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert stats.per_layer["positions"].shape == (4,) and bool((stats.per_layer["positions"] > 0).all())


def test_shared_linear_input_under_compile_is_refused_naming_compile():
    """A Linear of a ``[1, K, d]`` input shared by the samples is followed in eager code only (its
    output is not expanded: code such as DeBERTa's builds per-head shapes from that batch of 1);
    compiled, it is refused with an error that says why and what to do."""
    torch.manual_seed(0)
    model, ids, y = LearnedPositions(relative=True), torch.randint(0, 11, (4, 5)), torch.randn(4, 3)
    with GradNormTracker(model, "sum") as tracker:  # eager: exact
        sample_loss(model(ids), y).backward()
        stats = tracker.collect()
    per_sample, _, _ = reference_norms(model, sample_loss, ids, y)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    compiled = torch.compile(model, backend="aot_eager")
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(ValueError, match=r"'relative'.*under torch.compile.*one row per sample"):
            sample_loss(compiled(ids), y).backward()
            tracker.collect()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_flattened_rows_under_compile_are_read_from_the_compiled_graph(backend):
    """OPT's MLP block flattens samples and tokens into rows: compiled, the views that prove the
    rows sample-major are inside a compiled node, which the walk probes through its backward, so
    the Linears on them are exact (refused before 2026-12-06's second session, with a hint to
    exclude the block from compilation, which is still exact). Inductor's backward, compiled with
    donated buffers, is probed too (refused before 2026-12-06's third session), as it is with them
    off."""
    from .models_zoo import FlattenedTokensBlock

    model, x, y = ZOO["flattened_tokens"]()
    tracked_and_checked(model, sample_loss, x, y, forward=torch.compile(model, backend=backend))
    torch._dynamo.reset()
    model.zero_grad()
    with torch._functorch.config.patch(donated_buffer=False):
        tracked_and_checked(model, sample_loss, x, y, forward=torch.compile(model, backend=backend))
    torch._dynamo.reset()
    model.zero_grad()
    for block in model.modules():
        if isinstance(block, FlattenedTokensBlock):
            block.forward = torch.compiler.disable(block.forward)
    tracked_and_checked(model, sample_loss, x, y, forward=torch.compile(model, backend=backend))


@pytest.mark.parametrize("case", ["passed_table", "normalised_table"])
def test_table_read_whole_under_compile_is_refused_naming_compile(case):
    """A tracked Embedding's weight read whole (DeBERTa's relative-position table: handed to the
    layers, or normalised) is followed in eager mode only; compiled, the error says so."""
    model, x, y = ZOO[case]()
    compiled = torch.compile(model, backend="aot_eager")
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises((RuntimeError, ValueError), match="torch.compile"):
            sample_loss(compiled(x), y).backward()
            tracker.collect()


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("T", [4, 5], ids=["T==B", "T!=B"])
def test_sequences_first_inside_a_compiled_model_matches_torch_func(T, backend):
    """fairseq's layout (``[B, T]`` ids, ``[T, B, d]`` in the model's own code, attention over heads
    folded into the batch) run through torch.compile: the code between tracked layers is one
    compiled graph node, which the layout walk probes through its backward like any op it does not
    know, so each layer is placed in dim 1. Before, the layers kept dim 0: 27-46% off with no error
    at T == B, refused at T != B."""
    from .test_sequence_first import VOCAB, TransposedInside, batch_first_token_loss

    torch.manual_seed(0)
    model = TransposedInside("bmm")
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (4, T), generator=gen), torch.randint(0, VOCAB, (4, T), generator=gen)
    two_compiled_steps_exact(model, torch.compile(model, backend=backend), batch_first_token_loss, ids, y)


def two_compiled_steps_exact(model, compiled, loss, ids, y, grads=None, reference=None):
    """Two tracked steps of ``loss(compiled(ids), y)``, each with ``model``'s per-sample and batch
    norms as torch.func gives them eager on ``reference`` (default: ``model``) (and, where given,
    its gradients ``grads``)."""
    per_sample, _, batch = reference_norms(reference or model, loss, ids, y)
    with GradNormTracker(model, "sum") as tracker:
        for _ in range(2):
            model.zero_grad()
            loss(compiled(ids), y).backward()
            stats = tracker.collect()
            assert rel_err(stats.per_sample, per_sample) <= RTOL
            assert rel_err(stats.batch_grad_sq, batch) <= RTOL
            for p, g in zip(model.parameters(), grads or []):
                torch.testing.assert_close(p.grad, g)


class AttentionInside(torch.nn.Module):
    """Ids embedded ``[B, T, d]``, a parameter-free self-attention over time (whose softmax inductor
    saves for its backward and, with donated buffers, overwrites there), then, with
    ``sequences_first``, fairseq's ``[T, B, d]`` for a Linear, mean-pooled over time into a head."""

    def __init__(self, sequences_first: bool = True):
        super().__init__()
        self.sequences_first = sequences_first
        self.embed, self.proj, self.head = torch.nn.Embedding(11, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, ids):
        e = self.embed(ids)
        h = torch.softmax(e @ e.transpose(1, 2), -1) @ e
        h = h.transpose(0, 1) if self.sequences_first else h
        return self.head(torch.tanh(self.proj(h)).mean(0 if self.sequences_first else 1))


def class_sum_loss(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("T", [4, 5], ids=["T==B", "T!=B"])
def test_a_compiled_backward_that_overwrites_its_saved_tensors_is_probed_and_left_as_it_was(T):
    """Under ``torch.compile(dynamic=True)`` inductor compiles the backward at the forward, with
    donated buffers: it writes its results into the softmax it saved. AOTAutograd refuses to run it
    outside a backward pass while ``donated_buffer`` is on (so the Linear after it was not placed:
    15% off with no error at T == B, refused at T != B), and runs it where the setting is off, as it
    is where a cached backward is taken (the probe's later calls then read the first's results, and
    the model's gradient came out wrong). The probe turns the setting off for its calls and writes
    the saved tensors back: exact, and the gradients are an untracked step's."""
    torch.manual_seed(0)
    model = AttentionInside()
    ids, y = torch.randint(0, 11, (4, T)), torch.randint(0, 3, (4,))
    class_sum_loss(model(ids), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    two_compiled_steps_exact(model, torch.compile(model, dynamic=True), class_sum_loss, ids, y, grads)


def test_a_layer_behind_compiled_code_that_cannot_be_probed_at_t_equal_b(monkeypatch):
    """Where compiled code's backward cannot be called (made so here), a layer after it whose input
    has the batch's size in dims 0 and 1 is refused at its first forward, naming the attribute
    that settles it: the code is the model's own and may transpose (before, dim 0 was taken with no
    error, wrong for ``AttentionInside``'s layout). A call first seen with T != B, its dim told by
    its size, is read as it was then at T == B (a batch grown to the sequence length), and a layer
    declared ``batch_first`` is read so."""
    import divebatch.layers.rows as rows

    called = rows._node_backward
    monkeypatch.setattr(rows, "_node_backward", lambda node, *args: None if type(node).__name__ ==
                        "CompiledFunctionBackward" else called(node, *args))
    torch.manual_seed(0)
    model = AttentionInside(sequences_first=False)
    ids, y = torch.randint(0, 11, (4, 4)), torch.randint(0, 3, (4,))
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    with GradNormTracker(model, "sum"):
        with pytest.raises(ValueError, match=r"'proj'.*compiled by torch\.compile.*batch_first = True"):
            compiled(ids)
    for ids_seen_first in (torch.randint(0, 11, (4, 5)), None):
        per_sample, _, batch = reference_norms(model, class_sum_loss, ids, y)
        if ids_seen_first is None:
            model.proj.batch_first = True
        with GradNormTracker(model, "sum") as tracker:
            if ids_seen_first is not None:
                class_sum_loss(compiled(ids_seen_first), y).backward()
                tracker.collect()
            model.zero_grad()
            class_sum_loss(compiled(ids), y).backward()
            stats = tracker.collect()
            assert rel_err(stats.per_sample, per_sample) <= RTOL
            assert rel_err(stats.batch_grad_sq, batch) <= RTOL


@pytest.mark.parametrize("where", ["model", "head-module"])
def test_the_table_applied_by_the_models_code_under_compile(where):
    """An Embedding's weight applied as the output layer by the model's own forward (the model then
    runs eagerly: the products are read by a torch-function mode) or by a head module's (only that
    module runs eagerly), compiled: exact, T = B included."""
    for B, T in [(5, 7), (4, 4)]:
        torch.manual_seed(B)
        if where == "model":
            model, ids, y = functional_case(B=B, T=T, head="matmul-t", positions=True)
        else:
            model, ids, y = NestedHeadLM(30, 8), torch.randint(0, 30, (B, T)), torch.randint(0, 30, (B, T))
        # (torch.func's functional_call leaves a plain tensor for the weight of a module registered
        # under two names, as the head module holds the embeddings: the reference runs on a copy)
        two_compiled_steps_exact(model, torch.compile(model, backend="aot_eager"), token_loss, ids, y,
                                 reference=copy.deepcopy(model))
