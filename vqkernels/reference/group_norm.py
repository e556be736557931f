"""GroupNorm with an optional SiLU after it (a VQGAN block's ``swish(norm(x))``): the spec.

x is (B, C, *spatial); its C channels form G groups of C / G. Per (b, g), over
the group's C / G * HW elements::

    mean = mean x,  var = mean (x - mean)^2 (biased),  rstd = 1 / sqrt(var + eps)
    v[b, c, p] = (x[b, c, p] - mean[b, g]) rstd[b, g] w[c] + b[c]
    y = v sigmoid(v) with silu, else v

Math in float32 (float64 for float64 x); y in x's dtype, mean and rstd (B, G) in
the math dtype. ``group_norm`` is differentiable by autograd; the kernels'
gradients are ``group_norm_backward``'s.
"""
from __future__ import annotations

import torch


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grouped(t: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, C, *spatial) -> (B, G, C / G, HW) in ``dtype``."""
    return t.to(dtype).reshape(t.shape[0], num_groups, t.shape[1] // num_groups, -1)


def _per_channel(p: torch.Tensor | None, fill: float, like: torch.Tensor,
                 num_groups: int) -> torch.Tensor:
    """weight or bias (C,) as (1, G, C / G, 1) in the math dtype; ``fill`` where not given."""
    c, dtype = like.shape[1], _math_dtype(like)
    p = torch.full((c,), fill, dtype=dtype, device=like.device) if p is None else p.to(dtype)
    return p.reshape(1, num_groups, c // num_groups, 1)


def group_norm_statistics(x: torch.Tensor, num_groups: int,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd), each (B, G) in the math dtype."""
    xg = _grouped(x, num_groups, _math_dtype(x))
    mean = xg.mean(dim=(2, 3))
    var = (xg - mean[:, :, None, None]).square().mean(dim=(2, 3))
    return mean, torch.rsqrt(var + eps)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5,
               silu: bool = False) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``, then ``F.silu`` when ``silu``."""
    mean, rstd = group_norm_statistics(x, num_groups, eps)
    xg = _grouped(x, num_groups, _math_dtype(x))
    v = ((xg - mean[:, :, None, None]) * rstd[:, :, None, None]
         * _per_channel(weight, 1.0, x, num_groups) + _per_channel(bias, 0.0, x, num_groups))
    y = v * torch.sigmoid(v) if silu else v
    return y.reshape(x.shape).to(x.dtype)


def group_norm_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, silu: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) from dy = ``grad``, with xhat = (x - mean) rstd and
    dv = dy (s + v s (1 - s)), s = sigmoid(v) (dv = dy without silu)::

        dweight[c] = sum_{b, p} dv xhat,  dbias[c] = sum_{b, p} dv,  g = dv w
        dx = rstd (g - mean_group g - xhat mean_group (g xhat))

    dx in x's dtype and shape (contiguous); dweight and dbias (C,) in the math dtype.
    """
    dtype = _math_dtype(x)
    num_groups, c = mean.shape[1], x.shape[1]
    xhat = (_grouped(x, num_groups, dtype) - mean[:, :, None, None]) * rstd[:, :, None, None]
    w = _per_channel(weight, 1.0, x, num_groups)
    dv = _grouped(grad, num_groups, dtype)
    if silu:
        v = xhat * w + _per_channel(bias, 0.0, x, num_groups)
        s = torch.sigmoid(v)
        dv = dv * s * (1 + v * (1 - s))
    dweight = (dv * xhat).sum(dim=(0, 3)).reshape(c)
    dbias = dv.sum(dim=(0, 3)).reshape(c)
    g = dv * w
    dx = rstd[:, :, None, None] * (g - g.mean(dim=(2, 3), keepdim=True)
                                   - xhat * (g * xhat).mean(dim=(2, 3), keepdim=True))
    return dx.reshape(x.shape).to(x.dtype), dweight, dbias
