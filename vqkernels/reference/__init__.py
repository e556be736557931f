"""Pure-PyTorch specifications of every op: readable, device-agnostic, float64-capable.

Every other backend is tested against these.
"""
from vqkernels.reference import adaln, attention, ddim, ema, gelu, search, timestep

__all__ = ["adaln", "attention", "ddim", "ema", "gelu", "search", "timestep"]
