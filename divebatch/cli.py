"""The ``divebatch`` command: ``divebatch train`` and ``divebatch compare``.

Also reachable as ``python -m divebatch``. Bad arguments exit with status 2 and one line on
stderr (``divebatch train: error: …``), missing data with status 1 and a line saying how to get
it; neither prints a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]

_EPILOG_TRAIN = """\
policies:
  sgd        fixed batch --batch-size (plain mini-batch SGD)
  adabatch   double the batch every --resize-every epochs up to --max-batch-size
  paper      DiveBatch as the authors ran it: one measured epoch per window, epoch-pooled
             diversity, m <- min(max(delta*n*Delta, m), m_max), delta 0.1, lr unchanged
  divebatch  divebatch's default policy: noise-scale estimate on 1 step in 16, grow to
             delta*(B_noise+1) (delta 1), at most x2 per epoch, lr unchanged

data: Fashion-MNIST from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)
or --data-dir; otherwise scikit-learn's digits. --dataset synthetic: logistic regression,
n=1000, d=512, features uniform in (-1, 1), generated from --seed.

several processes: --nproc N starts N local processes (DistributedDataParallel, gloo on CPU;
--sharding fsdp: FSDP2); batch sizes stay global and are split across processes. Across machines use torchrun:
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m divebatch train --device cuda --out /shared/run --resume
<out>/checkpoint.pt is replaced atomically every epoch (and every --checkpoint-every steps);
the same command with --resume continues an interrupted run exactly.

The learning rate is a cosine over the run counted in samples (epochs x n), so batch-size
changes do not distort it. Outputs: <out>/metrics.jsonl (one JSON line per epoch),
summary.json, config.json, accuracy.png, batch_lr.png, diversity.png.
"""

_EPILOG_COMPARE = """\
Runs, side by side on the same data and seed (one epoch of each in turn): SGD at
--batch-size, SGD at --max-batch-size, AdaBatch, the paper's DiveBatch (--delta) and
divebatch's default policy. Prints the paper's table (final test accuracy; epoch and wall
time to reach within 1 point of the final accuracy; speedups vs small-batch SGD and vs
AdaBatch) and the time/epochs/steps to a common accuracy (small-batch SGD's final - 1.5
points); writes results.json, table.md and compare.png into --out.
Defaults (MLP on Fashion-MNIST, 30 epochs, 1 seed) take about 3 minutes on 2 CPU cores;
--seeds 0 1 2 about 7 minutes.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line (no usage block), exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {v}")
        return v
    return parse


def _positive_float(name: str, allow_zero: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {s}")
        return v
    return parse


def _growth(s: str) -> float:
    if s.lower() in ("none", "inf", "off"):
        return math.inf
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"max-growth must be a number > 1 or 'none', got {s!r}") from None
    if not v > 1:
        raise argparse.ArgumentTypeError(f"max-growth must be > 1 (or 'none' for no cap), got {s}")
    return v


def _add_common(p: argparse.ArgumentParser, compare: bool) -> None:
    from .data import DATASETS
    from .models import MODELS

    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default="auto",
                   help="auto: Fashion-MNIST when installed (or --data-dir given), else digits (default: auto)")
    g.add_argument("--data-dir", metavar="DIR", help="folder with the Fashion-MNIST IDX files (.gz or plain)")
    g.add_argument("--model", choices=MODELS, default=None,
                   help="default: mlp (784-256-10; its throughput grows with the batch on CPU), logistic for "
                        "synthetic; cnn and resnet (a CIFAR ResNet-20 with BatchNorm) for GPUs")
    g.add_argument("--limit", type=_positive_int("limit"), default=None, metavar="N",
                   help="use only the first N Fashion-MNIST train/test samples (smoke tests)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int("epochs"), default=30, help="epochs (default: 30)")
    g.add_argument("--batch-size", type=_positive_int("batch-size"), default=128,
                   help="initial batch size m0, samples per optimizer step (default: 128)")
    g.add_argument("--max-batch-size", type=_positive_int("max-batch-size"), default=2048,
                   help="largest batch size m_max (default: 2048)")
    g.add_argument("--lr", type=_positive_float("lr"), default=0.1,
                   help="peak learning rate of the cosine schedule, counted in samples (default: 0.1)")
    g.add_argument("--momentum", type=_positive_float("momentum", allow_zero=True), default=0.9,
                   help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=_positive_float("weight-decay", allow_zero=True), default=5e-4,
                   help="SGD weight decay (default: 5e-4)")
    g.add_argument("--resize-every", type=_positive_int("resize-every"), default=3,
                   help="epochs per AdaBatch/paper decision window (default: 3)")
    g.add_argument("--max-micro-batch", type=_positive_int("max-micro-batch"), default=None, metavar="N",
                   help="memory bound: split larger batches into micro-batches and accumulate gradients")

    g = p.add_argument_group("DiveBatch settings (override the policy's defaults)")
    g.add_argument("--delta", type=_positive_float("delta"), default=None,
                   help="delta > 0 of m <- delta*n*Delta (paper: 0.1; divebatch: 1.0)")
    if not compare:
        g.add_argument("--estimator", choices=("epoch", "noise-scale"), default=None,
                       help="epoch: pooled over a whole epoch (paper); noise-scale: per-step EMA of B_noise")
        g.add_argument("--lr-scaling", choices=("none", "linear", "sqrt"), default=None,
                       help="lr rescale when the batch grows (default: none)")
        g.add_argument("--max-growth", type=_growth, default=None,
                       help="cap on m'/m per decision, or 'none' (paper: none; divebatch: 2)")
        g.add_argument("--measure-every", type=_positive_int("measure-every"), default=None,
                       help="noise-scale estimator: measure one optimizer step in N (divebatch: 16)")

    g = p.add_argument_group("run")
    if compare:
        g.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    else:
        g.add_argument("--seed", type=int, default=0, help="seed of the model init and the sampler (default: 0)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="autocast dtype (bf16 on CPU; fp16 adds a GradScaler)")
    g.add_argument("--threads", type=_positive_int("threads"), default=None, help="torch intra-op threads")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: runs/<command>-<dataset>-<policy>-<time>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``divebatch`` command."""
    p = _Parser(prog="divebatch",
                description="Train with a batch size that follows gradient diversity (DiveBatch), "
                            "or compare DiveBatch with SGD and AdaBatch.")
    from . import __version__ as version  # noqa: PLC0415
    p.add_argument("--version", action="version", version=f"divebatch {version}")
    sub = p.add_subparsers(dest="command", metavar="{train,compare}", parser_class=_Parser)
    sub.required = True
    from .train import POLICIES

    t = sub.add_parser("train", help="train one model with a batch-size policy",
                       description="Train on the embedded default data with a batch-size policy; one line per "
                                   "epoch and a run folder with metrics and plots.",
                       epilog=_EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--policy", choices=POLICIES, default="divebatch", help="batch-size policy (default: divebatch)")
    _add_common(t, compare=False)
    g = t.add_argument_group("processes and checkpoints")
    g.add_argument("--nproc", type=_positive_int("nproc"), default=1,
                   help="train with N local processes (DistributedDataParallel, gloo on CPU, nccl on CUDA); "
                        "batch sizes are global, split across processes (default: 1). Under torchrun leave it "
                        "at 1: the world comes from torchrun's environment")
    g.add_argument("--sharding", choices=("ddp", "fsdp"), default="ddp",
                   help="with several processes: replicate the model (DistributedDataParallel, default) or shard "
                        "it with FSDP2 (fully_shard on each child with parameters, then the model, checkpoints "
                        "of whole tensors); resume with the same choice")
    g.add_argument("--checkpoint-every", type=_positive_int("checkpoint-every"), default=None, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (always: at every epoch end), atomically, "
                        "to <out>/checkpoint.pt")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt (start fresh when there is none); "
                        "give the same settings as the interrupted run")

    c = sub.add_parser("compare", help="SGD (small and max batch), AdaBatch, DiveBatch side by side",
                       description="Compare batch-size policies side by side and print the paper's table.",
                       epilog=_EPILOG_COMPARE, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--probe-reps", type=int, default=7, metavar="N",
                   help="rounds of the side-by-side samples/s and measuring-cost probe after training (0: skip; "
                        "default: 7)")
    c.add_argument("--policies", nargs="+", default=None,
                   choices=("sgd-small", "sgd-max", "adabatch", "paper", "divebatch"),
                   help="subset of runs (small-batch SGD is always run: it is the reference)")
    _add_common(c, compare=True)
    return p


def _err(prog: str, msg: str, code: int) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return code


def _default_out(command: str, dataset: str, policy: str) -> Path:
    return Path("runs") / f"{command}-{dataset}-{policy}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``divebatch`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"divebatch {args.command}"
    if args.max_batch_size < args.batch_size:
        return _err(prog, f"--max-batch-size ({args.max_batch_size}) must be >= --batch-size ({args.batch_size})", 2)
    if args.data_dir is not None and args.dataset not in ("auto", "fashion-mnist"):
        return _err(prog, f"--data-dir is for Fashion-MNIST IDX files; it does not apply to --dataset {args.dataset}", 2)
    if getattr(args, "measure_every", None) is not None and getattr(args, "estimator", None) == "epoch" \
            and args.measure_every != 1:
        return _err(prog, "--measure-every needs --estimator noise-scale (the epoch estimator measures every step)", 2)

    import torch

    from .data import DataNotFoundError, load_dataset
    from .train import compare

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return _err(prog, f"--device {args.device} requested but CUDA is not available; use --device cpu", 2)
    try:
        torch.device(args.device)
    except RuntimeError:
        return _err(prog, f"unknown --device {args.device!r} (e.g. cpu, cuda, cuda:1)", 2)

    seed0 = args.seeds[0] if args.command == "compare" else args.seed
    try:
        data = load_dataset(args.dataset, data_dir=args.data_dir, seed=seed0, limit=args.limit)
    except DataNotFoundError as e:
        return _err(prog, f"no data: {e}", 1)
    except (ValueError, OSError) as e:
        return _err(prog, f"cannot read the data: {e}", 1)

    log = None if args.quiet else _tqdm_write
    common = _common_settings(args)
    try:
        if args.command == "train":
            cfg = _train_config(args, common)
            cfg.validate()
            out = Path(args.out) if args.out else _default_out("train", data.name, cfg.label)
            if args.resume and not args.out:
                return _err(prog, "--resume needs --out DIR, the folder of the run to continue", 2)
            if args.nproc > 1:
                from .distributed import launch

                if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                    return _err(prog, "--nproc starts its own processes; under torchrun leave it at 1", 2)
                if not args.quiet:
                    print(f"divebatch train: {cfg.label} on {data.name} (n={data.n_train}, {data.source}) with "
                          f"{args.nproc} processes -> {out}", file=sys.stderr)
                if args.device.startswith("cuda") and torch.cuda.device_count() < args.nproc:
                    return _err(prog, f"--nproc {args.nproc} with --device cuda needs {args.nproc} GPUs (one per "
                                      f"process); this machine has {torch.cuda.device_count()}", 2)
                threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
                backend = "nccl" if args.device.startswith("cuda") else "gloo"
                try:
                    s = launch(_train_process, args.nproc, args=(vars(args), str(out)), backend=backend,
                               threads=threads)[0]
                except Exception as e:  # noqa: BLE001 - a rank's error, with its traceback, is in the message
                    return _err(prog, f"a training process failed: {e}", 1)
            else:
                from .distributed import init_from_env, rank_and_world

                init_from_env()
                rank, world = rank_and_world()
                if not args.quiet and rank == 0:
                    procs = f" with {world} processes" if world > 1 else ""
                    print(f"divebatch train: {cfg.label} on {data.name} (n={data.n_train}, {data.source}){procs} -> {out}",
                          file=sys.stderr)
                s = _run_training(cfg, data, out, args)
            if s is not None:
                print(f"final test accuracy {100 * s['final_test_acc']:.2f}% after {s['epochs']} epochs, "
                      f"{s['train_time']:.1f} s of training, {s['total_steps']} steps; run folder {out}")
        else:
            out = Path(args.out) if args.out else _default_out("compare", data.name, "all")
            if not args.quiet:
                print(f"divebatch compare on {data.name} (n={data.n_train}, {data.source}), seeds {args.seeds} -> {out}",
                      file=sys.stderr)
            settings = dict(common)
            if args.delta is not None:
                settings["delta"] = args.delta
            if args.probe_reps < 0:
                return _err(prog, f"--probe-reps must be >= 0, got {args.probe_reps}", 2)
            res = compare(data, seeds=args.seeds, out_dir=out, progress=not args.no_progress, log=log,
                          policies=args.policies, probe_reps=args.probe_reps, **settings)
            print(f"\nwrote {out}/results.json, {out}/table.md, {out}/compare.png "
                  f"({res['wall_seconds']:.0f} s)")
    except ValueError as e:
        return _err(prog, str(e), 2)
    except KeyboardInterrupt:
        return _err(prog, "interrupted", 130)
    return 0


def _train_config(args: argparse.Namespace, common: dict):
    from .train import TrainConfig

    return TrainConfig(policy=args.policy, seed=args.seed, delta=args.delta, estimator=args.estimator,
                       lr_scaling=args.lr_scaling, measure_every=args.measure_every, max_growth=args.max_growth,
                       checkpoint_every=args.checkpoint_every, sharding=args.sharding, **common)


def _common_settings(args: argparse.Namespace) -> dict:
    return dict(epochs=args.epochs, batch_size=args.batch_size, max_batch_size=args.max_batch_size, lr=args.lr,
                momentum=args.momentum, weight_decay=args.weight_decay, resize_every=args.resize_every,
                max_micro_batch=args.max_micro_batch, model=args.model, device=args.device, amp=args.amp)


def _run_training(cfg, data, out: Path, args: argparse.Namespace) -> dict | None:
    """Train (resuming from ``out/checkpoint.pt`` with ``--resume``); the summary on rank 0, None elsewhere."""
    from .distributed import rank_and_world
    from .train import Trainer

    rank = rank_and_world()[0]
    log = None if args.quiet else _tqdm_write
    trainer = Trainer(cfg, data, run_dir=out, progress=not args.no_progress, log=log)
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        trainer.resume(ckpt)
        if not args.quiet and rank == 0:
            print(f"divebatch train: resumed from {ckpt} at epoch {trainer.epoch}, step {trainer.steps}",
                  file=sys.stderr)
    s = trainer.fit()
    return s if rank == 0 else None


def _train_process(args_dict: dict, out: str) -> dict | None:
    """One process of ``divebatch train --nproc N`` (started by :func:`divebatch.distributed.launch`)."""
    from .data import load_dataset

    args = argparse.Namespace(**args_dict)
    data = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed, limit=args.limit)
    return _run_training(_train_config(args, _common_settings(args)), data, Path(out), args)


def _tqdm_write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
