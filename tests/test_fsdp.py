"""FSDP2 (``fully_shard``): 2 gloo processes on CPU, the tracker on the sharded model, against
torch.func on one process with the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from divebatch.checkpoint import load_checkpoint
from divebatch.data import load_digits
from divebatch.distributed import launch
from divebatch.tracker import GradNormTracker
from divebatch.train import TrainConfig, Trainer, accumulate_step

from . import dist_workers
from .models_zoo import ZOO, sample_loss
from .oracle import reference_norms, rel_err
from .test_distributed import _TRAIN, _digits_batch, kill_and_resume, single_process_policy

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    HAVE_FSDP2 = torch.distributed.is_available() and torch.distributed.is_gloo_available()
except ImportError:
    HAVE_FSDP2 = False

pytestmark = pytest.mark.skipif(not HAVE_FSDP2, reason="torch.distributed.fsdp.fully_shard with gloo is not available")

#: Zoo entries under FSDP2, one or more per family of rules: fused Linear/Conv, norms, embeddings
#: and bags (max mode reads the weight in the forward hook), attention, rows flattened inside a
#: unit (the row proof walks through fully_shard's hook on the unit's inputs), a recurrent layer
#: whose unused outputs are accounted after the backward (parameters gathered again), the
#: generic route with direct uses, experts, parametrizations.
FSDP_ZOO = ["linear_2d", "linear_3d", "conv2d", "conv_transpose", "norms", "functional_norms", "instance_norms", "embedding",
            "embedding_bags", "attention_batch_first", "flattened_tokens", "inplace_residuals", "recurrent",
            "custom_module", "reused_module", "mixture_of_experts", "parametrized", "bilinear", "prelu"]


@pytest.fixture(scope="module")
def fsdp_norms():
    """Global batch of 13 (shares 7 and 6): one micro-batch per rank, and 3 per rank (no gradient
    sync); and HSDP (a 2-D mesh whose replicas hold whole gradients: counted once, not twice)."""
    x, y = _digits_batch(13)
    one = launch(dist_workers.fsdp_norms_worker, 2, args=(x, y, 1), threads=1)
    three = launch(dist_workers.fsdp_norms_worker, 2, args=(x, y, 3), threads=1)
    replicated = launch(dist_workers.fsdp_norms_worker, 2, args=(x, y, 1, True), threads=1)
    return x, y, one + replicated, three


def test_fully_sharded_model_gives_the_global_per_sample_norms_and_batch_gradient(fsdp_norms):
    x, y, one, three = fsdp_norms
    model = dist_workers.norms_model()
    ref_ps, _, ref_batch = reference_norms(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
    single = dist_workers.norms_model()
    accumulate_step(single, [(x, y)], tracker=GradNormTracker(single, loss_reduction="mean"), measure=True)
    for rank_out in one + three:
        assert rank_out["sharded"]  # the parameters were DTensor shards, not whole copies
        assert rel_err(torch.tensor(rank_out["s1"]), ref_ps.sum()) <= 1e-5
        # ||Σ g_i||² from the reduce-scattered shards: squared on each rank, summed over ranks
        assert rel_err(torch.tensor(rank_out["s2"]), ref_batch) <= 1e-5
        # the shards hold the gradient of the mean loss over the global batch
        for g, p in zip(rank_out["grads"], single.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    for rank_out in one:
        assert rel_err(rank_out["per_sample"], ref_ps) <= 1e-5
        # the check that every gradient is accounted for ran on the unsharded parameters
        assert rank_out["verified"] == ["0", "1", "4", "5", "7"]


def _check_zoo(results, names, tol):
    for name in names:
        torch.manual_seed(0)
        model, x, y = ZOO[name]()
        ref, _, ref_batch = reference_norms(model, sample_loss, x, y)
        for rank, out in enumerate(results):
            got = out[name]
            assert "error" not in got, f"{name} on rank {rank}: {got.get('error')}"
            assert rel_err(got["per_sample"], ref) <= tol, name
            # ||Σ g_i||² from the shards, uneven ones too (9 rows over 2 ranks: 5 and 4)
            assert rel_err(torch.tensor(got["batch_grad_sq"]), ref_batch) <= tol, name
            assert got["verified"], f"{name}: no gradient was compared (the unsharded parameters' hooks did not run)"


def test_zoo_under_fully_shard_matches_torch_func():
    _check_zoo(launch(dist_workers.fsdp_zoo_worker, 2, args=(FSDP_ZOO,), threads=1), FSDP_ZOO, 1e-5)


def test_zoo_under_fully_shard_with_bfloat16_parameters():
    """``MixedPrecisionPolicy(param_dtype=bfloat16)``: the unsharded stand-ins are bfloat16 copies;
    the norms follow the bfloat16 forward (measured: 1e-3 to 5e-3 from float32's torch.func), and
    the verification passes with its low-precision tolerance."""
    names = ["linear_3d", "conv2d", "norms", "embedding_bags", "attention_batch_first", "flattened_tokens",
             "recurrent", "custom_module"]
    _check_zoo(launch(dist_workers.fsdp_zoo_worker, 2, args=(names, True), threads=1), names, 2e-2)


def test_sequence_first_models_under_fully_shard_match_torch_func():
    """``batch_first=False`` on sharded models: [T, B] ids split by sample (columns) over 2 ranks."""
    from .test_sequence_first import make

    names = ["recurrent-lm", "transformer-lm", "flattened-decoder"]
    results = launch(dist_workers.fsdp_sequence_first_worker, 2, args=(names,), threads=1)
    for name in names:
        torch.manual_seed(0)
        model, ids, tokens, loss = make(name, 5, 5, torch.Generator().manual_seed(1))
        ref, _, ref_batch = reference_norms(model, loss, ids, tokens, batch_dim=1)
        for rank, out in enumerate(results):
            got = out[name]
            assert "error" not in got, f"{name} on rank {rank}: {got.get('error')}"
            assert rel_err(got["per_sample"], ref) <= 1e-5, name
            assert rel_err(torch.tensor(got["batch_grad_sq"]), ref_batch) <= 1e-5, name


def test_parameters_frozen_and_unfrozen_after_fully_shard():
    """A layer frozen, another frozen, all trained again, on the sharded parameters after the
    tracker was made: it re-plans as each next forward starts, every step against torch.func."""
    x, y = _digits_batch(9)
    results = launch(dist_workers.fsdp_freeze_worker, 2, args=(x, y), threads=1)
    model = dist_workers.norms_model()
    for step, frozen in enumerate(dist_workers.FROZEN_PER_STEP):
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        ref, _, ref_batch = reference_norms(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
        for rank, steps in enumerate(results):
            got = steps[step]
            assert "error" not in got, f"step {step} on rank {rank}: {got.get('error')}"
            assert rel_err(got["per_sample"], ref) <= 1e-5, step
            assert rel_err(torch.tensor(got["batch_grad_sq"]), ref_batch) <= 1e-5, step


def test_tracker_created_before_fully_shard_is_refused():
    messages = launch(dist_workers.fsdp_tracker_first_worker, 2, threads=1)
    for message in messages:
        assert "is not the one the GradNormTracker planned for" in message
        assert "after fully_shard" in message


@pytest.mark.parametrize("estimator", ["noise-scale", "epoch"])
def test_policy_observe_in_a_users_fsdp_loop_sees_the_global_batch(estimator):
    x, y = _digits_batch(12)
    outs = launch(dist_workers.observe_worker, 2, args=(x, y, estimator, True), threads=1)
    policy = single_process_policy(estimator, x, y)
    ref = policy.estimator.state_dict()
    if "A" in ref:  # each rank holds A for its shards: compared through ||A||², summed over ranks
        ref["A"] = policy.estimator.grad_sum_sq()
    assert ref["steps"] == 1 and ref["samples"] == 12
    for out in outs:
        assert "error" not in out, out.get("error")
        got = out["state"]
        assert set(got) == set(ref)
        for k, v in ref.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert rel_err(got[k], v) <= 1e-5, k
            else:
                assert got[k] == v, k


def test_fsdp1_wrapper_is_refused_with_the_way_out():
    for message in launch(dist_workers.fsdp1_worker, 2, threads=1):
        assert "FullyShardedDataParallel (FSDP1)" in message and "fully_shard" in message


@pytest.mark.parametrize("mode", ["eager", "compiled", "checkpointed"])
def test_gpt2_sharded_per_block_matches_torch_func(mode):
    transformers_tests = pytest.importorskip("tests.test_transformers")
    torch.manual_seed(1)
    x, y = torch.randint(0, 97, (5, 9)), torch.randint(0, 97, (5, 9))
    torch.manual_seed(0)
    ref, _, _ = reference_norms(transformers_tests.GPT2Logits(), transformers_tests.token_loss, x, y)
    for out in launch(dist_workers.fsdp_gpt2_worker, 2, args=(x, y, mode), threads=1):
        assert rel_err(out["per_sample"], ref) <= 1e-5
        # every module compared, the tied token table (and head) too
        assert len(out["verified"]) == 15 and "lm.transformer.wte" in out["verified"]


# -- the Trainer (divebatch train --sharding fsdp) -------------------------------------------
# The paper's policy: its epoch estimator keeps A = Σ g_i per shard, gathered whole into checkpoints.
_FSDP_TRAIN = dict(_TRAIN, policy="paper", measure_every=1, sharding="fsdp", checkpoint_every=7)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp_full")
    return run_dir, launch(dist_workers.train_worker, 2, args=(_FSDP_TRAIN, str(run_dir)), threads=1)


def test_sharded_training_follows_the_one_process_trajectory(fsdp_run):
    run_dir, (r0, r1) = fsdp_run
    keys = ("batch_size", "next_batch_size", "lr", "lr_end", "train_loss", "steps", "samples_seen")
    assert [{k: r[k] for k in keys} for r in r0["records"]] == [{k: r[k] for k in keys} for r in r1["records"]]
    tr = Trainer(TrainConfig(**dict(_FSDP_TRAIN, sharding="ddp", checkpoint_every=None)), load_digits())
    tr.fit(plots=False)
    assert [r["batch_size"] for r in tr.records] == [r["batch_size"] for r in r0["records"]]
    assert len({r["batch_size"] for r in tr.records}) > 1  # (a decision was made)
    for a, b in zip(tr.records, r0["records"]):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    for p, q in zip(r0["params"], tr.model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-3, atol=1e-4)
    # the checkpoint holds whole tensors, as a one-process run's
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert {k: tuple(v.shape) for k, v in state["model"].items()} == {
        k: tuple(v.shape) for k, v in tr.model.state_dict().items()}


def test_sharded_run_resumes_after_a_kill_on_the_same_trajectory(fsdp_run, tmp_path):
    _, (full, _) = fsdp_run
    kill_and_resume(_FSDP_TRAIN, tmp_path, full)
