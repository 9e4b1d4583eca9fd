"""Activation checkpointing (torch.utils.checkpoint): the recomputed forward runs the tracker's
hooks a second time during backward; the numbers must stay exact, fused or not, reentrant or not."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from divebatch import GradNormTracker

from .oracle import reference_norms, rel_err
from .test_tied import make_case, token_loss

RTOL = 1e-4


class Checkpointed(nn.Module):
    """TiedLM's forward with a checkpointed region: the block alone, or embedding and block."""

    def __init__(self, lm, reentrant, with_embedding):
        super().__init__()
        self.lm, self.reentrant, self.with_embedding = lm, reentrant, with_embedding

    def block(self, h):
        return h + torch.tanh(self.lm.mid(self.lm.norm(h)))

    def forward(self, tokens):
        if self.with_embedding:
            # The reentrant variant needs an input that requires grad to build a graph at all.
            h = checkpoint(lambda t: self.block(self.lm.emb(t)), tokens, use_reentrant=False)
        else:
            h = checkpoint(self.block, self.lm.emb(tokens), use_reentrant=self.reentrant)
        return self.lm.head(h)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("reentrant,with_embedding", [(False, False), (True, False), (False, True)],
                         ids=["block", "block-reentrant", "embedding-and-block"])
def test_checkpointed_model_matches_torch_func(fused, reentrant, with_embedding):
    lm, tokens, targets = make_case(padding_idx=2)
    model = Checkpointed(lm, reentrant, with_embedding)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        for _ in range(2):  # the second step starts from the state the first one left
            model.zero_grad()
            token_loss(model(tokens), targets).backward()
            stats = tracker.collect()
            per_sample, _, batch = reference_norms(lm, token_loss, tokens, targets)  # same function, no checkpoint
            assert rel_err(stats.per_sample, per_sample) <= RTOL
            assert rel_err(stats.batch_grad_sq, batch) <= RTOL


class CheckpointedRelativeBias(nn.Module):
    """A relative-position bias shared by the samples (looked up with ``[q, k]`` buckets) used as
    the attention mask of two checkpointed layers. ``made_in``: ``"model"`` computes it before the
    layers and passes it in (DeBERTa's table); ``"first-layer"`` computes it inside the first layer,
    which returns it to the next (T5's ``position_bias``). ``checkpointed=False`` runs the same
    function without checkpoints (the reference)."""

    def __init__(self, made_in, reentrant, checkpointed=True, vocab=11, dim=8, heads=2, buckets=5):
        super().__init__()
        self.made_in, self.reentrant, self.checkpointed, self.heads = made_in, reentrant, checkpointed, heads
        self.tokens, self.bias = nn.Embedding(vocab, dim), nn.Embedding(buckets, heads)
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(2)])
        self.head = nn.Linear(dim, vocab)

    def position_bias(self, T, device):
        position = torch.arange(T, device=device)
        buckets = (position[None, :] - position[:, None]).abs().clamp(max=self.bias.num_embeddings - 1)
        return self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, q, k]

    def layer(self, i, h, bias):
        B, T, _ = h.shape
        if bias is None:
            bias = self.position_bias(T, h.device)
        q, k, v = self.qkv[i](h).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return h + attended.transpose(1, 2).reshape(B, T, -1), bias

    def forward(self, idx):
        h = self.tokens(idx)
        bias = self.position_bias(idx.shape[1], idx.device) if self.made_in == "model" else None
        for i in range(len(self.qkv)):
            if self.checkpointed:
                h, bias = checkpoint(self.layer, i, h, bias, use_reentrant=self.reentrant)
            else:
                h, bias = self.layer(i, h, bias)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("made_in", ["model", "first-layer"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_an_output_shared_by_the_samples_across_checkpoints(made_in, reentrant):
    """Non-reentrant checkpoints keep the bias's uses in the autograd graph of the recomputed
    blocks, where the watcher follows them: exact. Reentrant ones hand each block a detached copy
    (and run it first under no_grad), so the uses cannot be followed: refused, saying to checkpoint
    with use_reentrant=False, not with the batch-dimension advice alone."""
    torch.manual_seed(0)
    model = CheckpointedRelativeBias(made_in, reentrant)
    tokens, targets = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    with GradNormTracker(model, "sum") as tracker:
        if reentrant:
            with pytest.raises(ValueError, match=r"module 'bias'.*reentrant.*use_reentrant=False"):
                token_loss(model(tokens), targets).backward()  # (refused by the check in the backward)
                tracker.collect()
            return
        token_loss(model(tokens), targets).backward()
        stats = tracker.collect()
    model.checkpointed = False
    per_sample, _, batch = reference_norms(model, token_loss, tokens, targets)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
