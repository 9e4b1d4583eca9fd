"""Aten ops dispatched per training step, tracked against plain: the measure of host overhead
that a CPU can take for a GPU. On the H200 the transformer workload's plain step (299 ops) ran in
4.4 ms, ~15 us per op, and the tracked one 3.28x that (bench/results/gpu/2026-12-04-h200): a
small model's step there is bound by launches, so each op the tracker adds costs about as much as
one of the model's own.

    python bench/op_counts.py [--workloads transformer,seq-large,...] [--out bench/results/op_counts.json]

Two counts per workload, each of one step after warm-up steps (plans are made, caches filled)
with a ``TorchDispatchMode`` (every aten op, including views that launch nothing):

* **CPU**: the workload's batch on CPU tensors, every route as on this machine;
* **CUDA routes**: the workload at its full size on ``meta`` tensors (shapes only: nothing is
  computed, so seq-large's and conv-large's steps trace in a second here) with the routes, operators
  and norm paths divebatch takes on a GPU with its Triton kernels (``cuda_routes_on_meta``). Besides
  the ops, the *launches* (ops other than views and allocations) and the bytes those launches
  write, tracked minus plain: where the tracker's work on a GPU goes, without a GPU. The operators
  run their Triton wrappers (``DIVEBATCH_BACKEND=triton``) on the meta tensors with each kernel
  launch counted instead of run (``triton:<kernel>``), so the launches a wrapper makes around its
  kernel (zero-filled outputs, a finishing reduction) count too; the bytes are those of the torch
  ops (a kernel writes float32 per-sample sums, or a fused weight gradient into a buffer the
  wrapper zero-filled, which counts). Workloads whose
  steps read data (mixture-of-experts routing, packed sequences) cannot run on meta tensors and
  are reported as such.

It found the convolutions' GPU path taking the grouped per-sample convolution in chunks of a few
samples: conv-large's tracked step issued 9234 ops (503 grouped convolutions) against the plain
step's 333 (fixed; see ``divebatch.layers.conv.conv_fuses``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import workloads as W  # noqa: E402
from divebatch import GradNormTracker, _norms, ops  # noqa: E402
from divebatch.layers import routes  # noqa: E402

#: Non-view ops that allocate without launching anything.
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view"}


#: The StepOps modes entered (innermost last): where a counted Triton launch is recorded.
_ACTIVE: list = []

#: What the Triton wrappers are told of the (meta) device: an H100's / H200's streaming
#: multiprocessors and compute capability, which size their grids and pick their configs.
_META_SM_COUNT, _META_ARCH = 132, 90


class StepOps(TorchDispatchMode):
    """Every aten (and divebatch) op of a step: counts by name, launches, bytes the launches write;
    a Triton kernel's launch (``cuda_routes_on_meta``) counts as ``triton:<kernel>``."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.launches = collections.Counter()
        self.bytes_written = 0

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def record_kernel(self, name: str) -> None:
        """A Triton kernel's launch (no aten op dispatches it)."""
        self.counts[name] += 1
        self.launches[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if not func.is_view and name not in _ALLOCATIONS:
            self.launches[name] += 1
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes_written += t.numel() * t.element_size()
        return out


def _counted_launch(kernel, grid):
    """``kernel[grid]`` that records a launch in the innermost active ``StepOps`` and runs nothing."""
    name = f"triton:{getattr(kernel, 'fn', kernel).__name__}"

    def launch(*args, **kwargs):
        if _ACTIVE:
            _ACTIVE[-1].record_kernel(name)

    return launch


@contextlib.contextmanager
def _patched(*replacements):
    """``(owner, attribute, value)`` set for the block, the old values put back after."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, value in replacements:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def cuda_routes_on_meta():
    """Make divebatch take, for ``meta`` tensors, the routes and paths it takes on CUDA with its
    Triton kernels: the route models, the operators' dispatch checks, the batch-gradient norm's
    one-reduction-per-tensor path, and the operators' Triton wrappers, run on the meta tensors
    (``DIVEBATCH_BACKEND=triton``; their device checks pass ``meta``, which they size for
    ``_META_SM_COUNT`` multiprocessors of compute capability ``_META_ARCH``) with each kernel's
    launch counted, not run (``_counted_launch``)."""
    from triton.runtime.jit import KernelInterface

    kernels_pkg = ops._kernels
    if kernels_pkg is None:
        raise RuntimeError("the CUDA-routes trace runs divebatch's Triton wrappers: install triton")
    common = kernels_pkg._common
    serves, kernels, one_launch = ops.triton_serves, routes.triton_kernels, _norms._one_launch_per_tensor
    autocast = torch.is_autocast_enabled
    check_device, sm_count, cuda_arch = common.check_device, common.sm_count, common.cuda_arch

    def meta_check_device(op, **tensors):
        if {t.device.type for t in tensors.values()} == {"meta"}:
            return next(iter(tensors.values())).device
        return check_device(op, **tensors)

    helpers = {"check_device": meta_check_device,
               "sm_count": lambda device: _META_SM_COUNT if device.type == "meta" else sm_count(device),
               "cuda_arch": lambda device: _META_ARCH if device.type == "meta" else cuda_arch(device)}
    replacements = [
        (ops, "triton_serves", lambda device: device.type == "meta" or serves(device)),
        (routes, "triton_kernels", lambda device_type: device_type in ("meta", "cuda") and kernels("cuda")),
        (_norms, "_one_launch_per_tensor", lambda t: t.is_meta or one_launch(t)),
        # (autocast has no meta device: asked for one, torch raises)
        (torch, "is_autocast_enabled",
         lambda *device: (False if device and device[0] == "meta" else autocast(*device))),
        (KernelInterface, "__getitem__", _counted_launch),
    ]
    # The kernel modules' own names for the shared helpers (``from ._common import ...``) too.
    modules = [m for m in vars(kernels_pkg).values() if isinstance(m, types.ModuleType)
               and m.__name__.startswith(kernels_pkg.__name__ + ".")]
    replacements += [(m, name, helper) for m in modules for name, helper in helpers.items() if hasattr(m, name)]
    backend = os.environ.get("DIVEBATCH_BACKEND")
    os.environ["DIVEBATCH_BACKEND"] = "triton"
    try:
        with _patched(*replacements):
            yield
    finally:
        if backend is None:
            os.environ.pop("DIVEBATCH_BACKEND", None)
        else:
            os.environ["DIVEBATCH_BACKEND"] = backend


def _step(workload, model, x, y, tracker):
    model.zero_grad(set_to_none=True)
    workload.loss(model(x), y).backward()
    if tracker is not None and tracker.enabled:
        tracker.collect()


def _count(workload: W.Workload, device: str, dtype: torch.dtype | None, warmup: int) -> tuple[StepOps, StepOps]:
    """(plain, tracked) ops of one step of ``workload`` on ``device`` after ``warmup`` steps."""
    torch.manual_seed(0)
    with torch.device(device):
        model = workload.make_model()
    if dtype is not None:
        model = model.to(dtype)
    x, y = workload.make_batch(torch.device(device))
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    plain = StepOps()
    with plain:
        _step(workload, model, x, y, None)
    # On meta tensors the first backward's check against autograd cannot read its numbers; it is
    # once per 1000 steps anyway: count a step it does not check.
    tracker = GradNormTracker(model, loss_reduction=workload.scale(x, y), verify_every=0)
    if device == "meta":
        tracker._backwards_started = 1
    for _ in range(warmup):
        _step(workload, model, x, y, tracker)
    tracked = StepOps()
    with tracked:
        _step(workload, model, x, y, tracker)
    tracker.close()
    return plain, tracked


def _added(plain: collections.Counter, tracked: collections.Counter, n: int = 8) -> list:
    added = tracked.copy()
    added.subtract(plain)
    return [(k, v) for k, v in added.most_common(n) if v > 0]


def count_cpu(workload: W.Workload) -> dict:
    """The workload's step on CPU tensors."""
    plain, tracked = _count(workload, "cpu", None, warmup=3)
    return {"plain": sum(plain.counts.values()), "tracked": sum(tracked.counts.values()),
            "most_added": _added(plain.counts, tracked.counts)}


def count_cuda_routes(workload: W.Workload, dtype: torch.dtype | None) -> dict:
    """The workload's step at full size on meta tensors with the CUDA routes (see the module doc)."""
    try:
        with cuda_routes_on_meta():
            plain, tracked = _count(workload, "meta", dtype, warmup=1)
    except (NotImplementedError, RuntimeError, ValueError) as err:  # data-dependent steps (and routes that read data)
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    return {"plain": sum(plain.counts.values()), "tracked": sum(tracked.counts.values()),
            "plain_launches": sum(plain.launches.values()), "tracked_launches": sum(tracked.launches.values()),
            "added_mb_written": (tracked.bytes_written - plain.bytes_written) / 2**20,
            "plain_mb_written": plain.bytes_written / 2**20,
            "most_added_launches": _added(plain.launches, tracked.launches)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="transformer,seq,mlp,vit,resnet,conv-large,seq-large")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="dtype of the CUDA-routes trace (the GPU table's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    rows = []
    print("| workload | CPU: plain ops | CPU: tracked | CUDA routes: plain launches | tracked launches | "
          "added MB written (plain's) | most added launches |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        workload = W.WORKLOADS[name]
        cpu = count_cpu(workload) if "large" not in name else None  # (the large ones are GPU-sized)
        cuda = count_cuda_routes(workload, dtype)
        rows.append({"workload": name, "cpu": cpu, "cuda_routes": cuda})
        cpu_cells = (f"{cpu['plain']} | {cpu['tracked']} ({cpu['tracked'] / cpu['plain']:.2f}x)" if cpu
                     else "- | -")
        if "error" in cuda:
            cuda_cells = f"{cuda['error']} | | | "
        else:
            added = ", ".join(f"{k} {v}" for k, v in cuda["most_added_launches"][:5])
            cuda_cells = (f"{cuda['plain_launches']} | {cuda['tracked_launches']} "
                          f"({cuda['tracked_launches'] / cuda['plain_launches']:.2f}x) | "
                          f"{cuda['added_mb_written']:+.1f} ({cuda['plain_mb_written']:.0f}) | {added}")
        print(f"| {name} | {cpu_cells} | {cuda_cells} |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"torch": torch.__version__, "cuda_routes_dtype": args.dtype, "rows": rows},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
