"""The C++ CPU adaLN kernels (torch.ops.vqkernels.adaln_* / gated_residual_*) vs the reference.

The truth is vqkernels.reference.adaln in float64 (its autograd for the
gradients); a kernel's error may be at most a multiple (2x forward, 3x
gradients) of the same-dtype reference's error, plus a floor of a few of the
dtype's ulps times the magnitude. Layout, NaN, determinism and argument-check
cases compare the kernels with themselves, bit for bit, in one process.
"""
from __future__ import annotations

import pytest
import torch

import vqkernels  # noqa: F401  (registers torch.ops.vqkernels)
from helpers import assert_close
from vqkernels.reference import adaln as ref
from vqkernels.testing import assert_within_contract, max_error

ops = torch.ops.vqkernels
F64 = torch.float64
EPS = 1e-6
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(2, 5, 1), (2, 7, 3), (3, 4, 255), (2, 3, 1152), (2, 3, 1153), (1, 2, 4096),
          (3, 1, 64), (2, 130, 40), (2, 0, 16), (0, 3, 16)]


def stat_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


def randn(*shape, generator, dtype, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=generator, dtype=F64) * scale + offset).to(dtype)


def conditioning(b, t, d, dtype, per_token, generator):
    """shift, scale, gate: chunks of one (B, 6D) tensor (per token (B, T, 6D)), read in place
    as DiT's adaLN_modulation output is."""
    full = randn(*((b, t, 6 * d) if per_token else (b, 6 * d)), generator=generator,
                 dtype=dtype, scale=0.5)
    return full.chunk(6, dim=-1)[:3]


def assert_contract(out, reference, truth, dtype, what, multiple=2.0):
    """out within the contract (vqkernels.testing) of the same-dtype reference's error;
    ``multiple`` 2 judges a forward output, 3 a gradient."""
    assert_within_contract("adaln", dtype, out, reference, truth,
                           kind="forward" if multiple == 2.0 else "gradient", what=what)


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["norm", "fused"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(shape, fused, per_token, dtype, generator):
    b, t, d = shape
    x = randn(b, t, d, generator=generator, dtype=dtype, scale=2.0, offset=0.5)
    y = randn(b, t, d, generator=generator, dtype=dtype)
    shift, scale, gate = conditioning(b, t, d, dtype, per_token, generator)
    h, x_new, mean, rstd = ops.adaln_forward(x, shift, scale, gate if fused else None,
                                             y if fused else None, EPS)

    def spec(*args):  # (x_new or None, h, mean, rstd) of the reference on args' dtype
        xv, gv, yv, sv, cv = args
        xn = ref.gated_residual(xv, gv, yv) if fused else xv
        return (xn if fused else None, ref.layer_norm_modulate(xn, sv, cv, EPS),
                *ref.layer_norm_statistics(xn, EPS))

    args = (x, gate, y, shift, scale)
    truth, same = spec(*(v.to(F64) for v in args)), spec(*args)
    assert h.dtype == dtype and h.is_contiguous() and h.shape == x.shape
    assert mean.dtype == rstd.dtype == stat_dtype(dtype) and mean.shape == rstd.shape == (b, t)
    assert_contract(h, same[1], truth[1], dtype, "h")
    assert_contract(mean, same[2], truth[2], dtype, "mean")
    assert_contract(rstd, same[3], truth[3], dtype, "rstd")
    if fused:
        assert x_new.dtype == dtype and x_new.is_contiguous()
        assert_contract(x_new, same[0], truth[0], dtype, "x_new")
    else:
        assert x_new.shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_normalizes_the_rounded_x_new(dtype, generator):
    """x ~ 64 with unit spread: rounding x_new moves it by a large part of its spread in half
    precision, so normalizing the unrounded sum would miss by far more than h's rounding."""
    b, t, d = 2, 4, 96
    x = randn(b, t, d, generator=generator, dtype=dtype, offset=64.0)
    y = randn(b, t, d, generator=generator, dtype=dtype)
    shift, scale, gate = conditioning(b, t, d, dtype, False, generator)
    h, x_new, mean, rstd = ops.adaln_forward(x, shift, scale, gate, y, EPS)
    expected = ref.layer_norm_modulate(x_new.to(F64), shift.to(F64), scale.to(F64), EPS)
    ulp = torch.finfo(dtype).eps
    bound = ulp * expected.abs() + 1e-5 * expected.abs().max()
    assert ((h.to(F64) - expected).abs() <= bound).all(), f"max error {max_error(h, expected):.3g}"
    unrounded = ref.layer_norm_modulate(x.to(F64) + gate.to(F64)[:, None] * y.to(F64),
                                        shift.to(F64), scale.to(F64), EPS)
    if dtype in (torch.float16, torch.bfloat16):
        assert ((unrounded - expected).abs() > bound).any(), "the case does not tell the two apart"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_grad_x_new", [False, True], ids=["", "grad_x_new"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(shape, with_grad_x_new, per_token, dtype, generator):
    b, t, d = shape
    x = randn(b, t, d, generator=generator, dtype=dtype, scale=2.0, offset=0.5)
    grad_h = randn(b, t, d, generator=generator, dtype=dtype)
    grad_x_new = randn(b, t, d, generator=generator, dtype=dtype) if with_grad_x_new else None
    shift, scale, _ = conditioning(b, t, d, dtype, per_token, generator)
    _, _, mean, rstd = ops.adaln_forward(x, shift, scale, None, None, EPS)
    grads = ops.adaln_backward(grad_h, grad_x_new, x, scale, mean, rstd)

    def spec(dt):  # (dx, dshift, dscale) by autograd on the reference in dtype dt
        xv, sv, cv = leaves(x, shift, scale, dtype=dt)
        torch.autograd.backward(ref.layer_norm_modulate(xv, sv, cv, EPS), grad_h.to(dt))
        dx = xv.grad if grad_x_new is None else xv.grad + grad_x_new.to(dt)
        return dx, sv.grad, cv.grad

    for name, out, same, truth in zip(["grad_x", "grad_shift", "grad_scale"], grads, spec(dtype),
                                      spec(F64)):
        assert out.dtype == dtype and out.is_contiguous(), name
        assert_contract(out, same, truth, dtype, name, multiple=3.0)
    assert grads[1].shape == grads[2].shape == scale.shape


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_residual(shape, per_token, dtype, generator):
    b, t, d = shape
    x, y, grad = (randn(b, t, d, generator=generator, dtype=dtype) for _ in range(3))
    _, _, gate = conditioning(b, t, d, dtype, per_token, generator)
    out = ops.gated_residual_forward(x, gate, y)
    grad_gate, grad_y = ops.gated_residual_backward(grad, gate, y)

    def spec(dt):  # (out, dgate, dy) of the reference in dtype dt
        xv, gv, yv = leaves(x, gate, y, dtype=dt)
        o = ref.gated_residual(xv, gv, yv)
        o.backward(grad.to(dt))
        return o.detach(), gv.grad, yv.grad

    same, truth = spec(dtype), spec(F64)
    assert out.dtype == grad_gate.dtype == grad_y.dtype == dtype
    assert grad_gate.shape == gate.shape and grad_gate.is_contiguous() and grad_y.is_contiguous()
    assert_contract(out, same[0], truth[0], dtype, "out")
    assert_contract(grad_gate, same[1], truth[1], dtype, "grad_gate", multiple=3.0)
    assert_contract(grad_y, same[2], truth[2], dtype, "grad_y", multiple=3.0)


def all_outputs(x, y, grad, grad_x_new, shift, scale, gate):
    """Every op's outputs, forward then backward, on these tensors as laid out."""
    h, x_new, mean, rstd = ops.adaln_forward(x, shift, scale, gate, y, EPS)
    return (h, x_new, mean, rstd, *ops.adaln_backward(grad, grad_x_new, x_new, scale, mean, rstd),
            *ops.adaln_forward(x, shift, scale, None, None, EPS),
            *ops.adaln_backward(grad, None, x, scale, mean, rstd),
            ops.gated_residual_forward(x, gate, y), *ops.gated_residual_backward(grad, gate, y))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_match_contiguous(per_token, dtype, generator):
    """x transposed, y and the grads sliced (unit stride along D only): the same bits."""
    b, t, d = 3, 70, 40
    x = randn(t, b, d, generator=generator, dtype=dtype).transpose(0, 1)
    y = randn(b, t, 2 * d, generator=generator, dtype=dtype)[..., d:]
    grad = randn(b, 2 * t, d, generator=generator, dtype=dtype)[:, ::2]
    grad_x_new = randn(b, t, d + 5, generator=generator, dtype=dtype)[..., 2:d + 2]
    params = conditioning(b, t, d, dtype, per_token, generator)
    views = (x, y, grad, grad_x_new, *params)
    assert not any(v.is_contiguous() for v in views)
    for got, expected in zip(all_outputs(*views), all_outputs(*(v.contiguous() for v in views))):
        assert torch.equal(got, expected)


def test_expanded_per_token_params_match_per_sample(generator):
    """(B, D) params expanded to (B, T, D) (token stride 0) give the per-sample results."""
    b, t, d = 2, 9, 33
    x, y = (randn(b, t, d, generator=generator, dtype=torch.float32) for _ in range(2))
    params = conditioning(b, t, d, torch.float32, False, generator)
    expanded = [p[:, None].expand(b, t, d) for p in params]
    per_sample = ops.adaln_forward(x, *params[:2], params[2], y, EPS)
    per_token = ops.adaln_forward(x, *expanded[:2], expanded[2], y, EPS)
    for got, expected in zip(per_token, per_sample):
        assert torch.equal(got, expected)


def test_unit_dim_takes_any_stride(generator):
    """D = 1: the stride along D is never used, so any is taken; xhat = 0, h = shift."""
    x = randn(2, 3, 4, generator=generator, dtype=torch.float32)[..., ::4]
    params = randn(2, 6, generator=generator, dtype=torch.float32)[:, ::2]
    shift, scale = params[:, :1], params[:, 1:2]
    assert x.stride(-1) == 4 and shift.stride(-1) == 2
    h, _, _, _ = ops.adaln_forward(x, shift, scale, None, None, EPS)
    assert torch.equal(h, shift[:, None].expand(2, 3, 1))


def test_nan_stays_in_its_row(generator):
    """A NaN in one row of x makes that row's h, mean, rstd NaN, and nothing else; in grad_h,
    that row's grad_x and its column of the sample's parameter grads."""
    b, t, d = 2, 100, 48
    x, grad = (randn(b, t, d, generator=generator, dtype=torch.float32) for _ in range(2))
    shift, scale, _ = conditioning(b, t, d, torch.float32, False, generator)
    clean = ops.adaln_forward(x, shift, scale, None, None, EPS)
    x_nan = x.clone()
    x_nan[1, 70, 5] = float("nan")
    h, _, mean, rstd = ops.adaln_forward(x_nan, shift, scale, None, None, EPS)
    row = torch.zeros(b, t, dtype=torch.bool)
    row[1, 70] = True
    assert h[row].isnan().all() and mean[row].isnan().all() and rstd[row].isnan().all()
    assert torch.equal(h[~row], clean[0][~row]) and torch.equal(mean[~row], clean[2][~row])

    grad_nan = grad.clone()
    grad_nan[1, 70, 5] = float("nan")
    gx, gshift, gscale = ops.adaln_backward(grad_nan, None, x, scale, clean[2], clean[3])
    gx_clean, gshift_clean, gscale_clean = ops.adaln_backward(grad, None, x, scale, clean[2],
                                                              clean[3])
    assert gx[row].isnan().all() and torch.equal(gx[~row], gx_clean[~row])
    column = torch.zeros(b, d, dtype=torch.bool)
    column[1, 5] = True
    for got, expected in ((gshift, gshift_clean), (gscale, gscale_clean)):
        assert got[column].isnan().all() and torch.equal(got[~column], expected[~column])


def test_parameter_grads_do_not_depend_on_threads(generator):
    b, t, d = 3, 300, 72
    x, grad = (randn(b, t, d, generator=generator, dtype=torch.float32) for _ in range(2))
    shift, scale, gate = conditioning(b, t, d, torch.float32, False, generator)
    _, _, mean, rstd = ops.adaln_forward(x, shift, scale, None, None, EPS)
    threads = torch.get_num_threads()

    def run():
        return (*ops.adaln_backward(grad, None, x, scale, mean, rstd),
                *ops.gated_residual_backward(grad, gate, x))

    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        for got, expected in zip(run(), single):
            assert torch.equal(got, expected)
    finally:
        torch.set_num_threads(threads)


def test_argument_checks():
    x = torch.zeros(2, 3, 8)
    p = torch.zeros(2, 8)
    stats = torch.zeros(2, 3)
    bad = [
        (lambda: ops.adaln_forward(x[0], p, p, None, None, EPS), "3-D"),
        (lambda: ops.adaln_forward(x, p[:1], p, None, None, EPS), "shift must be"),
        (lambda: ops.adaln_forward(x, p, torch.zeros(2, 3, 8), None, None, EPS), "scale must be"),
        (lambda: ops.adaln_forward(x, p, p.double(), None, None, EPS), "dtype"),
        (lambda: ops.adaln_forward(x, p, p, p, None, EPS), "together"),
        (lambda: ops.adaln_forward(x, p, p, p, x[:, :2], EPS), "y must have"),
        (lambda: ops.adaln_forward(x.transpose(1, 2), torch.zeros(2, 3), torch.zeros(2, 3),
                                   None, None, EPS), "unit stride"),
        (lambda: ops.adaln_backward(x, None, x, p, stats.double(), stats), "mean must be"),
        (lambda: ops.adaln_backward(x, None, x, p, stats, stats[:1]), "rstd must be"),
        (lambda: ops.adaln_backward(x, x[:1], x, p, stats, stats), "grad_x_new"),
        (lambda: ops.gated_residual_forward(x, p[:, :4], x), "gate must be"),
        (lambda: ops.gated_residual_backward(x.half(), p, x), "dtype"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_empty_rows_give_zero_per_sample_grads():
    x = torch.zeros(3, 0, 8)
    p = torch.ones(3, 8)
    _, _, mean, rstd = ops.adaln_forward(x, p, p, None, None, EPS)
    gx, gshift, gscale = ops.adaln_backward(x, None, x, p, mean, rstd)
    assert gx.shape == x.shape
    assert_close(gshift, torch.zeros(3, 8), "grad_shift")
    assert_close(gscale, torch.zeros(3, 8), "grad_scale")
    assert_close(ops.gated_residual_backward(x, p, x)[0], torch.zeros(3, 8), "grad_gate")
