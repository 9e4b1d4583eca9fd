#!/usr/bin/env bash
# One prepared check for a GPU machine (written for one H100 / H200; total <= BUDGET_S, 290 s by default):
#   1. at once (correctness, nothing timed): the Triton kernel tests natively on CUDA (12 pytest shards
#      of tests/test_triton_kernels.py with DIVEBATCH_TRITON_TEST_DEVICE=cuda; first config of each
#      list, except the sweeps of every config at large shapes); 1a. bench/gpu/diagnose_scan.py, the
#      recurrent scans' error per time step (off on CUDA until clean); 1b. bench/gpu/check_engine.py,
#      every layer rule through the tracker vs torch.func on CUDA (fp32; three shards, then joined);
#   then the measurements, the issue's three targets first (thirty-first session: before, a slow
#   correctness phase and kernel bench could leave the end-to-end table no time at all), each step
#   limited to what the budget leaves after the time kept for the steps after it:
#   2. kernel timings at the target shapes (bench/gpu/bench_kernels.py: seq-large's two Linear
#      shapes and conv-layer1/4; triton.testing.do_bench, autotuned) vs the PyTorch reference and the
#      plain weight-gradient GEMM: the fused-instantiate and ghost targets;
#   3. the end-to-end table (bench/run_table.py) on seq-large: the step target, divebatch fused,
#      unfused, on wide tiles and fused everywhere beside torch.func, Opacus, BackPACK;
#   4. bench/gpu/profile_step.py on seq-large: where the tracked step's extra time goes;
#   4b. bench/gpu/ncu_kernels.py: Nsight Compute's counters of the GEMM, ghost and fused kernels there;
#   5. the other kernel timings (--append to the same JSON: the implicit convolutions, layouts,
#      T = 1, embeddings, norm layers, scans);
#   6. the end-to-end table on conv-large, transformer (nn.MultiheadAttention's fused rule on CUDA)
#      and conv-large-cl (--append), divebatch with the implicit convolution kernel beside it;
#   7. profile_step.py on transformer; bench/host_overhead.py on CUDA (tiny models, where a step is
#      bound by launches and hooks); the transformer workload under torch.compile;
#   8. bench/gpu/verdicts.py: the results read against the issue's targets and docs/kernels.md's open
#      questions, one line each with the change it calls for (verdicts.md; seconds, nothing timed).
#   The JSON files are rewritten after each workload, so a step cut by its limit keeps what it measured.
# Results (JSON, junit XML, logs) go to bench/results/gpu/, or, where $OUT is set (the workplace's
# device tool, which returns at most 8 files), to a scratch folder packed into $OUT/gpu_results.tgz
# with the JSON tables copied beside it.
# Usage: bash bench/gpu/run_gpu_checks.sh        (PYTHON=... to pick the interpreter, BUDGET_S=... the seconds)
#        STEPS=bench_more,run_table_more bash bench/gpu/run_gpu_checks.sh   (only those steps, keeping
#        the results folder: a second pass for what the first skipped or cut, whose summary prints
#        the STEPS= line to pass; names: correctness bench run_table profile ncu bench_more run_table_more
#        profile_transformer host compile; the verdicts always run). RESUME_FROM=FOLDER copies an
#        earlier pass's results (unpacked here, carried with the tree to a fresh machine) into the
#        results folder first, so the appended JSON files and the verdicts hold both passes.
# Within 5 minutes the default pass keeps the time of the three targets' measurements (steps 2-4)
# whatever the correctness jobs take; the later steps (5-7) may be cut or skipped, hence the second
# pass (docs/kernels.md, "Running").
# Needs a CUDA build of torch and triton; nothing is installed or downloaded.
# The compile/spill test (tests/test_triton_compile.py) needs no GPU and is not rerun here.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
PY="${PYTHON:-python3}"
STEPS="${STEPS:-}"
# (a second pass, STEPS set, adds to the first pass's files where the machine still holds them)
if [ -n "${OUT:-}" ]; then
    RESULTS=/tmp/divebatch-gpu-results; [ -z "$STEPS" ] && rm -rf "$RESULTS"
else
    RESULTS=bench/results/gpu
fi
mkdir -p "$RESULTS"
if [ -n "${RESUME_FROM:-}" ]; then
    if [ ! -d "$RESUME_FROM" ]; then
        echo "RESUME_FROM=$RESUME_FROM is not a folder: name the unpacked results of an earlier pass" >&2
        exit 2
    fi
    [ "$(realpath "$RESUME_FROM")" != "$(realpath "$RESULTS")" ] && cp -r "$RESUME_FROM"/. "$RESULTS"/
fi
# An explicit 0 (not unset): a conftest.py may setdefault TRITON_INTERPRET=1 for the CPU tests.
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
# The tree may arrive without `pip install` (divebatch._kernels then loads from kernels/, see
# divebatch/_build.py): do not spend the GPU minutes JIT-compiling the C++ CPU kernels.
export DIVEBATCH_NO_JIT=1
# The autotune configs added after the last GPU run are tried here (they wait for this opt-in in
# use): the tests sweep them, the bench times them, the engine checks run on them.
export DIVEBATCH_TRITON_UNVERIFIED_CONFIGS=1
START=$(date +%s)
# The whole script's wall-clock budget (under the 5 minutes a device check may take, with the
# wheels' install and the interpreter's start around it): each step gets what the steps before it
# leave, less what it keeps for the steps after it.
BUDGET_S="${BUDGET_S:-290}"
status=0
declare -a SUMMARY=() UNFINISHED=()
want() { [ -z "$STEPS" ] || [[ ",$STEPS," == *",$1,"* ]]; }  # want NAME: this pass runs step NAME

step() {  # step NAME TIMEOUT_S CMD...
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s)
    echo "=== [$name] (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/gpu_${name}.log"
    local rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 ))
    SUMMARY+=("$name: rc=$rc in ${dt}s")
    [ "$rc" -ne 0 ] && status=1
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && UNFINISHED+=("$name")  # (cut by its limit)
    return 0
}

echo "=== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
if ! "$PY" -c "import torch, triton, sys; ok = torch.cuda.is_available(); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'device', torch.cuda.get_device_name() if ok else None); sys.exit(0 if ok else 1)"; then
    echo "no CUDA device visible to torch (or torch/triton missing): nothing to check" >&2
    exit 2
fi

# 1. correctness, all at once (nothing here is timed): the Triton kernel tests as twelve pytest
#    shards (~170 kernel specialisations, each compiled once on one CPU core: the machine has 16),
#    the recurrent scans' error per time step (1a; off on CUDA until clean, see kernels/__init__.py
#    UNVERIFIED_ON_GPU, with the PTX/TTGIR the launches compiled), and the whole engine against
#    torch.func in float32 (1b; every rule: zoo, tied head, attention fused and replayed; three
#    shards at once, each case's first call compiles its kernels on one core, joined after).
#    Each job may take CHECK_LIMIT_S: the H200 ran the tests in 54 s and 68 engine cases in 75 s.
CHECK_LIMIT_S="${CHECK_LIMIT_S:-110}"
ENGINE_SHARDS=3
declare -a JOB_PIDS=() JOB_NAMES=() JOB_LOGS=()
start_job() {  # start_job NAME LIMIT_S CMD...: in the background, output to $RESULTS/gpu_NAME.log
    local name="$1" limit="$2"; shift 2
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$RESULTS/gpu_$name.log" 2>&1 &
    JOB_PIDS+=($!); JOB_NAMES+=("$name"); JOB_LOGS+=("$RESULTS/gpu_$name.log")
}
if want correctness; then
t0=$(date +%s)
# (the scans' cases compile ~50 specialisations of two large kernels: two shards of their own)
# (the norm kernels: ~200 cases over their widths, 3 dtypes and the layouts: a shard of their own)
# (the sweeps of every ghost / instantiate config at large shapes compile one specialisation per
#  config and grid, ~40 with the configs added after the first run: three shards of their own, and
#  a fourth for the implicit convolution kernels' sweeps, both column orders)
# (the Gram kernel on wide tiles, DIVEBATCH_TRITON_GHOST_WIDE, its cases and config sweep: a shard)
shards=("ghost and not instantiate and not every_gpu_config and not ghost_norm_wide" "ghost_norm_wide" "instantiate and not every_gpu_config" "outer"
        "recurrent_scan and LSTM" "recurrent_scan and not LSTM" "affine_norm_grads or group_norm_grads or channel_norm_grads"
        "not ghost and not instantiate and not outer and not recurrent_scan and not affine_norm_grads and not group_norm_grads and not channel_norm_grads"
        "ghost_every_gpu_config and not conv_" "instantiate_every_gpu_config and stored and not conv_"
        "instantiate_every_gpu_config and atomic and not conv_"
        "conv_ghost_every_gpu_config or conv_instantiate_every_gpu_config")
for i in "${!shards[@]}"; do
    start_job "tests_shard$((i + 1))" "$CHECK_LIMIT_S" env DIVEBATCH_TRITON_TEST_DEVICE=cuda DIVEBATCH_TRITON_AUTOTUNE=0 \
        DIVEBATCH_TRITON_SCANS=1 "$PY" -m pytest tests/test_triton_kernels.py -q -p no:cacheprovider \
        -k "${shards[$i]}" --junitxml="$RESULTS/gpu_triton_kernels_$((i + 1)).xml"
done
start_job diagnose_scan 60 "$PY" bench/gpu/diagnose_scan.py --asm-dir "$RESULTS/scan_asm"
ENGINE_FILES=()
for i in $(seq 1 "$ENGINE_SHARDS"); do
    ENGINE_FILES+=("$RESULTS/check_engine_$i.json")
    start_job "engine$i" "$CHECK_LIMIT_S" "$PY" bench/gpu/check_engine.py --device cuda --shard "$i/$ENGINE_SHARDS" \
        --out "$RESULTS/check_engine_$i.json"
done
echo "=== [correctness] ${#JOB_PIDS[@]} jobs at once: ${JOB_NAMES[*]}"
for j in "${!JOB_PIDS[@]}"; do
    rc=0
    wait "${JOB_PIDS[$j]}" || rc=$?
    echo "--- ${JOB_NAMES[$j]} (rc=$rc):"
    tail -n 25 "${JOB_LOGS[$j]}"
    SUMMARY+=("${JOB_NAMES[$j]}: rc=$rc")
    [ "$rc" -ne 0 ] && status=1
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && UNFINISHED+=("correctness")
done
"$PY" bench/gpu/check_engine.py --merge "${ENGINE_FILES[@]}" --out "$RESULTS/check_engine.json" \
    || SUMMARY+=("engine shards: not joined")
SUMMARY+=("correctness jobs: $(( $(date +%s) - t0 ))s together")
fi

# What is left of the budget, less the seconds kept for later steps: left_after KEEP_S.
left_after() { echo $(( BUDGET_S - ($(date +%s) - START) - $1 )); }
# timed NAME CAP_S KEEP_S MIN_S CMD...: the step, limited to CAP_S and to what leaves KEEP_S for the
# steps after it; skipped (and said so) when that is under MIN_S.
timed() {
    local name="$1" cap="$2" keep="$3" floor="$4"; shift 4
    want "$name" || return 0
    local limit; limit=$(left_after "$keep")
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt "$floor" ]; then
        SUMMARY+=("$name: skipped (${limit}s of the budget left for it)")
        UNFINISHED+=("$name")
        return 0
    fi
    step "$name" "$limit" "$@"
}
BENCH=(env DIVEBATCH_TRITON_SCANS=1 "$PY" bench/gpu/bench_kernels.py --out "$RESULTS/bench_kernels.json" --rounds 3 --rep-ms 50)
TABLE=("$PY" bench/run_table.py --device cuda --dtype bfloat16 --reps 5 --out "$RESULTS/gpu_table.json")

# 2. kernel timings at the target shapes (autotuned: every config compiles once per shape; the
#    JSON is rewritten after each workload, so a cut run keeps what it timed). It keeps 60 s for the
#    seq-large table and its profile.
timed bench 70 60 20 "${BENCH[@]}" --workloads seq-large-up,seq-large-down,conv-layer1,conv-layer4

# 3. the end-to-end table on seq-large (the step target). divebatch-unfused beside divebatch: the hook
#    routes' cost next to the fused ones; divebatch-ghost-wide: the Gram route on 128 x 256 tiles;
#    divebatch-fused-everywhere: the fused instantiate route on every Linear (seq-large's too, which
#    the route model gives the Gram route): the one way to the 1.05x step, end to end.
timed run_table 90 15 30 "${TABLE[@]}" --workloads seq-large \
    --methods divebatch,divebatch-unfused,divebatch-ghost-wide,divebatch-fused-everywhere,torch.func,opacus,opacus-ghost,backpack

# 4. where the tracked seq-large step's extra time goes (torch.profiler, plain vs divebatch).
timed profile 30 0 15 "$PY" bench/gpu/profile_step.py --device cuda --dtype bfloat16 \
    --workload seq-large --out "$RESULTS/profile_seq_large.json"

# 4b. the hardware counters of those kernels at seq-large up (Nsight Compute, which reads them on the
#     Firecracker machines, `--clock-control none`): why the fused kernel ran at 2.2x the GEMM and the
#     ghost kernel at 38% of the peak; each kernel once, after tuning outside the profiled range.
timed ncu 90 0 40 "$PY" bench/gpu/ncu_kernels.py --out-dir "$RESULTS" --workload seq-large-up

# 5. the other kernel timings, added to the same JSON (~2 min with autotuning: in the default pass
#    often cut, the JSON keeping the workloads it timed; STEPS=bench_more,... finishes them).
timed bench_more 120 40 30 "${BENCH[@]}" --append \
    --workloads seq-up-bf16,conv-layer1-unfolded,conv-layer4-unfolded,conv-stem-implicit,conv-layer1-implicit,conv-layer2-implicit,conv-layer3-implicit-ghost,conv-layer4-implicit-ghost,conv-layer4-down-implicit-ghost,conv-layer1-implicit-cl,conv-layer3-implicit-ghost-cl,mlp-T1-bf16,seq-embedding,seq-large-embedding,layernorm-seq-large,rmsnorm-llama,groupnorm-conv-large,groupnorm-conv-large-cl,batchnorm-conv-large,batchnorm-conv-large-cl,batchnorm-layer4-eval,lstm-scan,gru-scan,lstm-scan-wide

# 6. the end-to-end table on the other workloads, added to the same JSON. divebatch-implicit-conv:
#    conv-large's fused convolutions reading their patches in place.
timed run_table_more 90 0 30 "${TABLE[@]}" --append --workloads conv-large,transformer,conv-large-cl \
    --methods divebatch,divebatch-unfused,divebatch-implicit-conv,torch.func,opacus,opacus-ghost,backpack

# 7. the transformer workload's step (3.28x on a 4.4 ms step on the H200): device time per op beside
#    host time per op, and how busy the device is, say whether launches or kernels add the 10 ms;
#    then the host overhead of tracking on tiny models (the first config of each kernel, untimed: few
#    compiles), with the functions taking the host's time; then, if time is left, a tracked step under
#    torch.compile (inductor) against a compiled plain one (each tracked module is a graph break; on a
#    GPU inductor fuses the elementwise ops between them, which the CPU figures cannot show; ~1 min).
timed profile_transformer 40 0 20 "$PY" bench/gpu/profile_step.py --device cuda \
    --dtype bfloat16 --workload transformer --steps 10 --top 40 --out "$RESULTS/profile_transformer.json"
timed host 45 0 30 env DIVEBATCH_TRITON_AUTOTUNE=0 "$PY" bench/host_overhead.py --device cuda --rounds 3 --steps 100 \
    --profile 25 --out "$RESULTS/host_overhead.md"
timed compile 120 0 60 "$PY" bench/run_table.py --device cuda --dtype bfloat16 --reps 5 --no-memory \
    --methods divebatch,plain-compiled,divebatch-compiled --workloads transformer \
    --out "$RESULTS/gpu_table_compile.json"

# 8. what the run answered (reads the files above): printed, and kept as verdicts.md.
echo "=== verdicts"
"$PY" bench/gpu/verdicts.py "$RESULTS" --out "$RESULTS/verdicts.md" || SUMMARY+=("verdicts: failed")

echo "=== summary ($(( $(date +%s) - START ))s total)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "  results in $RESULTS"
if [ "${#UNFINISHED[@]}" -gt 0 ]; then
    # (the steps skipped or cut by their limit, once each, in order: what a second pass runs)
    again=$(printf '%s\n' "${UNFINISHED[@]}" | awk '!seen[$0]++' | paste -sd, -)
    echo "  unfinished: $again; to finish them: STEPS=$again bash bench/gpu/run_gpu_checks.sh"
fi
if [ -n "${OUT:-}" ]; then
    # (the device tool returns at most 8 files: the archive, the verdicts and the three tables read
    #  first, and room for the caller's console log)
    tar czf "$OUT/gpu_results.tgz" -C "$RESULTS" .
    for table in verdicts.md bench_kernels.json gpu_table.json check_engine.json; do
        [ -f "$RESULTS/$table" ] && cp "$RESULTS/$table" "$OUT"/
    done
    echo "  packed into $OUT/gpu_results.tgz (+ verdicts.md, bench_kernels.json, gpu_table.json, check_engine.json)"
fi
exit $status
