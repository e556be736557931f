"""Argument checks of ops.ddim_step: the timestep and the model outputs against the sample."""
from __future__ import annotations

import math

import torch


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
