"""The whole engine on one device against torch.func: every layer family of the test zoo (with
samples and tokens flattened into rows, and outputs modified in place), the tied Embedding/Linear
head, embeddings sharing one weight, outputs shared by all samples ([1, T] positions, a T5-style
relative bias as an attention mask), a mixture of experts on rows, every
nn.MultiheadAttention configuration and models that take sequences first (``[T, B, ...]``,
``GradNormTracker(batch_first=False)``: the kernels read ``[B, T, ...]`` views of time-major
rows), fused and not. Models whose per-sample numbers are a
decomposition (BatchNorm in training mode: no torch.func oracle) are checked against the same
engine with the PyTorch reference operators (``DIVEBATCH_BACKEND=reference``) instead.

The CPU test suite proves these rules on CPU; this runs the same models on a GPU (float32, TF32
off, so the reference is exact), where the operators dispatch to the Triton kernels and the
attention rule's identity-product skipping, RNG handling and tied-row gathers run on CUDA.
On CUDA it also checks that memory does not grow from step to step on a few zoo models.
Prints a table, writes JSON, exits 1 if any relative error exceeds 1e-4 or a case fails.

    python bench/gpu/check_engine.py --device cuda --out bench/results/gpu/check_engine.json
    python bench/gpu/check_engine.py --device cpu     # the same check here (what CI covers anyway)
    python bench/gpu/check_engine.py --shard 2/3 --out e2.json   # every third case, from the second
    python bench/gpu/check_engine.py --merge e1.json e2.json e3.json --out check_engine.json

A shard runs every N-th case (the GPU check runs three at once: each case's first call compiles its
kernels, which one process does on one CPU core, so one process took 75 s for 68 of
today's 120 rows on the H200); ``--merge`` joins their files into one, in the cases' order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from divebatch import GradNormTracker  # noqa: E402
from tests import (test_attention, test_flattened_rows, test_fuse_decisions,  # noqa: E402
                   test_sequence_first, test_shared_outputs, test_tied)
from tests.models_zoo import DECOMPOSED, ZOO, sample_loss  # noqa: E402
from tests.oracle import reference_norms, rel_err  # noqa: E402

RTOL = 1e-4


#: Case-name prefixes run with these environment variables set: the fused convolutions reading
#: their patches in place (``conv_instantiate_norm``) and the Gram route on wide tiles
#: (``_ghost_norm_wide_kernel``), each opt-in until a GPU has timed it.
CASE_ENV = {"implicit-conv/": {"DIVEBATCH_TRITON_IMPLICIT_CONV": "1"},
            "ghost-wide/": {"DIVEBATCH_TRITON_GHOST_WIDE": "1"}}


#: Case-name prefix of the models that take sequences first: tracked with ``batch_first=False``,
#: their torch.func reference taken over dim 1 of the input.
SEQUENCE_FIRST = "sequence-first/"


def _env(variables: dict):
    """``os.environ`` with ``variables`` set, put back as it was afterwards."""
    return mock.patch.dict(os.environ, variables)


def cases():
    """``name -> () -> (model, inputs, targets, loss)`` with everything on the default device."""
    # (first: convolutions with enough positions for the CUDA route model to fuse them, padded,
    #  strided, dilated, reflect-padded, 1-3-d, on a channels-last input, their patches read in place)
    out = {"implicit-conv/convolutions": lambda: (
        test_fuse_decisions.Convolutions(), torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last),
        torch.randn(4), test_fuse_decisions._squared_error),
        # (the same on an NCHW input: the maps of 16 channels copied channels-last, layers.conv.vector_layouts)
        "implicit-conv/convolutions-nchw": lambda: (
            test_fuse_decisions.Convolutions(), torch.randn(4, 3, 16, 16), torch.randn(4),
            test_fuse_decisions._squared_error),
        # (convolutions a ResNet's stages in miniature: unfused, the hooks' Grams read in place)
        "implicit-conv/deepening": lambda: (
            test_fuse_decisions.Deepening(), torch.randn(4, 3, 8, 8), torch.randn(4),
            test_fuse_decisions._squared_error),
        # (a Linear pair on sequences: unfused, the Gram route, on the opt-in 128 x 256 tiles)
        "ghost-wide/sequence-mlp": lambda: (
            torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 96, bias=False)),
            torch.randn(3, 40, 96), torch.randn(3, 40, 96), test_fuse_decisions._squared_error),
        # (the same by default: unfolded, 2 x 2 maps as contiguous rows, layers.conv.rows_layout)
        "conv/deepening": lambda: (
            test_fuse_decisions.Deepening(), torch.randn(4, 3, 8, 8), torch.randn(4),
            test_fuse_decisions._squared_error)}
    out.update({f"zoo/{name}": (lambda make=make: (*make(), sample_loss)) for name, make in ZOO.items()})
    out.update({f"decomposed/{name}": (lambda make=make: (*make(), sample_loss)) for name, make in DECOMPOSED.items()})
    out["tied/pad"] = lambda: (*test_tied.make_case(padding_idx=3), test_tied.token_loss)
    out["tied/both-twice"] = lambda: (*test_tied.make_case(reuse_embedding=True, reuse_head=True),
                                      test_tied.token_loss)
    out["tied/shared-tables"] = lambda: (test_tied.SharedTables(), torch.randint(0, 40, (4, 7)),
                                         torch.randint(0, 40, (4, 7)), test_tied.token_loss)
    for name, make in (("positions", test_shared_outputs.SharedPositions),
                       ("relative-bias", test_shared_outputs.RelativeBias)):
        out[f"shared-output/{name}"] = lambda make=make: (make(), torch.randint(0, 11, (3, 5)),
                                                          torch.randint(0, 11, (3, 5)), test_shared_outputs.token_loss)
    # Samples x tokens rows through a router and experts (generic route, replayed per sample on its rows).
    out["rows/mixture-of-experts"] = lambda: (test_flattened_rows.TinyMoE(aux=0.1), torch.randn(3, 5, 4),
                                              torch.randn(3, 5, 2), sample_loss)
    for name, config in test_attention.CONFIGS.items():
        out[f"attention/{name}"] = lambda config=config: (
            *test_attention.make(**config), None, test_attention.loss_fn)
    for name in ("encoder-classifier", "reused-linear", "recurrent-lm-tied", "transformer-lm"):
        out[f"{SEQUENCE_FIRST}{name}"] = lambda name=name: test_sequence_first.make(
            name, 6, 4, torch.Generator().manual_seed(1))
    return out


def _tracked(model, x, y, loss, fused: bool, batch_first: bool = True):
    with GradNormTracker(model, "sum", fused=fused, batch_first=batch_first) as tracker:
        loss(model(x), y).backward()
        return tracker.collect(), sorted({plan.route for plan in tracker.plan()})


def check(make, device: torch.device, fused: bool, decomposed: bool = False, batch_first: bool = True) -> dict:
    """Relative errors of the per-sample and batch-gradient norms against torch.func, or, for a
    ``decomposed`` model, against the engine on the PyTorch reference operators. ``batch_first``
    False: the model takes ``[T, B, ...]`` (the reference's samples are the input's dim 1)."""
    with torch.device(device):
        model, x, y, loss = make()
        model, x = model.to(device), x.to(device)
        y = torch.zeros(x.shape[0], device=device) if y is None else y.to(device)
        stats, routes = _tracked(model, x, y, loss, fused, batch_first)
        if decomposed:
            with _env({"DIVEBATCH_BACKEND": "reference"}):
                expected, _ = _tracked(model, x, y, loss, fused)
            per_sample, batch = expected.per_sample, expected.batch_grad_sq
        else:
            per_sample, _, batch = reference_norms(model, loss, x, y, batch_dim=0 if batch_first else 1)
    return {"per_sample_err": rel_err(stats.per_sample, per_sample), "batch_err": rel_err(stats.batch_grad_sq, batch),
            "routes": routes}


#: Zoo models whose CUDA memory must not grow from step to step (every kernel wrapper is on a route).
STEADY_CASES = ("linear_2d", "linear_3d", "conv2d", "embedding", "norms", "attention_batch_first")


def steady_memory(name: str, device: torch.device, steps: int = 4) -> dict:
    """``torch.cuda.memory_allocated`` after each of ``steps`` tracked steps of one zoo model: from
    the second step on it must not change (a wrapper or the tracker keeping a step's tensors would
    make it grow every step)."""
    with torch.device(device):
        model, _, _ = ZOO[name]()
        model = model.to(device)
        allocated = []
        with GradNormTracker(model, "sum") as tracker:
            for _ in range(steps):
                _, x, y = ZOO[name]()
                model.zero_grad(set_to_none=False)
                sample_loss(model(x.to(device)), y.to(device)).backward()
                tracker.collect()
                del x, y
                torch.cuda.synchronize(device)
                allocated.append(torch.cuda.memory_allocated(device))
    return {"case": f"steady-memory/{name}", "allocated": allocated, "ok": len(set(allocated[1:])) == 1}


def _shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) -> ``(I, N)``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: write I/N with 1 <= I <= N, e.g. 2/3")
    return index, count


def _in_shard(names, shard: tuple[int, int] | None) -> list:
    """The ``names`` shard ``(I, N)`` runs: every N-th, from the I-th (all of them without a shard)."""
    return list(names) if shard is None else [n for k, n in enumerate(names) if k % shard[1] == shard[0] - 1]


def merge(paths: list[Path]) -> dict:
    """The shards' files as one: rows in the order of ``cases()`` (then the steady-memory rows),
    ``meta.complete`` only if every shard's file is there and complete; ``meta.cut_after`` names the
    last case of each shard that was cut, ``meta.missing`` the files that were never written."""
    order = {name: k for k, name in enumerate([*cases(), *(f"steady-memory/{n}" for n in STEADY_CASES)])}
    rows, meta, cut_after, missing = [], {}, [], []
    for path in paths:
        if not path.is_file():
            missing.append(str(path))
            continue
        shard = json.loads(path.read_text())
        meta = meta or dict(shard["meta"])
        rows += shard["rows"]
        if not shard["meta"].get("complete", True):
            cut_after.append(shard["rows"][-1]["case"] if shard["rows"] else "no case")
    rows.sort(key=lambda row: order.get(row["case"], len(order)))  # (stable: fused before unfused)
    meta.update(shard=None, shards=len(paths), complete=not (cut_after or missing), cut_after=cut_after,
                missing=missing)
    return {"meta": meta, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="run every N-th case from the I-th (and likewise of the steady-memory checks)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="join these shards' files into --out (runs nothing)")
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge writes the joined file to --out: name it")
        merged = merge(args.merge)
        args.out.write_text(json.dumps(merged, indent=1))
        print(f"merged {len(args.merge)} shards: {len(merged['rows'])} rows, complete={merged['meta']['complete']}")
        return 0
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows, failed = [], 0
    meta = {"torch": torch.__version__, "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M"),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "complete": False,
            "shard": None if args.shard is None else "/".join(map(str, args.shard))}

    def write():  # after every row: a run cut by its time limit (the H200's, at 68 rows) keeps its rows
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    print("| case | fused | per-sample rel err | batch rel err | routes |\n|---|---|---|---|---|")
    every = cases()
    for name in _in_shard(every, args.shard):
        make = every[name]
        for fused in (True, False):
            t0 = time.perf_counter()
            try:
                variables = next((v for prefix, v in CASE_ENV.items() if name.startswith(prefix)), {})
                with _env(variables):
                    row = {"case": name, "fused": fused, **check(make, device, fused, name.startswith("decomposed/"),
                                                                 batch_first=not name.startswith(SEQUENCE_FIRST))}
                ok = row["per_sample_err"] <= RTOL and row["batch_err"] <= RTOL
                print(f"| {name} | {fused} | {row['per_sample_err']:.1e} | {row['batch_err']:.1e} | "
                      f"{', '.join(row['routes'])} |", flush=True)
            except Exception as err:  # noqa: BLE001 - a failing case is a result, the rest still run
                row, ok = {"case": name, "fused": fused, "error": f"{type(err).__name__}: {err}"}, False
                print(f"| {name} | {fused} | FAILED: {row['error'][:120]} | | |", flush=True)
                traceback.print_exc(file=sys.stderr)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            row["ok"] = ok
            failed += not ok
            rows.append(row)
            write()
    print(f"{len(rows) - failed} of {len(rows)} within {RTOL} on {device}")
    if device.type == "cuda":
        print("\n| steady memory | bytes allocated after each step |\n|---|---|")
        for name in _in_shard(STEADY_CASES, args.shard):
            try:
                row = steady_memory(name, device)
            except Exception as err:  # noqa: BLE001
                row = {"case": f"steady-memory/{name}", "error": f"{type(err).__name__}: {err}", "ok": False}
                traceback.print_exc(file=sys.stderr)
            print(f"| {row['case']} | {row.get('allocated', row.get('error'))} {'' if row['ok'] else '(GROWS)'} |")
            failed += not row["ok"]
            rows.append(row)
            write()
    meta["complete"] = True
    write()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
