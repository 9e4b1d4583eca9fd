"""Trainable parameters that change after the tracker was made: layers frozen or unfrozen as
fine-tuning goes on, a new head, weights loaded with ``assign=True``. The tracker plans its hooks
from the parameters that require grad; it plans again as the next forward starts, so each step's
norms are those of the parameters trained in it (before, an unfrozen layer was left out of the
norms and a frozen one counted, with no error)."""

from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import divebatch.tracker as tracker_module
from divebatch import GradNormTracker

from .oracle import checked_step, reference_norms, rel_err

HOOKS = ["fused", "hooks"]


def loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def batch(samples=5, features=6):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(samples, features, generator=gen), torch.randint(0, 3, (samples,), generator=gen)


def assert_exact(tracker, model, x, y, forward=None):
    """One tracked step of ``model`` as it is now, against torch.func over its trainable parameters."""
    return checked_step(tracker, model, loss, x, y, forward)


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_layer_unfrozen_after_the_tracker_was_made(layer, fused):
    model, (x, y) = make_mlp(), batch()
    set_trainable(model[layer], False)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        assert_exact(tracker, model, x, y)
        set_trainable(model[layer], True)
        stats = assert_exact(tracker, model, x, y)
        assert str(layer) in stats.per_layer


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
@pytest.mark.parametrize("frozen", ["2", "3", "2.bias", "0"])
def test_parameters_frozen_after_the_tracker_was_made(frozen, fused):
    model, (x, y) = make_mlp(), batch()
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        assert_exact(tracker, model, x, y)
        target = model.get_parameter(frozen) if "." in frozen else model.get_submodule(frozen)
        (target.requires_grad_(False) if isinstance(target, torch.Tensor) else set_trainable(target, False))
        assert_exact(tracker, model, x, y)
        # ... and back: unfrozen again
        (target.requires_grad_(True) if isinstance(target, torch.Tensor) else set_trainable(target, True))
        assert_exact(tracker, model, x, y)


def test_gradual_unfreezing_over_epochs():
    """ULMFiT-style: the head first, then one more layer from the top each epoch."""
    model, (x, y) = make_mlp(), batch()
    set_trainable(model, False)
    set_trainable(model[4], True)
    with GradNormTracker(model, "sum") as tracker:
        for layer in (4, 3, 2, 0):
            set_trainable(model[layer], True)
            for _ in range(2):
                stats = assert_exact(tracker, model, x, y)
            assert set(stats.per_layer) == {str(i) for i in (0, 2, 3, 4) if i >= layer}


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
def test_head_replaced_after_the_tracker_was_made(fused):
    model, (x, y) = make_mlp(), batch()
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        assert_exact(tracker, model, x, y)
        torch.manual_seed(3)
        model[4] = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))  # a new, deeper head
        stats = assert_exact(tracker, model, x, y)
        assert {"4.0", "4.2"} <= set(stats.per_layer)


class Adapted(nn.Module):
    """A Linear that adds a low-rank adapter once one is attached (as LoRA libraries inject them)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(6, 8)
        self.adapter = None

    def forward(self, x):
        out = self.base(x)
        return out if self.adapter is None else out + self.adapter(x)


def test_adapter_attached_after_the_tracker_was_made():
    torch.manual_seed(0)
    model, (x, y) = nn.Sequential(Adapted(), nn.Tanh(), nn.Linear(8, 3)), batch()
    with GradNormTracker(model, "sum") as tracker:
        assert_exact(tracker, model, x, y)
        set_trainable(model, False)
        model[0].adapter = nn.Sequential(nn.Linear(6, 2, bias=False), nn.Linear(2, 8, bias=False))
        stats = assert_exact(tracker, model, x, y)
        assert set(stats.per_layer) == {"0.adapter.0", "0.adapter.1"}


def test_weights_loaded_with_assign():
    """``load_state_dict(assign=True)`` puts new Parameter objects in the modules."""
    model, (x, y) = make_mlp(), batch()
    with GradNormTracker(model, "sum") as tracker:
        assert_exact(tracker, model, x, y)
        torch.manual_seed(7)
        model.load_state_dict(make_mlp().state_dict() | {"4.weight": torch.randn(3, 8)}, assign=True)
        assert_exact(tracker, model, x, y)


class TokenClassifier(nn.Module):
    """A ViT-like model with parameters of its own at the root (a class token, a position table):
    the tracked model is then itself one of the modules the plan hooks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 4, 6) * 0.5)
        self.block = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.GELU())
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: [B, 3, 6]
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.block(tokens)[:, 0])


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
def test_model_with_its_own_parameters_unfrozen_and_frozen(fused):
    model = TokenClassifier()
    x, y = torch.randn(5, 3, 6), torch.randint(0, 3, (5,))
    set_trainable(model, False)
    set_trainable(model.head, True)  # a linear probe first ...
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        assert_exact(tracker, model, x, y)
        set_trainable(model, True)  # ... then everything: the root becomes one of the hooked modules
        stats = assert_exact(tracker, model, x, y)
        assert "" in stats.per_layer
        model.pos.requires_grad_(False)  # its own parameters change again
        assert_exact(tracker, model, x, y)
        set_trainable(model, False)
        set_trainable(model.head, True)  # and the root is no longer hooked
        stats = assert_exact(tracker, model, x, y)
        assert set(stats.per_layer) == {"head"}


@pytest.mark.parametrize("fused", [True, False], ids=HOOKS)
def test_tracked_layer_itself_changes(fused):
    """The tracked model is a single Linear: its fused forward is its own, replaced as it is re-planned."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5, 4))  # (tokens: the fused forward takes them)
    token_loss = lambda out, y: loss(out.flatten(0, -2), y.flatten())  # noqa: E731
    layer.weight.requires_grad_(False)
    with GradNormTracker(layer, "sum", fused=fused) as tracker:
        for change in (None, "weight", "bias", None):
            if change is not None:
                getattr(layer, change).requires_grad_(change == "weight")
            layer.zero_grad()
            token_loss(layer(x), y).backward()
            stats = tracker.collect()
            ref, _, ref_batch = reference_norms(layer, token_loss, x, y)
            assert rel_err(stats.per_sample, ref) < 1e-5
            assert rel_err(stats.batch_grad_sq, ref_batch) < 1e-5


def test_changes_while_tracking_is_off():
    model, (x, y) = make_mlp(), batch()
    with GradNormTracker(model, "sum") as tracker:
        assert_exact(tracker, model, x, y)
        tracker.enabled = False
        set_trainable(model[2], False)
        model[4] = nn.Linear(8, 3)
        tracker.enabled = True
        stats = assert_exact(tracker, model, x, y)
        assert "2" not in stats.per_layer


def test_compiled_model_unfrozen_between_steps():
    model, (x, y) = make_mlp(), batch()
    set_trainable(model[0], False)
    compiled = torch.compile(model, backend="eager")
    with GradNormTracker(model, "sum") as tracker:
        assert_exact(tracker, model, x, y, forward=compiled)
        set_trainable(model[0], True)
        stats = assert_exact(tracker, model, x, y, forward=compiled)
        assert "0" in stats.per_layer


class UsesChildWeight(nn.Module):
    """Uses its child's weight outside the child's forward: refused where that gradient is checked."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)
        self.other = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x) + self.other(x) + x[:, :3] @ self.lin.weight[:, :3].T


def test_first_backward_after_a_new_plan_is_verified():
    """With ``verify_every=0`` only the first backward is checked, and a new plan's first too: the
    direct use of a parameter unfrozen since is refused, not summed into wrong norms."""
    model, (x, y) = UsesChildWeight(), batch()
    set_trainable(model.lin, False)
    with GradNormTracker(model, "sum", verify_every=0) as tracker:
        loss(model(x), y).backward()
        tracker.collect()  # (the first backward: checked, nothing outside a forward)
        loss(model(x), y).backward()
        tracker.collect()  # (not checked)
        set_trainable(model.lin, True)
        loss(model(x), y).backward()
        with pytest.raises(RuntimeError, match="lin"):
            tracker.collect()


def test_no_new_plan_without_a_change(monkeypatch):
    plans = []
    assign = tracker_module._assign_owners
    monkeypatch.setattr(tracker_module, "_assign_owners", lambda model, *layout: plans.append(1) or assign(model, *layout))
    model, (x, y) = make_mlp(), batch()
    with GradNormTracker(model, "sum") as tracker:
        for _ in range(3):
            assert_exact(tracker, model, x, y)
            nn.Linear(2, 2)  # (a module built elsewhere registers parameters too)
            model[4].weight.requires_grad_(True)  # (set, unchanged)
        assert len(plans) == 1
        model[1] = nn.Tanh()  # (a module without parameters: re-read, the same parameters)
        assert_exact(tracker, model, x, y)
        assert len(plans) == 1
        model[4].bias.requires_grad_(False)
        assert_exact(tracker, model, x, y)
        assert len(plans) == 2


def test_registration_hooks_go_with_the_tracker():
    hooks = (nn.modules.module._global_module_registration_hooks,
             nn.modules.module._global_parameter_registration_hooks)

    def keys():  # (other tests' trackers may be collected meanwhile: only this test's are compared)
        return {(i, key) for i, d in enumerate(hooks) for key in d}

    before = keys()
    tracker = GradNormTracker(make_mlp())
    added = keys() - before
    assert len(added) == 2
    tracker.close()
    assert not added & keys()
    # A tracker nobody closed, of a model dropped, does not stay alive through them (nor its model).
    before = keys()
    alive = weakref.ref(GradNormTracker(make_mlp()))
    added = keys() - before
    assert len(added) == 2
    gc.collect()
    assert alive() is None
    assert not added & keys()


def test_a_second_tracker_on_a_model_warns_while_the_first_is_on():
    model, (x, y) = make_mlp(), batch()
    first = GradNormTracker(model, "sum")
    with pytest.warns(UserWarning, match="already has an enabled GradNormTracker that was not closed"):
        second = GradNormTracker(model, "sum")
    assert_exact(second, model, x, y)  # (exact all the same)
    second.close()
    first.enabled = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradNormTracker(model, "sum").close()  # (the first is off: no warning)
        first.enabled = True
        GradNormTracker(make_mlp(), "sum").close()  # (another model)
    first.close()


def test_plans_do_not_keep_replaced_parameters_alive():
    model, (x, y) = make_mlp(), batch()
    with GradNormTracker(model, "sum") as tracker:
        assert_exact(tracker, model, x, y)
        old_head = weakref.ref(model[4].weight)
        model[4] = nn.Linear(8, 3)
        assert_exact(tracker, model, x, y)
        gc.collect()
        assert old_head() is None


def test_a_tracked_model_saves_and_copies_whole():
    """torch.save(model) pickles its hooks, so the tracker: not the global registration hooks."""
    model, (x, y) = make_mlp(), batch()
    with GradNormTracker(model, "sum") as tracker:
        assert_exact(tracker, model, x, y)
        before = (dict(nn.modules.module._global_module_registration_hooks),
                  dict(nn.modules.module._global_parameter_registration_hooks))
        buffer = io.BytesIO()
        torch.save(model, buffer)
        copied = copy.deepcopy(model)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (copied, loaded):
            torch.testing.assert_close(other(x), model(x))
        assert before == (dict(nn.modules.module._global_module_registration_hooks),
                          dict(nn.modules.module._global_parameter_registration_hooks))
        assert_exact(tracker, model, x, y)


def test_functional_call_with_other_parameters_is_refused_and_leaves_the_plan():
    """torch.func.functional_call swaps tensors in without registering them: refused, saying what to do;
    the model's own next step is tracked as before."""
    model, (x, y) = make_mlp(), batch()
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    with GradNormTracker(model, "sum") as tracker:
        with pytest.raises(RuntimeError, match="functional_call with tracker.enabled = False"):
            torch.func.functional_call(model, params, (x,))
        tracker.enabled = False
        torch.func.functional_call(model, params, (x,))
        tracker.enabled = True
        assert_exact(tracker, model, x, y)
