#!/usr/bin/env bash
# One prepared check for a GPU machine (written for one H200; total <= BUDGET_S, 290 s by default):
#   1. at once (correctness, nothing timed): the Triton kernel tests natively on CUDA (12 pytest shards
#      of tests/test_triton_kernels.py with DIVEBATCH_TRITON_TEST_DEVICE=cuda; first config of each
#      list, except the sweeps of every config at large shapes); 1a. bench/gpu/diagnose_scan.py, the
#      recurrent scans' error per time step (off on CUDA until clean); 1b. bench/gpu/check_engine.py,
#      every layer rule through the tracker vs torch.func on CUDA (fp32);
#   2. kernel timings vs the PyTorch reference and the plain weight-gradient GEMM
#      (bench/gpu/bench_kernels.py, triton.testing.do_bench, autotuned), table + JSON;
#   2b. if present, the end-to-end table (bench/run_table.py) on seq-large (the issue's end-to-end
#      target, first since the thirtieth session: its fused and wide-tile variants), conv-large, then transformer
#      (nn.MultiheadAttention's fused rule on CUDA), divebatch fused, unfused and with the implicit
#      convolution kernel side by side; the JSON is rewritten after each workload; it leaves
#      PROFILE_RESERVE_S (100 s) of the budget to
#   3. bench/gpu/profile_step.py: torch.profiler on seq-large and transformer, the ops the tracked
#      step adds (device and host time); 3b. bench/host_overhead.py on CUDA: tiny models, where a
#      step is bound by launches and hooks;
#   4. if time is left, the transformer workload under torch.compile, tracked against plain;
#   5. bench/gpu/verdicts.py: the results read against the issue's targets and docs/kernels.md's open
#      questions, one line each with the change it calls for (verdicts.md; seconds, nothing timed).
# Results (JSON, junit XML, logs) go to bench/results/gpu/, or, where $OUT is set (the workplace's
# device tool, which returns at most 8 files), to a scratch folder packed into $OUT/gpu_results.tgz
# with the JSON tables copied beside it.
# Usage: bash bench/gpu/run_gpu_checks.sh        (PYTHON=... to pick the interpreter)
# Needs a CUDA build of torch and triton; nothing is installed or downloaded.
# The compile/spill test (tests/test_triton_compile.py) needs no GPU and is not rerun here.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
PY="${PYTHON:-python3}"
if [ -n "${OUT:-}" ]; then RESULTS=/tmp/divebatch-gpu-results; rm -rf "$RESULTS"; else RESULTS=bench/results/gpu; fi
mkdir -p "$RESULTS"
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
# The whole script's wall-clock budget: steps 3 and 4 get what steps 1-2 leave of it.
BUDGET_S="${BUDGET_S:-290}"
status=0
declare -a SUMMARY=()

step() {  # step NAME TIMEOUT_S CMD...
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s)
    echo "=== [$name] (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/gpu_${name}.log"
    local rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 ))
    SUMMARY+=("$name: rc=$rc in ${dt}s")
    [ "$rc" -ne 0 ] && status=1
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
#    torch.func in float32 (1b; every rule: zoo, tied head, attention fused and replayed).
declare -a JOB_PIDS=() JOB_NAMES=() JOB_LOGS=()
start_job() {  # start_job NAME LIMIT_S CMD...: in the background, output to $RESULTS/gpu_NAME.log
    local name="$1" limit="$2"; shift 2
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$RESULTS/gpu_$name.log" 2>&1 &
    JOB_PIDS+=($!); JOB_NAMES+=("$name"); JOB_LOGS+=("$RESULTS/gpu_$name.log")
}
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
    start_job "tests_shard$((i + 1))" 150 env DIVEBATCH_TRITON_TEST_DEVICE=cuda DIVEBATCH_TRITON_AUTOTUNE=0 \
        DIVEBATCH_TRITON_SCANS=1 "$PY" -m pytest tests/test_triton_kernels.py -q -p no:cacheprovider \
        -k "${shards[$i]}" --junitxml="$RESULTS/gpu_triton_kernels_$((i + 1)).xml"
done
start_job diagnose_scan 60 "$PY" bench/gpu/diagnose_scan.py --asm-dir "$RESULTS/scan_asm"
start_job engine 150 "$PY" bench/gpu/check_engine.py --device cuda --out "$RESULTS/check_engine.json"
echo "=== [correctness] ${#JOB_PIDS[@]} jobs at once: ${JOB_NAMES[*]}"
for j in "${!JOB_PIDS[@]}"; do
    rc=0
    wait "${JOB_PIDS[$j]}" || rc=$?
    echo "--- ${JOB_NAMES[$j]} (rc=$rc):"
    tail -n 25 "${JOB_LOGS[$j]}"
    SUMMARY+=("${JOB_NAMES[$j]}: rc=$rc")
    [ "$rc" -ne 0 ] && status=1
done
SUMMARY+=("correctness jobs: $(( $(date +%s) - t0 ))s together")

# 2. kernel benchmarks (~2-3 min including autotuning: 8 instantiate configs to compile per shape on sm_90;
#    the JSON is rewritten after each workload, so a cut run keeps what it timed).
step bench 210 env DIVEBATCH_TRITON_SCANS=1 "$PY" bench/gpu/bench_kernels.py --out "$RESULTS/bench_kernels.json" --rounds 3 --rep-ms 50 \
    --workloads seq-large-up,seq-large-down,seq-up-bf16,conv-layer1,conv-layer4,conv-layer1-unfolded,conv-layer4-unfolded,conv-stem-implicit,conv-layer1-implicit,conv-layer2-implicit,conv-layer3-implicit-ghost,conv-layer4-implicit-ghost,conv-layer1-implicit-cl,conv-layer3-implicit-ghost-cl,mlp-T1-bf16,seq-embedding,seq-large-embedding,layernorm-seq-large,rmsnorm-llama,groupnorm-conv-large,lstm-scan,gru-scan,lstm-scan-wide

# 2b. the end-to-end per-sample-norm table, only if another engineer's script exists and time is left.
#    Before the profiles (twenty-sixth session): the table is the step's target figure, so it gets
#    what is left but PROFILE_RESERVE_S, which keeps room for the two profiles below.
left=$(( BUDGET_S - ($(date +%s) - START) - ${PROFILE_RESERVE_S:-100} ))
if [ -f bench/run_table.py ] && [ "$left" -gt 30 ]; then
    # divebatch-unfused beside divebatch: the hook routes' cost next to the fused ones, the
    # measurement the CUDA fuse decisions (always fuse conv; fused instantiate where it fits) lack;
    # divebatch-implicit-conv: conv-large's fused convolutions reading their patches in place;
    # divebatch-ghost-wide: the Gram route on 128 x 256 tiles (seq-large's Linear layers);
    # divebatch-fused-everywhere: the fused instantiate route on every Linear (seq-large's too,
    # which the route model gives the Gram route): the one way to the 1.05x step, end to end.
    step run_table "$left" "$PY" bench/run_table.py --device cuda --dtype bfloat16 --reps 5 \
        --methods divebatch,divebatch-unfused,divebatch-implicit-conv,divebatch-ghost-wide,divebatch-fused-everywhere,torch.func,opacus,opacus-ghost,backpack \
        --workloads seq-large,conv-large,transformer,conv-large-cl --out "$RESULTS/gpu_table.json"
else
    SUMMARY+=("run_table: skipped (bench/run_table.py missing or ${left}s left)")
fi

# 3. where the tracked seq-large step's extra time goes (torch.profiler, plain vs divebatch), and
#     the transformer workload's (3.28x on a 4.4 ms step on the H200: device time per op beside
#     host time per op, and how busy the device is, say whether launches or kernels add the 10 ms).
left=$(( BUDGET_S - ($(date +%s) - START) ))
if [ "$left" -gt 20 ]; then
    step profile $(( left < 60 ? left : 60 )) "$PY" bench/gpu/profile_step.py --device cuda --dtype bfloat16 \
        --workload seq-large --out "$RESULTS/profile_seq_large.json"
else
    SUMMARY+=("profile: skipped (${left}s left)")
fi
left=$(( BUDGET_S - ($(date +%s) - START) ))
if [ "$left" -gt 20 ]; then
    step profile_transformer $(( left < 60 ? left : 60 )) "$PY" bench/gpu/profile_step.py --device cuda \
        --dtype bfloat16 --workload transformer --steps 10 --top 40 --out "$RESULTS/profile_transformer.json"
else
    SUMMARY+=("profile_transformer: skipped (${left}s left)")
fi

# 3b. the host overhead of tracking, where a GPU step is bound by it: tiny models on CUDA (the first
#     config of each kernel, untimed: few compiles), with the functions taking the host's time
#     (the H200 ran the transformer workload 3.28x: ~10 ms added to a 4.4 ms step, unexplained).
left=$(( BUDGET_S - ($(date +%s) - START) ))
if [ "$left" -gt 150 ]; then
    step host 60 env DIVEBATCH_TRITON_AUTOTUNE=0 "$PY" bench/host_overhead.py --device cuda --rounds 3 --steps 100 \
        --profile 25 --out "$RESULTS/host_overhead.md"
else
    SUMMARY+=("host: skipped (${left}s left)")
fi

# 4. if time is left: a tracked step under torch.compile (inductor) against a compiled plain one,
#    on the transformer workload (each tracked module is a graph break; on a GPU inductor fuses the
#    elementwise ops between them, which the CPU figures cannot show). Compiling takes ~1 min.
left=$(( BUDGET_S - ($(date +%s) - START) ))
if [ "$left" -gt 90 ]; then
    step compile "$left" "$PY" bench/run_table.py --device cuda --dtype bfloat16 --reps 5 --no-memory \
        --methods divebatch,plain-compiled,divebatch-compiled --workloads transformer \
        --out "$RESULTS/gpu_table_compile.json"
else
    SUMMARY+=("compile: skipped (${left}s left)")
fi

# 5. what the run answered (reads the files above): printed, and kept as verdicts.md.
echo "=== verdicts"
"$PY" bench/gpu/verdicts.py "$RESULTS" --out "$RESULTS/verdicts.md" || SUMMARY+=("verdicts: failed")

echo "=== summary ($(( $(date +%s) - START ))s total)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "  results in $RESULTS"
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
