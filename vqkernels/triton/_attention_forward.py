"""Attention forward kernel: online softmax over key tiles, FlashAttention-2 style.

A program owns BLOCK_M query rows of one head and streams the head's keys and
values past them in BLOCK_N tiles with a running max and sum, so the Sq x Sk
logits never reach memory; it saves lse for the backward.
"""
import math

import triton
import triton.language as tl

from vqkernels.triton import _interpreter, _math
from vqkernels.triton._attention_tiles import (_block_rows, _dot, _load_tile, _program, _reload,
                                               _store_rows)

_LN2: tl.constexpr = tl.constexpr(math.log(2.0))


@triton.jit
def _forward_tile(q, q_ptr, q_base, sq_s, n_q, acc, m_i, l_i, k_ptr, k_base, sk_s, v_ptr, v_base,
                  sv_s, start, Sk, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr):
    """Fold keys [start, start + BLOCK_N) into the running (acc, max, sum); MASK: the tail."""
    if q_ptr.dtype.element_ty == tl.float32:
        q = _reload(q_ptr, q_base, sq_s, n_q, HEAD_DIM, BLOCK_D, ALIGN, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    n = Sk - start
    start64 = tl.cast(start, tl.int64)
    k = _load_tile(k_ptr, k_base + start64 * sk_s, offs, sk_s, n, HEAD_DIM, BLOCK_D, ALIGN, MASK)
    s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32)) * qk_scale
    if MASK:
        s = tl.where((offs < n)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose logits are all -inf so far: exponents against 0, not -inf - -inf.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_ptr, v_base + start64 * sv_s, offs, sv_s, n, HEAD_DIM, BLOCK_D, ALIGN, MASK)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    H, Sq, Sk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M query rows i of head (b, h) against all Sk keys j (qk_scale = scale log2 e)::

        s_ij = qk_scale q_i . k_j        per key tile: m' = max(m, max_j s_ij),
        acc  = 2^(m - m') acc + sum_j 2^(s_ij - m') v_j,  l = 2^(m - m') l + sum_j 2^(s_ij - m')
        out_i = acc / l,   lse_i = ln 2 (m + log2 l)   (= ln sum_j exp(scale q_i . k_j))

    FLOPs: 4 B H Sq Sk d (two matmuls; the tensor cores run BLOCK_D >= d
    columns). Bytes: reads B H (Sq + 2 cdiv(Sq, BLOCK_M) Sk) d s (K and V
    once per query block, mostly from L2), writes B H Sq (d s + 4);
    s = sizeof(dtype). Compute-bound for Sq, Sk >~ 64.
    """
    start_m, b, h = _program(Sq, H, BLOCK_M)
    offs = tl.arange(0, BLOCK_M)
    n = Sq - start_m
    q_base, q = _block_rows(q_ptr, b, h, start_m, sq_b, sq_h, sq_s, n, HEAD_DIM, BLOCK_D, ALIGN,
                            BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    k_base = b * sk_b + h * sk_h
    v_base = b * sv_b + h * sv_h
    full = (Sk // BLOCK_N) * BLOCK_N
    for start in _interpreter.runtime_range(0, full, BLOCK_N):
        acc, m_i, l_i = _forward_tile(
            q, q_ptr, q_base, sq_s, n, acc, m_i, l_i, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s,
            start, Sk, qk_scale, HEAD_DIM, BLOCK_D, ALIGN, BLOCK_M, BLOCK_N, False)
    if full < Sk:
        acc, m_i, l_i = _forward_tile(
            q, q_ptr, q_base, sq_s, n, acc, m_i, l_i, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s,
            full, Sk, qk_scale, HEAD_DIM, BLOCK_D, ALIGN, BLOCK_M, BLOCK_N, True)

    # l_ok is false only for a row of -inf logits: softmax is 0 / 0 there, so out is NaN
    # (as torch.softmax and the other backends give), lse -inf.
    l_ok = l_i > 0.0
    inv_l = tl.where(l_ok, 1.0 / tl.where(l_ok, l_i, 1.0), float("nan"))
    lse = tl.where(l_ok, m_i * _LN2 + _math.log(tl.where(l_ok, l_i, 1.0)), float("-inf"))
    row = (b * H + h) * Sq + start_m
    _store_rows(out_ptr, row * HEAD_DIM, offs, n, acc * inv_l[:, None], HEAD_DIM, BLOCK_D, ALIGN)
    tl.store(lse_ptr + row + offs, lse, mask=offs < n)
