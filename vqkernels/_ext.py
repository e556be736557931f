"""Loads the compiled extension vqkernels._C, remembering why when it cannot.

Importing it registers the C++ ops as torch.ops.vqkernels.*. The package works
without it: the reference and Triton backends need no compiled code.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import warnings

import torch

BUILT_FOR_MARKER = re.compile(rb"vqkernels-built-for-torch=([^\x00]+)\x00")


def built_for_torch() -> str | None:
    """The torch version the extension file was built against, read from its bytes (so it
    works when the module cannot load); None when there is no built extension."""
    try:
        spec = importlib.util.find_spec("vqkernels._C")
        with open(spec.origin, "rb") as f:
            found = BUILT_FOR_MARKER.search(f.read())
    except (ImportError, OSError, AttributeError, TypeError):  # no spec, or no file behind it
        return None
    return found.group(1).decode() if found else None


def load_failure_message(error: str, built_for: str | None, installed: str) -> str:
    """What to tell a user whose extension did not load, and what to do about it."""
    message = (f"vqkernels: the compiled kernels (vqkernels._C) did not load ({error}); the C++ "
               f"CPU and CUDA backends are off, and backend='auto' uses Triton or the reference.")
    if built_for is None:
        return message + " No built extension was found: pip install --no-build-isolation ."
    if built_for != installed:
        return (message + f" It was built for torch {built_for}, and torch {installed} is "
                f"installed: rebuild it (pip install --no-build-isolation .) or install torch "
                f"{built_for}.")
    return message + f" It was built for this torch ({installed})."


try:
    from vqkernels import _C
    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(error).__name__}: {error}"
    warnings.warn(load_failure_message(LOAD_ERROR, built_for_torch(), torch.__version__),
                  RuntimeWarning, stacklevel=2)


def build_info() -> dict:
    """What the extension was built with (empty when it is not loaded)."""
    return dict(_C.build_info()) if _C is not None else {}


@functools.cache
def cuda_attention_head_dims() -> tuple[int, ...]:
    """Head dims the CUDA attention kernel was compiled for (() without CUDA kernels)."""
    return tuple(_C.cuda_attention_head_dims()) if _C is not None else ()


def cpu_kernels_reasons() -> list[str]:
    """Why the C++ CPU kernels cannot be used ([] when they can)."""
    return [] if _C is not None else [f"vqkernels._C is not loaded ({LOAD_ERROR})"]


def cuda_kernels_reasons() -> list[str]:
    """Why the CUDA kernels cannot be used ([] when they can)."""
    if _C is None:
        return cpu_kernels_reasons()
    if not build_info().get("cuda"):
        return ["vqkernels._C was built without CUDA kernels"]
    return []
