"""Print the per-sample-norm table of ../shared/BENCHMARKS.md and write it as JSON/Markdown.

For every workload and method, side by side in one process (round-robin, so drift hits every
method alike): median ms per step, ratio to plain, max relative error of the per-sample norms
against torch.func, and peak extra memory over plain (on CPU the peak RSS of a fresh child
process per method, since the CPU allocator keeps no peak statistics, with glibc's mmap threshold
fixed, see ``PROBE_ENV``; on CUDA the allocator's peak, in this process).

    python bench/run_table.py                       # mlp, cnn, seq on CPU
    python bench/run_table.py --workloads seq --reps 30 --out bench/results/cpu_table.json
    python bench/run_table.py --device cuda --dtype bfloat16 --workloads seq-large,conv-large
    python bench/run_table.py --workloads vit,gpt2 --methods divebatch,plain-compiled,divebatch-compiled --no-memory
        (torch.compile: divebatch-compiled's ratio is also given to plain-compiled's step)
    python bench/run_table.py --device cuda --dtype bfloat16 --workloads conv-large --out T.json --append
        (adds to T.json's rows; a workload already there is measured again and replaced)

A workload that fails as a whole (its batch, its plain step, a GPU out of memory) is recorded as
a row that says why, and the next one runs; where torch.func cannot give the reference norms,
the methods are timed all the same and their error column says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's divebatch, installed or not

from methods import METHODS, MethodUnavailable, build  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

BY_NAME = {m.name: m for m in METHODS}


def _status_kb(field: str) -> int:
    # VmHWM (peak RSS) belongs to this process image; ru_maxrss would carry the parent's peak
    # across fork+exec and hide everything below it.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _batch(workload, device: str, dtype):
    x, y = workload.make_batch(torch.device(device))
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    return x, y


def memory_probe(workload_name: str, method_name: str, device: str) -> dict:
    """Run in a child process: RSS before the first step and peak RSS over three steps (KiB)."""
    workload = WORKLOADS[workload_name]
    method = build(BY_NAME[method_name], workload, device=device)
    x, y = _batch(workload, device, None)
    before = _status_kb("VmRSS")
    for _ in range(3):
        method.step(x, y)
    return {"before_kb": before, "peak_kb": _status_kb("VmHWM")}


#: The memory probes' environment. glibc raises its mmap threshold each time a large block is freed
#: (up to 32 MiB); blocks of that size then come from the heap, whose top cannot shrink past a live
#: small block, so by default the peak RSS depends on the order of allocations as much as on their
#: sizes: the seq workload's plain step peaked 114-122 MB above its start by default (±15 MB from run
#: to run), 80 MB in every run with the threshold fixed at glibc's initial 128 KiB, where a block
#: above it is mapped when allocated and unmapped when freed and the peak RSS is the peak of the
#: memory in use (divebatch: 131-159 MB by default, 93 MB fixed).
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def measure_memory(workload: str, method: str, device: str, repeats: int = 3) -> dict | None:
    """Median over ``repeats`` fresh child processes, each run with ``PROBE_ENV``."""
    cmd = [sys.executable, __file__, "--memory-probe", workload, method, "--device", device]
    probes = []
    for _ in range(repeats):
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **PROBE_ENV})
        if done.returncode != 0:
            return None
        probes.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(p[key] for p in probes) for key in probes[0]}


def measure_cuda_memory(methods: dict, x, y) -> dict:
    """Peak CUDA memory over three steps of each method, in this process (KiB, like the RSS
    probes): every method's model stays resident throughout, so peaks differ only by the steps'
    own temporaries."""
    out = {}
    for name, method in methods.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            method.step(x, y)
        torch.cuda.synchronize()
        out[name] = {"before_kb": before / 1024, "peak_kb": torch.cuda.max_memory_allocated() / 1024}
    return out


def run_workload(name: str, method_names: list[str], reps: int, device: str, memory: bool,
                 dtype: torch.dtype | None = None) -> list[dict]:
    workload = WORKLOADS[name]
    x, y = _batch(workload, device, dtype)
    methods, rows = {}, {}
    for method_name in method_names:
        try:
            methods[method_name] = build(BY_NAME[method_name], workload, device=device, dtype=dtype)
        except MethodUnavailable as err:
            rows[method_name] = {"workload": name, "method": method_name, "skipped": str(err)}
    # Correctness first (same weights, same batch): per-sample norms against torch.func.
    try:
        reference, no_reference = build(BY_NAME["torch.func"], workload, device=device, dtype=dtype).step(x, y), None
    except Exception as err:  # noqa: BLE001 - the timings still stand without it
        reference, no_reference = None, f"torch.func failed: {type(err).__name__}: {err}"
    norms = {}
    for method_name, method in list(methods.items()):
        try:
            norms[method_name] = method.step(x, y)
        except Exception as err:  # noqa: BLE001 - a library refusing the workload is a result
            rows[method_name] = {"workload": name, "method": method_name, "skipped": f"{type(err).__name__}: {err}"}
            methods.pop(method_name).close()
    times = {m: [] for m in methods}
    for _ in range(reps):
        for method_name, method in methods.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            method.step(x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times[method_name].append(time.perf_counter() - start)
    plain_ms = statistics.median(times["plain"]) * 1e3
    if not memory:
        mem = {}
    elif device.startswith("cuda"):
        mem = measure_cuda_memory(methods, x, y)
    else:  # CPU peak RSS needs a fresh process per method
        mem = {m: measure_memory(name, m, device) for m in methods}
    plain_mem = mem.get("plain")
    for method_name in methods:
        ms = statistics.median(times[method_name]) * 1e3
        row = {"workload": name, "method": method_name, "median_ms": ms, "ratio": ms / plain_ms}
        if no_reference is not None:
            row["no_reference"] = no_reference
        elif norms.get(method_name) is not None:
            err = (norms[method_name].double() - reference.double()).abs().max() / reference.double().abs().max()
            row["max_rel_err"] = err.item()
        if mem.get(method_name) and plain_mem:
            row["extra_mb"] = (mem[method_name]["peak_kb"] - plain_mem["peak_kb"]) / 1024
            row["plain_step_mb"] = (plain_mem["peak_kb"] - plain_mem["before_kb"]) / 1024
        if method_name != "plain-compiled" and method_name.endswith("-compiled") and times.get("plain-compiled"):
            row["ratio_to_compiled_plain"] = ms / (statistics.median(times["plain-compiled"]) * 1e3)
        rows[method_name] = row
        methods[method_name].close()
    return [rows[m] for m in method_names if m in rows]


def to_markdown(rows: list[dict]) -> str:
    lines = ["| workload | method | median ms | ratio to plain | max rel err vs torch.func | peak extra MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['workload']} | {r['method']} | skipped: {r['skipped'][:60]} | | | |")
            continue
        err = (f"{r['max_rel_err']:.1e}" if "max_rel_err" in r
               else "n/a (no torch.func)" if "no_reference" in r else "-")
        mem = f"{r['extra_mb']:+.0f} (plain step {r['plain_step_mb']:.0f})" if "extra_mb" in r else "-"
        ratio = f"{r['ratio']:.2f}x"
        if "ratio_to_compiled_plain" in r:
            ratio += f" ({r['ratio_to_compiled_plain']:.2f}x plain-compiled)"
        lines.append(f"| {r['workload']} | {r['method']} | {r['median_ms']:.1f} | {ratio} | {err} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mlp,cnn,seq", help="comma-separated names of bench/workloads.py")
    parser.add_argument("--methods", default=",".join(m for m in BY_NAME if m not in (
                            "divebatch-unfused", "divebatch-replay", "plain-compiled", "divebatch-compiled")),
                        help=f"comma-separated methods (plain is always run) of: {', '.join(BY_NAME)}")
    parser.add_argument("--reps", type=int, default=20, help="timed steps per method (round-robin)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement (CPU: child processes)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
                        help="model and input dtype (BENCHMARKS.md: bf16 for the GPU workloads; float64 shows "
                             "how much of an error is the float32 reference's own rounding)")
    parser.add_argument("--out", type=Path, default=None, help="write rows as JSON here and a .md beside it")
    parser.add_argument("--append", action="store_true",
                        help="add to the rows already in --out (those of the workloads rerun are replaced)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, args.device)))
        return 0
    methods = ["plain"] + [m for m in args.methods.split(",") if m and m != "plain"]
    names = args.workloads.split(",")
    unknown = [m for m in methods if m not in BY_NAME] + [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown method or workload: {', '.join(unknown)}")
    earlier = json.loads(args.out.read_text()) if args.append and args.out and args.out.is_file() else {}
    rows = [r for r in earlier.get("rows", []) if r.get("workload") not in names]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
            "reps": args.reps, "date": time.strftime("%Y-%m-%d %H:%M")}
    failed = False
    for name in names:
        dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
        try:
            rows += run_workload(name, methods, args.reps, args.device, not args.no_memory, dtype)
        except Exception as err:  # noqa: BLE001 - one workload's failure is a result; the next still runs
            failed = True
            rows.append({"workload": name, "method": "plain",
                         "skipped": f"workload failed: {type(err).__name__}: {err}"})
        gc.collect()  # (a failed workload's models, held by its traceback until now)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(to_markdown([r for r in rows if r["workload"] == name]), flush=True)
        if args.out:  # after every workload, so a run cut short by a time limit keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            args.out.with_suffix(".md").write_text(f"{meta}\n\n{to_markdown(rows)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
