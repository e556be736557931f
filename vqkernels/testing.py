"""The numerics contract, in one table: what the test suite and ``selftest`` hold every backend to.

A fast backend's error against the float64 truth may be at most ``forward``
(or ``gradient``) times the same-dtype reference's error on the same inputs,
plus a floor of ``atol`` (a few of the dtype's ulps) times the magnitude (at
least 1) of the terms summed into the result, so that no bound rests on one
processor's or libm's rounding (the reference's may happen to be exact). That
magnitude is max |truth| unless terms cancel, as in a clipped DDIM x0 or an
attention gradient (``max_abs``, ``attention_magnitudes``). ``contract_error``,
``nearest_errors`` and ``code_stats_errors`` return the (error, bound) pairs
that ``selftest`` reports and the ``assert_*`` helpers check.
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
    # vector_quantize: z_q is the code up to one rounding (z + (zq - z) in z's dtype),
    # the loss and the codebook gradient are sums over rows, as the EMA's: its floors.
    ("vector_quantize", torch.float64): Tolerance(atol=1e-12),
    ("vector_quantize", torch.float32): Tolerance(atol=1e-5),
    ("vector_quantize", torch.float16): Tolerance(atol=2e-3),
    ("vector_quantize", torch.bfloat16): Tolerance(atol=1.6e-2),
    # DDIM step, errors relative to the sample's scale; the slack covers the
    # float32 Box-Muller noise (the reference's is float64) and reciprocal rounding.
    ("ddim_step", torch.float32): Tolerance(atol=1e-6),
    ("ddim_step", torch.float16): Tolerance(atol=1e-3),
    ("ddim_step", torch.bfloat16): Tolerance(atol=8e-3),
    # Attention: the slack covers the kernels' exp2-based softmax and, in half
    # precision, P and dS rounded to the input dtype for the tensor-core products
    # (the reference upcasts everything to float32).
    # adaLN (layer_norm_modulate, gated_residual and their fusion): statistics and sums
    # in float32; rstd from an approximate rsqrt on the GPU (2 ulp).
    ("adaln", torch.float64): Tolerance(atol=1e-12),
    ("adaln", torch.float32): Tolerance(atol=2e-6),
    ("adaln", torch.float16): Tolerance(atol=2e-3),
    ("adaln", torch.bfloat16): Tolerance(atol=1.6e-2),
    # GELU (tanh): float32 math; the GPU's exp and division are approximate (a few ulp).
    ("gelu_tanh", torch.float64): Tolerance(atol=1e-12),
    ("gelu_tanh", torch.float32): Tolerance(atol=2e-6),
    ("gelu_tanh", torch.float16): Tolerance(atol=2e-3),
    ("gelu_tanh", torch.bfloat16): Tolerance(atol=1.6e-2),
    # GroupNorm (+ SiLU): statistics in float64 (C++) or float32 (Triton, rsqrt 2 ulp);
    # the gradients are the reference formula's in float32.
    ("group_norm", torch.float64): Tolerance(atol=1e-12),
    ("group_norm", torch.float32): Tolerance(atol=2e-6),
    ("group_norm", torch.float16): Tolerance(atol=2e-3),
    ("group_norm", torch.bfloat16): Tolerance(atol=1.6e-2),
    ("attention", torch.float64): Tolerance(atol=1e-12),
    ("attention", torch.float32): Tolerance(atol=2e-6),
    ("attention", torch.float16): Tolerance(atol=2e-3),
    ("attention", torch.bfloat16): Tolerance(atol=1.6e-2),
}


def max_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """max |x - truth| in float64 (0 for empty tensors; NaN anywhere gives NaN)."""
    return (x.double().cpu() - truth.double().cpu()).abs().max().item() if x.numel() else 0.0


def contract_error(op: str, dtype: torch.dtype, out: torch.Tensor, reference: torch.Tensor,
                   truth: torch.Tensor, *, kind: str = "forward",
                   magnitude: float | None = None) -> tuple[float, float]:
    """(max error of ``out`` against ``truth``, the most the contract allows it).

    The bound is ``TOLERANCES[(op, dtype)]``'s multiple (``forward`` or
    ``gradient``, by ``kind``) of ``reference``'s error, plus the floor
    ``atol * max(1, magnitude)``; ``magnitude`` defaults to max |truth|.
    """
    if out.shape != truth.shape:
        raise ValueError(f"{op}: out shape {tuple(out.shape)} != truth shape {tuple(truth.shape)}")
    tol = TOLERANCES[(op, dtype)]
    multiple = tol.forward if kind == "forward" else tol.gradient
    if magnitude is None:
        magnitude = truth.detach().abs().max().item() if truth.numel() else 0.0
    floor = tol.atol * max(1.0, magnitude)
    return max_error(out, truth), multiple * max_error(reference, truth) + floor


def assert_within_contract(op: str, dtype: torch.dtype, out: torch.Tensor,
                           reference: torch.Tensor, truth: torch.Tensor, *,
                           kind: str = "forward", magnitude: float | None = None,
                           what: str = "") -> None:
    """``out`` is as close to ``truth`` as the contract asks, given ``reference``'s error."""
    assert out.shape == truth.shape, (f"{op} {what}: shape {tuple(out.shape)} != "
                                      f"{tuple(truth.shape)}")
    err, bound = contract_error(op, dtype, out, reference, truth, kind=kind, magnitude=magnitude)
    assert err <= bound, (f"{op} {kind} {dtype} {what}: max error {err:.3e} exceeds the bound "
                          f"{bound:.3e} (a multiple of the same-dtype reference's error + floor)")


def max_abs(*tensors: torch.Tensor) -> float:
    """max |x| over all the tensors (0 if all are empty): for a DDIM step's magnitude,
    pass the truth's outputs computed with and without clipping and thresholding (a
    clipped x0 is at most 1, but the difference of two terms ~100x larger)."""
    return max((x.detach().abs().max().item() for x in tensors if x.numel()), default=0.0)


def attention_magnitudes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         grad_out: torch.Tensor | None = None,
                         scale: float | None = None) -> dict[str, float]:
    """The size of the terms summed into attention's output and gradients, in float64.

    Each result is a sum of products; rounding errors of random sign add up to
    a few ulps of the root-sum-square (RSS) of its terms, which stays large
    where the sum cancels (the dS of a row sum to zero). With
    P = softmax(S), S = scale q k^T and dS = P * (dO v^T - rowsum(dO * O))::

        out: RSS of P v, and P |v| |S|  (P's relative error is that of S: ulps of
             |S| or its terms' RSS, large for large logits)
        dq: |scale| RSS of dS k     dk: |scale| RSS of dS^T q     dv: RSS of P^T dO

    where dS's own size counts its terms P (|dO| |v|^T + rowsum |dO * O|), which
    cancel (exactly for a single key) while their rounding does not;
    each at least the result's own max, under keys "out", "dq", "dk", "dv"
    (only "out" without ``grad_out``).
    """
    q, k, v = (x.detach().double().cpu() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    biggest = (lambda x: x.abs().max().item() if x.numel() else 0.0)
    rss = (lambda a, b: (a.square() @ b.square()).sqrt())
    size = (lambda a, b: max(biggest(a @ b), biggest(rss(a, b))))
    logits = scale * q @ k.transpose(-2, -1)
    logit_size = torch.maximum(logits.abs(), abs(scale) * rss(q, k.transpose(-2, -1)))
    p = torch.softmax(logits, dim=-1)
    out = p @ v
    sizes = {"out": max(size(p, v), biggest((p * logit_size) @ v.abs()))}
    if grad_out is not None:
        do = grad_out.detach().double().cpu()
        ds = p * (do @ v.transpose(-2, -1) - (do * out).sum(-1, keepdim=True))
        # dS cancels (exactly, for one key), but not its rounding: that has the size of its terms.
        ds_terms = p * (do.abs() @ v.abs().transpose(-2, -1)
                        + (do * out).abs().sum(-1, keepdim=True))
        sizes.update(
            dq=abs(scale) * max(size(ds, k), biggest(rss(ds_terms, k))),
            dk=abs(scale) * max(size(ds.transpose(-2, -1), q),
                                biggest(rss(ds_terms.transpose(-2, -1), q))),
            dv=size(p.transpose(-2, -1), do))
    return sizes


def code_stats_errors(z: torch.Tensor, indices: torch.Tensor, num_codes: int,
                      counts: torch.Tensor, sums: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(error, bound) of counts (exact: bound 0) and sums (the contract) of (z, indices)."""
    from vqkernels.reference.ema import code_counts_and_sums

    indices = indices.cpu().long()
    exact_counts = torch.bincount(indices, minlength=num_codes).double()
    same = code_counts_and_sums(z, indices, num_codes)[1]
    truth = code_counts_and_sums(z.double(), indices, num_codes)[1]
    return {"counts": (max_error(counts, exact_counts), 0.0),
            "sums": contract_error("code_counts_and_sums", torch.float32, sums, same, truth)}


def assert_code_stats(z: torch.Tensor, indices: torch.Tensor, num_codes: int,
                      counts: torch.Tensor, sums: torch.Tensor, what: str = "") -> None:
    """counts and sums are code_counts_and_sums of (z, indices): exact counts, sums in contract."""
    assert counts.dtype == sums.dtype == torch.float32, f"{what}: {counts.dtype}, {sums.dtype}"
    assert counts.shape == (num_codes,), f"{what}: counts shape {tuple(counts.shape)}"
    assert sums.shape == (num_codes, z.shape[1]), f"{what}: sums shape {tuple(sums.shape)}"
    for name, (err, bound) in code_stats_errors(z, indices, num_codes, counts, sums).items():
        assert err <= bound, f"{what} {name}: max error {err:.3e} exceeds the bound {bound:.3e}"


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


def nearest_errors(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                   distances: torch.Tensor, precision: str) -> dict[str, tuple[float, float]]:
    """(error, bound) of a search's indices and distances, relative to the cancellation scale.

    indices: how much farther (true fp64 distance) the chosen code is than the
    nearest, bound ``SEARCH_RTOL``; distances: how far the returned distance is
    from the chosen code's true one.
    """
    z64, e64 = z.detach().double().cpu(), codebook.detach().double().cpu()
    indices, distances = indices.cpu(), distances.double().cpu()
    rtol = SEARCH_RTOL[(z.dtype, precision)]
    if z.shape[0] == 0:
        return {"indices": (0.0, rtol), "distances": (0.0, max(rtol, 1e-6))}
    true = ((z64[:, None, :] - e64[None]) ** 2).sum(-1)  # exact, small shapes only
    chosen = true.gather(1, indices[:, None]).squeeze(1)
    scale = z64.square().sum(1) + e64.square().sum(1).max()
    gap = ((chosen - true.min(1).values) / scale).max().item()
    dist_err = ((distances - chosen).abs() / scale).max().item()
    return {"indices": (gap, rtol), "distances": (dist_err, max(rtol, 1e-6))}


def assert_nearest(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                   distances: torch.Tensor, precision: str, what: str = "") -> None:
    """indices pick a code within tolerance of the true nearest; distances are its true distance."""
    assert indices.dtype == torch.int64 and indices.shape == (z.shape[0],), what
    errors = nearest_errors(z, codebook, indices, distances, precision)
    worst, rtol = errors["indices"]
    assert worst <= rtol, (f"{what}: chosen code is {worst:.2e} (relative) farther than the "
                           f"nearest, allowed {rtol:.0e}")
    dist_err, allowed = errors["distances"]
    assert dist_err <= allowed, f"{what}: returned distance off by {dist_err:.2e} (relative)"


# The adaLN ops: their inputs in call order and their outputs, as adaln_magnitudes names them.
ADALN_OPS = {
    "layer_norm_modulate": (("x", "shift", "scale"), ("h",)),
    "gated_residual": (("x", "gate", "y"), ("x_new",)),
    "gated_residual_layer_norm_modulate": (("x", "gate", "y", "shift", "scale"), ("x_new", "h")),
}


def adaln_magnitudes(x: torch.Tensor, shift: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                     y: torch.Tensor | None = None, grad_h: torch.Tensor | None = None,
                     grad_x_new: torch.Tensor | None = None,
                     eps: float = 1e-6) -> dict[str, float]:
    """The size of the terms summed into each adaLN output and gradient, in float64.

    With v = x (+ gate y), xhat its normalized rows, gs = dL/dh (1 + scale) and
    g = |dL/dv| bounded by its terms rstd (|gs| + mean |gs| + |xhat| mean |gs xhat|)
    + |dL/dx_new| (without shift and scale, the gated residual alone: |dL/dx_new|)::

        h: (|v| + |mean|) rstd |1 + scale| + |shift|     x_new: |x| + |gate y|
        x: g     shift: sum_T |dL/dh|     scale: sum_T |dL/dh xhat|
        gate: sum_T g |y|     y: g |gate|

    (sums over T for per-sample parameters), each the max over elements, keyed
    by the output or the input whose gradient it is.
    """
    from vqkernels.reference.adaln import layer_norm_statistics

    f64 = (lambda t: None if t is None else t.detach().double().cpu())
    x, shift, scale, gate, y, grad_h, grad_x_new = map(
        f64, (x, shift, scale, gate, y, grad_h, grad_x_new))
    per_token = (lambda p: p[:, None] if p.dim() == 2 else p)
    summed = (lambda terms, p: terms.sum(1) if p.dim() == 2 else terms)
    biggest = (lambda t: t.abs().max().item() if t.numel() else 0.0)
    sizes, g = {}, torch.zeros_like(x)
    v = x if gate is None else x + per_token(gate) * y
    if gate is not None:
        sizes["x_new"] = biggest(x.abs() + (per_token(gate) * y).abs())
    if scale is not None:
        mean, rstd = layer_norm_statistics(v, eps)
        xhat = (v - mean[..., None]) * rstd[..., None]
        # v rstd and mean rstd are the terms that cancel into xhat: a row of nearly equal
        # values (large mean, tiny spread) rounds at their size, not at |xhat|'s.
        spread = (v.abs() + mean[..., None].abs()) * rstd[..., None]
        sizes["h"] = biggest(spread * (1 + per_token(scale)).abs() + per_token(shift).abs())
        if grad_h is not None:
            gs = (grad_h * (1 + per_token(scale))).abs()
            g = rstd[..., None] * (gs + gs.mean(-1, keepdim=True)
                                   + xhat.abs() * (gs * xhat.abs()).mean(-1, keepdim=True))
            sizes.update(shift=biggest(summed(grad_h.abs(), shift)),
                         scale=biggest(summed((grad_h * xhat).abs(), scale)))
    if grad_x_new is not None:
        g = g + grad_x_new.abs()
    if grad_h is not None or grad_x_new is not None:
        sizes["x"] = biggest(g)
        if gate is not None:
            sizes.update(gate=biggest(summed(g * y.abs(), gate)),
                         y=biggest(g * per_token(gate).abs()))
    return sizes
