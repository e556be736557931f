"""Helpers shared by the test files (conftest.py keeps only fixtures and hooks).

Import as ``from helpers import ...``: pytest puts tests/ on sys.path. conftest.py
sets TRITON_INTERPRET before any test module (or this one) is imported.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqkernels

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
TESTS_DIR = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(vqkernels.__file__).resolve().parent.parent


def run_python(*args: str, cwd=TESTS_DIR, env=None, timeout: float = 600):
    """``python ARGS`` in a subprocess on the vqkernels this suite imported (the installed wheel
    under CI, not the source tree a working directory at the repository root would put first
    on sys.path): its package root leads PYTHONPATH, the working directory is not the root."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def kernel_backends(without=()):
    """(backend, device) pairs for the compiled/JIT backends, marked by where they run; ids in
    ``without`` left out (an op without that kernel)."""
    params = [
        pytest.param("cpu", "cpu", id="cpu"),
        pytest.param("triton", "cpu", id="triton-interp", marks=pytest.mark.interpreter),
        pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
        pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda),
    ]
    return [param for param in params if param.id not in without]


def backend_cases(cases, backends=None):
    """(backend, device, *case) params, the backend's marks kept.

    ``cases`` maps a backend's id (of ``backends``, default kernel_backends()) to
    the tuples of values that backend runs, e.g. only the dtypes it takes.
    """
    def name(case):
        return "-".join(str(v).replace("torch.", "") for v in case)
    return [pytest.param(*param.values, *case, marks=param.marks,
                         id="-".join(filter(None, (param.id, name(case)))))
            for param in backends or kernel_backends() for case in cases[param.id]]


def assert_close(actual, expected, what, atol=1e-12, rtol=1e-12):
    """torch.allclose, failing with the largest absolute error and both tensors."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{what}: max abs error {err:.3g}\nactual   {actual}\nexpected {expected}"
    )


# CUDA errors after which every later call in the process fails (a sticky context error).
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "misaligned address",
                      "illegal instruction", "device-side assert")


def breaks_cuda_context(error: BaseException) -> bool:
    """Did ``error`` leave this process's CUDA context unusable?"""
    message = str(error)
    return "CUDA error" in message and any(phrase in message for phrase in STICKY_CUDA_ERRORS)


def compile_fails_without_a_compiler(monkeypatch):
    """torch.compile returns functions that fail as they do where no C++ compiler is found."""
    def no_compiler(fn, **options):
        def fails(*args):
            raise RuntimeError("no C++ compiler. More detail")
        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
