"""adaLN-Zero glue of a DiT block (Peebles & Xie, 2023): the specification (pure PyTorch).

x and y are (B, T, D); the conditioning tensors shift, scale and gate are per
sample (B, D) or per token (B, T, D). Math in float32 (float64 for float64
x); results in x's dtype. Differentiable by autograd.
"""
from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_token(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, D) -> (B, 1, D), broadcast over tokens; (B, T, D) as it is."""
    param = param.to(dtype)
    return param[:, None, :] if param.dim() == 2 else param


def layer_norm_statistics(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), each (B, T) in the compute dtype, over the last dim of x.

        mean = mean_d x[..., d],  var = mean_d (x - mean)^2 (biased),  rstd = 1 / sqrt(var + eps)
    """
    xf = x.to(_compute_dtype(x))
    mean = xf.mean(dim=-1)
    var = (xf - mean[..., None]).square().mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                        eps: float = 1e-6) -> torch.Tensor:
    """Affine-free LayerNorm over the last dim, then shift and scale::

        h[b, t, d] = (x[b, t, d] - mean[b, t]) * rstd[b, t] * (1 + scale[b, d]) + shift[b, d]

    (scale[b, t, d] and shift[b, t, d] when per token).

    DiT's ``modulate(norm(x), shift, scale)`` with
    ``norm = LayerNorm(D, elementwise_affine=False, eps=1e-6)``.
    """
    dtype = _compute_dtype(x)
    mean, rstd = layer_norm_statistics(x, eps)
    normed = (x.to(dtype) - mean[..., None]) * rstd[..., None]
    return (normed * (1 + _per_token(scale, dtype)) + _per_token(shift, dtype)).to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gated residual add of adaLN-Zero: ``x[b, t, d] + gate[b, (t,) d] * y[b, t, d]``."""
    dtype = _compute_dtype(x)
    return (x.to(dtype) + _per_token(gate, dtype) * y.to(dtype)).to(x.dtype)


def gated_residual_layer_norm_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
    scale: torch.Tensor, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = gated_residual(x, gate, y)``, ``h = layer_norm_modulate(x_new, shift, scale)``.

    The step between a DiT block's attention and its MLP. h normalizes x_new
    as stored (rounded to x's dtype), exactly what the unfused block computes.
    """
    x_new = gated_residual(x, gate, y)
    return x_new, layer_norm_modulate(x_new, shift, scale, eps)
