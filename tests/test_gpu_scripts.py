"""The GPU machine's scripts (bench/gpu/, and bench/op_counts.py and bench/host_overhead.py, its
host-cost proxies) on this CPU: a GPU is lent rarely and
for minutes, so a script that broke since its last run must fail here, not there. Each check reads
a value: the op counts' ordering, the profile's ops, the scan diagnosis' errors (interpreter), and
the control flow of run_gpu_checks.sh with a stand-in interpreter."""

from __future__ import annotations

import collections
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import diagnose_scan  # noqa: E402
import op_counts  # noqa: E402
import profile_step  # noqa: E402
import workloads  # noqa: E402
from methods import build  # noqa: E402
from run_table import BY_NAME, _batch  # noqa: E402

from divebatch import ops  # noqa: E402


def test_op_counts_order_plain_cuda_routes_cpu_routes():
    """A tracked step dispatches more ops than a plain one, and fewer on the CUDA routes (one
    reduction per gradient for the batch-gradient norm) than on the CPU ones (blocked float64 sums)."""
    spec = workloads.WORKLOADS["mlp"]
    cpu, cuda = op_counts.count_cpu(spec), op_counts.count_cuda_routes(spec, None)
    assert cpu["plain"] == cuda["plain"] < cuda["tracked"] < cpu["tracked"]
    assert cuda["plain_launches"] < cuda["tracked_launches"]
    assert dict(cuda["most_added_launches"]).get("linalg_vector_norm") == 6  # (3 Linear layers: weight and bias)
    assert dict(cuda["most_added_launches"]).get("triton:_outer_norm_kernel") == 3  # (T = 1: the outer route's kernel)


def _cuda_route_steps(name):
    with op_counts.cuda_routes_on_meta():
        return op_counts._count(workloads.WORKLOADS[name], "meta", torch.bfloat16, warmup=1)


def test_conv_large_on_the_cuda_routes_takes_the_kernels_not_the_grouped_convolution():
    """ResNet-18 at 224 x 224, batch 64, as on a GPU (full size, meta tensors): the convolutions'
    per-sample norms come from the Triton kernels on unfolded patches (the early layers' fused
    with their weight gradient); the grouped per-sample
    convolution (every per-sample gradient written, a few samples a call: 503 more convolution
    backwards and ~9000 ops a step before) is not called."""
    plain, tracked = _cuda_route_steps("conv-large")
    # (one per convolution or fewer: a fused convolution's tiles give its weight gradient, and the
    # stem's input needs none)
    assert tracked.launches["convolution_backward"] <= plain.launches["convolution_backward"] == 20
    assert tracked.launches["triton:_ghost_norm_kernel"] + tracked.launches["triton:_instantiate_norm_kernel"] >= 20
    assert tracked.launches["triton:_group_norm_grads_kernel"] == 20


def test_seq_large_on_the_cuda_routes_writes_nothing_the_size_of_an_activation():
    """seq-large as on a GPU (full size, bfloat16, meta tensors): the tracker's launches write
    under 0.1% of what the plain step's write (per-sample norms, no per-sample gradient, no float32
    copy of an activation: one [8, 2048, 4096] copy would be 1.2%), and the batch-gradient norm
    takes one reduction per parameter."""
    plain, tracked = _cuda_route_steps("seq-large")
    assert tracked.bytes_written - plain.bytes_written < 1e-3 * plain.bytes_written
    assert tracked.launches["triton:_ghost_norm_kernel"] == 5  # up and down of both blocks, the head
    assert tracked.launches["linalg_vector_norm"] == 15  # every parameter


def _meta(*shape, dtype=torch.bfloat16):
    """An uninitialised tensor on the meta device (shapes only), bfloat16 by default."""
    return torch.empty(*shape, device="meta", dtype=dtype)


def _wrapper_launches(call) -> dict:
    """What one operator call launches on the CUDA routes (meta tensors, kernels counted, not run)."""
    with op_counts.cuda_routes_on_meta():
        with op_counts.StepOps() as step:
            call()
    return dict(step.launches)


def test_cuda_routes_count_the_launches_around_each_triton_kernel():
    """The CUDA-routes trace runs the operators' Triton wrappers on meta tensors with each kernel's
    launch counted: what a wrapper launches around its kernel counts too. On a GPU a small layer's
    norms cost launches, not arithmetic, so each call zero-fills its outputs once, and a linear
    layer without a bias adds no zero bias norm."""
    from divebatch import ops
    from divebatch.layers import rule_for
    from divebatch.layers.linear import linear_norms

    a, g = _meta(16, 128, 256), _meta(16, 128, 1024)
    ghost = "triton:_ghost_norm_kernel"
    assert _wrapper_launches(lambda: ops.ghost_norm(a, g, False)) == {"zeros": 1, ghost: 1}
    # (with a bias: the column sums squared and summed after the kernel)
    assert _wrapper_launches(lambda: ops.ghost_norm(a, g, True)) == {"zeros": 1, ghost: 1, "pow": 1, "sum": 1}
    # (the weight's and the bias' per-sample sums; the weight gradient, which every program writes
    # whole, and without a bias the zero bias norms, which the kernel stores, are not zero-filled)
    assert _wrapper_launches(lambda: ops.instantiate_norm(a, g, True)) == {
        "zeros": 2, "triton:_instantiate_norm_kernel": 1}
    assert _wrapper_launches(lambda: ops.instantiate_norm(a, g, False)) == {
        "zeros": 1, "triton:_instantiate_norm_kernel": 1}
    assert _wrapper_launches(lambda: linear_norms(a, g, True, False, "ghost")) == {"zeros": 1, ghost: 1}
    assert _wrapper_launches(lambda: linear_norms(a, g, True, True, "ghost"))["add"] == 1
    # A one-group convolution's norms by the hooks: its patches and the kernel, no sum over one group.
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False, device="meta", dtype=torch.bfloat16)
    rule = rule_for(conv)
    conv_launches = _wrapper_launches(lambda: rule.norms(conv, [(_meta(16, 64, 14, 14), (_meta(16, 64, 14, 14),))],
                                                         {"weight": conv.weight}))
    assert "sum" not in conv_launches and sum(v for k, v in conv_launches.items() if k.startswith("triton:")) == 1
    # The wrappers' outputs, shaped as on a GPU (their device checks pass meta tensors), and no two
    # outputs of one call share a buffer (torch.library's rule for custom operators).
    with op_counts.cuda_routes_on_meta():
        calls = [ops.ghost_norm(a, g, False), ops.ghost_norm(a, g, True), ops.instantiate_norm(a, g, False),
                 ops.instantiate_norm(a, g, True)]
    assert [[tuple(t.shape) for t in call] for call in calls] == [[(16,)] * 2] * 2 + [[(16,), (16,), (1024, 256)]] * 2
    for call in calls:
        assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in call)
        assert len({t.untyped_storage()._cdata for t in call}) == len(call), "outputs of one call share a buffer"


def test_cuda_routes_run_every_triton_wrapper_on_meta_tensors():
    """Every operator's Triton wrapper runs on meta tensors under ``cuda_routes_on_meta`` (a wrapper
    that queried CUDA, or checked its inputs' device otherwise, would break the trace): one kernel
    launch each, outputs shaped as the reference's, none sharing a buffer with another."""
    from divebatch import ops, reference

    conv = ([3, 3], [1, 1], [1, 1], [1, 1])
    stats = _meta(64, dtype=torch.float32)
    calls = {
        "outer_norm": (_meta(32, 48), _meta(32, 24), True),
        "embedding_norm": (torch.zeros(4, 16, dtype=torch.long, device="meta"), _meta(4, 16, 24), -1),
        "conv_instantiate_norm": (_meta(4, 16, 14, 14), _meta(4, 32, 14, 14), *conv),
        "conv_ghost_norm": (_meta(4, 16, 14, 14), _meta(4, 32, 14, 14), *conv),
        "channel_norm_grads": (_meta(4, 64, 49), _meta(4, 64, 49), None, None, 1e-5, True),
        "channel_norm_grads(eval)": (_meta(4, 64, 49), _meta(4, 64, 49), stats, stats, 1e-5, True),
        "group_norm_grads": (_meta(4, 64, 49), _meta(4, 64, 49), 8, 1e-5, True),
        "group_norm_grads(no bias)": (_meta(4, 64, 49), _meta(4, 64, 49), 8, 1e-5, False),
        "affine_norm_grads": (_meta(4, 16, 64), _meta(4, 16, 64), False, 1e-5, True),
        "affine_norm_grads(rms)": (_meta(4, 16, 64), _meta(4, 16, 64), True, 1e-5, False),
    }
    for name, args in calls.items():
        op = name.split("(")[0]
        with op_counts.cuda_routes_on_meta():
            with op_counts.StepOps() as step:
                outputs = getattr(ops, op)(*args)
        kernels = {k: v for k, v in step.launches.items() if k.startswith("triton:")}
        assert list(kernels.values()) == [1], (name, dict(step.launches))
        cpu_args = [torch.zeros(a.shape, dtype=torch.float32 if a.is_floating_point() else a.dtype)
                    if isinstance(a, torch.Tensor) else a for a in args]
        expected = getattr(reference, op)(*cpu_args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert [tuple(o.shape) for o in outputs] == [tuple(e.shape) for e in expected], name
        assert len({o.untyped_storage()._cdata for o in outputs}) == len(outputs), f"{name}: outputs share a buffer"


def test_host_overhead_counts_the_tracked_modules_and_the_added_time():
    import host_overhead

    row = host_overhead.measure("mlp", steps=2, rounds=1)
    assert (row["tracked_modules"], row["params"]) == (4, 8)  # 4 Linear layers, weight and bias each
    assert row["added_us"] == pytest.approx(row["tracked_us"] - row["plain_us"])
    assert row["added_us_per_module"] == pytest.approx(row["added_us"] / 4)
    assert "| mlp | 4 / 8 |" in host_overhead.to_markdown([row])
    assert row["profile"] == ""  # (only with --profile)
    profiled = host_overhead.measure("mlp", steps=2, rounds=1, profile_top=40)["profile"]
    # The tracker's hooks are there, called once per tracked module per step (4 Linear layers).
    assert "| 4.0 | `linear_norms` layers/linear.py:" in profiled and len(profiled.splitlines()) == 42
    with pytest.raises(SystemExit):  # an unknown model is named, not skipped
        host_overhead.main(["--models", "mlp,nope"])


def test_profile_step_sees_the_tracked_ops():
    spec = workloads.WORKLOADS["mlp"]
    x, y = _batch(spec, "cpu", None)
    out = {}
    for name in ("plain", "divebatch"):
        method = build(BY_NAME[name], spec)
        out[name] = profile_step.profile_method(method, x, y, steps=1, device="cpu")
        method.close()
    assert out["plain"]["wall_ms"] > 0 and out["divebatch"]["wall_ms"] > 0
    assert "divebatch::outer_norm" in out["divebatch"]["ops"] and "divebatch::outer_norm" not in out["plain"]["ops"]
    added = {row["op"]: row for row in profile_step.added_ops(out["plain"], out["divebatch"])}
    norm = added["divebatch::outer_norm"]
    assert norm["calls"] == sum(isinstance(m, torch.nn.Linear) for m in spec.make_model().modules())  # T = 1 each
    assert norm["host_us"] > 0 and norm["us"] == norm["host_us"]  # (CPU: the host time is the op's time)
    assert added["aten::addmm"]["calls"] == 0  # the plain step's ops are there in both


def test_bench_kernels_cpu_smoke_run(tmp_path):
    """bench_kernels.py on tiny shapes under the interpreter: every kind of workload produces its
    rows, the kernels agree with the reference, and the CUDA route model's pick is recorded."""
    import json

    import bench_kernels

    out = tmp_path / "bench.json"
    names = ("seq-up-bf16,seq-large-down,conv-layer1-unfolded,conv-layer1-implicit,conv-stem-implicit,conv-layer4-implicit-ghost,"
             "conv-layer4-down-implicit-ghost,conv-layer1-implicit-cl,conv-layer3-implicit-ghost-cl,mlp-T1-bf16,"
             "seq-embedding,"
             "layernorm-seq-large,rmsnorm-llama,"
             "groupnorm-conv-large,groupnorm-conv-large-cl,batchnorm-conv-large-cl,batchnorm-layer4-eval")
    assert bench_kernels.main(["--cpu-smoke", "--rounds", "1", "--workloads", names, "--out", str(out)]) == 0
    results = {r["workload"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == set(names.split(","))
    for result in results.values():
        errors = [row["max_rel_err_vs_reference"] for row in result["rows"] if "max_rel_err_vs_reference" in row]
        assert errors and max(errors) < 1e-4, result
    # The instantiate kernel on the same rows as 2 samples: the same weight gradient, its own row.
    rows = {row["method"]: row for row in results["seq-up-bf16"]["rows"]}
    two = rows[bench_kernels.INSTANTIATE_TWO_SAMPLES]
    assert two["max_rel_err_vs_reference"] < 1e-4 and two["tflops"] * two["ms"] == pytest.approx(
        rows["triton instantiate_norm"]["tflops"] * rows["triton instantiate_norm"]["ms"])  # (same flops)
    # The Gram kernel on wide tiles beside the square one, exact and as many flops.
    rows = {row["method"]: row for row in results["seq-large-down"]["rows"]}
    wide = rows[bench_kernels.GHOST_WIDE]
    assert wide["max_rel_err_vs_reference"] < 1e-4 and wide["tflops"] * wide["ms"] == pytest.approx(
        rows["triton ghost_norm"]["tflops"] * rows["triton ghost_norm"]["ms"])
    assert "BLOCK_I" in wide["config"]
    # ... and without the bias: the same Grams, the weight's norms exact.
    no_bias = rows[bench_kernels.GHOST_NO_BIAS]
    assert no_bias["max_rel_err_vs_reference"] < 1e-4 and no_bias["tflops"] == pytest.approx(
        rows["triton ghost_norm"]["tflops"] * rows["triton ghost_norm"]["ms"] / no_bias["ms"])
    assert rows[bench_kernels.GHOST_BIAS_IN_WRAPPER]["max_rel_err_vs_reference"] < 1e-4  # (weight and bias)
    assert os.environ.get("DIVEBATCH_TRITON_GHOST_WIDE") is None  # (set for its calls only)
    route = results["seq-up-bf16"]["route"]
    assert route["model"] in ("ghost", "fused-instantiate") and route["faster"] in ("ghost", "fused-instantiate")
    # The convolution's fused route both ways: unfolded patches and the implicit kernel, beside cuDNN.
    # (and, from an NCHW map of 64 or 256 channels, the kernel on the channels-last copy the engine makes)
    copied = {"conv-layer1-implicit": True, "conv-stem-implicit": False, "conv-layer1-implicit-cl": False,
              "conv-layer4-implicit-ghost": True, "conv-layer4-down-implicit-ghost": True,
              "conv-layer3-implicit-ghost-cl": False}
    for name, copy in copied.items():
        rows = {row["method"] for row in results[name]["rows"]}
        ghost = name.endswith(("-ghost", "-ghost-cl"))
        implicit = bench_kernels.IMPLICIT_GHOST if ghost else bench_kernels.IMPLICIT
        unfolded = "unfold + triton ghost_norm" if ghost else "unfold + triton instantiate_norm"
        assert {"cudnn weight grad (floor)", unfolded, implicit} <= rows
        assert (implicit + bench_kernels.COPIED in rows) == copy, name
    for name in ("layernorm-seq-large", "groupnorm-conv-large-cl", "batchnorm-conv-large-cl", "batchnorm-layer4-eval"):
        assert any(row["method"] == "torch rule path" for row in results[name]["rows"]), name


def test_bench_kernels_appends_to_its_json(tmp_path):
    """``--append`` (the GPU check times the target shapes first and the rest later, into one file):
    the results of the workloads not rerun are kept, those rerun replaced, and the file's measured
    peak is kept rather than measured again."""
    import json

    import bench_kernels

    out = tmp_path / "bench.json"
    common = ["--cpu-smoke", "--rounds", "1", "--out", str(out)]
    assert bench_kernels.main([*common, "--workloads", "mlp-T1-bf16,seq-embedding"]) == 0
    data = json.loads(out.read_text())
    data["meta"]["bf16_gemm_tflops"] = 789.0  # (as a GPU run's first call leaves it)
    out.write_text(json.dumps(data))
    assert bench_kernels.main([*common, "--append", "--workloads", "seq-embedding,layernorm-seq-large"]) == 0
    again = json.loads(out.read_text())
    assert [r["workload"] for r in again["results"]] == ["mlp-T1-bf16", "seq-embedding", "layernorm-seq-large"]
    assert again["results"][0] == data["results"][0] and again["meta"]["bf16_gemm_tflops"] == 789.0
    assert bench_kernels.main([*common, "--workloads", "layernorm-seq-large"]) == 0  # (without: a new file)
    assert [r["workload"] for r in json.loads(out.read_text())["results"]] == ["layernorm-seq-large"]


#: (The C++ operators stand in for the CUDA kernels in some tests: skipped where the extension is not built.)
requires_cpp = pytest.mark.skipif(not ops.CPP_AVAILABLE, reason="the C++ extension is not built (DIVEBATCH_NO_JIT)")


def test_check_engine_keeps_its_rows_when_cut_short(tmp_path, monkeypatch):
    """check_engine.py writes its JSON after every case (on the H200 its time limit cut it after 68
    rows and the JSON, written at the end, was lost): a run interrupted mid-way leaves the rows done,
    marked incomplete, and the verdict says so and what to do."""
    import json

    import check_engine
    import verdicts

    every = check_engine.cases()
    kept = {name: every[name] for name in ("zoo/linear_2d", "zoo/conv2d")}

    def interrupted():
        raise KeyboardInterrupt  # (what `timeout --signal=INT` delivers)

    monkeypatch.setattr(check_engine, "cases", lambda: {**kept, "zoo/cut-here": interrupted})
    out = tmp_path / "check_engine.json"
    with pytest.raises(KeyboardInterrupt):
        check_engine.main(["--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [r["case"] for r in data["rows"]] == ["zoo/linear_2d"] * 2 + ["zoo/conv2d"] * 2
    assert all(r["ok"] for r in data["rows"]) and data["meta"]["complete"] is False
    (verdict,) = verdicts.engine_check(data)
    assert verdict.verdict == "clean so far" and "zoo/conv2d" in verdict.measured and "rerun" in verdict.action
    monkeypatch.setattr(check_engine, "cases", lambda: kept)
    assert check_engine.main(["--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["complete"] is True
    assert verdicts.engine_check(json.loads(out.read_text()))[0].verdict == "clean"


@requires_cpp
def test_check_engine_shards_join_into_the_unsharded_file(tmp_path, monkeypatch):
    """The GPU check runs the engine cases in three shards at once and joins their files: each case
    runs in exactly one shard, the joined rows are those of one unsharded run in its order, and a
    shard cut short or never written leaves the joined file incomplete, which the verdict names."""
    import json

    import check_engine
    import verdicts

    every = check_engine.cases()
    kept = {name: every[name] for name in ("zoo/linear_2d", "zoo/conv2d", "zoo/embedding", "zoo/norms")}
    monkeypatch.setattr(check_engine, "cases", lambda: kept)
    whole = tmp_path / "whole.json"
    assert check_engine.main(["--device", "cpu", "--out", str(whole)]) == 0
    parts = [tmp_path / f"part{k}.json" for k in (1, 2, 3)]
    for k, part in enumerate(parts, 1):
        assert check_engine.main(["--device", "cpu", "--shard", f"{k}/3", "--out", str(part)]) == 0
    ran = [[row["case"] for row in json.loads(part.read_text())["rows"]] for part in parts]
    assert ran[0] == ["zoo/linear_2d"] * 2 + ["zoo/norms"] * 2 and ran[1] == ["zoo/conv2d"] * 2
    joined = tmp_path / "joined.json"
    assert check_engine.main(["--merge", *map(str, parts[::-1]), "--out", str(joined)]) == 0
    expected, got = json.loads(whole.read_text()), json.loads(joined.read_text())
    # (the same rows but for their errors and seconds: each run draws its models anew)
    strip = lambda rows: [(row["case"], row["fused"], row["routes"], row["ok"]) for row in rows]  # noqa: E731
    assert strip(got["rows"]) == strip(expected["rows"]) and got["meta"]["complete"] is True
    assert verdicts.engine_check(got)[0].verdict == "clean"

    cut = json.loads(parts[0].read_text())
    cut["rows"], cut["meta"]["complete"] = cut["rows"][:2], False
    parts[0].write_text(json.dumps(cut))
    parts[2].unlink()
    assert check_engine.main(["--merge", *map(str, parts), "--out", str(joined)]) == 0
    got = json.loads(joined.read_text())
    assert got["meta"]["complete"] is False and got["meta"]["cut_after"] == ["zoo/linear_2d"]
    assert got["meta"]["missing"] == [str(parts[2])]
    (verdict,) = verdicts.engine_check(got)
    assert verdict.verdict == "clean so far" and "after zoo/linear_2d" in verdict.measured
    assert "part3.json" in verdict.measured
    check_engine.main(["--merge", str(tmp_path / "never-written.json"), "--out", str(joined)])
    (verdict,) = verdicts.engine_check(json.loads(joined.read_text()))
    assert verdict.verdict == "not run" and "1 shard file(s) missing" in verdict.measured
    with pytest.raises(SystemExit):
        check_engine.main(["--device", "cpu", "--shard", "4/3"])


#: An ncu ``--page raw --csv`` export as ncu writes it: quoted, a units row, thousands separators.
_NCU_CSV = """==PROF== Disconnected from process 1
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC",\
"gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed",\
"dram__throughput.avg.pct_of_peak_sustained_elapsed","launch__registers_per_thread",\
"sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",\
"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_selected_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_membar_per_issue_active.ratio"
"","","","","","","","","","","","nsecond","%","%","register/thread","%","inst","inst","inst","inst","inst"
"0","7","python3","h","_instantiate_norm_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0",\
"6,990,000.00","45.2","12.5","240","41.0","3.10","0.40","1.00","0.90","0.05"
"1","7","python3","h","nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNT","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0",\
"3,160,000.00","88.0","20.0","168","86.5","0.20","0.10","1.00","0.30","0.00"
""".replace("\\\n", "")


def test_ncu_summary_reads_the_raw_export(tmp_path, monkeypatch):
    """ncu_kernels.py reads ncu's raw CSV (its own lines before the header, the units row, numbers
    with thousands separators) into one summary per kernel: the duration in microseconds by its
    unit, the throughputs, the tensor pipe and the largest stall reasons, "selected" (the issuing
    warp) not counted as one; and runs the profile through an ``ncu`` command, here a stand-in."""
    import json

    import ncu_kernels

    kernels = ncu_kernels.summarize(_NCU_CSV)
    assert [k["kernel"] for k in kernels] == ["_instantiate_norm_kernel", "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNT"]
    fused, gemm = kernels
    assert fused["duration_us"] == pytest.approx(6990.0) and gemm["duration_us"] == pytest.approx(3160.0)
    assert fused["sm_pct"] == 45.2 and fused["registers"] == 240 and fused["tensor_pipe_pct"] == {"tensor_op_gmma": 41.0}
    assert fused["top_stalls"] == [("barrier", 3.1), ("wait", 0.9), ("long_scoreboard", 0.4)]
    assert "memory_pct" not in fused  # (absent from the export: left out, not guessed)
    table = ncu_kernels.as_markdown(kernels)
    assert "| _instantiate_norm_kernel | 6990.0 | 45 | - | 12 |" in table and "barrier 3.1" in table
    with pytest.raises(ValueError, match="Kernel Name"):
        ncu_kernels.summarize("no export here")

    fake = tmp_path / "ncu"
    fake.write_text("#!/bin/bash\n"
                    "if [ \"$1\" = --import ]; then cat " + str(tmp_path / "export.csv") + "; exit 0; fi\n"
                    "prev=; for a in \"$@\"; do [ \"$prev\" = --export ] && touch \"$a.ncu-rep\"; prev=$a; done\n"
                    "echo \"$*\" > " + str(tmp_path / "ncu_args") + "\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "export.csv").write_text(_NCU_CSV)
    out = tmp_path / "results"
    assert ncu_kernels.main(["--out-dir", str(out), "--ncu", str(fake)]) == 0
    args = (tmp_path / "ncu_args").read_text()
    assert "--profile-from-start off" in args and "--clock-control none" in args and "--target" in args
    assert json.loads((out / "ncu_kernels.json").read_text())["kernels"][0]["registers"] == 240
    assert (out / "ncu_kernels.csv").read_text() == _NCU_CSV
    assert ncu_kernels.main(["--out-dir", str(out), "--ncu", str(tmp_path / "no-such-ncu")]) == 2

    # The profiled program's calls, on tiny shapes under the interpreter: each kernel as the reference.
    from divebatch import reference

    import bench_kernels

    monkeypatch.setitem(bench_kernels.WORKLOADS, "seq-large-up",
                        ("ghost+instantiate", 2, 9, 12, 10, torch.bfloat16, None))
    gemm, ghost, ghost_no_bias, fused = ncu_kernels.run_target("seq-large-up", device="cpu")
    gen = torch.Generator().manual_seed(0)  # (the inputs run_target draws)
    a = torch.randn(2, 9, 12, generator=gen).to(torch.bfloat16)
    g = (0.1 * torch.randn(2, 9, 10, generator=gen)).to(torch.bfloat16)
    weight_sq, bias_sq = reference.ghost_norm(a, g, True)
    assert torch.allclose(ghost[0], weight_sq, rtol=1e-4) and torch.allclose(ghost[1], bias_sq, rtol=1e-4)
    assert torch.allclose(ghost_no_bias[0], weight_sq, rtol=1e-4) and torch.allclose(fused[0], weight_sq, rtol=1e-4)
    assert torch.allclose(fused[2], gemm.float(), rtol=2e-2, atol=1e-3)  # (the bf16 GEMM against float32 sums)
    with pytest.raises(SystemExit, match="ghost\\+instantiate"):
        ncu_kernels.run_target("mlp-T1-bf16", device="cpu")

    # The verdicts name each target kernel's reading beside the GEMM's (the longest launch not ours).
    import verdicts

    ghost_rows = _NCU_CSV.splitlines()[-2:]
    with_ghosts = "\n".join([*_NCU_CSV.splitlines(), *(row.replace("_instantiate_norm_kernel", "_ghost_norm_kernel")
                                                        .replace('"0","7"', f'"{k}","7"', 1)
                                                        for k, row in zip((2, 3), ghost_rows[:1] * 2))])
    found = {v.topic: v for v in verdicts.hardware_counters({"workload": "seq-large-up",
                                                              "kernels": ncu_kernels.summarize(with_ghosts)})}
    instantiate = found["instantiate under ncu, seq-large-up"]
    assert instantiate.verdict == "profiled" and "tensor pipes 41%" in instantiate.measured
    assert "stalls barrier 3.1" in instantiate.measured and "the GEMM: tensor pipes 86%" in instantiate.measured
    assert {"ghost under ncu, seq-large-up", "ghost (no bias) under ncu, seq-large-up"} <= set(found)
    (partial,) = verdicts.hardware_counters({"kernels": kernels})  # (no ghost profiled)
    assert partial.verdict == "incomplete"
    assert verdicts.hardware_counters(None)[0].verdict == "not run"


def test_check_engine_compares_a_decomposition_with_the_reference_operators(monkeypatch):
    """BatchNorm in training mode has no torch.func oracle: check_engine.py compares the engine on
    the compiled norm kernels with the engine on the PyTorch reference operators; here (CPU) the
    C++ kernel against the chunked path. A deliberately wrong kernel is caught before that, by the
    tracker's own check that the per-sample parts add up to autograd's gradient."""
    import check_engine

    from divebatch.layers import norm
    from tests.models_zoo import DECOMPOSED

    monkeypatch.delenv("DIVEBATCH_BACKEND", raising=False)
    make = check_engine.cases()["decomposed/batchnorm_train"]
    row = check_engine.check(make, torch.device("cpu"), True, decomposed=True)
    assert row["per_sample_err"] <= 1e-5 and row["batch_err"] <= 1e-6
    assert "DIVEBATCH_BACKEND" not in os.environ  # put back as it was
    assert set(DECOMPOSED) == {"batchnorm_train"}
    real = norm.ops.channel_norm_grads
    monkeypatch.setattr(norm.ops, "channel_norm_grads", lambda *args: tuple(1.1 * t for t in real(*args)))
    with pytest.raises(RuntimeError, match="do not account for"):
        check_engine.check(make, torch.device("cpu"), True, decomposed=True)


@requires_cpp
def test_check_engine_runs_the_implicit_convolution_cases_with_their_variable(monkeypatch):
    """The engine check's ``implicit-conv/*`` cases come first and run with
    ``DIVEBATCH_TRITON_IMPLICIT_CONV=1`` set (and put back): on the CUDA routes (here the route
    model made to believe it, the C++ operators doing the work) their fused convolutions take
    ``conv_instantiate_norm`` and stay exact."""
    import check_engine

    from divebatch.layers import routes

    names = list(check_engine.cases())
    implicit = [n for n in names if n.startswith("implicit-conv/")]
    assert implicit and names[:len(implicit)] == implicit
    monkeypatch.setenv("DIVEBATCH_BACKEND", "cpp")
    monkeypatch.delenv("DIVEBATCH_TRITON_IMPLICIT_CONV", raising=False)
    monkeypatch.setattr(routes, "triton_kernels", lambda device_type: True)
    with check_engine._env(check_engine.CASE_ENV["implicit-conv/"]):
        row = check_engine.check(check_engine.cases()["implicit-conv/convolutions"], torch.device("cpu"), True)
        unfused = check_engine.check(check_engine.cases()["implicit-conv/deepening"], torch.device("cpu"), False)
    assert "DIVEBATCH_TRITON_IMPLICIT_CONV" not in os.environ
    assert "fused-implicit-instantiate" in row["routes"]
    assert {"implicit-ghost", "implicit-instantiate"} <= set(unfused["routes"])
    for checked in (row, unfused):
        assert checked["per_sample_err"] <= 1e-5 and checked["batch_err"] <= 1e-5


def test_check_engine_runs_the_wide_ghost_case_on_the_wide_kernel(monkeypatch):
    """The engine check's ``ghost-wide/*`` case runs with ``DIVEBATCH_TRITON_GHOST_WIDE=1`` set (and
    put back): unfused, its Linear layers take the Gram route through the wide kernel (here under
    the interpreter) and match torch.func."""
    import check_engine

    from divebatch import ops

    launches, launch = [], ops._kernels.ghost_norm._launch_wide
    monkeypatch.setattr(ops._kernels.ghost_norm, "_launch_wide",
                        lambda *args, **kwargs: (launches.append(args[4:8]), launch(*args, **kwargs))[1])
    monkeypatch.setenv("DIVEBATCH_BACKEND", "triton")
    monkeypatch.delenv("DIVEBATCH_TRITON_GHOST_WIDE", raising=False)
    with check_engine._env(check_engine.CASE_ENV["ghost-wide/"]):
        row = check_engine.check(check_engine.cases()["ghost-wide/sequence-mlp"], torch.device("cpu"), False)
    assert "DIVEBATCH_TRITON_GHOST_WIDE" not in os.environ
    assert row["routes"] == ["ghost"] and len(launches) == 2
    assert row["per_sample_err"] <= 1e-5 and row["batch_err"] <= 1e-5


def test_check_engine_runs_the_sequence_first_cases_sequences_first(tmp_path, monkeypatch):
    """The engine check's ``sequence-first/*`` cases ([T, B] inputs with T != B) are tracked with
    ``batch_first=False`` and checked over dim 1: all exact here (on the default layout they would
    be refused, and the run would fail)."""
    import json

    import check_engine

    every = check_engine.cases()
    kept = {name: make for name, make in every.items() if name.startswith(check_engine.SEQUENCE_FIRST)}
    assert len(kept) == 4
    monkeypatch.setattr(check_engine, "cases", lambda: kept)
    out = tmp_path / "check_engine.json"
    assert check_engine.main(["--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all(row["ok"] for row in rows)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward in time", "backward in time"])
@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_diagnose_scan_case_reports_each_step(mode, reverse):
    """Under the interpreter the scans are right at every step: the diagnosis' per-step errors are
    those of float32 rounding (on the H200 the ascending ones were not)."""
    from divebatch._build import import_kernels

    per_step, h_err = diagnose_scan.case(import_kernels(), mode, reverse, 2, 4, 16, False, "cpu")
    assert per_step.shape == (4,)
    assert float(per_step.max()) < 1e-5 and h_err < 1e-5


def _run_gpu_checks(tmp_path, budget_s: int, **env_vars):
    """run_gpu_checks.sh with a stand-in interpreter that records its arguments and returns at once
    (check_engine.py "fails"), ``env_vars`` set: (the finished process, the recorded calls, the $OUT folder)."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "fakepy"
    # (it writes each --out file, as the real scripts do: what comes back must fit the tool's 8 files)
    fake.write_text(f"#!/bin/bash\necho \"$* [unverified=$DIVEBATCH_TRITON_UNVERIFIED_CONFIGS]\" >> {log}\n"
                    "prev=; for a in \"$@\"; do [ \"$prev\" = --out ] && echo '{}' > \"$a\"; prev=$a; done\n"
                    "case \"$*\" in *check_engine*) exit 1;; esac\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    for name in out.iterdir():  # ($OUT is emptied before each command)
        name.unlink()
    log.write_text("")
    env = {name: value for name, value in os.environ.items() if name != "STEPS"}
    env.update(PYTHON=str(fake), OUT=str(out), BUDGET_S=str(budget_s), **env_vars)
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu/run_gpu_checks.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, log.read_text(), out


def test_run_gpu_checks_control_flow(tmp_path):
    """The script with a stand-in interpreter: every step is started, the issue's three targets
    measured first, a failing job fails the script, and under $OUT the results are packed for the
    device tool."""
    proc, calls, out = _run_gpu_checks(tmp_path, 290)
    assert proc.returncode == 1, proc.stdout[-2000:]  # the engine jobs "failed"
    for script in ("tests/test_triton_kernels.py", "diagnose_scan.py", "check_engine.py", "bench_kernels.py",
                   "--workload seq-large", "--workload transformer", "host_overhead.py --device cuda", "run_table.py",
                   "verdicts.py"):
        assert script in calls, script
    assert calls.count("-m pytest tests/test_triton_kernels.py") == 12  # the shards
    # The engine check in three shards at once, joined into one file before anything is timed.
    lines = calls.splitlines()
    shards = [i for i, line in enumerate(lines) if "check_engine.py --device cuda --shard" in line]
    (joined,) = [i for i, line in enumerate(lines) if "check_engine.py --merge" in line]
    assert sorted(lines[i].split("--shard ")[1].split()[0] for i in shards) == ["1/3", "2/3", "3/3"]  # (at once)
    assert max(shards) < joined < next(i for i, line in enumerate(lines) if "bench_kernels.py" in line)
    assert all(f"check_engine_{k}.json" in lines[joined] for k in (1, 2, 3))
    # The measurements in the order of what they answer: the kernel targets at seq-large's shapes,
    # the seq-large step, its profile; then the other kernels and workloads, appended to the same files.
    order = [next(i for i, line in enumerate(lines) if all(word in line for word in words)) for words in (
        ("bench_kernels.py", "seq-large-up"), ("run_table.py", "--workloads seq-large "),
        ("profile_step.py", "seq-large"), ("ncu_kernels.py", "seq-large-up"), ("bench_kernels.py", "--append"),
        ("run_table.py", "--append", "conv-large"), ("profile_step.py", "transformer"), ("verdicts.py",))]
    assert order == sorted(order), order
    assert "--append" not in lines[order[0]] and "--append" not in lines[order[1]]
    # Every step runs with the configs added since the last GPU run in play (tested, timed).
    assert all(line.endswith("[unverified=1]") for line in lines)
    assert "engine2: rc=1" in proc.stdout and "skipped" not in proc.stdout and "unfinished" not in proc.stdout
    with tarfile.open(out / "gpu_results.tgz") as tar:
        names = tar.getnames()
    assert all(any(n.endswith(f"gpu_engine{k}.log") for n in names) for k in (1, 2, 3))
    assert any(n.endswith("profile_transformer.json") for n in names)
    returned = sorted(f.name for f in out.iterdir())
    # What the device tool returns (8 files), with one left for the caller's console log.
    assert returned == ["bench_kernels.json", "check_engine.json", "gpu_results.tgz", "gpu_table.json", "verdicts.md"]


def test_run_gpu_checks_keeps_the_step_target_when_the_budget_is_short(tmp_path):
    """With too little budget for the kernel timings and the seq-large table both, the timings are
    skipped (and the summary says so), not the table: each step leaves the steps after it their time.
    The summary names the steps skipped, and a second pass with the STEPS it prints runs those alone,
    adding to the first pass's results."""
    proc, calls, out = _run_gpu_checks(tmp_path, 75)
    assert "bench: skipped" in proc.stdout, proc.stdout[-2000:]
    assert "bench_kernels.py" in calls  # (the other kernels', later, with what is left)
    assert "workloads seq-large-up" not in calls
    assert "--workloads seq-large " in calls
    assert "profile_step.py --device cuda --dtype bfloat16 --workload seq-large" in calls
    again = proc.stdout.split("to finish them: STEPS=")[1].split()[0]
    assert again.split(",")[0] == "bench" and "run_table" not in again.split(","), again
    assert set(again.split(",")) <= {"bench", "ncu", "bench_more", "run_table_more", "profile_transformer", "host",
                                     "compile"}
    results = Path("/tmp/divebatch-gpu-results")
    (results / "kept-from-the-first-pass").write_text("")
    # (on a fresh machine: the first pass's results, unpacked here, travel with the tree)
    first_pass = tmp_path / "first-pass"
    first_pass.mkdir()
    (first_pass / "carried-from-the-first-pass.json").write_text("{}")
    proc, calls, out = _run_gpu_checks(tmp_path, 290, STEPS=again, RESUME_FROM=str(first_pass))
    assert "unfinished" not in proc.stdout, proc.stdout[-2000:]
    with tarfile.open(out / "gpu_results.tgz") as tar:
        packed = {Path(name).name for name in tar.getnames()}
    assert {"kept-from-the-first-pass", "carried-from-the-first-pass.json"} <= packed
    ran = [line.split(" [unverified")[0] for line in calls.splitlines()]
    assert not any("pytest" in line or "check_engine" in line or "--workloads seq-large " in line for line in ran)
    assert any("workloads seq-large-up" in line for line in ran) and ran[-1].startswith("bench/gpu/verdicts.py")
    assert sum("bench_kernels.py" in line for line in ran) == again.split(",").count("bench") + again.count("bench_more")


def test_run_gpu_checks_calls_each_script_with_arguments_it_takes(tmp_path, monkeypatch):
    """Every Python call of run_gpu_checks.sh, as the stand-in interpreter recorded it, parsed by the
    script's own argument parser (an unknown or misspelt option fails there), and each workload,
    method and model it names known to the script: a call the GPU would refuse after minutes of
    setup fails here instead."""
    import argparse
    import importlib
    import shlex

    import bench_kernels
    import host_overhead
    import run_table

    _, calls, _ = _run_gpu_checks(tmp_path, 290)

    class Parsed(Exception):
        pass

    real_parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(real_parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    checked = collections.Counter()
    for line in calls.splitlines():
        argv = shlex.split(line.rsplit(" [unverified=", 1)[0])
        if argv[0] in ("-m", "-c"):  # (the pytest shards, whose -k expressions are checked above; the device probe)
            continue
        script = ROOT / argv[0]
        assert script.parent in (ROOT / "bench", ROOT / "bench" / "gpu"), argv[0]  # (both on sys.path)
        module = importlib.import_module(script.stem)
        monkeypatch.setattr(sys, "argv", [str(script), *argv[1:]])
        with pytest.raises(Parsed) as parsed:
            module.main(*([argv[1:]] if "argv" in module.main.__code__.co_varnames else []))
        args = vars(parsed.value.args[0])
        names = lambda key: [n for n in args[key].split(",") if n]  # noqa: E731
        if script.name == "run_table.py":
            assert set(names("methods")) <= set(run_table.BY_NAME) and set(names("workloads")) <= set(run_table.WORKLOADS)
        elif script.name == "bench_kernels.py":
            assert set(names("workloads")) <= set(bench_kernels.WORKLOADS)
        elif script.name == "profile_step.py":
            assert args["workload"] in run_table.WORKLOADS and args["method"] in run_table.BY_NAME
        elif script.name == "ncu_kernels.py":
            assert args["workload"] in bench_kernels.WORKLOADS and args["summarize"] is None
        elif script.name == "host_overhead.py":
            assert set(names("models")) <= set(host_overhead.MODELS)
        checked[script.name] += 1
    assert checked == {"run_table.py": 3, "bench_kernels.py": 2, "profile_step.py": 2, "host_overhead.py": 1, "ncu_kernels.py": 1,
                       "check_engine.py": 4, "diagnose_scan.py": 1, "verdicts.py": 1}


def test_run_gpu_checks_times_every_kernel_workload():
    """The two kernel-timing steps of run_gpu_checks.sh name every workload of bench_kernels.py once
    (a workload added there and not here would never be timed), but the float32 twins of 16-bit
    ones, which say nothing the 16-bit rows do not (float32 dots run as tf32x3)."""
    import re

    import bench_kernels

    script = (ROOT / "bench/gpu/run_gpu_checks.sh").read_text()
    named = [w for group in re.findall(r"--workloads ([\w,-]+)", script.split("TABLE=")[1].split("timed run_table_more")[0])
             for w in group.split(",") if w in bench_kernels.WORKLOADS]
    assert len(named) == len(set(named))
    assert set(bench_kernels.WORKLOADS) - set(named) == {"seq-large-fp32", "seq-up", "mlp-T1"}


def test_gpu_shards_run_every_kernel_test_once():
    """The GPU check's pytest shards (``-k`` expressions in run_gpu_checks.sh) partition the kernel
    tests: each test runs natively in exactly one shard (a new test no expression selects would
    never meet a GPU; one in two shards costs its compilations twice)."""
    import re
    import shlex

    from _pytest.mark.expression import Expression

    script = (ROOT / "bench/gpu/run_gpu_checks.sh").read_text()
    shards = shlex.split(re.search(r"^shards=\((.*?)\)$", script, re.S | re.M).group(1))
    assert len(shards) == 12
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/test_triton_kernels.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    names = [line.split("::", 1)[1] for line in listed.stdout.splitlines() if "::" in line]
    assert len(names) > 500, listed.stdout[-2000:]
    expressions = [Expression.compile(k) for k in shards]
    for name in names:
        # (-k matches a substring of the test's name, case-insensitively; the module's name holds no shard's word)
        hits = [k for k, e in zip(shards, expressions) if e.evaluate(lambda word: word.lower() in name.lower())]
        assert len(hits) == 1, (name, hits)


def test_fused_everywhere_method_fuses_the_seq_large_layers_on_cuda(monkeypatch):
    """``divebatch-fused-everywhere`` (the GPU table's end-to-end figure for the fused instantiate
    route at seq-large): during its step the CUDA route model fuses the 4096 x 16384 blocks and the
    32000-wide head, which it leaves to the Gram route otherwise, and the model's constants are
    put back after."""
    import methods

    from divebatch.layers import linear, routes

    monkeypatch.setattr(routes, "triton_kernels", lambda device_type: True)
    shapes = [(8, 2048, 4096, 16384), (8, 2048, 16384, 4096), (8, 2048, 4096, 32000)]
    assert {linear.fused_linear_route_name(*shape, "cuda") for shape in shapes} == {"ghost"}
    during = {}
    monkeypatch.setattr(methods.DiveBatch, "step", lambda self, x, y: during.update(
        {shape: linear.fused_linear_route_name(*shape, "cuda") for shape in shapes}))
    methods.DiveBatchFusedEverywhere.step(object.__new__(methods.DiveBatchFusedEverywhere), None, None)
    assert set(during.values()) == {"fused-instantiate"} and len(during) == 3
    assert {linear.fused_linear_route_name(*shape, "cuda") for shape in shapes} == {"ghost"}
    assert methods.DiveBatchFusedEverywhere in methods.METHODS


def test_run_table_appends_and_goes_on_past_a_failing_workload(tmp_path, monkeypatch):
    """bench/run_table.py as the GPU check runs it twice into one JSON: ``--append`` keeps the rows of
    the workloads it does not rerun and replaces those it does; a workload that fails as a whole is
    a row saying why (exit 1) and the next one runs; where torch.func fails the timings stand, their
    error column saying there was no reference (on the H200 a torch.func failure on conv-large
    ended the table before the transformer workload)."""
    import dataclasses
    import json

    import methods
    import run_table

    tiny = dataclasses.replace(workloads.WORKLOADS["mlp"], name="tiny", make_model=lambda: torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10)))

    def no_batch(device):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setitem(run_table.WORKLOADS, "tiny", tiny)
    monkeypatch.setitem(run_table.WORKLOADS, "broken", dataclasses.replace(tiny, name="broken", make_batch=no_batch))
    monkeypatch.setitem(run_table.WORKLOADS, "tiny-unreferenced", dataclasses.replace(tiny, name="tiny-unreferenced"))
    real_step = methods.TorchFunc.step

    def step(self, x, y):
        if self.workload.name == "tiny-unreferenced":
            raise RuntimeError("no batching rule (stand-in)")
        return real_step(self, x, y)

    monkeypatch.setattr(methods.TorchFunc, "step", step)
    out = tmp_path / "table.json"
    common = ["--methods", "divebatch", "--reps", "2", "--no-memory", "--out", str(out)]
    assert run_table.main(["--workloads", "tiny,broken,tiny-unreferenced", *common]) == 1
    first = json.loads(out.read_text())["rows"]
    by = {(r["workload"], r["method"]): r for r in first}
    assert "CUDA out of memory" in by["broken", "plain"]["skipped"]
    assert by["tiny", "divebatch"]["max_rel_err"] < 1e-5
    unreferenced = by["tiny-unreferenced", "divebatch"]
    assert "no batching rule" in unreferenced["no_reference"] and unreferenced["median_ms"] > 0
    assert "max_rel_err" not in unreferenced and "n/a (no torch.func)" in out.with_suffix(".md").read_text()

    assert run_table.main(["--workloads", "broken", "--append", *common]) == 1
    assert run_table.main(["--workloads", "tiny", "--append", *common]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["workload"], r["method"]) for r in rows) == sorted(by)  # (replaced, not repeated)
    assert [r["median_ms"] for r in rows if r["workload"] == "tiny-unreferenced"] == [
        r["median_ms"] for r in first if r["workload"] == "tiny-unreferenced"]  # (kept as it was)


def test_memory_probes_run_with_a_fixed_mmap_threshold():
    """The CPU memory column: each probe is a fresh process under ``PROBE_ENV`` (glibc's mmap threshold
    fixed, so its peak RSS is the peak of memory in use, not of the heap's fragmentation), and two
    probes of one method agree (by default the same step's peak varied by ~15 MB)."""
    import run_table

    assert run_table.PROBE_ENV == {"MALLOC_MMAP_THRESHOLD_": "131072"}
    first = run_table.measure_memory("mlp", "plain", "cpu", repeats=1)
    second = run_table.measure_memory("mlp", "plain", "cpu", repeats=1)
    peak = lambda probe: probe["peak_kb"] - probe["before_kb"]  # noqa: E731
    assert peak(first) > 8 * 1024  # (the mlp's step: its 7 MB of gradients and the activations)
    assert abs(peak(first) - peak(second)) <= 2 * 1024


def test_verdicts_read_the_first_gpu_run():
    """verdicts.py on the H200 run's committed results: the figures docs/kernels.md took from them
    (fused instantiate 2.21x the GEMM, ghost 38% and 50% of the measured peak, seq-large 1.44x),
    the failing scans, and the questions that run could not answer (no sweeps, no engine JSON)."""
    import verdicts

    found = {v.topic: v for v in verdicts.verdicts(ROOT / "bench/results/gpu/2026-12-04-h200")}
    up = found[f"fused instantiate / GEMM, seq-large-up (target <= {verdicts.FUSED_OVER_GEMM}x)"]
    assert up.verdict == "missed" and "= 2.21x" in up.measured
    ghost = "ghost kernel share of the bf16 peak, seq-large-{} (target >= 50%)"
    assert found[ghost.format("up")].verdict == "missed" and "= 38%" in found[ghost.format("up")].measured
    assert found[ghost.format("down")].verdict == "met"
    assert found["recurrent scans"].verdict == "failing" and "28 failed" in found["recurrent scans"].measured
    assert found["config sweeps (ghost, instantiate)"].verdict == "not run"
    assert found["engine against torch.func on CUDA (check_engine.json)"].verdict == "not run"
    errors = found["kernel errors at large shapes (<= 1e-05)"]
    assert errors.verdict == "off" and "conv-layer1 triton ghost_norm 8.4e-02" in errors.measured
    step = found["seq-large step with norms (target <= 1.05x)"]
    assert step.verdict == "missed" and "divebatch 1.44x" in step.measured


def _results_folder(folder: Path, implicit_ms: dict, error: float, sweep_failed: bool, wide_ratio: float = 0.8,
                    narrow_wide_ratio: float = 1.3, no_bias_ms: float = 1.9, wrapper_bias_ms: float = 2.1) -> Path:
    """A results folder with one sweep and one scan test, a seq-large kernel workload (errors
    ``error``; the wide-tile Gram kernel ``wide_ratio`` times the square one's time; conv-layer1's
    640 columns ``narrow_wide_ratio``) and convolution rows: the unfolded route at 1 ms beside
    ``implicit_ms`` {method: ms}; the Gram kernel without its bias at ``no_bias_ms`` against 2 ms, and
    with the bias from torch at ``wrapper_bias_ms``."""
    import json

    import bench_kernels

    folder.mkdir()
    failure = "<failure message='off'/>" if sweep_failed else ""
    (folder / "gpu_triton_kernels_1.xml").write_text(
        "<testsuites><testsuite>"
        f"<testcase classname='t' name='test_ghost_every_gpu_config_at_large_t[a]'>{failure}</testcase>"
        "<testcase classname='t' name='test_recurrent_scan_forward_and_backward[b]'/>"
        "</testsuite></testsuites>")
    seq = {"workload": "seq-large-up", "op": "ghost+instantiate", "d": 4096, "p": 16384, "rows": [
        {"method": "gemm g^T a (floor)", "ms": 3.0, "tflops": 700.0},
        {"method": "triton ghost_norm", "ms": 2.0, "tflops": 420.0, "max_rel_err_vs_reference": error},
        {"method": bench_kernels.GHOST_WIDE, "ms": 2.0 * wide_ratio, "tflops": 420.0 / wide_ratio,
         "max_rel_err_vs_reference": error},
        {"method": bench_kernels.GHOST_NO_BIAS, "ms": no_bias_ms, "tflops": 840.0 / no_bias_ms},
        {"method": bench_kernels.GHOST_BIAS_IN_WRAPPER, "ms": wrapper_bias_ms, "max_rel_err_vs_reference": 1e-6},
        {"method": "triton instantiate_norm", "ms": 3.3, "max_rel_err_vs_reference": 1e-6}],
        "extra_errors": {"triton instantiate_norm (weight grad)": 2e-6},
        "route": {"model": "fused-instantiate", "faster": "fused-instantiate"}}
    layer4 = [{"workload": name, "op": "ghost+instantiate", "T": 49, "rows": [
        {"method": "triton ghost_norm", "ms": ms}, {"method": "triton instantiate_norm", "ms": 0.1}]}
        for name, ms in (("conv-layer4", 0.2), ("conv-layer4-unfolded", 0.5))]
    layer1 = {"workload": "conv-layer1", "op": "ghost+instantiate", "T": 3136, "d": 576, "p": 64, "rows": [
        {"method": "triton ghost_norm", "ms": 1.0, "max_rel_err_vs_reference": 1e-6},
        {"method": bench_kernels.GHOST_WIDE, "ms": narrow_wide_ratio, "max_rel_err_vs_reference": 1e-6}]}
    convs = [layer1] + layer4 + [{"workload": name, "op": "conv", "rows": [
        {"method": "unfold + triton instantiate_norm", "ms": 1.0},
        *({"method": method, "ms": ms} for method, ms in rows.items())]} for name, rows in implicit_ms.items()]
    meta = {"device": "NVIDIA H100 80GB HBM3", "bf16_gemm_tflops": 800.0}
    (folder / "bench_kernels.json").write_text(json.dumps({"meta": meta, "results": [seq, *convs]}))
    assert bench_kernels.IMPLICIT == "triton conv_instantiate_norm (implicit)"  # (the names read below)
    return folder


@pytest.mark.parametrize("copy_ms,cl_ms,default", [(0.6, 0.5, "on"), (1.2, 0.5, "channels-last only"),
                                                   (1.2, 1.1, "off")])
def test_verdicts_say_what_each_measurement_calls_for(tmp_path, copy_ms, cl_ms, default):
    """verdicts.py on a made-up run: the implicit convolution's default follows which rows beat the
    unfolded route (from the channels-last copy: on; channels-last maps only: on for those, copy
    dropped; neither: off); the targets against their thresholds and the measured peak; the sweep
    and scan tests clear their lists when they pass and name the failing test when not; an error
    past float32 rounding is named."""
    import bench_kernels
    import verdicts

    implicit = {"conv-layer1-implicit": {bench_kernels.IMPLICIT + bench_kernels.COPIED: copy_ms,
                                         bench_kernels.IMPLICIT: 3.0},
                "conv-layer1-implicit-cl": {bench_kernels.IMPLICIT: cl_ms}}
    clean = {v.topic: v for v in verdicts.verdicts(_results_folder(tmp_path / "a", implicit, 1e-6, False))}
    assert clean["implicit convolutions: the default"].verdict == default
    assert clean["implicit convolution, conv-layer1-implicit"].verdict == ("faster" if copy_ms < 1 else "slower")
    assert clean["fused instantiate / GEMM, seq-large-up (target <= 1.15x)"].verdict == "met"  # (3.3 / 3.0)
    assert clean["ghost kernel share of the bf16 peak, seq-large-up (target >= 50%)"].verdict == "met"  # (420/800)
    assert clean["kernel errors at large shapes (<= 1e-05)"].verdict == "clean"
    assert clean["CUDA route model (fused instantiate or ghost)"].verdict == "right"
    rows = clean["unfolded patches as views over rows, conv-layer4 (T = 49)"]
    assert rows.verdict == "rows pay" and "ghost_norm 2.50x" in rows.measured
    sweeps, scans = clean["config sweeps (ghost, instantiate)"], clean["recurrent scans"]
    assert sweeps.verdict == "clean" and "_UNVERIFIED" in sweeps.action
    assert scans.verdict == "clean" and "UNVERIFIED_ON_GPU" in scans.action
    off = {v.topic: v for v in verdicts.verdicts(_results_folder(tmp_path / "b", implicit, 3e-5, True))}
    assert off["kernel errors at large shapes (<= 1e-05)"].verdict == "off"
    assert "seq-large-up triton ghost_norm 3.0e-05" in off["kernel errors at large shapes (<= 1e-05)"].measured
    sweeps = off["config sweeps (ghost, instantiate)"]
    assert sweeps.verdict == "failing" and "test_ghost_every_gpu_config_at_large_t[a]" in sweeps.action
    # The Gram kernel on wide tiles: by default where faster and exact, opt-in where slower, off where off.
    wide = "ghost on wide tiles, seq-large-up"
    assert clean[wide].verdict == "faster" and "wide_ghost_wanted" in clean[wide].action
    assert "66% of the peak" in clean[wide].measured  # (420 / 0.8 of 800)
    assert off[wide].verdict == "off the reference"
    slower = {v.topic: v for v in verdicts.verdicts(_results_folder(tmp_path / "c", implicit, 1e-6, False, 1.1))}
    assert slower[wide].verdict == "slower" and slower[wide].action == "leave it opt-in"
    # ... and its default over every width timed: a d + p floor where one separates the two.
    default = "ghost on wide tiles: the default"
    assert clean[default].verdict == "faster from d + p = 20480" and "d + p >= 20480" in clean[default].action
    assert "conv-layer1 (d + p = 640) 1.30x" in clean[default].measured
    assert off[default].verdict == "off the reference" and "seq-large-up" in off[default].action
    assert slower[default].verdict == "slower everywhere"
    everywhere = {v.topic: v for v in verdicts.verdicts(_results_folder(tmp_path / "d", implicit, 1e-6, False, 0.9, 0.9))}
    # The bias's share of the Gram kernel's time: 5% is small, 30% a limit to rework.
    bias = "ghost kernel's bias cost, seq-large-up"
    assert clean[bias].verdict == "small" and "5% of the time" in clean[bias].measured
    assert "55% of the peak without it" in clean[bias].measured  # (840 / 1.9 of 800)
    costly = {v.topic: v for v in verdicts.verdicts(_results_folder(tmp_path / "e", implicit, 1e-6, False,
                                                                        no_bias_ms=1.4))}
    assert costly[bias].verdict == "a limit" and "_add_column_sums" in costly[bias].action
    torch_pass = {v.topic: v for v in verdicts.verdicts(_results_folder(tmp_path / "f", implicit, 1e-6, False,
                                                                            no_bias_ms=1.4, wrapper_bias_ms=1.6))}
    assert torch_pass[bias].verdict == "a limit; torch's pass is faster" and "g.sum(1)" in torch_pass[bias].action
    assert "with the bias in torch 1.60 ms" in torch_pass[bias].measured
    assert everywhere[default].verdict == "faster everywhere"
