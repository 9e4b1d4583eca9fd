"""Aten ops dispatched per training step, tracked against plain: the measure of host overhead
that a CPU can take for a GPU. On the H200 the transformer workload's plain step (299 ops) ran in
4.4 ms, ~15 us per op, and the tracked one 3.28x that (bench/results/gpu/2026-12-04-h200): a
small model's step there is bound by launches, so each op the tracker adds costs about as much as
one of the model's own.

    python bench/op_counts.py [--workloads transformer,seq,mlp] [--out bench/results/op_counts.json]

Counts one step after three warm-up steps (plans are made, caches filled) with a
``TorchDispatchMode`` (every aten op, including views that launch nothing), for the batch-gradient
norm's CPU path (blocked, float64 sums) and its CUDA path (one reduction per gradient, forced here),
and reports the ops by name that the tracker adds most.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import workloads as W  # noqa: E402
from divebatch import GradNormTracker, _norms  # noqa: E402


class _OpsByName(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(workload: W.Workload, cuda_norm_path: bool) -> dict:
    original = _norms._one_launch_per_tensor
    _norms._one_launch_per_tensor = lambda t: cuda_norm_path
    try:
        torch.manual_seed(0)
        model = workload.make_model()
        x, y = workload.make_batch(torch.device("cpu"))
        tracker = GradNormTracker(model, loss_reduction=workload.scale(x, y))

        def step():
            model.zero_grad(set_to_none=True)
            workload.loss(model(x), y).backward()
            if tracker.enabled:
                tracker.collect()

        for _ in range(3):
            step()
        tracked = _OpsByName()
        with tracked:
            step()
        tracker.enabled = False
        plain = _OpsByName()
        with plain:
            step()
        tracker.close()
    finally:
        _norms._one_launch_per_tensor = original
    added = tracked.counts.copy()
    added.subtract(plain.counts)
    return {"tracked": sum(tracked.counts.values()), "plain": sum(plain.counts.values()),
            "most_added": [(k, v) for k, v in added.most_common(8) if v > 0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="transformer,seq,mlp")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print("| workload | plain ops | tracked, CPU norm path | tracked, CUDA norm path | most added (CUDA path) |")
    print("|---|---|---|---|---|")
    for name in args.workloads.split(","):
        cpu, cuda = count(W.WORKLOADS[name], False), count(W.WORKLOADS[name], True)
        rows.append({"workload": name, "cpu_norm_path": cpu, "cuda_norm_path": cuda})
        added = ", ".join(f"{k} {v}" for k, v in cuda["most_added"][:5])
        print(f"| {name} | {cpu['plain']} | {cpu['tracked']} ({cpu['tracked'] / cpu['plain']:.2f}x) | "
              f"{cuda['tracked']} ({cuda['tracked'] / cuda['plain']:.2f}x) | {added} |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
