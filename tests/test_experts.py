"""Own weights applied to gathered rows (``divebatch/layers/experts.py``): mixture-of-experts
experts and routers, ``x @ self.weight``. Per-sample norms are read from the products per
(expert, sample) group and checked against torch.func; rows whose sample cannot be followed are
replayed or refused, never guessed."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from divebatch.layers import experts as experts_module
from divebatch.layers.experts import RowProduct, rows_grad_sum, rows_norms, rows_per_sample

from .models_zoo import ZOO, sample_loss
from .oracle import tracked_and_checked

transformers = pytest.importorskip("transformers")
from .test_transformers import Logits, token_loss  # noqa: E402

IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


def _moe_model(arch: str, implementation: str):
    common = dict(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=16, num_experts_per_tok=2)
    if arch == "mixtral":
        config, cls = transformers.MixtralConfig(**common, num_local_experts=3), transformers.MixtralForCausalLM
    elif arch == "olmoe":
        config, cls = transformers.OlmoeConfig(**common, num_experts=3), transformers.OlmoeForCausalLM
    elif arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**common, num_experts=3, moe_intermediate_size=12,
                                             shared_expert_intermediate_size=20)
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "gpt_oss":  # transposed [E, in, out] weights with [E, out] biases, router with a bias
        config = transformers.GptOssConfig(**common, num_local_experts=3, head_dim=8, sliding_window=4,
                                           layer_types=["sliding_attention", "full_attention"])
        cls = transformers.GptOssForCausalLM
    else:  # DeepSeek-style: the router takes [B, T, d] and flattens inside; shared experts; MLA in V3
        shared = dict(n_routed_experts=4, moe_intermediate_size=12, n_shared_experts=1, first_k_dense_replace=1,
                      n_group=1, topk_group=1)
        if arch == "glm4_moe":
            config, cls = transformers.Glm4MoeConfig(**common, **shared, head_dim=8), transformers.Glm4MoeForCausalLM
        else:
            config = transformers.DeepseekV3Config(**common, **shared, q_lora_rank=8, kv_lora_rank=8,
                                                   qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4)
            cls = transformers.DeepseekV3ForCausalLM
    config._experts_implementation = implementation
    net = cls(config)
    for name, p in net.named_parameters():
        if "bias" in name and p.dim() == 2:  # GPT-OSS starts its expert biases at zero
            nn.init.normal_(p, std=0.1)
    return Logits(net, "input_ids")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe", "gpt_oss"])
def test_hugging_face_experts_match_torch_func(arch, implementation):
    """Every experts implementation transformers 5 ships on CPU (the per-expert loop, one
    ``torch._grouped_mm`` over rows sorted by expert, ``bmm`` with per-row gathered weights), in
    four architectures: the experts and routers are read from their products, not replayed."""
    torch.manual_seed(0)
    model = _moe_model(arch, implementation)
    tokens, targets = torch.randint(0, 97, (3, 7)), torch.randint(0, 97, (3, 7))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused=implementation == "grouped_mm")
    moe = {name: route for name, route in routes.items() if name.endswith((".experts", ".gate", ".router"))}
    assert len(moe) == 4 and set(moe.values()) == {"generic (row uses)"}


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_routers_flattening_inside_match_torch_func(arch):
    """DeepSeek-V3's and GLM-4.5's routers take ``[B, T, d]`` and return ``[B*T, E]``: no output has
    the input's batch, so the call is counted with its input's samples once every use of its
    weight was read as a product of those rows (layers 1: the MoE layer after a dense one)."""
    torch.manual_seed(0)
    model = _moe_model(arch, "grouped_mm")
    tokens, targets = torch.randint(0, 97, (3, 7)), torch.randint(0, 97, (3, 7))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused=True)
    assert routes["net.model.layers.1.mlp.gate"] == routes["net.model.layers.1.mlp.experts"] == "generic (row uses)"


@pytest.mark.parametrize("top_k, T", [(1, 7), (2, 7), (2, 1)])
def test_every_token_through_every_expert_matches_torch_func(top_k, T):
    """Llama 4 runs every token through every expert as one batch: the experts' input is
    ``rows.repeat(E, 1) * scores.T.reshape(-1, 1)`` (row ``e*N + n`` is token ``n``'s, scaled by
    its score for expert ``e``), viewed as ``[E, N, d]`` blocks for ``bmm`` with the whole
    ``[E, d, 2I]`` weight. Which sample each row is comes from the graph (``rows.row_samples``),
    the blocks' products are read per (expert, sample): no replay. Refused before. (T = 1: no
    positions are merged; the ``[B, 1, d]`` tensor viewed as rows is taken to be the samples.)"""
    config = transformers.Llama4TextConfig(vocab_size=97, hidden_size=16, intermediate_size=24,
                                           intermediate_size_mlp=24, num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=8, num_local_experts=3,
                                           num_experts_per_tok=top_k, max_position_embeddings=16)
    torch.manual_seed(0)
    model = Logits(transformers.Llama4ForCausalLM(config), "input_ids")
    tokens, targets = torch.randint(0, 97, (3, T)), torch.randint(0, 97, (3, T))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused=True)
    moe = {name: route for name, route in routes.items() if name.endswith((".experts", ".router"))}
    assert len(moe) == 4 and set(moe.values()) == {"generic (row uses)"}


def test_experts_given_gathered_rows_split_by_expert_match_torch_func():
    """JetMoE's experts modules get ``rows[batch_index]`` (tokens sorted by expert, gathered in the
    parent) and split them with ``rows.split(expert_size)`` inside: the gather is followed in the
    graph (``rows.row_samples``), the split by the row labels. Refused before (a batch of
    ``B*T*k`` rows)."""
    torch.manual_seed(0)
    config = transformers.JetMoeConfig(hidden_size=16, intermediate_size=12, num_local_experts=3,
                                       num_experts_per_tok=2)
    moe = transformers.models.jetmoe.modeling_jetmoe.JetMoeMoE(config)
    nn.init.normal_(moe.bias, std=0.1)
    for p in moe.parameters():
        if p.dim() == 3:
            nn.init.normal_(p, std=0.2)
    model = nn.Sequential(nn.Linear(4, 16), moe, nn.Linear(16, 2))
    routes = tracked_and_checked(model, sample_loss, torch.randn(3, 5, 4), torch.randn(3, 5, 2), fused=True)
    assert routes["1.input_linear"] == routes["1.output_linear"] == "generic (row uses)"


@pytest.mark.parametrize("case, experts", [("mixture_of_experts", "1"), ("experts_on_every_token", "1.experts")])
def test_zoo_experts_read_their_products(case, experts):
    model, x, y = ZOO[case]()
    routes = tracked_and_checked(model, sample_loss, x, y, fused=True)
    assert routes[experts] == "generic (row uses)"


class MatrixModule(nn.Module):
    """``x @ self.weight + self.bias`` on ``[B, T, d]``: a plain own matrix, each sample's rows."""

    def __init__(self, d, p):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d, p) / d**0.5), nn.Parameter(torch.randn(p))

    def forward(self, x):
        return torch.tanh(x @ self.weight + self.bias)


class PermutedExperts(nn.Module):
    """Rows gathered in an order that crosses samples (row ``5 r mod N``; with ``repeated``, every
    even row a second time), through expert weights, and added back: labels follow each row to
    its source."""

    def __init__(self, d, mode):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, d, d) / d**0.5)
        self.mode = mode

    def forward(self, x):
        if self.mode == "positions first":  # rows t*B + b: not followed through the transpose
            rows = x.transpose(0, 1).reshape(-1, x.shape[-1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        pick = (torch.arange(n) * 5) % n  # a permutation for N coprime to 5
        if self.mode == "repeated":
            pick = torch.cat([pick, torch.arange(0, n, 2)])
        h = F.linear(rows[pick], self.w[0])
        if self.mode == "in place":
            h.index_fill_(1, torch.tensor([0]), 0.0)  # row-wise, but not an op the labels know
        h = F.linear(torch.relu(h), self.w[1])
        out = rows.index_add(0, pick, h)
        if self.mode == "positions first":
            return out.view(x.shape[1], x.shape[0], -1).transpose(0, 1)
        return out.view(x.shape)


@pytest.mark.parametrize("mode, route", [("permuted", "generic (row uses)"), ("repeated", "generic (row uses)"),
                                         ("in place", "generic (vmap vjp)"),
                                         ("positions first", "generic (vmap vjp)")])
def test_rows_gathered_across_samples(mode, route):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), PermutedExperts(5, mode), nn.Linear(5, 2))
    routes = tracked_and_checked(model, sample_loss, torch.randn(3, 4, 3), torch.randn(3, 4, 2), fused=True)
    assert routes["1"] == route


@pytest.mark.parametrize("shape", [(4, 3), (4, 5, 3)], ids=["samples", "samples and tokens"])
def test_own_matrix_products_match_torch_func(shape):
    torch.manual_seed(0)
    model = nn.Sequential(MatrixModule(3, 4), nn.Linear(4, 2))
    routes = tracked_and_checked(model, sample_loss, torch.randn(*shape), torch.randn(*shape[:-1], 2), fused=True)
    assert routes["0"] == "generic (row uses)"


# --------------------------------------------------------------------------- labels against the Jacobian
#: The recording module's own expert weights (``[2, 4, 4]``), used whole by ``bmm`` on expert blocks.
_OWN = nn.Parameter(torch.randn(2, 4, 4))


def _expert_blocks(h, mix=None):
    """Rows as two expert blocks ``[2, n/2, 4]`` (Llama 4's layout), some block ops, rows again."""
    if h.shape[0] % 2:
        return h
    b = h.view(2, -1, 4)
    b = torch.bmm(torch.tanh(b) * b, _OWN) if mix is None else mix(b)
    gate, up = (torch.softmax(b, -1) + b).chunk(2, dim=-1)
    return torch.bmm(torch.cat([F.silu(gate) * up, up], -1), _OWN.transpose(1, 2)).reshape(-1, 4)


def _split_by_expert(h):
    """JetMoE's experts: rows split into one piece per expert, each through its expert, cat again."""
    if h.dim() != 2 or h.shape[0] < 2:
        return h
    pieces = h.split([1, h.shape[0] - 1])
    return torch.cat([F.linear(piece, _OWN[e]) for e, piece in enumerate(pieces)])


# Each op takes the labelled tensor ``h`` ([n, 4]) and ``x`` (the module input, [6, 4]).
ROW_OPS = {
    "split by expert": lambda h, x: _split_by_expert(h),
    "expert blocks": lambda h, x: _expert_blocks(h),
    "gelu": lambda h, x: F.gelu(h),
    "cast": lambda h, x: h.double().float(),
    "scale": lambda h, x: 2.0 * h - 1.0,
    "parameter": lambda h, x: h * nn.Parameter(torch.randn(4)),
    "same rows": lambda h, x: h * torch.sigmoid(h),
    "chunk": lambda h, x: torch.cat(h.chunk(2, dim=-1)[::-1], dim=-1),
    "softmax": lambda h, x: torch.softmax(h, dim=-1),
    "strided": lambda h, x: torch.cat([h[..., ::2], h[..., 1::2]], dim=-1),
    "gather": lambda h, x: h[torch.tensor([2, 0, 0, 1])[: h.shape[0]] % h.shape[0]],
    "mask": lambda h, x: h[torch.arange(h.shape[0]) % 2 == 0],
    "index_select": lambda h, x: h.index_select(0, torch.arange(h.shape[0]).flip(0)),
    "repeat": lambda h, x: h.repeat_interleave(2, dim=0).view(h.shape[0], -1)[:, :4],
    "cat rows": lambda h, x: torch.cat([h, h[:1]]),
    "linear": lambda h, x: F.linear(h, nn.Parameter(torch.randn(4, 4))),
}
MIXING_OPS = {
    "rows mixed within blocks": lambda h, x: _expert_blocks(h, lambda b: b + b.flip(1)),
    "block statistic": lambda h, x: _expert_blocks(h, lambda b: b - b.mean(1, keepdim=True)),
    "blocks transposed": lambda h, x: _expert_blocks(h, lambda b: b.transpose(0, 1).reshape(b.shape)),
    "mean over rows": lambda h, x: h - h.mean(0),
    "roll rows": lambda h, x: h.roll(1, 0),
    "softmax over rows": lambda h, x: torch.softmax(h, dim=0),
    "flip rows": lambda h, x: h.flip(0),
    "matmul across rows": lambda h, x: h.t() @ h,
    "other rows": lambda h, x: h + x[: h.shape[0]].flip(0) if h.shape[0] <= x.shape[0] else h.sum(0, keepdim=True),
    "in-place copy": lambda h, x: h.clone().index_copy_(0, torch.tensor([0]), h[-1:]) if h.shape[0] > 1 else h.sum(0),
}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(sorted(ROW_OPS) + sorted(MIXING_OPS)), min_size=1, max_size=5))
def test_labels_never_name_a_row_its_values_do_not_come_from(ops):
    """Random chains of row-wise, gathering and row-mixing ops: wherever a tensor gets labels, each
    of its rows depends (Jacobian) only on the rows of the input its label names."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, requires_grad=True)
    from divebatch.layers.generic import DirectUseRecorder

    seen = []

    class Recording(DirectUseRecorder):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = super().__torch_function__(func, types, args, kwargs)
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                lab = self.experts.labels.of(t) if isinstance(t, torch.Tensor) else None
                if lab is not None and t.requires_grad:
                    seen.append((t, lab))
            return out

    ops_table = {**ROW_OPS, **MIXING_OPS}
    with Recording({"w": _OWN}, x) as recorder:
        h = x * 1.0
        for name in ops:
            h = ops_table[name](h, x)
    assert recorder.experts is not None
    if recorder.experts.labels.broken:
        return  # an in-place op may have moved rows: nothing of this forward is used (refused or replayed)
    for t, lab in seen:
        flat, lab = t.reshape(lab.numel(), -1), lab.reshape(-1)  # (expert blocks: [E, M] labels)
        for r in range(flat.shape[0]):
            (g,) = torch.autograd.grad(flat[r].sum(), x, retain_graph=True, allow_unused=True)
            if g is None:
                continue
            depends = set(g.abs().sum(1).nonzero().flatten().tolist())
            assert depends <= {int(lab[r])}, (ops, r, depends, int(lab[r]))


# --------------------------------------------------------------------------- norms from recorded products
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 4), per_sample=st.integers(1, 3), n=st.integers(0, 14), E=st.integers(1, 3),
       grad_on_left=st.booleans(), stacked=st.booleans(), one_expert_at_a_time=st.booleans(),
       seed=st.integers(0, 2**16))
def test_norms_and_sums_from_products_match_per_sample_gradients(B, per_sample, n, E, grad_on_left, stacked,
                                                                 one_expert_at_a_time, seed):
    """Any rows (repeated, out of order, some with no expert) of any samples and experts, padded
    for all experts at once or one expert at a time: the norms and summed gradient equal those of
    the explicitly formed per-sample gradients."""
    g = torch.Generator().manual_seed(seed)
    E = E if stacked else 1
    P0, P1 = 3, 2
    rows = torch.randn(n, P1 if grad_on_left else P0, generator=g)
    grad = torch.randn(n, P0 if grad_on_left else P1, generator=g)
    positions = torch.randint(0, B * per_sample, (n,), generator=g)
    experts = torch.randint(-1, E, (n,), generator=g) if stacked else torch.zeros(n, dtype=torch.int64)
    product = RowProduct(rows, positions, experts, grad_on_left, B * per_sample, stacked, grad.shape[1])
    entries = [(product, grad, 0.5)]
    shape = torch.Size((E, P0, P1) if stacked else (P0, P1))

    expected = torch.zeros(B, *shape, dtype=torch.float64)
    for r in range(n):
        if experts[r] < 0:
            continue
        left, right = (0.5 * grad[r], rows[r]) if grad_on_left else (rows[r], 0.5 * grad[r])
        outer = torch.outer(left, right).double()
        b = int(positions[r]) // per_sample
        if stacked:
            expected[b, experts[r]] += outer
        else:
            expected[b] += outer
    sq = expected.flatten(1).square().sum(1)
    with mock.patch.object(experts_module, "max_extra_bytes", lambda device_type: 1 if one_expert_at_a_time else 2**30):
        assert torch.allclose(rows_norms(entries, B, E).double(), sq, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rows_grad_sum(entries, B, shape).double(), expected.sum(0), rtol=1e-5, atol=1e-6)
    part = slice(0, max(1, B // 2))
    assert torch.allclose(rows_per_sample(entries, B, shape, part).double(), expected[part], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("equation, operands, how", [
    ("bti,io->bto", "xw", "matmul"), ("...i,io->...o", "xw", "matmul"), ("nd,hd->nh", "xw", "linear"),
    ("io,bti->bto", "wx", "matmul"), ("b t i , o i -> b t o", "xw", "linear"),
    ("bti,io->btio", "xw", None), ("bti,io->tbo", "xw", None), ("bti,ii->bti", "xw", None),
    ("bti,io->bo", "xw", None), ("bti,bo->bti", "xw", None), ("bti,io,oj->btj", "xw", None),
])
def test_einsum_is_read_only_as_a_matrix_product(equation, operands, how):
    """An einsum of rows with a 2-D weight is read as ``x @ w`` or ``F.linear(x, w)`` only where it
    is one; any other equation is left to the replay."""
    from divebatch.layers.experts import _einsum_product

    x, w = torch.randn(2, 3, 4), torch.randn(4, 5) if how != "linear" else torch.randn(5, 4)
    args = (equation,) + tuple({"x": x, "w": w}[c] for c in operands)
    found = _einsum_product(args, {})
    assert (found[2] if found else None) == how
    if found:
        assert found[0] is x and found[1] is w




@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_hugging_face_experts_compiled_match_torch_func(arch):
    """Under torch.compile the block that calls the experts runs eagerly (it flattens and routes the
    tokens, and the experts' rows are read from that graph), so the numbers are eager mode's; Qwen2-MoE's
    shared expert and its gate are Linears on the flattened rows."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _moe_model(arch, "eager")
    compiled = torch.compile(model, backend="aot_eager")
    tokens, targets = torch.randint(0, 97, (3, 6)), torch.randint(0, 97, (3, 6))
    routes = tracked_and_checked(model, token_loss, tokens, targets, forward=compiled)
    assert routes["net.model.layers.0.mlp.experts"] == "generic (row uses)", routes
    torch._dynamo.reset()
