"""Reference EMA codebook update (VQ-VAE-EMA, van den Oord et al. / Sonnet).

Pure PyTorch, device-agnostic: the specification the fast backends are
tested against.
"""

from __future__ import annotations

import torch


def code_counts_and_sums(
    z: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code assignment counts and sums of the assigned vectors.

    For z (N, D) and indices (N,) with values in [0, K)::

        counts[k]  = #{n : indices[n] = k}
        sums[k, :] = sum_{n : indices[n] = k} z[n, :]

    Built with bincount / index_add (no N x K one-hot). Both are float64 if
    z is float64, else float32; counts (K,), sums (K, D).
    """
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    counts = torch.bincount(indices, minlength=num_codes).to(dtype)
    sums = torch.zeros(num_codes, z.shape[1], dtype=dtype, device=z.device)
    sums.index_add_(0, indices, z.to(dtype))
    return counts, sums


def ema_update_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    decay: float,
    eps: float = 1e-5,
    bias_correction: bool = False,
    step: int | None = None,
) -> None:
    """One EMA codebook step, in place on cluster_size, embed_sum and codebook.

    With ``counts, sums = code_counts_and_sums(z, indices, K)``::

        cluster_size = decay * cluster_size + (1 - decay) * counts      (stored)
        embed_sum    = decay * embed_sum    + (1 - decay) * sums        (stored)

        c = 1 / (1 - decay**step) if bias_correction else 1
        n = c * cluster_size,  e = c * embed_sum     (Sonnet zero-debias; the
                                                      stored state stays raw)
        total = sum_k n[k]
        smoothed[k] = (n[k] + eps) / (total + K * eps) * total   (Laplace)
        codebook[k] = e[k] / smoothed[k]

    A code whose smoothed size is 0 (only when total = 0, or eps = 0 and the
    code is empty) keeps its current codebook row instead of becoming nan,
    so an empty batch on an all-zero state is a no-op for the codebook.

    The state (cluster_size (K,), embed_sum (K, D)) is float32 or float64 and
    the math runs in its dtype; z (N, D) may be any float dtype; codebook
    (K, D) may be lower precision and receives the result cast to its dtype.
    ``step >= 1`` is required when ``bias_correction`` is set. Runs without
    autograd (codebook may be a Parameter). Returns None.
    """
    if bias_correction and (step is None or step < 1):
        raise ValueError(f"step must be an int >= 1 when bias_correction is set, got {step!r}")

    with torch.no_grad():
        counts, sums = code_counts_and_sums(z, indices, cluster_size.shape[0])
        ema_update_from_stats_(cluster_size, embed_sum, codebook, counts, sums, decay, eps,
                               bias_correction, step)


def ema_update_from_stats_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float = 1e-5,
    bias_correction: bool = False,
    step: int | None = None,
) -> None:
    """``ema_update_`` from given statistics: counts (K,) and sums (K, D) of the batch."""
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums.to(embed_sum.dtype), alpha=1.0 - decay)

    n, e = cluster_size, embed_sum
    if bias_correction:
        debias = 1.0 - decay**step
        n, e = n / debias, e / debias
    total = n.sum()
    smoothed = (n + eps) / (total + n.shape[0] * eps) * total

    nonzero = smoothed > 0
    safe = torch.where(nonzero, smoothed, torch.ones_like(smoothed))
    updated = torch.where(nonzero[:, None], e / safe[:, None], codebook.to(e.dtype))
    codebook.copy_(updated)
