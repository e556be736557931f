"""Loads the compiled extension vqkernels._C, remembering why when it cannot.

Importing it registers the C++ ops as torch.ops.vqkernels.*. The package works
without it: the reference and Triton backends need no compiled code. The
extension is built on torch's stable ABI, so it loads in every torch from the
version it targets on (``built_for_torch_target()``); under an older torch, or
with CUDA kernels under a torch without CUDA or of another CUDA major, it is not
even imported, since such an import may crash rather than fail.
"""
from __future__ import annotations

import functools
import importlib.util
import mmap
import re
import warnings

import torch

BUILD_MARKER = re.compile(rb"vqkernels-built-(for-torch|for-torch-target|with-cuda)=([^\x00]*)\x00")


def build_markers() -> dict[str, str]:
    """{"for-torch": the torch whose headers the extension file was built with,
    "for-torch-target": the oldest torch it loads in, "with-cuda": the CUDA of its kernels
    ("" without)}, read from the file's bytes, so without importing it; {} when there is no
    built extension."""
    try:
        spec = importlib.util.find_spec("vqkernels._C")
        with open(spec.origin, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return {key.decode(): value.decode() for key, value in BUILD_MARKER.findall(m)}
    except (ImportError, OSError, ValueError, AttributeError, TypeError):  # no spec or no file
        return {}


def built_for_torch_target() -> str | None:
    """The oldest torch the extension file loads in ("2.10"; None: no built extension)."""
    return build_markers().get("for-torch-target")


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def incompatibility(target: str | None, built_cuda: str | None, installed: str,
                    installed_cuda: str | None) -> str | None:
    """Why an extension for torch >= ``target`` with kernels for CUDA ``built_cuda`` ("" or
    None: no CUDA kernels) must not be imported under torch ``installed``, whose CUDA is
    ``installed_cuda`` (None for a CPU build); None when it may."""
    if target is None:
        return None
    if _release(installed) < _release(target) or _release(installed)[0] != _release(target)[0]:
        return f"built for torch {target} or a later 2.x, and torch {installed} is installed"
    if built_cuda and installed_cuda is None:
        return f"its CUDA kernels need a CUDA build of torch, and torch {installed} has no CUDA"
    if built_cuda and built_cuda.split(".")[0] != installed_cuda.split(".")[0]:
        return (f"its kernels are built for CUDA {built_cuda}, and torch {installed} for "
                f"CUDA {installed_cuda}")
    return None


def load_failure_message(error: str, target: str | None, installed: str) -> str:
    """What to tell a user whose extension did not load, and what to do about it."""
    message = (f"vqkernels: the compiled kernels (vqkernels._C) did not load ({error}); the C++ "
               f"CPU and CUDA backends are off, and backend='auto' uses Triton or the reference.")
    if target is None:
        return message + " No built extension was found: pip install --no-build-isolation ."
    return (message + f" It was built for torch >= {target}, and torch {installed} is "
            f"installed: install a torch >= {target} with the CUDA of the vqkernels wheel "
            f"(its version label), or rebuild from source (pip install --no-build-isolation .).")


def _load():
    """(the extension module or None, why it is not loaded or None)."""
    markers = build_markers()
    reason = incompatibility(markers.get("for-torch-target"), markers.get("with-cuda"),
                             torch.__version__, torch.version.cuda)
    if reason is not None:
        return None, f"not imported: {reason}"
    try:
        from vqkernels import _C as module
    except ImportError as error:  # not built, or a build that does not link against this torch
        return None, f"{type(error).__name__}: {error}"
    return module, None


_C, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(load_failure_message(LOAD_ERROR, built_for_torch_target(), torch.__version__),
                  RuntimeWarning, stacklevel=2)

BUILD_FACTS = ("version", "torch_version", "torch_target", "openmp", "cuda", "cuda_version",
               "cuda_archs", "cpu_search_screen")
FLAGS = ("openmp", "cuda", "cpu_search_screen")


def build_info() -> dict:
    """What the extension was built with, and whether its fp32 CPU search screens with bf16
    products on this processor (empty when it is not loaded): the module's attributes,
    flags as bools."""
    if _C is None:
        return {}
    info = {key: getattr(_C, key) for key in BUILD_FACTS}
    return {**info, **{flag: bool(info[flag]) for flag in FLAGS}}


@functools.cache
def cuda_attention_head_dims() -> tuple[int, ...]:
    """Head dims the CUDA attention kernel was compiled for (() without CUDA kernels)."""
    return tuple(_C.cuda_attention_head_dims) if _C is not None else ()


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
