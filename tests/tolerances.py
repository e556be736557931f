"""The numerics contract (../shared/DESIGN.md), in one table.

A fast backend's error against the float64 truth may be at most ``forward``
(or ``gradient``) times the error of the same-dtype reference on the same
inputs, plus ``atol``, a tiny absolute slack for cases where the reference
happens to be exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    forward: float = 2.0
    gradient: float = 3.0
    atol: float = 0.0


TOLERANCES = {
    ("timestep_embedding", torch.float32): Tolerance(atol=1e-5),
    ("timestep_embedding", torch.float64): Tolerance(atol=1e-5),  # math is float32
    ("timestep_embedding", torch.float16): Tolerance(atol=1e-3),
    ("timestep_embedding", torch.bfloat16): Tolerance(atol=8e-3),
}


def max_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double().cpu() - truth.double().cpu()).abs().max().item() if x.numel() else 0.0


def assert_within_contract(op: str, dtype: torch.dtype, out: torch.Tensor,
                           reference: torch.Tensor, truth: torch.Tensor, *,
                           kind: str = "forward", what: str = "") -> None:
    """``out`` is as close to ``truth`` as the contract asks, given ``reference``'s error."""
    assert out.shape == truth.shape, f"{op} {what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    tol = TOLERANCES[(op, dtype)]
    multiple = tol.forward if kind == "forward" else tol.gradient
    err, ref_err = max_error(out, truth), max_error(reference, truth)
    bound = multiple * ref_err + tol.atol
    assert err <= bound, (f"{op} {kind} {dtype} {what}: max error {err:.3e} exceeds "
                          f"{multiple}x the reference's {ref_err:.3e} + {tol.atol:.0e}")
