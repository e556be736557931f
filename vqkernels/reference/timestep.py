"""Sinusoidal timestep embedding: the specification (pure PyTorch)."""
from __future__ import annotations

import math

import torch


def timestep_frequencies(dim: int, max_period: float, downscale_freq_shift: float,
                         dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """``freq_i = exp(-log(max_period) * i / (dim // 2 - downscale_freq_shift))``, i < dim // 2."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=device)
    return torch.exp(exponent / (half - downscale_freq_shift)) if half else exponent


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    math_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Embed timesteps ``t`` (N,) into (N, dim) sinusoids.

        half   = dim // 2
        freq_i = exp(-log(max_period) * i / (half - downscale_freq_shift)),  i < half
        arg    = scale * (t[:, None] * freq[None, :])
        out    = [cos(arg), sin(arg)] if flip_sin_to_cos else [sin(arg), cos(arg)]

    plus a zero column when ``dim`` is odd. The defaults are DiT's
    ``TimestepEmbedder.timestep_embedding``; ``flip_sin_to_cos=False,
    downscale_freq_shift=1`` are diffusers' ``get_timestep_embedding``
    defaults. The math runs in ``math_dtype``: float32 as both of them do
    (``t`` is converted first), float64 for the ground truth of tests. The
    result has dtype ``dtype`` (default float32).
    """
    dtype = dtype or torch.float32
    freqs = timestep_frequencies(dim, max_period, downscale_freq_shift, math_dtype, t.device)
    args = scale * (t.to(math_dtype)[:, None] * freqs[None, :])
    waves = [torch.cos(args), torch.sin(args)]
    if not flip_sin_to_cos:
        waves.reverse()
    if dim % 2:
        waves.append(args.new_zeros(args.shape[0], 1))
    return torch.cat(waves, dim=-1).to(dtype)
