"""Reference adaLN-Zero glue vs hand-computed answers, F.layer_norm and autograd identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from vqkernels.reference import adaln

F64 = torch.float64


def _randn(*shape, generator, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=dtype)


def test_layer_norm_modulate_hand_case():
    eps = 1e-6
    x = torch.tensor([[[1.0, 3.0], [5.0, 5.0]], [[-2.0, 0.0], [10.0, 4.0]]], dtype=F64)
    shift = torch.tensor([[0.5, -1.0], [0.0, 2.0]], dtype=F64)
    scale = torch.tensor([[1.0, 0.0], [-0.5, 3.0]], dtype=F64)
    out = adaln.layer_norm_modulate(x, shift, scale, eps=eps)
    a = 1 / math.sqrt(1 + eps)  # [1, 3] -> [-a, a]; [10, 4] has var 9: [3, -3] / sqrt(9 + eps)
    b = 3 / math.sqrt(9 + eps)
    expected = [
        [[-a * 2 + 0.5, a * 1 - 1.0], [0.5, -1.0]],  # constant row normalizes to 0
        [[-a * 0.5, a * 4 + 2.0], [b * 0.5, -b * 4 + 2.0]],
    ]
    assert_close(out, expected, "modulate")


@pytest.mark.parametrize("b, n, c", [(2, 7, 72), (3, 1, 1152), (1, 5, 3)])
def test_layer_norm_modulate_matches_layer_norm(b, n, c, generator):
    x = _randn(b, n, c, generator=generator) * 3 + 1
    shift, scale = _randn(b, c, generator=generator), _randn(b, c, generator=generator)
    expected = F.layer_norm(x, (c,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    assert_close(adaln.layer_norm_modulate(x, shift, scale), expected, "modulate vs F.layer_norm", atol=1e-10)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2), (torch.float32, 1e-5)]
)
def test_layer_norm_modulate_low_precision(dtype, tol, generator):
    x = _randn(2, 5, 24, generator=generator).to(dtype)
    shift, scale = (_randn(2, 24, generator=generator).to(dtype) for _ in range(2))
    out = adaln.layer_norm_modulate(x, shift, scale)
    assert out.dtype == dtype
    ref = adaln.layer_norm_modulate(x.double(), shift.double(), scale.double())
    assert_close(out.double(), ref, "modulate vs float64", atol=tol, rtol=tol)


def test_gated_residual_hand_case():
    x = torch.ones(2, 2, 3, dtype=F64)
    gate = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=F64)
    y = torch.arange(12, dtype=F64).reshape(2, 2, 3)
    expected = [[[1.0, 1.0, -1.0], [7.0, 1.0, -4.0]], [[4.0, 4.5, 5.0], [5.5, 6.0, 6.5]]]
    assert_close(adaln.gated_residual(x, gate, y), expected, "gated_residual")


def test_gated_residual_zero_gate_is_identity_and_keeps_dtype(generator):
    x = _randn(2, 4, 8, generator=generator).to(torch.bfloat16)
    y = _randn(2, 4, 8, generator=generator, dtype=torch.float32)
    out = adaln.gated_residual(x, torch.zeros(2, 8), y)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)


def test_per_token_parameters_equal_per_sample_ones_repeated(generator):
    x, y = _randn(2, 5, 7, generator=generator), _randn(2, 5, 7, generator=generator)
    shift, scale, gate = (_randn(2, 7, generator=generator) for _ in range(3))
    tokens = [p[:, None].expand(2, 5, 7) for p in (shift, scale, gate)]
    assert_close(adaln.layer_norm_modulate(x, *tokens[:2]),
                 adaln.layer_norm_modulate(x, shift, scale), "per-token layer_norm_modulate")
    assert_close(adaln.gated_residual(x, tokens[2], y), adaln.gated_residual(x, gate, y),
                 "per-token gated_residual")


def test_fused_step_normalizes_the_rounded_residual(generator):
    x, y = (_randn(3, 4, 9, generator=generator).to(torch.bfloat16) for _ in range(2))
    shift, scale, gate = (_randn(3, 9, generator=generator).to(torch.bfloat16) for _ in range(3))
    x_new, h = adaln.gated_residual_layer_norm_modulate(x, gate, y, shift, scale)
    assert torch.equal(x_new, adaln.gated_residual(x, gate, y))
    assert torch.equal(h, adaln.layer_norm_modulate(x_new, shift, scale))


def test_statistics_of_a_constant_row():
    mean, rstd = adaln.layer_norm_statistics(torch.full((1, 2, 4), 3.0, dtype=F64), eps=0.25)
    assert_close(mean, [[3.0, 3.0]], "mean")
    assert_close(rstd, [[2.0, 2.0]], "rstd = 1 / sqrt(0 + eps)")


@pytest.mark.parametrize("per_token", [False, True])
def test_backward_matches_the_closed_form_the_kernels_use(per_token, generator):
    """dx = rstd (gs - mean(gs) - xhat mean(gs xhat)), gs = g (1 + scale); dshift = sum_T g,
    dscale = sum_T g xhat (per token: no sum)."""
    b, t, d = 2, 3, 6
    x = _randn(b, t, d, generator=generator).requires_grad_()
    params = [_randn(*((b, t, d) if per_token else (b, d)), generator=generator).requires_grad_()
              for _ in range(2)]
    g = _randn(b, t, d, generator=generator)
    torch.autograd.backward(adaln.layer_norm_modulate(x, *params), g)
    mean, rstd = adaln.layer_norm_statistics(x.detach())
    xhat = (x.detach() - mean[..., None]) * rstd[..., None]
    scale = params[1].detach() if per_token else params[1].detach()[:, None]
    gs = g * (1 + scale)
    dx = rstd[..., None] * (gs - gs.mean(-1, keepdim=True)
                            - xhat * (gs * xhat).mean(-1, keepdim=True))
    reduce = (lambda v: v) if per_token else (lambda v: v.sum(1))
    assert_close(x.grad, dx, "dx", atol=1e-12)
    assert_close(params[0].grad, reduce(g), "dshift", atol=1e-12)
    assert_close(params[1].grad, reduce(g * xhat), "dscale", atol=1e-12)
