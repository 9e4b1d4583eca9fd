"""What a GPU run answered: the results of ``bench/gpu/run_gpu_checks.sh`` read against the
targets of the Triton-kernel issue and the open questions of docs/kernels.md, one line each with
the change it calls for. The device minutes are few; this makes the reading after them quick and
the same every time. Nothing here times or runs anything: it reads the JSON and junit files.

    python bench/gpu/verdicts.py bench/results/gpu/<date>-<gpu> [--out verdicts.md]

Reads what is there (a cut run leaves some files out: those questions say "not run"):
``gpu_triton_kernels_*.xml`` (the kernel tests natively), ``bench_kernels.json``, ``gpu_table.json``,
``check_engine.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ncu_kernels import roles  # noqa: E402

#: The issue's targets: fused instantiate time over the plain weight-gradient GEMM's, the ghost
#: kernel's share of the bf16 tensor-core peak, and the seq-large training step with norms over plain.
FUSED_OVER_GEMM = 1.15
GHOST_SHARE_OF_PEAK = 0.50
SEQ_LARGE_STEP = 1.05

#: A kernel's error against the float32 reference on the same (16-bit) inputs where nothing cancels:
#: float32 rounding. Above it at large shapes means the compiled code is off (the H200 run's race).
ROUNDING = 1e-5

#: bf16 matrix-product rate (TFLOP/s) measured on random data on the lent machines
#: (/work/.library/device/KINDS.md), for results whose ``meta`` has no ``bf16_gemm_tflops``.
MEASURED_PEAK = {"H100": 790.0, "H200": 790.0}

#: The instantiate / ghost rows of a ``ghost+instantiate`` workload, and the GEMM they are read against.
GEMM, GHOST, INSTANTIATE = "gemm g^T a (floor)", "triton ghost_norm", "triton instantiate_norm"
GHOST_WIDE = "triton ghost_norm (wide tiles)"
GHOST_NO_BIAS = "triton ghost_norm (no bias)"
GHOST_BIAS_IN_WRAPPER = "triton ghost_norm (no bias) + torch bias"

#: The bias's share of the Gram kernel's time above which its column-sum loop is worth reworking.
BIAS_SHARE = 0.10


@dataclass
class Verdict:
    """One question: what was measured, the verdict, and what to change because of it."""

    topic: str
    measured: str
    verdict: str
    action: str = ""


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def junit_outcomes(folder: Path) -> dict[str, str]:
    """Test id -> ``passed`` / ``failed`` / ``skipped`` over every ``gpu_triton_kernels_*.xml``."""
    outcomes = {}
    for path in sorted(folder.glob("gpu_triton_kernels_*.xml")):
        for case in ET.parse(path).getroot().iter("testcase"):
            kinds = {child.tag for child in case}
            outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
            outcomes[case.get("name")] = outcome
    return outcomes


#: Groups of kernel tests whose passing on a GPU clears something, and what.
TEST_GROUPS = (
    ("recurrent scans", lambda n: "recurrent_scan" in n,
     "empty UNVERIFIED_ON_GPU in kernels/__init__.py (the scans run on CUDA again)"),
    ("ghost on wide tiles", lambda n: "ghost_norm_wide" in n,
     "exact on this GPU: its timing (below) decides the default"),
    ("config sweeps (ghost, instantiate)", lambda n: "every_gpu_config" in n and "conv_" not in n,
     "empty _UNVERIFIED in kernels/ghost_norm.py and kernels/instantiate_norm.py"),
    ("config sweeps (implicit convolutions)", lambda n: "every_gpu_config" in n and "conv_" in n, ""),
    ("norm kernels", lambda n: any(k in n for k in ("affine_norm_grads", "group_norm_grads", "channel_norm_grads")),
     ""),
    ("other kernel tests", None, ""),
)


def kernel_tests(outcomes: dict[str, str]) -> list[Verdict]:
    if not outcomes:
        return [Verdict("kernel tests on the GPU", "no junit files", "not run")]
    verdicts, left = [], dict(outcomes)
    for topic, member, clears in TEST_GROUPS:
        names = [n for n in left if member is None or member(n)]
        for n in names:
            del left[n]
        counts = {k: sum(outcomes[n] == k for n in names) for k in ("passed", "failed", "skipped")}
        measured = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
        if counts["failed"]:
            failing = sorted(n for n in names if outcomes[n] == "failed")
            verdicts.append(Verdict(topic, measured, "failing",
                                    "fix first: " + ", ".join(failing[:4]) + (" ..." if len(failing) > 4 else "")))
        elif counts["passed"]:
            verdicts.append(Verdict(topic, measured, "clean", clears))
        else:
            verdicts.append(Verdict(topic, measured, "not run"))
    return verdicts


def _rows(result) -> dict[str, dict]:
    return {row["method"]: row for row in result.get("rows", [])}


def peak_tflops(meta: dict) -> float | None:
    """The bf16 peak the run measured, else the one measured before on a machine of its name."""
    if meta.get("bf16_gemm_tflops"):
        return float(meta["bf16_gemm_tflops"])
    return next((v for k, v in MEASURED_PEAK.items() if k in str(meta.get("device", ""))), None)


def kernel_targets(bench: dict) -> list[Verdict]:
    """The fused instantiate route against the GEMM, the ghost kernel against the peak, at seq-large."""
    results = {r["workload"]: r for r in bench["results"]}
    peak = peak_tflops(bench.get("meta", {}))
    verdicts = []
    for name in ("seq-large-up", "seq-large-down"):
        rows = _rows(results.get(name, {}))
        if GEMM not in rows or INSTANTIATE not in rows:
            verdicts.append(Verdict(f"fused instantiate / GEMM, {name}", "", "not run"))
            continue
        ratio = rows[INSTANTIATE]["ms"] / rows[GEMM]["ms"]
        met = ratio <= FUSED_OVER_GEMM
        verdicts.append(Verdict(
            f"fused instantiate / GEMM, {name} (target <= {FUSED_OVER_GEMM}x)",
            f"{rows[INSTANTIATE]['ms']:.2f} ms / {rows[GEMM]['ms']:.2f} ms = {ratio:.2f}x; config "
            f"{rows[INSTANTIATE].get('config', '?')}", "met" if met else "missed",
            "refit FUSED_CUDA_EXTRA_COST (layers/linear.py) from the route entries" if met else
            "compare the 'as 2 samples' row: near this ratio, the tiles are the limit; near 1x, the samples"))
        if GHOST in rows and peak:
            share = rows[GHOST]["tflops"] / peak
            verdicts.append(Verdict(
                f"ghost kernel share of the bf16 peak, {name} (target >= {GHOST_SHARE_OF_PEAK:.0%})",
                f"{rows[GHOST]['tflops']:.0f} of {peak:.0f} TFLOP/s = {share:.0%}",
                "met" if share >= GHOST_SHARE_OF_PEAK else "missed"))
        if GHOST in rows and GHOST_NO_BIAS in rows:
            verdicts.append(ghost_bias_verdict(name, rows[GHOST], rows[GHOST_NO_BIAS], peak,
                                               rows.get(GHOST_BIAS_IN_WRAPPER)))
        if GHOST in rows and GHOST_WIDE in rows:
            verdicts.append(wide_ghost_verdict(name, rows[GHOST], rows[GHOST_WIDE], peak))
    return verdicts


def ghost_bias_verdict(name: str, with_bias: dict, no_bias: dict, peak: float | None,
                       in_wrapper: dict | None = None) -> Verdict:
    """What the bias's column sums (a loop of the diagonal programs over g's p columns) add to the
    Gram kernel: up and down have the same Gram flops, and up's p is four times down's. Beside it,
    the kernel without the bias and the bias from ``g.sum(1)`` in torch (``in_wrapper``)."""
    share = 1 - no_bias["ms"] / with_bias["ms"]
    rate = f", {no_bias['tflops'] / peak:.0%} of the peak without it" if peak and "tflops" in no_bias else ""
    measured = f"{with_bias['ms']:.2f} ms with the bias, {no_bias['ms']:.2f} ms without: {share:.0%} of the time{rate}"
    exact_wrapper = in_wrapper is not None and in_wrapper.get("max_rel_err_vs_reference", 1.0) <= ROUNDING
    if in_wrapper is not None:
        measured += f"; with the bias in torch {in_wrapper['ms']:.2f} ms"
    if share <= BIAS_SHARE:
        return Verdict(f"ghost kernel's bias cost, {name}", measured, "small", "the Grams are the limit")
    if exact_wrapper and in_wrapper["ms"] < with_bias["ms"]:
        return Verdict(f"ghost kernel's bias cost, {name}", measured, "a limit; torch's pass is faster",
                       "take the bias from g.sum(1) in ghost_norm_triton from this p on (kernels/ghost_norm.py), "
                       "the kernel's loop below it")
    return Verdict(f"ghost kernel's bias cost, {name}", measured, "a limit",
                   "read the bias loop's stalls under ncu (the with- and no-bias ghost rows of ncu_kernels.json; "
                   "kernels/ghost_norm.py _add_column_sums) before reworking it")


def wide_ghost_verdict(name: str, square: dict, wide: dict, peak: float | None) -> Verdict:
    """The Gram kernel on 128 x 256 tiles (``_ghost_norm_wide_kernel``) against the square one."""
    exact = wide.get("max_rel_err_vs_reference", 1.0) <= ROUNDING
    faster = wide["ms"] < square["ms"]
    share = f", {wide['tflops'] / peak:.0%} of the peak" if peak and "tflops" in wide else ""
    measured = (f"{wide['ms']:.2f} ms against {square['ms']:.2f} ms{share}; error "
                f"{wide.get('max_rel_err_vs_reference', float('nan')):.1e}; config {wide.get('config', '?')}")
    if not exact:
        return Verdict(f"ghost on wide tiles, {name}", measured, "off the reference",
                       "keep it off; see which config (config_ms) and whether the second call agrees")
    if faster:
        return Verdict(f"ghost on wide tiles, {name}", measured, "faster",
                       "take it by default on sm_90 from WIDE_MIN_T (kernels/ghost_norm.py wide_ghost_wanted), "
                       "if divebatch-ghost-wide's seq-large step agrees")
    return Verdict(f"ghost on wide tiles, {name}", measured, "slower", "leave it opt-in")


def wide_ghost_default(bench: dict) -> list[Verdict]:
    """Where the Gram kernel on 128 x 256 tiles should be the default: every workload timed with both
    Gram kernels, read by its ``d + p`` (a unit's scratch round trip is fixed, its operand bytes grow
    with ``d + p``, so the wide tiles are expected to pay from some width on): a width floor if one
    separates the faster workloads from the slower ones."""
    timed = []
    for result in bench["results"]:
        rows = _rows(result)
        if GHOST in rows and GHOST_WIDE in rows and "d" in result and "p" in result:
            exact = rows[GHOST_WIDE].get("max_rel_err_vs_reference", 1.0) <= ROUNDING
            ratio = rows[GHOST_WIDE]["ms"] / rows[GHOST]["ms"]
            timed.append((result["d"] + result["p"], result["workload"], ratio, exact))
    topic = "ghost on wide tiles: the default"
    if not timed:
        return [Verdict(topic, "", "not run")]
    timed.sort()
    measured = "; ".join(f"{name} (d + p = {width}) {ratio:.2f}x" for width, name, ratio, _ in timed)
    off = [name for _, name, _, exact in timed if not exact]
    if off:
        return [Verdict(topic, measured, "off the reference", f"keep it off (off at {', '.join(off)})")]
    faster = [width for width, _, ratio, _ in timed if ratio < 1]
    slower = [width for width, _, ratio, _ in timed if ratio >= 1]
    if not faster:
        return [Verdict(topic, measured, "slower everywhere", "leave it opt-in")]
    if not slower:
        return [Verdict(topic, measured, "faster everywhere",
                        "take it by default on sm_90 from WIDE_MIN_T (kernels/ghost_norm.py wide_ghost_wanted)")]
    if min(faster) > max(slower):
        return [Verdict(topic, measured, f"faster from d + p = {min(faster)}",
                        f"take it by default on sm_90 from WIDE_MIN_T where d + p >= {min(faster)} "
                        f"(slower at {max(slower)}; kernels/ghost_norm.py wide_ghost_wanted)")]
    return [Verdict(topic, measured, "mixed", "no width separates where it pays: leave it opt-in")]


def large_shape_errors(bench: dict) -> list[Verdict]:
    """Every Triton row's and extra error at the large shapes, against float32 rounding."""
    worst = {}
    for result in bench["results"]:
        errors = {m: row["max_rel_err_vs_reference"] for m, row in _rows(result).items()
                  if m.startswith("triton") and "max_rel_err_vs_reference" in row}
        errors.update({m: e for m, e in result.get("extra_errors", {}).items() if m.startswith("triton")})
        for method, err in errors.items():
            key = (result["workload"], method)
            worst[key] = max(err, worst.get(key, 0.0))
    if not worst:
        return [Verdict("kernel errors at large shapes", "", "not run")]
    off = sorted(((err, w, m) for (w, m), err in worst.items() if err > ROUNDING), reverse=True)
    if not off:
        return [Verdict(f"kernel errors at large shapes (<= {ROUNDING:g})",
                        f"worst {max(worst.values()):.1e} over {len(worst)} rows", "clean",
                        "the race fix holds: raise FUSED_CUDA_MAX_WEIGHT if the fused route wins")]
    listed = "; ".join(f"{w} {m} {err:.1e}" for err, w, m in off[:5])
    return [Verdict(f"kernel errors at large shapes (<= {ROUNDING:g})", f"{len(off)} above: {listed}", "off",
                    "read the rows' configs; the first-call check refuses these on a GPU")]


def route_model(bench: dict) -> list[Verdict]:
    """Whether the CUDA route model picks the route that ran faster."""
    picks = [(r["workload"], r["route"]) for r in bench["results"] if "route" in r]
    if not picks:
        return []
    wrong = [f"{w} (model {r['model']}, faster {r['faster']})" for w, r in picks if r["model"] != r["faster"]]
    return [Verdict("CUDA route model (fused instantiate or ghost)", f"{len(picks) - len(wrong)} of {len(picks)} right"
                    + (": wrong at " + ", ".join(wrong) if wrong else ""), "right" if not wrong else "wrong",
                    "refit FUSED_CUDA_EXTRA_COST" if wrong else "")]


def implicit_convolutions(bench: dict) -> list[Verdict]:
    """Each convolution row: the implicit kernel (from the map as it is, and from a channels-last copy
    where the engine makes one) against the unfolded route, and what the engine's default should be."""
    verdicts, wins = [], {"copy": [], "as-is": [], "channels-last": []}
    for result in bench["results"]:
        if result.get("op") not in ("conv", "conv-ghost"):
            continue
        rows = _rows(result)
        unfolded = next((row for m, row in rows.items() if m.startswith("unfold + ")), None)
        implicit = {m: row for m, row in rows.items() if "(implicit)" in m}
        if unfolded is None or not implicit:
            continue
        parts = []
        for method, row in implicit.items():
            ratio = row["ms"] / unfolded["ms"]
            kind = "copy" if "copy" in method else "channels-last" if result["workload"].endswith("-cl") else "as-is"
            wins[kind].append(ratio)
            parts.append(f"{'from a channels-last copy' if kind == 'copy' else kind}: {row['ms']:.3f} ms ({ratio:.2f}x)")
        verdicts.append(Verdict(f"implicit convolution, {result['workload']}",
                                f"unfolded {unfolded['ms']:.3f} ms; " + "; ".join(parts),
                                "faster" if min(row["ms"] for row in implicit.values()) < unfolded["ms"] else "slower"))
    if not verdicts:
        return []
    if wins["copy"] and max(wins["copy"]) < 1 and (not wins["channels-last"] or max(wins["channels-last"]) < 1):
        action, verdict = "default implicit_patches on (layers/conv.py), vector_layouts' copies kept", "on"
    elif wins["channels-last"] and max(wins["channels-last"]) < 1:
        action, verdict = ("default implicit_patches on for channels-last inputs only, and drop "
                           "vector_layouts' copies"), "channels-last only"
    else:
        action, verdict = "keep DIVEBATCH_TRITON_IMPLICIT_CONV opt-in", "off"
    verdicts.append(Verdict("implicit convolutions: the default", "ratios to the unfolded route above", verdict, action))
    return verdicts


def unfolded_layouts(bench: dict) -> list[Verdict]:
    """The dot kernels on a convolution's unfolded patches as positions-last views (``X-unfolded``)
    against contiguous rows (``X``): at positions not a multiple of 16 the CUDA routes hand them rows
    (``layers.conv.rows_layout``), which should be faster there; at a multiple, views, which should
    be as fast."""
    results = {r["workload"]: r for r in bench["results"] if "error" not in r}
    verdicts = []
    for name, views in results.items():
        rows = results.get(name.removesuffix("-unfolded")) if name.endswith("-unfolded") else None
        if rows is None or rows is views:
            continue
        view_ms, row_ms = _rows(views), _rows(rows)
        ratios = {k: view_ms[k]["ms"] / row_ms[k]["ms"] for k in (GHOST, INSTANTIATE) if k in view_ms and k in row_ms}
        if not ratios:
            continue
        aligned = views.get("T", 0) % 16 == 0
        slower = max(ratios.values()) > 1.05
        measured = ", ".join(f"{k.removeprefix('triton ')} {r:.2f}x" for k, r in ratios.items())
        if aligned:
            verdict, action = ("views as fast", "") if not slower else (
                "views slower", "rows_layout (layers/conv.py): rows at every T, not only T % 16 != 0")
        else:
            verdict, action = ("rows pay", "") if slower else (
                "rows do not pay", "rows_layout: drop the rows (they cost a copy of the output grad)")
        verdicts.append(Verdict(f"unfolded patches as views over rows, {rows['workload']} (T = {views.get('T')})",
                                f"time of the views over the rows: {measured}", verdict, action))
    return verdicts


def norm_kernels(bench: dict) -> list[Verdict]:
    """Each norm kernel against the rule's PyTorch path (which runs where ``_kernel_serves`` says no)."""
    verdicts = []
    for result in bench["results"]:
        rows = _rows(result)
        if "torch rule path" not in rows:
            continue
        kernel = next((row for m, row in rows.items() if m.startswith("triton ")), None)
        if kernel is None:
            continue
        ratio = kernel["ms"] / rows["torch rule path"]["ms"]
        verdicts.append(Verdict(f"norm kernel, {result['workload']}", f"{kernel['method']} {kernel['ms']:.3f} ms, "
                                f"{ratio:.2f}x the rule's PyTorch path", "faster" if ratio < 1 else "slower",
                                "" if ratio < 1 else "make layers/norm.py _kernel_serves say no for this shape"))
    return verdicts


def engine_check(engine: dict | None) -> list[Verdict]:
    if engine is None:
        return [Verdict("engine against torch.func on CUDA (check_engine.json)", "", "not run")]
    rows = engine["rows"]
    if not rows:  # (e.g. every shard failed before its first case: see the gpu_engine*.log files)
        missing = engine.get("meta", {}).get("missing")
        return [Verdict("engine against torch.func on CUDA (check_engine.json)",
                        "no case ran" + (f" ({len(missing)} shard file(s) missing)" if missing else ""), "not run",
                        "read the gpu_engine*.log files and rerun `check_engine.py`")]
    bad = [f"{r['case']}{'' if r.get('fused', True) else ' (unfused)'}" for r in rows if not r.get("ok")]
    # (a file written before check_engine.py wrote as it went has no "complete": it was complete)
    meta = engine.get("meta", {})
    cut = not meta.get("complete", True)
    verdict = "failing" if bad else ("clean so far" if cut else "clean")
    # (shards joined by `check_engine.py --merge` name where each cut shard stopped, and the missing files)
    where = meta.get("cut_after", [rows[-1]["case"]])
    cut_text = (f" (cut by its time limit after {', '.join(where)})" if where else "") + (
        f" ({len(meta['missing'])} shard file(s) missing: {', '.join(meta['missing'])})" if meta.get("missing") else "")
    return [Verdict("engine against torch.func on CUDA (check_engine.json)",
                    f"{len(rows) - len(bad)} of {len(rows)} cases within tolerance"
                    + (": off at " + ", ".join(bad[:6]) if bad else "") + (cut_text if cut else ""),
                    verdict, "rerun the cases after it: `check_engine.py` was cut short" if cut else "")]


def end_to_end(table: dict | None) -> list[Verdict]:
    """seq-large against its target; per workload, divebatch beside the fastest other method."""
    if table is None:
        return [Verdict("end-to-end table (gpu_table.json)", "", "not run")]
    by_workload: dict[str, dict[str, dict]] = {}
    for row in table["rows"]:
        by_workload.setdefault(row["workload"], {})[row["method"]] = row
    verdicts = []
    for workload, methods in by_workload.items():
        ours = methods.get("divebatch")
        if ours is None or "ratio" not in ours:
            # (why: divebatch's own row, or the row of a workload that failed as a whole)
            why = (ours or methods.get("plain") or {}).get("skipped", "")
            verdicts.append(Verdict(f"end to end, {workload}", why, "not run"))
            continue
        others = {m: r["ratio"] for m, r in methods.items()
                  if m not in ("plain", "divebatch") and not m.startswith("divebatch") and "ratio" in r}
        variants = {m: r["ratio"] for m, r in methods.items() if m.startswith("divebatch") and "ratio" in r}
        best = min(variants, key=variants.get)
        rival = min(others.items(), key=lambda kv: kv[1]) if others else None
        measured = (f"divebatch {ours['ratio']:.2f}x (best divebatch variant {variants[best]:.2f}x)"
                    + (f"; fastest other {rival[0]} {rival[1]:.2f}x" if rival else "")
                    + f"; plain {methods['plain']['median_ms']:.1f} ms")
        if workload == "seq-large":
            verdicts.append(Verdict(f"seq-large step with norms (target <= {SEQ_LARGE_STEP}x)", measured,
                                    "met" if ours["ratio"] <= SEQ_LARGE_STEP else "missed"))
        else:
            verdicts.append(Verdict(f"end to end, {workload}", measured,
                                    "fastest" if not rival or ours["ratio"] <= rival[1] else "behind"))
        if variants[best] < ours["ratio"] * 0.97:
            verdicts[-1].action = f"{best} beat the default here: its route or variable should be the default"
    return verdicts


def hardware_counters(profile: dict | None) -> list[Verdict]:
    """What Nsight Compute read of the target kernels (``ncu_kernels.py``), each beside the GEMM."""
    topic = "hardware counters of the target kernels (ncu_kernels.json)"
    if profile is None:
        return [Verdict(topic, "", "not run")]
    found = roles(profile.get("kernels", []))
    if "instantiate" not in found or "ghost" not in found:
        return [Verdict(topic, f"kernels read: {sorted(found)}", "incomplete", "see gpu_ncu.log")]

    def reading(k: dict) -> str:
        pipes = "/".join(f"{v:.0f}" for v in k.get("tensor_pipe_pct", {}).values()) or "?"
        stalls = ", ".join(f"{name} {v:.1f}" for name, v in k.get("top_stalls", [])) or "?"
        value = lambda field: f"{k[field]:.0f}" if field in k else "?"  # noqa: E731
        return (f"tensor pipes {pipes}%, SM {value('sm_pct')}%, DRAM {value('dram_pct')}%, L2 {value('l2_pct')}%, "
                f"{value('registers')} regs, stalls {stalls}")

    return [Verdict(f"{name} under ncu, {profile.get('workload', '?')}",
                    reading(found[name]) + (f"; the GEMM: {reading(found['gemm'])}" if "gemm" in found else ""),
                    "profiled", "read against docs/kernels.md, 'Open questions': what each limit calls for")
            for name in ("instantiate", "ghost", "ghost (no bias)") if name in found]


def verdicts(folder: Path) -> list[Verdict]:
    """Every question this results folder answers (see the module docstring)."""
    bench = _read_json(folder / "bench_kernels.json")
    out = kernel_tests(junit_outcomes(folder))
    if bench is None:
        out.append(Verdict("kernel timings (bench_kernels.json)", "", "not run"))
    else:
        for question in (kernel_targets, wide_ghost_default, large_shape_errors, route_model, implicit_convolutions,
                         unfolded_layouts, norm_kernels):
            out += question(bench)
    out += hardware_counters(_read_json(folder / "ncu_kernels.json"))
    out += engine_check(_read_json(folder / "check_engine.json"))
    out += end_to_end(_read_json(folder / "gpu_table.json"))
    return out


def as_markdown(found: list[Verdict]) -> str:
    lines = ["| question | measured | verdict | what to change |", "|---|---|---|---|"]
    for v in found:
        lines.append(f"| {v.topic} | {v.measured} | **{v.verdict}** | {v.action} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a folder of run_gpu_checks.sh's results")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"{args.results} is not a folder: give the folder run_gpu_checks.sh wrote its results to")
    table = as_markdown(verdicts(args.results))
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
