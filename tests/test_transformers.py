"""Hugging Face GPT-2 (tied wte/lm_head, Conv1D projections) tracked exactly, against torch.func."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers import linear

from .oracle import reference_norms, rel_err, tracked_and_checked

transformers = pytest.importorskip("transformers")

RTOL = 1e-4
BF16_RTOL = 2e-2  # bfloat16 autocast on both sides: the same forward, its products summed in other orders


class GPT2Logits(nn.Module):
    """A tiny GPT2LMHeadModel returning logits; ``per_sample_positions`` passes position ids [B, T]."""

    def __init__(self, per_sample_positions=True, dropout=0.0):
        super().__init__()
        config = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=24, n_layer=2, n_head=4,
                                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                         bos_token_id=0, eos_token_id=0)
        self.lm = transformers.GPT2LMHeadModel(config)
        self.per_sample_positions = per_sample_positions

    def forward(self, tokens):
        positions = None
        if self.per_sample_positions:
            positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
        return self.lm(input_ids=tokens, position_ids=positions).logits


def token_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def gpt2_case(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = GPT2Logits(**kwargs)
    return model, torch.randint(0, 97, (3, 9)), torch.randint(0, 97, (3, 9))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gpt2_matches_torch_func(reduction, fused, monkeypatch):
    # At these tiny shapes (T = 9) the CPU cost model would send some projections to the Gram
    # route; without its per-tile cost every projection takes the fused path under test.
    monkeypatch.setattr(linear, "FUSED_TILE_COST", 0.0)
    model, tokens, targets = gpt2_case()
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight  # the tie under test
    scale = 1.0 if reduction == "sum" else 1.0 / tokens.shape[0]
    (scale * token_loss(model(tokens), targets)).backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with GradNormTracker(model, reduction, fused=fused) as tracker:
        (scale * token_loss(model(tokens), targets)).backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert "lm.transformer.wte+lm.lm_head" in stats.per_layer
    # Conv1D takes the linear routes (fused: its weight gradient comes from the per-sample work).
    conv1d = [name for name in routes if name.endswith(("c_attn", "c_proj", "c_fc"))]
    expected = {"fused-instantiate"} if fused else {"ghost", "instantiate"}
    assert len(conv1d) == 8 and {routes[name] for name in conv1d} <= expected
    for name, param in model.named_parameters():
        assert rel_err(param.grad, plain_grads[name]) <= 1e-5, name


def test_gpt2_default_positions_under_compile():
    """GPT-2 called as a user calls it (default ``[1, T]`` position ids) through ``torch.compile``: its
    position lookup runs in compiled code, where it cannot be followed to its broadcast, so its output
    is returned expanded to the batch; the logits, autograd's gradients and the norms stay exact."""
    torch._dynamo.reset()
    model, tokens, targets = gpt2_case(per_sample_positions=False)
    expected = model(tokens)
    token_loss(expected, targets).backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    try:
        with GradNormTracker(model, "sum") as tracker:
            logits = compiled(tokens)
            token_loss(logits, targets).backward()
            stats = tracker.collect()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(logits, expected)
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert stats.per_layer["lm.transformer.wpe"].shape == (3,)
    for name, param in model.named_parameters():
        assert rel_err(param.grad, plain_grads[name]) <= 1e-5, name


def test_gpt2_conv1d_weight_norms_per_layer():
    model, tokens, targets = gpt2_case(seed=1)
    with GradNormTracker(model, "sum") as tracker:
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    _, per_param, _ = reference_norms(model, token_loss, tokens, targets)
    for name in ("lm.transformer.h.0.attn.c_attn", "lm.transformer.h.1.mlp.c_proj"):
        expected = per_param[f"{name}.weight"] + per_param[f"{name}.bias"]
        assert rel_err(stats.per_layer[name], expected) <= RTOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_default_position_ids_broadcast_over_the_batch_are_exact(fused):
    """GPT-2's default position ids are [1, T]: the position table's output is broadcast over the
    batch, so autograd sums the samples' parts before its output grad; the tracker follows the
    output to the broadcasting add and takes the per-sample grads there."""
    model, tokens, targets = gpt2_case(per_sample_positions=False)
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    assert routes["lm.transformer.wpe"] == "embedding"
    assert torch._C._len_torch_function_stack() == 0  # the watcher was left when the backward began


def test_a_batch_of_one_needs_no_watcher():
    model, tokens, targets = gpt2_case(per_sample_positions=False)
    tokens, targets = tokens[:1], targets[:1]
    with GradNormTracker(model, "sum") as tracker:
        for _ in range(2):
            token_loss(model(tokens), targets).backward()
            stats = tracker.collect()
            model.zero_grad()
        depth = []
        model.lm.transformer.wpe.register_forward_hook(lambda *_: depth.append(torch._C._len_torch_function_stack()))
        model(tokens)
        assert tracker._last_batch == 1 and depth == [0]  # after the first forward: nothing watched
    per_sample, _, _ = reference_norms(model, token_loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= RTOL


class MaskedLM(nn.Module):
    """A tiny BERT or RoBERTa masked LM (tied decoder, decoder bias also registered on its parent)
    returning logits, with per-sample position ids."""

    def __init__(self, kind):
        super().__init__()
        common = dict(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if kind == "bert":
            self.lm = transformers.BertForMaskedLM(transformers.BertConfig(max_position_embeddings=16, **common))
        else:
            self.lm = transformers.RobertaForMaskedLM(
                transformers.RobertaConfig(max_position_embeddings=20, pad_token_id=1, **common))

    def forward(self, tokens):
        positions = torch.arange(2, tokens.shape[1] + 2).expand(tokens.shape[0], -1)
        return self.lm(input_ids=tokens, position_ids=positions).logits


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_masked_lm_matches_torch_func(kind, fused):
    torch.manual_seed(0)
    model = MaskedLM(kind)
    head = model.lm.cls.predictions if kind == "bert" else model.lm.lm_head
    assert head.decoder.bias is head.bias  # the aliased parameter under test
    tokens, targets = torch.randint(2, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert max(stats.unaccounted.values()) <= 1e-5


class Logits(nn.Module):
    """A Hugging Face model called with its input under ``key``, returning the logits."""

    def __init__(self, net, key):
        super().__init__()
        self.net, self.key = net, key

    def forward(self, x):
        return self.net(**{self.key: x}).logits


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_llama_matches_torch_func(fused):
    """Llama (RMSNorm matched by its forward's code, grouped-query attention, SiLU MLP, rotary
    positions: no position table, so the default position ids are fine)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=40, max_position_embeddings=16)
    model = Logits(transformers.LlamaForCausalLM(config), "input_ids")
    tokens, targets = torch.randint(0, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    norms = [name for name in routes if name.endswith("norm")]
    assert len(norms) == 5 and all(routes[name] == "instantiate" for name in norms)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_convnext_matches_torch_func_without_replay(fused):
    """ConvNeXt: channels-first ``ConvNextLayerNorm`` (nn.LayerNorm with its own forward) and the
    blocks' layer scale take the broadcast-uses route; nothing is replayed."""
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                         num_labels=5, image_size=16, patch_size=4)
    model = Logits(transformers.ConvNextForImageClassification(config), "pixel_values")
    pixels, labels = torch.randn(3, 3, 16, 16), torch.randint(0, 5, (3,))

    def loss(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    routes = tracked_and_checked(model, loss, pixels, labels, fused)
    norms = [name for name, m in model.named_modules() if type(m).__name__ == "ConvNextLayerNorm"]
    assert len(norms) == 4  # channels-first (stem, downsampling) and channels-last (blocks)
    assert all(routes[name] == "generic (broadcast uses)" for name in norms)
    assert {route for route in routes.values() if route.startswith("generic")} == {"generic (broadcast uses)"}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_gemma_matches_torch_func_without_replay(fused):
    """Gemma: its RMSNorm scales by ``1.0 + weight.float()`` (a constant added to the parameter, so
    its use is still a broadcast product), and its embedding multiplies the rows by a constant
    (``GemmaTextScaledWordEmbedding``, tied to the head)."""
    torch.manual_seed(0)
    config = transformers.GemmaConfig(vocab_size=97, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=12, intermediate_size=40,
                                      max_position_embeddings=16)
    model = Logits(transformers.GemmaForCausalLM(config), "input_ids")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)  # Gemma initialises them at 0
    tokens, targets = torch.randint(0, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    norms = [name for name, m in model.named_modules() if type(m).__name__ == "GemmaRMSNorm"]
    assert len(norms) == 3 and all(routes[name] == "generic (broadcast uses)" for name in norms)
    assert routes["net.model.embed_tokens"] == "embedding"  # its scaled forward, tied to the head


class Seq2SeqLogits(nn.Module):
    """An encoder-decoder LM fed the same tokens on both sides (teacher forcing, shifted)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, tokens):
        return self.net(input_ids=tokens, decoder_input_ids=tokens.roll(1, dims=1)).logits


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("kind", ["marian", "pegasus"])
def test_seq2seq_shared_embeddings_match_torch_func(kind, fused):
    """Marian and Pegasus: one weight shared by ``shared``, the encoder's and the decoder's
    (scaled) embeddings and the output layer; sinusoidal positions (no parameters)."""
    torch.manual_seed(0)
    common = dict(vocab_size=97, d_model=24, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=16,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                  decoder_start_token_id=0, scale_embedding=True)
    if kind == "marian":
        net = transformers.MarianMTModel(transformers.MarianConfig(**common))
    else:
        net = transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(**common))
    model = Seq2SeqLogits(net)
    tokens, targets = torch.randint(1, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    embeddings = [name for name, route in routes.items() if route == "embedding"]
    assert embeddings == ["net.model.shared"]  # encoder and decoder embeddings are its aliases


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_t5_relative_position_bias_matches_torch_func(fused):
    """T5: the relative-position bias is looked up with [q, k] buckets (no batch dim), permuted,
    masked with torch.where and passed as every layer's attention mask; the tracker follows it to
    those uses and splits its gradient per sample. Shared embeddings, T5LayerNorm (broadcast uses)."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=97, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = Seq2SeqLogits(transformers.T5ForConditionalGeneration(config))
    tokens, targets = torch.randint(1, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    biases = [name for name in routes if name.endswith("relative_attention_bias")]
    assert len(biases) == 2 and all(routes[name] == "embedding" for name in biases)  # encoder, decoder


def _padded_models():
    """Tiny configs of a causal LM, a masked LM and an encoder-decoder, with dropout 0.1."""
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=97, n_positions=16, n_embd=24, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
        "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
            max_position_embeddings=16, pad_token_id=0)),
        "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=97, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
            relative_attention_num_buckets=8, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0)),
        "deberta-v3": lambda: deberta_v3(dropout=0.1).net,
    }


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("kind, autocast", [("gpt2", False), ("bert", False), ("t5", False), ("gpt2", True),
                                            ("t5", True), ("deberta-v3", True)],
                         ids=["gpt2", "bert", "t5", "gpt2-autocast", "t5-autocast", "deberta-v3-autocast"])
def test_padded_batch_through_the_models_own_loss_matches_the_same_forward(kind, autocast, fused):
    """How a fine-tuning loop calls the model: sequences padded to one length, the attention
    mask, ``labels`` with -100 on the padding, the model's own loss (a mean over the labelled
    tokens, so c = 1 / n_labelled), dropout in training mode, and bfloat16 autocast (``autocast``).
    T5 then meets its relative-position bias with each sample's padding mask
    (``torch.where(mask, bias, min)``): it broadcasts the shared bias over the samples. Under
    autocast DeBERTa-v3's normalised table is float32 and its uses bfloat16. Reference: each
    sample's summed token loss backpropagated through the same forward (same dropout draws,
    same autocast); the tolerance under autocast is the bfloat16 one of the other tests."""
    torch.manual_seed(0)
    net = _padded_models()[kind]().train()
    tokens = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(tokens)
    mask[1, 6:] = mask[2, 3:] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    labels = tokens.masked_fill(mask == 0, -100)
    inputs = dict(input_ids=tokens, attention_mask=mask)
    if kind == "t5":
        inputs["decoder_input_ids"] = tokens
    causal = kind == "gpt2"
    targets = labels[:, 1:] if causal else labels
    with GradNormTracker(net, 1.0 / int(targets.ne(-100).sum()), fused=fused) as tracker:
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = net(**inputs, labels=labels).loss
        loss.backward()
        stats = tracker.collect()
    net.zero_grad()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = net(**inputs).logits.float()
    logits = logits[:, :-1] if causal else logits
    losses = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), reduction="none").view(3, -1).sum(1)
    params = [p for p in net.parameters() if p.requires_grad]
    expected = torch.stack([sum(g.double().square().sum() for g in torch.autograd.grad(
        losses[b], params, retain_graph=True, allow_unused=True, materialize_grads=True)) for b in range(3)])
    assert rel_err(stats.per_sample, expected) <= (BF16_RTOL if autocast else RTOL)
    assert max(stats.unaccounted.values()) <= (2e-2 if autocast else 1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("version", [1, 2], ids=["swin", "swinv2"])
def test_swin_windowed_attention_matches_the_same_forward(version, fused):
    """Swin: each image's windows folded into the batch dim (shifted every other block); v1's
    relative-position bias a module called with no input (replayed per image: it is tiny), v2's
    an MLP of a constant table, its attention's own logit scale clamped and broadcast over every
    window (nothing replayed). Dropout and stochastic depth in training mode. Reference: each
    image's loss backpropagated through the same forward."""
    torch.manual_seed(0)
    settings = dict(image_size=32, patch_size=8, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                    window_size=2, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                    drop_path_rate=0.1)
    if version == 1:
        net = transformers.SwinForImageClassification(transformers.SwinConfig(**settings)).train()
    else:
        net = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**settings)).train()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 1])
    with GradNormTracker(net, "mean", fused=fused) as tracker:
        torch.manual_seed(3)
        net(pixel_values=images, labels=labels).loss.backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    net.zero_grad()
    torch.manual_seed(3)
    losses = F.cross_entropy(net(pixel_values=images).logits, labels, reduction="none")
    params = [p for p in net.parameters() if p.requires_grad]
    expected = torch.stack([sum(g.double().square().sum() for g in torch.autograd.grad(
        losses[b], params, retain_graph=True, allow_unused=True, materialize_grads=True)) for b in range(3)])
    assert rel_err(stats.per_sample, expected) <= RTOL
    assert max(stats.unaccounted.values()) <= 1e-5
    assert "generic (vmap vjp)" not in routes.values()  # nothing replayed
    bias_modules = {name for name in routes if name.endswith("relative_position_bias")}  # v1's 1-row bias
    assert bool(bias_modules) == (version == 1)
    assert all(routes[name] == "generic (computed weights)" for name in bias_modules)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("kind", ["bert", "electra", "roberta", "roformer", "deberta-v3"])
def test_multiple_choice_heads_match_the_same_forward(kind, fused):
    """A multiple-choice head merges [B, C, T] into [B*C, T] before the encoder: the embedding's ids
    are the input's memory (its questions), the token types a [1, T] buffer expanded over the rows
    (a shared lookup; RoBERTa gathers them, and computes its position ids, from the merged ids row
    by row; RoFormer makes them as zeros of the merged shape), and every layer after is proven from
    the graph (through RoFormer's rotation: a stack of slices); DeBERTa-v3's shared relative-position
    projections, repeated once per merged row (``repeat(B*C, 1, 1)``), are grouped by the question of
    the rows they meet in ``bmm``; one norm per question.
    Padding and dropout 0.1. Reference: each question's loss backpropagated through the same forward."""
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                  max_position_embeddings=16, pad_token_id=0)
    if kind == "bert":
        net = transformers.BertForMultipleChoice(transformers.BertConfig(**common))
    elif kind == "electra":
        net = transformers.ElectraForMultipleChoice(transformers.ElectraConfig(embedding_size=16, **common))
    elif kind == "roberta":
        net = transformers.RobertaForMultipleChoice(transformers.RobertaConfig(**dict(common, pad_token_id=1)))
    elif kind == "roformer":
        net = transformers.RoFormerForMultipleChoice(transformers.RoFormerConfig(embedding_size=24, **common))
    else:
        settings = dict(_deberta_settings(0.1), position_buckets=4, norm_rel_ebd="layer_norm", share_att_key=True,
                        pad_token_id=0, pooler_hidden_size=24)
        net = transformers.DebertaV2ForMultipleChoice(transformers.DebertaV2Config(**settings))
    net.train()
    ids = torch.randint(3, 97, (3, 4, 6))
    mask = torch.ones_like(ids)
    mask[1, :, 4:] = mask[2, 2, 3:] = 0
    labels = torch.tensor([0, 3, 1])
    with GradNormTracker(net, "mean", fused=fused) as tracker:
        torch.manual_seed(3)
        net(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        stats = tracker.collect()
    net.zero_grad()
    torch.manual_seed(3)
    losses = F.cross_entropy(net(input_ids=ids, attention_mask=mask).logits, labels, reduction="none")
    params = [p for p in net.parameters() if p.requires_grad]
    expected = torch.stack([sum(g.double().square().sum() for g in torch.autograd.grad(
        losses[b], params, retain_graph=True, allow_unused=True, materialize_grads=True)) for b in range(3)])
    assert stats.per_sample.shape == (3,)
    assert rel_err(stats.per_sample, expected) <= RTOL
    assert max(stats.unaccounted.values()) <= 1e-5


def _deberta_settings(dropout):
    """Tiny sizes and relative attention, without absolute positions (DeBERTa v1 and v2/v3)."""
    return dict(
        vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        relative_attention=True, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
        position_biased_input=False)


def deberta_v3(dropout=0.0, **overrides):
    """A tiny DeBERTa-v3 masked LM (the layout of microsoft/deberta-v3-*: relative attention with
    log buckets, the position table normalised by the encoder's LayerNorm, keys shared with the
    positions' projections, no absolute positions)."""
    settings = dict(_deberta_settings(dropout), position_buckets=4, norm_rel_ebd="layer_norm", share_att_key=True)
    config = transformers.DebertaV2Config(**{**settings, **overrides})
    return MaskedLogits(transformers.DebertaV2ForMaskedLM(config))


def deberta_v1(dropout=0.0, **overrides):
    """A tiny DeBERTa (v1, microsoft/deberta-*) masked LM with relative attention: the encoder
    passes ``rel_embeddings.weight`` itself down to every layer, whose attention drops it out,
    slices it and projects it (``pos_proj``, ``pos_q_proj``); its query and value biases are
    split into heads by ``view`` and ``permute``."""
    config = transformers.DebertaConfig(**{**_deberta_settings(dropout), **overrides})
    return MaskedLogits(transformers.DebertaForMaskedLM(config))


class MaskedLogits(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, tokens):
        return self.net(input_ids=tokens).logits


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("overrides", [{}, {"share_att_key": False}, {"position_buckets": -1}],
                         ids=["v3", "own-position-projections", "no-buckets"])
def test_deberta_relative_attention_matches_torch_func_without_replay(fused, overrides):
    """DeBERTa-v2/v3: the encoder reads ``rel_embeddings.weight`` whole and normalises it with its
    LayerNorm (a ``[2k, d]`` tensor shared by the samples); every layer projects it by Linears on a
    ``[1, 2k, d]`` view and meets the queries through ``repeat`` and ``bmm``."""
    torch.manual_seed(0)
    model = deberta_v3(**overrides)
    tokens, targets = torch.randint(3, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    assert routes["net.deberta.encoder.rel_embeddings"] == "embedding"
    assert not any(route.startswith("generic") for route in routes.values())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("version", ["v1", "v2-table-not-normalised"])
def test_deberta_table_passed_to_the_layers_matches_torch_func_without_replay(fused, version):
    """DeBERTa v1, and v2 with ``norm_rel_ebd="none"``: ``rel_embeddings.weight`` is handed to each
    layer as an argument and sliced there before its first layer (the Embedding is never called)."""
    torch.manual_seed(0)
    model = deberta_v1() if version == "v1" else deberta_v3(norm_rel_ebd="none")
    tokens, targets = torch.randint(3, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    assert routes["net.deberta.encoder.rel_embeddings"] == "embedding"
    assert not any(route == "generic (vmap vjp)" for route in routes.values())


@pytest.mark.parametrize("make", [deberta_v3, deberta_v1], ids=["v3", "v1"])
def test_deberta_with_dropout_matches_the_same_forward(make):
    """Training-mode dropout, on the shared position table in every layer too (one mask for all
    samples): the per-sample gradients of that forward."""
    from .oracle import same_forward_norms

    torch.manual_seed(0)
    model = make(dropout=0.2).train()
    tokens, targets = torch.randint(3, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    with GradNormTracker(model, "sum") as tracker:
        torch.manual_seed(3)
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    assert rel_err(stats.per_sample, same_forward_norms(model, token_loss, tokens, targets, 3)) <= RTOL


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_opt_flattened_mlp_matches_torch_func(fused, pre_norm):
    """OPT flattens samples and tokens into rows before ``final_layer_norm``, ``fc1`` and ``fc2``
    (``hidden.reshape(-1, d)``); the rows are assigned to samples from the autograd graph."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
                                    do_layer_norm_before=pre_norm, dropout=0.0, attention_dropout=0.0)
    model = Logits(transformers.OPTForCausalLM(config), "input_ids")
    tokens, targets = torch.randint(2, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    assert {"net.model.decoder.layers.0.fc1", "net.model.decoder.layers.1.final_layer_norm"} <= set(routes)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_mixtral_experts_on_rows_match_torch_func(fused):
    """Mixtral: its sparse MoE block flattens samples and tokens into rows for the router (which
    returns its logits and the top-k scores computed from them) and the experts (3-D weights,
    ``torch._grouped_mm``); both products are read per (expert, sample) group, no replay
    (more architectures and expert implementations: tests/test_experts.py)."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                        num_experts_per_tok=2, max_position_embeddings=16)
    model = Logits(transformers.MixtralForCausalLM(config), "input_ids")
    tokens, targets = torch.randint(0, 97, (3, 7)), torch.randint(0, 97, (3, 7))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    assert routes["net.model.layers.1.mlp.experts"] == routes["net.model.layers.1.mlp.gate"] == "generic (row uses)"


def test_bloom_matches_per_sample_autograd():
    """BLOOM (ALiBi, fused QKV): its GELU is a custom autograd.Function torch.func cannot
    transform, so the reference is each sample's own autograd gradient (tests/oracle.py)."""
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=97, hidden_size=16, n_layer=2, n_head=2)
    model = Logits(transformers.BloomForCausalLM(config), "input_ids")
    tokens, targets = torch.randint(0, 97, (3, 7)), torch.randint(0, 97, (3, 7))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused=True)
    assert routes["net.transformer.h.1.self_attention.query_key_value"] in ("ghost", "instantiate", "fused-instantiate")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_lora_adapters_match_torch_func(fused):
    """LoRA fine-tuning with peft (frozen base model, trainable ``lora_A``/``lora_B`` Linears on the
    attention and MLP projections): only the adapters are tracked, exactly."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=40, max_position_embeddings=16)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    net = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    for name, p in net.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the A factors would get no gradient
            nn.init.normal_(p, std=0.1)
    model = Logits(net, "input_ids")
    tokens, targets = torch.randint(0, 97, (3, 9)), torch.randint(0, 97, (3, 9))
    routes = tracked_and_checked(model, token_loss, tokens, targets, fused)
    assert len(routes) == 12 and all(".lora_A." in name or ".lora_B." in name for name in routes)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_gpt2_resized_and_partly_frozen_after_the_tracker_was_made(fused):
    """``resize_token_embeddings`` (new special tokens) puts a new, still tied, embedding and head in
    place; then all but the last block is frozen: each step re-planned, exact (tests/test_replan.py)."""
    model, tokens, targets = gpt2_case()
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        token_loss(model(tokens), targets).backward()
        tracker.collect()
        model.lm.resize_token_embeddings(101, mean_resizing=False)
        assert model.lm.lm_head.weight is model.lm.transformer.wte.weight
        gen = torch.Generator().manual_seed(2)
        tokens, targets = torch.randint(0, 101, (3, 9), generator=gen), torch.randint(0, 101, (3, 9), generator=gen)
        for step in ("resized", "last block"):
            if step == "last block":
                model.requires_grad_(False)
                model.lm.transformer.h[-1].requires_grad_(True)
            model.zero_grad()
            token_loss(model(tokens), targets).backward()
            stats = tracker.collect()
            ref, _, ref_batch = reference_norms(model, token_loss, tokens, targets)
            assert rel_err(stats.per_sample, ref) <= RTOL, step
            assert rel_err(stats.batch_grad_sq, ref_batch) <= RTOL, step
        assert all(name.startswith("lm.transformer.h.1.") for name in stats.per_layer)


def tiny_jamba():
    """A tiny Jamba (Mamba layers replayed per sample, attention, experts) with its default
    ``use_cache=True``: a training forward creates a cache and hands it to every layer."""
    torch.manual_seed(0)
    config = transformers.JambaConfig(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, num_experts=2,
                                      num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                                      expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=3,
                                      mamba_expand=2, use_mamba_kernels=False, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=1)
    assert config.use_cache
    return transformers.JambaForCausalLM(config)


def test_jamba_with_its_default_cache_matches_per_sample_autograd():
    """The Mamba mixer takes the generic route's replay, which leaves the cache out (the forward
    has filled it already: replaying into it failed on its sizes); each sample's replay must give
    the forward's outputs again, and the norms are each sample's own backward's."""
    from .oracle import each_sample_backward, second_backward_stats

    model = Logits(tiny_jamba(), "input_ids")
    tokens, targets = torch.randint(2, 97, (3, 7)), torch.randint(0, 97, (3, 7))
    stats = second_backward_stats(model, token_loss, model, tokens, targets)
    assert rel_err(stats.per_sample, each_sample_backward(model, token_loss, model, tokens, targets)) <= RTOL


def test_a_cache_holding_earlier_tokens_is_refused():
    """A forward continuing from a cache filled by an earlier one reads states the replay cannot
    have: refused, naming the cache, rather than norms of another function."""
    net = tiny_jamba()
    tokens = torch.randint(2, 97, (3, 7))
    with torch.no_grad():
        cache = net(input_ids=tokens[:, :4]).past_key_values
    with GradNormTracker(net, "sum") as tracker:
        with pytest.raises(RuntimeError, match=r"JambaMambaMixer was given a cache .*use_cache=False"):
            token_loss(net(input_ids=tokens[:, 4:], past_key_values=cache).logits, tokens[:, 4:]).backward()
            tracker.collect()


def tiny_causal_lm(model_type: str, **overrides):
    """A tiny ``AutoModelForCausalLM`` of ``model_type`` (2 layers, width 16, no dropout)."""
    settings = dict(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                    eos_token_id=1, use_cache=False, **overrides)
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in settings.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key in ("dropout", "attention_dropout", "hidden_dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    return Logits(transformers.AutoModelForCausalLM.from_config(config), "input_ids")


@pytest.mark.parametrize("model_type, module", [
    ("lfm3", "net.model.layers.0.conv"), ("jetmoe", "net.model.layers.0.self_attention")])
def test_layers_read_by_their_parents_match_per_sample_autograd(model_type, module):
    """LFM3's short convolution passes ``self.conv.weight`` to a causal convolution (as Kimi Linear's
    and Bailing's linear attention pass ``self.conv1d.weight``); JetMoE's attention calls its
    experts' ``map`` and ``reduce`` (which add their bias): read from their source, the parent takes
    the generic route for those layers (refused before as "not called through its forward")."""
    from .oracle import each_sample_backward

    overrides = dict(num_local_experts=3, num_experts_per_tok=2) if model_type == "jetmoe" else {}
    model = tiny_causal_lm(model_type, **overrides)
    tokens, targets = torch.randint(2, 97, (3, 7)), torch.randint(0, 97, (3, 7))
    with GradNormTracker(model, "sum", verify_every=0) as tracker:
        for _ in range(2):  # (the second backward is not verified)
            model.zero_grad()
            token_loss(model(tokens), targets).backward()
            stats = tracker.collect()
        assert {plan.module: plan.route for plan in tracker.plan()}[module].startswith("generic")
    assert rel_err(stats.per_sample, each_sample_backward(model, token_loss, model, tokens, targets)) <= RTOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("model_type", ["mpnet", "xlm"])
def test_shared_lookups_expanded_over_the_batch_match_torch_func(model_type, fused):
    """MPNet (all-mpnet-base-v2's encoder) expands its relative-position bias over the batch,
    ``expand((bsz, -1, q, k))``; XLM adds ``position_embeddings(ids).expand_as(tensor)``: both were
    refused (tests/test_shared_outputs.py)."""
    config = transformers.AutoConfig.for_model(model_type)
    settings = dict(vocab_size=97, hidden_size=16, emb_dim=16, num_hidden_layers=2, n_layers=2, num_attention_heads=2,
                    n_heads=2, intermediate_size=24, max_position_embeddings=64,
                    pad_token_id=0, pad_index=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    dropout=0.0, attention_dropout=0.0)
    for key, value in settings.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    model = Logits(transformers.AutoModelForMaskedLM.from_config(config), "input_ids")
    tokens, targets = torch.randint(3, 97, (3, 7)), torch.randint(0, 97, (3, 7))
    tracked_and_checked(model, token_loss, tokens, targets, fused)
