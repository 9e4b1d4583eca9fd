"""The dlrm workload's EmbeddingBag tables: their rule against the generic route, and batch sizes.

In one process, on the same model and batch: a plain step, a tracked step with the
``nn.EmbeddingBag`` rule, and (``--generic-reps`` > 0) a tracked step with that rule unregistered,
so the tables take the generic route (a ``vmap`` replay per chunk of samples) they took before the
rule existed; the per-sample norms of the two routes are compared. Then the plain and tracked steps
at larger batches (the tracker's cost per module and step is fixed, the step's is not), and one
large table with dense and sparse gradients (the batch gradient's norm reads the whole dense
``[V, p]`` gradient; a sparse one is coalesced first). Medians of
``--reps`` steps, plain and tracked alternating in rounds.

    python bench/bag_routes.py [--reps 15] [--generic-reps 3] [--batches 256,1024,4096]
                               [--out bench/results/bag_routes.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conv_patch_routes import emit, median_ms  # noqa: E402
from divebatch import GradNormTracker  # noqa: E402
from divebatch.layers import base  # noqa: E402
from workloads import WORKLOADS, BagRecommender, _bags  # noqa: E402


def _step(model, x, y, tracker=None):
    model.zero_grad(set_to_none=True)
    WORKLOADS["dlrm"].loss(model(x), y).backward()
    return tracker.collect().per_sample if tracker is not None else None


def _plain_and_tracked(model, x, y, reps: int, rounds: int = 3) -> tuple[float, float]:
    """Medians over ``rounds`` alternating rounds of ``reps`` plain and ``reps`` tracked steps."""
    tracker = GradNormTracker(model, "mean")
    plain, tracked = [], []
    try:
        for _ in range(2):  # warm-up
            _step(model, x, y, tracker)
        for _ in range(rounds):
            tracker.enabled = False
            plain.append(median_ms(lambda: _step(model, x, y), reps))
            tracker.enabled = True
            tracked.append(median_ms(lambda: _step(model, x, y, tracker), reps))
    finally:
        tracker.close()
    return statistics.median(plain), statistics.median(tracked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--generic-reps", type=int, default=3, help="steps on the generic route (0: skip it)")
    parser.add_argument("--batches", default="256,1024,4096")
    parser.add_argument("--out", default=None, help="write the Markdown here")
    args = parser.parse_args()

    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads; dlrm workload "
             "(8 EmbeddingBag(10000, 32) tables, bags of 20 ids, MLP 256-256-256-2)", ""]
    torch.manual_seed(0)
    model = BagRecommender()
    x, y = WORKLOADS["dlrm"].make_batch(torch.device("cpu"))
    plain, tracked = _plain_and_tracked(model, x, y, args.reps)
    lines += ["| batch 256 | plain | EmbeddingBag rule | generic route (rule unregistered) | norms agree to |",
              "|---|---|---|---|---|"]
    generic, agree = "not run", "-"
    if args.generic_reps > 0:
        with GradNormTracker(model, "mean") as tracker:
            ours = _step(model, x, y, tracker)
        rule = base._REGISTRY.pop(nn.EmbeddingBag)
        try:
            with GradNormTracker(model, "mean") as tracker:
                theirs = _step(model, x, y, tracker)
                routes = {plan.route for plan in tracker.plan() if plan.module.startswith("tables.")}
                ms = median_ms(lambda: _step(model, x, y, tracker), args.generic_reps)
                generic = f"{ms:.0f} ms ({', '.join(routes)})"
        finally:
            base._REGISTRY[nn.EmbeddingBag] = rule
        agree = f"{((ours - theirs).abs().max() / theirs.abs().max()).item():.1e}"
    lines.append(f"| | {plain:.1f} ms | {tracked:.1f} ms ({tracked / plain:.2f}x) | {generic} | {agree} |")
    lines += ["", "| batch | plain | tracked | ratio |", "|---|---|---|---|"]
    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        model = BagRecommender()
        x, y = _bags(batch, 8, 20, 10_000)(torch.device("cpu"))
        plain, tracked = _plain_and_tracked(model, x, y, args.reps)
        lines.append(f"| {batch} | {plain:.1f} ms | {tracked:.1f} ms | {tracked / plain:.2f}x |")
    lines += ["", "| one EmbeddingBag(1,000,000, 64) + Linear(64, 2), batch 256 | plain | tracked | ratio |",
              "|---|---|---|---|"]
    for sparse in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.EmbeddingBag(1_000_000, 64, mode="sum", sparse=sparse), nn.Linear(64, 2))
        x = (torch.rand(256, 20) ** 3 * 1_000_000).long()
        y = torch.randint(0, 2, (256,))
        plain, tracked = _plain_and_tracked(model, x, y, args.reps)
        lines.append(f"| {'sparse' if sparse else 'dense'} gradient | {plain:.1f} ms | {tracked:.1f} ms | "
                     f"{tracked / plain:.2f}x |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
