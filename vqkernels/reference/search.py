"""Reference nearest-code search and taming-style vector quantization.

Pure PyTorch, device-agnostic: the specification the fast backends are
tested against. Math runs in float64 when an input is float64, otherwise in
float32 (fp16 / bf16 inputs are upcast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("l2", "cosine")

# Upper bound on the (rows, K, D) difference tensor built per chunk; keeps the
# exact sum((z - e)^2) form affordable in memory for moderate N.
_CHUNK_ELEMENTS = 1 << 24

_NORMALIZE_EPS = 1e-12


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=-1, eps=_NORMALIZE_EPS)


def _prepare(z: torch.Tensor, codebook: torch.Tensor,
             metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """z and the codebook in the compute dtype, rows l2-normalized for the cosine metric."""
    dtype = _compute_dtype(z, codebook)
    z, codebook = z.to(dtype), codebook.to(dtype)
    return (_normalize(z), _normalize(codebook)) if metric == "cosine" else (z, codebook)


def _pairwise_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(rows, K) distances between already prepared rows of z and codes."""
    if metric == "l2":
        return (z[:, None, :] - codebook[None, :, :]).square().sum(dim=-1)
    return 1.0 - (z[:, None, :] * codebook[None, :, :]).sum(dim=-1)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((a - b)^2), defined as 0 for empty inputs instead of nan."""
    return (a - b).square().sum() / max(a.numel(), 1)


def nearest_code(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of, and distance to, the nearest codebook row for each row of z.

    For z (N, D) and codebook e (K, D)::

        "l2":     dist[n, k] = sum_d (z[n, d] - e[k, d])^2
        "cosine": dist[n, k] = 1 - <z[n] / max(|z[n]|, eps), e[k] / max(|e[k]|, eps)>
                  (F.normalize semantics, eps = 1e-12; a zero vector stays
                  zero, so its distance to every code is 1)

        indices[n]   = argmin_k dist[n, k]   (ties go to the lowest k)
        distances[n] = dist[n, indices[n]]

    The l2 distance is the exact sum of squared differences, not the
    |z|^2 - 2 z.e + |e|^2 expansion, so it does not suffer cancellation.

    Returns ``indices`` (N,) int64 and ``distances`` (N,) in float64 if an
    input is float64, else float32. N = 0 gives empty outputs.
    """
    _check_metric(metric)
    z, codebook = _prepare(z, codebook, metric)

    n, k = z.shape[0], codebook.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(1, k * codebook.shape[1]))
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    distances = torch.empty(n, dtype=z.dtype, device=z.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        dist = _pairwise_distances(z[start:stop], codebook, metric)
        best = torch.argmin(dist, dim=1)
        indices[start:stop] = best
        distances[start:stop] = dist.gather(1, best[:, None]).squeeze(1)
    return indices, distances


def vector_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    legacy: bool = True,
    metric: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize z (N, D) to its nearest codebook rows, taming VectorQuantizer2 style.

    With ``indices = nearest_code(z, codebook, metric)`` and
    ``zq = codebook[indices]``, ``sg`` = stop-gradient (``detach``) and
    ``mse(a, b) = mean((a - b)^2)`` over all N * D elements::

        legacy=True:  loss = mse(sg(zq), z) + beta * mse(zq, sg(z))
        legacy=False: loss = beta * mse(sg(zq), z) + mse(zq, sg(z))
        z_q = zq in value, with d z_q / d z = identity (straight-through)

    So the codebook gradient of the loss is ``2 * w * (e_k - z_n) / (N * D)``
    summed over the rows n assigned to code k (w = beta if legacy else 1),
    zero for unassigned codes; z gets ``2 * w' * (z_n - zq_n) / (N * D)``
    (w' = 1 if legacy else beta) from the loss, and the upstream gradient
    unchanged through z_q.

    The straight-through output is taming's ``z + sg(zq - z)`` in value and
    gradient (it equals the code up to one rounding), so trained models see
    the numbers they were trained with.

    ``metric="cosine"`` follows the l2-normalized codebooks of ViT-VQGAN /
    LlamaGen: both z and the codebook rows are normalized first (F.normalize,
    eps 1e-12), ``zq`` is the normalized code, the loss compares normalized
    vectors, and the straight-through gradient flows into z through the
    normalization.

    Returns ``z_q`` (N, D) in z's dtype, the scalar ``loss`` (float64 if an
    input is float64, else float32; 0 for an empty batch) and ``indices``
    (N,) int64.
    """
    indices, _ = nearest_code(z.detach(), codebook.detach(), metric)
    z_c, codebook_c = _prepare(z, codebook, metric)
    zq = codebook_c[indices]

    commitment = _mse(zq.detach(), z_c)
    codebook_loss = _mse(zq, z_c.detach())
    if legacy:
        loss = commitment + beta * codebook_loss
    else:
        loss = beta * commitment + codebook_loss

    z_q = z_c + (zq - z_c).detach()
    return z_q.to(z.dtype), loss, indices


def _nearest_index(z, codebook, metric):
    return nearest_code(z, codebook, metric)[0]


def residual_nearest_code(
    z: torch.Tensor, codebooks, metric: str = "l2", search=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual quantization of the rows of z by Q codebooks in turn.

    For z (N, D) and codebooks e^0 .. e^(Q-1) (each (K_q, D))::

        r_0 = z,   i_q = nearest_code(r_q, e^q, metric),   r_(q+1) = r_q - e^q[i_q]
        quantized = sum_q e^q[i_q]

    Residuals and the sum in the compute dtype (float64 if an input is
    float64, else float32). Returns ``indices`` (N, Q) int64 and ``quantized``
    (N, D) in z's dtype. ``search(residual, codebook, metric) -> indices`` ranks
    each stage (default: ``nearest_code`` here), so that the ops layer runs this
    same stage loop on a kernel backend's search.
    """
    dtype = _compute_dtype(z, *codebooks)
    residual = z.to(dtype)
    quantized = torch.zeros_like(residual)
    indices = []
    for codebook in codebooks:
        ind = (search or _nearest_index)(residual, codebook, metric)
        codes = codebook.to(dtype).index_select(0, ind)
        residual = residual - codes
        quantized = quantized + codes
        indices.append(ind)
    return torch.stack(indices, dim=1), quantized.to(z.dtype)
