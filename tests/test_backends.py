"""The whole engine gives the same numbers with every backend of the divebatch operators."""

import pytest
import torch

from divebatch import GradNormTracker, ops

from .models_zoo import DECOMPOSED, ZOO, sample_loss
from .oracle import rel_err

FAMILIES = ["linear_2d", "linear_3d", "conv2d", "conv1d", "embedding", "embedding_bags", "norms", "conv_norms_eval",
            "instance_norms", "batchnorm_train", "recurrent", "standardised_convs", "output_table"]


def _stats(case, backend, monkeypatch):
    monkeypatch.setenv("DIVEBATCH_BACKEND", backend)
    torch.manual_seed(0)
    model, x, y = {**ZOO, **DECOMPOSED}[case]()
    with GradNormTracker(model, "mean") as tracker:
        (sample_loss(model(x), y) / x.shape[0]).backward()
        return tracker.collect()


def _available(backend):
    if backend == "cpp" and not ops.CPP_AVAILABLE:
        pytest.skip("the C++ extension is not built here")
    if backend == "triton" and not ops.TRITON_AVAILABLE:
        pytest.skip("triton (divebatch._kernels) does not import here")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", FAMILIES)
def test_backend_matches_reference(case, backend, monkeypatch):
    _available(backend)
    expected = _stats(case, "reference", monkeypatch)
    actual = _stats(case, backend, monkeypatch)
    assert set(actual.per_layer) == set(expected.per_layer)
    for name in expected.per_layer:
        assert rel_err(actual.per_layer[name], expected.per_layer[name]) <= 1e-5, name
    assert rel_err(actual.batch_grad_sq, expected.batch_grad_sq) <= 1e-6


@pytest.mark.parametrize("case", FAMILIES)
def test_the_first_call_checks_pass_the_whole_engine(case, monkeypatch):
    """The Triton kernels wrapped in the first-call check against the reference (as they are
    registered on CUDA; here under the interpreter, forced): no family's inputs (unfolded patches,
    bags, batch statistics, scans) are refused, and every kernel the engine called was checked."""
    _available("triton")
    from divebatch import _selfcheck

    called = set()
    for name in _selfcheck.CHECKED_OPS:
        kernel = getattr(ops._kernels, f"{name}_triton")

        def counted(*args, kernel=kernel, name=name):
            called.add(name)
            return kernel(*args)

        monkeypatch.setattr(ops._kernels, f"{name}_triton", _selfcheck.checked(name, counted))
    _selfcheck.forget()
    try:
        expected = _stats(case, "reference", monkeypatch)
        actual = _stats(case, "triton", monkeypatch)
        assert {kind[0] for kind in _selfcheck._checked} == called  # (the conv families call none here)
    finally:
        _selfcheck.forget()
    for name in expected.per_layer:
        assert rel_err(actual.per_layer[name], expected.per_layer[name]) <= 1e-5, name


def test_wide_ghost_kernel_through_the_engine(monkeypatch):
    """The Gram route on the opt-in wide tiles (``DIVEBATCH_TRITON_GHOST_WIDE=1``): a two-layer MLP on
    sequences long enough for the hooks' cost model to take the ghost route (``fused=False``) gives
    the reference backend's numbers, and both layers went through the wide kernel."""
    _available("triton")
    launches, launch = [], ops._kernels.ghost_norm._launch_wide
    monkeypatch.setattr(ops._kernels.ghost_norm, "_launch_wide",
                        lambda *args, **kwargs: (launches.append(args[4:8]), launch(*args, **kwargs))[1])
    monkeypatch.setenv("DIVEBATCH_TRITON_GHOST_WIDE", "1")

    def stats(backend):
        monkeypatch.setenv("DIVEBATCH_BACKEND", backend)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 96, bias=False))
        with GradNormTracker(model, "sum", fused=False) as tracker:
            model(torch.randn(3, 40, 96)).square().sum().backward()
            assert {plan.route for plan in tracker.plan()} == {"ghost"}
            return tracker.collect()

    expected, actual = stats("reference"), stats("triton")
    assert sorted(launches) == [(3, 40, 96, 160), (3, 40, 160, 96)]
    for name in expected.per_layer:
        assert rel_err(actual.per_layer[name], expected.per_layer[name]) <= 1e-5, name
    assert rel_err(actual.batch_grad_sq, expected.batch_grad_sq) <= 1e-6


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("DIVEBATCH_BACKEND", "fortran")
    with pytest.raises(ValueError, match="DIVEBATCH_BACKEND"):
        ops.outer_norm(torch.ones(2, 3), torch.ones(2, 4))


def test_a_checkout_without_install_still_gets_the_triton_kernels(tmp_path):
    """A GPU machine may be handed the source tree without `pip install`: divebatch._kernels then
    comes from kernels/ of the checkout (the same module name, so ops register it as usual)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "import divebatch.ops as ops\n"
        "print(ops.TRITON_AVAILABLE, ops._kernels.__name__, ops._kernels.__file__)\n"
    )
    env = dict(__import__("os").environ, DIVEBATCH_NO_JIT="1", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    available, name, path = done.stdout.split()
    assert available == "True" and name == "divebatch._kernels"
    assert Path(path) == repo / "kernels" / "__init__.py"
