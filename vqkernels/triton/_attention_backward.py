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
    o = _load_tile(out_ptr, b * so_b + h * so_h + start64 * so_s, offs, so_s, n, 0, BLOCK_D,
                   HEAD_DIM, ALIGN, True)
    do = _load_tile(do_ptr, b * sdo_b + h * sdo_h + start64 * sdo_s, offs, sdo_s, n, 0, BLOCK_D,
                    HEAD_DIM, ALIGN, True)
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
def _dkdv_tile(k0, k1, v0, v1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n_k, dk0, dk1, dv0, dv1,
               q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, start,
               Sq, qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr):
    """Fold queries [start, start + BLOCK_M) into dK, dV of this key block (transposed P, dS)."""
    offs = tl.arange(0, BLOCK_M)
    n = Sq - start
    s_t, dp_t, q0, q1, do0, do1 = _stream_products(
        k0, k1, k_ptr, k_base, sk_s, v0, v1, v_ptr, v_base, sv_s, n_k, q_ptr, q_base, sq_s,
        do_ptr, do_base, sdo_s, start, offs, n, HEAD_DIM, D0, D1, ALIGN, BLOCK_N, MASK)
    lse2, delta = _row_stats(lse_ptr, delta_ptr, stat_row + start, offs, n, MASK)
    p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
    ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
    p_t = p_t.to(do0.dtype)
    dv0 = _dot(p_t, do0, dv0)
    dk0 = _dot(ds_t, q0, dk0)
    if D1 > 0:
        dv1 = _dot(p_t, do1, dv1)
        dk1 = _dot(ds_t, q1, dk1)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attention_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s, H, Sq, Sk, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
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
    k_base, k0, k1 = _block_rows(k_ptr, b, h, start_n, sk_b, sk_h, sk_s, n, HEAD_DIM, D0, D1,
                                 ALIGN, BLOCK_N)
    v_base, v0, v1 = _block_rows(v_ptr, b, h, start_n, sv_b, sv_h, sv_s, n, HEAD_DIM, D0, D1,
                                 ALIGN, BLOCK_N)
    dk0 = tl.zeros((BLOCK_N, D0), tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), tl.float32)
    dk1 = tl.zeros((BLOCK_N, D1), tl.float32) if D1 > 0 else 0.0
    dv1 = tl.zeros((BLOCK_N, D1), tl.float32) if D1 > 0 else 0.0
    q_base = b * sq_b + h * sq_h
    do_base = b * sdo_b + h * sdo_h
    stat_row = (b * H + h) * Sq
    full = (Sq // BLOCK_M) * BLOCK_M
    for start in _interpreter.runtime_range(0, full, BLOCK_M):
        dk0, dk1, dv0, dv1 = _dkdv_tile(
            k0, k1, v0, v1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n, dk0, dk1, dv0, dv1,
            q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, start,
            Sq, qk_scale, HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, False)
    if full < Sq:
        dk0, dk1, dv0, dv1 = _dkdv_tile(
            k0, k1, v0, v1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n, dk0, dk1, dv0, dv1,
            q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, full, Sq,
            qk_scale, HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, True)

    out_base = ((b * H + h) * Sk + start_n) * HEAD_DIM
    _store_rows(dk_ptr, out_base, offs, n, dk0, dk1, scale, HEAD_DIM, D0, D1, ALIGN)
    _store_rows(dv_ptr, out_base, offs, n, dv0, dv1, 1.0, HEAD_DIM, D0, D1, ALIGN)


@triton.jit
def _dq_tile(q0, q1, do0, do1, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n_q, lse2, delta,
             dq0, dq1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, start, Sk, qk_scale,
             HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Fold keys [start, start + BLOCK_N) into dQ of this query block."""
    offs = tl.arange(0, BLOCK_N)
    n = Sk - start
    s, dp, k0, k1, _, _ = _stream_products(
        q0, q1, q_ptr, q_base, sq_s, do0, do1, do_ptr, do_base, sdo_s, n_q, k_ptr, k_base, sk_s,
        v_ptr, v_base, sv_s, start, offs, n, HEAD_DIM, D0, D1, ALIGN, BLOCK_M, MASK)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where((offs < n)[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k0.dtype)
    dq0 = _dot(ds, k0, dq0)
    if D1 > 0:
        dq1 = _dot(ds, k1, dq1)
    return dq0, dq1


@triton.jit
def _attention_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s, H, Sq, Sk, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
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
    q_base, q0, q1 = _block_rows(q_ptr, b, h, start_m, sq_b, sq_h, sq_s, n, HEAD_DIM, D0, D1,
                                 ALIGN, BLOCK_M)
    do_base, do0, do1 = _block_rows(do_ptr, b, h, start_m, sdo_b, sdo_h, sdo_s, n, HEAD_DIM, D0,
                                    D1, ALIGN, BLOCK_M)
    dq0 = tl.zeros((BLOCK_M, D0), tl.float32)
    dq1 = tl.zeros((BLOCK_M, D1), tl.float32) if D1 > 0 else 0.0
    row = (b * H + h) * Sq + start_m
    lse2, delta = _row_stats(lse_ptr, delta_ptr, row, offs, n, True)
    k_base = b * sk_b + h * sk_h
    v_base = b * sv_b + h * sv_h
    full = (Sk // BLOCK_N) * BLOCK_N
    for start in _interpreter.runtime_range(0, full, BLOCK_N):
        dq0, dq1 = _dq_tile(
            q0, q1, do0, do1, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n, lse2, delta,
            dq0, dq1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, start, Sk, qk_scale,
            HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, False)
    if full < Sk:
        dq0, dq1 = _dq_tile(
            q0, q1, do0, do1, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n, lse2, delta,
            dq0, dq1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, full, Sk, qk_scale,
            HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, True)

    _store_rows(dq_ptr, row * HEAD_DIM, offs, n, dq0, dq1, scale, HEAD_DIM, D0, D1, ALIGN)
