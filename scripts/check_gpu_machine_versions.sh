#!/usr/bin/env bash
# Build and test vqkernels here, on a CPU, against the versions the lent GPU
# machine has (an H200: Python 3.12, torch 2.11.0+cu130, triton 3.6.0, and no
# diffusers or vector-quantize-pytorch), so that a GPU session never starts
# with a build break or a collection error. CI runs it on every commit.
#
#   scripts/check_gpu_machine_versions.sh [WORKDIR]   (default: build/gpu-machine)
#
# In WORKDIR: a copy of the source tree (its own in-place extension, so the
# main venv's build is untouched) and a venv. Steps: build the extension for
# sm_90 only; collect every test (nothing may fail to import); run selftest
# with Triton under its interpreter (every op on every backend here, forward and
# gradients, against the float64 reference: about 20 s, where the interpreter
# tests take 6 minutes of CI's 40 and repeat the main suite's) and the sm_90
# compile test of every Triton kernel.
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
pip install -q "torch==$TORCH" setuptools wheel pybind11 ninja numpy tqdm pytest pytest-timeout hypothesis
python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

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
