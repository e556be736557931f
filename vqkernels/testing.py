"""The numerics contract, in one table: what the test suite and ``selftest`` hold every backend to.

A fast backend's error against the float64 truth may be at most ``forward``
(or ``gradient``) times the error of the same-dtype reference on the same
inputs, plus a floor of ``atol`` times the truth's magnitude (at least 1): a
few of the dtype's ulps, so that no bound rests on one processor's or libm's
rounding of the reference (which may happen to be exact).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Multiples of the same-dtype reference's error, and the floor relative to max(1, |truth|)."""

    forward: float = 2.0
    gradient: float = 3.0
    atol: float = 0.0


TOLERANCES = {
    ("timestep_embedding", torch.float32): Tolerance(atol=1e-5),
    ("timestep_embedding", torch.float64): Tolerance(atol=1e-5),  # math is float32
    ("timestep_embedding", torch.float16): Tolerance(atol=1e-3),
    ("timestep_embedding", torch.bfloat16): Tolerance(atol=8e-3),
    # EMA: keyed by the output's dtype (fp32 state; the codebook in its own dtype).
    ("ema_update", torch.float32): Tolerance(atol=1e-5),
    ("ema_update", torch.float16): Tolerance(atol=2e-3),
    ("ema_update", torch.bfloat16): Tolerance(atol=1.6e-2),
    ("code_counts_and_sums", torch.float32): Tolerance(atol=1e-5),
    # DDIM step, errors relative to the sample's scale; the slack covers the
    # float32 Box-Muller noise (the reference's is float64) and reciprocal rounding.
    ("ddim_step", torch.float32): Tolerance(atol=1e-6),
    ("ddim_step", torch.float16): Tolerance(atol=1e-3),
    ("ddim_step", torch.bfloat16): Tolerance(atol=8e-3),
    # Attention: the slack covers the kernels' exp2-based softmax and, in half
    # precision, P and dS rounded to the input dtype for the tensor-core products
    # (the reference upcasts everything to float32).
    ("attention", torch.float64): Tolerance(atol=1e-12),
    ("attention", torch.float32): Tolerance(atol=2e-6),
    ("attention", torch.float16): Tolerance(atol=2e-3),
    ("attention", torch.bfloat16): Tolerance(atol=1.6e-2),
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
    floor = tol.atol * max(1.0, truth.detach().abs().max().item() if truth.numel() else 0.0)
    bound = multiple * ref_err + floor
    assert err <= bound, (f"{op} {kind} {dtype} {what}: max error {err:.3e} exceeds "
                          f"{multiple}x the reference's {ref_err:.3e} + floor {floor:.1e}")


def assert_code_stats(z: torch.Tensor, indices: torch.Tensor, num_codes: int,
                      counts: torch.Tensor, sums: torch.Tensor, what: str = "") -> None:
    """counts and sums are code_counts_and_sums of (z, indices): exact counts, sums in contract."""
    from vqkernels.reference.ema import code_counts_and_sums

    indices = indices.cpu()
    assert counts.dtype == sums.dtype == torch.float32, f"{what}: {counts.dtype}, {sums.dtype}"
    assert sums.shape == (num_codes, z.shape[1]), f"{what}: sums shape {tuple(sums.shape)}"
    assert torch.equal(counts.cpu(), torch.bincount(indices, minlength=num_codes).float()), what
    same = code_counts_and_sums(z, indices, num_codes)[1]
    truth = code_counts_and_sums(z.double(), indices, num_codes)[1]
    assert_within_contract("code_counts_and_sums", torch.float32, sums, same, truth,
                           what=f"{what} sums")


# Nearest-code search: the chosen code's true (fp64) distance may exceed the true
# minimum by at most rtol * (|z|^2 + max |e|^2), the scale of the cancellation in
# a |e|^2 - 2 z.e search. Keyed by (input dtype, precision of the products).
SEARCH_RTOL = {
    (torch.float64, "ieee"): 1e-12,
    (torch.float32, "ieee"): 1e-5,
    (torch.float32, "tf32"): 4e-3,
    (torch.float32, "bf16"): 3e-2,
    (torch.float16, "bf16"): 1e-4,   # products of the fp16 values themselves: exact in fp32
    (torch.bfloat16, "bf16"): 1e-4,
    (torch.float16, "ieee"): 1e-5,
    (torch.bfloat16, "ieee"): 1e-5,
    (torch.float16, "tf32"): 1e-4,
    (torch.bfloat16, "tf32"): 1e-4,
}


def assert_nearest(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                   distances: torch.Tensor, precision: str, what: str = "") -> None:
    """indices pick a code within tolerance of the true nearest; distances are its true distance."""
    z64, e64 = z.detach().double().cpu(), codebook.detach().double().cpu()
    indices, distances = indices.cpu(), distances.double().cpu()
    assert indices.dtype == torch.int64 and indices.shape == (z.shape[0],), what
    if z.shape[0] == 0:
        return
    true = ((z64[:, None, :] - e64[None]) ** 2).sum(-1)  # exact, small shapes only
    chosen = true.gather(1, indices[:, None]).squeeze(1)
    scale = z64.square().sum(1) + e64.square().sum(1).max()
    rtol = SEARCH_RTOL[(z.dtype, precision)]
    gap = chosen - true.min(1).values
    worst = (gap / scale).max().item()
    assert worst <= rtol, f"{what}: chosen code is {worst:.2e} (relative) farther than the nearest, allowed {rtol:.0e}"
    dist_err = ((distances - chosen).abs() / scale).max().item()
    assert dist_err <= max(rtol, 1e-6), f"{what}: returned distance off by {dist_err:.2e} (relative)"
