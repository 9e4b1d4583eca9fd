"""Host overhead of tracking: the time a tracked step adds to a plain one when the tensors are so
small that the arithmetic costs nothing, i.e. the Python hooks, the rules' bookkeeping and the
fixed cost of every op the tracker dispatches. On a GPU a small model's step is bound by exactly
this (the H200 ran the transformer workload's 4.4 ms step 3.28x tracked,
bench/results/gpu/2026-12-04-h200), so it is measured here, on one CPU thread, as microseconds per
step and per tracked module; with ``--device cuda`` the same steps on a GPU, where they are the
launch-bound regime itself (bench/gpu/run_gpu_checks.sh runs it there).

    python bench/host_overhead.py [--models mlp,transformer,seq,cnn] [--rounds 7] [--device cpu] [--out bench/results/host_overhead.md]
    python bench/host_overhead.py --models seq-tied,seq-tied-functional   # the table applied by the model's own code
    python bench/host_overhead.py --models transformer --profile 20   # + where the host time goes

Each round times ``--steps`` plain steps, then as many tracked ones (``collect()`` included), on
the same model; the table gives the medians over rounds. ``--profile N`` adds, per model, the N
functions with the most own time in a ``cProfile`` of tracked steps (its per-call cost inflates
Python functions against C ones, so read it for what is called how often and where, not for
exact shares): on a GPU the place to look for a launch, a synchronisation or a lookup that costs
more there than on this CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import workloads as W  # noqa: E402
from conv_patch_routes import emit  # noqa: E402
from divebatch import GradNormTracker  # noqa: E402


def _mlp():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    return model, torch.randn(8, 16), torch.randint(0, 4, (8,))


def _transformer():
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 4))
    return model, torch.randn(4, 8, 32), torch.randint(0, 4, (4, 8))


def _seq():
    return W.SeqModel(100, 32, 64, 2), torch.randint(0, 100, (4, 8)), torch.randint(0, 100, (4, 8))


def _seq_tied(functional: bool):
    model = W.FunctionalTiedSeqModel(100, 32, 64, 2) if functional else W.SeqModel(100, 32, 64, 2, tied=True)
    return model, torch.randint(0, 100, (4, 8)), torch.randint(0, 100, (4, 8))


def _cnn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    return model, torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))


MODELS = {"mlp": _mlp, "transformer": _transformer, "seq": _seq, "cnn": _cnn,
          # the table as the output layer through a tied nn.Linear, and applied by the model's own
          # forward (read by a torch-function mode around it: its cost per op)
          "seq-tied": lambda: _seq_tied(False), "seq-tied-functional": lambda: _seq_tied(True)}


def measure(name: str, steps: int, rounds: int, device: str = "cpu", profile_top: int = 0) -> dict:
    torch.manual_seed(0)
    model, x, y = MODELS[name]()
    model, x, y = model.to(device), x.to(device), y.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()

    tracker = GradNormTracker(model, enabled=False)

    def timed(tracked: bool) -> float:
        tracker.enabled = tracked
        for _ in range(3):  # warm-up: plans, caches, the verified first backward
            step()
            if tracked:
                tracker.collect()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
            if tracked:
                tracker.collect()
        sync()
        return (time.perf_counter() - start) / steps * 1e6

    plain, tracked = [], []
    for _ in range(rounds):
        plain.append(timed(False))
        tracked.append(timed(True))
    owners = len(tracker.plan())  # (the modules of the last tracked backward)
    profiled = _profile(lambda: (step(), tracker.collect()), steps, profile_top, sync) if profile_top else ""
    tracker.close()
    p, t = statistics.median(plain), statistics.median(tracked)
    return {"model": name, "tracked_modules": owners, "params": sum(1 for q in model.parameters()),
            "plain_us": p, "tracked_us": t, "added_us": t - p, "added_us_per_module": (t - p) / owners,
            "profile": profiled}


def _profile(tracked_step, steps: int, top: int, sync) -> str:
    """The ``top`` functions by own time over ``steps`` tracked steps (cProfile), per step."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        tracked_step()
    sync()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = ["| own us/step | calls/step | function |", "|---|---|---|"]
    for (path, line, func), (_, calls, own, _, _) in rows:
        where = f"{Path(path).parent.name}/{Path(path).name}:{line}" if path != "~" else "(built-in)"
        lines.append(f"| {own / steps * 1e6:.1f} | {calls / steps:.1f} | `{func}` {where} |")
    return "\n".join(lines)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model (tiny widths) | tracked modules / parameters | plain step | tracked step | added | added per module |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tracked_modules']} / {r['params']} | {r['plain_us']:.0f} us | "
                     f"{r['tracked_us']:.0f} us | {r['added_us']:.0f} us | {r['added_us_per_module']:.0f} us |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,transformer,seq,cnn",
                        help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=200, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=7, help="alternating plain/tracked timings (median)")
    parser.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also list, per model, the N functions with the most own time in tracked steps")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; pick from {sorted(MODELS)}")
    torch.set_num_threads(1)  # host overhead, not parallel arithmetic
    rows = [measure(name, args.steps, args.rounds, args.device, args.profile) for name in args.models.split(",")]
    table = to_markdown(rows)
    profiles = [f"\n### {r['model']}: own time in tracked steps (cProfile)\n\n{r['profile']}" for r in rows if r["profile"]]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "1 CPU thread"
    header = (f"torch {torch.__version__}, {where}, median of {args.rounds} rounds of {args.steps} steps "
              f"({time.strftime('%Y-%m-%d')})")
    emit([header, "", table, *profiles], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
