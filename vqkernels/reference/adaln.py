"""Reference adaLN-Zero building blocks of DiT (Peebles & Xie, 2023).

Pure PyTorch, device-agnostic: the specification the fast backends are
tested against.
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Affine-free LayerNorm over channels, then per-sample shift and scale.

    For x (B, N, C), shift and scale (B, C)::

        mu[b, n]  = mean_c x[b, n, c]
        var[b, n] = mean_c (x[b, n, c] - mu[b, n])^2          (biased)
        out[b, n, c] = (x[b, n, c] - mu) / sqrt(var + eps) * (1 + scale[b, c]) + shift[b, c]

    i.e. DiT's ``modulate(norm(x), shift, scale)`` with
    ``norm = LayerNorm(C, elementwise_affine=False, eps=1e-6)``. Math in
    float32 (float64 for float64 x); output in x's dtype.
    """
    dtype = _compute_dtype(x)
    xf = x.to(dtype)
    mean = xf.mean(dim=-1, keepdim=True)
    centered = xf - mean
    var = centered.square().mean(dim=-1, keepdim=True)
    normed = centered * torch.rsqrt(var + eps)
    out = normed * (1.0 + scale.to(dtype)[:, None, :]) + shift.to(dtype)[:, None, :]
    return out.to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gated residual add of adaLN-Zero: ``out[b, n, c] = x[b, n, c] + gate[b, c] * y[b, n, c]``.

    x, y (B, N, C), gate (B, C). Math in float32 (float64 for float64 x);
    output in x's dtype.
    """
    dtype = _compute_dtype(x)
    out = x.to(dtype) + gate.to(dtype)[:, None, :] * y.to(dtype)
    return out.to(x.dtype)
