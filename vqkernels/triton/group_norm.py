"""GroupNorm with an optional SiLU after it, Triton kernels (math in
vqkernels/reference/group_norm.py).

x (B, C, HW) is NCHW or NHWC (``CHANNELS_LAST``), read in (pixel, channel)
tiles whose unit-stride axis the layout sets. ``_group_stats_kernel``: one
program a (b, g), two passes over the group's C / G x HW elements in float32
(the sum of x - x0, x0 its first element, then the squares about the mean).
``_group_norm_apply_kernel``: one program a (b, pixel block, channel block),
y = act((x - mean) a + bias) with a = rstd w. x is read three times, y written
once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device, _interpreter


@triton.jit
def _tile_offsets(p0, c0, HW, C, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr, C_LIMIT):
    """Offsets in one sample and the mask of the (BLOCK_P pixels, BLOCK_C channels) tile at
    (p0, c0), channels below C_LIMIT."""
    ps = p0 + tl.arange(0, BLOCK_P)
    cs = c0 + tl.arange(0, BLOCK_C)
    mask = (ps < HW)[:, None] & (cs < C_LIMIT)[None, :]
    if CHANNELS_LAST:
        offs = ps[:, None] * C + cs[None, :]
    else:
        offs = cs[None, :] * HW + ps[:, None]
    return offs, mask


@triton.jit
def _group_stats_kernel(x_ptr, mean_ptr, rstd_ptr, C, HW, CG, G, eps,
                        CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """mean and rstd = 1 / sqrt(var + eps) of group (b, g) = program_id, over CG x HW."""
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    x_ptr += b.to(tl.int64) * C * HW
    c0 = g * CG
    first = tl.load(x_ptr + (c0 if CHANNELS_LAST else c0 * HW)).to(tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in _interpreter.runtime_range(0, HW, BLOCK_P):
        offs, mask = _tile_offsets(p0, c0, HW, C, CHANNELS_LAST, BLOCK_P, BLOCK_C, c0 + CG)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(mask, x - first, 0.0)
    n = CG * HW
    mean = first + tl.sum(tl.sum(acc, axis=1), axis=0) / n
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in _interpreter.runtime_range(0, HW, BLOCK_P):
        offs, mask = _tile_offsets(p0, c0, HW, C, CHANNELS_LAST, BLOCK_P, BLOCK_C, c0 + CG)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean, 0.0)
        acc += d * d
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / n
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, tl.rsqrt(var + eps))


@triton.jit
def _group_norm_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, HW, CG, G,
                             CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act((x - mean) a + bias) on one tile: program (b * pixel blocks + block, channel
    block)."""
    blocks = tl.cdiv(HW, BLOCK_P)
    pid = tl.program_id(0)
    b, p0 = pid // blocks, (pid % blocks) * BLOCK_P
    c0 = tl.program_id(1) * BLOCK_C
    cs = c0 + tl.arange(0, BLOCK_C)
    cmask = cs < C
    stat = b * G + cs // CG
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    a = tl.load(rstd_ptr + stat, mask=cmask, other=0.0) * tl.load(
        w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    sample = b.to(tl.int64) * C * HW
    offs, mask = _tile_offsets(p0, c0, HW, C, CHANNELS_LAST, BLOCK_P, BLOCK_C, C)
    x = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
    v = (x - mean[None, :]) * a[None, :] + bias[None, :]
    if SILU:
        v = v * tl.sigmoid(v)
    tl.store(y_ptr + sample + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def _tiles(channels_last: bool, channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): the unit-stride axis 64 to 128 wide."""
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), 64)
        return max(16, 2048 // block_c), block_c
    return 128, 16


def group_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       num_groups: int, eps: float, silu: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y in x's layout, mean, rstd (B, G) float32) for x (B, C, *spatial), contiguous or
    channels-last (4-D), weight and bias (C,) contiguous."""
    b, c = x.shape[:2]
    hw = x.numel() // (b * c) if b * c else 0
    channels_last = not x.is_contiguous()
    y = torch.empty_like(x)
    mean = torch.empty(b, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    per_group = c // num_groups
    block_p, block_c = _tiles(channels_last, c)
    stats_c = triton.next_power_of_2(per_group)
    with _device.on_device(x):
        _group_stats_kernel[(b * num_groups,)](
            x, mean, rstd, c, hw, per_group, num_groups, eps, CHANNELS_LAST=channels_last,
            BLOCK_P=max(16, 4096 // stats_c), BLOCK_C=stats_c)
        grid = (b * triton.cdiv(hw, block_p), triton.cdiv(c, block_c))
        _group_norm_apply_kernel[grid](
            x, y, weight, bias, mean, rstd, c, hw, per_group, num_groups,
            CHANNELS_LAST=channels_last, SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c)
    return y, mean, rstd
