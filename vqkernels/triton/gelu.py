"""GELU with the tanh approximation, Triton kernels (math in vqkernels/reference/gelu.py).

Element-wise over a contiguous tensor, ``BLOCK`` elements a program, in float32:
with u = sqrt(2 / pi) (x + 0.044715 x^3) and e = exp(-2|u|) <= 1,

    s = sigmoid(2u) = 1 / (1 + e) (u >= 0) or e / (1 + e),  s (1 - s) = e / (1 + e)^2
    y = x s,  dx = dy (s + 2 x s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 x^2))

so no exponent overflows and x s keeps its relative accuracy for x < -3. The
forward may write over its input (y_ptr = x_ptr): each element is read first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device

BLOCK = 1024
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
CUBIC = tl.constexpr(0.044715)


@triton.jit
def _gelu_parts(x):
    """(s, s (1 - s)) of x, float32."""
    u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x)
    minus_abs = tl.where(u < 0.0, u, -u)
    e = tl.exp(2.0 * minus_abs)
    q = 1.0 / (1.0 + e)
    return tl.where(u < 0.0, e * q, q), e * q * q


@triton.jit
def _gelu_forward_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = gelu(x) on elements [pid * BLOCK, (pid + 1) * BLOCK)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, _ = _gelu_parts(x)
    tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_backward_kernel(dy_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    """dx = dy gelu'(x) on elements [pid * BLOCK, (pid + 1) * BLOCK)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, s_one_minus_s = _gelu_parts(x)
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x)
    grad = s + 2.0 * x * s_one_minus_s * du
    tl.store(dx_ptr + offs, (dy * grad).to(dx_ptr.dtype.element_ty), mask=mask)


def gelu_forward(x: torch.Tensor, out: torch.Tensor) -> None:
    """out = gelu(x); both contiguous, of one shape and dtype; out may be x."""
    n = x.numel()
    if n:
        with _device.on_device(x):
            _gelu_forward_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, BLOCK=BLOCK)


def gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad * gelu'(x), contiguous inputs of one shape and dtype."""
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        with _device.on_device(x):
            _gelu_backward_kernel[(triton.cdiv(n, BLOCK),)](grad, x, dx, n, BLOCK=BLOCK)
    return dx
