"""Hardware counters of the kernels behind the issue's targets (GPU only; Nsight Compute).

    python bench/gpu/ncu_kernels.py --out-dir bench/results/gpu [--workload seq-large-up]
    python bench/gpu/ncu_kernels.py --summarize ncu_kernels.csv --out ncu_kernels.json   # no GPU needed

The timings say how far the fused instantiate kernel is from the weight-gradient GEMM (2.21x on the
H200) and the ghost kernel from the bf16 peak (38% / 50%); these counters say why. The script runs
itself under ``ncu`` (``--clock-control none``: the machine's clocks are left alone) on one workload
of ``bench_kernels.WORKLOADS``: the kernels are autotuned and compiled first, outside the profiled
range, then the plain GEMM ``g^T a``, ``ghost_norm`` (with and without its bias) and
``instantiate_norm`` run once each inside ``torch.cuda.profiler.start/stop`` (with the small launches their
wrappers make around them). ncu's report is exported as CSV (``--page raw``) and summarised per
kernel: time, SM and memory throughput against their peaks, DRAM and L2 throughput, the tensor
pipes' activity, achieved occupancy, registers, and the three largest warp-stall reasons. Writes
``ncu_kernels.ncu-rep``, ``ncu_kernels.csv`` and ``ncu_kernels.json`` to ``--out-dir`` and prints the
table. Where ``ncu`` is missing or cannot read the counters (gVisor machines), it says so and exits 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).resolve().parent))

#: ncu sections read: enough for the summary below (the DRAM and L2 throughputs are SpeedOfLight's),
#: without MemoryWorkloadAnalysis's many replay passes.
SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")

#: Summary field -> raw metric name (``--page raw``); absent metrics are left out, not guessed.
METRICS = {
    "duration": "gpu__time_duration.sum",
    "sm_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "memory_pct": "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "l2_pct": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "registers": "launch__registers_per_thread",
    "grid": "launch__grid_size",
    "block": "launch__block_size",
}

#: The tensor pipes' activity (Hopper's warpgroup MMA and the warp-level MMA), whichever ncu reports.
TENSOR_PIPE = re.compile(r"^sm__pipe_(tensor\w*)_cycles_active\.avg\.pct_of_peak_sustained_(?:active|elapsed)$")
#: Warp-stall reasons: warps stalled per issued instruction, by reason (WarpStateStats); "selected"
#: is the issuing warp, not a stall.
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
NOT_STALLS = ("selected",)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def read_csv(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """``(units by metric, kernel rows)`` of an ncu ``--page raw --csv`` export: the header is the
    first line naming "Kernel Name" (ncu may print lines of its own before it), the units row the
    one under it."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if '"Kernel Name"' in line or line.startswith("Kernel Name")),
                 None)
    if start is None or start + 1 >= len(lines):
        raise ValueError("not an ncu --page raw --csv export: no header naming 'Kernel Name' and units under it")
    header, units = next(csv.reader([lines[start]])), next(csv.reader([lines[start + 1]]))
    rows = list(csv.DictReader(io.StringIO("\n".join([lines[start], *lines[start + 2:]]))))
    return dict(zip(header, units)), [row for row in rows if row.get("Kernel Name")]


def summarize(text: str) -> list[dict]:
    """Per kernel of the export: the ``METRICS`` found (the duration in microseconds), the tensor
    pipes' activity and the three largest stall reasons."""
    units, rows = read_csv(text)
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
    kernels = []
    for row in rows:
        summary: dict = {"kernel": row["Kernel Name"]}
        for field, metric in METRICS.items():
            value = _number(row.get(metric, ""))
            if value is None:
                continue
            if field == "duration":
                unit = units.get(metric)
                if unit not in scale:
                    continue  # (a unit absent or not known here: left out rather than misread)
                field, value = "duration_us", value * scale[unit]
            summary[field] = value
        summary["tensor_pipe_pct"] = {}
        stalls = {}
        for name, text in row.items():
            pipe, stall, value = TENSOR_PIPE.match(name or ""), STALL.match(name or ""), _number(text)
            if value is None:
                continue
            if pipe:
                summary["tensor_pipe_pct"][pipe.group(1)] = max(summary["tensor_pipe_pct"].get(pipe.group(1), 0.0),
                                                                 value)
            if stall and stall.group(1) not in NOT_STALLS:
                stalls[stall.group(1)] = value
        summary["top_stalls"] = sorted(stalls.items(), key=lambda item: -item[1])[:3]
        kernels.append(summary)
    return kernels


def roles(kernels: list[dict]) -> dict[str, dict]:
    """The profiled kernels by what they are: ``run_target`` launches ghost with its bias before
    ghost without; the GEMM is the longest kernel that is not one of ours (the others are the
    wrappers' fills and sums)."""
    ours = ("_ghost_norm_kernel", "_instantiate_norm_kernel")
    others = [k for k in kernels if not any(name in k["kernel"] for name in ours)]
    found = {"gemm": max(others, key=lambda k: k.get("duration_us", 0.0))} if others else {}
    ghosts = [k for k in kernels if "_ghost_norm_kernel" in k["kernel"]]
    found.update(zip(("ghost", "ghost (no bias)"), ghosts))
    found.update(("instantiate", k) for k in kernels if "_instantiate_norm_kernel" in k["kernel"])
    return found


def as_markdown(kernels: list[dict]) -> str:
    lines = ["| kernel | us | SM % | memory % | DRAM % | L2 % | tensor pipes % | occupancy % | regs | top stalls |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(k, field, fmt="{:.0f}"):
        return fmt.format(k[field]) if field in k else "-"

    for k in kernels:
        tensor = ", ".join(f"{name} {v:.0f}" for name, v in k["tensor_pipe_pct"].items() if v) or "-"
        stalls = ", ".join(f"{name} {v:.1f}" for name, v in k["top_stalls"]) or "-"
        lines.append(f"| {k['kernel'][:60]} | {cell(k, 'duration_us', '{:.1f}')} | {cell(k, 'sm_pct')} | "
                     f"{cell(k, 'memory_pct')} | {cell(k, 'dram_pct')} | {cell(k, 'l2_pct')} | {tensor} | "
                     f"{cell(k, 'occupancy_pct')} | {cell(k, 'registers')} | {stalls} |")
    return "\n".join(lines)


def run_target(workload: str, device: str = "cuda") -> list:
    """The profiled program: tune and compile outside the range, then each kernel once inside it
    (``device="cpu"``: the same calls under the interpreter, for the tests); returns their outputs."""
    import torch

    import bench_kernels

    op, B, T, d, p, dtype, _ = bench_kernels.WORKLOADS[workload]
    if op != "ghost+instantiate":
        raise SystemExit(f"--workload {workload}: pick a ghost+instantiate workload of bench_kernels.WORKLOADS")
    K = bench_kernels.load_kernels()
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(B, T, d, device=device, generator=gen).to(dtype)
    g = (0.1 * torch.randn(B, T, p, device=device, generator=gen)).to(dtype)
    a2, g2 = a.reshape(B * T, d), g.reshape(B * T, p)
    calls = [lambda: g2.t() @ a2, lambda: K.ghost_norm_triton(a, g, True), lambda: K.ghost_norm_triton(a, g, False),
             lambda: K.instantiate_norm_triton(a, g, True)]
    on_gpu = device == "cuda"
    for call in calls:  # (autotuning: its timing launches stay outside the profiled range)
        call()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    outputs = [call() for call in calls]
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "gpu")
    parser.add_argument("--workload", default="seq-large-up")
    parser.add_argument("--ncu", default=os.environ.get("NCU", "ncu"), help="the Nsight Compute command")
    parser.add_argument("--summarize", type=Path, default=None, metavar="CSV",
                        help="only summarise an exported CSV (to --out, else print)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--target", action="store_true", help=argparse.SUPPRESS)  # (the profiled program)
    args = parser.parse_args(argv)
    if args.target:
        run_target(args.workload)
        return 0
    if args.summarize:
        text = args.summarize.read_text()
    else:
        if shutil.which(args.ncu) is None:
            print(f"no Nsight Compute here ({args.ncu!r} is not on PATH): nothing profiled", file=sys.stderr)
            return 2
        args.out_dir.mkdir(parents=True, exist_ok=True)
        report = args.out_dir / "ncu_kernels"
        profiled = subprocess.run(
            [args.ncu, "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all",
             *(f"--section={s}" for s in SECTIONS), "--force-overwrite", "--export", str(report),
             sys.executable, __file__, "--target", "--workload", args.workload], text=True)
        if profiled.returncode != 0 or not report.with_suffix(".ncu-rep").is_file():
            print(f"ncu failed (rc={profiled.returncode}): on gVisor machines it cannot read the counters",
                  file=sys.stderr)
            return 2
        exported = subprocess.run([args.ncu, "--import", str(report.with_suffix(".ncu-rep")), "--page", "raw", "--csv"],
                                  capture_output=True, text=True)
        text = exported.stdout
        (args.out_dir / "ncu_kernels.csv").write_text(text)
        args.out = args.out or args.out_dir / "ncu_kernels.json"
    kernels = summarize(text)
    print(as_markdown(kernels))
    if args.out:
        args.out.write_text(json.dumps({"workload": args.workload, "kernels": kernels}, indent=1))
    return 0 if kernels else 1


if __name__ == "__main__":
    sys.exit(main())
