"""Time the Triton kernels against the PyTorch reference and the plain weight-gradient GEMM (GPU only).

    python bench/gpu/bench_kernels.py [--out PATH] [--workloads a,b] [--rounds 3] [--rep-ms 60] [--append]

For every workload (a layer's ``a [B, T, d]`` and ``g [B, T, p]``, see ``WORKLOADS``) and every
method, ``triton.testing.do_bench`` (L2 flushed before each call, median) is run in
``--rounds`` round-robin passes so drift hits all methods alike; the table reports the median
over rounds, the ratio to the plain weight-gradient GEMM (``g^T a`` over the whole batch in the
input dtype: what backward computes anyway; the floor), achieved TFLOP/s, and the largest
relative error of the kernel against the reference on the same inputs.

FLOP counts (multiply-add = 2): ghost ``B (T^2 + T)(d + p)`` (the upper-triangular tile pairs of
the two Grams; doubled off-diagonal pairs are not recounted), instantiate and the GEMM
``2 B T d p``. Writes JSON to ``--out``, else ``$OUT/bench_kernels.json``, else
``bench/results/gpu_kernels_<time>.json``. ``--append`` keeps the results already in ``--out`` (of
other workloads) and its measured peak: how the GPU check times the issue's target shapes first and
the rest later, in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the checkout's divebatch, installed or not


def load_kernels():
    from divebatch._build import import_kernels

    return import_kernels()


def load_reference():
    from divebatch import reference

    return reference


# name -> (op, B, T, d, p, dtype, extra). "seq-large" is BENCHMARKS.md's GPU workload (its two
# Linear shapes); "conv-*" are ResNet-18 convs at 224x224 unfolded (T = output positions,
# d = C_in * 9); "seq" is the small CPU workload's Linear; "mlp" the T = 1 route.
WORKLOADS = {
    "seq-large-up":   ("ghost+instantiate", 8, 2048, 4096, 16384, torch.bfloat16, None),
    "seq-large-down": ("ghost+instantiate", 8, 2048, 16384, 4096, torch.bfloat16, None),
    "seq-large-fp32": ("ghost+instantiate", 2, 2048, 4096, 4096, torch.float32, None),
    "seq-up":         ("ghost+instantiate", 16, 128, 256, 1024, torch.float32, None),
    "seq-up-bf16":    ("ghost+instantiate", 16, 128, 256, 1024, torch.bfloat16, None),
    "conv-layer1":    ("ghost+instantiate", 64, 3136, 576, 64, torch.bfloat16, None),
    "conv-layer4":    ("ghost+instantiate", 64, 49, 4608, 512, torch.bfloat16, None),
    # the same as views of positions-last buffers (``unfold_patches``' im2col, ``grouped_grad``), both
    # inner strides T: how the convolution routes hand them to the kernels at layer1 (T = 3136); at
    # layer4 (T = 49, not a multiple of 16: loaded element by element) they have handed contiguous
    # rows since the twenty-eighth session (``layers.conv.rows_layout``: the ``conv-layer4`` row), so
    # ``conv-layer4-unfolded`` against ``conv-layer4`` is what that change gains
    "conv-layer1-unfolded": ("ghost+instantiate", 64, 3136, 576, 64, torch.bfloat16, "positions-last"),
    "conv-layer4-unfolded": ("ghost+instantiate", 64, 49, 4608, 512, torch.bfloat16, "positions-last"),
    # the fused convolution route (conv-large's early layers): the patches unfolded for the
    # instantiate kernel (what runs by default) against the same kernel reading them from the input
    # in place (conv_instantiate_norm, DIVEBATCH_TRITON_IMPLICIT_CONV=1), beside cuDNN's weight
    # gradient (the floor the fused route replaces); extra = (C, size, kernel, stride, padding)
    "conv-stem-implicit":   ("conv", 64, 12544, 147, 64, torch.bfloat16, (3, 224, 7, 2, 3)),
    "conv-layer1-implicit": ("conv", 64, 3136, 576, 64, torch.bfloat16, (64, 56, 3, 1, 1)),
    "conv-layer2-implicit": ("conv", 64, 784, 1152, 128, torch.bfloat16, (128, 28, 3, 1, 1)),
    # the hook route's Gram kernel (conv-large's deep layers): unfolded patches for ghost_norm (what
    # runs by default) against conv_ghost_norm reading them in place, beside cuDNN's weight gradient
    "conv-layer3-implicit-ghost": ("conv-ghost", 64, 196, 2304, 256, torch.bfloat16, (256, 14, 3, 1, 1)),
    "conv-layer4-implicit-ghost": ("conv-ghost", 64, 49, 4608, 512, torch.bfloat16, (512, 7, 3, 1, 1)),
    "conv-layer4-down-implicit-ghost": ("conv-ghost", 64, 49, 256, 512, torch.bfloat16, (256, 14, 1, 2, 0)),
    # the same on channels-last maps: the implicit kernels then number their columns channel-fastest
    # and their loads are 16-byte vectors in the software pipeline (tests/test_triton_compile.py)
    "conv-layer1-implicit-cl": ("conv", 64, 3136, 576, 64, torch.bfloat16, (64, 56, 3, 1, 1, "channels_last")),
    "conv-layer3-implicit-ghost-cl": ("conv-ghost", 64, 196, 2304, 256, torch.bfloat16,
                                      (256, 14, 3, 1, 1, "channels_last")),
    "mlp-T1":         ("outer", 256, 1, 1024, 1024, torch.float32, None),
    "mlp-T1-bf16":    ("outer", 4096, 1, 4096, 4096, torch.bfloat16, None),
    "seq-embedding":  ("embedding", 16, 128, 0, 256, torch.float32, 1000),
    "seq-large-embedding": ("embedding", 8, 2048, 0, 4096, torch.bfloat16, 32000),
    # LayerNorm per-sample sums (d = the row width, p unused; extra = rms): seq-large's norm layers
    "layernorm-seq-large": ("affine_norm", 8, 2048, 4096, 0, torch.bfloat16, False),
    "rmsnorm-llama":       ("affine_norm", 4, 4096, 4096, 0, torch.bfloat16, True),
    # GroupNorm(32) per-sample sums (T = positions, d = channels; extra = groups): conv-large's layer1
    "groupnorm-conv-large": ("group_norm", 32, 3136, 64, 0, torch.bfloat16, 32),
    # the same maps channels-last (a diffusion UNet's layout): the kernel's loads then stride over
    # positions by C, with only a group's channels contiguous (extra = (groups, layout))
    "groupnorm-conv-large-cl": ("group_norm", 32, 3136, 64, 0, torch.bfloat16, (32, "channels-last")),
    # BatchNorm per-sample sums (T = positions, d = channels; extra = mode and layout): ResNet-18's
    # layer1 in training mode (batch statistics), NCHW and channels-last, and its layer4 in eval mode
    "batchnorm-conv-large": ("batch_norm", 64, 3136, 64, 0, torch.bfloat16, "train"),
    "batchnorm-conv-large-cl": ("batch_norm", 64, 3136, 64, 0, torch.bfloat16, "train-channels-last"),
    "batchnorm-layer4-eval": ("batch_norm", 64, 49, 512, 0, torch.bfloat16, "eval"),
    # recurrent scans (d = p = H; extra = mode): the lstm / gru workloads of the CPU table, and a wider batch
    "lstm-scan":      ("scan", 16, 64, 256, 256, torch.float32, "LSTM"),
    "gru-scan":       ("scan", 16, 64, 256, 256, torch.float32, "GRU"),
    "lstm-scan-wide": ("scan", 128, 64, 512, 512, torch.float32, "LSTM"),
}


def _chosen(kernel) -> str | None:
    """The config an autotuned kernel ran with last (its ``best_config``), as text."""
    config = getattr(kernel, "best_config", None)
    return None if config is None else str(config)


def _config_timings(kernel) -> dict[str, float]:
    """Each config's time (ms, the autotuner's median) at the shape it tuned last: which knob paid."""
    timings = getattr(kernel, "configs_timings", None) or {}
    return {str(config): (t[0] if isinstance(t, (list, tuple)) else t) for config, t in timings.items()}


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if ref.dim() > 1:
        return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return float(((out - ref).abs() / ref.abs().clamp_min(1e-30)).max())


def _cpu_timer(fn, warmup=0, rep=0, return_mode="median"):
    """Stand-in for do_bench in the --cpu-smoke run (interpreter): one timed call, in ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_workload(name, spec, K, R, rounds, rep_ms, dev="cuda"):
    if dev == "cuda":
        from triton.testing import do_bench
    else:
        do_bench = _cpu_timer
    op, B, T, d, p, dtype, extra = spec
    gen = torch.Generator(device=dev).manual_seed(0)
    methods, flops, errors, chosen, tuned = {}, {}, {}, {}, {}
    if op == "outer":
        a = torch.randn(B, d, device=dev, generator=gen).to(dtype)
        g = (0.1 * torch.randn(B, p, device=dev, generator=gen)).to(dtype)
        methods["triton outer_norm"] = lambda: K.outer_norm_triton(a, g, True)
        methods["reference outer_norm"] = lambda: R.outer_norm(a, g, True)
        methods["gemm g^T a (floor)"] = lambda: g.t() @ a
        flops["gemm g^T a (floor)"] = 2 * B * d * p
        out, ref = K.outer_norm_triton(a, g, True), R.outer_norm(a, g, True)
        errors["triton outer_norm"] = max(rel_err(o, r) for o, r in zip(out, ref))
        bytes_moved = (a.numel() + g.numel()) * a.element_size()
    elif op == "scan":
        methods, errors = _scan_methods(B, T, d, dtype, extra, K, R, dev, gen)
        bytes_moved = 0
    elif op in ("conv", "conv-ghost"):
        ghost = op == "conv-ghost"
        methods, errors, flops = _conv_methods(B, p, dtype, extra, K, R, dev, gen, ghost)
        kernel = K.ghost_norm._ghost_norm_kernel if ghost else K.instantiate_norm._instantiate_norm_kernel
        chosen[IMPLICIT_GHOST if ghost else IMPLICIT] = _chosen(kernel)
        tuned[IMPLICIT_GHOST if ghost else IMPLICIT] = _config_timings(kernel)
        bytes_moved = 0
    elif op in ("affine_norm", "group_norm", "batch_norm"):  # (reads x and g once)
        methods_of = {"affine_norm": _affine_norm_methods, "group_norm": _group_norm_methods,
                      "batch_norm": _batch_norm_methods}[op]
        methods, errors = methods_of(B, T, d, dtype, extra, K, R, dev, gen)
        bytes_moved = 2 * B * T * d * torch.tensor([], dtype=dtype).element_size()
    elif op == "embedding":
        vocab = extra
        idx = torch.randint(0, vocab, (B, T), device=dev, generator=gen)
        g = (0.1 * torch.randn(B, T, p, device=dev, generator=gen)).to(dtype)
        methods["triton embedding_norm"] = lambda: K.embedding_norm_triton(idx, g, 0)
        methods["reference embedding_norm"] = lambda: R.embedding_norm(idx, g, 0)
        weight = torch.zeros(vocab, p, device=dev, dtype=dtype)
        methods["embedding backward (floor)"] = lambda: weight.index_add(0, idx.reshape(-1), g.reshape(-1, p))
        errors["triton embedding_norm"] = rel_err(K.embedding_norm_triton(idx, g, 0), R.embedding_norm(idx, g, 0))
        bytes_moved = g.numel() * g.element_size()
    else:
        a = torch.randn(B, T, d, device=dev, generator=gen).to(dtype)
        g = (0.1 * torch.randn(B, T, p, device=dev, generator=gen)).to(dtype)
        if extra == "positions-last":
            a, g = a.transpose(1, 2).contiguous().transpose(1, 2), g.transpose(1, 2).contiguous().transpose(1, 2)
        a2, g2 = a.reshape(B * T, d), g.reshape(B * T, p)  # (the floor's GEMM on contiguous rows)
        methods["gemm g^T a (floor)"] = lambda: g2.t() @ a2
        methods["triton ghost_norm"] = lambda: K.ghost_norm_triton(a, g, True)
        methods["triton instantiate_norm"] = lambda: K.instantiate_norm_triton(a, g, True)
        methods["reference ghost_norm"] = lambda: R.ghost_norm(a, g, True)
        # The reference instantiate materialises B x p x d float32: skip it where that is > 8 GB.
        if B * p * d * 4 <= 8 << 30:
            methods["reference instantiate_norm"] = lambda: R.instantiate_norm(a, g, True)
        flops["gemm g^T a (floor)"] = 2 * B * T * d * p
        flops["triton instantiate_norm"] = 2 * B * T * d * p
        flops["triton ghost_norm"] = B * (T * T + T) * (d + p)
        ref = R.ghost_norm(a, g, True)
        ghost = K.ghost_norm_triton(a, g, True)
        errors["triton ghost_norm"] = max(rel_err(o, r) for o, r in zip(ghost, ref))
        # (apart as well: a deviation in the Gram products vs in the bias's column sums)
        errors["triton ghost_norm (weight)"], errors["triton ghost_norm (bias)"] = (
            rel_err(o, r) for o, r in zip(ghost, ref))
        inst = K.instantiate_norm_triton(a, g, True)
        errors["triton instantiate_norm"] = max(rel_err(inst[0], ref[0]), rel_err(inst[1], ref[1]))
        wgrad_ref = (g2.float().t() @ a2.float())
        errors["triton instantiate_norm (weight grad)"] = rel_err(inst[2], wgrad_ref)
        # The configs these first calls tuned to (the errors above are theirs: a deviation names its config).
        # The same calls again, with the tuned config cached: a first call wrong and a second right
        # would point at the tuning (its resets of the atomic outputs), not at the kernels.
        errors["triton ghost_norm (second call)"] = max(rel_err(o, r) for o, r in zip(K.ghost_norm_triton(a, g, True), ref))
        errors["triton instantiate_norm (weight grad, second call)"] = rel_err(
            K.instantiate_norm_triton(a, g, True)[2], wgrad_ref)
        chosen["triton ghost_norm"] = _chosen(K.ghost_norm._ghost_norm_kernel)
        chosen["triton instantiate_norm"] = _chosen(K.instantiate_norm._instantiate_norm_kernel)
        tuned["triton ghost_norm"] = _config_timings(K.ghost_norm._ghost_norm_kernel)
        tuned["triton instantiate_norm"] = _config_timings(K.instantiate_norm._instantiate_norm_kernel)
        if p >= 1024 or dev != "cuda":  # (the CPU smoke's p is short)
            # The Gram kernel without its bias: the same Grams, no pass over g for the column sums
            # (run by the diagonal programs alone, p / BLOCK_K chunks each). Against "triton
            # ghost_norm", what the bias costs (seq-large up, p = 16384, ran at 38% of the peak on
            # the H200 against down's 50% with the same flops; down's p is 4096).
            no_bias = GHOST_NO_BIAS
            methods[no_bias] = lambda: K.ghost_norm_triton(a, g, False)
            flops[no_bias] = flops["triton ghost_norm"]
            errors[no_bias] = rel_err(methods[no_bias]()[0], ref[0])
            chosen[no_bias] = _chosen(K.ghost_norm._ghost_norm_kernel)

            def bias_in_wrapper():
                # The alternative to the kernel's bias loop: one coalesced pass over g by torch.
                weight_sq, _ = K.ghost_norm_triton(a, g, False)
                return weight_sq, g.sum(dim=1, dtype=torch.float32).square().sum(dim=1)

            methods[GHOST_BIAS_IN_WRAPPER] = bias_in_wrapper
            flops[GHOST_BIAS_IN_WRAPPER] = flops["triton ghost_norm"]
            errors[GHOST_BIAS_IN_WRAPPER] = max(rel_err(o, r) for o, r in zip(bias_in_wrapper(), ref))
        if dtype != torch.float32 and (T >= K.ghost_norm.WIDE_MIN_T or dev != "cuda"):  # (the CPU smoke's T is short)
            # The Gram kernel on 128 x 256 tiles (opt-in: DIVEBATCH_TRITON_GHOST_WIDE=1): against
            # "triton ghost_norm", whether the wider tiles' fewer operand bytes per flop pay for the
            # Grams' trip through scratch.
            wide = GHOST_WIDE

            def wide_ghost():
                with mock.patch.dict(os.environ, {"DIVEBATCH_TRITON_GHOST_WIDE": "1"}):
                    return K.ghost_norm_triton(a, g, True)

            methods[wide] = wide_ghost
            flops[wide] = flops["triton ghost_norm"]
            errors[wide] = max(rel_err(o, r) for o, r in zip(methods[wide](), ref))
            errors[f"{wide} (second call)"] = max(rel_err(o, r) for o, r in zip(methods[wide](), ref))
            chosen[wide] = _chosen(K.ghost_norm._ghost_norm_wide_kernel)
            tuned[wide] = _config_timings(K.ghost_norm._ghost_norm_wide_kernel)
        if B % 2 == 0 and B > 2:
            # The same weight gradient and flops as two "samples" of B*T/2 rows: the same kernel and
            # configs (B = 2 and 8 specialise alike, so nothing new compiles), with B/2 times fewer
            # per-sample epilogues (drained pipeline, tile reduction, atomic). Against the floor it
            # gives the kernel's tile speed; against the B-sample run, what the samples cost.
            two = INSTANTIATE_TWO_SAMPLES
            a_two, g_two = a.reshape(2, B * T // 2, d), g.reshape(2, B * T // 2, p)
            methods[two] = lambda: K.instantiate_norm_triton(a_two, g_two, True)
            flops[two] = 2 * B * T * d * p
            errors[two] = rel_err(K.instantiate_norm_triton(a_two, g_two, True)[2], wgrad_ref)
            chosen[two] = _chosen(K.instantiate_norm._instantiate_norm_kernel)
            tuned[two] = _config_timings(K.instantiate_norm._instantiate_norm_kernel)
        del inst, wgrad_ref
        bytes_moved = (a.numel() + g.numel()) * a.element_size()
    if dev == "cuda":
        torch.cuda.synchronize()

    times = {m: [] for m in methods}
    for _ in range(rounds):  # round-robin: every method once per round
        for m, fn in methods.items():
            times[m].append(do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
    floor = next((m for m in methods if "floor" in m), None)
    rows = []
    for m in methods:
        ms = statistics.median(times[m])
        row = {"method": m, "ms": ms, "ms_rounds": times[m]}
        if m in flops:
            row["tflops"] = flops[m] / ms / 1e9
        if floor:
            row["ratio_to_floor"] = ms / statistics.median(times[floor])
        if m in errors:
            row["max_rel_err_vs_reference"] = errors[m]
        if chosen.get(m):
            row["config"] = chosen[m]
        if tuned.get(m):
            row["config_ms"] = tuned[m]
        if m.startswith("triton") and op in ("outer", "embedding", "affine_norm", "group_norm", "batch_norm"):
            row["GB_per_s"] = bytes_moved / ms / 1e6
        rows.append(row)
    extra_err = {k: v for k, v in errors.items() if k not in methods}
    result = {"workload": name, "op": op, "B": B, "T": T, "d": d, "p": p, "dtype": str(dtype).split(".")[-1],
              "rows": rows, "extra_errors": extra_err}
    if op == "ghost+instantiate":
        from divebatch.layers.linear import fused_linear_route

        # Does the engine's CUDA cost model (FUSED_CUDA_EXTRA_COST) pick the route that ran faster?
        result["route"] = {"model": fused_linear_route(B, T, d, p, "cuda").route,
                           "faster": measured_faster_route(result)}
    return result


#: The ``ghost+instantiate`` row of the instantiate kernel on the B samples' rows regrouped as two.
INSTANTIATE_TWO_SAMPLES = "triton instantiate_norm as 2 samples (tile speed)"

#: The ``ghost+instantiate`` row of the Gram kernel on wide tiles (``_ghost_norm_wide_kernel``).
GHOST_WIDE = "triton ghost_norm (wide tiles)"

#: The ``ghost+instantiate`` rows of the Gram kernel without the bias's column sums (p >= 1024), and
#: of the same with the bias's norms from ``g.sum(1)`` in torch instead.
GHOST_NO_BIAS = "triton ghost_norm (no bias)"
GHOST_BIAS_IN_WRAPPER = "triton ghost_norm (no bias) + torch bias"


def measured_faster_route(result) -> str:
    """Of the fused instantiate route (its kernel in place of the weight-gradient GEMM, so it costs
    its time beyond the GEMM's) and the ghost route (its kernel beside the GEMM), the faster one
    in a ``ghost+instantiate`` result of this script."""
    ms = {row["method"]: row["ms"] for row in result["rows"]}
    extra = ms["triton instantiate_norm"] - ms["gemm g^T a (floor)"]
    return "fused-instantiate" if extra < ms["triton ghost_norm"] else "ghost"


#: The ``conv`` row of the instantiate kernel reading the patches from the input in place, and the
#: ``conv-ghost`` row of the Gram kernel.
IMPLICIT = "triton conv_instantiate_norm (implicit)"
IMPLICIT_GHOST = "triton conv_ghost_norm (implicit)"
#: The same kernels as the engine hands them an NCHW map of channels in multiples of 16: channels-last
#: copies first (``layers.conv.vector_layouts``: the input, and an output grad whose positions are not
#: a multiple of 16; the copies are in the time).
COPIED = " from a channels-last copy"


def _conv_methods(B, O, dtype, geometry, K, R, dev, gen, ghost=False):
    """A one-group 2-d convolution's fused route (``geometry``: channels, side, kernel, stride and
    padding): ``unfold + triton instantiate_norm`` (the patches of the padded input unfolded, as
    ``layers.conv.unfolded_weight_norms`` does in one chunk) against ``IMPLICIT``, beside cuDNN's
    weight gradient (the floor); each kernel's norms and weight gradient against the reference's.
    ``ghost``: the hook route's norms instead, ``unfold + triton ghost_norm`` against
    ``IMPLICIT_GHOST`` (norms only; cuDNN's weight gradient runs beside them there). A sixth
    ``geometry`` entry ``"channels_last"`` gives input and output grad in that memory format; an
    NCHW input of channels in multiples of 16 also gets the implicit kernel from the channels-last
    copies the engine makes (``+ COPIED``, timed before the plain implicit row, whose config
    ``chosen`` then records)."""
    from divebatch.layers.conv import vector_layouts

    C, side, k, stride, pad, *layout = geometry
    conv = ([k, k], [stride, stride], [pad, pad], [1, 1])
    fmt = torch.channels_last if layout == ["channels_last"] else torch.contiguous_format
    x = torch.randn(B, C, side, side, device=dev, generator=gen).to(dtype).contiguous(memory_format=fmt)
    weight = torch.randn(O, C, k, k, device=dev, generator=gen).to(dtype).contiguous(memory_format=fmt)
    out = torch.nn.functional.conv2d(x, weight, None, stride, pad)
    g = (0.1 * torch.randn(out.shape, device=dev, generator=gen)).to(dtype).contiguous(memory_format=fmt)
    unfolded = "unfold + triton ghost_norm" if ghost else "unfold + triton instantiate_norm"

    def unfold_route():
        patches = R.conv_patches(R.zero_padded(x, conv[2]), conv[0], conv[1], conv[3]).transpose(1, 2)
        kernel = K.ghost_norm_triton if ghost else K.instantiate_norm_triton
        return kernel(patches, g.reshape(B, O, -1).transpose(1, 2), False)

    implicit_name = IMPLICIT_GHOST if ghost else IMPLICIT
    implicit_kernel = K.conv_ghost_norm_triton if ghost else K.conv_instantiate_norm_triton
    methods = {
        "cudnn weight grad (floor)": lambda: torch.ops.aten.convolution_backward(
            g, x, weight, None, conv[1], conv[2], conv[3], False, [0, 0], 1, [False, True, False]),
        unfolded: unfold_route,
    }
    implicit_inputs = {implicit_name: lambda: (x, g)}
    if any(laid is not given for laid, given in zip(vector_layouts(x, g), (x, g))):
        implicit_inputs = {implicit_name + COPIED: lambda: vector_layouts(x, g), **implicit_inputs}
    for name, input_of in implicit_inputs.items():
        methods[name] = lambda input_of=input_of: implicit_kernel(*input_of(), *conv)
    T = out.shape[2] * out.shape[3]
    flops = dict.fromkeys(methods, 2 * B * T * C * k * k * O)
    if ghost:
        flops[unfolded] = B * (T * T + T) * (C * k * k + O)  # (as "triton ghost_norm")
        flops.update(dict.fromkeys(implicit_inputs, flops[unfolded]))
        want = R.conv_ghost_norm(x.float(), g.float(), *conv)
        errors = {name: rel_err(implicit_kernel(*input_of(), *conv), want) for name, input_of in implicit_inputs.items()}
        errors[unfolded] = rel_err(unfold_route()[0], want)
        return methods, errors, flops
    want = R.conv_instantiate_norm(x.float(), g.float(), *conv)
    errors = {}
    for name, input_of in implicit_inputs.items():
        implicit = K.conv_instantiate_norm_triton(*input_of(), *conv)
        errors[name] = max(rel_err(implicit[0], want[0]), rel_err(implicit[1], want[1]))
    by_unfolding = unfold_route()
    errors[unfolded] = max(rel_err(by_unfolding[0], want[0]), rel_err(by_unfolding[2], want[1]))
    return methods, errors, flops


def _norm_methods(name, module, rule, tracked, x, g, ours, reference, ctx=None):
    """A norm layer's per-sample weight and bias sums: the Triton kernel (``ours()``) against the
    rule's PyTorch path (what runs without it; on the captured ``ctx``, default ``x``) and the
    layer's own backward (the floor: it reads the same x and g); the kernel's error against
    ``reference()``."""
    from divebatch.layers import norm

    xr = x.detach().requires_grad_()
    out = module(xr)
    ctx = x if ctx is None else ctx
    methods = {
        "layer backward (floor)": lambda: torch.autograd.grad(out, (xr, *module.parameters()), g, retain_graph=True),
        f"triton {name}": ours,
        "torch rule path": lambda: norm.AffineNormRule.per_sample_grads(rule, module, [(ctx, (g,))], tracked),
    }
    errors = {f"triton {name}": max(rel_err(o, r) for o, r in zip(ours(), reference()) if r.abs().max() > 0)}
    return methods, errors


def _affine_norm_methods(B, R_rows, d, dtype, rms, K, R, dev, gen):
    """A LayerNorm's (RMSNorm's) per-sample sums over ``[B, R_rows, d]`` (see ``_norm_methods``)."""
    from divebatch.layers import norm

    x = (torch.randn(B, R_rows, d, device=dev, generator=gen) + 0.5).to(dtype)
    g = torch.randn(B, R_rows, d, device=dev, generator=gen).to(dtype)
    module = (torch.nn.RMSNorm(d) if rms else torch.nn.LayerNorm(d)).to(dev, dtype)
    rule = norm.RMSNormRule() if rms else norm.LayerNormRule()
    return _norm_methods("affine_norm_grads", module, rule, {"weight"} if rms else {"weight", "bias"}, x, g,
                         lambda: K.affine_norm_grads_triton(x, g, rms, 1e-5, not rms),
                         lambda: R.affine_norm_grads(x, g, rms, 1e-5, not rms))


def _group_norm_methods(B, S, C, dtype, extra, K, R, dev, gen):
    """A GroupNorm's per-sample sums over ``[B, C, S]`` (see ``_norm_methods``); ``extra`` is the
    number of groups, or ``(groups, "channels-last")`` for ``[B, C, side, side]`` maps in that
    layout (the kernel gets their ``[B, C, S]`` view: positions strided by C)."""
    from divebatch.layers import norm

    groups, layout = extra if isinstance(extra, tuple) else (extra, "contiguous")
    if layout == "channels-last":
        side = int(round(S ** 0.5))
        x = (torch.randn(B, C, side, side, device=dev, generator=gen) + 0.5).to(
            dtype=dtype, memory_format=torch.channels_last)
        g = torch.randn(B, C, side, side, device=dev, generator=gen).to(dtype=dtype, memory_format=torch.channels_last)
    else:
        x = (torch.randn(B, C, S, device=dev, generator=gen) + 0.5).to(dtype)
        g = torch.randn(B, C, S, device=dev, generator=gen).to(dtype)
    x3, g3 = x.reshape(B, C, -1), g.reshape(B, C, -1)  # (views in both layouts)
    module = torch.nn.GroupNorm(groups, C).to(dev, dtype)
    return _norm_methods("group_norm_grads", module, norm.GroupNormRule(), {"weight", "bias"}, x, g,
                         lambda: K.group_norm_grads_triton(x3, g3, groups, 1e-5, True),
                         lambda: R.group_norm_grads(x3, g3, groups, 1e-5, True))


def _batch_norm_methods(B, S, C, dtype, mode, K, R, dev, gen):
    """A BatchNorm2d's per-sample sums over ``[B, C, S]`` feature maps (``S`` a square), in
    training mode (the batch's statistics) or eval mode (running ones), NCHW or channels-last
    (see ``_norm_methods``); the module keeps float32 parameters, as under autocast."""
    from divebatch.layers import norm

    side = int(round(S ** 0.5))
    layout = torch.channels_last if mode.endswith("channels-last") else torch.contiguous_format
    x = (torch.randn(B, C, side, side, device=dev, generator=gen) + 0.5).to(dtype=dtype, memory_format=layout)
    g = torch.randn(B, C, side, side, device=dev, generator=gen).to(dtype=dtype, memory_format=layout)
    module = torch.nn.BatchNorm2d(C).to(dev)
    if mode == "eval":
        with torch.no_grad():
            module.running_mean.uniform_(0.0, 1.0)
            module.running_var.uniform_(0.5, 2.0)
        module.eval()
    rule = norm.BatchNormRule()
    ctx = rule.capture(module, (x,), {}, None)
    mean, var = ctx[1:]
    x3, g3 = x.reshape(B, C, -1), g.reshape(B, C, -1)
    return _norm_methods("channel_norm_grads", module, rule, {"weight", "bias"}, x, g,
                         lambda: K.channel_norm_grads_triton(x3, g3, mean, var, module.eps, True),
                         lambda: R.channel_norm_grads(x3, g3, mean, var, module.eps, True), ctx=ctx)


def _scan_methods(B, T, H, dtype, mode, K, R, dev, gen):
    """One recurrent layer's forward and backward scans (what a tracked nn.LSTM/nn.GRU runs per
    direction), Triton against the PyTorch reference, beside the untracked layer's own forward and
    backward (cuDNN on a GPU: the floor; it also does the input projection the scans are given)."""
    gates = {"LSTM": 4, "GRU": 3}[mode]
    G = gates * H
    gi = torch.randn(B, T, G, device=dev, generator=gen).to(dtype)
    w_hh = (torch.randn(G, H, device=dev, generator=gen) * H ** -0.5).to(dtype)
    b_hh = torch.randn(G, device=dev, generator=gen).to(dtype)
    h0 = torch.randn(B, H, device=dev, generator=gen).to(dtype)
    c0 = torch.randn(B, H, device=dev, generator=gen).to(dtype) if mode == "LSTM" else None
    grad_out = torch.randn(B, T, H, device=dev, generator=gen).to(dtype)

    def run(scan, backward):
        out, cells, saved, _, _ = scan(gi, w_hh, b_hh, h0, c0, None, None, mode, False)
        return backward(grad_out, None, None, w_hh, h0, c0, None, out, cells, saved, None, mode, False)

    layer = getattr(torch.nn, mode)(H, H, batch_first=True).to(dev, dtype)
    x = torch.randn(B, T, H, device=dev, generator=gen).to(dtype)

    def plain():
        layer(x)[0].backward(grad_out)

    methods = {
        f"nn.{mode} fwd+bwd (floor)": plain,
        "triton scan fwd+bwd": lambda: run(K.recurrent_scan_triton, K.recurrent_scan_backward_triton),
        "reference scan fwd+bwd": lambda: run(R.recurrent_scan, R.recurrent_scan_backward),
    }
    ours = run(K.recurrent_scan_triton, K.recurrent_scan_backward_triton)
    ref = run(R.recurrent_scan, R.recurrent_scan_backward)
    errors = {"triton scan fwd+bwd": max(rel_err(o, r) for o, r in zip(ours, ref) if r.numel())}
    return methods, errors


def measured_bf16_peak(n: int = 8192) -> float:
    """TFLOP/s of an ``n``-cube bfloat16 matrix product on random data (``do_bench`` median): the
    tensor-core peak the ghost kernel's share is read against (``bench/gpu/verdicts.py``; ~790 on
    the H100 and H200 here, below the datasheet's 990)."""
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    return 2 * n**3 / ms / 1e9


def print_table(results):
    print(f"\n{'workload':22} {'method':30} {'ms':>9} {'x floor':>8} {'TFLOP/s':>8} {'rel err':>9}")
    for res in results:
        if "error" in res:
            print(f"{res['workload']:22} FAILED: {res['error'][:100]}")
            continue
        for r in res["rows"]:
            tf = f"{r['tflops']:.1f}" if "tflops" in r else ""
            ratio = f"{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else ""
            err = f"{r['max_rel_err_vs_reference']:.1e}" if "max_rel_err_vs_reference" in r else ""
            print(f"{res['workload']:22} {r['method']:30} {r['ms']:9.3f} {ratio:>8} {tf:>8} {err:>9}")
        for k, v in res.get("extra_errors", {}).items():
            print(f"{res['workload']:22} {k:30} {'':9} {'':>8} {'':>8} {v:9.1e}")
        if "route" in res:
            print(f"{res['workload']:22} route: model {res['route']['model']}, faster {res['route']['faster']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rep-ms", type=int, default=60)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check this script on CPU under TRITON_INTERPRET=1 with tiny shapes (no timing value)")
    parser.add_argument("--append", action="store_true",
                        help="add to the results already in --out (those of the workloads rerun are replaced)")
    args = parser.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.cpu_smoke:
        if not interpret:
            sys.exit("--cpu-smoke needs TRITON_INTERPRET=1")
        for key, (op, B, T, d, p, dtype, extra) in list(WORKLOADS.items()):
            WORKLOADS[key] = (op, min(B, 2), min(T, 20), min(d, 24) if d else 0, min(p, 20), dtype,
                              min(extra, 7) if isinstance(extra, int) and not isinstance(extra, bool) else extra)
            if op == "group_norm":  # (groups must divide the channels; a square map for channels-last)
                WORKLOADS[key] = (op, 2, 16, 24, 0, dtype, (4, extra[1]) if isinstance(extra, tuple) else 4)
            if op == "batch_norm":  # (a square feature map)
                WORKLOADS[key] = (op, 2, 16, 24, 0, dtype, extra)
            if op == "ghost+instantiate":  # (4 samples: the instantiate kernel regrouped as 2 runs too)
                WORKLOADS[key] = (op, min(B, 4), *WORKLOADS[key][2:])
            if op in ("conv", "conv-ghost"):  # (9 x 9 maps of 16 channels, 3 where the workload's are
                # not a multiple of 16, and the workload's kernel, stride, padding and layout)
                WORKLOADS[key] = (op, 2, 0, 0, 5, dtype, (16 if extra[0] % 16 == 0 else 3, 9, *extra[2:]))
    elif interpret:
        sys.exit("bench_kernels.py times GPU kernels: unset TRITON_INTERPRET (or pass --cpu-smoke)")
    elif not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    import triton

    dev = "cpu" if args.cpu_smoke else "cuda"

    K, R = load_kernels(), load_reference()
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        sys.exit(f"unknown workloads {unknown}; known: {list(WORKLOADS)}")
    if args.out:
        out = Path(args.out)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_kernels.json"
    else:
        out = REPO / "bench" / "results" / f"gpu_kernels_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(out.read_text()) if args.append and out.is_file() else {}
    meta = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter smoke run)",
        "torch": torch.__version__, "triton": triton.__version__,
        "kernels_from": getattr(K, "__name__", "?"), "autotune": bool(K._common.AUTOTUNE),
        "fp32_dot_precision": K._common.FP32_DOT_PRECISION, "rounds": args.rounds, "rep_ms": args.rep_ms,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # (the peak measured by the run appended to, unless it had none: one measurement per file)
    peak = earlier.get("meta", {}).get("bf16_gemm_tflops")
    meta["bf16_gemm_tflops"] = peak if peak is not None or dev != "cuda" else measured_bf16_peak()

    results = [r for r in earlier.get("results", []) if r.get("workload") not in names]
    start = time.time()
    for name in names:
        t0 = time.time()
        try:
            results.append(bench_workload(name, WORKLOADS[name], K, R, args.rounds, args.rep_ms, dev))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next workload
            results.append({"workload": name, "error": f"{type(exc).__name__}: {exc}"})
        if dev == "cuda":
            torch.cuda.empty_cache()
        print(f"[{name}: {time.time() - t0:.1f} s]", flush=True)
        # Rewritten after every workload: a run cut short by a time limit still leaves its numbers.
        meta["wall_s"] = time.time() - start
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print_table(results)
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
