"""Multi-process training: 2 gloo processes on CPU against one process on the concatenated batch,
one decision for all ranks, coverage, resume after a kill, atomic checkpoints, mismatched ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from divebatch.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from divebatch.data import load_digits
from divebatch.distributed import launch
from divebatch.tracker import GradNormTracker
from divebatch.train import TrainConfig, Trainer, accumulate_step

from . import dist_workers
from .oracle import reference_norms, rel_err

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _digits_batch(n: int, seed: int = 0):
    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(d.n_train, generator=g)[:n]
    return d.x_train[idx].reshape(n, 1, 8, 8), d.y_train[idx]


# -- statistics ------------------------------------------------------------------------------
def test_sync_batch_norm_shares_are_the_global_batch_decomposition():
    """A SyncBatchNorm over 2 processes normalises by the whole batch's statistics: its rule gathers
    them, and each rank's per-sample shares are those a BatchNorm gives on the concatenated batch
    (per sample, not only in sum)."""
    torch.manual_seed(0)
    x, g = torch.randn(7, 3, 4, 5) * 2 + 1, torch.randn(7, 3, 4, 5)
    ranks = launch(dist_workers.sync_batch_norm_worker, 2, args=(x, g), threads=1)
    from divebatch.layers.norm import BatchNormRule

    module, rule = torch.nn.BatchNorm2d(3), BatchNormRule()
    want = rule.per_sample_grads(module, [(rule.capture(module, (x,), {}, None), (g,))], {"weight", "bias"})
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    for out in ranks:
        assert rel_err(out["mean"], mean) <= 1e-6 and rel_err(out["var"], var) <= 1e-6
    for name in ("weight", "bias"):
        assert rel_err(torch.cat([out[name] for out in ranks]), want[name]) <= 1e-5
    # (each rank's own statistics alone would give other shares: the gathering is what matters)
    local = rule.per_sample_grads(module, [(rule.capture(module, (x[:4],), {}, None), (g[:4],))], {"weight"})
    assert rel_err(local["weight"], want["weight"][:4]) > 1e-2



@pytest.fixture(scope="module")
def two_rank_norms():
    """Global batch of 13 (shares 7 and 6): one micro-batch per rank, and 3 per rank (no_sync)."""
    x, y = _digits_batch(13)
    one = launch(dist_workers.norms_worker, 2, args=(x, y, 1), threads=1)
    three = launch(dist_workers.norms_worker, 2, args=(x, y, 3), threads=1)
    return x, y, one, three


def test_two_processes_give_the_global_per_sample_norms_and_diversity(two_rank_norms):
    x, y, one, three = two_rank_norms
    model = dist_workers.norms_model()
    ref_ps, _, ref_batch = reference_norms(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
    single = dist_workers.norms_model()
    tracker = GradNormTracker(single, loss_reduction="mean")
    res = accumulate_step(single, [(x, y)], tracker=tracker, measure=True)
    for rank_out in one + three:  # every rank holds the global numbers
        assert rel_err(torch.tensor(rank_out["s1"]), ref_ps.sum()) <= 1e-5
        assert rel_err(torch.tensor(rank_out["s2"]), ref_batch) <= 1e-5
        assert rel_err(torch.tensor(rank_out["s1"] / rank_out["s2"]), ref_ps.sum() / ref_batch) <= 1e-5
        assert rel_err(torch.tensor(rank_out["s1"]), res.per_sample_sq) <= 1e-5
        assert rel_err(torch.tensor(rank_out["s2"]), res.batch_grad_sq) <= 1e-5
        # DDP's averaged gradient is the gradient of the mean loss over the global batch
        for g, p in zip(rank_out["grads"], single.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    for rank_out in one:  # the per-sample vector, gathered in rank order, is the single process's
        assert rank_out["per_sample"].shape == (13,)
        assert rel_err(rank_out["per_sample"], ref_ps) <= 1e-5


# -- training --------------------------------------------------------------------------------
# 1437 digits, global batch 33 (shares 17/16): growth to 66, 132 by the default policy, and an
# epoch tail that does not divide by the world size.
_TRAIN = dict(policy="divebatch", epochs=4, batch_size=33, max_batch_size=264, lr=0.05, measure_every=2, seed=1,
              max_micro_batch=10)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp_full")
    outs = launch(dist_workers.train_worker, 2, args=(dict(_TRAIN, checkpoint_every=7), str(run_dir)), threads=1)
    return run_dir, outs


def test_all_ranks_make_the_same_decisions(two_rank_run):
    _, (r0, r1) = two_rank_run
    sizes = [r["batch_size"] for r in r0["records"]]
    assert len(set(sizes)) > 1, f"the policy never changed the batch size ({sizes}); the test needs a decision"
    keys = ("batch_size", "next_batch_size", "lr", "lr_end", "lr_factor", "train_loss", "steps", "samples_seen")
    for a, b in zip(r0["records"], r1["records"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        assert a["world_size"] == 2
    assert r0["final_lrs"] == r1["final_lrs"]
    for p, q in zip(r0["params"], r1["params"]):  # and the replicas stay identical
        assert torch.equal(p, q)


def test_every_index_once_per_epoch_across_ranks(two_rank_run):
    _, (r0, r1) = two_rank_run
    n = load_digits().n_train
    for epoch in range(_TRAIN["epochs"]):
        a, b = r0["seen"][epoch], r1["seen"][epoch]
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(n))
        assert len(a) - len(b) in range(0, r0["records"][epoch]["steps"] + 1)  # rank 0 takes the remainders


def test_two_process_run_matches_one_process_trajectory(two_rank_run):
    _, (r0, _) = two_rank_run
    tr = Trainer(TrainConfig(**_TRAIN), load_digits())
    tr.fit(plots=False)
    assert [r["batch_size"] for r in tr.records] == [r["batch_size"] for r in r0["records"]]
    for a, b in zip(tr.records, r0["records"]):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def kill_and_resume(cfg: dict, run_dir, full: dict) -> None:
    """Train ``cfg`` on 2 processes that die hard mid-run, resume from the checkpoint, and check that
    the resumed run follows ``full`` (rank 0's output of the same run uninterrupted)."""
    # Both ranks die hard (os._exit(3)) in epoch 2, between checkpoints; a rank still inside a gloo
    # collective when its peer is gone may be aborted by gloo first (SIGABRT): the same hard death.
    with pytest.raises(Exception, match="exit|3|SIGABRT"):
        launch(dist_workers.train_worker, 2, args=(cfg, str(run_dir), False, 60), threads=1)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["world_size"] == 2 and 0 < state["trainer"]["steps"] < 60
    assert state["trainer"]["partial"] is not None  # taken mid-epoch
    resumed = launch(dist_workers.train_worker, 2, args=(cfg, str(run_dir), True), threads=1)
    keys = ("epoch", "batch_size", "next_batch_size", "lr", "lr_end", "steps", "total_steps", "samples_seen")
    for out in resumed:
        assert [{k: r[k] for k in keys} for r in out["records"]] == [{k: r[k] for k in keys} for r in full["records"]]
        for a, b in zip(out["records"], full["records"]):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        for p, q in zip(out["params"], full["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_multi_process_resume_after_kill_follows_the_same_trajectory(two_rank_run, tmp_path):
    _, (full, _) = two_rank_run
    kill_and_resume(dict(_TRAIN, checkpoint_every=7), tmp_path, full)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == list(range(1, _TRAIN["epochs"] + 1))


def test_ranks_with_different_models_fail_fast_with_a_clear_error():
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="models differ") as info:
        launch(dist_workers.train_worker, 2, args=(dict(_TRAIN, epochs=1), None, False, None, {0: 16, 1: 24}),
               threads=1, timeout_s=60)
    assert "rank 0" in str(info.value) and "rank 1" in str(info.value)
    assert time.perf_counter() - t0 < 60


# -- single-process resume -------------------------------------------------------------------
class _Killed(Exception):
    pass


@pytest.mark.parametrize("policy", ["divebatch", "paper"])
def test_single_process_resume_follows_the_same_trajectory(tmp_path, policy):
    data = load_digits()
    cfg = dict(_TRAIN, policy=policy, resize_every=1, checkpoint_every=5,
               measure_every=1 if policy == "paper" else _TRAIN["measure_every"])
    full = Trainer(TrainConfig(**cfg), data)
    full.fit(plots=False)
    tr = Trainer(TrainConfig(**cfg), data, run_dir=tmp_path)
    step = tr.optimizer.step

    def die(*a, **k):
        step(*a, **k)
        if tr.steps + 1 >= 70:
            raise _Killed

    tr.optimizer.step = die
    with pytest.raises(_Killed):
        tr.fit(plots=False)
    back = Trainer(TrainConfig(**cfg), data, run_dir=tmp_path).resume()
    assert back.steps == 65 and back.epoch == 1  # the last checkpoint, inside epoch 2
    back.fit(plots=False)
    keys = ("batch_size", "next_batch_size", "lr", "lr_end", "lr_factor", "steps", "total_steps", "measured_steps")
    assert [{k: r[k] for k in keys} for r in back.records] == [{k: r[k] for k in keys} for r in full.records]
    assert len({r["batch_size"] for r in full.records}) > 1
    for a, b in zip(back.records, full.records):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["test_acc"] == b["test_acc"]
    for p, q in zip(back.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    data = load_digits()
    tr = Trainer(TrainConfig(**dict(_TRAIN, epochs=1)), data, run_dir=tmp_path)
    tr.fit(plots=False)
    other = Trainer(TrainConfig(**dict(_TRAIN, epochs=1, lr=0.1)), data, run_dir=tmp_path / "b")
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.05, now 0.1"):
        other.resume(tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        other.resume(tmp_path / "missing.pt")


# -- atomic checkpoints ----------------------------------------------------------------------
_WRITER = textwrap.dedent("""
    import sys, torch
    from divebatch.checkpoint import save_checkpoint
    path = sys.argv[1]
    big = torch.zeros(64 * 2**20 // 4)  # 64 MB: a save takes long enough to be caught in the middle
    k = 0
    while True:
        k += 1
        save_checkpoint({"version": k, "payload": big}, path)
        print(k, flush=True)
""")


def test_kill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        first = int(proc.stdout.readline())  # one complete checkpoint exists
        assert first == 1
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".checkpoint.pt.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.001)  # until the next save is in progress
        assert list(tmp_path.glob(".checkpoint.pt.tmp-*")), "never caught a save in progress"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = load_checkpoint(path)
    assert state["version"] >= 1 and state["payload"].numel() == 64 * 2**20 // 4
    # the next save clears the debris of the interrupted one
    save_checkpoint({"version": 0}, path)
    assert not list(tmp_path.glob(".checkpoint.pt.tmp-*"))
    assert load_checkpoint(path)["version"] == 0


def test_a_damaged_checkpoint_is_refused_with_its_path(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"version": 1}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="checkpoint.pt is not a readable divebatch checkpoint"):
        load_checkpoint(path)


# -- command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_cli_train_nproc_2_and_resume(tmp_path, sharding):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "divebatch", "train", "--nproc", "2", "--sharding", sharding, "--dataset", "digits",
           "--epochs", "2", "--batch-size", "64", "--max-batch-size", "256", "--out", str(out), "--quiet",
           "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "final test accuracy" in done.stdout
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in recs] == [2, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2
    # resuming a finished run trains nothing more and reports the same result
    again = subprocess.run(cmd[:-2] + ["--resume", "--quiet", "--no-progress"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["final_test_acc"] == summary["final_test_acc"]
    assert json.loads((out / "config.json").read_text())["sharding"] == sharding
    if sharding == "fsdp":  # the other sharding cannot load its checkpoint: refused, naming the setting
        other = [a if a != "fsdp" else "ddp" for a in cmd[:-2]] + ["--resume", "--quiet", "--no-progress"]
        refused = subprocess.run(other, capture_output=True, text=True, timeout=300, env=env)
        assert refused.returncode != 0 and "sharding: checkpoint 'fsdp', now 'ddp'" in refused.stderr


def single_process_policy(estimator: str, x, y):
    """The reference for a user's loop: one process, the whole batch, one observed step."""
    from divebatch.schedule import DiveBatch

    single = dist_workers.norms_model()
    policy = DiveBatch(None, len(y), 4, 64, estimator=estimator, tracker=GradNormTracker(single, loss_reduction="mean"),
                       measure_every=1, resize_every=1)
    F.cross_entropy(single(x), y).backward()
    policy.observe()
    return policy


@pytest.mark.parametrize("estimator", ["noise-scale", "epoch"])
def test_policy_observe_in_a_users_ddp_loop_sees_the_global_batch(estimator):
    x, y = _digits_batch(12)
    outs = launch(dist_workers.observe_worker, 2, args=(x, y, estimator), threads=1)
    ref = single_process_policy(estimator, x, y).estimator.state_dict()
    assert ref["steps"] == 1 and ref["samples"] == 12
    for out in outs:
        got = out["state"]
        assert set(got) == set(ref)
        for k, v in ref.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert rel_err(got[k], v) <= 1e-5, k
            elif isinstance(v, list):  # the epoch estimator's Σ g_i, one tensor per parameter
                for a, b in zip(got[k], v):
                    assert rel_err(a, b) <= 1e-5, k
            else:
                assert got[k] == v


def test_policy_observe_refuses_ranks_with_different_loss_scales():
    x, y = _digits_batch(13)  # shares 7 and 6 with a per-rank mean: c = 1/7 and 1/6
    outs = launch(dist_workers.observe_worker, 2, args=(x, y, "noise-scale"), threads=1)
    for out in outs:
        assert "scaled their losses differently" in out["error"]


def test_the_documented_ddp_loop_covers_every_index_and_agrees_across_ranks():
    r0, r1 = launch(dist_workers.user_loop_worker, 2, args=(3,), threads=1)
    n = load_digits().n_train
    assert r0["batch_sizes"] == r1["batch_sizes"] and r0["decisions"] == r1["decisions"]
    assert r0["batch_sizes"][0] == 32 and r0["batch_sizes"][-1] > 32  # it measured and grew
    for epoch in range(3):
        assert sorted(r0["seen"][epoch] + r1["seen"][epoch]) == list(range(n))


def test_three_processes_with_uneven_shares_give_the_global_numbers():
    x, y = _digits_batch(11)  # shares 4, 4, 3; two micro-batches per rank under no_sync
    outs = launch(dist_workers.norms_worker, 3, args=(x, y, 2), threads=1)
    model = dist_workers.norms_model()
    ref_ps, _, ref_batch = reference_norms(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
    for out in outs:
        assert rel_err(torch.tensor(out["s1"]), ref_ps.sum()) <= 1e-5
        assert rel_err(torch.tensor(out["s2"]), ref_batch) <= 1e-5


def test_a_crash_after_every_rank_returned_keeps_the_results_and_one_before_raises():
    """A rank killed by a signal once every rank has written its result (gloo has aborted in its
    teardown) loses nothing, with a warning; killed before its result, the launch raises."""
    with pytest.warns(RuntimeWarning, match="process 1 then died with SIGABRT while shutting down"):
        assert launch(dist_workers.aborting_worker, 2, args=("after",), threads=1) == [0, 1]
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
        launch(dist_workers.aborting_worker, 2, args=("before",), threads=1)
