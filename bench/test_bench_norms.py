"""pytest-benchmark of the per-sample-norm workloads, every method side by side.

    pytest bench/test_bench_norms.py --benchmark-group-by=param:workload

Opacus and BackPACK are skipped cleanly when not installed (``pip install -e .[bench]``;
BackPACK with ``pip install --no-deps backpack-for-pytorch``). The ratio table with errors and
memory comes from ``python bench/run_table.py``.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods import METHODS, MethodUnavailable, build  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


@pytest.mark.parametrize("method_cls", METHODS, ids=[m.name for m in METHODS])
@pytest.mark.parametrize("workload", ["mlp", "cnn", "seq"])
def test_per_sample_norm_step(benchmark, workload, method_cls):
    spec = WORKLOADS[workload]
    try:
        method = build(method_cls, spec)
    except MethodUnavailable as err:
        pytest.skip(str(err))
    x, y = spec.make_batch(torch.device("cpu"))
    try:
        norms = method.step(x, y)  # warm-up, and the value the benchmark is about
    except Exception as err:  # noqa: BLE001 - e.g. Opacus ghost refusing 4-D Linear inputs
        pytest.skip(f"{method_cls.name} refuses {workload}: {err}")
    if norms is not None:
        assert norms.shape == (x.shape[0],) and torch.isfinite(norms).all()
    benchmark.pedantic(method.step, args=(x, y), rounds=5, warmup_rounds=1)
    method.close()
