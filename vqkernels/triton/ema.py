"""EMA codebook update, Triton kernels (math in vqkernels/reference/ema.py).

Statistics in one pass over z, then a small per-code finalize:
- fast: ``_code_stats_kernel`` adds each row of z into its code's sums and 1
  into its count with atomics (the summation order varies from run to run);
- deterministic: the indices are stably sorted and ``_segment_sums_kernel``
  sums each code's rows in sorted (= row) order, a fixed reduction tree;
- ``_ema_cluster_kernel`` (one program) updates cluster_size and its total;
  ``_ema_codebook_kernel`` updates embed_sum and writes the codebook.
Out-of-range indices are skipped by every kernel (no host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device, _interpreter

# The interpreter runs one program at a time in numpy: small blocks, so tiny
# test shapes still cover several row, column and code blocks and masked tails.
_INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_D=16, BLOCK_J=4, BLOCK_K=16)
_GPU_BLOCKS = dict(BLOCK_N=2048, BLOCK_D=64, BLOCK_J=16, BLOCK_K=1024)  # BLOCK_N: elements


def _blocks(d: int) -> dict:
    blocks = dict(_INTERPRETER_BLOCKS if _interpreter.INTERPRETED else _GPU_BLOCKS)
    blocks["BLOCK_D"] = min(triton.next_power_of_2(d), blocks["BLOCK_D"])
    if not _interpreter.INTERPRETED:  # a tile of ~2048 elements whatever D is
        blocks["BLOCK_N"] = max(16, blocks["BLOCK_N"] // blocks["BLOCK_D"])
    return blocks


@triton.jit
def _code_stats_kernel(z_ptr, idx_ptr, counts_ptr, sums_ptr, N, K, D,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """counts[idx[n]] += 1 and sums[idx[n], :] += z[n, :] for BLOCK_N rows x BLOCK_D columns.

    Atomics: fp32 adds into sums (order varies), int32 adds into counts (exact).
    Rows whose index is outside [0, K) are skipped. Bytes: N D s read, N D
    atomic fp32 adds (4 N D bytes of L2 traffic), N int32 adds.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    codes = tl.load(idx_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    valid = row_ok & (codes >= 0) & (codes < K)
    mask = valid[:, None] & (cols < D)[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    tl.atomic_add(sums_ptr + codes[:, None] * D + cols[None, :], z.to(tl.float32), mask=mask)
    ones = tl.full((BLOCK_N,), 1, tl.int32)
    tl.atomic_add(counts_ptr + codes, ones, mask=valid & (tl.program_id(1) == 0))


@triton.jit
def _segment_sums_kernel(z_ptr, order_ptr, offsets_ptr, sums_ptr, D,
                         BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """sums[k, cols] = sum of z[order[j], cols] for j in [offsets[k], offsets[k + 1]).

    One program per (code, column block); BLOCK_J rows at a time, each tile
    reduced by tl.sum (a fixed tree), tiles added in order: deterministic.
    Bytes: N D s gathered (rows in code order), K D 4 written.
    """
    code = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(offsets_ptr + code)
    end = tl.load(offsets_ptr + code + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    j_offs = tl.arange(0, BLOCK_J)
    for j0 in _interpreter.runtime_range(start, end, BLOCK_J):
        acc += _segment_tile(z_ptr, order_ptr, j0 + j_offs, end, cols, col_ok, D)
    tl.store(sums_ptr + code * D + cols, acc, mask=col_ok)


@triton.jit
def _segment_tile(z_ptr, order_ptr, js, end, cols, col_ok, D):
    ok = js < end
    rows = tl.load(order_ptr + js, mask=ok, other=0).to(tl.int64)
    tile = tl.load(z_ptr + rows[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                   other=0.0)
    return tl.sum(tile.to(tl.float32), axis=0)


@triton.jit
def _ema_cluster_kernel(cluster_ptr, counts_ptr, total_ptr, K, decay, keep, debias,
                        BLOCK_K: tl.constexpr):
    """One program: cluster_size = decay * cluster_size + keep * counts; total = sum / debias.

    ``keep`` = 1 - decay, ``debias`` = 1 - decay**step or 1. Bytes: 12 K.
    """
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in _interpreter.runtime_range(0, K, BLOCK_K):
        acc += _ema_cluster_tile(cluster_ptr, counts_ptr, k0 + tl.arange(0, BLOCK_K), K,
                                 decay, keep, debias)
    tl.store(total_ptr, tl.sum(acc, axis=0))


@triton.jit
def _ema_cluster_tile(cluster_ptr, counts_ptr, ks, K, decay, keep, debias):
    ok = ks < K
    size = tl.load(cluster_ptr + ks, mask=ok, other=0.0)
    counts = tl.load(counts_ptr + ks, mask=ok, other=0).to(tl.float32)
    size = decay * size + keep * counts
    tl.store(cluster_ptr + ks, size, mask=ok)
    return tl.where(ok, size / debias, 0.0)


@triton.jit
def _ema_codebook_kernel(embed_ptr, sums_ptr, cluster_ptr, codebook_ptr, total_ptr, K, D,
                         decay, keep, debias, eps, k_eps,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """embed_sum = decay * embed_sum + keep * sums; codebook = (embed_sum / debias) / smoothed.

    smoothed[k] = (n[k] + eps) / (total + K eps) * total with n = cluster_size
    / debias (already updated); where smoothed is 0 the codebook row is kept.
    Bytes: K D (12 + s) (embed_sum read + written, sums read, codebook written).
    """
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < K
    mask = k_ok[:, None] & (cols < D)[None, :]
    total = tl.load(total_ptr)
    n = tl.load(cluster_ptr + ks, mask=k_ok, other=0.0) / debias
    smoothed = (n + eps) / (total + k_eps) * total
    offs = ks.to(tl.int64)[:, None] * D + cols[None, :]
    embed = decay * tl.load(embed_ptr + offs, mask=mask, other=0.0) + keep * tl.load(
        sums_ptr + offs, mask=mask, other=0.0)
    tl.store(embed_ptr + offs, embed, mask=mask)
    old = tl.load(codebook_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nonzero = (smoothed > 0)[:, None]
    new = tl.where(nonzero, (embed / debias) / tl.where(nonzero, smoothed[:, None], 1.0), old)
    tl.store(codebook_ptr + offs, new.to(codebook_ptr.dtype.element_ty), mask=mask)


def _counts_and_sums(z: torch.Tensor, indices: torch.Tensor, num_codes: int,
                     deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 counts (K,) and fp32 sums (K, D) of validated, contiguous z and indices."""
    n, d = z.shape
    b = _blocks(d)
    counts = torch.zeros(num_codes, dtype=torch.int32, device=z.device)
    sums = torch.zeros(num_codes, d, dtype=torch.float32, device=z.device)
    if n == 0:
        return counts, sums
    col_blocks = triton.cdiv(d, b["BLOCK_D"])
    if not deterministic:
        _code_stats_kernel[(triton.cdiv(n, b["BLOCK_N"]), col_blocks)](
            z, indices, counts, sums, n, num_codes, d, BLOCK_N=b["BLOCK_N"], BLOCK_D=b["BLOCK_D"])
        return counts, sums
    # Integer histogram (exact); out-of-range rows sort last and fall outside every segment.
    _code_stats_kernel[(triton.cdiv(n, b["BLOCK_N"]), 1)](
        z, indices, counts, sums, n, num_codes, 0, BLOCK_N=b["BLOCK_N"], BLOCK_D=b["BLOCK_D"])
    keys = torch.where((indices >= 0) & (indices < num_codes), indices, num_codes)
    order = torch.argsort(keys, stable=True)
    offsets = torch.zeros(num_codes + 1, dtype=torch.int64, device=z.device)
    offsets[1:] = torch.cumsum(counts, 0)
    _segment_sums_kernel[(num_codes, col_blocks)](z, order, offsets, sums, d,
                                                  BLOCK_J=b["BLOCK_J"], BLOCK_D=b["BLOCK_D"])
    return counts, sums


def code_counts_and_sums(z: torch.Tensor, indices: torch.Tensor, num_codes: int,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the statistics on validated inputs: fp32 counts (K,) and fp32 sums (K, D)."""
    with _device.on_device(z):
        counts, sums = _counts_and_sums(z, indices, num_codes, deterministic)
    return counts.to(torch.float32), sums


def ema_update_from_stats(cluster_size: torch.Tensor, embed_sum: torch.Tensor,
                          codebook: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
                          decay: float, eps: float, bias_correction: bool, step: int) -> None:
    """The finalize, in place: state fp32 contiguous, codebook (K, D) contiguous, counts any numeric."""
    k, d = embed_sum.shape
    b = _blocks(d)
    debias = 1.0 - decay**step if bias_correction else 1.0
    total = torch.empty(1, dtype=torch.float32, device=cluster_size.device)
    with _device.on_device(cluster_size):
        _ema_cluster_kernel[(1,)](cluster_size, counts, total, k, decay, 1.0 - decay, debias,
                                  BLOCK_K=b["BLOCK_K"])
        grid = (triton.cdiv(k, b["BLOCK_N"]), triton.cdiv(d, b["BLOCK_D"]))
        _ema_codebook_kernel[grid](embed_sum, sums, cluster_size, codebook, total, k, d, decay,
                                   1.0 - decay, debias, eps, k * eps,
                                   BLOCK_K=b["BLOCK_N"], BLOCK_D=b["BLOCK_D"])


def ema_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, codebook: torch.Tensor,
               z: torch.Tensor, indices: torch.Tensor, decay: float, eps: float,
               bias_correction: bool, step: int, deterministic: bool) -> None:
    """Statistics of (z, indices) then the finalize, in place, on validated inputs."""
    with _device.on_device(z):
        counts, sums = _counts_and_sums(z, indices, cluster_size.shape[0], deterministic)
    ema_update_from_stats(cluster_size, embed_sum, codebook, counts, sums, decay, eps,
                          bias_correction, step)
