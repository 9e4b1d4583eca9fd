"""Where the recurrent scan kernels go wrong on a GPU: per time step, the largest error of the
forward's outputs (and of the final states) against ``divebatch.reference`` in float64, for each
cell, both directions, a zero and a random initial state, one and several programs. Writes the
PTX and TTGIR of every specialisation the launches compiled to ``--asm-dir`` for offline diffing.

    python3 bench/gpu/diagnose_scan.py --asm-dir /tmp/scan-asm
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from divebatch import reference as R  # noqa: E402
from divebatch._build import import_kernels  # noqa: E402

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def case(K, mode, reverse, B, T, H, zero_h0, device):
    g = torch.Generator().manual_seed(B * 100 + T * 10 + H)
    G = GATES[mode] * H
    gi = torch.randn(B, T, G, generator=g, dtype=torch.float64)
    w_hh = torch.randn(G, H, generator=g, dtype=torch.float64) * H ** -0.5
    b_hh = torch.randn(G, generator=g, dtype=torch.float64)
    h0 = torch.zeros(B, H, dtype=torch.float64) if zero_h0 else torch.randn(B, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(B, H, generator=g, dtype=torch.float64) if mode == "LSTM" else None
    args = [gi, w_hh, b_hh, h0, c0, None, None]
    ref = R.recurrent_scan(*args, mode, reverse)
    dev = [a.float().to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out = K.recurrent_scan_triton(*dev, mode, reverse)
    if device == "cuda":
        torch.cuda.synchronize()
    per_step = (out[0].double().cpu() - ref[0]).abs().amax(dim=(0, 2))
    h_err = float((out[3].double().cpu() - ref[3]).abs().max())
    return per_step, h_err


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asm-dir", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("DIVEBATCH_TRITON_SCANS", "1")  # (the kernels under investigation refuse CUDA otherwise)
    K = import_kernels()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (cpu: under TRITON_INTERPRET=1)
    bad = 0
    for mode in ("RNN_RELU", "RNN_TANH", "GRU", "LSTM"):
        for reverse in (False, True):
            for B, T, H in ((1, 4, 16), (3, 5, 20), (40, 6, 64)):
                for zero_h0 in (True, False):
                    per_step, h_err = case(K, mode, reverse, B, T, H, zero_h0, device)
                    worst = max(float(per_step.max()), h_err)
                    bad += worst > 1e-4
                    steps = " ".join(f"{e:.0e}" for e in per_step.tolist())
                    print(f"{mode:8s} rev={int(reverse)} B={B:2d} T={T} H={H:2d} h0={'0' if zero_h0 else 'r'}: "
                          f"{'ok ' if worst <= 1e-4 else 'BAD'} per-step |err| [{steps}] h_n {h_err:.0e}", flush=True)
    if args.asm_dir is not None:
        args.asm_dir.mkdir(parents=True, exist_ok=True)
        fn = K.recurrent_scan._recurrent_scan_kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        caches = getattr(fn, "device_caches", None) or {}
        n = 0
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for key, compiled in cache.items():
                for kind in ("ttgir", "ptx"):
                    text = compiled.asm.get(kind)
                    if text:
                        (args.asm_dir / f"scan_{n}.{kind}").write_text(str(key) + "\n" + text)
                n += 1
        print(f"wrote {n} specialisations to {args.asm_dir}")
    print(f"{bad} bad cases")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
