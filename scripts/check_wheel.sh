#!/usr/bin/env bash
# The built wheel as a user without compilers gets it, and the sdist as a
# packager does. CI runs it after the README's test command, which built
# dist/vqkernels-*.whl and ran the test suite against it.
#
#   scripts/check_wheel.sh [WORKDIR]   (default: build/wheel-check)
#
# 1. auditwheel: `show` reads the wheel; `repair`, excluding the libraries torch
#    ships (libtorch*, libc10*, libcudart), writes a manylinux wheel.
# 2. That manylinux wheel goes into a fresh venv, and with a PATH that has no
#    compiler (no gcc, cc, c++, nvcc; CC / CXX unset) and a working directory
#    outside the source tree: `info` must show the C++ CPU and CUDA kernels, and
#    selftest (Triton under its interpreter) must pass.
# 3. The sdist builds, and a wheel built from it (C++ CPU kernels only, to keep
#    CI short; the CUDA sources are the same files) imports with its kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORKDIR=$(mkdir -p "${1:-build/wheel-check}" && cd "${1:-build/wheel-check}" && pwd)
shopt -s nullglob
wheels=(dist/vqkernels-*.whl)
[[ ${#wheels[@]} == 1 ]] || { echo "expected one wheel in dist/, found ${#wheels[@]}" >&2; exit 1; }
WHEEL=${wheels[0]}
PYTHON=${PYTHON:-python3.11}

echo "== auditwheel show / repair $WHEEL ($(du -m "$WHEEL" | cut -f1) MiB)"
rm -rf "$WORKDIR/wheelhouse"
auditwheel show "$WHEEL"
auditwheel repair --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*' \
  --wheel-dir "$WORKDIR/wheelhouse" "$WHEEL"
repaired=("$WORKDIR"/wheelhouse/vqkernels-*manylinux*.whl)
[[ ${#repaired[@]} == 1 ]]

echo "== a fresh venv with the manylinux wheel"
rm -rf "$WORKDIR/venv"
"$PYTHON" -m venv "$WORKDIR/venv"
"$WORKDIR/venv/bin/pip" install -q "${repaired[0]}"

echo "== no compiler on the PATH: info and selftest"
# PATH holds links to the venv's executables and nothing else. Python itself is
# run by its path in the venv: through a link elsewhere it would not find the
# venv's pyvenv.cfg and would run without the venv's packages.
BARE="$WORKDIR/bare-bin"
rm -rf "$BARE" && mkdir -p "$BARE" && ln -s "$WORKDIR"/venv/bin/* "$BARE"/
no_compilers=(env -i HOME="$HOME" PATH="$BARE" LANG=C.UTF-8)
VENV_PYTHON="$WORKDIR/venv/bin/python"
for tool in gcc cc c++ g++ clang nvcc; do
  if "${no_compilers[@]}" "$VENV_PYTHON" -c "import shutil, sys; sys.exit(shutil.which('$tool') is None)"; then
    echo "$tool is on the bare PATH" >&2; exit 1
  fi
done
info=$(cd "$WORKDIR" && "${no_compilers[@]}" "$VENV_PYTHON" -P -m vqkernels info)
echo "$info" | head -3
grep -q "C++ CPU kernels: yes" <<<"$info" && grep -q "CUDA kernels: yes" <<<"$info"
grep -q "from $WORKDIR/venv" <<<"$(cd "$WORKDIR" && "${no_compilers[@]}" "$VENV_PYTHON" -P -c \
  'import vqkernels, pathlib; print("from", pathlib.Path(vqkernels.__file__).parent)')"
(cd "$WORKDIR" && "${no_compilers[@]}" TRITON_INTERPRET=1 "$VENV_PYTHON" -P -m vqkernels selftest --device cpu | tail -1)

echo "== the sdist, and a C++-CPU wheel built from it"
rm -rf "$WORKDIR/sdist" "$WORKDIR/sdist-wheel"
python -m build --sdist --no-isolation --outdir "$WORKDIR/sdist" "$ROOT" >/dev/null
sdists=("$WORKDIR"/sdist/vqkernels-*.tar.gz)
echo "${sdists[0]}"
VQKERNELS_BUILD_CUDA=0 pip wheel -q --no-build-isolation --no-deps --wheel-dir "$WORKDIR/sdist-wheel" "${sdists[0]}"
from_sdist=("$WORKDIR"/sdist-wheel/vqkernels-*+cpu-*.whl)
"$WORKDIR/venv/bin/pip" install -q --force-reinstall --no-deps "${from_sdist[0]}"
info=$(cd "$WORKDIR" && "${no_compilers[@]}" "$VENV_PYTHON" -P -m vqkernels info)
echo "$info" | head -3
grep -q "C++ CPU kernels: yes" <<<"$info"
echo "== wheel checks passed"
