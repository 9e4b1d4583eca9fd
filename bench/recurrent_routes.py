"""The lstm, gru and lstm-packed workloads' recurrent layers: the fused forward against the replay, in one process.

On the same model and batch, rounds of ``--reps`` steps each: a plain step (tracking off), a
tracked step with ``fused=True`` (the layer's forward is the recurrence stepped by divebatch's
scans, nothing replayed) and one with ``fused=False`` (the layer's own forward, then one batched
replay of the recurrence for the gate gradients). Medians over ``--rounds`` rounds, as ratios to the plain step; the two
tracked routes' per-sample norms are compared.

    python bench/recurrent_routes.py [--reps 5] [--rounds 5] [--out bench/results/recurrent_routes.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conv_patch_routes import emit, median_ms  # noqa: E402
from divebatch import GradNormTracker  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the Markdown here")
    args = parser.parse_args()
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.rounds} rounds of "
             f"{args.reps} steps", "",
             "| workload | plain step | fused (no replay) | replay (`fused=False`) | norms agree to |",
             "|---|---|---|---|---|"]
    for name in ("lstm", "gru", "lstm-packed"):
        workload = WORKLOADS[name]
        torch.manual_seed(0)
        model = workload.make_model()
        x, y = workload.make_batch(torch.device("cpu"))
        trackers = {fused: GradNormTracker(model, "mean", fused=fused, enabled=False) for fused in (True, False)}

        def step(tracker=None):
            model.zero_grad(set_to_none=True)
            workload.loss(model(x), y).backward()
            return tracker.collect().per_sample if tracker is not None else None

        def tracked(fused):
            trackers[fused].enabled = True
            try:
                return step(trackers[fused])
            finally:
                trackers[fused].enabled = False

        norms = {fused: tracked(fused) for fused in (True, False)}  # (also the warm-up)
        times: dict = {"plain": [], True: [], False: []}
        for _ in range(args.rounds):
            times["plain"].append(median_ms(step, args.reps))
            for fused in (True, False):
                times[fused].append(median_ms(lambda: tracked(fused), args.reps))
        plain = statistics.median(times["plain"])
        fused, replay = (statistics.median(times[f]) for f in (True, False))
        agree = ((norms[True] - norms[False]).abs().max() / norms[False].abs().max()).item()
        lines.append(f"| {name} | {plain:.1f} ms | {fused:.1f} ms ({fused / plain:.2f}x) | "
                     f"{replay:.1f} ms ({replay / plain:.2f}x) | {agree:.1e} |")
        for tracker in trackers.values():
            tracker.close()
    emit(lines, args.out)


if __name__ == "__main__":
    main()
