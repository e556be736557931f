"""Precise transcendentals for Triton kernels.

``tl.exp``, ``tl.sin`` and ``tl.cos`` lower to approximate PTX instructions on
NVIDIA GPUs (``ex2.approx`` and friends); libdevice's are correctly rounded to
a few ulp. The Triton interpreter has no libdevice, but its ``tl`` functions
are numpy's, which are precise, so under the interpreter those are used.
"""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def exp(x):
    if _INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def sin(x):
    if _INTERPRETED:
        return tl.sin(x)
    else:
        return libdevice.sin(x)


@triton.jit
def cos(x):
    if _INTERPRETED:
        return tl.cos(x)
    else:
        return libdevice.cos(x)


@triton.jit
def log(x):
    if _INTERPRETED:
        return tl.log(x)
    else:
        return libdevice.log(x)
