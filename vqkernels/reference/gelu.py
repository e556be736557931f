"""GELU with the tanh approximation (DiT's MLP activation): the specification (pure PyTorch).

    gelu(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u),  u = sqrt(2 / pi) (x + 0.044715 x^3)

the ``F.gelu(x, approximate="tanh")`` of PyTorch. Written as ``x sigmoid(2u)``,
which is the same function without the cancellation of ``1 + tanh(u)`` for
x < -3. Math in float32 (float64 for float64 x); results in x's dtype.
Differentiable by autograd.
"""
from __future__ import annotations

import math

import torch

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(2u)``, u = sqrt(2 / pi) (x + 0.044715 x^3), element-wise."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    u = SQRT_2_OVER_PI * (xf + CUBIC * xf * xf * xf)
    return (xf * torch.sigmoid(2.0 * u)).to(x.dtype)


def gelu_tanh_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * gelu'(x)``: with s = sigmoid(2u),

        gelu'(x) = s + 2 x s (1 - s) sqrt(2 / pi) (1 + 3 * 0.044715 x^2)
    """
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    s = torch.sigmoid(2.0 * SQRT_2_OVER_PI * (xf + CUBIC * xf * xf * xf))
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * xf * xf)
    return (grad.to(xf.dtype) * (s + 2.0 * xf * s * (1.0 - s) * du)).to(x.dtype)
