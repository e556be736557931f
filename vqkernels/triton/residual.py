"""Residual nearest-code search, Triton kernel (math in vqkernels/reference/search.py).

One program owns BLOCK_N rows and takes them through every stage: their fp32
residual and running sum stay in registers, and each stage streams its
codebook past them in BLOCK_K-code tiles exactly as ``nearest_code`` does
(``search._scan_tile``). z is read once, the sum written once; no N x K buffer.
With STATS the program also adds each residual into its stage's chosen code
(the EMA statistics of every stage, in the same pass).
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device, _interpreter
from vqkernels.triton.search import _scan_tile

MAX_DIM = 256  # the whole residual row in registers: one D tile of the next power of two

_INTERPRETER_CONFIG = dict(BLOCK_N=16, BLOCK_K=32)  # several K tiles on tiny test shapes

# (BLOCK_N, BLOCK_K, num_warps, num_stages): fewer rows than the search's, since the
# residual and the sum (2 BLOCK_N BLOCK_D fp32) stay in registers across the stages.
_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((64, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3),
                                 (32, 128, 4, 2), (128, 64, 8, 2), (16, 64, 4, 3))]


@triton.jit
def _residual_search_kernel(
    z_ptr, books_ptr, sqnorms_ptr, starts_ptr, idx_ptr, out_ptr, counts_ptr, sums_ptr, N, Q,
    D: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Residual search of BLOCK_N rows of z (N, D) through Q codebooks, concatenated in
    books (sum_q K_q, D) with stage q's codes in rows [starts[q], starts[q + 1])::

        r_0 = z (fp32),   i_q = argmin_k |e^q_k|^2 - 2 <r_q, e^q_k>,   r_(q+1) = r_q - e^q[i_q]
        out = sum_q e^q[i_q]   (fp32, stored in z's dtype)

    Ties go to the lowest k, NaN scores never win, a row without a finite score
    takes code 0 (as ``nearest_code``). FLOPs: 2 N D sum_q K_q. Bytes: z read and
    out written once (2 N D s), indices 8 N Q, the codebooks once per program
    (from L2 after the first). Needs D <= BLOCK_D.

    STATS, in the rows of the concatenated codebooks (atomics, fp32 sums)::

        counts[starts[q] + i_q[n]] += 1,   sums[starts[q] + i_q[n], :] += r_q[n, :]
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    d_offs = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d_offs < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + d_offs[None, :]
    residual = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    total = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for q in _interpreter.runtime_range(0, Q, 1):
        start = tl.load(starts_ptr + q)
        k = (tl.load(starts_ptr + q + 1) - start).to(tl.int32)  # K_q <= 2^30: int32 indices
        codes_ptr = books_ptr + start * D
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
        for k0 in _interpreter.runtime_range(0, k, BLOCK_K):
            best, best_idx = _scan_tile(residual, z_ptr, row_ok, codes_ptr, sqnorms_ptr + start,
                                        k0, k, best, best_idx, D, PRECISION, BLOCK_N, BLOCK_K,
                                        BLOCK_D)
        best_idx = tl.where((best > float("-inf")) & (best < float("inf")), best_idx, 0)
        chosen = tl.load(codes_ptr + best_idx.to(tl.int64)[:, None] * D + d_offs[None, :],
                         mask=mask, other=0.0).to(tl.float32)
        if STATS:
            slot = (start + best_idx).to(tl.int64)
            tl.atomic_add(sums_ptr + slot[:, None] * D + d_offs[None, :], residual, mask=mask)
            tl.atomic_add(counts_ptr + slot, tl.full((BLOCK_N,), 1, tl.int32), mask=row_ok)
        residual -= chosen
        total += chosen
        tl.store(idx_ptr + rows.to(tl.int64) * Q + q, best_idx.to(tl.int64), mask=row_ok)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


_TUNED = triton.autotune(configs=_CONFIGS, key=["Q", "D", "PRECISION", "STATS"])(
    _residual_search_kernel)
# Autotuning runs the kernel once per config: the statistics are zeroed before each run.
_TUNED_STATS = triton.autotune(configs=_CONFIGS, key=["Q", "D", "PRECISION", "STATS"],
                               reset_to_zero=["counts_ptr", "sums_ptr"])(_residual_search_kernel)


def residual_nearest_code(z: torch.Tensor, books: list[torch.Tensor], sqnorms: list[torch.Tensor],
                          precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the search on validated inputs: z (N, D <= MAX_DIM) contiguous, Q >= 1 codebooks
    (K_q >= 1, D) of z's dtype (fp32 / fp16 / bf16), sqnorms their fp32 |e|^2 (as the fp32
    codes), on z's device. Returns indices (N, Q) int64 and the sum of the codes (N, D)."""
    indices, out = _outputs(z, books)
    _launch(z, books, sqnorms, precision, indices, out, None)
    return indices, out


def residual_nearest_code_with_stats(z: torch.Tensor, books: list[torch.Tensor],
                                     sqnorms: list[torch.Tensor], precision: str
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """``residual_nearest_code`` plus every stage's counts and sums of the residual it
    searched, stacked in the codebooks' order: (sum_q K_q,) and (sum_q K_q, D) fp32."""
    indices, out = _outputs(z, books)
    rows = sum(book.shape[0] for book in books)
    counts = torch.zeros(rows, dtype=torch.int32, device=z.device)
    sums = torch.zeros((rows, z.shape[1]), dtype=torch.float32, device=z.device)
    _launch(z, books, sqnorms, precision, indices, out, (counts, sums))
    return indices, out, counts.to(torch.float32), sums


def _outputs(z, books):
    return (torch.empty((z.shape[0], len(books)), dtype=torch.int64, device=z.device),
            torch.empty_like(z))


def _launch(z, books, sqnorms, precision, indices, out, stats):
    n, d = z.shape
    if n == 0:
        return
    starts = torch.tensor(list(itertools.accumulate((book.shape[0] for book in books),
                                                    initial=0)),
                          dtype=torch.int64, pin_memory=z.is_cuda)
    starts = starts.to(z.device, non_blocking=True)  # from pinned memory: no host sync
    counts, sums = stats if stats is not None else (indices, out)  # unused without STATS
    args = (z, torch.cat(books).contiguous(), torch.cat(sqnorms).float().contiguous(), starts,
            indices, out, counts, sums, n, len(books))
    constants = dict(D=d, PRECISION=precision, STATS=stats is not None,
                     BLOCK_D=max(16, triton.next_power_of_2(d)))
    with _device.on_device(z):
        if _interpreter.INTERPRETED:
            grid = (triton.cdiv(n, _INTERPRETER_CONFIG["BLOCK_N"]),)
            _residual_search_kernel[grid](*args, **constants, **_INTERPRETER_CONFIG)
        else:
            tuned = _TUNED if stats is None else _TUNED_STATS
            tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **constants)
