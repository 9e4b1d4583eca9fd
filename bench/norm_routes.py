"""LayerNorm / RMSNorm per-sample gradients on CPU: the ``affine_norm_grads`` C++ kernel against the
chunked PyTorch path (``AffineNormRule``: ``x_hat`` in float32, multiplied in place, reduced), in
one process.

For each shape both paths run the norm rule's ``per_sample_grads`` on the same input and output
grad, alternating, ``--rounds`` rounds of ``--reps`` calls; the table gives medians, their ratio
and the largest relative difference of the two results.

    python bench/norm_routes.py [--reps 5] [--rounds 5] [--out bench/results/norm_routes.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conv_patch_routes import emit, median_ms  # noqa: E402
from divebatch import ops  # noqa: E402
from divebatch.layers import norm  # noqa: E402

#: (name, module, B, rows per sample, dtype): the norm layers of the workloads and of larger models.
SHAPES = [
    ("seq LayerNorm", nn.LayerNorm(256), 32, 64, torch.float32),
    ("transformer LayerNorm", nn.LayerNorm(128), 32, 128, torch.float32),
    ("ViT-B LayerNorm", nn.LayerNorm(768), 16, 197, torch.float32),
    ("RMSNorm, 2048 wide", nn.RMSNorm(2048), 4, 512, torch.float32),
    ("ViT-B LayerNorm, bf16", nn.LayerNorm(768), 16, 197, torch.bfloat16),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the Markdown here")
    args = parser.parse_args(argv)
    if not ops.CPP_AVAILABLE:
        sys.exit("the C++ extension is not built: `pip install --no-build-isolation -e .`")
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.rounds} rounds of "
             f"{args.reps} calls of the rule's per_sample_grads", "",
             "| layer | B x rows x d | PyTorch path (chunked) | affine_norm_grads (C++) | ratio | max rel diff |",
             "|---|---|---|---|---|---|"]
    for name, module, B, rows, dtype in SHAPES:
        torch.manual_seed(0)
        d = module.normalized_shape[0]
        x = (torch.randn(B, rows, d) * 2 + 1).to(dtype)
        g = torch.randn(B, rows, d).to(dtype)
        rule = norm.RMSNormRule() if isinstance(module, nn.RMSNorm) else norm.LayerNormRule()
        tracked = {"weight", "bias"} if getattr(module, "bias", None) is not None else {"weight"}
        calls = [(x, (g,))]

        def chunked():
            return norm.AffineNormRule.per_sample_grads(rule, module, calls, tracked)

        def kernel():
            return rule.per_sample_grads(module, calls, tracked)

        times = {"chunked": [], "kernel": []}
        for _ in range(args.rounds):
            times["chunked"].append(median_ms(chunked, args.reps))
            times["kernel"].append(median_ms(kernel, args.reps))
        slow, fast = statistics.median(times["chunked"]), statistics.median(times["kernel"])
        a, b = chunked(), kernel()
        diff = max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max()) for k in a)
        lines.append(f"| {name} | {B} x {rows} x {d} | {slow:.2f} ms | {fast:.2f} ms | {slow / fast:.2f}x | "
                     f"{diff:.1e} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
