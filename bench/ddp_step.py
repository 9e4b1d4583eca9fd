"""Cost of divebatch's tracking in a multi-process DistributedDataParallel (or FSDP2) training step.

Two (``--nproc``) gloo processes on this machine train the mlp workload of
../shared/BENCHMARKS.md (784-1024-1024-10, global batch 256 split 128/128) with SGD. Blocks of
``--steps`` optimizer steps are timed round-robin for:

* ``plain``: ``accumulate_step`` on the DDP model, tracker off — forward, backward with DDP's
  gradient all-reduce, optimizer step;
* ``divebatch``: the same step measured — the tracker's per-sample norms on every rank, one
  all-reduce of ``Σ||g_i||²``, ``||Σ g_i||²`` from the all-reduced gradient.

With ``--sharding fsdp`` the model is sharded with FSDP2 instead of DDP (each Linear its own
``fully_shard`` unit, then the model), the tracker created after: parameters all-gathered for
each layer's forward and backward, gradients reduce-scattered, ``||Σ g_i||²`` from the shards.

Ranks start every block together (a barrier) and rank 0's wall time per block is recorded;
the ratio is median(divebatch) / median(plain). ``amortised`` is the cost with the default
policy, which measures one step in ``measure_every`` (16): ``1 + (ratio − 1)/16``.

    python bench/ddp_step.py --out bench/results/ddp_mlp.json
    python bench/ddp_step.py --sharding fsdp --out bench/results/fsdp_mlp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divebatch.distributed import launch  # noqa: E402
from divebatch.schedule import DEFAULT_POLICY  # noqa: E402


def _rank_main(workload: str, steps: int, reps: int, sharding: str = "ddp") -> dict:
    import torch.distributed as dist
    from torch import nn

    from divebatch.sampler import shard_slice
    from divebatch.tracker import GradNormTracker
    import torch.nn.functional as F

    from divebatch.train import accumulate_step, per_sample_loss
    from workloads import WORKLOADS

    rank, world = dist.get_rank(), dist.get_world_size()
    wl = WORKLOADS[workload]
    torch.manual_seed(0)
    model = wl.make_model()
    x, y = wl.make_batch(torch.device("cpu"))
    mine = shard_slice(len(y), world, rank)
    micro = [(x[mine], y[mine])]
    if sharding == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        ddp = model = fully_shard(model, mesh=mesh)  # (the tracker comes after: it hooks the shards' stand-ins)
        tracker = GradNormTracker(model, loss_reduction="sum", enabled=False)
    else:
        tracker = GradNormTracker(model, loss_reduction="sum", enabled=False)
        ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    stat: dict = {}
    loss_fn = per_sample_loss
    if wl.token_level:  # a sample's loss: its tokens' summed cross-entropy
        def loss_fn(out, y):
            return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="none").view(
                y.shape).sum(dim=1)

    def block(measure: bool) -> float:
        tracker.enabled = measure
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            res = accumulate_step(ddp, micro, loss_fn=loss_fn, tracker=tracker if measure else None,
                                  measure=measure, global_batch_size=len(y))
            if measure:
                stat["diversity"] = float(res.per_sample_sq / res.batch_grad_sq)
            opt.step()
        return time.perf_counter() - t0

    for m in (False, True):  # warm-up: allocator, DDP bucket rebuild, route planning
        block(m)
    times = {"plain": [], "divebatch": []}
    for _ in range(reps):
        times["plain"].append(block(False))
        times["divebatch"].append(block(True))
    return {"rank": rank, "times": times, "threads": torch.get_num_threads(), **stat}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="mlp")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--sharding", choices=("ddp", "fsdp"), default="ddp",
                   help="DistributedDataParallel, or FSDP2's fully_shard on each Linear and the model")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed block")
    p.add_argument("--reps", type=int, default=50, help="rounds of (plain, divebatch) blocks")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores // nproc)")
    p.add_argument("--out", default=None, help="write the JSON here and a table beside it (.md)")
    args = p.parse_args(argv)
    outs = launch(_rank_main, args.nproc, args=(args.workload, args.steps, args.reps, args.sharding),
                  threads=args.threads)
    r0 = outs[0]
    med = {k: statistics.median(v) / args.steps for k, v in r0["times"].items()}
    ratio = med["divebatch"] / med["plain"]
    every = DEFAULT_POLICY["measure_every"]
    result = {
        "workload": args.workload, "nproc": args.nproc, "sharding": args.sharding, "backend": "gloo", "threads_per_process": r0["threads"],
        "steps_per_block": args.steps, "reps": args.reps,
        "plain_step_ms": 1e3 * med["plain"], "divebatch_step_ms": 1e3 * med["divebatch"],
        "ratio": ratio, "amortised_ratio": 1 + (ratio - 1) / every, "measure_every": every,
        "diversity_last_step": r0.get("diversity"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "block_times_rank0": r0["times"],
    }
    table = ("| workload | processes | plain step | measured step | ratio | default policy (1 in "
             f"{every} measured) |\n|---|---|---|---|---|---|\n"
             f"| {args.workload} | {args.nproc} × gloo, {'FSDP2' if args.sharding == 'fsdp' else 'DDP'}, "
             f"{r0['threads']} thread(s) | {result['plain_step_ms']:.1f} ms | "
             f"{result['divebatch_step_ms']:.1f} ms | {ratio:.3f}× | {result['amortised_ratio']:.3f}× |")
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        title = "FSDP2" if args.sharding == "fsdp" else "DDP"
        out.with_suffix(".md").write_text(f"# {title} step cost ({args.workload})\n\n`python bench/ddp_step.py "
                                          f"--sharding {args.sharding} --nproc {args.nproc} --steps {args.steps} "
                                          f"--reps {args.reps}`\n\n"
                                          f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
