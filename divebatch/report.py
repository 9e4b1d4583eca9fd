"""Plots (matplotlib, Agg backend: no display needed) and the comparison table.

* :func:`plot_run` — one training run: test accuracy against wall time and against epochs,
  batch size and learning rate over wall time, and the measured diversity (``n·Δ̂`` or
  ``B_noise``) per decision. Written as PNG files into the run folder.
* :func:`compare_metrics` — the paper's metric (final test accuracy; epoch and wall time to
  reach within 1 point of the final accuracy; speedups vs small-batch SGD and vs AdaBatch) and
  the time to a *common* accuracy (small-batch SGD's final accuracy minus 1.5 points), per run.
* :func:`compare_table` — those as a markdown table; :func:`plot_compare` — one PNG with the
  curves of every policy.

Accuracies are fractions in [0, 1] in the data and percentages in tables and plots; times are
seconds of training (evaluation excluded).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_run", "plot_compare", "compare_metrics", "compare_table", "aggregate_table", "throughput_table",
           "PAPER_WITHIN", "COMMON_MARGIN"]

#: The paper's metric: time to reach within this much (a fraction: 1 point) of the final accuracy.
PAPER_WITHIN = 0.01
#: The common accuracy is small-batch SGD's final accuracy minus this (1.5 points).
COMMON_MARGIN = 0.015


def _first_reach(records: Sequence[dict], target: float) -> dict | None:
    for r in records:
        if r["test_acc"] is not None and r["test_acc"] >= target - 1e-12:
            return {"epoch": r["epoch"], "time": r["train_time"], "steps": r["total_steps"], "samples": r["samples_seen"]}
    return None


def _save(fig, axes, title: str, path: Path) -> Path:
    """Grid every axis, title the figure, write it as a PNG and free it."""
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(records: Sequence[dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``accuracy.png`` (vs wall time and epochs), ``batch_lr.png`` (batch size and lr over
    wall time) and ``diversity.png`` (the measured statistic) for one run; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        return []
    ep = [r["epoch"] for r in records]
    t = [r["train_time"] for r in records]
    acc = [100 * r["test_acc"] for r in records]
    paths = []

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(t, acc, marker=".")
    ax[0].set_xlabel("training wall time (s)")
    ax[0].set_ylabel("test accuracy (%)")
    ax[1].plot(ep, acc, marker=".")
    ax[1].set_xlabel("epoch")
    paths.append(_save(fig, ax, title or "test accuracy", out / "accuracy.png"))

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    t0 = [r["train_time"] - r["epoch_time"] for r in records]
    ax[0].step(t0 + [t[-1]], [r["batch_size"] for r in records] + [records[-1]["batch_size"]], where="post")
    ax[0].set_yscale("log", base=2)
    ax[0].set_xlabel("training wall time (s)")
    ax[0].set_ylabel("batch size (samples)")
    ax[1].plot(t0, [r["lr"] for r in records], marker=".")
    ax[1].set_xlabel("training wall time (s)")
    ax[1].set_ylabel("learning rate (epoch start)")
    paths.append(_save(fig, ax, title or "batch size and learning rate", out / "batch_lr.png"))

    pts = [(r["epoch"], r["b_noise"] if r.get("b_noise") is not None else r.get("n_delta")) for r in records]
    pts = [(e, v) for e, v in pts if v is not None and math.isfinite(v) and v > 0]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if pts:
        label = "B_noise (samples)" if any(r.get("b_noise") is not None for r in records) else "n·Δ̂ (samples)"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no diversity measured\n(fixed schedule, or m = m_max)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.set_title(title or "diversity")
    fig.tight_layout()
    paths.append(out / "diversity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def compare_metrics(runs: Mapping[str, Sequence[dict]], sgd_label: str, adabatch_label: str | None) -> dict:
    """Per run: final accuracy, the paper's metric and the time to the common accuracy.

    Args:
        runs: label → epoch records (``Trainer.records``) of runs on the same data and seed.
        sgd_label: the small-batch SGD run (the reference for speedups and the common target).
        adabatch_label: the AdaBatch run (second reference), or None.

    Returns:
        ``{"common_target": acc, "runs": {label: {...}}}`` where each run has ``final_acc``,
        ``paper`` (``epoch``, ``time``, ``steps`` to within 1 point of its own final accuracy,
        ``speedup_vs_sgd``, ``speedup_vs_adabatch``) and ``common`` (the same to the common
        target, None when never reached).
    """
    out: dict = {"runs": {}}
    sgd_final = runs[sgd_label][-1]["test_acc"]
    target = sgd_final - COMMON_MARGIN
    out["common_target"] = target
    for label, recs in runs.items():
        final = recs[-1]["test_acc"]
        paper = _first_reach(recs, final - PAPER_WITHIN)
        common = _first_reach(recs, target)
        out["runs"][label] = {"final_acc": final, "best_acc": max(r["test_acc"] for r in recs),
                              "train_time": recs[-1]["train_time"], "total_steps": recs[-1]["total_steps"],
                              "final_batch_size": recs[-1]["next_batch_size"], "paper": paper, "common": common}
    for key in ("paper", "common"):
        ref_sgd = out["runs"][sgd_label][key]
        ref_ada = out["runs"][adabatch_label][key] if adabatch_label in out["runs"] else None
        for label, m in out["runs"].items():
            if m[key] is None:
                continue
            t = m[key]["time"]
            m[key]["speedup_vs_sgd"] = (ref_sgd["time"] / t) if (ref_sgd and t > 0) else None
            m[key]["speedup_vs_adabatch"] = (ref_ada["time"] / t) if (ref_ada and t > 0) else None
    return out


def _f(x, fmt="{:.2f}", none="—"):
    return none if x is None else fmt.format(x)


def compare_table(metrics: dict) -> str:
    """Markdown table of :func:`compare_metrics` for one seed."""
    lines = [
        f"Common target: {100 * metrics['common_target']:.2f}% (small-batch SGD final − 1.5 pt)",
        "",
        "| policy | final acc % | final bs | to within 1 pt: epoch | time s | speedup vs SGD | vs AdaBatch "
        "| to common: epoch | time s | steps | speedup vs SGD | vs AdaBatch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in metrics["runs"].items():
        p, c = m["paper"] or {}, m["common"] or {}
        lines.append(
            f"| {label} | {100 * m['final_acc']:.2f} | {m['final_batch_size']} | {_f(p.get('epoch'), '{}')} | "
            f"{_f(p.get('time'), '{:.1f}')} | {_f(p.get('speedup_vs_sgd'))}× | {_f(p.get('speedup_vs_adabatch'))}× | "
            f"{_f(c.get('epoch'), '{}', 'missed')} | {_f(c.get('time'), '{:.1f}')} | {_f(c.get('steps'), '{}')} | "
            f"{_f(c.get('speedup_vs_sgd'))}× | {_f(c.get('speedup_vs_adabatch'))}× |")
    return "\n".join(lines).replace("—×", "—")


def _span(vals: list, fmt: str) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.median(vals))} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"


def aggregate_table(per_seed: Mapping[int, dict]) -> str:
    """Markdown table over seeds: median (min–max) of each metric; 'missed k/N' where a run never
    reached the common target."""
    seeds = list(per_seed)
    labels = list(next(iter(per_seed.values()))["runs"])
    lines = [
        f"Over {len(seeds)} seed(s) {seeds}: median (min–max).",
        "",
        "| policy | final acc % | Δ acc vs SGD (pt) | paper metric: time s | speedup vs SGD | vs AdaBatch "
        "| to common acc: time s | epochs | steps | speedup vs SGD | vs AdaBatch | missed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sgd = labels[0]
    for label in labels:
        ms = [per_seed[s]["runs"][label] for s in seeds]
        fin = [100 * m["final_acc"] for m in ms]
        dacc = [100 * (per_seed[s]["runs"][label]["final_acc"] - per_seed[s]["runs"][sgd]["final_acc"]) for s in seeds]
        pp = [m["paper"] or {} for m in ms]
        cc = [m["common"] or {} for m in ms]
        missed = sum(1 for m in ms if m["common"] is None)
        lines.append(
            f"| {label} | {_span(fin, '{:.2f}')} | {_span(dacc, '{:+.2f}')} | {_span([p.get('time') for p in pp], '{:.1f}')} | "
            f"{_span([p.get('speedup_vs_sgd') for p in pp], '{:.2f}×')} | {_span([p.get('speedup_vs_adabatch') for p in pp], '{:.2f}×')} | "
            f"{_span([c.get('time') for c in cc], '{:.1f}')} | {_span([c.get('epoch') for c in cc], '{:.0f}')} | "
            f"{_span([c.get('steps') for c in cc], '{:.0f}')} | {_span([c.get('speedup_vs_sgd') for c in cc], '{:.2f}×')} | "
            f"{_span([c.get('speedup_vs_adabatch') for c in cc], '{:.2f}×')} | {missed}/{len(seeds)} |")
    return "\n".join(lines)


def throughput_table(throughput: Mapping[int, Sequence[float]], overhead: Mapping[str, Sequence[float]],
                     probe: Mapping | None = None) -> str:
    """Markdown: training samples/s against batch size, and the cost of measuring.

    ``throughput``/``overhead`` come from the training epochs (median samples/s of unmeasured
    epochs per batch size; measured-epoch time over nearby unmeasured epochs at the same batch size);
    ``probe`` from :func:`divebatch.train.probe_throughput` (steps timed side by side)."""
    lines = []
    if probe:
        methods = list(next(iter(probe["ratio"].values())))
        lines += ["Side-by-side probe (median of %d rounds): samples/s, and time relative to plain steps. "
                  "`divebatch` measures 1 step in 16 (a measured epoch of the default policy); `paper` measures "
                  "every step (a measured epoch of the paper's rule)." % probe.get("reps", 0), "",
                  "| batch size | " + " | ".join(f"{m} samples/s" for m in methods) + " | "
                  + " | ".join(f"{m} / plain" for m in methods[1:]) + " |",
                  "|---" * (2 * len(methods)) + "|"]
        for bs in sorted(probe["ratio"], key=int):
            sps, rat = probe["samples_per_s"][bs], probe["ratio"][bs]
            lines.append(f"| {bs} | " + " | ".join(f"{sps[m]:,.0f}" for m in methods) + " | "
                         + " | ".join(f"{rat[m]:.3f}×" for m in methods[1:]) + " |")
        lines.append("")
    lines += ["From the training epochs:", "", "| batch size | samples/s (median over unmeasured epochs) | epochs |",
              "|---|---|---|"]
    for bs in sorted(throughput, key=int):
        v = throughput[bs]
        lines.append(f"| {bs} | {statistics.median(v):,.0f} | {len(v)} |")
    if overhead:
        lines += ["", "| policy | measured-epoch time / unmeasured epochs at the same batch size (±3 epochs) |",
                  "|---|---|"]
        for label, v in overhead.items():
            lines.append(f"| {label} | {_span(list(v), '{:.3f}×')} (n={len(v)}) |")
    return "\n".join(lines)


def plot_compare(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "",
                 common_target: float | None = None) -> Path:
    """One PNG: test accuracy against wall time and against epochs, and batch size over wall
    time, for every policy (one seed)."""
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, recs in runs.items():
        t = [r["train_time"] for r in recs]
        acc = [100 * r["test_acc"] for r in recs]
        ax[0].plot(t, acc, marker=".", label=label)
        ax[1].plot([r["epoch"] for r in recs], acc, marker=".", label=label)
        t0 = [r["train_time"] - r["epoch_time"] for r in recs]
        ax[2].step(t0 + [t[-1]], [r["batch_size"] for r in recs] + [recs[-1]["batch_size"]], where="post", label=label)
    lo = min(100 * r["test_acc"] for recs in runs.values() for r in recs[len(recs) // 5:])
    hi = max(100 * r["test_acc"] for recs in runs.values() for r in recs)
    for a in ax[:2]:
        a.set_ylim(max(lo - 1, 0), hi + 0.5)
        a.set_ylabel("test accuracy (%)")
        if common_target is not None:
            a.axhline(100 * common_target, color="gray", ls="--", lw=1, label="common target")
    ax[0].set_xlabel("training wall time (s)")
    ax[1].set_xlabel("epoch")
    ax[2].set_xlabel("training wall time (s)")
    ax[2].set_ylabel("batch size (samples)")
    ax[2].set_yscale("log", base=2)
    ax[1].legend(fontsize=8)
    return _save(fig, ax, title, Path(path))
