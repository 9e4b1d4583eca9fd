"""GradNormTracker on a model run through torch.compile: the same exact numbers as eager.

The tracker's forward-side hooks are excluded from compilation (``torch.compiler.disable``):
dynamo breaks the graph at each tracked module and runs that module eagerly with its hooks, the
code between tracked modules stays compiled, and the backward hooks see real gradients.
"""

from __future__ import annotations

import pytest
import torch

from divebatch import GradNormTracker

from .models_zoo import ZOO, sample_loss
from .oracle import reference_norms, rel_err
from .test_tied import make_case, token_loss

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
