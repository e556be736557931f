"""What the float ops' validation shares: the dtypes they take and the first check of a tensor."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the GPU kernels' (no float64)


def check_float_tensor(name: str, v) -> None:
    """A TypeError naming ``name`` unless ``v`` is a tensor of one of FLOAT_DTYPES."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {v.dtype}")
