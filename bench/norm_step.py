"""Whole tracked steps of models with normalisation layers on CPU: the norm rules with their
compiled kernels (``affine_norm_grads``, ``group_norm_grads``, ``channel_norm_grads``) against the
same rules held to the chunked PyTorch path, beside a plain step, in one process.

Each step is ``loss.backward()`` of the workload's mean loss and, for the two tracked methods,
``tracker.collect()``; the methods run round-robin (``--reps`` rounds) on one model and batch
(the plain one on an untracked copy), and the table gives medians and ratios to plain.

    python bench/norm_step.py [--workloads resnet-bn,resnet,timm-resnet50] [--reps 7] [--out F.md]

``resnet-bn`` is ``resnet`` (ResNet-18, 112x112, batch 16) with BatchNorm2d in training mode;
``timm-resnet50`` (BatchNorm in eval mode) needs timm.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conv_patch_routes import emit  # noqa: E402
from divebatch import GradNormTracker  # noqa: E402
from divebatch.layers import norm  # noqa: E402
from workloads import WORKLOADS, Workload, _images, resnet18  # noqa: E402

EXTRA = {
    # BatchNorm in training mode: its per-sample numbers are the batch gradient's decomposition.
    "resnet-bn": Workload("resnet-bn", lambda: resnet18(10), _images(16, (3, 112, 112)), lambda x, y: 1.0 / x.shape[0]),
}


def step_times(workload: Workload, reps: int) -> dict[str, float]:
    """Median ms of a plain step and of tracked steps with and without the norm kernels."""
    torch.manual_seed(0)
    model = workload.make_model()
    x, y = workload.make_batch(torch.device("cpu"))
    plain_model = copy.deepcopy(model)
    tracker = GradNormTracker(model, "mean")
    kernel_serves = norm._kernel_serves

    def plain():
        plain_model.zero_grad(set_to_none=True)
        workload.loss(plain_model(x), y).backward()

    def tracked(kernels: bool):
        def step():
            # (the rules ask _kernel_serves whether a compiled kernel takes a call)
            norm._kernel_serves = kernel_serves if kernels else (lambda *args, **kwargs: False)
            try:
                model.zero_grad(set_to_none=True)
                workload.loss(model(x), y).backward()
                tracker.collect()
            finally:
                norm._kernel_serves = kernel_serves
        return step

    methods = {"plain": plain, "norm kernels": tracked(True), "chunked PyTorch path": tracked(False)}
    times = {name: [] for name in methods}
    for fn in methods.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tracker.close()
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="resnet-bn,resnet,timm-resnet50")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None, help="write the Markdown here")
    args = parser.parse_args(argv)
    known = {**WORKLOADS, **EXTRA}
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown workloads {unknown}; known: {sorted(known)}")
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.reps} round-robin steps",
             "", "| workload | plain | with the norm kernels | chunked PyTorch path |", "|---|---|---|---|"]
    for name in names:
        try:
            ms = step_times(known[name], args.reps)
        except RuntimeError as exc:  # the timm workloads without timm
            if "timm" not in str(exc):
                raise
            lines.append(f"| {name} | not run: no timm here | | |")
            continue
        base = ms["plain"]
        lines.append(f"| {name} | {base:.0f} ms | {ms['norm kernels']:.0f} ms, {ms['norm kernels'] / base:.2f}x | "
                     f"{ms['chunked PyTorch path']:.0f} ms, {ms['chunked PyTorch path'] / base:.2f}x |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
