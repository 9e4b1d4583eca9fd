"""The seq workload sequences first (``batch_first=False``, [T, B] ids) against batch first, in one process.

The same model and tokens in both layouts (its blocks map each row on its own, so it runs on
either): per layout a plain step and a tracked step, each timed in every round (round-robin,
medians over ``--rounds`` rounds of ``--reps`` steps), as ratios to that layout's plain step. The
sequence-first tracked step runs each Linear, LayerNorm and the Embedding on its input viewed
``[B, T, ...]`` and copies its output back to ``[T, B, ...]``: its ratio against the batch-first
one is what that costs. The two layouts' per-sample norms are compared (the same samples).

    python bench/sequence_first.py [--reps 5] [--rounds 5] [--out bench/results/sequence_first.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conv_patch_routes import emit, median_ms  # noqa: E402
from divebatch import GradNormTracker  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="seq", choices=["seq", "seq-tied"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the Markdown here")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    torch.manual_seed(0)
    model = workload.make_model()
    ids, targets = workload.make_batch(torch.device("cpu"))  # [B, T]
    layouts = {"batch first": (ids, targets, True), "sequence first": (ids.t().contiguous(), targets.t(), False)}
    trackers = {name: GradNormTracker(model, "mean", batch_first=first, enabled=False)
                for name, (_, _, first) in layouts.items()}

    def step(name, tracked):
        x, y, _ = layouts[name]
        tracker = trackers[name]
        tracker.enabled = tracked
        try:
            model.zero_grad(set_to_none=True)
            out = model(x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            return tracker.collect().per_sample if tracked else None
        finally:
            tracker.enabled = False

    norms = {name: step(name, True) for name in layouts}  # (also a warm-up)
    times: dict = {(name, tracked): [] for name in layouts for tracked in (False, True)}
    for _ in range(args.rounds):
        for name, tracked in times:
            times[name, tracked].append(median_ms(lambda: step(name, tracked), args.reps))
    ms = {key: statistics.median(values) for key, values in times.items()}
    agree = ((norms["sequence first"] - norms["batch first"]).abs().max() / norms["batch first"].abs().max()).item()
    lines = [f"{args.workload}, torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
             f"{args.rounds} rounds of {args.reps} steps", "",
             "| layout | plain step | tracked step | ratio |", "|---|---|---|---|"]
    for name in layouts:
        plain, tracked = ms[name, False], ms[name, True]
        lines.append(f"| {name} | {plain:.1f} ms | {tracked:.1f} ms | {tracked / plain:.2f}x |")
    lines += ["", f"sequence-first tracked step / batch-first tracked step: "
              f"{ms['sequence first', True] / ms['batch first', True]:.2f}x; per-sample norms agree to {agree:.1e}"]
    for tracker in trackers.values():
        tracker.close()
    emit(lines, args.out)


if __name__ == "__main__":
    main()
