"""Argument checks of ops.ddim_step: a ``ValueError`` / ``TypeError`` naming the argument."""
from __future__ import annotations

import math

import torch

from vqkernels.reference import ddim as reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def validate_timestep(timestep, sample, num_train):
    if isinstance(timestep, torch.Tensor):
        if timestep.dtype.is_floating_point or timestep.dtype == torch.bool:
            raise TypeError(f"timestep must be an integer tensor, got {timestep.dtype}")
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] != sample.shape[0]):
            raise ValueError(f"timestep must be 0-d or (B,) = ({sample.shape[0]},), got shape "
                             f"{tuple(timestep.shape)}")
        checkable = timestep.device.type == "cpu" and not torch.compiler.is_compiling()
        if checkable and timestep.numel():  # without a device sync or a graph break
            low, high = int(timestep.min()), int(timestep.max())
            if low < 0 or high >= num_train:
                raise ValueError(f"timestep must be in [0, {num_train}), got values in "
                                 f"[{low}, {high}]")
        return
    if isinstance(timestep, bool) or not isinstance(timestep, int):
        raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
    if not 0 <= timestep < num_train:
        raise ValueError(f"timestep must be in [0, {num_train}), got {timestep}")


def validate_model_output(model_output, sample, guidance_scale, uncond_output, guidance_channels):
    b = sample.shape[0]
    batched = guidance_scale is not None and uncond_output is None
    want_batch = 2 * b if batched else b
    if guidance_scale is None and uncond_output is not None:
        raise ValueError("uncond_output needs guidance_scale")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    outputs = [("model_output", model_output)]
    if uncond_output is not None:
        if not isinstance(uncond_output, torch.Tensor):
            raise TypeError(f"uncond_output must be a torch.Tensor, got {type(uncond_output).__name__}")
        if uncond_output.shape != model_output.shape or uncond_output.dtype != model_output.dtype:
            raise ValueError(f"uncond_output must match model_output's shape and dtype, got "
                             f"{tuple(uncond_output.shape)} {uncond_output.dtype}")
        outputs.append(("uncond_output", uncond_output))
    for name, out in outputs:
        if out.device != sample.device:
            raise ValueError(f"{name} must be on the sample's device {sample.device}, got {out.device}")
        ok = (out.dim() == sample.dim() and out.shape[0] == want_batch
              and out.shape[2:] == sample.shape[2:]
              and (sample.dim() < 2 or out.shape[1] >= sample.shape[1]))
        if not ok:
            what = "2B = [cond; uncond]" if batched else "B"
            raise ValueError(f"{name} must have shape ({what}, >= C, *spatial) for a sample of "
                             f"shape {tuple(sample.shape)}, got {tuple(out.shape)}")
    channels = sample.shape[1] if sample.dim() >= 2 else 1
    if guidance_channels is not None and not (
            isinstance(guidance_channels, int) and 0 <= guidance_channels <= channels):
        raise ValueError(f"guidance_channels must be an int in [0, {channels}], got "
                         f"{guidance_channels!r}")


def validate_step(model_output, timestep, sample, alphas_cumprod, num_inference_steps,
                  final_alpha_cumprod, eta, prediction_type, clip_sample_range,
                  dynamic_thresholding_ratio, sample_max_value, guidance_scale, uncond_output,
                  guidance_channels, variance_noise, noise_seed):
    """Every argument of ops.ddim_step, before any kernel runs."""
    for name, x in (("model_output", model_output), ("sample", sample),
                    ("alphas_cumprod", alphas_cumprod)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if sample.dim() < 1:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D table, got shape "
                         f"{tuple(alphas_cumprod.shape)}")
    num_train = alphas_cumprod.shape[0]
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_train:
        raise ValueError(f"num_inference_steps must be an int in [1, {num_train}] "
                         f"(len(alphas_cumprod)), got {num_inference_steps!r}")
    if prediction_type not in reference.PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {reference.PREDICTION_TYPES}, "
                         f"got {prediction_type!r}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not 0 <= float(final_alpha_cumprod) <= 1:
        raise ValueError(f"final_alpha_cumprod must be in [0, 1], got {final_alpha_cumprod!r}")
    if not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be positive, got {clip_sample_range!r}")
    if not 0 <= dynamic_thresholding_ratio <= 1:
        raise ValueError("dynamic_thresholding_ratio must be in [0, 1], got "
                         f"{dynamic_thresholding_ratio!r}")
    if not sample_max_value >= 1:
        raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value!r}")
    validate_timestep(timestep, sample, num_train)
    validate_model_output(model_output, sample, guidance_scale, uncond_output, guidance_channels)
    if variance_noise is not None:
        if not isinstance(variance_noise, torch.Tensor) or variance_noise.shape != sample.shape:
            raise ValueError(f"variance_noise must be a tensor of the sample's shape "
                             f"{tuple(sample.shape)}")
        if variance_noise.device != sample.device or not variance_noise.dtype.is_floating_point:
            raise ValueError("variance_noise must be a floating tensor on the sample's device")
    if noise_seed is not None:
        if (not isinstance(noise_seed, torch.Tensor) or noise_seed.numel() != 1
                or noise_seed.dtype != torch.int64 or noise_seed.device != sample.device):
            raise ValueError("noise_seed must be a one-element int64 tensor on the sample's device")
        if variance_noise is not None:
            raise ValueError("give variance_noise or noise_seed, not both")
    if sample.numel() >= 2 ** 31:
        raise ValueError(f"sample must have fewer than 2^31 elements, got {sample.numel()}")
