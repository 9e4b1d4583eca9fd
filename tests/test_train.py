"""Training helpers: micro-batch accumulation, mixed precision, policies on real data, compare metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from divebatch.data import load_digits, make_synthetic
from divebatch.report import compare_metrics
from divebatch.schedule import DiveBatch
from divebatch.train import TrainConfig, Trainer, accumulate_step, group_micro_batches, per_sample_loss, train

try:
    from divebatch.tracker import GradNormTracker
except Exception:  # noqa: BLE001
    GradNormTracker = None

needs_tracker = pytest.mark.skipif(GradNormTracker is None, reason="divebatch.tracker does not import yet")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def small_mlp(seed=0, d=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 10))


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("splits", [[64], [32, 32], [22, 21, 21], [10, 20, 30, 4]])
def test_micro_batched_step_equals_full_batch_step(digits, splits):
    x, y = digits.x_train[:64], digits.y_train[:64]
    ref = small_mlp()
    accumulate_step(ref, [(x, y)])
    g_full = _grads(ref)
    model = small_mlp()
    micro, s = [], 0
    for k in splits:
        micro.append((x[s:s + k], y[s:s + k]))
        s += k
    res = accumulate_step(model, micro)
    assert res.batch_size == 64
    for a, b in zip(_grads(model), g_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # and the optimizer step that follows is the same
    for m in (ref, model):
        torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9).step()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@needs_tracker
@pytest.mark.parametrize("splits", [[48], [16, 16, 16]])
def test_micro_batched_norms_equal_full_batch_norms(digits, splits):
    x, y = digits.x_train[:48], digits.y_train[:48]
    model = small_mlp()
    with GradNormTracker(model, loss_reduction="sum") as tr:
        full = accumulate_step(model, [(x, y)], tracker=tr, measure=True)
        model.zero_grad()
        micro = [(x[s:s + k], y[s:s + k]) for s, k in zip([0, 16, 32][:len(splits)], splits)]
        got = accumulate_step(model, micro, tracker=tr, measure=True)
    assert got.per_sample_sq.item() == pytest.approx(full.per_sample_sq.item(), rel=1e-5)
    assert got.batch_grad_sq.item() == pytest.approx(full.batch_grad_sq.item(), rel=1e-5)
    # unscaled: Σ||g_i||² is about the per-sample loss ℓ_i, whatever the 1/B of the mean
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    ps = vmap(grad(lambda p, xi, yi: per_sample_loss(functional_call(model, p, (xi[None],)), yi[None]).sum()),
              in_dims=(None, 0, 0))(params, x, y)
    ref = sum(g.flatten(1).pow(2).sum(1) for g in ps.values()).sum()
    assert got.per_sample_sq.item() == pytest.approx(ref.item(), rel=1e-4)


def test_group_micro_batches_with_a_dataloader(digits):
    from torch.utils.data import DataLoader

    from divebatch.sampler import AdaptiveBatchSampler

    ds = digits.train_dataset()
    s = AdaptiveBatchSampler(ds, 100, seed=0, max_micro_batch=40)
    loader = DataLoader(ds, batch_sampler=s)
    steps = list(group_micro_batches(loader, s))
    assert len(steps) == math.ceil(len(ds) / 100)
    assert [len(y) for _, y in steps[0]] == [34, 33, 33]
    assert sum(len(y) for st in steps for _, y in st) == len(ds)


@needs_tracker
def test_divebatch_grows_the_batch_on_digits(digits):
    for policy in ("paper", "divebatch"):
        s = train(digits, policy, epochs=4, batch_size=16, max_batch_size=512, resize_every=2, lr=0.05)
        sizes = s["batch_sizes"]
        assert sizes[0] == 16 and sizes[-1] > 16, (policy, sizes)
        assert all(b2 >= b1 for b1, b2 in zip(sizes, sizes[1:]))
        assert s["final_test_acc"] > 0.85


@needs_tracker
def test_resnet_with_batch_norm_trains_and_its_shares_add_up(digits):
    """The CIFAR ResNet-20 (BatchNorm in training mode: the batch gradient's decomposition). Every
    tracked backward is verified (the shares of every layer must add up to autograd's gradient, or
    the tracker raises); its per-sample numbers reach the trainer, which measures a diversity."""
    from divebatch.models import build_model

    model = build_model("resnet", digits.input_shape, digits.num_classes, seed=0)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21  # 19 in the blocks and stem, 2 shortcuts
    x, y = digits.x_train[:24].reshape(24, *digits.input_shape), digits.y_train[:24]
    with GradNormTracker(model, "mean", verify_every=1) as tracker:
        res = accumulate_step(model, [(x[:16], y[:16]), (x[16:], y[16:])], tracker=tracker, measure=True)
    assert res.per_sample_sq > 0 and res.batch_grad_sq > 0
    cfg = TrainConfig(policy="divebatch", model="resnet", epochs=1, batch_size=64, max_batch_size=256, resize_every=1,
                      lr=0.05)
    with pytest.warns(UserWarning, match="BatchNorm in training mode.*noise-scale estimate"):
        trainer = Trainer(cfg, digits)
    summary = trainer.fit()
    assert summary["model"] == "resnet" and math.isfinite(summary["final_test_acc"])


@needs_tracker
def test_no_batch_norm_warning_for_the_epoch_estimator_or_eval_mode(digits, recwarn):
    from divebatch.models import build_model

    model = build_model("resnet", digits.input_shape, digits.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradNormTracker(model, "mean") as tracker:
        DiveBatch(opt, 100, 8, 64, tracker=tracker, estimator="epoch")
        model.eval()  # running statistics: per-sample gradients, no decomposition
        DiveBatch(opt, 100, 8, 64, tracker=tracker, estimator="noise-scale")
    assert not [w for w in recwarn if "BatchNorm" in str(w.message)]


@needs_tracker
def test_trainer_writes_a_run_folder_and_micro_batches(digits, tmp_path):
    cfg = TrainConfig(policy="paper", epochs=2, batch_size=32, max_batch_size=1024, resize_every=1,
                      max_micro_batch=40)
    tr = Trainer(cfg, digits, run_dir=tmp_path)
    s = tr.fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    for key in ("epoch", "batch_size", "lr", "train_loss", "test_acc", "epoch_time", "n_delta"):
        assert key in rec
    assert rec["n_delta"] > 0 and rec["measured_steps"] == rec["steps"]
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2
    for png in ("accuracy.png", "batch_lr.png", "diversity.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert s["batch_sizes"][1] > 40  # the second epoch ran micro-batched logical batches


@needs_tracker
def test_bf16_autocast_cpu(digits):
    s = train(digits, "divebatch", epochs=2, batch_size=32, max_batch_size=256, amp="bf16")
    assert s["final_test_acc"] > 0.8
    assert all(r["b_noise"] is None or math.isfinite(r["b_noise"]) for r in s["records"])


@needs_tracker
def test_grad_scaler_norms_unscaled_and_non_finite_steps_skipped(digits):
    x, y = digits.x_train[:32], digits.y_train[:32]
    model = small_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    with GradNormTracker(model, loss_reduction="sum") as tr:
        plain = accumulate_step(model, [(x, y)], tracker=tr, measure=True)
        model.zero_grad()
        scaled = accumulate_step(model, [(x, y)], tracker=tr, measure=True, scaler=scaler)
        assert scaled.per_sample_sq.item() == pytest.approx(plain.per_sample_sq.item(), rel=1e-5)
        assert scaled.batch_grad_sq.item() == pytest.approx(plain.batch_grad_sq.item(), rel=1e-5)
        assert scaled.scale == pytest.approx(2.0 ** 12 / 32)
        # a step that overflows: the estimator and the policy skip it, the scaler skips the update
        pol = DiveBatch(None, 100, 32, 64, delta=1.0, resize_every=1, estimator="epoch", tracker=tr)
        model.zero_grad()
        with torch.no_grad():
            model[3].bias[0] = float("inf")
        bad = accumulate_step(model, [(x, y)], tracker=tr, measure=True, scaler=scaler)
        pol.observe_sums(bad.per_sample_sq, bad.batch_grad_sq, bad.batch_size, scale=bad.scale)
        assert pol.estimator.skipped_steps == 1 and float(pol.estimator.sum_sq) == 0.0


def test_synthetic_logistic_regression_trains():
    data = make_synthetic(seed=0)
    assert data.x_train.shape == (1000, 512) and float(data.x_train.abs().max()) < 1
    assert torch.equal(make_synthetic(seed=0).x_train, data.x_train)
    s = train(data, "sgd", epochs=3, batch_size=32, lr=0.1)
    assert s["final_test_acc"] > 0.6


def test_compare_metrics_paper_and_common():
    def recs(accs, times):
        return [{"epoch": i + 1, "test_acc": a, "train_time": t, "total_steps": 10 * (i + 1), "samples_seen": 0,
                 "next_batch_size": 8} for i, (a, t) in enumerate(zip(accs, times))]

    runs = {"sgd": recs([0.80, 0.85, 0.895, 0.90], [10, 20, 30, 40]),
            "adabatch": recs([0.82, 0.885, 0.886, 0.887], [8, 14, 18, 22]),
            "fast": recs([0.87, 0.87, 0.87, 0.87], [5, 10, 15, 20])}
    m = compare_metrics(runs, "sgd", "adabatch")
    assert m["common_target"] == pytest.approx(0.885)
    assert m["runs"]["sgd"]["paper"]["epoch"] == 3          # 0.895 ≥ 0.90 − 0.01 → epoch 3 at 30 s
    assert m["runs"]["fast"]["paper"]["time"] == 5
    assert m["runs"]["fast"]["paper"]["speedup_vs_sgd"] == pytest.approx(6.0)
    assert m["runs"]["fast"]["common"] is None                 # never reaches 88.5 %
    assert m["runs"]["adabatch"]["common"]["time"] == 14
    assert m["runs"]["adabatch"]["common"]["speedup_vs_sgd"] == pytest.approx(30 / 14)


@needs_tracker
def test_the_documented_user_loop_runs(digits):
    """docs/training.md's ≤15-line example, verbatim but for the data and sizes."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from divebatch.sampler import AdaptiveBatchSampler
    from divebatch.schedule import DEFAULT_POLICY

    ds, epochs = digits.train_dataset(), 3
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = GradNormTracker(model, loss_reduction="mean")
    policy = DiveBatch(opt, len(ds), 16, 256, tracker=tracker, **DEFAULT_POLICY)
    loader = DataLoader(ds, batch_sampler=AdaptiveBatchSampler(ds, policy, seed=0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    sizes = []
    for epoch in range(epochs):
        sizes.append(policy.batch_size)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            policy.observe()
            opt.step()
        policy.step()
        sched.step()
    tracker.close()
    assert sizes[0] == 16 and sizes[-1] > 16 and policy.history
    assert all(math.isfinite(h["n_delta"]) for h in policy.history)


def test_group_micro_batches_over_several_epochs_follows_the_policy():
    """A DataLoader loop that stops at the planned micro-batches must still start the next epoch
    (and read the policy's new batch size there)."""
    from torch.utils.data import DataLoader, TensorDataset

    from divebatch.sampler import AdaptiveBatchSampler

    class Policy:
        batch_size = 16

    ds = TensorDataset(torch.arange(100))
    sampler = AdaptiveBatchSampler(ds, Policy, seed=3, max_micro_batch=6)
    loader = DataLoader(ds, batch_sampler=sampler)
    for epoch, bs in enumerate([16, 40, 40]):
        Policy.batch_size = bs
        steps = list(group_micro_batches(loader, sampler))
        seen = [int(i) for step in steps for (idx,) in step for i in idx]
        assert sorted(seen) == list(range(100)), epoch
        assert [sum(len(idx) for (idx,) in step) for step in steps] == [bs] * (100 // bs) + ([100 % bs] if 100 % bs else [])
        assert sampler.epoch == epoch + 1
