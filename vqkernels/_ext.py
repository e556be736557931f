"""Loads the compiled extension vqkernels._C, remembering why when it cannot.

Importing it registers the C++ ops as torch.ops.vqkernels.*. The package works
without it: the reference and Triton backends need no compiled code.
"""
from __future__ import annotations

import functools

try:
    from vqkernels import _C
    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(error).__name__}: {error}"


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
