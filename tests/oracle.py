"""The exact reference for per-sample norms: torch.func per-sample gradients.

``reference_norms`` returns, for the unscaled per-sample losses ``l_i``, the per-sample
squared gradient norm per parameter, so tests can sum them per sample, per layer and for the
batch-gradient norm.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap


def per_sample_grads(model, loss_fn, inputs, targets, batch_dim=0):
    """``{param name: [B, *shape]}``: gradients of ``loss_fn(model(x_i), y_i)`` per sample, float64 sums."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(batch_dim),))
        return loss_fn(out, y.unsqueeze(0))

    try:
        return vmap(grad(one), in_dims=(None, batch_dim, 0))(params, inputs, targets)
    except RuntimeError as err:
        if not any(s in str(err) for s in ("dynamic shape", "data-dependent", "functorch transforms",
                                            "doesn't have storage",  # (``.tolist()`` under vmap)
                                            "in-place operation")):  # (a captured tensor mutated)
            raise
    # Data-dependent shapes or control flow (a mixture of experts gathering each expert's tokens,
    # GPT-2's mask code) have no batching rule: the same gradients one sample at a time, with
    # torch.func, or with plain autograd where a custom autograd.Function is not transformable
    # (BLOOM's). Each is the gradient of that sample's own loss: the definition being checked.
    samples = range(targets.shape[0])
    try:
        rows = [grad(one)(params, inputs.select(batch_dim, b), targets[b]) for b in samples]
    except RuntimeError as err:
        if not any(s in str(err) for s in ("functorch transforms", "in-place operation",
                                            "doesn't have storage")):  # (cuDNN's RNN re-flattens its weights)
            raise
        names = list(params)
        live = [dict(model.named_parameters())[n] for n in names]
        rows = []
        for b in samples:
            out = model(inputs.select(batch_dim, b).unsqueeze(batch_dim))
            rows.append(dict(zip(names, torch.autograd.grad(loss_fn(out, targets[b].unsqueeze(0)), live,
                                                            allow_unused=True, materialize_grads=True))))
    return {name: torch.stack([row[name] for row in rows]) for name in params}


def reference_norms(model, loss_fn, inputs, targets, batch_dim=0):
    """(per_sample [B], per_param {name: [B]}, batch_grad_sq scalar), float64."""
    grads = per_sample_grads(model, loss_fn, inputs, targets, batch_dim)
    per_param = {n: g.double().reshape(g.shape[0], -1).square().sum(1) for n, g in grads.items()}  # (0-d params too)
    per_sample = sum(per_param.values())
    batch = sum(g.double().sum(0).square().sum() for g in grads.values())
    return per_sample, per_param, batch


def same_forward_norms(model, loss_fn, inputs, targets, seed: int) -> torch.Tensor:
    """Per-sample squared gradient norms [B] (float64) of one forward run after
    ``torch.manual_seed(seed)``: a backward of each sample's own loss over that forward. For a
    model that draws random numbers (dropout, a router's jitter), whose draws no per-sample rerun
    can repeat: the same seed before the tracked forward gives the same draws, and these are the
    per-sample gradients of that forward by definition."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    out = model(inputs)
    rows = []
    for b in range(targets.shape[0]):
        grads = torch.autograd.grad(loss_fn(out[b:b + 1], targets[b:b + 1]), params, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        rows.append(sum(g.double().square().sum() for g in grads))
    return torch.stack(rows)


def autocast_checked(model, loss_fn, x, y, samples: int | None = None, dtype=torch.bfloat16, rtol=2e-2):
    """Track one backward of ``loss_fn(model(x).float(), y)`` (``loss_reduction="sum"``) with the
    forward under CPU autocast to ``dtype``, and check the norms of the first ``samples`` samples
    against each one's own forward and backward under the same autocast (``rtol``: the reference's
    gradients are ``dtype`` products too). Returns the tracked per-sample norms."""
    from divebatch import GradNormTracker

    with GradNormTracker(model, "sum") as tracker:
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        loss_fn(out.float(), y).backward()
        per_sample = tracker.collect().per_sample
    count = x.shape[0] if samples is None else samples
    expected = []
    for i in range(count):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            out = model(x[i:i + 1])
        loss_fn(out.float(), y[i:i + 1]).backward()
        expected.append(sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None))
    assert rel_err(per_sample[:count], torch.stack(expected)) <= rtol
    return per_sample


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (scale-aware relative error)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def tracked_step(model, loss, x, y, fused=True, forward=None):
    """Track one backward of ``loss(model(x), y)`` (``loss_reduction="sum"``): ``(stats, {module:
    route})``. ``forward``: what the step calls instead of ``model`` (its ``torch.compile`` wrapper)."""
    from divebatch import GradNormTracker

    with GradNormTracker(model, "sum", fused=fused) as tracker:
        loss((model if forward is None else forward)(x), y).backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    return stats, routes


def tracked_and_checked(model, loss, x, y, fused=True, rtol=1e-4, forward=None) -> dict[str, str]:
    """Track one backward (``tracked_step``), check the per-sample and batch norms against torch.func
    and that every gradient was accounted for; the route the tracker took per module."""
    stats, routes = tracked_step(model, loss, x, y, fused, forward)
    per_sample, _, batch = reference_norms(model, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= rtol
    assert rel_err(stats.batch_grad_sq, batch) <= rtol
    assert max(stats.unaccounted.values()) <= 1e-5
    return routes


def checked_step(tracker, model, loss, x, y, forward=None, rtol=1e-5):
    """One step of ``loss(model(x), y)`` (or ``forward(x)``) with an existing tracker
    (``loss_reduction="sum"``), its norms checked against torch.func over ``model``'s trainable
    parameters as they are now; the stats."""
    model.zero_grad()
    loss((forward or model)(x), y).backward()
    stats = tracker.collect()
    per_sample, _, batch = reference_norms(model, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) < rtol
    assert rel_err(stats.batch_grad_sq, batch) < rtol
    return stats


def assert_refused(model, loss, x, y, match: str) -> None:
    """One tracked backward (``loss_reduction="sum"``) is refused with a ValueError matching ``match``
    (raised in the backward or at ``collect()``)."""
    import pytest

    from divebatch import GradNormTracker

    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(ValueError, match=match):
            loss(model(x), y).backward()
            tracker.collect()


def per_layer_reference(per_param: dict, layer_names) -> dict:
    """Group per-parameter norms by the tracked module that owns them (longest name prefix)."""
    out = {}
    for pname, v in per_param.items():
        owners = [n for n in layer_names if n == "" or pname.startswith(n + ".")]
        if not owners:  # a parameter no layer reported must have had no gradient at all
            assert not v.any(), f"{pname} has per-sample gradients but no tracked layer reported it"
            continue
        owner = max(owners, key=len)
        out[owner] = out.get(owner, 0) + v
    return out


def conv_weight_oracle(x, g, kernel_size, stride, padding, dilation):
    """float64 per-sample squared weight-gradient norms ``[B]`` and the summed weight gradient
    ``[O, C * prod(kernel)]`` of a one-group convolution of ``x [B, C, *in]`` (zero ``padding``)
    whose output grad is ``g [B, O, *out]``, from torch.func's per-sample gradients."""
    conv = (None, torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[x.dim() - 2]
    x64, g64 = x.detach().double().cpu(), g.detach().double().cpu()
    weight = torch.zeros(g.shape[1], x.shape[1], *kernel_size, dtype=torch.float64)

    def loss(w, xb, gb):
        return (conv(xb[None], w, None, list(stride), list(padding), list(dilation)) * gb[None]).sum()

    if x.shape[0] == 0:  # (no samples: nothing to vmap over)
        return torch.zeros(0, dtype=torch.float64), torch.zeros(weight.shape[0], weight[0].numel(), dtype=torch.float64)
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(weight, x64, g64).flatten(2)
    return per_sample.square().sum((1, 2)), per_sample.sum(0).flatten(1)


def each_sample_backward(model, loss_fn, forward, inputs, targets) -> torch.Tensor:
    """Per-sample squared gradient norms [B] (float64) by one backward per sample through
    ``forward(inputs[b:b+1])`` (``forward`` may run ``model`` under autocast): the definition, where
    torch.func cannot run the forward or where the reference must round as the forward does."""
    rows = []
    for b in range(targets.shape[0]):
        model.zero_grad()
        loss_fn(forward(inputs[b:b + 1]), targets[b:b + 1]).backward()
        rows.append(sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None))
    return torch.stack(rows)


def second_backward_stats(model, loss_fn, forward, inputs, targets, **tracker_options):
    """The stats of the second of two tracked backwards of ``loss_fn(forward(inputs), targets)``
    (``loss_reduction="sum"``, ``verify_every=0``): a backward that is not verified, so no
    accounting check can catch a misread use there."""
    from divebatch import GradNormTracker

    with GradNormTracker(model, "sum", verify_every=0, **tracker_options) as tracker:
        for _ in range(2):
            model.zero_grad()
            loss_fn(forward(inputs), targets).backward()
            stats = tracker.collect()
    return stats
