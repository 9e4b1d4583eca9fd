"""Non-overlapping convolutions (stride = kernel): the fused path's two ways to per-sample norms.

For each shape, times side by side (median of ``--reps``, after warm-up): autograd's own
weight-gradient convolution (for scale), the grouped per-sample convolution
(``fused-per-sample-conv``) and the unfolded patches through ``instantiate_norm``
(``fused-unfold-instantiate``), and says which one ``divebatch.layers.conv`` picks where it fuses
(``UNFOLDED_TILE_ELEMENTS``; "hooks" where its cost model does not fuse the layer: autograd's weight
gradient plus the unfolded routes) and whether that was the faster of the two. Both give the norms and the weight
gradient; their agreement is printed too.

    python bench/conv_patch_routes.py [--reps 10] [--out bench/results/conv_patch_routes.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from divebatch.layers.conv import (  # noqa: E402
    UNFOLDED_TILE_ELEMENTS, _unfolded_fused_route, fused_conv_pays, grouped_weight_norms, unfolded_weight_norms)

#: (B, Cin, H = W, Cout, kernel = stride): patch embeddings (ViT, Swin, ConvNeXt stems),
#: ConvNeXt-style 2x2 downsampling and 1x1 convolutions, on both sides of the bound.
SHAPES = [
    (8, 3, 224, 192, 16), (8, 3, 224, 768, 16), (16, 3, 224, 384, 16), (32, 3, 64, 192, 8), (16, 3, 224, 96, 8),
    (32, 3, 224, 96, 4), (16, 3, 224, 48, 4), (8, 3, 224, 128, 4), (32, 3, 32, 192, 4),
    (32, 96, 56, 192, 2), (32, 192, 28, 384, 2), (32, 64, 32, 128, 2), (32, 128, 16, 256, 2), (16, 64, 28, 128, 2),
    (16, 64, 28, 64, 2), (8, 48, 56, 96, 2), (16, 32, 64, 64, 2), (64, 16, 32, 32, 2), (64, 3, 32, 64, 2),
    # 1x1 convolutions (stride 1: also non-overlapping), as in ResNet bottlenecks and inverted residuals.
    (32, 64, 56, 256, 1), (32, 256, 56, 64, 1), (32, 128, 28, 512, 1), (32, 256, 14, 1024, 1), (32, 512, 7, 2048, 1),
    (32, 1024, 7, 512, 1), (64, 96, 28, 384, 1), (32, 64, 56, 64, 1), (32, 32, 56, 96, 1),
]


def median_ms(fn, reps: int) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def emit(lines: list[str], out) -> None:
    """Print the report's Markdown lines and, given a path, write them there."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--kernels", default="1,2,4,8,16", help="comma-separated kernel sizes to time")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here too")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads; bound d*p >= {UNFOLDED_TILE_ELEMENTS}",
             "", "| B, Cin, H, Cout, k | d*p | autograd wgrad ms | grouped ms | unfolded ms | picked | faster picked | "
             "rel. diff (norms, grad) |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    kernels = {int(k) for k in args.kernels.split(",")}
    for B, cin, size, cout, k in [shape for shape in SHAPES if shape[-1] in kernels]:
        module = nn.Conv2d(cin, cout, k, k)
        x, g = torch.randn(B, cin, size, size), torch.randn(B, cout, size // k, size // k)
        wgrad = median_ms(lambda: torch.ops.aten.convolution_backward(
            g, x, module.weight, None, module.stride, [0, 0], module.dilation, False, [0, 0], 1,
            [False, True, False]), args.reps)
        grouped = median_ms(lambda: grouped_weight_norms(module, x, [0, 0], g), args.reps)
        unfolded = median_ms(lambda: unfolded_weight_norms(module, x, g), args.reps)
        d, p, T = cin * k * k, cout, (size // k) ** 2
        if not fused_conv_pays(B, 1, T, d, p):
            picked = "hooks"  # (autograd's weight gradient plus the unfolded Gram or instantiate route)
        else:
            picked = "unfolded" if _unfolded_fused_route(module, True, B, T, d, p, "cpu") else "grouped"
        faster = "-" if picked == "hooks" else ("yes" if (picked == "unfolded") == (unfolded <= grouped) else "no")
        (sq_a, w_a), (sq_b, w_b) = grouped_weight_norms(module, x, [0, 0], g), unfolded_weight_norms(module, x, g)
        diff = ((sq_a - sq_b).abs() / sq_a).max().item()
        diff_w = ((w_a - w_b).abs().max() / w_a.abs().max()).item()
        line = (f"| {B}, {cin}, {size}, {cout}, {k} | {d * p} | {wgrad:.2f} | {grouped:.2f} | {unfolded:.2f} | "
                f"{picked} | {faster} | {diff:.1e}, {diff_w:.1e} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
