#!/usr/bin/env bash
# Build, test, memcheck and benchmark vqkernels on a bare NVIDIA H100 machine.
#
#   scripts/gpu_check.sh [OUTDIR]      (OUTDIR defaults to $OUT)
#
# Every step runs even when an earlier one failed; each logs under OUTDIR, and a
# summary (step, exit code, seconds) is printed last. Exits 1 if any step failed.
# Environment: PYTHON (default python), TORCH_CUDA_ARCH_LIST (default 9.0),
# SANITIZER_K (pytest -k expression run under compute-sanitizer; default: the CUDA-backend timestep,
# search, EMA, DDIM and attention parity tests, without the multi-GiB ones),
# COMPUTE_SANITIZER (path of the binary; default: on PATH, else /usr/local/cuda/bin).
set -euo pipefail

OUTDIR="${1:-${OUT:-}}"
if [[ -z "$OUTDIR" ]]; then
    echo "usage: $0 OUTDIR   (or set \$OUT)" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
SANITIZER_K="${SANITIZER_K:-(timestep or nearest_code or ema or counts or parity_given_noise or parity_guidance or in_kernel_noise or parity_every_length_and_head_dim and 257 or parity_cross_attention or strided_packed) and not triton and not 64bit and not many_rows}"
COMPUTE_SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"

NAMES=()
CODES=()
TIMES=()

# step NAME LOG CMD...: run CMD with stdout+stderr to LOG; record exit code and seconds.
step() {
    local name=$1 log=$2
    shift 2
    echo "== $name: $* > $log"
    local start code=0
    start=$(date +%s.%N)
    "$@" >"$log" 2>&1 || code=$?
    NAMES+=("$name")
    CODES+=("$code")
    TIMES+=("$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')")
    echo "   exit $code after ${TIMES[-1]} s"
}

step nvidia-smi "$OUTDIR/nvidia-smi.txt" nvidia-smi
step build "$OUTDIR/build.log" \
    env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    "$PYTHON" -m pip install --no-build-isolation -e .
step info "$OUTDIR/info.txt" "$PYTHON" -m vqkernels info
step pytest-cuda "$OUTDIR/pytest_cuda.log" \
    "$PYTHON" -m pytest -m cuda -q --junitxml="$OUTDIR/pytest_cuda.xml"
# Without the caching allocator every tensor is its own allocation, so memcheck
# sees out-of-bounds accesses that would otherwise land in a cached block.
step sanitizer "$OUTDIR/sanitizer.log" \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$COMPUTE_SANITIZER" --tool memcheck --error-exitcode 99 \
    "$PYTHON" -m pytest -m cuda -q -k "$SANITIZER_K"
step bench "$OUTDIR/bench.log" \
    "$PYTHON" -m vqkernels bench --device cuda \
    --json "$OUTDIR/bench.json" --plot "$OUTDIR/bench.png"

failed=0
echo
printf '%-12s %5s %9s\n' step exit seconds
for i in "${!NAMES[@]}"; do
    printf '%-12s %5s %9s\n' "${NAMES[$i]}" "${CODES[$i]}" "${TIMES[$i]}"
    [[ "${CODES[$i]}" == 0 ]] || failed=1
done
echo "logs in $OUTDIR"
exit "$failed"
