"""Which timm image models divebatch tracks exactly, replays or refuses.

For each model: a small randomly initialised instance (the smallest variant, shrunk further
through ``timm.create_model`` keyword arguments where the family takes them), 3 images, the
summed cross-entropy, one tracked backward, and the per-sample norms against each sample's own
loss backpropagated through the same forward (the reference for any random draws: dropout and
stochastic depth run at ``--dropout``). BatchNorm layers run in eval mode, where a sample's
gradient is defined. Prints a Markdown table.

    python bench/timm_coverage.py --dropout 0.1 --out bench/results/timm_coverage.md
    python bench/timm_coverage.py resnet18 vit_tiny_patch16_224        # some models only
    python bench/timm_coverage.py --autocast --out bench/results/timm_coverage_autocast.md  # CPU bf16 autocast
    python bench/timm_coverage.py --compile --out bench/results/timm_coverage_compile.md    # torch.compile

timm needs torchvision, which has no build for the torch of ``./run setup``: run it in a venv with
``pip install torch==2.14.1 torchvision==0.29.1 timm`` (see docs/figures.md, 'timm image models').
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.hf_coverage as hf_coverage  # noqa: E402
from bench.hf_coverage import _compared, _compiled, _precision, write_table  # noqa: E402
from divebatch import GradNormTracker  # noqa: E402

_SMALL_VIT = dict(depth=2, embed_dim=64, num_heads=2)
#: model name -> (image side, create_model keyword arguments)
MODELS: dict[str, tuple[int, dict]] = {
    # convolutional networks
    "resnet18": (32, {}),
    "resnet26d": (32, {}),
    "resnext26ts": (32, {}),
    "seresnext26d_32x4d": (32, {}),
    "regnetx_002": (32, {}),
    "efficientnet_b0": (32, {}),
    "mobilenetv3_small_050": (32, {}),
    "mobilenetv4_conv_small": (32, {}),
    "rexnet_100": (32, {}),
    "repvgg_a0": (32, {}),
    "nf_resnet26": (32, {}),
    "dm_nfnet_f0": (32, {}),
    "convnext_atto": (32, {}),
    "convnextv2_atto": (32, {}),
    "edgenext_xx_small": (64, {}),
    "mobilevit_xxs": (64, {}),
    "fastvit_t8": (64, {}),
    "poolformerv2_s12": (32, {}),
    "inception_next_atto": (32, {}),
    # vision transformers and MLPs
    "vit_tiny_patch16_224": (32, dict(img_size=32, **_SMALL_VIT)),
    "vit_little_patch16_reg4_gap_256": (32, dict(img_size=32, **_SMALL_VIT)),
    "vit_betwixt_patch16_rope_reg4_gap_256": (32, dict(img_size=32, **_SMALL_VIT)),
    "deit_tiny_distilled_patch16_224": (32, dict(img_size=32, **_SMALL_VIT)),
    "vit_small_patch14_dinov2": (28, dict(img_size=28, **_SMALL_VIT)),
    "cait_xxs24_224": (32, dict(img_size=32, depth=2, depth_token_only=1, embed_dim=64, num_heads=2)),
    "xcit_nano_12_p16_224": (32, dict(img_size=32, depth=2)),
    "beit_base_patch16_224": (32, dict(img_size=32, **_SMALL_VIT)),
    "beitv2_base_patch16_224": (32, dict(img_size=32, **_SMALL_VIT)),
    "eva02_tiny_patch14_224": (28, dict(img_size=28, **_SMALL_VIT)),
    "deit3_small_patch16_224": (32, dict(img_size=32, **_SMALL_VIT)),
    "flexivit_small": (32, dict(img_size=32, **_SMALL_VIT)),
    "pvt_v2_b0": (32, {}),
    "swin_tiny_patch4_window7_224": (56, dict(img_size=56, depths=(2, 2), num_heads=(2, 4), embed_dim=32)),
    "swinv2_tiny_window8_256": (64, dict(img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32)),
    "levit_128s": (64, dict(img_size=64)),
    "coat_lite_tiny": (32, dict(img_size=32)),
    "twins_svt_small": (32, dict(depths=(1, 1, 1, 1))),
    "mixer_s16_224": (32, dict(img_size=32)),
    "resmlp_12_224": (32, dict(img_size=32)),
    "gmlp_s16_224": (32, dict(img_size=32)),
}


def check(name: str, dropout: float) -> dict:
    import timm

    side, kwargs = MODELS.get(name, (32, {}))
    torch.manual_seed(0)
    try:
        net = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=dropout,
                                drop_path_rate=dropout, **kwargs).train()
    except Exception as err:  # noqa: BLE001 - a family that does not take these arguments
        return {"result": "not built", "detail": f"{type(err).__name__}: {str(err)[:120]}"}
    batch_norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in batch_norms:
        m.eval()
    images, labels = torch.randn(3, 3, side, side), torch.tensor([0, 2, 1])
    try:
        with _precision():
            net(images)  # untracked: does the model take this size?
    except Exception as err:  # noqa: BLE001
        return {"result": "not built", "detail": f"untracked forward: {type(err).__name__}: {str(err)[:120]}"}
    try:
        with GradNormTracker(net, "sum") as tracker:
            torch.manual_seed(1)
            with _precision():
                logits = _compiled(net)(images)
            F.cross_entropy(logits.float(), labels, reduction="sum").backward()
            stats = tracker.collect()
            plans = tracker.plan()
    except (ValueError, RuntimeError, TypeError) as err:
        return {"result": "refused", "detail": f"{type(err).__name__}: {str(err)[:200]}"}
    net.zero_grad()
    torch.manual_seed(1)
    with _precision():
        logits = net(images)
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    detail = f"{len(batch_norms)} BatchNorm in eval mode; " if batch_norms else ""
    return _compared(net, stats, plans, losses, detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="timm model names (default: the list above)")
    parser.add_argument("--dropout", type=float, default=0.0, help="drop_rate and drop_path_rate")
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--autocast", action="store_true",
                        help="forwards under CPU autocast to bfloat16 ('exact': within 2e-2 of the reference)")
    parser.add_argument("--compile", action="store_true",
                        help="the tracked forward through torch.compile (the reference runs eagerly)")
    parser.add_argument("--compile-backend", default="aot_eager", help="torch.compile's backend (default aot_eager)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    hf_coverage.AUTOCAST = torch.bfloat16 if args.autocast else None
    hf_coverage.COMPILE = args.compile_backend if args.compile else None
    import timm

    lines = [f"timm {timm.__version__}, torch {torch.__version__}; 3 images, dropout and stochastic depth "
             f"{args.dropout}" + ("; CPU autocast to bfloat16" if args.autocast else "")
             + (f"; tracked forward through torch.compile (backend {args.compile_backend})" if args.compile else ""), "",
             "| model | result | detail |", "|---|---|---|"]
    write_table(lines, args.models or MODELS, lambda name: check(name, args.dropout), args.out)


if __name__ == "__main__":
    main()
