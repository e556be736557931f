"""Reference attention vs hand-computed answers and independent checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from vqkernels.reference import attention as attn

F64 = torch.float64


def _randn(*shape, generator, dtype=F64, requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(requires_grad)


# ------------------------------------------------------------------ attention


def test_attention_hand_case_with_known_softmax_weights():
    log3 = math.log(3.0)
    q = torch.tensor([[[[1.0], [2.0]]]], dtype=F64)  # (1, 1, 2, 1): d = 1, scale 1
    k = torch.tensor([[[[0.0], [log3]]]], dtype=F64)
    v = torch.tensor([[[[4.0, 0.0], [0.0, 8.0]]]], dtype=F64)  # dv = 2
    out, lse = attn.attention_lse(q, k, v)
    # query 1: logits 0, log 3 -> weights 1/4, 3/4; query 2: 0, 2 log 3 -> 1/10, 9/10
    assert_close(out, [[[[1.0, 6.0], [0.4, 7.2]]]], "out")
    assert_close(lse, [[[math.log(4.0), math.log(10.0)]]], "lse")
    assert out.shape == (1, 1, 2, 2) and lse.shape == (1, 1, 2)


def test_default_scale_is_inverse_sqrt_head_dim():
    log3 = math.log(3.0)
    q = torch.tensor([[[[2.0, 0.0, 0.0, 0.0]]]], dtype=F64)  # d = 4: scale 1/2
    k = torch.tensor([[[[0.0, 5.0, 0.0, 0.0], [log3, 0.0, 0.0, 0.0]]]], dtype=F64)
    v = torch.tensor([[[[4.0], [0.0]]]], dtype=F64)
    assert_close(attn.attention(q, k, v), [[[[1.0]]]], "default scale")
    # scale 1: logits 0, 2 log 3 -> weights 1/10, 9/10
    assert_close(attn.attention(q, k, v, scale=1.0), [[[[0.4]]]], "scale=1")


@pytest.mark.parametrize(
    "b, h, sq, sk, d", [(2, 3, 5, 11, 72), (1, 2, 17, 1, 64), (3, 1, 1, 7, 13)]
)
def test_matches_sdpa_in_float64(b, h, sq, sk, d, generator):
    q = _randn(b, h, sq, d, generator=generator, requires_grad=True)
    k = _randn(b, h, sk, d, generator=generator, requires_grad=True)
    v = _randn(b, h, sk, d, generator=generator, requires_grad=True)
    grad = _randn(b, h, sq, d, generator=generator)
    out, lse = attn.attention_lse(q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v)  # independent check only
    assert_close(out, expected, "out vs SDPA")
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    assert_close(lse, torch.log(torch.exp(logits).sum(dim=-1)), "lse vs log(sum(exp))")

    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    for name, g, e in zip("qkv", grads, expected_grads):
        assert_close(g, e, f"d{name} vs SDPA", atol=1e-10, rtol=1e-10)


def test_value_dim_may_differ_from_head_dim(generator):
    q, k = _randn(2, 2, 3, 8, generator=generator), _randn(2, 2, 6, 8, generator=generator)
    v = _randn(2, 2, 6, 5, generator=generator)
    out = attn.attention(q, k, v, scale=0.3)
    weights = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1)
    assert_close(out, weights @ v, "out with dv != d")
    assert out.shape == (2, 2, 3, 5)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5)]
)
def test_low_precision_keeps_dtype_and_is_accurate(dtype, tol, generator):
    q, k, v = (_randn(2, 3, 9, 72, generator=generator).to(dtype) for _ in range(3))
    out, lse = attn.attention_lse(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = attn.attention_lse(q.double(), k.double(), v.double())
    assert_close(out.double(), ref_out, "out vs float64", atol=tol, rtol=tol)
    assert_close(lse.double(), ref_lse, "lse vs float64", atol=1e-5, rtol=1e-5)


def test_large_logits_stay_finite(generator):
    q = 100.0 * _randn(1, 2, 4, 16, generator=generator, dtype=torch.float32)
    k = _randn(1, 2, 6, 16, generator=generator, dtype=torch.float32)
    v = _randn(1, 2, 6, 16, generator=generator, dtype=torch.float32)
    out, lse = attn.attention_lse(q, k, v, scale=10.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    logits = (q @ k.transpose(-2, -1)) * 10.0
    assert logits.abs().max() > 1000  # naive exp would overflow
    row_max = logits.amax(dim=-1)
    assert (lse >= row_max - 1e-3).all() and (lse <= row_max + math.log(6) + 1e-3).all()
    # each output is a convex combination of the value rows
    assert (out >= v.amin(dim=-2, keepdim=True) - 1e-5).all()
    assert (out <= v.amax(dim=-2, keepdim=True) + 1e-5).all()


def test_constant_values_pass_through(generator):
    q, k = _randn(2, 2, 5, 4, generator=generator), _randn(2, 2, 3, 4, generator=generator)
    v = torch.full((2, 2, 3, 4), 2.5, dtype=F64)
    assert_close(attn.attention(q, k, v, scale=3.0), torch.full((2, 2, 5, 4), 2.5), "out")


def test_empty_query_returns_empty():
    q, k, v = torch.empty(2, 3, 0, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 6)
    out, lse = attn.attention_lse(q, k, v)
    assert out.shape == (2, 3, 0, 6) and lse.shape == (2, 3, 0)
