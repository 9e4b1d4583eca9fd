"""Where a tracked step's extra time goes: ``torch.profiler`` over a few plain steps and a few
divebatch steps of one workload, and the ops ranked by the device time (CPU time on a CPU) the
tracked step adds over the plain one, with the launch counts and the wall time per step.

    python bench/gpu/profile_step.py --device cuda --dtype bfloat16 --workload seq-large --out prof.json
    python bench/gpu/profile_step.py --device cpu --workload seq                # the same here

On the H200 seq-large ran 1.44x plain (26 ms extra per 60 ms step), of which the norm kernels'
own timings account for about 12 ms: this says where the rest goes. On CUDA each op's host (CPU)
time is kept beside its device time, and the line above the table gives the device's busy time per
step against the wall time: a step whose device idles (the H200's transformer workload, 3.28x on
a 4.4 ms step) is bound by the host, and the ``host us`` column says by which ops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))

from methods import build  # noqa: E402
from run_table import BY_NAME, _batch  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def _self_time_us(event, on_device: bool) -> float:
    if on_device:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return event.self_cpu_time_total


def profile_method(method, x, y, steps: int, device: str) -> dict:
    """``{"wall_ms": per step, "ops": {name: {"us": self time per step, "host_us": self CPU time
    per step, "calls": per step}}}``; ``us`` is device time on CUDA (then ``host_us`` is the time
    the host spent in the op itself, launches included), CPU time elsewhere (``host_us`` the same)."""
    for _ in range(3):
        method.step(x, y)
    on_device = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    if on_device:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            method.step(x, y)
        if on_device:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    ops = {}
    for event in prof.key_averages():
        us = _self_time_us(event, on_device) / steps
        if us > 0 or event.count:
            ops[event.key] = {"us": us, "host_us": event.self_cpu_time_total / steps, "calls": event.count / steps}
    return {"wall_ms": wall * 1e3, "ops": ops}


def added_ops(plain: dict, tracked: dict) -> list[dict]:
    """What the tracked step adds per op over the plain one (``profile_method``'s results):
    ``[{"op", "us", "host_us", "calls"}]``, most added (device, or CPU) time first."""
    zero = {"us": 0.0, "host_us": 0.0, "calls": 0.0}
    rows = []
    for key in set(plain["ops"]) | set(tracked["ops"]):
        p, t = plain["ops"].get(key, zero), tracked["ops"].get(key, zero)
        rows.append({"op": key, **{field: t[field] - p[field] for field in ("us", "host_us", "calls")}})
    return sorted(rows, key=lambda r: (r["us"], r["host_us"]), reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="seq")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--method", default="divebatch", help="the tracked method of bench/methods.py")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype != "float32" else None
    workload = WORKLOADS[args.workload]
    x, y = _batch(workload, args.device, dtype)
    results = {}
    for name in ("plain", args.method):
        method = build(BY_NAME[name], workload, device=args.device, dtype=dtype)
        results[name] = profile_method(method, x, y, args.steps, args.device)
        method.close()
    plain, tracked = results["plain"], results[args.method]
    unit = "device" if args.device.startswith("cuda") else "CPU"
    added = added_ops(plain, tracked)
    total = lambda r, field="us": sum(o[field] for o in r["ops"].values()) / 1e3  # noqa: E731
    print(f"{args.workload} on {args.device} ({args.dtype}): wall per step plain {plain['wall_ms']:.2f} ms, "
          f"{args.method} {tracked['wall_ms']:.2f} ms ({tracked['wall_ms'] / plain['wall_ms']:.2f}x); self {unit} "
          f"time per step {total(plain):.2f} ms vs {total(tracked):.2f} ms")
    if unit == "device":
        # (busy well below wall: the device waits for the host, whose own time per op is the
        # host column; the sum of the ops' host times leaves out Python between them)
        print(f"device busy {total(plain) / plain['wall_ms']:.0%} of the plain step's wall time, "
              f"{total(tracked) / tracked['wall_ms']:.0%} of the tracked one's; host time in ops per step "
              f"{total(plain, 'host_us'):.2f} ms vs {total(tracked, 'host_us'):.2f} ms")
    print(f"| op | added self {unit} us per step | added host us per step | added calls per step |")
    print("|---|---|---|---|")
    for row in added[:args.top]:
        print(f"| {row['op']} | {row['us']:.1f} | {row['host_us']:.1f} | {row['calls']:+.0f} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"workload": args.workload, "device": args.device, "dtype": args.dtype,
                                        "torch": torch.__version__, "results": results,
                                        "added": added[:200]},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
