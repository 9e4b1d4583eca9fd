"""Models for the ``divebatch`` command.

**The default is the MLP** (``Flatten → Linear(784, 256) → ReLU → Linear(256, 10)`` on
Fashion-MNIST). Why not a CNN: batch-size adaptation pays off only where a larger batch
processes more samples per second. On the 2-core CPU these benchmarks run on, the MLP's
forward+backward throughput *rises* with the batch (107k samples/s at batch 128 → 181k at
2048: bigger GEMMs amortise the per-step overhead), while a small CNN's *falls* (3.2k → 1.8k
samples/s: im2col buffers outgrow the caches). With the CNN, growing the batch would make every
epoch slower, so any wall-time "speedup" would be an artefact; with the MLP, the time saved by
large batches is real and the comparison with small-batch SGD is meaningful. The MLP is also
the model the reference DiveBatch measurements in BENCHMARKS.md used, and its per-sample norms
are cheap (Linear with T = 1: ``||a||²·||g||²``), so measuring costs little.

``--model cnn`` (the BENCHMARKS.md ``cnn``: three 3×3 convolutions, no BatchNorm) is there
for GPU runs, where the trade-off reverses, and ``--model resnet``, He et al.'s CIFAR ResNet-20
with BatchNorm, a network of the CIFAR image classification the paper evaluated on (in training
mode its per-sample numbers are the decomposition of the batch gradient, see ``divebatch.layers.norm``). For the synthetic dataset
the model is the authors' prototype: ``Linear(d, 1, bias=False)`` (logistic regression, one logit).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "mlp", "cnn", "resnet", "logistic"]

#: Model names accepted by :func:`build_model`.
MODELS = ("mlp", "cnn", "resnet", "logistic")


def mlp(input_shape: tuple[int, ...], num_classes: int = 10, hidden: int = 256) -> nn.Module:
    """``Flatten → Linear(prod(input_shape), hidden) → ReLU → Linear(hidden, num_classes)``."""
    d = int(math.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def cnn(input_shape: tuple[int, ...], num_classes: int = 10) -> nn.Module:
    """BENCHMARKS.md ``cnn``: Conv(C→32, 3×3, pad 1)–ReLU–Conv(32→64, 3×3, pad 1, stride 2)–ReLU–
    Conv(64→64, 3×3, pad 1, stride 2)–ReLU–Flatten–Linear(64·⌈H/4⌉·⌈W/4⌉ → classes). No BatchNorm.
    """
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs image inputs [C, H, W], got sample shape {tuple(input_shape)}")
    c, h, w = input_shape
    h4, w4 = (h + 1) // 2, (w + 1) // 2
    h4, w4 = (h4 + 1) // 2, (w4 + 1) // 2
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * h4 * w4, num_classes),
    )


class _BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a residual: the identity, or a 1×1 convolution with
    BatchNorm where the width or the resolution changes (He et al. 2016's option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(input_shape: tuple[int, ...], num_classes: int = 10, depth: int = 20) -> nn.Module:
    """The CIFAR ResNet of He et al. (2016), ResNet-20 by default:
    Conv(C→16, 3×3)–BatchNorm–ReLU, three stages of ``(depth − 2) / 6`` basic blocks of 16, 32 and
    64 channels (stride 2 into the second and third), global average pooling, Linear(64 → classes)."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet needs image inputs [C, H, W], got sample shape {tuple(input_shape)}")
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet depth must be 6n + 2 (8, 14, 20, 32, ...), got {depth}")
    blocks, layers, c_in = (depth - 2) // 6, [], 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(blocks):
            layers.append(_BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
            c_in = width
    return nn.Sequential(nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def logistic(input_shape: tuple[int, ...], num_classes: int = 2) -> nn.Module:
    """Logistic regression as the authors' prototype: ``Flatten → Linear(d, 1, bias=False)`` for
    two classes (one logit), ``Linear(d, num_classes)`` (softmax regression) otherwise."""
    d = int(math.prod(input_shape))
    out = 1 if num_classes == 2 else num_classes
    return nn.Sequential(nn.Flatten(), nn.Linear(d, out, bias=num_classes != 2))


def build_model(name: str | None, input_shape: tuple[int, ...], num_classes: int, task: str = "multiclass",
                seed: int | None = None) -> nn.Module:
    """Build a model by name; ``None`` picks the default for the task.

    Default: ``"logistic"`` for binary tasks (the synthetic dataset), ``"mlp"`` otherwise (see the
    module docstring for why not the CNN). ``seed`` seeds the initialisation (torch's global RNG
    is saved and restored, so the caller's random state is untouched).
    """
    if name is None:
        name = "logistic" if task == "binary" else "mlp"
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if task == "binary" and name != "logistic":
        num_out = 2  # a 2-way softmax head; the loss handles one-logit models separately
    else:
        num_out = num_classes
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        if name == "mlp":
            return mlp(input_shape, num_out)
        if name == "cnn":
            return cnn(input_shape, num_out)
        if name == "resnet":
            return resnet(input_shape, num_out)
        return logistic(input_shape, num_classes)

