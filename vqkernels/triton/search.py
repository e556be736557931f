"""Nearest-codebook search, Triton kernel (math in vqkernels/reference/search.py).

One program owns BLOCK_N rows of z and streams the whole codebook past them in
BLOCK_K-code tiles, so the N x K distance matrix never exists anywhere: per
tile it lives in registers just long enough to update each row's running
(min score, argmin).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqkernels.triton import _device, _interpreter

PRECISIONS = ("ieee", "tf32", "bf16")

# The interpreter runs one program at a time in numpy: one small fixed config,
# no autotuning. Small blocks so tiny test shapes still cover several K tiles,
# several D chunks and masked tails.
_INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_K=32, BLOCK_D_MAX=64)


def _configs(rows):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D_MAX": bd}, num_warps=w,
                          num_stages=s) for bn, bk, bd, w, s in rows]


# Autotuning candidates, (BLOCK_N, BLOCK_K, BLOCK_D_MAX, num_warps, num_stages),
# one family per kind of dot. BLOCK_D_MAX caps the D chunk (tl.dot needs >= 16);
# a config that does not fit a shape fails to launch and autotuning skips it.
_CONFIGS = {
    # fp16 / bf16 tiles: wgmma in the input dtype. BLOCK_D_MAX 256 keeps a
    # D <= 256 block of z in shared memory for the whole codebook sweep.
    "half": _configs([(128, 128, 128, 8, 3), (128, 128, 256, 8, 2), (128, 128, 64, 4, 4),
                      (256, 128, 64, 8, 3), (64, 128, 128, 4, 3), (128, 256, 64, 8, 3),
                      (128, 64, 128, 4, 3), (256, 64, 64, 8, 3)]),
    # fp32 tiles on tensor cores (tf32, bf16): 4-byte loads, so half the D chunk.
    "fp32": _configs([(128, 128, 32, 8, 3), (128, 128, 64, 8, 2), (128, 64, 64, 4, 3),
                      (64, 128, 64, 4, 3), (256, 128, 32, 8, 3), (128, 256, 32, 8, 3)]),
    # fp32 "ieee": an FMA dot on the CUDA cores; larger tiles spill.
    "fp32_ieee": _configs([(64, 64, 16, 4, 3), (128, 64, 16, 8, 2), (64, 128, 16, 4, 2),
                           (32, 64, 32, 4, 2), (128, 128, 16, 8, 2)]),
}


def _config_family(dtype: torch.dtype, precision: str) -> str:
    if dtype != torch.float32:
        return "half"
    if precision == "ieee":
        return "fp32_ieee"
    return "fp32"


def _block_d(d: int, cap: int) -> int:
    """D chunk: the next power of two of D (at least 16, for tl.dot), at most ``cap``."""
    return min(max(16, triton.next_power_of_2(d)), max(16, cap))


@triton.jit
def _round_mantissa(x, BITS: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even with BITS explicit mantissa bits (7: bf16, 10: tf32)."""
    DROP: tl.constexpr = 23 - BITS
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)
    bits = (bits >> DROP) << DROP
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_codes(z, e, acc, PRECISION: tl.constexpr):
    """``acc + z @ e^T`` for z (BLOCK_N, BLOCK_D) and e (BLOCK_K, BLOCK_D), fp32 accumulate.

    fp32 tiles follow PRECISION; fp16 / bf16 tiles are multiplied in their own
    dtype (their products are exact in fp32 whatever the mode).
    """
    e_t = tl.trans(e)
    if _interpreter.INTERPRETED:
        # The interpreter's dot ignores input_precision and cannot multiply
        # bf16 (it stores it as uint16), so the narrow tensor-core inputs are
        # emulated by rounding fp32 operands, then an exact fp32 product.
        if z.dtype == tl.float32 and PRECISION == "tf32":
            z, e_t = _round_mantissa(z, 10), _round_mantissa(e_t, 10)
        elif z.dtype == tl.float32 and PRECISION == "bf16":
            z, e_t = _round_mantissa(z, 7), _round_mantissa(e_t, 7)
        return tl.dot(z.to(tl.float32), e_t.to(tl.float32), acc)
    else:
        if z.dtype == tl.float32:
            if PRECISION == "bf16":
                return tl.dot(z.to(tl.bfloat16), e_t.to(tl.bfloat16), acc)
            elif PRECISION == "tf32":
                return tl.dot(z, e_t, acc, input_precision="tf32")
            else:
                return tl.dot(z, e_t, acc, input_precision="ieee")
        else:
            return tl.dot(z, e_t, acc)


@triton.jit
def _scan_tile(z, z_rows, row_ok, e_ptr, sqnorm_ptr, k0, K, best, best_idx,
               D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold codes [k0, k0 + BLOCK_K) into the running (best score, best index) of each row.

    ``z`` is the whole (BLOCK_N, BLOCK_D) block when D <= BLOCK_D; otherwise
    it is unused and z is read chunk by chunk from ``z_rows``.
    """
    d_offs = tl.arange(0, BLOCK_D)
    k_offs = tl.arange(0, BLOCK_K)
    codes = k0 + k_offs
    code_ok = codes < K
    e_rows = e_ptr + codes.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if D <= BLOCK_D:
        # In z's dtype: the residual search's z is its fp32 residual, its codes may be 16-bit.
        e = tl.load(e_rows + d_offs[None, :], mask=code_ok[:, None] & (d_offs < D)[None, :],
                    other=0.0).to(z.dtype)
        acc = _dot_codes(z, e, acc, PRECISION)
    else:
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + d_offs
            dim_ok = dims < D
            z_chunk = tl.load(z_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                              other=0.0)
            e = tl.load(e_rows + dims[None, :], mask=code_ok[:, None] & dim_ok[None, :],
                        other=0.0)
            acc = _dot_codes(z_chunk, e, acc, PRECISION)
    sqnorm = tl.load(sqnorm_ptr + codes, mask=code_ok, other=float("inf"))
    score = sqnorm[None, :] - 2.0 * acc
    # tl.min ignores NaN (minnum on the GPU, nanmin in the interpreter); the
    # second reduction picks the first k at the minimum.
    tile_min = tl.min(score, axis=1)
    tile_arg = tl.min(tl.where(score == tile_min[:, None], k_offs[None, :], BLOCK_K), axis=1)
    better = tile_min < best
    return tl.where(better, tile_min, best), tl.where(better, k0 + tile_arg, best_idx)


@triton.jit
def _nearest_code_kernel(
    z_ptr, e_ptr, sqnorm_ptr, idx_ptr, dist_ptr, counts_ptr, sums_ptr, N, K,
    D: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D_MAX: tl.constexpr,  # noqa: ARG001 (read by the BLOCK_D heuristic)
):
    """Nearest code for BLOCK_N rows of z (N, D) among the K rows of e (K, D).

    Search, per tile of BLOCK_K codes (tl.dot over D in BLOCK_D chunks)::

        score[n, k] = |e_k|^2 - 2 <z_n, e_k>        (= |z_n - e_k|^2 - |z_n|^2)
        idx[n]      = argmin_k score[n, k]           ties -> lowest k
        dist[n]     = sum_d (z[n, d] - e[idx[n], d])^2, fp32, recomputed exactly

    Ties: inside a tile the lowest k whose score equals the tile minimum;
    across tiles (visited in increasing k) only a strictly smaller minimum
    replaces the running one. Padding: codes k >= K load as 0 with score
    +inf; D is zero-padded to BLOCK_D, which adds nothing to the dot.
    NaN: tl.min skips NaN scores, so a code with a NaN never wins; a row of z
    holding a NaN (every score NaN) keeps index 0 and gets distance NaN.

    STATS (the EMA training step's statistics, while z's rows are loaded for
    the distance)::

        counts[idx[n]] += 1,   sums[idx[n], :] += z[n, :]      (atomics, fp32 sums)

    into zeroed counts (K,) int32 and sums (K, D) fp32: the per-code statistics
    of code_counts_and_sums without a second read of z (N D atomic adds).

    FLOPs: 2 * N * K * D for the scores (+ 3 * N * D for the exact distance).
    Bytes: reads N * D * s (z, re-read from L2 per K tile when D > BLOCK_D),
    cdiv(N, BLOCK_N) * K * (D * s + 4) (codebook and norms, from L2 after the
    first pass), N * D * s (winning codes); writes N * 12 (int64 index, fp32
    distance); s = sizeof(dtype). Compute-bound for D >= ~32.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * D
    d_offs = tl.arange(0, BLOCK_D)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    if D <= BLOCK_D:
        # One chunk covers D: load the z block once for the whole codebook.
        z = tl.load(z_rows + d_offs[None, :], mask=row_ok[:, None] & (d_offs < D)[None, :],
                    other=0.0)
    else:
        z = 0.0
    for k0 in _interpreter.runtime_range(0, K, BLOCK_K):
        best, best_idx = _scan_tile(z, z_rows, row_ok, e_ptr, sqnorm_ptr, k0, K, best, best_idx,
                                    D, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)

    # A row with no finite score (inf or NaN in z) takes code 0 (docs/NUMERICS.md).
    best_idx = tl.where((best > float("-inf")) & (best < float("inf")), best_idx, 0)
    # The score's expansion cancels when z is close to its code: recompute the
    # winner's distance directly.
    best_rows = e_ptr + best_idx.to(tl.int64)[:, None] * D
    dist = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + d_offs
        mask = row_ok[:, None] & (dims < D)[None, :]
        z_chunk = tl.load(z_rows + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        diff = z_chunk - tl.load(best_rows + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        dist += tl.sum(diff * diff, axis=1)
        if STATS:
            tl.atomic_add(sums_ptr + best_idx.to(tl.int64)[:, None] * D + dims[None, :], z_chunk,
                          mask=mask)
    if STATS:
        tl.atomic_add(counts_ptr + best_idx, tl.full((BLOCK_N,), 1, tl.int32), mask=row_ok)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, dist, mask=row_ok)


def _tuned(configs, **autotune_options):
    return triton.autotune(configs=configs, key=["K", "D", "PRECISION", "STATS"],
                           **autotune_options)(
        triton.heuristics({"BLOCK_D": lambda args: _block_d(args["D"], args["BLOCK_D_MAX"])})(
            _nearest_code_kernel))


_TUNED = {family: _tuned(configs) for family, configs in _CONFIGS.items()}
# Autotuning runs the kernel once per config: the statistics are zeroed before
# each run, and again before the real one.
_TUNED_STATS = {family: _tuned(configs, reset_to_zero=["counts_ptr", "sums_ptr"])
                for family, configs in _CONFIGS.items()}


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor,
                 precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the search on validated inputs.

    z (N, D) and codebook (K >= 1, D): contiguous, same dtype (fp32 / fp16 /
    bf16), on the GPU (or the CPU under the interpreter); codebook_sqnorm (K,)
    fp32 = |e_k|^2; precision in PRECISIONS. Returns indices (N,) int64 (ties
    to the lowest index; NaN rows -> 0) and the exact squared distances (N,)
    fp32 (NaN for NaN rows).
    """
    indices, distances = _outputs(z)
    _launch(z, codebook, codebook_sqnorm, precision, indices, distances, None)
    return indices, distances


def nearest_code_with_stats(z: torch.Tensor, codebook: torch.Tensor,
                            codebook_sqnorm: torch.Tensor, precision: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``nearest_code`` plus counts (K,) fp32 and sums (K, D) fp32 of z per chosen code."""
    indices, distances = _outputs(z)
    counts = torch.zeros(codebook.shape[0], dtype=torch.int32, device=z.device)
    sums = torch.zeros(codebook.shape, dtype=torch.float32, device=z.device)
    _launch(z, codebook, codebook_sqnorm, precision, indices, distances, (counts, sums))
    return indices, distances, counts.to(torch.float32), sums


def _outputs(z):
    n = z.shape[0]
    return (torch.empty(n, dtype=torch.int64, device=z.device),
            torch.empty(n, dtype=torch.float32, device=z.device))


def _launch(z, codebook, codebook_sqnorm, precision, indices, distances, stats):
    n, d = z.shape
    if n == 0:
        return
    counts, sums = stats if stats is not None else (indices, indices)  # unused without STATS
    args = (z, codebook, codebook_sqnorm, indices, distances, counts, sums, n, codebook.shape[0])
    constants = dict(D=d, PRECISION=precision, STATS=stats is not None)
    with _device.on_device(z):
        if _interpreter.INTERPRETED:
            cfg = _INTERPRETER_CONFIG
            grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
            _nearest_code_kernel[grid](*args, **constants, BLOCK_D=_block_d(d, cfg["BLOCK_D_MAX"]),
                                       **cfg)
            return
        tuned = (_TUNED if stats is None else _TUNED_STATS)[_config_family(z.dtype, precision)]
        tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **constants)
