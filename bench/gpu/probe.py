"""A seconds-long first look at a GPU machine before the full check (bench/gpu/run_gpu_checks.sh):
versions, the device, that divebatch imports and that one tracked step on CUDA (Linear over
tokens, ghost or instantiate route through the Triton kernels; a Conv2d) matches torch.func in
float32. Exits 1 on any mismatch, so a broken tree costs seconds of device time, not minutes.

    python3 bench/gpu/probe.py [--cpu]
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402

from divebatch import GradNormTracker  # noqa: E402
from tests.oracle import reference_norms, rel_err  # noqa: E402


def main() -> int:
    print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
          "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None, flush=True)
    device = "cuda" if torch.cuda.is_available() else ("cpu" if "--cpu" in sys.argv else None)
    if device is None:
        print("no CUDA device (pass --cpu to run the same check here)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cases = {
        "linear-tokens": (torch.nn.Sequential(torch.nn.Linear(40, 72), torch.nn.GELU(), torch.nn.Linear(72, 5)),
                          torch.randn(6, 33, 40), torch.randn(6, 33, 5)),
        "conv2d": (torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Flatten(), torch.nn.Linear(8 * 10 * 10, 4)),
                   torch.randn(5, 3, 10, 10), torch.randn(5, 4)),
    }

    def loss_fn(out, y):
        return (out - y).square().mean()

    worst = 0.0
    for name, (model, x, y) in cases.items():
        model, x, y = model.to(device), x.to(device), y.to(device)
        t0 = time.perf_counter()
        with GradNormTracker(model, loss_reduction="mean") as tracker:
            model.zero_grad()
            loss_fn(model(x), y).backward()
            stats = tracker.collect()
            routes = tracker.format_plan()
        ref, _, ref_batch = reference_norms(model, loss_fn, x, y)
        # reference_norms differentiates each sample's own mean loss: the tracker's unscaled l_i.
        err = max(rel_err(stats.per_sample, ref), rel_err(stats.batch_grad_sq, ref_batch))
        worst = max(worst, err)
        print(f"{name}: rel err {err:.2e} in {time.perf_counter() - t0:.1f}s\n{routes}", flush=True)
    print(f"probe worst rel err {worst:.2e}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
