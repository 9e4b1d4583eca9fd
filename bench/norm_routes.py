"""Norm layers' per-sample gradients on CPU: the ``affine_norm_grads`` (LayerNorm, RMSNorm),
``group_norm_grads`` (GroupNorm, InstanceNorm) and ``channel_norm_grads`` (BatchNorm in training
and eval mode) C++ kernels against the chunked PyTorch path (``AffineNormRule``: ``x_hat`` in
float32, multiplied in place, reduced; for BatchNorm in training mode the whole batch at once),
in one process.

For each shape both paths run the norm rule's ``per_sample_grads`` on the same input and output
grad, alternating, ``--rounds`` rounds of ``--reps`` calls; the table gives medians, their ratio
and the largest relative difference of the two results.

    python bench/norm_routes.py [--reps 5] [--rounds 5] [--out bench/results/norm_routes.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The kernel column runs the C++ operators whatever the size (the rules' own size cut-offs off).
os.environ["DIVEBATCH_BACKEND"] = "cpp"

from conv_patch_routes import emit, median_ms  # noqa: E402
from divebatch import ops  # noqa: E402
from divebatch.layers import norm  # noqa: E402

#: (name, module, input shape, dtype): the norm layers of the workloads and of larger models.
SHAPES = [
    ("seq LayerNorm", nn.LayerNorm(256), (32, 64, 256), torch.float32),
    ("transformer LayerNorm", nn.LayerNorm(128), (32, 128, 128), torch.float32),
    ("ViT-B LayerNorm", nn.LayerNorm(768), (16, 197, 768), torch.float32),
    ("RMSNorm, 2048 wide", nn.RMSNorm(2048), (4, 512, 2048), torch.float32),
    ("ViT-B LayerNorm, bf16", nn.LayerNorm(768), (16, 197, 768), torch.bfloat16),
    ("ResNet GroupNorm(32, 64) at 56x56", nn.GroupNorm(32, 64), (16, 64, 56, 56), torch.float32),
    ("ResNet GroupNorm(32, 256) at 14x14", nn.GroupNorm(32, 256), (16, 256, 14, 14), torch.float32),
    ("ResNet GroupNorm(32, 512) at 7x7", nn.GroupNorm(32, 512), (16, 512, 7, 7), torch.float32),
    ("GroupNorm(32, 64) at 56x56, channels-last", nn.GroupNorm(32, 64), (16, 64, 56, 56), "channels_last"),
    ("InstanceNorm2d(64) at 56x56", nn.InstanceNorm2d(64, affine=True), (16, 64, 56, 56), torch.float32),
    ("ResNet BatchNorm2d(64) at 56x56, train", nn.BatchNorm2d(64), (16, 64, 56, 56), torch.float32),
    ("ResNet BatchNorm2d(256) at 14x14, train", nn.BatchNorm2d(256), (16, 256, 14, 14), torch.float32),
    ("ResNet BatchNorm2d(512) at 7x7, train", nn.BatchNorm2d(512), (16, 512, 7, 7), torch.float32),
    ("ResNet BatchNorm2d(64) at 56x56, eval", nn.BatchNorm2d(64).eval(), (16, 64, 56, 56), torch.float32),
    ("ResNet BatchNorm2d(256) at 14x14, eval", nn.BatchNorm2d(256).eval(), (16, 256, 14, 14), torch.float32),
    ("BatchNorm2d(64) at 56x56, train, channels-last", nn.BatchNorm2d(64), (16, 64, 56, 56), "channels_last"),
    ("MLP BatchNorm1d(256), train", nn.BatchNorm1d(256), (64, 256), torch.float32),
    ("ResNet BatchNorm2d(512) at 7x7, bf16, train", nn.BatchNorm2d(512), (16, 512, 7, 7), torch.bfloat16),
    ("InstanceNorm2d(256) at 14x14", nn.InstanceNorm2d(256, affine=True), (16, 256, 14, 14), torch.float32),
]

_RULES = {nn.LayerNorm: norm.LayerNormRule, nn.RMSNorm: norm.RMSNormRule, nn.GroupNorm: norm.GroupNormRule,
          nn.InstanceNorm2d: norm.InstanceNormRule, nn.BatchNorm2d: norm.BatchNormRule,
          nn.BatchNorm1d: norm.BatchNormRule}


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
             "| layer | input | PyTorch path (chunked) | C++ kernel | ratio | max rel diff |",
             "|---|---|---|---|---|---|"]
    for name, module, shape, dtype in SHAPES:
        torch.manual_seed(0)
        memory_format = torch.channels_last if dtype == "channels_last" else torch.contiguous_format
        dtype = torch.float32 if dtype == "channels_last" else dtype
        x = (torch.randn(shape) * 2 + 1).to(dtype=dtype, memory_format=memory_format)
        g = torch.randn(shape).to(dtype=dtype, memory_format=memory_format)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training:
            module.running_mean.uniform_(0.5, 1.5)
            module.running_var.uniform_(3, 5)
        rule = _RULES[type(module)]()
        tracked = {"weight", "bias"} if getattr(module, "bias", None) is not None else {"weight"}
        calls = [(rule.capture(module, (x,), {}, None), (g,))]

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
        lines.append(f"| {name} | {' x '.join(map(str, shape))} | {slow:.2f} ms | {fast:.2f} ms | {slow / fast:.2f}x | "
                     f"{diff:.1e} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
