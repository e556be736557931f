"""Attention backward kernels, FlashAttention-2 style: no atomics, deterministic.

delta = rowsum(dO * O) first; then one program per key block computes dK, dV
(looping over query blocks) and one per query block computes dQ (looping over
key blocks), both recomputing P from the forward's lse.
"""
import math

import triton
import triton.language as tl

from vqkernels.triton import _interpreter
from vqkernels.triton._attention_tiles import (_block_rows, _dot, _load_tile, _program,
                                               _store_rows, _stream_products)

_LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))


@triton.jit
def _attention_delta_kernel(
    out_ptr, do_ptr, delta_ptr, so_b, so_h, so_s, sdo_b, sdo_h, sdo_s, H, Sq,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id in fp32, for BLOCK_M rows of head (b, h).

    FLOPs: 2 B H Sq d. Bytes: reads 2 B H Sq d s, writes 4 B H Sq. Bandwidth-bound.
    """
    start_m, b, h = _program(Sq, H, BLOCK_M)
    offs = tl.arange(0, BLOCK_M)
    n = Sq - start_m
    start64 = tl.cast(start_m, tl.int64)
    o = _load_tile(out_ptr, b * so_b + h * so_h + start64 * so_s, offs, so_s, n, HEAD_DIM,
                   BLOCK_D, ALIGN, True)
    do = _load_tile(do_ptr, b * sdo_b + h * sdo_h + start64 * sdo_s, offs, sdo_s, n, HEAD_DIM,
                    BLOCK_D, ALIGN, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (b * H + h) * Sq + start_m + offs, delta, mask=offs < n)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, row, offs, n, MASK: tl.constexpr):
    """(log2-scaled lse, delta) of rows ``row + offs``; rows past n get (+inf, 0): P = 0 there."""
    if MASK:
        lse = tl.load(lse_ptr + row + offs, mask=offs < n, other=float("inf"))
        delta = tl.load(delta_ptr + row + offs, mask=offs < n, other=0.0)
    else:
        lse = tl.load(lse_ptr + row + offs)
        delta = tl.load(delta_ptr + row + offs)
    # lse = -inf (a row of -inf logits) must give P = 0, not 2^(-inf + inf).
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E), delta


@triton.jit
def _dkdv_tile(k, v, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n_k, dk, dv, q_ptr, q_base, sq_s,
               do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, start, Sq, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Fold queries [start, start + BLOCK_M) into dK, dV of this key block (transposed P, dS)."""
    offs = tl.arange(0, BLOCK_M)
    n = Sq - start
    s_t, dp_t, q, do = _stream_products(
        k, k_ptr, k_base, sk_s, v, v_ptr, v_base, sv_s, n_k, q_ptr, q_base, sq_s,
        do_ptr, do_base, sdo_s, start, offs, n, HEAD_DIM, BLOCK_D, ALIGN, BLOCK_N, MASK)
    lse2, delta = _row_stats(lse_ptr, delta_ptr, stat_row + start, offs, n, MASK)
    p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dv = _dot(p_t.to(do.dtype), do, dv)
    dk = _dot(ds_t, q, dk)
    return dk, dv


@triton.jit
def _attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s, H, Sq, Sk, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of BLOCK_N keys j of head (b, h), over all Sq queries i::

        P_ij = 2^(qk_scale q_i . k_j - log2(e) lse_i),   dP_ij = dO_i . v_j
        dV_j = sum_i P_ij dO_i,   dK_j = scale sum_i P_ij (dP_ij - delta_i) q_i

    FLOPs: 8 B H Sq Sk d (four matmuls). Bytes: reads B H (2 Sk d s +
    cdiv(Sk, BLOCK_N) Sq (2 d s + 8)) (Q, dO, lse, delta once per key block,
    mostly from L2), writes 2 B H Sk d s.
    """
    start_n, b, h = _program(Sk, H, BLOCK_N)
    offs = tl.arange(0, BLOCK_N)
    n = Sk - start_n
    k_base, k = _block_rows(k_ptr, b, h, start_n, sk_b, sk_h, sk_s, n, HEAD_DIM, BLOCK_D, ALIGN,
                            BLOCK_N)
    v_base, v = _block_rows(v_ptr, b, h, start_n, sv_b, sv_h, sv_s, n, HEAD_DIM, BLOCK_D, ALIGN,
                            BLOCK_N)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    q_base = b * sq_b + h * sq_h
    do_base = b * sdo_b + h * sdo_h
    stat_row = (b * H + h) * Sq
    full = (Sq // BLOCK_M) * BLOCK_M
    for start in _interpreter.runtime_range(0, full, BLOCK_M):
        dk, dv = _dkdv_tile(
            k, v, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n, dk, dv, q_ptr, q_base, sq_s,
            do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, start, Sq, qk_scale,
            HEAD_DIM, BLOCK_D, ALIGN, BLOCK_M, BLOCK_N, False)
    if full < Sq:
        dk, dv = _dkdv_tile(
            k, v, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n, dk, dv, q_ptr, q_base, sq_s,
            do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, full, Sq, qk_scale,
            HEAD_DIM, BLOCK_D, ALIGN, BLOCK_M, BLOCK_N, True)

    out_base = ((b * H + h) * Sk + start_n) * HEAD_DIM
    _store_rows(dk_ptr, out_base, offs, n, dk * scale, HEAD_DIM, BLOCK_D, ALIGN)
    _store_rows(dv_ptr, out_base, offs, n, dv, HEAD_DIM, BLOCK_D, ALIGN)


@triton.jit
def _dq_tile(q, do, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n_q, lse2, delta, dq,
             k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, start, Sk, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Fold keys [start, start + BLOCK_N) into dQ of this query block."""
    offs = tl.arange(0, BLOCK_N)
    n = Sk - start
    s, dp, k, _ = _stream_products(
        q, q_ptr, q_base, sq_s, do, do_ptr, do_base, sdo_s, n_q, k_ptr, k_base, sk_s,
        v_ptr, v_base, sv_s, start, offs, n, HEAD_DIM, BLOCK_D, ALIGN, BLOCK_M, MASK)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where((offs < n)[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    return _dot(ds, k, dq)


@triton.jit
def _attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s, H, Sq, Sk, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M queries i of head (b, h), over all Sk keys j::

        dQ_i = scale sum_j P_ij (dO_i . v_j - delta_i) k_j

    FLOPs: 6 B H Sq Sk d (three matmuls). Bytes: reads B H (Sq (2 d s + 8) +
    2 cdiv(Sq, BLOCK_M) Sk d s) (K, V once per query block, mostly from L2),
    writes B H Sq d s.
    """
    start_m, b, h = _program(Sq, H, BLOCK_M)
    offs = tl.arange(0, BLOCK_M)
    n = Sq - start_m
    q_base, q = _block_rows(q_ptr, b, h, start_m, sq_b, sq_h, sq_s, n, HEAD_DIM, BLOCK_D, ALIGN,
                            BLOCK_M)
    do_base, do = _block_rows(do_ptr, b, h, start_m, sdo_b, sdo_h, sdo_s, n, HEAD_DIM, BLOCK_D,
                              ALIGN, BLOCK_M)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row = (b * H + h) * Sq + start_m
    lse2, delta = _row_stats(lse_ptr, delta_ptr, row, offs, n, True)
    k_base = b * sk_b + h * sk_h
    v_base = b * sv_b + h * sv_h
    full = (Sk // BLOCK_N) * BLOCK_N
    for start in _interpreter.runtime_range(0, full, BLOCK_N):
        dq = _dq_tile(q, do, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n, lse2, delta, dq,
                      k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, start, Sk, qk_scale,
                      HEAD_DIM, BLOCK_D, ALIGN, BLOCK_M, BLOCK_N, False)
    if full < Sk:
        dq = _dq_tile(q, do, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n, lse2, delta, dq,
                      k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, full, Sk, qk_scale,
                      HEAD_DIM, BLOCK_D, ALIGN, BLOCK_M, BLOCK_N, True)

    _store_rows(dq_ptr, row * HEAD_DIM, offs, n, dq * scale, HEAD_DIM, BLOCK_D, ALIGN)
