"""The adaLN-family CUDA kernels (torch.ops.vqkernels.* on CUDA) against the float64 reference.

Each result's error against the float64 truth may be a small multiple of the same-dtype
reference's error (2x forward, 3x gradients) plus a floor of a few ulps times the magnitude
of the terms summed into it (vqkernels/testing.py's contract, its "adaln" rows). Layouts cover what DiT passes (chunks of a (B, 6D) modulation read
in place), misaligned and strided rows (the one-element path), per-token parameters, odd D,
rows too long for registers (the looped path) and empty batches.
"""
from __future__ import annotations

import pytest
import torch

from vqkernels.reference import adaln
from vqkernels.testing import assert_within_contract

pytestmark = pytest.mark.cuda

F64 = torch.float64
EPS = 1e-6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, T, D): tiny, odd D, DiT widths, a per-sample sum split across many blocks, rows that
# need 16 warps or loop over tiles.
SHAPES = [(1, 2, 3), (2, 3, 1), (2, 5, 255), (3, 7, 384), (2, 9, 1152), (2, 4, 1153),
          (2, 2048, 384), (1, 3, 4096), (1, 3, 16384)]
LAYOUTS = ["contiguous", "dit_chunks", "strided", "misaligned"]


def _ops():
    import vqkernels._C  # noqa: F401  (registers torch.ops.vqkernels)
    return torch.ops.vqkernels


def _rows(shape, dtype, layout, gen, scale=1.0, shift=0.0):
    """A (..., D) tensor on CUDA, a view into a bigger buffer unless "contiguous"."""
    *lead, d = shape
    if layout == "strided":  # rows padded by 8 elements: 16-byte packs still fit when 8 | D
        base, view = torch.randn(*lead, d + 8, generator=gen, dtype=F64), lambda b: b[..., :d]
    elif layout == "misaligned":  # one element off: the one-element path
        numel = int(torch.Size(shape).numel())
        base, view = torch.randn(numel + 1, generator=gen, dtype=F64), lambda b: b[1:].view(shape)
    else:
        base, view = torch.randn(*shape, generator=gen, dtype=F64), lambda b: b
    return view((base * scale + shift).to(dtype).cuda())


def _params(b, t, d, per_token, dtype, layout, gen, count):
    """`count` conditioning tensors; "dit_chunks": chunks of one (B, [T,] 6D) tensor."""
    shape = (b, t, d) if per_token else (b, d)
    if layout != "dit_chunks":
        return [_rows(shape, dtype, layout, gen, scale=0.5) for _ in range(count)]
    mod = (torch.randn(*shape[:-1], 6 * d, generator=gen, dtype=F64) * 0.5).to(dtype).cuda()
    return list(mod.chunk(6, dim=-1)[:count])


def _check(out, same_dtype, truth, dtype, what, multiple, magnitude=None):
    """Within vqkernels.testing's contract: ``multiple`` 2 judges an output, 3 a gradient."""
    assert_within_contract("adaln", dtype, out.cpu(), same_dtype.cpu(), truth.cpu(),
                           kind="forward" if multiple == 2 else "gradient",
                           magnitude=magnitude, what=what)


def _f64(*ts):
    return [t.detach().double().cpu().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_adaln_forward(dtype, shape, layout, per_token, fused, generator):
    b, t, d = shape
    x = _rows(shape, dtype, layout, generator, scale=3.0, shift=1.0)
    shift, scale, gate = _params(b, t, d, per_token, dtype, layout, generator, 3)
    y = _rows(shape, dtype, layout, generator) if fused else None
    gate = gate if fused else None
    h, x_new, mean, rstd = _ops().adaln_forward(x, shift, scale, gate, y, EPS)
    assert h.is_contiguous() and mean.dtype == rstd.dtype == torch.float32

    def run(cast):
        xs = [cast(v) for v in (x, shift, scale)]
        if fused:
            xn, hh = adaln.gated_residual_layer_norm_modulate(xs[0], cast(gate), cast(y), xs[1],
                                                              xs[2], EPS)
        else:
            xn, hh = xs[0], adaln.layer_norm_modulate(*xs, eps=EPS)
        return (xn, hh, *adaln.layer_norm_statistics(xn, EPS))

    truth = run(lambda v: v.double().cpu())
    same = run(lambda v: v.cpu())
    if fused:
        _check(x_new, same[0], truth[0], dtype, "x_new", 2)
    else:
        assert x_new.numel() == 0
    _check(h, same[1], truth[1], dtype, "h", 2)
    _check(mean, same[2], truth[2], dtype, "mean", 2)
    _check(rstd, same[3], truth[3], dtype, "rstd", 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "dit_chunks", "misaligned"])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("with_grad_x_new", [False, True])
def test_adaln_backward(dtype, shape, layout, per_token, with_grad_x_new, generator):
    b, t, d = shape
    x = _rows(shape, dtype, layout, generator, scale=3.0, shift=1.0)
    shift, scale = _params(b, t, d, per_token, dtype, layout, generator, 2)
    grad_h = _rows(shape, dtype, layout, generator)
    grad_x_new = _rows(shape, dtype, layout, generator) if with_grad_x_new else None
    mean, rstd = (s.float().cuda() for s in adaln.layer_norm_statistics(x.float(), EPS))
    grads = _ops().adaln_backward(grad_h, grad_x_new, x, scale, mean, rstd)

    def run(cast):
        xs, sh, sc = (cast(v).requires_grad_() for v in (x, shift, scale))
        adaln.layer_norm_modulate(xs, sh, sc, EPS).backward(cast(grad_h))
        gx = xs.grad if grad_x_new is None else xs.grad + cast(grad_x_new)
        return gx, sh.grad, sc.grad

    truth = run(lambda v: v.detach().double().cpu())
    same = run(lambda v: v.detach().cpu())
    # The parameter grads sum T terms: their magnitude is that of |g| and |g xhat| summed.
    g64 = grad_h.double().cpu()
    xhat = (x.double().cpu() - mean.double().cpu()[..., None]) * rstd.double().cpu()[..., None]
    sums = (lambda v: v) if per_token else (lambda v: v.sum(1))
    mags = [None, sums(g64.abs()).max().item() if g64.numel() else 0.0,
            sums((g64 * xhat).abs()).max().item() if g64.numel() else 0.0]
    for out, s, tr, name, mag in zip(grads, same, truth, ["grad_x", "grad_shift", "grad_scale"],
                                     mags):
        assert out.is_contiguous() and out.dtype == dtype
        _check(out, s, tr, dtype, name, 3, mag)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "dit_chunks", "misaligned"])
@pytest.mark.parametrize("per_token", [False, True])
def test_gated_residual(dtype, shape, layout, per_token, generator):
    b, t, d = shape
    x, y, grad = (_rows(shape, dtype, layout, generator) for _ in range(3))
    (gate,) = _params(b, t, d, per_token, dtype, layout, generator, 1)
    out = _ops().gated_residual_forward(x, gate, y)
    grad_gate, grad_y = _ops().gated_residual_backward(grad, gate, y)

    def run(cast):
        xs, gs, ys = (cast(v).requires_grad_() for v in (x, gate, y))
        o = adaln.gated_residual(xs, gs, ys)
        o.backward(cast(grad))
        return o, gs.grad, ys.grad

    truth = run(lambda v: v.detach().double().cpu())
    same = run(lambda v: v.detach().cpu())
    _check(out, same[0], truth[0], dtype, "gated_residual", 2)
    g64, y64 = grad.double().cpu(), y.double().cpu()
    mag = ((g64 * y64).abs() if per_token else (g64 * y64).abs().sum(1)).max().item() \
        if g64.numel() else 0.0
    _check(grad_gate, same[1], truth[1], dtype, "grad_gate", 3, mag)
    _check(grad_y, same[2], truth[2], dtype, "grad_y", 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [3, 1152, 16384])
def test_nan_row_stays_in_its_row(dtype, d, generator):
    x = _rows((2, 3, d), dtype, "contiguous", generator)
    shift, scale = _params(2, 3, d, False, dtype, "contiguous", generator, 2)
    clean = _ops().adaln_forward(x, shift, scale, None, None, EPS)
    x[1, 2, d // 2] = float("nan")
    h, _, mean, rstd = _ops().adaln_forward(x, shift, scale, None, None, EPS)
    assert h[1, 2].isnan().all() and mean[1, 2].isnan() and rstd[1, 2].isnan()
    keep = torch.ones(2, 3, dtype=torch.bool, device=x.device)
    keep[1, 2] = False
    assert torch.equal(h[keep], clean[0][keep]) and torch.equal(mean[keep], clean[2][keep])
    grad_x, grad_shift, grad_scale = _ops().adaln_backward(torch.ones_like(x), None, x, scale,
                                                           mean, rstd)
    assert grad_x[1, 2].isnan().all() and not grad_x[keep].isnan().any()
    assert grad_scale[1].isnan().any() and not grad_scale[0].isnan().any()
    assert not grad_shift.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 1000, 1152), (2, 700, 16384), (1, 3000, 1153)])
def test_parameter_grads_are_deterministic(dtype, shape, generator):
    x, g = (_rows(shape, dtype, "contiguous", generator) for _ in range(2))
    (scale,) = _params(shape[0], shape[1], shape[2], False, dtype, "dit_chunks", generator, 1)
    mean, rstd = (s.float() for s in adaln.layer_norm_statistics(x.float(), EPS))
    first = _ops().adaln_backward(g, None, x, scale, mean, rstd)
    for _ in range(3):
        again = _ops().adaln_backward(g, None, x, scale, mean, rstd)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    gate_grads = [_ops().gated_residual_backward(g, scale, x)[0] for _ in range(3)]
    assert all(torch.equal(gate_grads[0], other) for other in gate_grads[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 0, 64), (0, 3, 64), (0, 0, 5)])
def test_empty_batches(dtype, shape):
    b, t, d = shape
    x = torch.randn(shape, device="cuda").to(dtype)
    shift, scale = (torch.randn(b, d, device="cuda").to(dtype) for _ in range(2))
    h, x_new, mean, rstd = _ops().adaln_forward(x, shift, scale, scale, x, EPS)
    assert h.shape == x_new.shape == shape and mean.shape == rstd.shape == (b, t)
    grad_x, grad_shift, grad_scale = _ops().adaln_backward(x, None, x, scale, mean, rstd)
    assert grad_x.shape == shape and grad_shift.shape == grad_scale.shape == (b, d)
    assert not grad_shift.any() and not grad_scale.any()  # sums over no tokens
    grad_gate, grad_y = _ops().gated_residual_backward(x, scale, x)
    assert grad_gate.shape == (b, d) and not grad_gate.any() and grad_y.shape == shape
