"""Nearest-codebook search and taming-style vector quantization, the public ops.

``nearest_code`` never builds the N x K distance matrix: every backend tiles
over codes with a running (min, argmin) per row. Backends: C++ CPU (blocked,
BLAS on bounded tiles for large D), CUDA (SIMT fp32, aimed at small D), Triton
(tensor-core tiles) and the reference. ``auto`` on CUDA takes CUDA for
D <= ``CUDA_AUTO_MAX_DIM``, where a GEMM tile would be mostly padding, and
Triton above; until the CUDA kernel is verified on a GPU, ``vqkernels._dispatch``
puts Triton first at every D. ``nearest_code_with_stats`` also returns the EMA
statistics, fused into the search where a backend can.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vqkernels import _ext
from vqkernels._dispatch import Backend, OpDispatch
from vqkernels.ops.ema import code_counts_and_sums
from vqkernels.reference import search as reference

METRICS = ("l2", "cosine")
PRECISIONS = ("ieee", "tf32", "bf16")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_DIM = 1024
CUDA_AUTO_MAX_DIM = 64  # from FLOP and padding counts; the search benchmark is to confirm it


def _dim_limit(max_dim):
    def limits(*, dim, **_):
        return [f"D = {dim} exceeds this backend's limit {max_dim}"] if dim > max_dim else []
    return limits


def _auto_cuda_limit(*, dim, **_):
    return [] if dim <= CUDA_AUTO_MAX_DIM else [f"auto prefers Triton for D > {CUDA_AUTO_MAX_DIM}"]


def _run_reference(z, codebook, sqnorm, precision):
    # torch.argmin ranks NaN first; the kernels never choose a code holding a NaN.
    nan_codes = codebook.isnan().any(1)
    indices, distances = reference.nearest_code(
        z, codebook.masked_fill(nan_codes[:, None], float("inf")))
    distances = distances.masked_fill(nan_codes[indices], float("nan"))
    return indices, distances.float() if z.dtype != torch.float64 else distances


def _run_compiled(z, codebook, sqnorm, precision):
    return torch.ops.vqkernels.nearest_code(z, codebook, sqnorm, precision)


def _run_triton(z, codebook, sqnorm, precision):
    return torch.ops.vqkernels.nearest_code_triton(z, codebook, sqnorm, precision)


DISPATCH = OpDispatch(
    op="nearest_code",
    backends={
        "reference": Backend("reference", _run_reference),
        "cpu": Backend("cpu", _run_compiled, DTYPES, _dim_limit(MAX_KERNEL_DIM)),
        "cuda": Backend("cuda", _run_compiled, GPU_DTYPES, _dim_limit(MAX_KERNEL_DIM)),
        "triton": Backend("triton", _run_triton, GPU_DTYPES, _dim_limit(MAX_KERNEL_DIM)),
    },
    auto_order={"cpu": ("cpu",), "cuda": ("cuda", "triton")},
    auto_skip={"cuda": _auto_cuda_limit},
)


def default_precision(dtype: torch.dtype) -> str:
    """fp32 (and fp64) inputs search exactly ("ieee"); 16-bit inputs in 16-bit products ("bf16")."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "bf16"


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    precision: str | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row of every row of ``z``, without an N x K matrix.

        l2:     indices[n] = argmin_k ||z[n] - e[k]||^2,   distances[n] = that minimum
        cosine: the same on l2-normalized rows, distances[n] = 1 - cos(z[n], e[k])

    ``z`` (N, D) and ``codebook`` (K, D): float32 / float16 / bfloat16 (float64 on
    CPU). Returns ``indices`` int64 (N,) with ties to the lowest index, as
    ``torch.argmin``, and ``distances`` float32 (N,) (float64 for float64 input),
    the exact distance of the chosen code. ``precision`` of the search products:
    "ieee" (fp32-exact), "tf32" or "bf16" (16-bit products: the input's own
    16-bit type, bf16 for fp32 input); default "ieee" for fp32 input, "bf16" for
    16-bit input. A row with NaN gets index 0 and distance NaN.
    """
    precision = _validate(z, codebook, metric, precision)
    if metric == "cosine":
        return _nearest_code_cosine(z, codebook, precision, backend)
    return _nearest_code_l2(z, codebook, precision, backend)


def nearest_code_with_stats(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    precision: str | None = None,
    deterministic: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The l2 ``nearest_code`` and the EMA statistics of its assignment, in one call::

        indices, distances = nearest_code(z, codebook)
        counts, sums = code_counts_and_sums(z, indices, K)     (float32 (K,), (K, D))

    For a training step: ``ema_update_(..., stats=(counts, sums))`` finishes
    it. The Triton backend reads z once (the search kernel adds each row into
    its code's sums, with atomics, from the rows it already holds). The CUDA
    search merges code splits across blocks, so the winner is known only at the
    end: there, on the CPU and with ``deterministic=True``, the statistics are a
    second pass (``code_counts_and_sums``). Which is faster on a GPU is for the
    "with-stats" cases of the search benchmark to say; ``auto`` picks the
    search's backend either way. Arguments as ``nearest_code`` and
    ``code_counts_and_sums``.
    """
    precision = _validate(z, codebook, "l2", precision)
    chosen = DISPATCH.select(backend, z.device, z.dtype, dim=z.shape[1])
    z, codebook = z.contiguous(), codebook.contiguous()
    if chosen.name == "triton" and not deterministic:
        # The fused kernel gives a row without a finite score code 0 itself (its statistics
        # must count the row there, so no pass here could fix the index afterwards).
        return torch.ops.vqkernels.nearest_code_with_stats_triton(z, codebook, _sqnorm(codebook),
                                                                  precision)
    indices, distances = chosen.run(z, codebook, _sqnorm(codebook), precision)
    indices = _code_0_where_not_finite(indices, distances)
    counts, sums = code_counts_and_sums(z, indices, codebook.shape[0],
                                        deterministic=deterministic, backend=chosen.name)
    return indices, distances, counts, sums


def _nearest_code_l2(z, codebook, precision, backend):
    run = DISPATCH.select(backend, z.device, z.dtype, dim=z.shape[1]).run
    indices, distances = run(z.contiguous(), codebook.contiguous(), _sqnorm(codebook), precision)
    return _code_0_where_not_finite(indices, distances), distances


def _code_0_where_not_finite(indices, distances):
    """Index 0 for the rows with no finite distance (NaN or inf in z, or no finite code).

    Every distance of such a row is NaN or inf: a tie, which goes to the
    lowest index; a kernel's score |e|^2 - 2 z.e may rank another code first.
    """
    return indices.masked_fill(~torch.isfinite(distances), 0)


def _nearest_code_cosine(z, codebook, precision, backend):
    """On unit vectors ||a - b||^2 = 2 - 2 cos, so the l2 search ranks by cosine.

    A zero row stays zero (F.normalize): 1 - cos = 1 for every code, a tie that
    goes to index 0, while the l2 ranking would follow the codes' rounding
    around unit norm. So the distance is rebuilt from the norms,
    1 - cos = 1 - (|a|^2 + |b|^2 - d) / 2, and zero rows get index 0.
    """
    z_unit, codes_unit = _normalize(z), _normalize(codebook)
    indices, l2 = _nearest_code_l2(z_unit, codes_unit, precision, backend)
    z_sq = torch.linalg.vector_norm(z_unit, dim=1, dtype=l2.dtype).square()
    indices = indices.masked_fill(z_sq == 0, 0)
    code_sq = _sqnorm(codes_unit).to(l2.dtype).index_select(0, indices)
    return indices, 1 - (z_sq + code_sq - l2) / 2


def _normalize(x):
    return F.normalize(x, dim=1, eps=1e-12)


def _sqnorm(codebook):
    """||e_k||^2 in float32 (float64 for float64), computed once per call without a K x D temp."""
    if codebook.dtype in (torch.float32, torch.float64):
        # Without dtype=: on a CPU the dtype= reduction ran 70x slower (1.3 ms at 1024 x 128).
        return torch.linalg.vector_norm(codebook, dim=1).square()
    return torch.linalg.vector_norm(codebook, dim=1, dtype=torch.float32).square()


def _validate(z, codebook, metric, precision):
    for name, x in (("z", z), ("codebook", codebook)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D (N, D), got shape {tuple(z.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] < 1:
        raise ValueError("codebook must have at least one code (K >= 1)")
    if z.shape[1] != codebook.shape[1] or z.shape[1] < 1:
        raise ValueError(f"z (N, D) and codebook (K, D) need the same D >= 1, got "
                         f"{tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.dtype != codebook.dtype:
        raise TypeError(f"z and codebook must have the same dtype, got {z.dtype} and {codebook.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if precision is None:
        return default_precision(z.dtype)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


# --- torch.library registration ------------------------------------------------------------

def _fake_nearest_code(z, codebook, sqnorm, precision):
    dist_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return (z.new_empty(z.shape[0], dtype=torch.int64), z.new_empty(z.shape[0], dtype=dist_dtype))


@torch.library.custom_op("vqkernels::nearest_code_triton", mutates_args=())
def _nearest_code_triton(z: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor,
                         precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    from vqkernels.triton import search as triton_search  # imports triton on first use

    return triton_search.nearest_code(z, codebook, codebook_sqnorm, precision)


@torch.library.custom_op("vqkernels::nearest_code_with_stats_triton", mutates_args=())
def _nearest_code_with_stats_triton(z: torch.Tensor, codebook: torch.Tensor,
                                    codebook_sqnorm: torch.Tensor, precision: str
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    from vqkernels.triton import search as triton_search

    return triton_search.nearest_code_with_stats(z, codebook, codebook_sqnorm, precision)


@_nearest_code_with_stats_triton.register_fake
def _(z, codebook, codebook_sqnorm, precision):
    return (*_fake_nearest_code(z, codebook, codebook_sqnorm, precision),
            z.new_empty(codebook.shape[0], dtype=torch.float32),
            z.new_empty(codebook.shape, dtype=torch.float32))


torch.library.register_fake("vqkernels::nearest_code_triton", _fake_nearest_code)
if _ext._C is not None and hasattr(torch.ops.vqkernels, "nearest_code"):
    torch.library.register_fake("vqkernels::nearest_code", _fake_nearest_code)


# --- vector_quantize: search + gather + taming losses, straight-through ---------------------

def vector_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    beta: float = 0.25,
    legacy: bool = True,
    metric: str = "l2",
    precision: str | None = None,
    deterministic: bool | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``z`` (N, D) to its nearest codes, with taming-transformers' losses.

        zq   = codebook[nearest_code(z, codebook)]
        loss = mse(sg(zq), z) + beta * mse(zq, sg(z))      (legacy=True, taming's default)
        loss = beta * mse(sg(zq), z) + mse(zq, sg(z))      (legacy=False)
        z_q  = z + sg(zq - z)                              (straight-through)

    Both mse terms have the value mean((zq - z)^2), so it is computed once; the
    backward gives z the straight-through gradient plus the commitment term and
    the codebook a scatter-add of its term over the chosen codes. ``metric=
    "cosine"`` quantizes the l2-normalized z against the l2-normalized codebook
    (ViT-VQGAN / LlamaGen), gradients flowing through the normalization.
    ``deterministic``: bitwise-reproducible codebook gradients (default:
    ``torch.are_deterministic_algorithms_enabled()``). Returns ``(z_q, loss,
    indices)``: z_q in z's dtype, loss float32 (float64 for float64), indices int64.
    """
    precision = _validate(z, codebook, metric, precision)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool):
        raise TypeError(f"beta must be a number, got {type(beta).__name__}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if metric == "cosine":
        z, codebook = _normalize(z), _normalize(codebook)
    DISPATCH.select(backend, z.device, z.dtype, dim=z.shape[1])  # fail here, with the reasons
    return torch.ops.vqkernels.vector_quantize(z.contiguous(), codebook.contiguous(), float(beta),
                                               bool(legacy), precision, backend or "auto",
                                               bool(deterministic))


def _loss_weights(beta, legacy):
    """(weight of the term whose gradient reaches z, weight of the codebook's term)."""
    return (1.0, beta) if legacy else (beta, 1.0)


@torch.library.custom_op("vqkernels::vector_quantize", mutates_args=())
def _vector_quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float, legacy: bool,
                     precision: str, backend: str, deterministic: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    indices, _ = _nearest_code_l2(z, codebook, precision, backend)
    zq = codebook.index_select(0, indices)
    loss_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    mse = (zq.to(loss_dtype) - z.to(loss_dtype)).square().sum() / max(z.numel(), 1)
    return z + (zq - z), sum(_loss_weights(beta, legacy)) * mse, indices


@_vector_quantize.register_fake
def _(z, codebook, beta, legacy, precision, backend, deterministic):
    loss_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return torch.empty_like(z), z.new_empty((), dtype=loss_dtype), z.new_empty(z.shape[0], dtype=torch.int64)


def _vq_setup_context(ctx, inputs, output):
    z, codebook, beta, legacy, _, _, deterministic = inputs
    ctx.save_for_backward(z, codebook, output[2])
    ctx.weights = _loss_weights(beta, legacy)
    ctx.deterministic = deterministic


def _vq_backward(ctx, grad_z_q, grad_loss, _grad_indices):
    """d/dz = grad_z_q + w_z * 2 (z - zq) / numel * g;  d/de_k = sum_{n: idx=k} w_e * 2 (zq - z) / numel * g."""
    z, codebook, indices = ctx.saved_tensors
    w_z, w_e = ctx.weights
    zq = codebook.index_select(0, indices)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    diff = zq.to(acc) - z.to(acc)
    scale = 2.0 * grad_loss.to(acc) / max(z.numel(), 1)
    grad_z = grad_codebook = None
    if ctx.needs_input_grad[0]:
        grad_z = (grad_z_q.to(acc) - (w_z * scale) * diff).to(z.dtype)
    if ctx.needs_input_grad[1]:
        rows = (w_e * scale) * diff
        grad_codebook = _scatter_rows(rows, indices, codebook.shape[0], ctx.deterministic)
        grad_codebook = grad_codebook.to(codebook.dtype)
    return grad_z, grad_codebook, None, None, None, None, None


def _scatter_rows(rows, indices, num_codes, deterministic):
    """out[k] = sum of rows[n] with indices[n] == k; in a fixed order when ``deterministic``."""
    if not deterministic:  # atomics on CUDA: the summation order varies
        return rows.new_zeros(num_codes, rows.shape[1]).index_add_(0, indices, rows)
    order = torch.argsort(indices, stable=True)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=rows.device)
    counts.index_add_(0, indices, torch.ones_like(indices))  # integer atomics: exact
    return torch.segment_reduce(rows.index_select(0, order), "sum", lengths=counts, axis=0,
                                unsafe=True)


torch.library.register_autograd("vqkernels::vector_quantize", _vq_backward,
                                setup_context=_vq_setup_context)
