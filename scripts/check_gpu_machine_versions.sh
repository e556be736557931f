#!/usr/bin/env bash
# vqkernels under the versions the lent GPU machine has (an H200: Python 3.12,
# torch 2.11.0+cu130, triton 3.6.0, and no diffusers or vector-quantize-pytorch),
# here on a CPU. CI runs it on every commit, after the README's test command
# built dist/vqkernels-*.whl against torch 2.14.1 under Python 3.11.
#
#   scripts/check_gpu_machine_versions.sh [WORKDIR]   (default: build/gpu-machine)
#
# 1. The stable-ABI wheel across versions: that wheel, unchanged, goes into a
#    venv of Python 3.12 and the older torch 2.11; its C++ CPU and CUDA kernels
#    must load (info), and the whole test suite runs against it.
# 2. The GPU session's own source build, so that it never starts with a build
#    break or a collection error: in a copy of the source tree (its own in-place
#    extension), build for sm_90 only against torch 2.11's headers; collect every
#    test; selftest with Triton under its interpreter (every op on every backend,
#    forward and gradients, against the float64 reference) and the sm_90 compile
#    test of every Triton kernel.
set -euo pipefail
cd "$(dirname "$0")/.."

python312() {  # python3.12 on PATH, or pyenv's (whose shim refuses an unselected version)
    local candidate
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "no Python 3.12 found (set GPU_MACHINE_PYTHON)" >&2
    return 1
}

shopt -s nullglob
wheels=(dist/vqkernels-*.whl)
[[ ${#wheels[@]} == 1 ]] || { echo "expected one wheel in dist/, found ${#wheels[@]}" >&2; exit 1; }
PYTHON=${GPU_MACHINE_PYTHON:-$(python312)}
TORCH=${GPU_MACHINE_TORCH:-2.11.0}  # its PyPI wheel is the cu130 build and pins triton 3.6.0
WORKDIR=$(mkdir -p "${1:-build/gpu-machine}" && cd "${1:-build/gpu-machine}" && pwd)
SOURCE="$WORKDIR/src"

echo "== copy the source tree to $SOURCE"
rm -rf "$SOURCE" && mkdir -p "$SOURCE"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SOURCE"

echo "== venv: $PYTHON, torch $TORCH"
[[ -x "$WORKDIR/venv/bin/python" ]] || "$PYTHON" -m venv "$WORKDIR/venv"
. "$WORKDIR/venv/bin/activate"
pip install -q "torch==$TORCH" setuptools wheel ninja numpy tqdm pytest pytest-timeout hypothesis
python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

echo "== the wheel built against torch 2.14.1 (Python 3.11), under torch $TORCH (Python 3.12)"
pip install -q --force-reinstall --no-deps "${wheels[0]}"
info=$(python -P -m vqkernels info)
echo "$info" | head -3
grep -q "C++ CPU kernels: yes" <<<"$info" && grep -q "CUDA kernels: yes" <<<"$info"
VQKERNELS_EXPECT_INSTALLED=1 python -P -m pytest -q -p no:cacheprovider

echo "== build for sm_90"
cd "$SOURCE"
VQKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install -q --no-build-isolation --no-deps -e .
info=$(python -m vqkernels info)
echo "$info" | head -3
grep -q "CUDA kernels: yes" <<<"$info"

echo "== collect every test (the GPU run must not stop at an import)"
python -m pytest -q --co -p no:cacheprovider >/dev/null

echo "== selftest with Triton under its interpreter, and the sm_90 compile test"
TRITON_INTERPRET=1 python -m vqkernels selftest --device cpu
python -m pytest -q -p no:cacheprovider tests/test_triton_sm90.py
