"""One fused DDIM step, Triton kernel (math in vqkernels/reference/ddim.py::ddim_step,
mirrored from csrc/common/ddim.h); the launcher takes the ops layer's StepArgs."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device, _math

_PREDICTIONS = {"epsilon": 0, "sample": 1, "v_prediction": 2}
_BLOCK = 1024


@triton.jit
def _philox_normal(seed, offsets):
    """reference.ddim.philox_normal: Philox4x32-10 words, as tl.randn, with precise log/cos."""
    w0, w1, _, _ = tl.randint4x(seed, offsets)
    scale: tl.constexpr = 4.6566127342e-10
    v0, v1 = w0.to(tl.int32, bitcast=True), w1.to(tl.int32, bitcast=True)
    # Never NaN; NaN-keeping max only so the kernel holds no plain max.f32 (see the sm_90 test).
    u0 = tl.maximum(tl.where(v0 < 0, ~v0, v0).to(tl.float32) * scale, 1.0e-7,
                    propagate_nan=tl.PropagateNan.ALL)
    u1 = tl.where(v1 < 0, ~v1, v1).to(tl.float32) * scale
    return tl.sqrt_rn(-2.0 * _math.log(u0)) * _math.cos(6.283185307179586 * u1)


@triton.jit
def _clamp(x, low, high):
    """clamp that keeps NaN, as torch.clamp does (min.f32 / max.f32 alone would drop it)."""
    nan: tl.constexpr = tl.PropagateNan.ALL
    return tl.minimum(tl.maximum(x, low, propagate_nan=nan), high, propagate_nan=nan)


@triton.jit
def _ddim_step_kernel(
    x_ptr, cond_ptr, uncond_ptr, cond_stride, uncond_stride, t_ptr, t_stride, table_ptr,
    num_train, step_ratio,
    final_alpha, eta, clip_range, guidance_scale, guided_elems, noise_ptr, seed_ptr,
    threshold_ptr, prev_ptr, x0_ptr, m, blocks_per_row,
    PREDICTION: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr,
    THRESHOLD: tl.constexpr, USE_CLIPPED: tl.constexpr, NOISE: tl.constexpr,
    WRITE_PREV: tl.constexpr, WRITE_X0: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK elements j of sample b (program b * blocks_per_row + j-block):

        out  = j < guided_elems ? uncond + s * (cond - uncond) : cond
        x0   = (x - sqrt(1-a_t) out) / sqrt(a_t) | out | sqrt(a_t) x - sqrt(1-a_t) out
        x0   = clamp(x0, -r, r)  or  clamp(x0, -s_b, s_b) / s_b   (thresholding)
        eps  = out | (x - sqrt(a_t) x0_raw) / sqrt(1-a_t) | sqrt(a_t) out + sqrt(1-a_t) x
        prev = sqrt(a_prev) x0 + sqrt(max(1 - a_prev - std^2, 0)) eps + std * noise

    a_t = table[t_b], a_prev = table[t_b - step_ratio] (final_alpha before 0),
    std = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)). NOISE: 0 none,
    1 given, 2 Philox at counter b * M + j. Bandwidth-bound: per element one
    read of x, cond (and uncond, noise), one write of prev (and x0). One grid
    axis: axis 1 would cap the batch at 65535 on CUDA. Rows of x, cond and
    uncond have unit inner stride (the ops layer copies when they do not).
    """
    pid = tl.program_id(0)
    b = pid // blocks_per_row
    j = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = j < m
    t = tl.load(t_ptr + b * t_stride)
    valid = (t >= 0) & (t < num_train)
    prev_t = t - step_ratio
    # Both table reads stay in bounds for any device-side t; a bad t gives NaN output.
    a_t = tl.where(valid, tl.load(table_ptr + tl.where(valid, t, 0)), float("nan"))
    has_prev = valid & (prev_t >= 0)
    a_prev = tl.where(has_prev, tl.load(table_ptr + tl.where(has_prev, prev_t, 0)), final_alpha)
    b_t = 1.0 - a_t
    sqrt_a, sqrt_b = tl.sqrt_rn(a_t), tl.sqrt_rn(b_t)
    std = eta * tl.sqrt_rn((1.0 - a_prev) / b_t * (1.0 - a_t / a_prev))
    direction = tl.sqrt_rn(_clamp(1.0 - a_prev - std * std, 0.0, float("inf")))
    sqrt_a_prev = tl.sqrt_rn(a_prev)

    row = b.to(tl.int64) * m
    x = tl.load(x_ptr + row + j, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(cond_ptr + b.to(tl.int64) * cond_stride + j, mask=mask,
                  other=0.0).to(tl.float32)
    if GUIDED:
        uncond = tl.load(uncond_ptr + b.to(tl.int64) * uncond_stride + j,
                         mask=mask & (j < guided_elems), other=0.0).to(tl.float32)
        out = tl.where(j < guided_elems, uncond + guidance_scale * (out - uncond), out)

    if PREDICTION == 0:
        x0_raw = (x - sqrt_b * out) / sqrt_a
        eps = out
    elif PREDICTION == 1:
        x0_raw = out
        eps = (x - sqrt_a * x0_raw) / sqrt_b
    else:
        x0_raw = sqrt_a * x - sqrt_b * out
        eps = sqrt_a * out + sqrt_b * x
    x0 = x0_raw
    if THRESHOLD:
        s = tl.load(threshold_ptr + b)
        x0 = _clamp(x0, -s, s) / s
    elif CLIP:
        x0 = _clamp(x0, -clip_range, clip_range)
    if WRITE_X0:
        tl.store(x0_ptr + row + j, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    if WRITE_PREV:
        if USE_CLIPPED:
            eps = (x - sqrt_a * x0) / sqrt_b
        prev = sqrt_a_prev * x0 + direction * eps
        if NOISE == 1:
            prev += std * tl.load(noise_ptr + row + j, mask=mask, other=0.0).to(tl.float32)
        elif NOISE == 2:
            seed = tl.load(seed_ptr)
            prev += std * _philox_normal(seed, (row + j).to(tl.int32))
        tl.store(prev_ptr + row + j, prev.to(prev_ptr.dtype.element_ty), mask=mask)


def ddim_step(args):
    """Launch on validated inputs: ``args`` is vqkernels/ops/ddim.py's ``StepArgs``."""
    sample, cond, timesteps, table = args.sample, args.cond, args.timesteps, args.alphas_cumprod
    uncond = _or(args.uncond, cond)
    b, m = sample.shape
    prev = torch.empty_like(sample) if args.write_prev else sample.new_empty(0)
    x0 = torch.empty_like(sample) if args.write_x0 else sample.new_empty(0)
    if sample.numel() == 0 or not (args.write_prev or args.write_x0):
        return prev, x0
    blocks_per_row = triton.cdiv(m, _BLOCK)
    with _device.on_device(sample):
        _ddim_step_kernel[(b * blocks_per_row,)](
            sample, cond, uncond, cond.stride(0), uncond.stride(0), timesteps, timesteps.stride(0),
            table, table.shape[0], args.step_ratio, args.final_alpha_cumprod, args.eta,
            args.clip_sample_range, args.guidance_scale, args.guided_elems,
            _or(args.variance_noise, sample), _or(args.noise_seed, timesteps),
            _or(args.threshold, table), prev if args.write_prev else sample,
            x0 if args.write_x0 else sample, m, blocks_per_row,
            PREDICTION=_PREDICTIONS[args.prediction_type], GUIDED=args.uncond is not None,
            CLIP=args.clip_sample, THRESHOLD=args.threshold is not None,
            USE_CLIPPED=args.use_clipped_model_output, NOISE=_noise_mode(args),
            WRITE_PREV=args.write_prev, WRITE_X0=args.write_x0, BLOCK=_BLOCK)
    return prev, x0


def _noise_mode(args):
    """The kernel's NOISE: 0 none, 1 the given variance_noise, 2 Philox keyed by noise_seed."""
    if args.eta <= 0:
        return 0
    if args.variance_noise is not None:
        return 1
    return 2 if args.noise_seed is not None else 0


def _or(tensor, placeholder):
    """``tensor``, or a pointer the kernel never reads where it is absent."""
    return tensor if tensor is not None else placeholder
