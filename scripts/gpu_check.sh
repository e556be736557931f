#!/usr/bin/env bash
# One command that checks vqkernels on a bare NVIDIA GPU machine (H100/H200, sm_90) in at
# most 9 minutes:
#
#   scripts/gpu_check.sh OUTDIR        (OUTDIR defaults to $OUT)
#
# Steps, in order of value, each under its own timeout (seconds); one that fails or times
# out does not stop the rest:
#   nvidia-smi (15) -> build (180: pip install --no-build-isolation --no-deps -e .)
#   -> python -m vqkernels info (30) -> selftest --device cuda (60)
#   -> pytest -m cuda (240, junit XML) -> compute-sanitizer memcheck on SANITIZER_K (90)
#   -> the GPU benchmarks, quick (120) -> summary (python -m vqkernels.bench.summary).
# A step gets at most what is left of GPU_CHECK_BUDGET_S once the summary's share is set
# aside; with nothing left it is "not run". A timeout sends SIGINT first (pytest still
# writes its junit XML), SIGKILL 10 s later.
#
# OUTDIR then holds exactly five files: summary.md, bench.json, bench.png, pytest_cuda.xml
# and logs.tar.gz (logs/: each step's log, nvidia-smi.txt, info.txt, selftest.json,
# sanitizer.log + sanitizer.xml, build-tools.txt, pip-list.txt, steps.tsv). A file its
# step did not write is a stand-in that says why. summary.md is printed last, whatever
# happened.
#
# Without a GPU (no nvidia-smi, or it lists none) only the steps that need none run (build,
# info, summary); the others are "not run", and the exit code is 0 unless a step that ran
# failed. With a GPU: 1 if any step failed or timed out, else 0.
#
# Environment:
#   PYTHON                  interpreter (default: python on PATH, else python3)
#   GPU_CHECK_SKIP_BUILD=1  skip the build and use the vqkernels._C already built in place,
#                           e.g. on a CPU-only CI machine where compiling CUDA takes minutes
#   GPU_CHECK_BUDGET_S      seconds for the whole run (default 540)
#   GPU_CHECK_BENCH_ARGS    arguments of the bench step (default: --quick, the families
#                           in order of value, so a bench cut short by its timeout keeps
#                           the rows that matter most)
#   TORCH_CUDA_ARCH_LIST    (default 9.0); MAX_JOBS (default: the number of cores)
#   GPU_CHECK_PYTEST_WORKERS  pytest-xdist workers of the cuda tests, where xdist is
#                           installed (default 14)
#   SANITIZER_K             pytest -k expression run under memcheck (default: odd-shape
#                           parity tests of every kernel, CUDA and Triton, ~45 tests)
#   COMPUTE_SANITIZER       compute-sanitizer binary (default: on PATH, else under
#                           /usr/local/cuda/bin)
set -uo pipefail

OUTDIR="${1:-${OUT:-}}"
if [[ -z "$OUTDIR" ]]; then
    echo "usage: $0 OUTDIR   (or set \$OUT)" >&2
    exit 2
fi
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2

START=$SECONDS
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
SUMMARY_RESERVE_S=30  # the summary, the archive and the last SIGKILL grace
KILL_GRACE_S=10
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
SANITIZER_K="${SANITIZER_K:-test_parity_options or test_empty_batch_and_single_code or test_nearest_code_random_data and 31-64-33 or test_nearest_code_with_stats and False- and float32 and (97-13-7 or 50-300-5) or test_code_counts_and_sums_match_reference and 61-7-255 or test_ema_update_matches_float64_reference and torch.bfloat16-torch.float32-61-7-255 or test_parity_odd_shapes and (shape0 or shape4) or test_in_kernel_noise and float32 or test_parity_cross_attention and 1-70 or test_strided_packed_qkv and bfloat16 or test_parity_unaligned_views and bfloat16 or test_out_of_range_device_timestep or test_strided_views_are_read_in_place and gated_residual_layer_norm or test_parity and 1x3x1153 and per-sample and gated_residual_layer_norm and bfloat16 or test_fused_cuda_kernel_is_the_stage_loop_bit_for_bit and bfloat16 or test_fused_triton_kernel_is_the_stage_loop and cuda and bf16 or test_with_stats_sums_the_residual_each_stage_searched and False-bfloat16-triton-cuda or test_every_stage_as_ema_update_of_each and True-torch.bfloat16-cuda or test_forward_and_gradients_within_the_contract and triton-cuda-bfloat16-nhwc-shape1-32-True or test_forward_and_gradient_match_float64 and triton-cuda-bfloat16-shape3}"
COMPUTE_SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer ||
    echo /usr/local/cuda/bin/compute-sanitizer)}"
BENCH_ORDER="search ema attention adaln ddim timestep quantizer rvq models"
FILES=(summary.md bench.json bench.png pytest_cuda.xml logs.tar.gz)
# 1x1 white PNG: the stand-in plot when Python itself cannot write one.
BLANK_PNG_B64="iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"

WORK="$(mktemp -d)"
LOGS="$WORK/logs"
STEPS="$LOGS/steps.tsv"
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
for file in "${FILES[@]}"; do rm -f "$OUTDIR/$file"; done

record() {  # NAME STATUS EXIT SECONDS NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"
}

not_run() {  # NAME REASON
    record "$1" "not run" - - "$2"
    echo "== $1: not run ($2)"
}

# step NAME CAP_S LOG CMD...: CMD under a timeout of min(CAP_S, budget left), output to LOG.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET_S - SUMMARY_RESERVE_S - KILL_GRACE_S - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        not_run "$name" "no time left of the ${BUDGET_S} s budget"
        return
    fi
    echo "== $name (at most ${limit} s): $*"
    local begin code=0 status=ok seconds
    begin=$(date +%s.%N)
    timeout --signal=INT --kill-after="$KILL_GRACE_S" "$limit" "$@" >"$log" 2>&1 || code=$?
    seconds=$(awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((code == 124 || code == 137)); then
        status="timed out"
    elif ((code != 0)); then
        status=failed
    fi
    record "$name" "$status" "$code" "$seconds" "limit ${limit} s; log $(basename "$log")"
    echo "   $status (exit $code) after $seconds s"
}

# What GPU this is, or why there is none; sets HAS_GPU.
find_gpu() {
    HAS_GPU=0
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        MACHINE="no NVIDIA GPU: nvidia-smi not found"
    elif ! nvidia-smi -L >/dev/null 2>&1; then
        MACHINE="no NVIDIA GPU: nvidia-smi lists none"
    else
        HAS_GPU=1
        MACHINE="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
            | head -n 1), $(nproc) cores"
        if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
            2>/dev/null; then
            MACHINE="$MACHINE; torch.cuda.is_available() is False: the GPU steps will fail"
        fi
    fi
}

build() {
    if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
        not_run build "GPU_CHECK_SKIP_BUILD=1"
        return
    fi
    local build_env=(TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
        MAX_JOBS="${MAX_JOBS:-$(nproc)}")
    ((HAS_GPU)) && build_env+=(VQKERNELS_BUILD_CUDA=1)  # a GPU run must test the CUDA kernels
    # Without ninja torch compiles one file at a time: say so next to the build log.
    for tool in ninja nvcc; do
        echo "$tool: $(command -v "$tool" || echo "not found")"
    done >"$LOGS/build-tools.txt"
    step build 180 "$LOGS/build.log" env "${build_env[@]}" \
        "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
}

gpu_steps() {
    step selftest 60 "$LOGS/selftest.log" \
        "$PYTHON" -m vqkernels selftest --device cuda --json "$LOGS/selftest.json"
    local pytest_args=(-m cuda -v -p no:cacheprovider)
    if "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then
        pytest_args+=(--timeout=60)  # one hung test then costs a minute, not the step
    fi
    if "$PYTHON" -c 'import xdist' 2>/dev/null; then
        # ~2300 tests, mostly bound by Triton's JIT: spread the compiling over the cores
        # (on the H200's 16, 8 workers ran 1217 of them in 150 s). A test whose kernel
        # faults ends its worker and xdist starts another (tests/conftest.py).
        pytest_args+=(-n "${GPU_CHECK_PYTEST_WORKERS:-14}")
    fi
    step pytest-cuda 240 "$LOGS/pytest_cuda.log" env PYTHONUNBUFFERED=1 \
        "$PYTHON" -m pytest "${pytest_args[@]}" --junitxml="$OUTDIR/pytest_cuda.xml"
    if [[ -x "$COMPUTE_SANITIZER" ]]; then
        # Without the caching allocator every tensor is its own allocation, so memcheck sees
        # out-of-bounds accesses that would land in a cached block. Unbuffered output keeps
        # each error record after the id of the test that caused it.
        step sanitizer 90 "$LOGS/sanitizer.log" \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1 \
            "$COMPUTE_SANITIZER" --tool memcheck --error-exitcode 99 \
            "$PYTHON" -m pytest -m cuda -v -p no:cacheprovider -k "$SANITIZER_K" \
            --junitxml="$LOGS/sanitizer.xml"
    else
        not_run sanitizer "compute-sanitizer not found at $COMPUTE_SANITIZER"
    fi
    local bench_args
    read -r -a bench_args <<<"${GPU_CHECK_BENCH_ARGS:---quick --ops $BENCH_ORDER}"
    step bench 120 "$LOGS/bench.log" "$PYTHON" -m vqkernels bench --device cuda \
        "${bench_args[@]}" --json "$OUTDIR/bench.json" --plot "$OUTDIR/bench.png"
}

skip_gpu_steps() {
    for name in selftest pytest-cuda sanitizer bench; do not_run "$name" "no GPU"; done
}

summarize() {
    timeout 60 "$PYTHON" -m vqkernels.bench.summary --steps "$STEPS" \
        --junit "$OUTDIR/pytest_cuda.xml" --pytest-log "$LOGS/pytest_cuda.log" \
        --selftest "$LOGS/selftest.json" --sanitizer-log "$LOGS/sanitizer.log" \
        --bench "$OUTDIR/bench.json" --plot "$OUTDIR/bench.png" --machine "$MACHINE" \
        --out "$OUTDIR/summary.md" --fill-missing >"$LOGS/summary.log" 2>&1 && return
    echo "== the summary formatter failed (logs/summary.log): writing a plain summary"
    fallback_summary
}

# The five files without Python's help: the steps table and bare stand-ins.
fallback_summary() {
    {
        echo "# gpu_check summary"
        echo
        echo "Machine: $MACHINE"
        echo
        echo "**The summary formatter failed** (logs/summary.log in logs.tar.gz): steps only."
        echo
        echo "| step | status | exit | seconds | note |"
        echo "|---|---|---|---|---|"
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$STEPS"
    } >"$OUTDIR/summary.md"
    [[ -e "$OUTDIR/bench.json" ]] ||
        echo '{"not_run": "see summary.md", "rows": []}' >"$OUTDIR/bench.json"
    [[ -e "$OUTDIR/bench.png" ]] || base64 -d <<<"$BLANK_PNG_B64" >"$OUTDIR/bench.png"
    [[ -e "$OUTDIR/pytest_cuda.xml" ]] ||
        echo '<?xml version="1.0" encoding="utf-8"?><testsuites />' >"$OUTDIR/pytest_cuda.xml"
}

print_steps() {
    echo
    printf '%-12s %-10s %5s %8s  %s\n' step status exit seconds note
    awk -F'\t' '{ printf "%-12s %-10s %5s %8s  %s\n", $1, $2, $3, $4, $5 }' "$STEPS"
}

find_gpu
echo "== machine: $MACHINE"
if ((HAS_GPU)); then
    step nvidia-smi 15 "$LOGS/nvidia-smi.txt" nvidia-smi
else
    not_run nvidia-smi "${MACHINE#no NVIDIA GPU: }"
fi
build
step info 30 "$LOGS/info.txt" "$PYTHON" -m vqkernels info
timeout 20 "$PYTHON" -m pip list >"$LOGS/pip-list.txt" 2>&1
if ((HAS_GPU)); then
    gpu_steps
else
    skip_gpu_steps
fi
summarize
tar -czf "$OUTDIR/logs.tar.gz" -C "$WORK" logs

print_steps
failed=0
awk -F'\t' '$2 == "failed" || $2 == "timed out" { bad = 1 } END { exit !bad }' "$STEPS" && failed=1
if ((!HAS_GPU)); then
    echo
    echo "No NVIDIA GPU here (${MACHINE#no NVIDIA GPU: }): ran only the steps that need none;"
    echo "selftest, pytest -m cuda, memcheck and the benchmarks are marked not run."
fi
echo
echo "== $OUTDIR/summary.md (next to bench.json, bench.png, pytest_cuda.xml, logs.tar.gz)"
cat "$OUTDIR/summary.md"
exit "$failed"
