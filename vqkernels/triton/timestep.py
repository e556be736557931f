"""Sinusoidal timestep embedding, Triton kernel (math in vqkernels/reference/timestep.py)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device, _math


@triton.jit
def _timestep_embedding_kernel(
    t_ptr, out_ptr, n, dim, half, neg_log_max_period, freq_denominator, scale,
    FLIP_SIN_TO_COS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """A (BLOCK_N rows) x (BLOCK_F frequencies) tile of the embedding.

        arg = scale * (t[n] * exp(-log(max_period) * i / (half - shift)))
        out[n, i], out[n, half + i] = cos(arg), sin(arg)   (swapped unless FLIP_SIN_TO_COS)

    plus the zero column of an odd ``dim``. Store-bound: N * dim * sizeof(out)
    bytes written, N * sizeof(t) read.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    freqs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_ok = rows < n
    t = tl.load(t_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    # Precise exp/sin/cos: approximate ones, at |arg| ~ 1000, would exceed the
    # float32 reference's error.
    freq = _math.exp(neg_log_max_period * freqs.to(tl.float32) / freq_denominator)
    arg = scale * (t[:, None] * freq[None, :])
    cos, sin = _math.cos(arg), _math.sin(arg)
    first, second = (cos, sin) if FLIP_SIN_TO_COS else (sin, cos)
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * dim
    mask = row_ok[:, None] & (freqs < half)[None, :]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_rows + freqs[None, :], first.to(out_ty), mask=mask)
    tl.store(out_rows + half + freqs[None, :], second.to(out_ty), mask=mask)
    if dim % 2 == 1:
        zero_mask = row_ok & (tl.program_id(1) == 0)
        tl.store(out_ptr + rows.to(tl.int64) * dim + (dim - 1),
                 tl.zeros_like(t).to(out_ty), mask=zero_mask)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float, flip_sin_to_cos: bool,
                       downscale_freq_shift: float, scale: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """Launch the kernel on validated inputs: t (N,) on the GPU (or CPU under the interpreter)."""
    t = t.contiguous()
    n, half = t.shape[0], dim // 2
    out = torch.empty((n, dim), dtype=dtype, device=t.device)
    if n == 0:
        return out
    block_f = min(triton.next_power_of_2(max(half, 1)), 128)
    block_n = max(1, 2048 // block_f)
    grid = (triton.cdiv(n, block_n), max(1, triton.cdiv(half, block_f)))
    with _device.on_device(t):
        _timestep_embedding_kernel[grid](
            t, out, n, dim, half, -math.log(max_period),
            float(half - downscale_freq_shift) or 1.0, float(scale),
            FLIP_SIN_TO_COS=flip_sin_to_cos, BLOCK_N=block_n, BLOCK_F=block_f)
    return out
