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
