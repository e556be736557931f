"""Non-causal scaled dot-product attention, Triton kernels, FlashAttention-2 style
(math in vqkernels/reference/attention.py::attention_lse).

Forward: a program owns BLOCK_M query rows of one head and streams the head's
keys and values past them in BLOCK_N tiles with an online softmax (running max
and sum), so the Sq x Sk logits never reach memory; it saves lse for the
backward. Backward: delta = rowsum(dO * O), then one program per key block
(dK, dV, looping over query blocks) and one per query block (dQ, looping over
key blocks), both recomputing P from lse: no atomics, deterministic.

Block shapes must be powers of two, and padding d = 72 to 128 would waste 44%
of the FLOPs, so the head dim is split into a power-of-two main part and a
small remainder, d <= D0 + D1 (72 -> 64 + 16, the last 8 columns masked):
q k^T = q0 k0^T + q1 k1^T and every output is two accumulators.

Exponentials are base 2 (the scale carries log2 e); lse is stored in natural
log. fp32 is computed in IEEE fp32; fp16 / bf16 dot operands stay in the input
dtype (P and dS are cast to it, as FlashAttention does), accumulating in fp32.
Tensors are indexed through their batch, head and sequence strides (DiT's
permuted views of a packed qkv tensor work without a copy); the last stride
is 1.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device, _math
from vqkernels.triton._math import _INTERPRETED

_LOG2E = math.log2(math.e)
_LN2: tl.constexpr = tl.constexpr(math.log(2.0))
_LOG2E_C: tl.constexpr = tl.constexpr(_LOG2E)


def _split_head_dim(d: int) -> tuple[int, int]:
    """(D0, D1): D0 the largest power of two <= d (>= 16), D1 the rest as a power of two >= 16."""
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    return d0, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


def _cfg(block_m, block_n, num_warps, num_stages):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _configs(dtype: torch.dtype, d: int) -> dict[str, dict]:
    """Launch config of each kernel (``forward``, ``delta``, ``dkdv``, ``dq``) on an H100.

    Fixed, not autotuned; each was compiled for sm_90 (tests/test_triton_sm90.py)
    and checked with ptxas for register spills, width = D0 + D1. Half dtypes:
    the forward is FlashAttention-2's 128 x 64 tile in 8 warps (two wgmma
    warpgroups) with a 3-stage K/V pipeline (80 KiB of shared memory at
    d = 72, 128 KiB at 128); the backward keeps two (64, width) fp32
    accumulators and two operand tiles per program: 64 x 64 tiles, 8 warps
    past width 64. Past width 128 the streamed tile halves to stay in shared
    memory and registers. fp32 dots run on the CUDA cores (IEEE), whose
    operands live in registers replicated per thread: small tiles, 8 warps,
    no spills up to width 128 (a few bytes at 128; d = 200 still spills).
    """
    d0, d1 = _split_head_dim(d)
    width = d0 + d1
    if dtype == torch.float32:
        if width <= 96:
            fwd, dkdv, dq = _cfg(64, 32, 8, 3), _cfg(32, 32, 8, 2), _cfg(32, 32, 8, 2)
        elif width <= 128:
            fwd, dkdv, dq = _cfg(32, 32, 8, 2), _cfg(16, 16, 4, 2), _cfg(16, 16, 4, 2)
        else:
            fwd, dkdv, dq = _cfg(16, 16, 4, 2), _cfg(16, 16, 4, 2), _cfg(16, 16, 4, 2)
    elif width <= 128:
        warps = 4 if width <= 64 else 8
        fwd, dkdv, dq = _cfg(128, 64, 8, 3), _cfg(64, 64, warps, 2), _cfg(64, 64, warps, 2)
    else:
        fwd, dkdv, dq = _cfg(128, 32, 8, 2), _cfg(32, 64, 8, 2), _cfg(64, 32, 8, 2)
    block_d = max(16, triton.next_power_of_2(d))
    delta = dict(BLOCK_M=max(16, 4096 // block_d), BLOCK_D=block_d, num_warps=4, num_stages=1)
    return dict(forward=fwd, delta=delta, dkdv=dkdv, dq=dq)


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b in fp32: IEEE for fp32 tiles, tensor cores in the input dtype otherwise."""
    if _INTERPRETED:
        # The interpreter's dot cannot multiply bf16 (stored as uint16); half
        # products are exact in fp32, so upcasting emulates the tensor cores.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)


@triton.jit
def _program(S, H, BLOCK: tl.constexpr):
    """(first row, batch, head) of this program; programs of one head are adjacent (L2 reuse)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(S, BLOCK)
    bh = pid // blocks
    return (pid % blocks) * BLOCK, tl.cast(bh // H, tl.int64), tl.cast(bh % H, tl.int64)


@triton.jit
def _tile_ptrs(ptr, base, offs, stride, COL0: tl.constexpr, WIDTH: tl.constexpr,
               ALIGN: tl.constexpr):
    """Pointers to rows ``offs`` x columns [COL0, COL0 + WIDTH) past element ``base``.

    ALIGN (elements) divides base and stride: it lets the loads vectorize
    when d is not a multiple of 16 (d = 72).
    """
    rows = tl.multiple_of(base + tl.cast(offs, tl.int64) * stride, ALIGN)
    return ptr + rows[:, None] + (COL0 + tl.arange(0, WIDTH))[None, :]


@triton.jit
def _load_tile(ptr, base, offs, stride, n, COL0: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, MASK_ROWS: tl.constexpr):
    """(len(offs), WIDTH) tile, zero past row n (when MASK_ROWS) and past column HEAD_DIM."""
    ptrs = _tile_ptrs(ptr, base, offs, stride, COL0, WIDTH, ALIGN)
    col_ok = (COL0 + tl.arange(0, WIDTH)) < HEAD_DIM
    if MASK_ROWS:
        if COL0 + WIDTH > HEAD_DIM:
            return tl.load(ptrs, mask=(offs < n)[:, None] & col_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs, mask=(offs < n)[:, None], other=0.0)
    else:
        if COL0 + WIDTH > HEAD_DIM:
            return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _store_tile(ptr, base, offs, stride, n, value, COL0: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr):
    ptrs = _tile_ptrs(ptr, base, offs, stride, COL0, WIDTH, ALIGN)
    col_ok = (COL0 + tl.arange(0, WIDTH)) < HEAD_DIM
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=(offs < n)[:, None] & col_ok[None, :])


@triton.jit
def _reload(x0, x1, ptr, base, stride, n, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
            D1: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr):
    """(x0, x1): columns [0, D0) and [D0, D0 + D1) of ``ROWS`` rows; x1 passes through if D1 = 0.

    Also reloads the loop-invariant operands of the fp32 dots in every
    iteration (from L1): the FMA dot would hold them in registers replicated
    per thread and spill hundreds of bytes per thread; the held copy goes dead.
    """
    offs = tl.arange(0, ROWS)
    x0 = _load_tile(ptr, base, offs, stride, n, 0, D0, HEAD_DIM, ALIGN, True)
    if D1 > 0:
        x1 = _load_tile(ptr, base, offs, stride, n, D0, D1, HEAD_DIM, ALIGN, True)
    return x0, x1


@triton.jit
def _forward_tile(q0, q1, q_ptr, q_base, sq_s, n_q, acc0, acc1, m_i, l_i, k_ptr, k_base, sk_s,
                  v_ptr, v_base, sv_s, start, Sk, qk_scale, HEAD_DIM: tl.constexpr,
                  D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Fold keys [start, start + BLOCK_N) into the running (acc, max, sum); MASK: the tail."""
    if q_ptr.dtype.element_ty == tl.float32:
        q0, q1 = _reload(q0, q1, q_ptr, q_base, sq_s, n_q, HEAD_DIM, D0, D1, ALIGN, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    n = Sk - start
    start64 = tl.cast(start, tl.int64)
    k_base += start64 * sk_s
    v_base += start64 * sv_s
    k0 = _load_tile(k_ptr, k_base, offs, sk_s, n, 0, D0, HEAD_DIM, ALIGN, MASK)
    s = _dot(q0, tl.trans(k0), tl.zeros((BLOCK_M, BLOCK_N), tl.float32))
    if D1 > 0:
        k1 = _load_tile(k_ptr, k_base, offs, sk_s, n, D0, D1, HEAD_DIM, ALIGN, MASK)
        s = _dot(q1, tl.trans(k1), s)
    s = s * qk_scale
    if MASK:
        s = tl.where((offs < n)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row whose logits are all -inf so far: exponents against 0, not -inf - -inf.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    v0 = _load_tile(v_ptr, v_base, offs, sv_s, n, 0, D0, HEAD_DIM, ALIGN, MASK)
    acc0 = _dot(p.to(v0.dtype), v0, acc0 * alpha[:, None])
    if D1 > 0:
        v1 = _load_tile(v_ptr, v_base, offs, sv_s, n, D0, D1, HEAD_DIM, ALIGN, MASK)
        acc1 = _dot(p.to(v1.dtype), v1, acc1 * alpha[:, None])
    return acc0, acc1, m_new, l_i


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    H, Sq, Sk, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M query rows i of head (b, h) against all Sk keys j (qk_scale = scale log2 e)::

        s_ij = qk_scale q_i . k_j        per key tile: m' = max(m, max_j s_ij),
        acc  = 2^(m - m') acc + sum_j 2^(s_ij - m') v_j,  l = 2^(m - m') l + sum_j 2^(s_ij - m')
        out_i = acc / l,   lse_i = ln 2 (m + log2 l)   (= ln sum_j exp(scale q_i . k_j))

    FLOPs: 4 B H Sq Sk d (two matmuls; the split computes on D0 + D1 >= d
    columns). Bytes: reads B H (Sq + 2 cdiv(Sq, BLOCK_M) Sk) d s (K and V
    once per query block, mostly from L2), writes B H Sq (d s + 4);
    s = sizeof(dtype). Compute-bound for Sq, Sk >~ 64.
    """
    start_m, b, h = _program(Sq, H, BLOCK_M)
    offs = tl.arange(0, BLOCK_M)
    n = Sq - start_m
    q_base = b * sq_b + h * sq_h + tl.cast(start_m, tl.int64) * sq_s
    q0, q1 = _reload(0.0, 0.0, q_ptr, q_base, sq_s, n, HEAD_DIM, D0, D1, ALIGN, BLOCK_M)
    acc0 = tl.zeros((BLOCK_M, D0), tl.float32)
    acc1 = tl.zeros((BLOCK_M, D1), tl.float32) if D1 > 0 else 0.0
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    k_base = b * sk_b + h * sk_h
    v_base = b * sv_b + h * sv_h
    full = (Sk // BLOCK_N) * BLOCK_N
    if _INTERPRETED:
        # triton 3.6's interpreter cannot range() over a runtime bound with
        # numpy >= 2.4 (int() of a 1-element array); a while loop works on both.
        start = 0
        while start < full:
            acc0, acc1, m_i, l_i = _forward_tile(
                q0, q1, q_ptr, q_base, sq_s, n, acc0, acc1, m_i, l_i, k_ptr, k_base, sk_s,
                v_ptr, v_base, sv_s, start, Sk, qk_scale, HEAD_DIM, D0, D1, ALIGN, BLOCK_M,
                BLOCK_N, False)
            start += BLOCK_N
    else:
        for start in range(0, full, BLOCK_N):
            acc0, acc1, m_i, l_i = _forward_tile(
                q0, q1, q_ptr, q_base, sq_s, n, acc0, acc1, m_i, l_i, k_ptr, k_base, sk_s,
                v_ptr, v_base, sv_s, start, Sk, qk_scale, HEAD_DIM, D0, D1, ALIGN, BLOCK_M,
                BLOCK_N, False)
    if full < Sk:
        acc0, acc1, m_i, l_i = _forward_tile(
            q0, q1, q_ptr, q_base, sq_s, n, acc0, acc1, m_i, l_i, k_ptr, k_base, sk_s, v_ptr,
            v_base, sv_s, full, Sk, qk_scale, HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, True)

    # l_ok is false only for a row of -inf logits: softmax is 0 / 0 there, so out is NaN
    # (as torch.softmax and the other backends give), lse -inf.
    l_ok = l_i > 0.0
    inv_l = tl.where(l_ok, 1.0 / tl.where(l_ok, l_i, 1.0), float("nan"))
    lse = tl.where(l_ok, m_i * _LN2 + _math.log(tl.where(l_ok, l_i, 1.0)), float("-inf"))
    row = (b * H + h) * Sq + start_m
    _store_tile(out_ptr, row * HEAD_DIM, offs, HEAD_DIM, n, acc0 * inv_l[:, None], 0, D0,
                HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(out_ptr, row * HEAD_DIM, offs, HEAD_DIM, n, acc1 * inv_l[:, None], D0, D1,
                    HEAD_DIM, ALIGN)
    tl.store(lse_ptr + row + offs, lse, mask=offs < n)


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
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_C), delta


@triton.jit
def _dkdv_tile(k0, k1, v0, v1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n_k, dk0, dk1, dv0, dv1,
               q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, start,
               Sq, qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr):
    """Fold queries [start, start + BLOCK_M) into dK, dV of this key block (transposed P, dS)."""
    if k_ptr.dtype.element_ty == tl.float32:
        k0, k1 = _reload(k0, k1, k_ptr, k_base, sk_s, n_k, HEAD_DIM, D0, D1, ALIGN, BLOCK_N)
        v0, v1 = _reload(v0, v1, v_ptr, v_base, sv_s, n_k, HEAD_DIM, D0, D1, ALIGN, BLOCK_N)
    offs = tl.arange(0, BLOCK_M)
    n = Sq - start
    start64 = tl.cast(start, tl.int64)
    q_base += start64 * sq_s
    do_base += start64 * sdo_s
    q0 = _load_tile(q_ptr, q_base, offs, sq_s, n, 0, D0, HEAD_DIM, ALIGN, MASK)
    do0 = _load_tile(do_ptr, do_base, offs, sdo_s, n, 0, D0, HEAD_DIM, ALIGN, MASK)
    s_t = _dot(k0, tl.trans(q0), tl.zeros((BLOCK_N, BLOCK_M), tl.float32))
    dp_t = _dot(v0, tl.trans(do0), tl.zeros((BLOCK_N, BLOCK_M), tl.float32))
    if D1 > 0:
        q1 = _load_tile(q_ptr, q_base, offs, sq_s, n, D0, D1, HEAD_DIM, ALIGN, MASK)
        do1 = _load_tile(do_ptr, do_base, offs, sdo_s, n, D0, D1, HEAD_DIM, ALIGN, MASK)
        s_t = _dot(k1, tl.trans(q1), s_t)
        dp_t = _dot(v1, tl.trans(do1), dp_t)
    lse2, delta = _row_stats(lse_ptr, delta_ptr, stat_row + start64, offs, n, MASK)
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
    start64 = tl.cast(start_n, tl.int64)
    k_base = b * sk_b + h * sk_h + start64 * sk_s
    v_base = b * sv_b + h * sv_h + start64 * sv_s
    k0, k1 = _reload(0.0, 0.0, k_ptr, k_base, sk_s, n, HEAD_DIM, D0, D1, ALIGN, BLOCK_N)
    v0, v1 = _reload(0.0, 0.0, v_ptr, v_base, sv_s, n, HEAD_DIM, D0, D1, ALIGN, BLOCK_N)
    dk0 = tl.zeros((BLOCK_N, D0), tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), tl.float32)
    dk1 = tl.zeros((BLOCK_N, D1), tl.float32) if D1 > 0 else 0.0
    dv1 = tl.zeros((BLOCK_N, D1), tl.float32) if D1 > 0 else 0.0
    q_base = b * sq_b + h * sq_h
    do_base = b * sdo_b + h * sdo_h
    stat_row = (b * H + h) * Sq
    full = (Sq // BLOCK_M) * BLOCK_M
    if _INTERPRETED:
        start = 0
        while start < full:
            dk0, dk1, dv0, dv1 = _dkdv_tile(
                k0, k1, v0, v1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n, dk0, dk1, dv0, dv1,
                q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, start,
                Sq, qk_scale, HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, False)
            start += BLOCK_M
    else:
        for start in range(0, full, BLOCK_M):
            dk0, dk1, dv0, dv1 = _dkdv_tile(
                k0, k1, v0, v1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n, dk0, dk1, dv0, dv1,
                q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, start,
                Sq, qk_scale, HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, False)
    if full < Sq:
        dk0, dk1, dv0, dv1 = _dkdv_tile(
            k0, k1, v0, v1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, n, dk0, dk1, dv0, dv1,
            q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, lse_ptr, delta_ptr, stat_row, full, Sq,
            qk_scale, HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, True)

    out_base = ((b * H + h) * Sk + start64) * HEAD_DIM
    _store_tile(dk_ptr, out_base, offs, HEAD_DIM, n, dk0 * scale, 0, D0, HEAD_DIM, ALIGN)
    _store_tile(dv_ptr, out_base, offs, HEAD_DIM, n, dv0, 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(dk_ptr, out_base, offs, HEAD_DIM, n, dk1 * scale, D0, D1, HEAD_DIM, ALIGN)
        _store_tile(dv_ptr, out_base, offs, HEAD_DIM, n, dv1, D0, D1, HEAD_DIM, ALIGN)


@triton.jit
def _dq_tile(q0, q1, do0, do1, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n_q, lse2, delta,
             dq0, dq1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, start, Sk, qk_scale,
             HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ALIGN: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Fold keys [start, start + BLOCK_N) into dQ of this query block."""
    if q_ptr.dtype.element_ty == tl.float32:
        q0, q1 = _reload(q0, q1, q_ptr, q_base, sq_s, n_q, HEAD_DIM, D0, D1, ALIGN, BLOCK_M)
        do0, do1 = _reload(do0, do1, do_ptr, do_base, sdo_s, n_q, HEAD_DIM, D0, D1, ALIGN,
                           BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    n = Sk - start
    start64 = tl.cast(start, tl.int64)
    k_base += start64 * sk_s
    v_base += start64 * sv_s
    k0 = _load_tile(k_ptr, k_base, offs, sk_s, n, 0, D0, HEAD_DIM, ALIGN, MASK)
    v0 = _load_tile(v_ptr, v_base, offs, sv_s, n, 0, D0, HEAD_DIM, ALIGN, MASK)
    s = _dot(q0, tl.trans(k0), tl.zeros((BLOCK_M, BLOCK_N), tl.float32))
    dp = _dot(do0, tl.trans(v0), tl.zeros((BLOCK_M, BLOCK_N), tl.float32))
    if D1 > 0:
        k1 = _load_tile(k_ptr, k_base, offs, sk_s, n, D0, D1, HEAD_DIM, ALIGN, MASK)
        v1 = _load_tile(v_ptr, v_base, offs, sv_s, n, D0, D1, HEAD_DIM, ALIGN, MASK)
        s = _dot(q1, tl.trans(k1), s)
        dp = _dot(do1, tl.trans(v1), dp)
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
    start64 = tl.cast(start_m, tl.int64)
    q_base = b * sq_b + h * sq_h + start64 * sq_s
    do_base = b * sdo_b + h * sdo_h + start64 * sdo_s
    q0, q1 = _reload(0.0, 0.0, q_ptr, q_base, sq_s, n, HEAD_DIM, D0, D1, ALIGN, BLOCK_M)
    do0, do1 = _reload(0.0, 0.0, do_ptr, do_base, sdo_s, n, HEAD_DIM, D0, D1, ALIGN, BLOCK_M)
    dq0 = tl.zeros((BLOCK_M, D0), tl.float32)
    dq1 = tl.zeros((BLOCK_M, D1), tl.float32) if D1 > 0 else 0.0
    row = (b * H + h) * Sq + start64
    lse2, delta = _row_stats(lse_ptr, delta_ptr, row, offs, n, True)
    k_base = b * sk_b + h * sk_h
    v_base = b * sv_b + h * sv_h
    full = (Sk // BLOCK_N) * BLOCK_N
    if _INTERPRETED:
        start = 0
        while start < full:
            dq0, dq1 = _dq_tile(
                q0, q1, do0, do1, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n, lse2, delta,
                dq0, dq1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, start, Sk, qk_scale,
                HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, False)
            start += BLOCK_N
    else:
        for start in range(0, full, BLOCK_N):
            dq0, dq1 = _dq_tile(
                q0, q1, do0, do1, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n, lse2, delta,
                dq0, dq1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, start, Sk, qk_scale,
                HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, False)
    if full < Sk:
        dq0, dq1 = _dq_tile(
            q0, q1, do0, do1, q_ptr, q_base, sq_s, do_ptr, do_base, sdo_s, n, lse2, delta,
            dq0, dq1, k_ptr, k_base, sk_s, v_ptr, v_base, sv_s, full, Sk, qk_scale,
            HEAD_DIM, D0, D1, ALIGN, BLOCK_M, BLOCK_N, True)

    _store_tile(dq_ptr, row * HEAD_DIM, offs, HEAD_DIM, n, dq0 * scale, 0, D0, HEAD_DIM, ALIGN)
    if D1 > 0:
        _store_tile(dq_ptr, row * HEAD_DIM, offs, HEAD_DIM, n, dq1 * scale, D0, D1, HEAD_DIM,
                    ALIGN)


def _alignment(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 16 bytes (in elements) dividing every address and outer stride."""
    size = tensors[0].element_size()
    align = max(1, 16 // size)
    for t in tensors:
        for value in (t.data_ptr() // size, *t.stride()[:-1]):
            while value % align:
                align //= 2
    return align


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Sq, d) contiguous in q's dtype, lse (B, H, Sq) float32 contiguous.

    q (B, H, Sq, d), k and v (B, H, Sk >= 1, d): one dtype (fp16 / bf16 /
    fp32), last stride 1, other strides arbitrary; validated by vqkernels.ops.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    out = torch.empty((b, h, sq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    d0, d1 = _split_head_dim(d)
    cfg = _configs(q.dtype, d)["forward"]
    grid = (b * h * triton.cdiv(sq, cfg["BLOCK_M"]),)
    with _device.on_device(q):
        _attention_forward_kernel[grid](
            q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), h, sq, sk,
            scale * _LOG2E, HEAD_DIM=d, D0=d0, D1=d1, ALIGN=_alignment(q, k, v, out), **cfg)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_q, grad_k, grad_v: contiguous, like q, k, v (same dtype).

    grad_out (B, H, Sq, d) with last stride 1; out and lse as returned by
    attention_forward for the same q, k, v and scale.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    grad_q = torch.empty((b, h, sq, d), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((b, h, sk, d), dtype=k.dtype, device=k.device)
    grad_v = torch.empty((b, h, sk, d), dtype=v.dtype, device=v.device)
    if grad_q.numel() == 0:
        # No queries: the gradients of k and v are sums over nothing.
        return grad_q, grad_k.zero_(), grad_v.zero_()
    lse = lse.contiguous()
    d0, d1 = _split_head_dim(d)
    cfgs = _configs(q.dtype, d)
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    inputs = (q, k, v, grad_out)
    align = _alignment(*inputs, out, grad_q)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    constants = dict(HEAD_DIM=d, D0=d0, D1=d1, ALIGN=align)
    with _device.on_device(q):
        cfg = cfgs["delta"]
        _attention_delta_kernel[(b * h * triton.cdiv(sq, cfg["BLOCK_M"]),)](
            out, grad_out, delta, *_strides(out), *_strides(grad_out), h, sq, HEAD_DIM=d,
            ALIGN=align, **cfg)
        cfg = cfgs["dkdv"]
        _attention_dkdv_kernel[(b * h * triton.cdiv(sk, cfg["BLOCK_N"]),)](
            *inputs, lse, delta, grad_k, grad_v, *strides, h, sq, sk, scale, scale * _LOG2E,
            **constants, **cfg)
        cfg = cfgs["dq"]
        _attention_dq_kernel[(b * h * triton.cdiv(sq, cfg["BLOCK_M"]),)](
            *inputs, lse, delta, grad_q, *strides, h, sq, sk, scale, scale * _LOG2E,
            **constants, **cfg)
    return grad_q, grad_k, grad_v
